"""Reconstruction pictures (numpy + PIL only, so they can be drawn on any host)."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image

GAP = 2          # white pixels between panels and rows
MIN_PANEL = 112  # small images (28x28) are upscaled by an integer factor to at least this


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
  """[B, H, W, C] -> [B, N, p*p*C], the layout of `mim_jax.models.vit.patchify`."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: np.ndarray, patch_size: int, grid_hw: tuple[int, int],
               channels: int) -> np.ndarray:
  """[B, N, p*p*C] -> [B, H, W, C]."""
  (gh, gw), p = grid_hw, patch_size
  x = patches.reshape(patches.shape[0], gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(patches.shape[0], gh * p, gw * p, channels)


def _to_display(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalised [B, H, W, C] -> RGB floats in [0, 1]."""
  x = images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  x = np.clip(x, 0.0, 1.0)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def reconstruction_grid(images: np.ndarray, pred_patches: np.ndarray, mask: np.ndarray, *,
                        patch_size: int, mean: Sequence[float], std: Sequence[float],
                        norm_pix_loss: bool, max_rows: int = 8) -> np.ndarray:
  """One row per example: original | masked | reconstruction | reconstruction + visible.

  images        [B, H, W, C] normalised inputs
  pred_patches  [B, N, p*p*C] predictions in the model's target space
  mask          [B, N] 1 = masked
  Returns uint8 [rows * (H' + gap), 4 * (W' + gap), 3] where H', W' are upscaled sizes.
  """
  images = np.asarray(images, np.float32)[:max_rows]
  pred = np.asarray(pred_patches, np.float32)[:max_rows]
  mask = np.asarray(mask, np.float32)[:max_rows]
  b, h, w, c = images.shape
  p = patch_size
  grid_hw = (h // p, w // p)
  target = patchify(images, p)
  if norm_pix_loss:
    # Predictions are per-patch standardised: put each patch's own mean and std back.
    mean_p = target.mean(-1, keepdims=True)
    var_p = target.var(-1, ddof=1, keepdims=True)
    pred = pred * np.sqrt(var_p + 1e-6) + mean_p
  m = mask[:, :, None]
  recon = unpatchify(pred, p, grid_hw, c)
  pasted = unpatchify(pred * m + target * (1 - m), p, grid_hw, c)
  original = _to_display(images, mean, std)
  masked = _to_display(unpatchify(target, p, grid_hw, c), mean, std)
  masked = np.where(unpatchify(np.broadcast_to(m, target.shape), p, grid_hw, c)[..., :1] > 0,
                    0.5, masked)
  panels = [original, masked, _to_display(recon, mean, std), _to_display(pasted, mean, std)]

  scale = max(1, -(-MIN_PANEL // max(h, w)))
  ph, pw = h * scale, w * scale
  out = np.ones((b * (ph + GAP) - GAP, 4 * (pw + GAP) - GAP, 3), np.float32)
  for row in range(b):
    for col, panel in enumerate(panels):
      big = panel[row].repeat(scale, axis=0).repeat(scale, axis=1)
      y, x = row * (ph + GAP), col * (pw + GAP)
      out[y:y + ph, x:x + pw] = big
  return (out * 255 + 0.5).astype(np.uint8)


def save_png(array: np.ndarray, path: str) -> None:
  """Writes uint8 [H, W, 3] atomically (temporary file + rename), creating folders."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".png", dir=directory)
  os.close(fd)
  try:
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
