"""SimMIM (Xie et al., 2022): mask tokens, a linear head to pixels, L1 on masked pixels.

Composed from `masked_prediction.MaskedPrediction` with pixel targets (the normalised input,
no per-patch normalisation, as in SimMIM) and `losses.masked_l1`; masking is SimMIM's random
masking of `masking.mask_patch_size` groups (configs/simmim_*.py).

The method's defaults keep the encoder every other method here uses (fixed 2-D sin-cos
positions, no relative position bias, no layer scale, MAE's init), so that results compare
objectives; configs/simmim_vitb.py sets the official ViT instead (a shared relative position
bias, layer scale 0.1, no absolute positions, BEiT's init: `model.weight_init="beit"`). The
pixel head starts from timm's trunc_normal_(0.02) with a zero bias; the release leaves its 1x1
convolution at PyTorch's default (weights and bias U(+-1/sqrt(D)), a std of 0.0208 at D = 768).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mim_jax import viz
from mim_jax.config import validation
from mim_jax.methods.masked_prediction import MaskedPrediction
from mim_jax.models.vit import size_from_config
from mim_jax.objectives import losses, patch_targets


class SimMIM(MaskedPrediction):
  name = "simmim"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.target = ml_collections.ConfigDict(dict(norm_pix=False))  # per-patch standardised pixels

  @classmethod
  def validate(cls, config):
    super().validate(config)
    validation.require(isinstance(config.target.norm_pix, bool), "target.norm_pix",
                       config.target.norm_pix, "true or false")

  @classmethod
  def target_dim(cls, config):
    _, patch = size_from_config(config.model)
    return patch * patch * config.channels

  def __init__(self, config, length=None):
    _, patch = size_from_config(config.model)
    norm_pix = bool(config.target.norm_pix)
    super().__init__(config, length,
                     target=patch_targets.Pixels(patch, config.channels, norm_pix),
                     loss_fn=losses.masked_l1)
    self.norm_pix = norm_pix

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    return viz.reconstruction_grid(images, out["pred"], out["mask"], patch_size=self.patch_size,
                                   **self.display,
                                   norm_pix_loss=self.norm_pix)
