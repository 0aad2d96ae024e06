"""MaskFeat (Wei et al., 2022): mask tokens, a linear head to HOG features, MSE on masked patches.

Composed from `masked_prediction.MaskedPrediction` with HOG targets computed on device
(`mim_jax.hog`: orientation histograms of `target.hog.cell_size` cells, L2-normalised per cell
and colour channel) and `losses.masked_mse`; masking is BEiT's blockwise masking at 40%
(configs/maskfeat_*.py). Pictures show HOG maps instead of pixels.
"""

from __future__ import annotations

import numpy as np

from mim_jax import hog, losses, viz
from mim_jax.methods.masked_prediction import MaskedPrediction
from mim_jax.models.vit import size_from_config


class MaskFeat(MaskedPrediction):
  name = "maskfeat"

  def __init__(self, config):
    _, patch = size_from_config(config.model)
    h = config.target.hog
    self.hog_kwargs = dict(cell_size=int(h.cell_size), num_bins=int(h.num_bins),
                           gradient=str(h.gradient), gaussian_window=int(h.gaussian_window))
    dim = hog.hog_feature_dim(patch, config.channels, self.hog_kwargs["cell_size"],
                              self.hog_kwargs["num_bins"])
    super().__init__(
        config, target_dim=dim,
        target_fn=lambda images: hog.hog_patch_targets(images, patch, **self.hog_kwargs),
        loss_fn=losses.masked_mse)
    self.channels = config.channels

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    return viz.hog_grid(images, out["pred"], out["target"], out["mask"],
                        patch_size=self.patch_size, cell_size=self.hog_kwargs["cell_size"],
                        num_bins=self.hog_kwargs["num_bins"], mean=self.display[0],
                        std=self.display[1])
