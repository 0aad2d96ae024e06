"""Reconstruction pictures of MAE weights on image files (e.g. an imported official
`mae_pretrain_vit_*_full.pth`): original | masked | reconstruction | reconstruction + visible.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from mim_jax import viz
from mim_jax.convert.our_weights import build_mae, read_weights
from mim_jax.data.transforms import Normalizer, center_crop_box, decode_named, resize_box
from mim_jax.weights import pretrained


def load_images(paths: Sequence[str], image_size: tuple[int, int], channels: int,
                mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Image files -> normalised float32 [B, H, W, C]: shorter side resized, centre crop. 8-bit
  files are read as uint8, 16-bit ones and TIFFs as float in [0, 1] (`decode_image`): each
  normalised on its own scale."""
  normalize = Normalizer(tuple(mean), tuple(std), channels)
  images = []
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    image = decode_named(data, channels, path)
    box = center_crop_box(image.shape[0], image.shape[1], tuple(image_size), crop_fraction=1.0)
    images.append(normalize(resize_box(image, box, tuple(image_size))))
  return np.stack(images)


def draw_reconstructions(source: str, image_paths: Sequence[str], out_png: str, *,
                         mask_ratio: Optional[float] = None, seed: int = 0,
                         norm_pix: Optional[bool] = None) -> np.ndarray:
  """Runs the MAE in `source` on the images and writes the picture grid to `out_png`.

  mask_ratio: the masked fraction (default: the weights' config, 0.75 for imports);
  norm_pix: whether the decoder predicts per-patch normalised pixels (default: the config's
  target.norm_pix; the official `*_full.pth` weights were trained with norm_pix_loss). Such
  predictions are drawn with each patch's own mean and variance taken from the original
  image, as the official demo does for its norm-pix models. Returns the uint8 picture.
  """
  info, params = read_weights(source)
  model, params = build_mae(info, params)
  if mask_ratio is not None:
    model = model.clone(mask_ratio=float(mask_ratio))
  mean, std = pretrained.input_normalisation(info, source)
  images = load_images(image_paths, model.encoder.image_size, model.encoder.channels, mean, std)
  grid_hw = model.encoder.grid_hw
  noise = jax.random.uniform(jax.random.key(seed), (len(images), grid_hw[0] * grid_hw[1]))
  pred, mask_info = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))(
      params, images, noise)
  if norm_pix is None:
    norm_pix = bool(info["config"]["target"]["norm_pix"])
  picture = viz.reconstruction_grid(images, np.asarray(pred), np.asarray(mask_info.mask),
                                    patch_size=model.encoder.patch_size, mean=mean, std=std,
                                    norm_pix_loss=norm_pix, max_rows=len(images))
  viz.save_png(picture, out_png)
  return picture
