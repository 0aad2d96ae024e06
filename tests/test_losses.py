"""Pixel targets and the masked MSE loss."""

from __future__ import annotations

import functools

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.methods import mae
from mim_jax.objectives import losses, targets


def test_norm_pix_uses_unbiased_variance_and_eps():
  patches = np.random.default_rng(0).normal(size=(2, 5, 12)).astype(np.float32) * 3 + 1
  expected = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
      patches.var(-1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(targets.normalize_patches(jnp.asarray(patches)), expected,
                             rtol=1e-5, atol=1e-5)


def test_masked_mse_ignores_visible_patches():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(2, 6, 4)).astype(np.float32)
  target = rng.normal(size=(2, 6, 4)).astype(np.float32)
  mask = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0]], np.float32)
  expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
  np.testing.assert_allclose(losses.masked_mse(pred, target, mask), expected, rtol=1e-6)
  changed = pred.copy()
  changed[mask == 0] += 100.0  # visible patches do not count
  np.testing.assert_allclose(losses.masked_mse(changed, target, mask), expected, rtol=1e-6)


class MaskedLossesTest(chex.TestCase):
  """The masked losses are the same functions under jit and without it, and check the shapes
  of what they are given (chex assertions at the boundary)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_masked_loss_scores_masked_patches_only(self):
    """Each loss (and `masked_loss`'s name for it) equals its numpy formula on the masked
    patches, and visible patches change nothing."""
    rng = np.random.default_rng(3)
    pred, target = (rng.normal(size=(2, 5, 3)).astype(np.float32) for _ in range(2))
    pred[0, 0] = target[0, 0] + np.array([0.3, -2.5, 1.0])  # both sides of smooth-L1's beta 1.5
    mask = np.array([[1, 0, 0, 1, 1], [0, 1, 0, 0, 0]], np.float32)
    d = pred.astype(np.float64) - target
    on_masked = lambda per_patch: (per_patch * mask).sum() / mask.sum()
    cosine = (pred * target).sum(-1) / (np.linalg.norm(pred, axis=-1)
                                        * np.linalg.norm(target, axis=-1))
    huber = np.where(np.abs(d) < 1.5, 0.5 * d ** 2 / 1.5, np.abs(d) - 0.75)
    references = {"mse": on_masked((d ** 2).mean(-1)), "l1": on_masked(np.abs(d).mean(-1)),
                  "smooth_l1": on_masked(huber.mean(-1)), "cosine": on_masked(1 - cosine)}
    for name, want in references.items():
      loss_fn = losses.masked_loss(name, beta=1.5)
      loss = self.variant(loss_fn)(pred, target, mask)
      np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=name)
      changed = np.where(mask[..., None] > 0, pred, pred + 50.0)
      chex.assert_trees_all_close(self.variant(loss_fn)(changed, target, mask), loss,
                                  rtol=1e-6)
    smooth_l1 = functools.partial(losses.masked_smooth_l1, beta=1.5)  # beta: static
    np.testing.assert_allclose(self.variant(smooth_l1)(pred, target, mask),
                               references["smooth_l1"], rtol=1e-5)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    labels = rng.integers(0, 7, (2, 5))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    for ce_fn in (losses.masked_cross_entropy, losses.masked_loss("cross_entropy")):
      np.testing.assert_allclose(self.variant(ce_fn)(logits, labels, mask), on_masked(nll),
                                 rtol=1e-5)

  def test_mismatched_shapes_are_refused(self):
    with pytest.raises(AssertionError):
      losses.masked_mse(np.zeros((2, 5, 3)), np.zeros((2, 5, 4)), np.ones((2, 5)))
    with pytest.raises(AssertionError):
      losses.masked_mean(np.zeros((2, 5)), np.ones((2, 4)))


def test_mae_loss_against_numpy_reference():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  pred = rng.normal(size=(2, 4, 48)).astype(np.float32)
  mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], np.float32)
  # Official patchify: NCHW -> (n, h, p, w, q, c) order; here from NHWC directly.
  patches = images.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
  for norm in (False, True):
    tgt = patches
    if norm:
      tgt = (tgt - tgt.mean(-1, keepdims=True)) / np.sqrt(tgt.var(-1, ddof=1, keepdims=True) + 1e-6)
    expected = (((pred - tgt) ** 2).mean(-1) * mask).sum() / mask.sum()
    got = mae.mae_loss(jnp.asarray(pred), jnp.asarray(images), jnp.asarray(mask), 4, norm)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
