"""Losses over masked positions."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error over masked patches only.

  pred, target [B, N, P]; mask [B, N] (1 = masked). The per-patch mean over P is averaged over
  masked patches, as in MAE's `forward_loss`.
  """
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)
