"""The one error type for bad configuration, raised before anything expensive starts.

Every message names the field, the value that was given and what is allowed, so a user can fix
a run without reading the source.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from absl import app


class ConfigError(ValueError):
  """A configuration field holds a value mim_jax cannot run with; `field` names it (dotted,
  as in the message) where the error was built by `config_error`, else ""."""
  field = ""


def config_error(field: str, value: Any, allowed: str, hint: str = "") -> ConfigError:
  """Builds a ConfigError of the form `config.<field>=<value> is invalid: <allowed>. <hint>`;
  a `field` written as a flag ("--tokenizer") is named as it is."""
  name = field if field.startswith("--") else f"config.{field}"
  message = f"{name}={value!r} is invalid: {allowed}."
  if hint:
    message += f" {hint}"
  error = ConfigError(message)
  error.field = field
  return error


def dotted_keys(config: Any, prefix: str = "") -> list[str]:
  """Every field of a (nested) ConfigDict as a dotted path, sub-configs included:
  ["data", "data.path", ..., "seed"]."""
  keys = []
  for name, value in config.items():
    key = f"{prefix}{name}"
    keys.append(key)
    if hasattr(value, "items") and hasattr(value, "lock"):  # a nested ConfigDict
      keys.extend(dotted_keys(value, prefix=f"{key}."))
  return keys


def similar_keys(field: str, known: Iterable[str], limit: int = 3) -> list[str]:
  """The known dotted keys a mistyped `field` most likely meant, best first.

  Whole-path matches (masking.ration -> masking.ratio, optimiser.base_lr ->
  optimizer.base_lr) come first, then keys whose last part matches the last part of `field`
  (ratio -> masking.ratio, num_worker -> data.num_workers).
  """
  known = list(known)
  leaf = field.rsplit(".", 1)[-1]
  by_leaf: dict[str, list[str]] = {}
  for key in known:
    by_leaf.setdefault(key.rsplit(".", 1)[-1], []).append(key)
  found = difflib.get_close_matches(field, known, n=limit, cutoff=0.8)
  found += by_leaf.get(leaf, [])
  for close_leaf in difflib.get_close_matches(leaf, list(by_leaf), n=limit, cutoff=0.75):
    found += by_leaf[close_leaf]
  unique = list(dict.fromkeys(k for k in found if k != field))
  return unique[:limit]


class Renamed(NamedTuple):
  """A field's new name, its value for a value of the old field, and how they map (words)."""
  name: str
  value: Callable[[Any], Any]
  how: str


# Fields renamed: old name -> Renamed. A config that sets the old name is refused with `how`
# (never mapped: a config written for the old meaning cannot run with another); a run's
# config.json written under it is compared under the new name on resume (resume_check).
RENAMED_FIELDS = {
    f"{p}teacher.layer": Renamed(
        f"{p}teacher.block", lambda layer: layer + 1,
        "which counts blocks as the probe and mim_jax.features do: "
        f"{p}teacher.layer=k (from 0; -1 the output after the final norm) is "
        f"{p}teacher.block=k+1 (0 the output after the final norm)")
    for p in ("", "target.")}


def unknown_field_error(field: str, known: Iterable[str]) -> ConfigError:
  """`config.<field> does not exist` with a "did you mean" list of similar fields, or what a
  renamed field is called now (RENAMED_FIELDS), where the config has the new one."""
  known = list(known)
  if field in RENAMED_FIELDS and RENAMED_FIELDS[field].name in known:
    renamed = RENAMED_FIELDS[field]
    return ConfigError(f"config.{field} was renamed: config.{renamed.name}, {renamed.how}.")
  message = f"config.{field} does not exist"
  suggestions = similar_keys(field, known)
  if suggestions:
    message += ": did you mean " + " or ".join(f"config.{k}" for k in suggestions) + "?"
  else:
    message += " (the fields are listed in mim_jax/config/defaults.py)."
  return ConfigError(message)


def refuse_extra_arguments(argv: Sequence[str]) -> None:
  """Raises absl's UsageError when `argv` (what flag parsing left: the program, then the rest)
  holds more than the program: `config.seed=3` without its dashes, or anything after `--`,
  would otherwise be dropped without a word."""
  extra = list(argv[1:])
  if extra:
    raise app.UsageError(extra_arguments_message(extra))


def extra_arguments_message(extra: Sequence[str]) -> str:
  return (f"unexpected argument(s) {' '.join(extra)}: every setting is a flag, config fields "
          "as --config.FIELD=VALUE (two dashes; nothing after a bare --)")
