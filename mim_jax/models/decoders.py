"""Decoders that turn encoder tokens into per-patch predictions."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.vit import (
  Transformer,
  dense_init,
  permute_tokens,
  sincos_2d,
  token_init,
)

Dtype = Any


class MAEDecoder(nn.Module):
  """The MAE transformer decoder: visible latents + mask tokens -> per-patch predictions.

  Inputs:
    latent      [B, 1 + K, D_enc]  encoder output for the cls token and K visible patches
    ids_restore [B, N]             inverse of the masking shuffle (see `masking.MaskInfo`)
  Output:
    [B, N, out_dim] predictions for every patch (cls dropped), in float32.
  """
  grid_hw: tuple[int, int]
  out_dim: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = "none"  # activation checkpointing per block, as the encoder's (model.remat)

  @nn.compact
  def __call__(self, latent: jax.Array, ids_restore: jax.Array, train: bool = False) -> jax.Array:
    b, num_patches = ids_restore.shape
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init, name="decoder_embed")(latent)
    mask_token = self.param("mask_token", token_init, (1, 1, self.width))
    num_masked = num_patches - (x.shape[1] - 1)
    fill = jnp.broadcast_to(mask_token.astype(x.dtype), (b, num_masked, self.width))
    # Visible tokens come first in shuffled order; ids_restore puts every token back in place.
    patches = permute_tokens(jnp.concatenate([x[:, 1:], fill], axis=1), ids_restore)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    posemb = jnp.asarray(sincos_2d(self.width, self.grid_hw, cls_token=True))
    x = x + posemb[None].astype(x.dtype)
    x, _ = Transformer(self.depth, self.num_heads, self.mlp_ratio * self.width, dtype=self.dtype,
                       attention_impl=self.attention_impl, norm_name="decoder_norm",
                       remat=self.remat, name="decoder")(x, train)
    x = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=dense_init, name="decoder_pred")(x)
    return x[:, 1:].astype(jnp.float32)


class LinearPredictor(nn.Module):
  """One linear layer per patch token: [B, 1 + N, D] -> [B, N, out_dim] (cls dropped).

  SimMIM's prediction head is a 1x1 convolution to p*p*C channels followed by a pixel shuffle;
  on the token grid that is exactly a per-token Dense to p*p*C values in patch order. MaskFeat's
  linear head to HOG features is the same layer with out_dim = the HOG length of a patch.
  """
  out_dim: int
  init_std: float = 0.02
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Dense(self.out_dim, dtype=self.dtype,
                 kernel_init=nn.initializers.truncated_normal(self.init_std),
                 name="head")(tokens[:, 1:])
    return x.astype(jnp.float32)
