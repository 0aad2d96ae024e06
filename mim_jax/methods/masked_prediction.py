"""Masked prediction with mask tokens: the shared body of SimMIM, MaskFeat (and BEiT-style
methods).

Every patch token goes through the encoder, masked ones replaced by a learned mask token; a
light predictor maps each output token to its patch's target, and a loss over the masked
patches compares them. A method is this class with three choices filled in:

  target_fn   images [B, H, W, C] -> targets [B, N, F] (pixels, HOG, ...), no gradient
  loss_fn     (pred [B, N, F], target [B, N, F], mask [B, N], axis_name) -> scalar
  target_dim  F

and the mask generator of `config.masking` (any kind: masked counts may vary per sample,
since the token sequence always has all N patches).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.config import validation
from mim_jax.methods import base
from mim_jax.models import flops
from mim_jax.models.decoders import LinearPredictor
from mim_jax.models.vit import ViTEncoder, encoder_from_config, size_from_config
from mim_jax.objectives import masking


class MaskTokenModel(nn.Module):
  """images [B, H, W, C], token_mask bool [B, N] -> predictions [B, N, F] (float32)."""
  encoder: ViTEncoder
  predictor: nn.Module

  def __call__(self, images: jax.Array, token_mask: jax.Array, *, train: bool = False):
    tokens, _ = self.encoder(images, token_mask=token_mask, train=train)
    return self.predictor(tokens)


class MaskedPrediction(base.PretrainingMethod):
  """A mask-token method as the training loop sees it (see `methods.base.Method`); subclasses
  pass their target, its width and their loss (and may add config fields)."""

  draws = True

  @classmethod
  def validate(cls, config):
    validation.validate_pretraining_fields(config)

  @classmethod
  def target_dim(cls, config) -> int:
    """F, the width of one patch's target (the linear head's output)."""
    raise NotImplementedError

  @classmethod
  def forward_flops(cls, config):
    size, _ = size_from_config(config.model)
    encoder = flops.encoder_flops(config.model, config.image_size, config.channels)
    decoder = float(2 * _num_patches(config) * size.width * cls.target_dim(config))
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}

  def __init__(self, config, length=None, *, target_fn: Callable[[jax.Array], jax.Array],
               loss_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]):
    super().__init__(config, length)
    encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                  use_mask_token=True)
    self.model = MaskTokenModel(
        encoder=encoder,
        predictor=LinearPredictor(self.target_dim(config), dtype=jnp.dtype(config.model.dtype)))
    self.patch_size = encoder.patch_size
    self.grid_hw = encoder.grid_hw
    self.mask_generator = masking.mask_generator_from_config(
        config.masking, encoder.grid_hw, encoder.patch_size)
    self.target_fn = target_fn
    self.loss_fn = loss_fn
    # How pictures show the (normalised) images: the data's mean / std, the chosen channels.
    self.display = dict(mean=tuple(config.data.mean), std=tuple(config.data.std),
                        channels=tuple(config.viz_channels))

  def init(self, rng, images):
    mask = jnp.zeros((images.shape[0], self.grid_hw[0] * self.grid_hw[1]), bool)
    return self.model.init({"params": rng}, images, mask)["params"], {}

  def _predict(self, params, batch, rng, train):
    mask_rng, drop_rng = jax.random.split(rng)
    mask = self.mask_generator.sample(batch, mask_rng)
    pred = self.model.apply({"params": params}, batch["image"], mask, train=train,
                            rngs={"drop_path": drop_rng})
    return pred, mask

  def targets(self, extra, images):
    """The targets of `images`; a method whose target needs its `extra` state (a frozen
    tokenizer) overrides this."""
    return self.target_fn(images)

  def extra_metrics(self, pred, target, mask):
    """Scalar metrics besides loss and mask_fraction (e.g. BEiT's masked-token accuracy)."""
    return {}

  def loss(self, params, extra, batch, rng, train=True):
    pred, mask = self._predict(params, batch, rng, train)
    target = jax.lax.stop_gradient(self.targets(extra, batch["image"]))
    loss = self.loss_fn(pred, target, mask, axis_name=self.axis_name)
    metrics = {"loss": loss, "mask_fraction": jnp.mean(mask.astype(jnp.float32)),
               **self.extra_metrics(pred, target, mask)}
    return loss, (metrics, extra)

  def reconstruct(self, params, batch, rng, extra):
    """{"pred", "target": [B, N, F], "mask": [B, N] float32} for pictures."""
    pred, mask = self._predict(params, batch, rng, train=False)
    return {"pred": pred, "target": self.target_fn(batch["image"]),
            "mask": mask.astype(jnp.float32)}



def _num_patches(config) -> int:
  _, patch = size_from_config(config.model)
  return (config.image_size[0] // patch) * (config.image_size[1] // patch)
