"""The grouped-convolution levers of docs/benchmarks.md: forward + backward of data2vec 2.0's
convolutional decoder (models/decoders.ConvDecoder) with its grouped 3x3 convolutions computed
three ways, timed in the same process: `GroupedConv` (what the decoder uses: the k column
shifts stacked, one matmul per group to the k kernel rows' outputs, their row-shifted sum),
all k*k shifts stacked (im2col) and one matmul per group (the decoder's form before the
row-by-row one, both of 2026-12-05), and flax's `nn.Conv(feature_group_count=G)` (XLA's
grouped convolution). One JSON line per implementation.

  python docs/grouped_conv_lever.py [BATCH] [STEPS]
  (default 1024 = batch 256 x 4 masks of configs/data2vec2_fmnist.py: 4 layers of 128
  channels in 16 groups over the 7x7 grid)
"""

from __future__ import annotations

import json
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.bench import timed
from mim_jax.models import decoders


class FlaxGroupedConv(nn.Module):
  """The peer: the same layer through flax's grouped convolution."""
  features: int
  kernel_size: int = 3
  groups: int = 1
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, (self.kernel_size, self.kernel_size), padding="SAME",
                   feature_group_count=self.groups, dtype=self.dtype, name="conv")(x)


class AllShiftsGroupedConv(decoders.GroupedConv):
  """The peer: every one of the k*k shifts stacked ([G, B*H*W, k*k*C_in/G], group-major), one
  batched matmul per group; GroupedConv's fields and parameters."""

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    (k, g), pad = (self.kernel_size, self.groups), self.kernel_size // 2
    c_in, c_out = c // g, self.features // g
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, c_in, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    grouped = jnp.transpose(x.reshape(b, h, w, g, c_in), (3, 0, 1, 2, 4))  # [G, B, H, W, i]
    grouped = jnp.pad(grouped, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)))
    views = jnp.stack([grouped[:, :, i:i + h, j:j + w] for i in range(k) for j in range(k)],
                      axis=-2).reshape(g, b * h * w, k * k * c_in).astype(self.dtype)
    kern = jnp.transpose(kernel.reshape(k * k, c_in, g, c_out), (2, 0, 1, 3))
    kern = kern.reshape(g, k * k * c_in, c_out).astype(self.dtype)
    out = jnp.einsum("gnk,gkj->gnj", views, kern)
    out = jnp.transpose(out.reshape(g, b, h, w, c_out), (1, 2, 3, 0, 4))
    return out.reshape(b, h, w, self.features) + bias.astype(self.dtype)


def main(batch: int = 1024, steps: int = 5) -> None:
  grid, width, visible = (7, 7), 128, 10
  n = grid[0] * grid[1]
  x = jax.random.normal(jax.random.key(0), (batch, visible, width))
  order = jnp.argsort(jax.random.uniform(jax.random.key(1), (batch, n)), axis=1)
  ids_restore = jnp.argsort(order, axis=1).astype(jnp.int32)
  for name, conv in (("row_shifts_matmul", decoders.GroupedConv),
                     ("all_shifts_matmul", AllShiftsGroupedConv),
                     ("xla_grouped_conv", FlaxGroupedConv)):
    original = decoders.GroupedConv
    decoders.GroupedConv = conv  # the decoder builds its layers from this name
    try:
      dec = decoders.ConvDecoder(grid_hw=grid, out_dim=width, width=width, depth=4, groups=16)
      params = dec.init(jax.random.key(2), x, ids_restore)["params"]
      # ids_restore is an argument, not a constant XLA would fold at compile time.
      step = jax.jit(jax.grad(lambda p, v, ids: jnp.sum(dec.apply({"params": p}, v, ids) ** 2),
                              argnums=(0, 1)))
      times = timed(lambda: jax.block_until_ready(step(params, x, ids_restore)), warmup=1,
                    steps=steps)
    finally:
      decoders.GroupedConv = original
    print(json.dumps({"conv": name, "batch": batch, "median_s": statistics.median(times),
                      "min_s": min(times), "backend": jax.default_backend(),
                      "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
  main(*(int(a) for a in sys.argv[1:]))
