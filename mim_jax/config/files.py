"""Config files as the command-line tools load them.

  load_config_file("configs/mae_fmnist.py:runlocal")   the file's config, no --config.* override

The trainer, the benchmark and the memory planner compare a command line's config with its
file's (setup.refuse_inert_overrides), and the benchmark loads its --also configs.

  refuse_flags_beside_fields(flag_values, overrides, {"batch": "global_batch_size"})
      a tool's flag given beside the --config field it would overwrite
  require_loaded(flag_values)        ConfigError for a --config file that did not load
  load_flag_config("configs/x.py", "--also")
      a config file another flag names (the benchmark's --also), loaded as --config is, a
      file that does not load a one-line ConfigError naming that flag
  load_error_message(spec, error)    that one line for an exception of a file's loading
"""

from __future__ import annotations

import re
import traceback

import ml_collections
from absl import flags
from ml_collections import config_flags

from mim_jax.config.errors import ConfigError, config_error

# How ml_collections' --config flag reports an exception of the config file's get_config.
CONFIG_LOAD_ERROR = "Error whilst parsing config file"


def load_config_file(spec: str):
  """The config `spec` ("PATH[:ARG]", as --config takes it) describes, without overrides:
  loaded by ml_collections' own --config flag, so exactly as the command line loads it."""
  return _parsed_probe(spec).config


def _parsed_probe(spec: str) -> flags.FlagValues:
  """Flags holding only ml_collections' --config flag, parsed with `spec`."""
  probe = flags.FlagValues()
  probe_argv = ["mim_jax", f"--config={spec}"]
  config_flags.DEFINE_config_file("config", None, "", flag_values=probe, sys_argv=probe_argv)
  probe(probe_argv)
  return probe


def load_flag_config(spec: str, flag: str):
  """`load_config_file(spec)` for a config file that a tool's flag other than --config names
  (the benchmark's --also): a file that does not load (missing, a folder, its code failing,
  get_config returning no ConfigDict) is a ConfigError of one line naming `flag` and the file,
  as a bad --config is reported, not a traceback."""
  try:
    probe = _parsed_probe(spec)
    require_loaded(probe, flag=flag)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the file's own code ran
    message = load_error_message(spec, e, flag)
    if message is None:
      raise
    raise ConfigError(message) from None
  return probe.config


def load_error_message(spec: str | None, e: Exception, flag: str = "--config") -> str | None:
  """One line for `e`, raised as the config file `spec` ("PATH[:ARG]", given as `flag`)
  loaded: ml_collections' wrapping of an exception of its get_config, a get_config returning
  None, or an exception raised in the file's own code (a SyntaxError, a mistyped field). None
  for any other exception (a bad override value: not the file's fault)."""
  text = str(e)
  if spec and "--config must have a value other than None" in text:
    return (f"{flag}={spec} is invalid: its get_config(arg=None) returned None (a missing "
            "`return`?): it returns an ml_collections.ConfigDict")
  if isinstance(e, flags.IllegalFlagValueError):
    if CONFIG_LOAD_ERROR not in text:
      return None  # a bad flag or override value
    # The config file's code (or an argument it refused) failed: its error in one line.
    lines = [line for line in text.splitlines() if line.strip()]
    where = [m for m in (re.match(r'\s*File "([^"]+)", line (\d+)', line) for line in lines)
             if m and spec and m.group(1) == spec.split(":")[0]]
    at = f" ({where[-1].group(1)}, line {where[-1].group(2)})" if where else ""
    last = lines[-1].strip().removeprefix(f"{ConfigError.__module__}.ConfigError: ")
    return f"{flag}={spec} does not load: {last}{at}"
  return _file_code_error(spec, e, flag)


def _file_code_error(spec: str | None, e: Exception, flag: str) -> str | None:
  """One line for an exception raised in the config file's own code (None otherwise)."""
  path = spec.split(":")[0] if spec else None
  frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == path]
  if isinstance(e, SyntaxError) and e.filename == path:
    what = f"{e.msg} (line {e.lineno})"
  elif frames:
    # ml_collections wraps a missing field's KeyError (and its "Did you mean") in another.
    inner = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], KeyError) else e
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    what = f"{' '.join(str(text).split())} (line {frames[-1].lineno})"
  else:
    return None
  return (f"{flag}={spec} does not load: {type(e).__name__}: {what}. A config file is "
          "Python whose get_config(arg=None) returns an ml_collections.ConfigDict")


def require_loaded(flag_values, name: str = "config", flag: str = "") -> None:
  """ConfigError for a --NAME file that did not load (missing, a folder): ml_collections
  raises OSError when such a config is first read (at parsing only if an override reads it),
  with a traceback; every tool asks here first. `flag`: the flag named in the message
  (default --NAME)."""
  flag = flag or f"--{name}"
  try:
    value = flag_values[name].value
    getattr(value, "keys", None)  # ml_collections' placeholder raises its OSError here
  except OSError as e:
    # The operating system's reason ("[Errno 2] No such file or directory: ..."), not the
    # lines ml_collections wraps it in.
    found = re.search(r"\[Errno \d+\][^\n]*", str(e))
    reason = found.group(0) if found else str(e).strip().splitlines()[-1]
    raise config_error(flag, flag_values[name].config_filename,
                       "a config file that loads, e.g. configs/mae_fmnist.py[:ARG]", reason
                       ) from None
  if not isinstance(value, ml_collections.ConfigDict):
    raise config_error(flag, flag_values[name].config_filename,
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
