"""The GELU lever of docs/benchmarks.md: forward + backward of a ViT MLP (fc1 -> act -> fc2)
with mim_jax's exact GELU (hand-written gradient, models/vit.py), JAX's exact GELU through
autodiff, and ReLU as the floor, timed in the same process. One JSON line per activation.

  python docs/gelu_lever.py [TOKENS] [WIDTH] [STEPS]
  (default 12800 tokens = batch 256 x 50 MAE encoder tokens, width 128: the demo ViT's MLP)
"""

from __future__ import annotations

import json
import statistics
import sys

import jax
import jax.numpy as jnp

from mim_jax.bench import timed
from mim_jax.models.vit import gelu

ACTIVATIONS = {"mim_jax_gelu": gelu, "jax_gelu_autodiff": lambda x: jax.nn.gelu(x, False),
               "relu": jax.nn.relu}


def main(tokens: int = 12800, width: int = 128, steps: int = 30) -> None:
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (tokens, width))
  w1 = jax.random.normal(keys[1], (width, 4 * width)) * width ** -0.5
  w2 = jax.random.normal(keys[2], (4 * width, width)) * (4 * width) ** -0.5
  for name, act in ACTIVATIONS.items():
    step = jax.jit(jax.grad(lambda w1, w2, x: jnp.sum(act(x @ w1) @ w2) ** 2 / x.size,
                            argnums=(0, 1, 2)))
    times = timed(lambda: jax.block_until_ready(step(w1, w2, x)), warmup=1, steps=steps)
    print(json.dumps({"activation": name, "tokens": tokens, "width": width,
                      "median_s": statistics.median(times), "min_s": min(times),
                      "device": jax.devices()[0].device_kind}), flush=True)


if __name__ == "__main__":
  main(*map(int, sys.argv[1:]))
