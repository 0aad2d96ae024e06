"""Tests for mim_jax.viz: patch layout, reconstruction grids and PNG writing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mim_jax import viz


@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_round_trip_non_square(channels):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 12, 20, channels)).astype(np.float32)
  patches = viz.patchify(images, 4)
  assert patches.shape == (2, 3 * 5, 4 * 4 * channels)
  np.testing.assert_array_equal(viz.unpatchify(patches, 4, (3, 5), channels), images)


def test_patchify_layout():
  # Patch n = (row r, col c) of the grid is row-major; inside it (y, x, channel) order.
  images = np.arange(1 * 4 * 6 * 2, dtype=np.float32).reshape(1, 4, 6, 2)
  patches = viz.patchify(images, 2)
  r, c = 1, 2
  expected = images[0, 2 * r:2 * r + 2, 2 * c:2 * c + 2, :].reshape(-1)
  np.testing.assert_array_equal(patches[0, r * 3 + c], expected)


def test_patchify_rejects_indivisible_size():
  with pytest.raises(ValueError, match="multiple of patch_size"):
    viz.patchify(np.zeros((1, 10, 8, 1)), 4)


def _panels(grid, rows, h, w):
  """Splits a grid into [rows][4] panels of size [h, w, 3] (h, w already upscaled)."""
  return [[grid[r * (h + viz.GAP):r * (h + viz.GAP) + h,
                c * (w + viz.GAP):c * (w + viz.GAP) + w] for c in range(4)]
          for r in range(rows)]


def _display_uint8(images, mean, std, scale):
  """Independent un-normalisation of [B, H, W, C] to upscaled RGB uint8."""
  x = np.clip(images * np.asarray(std) + np.asarray(mean), 0, 1)
  if x.shape[-1] == 1:
    x = np.concatenate([x] * 3, axis=-1)
  x = np.kron(x, np.ones((1, scale, scale, 1)))
  return np.round(x * 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_shape_masked_grey_and_visible_pasted(channels):
  rng = np.random.default_rng(1)
  b, h, w, p = 3, 28, 28, 7
  mean, std = [0.3] * channels, [0.2] * channels
  images = rng.normal(size=(b, h, w, channels)).astype(np.float32)
  n = (h // p) * (w // p)
  pred = rng.normal(size=(b, n, p * p * channels)).astype(np.float32)  # unrelated to images
  mask = (rng.random((b, n)) < 0.75).astype(np.int32)
  mask[:, 0], mask[:, 1] = 1, 0  # at least one masked and one visible patch per row

  grid = viz.reconstruction_grid(images, pred, mask, patch_size=p, mean=mean, std=std,
                                 norm_pix_loss=False, max_rows=2)
  s = viz.upscale_factor(h, w)
  assert s * h >= viz.MIN_PANEL and s == 4
  rows = 2  # max_rows cuts the batch of 3
  assert grid.dtype == np.uint8
  assert grid.shape == (rows * s * h + (rows - 1) * viz.GAP, 4 * s * w + 3 * viz.GAP, 3)
  # Gaps are white.
  assert (grid[:, s * w:s * w + viz.GAP] == 255).all()
  assert (grid[s * h:s * h + viz.GAP] == 255).all()

  original = _display_uint8(images[:rows], mean, std, s)
  # The prediction as an image, patch k at grid row k // (w / p), column k % (w / p), its
  # values in (y, x, channel) order: written out here, not through viz.unpatchify.
  gw = w // p
  predicted = np.zeros((b, h, w, channels), np.float32)
  for k in range(n):
    y, x = (k // gw) * p, (k % gw) * p
    predicted[:, y:y + p, x:x + p] = pred[:, k].reshape(b, p, p, channels)
  predicted = _display_uint8(predicted[:rows], mean, std, s)
  grey = np.uint8(round(viz.MASK_GREY * 255))
  for r, (orig, masked, recon, pasted) in enumerate(_panels(grid, rows, s * h, s * w)):
    np.testing.assert_array_equal(orig, original[r])
    np.testing.assert_array_equal(recon, predicted[r])
    for k in range(n):
      y, x = (k // gw) * p * s, (k % gw) * p * s
      tile = np.s_[y:y + p * s, x:x + p * s]
      if mask[r, k]:
        assert (masked[tile] == grey).all()
        # The pasted panel shows the prediction there, not the original.
        assert not np.array_equal(pasted[tile], orig[tile])
        np.testing.assert_array_equal(pasted[tile], recon[tile])
      else:
        np.testing.assert_array_equal(masked[tile], orig[tile])
        np.testing.assert_array_equal(pasted[tile], orig[tile])


def test_visible_patches_exact_even_with_nan_predictions():
  images = np.random.default_rng(2).normal(size=(1, 8, 8, 3)).astype(np.float32)
  pred = np.full((1, 4, 48), np.nan, np.float32)
  mask = np.array([[1, 0, 0, 1]])
  grid = viz.reconstruction_grid(images, pred, mask, patch_size=4, mean=[0.5] * 3,
                                 std=[0.25] * 3, norm_pix_loss=True)
  s = viz.upscale_factor(8, 8)
  orig, _, _, pasted = _panels(grid, 1, 8 * s, 8 * s)[0]
  visible = np.s_[0:4 * s, 4 * s:8 * s]  # patch 1: top right
  np.testing.assert_array_equal(pasted[visible], orig[visible])


def _norm_pix_target(images, p):
  """The MAE norm_pix target [B, N, p*p*C], computed here without viz.patchify."""
  b, h, w, _ = images.shape
  target = np.stack([images[:, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(b, -1)
                     for i in range(h // p) for j in range(w // p)], axis=1).astype(np.float64)
  mu = target.mean(-1, keepdims=True)
  var = target.var(-1, keepdims=True, ddof=1)
  return target, (target - mu) / np.sqrt(var + 1e-6)


def test_denormalize_patches_inverts_norm_pix_target():
  # 2x2 grayscale patches: only 4 values each, so ddof=0 vs 1 changes the scale by 15%.
  images = np.random.default_rng(5).normal(size=(2, 6, 4, 1))
  target, normed = _norm_pix_target(images, 2)
  np.testing.assert_allclose(viz.denormalize_patches(normed, target), target, atol=1e-9)


@pytest.mark.parametrize("channels,patch", [(3, 8), (1, 2)])
def test_norm_pix_denormalisation_recovers_original(channels, patch):
  rng = np.random.default_rng(3)
  b, h, w, c, p = 2, 16, 24, channels, patch
  mean, std = [0.485, 0.456, 0.406][:c], [0.229, 0.224, 0.225][:c]
  pixels = rng.random((b, h, w, c))
  images = ((pixels - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
  _, normed = _norm_pix_target(images, p)
  pred = normed.astype(np.float32)
  mask = np.ones((b, (h // p) * (w // p)), np.int32)

  grid = viz.reconstruction_grid(images, pred, mask, patch_size=p, mean=mean, std=std,
                                 norm_pix_loss=True)
  s = viz.upscale_factor(h, w)
  expected = _display_uint8(images, mean, std, s)
  for r, (orig, _, recon, pasted) in enumerate(_panels(grid, b, s * h, s * w)):
    np.testing.assert_array_equal(orig, expected[r])
    assert np.abs(recon.astype(int) - orig.astype(int)).max() <= 1
    assert np.abs(pasted.astype(int) - orig.astype(int)).max() <= 1

  # Without de-normalisation the same predictions would be far off: the property is real.
  wrong = viz.reconstruction_grid(images, pred, mask, patch_size=p, mean=mean, std=std,
                                  norm_pix_loss=False)
  assert np.abs(_panels(wrong, b, s * h, s * w)[0][2].astype(int)
                - expected[0].astype(int)).max() > 10


def test_save_png_atomic_creates_folders(tmp_path):
  image = np.random.default_rng(4).integers(0, 256, (10, 14, 3), dtype=np.uint8)
  path = tmp_path / "a" / "b" / "grid.png"
  viz.save_png(image, str(path))
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
  assert [f.name for f in path.parent.iterdir()] == ["grid.png"]  # no temporary left behind
  viz.save_png(image[::-1].copy(), str(path))  # overwrite in place
  np.testing.assert_array_equal(np.asarray(Image.open(path)), image[::-1])
  with pytest.raises(ValueError, match="uint8"):
    viz.save_png(image.astype(np.float32) / 255, str(path))
