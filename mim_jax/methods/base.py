"""What the training loop needs from a method (a pre-training method or a trained evaluation).

A method bundles a Flax model with its loss. The loop only calls what is listed here, so a new
method (SimMIM, BEiT, a linear probe, ...) is a new small module, never a new trainer.

State comes in two parts:
  params   the trainable parameters (the optimizer sees these and only these)
  extra    everything else the method carries from step to step and checkpoints with them:
           BatchNorm statistics, a frozen encoder, an EMA teacher; {} when there is none.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import jax

Params = Any
Extra = Any
Batch = Mapping[str, jax.Array]


class Method(Protocol):
  """The interface every trainable method implements."""

  name: str

  def init(self, rng: jax.Array, images: jax.Array) -> tuple[Params, Extra]:
    """Returns fresh (params, extra) for example images [B, H, W, C] (traceable)."""

  def load_pretrained(self, params: Params, extra: Extra) -> tuple[Params, Extra]:
    """Puts pre-trained weights (e.g. `config.init_from`) into fresh host-side state."""

  def loss(self, params: Params, extra: Extra, batch: Batch, rng: jax.Array,
           train: bool = True) -> tuple[jax.Array, tuple[dict[str, jax.Array], Extra]]:
    """Returns (scalar loss, (scalar metrics, new extra)) for one batch; pure and jittable."""

  def encoder_params(self, params: Params, extra: Extra) -> Params:
    """The encoder's sub-tree, which downstream evaluation and export use."""


class Reconstructs(Protocol):
  """Methods with pixel-space predictions also draw reconstruction pictures."""

  def reconstruct(self, params: Params, images: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
    """Returns {"pred": [B, N, P] in target space, "mask": [B, N]} for pictures."""


class Evaluates(Protocol):
  """Classifiers are scored on the evaluation split during and after training."""

  def eval_metrics(self, params: Params, extra: Extra, batch: Batch) -> dict[str, jax.Array]:
    """Sums over the valid rows (batch["mask"]) of a batch: "correct", "loss", "count"."""
