"""Config files as the command-line tools load them.

  load_config_file("configs/mae_fmnist.py:runlocal")   the file's config, no --config.* override

The trainer, the benchmark and the memory planner compare a command line's config with its
file's (setup.refuse_inert_overrides), and the benchmark loads its --also configs.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags


def load_config_file(spec: str):
  """The config `spec` ("PATH[:ARG]", as --config takes it) describes, without overrides:
  loaded by ml_collections' own --config flag, so exactly as the command line loads it."""
  probe = flags.FlagValues()
  probe_argv = ["mim_jax", f"--config={spec}"]
  config_flags.DEFINE_config_file("config", None, "", flag_values=probe, sys_argv=probe_argv)
  probe(probe_argv)
  return probe.config
