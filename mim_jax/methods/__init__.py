"""Pre-training methods by name. Each is a small module implementing `base.Method`."""

from __future__ import annotations

from mim_jax.methods import mae

METHODS = {"mae": mae.MAE}


def build_method(config):
  """Instantiates the method named by `config.method`."""
  return METHODS[config.method](config)
