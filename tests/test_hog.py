"""HOG targets (mim_jax.objectives.hog) against scikit-image on real images, plus layout, errors, rendering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models.vit import patchify
from mim_jax.objectives import hog

from conftest import FMNIST_DIR, requires_fmnist

skimage_data = pytest.importorskip("skimage.data")
skimage_feature = pytest.importorskip("skimage.feature")
ndimage = pytest.importorskip("scipy.ndimage")

# Measured max |ours - skimage| over every cell of camera, astronaut/chelsea/coffee (each RGB
# channel) and 256 Fashion-MNIST images: 2.4e-7 with 8-px cells (36,154 cells), 1.7e-7 with
# 4-px cells (148,280 cells); not a single cell above 1e-5. That is float32 rounding of
# hypot/sums/normalisation only: no bin flips. Flips cannot happen on uint8 images because
# their central differences are integers in [-255, 255], and the closest any such gradient gets
# to a bin edge is 6.4e-4 degrees, far above float32 angle error (~1e-5 degrees);
# test_orientation_bins_exhaustive_on_uint8_gradients checks all 261,121 of them. Hence a
# tolerance of 1e-6 on every cell (a flip would show up as an error of order 0.1-1).
SKIMAGE_ATOL = 1e-6


def _skimage_cells(channel: np.ndarray, cell_size: int) -> np.ndarray:
  """skimage HOG of one [H, W] channel in float64 0..255 -> [gh, gw, 9]."""
  out = skimage_feature.hog(channel.astype(np.float64), orientations=9,
                            pixels_per_cell=(cell_size, cell_size), cells_per_block=(1, 1),
                            block_norm="L2", feature_vector=False)
  return out[:, :, 0, 0, :]  # (blocks_row, blocks_col, 1, 1, bins) with 1x1-cell blocks


def _crop(images: np.ndarray, multiple: int) -> np.ndarray:
  """[..., H, W] -> top-left crop to multiples of `multiple`."""
  h, w = images.shape[-2:]
  return images[..., :h - h % multiple, :w - w % multiple]


def _bundled_channels() -> dict[str, np.ndarray]:
  """Single-channel uint8 images shipped inside the scikit-image wheel (no download)."""
  channels = {"camera": skimage_data.camera()}
  for name in ("astronaut", "chelsea", "coffee"):
    rgb = getattr(skimage_data, name)()
    for c in range(3):
      channels[f"{name}[{c}]"] = rgb[..., c]
  return channels


def _assert_matches_skimage(channels: np.ndarray, cell_size: int) -> None:
  """channels uint8 [B, H, W] (already cropped) vs skimage per image."""
  ref = np.stack([_skimage_cells(ch, cell_size) for ch in channels])
  # Same values, float32 on our side.
  ours = np.asarray(hog.hog_cells(jnp.asarray(channels[..., None], jnp.float32),
                                  cell_size=cell_size, gradient="central"))
  assert ours.dtype == np.float32
  assert ours.shape == ref.shape[:3] + (1, 9)
  assert ref.max() > 0.5  # not a vacuous comparison of empty histograms
  err = np.abs(ours[..., 0, :] - ref).max(axis=-1)
  assert err.max() < SKIMAGE_ATOL, (f"max |diff| {err.max():.3g}; {np.sum(err >= SKIMAGE_ATOL)} "
                                    f"of {err.size} cells off")


@pytest.mark.parametrize("cell_size", [8, 4])
@pytest.mark.parametrize("name", list(_bundled_channels()))
def test_matches_skimage_on_bundled_images(name, cell_size):
  channel = _crop(_bundled_channels()[name], cell_size)
  _assert_matches_skimage(channel[None], cell_size)


@requires_fmnist
@pytest.mark.parametrize("cell_size", [8, 4])
def test_matches_skimage_on_fashion_mnist(cell_size):
  from mim_jax.data.idx import find_fmnist_file, read_idx
  images = read_idx(find_fmnist_file(FMNIST_DIR, "train", "images"))[:128]
  _assert_matches_skimage(_crop(images, cell_size), cell_size)


def test_faint_image_matches_skimage_where_eps_matters():
  """Cell histograms of the order of eps: pins the division by the cell area and the eps.

  Normal images cannot see either (the L2 normalisation cancels any per-cell scale). A
  power-of-two scale keeps the gradients exact, hence the same angles and bins as on uint8.
  """
  faint = _crop(skimage_data.camera()[:128, :128], 8).astype(np.float64) * 2.0**-20
  ref = _skimage_cells(faint, 8)
  ours = np.asarray(hog.hog_cells(jnp.asarray(faint[None, ..., None], jnp.float32)))[0, :, :, 0]
  norms = np.linalg.norm(ref, axis=-1)
  assert norms.min() < 0.9  # eps visibly shrinks some cells: the regime under test
  np.testing.assert_allclose(ours, ref, rtol=0, atol=SKIMAGE_ATOL)


def test_orientation_bins_exhaustive_on_uint8_gradients():
  """Every central difference of a uint8 image, binned in float32 vs skimage's float64 rule."""
  g = np.arange(-255, 256, dtype=np.float64)
  g_row, g_col = np.meshgrid(g, g, indexing="ij")
  o = np.rad2deg(np.arctan2(g_row, g_col)) % 180
  expected = np.floor(o / 20).astype(np.int32)  # bin i holds 20 i <= o < 20 (i + 1)
  got = np.asarray(hog.orientation_bins(jnp.asarray(g_row, jnp.float32),
                                        jnp.asarray(g_col, jnp.float32), 9))
  voting = (g_row != 0) | (g_col != 0)  # zero gradients have zero magnitude
  assert np.array_equal(got[voting], expected[voting])
  # Spot checks of the convention: a vertical edge is bin 0, a horizontal edge bin 4.
  assert got[255, 255 + 5] == 0 and got[255, 255 - 5] == 0
  assert got[255 + 5, 255] == 4 and got[255 - 5, 255] == 4


def test_channels_are_independent():
  """Per-channel HOG (MaskFeat), not skimage's pick-the-strongest-channel multichannel mode."""
  rgb = skimage_data.astronaut()[:64, :96]
  together = np.asarray(hog.hog_cells(jnp.asarray(rgb[None]), cell_size=8))
  for c in range(3):
    alone = np.asarray(hog.hog_cells(jnp.asarray(rgb[None, ..., c:c + 1]), cell_size=8))
    np.testing.assert_array_equal(together[..., c:c + 1, :], alone)


def test_uint8_input_equals_float32_input():
  img = skimage_data.camera()[None, :32, :40, None]
  a = hog.hog_cells(jnp.asarray(img), cell_size=8)
  b = hog.hog_cells(jnp.asarray(img, jnp.float32), cell_size=8)
  assert a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_central_gradients_explicit():
  x = np.random.default_rng(0).normal(size=(2, 7, 9, 3)).astype(np.float32)
  g_row, g_col = (np.asarray(g) for g in hog.image_gradients(jnp.asarray(x), "central"))
  ref_row = np.zeros_like(x)
  ref_row[:, 1:-1] = x[:, 2:] - x[:, :-2]
  ref_col = np.zeros_like(x)
  ref_col[:, :, 1:-1] = x[:, :, 2:] - x[:, :, :-2]
  np.testing.assert_array_equal(g_row, ref_row)
  np.testing.assert_array_equal(g_col, ref_col)


def test_sobel_gradients_match_scipy_mirror():
  x = np.random.default_rng(1).uniform(0, 255, size=(2, 10, 13, 3)).astype(np.float32)
  g_row, g_col = (np.asarray(g) for g in hog.image_gradients(jnp.asarray(x), "sobel"))
  # Genuine derivatives: +1 on the far side of the axis (correlation kernels, row index first).
  k_row = np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float64)
  k_col = k_row.T
  for b in range(2):
    for c in range(3):
      ch = x[b, :, :, c].astype(np.float64)
      np.testing.assert_allclose(g_row[b, :, :, c], ndimage.correlate(ch, k_row, mode="mirror"),
                                 rtol=0, atol=1e-3)
      np.testing.assert_allclose(g_col[b, :, :, c], ndimage.correlate(ch, k_col, mode="mirror"),
                                 rtol=0, atol=1e-3)


def test_sobel_sign_and_official_relation():
  """A left-to-right ramp has g_col > 0, g_row = 0; the official (gx, gy) are (-g_col, -g_row)."""
  ramp = jnp.broadcast_to(jnp.arange(6, dtype=jnp.float32)[None, None, :, None], (1, 5, 6, 1))
  g_row, g_col = hog.image_gradients(ramp, "sobel")
  np.testing.assert_array_equal(np.asarray(g_row), 0)
  # Interior columns: 4 * (x[j+1] - x[j-1]) = 8; the mirrored border columns are 0.
  np.testing.assert_array_equal(np.asarray(g_col)[0, :, 1:-1, 0], 8)
  np.testing.assert_array_equal(np.asarray(g_col)[0, :, [0, -1], 0], 0)

  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  x = np.random.default_rng(2).uniform(0, 1, size=(1, 8, 11, 3)).astype(np.float32)
  weight_x = torch.tensor([[1., 0, -1], [2, 0, -2], [1, 0, -1]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
  weight_y = weight_x.transpose(2, 3)
  xt = f.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (1, 1, 1, 1), mode="reflect")
  gx = f.conv2d(xt, weight_x, groups=3).permute(0, 2, 3, 1).numpy()
  gy = f.conv2d(xt, weight_y, groups=3).permute(0, 2, 3, 1).numpy()
  g_row, g_col = hog.image_gradients(jnp.asarray(x), "sobel")
  np.testing.assert_allclose(np.asarray(g_col), -gx, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g_row), -gy, atol=1e-5)


def test_gaussian_window_weights_on_a_ramp():
  """Constant gradient everywhere inside -> the cell values trace the tiled Gaussian."""
  window, size, slope = 16, 32, 3.0
  ramp = slope * np.arange(size, dtype=np.float32)
  images = jnp.asarray(np.broadcast_to(ramp[None, None, :, None], (1, size, size, 1)))
  # 1-pixel cells keep one magnitude per cell; a huge eps makes the "normalisation"
  # v / sqrt(v^2 + eps^2) = v / eps to 1e-9 relative, so the weights survive it.
  eps = 1e4
  out = np.asarray(hog.hog_cells(images, cell_size=1, gaussian_window=window, eps=eps))
  assert np.all(out[..., 1:] == 0)  # a left-to-right ramp only votes in bin 0
  n = np.arange(window)
  w1 = np.exp(-0.5 * ((n - (window - 1) / 2) / (window / 2)) ** 2)
  expected = 2 * slope * np.tile(np.outer(w1, w1), (size // window, size // window))
  got = out[0, :, :, 0, 0] * eps
  # Columns 0 and size-1 have no central difference (zero gradient).
  np.testing.assert_allclose(got[:, 1:-1], expected[:, 1:-1], rtol=1e-5)
  np.testing.assert_array_equal(got[:, [0, -1]], 0)
  # Not normalised to sum 1: the centre of an even window is exp(-0.5 (0.5 / 8)^2) ~ 0.998.
  np.testing.assert_allclose(hog.gaussian_window_weights(window).max(), w1[7] ** 2, rtol=1e-6)


def test_gaussian_window_must_divide_image():
  with pytest.raises(ValueError, match=r"gaussian_window=16 must divide the image size; got H=24"):
    hog.hog_cells(jnp.zeros((1, 24, 32, 3)), gaussian_window=16)


def _images(b=2, h=32, w=48, c=3, seed=0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 255, size=(b, h, w, c)), jnp.float32)


@pytest.mark.parametrize("patch_size,cell_size", [(16, 8), (16, 4), (8, 8)])
def test_patch_target_layout(patch_size, cell_size):
  images = _images()
  b, h, w, c = images.shape
  cells = np.asarray(hog.hog_cells(images, cell_size=cell_size))
  targets = np.asarray(hog.hog_patch_targets(images, patch_size, cell_size=cell_size))
  gh, gw, k = h // patch_size, w // patch_size, patch_size // cell_size
  dim = hog.hog_feature_dim(patch_size, c, cell_size=cell_size)
  assert dim == k * k * c * 9
  assert targets.shape == (b, gh * gw, dim) and targets.dtype == np.float32
  # Patches in row-major grid order; inside a patch: cell row, cell col, channel, bin.
  for i in range(gh):
    for j in range(gw):
      block = cells[:, i * k:(i + 1) * k, j * k:(j + 1) * k]  # [B, k, k, C, bins]
      np.testing.assert_array_equal(targets[:, i * gw + j], block.reshape(b, -1))
  # Inverse layout for rendering.
  back = hog.patch_targets_to_cells(targets, (gh, gw), patch_size, cell_size, c, 9)
  np.testing.assert_array_equal(back, cells)


def test_patch_order_matches_patchify():
  """The one patch holding an edge is at the same index in the targets and in patchify."""
  img = np.zeros((1, 32, 48, 1), np.float32)
  img[0, 20:24, 36:40, 0] = 255.0  # a square inside patch (row 1, col 2)
  targets = np.asarray(hog.hog_patch_targets(jnp.asarray(img), 16))
  pixels = np.asarray(patchify(jnp.asarray(img), 16))
  assert np.flatnonzero(np.abs(targets).sum(-1)).tolist() == [1 * 3 + 2]
  assert np.flatnonzero(pixels.sum(-1)).tolist() == [1 * 3 + 2]


def test_errors_name_the_sizes():
  with pytest.raises(ValueError, match=r"cell_size=6 must divide patch_size=16"):
    hog.hog_patch_targets(_images(), 16, cell_size=6)
  with pytest.raises(ValueError, match=r"cell_size=6 must divide patch_size=16"):
    hog.hog_feature_dim(16, 3, cell_size=6)
  with pytest.raises(ValueError, match=r"cell_size=8 must divide the image size; got H=20, W=32"):
    hog.hog_cells(jnp.zeros((1, 20, 32, 3)))
  with pytest.raises(ValueError, match=r"patch_size=16 must divide the image size; got H=24"):
    hog.hog_patch_targets(jnp.zeros((1, 24, 32, 3)), 16)
  with pytest.raises(ValueError, match=r"gradient kind must be one of"):
    hog.hog_cells(jnp.zeros((1, 8, 8, 1)), gradient="prewitt")
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    hog.hog_cells(jnp.zeros((8, 8, 1)))
  with pytest.raises(ValueError, match=r"do not match grid"):
    hog.patch_targets_to_cells(np.zeros((1, 6, 100)), (2, 3), 16, 8, 3, 9)


def _principal_axis_deg(picture: np.ndarray) -> float:
  """Angle of the intensity-weighted major axis, from +row (down) towards +col (right)."""
  rr, cc = np.indices(picture.shape)
  wts = picture
  r0, c0 = np.average(rr, weights=wts), np.average(cc, weights=wts)
  var_r = np.average((rr - r0) ** 2, weights=wts)
  var_c = np.average((cc - c0) ** 2, weights=wts)
  cov = np.average((rr - r0) * (cc - c0), weights=wts)
  return float(np.rad2deg(0.5 * np.arctan2(2 * cov, var_r - var_c)))


def test_render_hog_glyph_orientations():
  ppc = 16
  step = np.zeros((1, 32, 32, 1), np.float32)
  vertical_edge = step.copy()
  vertical_edge[..., 16:, :] = 255.0  # intensity grows left to right
  horizontal_edge = step.copy()
  horizontal_edge[:, 16:] = 255.0  # intensity grows top to bottom

  cells = np.asarray(hog.hog_cells(jnp.asarray(vertical_edge), cell_size=8))[0, :, :, 0]
  assert np.all(cells[..., 1:] == 0) and cells[:, 1, 0].min() > 0.99  # bin 0 only
  picture = hog.render_hog(cells, pixels_per_cell=ppc)
  assert picture.shape == (4 * ppc, 4 * ppc) and picture.dtype == np.float32
  assert picture.min() == 0 and picture.max() == pytest.approx(1.0)
  assert np.all(picture[:, :ppc] == 0)  # cells without gradient stay black
  # Bin 0 is centred on a 10-degree gradient (right and slightly down): its edge line is
  # 10 degrees off vertical, running from upper right to lower left ('/').
  angle = _principal_axis_deg(picture[:ppc, ppc:2 * ppc])
  assert angle == pytest.approx(-10.0, abs=1.5)

  cells = np.asarray(hog.hog_cells(jnp.asarray(horizontal_edge), cell_size=8))[0, :, :, 0]
  assert np.all(np.delete(cells, 4, axis=-1) == 0)  # bin 4 (80-100 degrees) only
  glyph = hog.render_hog(cells, pixels_per_cell=ppc)[ppc:2 * ppc, :ppc]
  assert abs(_principal_axis_deg(glyph)) == pytest.approx(90.0, abs=0.5)  # horizontal line
  assert glyph[ppc // 2 - 1:ppc // 2 + 1].sum() == pytest.approx(glyph.sum())  # centre rows only


def test_render_hog_batch_and_zeros():
  cells = np.asarray(hog.hog_cells(_images(b=2, h=16, w=24), cell_size=8)).mean(axis=-2)
  picture = hog.render_hog(cells, pixels_per_cell=8)
  assert picture.shape == (2, 16, 24)
  assert 0 <= picture.min() and picture.max() == pytest.approx(1.0)
  np.testing.assert_array_equal(hog.render_hog(np.zeros((2, 3, 9))), 0)
  glyphs = hog.hog_glyphs(9, 16)
  assert glyphs.shape == (9, 16, 16) and glyphs.max() <= 1 and np.all(glyphs.sum((1, 2)) > 10)


def test_jit_matches_eager():
  images = _images(c=3)
  kwargs = dict(cell_size=8, num_bins=9, gradient="sobel", gaussian_window=16)
  jitted = jax.jit(hog.hog_patch_targets,
                   static_argnames=("patch_size", "cell_size", "num_bins", "gradient",
                                    "gaussian_window"))
  got = jitted(images, patch_size=16, **kwargs)
  want = hog.hog_patch_targets(images, 16, **kwargs)
  assert got.shape == (2, 6, hog.hog_feature_dim(16, 3))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
  # Each (cell, channel) histogram is unit-norm unless the cell is flat.
  norms = np.linalg.norm(np.asarray(got).reshape(2, 6, 4, 3, 9), axis=-1)
  np.testing.assert_allclose(norms, 1.0, atol=1e-5)


def _official_maskfeat_cells(x: np.ndarray, nbins: int, pool: int, window: int) -> np.ndarray:
  """The official MaskFeat HOG (SlowFast / mmpretrain `HOGGenerator`), transcribed in NumPy
  from its formulas: reflect-padded Sobel correlations gx, gy with [[1, 0, -1], [2, 0, -2],
  [1, 0, -1]] and its transpose, magnitude |(gx, gy)| times a tiled Gaussian (normalised to sum
  1), bin floor(atan2(gx, gy) / pi * nbins) mod nbins, sums over pool x pool cells, L2 over the
  bins (F.normalize: v / max(|v|, 1e-12)). x [B, H, W, C] -> [B, H/pool, W/pool, C, nbins]."""
  k_x = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
  n = np.arange(window)
  g1 = np.exp(-0.5 * ((n - (window - 1) / 2) / (window // 2)) ** 2)
  gkern = np.outer(g1, g1) / np.outer(g1, g1).sum()
  b, h, w, c = x.shape
  out = np.zeros((b, h // pool, w // pool, c, nbins), np.float64)
  for i in range(b):
    for ch in range(c):
      img = x[i, :, :, ch]
      gx = ndimage.correlate(img, k_x, mode="mirror").astype(np.float32)
      gy = ndimage.correlate(img, k_x.T, mode="mirror").astype(np.float32)
      norm = np.hypot(gx, gy) * np.tile(gkern, (h // window, w // window))
      bins = np.floor(np.arctan2(gx, gy) / np.float32(np.pi) * nbins).astype(int) % nbins
      for r in range(h):
        for col in range(w):
          out[i, r // pool, col // pool, ch, bins[r, col]] += norm[r, col]
  return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)


def test_maskfeat_binning_equals_the_official_hog():
  """binning="maskfeat" with Sobel gradients and the Gaussian window gives the official
  MaskFeat cells (the global scales, its Gaussian's sum and our cell area, cancel in the L2
  normalisation); "skimage" bins the same pixels mirrored and shifted by half a bin."""
  x = np.random.default_rng(3).uniform(0, 255, size=(2, 16, 16, 3)).astype(np.float32)
  official = _official_maskfeat_cells(x, nbins=9, pool=4, window=8)
  ours = np.asarray(hog.hog_cells(jnp.asarray(x), cell_size=4, num_bins=9, gradient="sobel",
                                  gaussian_window=8, binning="maskfeat"))
  np.testing.assert_allclose(ours, official, rtol=1e-4, atol=1e-6)
  # Faint cells too (|v| far below scikit-image's eps of 1e-5, e.g. near-flat sky in
  # normalised pixels): normalised as the official code does, not damped towards zero.
  # And cells whose official norm is below its F.normalize floor of 1e-12 (x 1e-17): divided
  # by the floor, in our histogram's scale (its Gaussian sums to 1, ours averages over cells).
  for scale in (1e-7, 1e-17):
    faint = np.asarray(hog.hog_cells(jnp.asarray(x * scale), cell_size=4, num_bins=9,
                                     gradient="sobel", gaussian_window=8, binning="maskfeat"))
    official_faint = _official_maskfeat_cells(x * scale, nbins=9, pool=4, window=8)
    np.testing.assert_allclose(faint, official_faint, rtol=1e-4, atol=1e-9)
  assert 1e-5 < np.abs(official_faint).max() < 0.1  # the floor acted: far from unit norm
  skimage_bins = np.asarray(hog.hog_cells(jnp.asarray(x), cell_size=4, num_bins=9,
                                          gradient="sobel", gaussian_window=8))
  assert np.abs(skimage_bins - official).max() > 0.1


def test_bin_centres_follow_the_binning():
  """A left-to-right ramp (o = 0) falls in the bin centred on o = 0 under "maskfeat" (bin 4,
  drawn as a vertical stroke) and on 10 degrees under "skimage" (bin 0)."""
  ramp = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[None, None, :, None], (1, 8, 8, 1))
  g_row, g_col = hog.image_gradients(ramp, "sobel")
  for binning, bin_, centre in (("maskfeat", 4, 0.0), ("skimage", 0, 10.0)):
    bins = np.asarray(hog.orientation_bins(g_row, g_col, 9, binning))[0, :, 1:-1, 0]
    assert np.all(bins == bin_), binning
    assert hog.bin_centres(9, binning)[bin_] == pytest.approx(centre)
  glyph = hog.hog_glyphs(9, 8, "maskfeat")[4]
  assert glyph[:, 3:5].sum() > 0.9 * glyph.sum()  # a vertical line through the centre
  with pytest.raises(ValueError, match="binning must be one of"):
    hog.hog_cells(ramp, cell_size=4, binning="dalal")
