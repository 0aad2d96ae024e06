"""Masked prediction with mask tokens: the shared body of SimMIM, MaskFeat (and BEiT-style
methods).

Every patch token goes through the encoder, masked ones replaced by a learned mask token; a
light predictor maps each output token to its patch's target, and a loss over the masked
patches compares them. A method is this class with two choices filled in:

  target      an `objectives.patch_targets.PatchTarget`: images -> targets [B, N, F] (pixels,
              HOG, a frozen tokenizer's codes, a frozen teacher's features), no gradient; a
              target with frozen state keeps it in extra[target.key]
  loss_fn     (pred [B, N, F], target [B, N, F], mask [B, N], axis_name) -> scalar

(and `target_dim(config)`, F, for the FLOP count before anything is built), and the mask
generator of `config.masking` (any kind: masked counts may vary per sample, since the token
sequence always has all N patches).
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
from mim_jax.models.initializers import head_init
from mim_jax.models.vit import ViTEncoder, encoder_from_config, size_from_config
from mim_jax.objectives import masking
from mim_jax.objectives.patch_targets import PatchTarget


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
  mask_token_in_encoder = True
  loss_is_masked_mean = True  # loss_fn: a masked mean (losses.py)
  # head_in_vit (base.PretrainingMethod): BEiT's and MaskDistill's are; SimMIM's and MaskFeat's
  # heads are separate layers with their own init.

  @classmethod
  def validate(cls, config):
    validation.validate_pretraining_fields(config, mask_kinds=cls.mask_kinds(config))

  @classmethod
  def mask_kinds(cls, config) -> tuple[str, ...]:
    """The masking kinds this method offers; a target with a teacher adds 'attention'."""
    return masking.MASK_KINDS

  @classmethod
  def target_dim(cls, config) -> int:
    """F, the width of one patch's target (the linear head's output)."""
    raise NotImplementedError

  @classmethod
  def forward_flops(cls, config):
    size, _ = size_from_config(config.model)
    encoder = flops.encoder_flops(config.model, config.image_size, config.channels)
    decoder = float(2 * num_patches(config) * size.width * cls.target_dim(config))
    target = cls.target_flops(config)
    out = {"encoder": encoder, "decoder": decoder, "total": encoder + decoder + target}
    if target:
      out["target"] = target
    return out

  @classmethod
  def target_flops(cls, config) -> float:
    """Forward FLOPs per image of the target (a frozen network's pass; 0 for pixels, HOG)."""
    return 0.0

  def __init__(self, config, length=None, *, target: PatchTarget,
               loss_fn: Callable[..., jax.Array]):
    super().__init__(config, length)
    encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                  use_mask_token=True)
    self.model = MaskTokenModel(
        encoder=encoder,
        predictor=LinearPredictor(target.dim, dtype=jnp.dtype(config.model.dtype),
                                  kernel_init=(head_init(config.model.get("weight_init", "xavier"))
                                               if self.head_in_vit else None)))
    self.patch_size = encoder.patch_size
    self.grid_hw = encoder.grid_hw
    self.mask_generator = masking.mask_generator_from_config(
        config.masking, encoder.grid_hw, encoder.patch_size)
    self.target = target
    self.loss_fn = loss_fn
    # How pictures show the (normalised) images: the data's mean / std, the chosen channels.
    self.display = dict(mean=tuple(config.data.mean), std=tuple(config.data.std),
                        channels=tuple(config.viz_channels))

  def init(self, rng, images):
    mask = jnp.zeros((images.shape[0], self.grid_hw[0] * self.grid_hw[1]), bool)
    params = self.model.init({"params": rng}, images, mask)["params"]
    if self.target.key is None:
      return params, {}
    # Placeholders of the frozen target's shapes; `load_pretrained` (or a checkpoint) fills them.
    return params, {self.target.key: self.target.init_extra()}

  def wants_weights(self) -> bool:
    return self.target.key is not None or super().wants_weights()

  def load_pretrained(self, params, extra):
    params, extra = super().load_pretrained(params, extra)  # init_from, if any
    if self.target.key is None:
      return params, extra
    return params, {**extra, self.target.key: self.target.load_extra()}

  def forward(self, params, extra, batch, rng, train: bool) -> dict[str, jax.Array]:
    """{"pred" [B, N, F], "target" [B, N, F] (or int codes [B, N]), "mask" bool [B, N]}; a
    model that returns (pred, {name: pred}) adds "more_preds" (that dict); with
    masking.kind='attention', the teacher's last [CLS] attention "attention" [B, heads,
    N] whose head average chose the mask (one teacher pass gives targets and attention)."""
    mask_rng, drop_rng = jax.random.split(rng)
    out = {}
    if self.mask_generator.needs_scores:
      target, attention = self.target.with_attention(extra[self.target.key], batch["image"])
      target, out["attention"] = jax.lax.stop_gradient((target, attention))
      mask = self.mask_generator.from_scores(attention.mean(axis=1), mask_rng)
    else:
      target = self.targets(extra, batch["image"])
      mask = self.mask_generator.sample(batch, mask_rng)
    pred = self.model.apply({"params": params}, batch["image"], mask, train=train,
                            rngs={"drop_path": drop_rng})
    if isinstance(pred, tuple):  # more heads predicting the same targets
      pred, out["more_preds"] = pred
    return {**out, "pred": pred, "target": target, "mask": mask}

  def targets(self, extra, images):
    """The targets of `images` (no gradient), from the target's frozen state if it has one."""
    state = extra[self.target.key] if self.target.key is not None else None
    return jax.lax.stop_gradient(self.target(state, images))

  def extra_metrics(self, pred, target, mask):
    """Scalar metrics besides loss and mask_fraction (e.g. BEiT's masked-token accuracy)."""
    return {}

  def loss(self, params, extra, batch, rng, train=True):
    out = self.forward(params, extra, batch, rng, train)
    pred, target, mask = out["pred"], out["target"], out["mask"]
    loss = self.loss_fn(pred, target, mask, axis_name=self.axis_name)
    metrics = {"mask_fraction": jnp.mean(mask.astype(jnp.float32)),
               **self.extra_metrics(pred, target, mask)}
    # A model with more heads (BEiT v2's patch aggregation) adds each head's loss on the same
    # targets and masks; "mim_loss" is then the main head's.
    if out.get("more_preds"):
      metrics["mim_loss"] = loss
    for name, more in out.get("more_preds", {}).items():
      more_loss = self.loss_fn(more, target, mask, axis_name=self.axis_name)
      metrics[f"{name}_loss"] = more_loss
      metrics.update({f"{name}_{k}": v for k, v in self.extra_metrics(more, target, mask).items()})
      loss = loss + more_loss
    return loss, ({"loss": loss, **metrics}, extra)

  def reconstruct(self, params, batch, rng, extra):
    """{"pred", "target": [B, N, F], "mask": [B, N] float32 (, "attention")} for pictures."""
    out = self.forward(params, extra, batch, rng, train=False)
    return {**out, "mask": out["mask"].astype(jnp.float32)}


def num_patches(config) -> int:
  """N, the patches of one image of `config`."""
  _, patch = size_from_config(config.model)
  return (config.image_size[0] // patch) * (config.image_size[1] // patch)
