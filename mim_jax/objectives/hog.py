"""Histogram-of-Oriented-Gradients features on device, as MaskFeat regression targets.

MaskFeat (Wei et al., 2022, https://arxiv.org/abs/2112.09133) predicts the HOG descriptor of
each masked patch, computed per colour channel. Everything here except `render_hog` and
`patch_targets_to_cells` is pure `jax.numpy`, so it jits and runs on the accelerator next to the
model (no host callbacks, no scatter).

Conventions (the same for both gradient kinds):

* Images are [B, H, W, C]; "row" is the H axis (pointing down), "col" the W axis (pointing right).
* `g_row`, `g_col` are genuine derivatives: positive where the intensity grows with the row /
  column index.
* The unsigned orientation of a pixel is `o = rad2deg(arctan2(g_row, g_col)) % 180` degrees,
  i.e. the gradient angle measured from the +col axis towards the +row axis, folded to [0, 180).
  A vertical edge (intensity changing along columns) has o = 0; a horizontal edge o = 90.
* Hard assignment (no interpolation between bins or cells), by one of two rules
  (`BINNINGS`), `w = 180 / num_bins`:
  "skimage": bin `i` holds `i * w <= o < (i + 1) * w` (scikit-image's rule);
  "maskfeat": bin `i` holds `i * w <= (90 - o) mod 180 < (i + 1) * w`, the official MaskFeat
  rule (`floor(atan2(gx, gy) / pi * num_bins) mod num_bins` with its (gx, gy) =
  (-g_col, -g_row)): the same bins mirrored and shifted by w / 2 (10 degrees for 9 bins).
* Cell histograms hold the sum of the magnitudes of their pixels per bin divided by the cell
  area, then are L2-normalised per (cell, channel): with "skimage" as scikit-image's
  `block_norm='L2'` with `cells_per_block=(1, 1)`, `v / sqrt(sum(v**2) + eps**2)`; with
  "maskfeat" as the official `F.normalize`, `u / max(|u|, 1e-12)` of its histogram u (which
  differs from ours by a global scale, see below), so faint cells match it too.

With `gradient="central"` the cells match `skimage.feature.hog(..., orientations=num_bins,
pixels_per_cell=(cs, cs), cells_per_block=(1, 1), block_norm='L2', feature_vector=False)` on each
channel up to float32 rounding (see tests/test_hog.py for the measured discrepancy).

Differences from the official MaskFeat / mmpretrain `HOGGenerator` with
`gradient="sobel", gaussian_window=16, binning="maskfeat"` (the pixel bins are the same, tested
against a transcription of its phase rule), worth knowing when comparing numbers:

* Its Gaussian kernel is divided by its sum and it does not divide by the cell area; both are
  global scales that the per-cell L2 normalisation removes ("maskfeat" scales its 1e-12 floor
  by the same factor, so the cells are equal down to flat ones).
* Its per-patch feature order is (channel, bin, cell row, cell col); ours is (cell, channel,
  bin). A permutation of the target does not matter for a linear prediction head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

GRADIENT_KINDS = ("central", "sobel")
BINNINGS = ("skimage", "maskfeat")


def _as_float(images: jax.Array) -> jax.Array:
  """At least float32: integer images would wrap around in the differences."""
  images = jnp.asarray(images)
  return images.astype(jnp.promote_types(images.dtype, jnp.float32))


def _check_images(images: jax.Array) -> None:
  if images.ndim != 4:
    raise ValueError(f"HOG expects images [B, H, W, C]; got shape {tuple(images.shape)}")


def image_gradients(images: jax.Array, kind: str = "central") -> tuple[jax.Array, jax.Array]:
  """Per-channel image gradients along rows and columns.

  Args:
    images: [B, H, W, C] (integer inputs are promoted to float32).
    kind: "central" -- scikit-image's `_hog_channel_gradient` exactly:
        `g_row[:, i] = x[:, i + 1] - x[:, i - 1]` (no division by 2), zero on the first and last
        row; likewise `g_col` on the first and last column.
      "sobel" -- the official MaskFeat HOG gradients: 3x3 Sobel filters per channel after
        reflect padding by 1 (torch/numpy 'reflect' = scipy.ndimage 'mirror': the edge pixel is
        not repeated). As correlation kernels (row index first):
        g_row: [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],  g_col: [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]].
        The official code correlates with the negated kernels ([[1, 0, -1], ...] and its
        transpose), i.e. its (gx, gy) = (-g_col, -g_row); the sign flip is irrelevant to the
        magnitude and to the unsigned orientation.

  Returns:
    (g_row, g_col), each [B, H, W, C] in the (promoted) input dtype.
  """
  _check_images(images)
  x = _as_float(images)
  if kind == "central":
    # Written as slices + zero padding (not a conv) so XLA fuses it into the histogram.
    zero_rows = ((0, 0), (1, 1), (0, 0), (0, 0))
    zero_cols = ((0, 0), (0, 0), (1, 1), (0, 0))
    g_row = jnp.pad(x[:, 2:] - x[:, :-2], zero_rows)
    g_col = jnp.pad(x[:, :, 2:] - x[:, :, :-2], zero_cols)
    return g_row, g_col
  if kind == "sobel":
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    # Sobel is separable: [1, 2, 1] smoothing across the derivative axis, then a central
    # difference along it. Integer-valued inputs stay exact (same sums as the 3x3 kernel).
    smooth_cols = xp[:, :, :-2] + 2.0 * xp[:, :, 1:-1] + xp[:, :, 2:]  # [B, H+2, W, C]
    smooth_rows = xp[:, :-2] + 2.0 * xp[:, 1:-1] + xp[:, 2:]  # [B, H, W+2, C]
    g_row = smooth_cols[:, 2:] - smooth_cols[:, :-2]
    g_col = smooth_rows[:, :, 2:] - smooth_rows[:, :, :-2]
    return g_row, g_col
  raise ValueError(f"gradient kind must be one of {GRADIENT_KINDS}; got {kind!r}")


def gaussian_window_weights(window: int) -> np.ndarray:
  """[window, window] float32 outer product of the 1-D window exp(-0.5 ((n - (M-1)/2) / std)^2).

  std = window / 2 as in MaskFeat (window 16 = the patch size); peak < 1 for even windows
  because no pixel sits exactly at the centre. Not normalised to sum 1 (a global scale is
  removed by the per-cell L2 normalisation anyway).
  """
  n = np.arange(window, dtype=np.float64)
  w1 = np.exp(-0.5 * ((n - (window - 1) / 2) / (window / 2)) ** 2)
  return np.outer(w1, w1).astype(np.float32)


def orientation_bins(g_row: jax.Array, g_col: jax.Array, num_bins: int,
                     binning: str = "skimage") -> jax.Array:
  """Hard unsigned-orientation bin per pixel: int32, same shape as the gradients.

  "skimage": o = rad2deg(arctan2(g_row, g_col)) % 180 and bin i holds i*w <= o < (i+1)*w,
  w = 180/num_bins. "maskfeat": floor(arctan2(-g_col, -g_row) / pi * num_bins) mod num_bins, the
  official rule in its own terms (see the module docstring). Zero gradients land in some bin
  with zero magnitude, so they vote nothing.
  """
  if binning == "maskfeat":
    phase = jnp.arctan2(-g_col, -g_row) / jnp.pi * num_bins  # in [-num_bins, num_bins]
    return jnp.floor(phase).astype(jnp.int32) % num_bins
  if binning != "skimage":
    raise ValueError(f"HOG binning must be one of {BINNINGS}; got {binning!r}")
  orientation = jnp.rad2deg(jnp.arctan2(g_row, g_col)) % 180.0
  # The clip catches float32 `%` returning exactly 180 for tiny negative angles (and any
  # rounding at the top edge); scikit-image, in float64, puts those angles in the last bin too.
  return jnp.clip(jnp.floor(orientation / (180.0 / num_bins)).astype(jnp.int32), 0,
                  num_bins - 1)


def bin_centres(num_bins: int, binning: str = "skimage") -> np.ndarray:
  """[num_bins] float64: the orientation o (degrees, the convention above) at each bin's
  centre; "maskfeat" bin i is centred on (90 - (i + 0.5) w) mod 180."""
  centres = (np.arange(num_bins) + 0.5) * 180.0 / num_bins
  if binning == "maskfeat":
    return (90.0 - centres) % 180.0
  if binning != "skimage":
    raise ValueError(f"HOG binning must be one of {BINNINGS}; got {binning!r}")
  return centres


def hog_cells(images: jax.Array, *, cell_size: int = 8, num_bins: int = 9,
              gradient: str = "central", gaussian_window: int = 0,
              binning: str = "skimage", eps: float = 1e-5) -> jax.Array:
  """Per-channel, per-cell L2-normalised HOG histograms.

  Args:
    images: [B, H, W, C], any real dtype (computed in float32); H and W multiples of cell_size.
    cell_size: cell side in pixels.
    num_bins: orientation bins over [0, 180) degrees (unsigned gradients).
    gradient: "central" (scikit-image) or "sobel" (official MaskFeat); see `image_gradients`.
    gaussian_window: if > 0, magnitudes are weighted by `gaussian_window_weights(window)` tiled
      over the image before binning (MaskFeat uses 16, the patch size); H and W must then be
      multiples of the window.
    binning: "skimage" or "maskfeat" (official MaskFeat); see `orientation_bins`.
    eps: with binning "skimage" the L2 normalisation is v / sqrt(sum(v**2) + eps**2)
      (scikit-image's 'L2'); "maskfeat" normalises as the official code (see the module doc).

  Returns:
    float32 [B, H // cell_size, W // cell_size, C, num_bins].
  """
  _check_images(images)
  b, h, w, c = images.shape
  if cell_size < 1 or h % cell_size or w % cell_size:
    raise ValueError(f"HOG cell_size={cell_size} must divide the image size; got H={h}, W={w}")
  if gaussian_window < 0:
    raise ValueError(f"gaussian_window must be >= 0; got {gaussian_window}")
  if gaussian_window and (h % gaussian_window or w % gaussian_window):
    raise ValueError(f"HOG gaussian_window={gaussian_window} must divide the image size; got "
                     f"H={h}, W={w}")
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1; got {num_bins}")
  if binning not in BINNINGS:
    raise ValueError(f"HOG binning must be one of {BINNINGS}; got {binning!r}")

  g_row, g_col = image_gradients(images.astype(jnp.float32), gradient)
  magnitude = jnp.hypot(g_row, g_col)
  if gaussian_window:
    reps = (h // gaussian_window, w // gaussian_window)
    weights = np.tile(gaussian_window_weights(gaussian_window), reps)  # [H, W]
    magnitude = magnitude * jnp.asarray(weights)[None, :, :, None]
  bins = orientation_bins(g_row, g_col, num_bins, binning)
  # one_hot * magnitude then a reshape-sum, not a scatter-add (serialised atomics on GPU): an
  # elementwise producer feeding a reduction, which XLA may fuse. Not checked on GPU; the CPU
  # backend (jax 0.10.2) does materialise the [B, H, W, C, bins] votes (9x the image).
  votes = jax.nn.one_hot(bins, num_bins, dtype=jnp.float32) * magnitude[..., None]
  gh, gw = h // cell_size, w // cell_size
  votes = votes.reshape(b, gh, cell_size, gw, cell_size, c, num_bins)
  hist = votes.sum(axis=(2, 4)) / float(cell_size * cell_size)  # [B, gh, gw, C, bins]
  if binning == "maskfeat":
    # The official histogram is ours times area / (window sum): its Gaussian sums to 1 and it
    # does not average over the cell. Its F.normalize floor of 1e-12, in our scale:
    scale = float(cell_size * cell_size)
    if gaussian_window:
      scale /= float(gaussian_window_weights(gaussian_window).astype(np.float64).sum())
    floor = 1e-12 / scale
    return hist / jnp.maximum(jnp.sqrt(jnp.sum(hist * hist, axis=-1, keepdims=True)), floor)
  norm = jnp.sqrt(jnp.sum(hist * hist, axis=-1, keepdims=True) + eps * eps)
  return hist / norm


def _check_patch(patch_size: int, cell_size: int) -> int:
  """Cells per patch side; ValueError when cell_size does not divide patch_size."""
  if cell_size < 1 or patch_size < 1 or patch_size % cell_size:
    raise ValueError(f"HOG cell_size={cell_size} must divide patch_size={patch_size}")
  return patch_size // cell_size


def hog_feature_dim(patch_size: int, channels: int, cell_size: int = 8, num_bins: int = 9) -> int:
  """Length of one patch's HOG target: (patch_size // cell_size)**2 * channels * num_bins."""
  k = _check_patch(patch_size, cell_size)
  return k * k * channels * num_bins


def hog_patch_targets(images: jax.Array, patch_size: int, *, cell_size: int = 8,
                      num_bins: int = 9, gradient: str = "central",
                      gaussian_window: int = 0, binning: str = "skimage") -> jax.Array:
  """HOG regression targets per patch.

  Args:
    images: [B, H, W, C]; H and W multiples of patch_size.
    patch_size: ViT patch side; cell_size must divide it.
    (other arguments as in `hog_cells`)

  Returns:
    float32 [B, N, (patch_size // cell_size)**2 * C * num_bins] with N = (H/p) * (W/p) patches
    in row-major grid order (as `mim_jax.models.vit.patchify`); within a patch the features are
    ordered (cell row, cell col, channel, bin).
  """
  _check_images(images)
  k = _check_patch(patch_size, cell_size)
  b, h, w, c = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"patch_size={patch_size} must divide the image size; got H={h}, W={w}")
  cells = hog_cells(images, cell_size=cell_size, num_bins=num_bins, gradient=gradient,
                    gaussian_window=gaussian_window, binning=binning)
  gh, gw = h // patch_size, w // patch_size
  x = cells.reshape(b, gh, k, gw, k, c, num_bins)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5, 6))  # [B, gh, gw, k, k, C, bins]
  return x.reshape(b, gh * gw, k * k * c * num_bins)


def patch_targets_to_cells(targets, grid_hw: tuple[int, int], patch_size: int, cell_size: int,
                           channels: int, num_bins: int):
  """Inverse of the `hog_patch_targets` layout: [B, N, F] -> [B, gh*k, gw*k, C, num_bins].

  k = patch_size // cell_size and (gh, gw) = grid_hw is the patch grid. Works on NumPy and JAX
  arrays alike (returns the same kind), e.g. to render predicted targets with `render_hog`.
  """
  k = _check_patch(patch_size, cell_size)
  gh, gw = grid_hw
  b, n, f = targets.shape
  if n != gh * gw or f != k * k * channels * num_bins:
    raise ValueError(f"targets of shape {tuple(targets.shape)} do not match grid {grid_hw}, "
                     f"{k}x{k} cells per patch, {channels} channels and {num_bins} bins "
                     f"(expected [B, {gh * gw}, {k * k * channels * num_bins}])")
  x = targets.reshape(b, gh, gw, k, k, channels, num_bins)
  x = x.transpose(0, 1, 3, 2, 4, 5, 6)  # [B, gh, k, gw, k, C, bins]
  return x.reshape(b, gh * k, gw * k, channels, num_bins)


def hog_glyphs(num_bins: int, pixels_per_cell: int, binning: str = "skimage") -> np.ndarray:
  """[num_bins, ppc, ppc] float32 anti-aliased line per bin, through the cell centre.

  Bin i's line is perpendicular to the gradient at the bin's centre angle theta_i
  (`bin_centres`; gradient direction (row, col) = (sin, cos) theta), so it follows the edge:
  direction (row, col) = (cos theta, -sin theta). For 9 "skimage" bins, bin 0 (theta = 10 deg,
  a left-to-right intensity change) is a near-vertical line leaning like '/', and bin 4
  (theta = 90 deg, a top-to-bottom change) a horizontal line. Half-length ppc / 2 - 1, as
  scikit-image's visualisation.
  """
  ppc = pixels_per_cell
  offsets = np.arange(ppc, dtype=np.float64) + 0.5 - ppc / 2  # pixel centres from the centre
  rr, cc = np.meshgrid(offsets, offsets, indexing="ij")
  theta = np.deg2rad(bin_centres(num_bins, binning))
  d_row, d_col = np.cos(theta)[:, None, None], -np.sin(theta)[:, None, None]
  along = rr * d_row + cc * d_col  # position along the line
  across = np.abs(rr * d_col - cc * d_row)  # distance from the line
  half_length = max(ppc / 2 - 1, 0.5)
  # Linear falloff over one pixel on each side: a 1-px line without aliasing stairs.
  glyphs = np.clip(1 - across, 0, 1) * np.clip(half_length + 0.5 - np.abs(along), 0, 1)
  return glyphs.astype(np.float32)


def render_hog(cells, pixels_per_cell: int = 16, binning: str = "skimage") -> np.ndarray:
  """Host-side picture of HOG cells, like skimage's `hog(..., visualize=True)`.

  Args:
    cells: [..., gh, gw, num_bins] non-negative histograms (one channel, or the mean over
      channels); NumPy or JAX.
    pixels_per_cell: side of each cell's square in the picture.
    binning: the rule the histograms were binned by (`orientation_bins`).

  Returns:
    float32 [..., gh * ppc, gw * ppc] in [0, 1]: per cell, the sum over bins of the bin value
    times its glyph (`hog_glyphs`), divided by the global maximum over the whole input (an
    all-zero input stays 0). Negative values (possible in predicted targets) are clipped to 0.
  """
  # Clip before drawing so a negative bin cannot erase an overlapping positive glyph.
  cells = np.maximum(np.asarray(cells, dtype=np.float32), 0.0)
  if cells.ndim < 3:
    raise ValueError(f"render_hog expects [..., gh, gw, num_bins]; got shape {cells.shape}")
  *lead, gh, gw, num_bins = cells.shape
  glyphs = hog_glyphs(num_bins, pixels_per_cell, binning)
  picture = np.einsum("...hwn,npq->...hpwq", cells, glyphs)
  picture = picture.reshape(*lead, gh * pixels_per_cell, gw * pixels_per_cell)
  peak = float(picture.max()) if picture.size else 0.0
  if peak > 0:
    picture = picture / peak
  return np.minimum(picture, 1.0).astype(np.float32)
