"""Decoders that turn encoder tokens into per-patch predictions."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.initializers import dense_init, token_init, trunc_normal
from mim_jax.models.vit import Transformer, permute_tokens, sincos_2d

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
  kernel_init: Optional[nn.initializers.Initializer] = None  # None: trunc_normal(init_std)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Dense(self.out_dim, dtype=self.dtype,
                 kernel_init=self.kernel_init or trunc_normal(self.init_std),
                 name="head")(tokens[:, 1:])
    return x.astype(jnp.float32)


class GroupedConv(nn.Module):
  """A 2-D convolution with 'same' padding (odd `kernel_size`) in `groups` groups (PyTorch's
  Conv2d(groups=G)), computed from matmuls.

  Same parameters (kernel [k, k, C_in / G, features], bias [features]) and initialisation as
  `flax.linen.Conv(feature_group_count=G)`, and the same function (tested); XLA's CPU backend
  runs grouped convolutions (and their gradients) through a slow generic path, 13.6-30x slower
  than matmuls at data2vec 2.0's decoder shapes (docs/benchmarks.md). Row by row: the k column
  shifts of the input are stacked (a k-fold copy, [G, B*H*W, k*C_in/G], group-major so that the
  batched matmul reads it as it is), one matmul per group maps them to the k kernel rows'
  outputs at once ([G, B*H*W, k*C_out/G]), and the output is the sum of those k outputs shifted
  by their row. Stacking all k*k shifts instead (im2col) copies the input k*k-fold; at data2vec
  2.0's Fashion-MNIST decoder (16 groups of 8 channels, 3x3, batch 1024 of 7x7) a layer's
  forward + backward took about 1.7x longer that way on 2 CPU cores (docs/benchmarks.md).
  x [B, H, W, C_in] -> [B, H, W, features].
  """
  features: int
  kernel_size: int = 3
  groups: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    k, g = self.kernel_size, self.groups
    c_in, c_out = c // g, self.features // g
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, c_in, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    pad = k // 2
    # Input channel i of group q is channel q * c_in + i, output channel j of group q is
    # q * c_out + j, as in flax and PyTorch.
    grouped = jnp.transpose(x.reshape(b, h, w, g, c_in), (3, 0, 1, 2, 4))  # [G, B, H, W, i]
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (0, 0), (pad, pad), (0, 0)))
    views = jnp.stack([grouped[:, :, :, j:j + w] for j in range(k)], axis=-2)  # [.., k, i]
    views = views.reshape(g, b * h * w, k * c_in).astype(self.dtype)
    # kernel [row, column, i, (q, j)] -> [q, (column, i), (row, j)]
    kern = jnp.transpose(kernel.reshape(k, k, c_in, g, c_out), (3, 1, 2, 0, 4))
    kern = kern.reshape(g, k * c_in, k * c_out).astype(self.dtype)
    rows = jnp.einsum("gnk,gkj->gnj", views, kern).reshape(g, b, h, w, k, c_out)
    # Output row y sums kernel row r's output at input row y + r - pad.
    rows = jnp.pad(rows, ((0, 0), (0, 0), (pad, pad), (0, 0), (0, 0), (0, 0)))
    out = sum(rows[:, :, r:r + h, :, r] for r in range(k))  # [G, B, H, W, c_out]
    out = jnp.transpose(out, (1, 2, 3, 0, 4))
    return out.reshape(b, h, w, self.features) + bias.astype(self.dtype)


class ConvDecoder(nn.Module):
  """data2vec 2.0's convolutional decoder: visible latents + noise at masked positions ->
  features for every patch, by 2-D convolutions over the patch grid.

  Inputs:
    visible     [B, K, D_enc]  the encoder's patch tokens (cls dropped) for the K visible patches
    ids_restore [B, N]         inverse of the visible-first order (`masking.mask_to_ids`)
  Output:
    [B, N, out_dim] float32.

  The N - K masked positions hold Gaussian noise of std `noise_std` (the release's
  mask_noise_std; drawn from the "mask_noise" rng, zeros without it), not a learned token and
  no position: the convolutions see where a patch is from its neighbours. Each of `depth`
  blocks is a grouped k x k convolution ('same' padding) to `width` channels, a LayerNorm over
  the channels without affine parameters and an exact GELU, with a residual connection where
  the block keeps the channel count; a Dense maps `width` to `out_dim` (the encoder width).
  """
  grid_hw: tuple[int, int]
  out_dim: int
  width: int = 768
  depth: int = 6
  kernel: int = 3
  groups: int = 16
  noise_std: float = 0.01
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, visible: jax.Array, ids_restore: jax.Array) -> jax.Array:
    b, n = ids_restore.shape
    num_masked = n - visible.shape[1]
    if self.noise_std > 0 and self.has_rng("mask_noise"):
      fill = self.noise_std * jax.random.normal(self.make_rng("mask_noise"),
                                                (b, num_masked, visible.shape[-1]))
    else:
      fill = jnp.zeros((b, num_masked, visible.shape[-1]))
    x = jnp.concatenate([visible, fill.astype(visible.dtype)], axis=1)
    x = permute_tokens(x, ids_restore).astype(self.dtype)
    x = x.reshape(b, *self.grid_hw, x.shape[-1])  # tokens are in row-major grid order
    for i in range(self.depth):
      y = GroupedConv(self.width, self.kernel, self.groups, dtype=self.dtype,
                      name=f"conv_{i}")(x)
      y = nn.LayerNorm(epsilon=1e-5, use_bias=False, use_scale=False, dtype=self.dtype,
                       name=f"norm_{i}")(y)
      y = nn.gelu(y, approximate=False)
      x = x + y if y.shape[-1] == x.shape[-1] else y
    x = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=dense_init, name="proj")(x)
    return x.reshape(b, n, self.out_dim).astype(jnp.float32)
