"""What the training loop needs from a method (a pre-training method or a trained evaluation).

A method bundles a Flax model with its loss. The loop only calls what is listed here, so a new
method (SimMIM, BEiT, a linear probe, ...) is a new small module, never a new trainer.

State comes in two parts:
  params   the trainable parameters (the optimizer sees these and only these)
  extra    everything else the method carries from step to step and checkpoints with them:
           BatchNorm statistics, a frozen encoder, an EMA teacher; {} when there is none.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

import jax

Params = Any
Extra = Any
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainLength:
  """How long the run is, for methods whose own schedules (EMA momentum, teacher temperature)
  are given in epochs: `steps_per_epoch` and `schedule_steps` (the lr schedule's length)."""
  steps_per_epoch: int
  schedule_steps: int


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


# Optional hooks. The loop calls each only when the method defines it, so simple methods stay
# simple; teachers, tokenizers and multi-view inputs plug in here instead of into the loop.
#
#   after_update(params, extra, step) -> extra
#       Runs inside the jitted step after the optimizer update, on the new params (an EMA
#       teacher follows the student here). `step` (int32 []) is the index of the update just
#       applied (0 for the first). A step skipped for non-finite values discards its result.
#   train_augment(data_cfg, image_size, channels) -> grain RandomMap
#       Replaces the input pipeline's RandomResizedCrop + flip (multi-crop views). It must map
#       {"image": uint8 [h, w, C] or None, "label"} to a dict with "label", "valid" and the
#       method's arrays, placeholder zeros with valid=False for a None image.
#   batch_keys: tuple[str, ...]
#       Keys of a pipeline element, besides "image", "label" and "token_mask", that reach the
#       train step (e.g. extra views).
#   loads_weights: bool
#       True when `load_pretrained` must run on fresh state even without `config.init_from`
#       (a frozen tokenizer read from its own file).
#   export(path, params, extra, info) -> None
#       Writes the run's end product to `path` instead of the encoder export (a tokenizer).
#   needs_train_length: bool
#       True when the constructor takes `length=TrainLength(...)`.
#   reconstruct_reads_extra: bool
#       True when `reconstruct(params, batch, rng, extra)` also needs the method's `extra`
#       (a tokenizer's codebook, BEiT's frozen tokenizer) to draw its pictures.
