"""Random per-sample masking (MAE)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mim_jax.objectives import masking


def _official_masking(noise: np.ndarray, ratio: float):
  """The official MAE `random_masking`, transcribed to numpy."""
  n, length = noise.shape
  keep = int(length * (1 - ratio))
  ids_shuffle = np.argsort(noise, axis=1, kind="stable")
  ids_restore = np.argsort(ids_shuffle, axis=1, kind="stable")
  mask = np.ones([n, length], np.float32)
  mask[:, :keep] = 0
  mask = np.take_along_axis(mask, ids_restore, axis=1)
  return ids_shuffle[:, :keep], ids_restore, mask


@pytest.mark.parametrize("num_patches,ratio", [(49, 0.75), (196, 0.75), (16, 0.5), (49, 0.9)])
def test_identical_noise_gives_the_official_mask(num_patches, ratio):
  noise = np.asarray(jax.random.uniform(jax.random.key(num_patches), (4, num_patches)))
  info = masking.random_masking_from_noise(noise, ratio)
  ids_keep, ids_restore, mask = _official_masking(noise, ratio)
  np.testing.assert_array_equal(info.ids_keep, ids_keep)
  np.testing.assert_array_equal(info.ids_restore, ids_restore)
  np.testing.assert_array_equal(info.mask, mask)


def test_masked_count_is_exact_and_consistent_with_ids_keep():
  info = masking.random_masking(jax.random.key(0), 8, 49, 0.75)
  keep = int(49 * 0.25)
  assert info.ids_keep.shape == (8, keep)
  np.testing.assert_array_equal(np.asarray(info.mask).sum(axis=1), 49 - keep)
  visible = np.take_along_axis(np.asarray(info.mask), np.asarray(info.ids_keep), axis=1)
  assert (visible == 0).all()
  # ids_restore undoes the shuffle: it is a permutation per row.
  assert (np.sort(np.asarray(info.ids_restore), axis=1) == np.arange(49)).all()


def test_masks_differ_across_samples_and_rngs():
  a = np.asarray(masking.random_masking(jax.random.key(0), 4, 49, 0.75).mask)
  b = np.asarray(masking.random_masking(jax.random.key(1), 4, 49, 0.75).mask)
  assert not np.array_equal(a, b)
  assert not np.array_equal(a[0], a[1])
  again = np.asarray(masking.random_masking(jax.random.key(0), 4, 49, 0.75).mask)
  np.testing.assert_array_equal(a, again)
