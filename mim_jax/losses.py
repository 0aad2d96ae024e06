"""Losses over masked positions.

Each takes pred, target [B, N, P] and mask [B, N] (1 = masked), computes a per-patch loss (the
mean over P) and averages it over the masked patches only, as MAE's `forward_loss` does. SimMIM's
per-pixel average over masked pixels is the same number, since every patch has P values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(per_patch: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of per_patch [B, N] over the masked entries of mask [B, N] (0 when none are)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error over masked patches (MAE, MaskFeat)."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return masked_mean(per_patch, mask)


def masked_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean absolute error over masked patches (SimMIM's `l1_loss` on masked pixels)."""
  per_patch = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)
  return masked_mean(per_patch, mask)


LOSSES = {"mse": masked_mse, "l1": masked_l1}
