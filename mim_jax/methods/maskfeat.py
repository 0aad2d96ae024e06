"""MaskFeat (Wei et al., 2022): mask tokens, a linear head to HOG features, MSE on masked patches.

Composed from `masked_prediction.MaskedPrediction` with HOG targets computed on device
(`objectives.hog`: orientation histograms of `target.hog.cell_size` cells, L2-normalised per
cell and colour channel) and `losses.masked_mse`; masking is BEiT's blockwise masking at 40%
(configs/maskfeat_*.py). Pictures show HOG maps instead of pixels.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mim_jax import viz
from mim_jax.config import validation as v
from mim_jax.methods.masked_prediction import MaskedPrediction
from mim_jax.models.vit import size_from_config
from mim_jax.objectives import hog, losses

HOG_GRADIENTS = ("sobel", "central")


class MaskFeat(MaskedPrediction):
  name = "maskfeat"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio=0.4)
    # Orientation bins over cell_size^2 cells, L2-normalised per cell and colour channel;
    # gradient "sobel" (official MaskFeat) or "central" (scikit-image); gaussian_window > 0
    # weights magnitudes by a tiled Gaussian window.
    c.target = ml_collections.ConfigDict(dict(hog=ml_collections.ConfigDict(dict(
        cell_size=8, num_bins=9, gradient="sobel", gaussian_window=16))))

  @classmethod
  def validate(cls, config):
    super().validate(config)
    h, image_size = config.target.hog, tuple(config.image_size)
    _, patch = size_from_config(config.model)
    v.require(v.is_int(h.cell_size) and h.cell_size > 0, "target.hog.cell_size", h.cell_size,
              "a positive integer (MaskFeat: 8)")
    v.require(patch % h.cell_size == 0, "target.hog.cell_size", h.cell_size,
              f"a divisor of the patch size {patch} (each patch holds whole HOG cells)")
    v.require(v.is_int(h.num_bins) and h.num_bins > 0, "target.hog.num_bins", h.num_bins,
              "a positive integer (MaskFeat: 9)")
    v.require(h.gradient in HOG_GRADIENTS, "target.hog.gradient", h.gradient,
              f"one of {HOG_GRADIENTS}")
    window = h.gaussian_window
    v.require(v.is_int(window) and window >= 0, "target.hog.gaussian_window", window,
              "an integer >= 0 (0: no Gaussian weighting; MaskFeat: 16)")
    if window:
      v.require(image_size[0] % window == 0 and image_size[1] % window == 0,
                "target.hog.gaussian_window", window,
                f"a divisor of both image sides {image_size} (the window is tiled)")

  @classmethod
  def target_dim(cls, config):
    _, patch = size_from_config(config.model)
    h = config.target.hog
    return hog.hog_feature_dim(patch, config.channels, int(h.cell_size), int(h.num_bins))

  def __init__(self, config, length=None):
    _, patch = size_from_config(config.model)
    h = config.target.hog
    self.hog_kwargs = dict(cell_size=int(h.cell_size), num_bins=int(h.num_bins),
                           gradient=str(h.gradient), gaussian_window=int(h.gaussian_window))
    super().__init__(
        config, length,
        target_fn=lambda images: hog.hog_patch_targets(images, patch, **self.hog_kwargs),
        loss_fn=losses.masked_mse)
    self.channels = config.channels

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    return viz.hog_grid(images, out["pred"], out["target"], out["mask"],
                        patch_size=self.patch_size, cell_size=self.hog_kwargs["cell_size"],
                        num_bins=self.hog_kwargs["num_bins"], **self.display)
