"""Feature distillation from a frozen teacher (MaskDistill) and targets chosen by config (mim):
targets equal the teacher's own features, only masked patches count, no gradient reaches the
teacher, exact resume, a falling loss on real data, each target kind reproducing its dedicated
method, and the config errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import features, registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.methods import maskdistill
from mim_jax.models import flops
from mim_jax.objectives import masking
from mim_jax.training import loop as train

from conftest import (
  REPO,
  export_random_tokenizer,
  requires_fmnist,
  tiny_config,
  train_micro_mae_teacher,
)


def tiny_distill_config(teacher: str, **overrides):
  return tiny_config("maskdistill", **{"teacher.path": teacher, "masking.min_block": 2,
                                       **overrides})


def _state(config, batch_size=4):
  method = registry.build_method(config)
  images = jax.random.normal(jax.random.key(1), (batch_size, 16, 16, 3))
  params, extra = method.init(jax.random.key(0), images)
  params, extra = method.load_pretrained(jax.device_get(params), jax.device_get(extra))
  if method.mask_generator.needs_scores:  # drawn in the step from the teacher's attention
    return method, params, extra, {"image": images}
  mask = method.mask_generator.host(np.random.default_rng(0), batch_size)
  return method, params, extra, {"image": images, masking.TOKEN_MASK_KEY: jnp.asarray(mask)}


def test_targets_are_the_teachers_normalised_features(teacher_dir):
  method, params, extra, batch = _state(tiny_distill_config(teacher_dir))
  enc = features.load(teacher_dir)
  tokens, _ = enc.module.apply({"params": enc.params}, batch["image"])
  want = np.asarray(tokens[:, 1:], np.float32)
  # PyTorch's layer_norm without affine parameters (eps 1e-5, biased variance)
  want = (want - want.mean(-1, keepdims=True)) / np.sqrt(want.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(method.targets(extra, batch["image"]), want, atol=5e-6)
  assert method.target.dim == enc.module.width


@pytest.mark.parametrize("block", [1, 2])  # the teacher's 2 blocks: 2, its last, before its norm
def test_teacher_features_of_a_block(teacher_dir, block):
  method, params, extra, batch = _state(tiny_distill_config(teacher_dir, **{
      "teacher.block": block, "teacher.norm": "none"}))
  enc = features.load(teacher_dir)
  _, aux = enc.module.apply({"params": enc.params}, batch["image"])
  got = method.targets(extra, batch["image"])
  assert got.shape == (4, 16, enc.module.width) and len(aux["blocks"]) == 2
  np.testing.assert_allclose(got, np.asarray(aux["blocks"][block - 1])[:, 1:], atol=2e-5)


def test_teacher_sees_its_own_normalisation_and_resolution(teacher_dir):
  """A student with other statistics: the teacher gets the same pixels re-normalised with its
  own; a student at twice the resolution with patch 8: the teacher is fed at its patch x the
  student's grid (a resize)."""
  base = tiny_distill_config(teacher_dir)
  teacher = maskdistill.build_teacher(base, base.teacher, "teacher")
  pixels = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3))
  student = config_defaults.override(base.copy_and_resolve_references(), **{
      "data.mean": (0.2, 0.3, 0.4), "data.std": (0.1, 0.2, 0.3)})
  method, _, extra, _ = _state(student)
  as_student = (pixels - jnp.asarray(student.data.mean)) / jnp.asarray(student.data.std)
  as_teacher = (pixels - jnp.asarray(teacher.mean)) / jnp.asarray(teacher.std)
  np.testing.assert_allclose(method.target.teacher.prepare(as_student), as_teacher, atol=1e-5)

  big = tiny_distill_config(teacher_dir, **{"image_size": (32, 32), "model.variant": "mu/8"})
  registry.validate_config(big)
  method = registry.build_method(big)
  assert method.target.teacher.image_size == (16, 16)  # 4x4 patches of 4 px, the student's grid
  assert method.target.teacher.prepare(jnp.zeros((1, 32, 32, 3))).shape == (1, 16, 16, 3)


def test_loss_counts_masked_patches_only_and_no_gradient_reaches_the_teacher(teacher_dir):
  method, params, extra, batch = _state(tiny_distill_config(teacher_dir))
  mask = np.asarray(batch[masking.TOKEN_MASK_KEY])
  assert 0 < mask.mean() < 1
  real = method.targets
  loss = lambda: float(method.loss(params, extra, batch, jax.random.key(2))[0])
  base = loss()
  # Change the targets of visible patches only: the loss does not move; a masked one: it does.
  noise = np.random.default_rng(0).normal(size=(4, 16, method.target.dim)).astype(np.float32)
  method.targets = lambda e, im: real(e, im) + jnp.where(~mask[..., None], noise, 0.0)
  assert loss() == pytest.approx(base, rel=1e-6)
  method.targets = lambda e, im: real(e, im) + jnp.where(mask[..., None], noise, 0.0)
  assert abs(loss() - base) > 1e-3
  method.targets = real
  grads = jax.grad(lambda ex: method.loss(params, ex, batch, jax.random.key(2))[0])(
      jax.tree.map(jnp.asarray, extra))
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  assert "teacher" not in params  # the optimizer never sees it


def test_loss_is_smooth_l1_with_its_beta_on_the_masked_patches(teacher_dir):
  """The paper's loss by its formula (the targets are checked against the teacher above):
  smooth L1 with target.smooth_l1_beta, over channels, then over the masked patches."""
  method, params, extra, batch = _state(tiny_distill_config(teacher_dir, **{
      "target.smooth_l1_beta": 0.5}))
  loss, _ = method.loss(params, extra, batch, jax.random.key(2), train=False)
  out = method.forward(params, extra, batch, jax.random.key(2), train=False)
  d = np.asarray(out["pred"], np.float64) - np.asarray(out["target"])
  assert (np.abs(d) < 0.5).any() and (np.abs(d) >= 0.5).any()  # both sides of beta
  per_patch = np.where(np.abs(d) < 0.5, d ** 2, np.abs(d) - 0.25).mean(-1)
  mask = np.asarray(batch[masking.TOKEN_MASK_KEY], np.float64)
  np.testing.assert_allclose(loss, (per_patch * mask).sum() / mask.sum(), rtol=1e-5)


def test_training_keeps_the_teacher_frozen_and_resumes_exactly(teacher_dir, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  final = train.run(tiny_distill_config(teacher_dir, total_steps=4, viz_every=2), straight)
  train.run(tiny_distill_config(teacher_dir, total_steps=2), resumed)
  again = train.run(tiny_distill_config(teacher_dir, total_steps=4), resumed)
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  loaded = features.load(teacher_dir).params
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               final.extra["teacher"], loaded)
  assert os.listdir(os.path.join(straight, "reconstructions"))


def test_teacher_runs_forward_only_in_the_flop_count(teacher_dir):
  config = tiny_distill_config(teacher_dir)
  fwd = registry.forward_flops(config)
  assert fwd["target"] == pytest.approx(fwd["encoder"])  # the same micro ViT
  assert flops.train_flops(fwd) == pytest.approx(
      3 * (fwd["encoder"] + fwd["decoder"]) + fwd["target"])


@requires_fmnist
def test_short_run_on_fashion_mnist_lowers_the_loss(tmp_path):
  """A micro MAE teacher trained on Fashion-MNIST, then 50 distillation steps on it."""
  import importlib.util

  def load(name):
    spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("runlocal")
  teacher = train_micro_mae_teacher(str(tmp_path / "teacher"))
  c = config_defaults.override(load("maskdistill_fmnist.py"), **{
      "teacher.path": teacher, "global_batch_size": 64, "total_steps": 50,
      "optimizer.warmup_epochs": 0.0, "optimizer.base_lr": 4e-3, "checkpoint_every": 1000,
      "export_encoder": False})
  workdir = str(tmp_path / "run")
  train.run(c, workdir)
  loss = [r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if "loss" in r]
  assert len(loss) == 50 and all(np.isfinite(loss))
  assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5]), (loss[:5], loss[-5:])


# --- targets by config ------------------------------------------------------------------------


@pytest.mark.parametrize("kind,dedicated,overrides", [
    ("pixels", "simmim", {}),
    ("hog", "maskfeat", {"target.hog.cell_size": 4, "target.hog.gaussian_window": 4}),
    ("tokens", "beit", {}),
    ("teacher_features", "maskdistill", {}),
])
def test_each_target_kind_reproduces_its_dedicated_method(kind, dedicated, overrides,
                                                          teacher_dir, tmp_path):
  """mim with target.kind=K and the paper's loss computes the same loss, from the same
  parameters, as the method built for K: the study changes the target and nothing else."""
  shared = {"masking.kind": "blockwise", "masking.ratio": 0.4, "masking.min_block": 2}
  mim = tiny_config("mim", **shared, **{"target.kind": kind, **overrides})
  other = tiny_config(dedicated, **shared)
  if dedicated == "maskfeat":
    other.target.hog.update(cell_size=4, gaussian_window=4)
  if kind == "tokens":
    other.tokenizer.vocab_size = mim.target.tokenizer.vocab_size = 16
    path = export_random_tokenizer(other, str(tmp_path / "tok"))
    other.tokenizer.path = mim.target.tokenizer.path = path
  if kind == "teacher_features":
    mim.target.teacher.path = other.teacher.path = teacher_dir
  registry.validate_config(mim)
  registry.validate_config(other)
  a, b = _state(mim), _state(other)
  la = a[0].loss(a[1], a[2], a[3], jax.random.key(5))
  lb = b[0].loss(b[1], b[2], b[3], jax.random.key(5))
  assert float(la[0]) == pytest.approx(float(lb[0]), rel=1e-6)
  assert registry.forward_flops(mim)["total"] == pytest.approx(
      registry.forward_flops(other)["total"])
  out = a[0].reconstruct(a[1], a[3], jax.random.key(3), a[2])
  picture = a[0].picture(np.asarray(a[3]["image"]), jax.device_get(out))
  assert picture.dtype == np.uint8 and picture.ndim == 3


def test_norm_pixels_with_another_loss_trains(tmp_path):
  state = train.run(tiny_config("mim", total_steps=2, **{
      "masking.min_block": 2, "target.kind": "norm_pixels", "target.loss": "cosine"}),
      str(tmp_path / "w"))
  assert int(state.step) == 2


@pytest.mark.parametrize("method,overrides,match", [
    ("mim", {"target.kind": "depth"}, r"config.target.kind='depth' is invalid"),
    ("mim", {"target.kind": "pixels", "target.loss": "cross_entropy"},
     r"target.loss='cross_entropy' .*needs codes"),
    ("mim", {"target.kind": "pixels", "target.hog.num_bins": 12},
     r"config.target.hog.num_bins=12 is not used: only target.kind='hog'"),
    ("mim", {"target.kind": "pixels", "target.smooth_l1_beta": 2.0},
     r"target.smooth_l1_beta=2.0 is not used"),
    ("mim", {"target.kind": "teacher_features"}, r"config.target.teacher.path='' .*mim_jax.convert"),
    ("mim", {"target.kind": "tokens"}, r"config.target.tokenizer.path=''"),
    ("maskdistill", {"teacher.path": "/nonexistent"}, r"config.teacher.path='/nonexistent'"),
    ("maskdistill", {"teacher.block": 7}, r"config.teacher.block=7 .*\[1, 2\]"),
    ("maskdistill", {"teacher.block": 3}, r"config.teacher.block=3 .*\[1, 2\]"),
    ("maskdistill", {"teacher.block": -1}, r"config.teacher.block=-1 .*0 \(the output"),
    ("maskdistill", {"teacher.norm": "batch"}, r"config.teacher.norm='batch'"),
    ("maskdistill", {"target.loss": "cross_entropy"}, r"config.target.loss='cross_entropy'"),
    ("maskdistill", {"channels": 1, "data.mean": (0.5,), "data.std": (0.5,)},
     r"an encoder of 1 channels"),
])
def test_bad_fields_fail_at_start_up_naming_the_field(method, overrides, match, teacher_dir):
  if method == "maskdistill":
    overrides = {"teacher.path": teacher_dir, **overrides}
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(tiny_config(method, **{"masking.min_block": 2, **overrides}))


# --- attention-guided masking (AttMask) ----------------------------------------------------------


def test_attention_guided_mask_picks_the_most_or_least_attended_patches():
  scores = jnp.asarray(np.random.default_rng(0).permutation(16)[None].astype(np.float32))
  rng = jax.random.key(0)
  high = np.asarray(masking.attention_guided_mask(scores, 6, 0.0, rng, "high"))[0]
  low = np.asarray(masking.attention_guided_mask(scores, 6, 0.0, rng, "low"))[0]
  order = np.argsort(-np.asarray(scores[0]))
  assert set(np.flatnonzero(high)) == set(order[:6])
  assert set(np.flatnonzero(low)) == set(order[-6:])
  # A random share: round(6 x 0.5) = 3 by attention, 3 drawn from the rest, always 6 in all.
  for seed in range(5):
    half = np.asarray(masking.attention_guided_mask(scores, 6, 0.5, jax.random.key(seed)))[0]
    assert half.sum() == 6 and set(order[:3]) <= set(np.flatnonzero(half))
  draws = {tuple(np.flatnonzero(masking.attention_guided_mask(
      scores, 6, 1.0, jax.random.key(seed))[0])) for seed in range(5)}
  assert len(draws) > 1  # all random: the draws differ


def test_attention_masking_masks_what_the_teacher_attends_to(teacher_dir, tmp_path):
  config = tiny_distill_config(teacher_dir, **{"masking.kind": "attention",
                                               "masking.ratio": 0.5, "masking.min_block": 16})
  registry.validate_config(config)
  method, params, extra, batch = _state(config)
  out = method.forward(params, extra, batch, jax.random.key(2), train=False)
  enc = features.load(teacher_dir)
  (_, _), state = enc.module.apply({"params": enc.params}, batch["image"],
                                   mutable=["intermediates"])
  weights = state["intermediates"]["transformer"]["blocks_1"]["attn"]["attention"][0]
  scores = np.asarray(weights[:, :, 0, 1:].mean(1))
  mask = np.asarray(out["mask"])
  assert (mask.sum(1) == 8).all()
  for row, m in zip(scores, mask):
    assert set(np.flatnonzero(m)) == set(np.argsort(-row)[:8])
  # Training with it writes pictures with one attention panel per teacher head.
  state = train.run(config_defaults.override(config, total_steps=2, viz_every=2),
                    str(tmp_path / "w"))
  assert int(state.step) == 2
  pic = method.picture(np.asarray(batch["image"]),
                       jax.device_get(method.reconstruct(params, batch, jax.random.key(3), extra)))
  plain = tiny_distill_config(teacher_dir)
  m2, p2, e2, b2 = _state(plain)
  base = m2.picture(np.asarray(b2["image"]),
                    jax.device_get(m2.reconstruct(p2, b2, jax.random.key(3), e2)))
  assert pic.shape[1] > base.shape[1]  # 2 heads more than the 3 panels


def test_data2vec_masks_by_its_ema_teachers_attention(tmp_path):
  c = tiny_config("data2vec", total_steps=2, **{"masking.kind": "attention",
                                                "masking.ratio": 0.5, "teacher.top_k": 2})
  registry.validate_config(c)
  state = train.run(c, str(tmp_path / "w"))
  assert int(state.step) == 2


@pytest.mark.parametrize("method,overrides,match", [
    ("simmim", {}, r"masking.kind='attention' .*needs a teacher"),
    ("mim", {"target.kind": "hog", "target.hog.cell_size": 4, "target.hog.gaussian_window": 4},
     r"needs a teacher"),
    ("maskdistill", {"masking.random_share": 1.5}, r"config.masking.random_share=1.5"),
    ("maskdistill", {"masking.attention_order": "middle"}, r"masking.attention_order='middle'"),
])
def test_attention_masking_is_refused_without_a_teacher_or_with_bad_fields(
    method, overrides, match, teacher_dir):
  if method == "maskdistill":
    overrides = {"teacher.path": teacher_dir, **overrides}
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(tiny_config(method, **{"masking.kind": "attention", **overrides}))
