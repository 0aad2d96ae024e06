"""What the training loop needs from a method.

A method bundles a Flax model with its loss. The loop only calls these four things, so a new
method (SimMIM, BEiT, ...) is a new small module, never a new trainer.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax

Params = Any
Batch = Mapping[str, jax.Array]


class Method(Protocol):
  """The interface every pre-training method implements."""

  name: str

  def init(self, rng: jax.Array, images: jax.Array) -> Params:
    """Returns freshly initialised parameters for example images [B, H, W, C]."""

  def loss(self, params: Params, batch: Batch, rng: jax.Array,
           train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (scalar loss, dict of scalar metrics) for one batch; pure and jittable."""

  def reconstruct(self, params: Params, images: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
    """Returns {"pred": [B, N, P] in target space, "mask": [B, N]} for pictures."""

  def encoder_params(self, params: Params) -> Params:
    """The encoder's sub-tree, which is what downstream evaluation and export use."""
