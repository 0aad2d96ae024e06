"""Vision Transformer encoder pieces shared by every MIM method.

Layout conventions (used across mim_jax):
  images   [B, H, W, C]       channels last, normalised floats
  patches  [B, N, p*p*C]      N = (H/p) * (W/p), row-major over the patch grid, each patch
                              flattened in (row, col, channel) order (the official MAE `patchify`)
  tokens   [B, T, D]          T = 1 + number of patch tokens given to the encoder (cls first)

The block structure mirrors the official MAE / timm ViT (pre-norm, fused qkv with bias, exact
GELU, LayerNorm eps 1e-6) so that released PyTorch weights map one to one onto these parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.config.errors import config_error
from mim_jax.training import parallel

Dtype = Any

# Xavier-uniform on every linear layer and N(0, 0.02) on learned tokens, as in the official MAE
# (model.weight_init='xavier', the default; `weight_inits` has BEiT's too).
dense_init = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)
LAYER_NORM_EPS = 1e-6


def trunc_normal(std: float) -> nn.initializers.Initializer:
  """timm's `trunc_normal_(std=std)` (the official heads' init): N(0, std^2) cut at the
  absolute values -2 and 2. flax's `truncated_normal(std)` cuts at -2 std and 2 std instead,
  which makes its standard deviation 12% smaller than asked (0.88 std). Cuts beyond 5 std are
  made at 5 std: float32's erf rounds to +-1 further out, where the inverse-CDF draw could
  return the cut itself (a weight of exactly -2 in ~1e-7 of draws, as in PyTorch); the
  std changes by under 2e-5 of itself."""
  bound = min(2.0 / std, 5.0)
  return nn.initializers.truncated_normal(std, lower=-bound, upper=bound)


# model.weight_init: how an encoder built from the config starts (see `weight_inits`).
WEIGHT_INITS = ("xavier", "beit", "dino", "data2vec2")
# BEiT's, BEiT v2's, data2vec's and SimMIM's pre-training code wrap timm's trunc_normal_ with
# a = -std, b = std: the draws are cut at one standard deviation (+-0.02), not two, so their
# std is 0.54 x 0.02.
BEIT_STD = 0.02


def _divided(init: nn.initializers.Initializer, divisor: float) -> nn.initializers.Initializer:
  def scaled(key, shape, dtype=jnp.float32):
    return init(key, shape, dtype) / divisor
  return scaled


def _torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias of a Linear / Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return uniform


def _zero_bias(fan_in: int) -> nn.initializers.Initializer:
  del fan_in
  return nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class WeightInit:
  """Initialisers of one block's linear layers: `kernel` for qkv and fc1, `out` for the branch
  outputs (attention proj, MLP fc2), `token` for the cls token; and of the embedding:
  `patch_kernel` for the patch embedding [p * p * C, D], `patch_bias(fan_in)` its bias's
  initialiser for fan_in = p * p * C, `mask_token` for the mask token."""
  kernel: nn.initializers.Initializer
  out: nn.initializers.Initializer
  token: nn.initializers.Initializer
  patch_kernel: nn.initializers.Initializer
  patch_bias: Callable[[int], nn.initializers.Initializer]
  mask_token: nn.initializers.Initializer


def weight_inits(scheme: str = "xavier", layer_id: int = 1) -> WeightInit:
  """The initialisers of `scheme` (`model.weight_init`) for block `layer_id` (1 .. depth).

  "xavier": Xavier-uniform linear layers (the patch embedding too) and N(0, 0.02) tokens, as
  the official MAE. "beit": the pre-training init of BEiT, BEiT v2, data2vec and SimMIM (unilm
  beit/ and beit2/ modeling_pretrain.py, data2vec_vision modeling_cyclical.py, SimMIM
  models/simmim.py, whose encoder overrides its ViT's `_trunc_normal_` the same way): linear
  layers (the patch embedding too) and tokens N(0, 0.02) cut at +-0.02 (BEIT_STD), and each
  block's two branch outputs divided by sqrt(2 * layer_id) (their `fix_init_weight`), so the
  residual stream grows more slowly with depth. "dino": the ViT of DINO that iBOT's release
  builds on (bytedance/ibot models/vision_transformer.py): linear layers and the cls token
  DINO's (timm's) trunc_normal_(0.02) (cut at +-2, i.e. not at all), no rescale, the patch
  embedding left at PyTorch's Conv2d default (kaiming_uniform_(a=sqrt(5)): weights and bias
  U(-1/sqrt(fan_in), 1/sqrt(fan_in))), and a zero mask token (its `masked_embed`).
  "data2vec2": data2vec 2.0's image model (fairseq examples/data2vec: Data2VecMultiModel
  applies `init_bert_params`, its `mae_init` off by default; modalities/images.py): linear
  layers N(0, 0.02) (fairseq's normal_, not cut; here cut at 5 std, `trunc_normal`'s float32
  guard), no rescale, the patch-embedding conv Xavier-uniform with its bias at PyTorch's
  default, and the cls token (its extra token, `init_extra_token_zero` off in the image
  recipe) N(0, 1); its student encodes the visible patches only, so no mask token is read.
  Block biases start at 0 in all four; the patch embedding's bias at 0 under "xavier" and
  "beit" (the official MAE leaves its conv bias at PyTorch's uniform default; "xavier" keeps
  it 0, as every recorded run started).
  """
  if scheme == "xavier":
    return WeightInit(dense_init, dense_init, token_init, patch_kernel=dense_init,
                      patch_bias=_zero_bias, mask_token=token_init)
  if scheme == "beit":
    cut = nn.initializers.truncated_normal(BEIT_STD, lower=-1.0, upper=1.0)
    return WeightInit(cut, _divided(cut, math.sqrt(2.0 * layer_id)), cut, patch_kernel=cut,
                      patch_bias=_zero_bias, mask_token=cut)
  if scheme == "dino":
    normal = trunc_normal(0.02)
    # kaiming_uniform_(a=sqrt(5)): gain^2 = 2 / (1 + 5), bound sqrt(3 * gain^2 / fan_in).
    conv_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    return WeightInit(normal, normal, normal, patch_kernel=conv_default,
                      patch_bias=_torch_default_bias, mask_token=nn.initializers.zeros)
  if scheme == "data2vec2":
    normal = trunc_normal(0.02)
    return WeightInit(normal, normal, nn.initializers.normal(1.0), patch_kernel=dense_init,
                      patch_bias=_torch_default_bias, mask_token=token_init)
  raise config_error("model.weight_init", scheme, f"one of {WEIGHT_INITS}")


def head_init(scheme: str = "xavier") -> nn.initializers.Initializer:
  """The init of a prediction head that the official code builds inside its ViT (BEiT's,
  BEiT v2's and data2vec's `lm_head`), so that `_init_weights` draws it as the encoder's
  linear layers: under "beit" N(0, 0.02) cut at +-0.02; otherwise timm's trunc_normal_(0.02)."""
  if scheme == "beit":
    return weight_inits(scheme).kernel
  return trunc_normal(BEIT_STD)


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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: Optional[str] = None,
                          bias: Optional[jax.Array] = None) -> jax.Array:
  """Attention on [B, T, heads, head_dim] -> [B, T, heads, head_dim], by `implementation`.

  bias: added to the attention logits after scaling, [B or 1, heads, T, T] (relative position
  bias).

  implementation: "xla", "cudnn", "heads_major", or None for the default: cuDNN's fused
  (flash) kernel on a GPU, `heads_major_attention` on a CPU, XLA's attention elsewhere.
  cuDNN's kernel has no backward pass for odd sequence lengths
  (MAE's decoder: 196 patches + [CLS]), so those are padded to a multiple of 8 with key and
  query length masks (`padded_attention`): each real query attends to exactly its keys, so the
  output is the unpadded one. A layer cuDNN still rejects (e.g. float32, or a head dim that
  is not a multiple of 8) falls back to XLA's attention and says so in the log.
  """
  implementation = default_attention_impl(implementation)
  if implementation == "heads_major":
    return heads_major_attention(q, k, v, bias)
  if bias is not None:
    bias = bias.astype(q.dtype)
  if implementation != "cudnn":
    return jax.nn.dot_product_attention(q, k, v, bias, implementation=implementation)
  try:
    if q.shape[1] % 2:
      return padded_attention(q, k, v, multiple=8, implementation="cudnn", bias=bias)
    return jax.nn.dot_product_attention(q, k, v, bias, implementation="cudnn")
  except NotImplementedError as err:
    logging.getLogger(__name__).info(
        "cuDNN attention does not take q %s %s (%s); this layer uses XLA's attention",
        q.shape, q.dtype, err)
    return jax.nn.dot_product_attention(q, k, v, bias, implementation="xla")


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          bias: Optional[jax.Array] = None) -> jax.Array:
  """XLA attention with its matmuls in [B, heads, T, head_dim] order: [B, T, heads, head_dim]
  -> [B, T, heads, head_dim], the same function as `jax.nn.dot_product_attention`.

  XLA:CPU runs a batched matmul whose batch dimensions lead and whose output is [B, heads, T,
  .] as one fast library call; `jax.nn`'s XLA path contracts [B, T, heads, d] operands into a
  [B, T, heads, d] output, which XLA:CPU turns into slow strided loops (its P @ V alone: 5.2
  vs 1.4 ms at [256, 50, 4, 16], docs/benchmarks.md). Three transposes of q, k, v and one of
  the output cost a fraction of that. The 1/sqrt(d) scale multiplies q (T x d values) rather
  than the logits (T x T), which also keeps the scaling out of the softmax's backward: equal up
  to rounding (exactly equal where d is a power of 4). Logits, bias and softmax in float32, as
  in `jax.nn`; in bfloat16 the scale is applied to q in bfloat16, and the bias is added in
  float32 without first being rounded to bfloat16 (as the `jax.nn` path's is): the same
  function up to bfloat16 rounding.
  """
  qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  qh = qh * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs, vh), 1, 2)


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, multiple: int,
                     implementation: Optional[str],
                     bias: Optional[jax.Array] = None) -> jax.Array:
  """Attention over the tokens padded to a multiple of `multiple`, equal to the unpadded one.

  Zero tokens are appended to q, k and v; `key_value_seq_lengths` hides the padded keys from
  every query (so the softmax runs over the real keys only) and `query_seq_lengths` marks the
  padded queries, whose rows are sliced off (no gradient reaches them).
  """
  b, t = q.shape[:2]
  padded = -(-t // multiple) * multiple
  if padded == t:
    return jax.nn.dot_product_attention(q, k, v, bias, implementation=implementation)
  widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
  if bias is not None:  # [B, heads, T, T]: zeros for the padded rows and columns
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, padded - t), (0, padded - t)))
  lengths = jnp.full((b,), t, jnp.int32)
  out = jax.nn.dot_product_attention(
      jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths), bias,
      query_seq_lengths=lengths, key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :t]


# Relative position bias (BEiT, and the BEiT-style recipes of SimMIM and data2vec):
# "" none, "shared" one table for all blocks, "per_block" one table per block.
REL_POS_BIAS = ("", "shared", "per_block")


def num_relative_positions(grid_hw: tuple[int, int]) -> int:
  """Rows of a relative position bias table for a patch grid (h, w): one per 2-D offset,
  (2h - 1)(2w - 1), plus [CLS]->patch, patch->[CLS] and [CLS]->[CLS]."""
  h, w = grid_hw
  return (2 * h - 1) * (2 * w - 1) + 3


def relative_position_index(table_grid: tuple[int, int], grid: tuple[int, int],
                            positions: Optional[jax.Array] = None) -> jax.Array:
  """int32 [B or 1, T, T]: the table row that token pair (query i, key j) reads; token 0 is
  [CLS], the others patches.

  table_grid: the (h, w) grid the table was made for (its offsets span +-(h-1), +-(w-1));
  grid: the input's patch grid, at most table_grid (smaller multi-crop views read the same
  table: their offsets are a subset); positions [B, K]: the patches present, as indices into
  `grid` (MAE's visible patches), None for all of them in order. The numbering is BEiT's
  (offsets (dr + h - 1) * (2w - 1) + (dc + w - 1); then [CLS]->patch, patch->[CLS],
  [CLS]->[CLS]), so official tables load unchanged.
  """
  (th, tw), (gh, gw) = table_grid, grid
  if gh > th or gw > tw:
    raise ValueError(f"a relative position table for a {table_grid} patch grid cannot serve a "
                     f"{grid} grid (larger offsets than it holds)")
  if positions is None:
    positions = jnp.arange(gh * gw, dtype=jnp.int32)[None]
  rows, cols = positions // gw, positions % gw  # [B, K]
  offsets = ((rows[:, :, None] - rows[:, None, :] + th - 1) * (2 * tw - 1)
             + cols[:, :, None] - cols[:, None, :] + tw - 1)
  m = (2 * th - 1) * (2 * tw - 1)
  b, k = positions.shape
  index = jnp.zeros((b, k + 1, k + 1), jnp.int32)
  index = index.at[:, 1:, 1:].set(offsets.astype(jnp.int32))
  index = index.at[:, 0, :].set(m)       # [CLS] query -> patch keys
  index = index.at[:, :, 0].set(m + 1)   # patch queries -> [CLS] key
  return index.at[:, 0, 0].set(m + 2)


class RelativePositionBias(nn.Module):
  """A learned table [num_relative_positions, heads] -> bias [B or 1, heads, T, T] for
  `relative_position_index` (zeros at first: attention starts position-agnostic, as BEiT's)."""
  table_grid: tuple[int, int]
  num_heads: int

  @nn.compact
  def __call__(self, index: jax.Array) -> jax.Array:
    table = self.param("relative_position_bias_table", nn.initializers.zeros,
                       (num_relative_positions(self.table_grid), self.num_heads))
    return jnp.transpose(table[index], (0, 3, 1, 2))


def default_attention_impl(implementation: Optional[str]) -> Optional[str]:
  """The attention implementation a layer runs: `implementation`, or for None the backend's
  default (cuDNN on a GPU, heads-major on a CPU, `jax.nn`'s choice elsewhere)."""
  if implementation is None:
    return {"gpu": "cudnn", "cpu": "heads_major"}.get(jax.default_backend())
  return implementation


class BlockwiseQKV(nn.Module):
  """The fused qkv projection's parameters (an `nn.Dense(3 * width)` named alike: kernel
  [D, 3D], bias [3D]) applied as three matmuls with its column blocks: x [B, T, D] -> q, k, v,
  each [B, T, D], the same values as slicing the fused output.

  Why: the fused output's three slices each get a gradient padded to the fused width and
  summed, activation-sized copies that XLA:CPU runs slowly (about 55 ms of a 0.46 s
  Fashion-MNIST MAE step); here the backward is three matmuls and a concatenation of weight
  gradients. On accelerators the one wide matmul stays (heads_major is a CPU default).
  """
  features: int
  dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = dense_init

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    # float32 parameters, as nn.Dense's default param_dtype.
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
    w = self.features // 3
    return tuple(x @ kernel[:, i * w:(i + 1) * w] + bias[i * w:(i + 1) * w] for i in range(3))


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection.

  The core runs through `dot_product_attention`: the cuDNN flash kernel on GPU where
  `implementation` asks for it and the shapes allow, `heads_major_attention` on a CPU (with
  q, k, v from `BlockwiseQKV`: the same parameters), `jax.nn`'s XLA attention elsewhere; every
  implementation computes the same function of the same parameters (up to rounding).
  `rel_pos_grid` (h, w) gives the layer its own relative position bias table (BEiT's
  per-block bias), read at `rel_index`; a shared bias arrives as `bias`.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  # None (cuDNN on GPU, heads-major XLA on CPU, XLA elsewhere), "xla", "cudnn" or "heads_major"
  implementation: Optional[str] = None
  rel_pos_grid: Optional[tuple[int, int]] = None
  kernel_init: nn.initializers.Initializer = dense_init   # qkv
  out_init: nn.initializers.Initializer = dense_init      # proj

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None,
               rel_index: Optional[jax.Array] = None) -> jax.Array:
    b, t, width = x.shape
    head_dim = width // self.num_heads
    implementation = default_attention_impl(self.implementation)
    if implementation == "heads_major":
      q, k, v = (y.reshape(b, t, self.num_heads, head_dim)
                 for y in BlockwiseQKV(3 * width, dtype=self.dtype, kernel_init=self.kernel_init,
                                        name="qkv")(x))
    else:
      qkv = nn.Dense(3 * width, dtype=self.dtype, kernel_init=self.kernel_init, name="qkv")(x)
      qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, T, heads, head_dim]
    if self.rel_pos_grid is not None:
      own = RelativePositionBias(tuple(self.rel_pos_grid), self.num_heads,
                                 name="rel_pos_bias")(rel_index)
      bias = own if bias is None else bias + own
    if self.is_mutable_collection("intermediates"):
      # Asked for (features.py): the attention weights [B, heads, T, T], computed once more
      # in float32 beside the fused kernel, which never materialises them.
      logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
      logits = logits * head_dim ** -0.5 + (0.0 if bias is None else bias.astype(jnp.float32))
      self.sow("intermediates", "attention", jax.nn.softmax(logits, -1))
    out = dot_product_attention(q, k, v, implementation=implementation, bias=bias)
    out = out.reshape(b, t, width)
    return nn.Dense(width, dtype=self.dtype, kernel_init=self.out_init, name="proj")(out)


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
  CLIP towers load as teachers. `weight_init` (`WEIGHT_INITS`, `weight_inits`) sets how the
  weights start. The sin-cos table is computed for the input's own patch grid, so images
  smaller than `image_size` (multi-crop local views) work; positions run 0 .. g - 1 on any
  grid.

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
      posemb=posemb, dtype=jnp.dtype(model_cfg.dtype), attention_impl=model_cfg.get("attention_impl") or None,
      remat=model_cfg.get("remat", "none"), layer_scale=float(model_cfg.get("layer_scale", 0.0)),
      rel_pos_bias=str(model_cfg.get("rel_pos_bias", "")),
      pre_norm=bool(model_cfg.get("pre_norm", False)),
      mlp_act=str(model_cfg.get("mlp_act", "gelu")),
      weight_init=str(model_cfg.get("weight_init", "xavier")))
