"""Reconstruction targets computed from the input images."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax.models.vit import patchify

NORM_PIX_EPS = 1e-6


def normalize_patches(patches: jax.Array, eps: float = NORM_PIX_EPS) -> jax.Array:
  """Per-patch standardisation [B, N, P] -> [B, N, P] (MAE's norm_pix_loss).

  The variance is the unbiased one (ddof=1), as `torch.Tensor.var` computes it in the official
  code, so losses are comparable with PyTorch runs.
  """
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def pixel_targets(images: jax.Array, patch_size: int, norm_pix: bool) -> jax.Array:
  """Images [B, H, W, C] -> per-patch pixel targets [B, N, p*p*C] in float32."""
  patches = patchify(images.astype(jnp.float32), patch_size)
  return normalize_patches(patches) if norm_pix else patches
