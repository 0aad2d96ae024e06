"""Mask generators: pure functions of their own rng (or of explicit noise).

Convention: `mask` is float32 [B, N] with 1 = masked (to predict) and 0 = visible, N the number
of patches in row-major grid order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class MaskInfo:
  """The result of per-sample random masking.

  ids_keep    int32 [B, K]   indices of the visible patches, in shuffled order
  ids_restore int32 [B, N]   argsort of the shuffle: undoes it (visible first, then masked)
  mask        float32 [B, N] 1 = masked, 0 = visible
  """
  ids_keep: jax.Array
  ids_restore: jax.Array
  mask: jax.Array


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Number of visible patches, `int(N * (1 - ratio))` exactly as the official MAE code."""
  return int(num_patches * (1 - mask_ratio))


def random_masking_from_noise(noise: jax.Array, mask_ratio: float) -> MaskInfo:
  """Per-sample random masking from uniform noise [B, N]: the lowest-noise patches stay visible.

  Identical noise gives masks identical to the official MAE and HF ViTMAE implementations.
  """
  b, n = noise.shape
  keep = num_visible(n, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  shuffled_mask = jnp.concatenate(
      [jnp.zeros((b, keep), jnp.float32), jnp.ones((b, n - keep), jnp.float32)], axis=1)
  mask = jnp.take_along_axis(shuffled_mask, ids_restore, axis=1)
  return MaskInfo(ids_keep=ids_shuffle[:, :keep], ids_restore=ids_restore, mask=mask)


def random_masking(rng: jax.Array, batch_size: int, num_patches: int,
                   mask_ratio: float) -> MaskInfo:
  """Per-sample random masking (MAE) driven by its own rng."""
  noise = jax.random.uniform(rng, (batch_size, num_patches), jnp.float32)
  return random_masking_from_noise(noise, mask_ratio)
