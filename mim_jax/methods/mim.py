"""Masked image modeling with the target chosen by config: the target-level study's method.

The mask-token path of SimMIM / MaskFeat / BEiT / MaskDistill (every patch through the
encoder, masked ones replaced by a learned mask token, a linear head, a loss over the masked
patches) with the target as the one thing a config changes, so that pixels, HOG, discrete
tokens and a teacher's features can be compared under the same encoder, masking and budget:

  target.kind   pixels | norm_pixels | hog | tokens | teacher_features
                (`objectives/patch_targets.py`)
  target.loss   "" = the kind's loss in its paper (pixels: l1, as SimMIM; norm_pixels: mse, as
                MAE; hog: mse, as MaskFeat; tokens: cross_entropy, as BEiT; teacher_features:
                smooth_l1, as MaskDistill), or l1 | mse | smooth_l1 | cosine for vector
                targets (codes take cross_entropy only)
  target.hog / target.tokenizer / target.teacher: each kind's settings, read only by it

Pictures follow the target: reconstructions (pixels), HOG maps, decoded codes, or the
per-patch cosine similarity of prediction and target (teacher features).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import viz
from mim_jax.config import validation as v
from mim_jax.methods import beit, maskdistill, maskfeat
from mim_jax.methods.masked_prediction import MaskedPrediction
from mim_jax.models.vit import size_from_config
from mim_jax.objectives import hog, losses, masking, patch_targets
from mim_jax.tokenizers import io
from mim_jax.tokenizers.models import encode_flops


def _loss_name(t) -> str:
  return t.loss or patch_targets.DEFAULT_LOSS[t.kind]


class MIM(MaskedPrediction):
  name = "mim"
  weight_fields = MaskedPrediction.weight_fields + ("target.tokenizer.path",
                                                    "target.teacher.path")

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio=0.4)
    c.target = ml_collections.ConfigDict(dict(
        kind="norm_pixels", loss="", smooth_l1_beta=1.0, hog=maskfeat.hog_defaults(),
        tokenizer=ml_collections.ConfigDict(dict(path="", vocab_size=8192)),
        teacher=maskdistill.teacher_fields()))

  @classmethod
  def validate(cls, config):
    super().validate(config)
    t = config.target
    v.require(t.kind in patch_targets.KINDS, "target.kind", t.kind,
              f"one of {patch_targets.KINDS}")
    v.require(t.loss in ("",) + losses.LOSSES, "target.loss", t.loss,
              f"'' (the kind's own loss) or one of {losses.LOSSES}")
    discrete = t.kind == "tokens"
    v.require((_loss_name(t) == "cross_entropy") == discrete, "target.loss", t.loss,
              "'' or 'cross_entropy' for target.kind='tokens' (codes)" if discrete else
              f"'' or a regression loss for target.kind={t.kind!r} (cross_entropy needs codes)")
    v.require(v.is_number(t.smooth_l1_beta) and t.smooth_l1_beta >= 0, "target.smooth_l1_beta",
              t.smooth_l1_beta, "a number >= 0 (0: L1)")
    _, patch = size_from_config(config.model)
    if t.kind == "hog":
      maskfeat.validate_hog(config, t.hog, "target.hog")
    elif t.kind == "tokens":
      v.require(v.is_int(t.tokenizer.vocab_size) and t.tokenizer.vocab_size >= 2,
                "target.tokenizer.vocab_size", t.tokenizer.vocab_size, "an integer >= 2")
      io.check_matches(t.tokenizer.path, vocab_size=t.tokenizer.vocab_size,
                       image_size=tuple(config.image_size), patch_size=patch,
                       channels=config.channels, mean=config.data.mean, std=config.data.std,
                       variant=config.model.variant, prefix="target.tokenizer")
    elif t.kind == "teacher_features":
      maskdistill.validate_teacher(config, t.teacher, "target.teacher")

  @classmethod
  def mask_kinds(cls, config):
    if config.target.kind == "teacher_features":
      return masking.MASK_KINDS + (masking.ATTENTION_KIND,)
    return masking.MASK_KINDS

  @classmethod
  def unread_rules(cls):
    def of_kind(kind):
      return lambda c: c.target.kind == kind
    return [
        *super().unread_rules(),
        (("target.hog.cell_size", "target.hog.num_bins", "target.hog.gradient",
          "target.hog.gaussian_window", "target.hog.binning"), of_kind("hog"),
         "only target.kind='hog' reads it"),
        (("target.tokenizer.path", "target.tokenizer.vocab_size"), of_kind("tokens"),
         "only target.kind='tokens' reads it"),
        (("target.teacher.path", "target.teacher.block", "target.teacher.norm"),
         of_kind("teacher_features"), "only target.kind='teacher_features' reads it"),
        (("target.smooth_l1_beta",), lambda c: _loss_name(c.target) == "smooth_l1",
         "only the smooth_l1 loss reads it"),
    ]

  @classmethod
  def target_dim(cls, config):
    t = config.target
    _, patch = size_from_config(config.model)
    if t.kind in ("pixels", "norm_pixels"):
      return patch * patch * config.channels
    if t.kind == "hog":
      return hog.hog_feature_dim(patch, config.channels, int(t.hog.cell_size),
                                 int(t.hog.num_bins))
    if t.kind == "tokens":
      return int(t.tokenizer.vocab_size)
    return maskdistill.teacher_width(config, t.teacher, "target.teacher")

  @classmethod
  def target_flops(cls, config):
    t = config.target
    if t.kind == "tokens":
      return encode_flops(io.read_info(str(t.tokenizer.path), "target.tokenizer.path"))
    if t.kind == "teacher_features":
      return maskdistill.build_teacher(config, t.teacher, "target.teacher").forward_flops()
    return 0.0

  def __init__(self, config, length=None):
    t = config.target
    _, patch = size_from_config(config.model)
    if t.kind in ("pixels", "norm_pixels"):
      target = patch_targets.Pixels(patch, config.channels, norm_pix=t.kind == "norm_pixels")
    elif t.kind == "hog":
      target = patch_targets.Hog(patch, config.channels, **maskfeat.hog_kwargs(t.hog))
    elif t.kind == "tokens":
      target = patch_targets.Tokens(t.tokenizer.path)
    else:
      target = maskdistill.teacher_target(config, t.teacher, "target.teacher")
    super().__init__(config, length, target=target,
                     loss_fn=losses.masked_loss(_loss_name(t), float(t.smooth_l1_beta)))
    self.channels = config.channels

  def extra_metrics(self, pred, target, mask):
    if not self.target.discrete:
      return {}
    hit = (jnp.argmax(pred, axis=-1) == target).astype(jnp.float32)
    return {"accuracy": losses.masked_mean(hit, mask, self.axis_name)}

  def reconstruct(self, params, batch, rng, extra):
    if self.target.kind != "tokens":
      return super().reconstruct(params, batch, rng, extra)
    out = self.forward(params, extra, batch, rng, train=False)
    return beit.decoded_codes(self.target, extra, out["pred"], out["target"], out["mask"],
                              self.grid_hw)

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    kind, p = self.target.kind, self.patch_size
    if kind in ("pixels", "norm_pixels"):
      return viz.reconstruction_grid(images, out["pred"], out["mask"], patch_size=p,
                                     norm_pix_loss=kind == "norm_pixels", **self.display)
    if kind == "hog":
      return viz.hog_grid(images, out["pred"], out["target"], out["mask"], patch_size=p,
                          cell_size=self.target.kwargs["cell_size"],
                          num_bins=self.target.kwargs["num_bins"],
                          binning=self.target.kwargs["binning"], **self.display)
    if kind == "tokens":
      return beit.token_picture(images, out, self.grid_hw, p, self.display)
    return maskdistill.similarity_picture(images, out, self.grid_hw, p, self.channels,
                                          self.display)
