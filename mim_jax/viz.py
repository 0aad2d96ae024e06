"""Reconstruction pictures (numpy + PIL only, so they can be drawn on any host).

Shapes:
  images   [B, H, W, C]     normalised with per-channel mean/std
  patches  [B, N, p*p*C]    N = (H/p)*(W/p), row-major over the patch grid, each patch
                            flattened in (row-in-patch, col-in-patch, channel) order; the same
                            layout as `mim_jax.models.vit.patchify`
  mask     [B, N]           1 = masked (hidden from the encoder), 0 = visible
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
from PIL import Image

from mim_jax import storage

GAP = 2          # white pixels between panels and between rows
MIN_PANEL = 112  # small images (28x28) are upscaled by an integer factor to at least this
MASK_GREY = 0.5  # display value of masked patches in the "masked" panel
NORM_PIX_EPS = 1e-6  # the eps of the norm_pix target (MAE: (x - mean) / sqrt(var + 1e-6))


def patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]; H and W must be multiples of p."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: np.ndarray, patch_size: int, grid_hw: tuple[int, int],
               channels: int) -> np.ndarray:
  """[B, gh*gw, p*p*C] -> [B, gh*p, gw*p, C], the inverse of `patchify`."""
  (gh, gw), p = grid_hw, patch_size
  b = patches.shape[0]
  x = patches.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


def denormalize_patches(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Undoes the per-patch standardisation of a norm_pix target.

  pred, target  [B, N, p*p*C]; `target` holds the (mean/std-normalised) image patches.
  Returns pred * sqrt(var + eps) + mean with each patch's own statistics (var with ddof=1,
  as in the MAE loss), i.e. predictions back in normalised-image space.
  """
  mean_p = target.mean(-1, keepdims=True)
  var_p = target.var(-1, ddof=1, keepdims=True)
  return pred * np.sqrt(var_p + NORM_PIX_EPS) + mean_p


def shown_channels(num_channels: int, channels: Sequence[int] = ()) -> list[int]:
  """The channels a picture shows: `channels` (one: grayscale, three: RGB) or, by default,
  the image's own 1 or 3, the first three of more, the first of two."""
  if channels:
    return list(channels)
  if num_channels in (1, 3):
    return list(range(num_channels))
  return [0, 1, 2] if num_channels > 3 else [0]


def _to_display(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                channels: Sequence[int] = ()) -> np.ndarray:
  """Normalised [B, H, W, C] -> RGB floats [B, H, W, 3] in [0, 1] (`shown_channels`)."""
  x = images * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  x = x[..., shown_channels(x.shape[-1], channels)]
  # A diverged model can predict NaN/inf; draw those as black rather than garbage bytes.
  x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
  return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def upscale_factor(h: int, w: int) -> int:
  """The integer factor that makes an h x w panel at least MIN_PANEL on its longer side."""
  return max(1, -(-MIN_PANEL // max(h, w)))


def reconstruction_grid(images: np.ndarray, pred_patches: np.ndarray, mask: np.ndarray, *,
                        patch_size: int, mean: Sequence[float], std: Sequence[float],
                        norm_pix_loss: bool, max_rows: int = 8,
                        channels: Sequence[int] = ()) -> np.ndarray:
  """One row per example: original | masked | reconstruction | reconstruction + visible.

  images        [B, H, W, C] normalised inputs
  pred_patches  [B, N, p*p*C] predictions in the model's target space (per-patch standardised
                pixels when `norm_pix_loss`, else normalised pixels)
  mask          [B, N] 1 = masked, 0 = visible
  Returns uint8 [R*H' + (R-1)*GAP, 4*W' + 3*GAP, 3] with R = min(B, max_rows) rows and
  H' = s*H, W' = s*W for the integer upscale factor s = `upscale_factor(H, W)`.
  """
  images = np.asarray(images, np.float32)[:max_rows]
  pred = np.asarray(pred_patches, np.float32)[:max_rows]
  masked_p = np.asarray(mask)[:max_rows].astype(bool)[:, :, None]  # [B, N, 1]
  b, h, w, c = images.shape
  p = patch_size
  grid_hw = (h // p, w // p)
  target = patchify(images, p)
  if pred.shape != target.shape or masked_p.shape[:2] != target.shape[:2]:
    raise ValueError(f"pred {pred.shape} / mask {masked_p.shape[:2]} do not match the "
                     f"{target.shape} patches of images {images.shape} (patch_size {p})")
  if norm_pix_loss:
    pred = denormalize_patches(pred, target)
  # np.where, not pred*m + target*(1-m): visible patches must be the original bit for bit even
  # when a prediction is NaN/inf.
  pasted = np.where(masked_p, pred, target)
  pixel_masked = unpatchify(np.broadcast_to(masked_p, target.shape), p, grid_hw, c)[..., :1]

  original = _to_display(images, mean, std, channels)
  masked = np.where(pixel_masked, np.float32(MASK_GREY), original)
  recon = _to_display(unpatchify(pred, p, grid_hw, c), mean, std, channels)
  recon_pasted = _to_display(unpatchify(pasted, p, grid_hw, c), mean, std, channels)
  panels = [original, masked, recon, recon_pasted]

  s = upscale_factor(h, w)
  return _tile([p.repeat(s, axis=1).repeat(s, axis=2) for p in panels])


def _tile(panels: Sequence[np.ndarray]) -> np.ndarray:
  """Panels [B, H', W', 3] in [0, 1] -> uint8 picture, one row per example, one column per
  panel, separated by white GAP-pixel lines."""
  b, ph, pw, _ = panels[0].shape
  out = np.ones((b * (ph + GAP) - GAP, len(panels) * (pw + GAP) - GAP, 3), np.float32)
  for row in range(b):
    for col, panel in enumerate(panels):
      y, x = row * (ph + GAP), col * (pw + GAP)
      out[y:y + ph, x:x + pw] = panel[row]
  return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str) -> None:
  """Writes uint8 [H, W, 3] (or [H, W]) atomically, creating parent folders.

  The PNG is written whole (storage.write_bytes: a temporary file renamed over `path`, or one
  gs:// object), so a reader (TensorBoard, a browser refreshing the folder) never sees a
  half-written picture.
  """
  array = np.asarray(array)
  if array.dtype != np.uint8:
    # Casting floats in [0, 1] would silently give a black picture.
    raise ValueError(f"save_png expects uint8, got {array.dtype}")
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())


def hog_grid(images: np.ndarray, pred: np.ndarray, target: np.ndarray, mask: np.ndarray, *,
             patch_size: int, cell_size: int, num_bins: int, mean: Sequence[float],
             std: Sequence[float], max_rows: int = 8,
             channels: Sequence[int] = (), binning: str = "skimage") -> np.ndarray:
  """MaskFeat pictures, one row per example: original | masked | HOG target | HOG prediction.

  images        [B, H, W, C] normalised inputs
  pred, target  [B, N, F] HOG features per patch (`hog.hog_patch_targets` layout)
  mask          [B, N] 1 = masked, 0 = visible
  The last panel shows the predictions on masked patches and the target on visible ones (the
  prediction of a visible patch is not trained). HOG maps average the colour channels and draw
  each cell's histogram as oriented strokes (bins read by `binning`, `hog.orientation_bins`),
  both maps on one brightness scale.
  Returns uint8 [R*H' + (R-1)*GAP, 4*W' + 3*GAP, 3] as `reconstruction_grid`.
  """
  from mim_jax.objectives import (
    hog,  # here, so that importing viz needs only numpy and PIL
  )
  images = np.asarray(images, np.float32)[:max_rows]
  pred = np.asarray(pred, np.float32)[:max_rows]
  target = np.asarray(target, np.float32)[:max_rows]
  masked_p = np.asarray(mask)[:max_rows].astype(bool)
  b, h, w, c = images.shape
  grid_hw = (h // patch_size, w // patch_size)
  if pred.shape != target.shape or pred.shape[:2] != masked_p.shape:
    raise ValueError(f"pred {pred.shape}, target {target.shape} and mask {masked_p.shape} "
                     "do not match")
  pasted = np.where(masked_p[:, :, None], pred, target)
  s = upscale_factor(h, w)
  cells = hog.patch_targets_to_cells(np.concatenate([target, pasted]), grid_hw, patch_size,
                                     cell_size, c, num_bins)  # [2B, gh', gw', C, bins]
  maps = hog.render_hog(np.asarray(cells).mean(axis=-2), pixels_per_cell=cell_size * s,
                        binning=binning)
  maps = np.repeat(maps[..., None], 3, axis=-1)  # [2B, H', W', 3]

  original = _to_display(images, mean, std, channels)
  pixel_masked = unpatchify(np.broadcast_to(masked_p[:, :, None], (b, *masked_p.shape[1:],
                                                                     patch_size**2 * c)),
                            patch_size, grid_hw, c)[..., :1]
  masked = np.where(pixel_masked, np.float32(MASK_GREY), original)
  up = lambda x: x.repeat(s, axis=1).repeat(s, axis=2)
  panels = [up(original), up(masked), maps[:b], maps[b:]]
  return _tile(panels)


def image_rows(panels: Sequence[np.ndarray], *, mean: Sequence[float], std: Sequence[float],
               max_rows: int = 8, channels: Sequence[int] = ()) -> np.ndarray:
  """Normalised images side by side, one row per example: panels, each [B, H, W, C] (the
  same shape), become uint8 [R*H' + (R-1)*GAP, n*W' + (n-1)*GAP, 3] as `reconstruction_grid`
  (tokenizer reconstructions, BEiT's decoded predictions)."""
  shown = [_to_display(np.asarray(p, np.float32)[:max_rows], mean, std, channels)
           for p in panels]
  s = upscale_factor(*shown[0].shape[1:3])
  return _tile([p.repeat(s, axis=1).repeat(s, axis=2) for p in shown])


def masked_images(images: np.ndarray, mask: np.ndarray, grid_hw: tuple[int, int], patch: int,
                  mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalised images [B, H, W, C] with their masked patches (mask [B, N], 1 = masked)
  mid-grey once de-normalised: a panel for `image_rows`."""
  (gh, gw), p = grid_hw, patch
  mask = np.asarray(mask).reshape(-1, gh, gw).repeat(p, 1).repeat(p, 2)[..., None] > 0
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return np.where(mask, (MASK_GREY - mean) / std, images)


def patch_map_images(values: np.ndarray, grid_hw: tuple[int, int], patch: int, channels: int,
                     mean: Sequence[float], std: Sequence[float],
                     value_range: tuple[float, float] | None = None) -> np.ndarray:
  """Per-patch values [B, N] shown as grey levels (`value_range` black to white; None: each
  example's min to max), as normalised images [B, H, W, C] for `image_rows` beside the inputs
  (attention maps, a prediction's per-patch similarity to its target)."""
  (gh, gw), p = grid_hw, patch
  v = np.asarray(values, np.float32).reshape(-1, gh, gw)
  if value_range is None:
    lo, hi = v.min(axis=(1, 2), keepdims=True), v.max(axis=(1, 2), keepdims=True)
  else:
    lo, hi = value_range
  v = (v - lo) / np.maximum(hi - lo, 1e-12)
  v = v.repeat(p, 1).repeat(p, 2)[..., None].repeat(channels, -1)
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  return (v - mean) / std
