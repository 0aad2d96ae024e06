"""Vision Transformer encoder pieces shared by every MIM method.

Layout conventions (used across mim_jax):
  images   [B, H, W, C]       channels last, normalised floats
  patches  [B, N, p*p*C]      N = (H/p) * (W/p), row-major over the patch grid, each patch
                              flattened in (row, col, channel) order (the official MAE `patchify`)
  tokens   [B, T, D]          T = 1 + number of patch tokens given to the encoder (cls first)

The block structure mirrors the official MAE / timm ViT (pre-norm, fused qkv with bias, exact
GELU, LayerNorm eps 1e-6) so that released PyTorch weights map one to one onto these parameters.
The attention layer and its implementations are in `models/attention.py`, the recipes'
initialisers in `models/initializers.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.config.errors import config_error
from mim_jax.models.attention import (
  REL_POS_BIAS,
  Attention,
  RelativePositionBias,
  relative_position_index,
)
from mim_jax.models.initializers import dense_init, weight_inits
from mim_jax.training import parallel

Dtype = Any

LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTSize:
  """Width, depth, heads and MLP size of one ViT variant."""
  width: int
  depth: int
  num_heads: int
  mlp_dim: int


VIT_SIZES = {
    # "mu" is not a published size: a two-block micro model for smoke tests and CI.
    "mu": ViTSize(width=64, depth=2, num_heads=2, mlp_dim=256),
    "Ti": ViTSize(width=192, depth=12, num_heads=3, mlp_dim=768),
    "S": ViTSize(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": ViTSize(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": ViTSize(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H": ViTSize(width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def parse_variant(variant: str, field: str = "model.variant") -> tuple[ViTSize, int]:
  """Parses "B/16" into (ViTSize, patch_size 16); the error names `field`."""
  name, sep, patch = variant.partition("/")
  if not sep or name not in VIT_SIZES or not patch.isdigit() or int(patch) <= 0:
    raise config_error(
        field, variant,
        f"expected SIZE/PATCH with SIZE one of {sorted(VIT_SIZES)} and PATCH a positive "
        "integer, e.g. 'B/16' or 'Ti/4'")
  return VIT_SIZES[name], int(patch)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """Fixed 1-D sin-cos embedding: positions [M] -> [M, dim] (sin half, then cos half)."""
  assert dim % 2 == 0, dim
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_hw: tuple[int, int], cls_token: bool) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding [1 + h*w or h*w, dim] (float32).

  Matches the official MAE `get_2d_sincos_pos_embed` for square grids (and extends it to
  h != w): the first half of the channels encodes the column index, the second the row index,
  and the cls token, if any, gets zeros.
  """
  if dim % 4:
    raise ValueError(f"sin-cos 2-D position embeddings need a width divisible by 4, got {dim}")
  h, w = grid_hw
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                           indexing="ij")
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return emb.astype(np.float32)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C] in the official MAE patch order."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid_hw: tuple[int, int],
               channels: int) -> jax.Array:
  """[B, N, p*p*C] -> [B, H, W, C], the inverse of `patchify`."""
  b = patches.shape[0]
  (gh, gw), p = grid_hw, patch_size
  x = patches.reshape(b, gh, gw, p, p, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(b, gh * p, gw * p, channels)


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """Picks tokens per example: x [B, N, D], ids [B, K] -> [B, K, D]."""
  return jnp.take_along_axis(x, ids[:, :, None], axis=1)


@jax.custom_vjp
def permute_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """x [B, N, D] reordered per example by a permutation ids [B, N] (out[b, i] = x[b, ids[b, i]]).

  The same as `gather_tokens`, with a gradient that is a gather too: a permutation's transpose
  is its inverse, so the backward pass reorders the cotangent by argsort(ids) instead of
  scatter-adding it (MAE's decoder un-shuffle).
  """
  return gather_tokens(x, ids)


def _permute_fwd(x, ids):
  return gather_tokens(x, ids), ids


def _permute_bwd(ids, g):
  inverse = jnp.argsort(ids, axis=1).astype(ids.dtype)
  return gather_tokens(g, inverse), None


permute_tokens.defvjp(_permute_fwd, _permute_bwd)


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, x * Phi(x), as PyTorch's nn.GELU, with a hand-written gradient.

  Autodiff of the erf form keeps erf(x) and exp(-x^2 / 2) from the forward pass as separate
  buffers and spends several elementwise passes on them; here the backward pass recomputes
  Phi(x) + x * phi(x) from x in one fused pass. Same values (tested against
  `nn.gelu(approximate=False)`); on 2 CPU cores it takes a ViT MLP's fwd+bwd from about 1.5x
  to 1.0x the cost of a ReLU MLP (docs/benchmarks.md, lever table).
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
  return (g * (cdf + x * pdf).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def quick_gelu(x: jax.Array) -> jax.Array:
  """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI's CLIP towers were
  trained with (their weights compute a measurably different function under exact GELU)."""
  return x * jax.nn.sigmoid(1.702 * x)


# model.mlp_act: the MLP's activation. Exact GELU is what MAE, BEiT, timm and HF ViTs use;
# quick_gelu is OpenAI CLIP's (LAION / OpenCLIP towers use exact GELU).
MLP_ACTS = {"gelu": gelu, "quick_gelu": quick_gelu}


class Mlp(nn.Module):
  """fc1 -> activation (`MLP_ACTS`; exact GELU, PyTorch's nn.GELU, by default) -> fc2."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  act: str = "gelu"
  kernel_init: nn.initializers.Initializer = dense_init   # fc1
  out_init: nn.initializers.Initializer = dense_init      # fc2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.act not in MLP_ACTS:
      raise config_error("model.mlp_act", self.act, f"one of {tuple(MLP_ACTS)}")
    width = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=self.kernel_init, name="fc1")(x)
    x = MLP_ACTS[self.act](x)
    return nn.Dense(width, dtype=self.dtype, kernel_init=self.out_init, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  `drop_path` is stochastic depth (per-example residual dropout), used by fine-tuning.
  `layer_scale` > 0 multiplies each branch by a learned per-channel scale starting at that
  value (CaiT's LayerScale, `gamma_1` / `gamma_2` in BEiT): deep pre-training starts close to
  the identity. `rel_pos_grid`: this block's own relative position bias (see `Attention`).
  `weight_init` and `layer_id` (1 .. depth) pick its linear layers' initialisers
  (`weight_inits`).
  """
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  layer_scale: float = 0.0
  rel_pos_grid: Optional[tuple[int, int]] = None
  mlp_act: str = "gelu"
  weight_init: str = "xavier"
  layer_id: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, bias: Optional[jax.Array] = None,
               rel_index: Optional[jax.Array] = None) -> jax.Array:
    def scaled(y, name):
      if self.layer_scale <= 0.0:
        return y
      gamma = self.param(name, nn.initializers.constant(self.layer_scale), (y.shape[-1],))
      return y * gamma.astype(y.dtype)

    def residual(y):
      if self.drop_path > 0.0:
        # Broadcast over tokens and channels: the whole branch is dropped per example.
        y = nn.Dropout(self.drop_path, broadcast_dims=(1, 2), rng_collection="drop_path")(
            y, deterministic=not train)
      return y

    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)
    init = weight_inits(self.weight_init, self.layer_id)
    attn = Attention(self.num_heads, dtype=self.dtype, implementation=self.attention_impl,
                     rel_pos_grid=self.rel_pos_grid, kernel_init=init.kernel,
                     out_init=init.out, name="attn")
    mlp = Mlp(self.mlp_dim, dtype=self.dtype, act=self.mlp_act, kernel_init=init.kernel,
              out_init=init.out, name="mlp")
    x = x + residual(scaled(attn(norm("norm1")(x), bias, rel_index), "gamma_1"))
    x = x + residual(scaled(mlp(norm("norm2")(x)), "gamma_2"))
    return x


# Activation checkpointing (`model.remat`): what each block keeps for the backward pass. "full"
# and "nothing_saveable" keep only the block's input and recompute the rest; "dots_saveable"
# keeps the matmul outputs and recomputes the cheap elementwise work (norms, GELU, softmax).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def block_class(remat: str = "none"):
  """`Block`, or `Block` under nn.remat with the named policy (parameters keep their names)."""
  if remat not in REMAT_POLICIES:
    raise config_error("model.remat", remat, f"one of {tuple(REMAT_POLICIES)}")
  if remat == "none":
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[remat], static_argnums=(2,))  # 2: `train`


class Transformer(nn.Module):
  """`depth` blocks followed by a final LayerNorm. Returns (output, per-block outputs).

  Under a mesh (`parallel.activation_mesh`) the tokens entering each block keep their batch
  dimension split over the data axes; `remat` checkpoints each block (see REMAT_POLICIES).
  `rel_pos_bias` ("shared" | "per_block", see REL_POS_BIAS) needs `rel_index` [B or 1, T, T]
  (`relative_position_index`) and `rel_pos_grid`, the table's patch grid.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  norm_name: str = "norm"
  remat: str = "none"
  layer_scale: float = 0.0
  rel_pos_bias: str = ""
  rel_pos_grid: Optional[tuple[int, int]] = None
  mlp_act: str = "gelu"
  weight_init: str = "xavier"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               rel_index: Optional[jax.Array] = None) -> tuple[jax.Array, list[jax.Array]]:
    if self.rel_pos_bias not in REL_POS_BIAS:
      raise ValueError(f"rel_pos_bias={self.rel_pos_bias!r}: expected one of {REL_POS_BIAS}")
    if self.rel_pos_bias and (rel_index is None or self.rel_pos_grid is None):
      raise ValueError("a relative position bias needs rel_pos_grid and rel_index")
    shared = None
    if self.rel_pos_bias == "shared":
      shared = RelativePositionBias(tuple(self.rel_pos_grid), self.num_heads,
                                    name="rel_pos_bias")(rel_index)
    own_grid = tuple(self.rel_pos_grid) if self.rel_pos_bias == "per_block" else None
    block_outputs = []
    block = block_class(self.remat)
    for i in range(self.depth):
      # Linearly increasing stochastic depth, as in DeiT / MAE fine-tuning.
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = parallel.constrain_batch(x)
      x = block(self.num_heads, self.mlp_dim, drop_path=rate, dtype=self.dtype,
                attention_impl=self.attention_impl, layer_scale=self.layer_scale,
                rel_pos_grid=own_grid, mlp_act=self.mlp_act, weight_init=self.weight_init,
                layer_id=i + 1, name=f"blocks_{i}")(
                    x, train, shared, rel_index if own_grid else None)
      block_outputs.append(x)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=self.norm_name)(x)
    return x, block_outputs


class ViTEncoder(nn.Module):
  """ViT encoder over patch tokens with a cls token and fixed 2-D sin-cos positions.

  Two input modes share all parameters and code:
    * `ids_keep` [B, K]: only the K visible patches are embedded and encoded (MAE's asymmetric
      encoder); cost scales with K.
    * `token_mask` [B, N] bool: all N patches are encoded, masked ones replaced by a learned
      mask token before the position embedding is added (SimMIM / BEiT / data2vec style);
      requires `use_mask_token=True`.

  Position embeddings: `posemb="sincos"` uses the fixed 2-D sin-cos table (pre-training);
  `posemb="learn"` makes it a parameter `pos_embed` [1 + N, D] initialised to that same table,
  so a pre-trained encoder computes the same function at first and the positions are then
  fine-tuned (the official MAE fine-tuning does this); `posemb="none"` adds none (BEiT models
  whose only positions are a relative position bias). `rel_pos_bias` and `layer_scale` are
  the BEiT-style options of `Transformer` / `Block`; the bias table is sized for the
  configured grid and read at the tokens' grid positions (visible patches, smaller views).
  `pre_norm` adds a LayerNorm `norm_pre` over the tokens before the first block (CLIP's
  ln_pre; timm's pre_norm=True) and `mlp_act="quick_gelu"` OpenAI CLIP's activation, so
  CLIP towers load as teachers. `weight_init` (`initializers.WEIGHT_INITS`, `weight_inits`)
  sets how the weights start. The sin-cos table is computed for the input's own patch grid,
  so images smaller than `image_size` (multi-crop local views) work; positions run 0 .. g - 1
  on any grid.

  Returns (tokens [B, 1 + K or N, D] after the final LayerNorm, aux) where aux holds
  "blocks": the list of per-block outputs (before the final norm).
  """
  image_size: Sequence[int]
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  channels: int = 3
  drop_path_rate: float = 0.0
  use_mask_token: bool = False
  posemb: str = "sincos"
  dtype: Dtype = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = "none"
  layer_scale: float = 0.0
  rel_pos_bias: str = ""
  pre_norm: bool = False
  mlp_act: str = "gelu"
  weight_init: str = "xavier"

  @property
  def grid_hw(self) -> tuple[int, int]:
    return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

  @nn.compact
  def __call__(self, images: jax.Array, *, ids_keep: Optional[jax.Array] = None,
               token_mask: Optional[jax.Array] = None, train: bool = False):
    if ids_keep is not None and token_mask is not None:
      raise ValueError("pass either ids_keep (visible-only) or token_mask (mask tokens), not both")
    chex.assert_rank(images, 4)  # [B, H, W, C]
    chex.assert_axis_dimension(images, 3, self.channels)
    if ids_keep is not None:
      chex.assert_rank(ids_keep, 2)  # [B, K]
    if token_mask is not None:
      chex.assert_shape(token_mask, (images.shape[0], (images.shape[1] // self.patch_size)
                                     * (images.shape[2] // self.patch_size)))
    x = patchify(images, self.patch_size).astype(self.dtype)
    if ids_keep is not None:
      # Only the visible patches' pixels are embedded: the same rows as embedding every patch
      # and then picking, without a backward pass over masked rows or a scatter-add into the
      # full token tensor (the input pixels need no gradient).
      x = gather_tokens(x, ids_keep)
    init = weight_inits(self.weight_init)
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=init.patch_kernel,
                 bias_init=init.patch_bias(x.shape[-1]), name="patch_embed")(x)
    if self.use_mask_token:
      mask_token = self.param("mask_token", init.mask_token, (1, 1, self.width))
      if token_mask is not None:
        x = jnp.where(token_mask[:, :, None], mask_token.astype(x.dtype), x)
    elif token_mask is not None:
      raise ValueError("token_mask needs an encoder built with use_mask_token=True")

    # The grid of this input: smaller images (multi-crop local views) get the sin-cos table of
    # their own grid; a learned table fits only the configured one.
    grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
    if self.posemb == "sincos":
      posemb = jnp.asarray(sincos_2d(self.width, grid, cls_token=True))
    elif self.posemb == "learn":
      if grid != tuple(self.grid_hw):
        raise ValueError(f"a learned position table is for the {self.grid_hw} patch grid, not "
                         f"{grid} (images {images.shape[1:3]}); resize it with resize_posemb")
      table = sincos_2d(self.width, self.grid_hw, cls_token=True)
      posemb = self.param("pos_embed", lambda rng, shape: jnp.asarray(table), table.shape)
    elif self.posemb == "none":
      posemb = jnp.zeros((1 + grid[0] * grid[1], self.width), jnp.float32)
    else:
      raise ValueError(f"posemb={self.posemb!r}: expected 'sincos', 'learn' or 'none'")
    patch_posemb = posemb[1:][ids_keep] if ids_keep is not None else posemb[None, 1:]
    x = x + patch_posemb.astype(x.dtype)

    cls = self.param("cls_token", init.token, (1, 1, self.width))
    cls = (cls + posemb[None, :1]).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name="norm_pre")(x)

    rel_index = None
    if self.rel_pos_bias:
      rel_index = relative_position_index(tuple(self.grid_hw), grid, ids_keep)
    x, blocks = Transformer(self.depth, self.num_heads, self.mlp_dim,
                            drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                            attention_impl=self.attention_impl, remat=self.remat,
                            layer_scale=self.layer_scale, rel_pos_bias=self.rel_pos_bias,
                            rel_pos_grid=tuple(self.grid_hw), mlp_act=self.mlp_act,
                            weight_init=self.weight_init, name="transformer")(
                                x, train, rel_index)
    return x, {"blocks": blocks}


def block_output(tokens: jax.Array, aux: dict, block: int) -> jax.Array:
  """The tokens [B, T, D] of `block` from a ViTEncoder's `(tokens, aux)`: 0 the encoder's
  output (after its final LayerNorm), k in 1..depth block k's output (before that norm; block
  `depth` is therefore not block 0). The numbering of the probe, `mim_jax.features` and a
  frozen teacher's `teacher.block`."""
  return tokens if block == 0 else aux["blocks"][block - 1]


def resize_posemb(posemb: jax.Array, old_grid: tuple[int, int],
                  new_grid: tuple[int, int]) -> jax.Array:
  """Bicubic resize of a learned position table [1 + h*w, D] to another patch grid.

  The cls position is kept; the patch positions are resized as an image of D channels (as the
  official MAE / DeiT `interpolate_pos_embed` does when the fine-tuning resolution changes).
  The cubic kernel is Keys' (a = -0.5, JAX's), not PyTorch's a = -0.75, so values differ from
  a PyTorch resize by a few percent of the table's range; no antialiasing, as in PyTorch.
  """
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  if posemb.shape[0] != 1 + old_grid[0] * old_grid[1]:
    raise ValueError(f"pos_embed has {posemb.shape[0]} rows; a {old_grid} grid with a cls token "
                     f"needs {1 + old_grid[0] * old_grid[1]}")
  if old_grid == new_grid:
    return posemb
  cls, grid = posemb[:1], posemb[1:].reshape(*old_grid, posemb.shape[-1])
  grid = jax.image.resize(grid.astype(jnp.float32), (*new_grid, posemb.shape[-1]),
                          method="bicubic", antialias=False)
  return jnp.concatenate([cls, grid.reshape(-1, posemb.shape[-1]).astype(posemb.dtype)], axis=0)


def size_from_config(model_cfg) -> tuple[ViTSize, int]:
  """(ViTSize, patch) of `config.model`: the variant's, with any non-zero override applied.

  `model.width/depth/num_heads/mlp_dim` let a recipe use an unpublished size (e.g. a small
  encoder for a CPU demo) without a new variant name.
  """
  size, patch = parse_variant(model_cfg.variant)
  overrides = {k: model_cfg.get(k, 0) for k in ("width", "depth", "num_heads", "mlp_dim")}
  return dataclasses.replace(size, **{k: v for k, v in overrides.items() if v}), patch


def describe_size(model_cfg) -> str:
  """"B/16", or "Ti/4 + width 128, depth 6, ..." when size overrides are set (for logs)."""
  size, _ = size_from_config(model_cfg)
  base, _ = parse_variant(model_cfg.variant)
  changed = [f"{k} {getattr(size, k)}" for k in ("width", "depth", "num_heads", "mlp_dim")
             if getattr(size, k) != getattr(base, k)]
  return model_cfg.variant + (f" ({', '.join(changed)})" if changed else "")


def encoder_from_config(model_cfg, image_size: Sequence[int], channels: int, *,
                        use_mask_token: bool = False, posemb: str = "sincos") -> ViTEncoder:
  """Builds the encoder described by `config.model` (variant, dtype, attention, drop path,
  remat, layer scale, relative position bias, weight init). `model.abs_posemb=False` (BEiT's recipe:
  relative positions only) overrides `posemb` with "none"."""
  size, patch = size_from_config(model_cfg)
  if not model_cfg.get("abs_posemb", True):
    posemb = "none"
  return ViTEncoder(
      image_size=tuple(image_size), patch_size=patch, width=size.width, depth=size.depth,
      num_heads=size.num_heads, mlp_dim=size.mlp_dim, channels=channels,
      drop_path_rate=model_cfg.get("drop_path_rate", 0.0), use_mask_token=use_mask_token,
      posemb=posemb, dtype=jnp.dtype(model_cfg.dtype),
      attention_impl=model_cfg.get("attention_impl") or None,
      remat=model_cfg.get("remat", "none"), layer_scale=float(model_cfg.get("layer_scale", 0.0)),
      rel_pos_bias=str(model_cfg.get("rel_pos_bias", "")),
      pre_norm=bool(model_cfg.get("pre_norm", False)),
      mlp_act=str(model_cfg.get("mlp_act", "gelu")),
      weight_init=str(model_cfg.get("weight_init", "xavier")))
