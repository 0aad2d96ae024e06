"""The tokenizer's networks: a convolutional encoder to one vector per patch and its decoder.

  encoder  images [B, H, W, C] -> a p x p, stride-p convolution (one position per patch of the
           BEiT encoder's grid) -> `num_blocks` residual blocks of two 3x3 convolutions at the
           patch grid -> GELU + Dense to `code_dim` (VQ: z [B, gh, gw, D]) or to the
           vocabulary (dVAE: logits [B, gh, gw, V])
  decoder  z [B, gh, gw, D] -> a 3x3 convolution to `width` -> residual blocks -> a Dense to
           p*p*C values per position, rearranged into pixels (a pixel shuffle) -> a 3x3
           convolution at full resolution: images [B, H, W, C]
  feature decoder (VQ-KD, `feature_dim` > 0)  z [B, gh, gw, D] -> a 3x3 convolution ->
           residual blocks -> GELU + Dense: a teacher's features [B, gh, gw, F] per patch

The downsampling factor is the patch size itself (any size, not only powers of two), so one
code stands for exactly one patch token of the BEiT encoder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.vit import unpatchify
from mim_jax.tokenizers import codebook as cb


class ResBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Conv(self.width, (3, 3))(nn.gelu(x))
    y = nn.Conv(self.width, (3, 3))(nn.gelu(y))
    return x + y


class Encoder(nn.Module):
  patch_size: int
  width: int
  num_blocks: int
  out_dim: int

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID")(images)
    for _ in range(self.num_blocks):
      x = ResBlock(self.width)(x)
    return nn.Dense(self.out_dim)(nn.gelu(x))


class Decoder(nn.Module):
  patch_size: int
  channels: int
  width: int
  num_blocks: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    b, gh, gw, _ = z.shape
    p = self.patch_size
    x = nn.Conv(self.width, (3, 3))(z)
    for _ in range(self.num_blocks):
      x = ResBlock(self.width)(x)
    x = nn.Dense(p * p * self.channels)(nn.gelu(x))
    x = unpatchify(x.reshape(b, gh * gw, -1), p, (gh, gw), self.channels)
    return x + nn.Conv(self.channels, (3, 3))(x)


class FeatureDecoder(nn.Module):
  """Code vectors [B, gh, gw, D] -> per-patch features [B, gh, gw, F] (VQ-KD's decoder)."""
  width: int
  num_blocks: int
  feature_dim: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    x = nn.Conv(self.width, (3, 3))(z)
    for _ in range(self.num_blocks):
      x = ResBlock(self.width)(x)
    return nn.Dense(self.feature_dim)(nn.gelu(x))


class ConvTokenizer(nn.Module):
  """`encode` images -> z [B, gh, gw, D] (a dVAE: logits [B, gh, gw, V], `logits_dim` = V);
  `decode` code vectors [B, gh, gw, D] -> images, or with `feature_dim` > 0 (VQ-KD) -> a
  teacher's features [B, gh, gw, F]; calling does both."""
  patch_size: int
  channels: int
  width: int
  num_blocks: int
  code_dim: int
  logits_dim: int = 0
  feature_dim: int = 0

  def setup(self):
    self.encoder = Encoder(self.patch_size, self.width, self.num_blocks,
                           self.logits_dim or self.code_dim)
    if self.feature_dim:
      self.decoder = FeatureDecoder(self.width, self.num_blocks, self.feature_dim)
    else:
      self.decoder = Decoder(self.patch_size, self.channels, self.width, self.num_blocks)

  def encode(self, images: jax.Array) -> jax.Array:
    return self.encoder(images.astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images))


def tokenizer_model(info: dict[str, Any]) -> ConvTokenizer:
  """The network a tokenizer description (config fields or the export's JSON) names."""
  return ConvTokenizer(patch_size=int(info["patch_size"]), channels=int(info["channels"]),
                       width=int(info["width"]), num_blocks=int(info["num_blocks"]),
                       code_dim=int(info["code_dim"]),
                       logits_dim=int(info["vocab_size"]) if info["kind"] == "dvae" else 0,
                       feature_dim=int(info.get("feature_dim", 0)))


def encode(model, params, images: jax.Array, l2: bool) -> jax.Array:
  """images [B, H, W, C] -> the encoder's vectors z [B, gh, gw, D] (unit length when `l2`)."""
  z = model.apply({"params": params}, images, method=model.encode)
  return cb.l2_normalize(z) if l2 else z


def tokenize(model, tokenizer: dict, images: jax.Array, l2: bool, kind: str = "vq") -> jax.Array:
  """images -> codes int32 [B, gh*gw] (patch order) of a tokenizer {"params", "codebook"}:
  the nearest code (VQ) or the most likely one (dVAE)."""
  z = encode(model, tokenizer["params"], images, l2)
  if kind == "dvae":
    return jnp.argmax(z, axis=-1).astype(jnp.int32).reshape(z.shape[0], -1)
  return cb.nearest_codes(z.reshape(-1, z.shape[-1]), tokenizer["codebook"]).reshape(
      z.shape[0], -1)


def decode(model, tokenizer: dict, codes: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """codes int [B, gh*gw] -> decoded images [B, H, W, C] (normalised pixels)."""
  e = jnp.asarray(tokenizer["codebook"])[codes].reshape(codes.shape[0], *grid_hw, -1)
  return model.apply({"params": tokenizer["params"]}, e, method=model.decode)


def encode_flops(info: dict[str, Any]) -> float:
  """Forward FLOPs of `encode` for one image (the stride-p convolution, the residual blocks at
  the patch grid, the output layer) plus, for a VQ tokenizer, the nearest-code search."""
  (gh, gw), p, c = info["grid"], int(info["patch_size"]), int(info["channels"])
  n, w, blocks = gh * gw, int(info["width"]), int(info["num_blocks"])
  out = int(info["vocab_size"]) if info["kind"] == "dvae" else int(info["code_dim"])
  total = 2 * n * p * p * c * w + blocks * 2 * (2 * n * 9 * w * w) + 2 * n * w * out
  if info["kind"] != "dvae":
    total += 2 * n * int(info["code_dim"]) * int(info["vocab_size"])
  return float(total)


def decode_flops(info: dict[str, Any]) -> float:
  """Forward FLOPs of `decode` for one image."""
  (gh, gw), p, c = info["grid"], int(info["patch_size"]), int(info["channels"])
  n, w, blocks, d = gh * gw, int(info["width"]), int(info["num_blocks"]), int(info["code_dim"])
  if int(info.get("feature_dim", 0)):
    return float(2 * n * 9 * d * w + blocks * 2 * (2 * n * 9 * w * w)
                 + 2 * n * w * int(info["feature_dim"]))
  h, wd = info["image_size"]
  return float(2 * n * 9 * d * w + blocks * 2 * (2 * n * 9 * w * w) + 2 * n * w * p * p * c
               + 2 * h * wd * 9 * c * c)
