"""Mixup / CutMix with label smoothing, checked against a NumPy transcription of timm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.evaluate import mixup

NUM_CLASSES = 10
RECIPE = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1)


# --- timm.data.mixup transcribed to NumPy (NCHW as in timm), with the random draws as inputs.

def _timm_one_hot(x, num_classes, on_value, off_value):
  out = np.full((x.shape[0], num_classes), off_value, np.float32)
  out[np.arange(x.shape[0]), x] = on_value
  return out


def _timm_mixup_target(target, num_classes, lam, smoothing):
  off_value = smoothing / num_classes
  on_value = 1. - smoothing + off_value
  y1 = _timm_one_hot(target, num_classes, on_value, off_value)
  y2 = _timm_one_hot(target[::-1], num_classes, on_value, off_value)
  return y1 * lam + y2 * (1. - lam)


def _timm_rand_bbox(img_shape, lam, cy, cx):
  """`rand_bbox` with margin 0 and the np.random.randint centre passed in."""
  ratio = np.sqrt(1 - lam)
  img_h, img_w = img_shape[-2:]
  cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
  yl = np.clip(cy - cut_h // 2, 0, img_h)
  yh = np.clip(cy + cut_h // 2, 0, img_h)
  xl = np.clip(cx - cut_w // 2, 0, img_w)
  xh = np.clip(cx + cut_w // 2, 0, img_w)
  return yl, yh, xl, xh


def _timm_cutmix_bbox_and_lam(img_shape, lam, cy, cx):
  yl, yu, xl, xu = _timm_rand_bbox(img_shape, lam, cy, cx)
  bbox_area = (yu - yl) * (xu - xl)
  lam = 1. - bbox_area / float(img_shape[-2] * img_shape[-1])
  return (yl, yu, xl, xu), lam


def _timm_mix_batch(x, target, lam, use_cutmix, cy, cx, num_classes, smoothing):
  """`Mixup._mix_batch` then `mixup_target`, on NCHW `x` (modified on a copy)."""
  x = x.copy()
  if lam != 1.:
    if use_cutmix:
      (yl, yh, xl, xh), lam = _timm_cutmix_bbox_and_lam(x.shape, lam, cy, cx)
      x[:, :, yl:yh, xl:xh] = x[::-1][:, :, yl:yh, xl:xh]
    else:
      x_flipped = x[::-1] * np.float32(1. - lam)
      x = x * np.float32(lam) + x_flipped
  return x, _timm_mixup_target(target, num_classes, lam, smoothing)


# --- helpers

def _batch(seed, b=8, h=16, w=12, c=3):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(b, h, w, c)).astype(np.float32)
  labels = rng.permutation(NUM_CLASSES)[:b].astype(np.int32)  # distinct: no i, B-1-i clash
  return images, labels


def _lam_from_targets(targets, labels, smoothing=0.1):
  """Recovers lambda from row 0's weight on its own label (labels distinct from the partner's)."""
  off = smoothing / NUM_CLASSES
  on = 1 - smoothing + off
  return (float(targets[0, labels[0]]) - off) / (on - off)


def _params(mode, lam, cy=0, cx=0):
  return mixup.MixParams(mode=jnp.int32(mode), lam=jnp.float32(lam), cy=jnp.int32(cy),
                         cx=jnp.int32(cx))


# --- tests

def test_smooth_one_hot_values_are_exact():
  y = np.asarray(mixup.smooth_one_hot(jnp.array([2, 0]), 4, 0.1))
  np.testing.assert_allclose(y, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]],
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(mixup.smooth_one_hot(jnp.array([1]), 3, 0.0)),
                                [[0, 1, 0]])


@pytest.mark.parametrize("seed", range(6))
def test_targets_sum_to_one(seed):
  images, labels = _batch(seed)
  _, targets = mixup.mix_batch(jax.random.key(seed), images, labels, num_classes=NUM_CLASSES,
                               **RECIPE)
  np.testing.assert_allclose(np.asarray(targets).sum(axis=1), 1.0, rtol=1e-6)


def test_mixup_blends_with_the_flipped_batch():
  images, labels = _batch(0)
  out, targets = mixup.mix_batch(jax.random.key(1), images, labels, num_classes=NUM_CLASSES,
                                 mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5,
                                 label_smoothing=0.1)
  lam = _lam_from_targets(np.asarray(targets), labels)
  assert 0.0 < lam < 1.0
  np.testing.assert_allclose(np.asarray(out), lam * images + (1 - lam) * images[::-1],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(targets),
                             _timm_mixup_target(labels, NUM_CLASSES, lam, 0.1), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pixels_come_from_x_or_its_flip_in_proportion_lam(seed):
  images, labels = _batch(seed, h=32, w=24)
  out, targets = mixup.mix_batch(jax.random.key(seed), images, labels, num_classes=NUM_CLASSES,
                                 mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                                 label_smoothing=0.1)
  out = np.asarray(out)
  own = (out == images).all(axis=-1)           # [B, H, W]
  partner = (out == images[::-1]).all(axis=-1)
  assert (own ^ partner).all()                 # random data: never both, never neither
  # One box for the whole batch, identical for every row.
  assert (partner == partner[:1]).all()
  lam = _lam_from_targets(np.asarray(targets), labels)
  np.testing.assert_allclose(partner[0].mean(), 1 - lam, atol=1e-6)
  ys, xs = np.nonzero(partner[0])
  if ys.size:  # a rectangle
    assert ys.size == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


@pytest.mark.parametrize("mode", [mixup.MODE_MIXUP, mixup.MODE_CUTMIX])
@pytest.mark.parametrize("lam,cy,cx", [
    (0.3, 5, 7), (0.5, 0, 0), (0.75, 15, 11), (0.9, 8, 3), (0.01, 2, 10), (0.999, 9, 9),
    (0.0, 4, 4), (0.6180339, 13, 1),
])
def test_matches_timm_for_given_lam_and_centre(mode, lam, cy, cx):
  images, labels = _batch(int(lam * 1000) + cy, h=16, w=12)
  out, targets = mixup.apply_mix(jnp.asarray(images), jnp.asarray(labels),
                                 _params(mode, lam, cy, cx), num_classes=NUM_CLASSES,
                                 label_smoothing=0.1)
  nchw = images.transpose(0, 3, 1, 2)
  want_x, want_t = _timm_mix_batch(nchw, labels, np.float32(lam).item(),
                                   mode == mixup.MODE_CUTMIX, cy, cx, NUM_CLASSES, 0.1)
  np.testing.assert_allclose(np.asarray(out), want_x.transpose(0, 2, 3, 1), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(targets), want_t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.5, 0.75, 0.93])
@pytest.mark.parametrize("cy,cx", [(0, 0), (31, 23), (16, 12), (3, 20)])
def test_box_and_corrected_lam_match_timm(lam, cy, cx):
  (yl, yh, xl, xh), got_lam = mixup.cutmix_bbox_and_lam((32, 24), jnp.float32(lam), cy, cx)
  box, want_lam = _timm_cutmix_bbox_and_lam((3, 32, 24), np.float32(lam).item(), cy, cx)
  assert (int(yl), int(yh), int(xl), int(xh)) == tuple(int(v) for v in box)
  np.testing.assert_allclose(float(got_lam), want_lam, rtol=1e-6)


def test_no_mix_mode_is_identity_with_smoothed_targets():
  images, labels = _batch(3)
  out, targets = mixup.apply_mix(jnp.asarray(images), jnp.asarray(labels),
                                 _params(mixup.MODE_NONE, 1.0), num_classes=NUM_CLASSES,
                                 label_smoothing=0.1)
  np.testing.assert_array_equal(np.asarray(out), images)
  np.testing.assert_allclose(np.asarray(targets),
                             mixup.smooth_one_hot(labels, NUM_CLASSES, 0.1), rtol=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(RECIPE, prob=0.0),
    dict(RECIPE, mixup_alpha=0.0, cutmix_alpha=0.0),
])
def test_disabled_is_identity(kwargs):
  images, labels = _batch(4)
  out, targets = mixup.mix_batch(jax.random.key(0), images, labels, num_classes=NUM_CLASSES,
                                 **kwargs)
  np.testing.assert_array_equal(np.asarray(out), images)
  np.testing.assert_allclose(np.asarray(targets),
                             mixup.smooth_one_hot(labels, NUM_CLASSES, 0.1), rtol=1e-6)


def test_jit_and_dtypes():
  images, labels = _batch(5)
  fn = jax.jit(lambda rng, x, y: mixup.mix_batch(rng, x, y, num_classes=NUM_CLASSES, **RECIPE))
  for seed in range(4):
    out, targets = fn(jax.random.key(seed), images, labels)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert targets.shape == (8, NUM_CLASSES) and targets.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(targets).sum(axis=1), 1.0, rtol=1e-6)
  out, _ = fn(jax.random.key(0), images.astype(jnp.bfloat16), labels)
  assert out.dtype == jnp.bfloat16
  out, _ = fn(jax.random.key(0), (images * 50).astype(np.uint8), labels)
  assert out.dtype == jnp.float32


def test_sampling_frequencies_follow_prob_and_switch_prob():
  keys = jax.random.split(jax.random.key(0), 4000)
  sample = jax.vmap(lambda k: mixup.sample_mix_params(
      k, (16, 12), mixup_alpha=0.2, cutmix_alpha=4.0, prob=0.8, switch_prob=0.25))
  params = sample(keys)
  mode, lam = np.asarray(params.mode), np.asarray(params.lam)
  np.testing.assert_allclose((mode == mixup.MODE_NONE).mean(), 0.2, atol=0.025)
  np.testing.assert_allclose((mode == mixup.MODE_CUTMIX).mean(), 0.8 * 0.25, atol=0.025)
  assert (lam[mode == mixup.MODE_NONE] == 1.0).all()
  # Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)): 0.179 and 0.028 for alphas far
  # enough apart that a swap shows (the recipe's 0.8 and 1.0 differ by less than the tolerance).
  for m, alpha in [(mixup.MODE_MIXUP, 0.2), (mixup.MODE_CUTMIX, 4.0)]:
    sel = lam[mode == m]
    np.testing.assert_allclose(sel.mean(), 0.5, atol=0.03)
    np.testing.assert_allclose(sel.var(), 1 / (4 * (2 * alpha + 1)), atol=0.015)
  cy, cx = np.asarray(params.cy), np.asarray(params.cx)
  assert cy.min() == 0 and cy.max() == 15 and cx.min() == 0 and cx.max() == 11


def _fits_beta(draws: np.ndarray, a: float, b: float) -> bool:
  """Whether `draws` pass as Beta(a, b): the float32 roundings at the ends (Beta(0.2, 0.2) puts
  1.9% of its mass within 6e-8 of 1, which rounds to 1.0) checked as masses within 4 standard
  errors, the interior by Kolmogorov-Smirnov (p > 1e-3)."""
  from scipy import stats
  beta, eps = stats.beta(a, b), 1e-6
  low, high = beta.cdf(eps), beta.cdf(1 - eps)
  for share, mass in (((draws <= eps).mean(), low), ((draws >= 1 - eps).mean(), 1 - high)):
    if abs(share - mass) > 4 * np.sqrt(mass * (1 - mass) / len(draws)) + 1e-3:
      return False
  inner = draws[(draws > eps) & (draws < 1 - eps)]
  return stats.kstest(inner, lambda x: (beta.cdf(x) - low) / (high - low)).pvalue > 1e-3


@pytest.mark.parametrize("a, b", [(0.8, 0.8), (1.0, 1.0), (0.2, 0.2), (2.0, 0.5), (0.05, 0.05)])
def test_beta_without_loops_draws_the_beta_distribution(a, b):
  """The loop-free sampler against scipy's Beta (20,000 draws from fixed keys), shapes below
  and above 1 (the boost branch and the plain one)."""
  keys = jax.random.split(jax.random.key(3), 20000)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: mixup.beta_without_loops(k, a, b)))(keys))
  assert np.isfinite(draws).all() and draws.min() >= 0 and draws.max() <= 1
  assert _fits_beta(draws, a, b)
  # The check has power: the draws squeezed by a tenth towards 1/2 fail it.
  assert not _fits_beta(draws * 0.9 + 0.05, a, b)


def test_mixing_step_has_no_while_loops():
  """XLA:GPU reads a `while` condition on the host each iteration; the mixing draws have none:
  no `lax.while_loop` (`while[` in the jaxpr) and no `random_gamma` (jax.random.beta's
  primitive, whose rejection loops put 45 into this function once lowered). The lowered code
  is not checked: on the CPU the random bits themselves lower to a rolled loop."""
  images, labels = _batch(5)
  jaxpr = jax.make_jaxpr(lambda rng, x, y: mixup.mix_batch(
      rng, x, y, num_classes=NUM_CLASSES, **RECIPE))(jax.random.key(0), images, labels)
  for loop in ("while[", "random_gamma["):
    assert loop not in str(jaxpr), loop
  assert "random_gamma[" in str(jax.make_jaxpr(lambda k: jax.random.beta(k, 0.8, 0.8))(
      jax.random.key(0)))  # what the check would catch
