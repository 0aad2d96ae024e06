"""Config files as the command-line tools load them.

  load_config_file("configs/mae_fmnist.py:runlocal")   the file's config, no --config.* override

The trainer, the benchmark and the memory planner compare a command line's config with its
file's (setup.refuse_inert_overrides), and the benchmark loads its --also configs.

  refuse_flags_beside_fields(flag_values, overrides, {"batch": "global_batch_size"})
      a tool's flag given beside the --config field it would overwrite
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mim_jax.config.errors import config_error


def load_config_file(spec: str):
  """The config `spec` ("PATH[:ARG]", as --config takes it) describes, without overrides:
  loaded by ml_collections' own --config flag, so exactly as the command line loads it."""
  probe = flags.FlagValues()
  probe_argv = ["mim_jax", f"--config={spec}"]
  config_flags.DEFINE_config_file("config", None, "", flag_values=probe, sys_argv=probe_argv)
  probe(probe_argv)
  return probe.config


# The values by which a tool's flag says "the config's own": such a flag replaces nothing.
UNSET_FLAG_VALUES = ("", 0, "config")


def refuse_flags_beside_fields(flag_values, overrides, fields: dict[str, str]) -> None:
  """ConfigError for a tool flag (a key of `fields`) set to replace the config field it maps
  to while the command line also overrides that field (`overrides`: ml_collections' override
  values): one of the two would silently lose."""
  for flag, field in fields.items():
    value = flag_values[flag].value
    if value not in UNSET_FLAG_VALUES and field in overrides:
      raise config_error(f"--{flag}", value, f"given beside --config.{field}, which it "
                         "replaces: give one of the two")
