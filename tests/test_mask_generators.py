"""Spatial mask generators (SimMIM, BEiT, data2vec 2.0) and `mask_to_ids`."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config.errors import ConfigError
from mim_jax.objectives import masking

from conftest import tiny_config

# ---------------------------------------------------------------------------------------------
# Independent transcriptions of the references, driven by an explicit np.random.Generator in
# place of Python's `random` / torch, so that the same generator state must give the same mask.


def _beit_reference(gen: np.random.Generator, height: int, width: int, num_masking_patches: int,
                    min_num_patches: int, max_num_patches: int | None, min_aspect: float,
                    max_aspect: float | None) -> np.ndarray:
  """unilm beit/masking_generator.py `MaskingGenerator.__call__`, loop for loop.

  random.uniform(a, b) is a + (b - a) * random(); random.randint(a, b) includes b.
  Returns int [height, width].
  """
  max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
  max_aspect = max_aspect or 1 / min_aspect
  log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

  def uniform(a, b):
    return a + (b - a) * gen.random()

  def _mask(mask, max_mask_patches):
    delta = 0
    for attempt in range(10):
      target_area = uniform(min_num_patches, max_mask_patches)
      aspect_ratio = math.exp(uniform(*log_aspect_ratio))
      h = int(round(math.sqrt(target_area * aspect_ratio)))
      w = int(round(math.sqrt(target_area / aspect_ratio)))
      if w < width and h < height:
        top = int(gen.integers(0, height - h + 1))
        left = int(gen.integers(0, width - w + 1))
        num_masked = mask[top: top + h, left: left + w].sum()
        if 0 < h * w - num_masked <= max_mask_patches:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
      if delta > 0:
        break
    return delta

  mask = np.zeros((height, width), int)
  mask_count = 0
  while mask_count < num_masking_patches:
    max_mask_patches = min(num_masking_patches - mask_count, max_num_patches)
    delta = _mask(mask, max_mask_patches)
    if delta == 0:
      break
    mask_count += delta
  return mask


def _data2vec_reference(gen: np.random.Generator, batch: int, gh: int, gw: int, mask_prob: float,
                        mask_length: int, mask_prob_adjust: float) -> np.ndarray:
  """fairseq `compute_block_mask_2d` (inverse_mask=True, require_same_masks=True, no dropout).

  Per-centre, per-offset loops with clamping as in the reference; a (gh, gw) grid in place of
  its square one. Returns int [B, gh * gw], 1 = masked.
  """
  length = gh * gw
  mask_prob = 1 - mask_prob  # inverse_mask: the blocks are the kept region
  mask = np.zeros((batch, gh, gw))
  num = int(length * ((mask_prob + mask_prob_adjust) / mask_length**2))
  mask_inds = gen.integers(0, length, size=(batch, num))
  offset = mask_length // 2
  for b in range(batch):
    for c in mask_inds[b]:
      r, col = divmod(int(c), gw)
      for i in range(mask_length):
        for j in range(mask_length):
          ri = min(max(r + i - offset, 0), gh - 1)
          cj = min(max(col + j - offset, 0), gw - 1)
          mask[b, ri, cj] = 1
  mask = mask.reshape(batch, -1)
  final_target_len = int(length * mask_prob)
  for b in range(batch):
    m = mask[b]
    n = int(m.sum())
    if n > final_target_len:
      m[gen.choice(np.flatnonzero(m), n - final_target_len, replace=False)] = 0
    elif n < final_target_len:
      m[gen.choice(np.flatnonzero(1 - m), final_target_len - n, replace=False)] = 1
  return (1 - mask).astype(int)


# ---------------------------------------------------------------------------------------------
# SimMIM grouped masking.


@pytest.mark.parametrize("grid_hw,ratio,group", [
    ((14, 14), 0.6, 2), ((12, 12), 0.6, 3), ((14, 14), 0.75, 7), ((8, 12), 0.5, 4),
    ((6, 6), 0.6, 1), ((4, 4), 0.0, 2), ((4, 4), 1.0, 2)])
def test_grouped_mask_counts_and_constant_groups(grid_hw, ratio, group):
  gh, gw = grid_hw
  mask = np.asarray(masking.random_grouped_mask(jax.random.key(3), 16, grid_hw, ratio, group))
  assert mask.shape == (16, gh * gw) and mask.dtype == np.bool_
  cells = (gh // group) * (gw // group)
  expected = int(np.ceil(cells * ratio))  # SimMIM's MaskGenerator.mask_count
  np.testing.assert_array_equal(mask.sum(axis=1), expected * group**2)
  # Every group x group square is all masked or all visible.
  blocks = mask.reshape(16, gh // group, group, gw // group, group)
  assert (blocks.min(axis=(2, 4)) == blocks.max(axis=(2, 4))).all()


def test_grouped_mask_simmim_count_rule_rounds_up():
  # 7 x 7 groups at 0.6: 29.4 -> 30 groups (round would give 29).
  mask = np.asarray(masking.random_grouped_mask(jax.random.key(0), 2, (14, 14), 0.6, 2))
  np.testing.assert_array_equal(mask.sum(axis=1), 30 * 4)


def test_grouped_mask_rejects_indivisible_grid():
  with pytest.raises(ValueError):
    masking.random_grouped_mask(jax.random.key(0), 2, (14, 14), 0.6, 4)
  with pytest.raises(ValueError):
    masking.random_grouped_mask(jax.random.key(0), 2, (12, 14), 0.6, 4)


def test_grouped_mask_determinism_and_jit():
  f = lambda k: masking.random_grouped_mask(k, 8, (14, 14), 0.6, 2)
  a, again = np.asarray(f(jax.random.key(0))), np.asarray(f(jax.random.key(0)))
  b = np.asarray(f(jax.random.key(1)))
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, b)
  assert not np.array_equal(a[0], a[1])
  jitted = jax.jit(masking.random_grouped_mask, static_argnums=(1, 2, 3, 4))
  np.testing.assert_array_equal(jitted(jax.random.key(0), 8, (14, 14), 0.6, 2), a)


def test_grouped_mask_is_uniform_over_groups():
  # Each of the 49 groups is masked with probability 30 / 49 across many samples.
  mask = np.asarray(masking.random_grouped_mask(jax.random.key(5), 2000, (14, 14), 0.6, 2))
  freq = mask.reshape(2000, 7, 2, 7, 2)[:, :, 0, :, 0].mean(axis=0)
  np.testing.assert_allclose(freq, 30 / 49, atol=0.05)


# ---------------------------------------------------------------------------------------------
# BEiT blockwise masking.


@pytest.mark.parametrize("grid_hw,num_masked,min_block,max_block,min_aspect,max_aspect", [
    ((14, 14), 75, 16, None, 0.3, None), ((14, 14), 75, 4, None, 0.3, None),
    ((8, 10), 30, 6, 12, 0.5, 3.0), ((14, 14), 118, 16, None, 0.3, None)])
def test_blockwise_matches_reference_transcription(grid_hw, num_masked, min_block, max_block,
                                                   min_aspect, max_aspect):
  gh, gw = grid_hw
  got = masking.blockwise_mask(np.random.default_rng(7), 12, grid_hw, num_masked, min_block,
                               max_block, min_aspect, max_aspect)
  ref_gen = np.random.default_rng(7)
  want = np.stack([
      _beit_reference(ref_gen, gh, gw, num_masked, min_block, max_block, min_aspect,
                      max_aspect).reshape(-1) for _ in range(12)]).astype(bool)
  np.testing.assert_array_equal(got, want)


def test_blockwise_counts_never_exceed_budget_and_reach_it_on_average():
  # BEiT's setting: 75 of 14 x 14 patches, blocks of at least 16.
  mask = masking.blockwise_mask(np.random.default_rng(0), 400, (14, 14), 75)
  assert mask.shape == (400, 196) and mask.dtype == np.bool_
  counts = mask.sum(axis=1)
  assert counts.max() <= 75
  assert counts.mean() >= 0.97 * 75
  assert (counts == 75).mean() > 0.5


def test_blockwise_exact_count_tops_up_short_rows_as_beit_v2():
  """exact=True: every row has the budget; a row the blocks leave short keeps its blocks and
  gets the rest at random among its unmasked patches (beit2/masking_generator.py)."""
  for row in range(60):
    blocks = masking.blockwise_mask(np.random.default_rng(row), 1, (14, 14), 78)[0]
    exact = masking.blockwise_mask(np.random.default_rng(row), 1, (14, 14), 78, exact=True)[0]
    assert exact.sum() == 78 and np.all(exact[blocks])  # the blocks, plus patches if short
    if blocks.sum() == 78:
      np.testing.assert_array_equal(exact, blocks)
  short = [r for r in range(60)
           if masking.blockwise_mask(np.random.default_rng(r), 1, (14, 14), 78)[0].sum() < 78]
  assert len(short) > 5  # the case the option is for arose
  config = ml_collections.ConfigDict({"kind": "blockwise", "ratio": 0.4, "exact_count": True})
  generator = masking.mask_generator_from_config(config, (14, 14), 16)
  assert set(generator.host(np.random.default_rng(0), 50).sum(axis=1)) == {78}


def test_blockwise_determinism_from_jax_key():
  a = masking.blockwise_mask(jax.random.key(0), 6, (14, 14), 75)
  again = masking.blockwise_mask(jax.random.key(0), 6, (14, 14), 75)
  b = masking.blockwise_mask(jax.random.key(1), 6, (14, 14), 75)
  assert isinstance(a, np.ndarray)
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, b)
  assert not np.array_equal(a[0], a[1])


def test_blockwise_rejects_bad_budget():
  with pytest.raises(ValueError):
    masking.blockwise_mask(np.random.default_rng(0), 1, (4, 4), 17)


# ---------------------------------------------------------------------------------------------
# data2vec 2.0 inverse block masking.


@pytest.mark.parametrize("grid_hw,ratio,block,adjust", [
    ((14, 14), 0.8, 3, 0.07), ((14, 14), 0.75, 2, 0.0), ((8, 12), 0.6, 4, 0.1),
    ((14, 14), 0.9, 5, 0.07)])
def test_inverse_block_matches_reference_transcription(grid_hw, ratio, block, adjust):
  gh, gw = grid_hw
  got = masking.inverse_block_mask(np.random.default_rng(11), 10, grid_hw, ratio, block, adjust)
  want = _data2vec_reference(np.random.default_rng(11), 10, gh, gw, ratio, block, adjust)
  np.testing.assert_array_equal(got, want.astype(bool))


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.8, 0.9])
def test_inverse_block_masked_fraction(ratio):
  mask = masking.inverse_block_mask(jax.random.key(0), 32, (14, 14), ratio)
  assert mask.shape == (32, 196) and mask.dtype == np.bool_
  # require_same_masks: exactly int(N * (1 - ratio)) visible in every row, hence the masked
  # fraction is within 1 / N of the ratio.
  np.testing.assert_array_equal((~mask).sum(axis=1), masking.num_visible(196, ratio))
  assert np.abs(mask.mean(axis=1) - ratio).max() < 1 / 196


def _visible_neighbour_fraction(mask: np.ndarray, gh: int, gw: int) -> float:
  """Fraction of visible patches with a visible 4-neighbour; mask bool [B, gh * gw]."""
  vis = ~mask.reshape(-1, gh, gw)
  pad = np.pad(vis, ((0, 0), (1, 1), (1, 1)))
  nb = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
  return float((nb & vis).sum() / vis.sum())


def test_inverse_block_visible_patches_form_blocks():
  # Visible patches come in blocks, so nearly all have a visible neighbour (~0.95); under
  # uniform MAE masking at the same ratio only about half do (~0.55).
  mask = masking.inverse_block_mask(jax.random.key(1), 200, (14, 14), 0.8)
  assert _visible_neighbour_fraction(mask, 14, 14) > 0.85
  uniform = np.asarray(masking.random_masking(jax.random.key(1), 200, 196, 0.8).mask) > 0
  assert _visible_neighbour_fraction(uniform, 14, 14) < 0.7


def test_inverse_block_determinism_from_jax_key():
  a = masking.inverse_block_mask(jax.random.key(0), 4, (14, 14), 0.8)
  again = masking.inverse_block_mask(jax.random.key(0), 4, (14, 14), 0.8)
  b = masking.inverse_block_mask(jax.random.key(1), 4, (14, 14), 0.8)
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# mask_to_ids.


def _check_round_trip(mask: np.ndarray, info: masking.MaskInfo) -> None:
  b, n = mask.shape
  keep = int((~mask[0]).sum())
  ids_keep, ids_restore = np.asarray(info.ids_keep), np.asarray(info.ids_restore)
  assert ids_keep.shape == (b, keep) and ids_keep.dtype == np.int32
  assert ids_restore.shape == (b, n) and ids_restore.dtype == np.int32
  assert info.mask.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(info.mask), mask.astype(np.float32))
  # ids_keep lists exactly the unmasked positions, in grid order.
  for row in range(b):
    np.testing.assert_array_equal(ids_keep[row], np.flatnonzero(~mask[row]))
  # ids_restore inverts the shuffle: visible tokens followed by the masked ones, put back in place.
  x = np.arange(b * n).reshape(b, n) * 10
  masked_ids = np.stack([np.flatnonzero(mask[row]) for row in range(b)])
  shuffled = np.concatenate([np.take_along_axis(x, ids_keep, axis=1),
                             np.take_along_axis(x, masked_ids, axis=1)], axis=1)
  np.testing.assert_array_equal(np.take_along_axis(shuffled, ids_restore, axis=1), x)


@pytest.mark.parametrize("make", [
    lambda: np.asarray(masking.random_grouped_mask(jax.random.key(0), 6, (14, 14), 0.6, 2)),
    lambda: masking.inverse_block_mask(jax.random.key(0), 6, (14, 14), 0.8),
    lambda: np.asarray(masking.random_masking(jax.random.key(0), 6, 196, 0.75).mask) > 0])
def test_mask_to_ids_round_trip(make):
  mask = make()
  _check_round_trip(mask, masking.mask_to_ids(mask))


def test_mask_to_ids_accepts_jax_arrays_and_jit():
  mask = masking.random_grouped_mask(jax.random.key(2), 4, (8, 8), 0.5, 2)
  info = masking.mask_to_ids(mask)
  _check_round_trip(np.asarray(mask), info)
  jitted = jax.jit(lambda m: masking.mask_to_ids(m, num_keep=32))(mask)
  np.testing.assert_array_equal(jitted.ids_keep, info.ids_keep)
  np.testing.assert_array_equal(jitted.ids_restore, info.ids_restore)
  with pytest.raises(ValueError):
    jax.jit(masking.mask_to_ids)(mask)  # count unknown while tracing


def test_mask_to_ids_rejects_unequal_counts():
  mask = masking.blockwise_mask(np.random.default_rng(0), 64, (14, 14), 75)
  assert len(set(mask.sum(axis=1).tolist())) > 1  # BEiT counts vary from row to row
  with pytest.raises(ValueError):
    masking.mask_to_ids(mask)
  equal = np.zeros((2, 9), bool)
  equal[:, :4] = True
  with pytest.raises(ValueError):
    masking.mask_to_ids(equal, num_keep=4)  # 5 visible per row, not 4


def test_exact_count_is_read_by_blockwise_masks_only():
  config = tiny_config("maskfeat", **{"masking.exact_count": True, "masking.min_block": 2,
                                      "target.hog.cell_size": 2, "target.hog.gaussian_window": 4})
  assert registry.build_method(config).mask_generator.exact_count
  with pytest.raises(ConfigError, match=r"masking.exact_count=True is not used: only "
                     "masking.kind='blockwise' reads it"):
    registry.check_unread_fields(tiny_config("mae", **{"masking.exact_count": True}))
