"""The one error type for bad configuration, raised before anything expensive starts.

Every message names the field, the value that was given and what is allowed, so a user can fix
a run without reading the source.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """A configuration field holds a value mim_jax cannot run with."""


def config_error(field: str, value: Any, allowed: str, hint: str = "") -> ConfigError:
  """Builds a ConfigError of the form `config.<field>=<value> is invalid: <allowed>. <hint>`."""
  message = f"config.{field}={value!r} is invalid: {allowed}."
  if hint:
    message += f" {hint}"
  return ConfigError(message)
