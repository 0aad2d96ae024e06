"""data2vec: target normalisation and layer averaging, smooth-L1 on masked patches, the EMA
teacher inside the real train step (formula, schedule, no gradients), checkpointed teacher,
learning on Fashion-MNIST, and config errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.methods.base import TrainLength
from mim_jax.objectives import losses, masking, teachers
from mim_jax.objectives.teachers import layer_average_targets, normalize
from mim_jax.training import checkpoint
from mim_jax.training import loop as train

from conftest import REPO, init_and_step, requires_fmnist, tiny_mae_config

# A fast-moving schedule so every step's decay differs visibly: 0.5, 0.6, 0.7, 0.8, then 0.9.
SCHEDULE = dict(ema_decay=0.5, ema_end_decay=0.9, ema_anneal_fraction=1.0)
LENGTH = TrainLength(steps_per_epoch=4, schedule_steps=4)


def tiny_config(**overrides):
  """Micro data2vec on synthetic 16x16 RGB images (4x4 grid of 4-px patches, 2 blocks)."""
  c = tiny_mae_config(method="data2vec")
  c.masking.update(kind="blockwise", ratio=0.5, min_block=2)
  c.teacher.update(top_k=2, **SCHEDULE)
  c.model.drop_path_rate = 0.1  # the student's stochastic depth; the teacher runs without
  config_defaults.override(c, **overrides)
  registry.validate_config(c)
  return c


def _batch(method, images, seed=0):
  mask = method.mask_generator.host(np.random.default_rng(seed), images.shape[0])
  return {"image": images, masking.TOKEN_MASK_KEY: jnp.asarray(mask)}


# --- targets and loss on known numbers ----------------------------------------------------------


def test_instance_and_layer_norm_on_known_inputs():
  x = jnp.array([[[1.0, 10.0], [2.0, 20.0], [3.0, 40.0]]])  # [B=1, N=3 tokens, D=2 channels]
  # Instance norm: each channel over the tokens (biased variance, eps 1e-5).
  c0 = (np.array([1, 2, 3]) - 2) / np.sqrt(2 / 3 + 1e-5)
  c1 = np.array([10, 20, 40]) - 70 / 3
  c1 = c1 / np.sqrt(np.mean(c1**2) + 1e-5)
  np.testing.assert_allclose(normalize(x, "instance")[0], np.stack([c0, c1], 1), rtol=1e-5)
  # Layer norm: each token over its two channels -> (-1, +1) up to eps.
  ln = normalize(x, "layer")[0]
  np.testing.assert_allclose(ln, [[-1, 1]] * 3, atol=1e-3)
  np.testing.assert_array_equal(normalize(x, "none"), x)


def test_top_k_average_drops_cls_and_averages_the_last_k_normalised_blocks():
  rng = np.random.default_rng(0)
  blocks = [jnp.asarray(rng.normal(size=(2, 1 + 5, 4)) * (i + 1) + i, jnp.float32)
            for i in range(4)]
  # Plain mean of the last two blocks' patch tokens.
  want = (np.asarray(blocks[2])[:, 1:] + np.asarray(blocks[3])[:, 1:]) / 2
  np.testing.assert_allclose(layer_average_targets(blocks, 2, "none", "none"), want, rtol=1e-6)
  # Instance-normalised blocks, then averaged: every channel of the mean has mean 0 over tokens.
  out = layer_average_targets(blocks, 3, "instance", "none")
  want = sum(np.asarray(normalize(b[:, 1:], "instance")) for b in blocks[1:]) / 3
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out).mean(axis=1), 0, atol=1e-5)
  # A final layer norm makes every target token zero-mean over its channels.
  out = layer_average_targets(blocks, 3, "instance", "layer")
  np.testing.assert_allclose(np.asarray(out).mean(axis=-1), 0, atol=1e-5)


def test_smooth_l1_known_numbers_and_only_masked_patches_count():
  pred = jnp.array([[[0.5, 3.0], [100.0, -7.0]]])   # [B=1, N=2, D=2]
  target = jnp.zeros((1, 2, 2))
  mask = jnp.array([[True, False]])
  # beta 2: |0.5| < 2 -> 0.5 * 0.25 / 2 = 0.0625; |3| >= 2 -> 3 - 1 = 2; mean over D = 1.03125.
  assert float(losses.masked_smooth_l1(pred, target, mask, beta=2.0)) == pytest.approx(1.03125)
  assert float(losses.masked_smooth_l1(pred, target, mask, beta=0.0)) == pytest.approx(1.75)
  # Changing the prediction of the visible patch changes nothing.
  other = pred.at[:, 1].set(jnp.array([-5.0, 42.0]))
  assert float(losses.masked_smooth_l1(other, target, mask, beta=2.0)) == pytest.approx(1.03125)


# --- the method inside the real train step ------------------------------------------------------


@pytest.fixture(scope="module")
def stepped():
  """Two real train steps of the micro method with the fast schedule, and what went in."""
  config = tiny_config()
  method = registry.build_method(config, LENGTH)
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  batch = _batch(method, images)
  states, metrics = init_and_step(method, batch)
  return method, batch, states, metrics


def test_teacher_starts_as_the_student_and_is_not_a_parameter(stepped):
  method, _, states, _ = stepped
  s0 = states[0]
  # The student trains with stochastic depth; the teacher, the same encoder, runs without.
  assert method.model.encoder.drop_path_rate == 0.1 and method.teacher.drop_path_rate == 0.0
  assert set(s0.params) == {"encoder", "predictor"}  # no teacher among params / optimizer
  for t, s in zip(jax.tree.leaves(s0.extra["teacher"]), jax.tree.leaves(s0.params["encoder"])):
    np.testing.assert_array_equal(t, s)


def test_ema_update_in_the_train_step_equals_its_formula(stepped):
  method, _, states, metrics = stepped
  for k in (0, 1):
    d = float(teachers.linear_anneal(k, 0.5, 0.9, 4))
    assert d == pytest.approx(0.5 + 0.1 * k)
    assert float(metrics[k]["ema_decay"]) == pytest.approx(d)  # the decay this step applied
    old, new = states[k], states[k + 1]
    for t_old, s_new, t_new in zip(jax.tree.leaves(old.extra["teacher"]),
                                   jax.tree.leaves(new.params["encoder"]),
                                   jax.tree.leaves(new.extra["teacher"])):
      want = d * np.asarray(t_old) + (1 - d) * np.asarray(s_new)
      np.testing.assert_allclose(t_new, want, rtol=1e-6, atol=1e-7)
  # The student moved, so after two steps the teacher lags behind it.
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                      states[2].extra["teacher"], states[2].params["encoder"])
  assert max(jax.tree.leaves(diff)) > 0


def test_teacher_receives_no_gradient_and_loss_uses_masked_smooth_l1(stepped):
  method, batch, states, _ = stepped
  state, rng = states[1], jax.random.key(5)

  def loss_of_teacher(teacher):
    return method.loss(state.params, {**state.extra, "teacher": teacher}, batch, rng)[0]

  grads = jax.grad(loss_of_teacher)(state.extra["teacher"])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  # ... while the loss does depend on the teacher (the gradient is zero by stop_gradient).
  shifted = jax.tree.map(lambda t: t * 1.5, state.extra["teacher"])
  assert float(loss_of_teacher(shifted)) != float(loss_of_teacher(state.extra["teacher"]))

  # The loss is smooth-L1 (beta 2) between the student's eval-mode predictions and the
  # teacher's targets on the batch's masked patches.
  loss, (metrics, _) = method.loss(state.params, state.extra, batch, rng, train=False)
  mask = batch[masking.TOKEN_MASK_KEY]
  pred = method.model.apply({"params": state.params}, batch["image"], mask)
  target = method.targets(state.extra["teacher"], batch["image"])
  want = losses.masked_smooth_l1(pred, target, mask, beta=2.0)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(metrics["mask_fraction"]) == pytest.approx(float(np.mean(mask)))
  assert float(metrics["target_std"]) > 0.1  # normalised targets have not collapsed


@pytest.mark.parametrize("block_norm,final_norm", [("layer", "layer"), ("instance", "none")])
def test_targets_average_the_last_top_k_blocks_before_the_final_norm(block_norm, final_norm):
  """data2vec's targets from the teacher's block outputs as flax records each block's call
  (not through the encoder's own list of them): the last top_k of 3 blocks, each taken before
  the encoder's final LayerNorm, without [CLS], normalised, averaged, normalised again."""
  method = registry.build_method(tiny_config(**{
      "model.depth": 3, "teacher.top_k": 2, "teacher.block_norm": block_norm,
      "teacher.final_norm": final_norm}))
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  teacher = method.teacher.init(jax.random.key(2), images)["params"]
  _, state = method.teacher.apply({"params": teacher}, images, capture_intermediates=True,
                                  mutable=["intermediates"])
  blocks = [np.asarray(state["intermediates"]["transformer"][f"blocks_{i}"]["__call__"][0],
                       np.float64)[:, 1:] for i in range(3)]

  def norm(x, kind):  # no affine; biased variance; eps as the official code's
    axis = {"layer": -1, "instance": 1}.get(kind)
    if axis is None:
      return x
    return (x - x.mean(axis, keepdims=True)) / np.sqrt(x.var(axis, keepdims=True) + 1e-5)
  want = norm((norm(blocks[1], block_norm) + norm(blocks[2], block_norm)) / 2, final_norm)
  np.testing.assert_allclose(method.targets(teacher, images), want, rtol=1e-4, atol=1e-4)


# --- runs: checkpointed teacher, learning on real data -------------------------------------------


def _run(workdir, **overrides):
  return train.run(tiny_config(**overrides), workdir)


def test_teacher_is_checkpointed_and_resume_continues_it(tmp_path):
  workdir = str(tmp_path / "run")
  first = _run(workdir, total_steps=2)
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                      first.extra["teacher"], first.params["encoder"])
  assert max(jax.tree.leaves(diff)) > 0  # the teacher is its own state, not the student
  # The checkpoint on disk holds the teacher.
  mngr = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=10)
  import orbax.checkpoint as ocp
  saved = mngr.manager.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  assert set(saved.state["extra"]) == {"teacher", "ema_decay"}
  assert len(jax.tree.leaves(saved.state["extra"])) == len(jax.tree.leaves(first.extra))
  for a, b in zip(jax.tree.leaves(first.extra), jax.tree.leaves(saved.state["extra"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A resumed run continues from it: step 3's teacher is the EMA of the restored one (a run
  # that re-initialised its teacher would differ).
  resumed = _run(workdir, total_steps=3)
  d = float(registry.build_method(tiny_config(), TrainLength(8, 16)).ema_decay(2))
  assert d == pytest.approx(0.5 + 0.4 * 2 / 16)
  for t_old, s_new, t_new in zip(jax.tree.leaves(first.extra["teacher"]),
                                 jax.tree.leaves(resumed.params["encoder"]),
                                 jax.tree.leaves(resumed.extra["teacher"])):
    np.testing.assert_allclose(t_new, d * np.asarray(t_old) + (1 - d) * np.asarray(s_new),
                               rtol=1e-6, atol=1e-7)
  # The exported encoder is the student's.
  params, _ = checkpoint.load_encoder(os.path.join(workdir, "encoder"))
  np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                resumed.params["encoder"]["patch_embed"]["kernel"])


@requires_fmnist
def test_short_run_on_fashion_mnist_lowers_the_loss(tmp_path):
  """60 steps of the micro encoder on real Fashion-MNIST. The teacher is frozen (decay 1) so
  the targets are a fixed function of the image and a lower loss means the student learned to
  predict them; with a moving EMA teacher the targets change every step and the loss need not
  fall even while the student learns."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / "data2vec_fmnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  config_defaults.override(c, **{
      "teacher.ema_decay": 1.0, "teacher.ema_end_decay": 1.0, "global_batch_size": 64,
      "total_steps": 60, "optimizer.warmup_epochs": 0.0, "optimizer.base_lr": 4e-3,
      "checkpoint_every": 1000, "export_encoder": False})
  workdir = str(tmp_path / "run")
  train.run(c, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  loss = [r["loss"] for r in rows if "loss" in r]
  assert len(loss) == 60 and all(np.isfinite(loss))
  first, last = np.mean(loss[:5]), np.mean(loss[-5:])
  assert last < 0.8 * first, (first, last)
  assert all(r["ema_decay"] == 1.0 for r in rows if "ema_decay" in r)


# --- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("teacher.top_k", 3, r"teacher\.top_k=3 .*\[1, 2\]"),
    ("teacher.top_k", 0, r"teacher\.top_k=0"),
    ("teacher.ema_decay", 1.5, r"teacher\.ema_decay=1\.5 .*\[0, 1\]"),
    ("teacher.ema_end_decay", -0.1, r"teacher\.ema_end_decay=-0\.1"),
    ("teacher.ema_end_decay", 0.4, r"teacher\.ema_end_decay=0\.4 .*at least"),
    ("teacher.ema_anneal_fraction", 2.0, r"teacher\.ema_anneal_fraction=2\.0"),
    ("teacher.block_norm", "batch", r"teacher\.block_norm='batch' .*instance"),
    ("teacher.final_norm", "l2", r"teacher\.final_norm='l2'"),
    ("teacher.loss_beta", -1.0, r"teacher\.loss_beta=-1\.0"),
])
def test_bad_teacher_fields_fail_naming_the_field(field, value, match):
  with pytest.raises(ConfigError, match=match):
    tiny_config(**{field: value})
