"""Multi-head self-attention and its implementations: cuDNN's fused kernel (odd lengths
padded), a heads-major XLA form for CPUs, `jax.nn`'s XLA path; and BEiT's relative position
bias.

Shapes: tokens [B, T, D]; q, k, v [B, T, heads, head_dim]; a bias [B or 1, heads, T, T].
Every implementation computes the same function of the same parameters (up to rounding), so
`model.attention_impl` changes speed, never results or checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.initializers import dense_init

Dtype = Any


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
