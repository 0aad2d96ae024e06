"""The helpers every config check is written with; they import only config/errors.py, so any
module (the input pipeline's parts included) can check its own config block.

  require(ok, field, value, allowed, hint="")     the one way to fail a check
  is_int / is_number / positive_int / pair        value tests
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from mim_jax.config.errors import config_error


def require(ok: bool, field: str, value: Any, allowed: str, hint: str = "") -> None:
  if not ok:
    raise config_error(field, value, allowed, hint)


def is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
  """A finite real number (no bool): inf and NaN are no setting (an lr of inf trains to NaN,
  an interval of inf overflows the step count)."""
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def positive_int(config, field: str) -> int:
  value = get(config, field)
  require(is_int(value) and value > 0, field, value, "a positive integer")
  return value


def pair(value: Any) -> tuple | None:
  """`value` as a tuple of two real numbers, or None."""
  try:
    out = tuple(value)
  except TypeError:
    return None
  return out if len(out) == 2 and all(is_number(v) for v in out) else None
