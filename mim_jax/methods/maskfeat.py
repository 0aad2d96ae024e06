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
from mim_jax.objectives import hog, losses, patch_targets

HOG_GRADIENTS = ("sobel", "central")


def validate_hog(config, h, prefix: str) -> None:
  """The HOG target's fields `h` (at `prefix`, e.g. "target.hog") for `config`'s geometry."""
  image_size = tuple(config.image_size)
  _, patch = size_from_config(config.model)
  v.require(v.is_int(h.cell_size) and h.cell_size > 0, f"{prefix}.cell_size", h.cell_size,
            "a positive integer (MaskFeat: 8)")
  v.require(patch % h.cell_size == 0, f"{prefix}.cell_size", h.cell_size,
            f"a divisor of the patch size {patch} (each patch holds whole HOG cells)")
  v.require(v.is_int(h.num_bins) and h.num_bins > 0, f"{prefix}.num_bins", h.num_bins,
            "a positive integer (MaskFeat: 9)")
  v.require(h.gradient in HOG_GRADIENTS, f"{prefix}.gradient", h.gradient,
            f"one of {HOG_GRADIENTS}")
  v.require(h.binning in hog.BINNINGS, f"{prefix}.binning", h.binning,
            f"one of {hog.BINNINGS} (how orientations fall into bins; MaskFeat: 'maskfeat')")
  window = h.gaussian_window
  v.require(v.is_int(window) and window >= 0, f"{prefix}.gaussian_window", window,
            "an integer >= 0 (0: no Gaussian weighting; MaskFeat: 16)")
  if window:
    v.require(image_size[0] % window == 0 and image_size[1] % window == 0,
              f"{prefix}.gaussian_window", window,
              f"a divisor of both image sides {image_size} (the window is tiled)")


def hog_defaults() -> ml_collections.ConfigDict:
  """MaskFeat's HOG: 9 orientation bins over 8x8 cells, L2-normalised per cell and colour
  channel; gradient "sobel" (official MaskFeat) or "central" (scikit-image); gaussian_window
  > 0 weights magnitudes by a tiled Gaussian window; binning "skimage" (scikit-image's bins,
  the default: every run before the field existed used them) or "maskfeat" (the official bins:
  the same mirrored and shifted by half a bin; configs/maskfeat_vitb.py)."""
  return ml_collections.ConfigDict(dict(cell_size=8, num_bins=9, gradient="sobel",
                                        gaussian_window=16, binning="skimage"))


def hog_kwargs(h) -> dict:
  return dict(cell_size=int(h.cell_size), num_bins=int(h.num_bins), gradient=str(h.gradient),
              gaussian_window=int(h.gaussian_window), binning=str(h.binning))


class MaskFeat(MaskedPrediction):
  name = "maskfeat"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio=0.4)
    c.target = ml_collections.ConfigDict(dict(hog=hog_defaults()))

  @classmethod
  def validate(cls, config):
    super().validate(config)
    validate_hog(config, config.target.hog, "target.hog")

  @classmethod
  def target_dim(cls, config):
    _, patch = size_from_config(config.model)
    h = config.target.hog
    return hog.hog_feature_dim(patch, config.channels, int(h.cell_size), int(h.num_bins))

  def __init__(self, config, length=None):
    _, patch = size_from_config(config.model)
    self.hog_kwargs = hog_kwargs(config.target.hog)
    super().__init__(config, length,
                     target=patch_targets.Hog(patch, config.channels, **self.hog_kwargs),
                     loss_fn=losses.masked_mse)
    self.channels = config.channels

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    return viz.hog_grid(images, out["pred"], out["target"], out["mask"],
                        patch_size=self.patch_size, cell_size=self.hog_kwargs["cell_size"],
                        num_bins=self.hog_kwargs["num_bins"],
                        binning=self.hog_kwargs["binning"], **self.display)
