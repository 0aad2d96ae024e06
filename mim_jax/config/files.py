"""Config files as the command-line tools load them.

  load_config_file("configs/mae_fmnist.py:runlocal")   the file's config, no --config.* override

The trainer, the benchmark and the memory planner compare a command line's config with its
file's (setup.refuse_inert_overrides), and the benchmark loads its --also configs.

  refuse_flags_beside_fields(flag_values, overrides, {"batch": "global_batch_size"})
      a tool's flag given beside the --config field it would overwrite
  require_loaded(flag_values)        ConfigError for a --config file that did not load
"""

from __future__ import annotations

import re

import ml_collections
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


def require_loaded(flag_values, name: str = "config") -> None:
  """ConfigError for a --NAME file that did not load (missing, a folder): ml_collections
  raises OSError when such a config is first read (at parsing only if an override reads it),
  with a traceback; every tool asks here first."""
  try:
    value = flag_values[name].value
    getattr(value, "keys", None)  # ml_collections' placeholder raises its OSError here
  except OSError as e:
    # The operating system's reason ("[Errno 2] No such file or directory: ..."), not the
    # lines ml_collections wraps it in.
    found = re.search(r"\[Errno \d+\][^\n]*", str(e))
    reason = found.group(0) if found else str(e).strip().splitlines()[-1]
    raise config_error(f"--{name}", flag_values[name].config_filename,
                       "a config file that loads, e.g. configs/mae_fmnist.py[:ARG]", reason
                       ) from None
  if not isinstance(value, ml_collections.ConfigDict):
    raise config_error(f"--{name}", flag_values[name].config_filename,
                       "a config file whose get_config(arg=None) returns an "
                       f"ml_collections.ConfigDict; it returns a {type(value).__name__}")


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
