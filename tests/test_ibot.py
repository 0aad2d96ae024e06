"""iBOT: EMA teacher and centres in the real train step, schedules, the distillation losses, the
multi-crop pipeline with per-view masks, config errors, and a short Fashion-MNIST run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim_jax import data, registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.data import multicrop, transforms
from mim_jax.methods.base import TrainLength
from mim_jax.objectives import losses, masking, self_distillation, teachers
from mim_jax.training import optim
from mim_jax.training import step as step_lib

from conftest import (
    FAST_COMPILE_XLA_FLAGS,
    FMNIST_DIR,
    REPO,
    requires_fmnist,
    take_steps,
    tiny_mae_config,
)

LAST_LAYER = self_distillation.LAST_LAYER


def tiny_config(**overrides):
  """Micro iBOT on synthetic 16x16 RGB images: 4x4 patch grid, 2 local 8-px views."""
  c = tiny_mae_config(method="ibot")
  c.masking.update(kind="blockwise", ratio_range=(0.2, 0.5), mask_probability=0.5,
                   min_block=2)
  c.ibot.update(out_dim=32, hidden_dim=32, bottleneck_dim=16, warmup_teacher_temp_epochs=1.0,
                freeze_last_layer_epochs=0.0)
  c.multicrop.update(num_local=2, local_size=(8, 8), blur=True)
  config_defaults.override(c, **overrides)
  registry.validate_config(c)
  return c


def _iterator(c, seed=0):
  method = registry.build_method(c, TrainLength(8, 16))
  it = data.make_train_iterator(c.data, image_size=tuple(c.image_size), channels=c.channels,
                                global_batch_size=c.global_batch_size, seed=seed,
                                augment=method.train_augment(c.data, tuple(c.image_size),
                                                             c.channels))
  return method, it


def _device_batch(method, host_batch):
  return {k: jnp.asarray(host_batch[k]) for k in method.train_batch_keys()
          if k in host_batch}


def _first_step(c, method=None):
  """(method, first batch, initial state, jitted train step) of config `c` (with `method`: its
  step, on the same batch and state)."""
  built, it = _iterator(c)
  method = method or built
  batch = _device_batch(method, next(it))
  schedule = optim.learning_rate_schedule(c.optimizer, c.global_batch_size, 8, 16)
  tx = optim.build_optimizer(c.optimizer, schedule, decay_mask=method.decay_mask)
  state = jax.jit(lambda r: step_lib.init_train_state(method, tx, r, (1, 16, 16, 3)))(
      jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(method, tx, schedule,
                                          grad_accum_steps=c.grad_accum_steps))
  return method, batch, state, step


@pytest.fixture(scope="module")
def stepped():
  """Two real train steps of the tiny config: (method, batch, states before/after each), at
  lr 5e-4 from the first step (tiny_config's warmup would start them at lr 0 and 6e-7, where a
  teacher update of (1 - m) times the student's move is below any tolerance)."""
  method, batch, state, step = _first_step(tiny_config(**{"optimizer.warmup_epochs": 0.0,
                                                          "optimizer.base_lr": 1.6e-2}))
  states, metrics = take_steps(step, state, batch, jax.random.key(1))
  return method, batch, states, metrics


def _view_major_loss(method, params, extra, batch, rng, train=True):
  """`IBOT.loss` as it was before 2026-12-07: the views flattened view-major ([V * B, ...],
  which gathered the whole batch onto every device of a sharded batch) and the losses read
  from its rows. The reference of the batch-major form."""
  c, step = method.cfg, extra["step"]

  def views_first(x):
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])

  views = multicrop.normalize_views(batch[multicrop.GLOBAL_VIEWS_KEY], *method.norm)
  nv, b = views.shape[1], views.shape[0]
  images, masks = views_first(views), views_first(batch[multicrop.GLOBAL_MASKS_KEY])
  student = self_distillation.stop_last_layer_gradient(
      params, step < method._epochs(c.freeze_last_layer_epochs))
  global_rng, local_rng = jax.random.split(rng)
  t_out = jax.lax.stop_gradient(method.model.apply({"params": extra["teacher"]}, images))
  s_out = method.model.apply({"params": student}, images, masks, train=train,
                             rngs={"drop_path": global_rng})
  s_cls = s_out[:, 0].reshape(nv, b, -1)
  local = multicrop.normalize_views(batch[multicrop.LOCAL_VIEWS_KEY], *method.norm)
  s_local = method.model.apply({"params": student}, views_first(local), cls_only=True,
                               train=train, rngs={"drop_path": local_rng})
  s_cls = jnp.concatenate([s_cls, s_local[:, 0].reshape(local.shape[1], b, -1)])
  temp, patch_temp = method.teacher_temps(step)
  k = t_out.shape[-1]
  p_cls = losses.teacher_probs(t_out[:, 0], extra["center_cls"], temp)
  p_patch = losses.teacher_probs(t_out[:, 1:], extra["center_patch"], patch_temp)
  cls_loss = losses.cross_view_distillation(s_cls, p_cls.reshape(nv, b, k), c.student_temp)
  patch_loss = losses.masked_patch_distillation(
      s_out[:, 1:].reshape(nv, b, -1, k), p_patch.reshape(nv, b, -1, k), masks.reshape(nv, b, -1),
      c.student_temp)
  loss = c.lambda_cls * cls_loss + c.lambda_patch * patch_loss
  metrics = {"loss": loss, "cls_loss": cls_loss, "patch_loss": patch_loss,
             "teacher_temp": temp, "teacher_momentum": method.momentum(step),
             "mask_fraction": jnp.mean(masks.astype(jnp.float32)),
             **self_distillation.collapse_metrics(p_cls)}
  for name, logits in (("center_cls", t_out[:, 0]), ("center_patch", t_out[:, 1:])):
    extra = teachers.accumulate_centre(extra, name, logits)
  return loss, (metrics, teachers.count_micro_batch(extra))


def _assert_same_to_rounding(got, want):
  """Each leaf within float32 rounding of its own scale: a sum in another order differs by
  about 1e-7 of the terms' size, also in entries whose exact value is 0 (the key bias's
  gradient is rounding noise)."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(got))[0],
                          jax.tree.leaves(jax.device_get(want)), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.max(np.abs(b)) + 1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_batch_major_views_give_the_view_major_step():
  """The views go through the encoders batch-major ([B * V, ...], which keeps a sharded
  batch's sharding) and back to [V, B, ...] for the losses: without drop path (the only
  per-row randomness) the loss, metrics, gradients and the centres' batch statistics are those
  of the view-major loss it replaced, with per-view masks of varying counts and local views."""
  c = tiny_config(**{"model.drop_path_rate": 0.0})
  method, batch, state, _ = _first_step(c)
  masks = np.asarray(batch[multicrop.GLOBAL_MASKS_KEY])
  assert masks[:, 0].sum(-1).tolist() != masks[:, 1].sum(-1).tolist()  # rows must line up

  class ViewMajor(type(method)):
    def loss(self, params, extra, batch, rng, train=True):
      return _view_major_loss(self, params, extra, batch, rng, train)

  reference = ViewMajor(c, TrainLength(8, 16))
  extra = {**state.extra, "center_cls": state.extra["center_cls"] + 0.5,
           "center_patch": state.extra["center_patch"] - 0.5}
  rng = jax.random.key(1)
  got, want = (jax.jit(jax.value_and_grad(lambda p, m=m: m.loss(p, extra, batch, rng),
                                          has_aux=True))(state.params)
               for m in (method, reference))
  (_, (metrics, new_extra)), grads = got
  assert float(metrics["patch_loss"]) > 0 and float(metrics["cls_loss"]) > 0
  assert float(optax.tree.norm(grads)) > 0
  assert float(jnp.abs(new_extra["batch_center_cls"]).sum()) > 0  # the centres' statistics
  _assert_same_to_rounding(got, want)


_SHARDED_SCRIPT = textwrap.dedent(r"""
    import re, jax
    from mim_jax.config import defaults as config_defaults
    from mim_jax.training import setup
    from test_ibot import tiny_config

    assert jax.device_count() == 8
    c = tiny_config(global_batch_size=16, mesh=[("data", 2), ("fsdp", 4)],
                    sharding_rules=config_defaults.fsdp_rules(min_size=64))
    r = setup.setup_run(setup.prepare(c), num_examples=64)
    batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=r.batch_sharding)
             for k, s in setup.abstract_batch(r, 16).items()}
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=r.replicated)
    hlo = r.jit_step().lower(r.abstract_state, batch, key).compile().as_text()
    gathers = re.findall(r"= \(?(\w+)\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
    assert gathers  # the FSDP parameters are gathered
    # Masks (pred), patches [.., 48], or arrays of rank 4 or more: views [.., H, W, C] and
    # per-view outputs [V, B, ...] (the teacher's patch logits for the centres); the tiny
    # model's parameters are at most 2-D.
    views = [(t, d) for t, d in gathers
             if t == "pred" or d.endswith(",48") or d.count(",") >= 3]
    assert not views, views
    print("OK", len(gathers))
""")


def test_a_sharded_batch_of_views_is_never_gathered(tmp_path):
  """On a data=2 x fsdp=4 mesh (8 simulated devices) the compiled step gathers no views,
  patches, masks or teacher outputs of the batch: each device encodes its own images' views
  (flattened view-major, the whole batch of views and masks was gathered onto every device,
  with XLA's "Involuntary full rematerialization" warning; a centre's mean over a reshape of
  the [V, B, ...] outputs to rows gathered the teacher's logits)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             + FAST_COMPILE_XLA_FLAGS, JAX_PLATFORMS="cpu",
             PYTHONPATH=f"{REPO}:{REPO / 'tests'}", TMPDIR=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-6000:]
  assert "rematerialization" not in out.stderr, out.stderr[-6000:]


# --- teacher, centres and schedules -----------------------------------------------------------


def test_train_step_moves_teacher_by_ema_of_new_student(stepped):
  method, _, states, _ = stepped
  for k in (1, 2):  # the update that made states[k] had index k - 1
    before, after = states[k - 1], states[k]
    m = float(method.momentum(k - 1))
    assert 0.996 - 1e-6 <= m < 1
    # The teacher's move against (1 - m) times the new student's distance from it: compared
    # as moves, so that a wrong momentum (or none) cannot hide in the weights' own size.
    moves = jax.tree.map(lambda t1, t0: np.asarray(t1, np.float64) - np.asarray(t0, np.float64),
                         after.extra["teacher"], before.extra["teacher"])
    want = jax.tree.map(lambda t0, s1: (1 - m) * (np.asarray(s1, np.float64)
                                                  - np.asarray(t0, np.float64)),
                        before.extra["teacher"], after.params)
    largest = max(float(np.max(np.abs(w))) for w in jax.tree.leaves(want))
    assert largest > 1e-6, largest  # the student moved: there is an update to follow
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(moves)):
      # float32 weights: each move is known to about 1e-7 of the weight's size (<= ~1).
      np.testing.assert_allclose(g, w, rtol=1e-2, atol=2e-7)
    assert int(after.extra["step"]) == k


def test_teacher_gets_no_gradient_and_centres_follow_their_formula(stepped):
  method, batch, states, _ = stepped
  state = states[1]
  rng = jax.random.key(3)

  def loss(params, teacher):
    return method.loss(params, {**state.extra, "teacher": teacher}, batch, rng)

  (_, (_, extra)), (student_grads, grads) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state.params, state.extra["teacher"])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  assert float(optax.tree.norm(student_grads)) > 0
  views = multicrop.normalize_views(batch[multicrop.GLOBAL_VIEWS_KEY], *method.norm)
  images = jnp.swapaxes(views, 0, 1).reshape(-1, *views.shape[2:])
  t_out = np.asarray(method.model.apply({"params": state.extra["teacher"]}, images))
  cls_mean, patch_mean = t_out[:, 0].mean(0), t_out[:, 1:].mean((0, 1))
  # The loss gathers the batch's mean teacher outputs; the centres move after the update.
  np.testing.assert_allclose(extra["batch_center_cls"][0], cls_mean, rtol=1e-5, atol=1e-6)
  extra = method.after_update(state.params, extra, state.extra["step"])
  np.testing.assert_allclose(extra["center_cls"][0],
                             0.9 * state.extra["center_cls"][0] + 0.1 * cls_mean, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(extra["center_patch"][0, 0],
                             0.9 * state.extra["center_patch"][0, 0] + 0.1 * patch_mean,
                             rtol=1e-5, atol=1e-6)
  assert not np.any(extra["batch_center_cls"]) and not np.any(extra["batch_center_patch"])


def test_centres_move_once_per_step_with_gradient_accumulation():
  """With grad_accum_steps = 2 the centres take one EMA step by the whole batch's mean teacher
  output, as with one micro-batch (updated per micro-batch they moved twice a step)."""
  centres = []
  for accum in (1, 2):
    _, batch, state, step = _first_step(tiny_config(grad_accum_steps=accum))
    state = state.replace(extra={**state.extra, "center_cls": state.extra["center_cls"] + 1.0})
    state, _ = step(state, batch, jax.random.key(1))
    centres.append((np.asarray(state.extra["center_cls"]),
                    np.asarray(state.extra["center_patch"])))
  for one, two in zip(*centres):
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)


def test_metrics_of_the_step(stepped):
  _, _, _, metrics = stepped
  m = metrics[0]
  for name in ("loss", "cls_loss", "patch_loss", "teacher_temp", "teacher_momentum",
               "teacher_entropy", "teacher_mean_entropy"):
    assert np.isfinite(float(m[name])), name
  np.testing.assert_allclose(float(m["loss"]), float(m["cls_loss"]) + float(m["patch_loss"]),
                             rtol=1e-6)
  assert float(m["teacher_temp"]) == pytest.approx(0.04)
  assert 0 < float(m["teacher_entropy"]) <= np.log(32) + 1e-4


def test_temperature_and_momentum_schedules():
  c = tiny_config(**{"ibot.warmup_teacher_temp_epochs": 3.0, "ibot.warmup_teacher_patch_temp": 0.03,
                     "ibot.teacher_patch_temp": 0.09, "num_epochs": 10})
  method = registry.build_method(c, TrainLength(steps_per_epoch=10, schedule_steps=100))
  for step, cls_t, patch_t in [(0, 0.04, 0.03), (15, 0.055, 0.06), (30, 0.07, 0.09),
                               (99, 0.07, 0.09)]:
    got = [float(t) for t in method.teacher_temps(jnp.int32(step))]
    np.testing.assert_allclose(got, [cls_t, patch_t], rtol=1e-6)
  for step, want in [(0, 0.996), (25, 1.0 - 0.004 * 0.5 * (1 + np.cos(np.pi / 4))), (50, 0.998),
                     (100, 1.0), (200, 1.0)]:
    assert float(method.momentum(jnp.int32(step))) == pytest.approx(want, abs=1e-7)


def test_last_layer_frozen_for_its_epochs(stepped):
  _, batch, states, _ = stepped
  c = tiny_config(**{"ibot.freeze_last_layer_epochs": 1.0})
  method = registry.build_method(c, TrainLength(8, 16))
  state = states[0]
  # One compiled gradient, the step an argument (op by op, the multi-crop loss took 30 s).
  grad = jax.jit(jax.grad(lambda p, step: method.loss(
      p, {**state.extra, "step": step}, batch, jax.random.key(0))[0]))
  for step, frozen in [(0, True), (7, True), (8, False)]:
    g = grad(state.params, jnp.int32(step))
    norms = [float(jnp.max(jnp.abs(g["head"][k]))) for k in ("last_layer", "last_layer_scale")]
    assert (max(norms) == 0.0) == frozen, (step, norms)
    assert float(jnp.max(jnp.abs(g["head"]["mlp_0"]["kernel"]))) > 0


def _freeze_run(hold: bool, num_steps: int = 4):
  """`num_steps` real train steps with a 2-step last-layer freeze (1 epoch of 2 steps), AdamW
  with weight decay 0.05 at a constant lr: (the method, the states before/after each step)."""
  c = tiny_config(**{"ibot.freeze_last_layer_epochs": 1.0, "optimizer.weight_decay": 0.05})
  method = registry.build_method(c, TrainLength(steps_per_epoch=2, schedule_steps=16))
  _, it = _iterator(c)
  batch = _device_batch(method, next(it))
  schedule = optax.constant_schedule(1e-3)
  tx = optim.build_optimizer(c.optimizer, schedule, 16, method.decay_mask)
  if hold:
    tx = method.wrap_optimizer(tx)
  state = jax.jit(lambda r: step_lib.init_train_state(method, tx, r, (1, 16, 16, 3)))(
      jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(method, tx, schedule))
  states, _ = take_steps(step, state, batch, jax.random.key(1), num_steps)
  return method, states


def _last_layer(params):
  return {k: np.asarray(params["head"][k]) for k in LAST_LAYER if k in params["head"]}


def _others(params):
  head = {k: v for k, v in params["head"].items() if k not in LAST_LAYER}
  return [np.asarray(x) for x in jax.tree.leaves({**params, "head": head})]


def test_last_layer_is_bitwise_unchanged_during_the_freeze_and_moves_after():
  """DINO / iBOT's AdamW skips the frozen last layer (its grad is None): no weight decay, no
  moments. Steps 0 and 1 are in the freeze, 2 and 3 after it."""
  _, states = _freeze_run(hold=True)
  assert set(_last_layer(states[0].params)) == {"last_layer", "last_layer_scale"}
  for k in range(1, 5):
    before, after = states[k - 1].params, states[k].params
    frozen = k - 1 < 2
    for name, value in _last_layer(after).items():
      same = np.array_equal(value, _last_layer(before)[name])
      assert same == frozen, (k, name)
    # Everything else moves at every step.
    assert all(not np.array_equal(a, b) for a, b in zip(_others(after), _others(before))), k
  # The last layer's AdamW moments stay exactly zero while frozen (zero gradient, as
  # PyTorch's state created at the first gradient), and fill after.
  for k, frozen in [(2, True), (3, False)]:
    opt = states[k].opt_state
    for moment in ("mu", "nu"):
      m = optax.tree_utils.tree_get(opt, moment)["head"]["last_layer"]
      assert (float(jnp.max(jnp.abs(m))) == 0.0) == frozen, (k, moment)
  # The hold's count is the number of applied updates, as the loss's extra["step"].
  assert int(states[4].opt_state[-1].inner_state.step) == int(states[4].extra["step"]) == 4
  # The trainer builds its optimizer through the method: the hold is in a run's state.
  from mim_jax.training import setup
  def opt_leaves(freeze):
    run = setup.setup_run(tiny_config(**{"ibot.freeze_last_layer_epochs": freeze}))
    return len(jax.tree.leaves(run.abstract_state.opt_state))
  assert opt_leaves(1.0) == opt_leaves(0.0) + 1


def test_without_the_hold_weight_decay_moves_the_frozen_last_layer():
  """The stop_gradient alone (the loss) leaves AdamW's decoupled weight decay: the defect that
  `wrap_optimizer` removes. Without a freeze the optimizer is returned as is."""
  _, states = _freeze_run(hold=False, num_steps=1)
  before, after = _last_layer(states[0].params), _last_layer(states[1].params)
  assert not np.array_equal(after["last_layer"], before["last_layer"])
  np.testing.assert_allclose(after["last_layer"], before["last_layer"] * (1 - 1e-3 * 0.05),
                             rtol=1e-6)
  tx = optax.sgd(0.1)
  assert registry.build_method(tiny_config(), TrainLength(2, 16)).wrap_optimizer(tx) is tx


# --- losses on known numbers ------------------------------------------------------------------


def _np_ce(s, p, temp):
  z = s / temp
  log_q = z - z.max(-1, keepdims=True)
  log_q = log_q - np.log(np.exp(log_q).sum(-1, keepdims=True))
  return -(p * log_q).sum(-1)


def test_cross_view_loss_is_the_mean_over_pairs_of_different_views():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(5, 3, 7))  # 2 global + 3 local student views
  p = rng.dirichlet(np.ones(7), size=(2, 3))
  want = np.mean([_np_ce(s[i], p[j], 0.1).mean()
                  for j in range(2) for i in range(5) if i != j])  # 8 pairs
  got = float(losses.cross_view_distillation(jnp.asarray(s), jnp.asarray(p), 0.1))
  assert got == pytest.approx(want, rel=1e-5)


def test_cross_view_loss_ignores_same_view_pairs():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(2, 4, 6))
  p = rng.dirichlet(np.ones(6), size=(2, 4))
  # Student view 0 only pairs with teacher view 1 and vice versa: making each student view
  # disagree wildly with its own teacher view leaves the loss unchanged.
  base = float(losses.cross_view_distillation(jnp.asarray(s), jnp.asarray(p), 0.1))
  want = (_np_ce(s[0], p[1], 0.1).mean() + _np_ce(s[1], p[0], 0.1).mean()) / 2
  assert base == pytest.approx(want, rel=1e-5)
  far = s.copy()
  far[0] = -100 * p[0]  # view 0's student against view 0's teacher: a huge cross entropy
  far[1] = -100 * p[1]
  moved = float(losses.cross_view_distillation(jnp.asarray(far), jnp.asarray(p), 0.1))
  want_far = (_np_ce(far[0], p[1], 0.1).mean() + _np_ce(far[1], p[0], 0.1).mean()) / 2
  assert moved == pytest.approx(want_far, rel=1e-5)
  assert want_far < (_np_ce(far[0], p[0], 0.1).mean() + _np_ce(far[1], p[1], 0.1).mean()) / 2


def test_patch_loss_uses_only_masked_positions_and_weights_per_image():
  rng = np.random.default_rng(2)
  s = rng.normal(size=(2, 3, 5, 4))
  p = rng.dirichlet(np.ones(4), size=(2, 3, 5))
  mask = rng.random((2, 3, 5)) < 0.5
  mask[1, 2] = False  # an unmasked image counts as 0
  ce = _np_ce(s, p, 0.1)
  want = np.mean((ce * mask).sum(-1) / np.maximum(mask.sum(-1), 1))
  got = float(losses.masked_patch_distillation(jnp.asarray(s), jnp.asarray(p),
                                               jnp.asarray(mask), 0.1))
  assert got == pytest.approx(want, rel=1e-5)
  s_visible_changed = np.where(mask[..., None], s, rng.normal(size=s.shape) * 10)
  same = float(losses.masked_patch_distillation(jnp.asarray(s_visible_changed), jnp.asarray(p),
                                                jnp.asarray(mask), 0.1))
  assert same == pytest.approx(got, rel=1e-6)
  s_masked_changed = np.where(mask[..., None], s + rng.normal(size=s.shape), s)
  assert float(losses.masked_patch_distillation(jnp.asarray(s_masked_changed), jnp.asarray(p),
                                                jnp.asarray(mask), 0.1)) != pytest.approx(got)


def test_teacher_probs_and_center_update_formulas():
  rng = np.random.default_rng(3)
  t = rng.normal(size=(6, 5))
  center = rng.normal(size=(1, 5))
  z = (t - center) / 0.04
  want = np.exp(z - z.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(losses.teacher_probs(jnp.asarray(t), jnp.asarray(center), 0.04),
                             want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.center_update(jnp.asarray(center), jnp.asarray(t), 0.9),
                             0.9 * center + 0.1 * t.mean(0, keepdims=True), rtol=1e-6)


# --- multi-crop pipeline and masks ------------------------------------------------------------


def test_multicrop_batches_shapes_masks_and_exact_resume():
  c = tiny_config()
  method, it = _iterator(c, seed=5)
  first = next(it)
  b = c.global_batch_size
  assert first[multicrop.GLOBAL_VIEWS_KEY].shape == (b, 2, 16, 16, 3)
  assert first[multicrop.LOCAL_VIEWS_KEY].shape == (b, 2, 8, 8, 3)
  assert first[multicrop.GLOBAL_MASKS_KEY].shape == (b, 2, 16)
  assert first[multicrop.GLOBAL_MASKS_KEY].dtype == bool
  # 8-bit views ship as uint8, normalised in the step.
  assert first[multicrop.GLOBAL_VIEWS_KEY].dtype == first[multicrop.LOCAL_VIEWS_KEY].dtype == np.uint8
  assert "image" not in first  # the views only: the step reads no other copy
  assert not np.array_equal(first[multicrop.GLOBAL_VIEWS_KEY][:, 0],
                            first[multicrop.GLOBAL_VIEWS_KEY][:, 1])
  state = it.get_state()
  later = [next(it) for _ in range(2)]
  _, it2 = _iterator(c, seed=5)
  it2.set_state(state)
  for want in later:
    got = next(it2)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_multicrop_placeholder_for_undecodable_image():
  c = tiny_config()
  method = registry.build_method(c, TrainLength(8, 16))
  aug = method.train_augment(c.data, (16, 16), 3)
  out = aug.random_map({"image": None, "label": 3}, np.random.default_rng(0))
  assert not out["valid"] and out["label"] == -1
  assert out[multicrop.GLOBAL_VIEWS_KEY].shape == (2, 16, 16, 3)
  assert out[multicrop.LOCAL_VIEWS_KEY].shape == (2, 8, 8, 3)
  assert out[multicrop.GLOBAL_MASKS_KEY].shape == (2, 16) and not out[multicrop.GLOBAL_MASKS_KEY].any()
  assert not out[multicrop.GLOBAL_VIEWS_KEY].any() and "image" not in out
  good = aug.random_map({"image": np.full((20, 20, 3), 128, np.uint8), "label": 3},
                        np.random.default_rng(0))
  assert good["valid"] and good["label"] == 3


def test_views_normalised_in_the_step_equal_the_hosts(stepped):
  """uint8 views normalised by the step (`normalize_views`) give the loss of the same views
  normalised on the host (`Normalizer`), to float32 rounding; float32 views pass through, and
  without photometric steps (which need 8 bits) the views ship normalised as float32."""
  method, batch, states, _ = stepped
  norm = transforms.Normalizer(*method.norm, channels=3)
  host = {k: (jnp.asarray(norm(np.asarray(x))) if k in (multicrop.GLOBAL_VIEWS_KEY,
                                                         multicrop.LOCAL_VIEWS_KEY) else x)
          for k, x in batch.items()}
  for k in (multicrop.GLOBAL_VIEWS_KEY, multicrop.LOCAL_VIEWS_KEY):
    np.testing.assert_allclose(multicrop.normalize_views(batch[k], *method.norm), host[k],
                               rtol=0, atol=1e-6)
    assert multicrop.normalize_views(host[k], *method.norm) is host[k]
  rng = jax.random.key(3)
  loss = jax.jit(lambda b: method.loss(states[1].params, states[1].extra, b, rng)[0])
  np.testing.assert_allclose(loss(batch), loss(host), rtol=1e-5)
  # 16-bit pixels (no photometrics: they need 8 bits) become float32 views, normalised.
  plain = tiny_config(**{"multicrop.jitter_prob": 0.0, "multicrop.grayscale_prob": 0.0,
                         "multicrop.solarize_prob": 0.0, "multicrop.blur": False})
  aug = registry.build_method(plain, TrainLength(8, 16)).train_augment(plain.data, (16, 16), 3)
  deep = np.zeros((20, 20, 3), np.uint16)  # black: (0 - mean) / std < -1 in every channel
  out = aug.random_map({"image": transforms.as_unit_range(deep), "label": 1},
                       np.random.default_rng(0))
  views = out[multicrop.GLOBAL_VIEWS_KEY]
  assert views.dtype == np.float32 and float(views.max()) < -1
  # One dtype per run: without photometrics 8-bit images and placeholders get float32 too, so
  # a folder mixing bit depths never stacks raw uint8 rows beside normalised ones.
  for image in (np.zeros((20, 20, 3), np.uint8), None):
    out = aug.random_map({"image": image, "label": 1}, np.random.default_rng(0))
    assert out[multicrop.GLOBAL_VIEWS_KEY].dtype == np.float32
    assert out[multicrop.LOCAL_VIEWS_KEY].dtype == np.float32


def test_variable_ratio_blockwise_masks_half_the_views_within_the_range():
  gen = masking.MaskGenerator("blockwise", (14, 14), 0.3, ratio_range=(0.1, 0.5),
                              mask_probability=0.5)
  counts = gen.host(np.random.default_rng(0), 400).sum(axis=1)
  unmasked = np.mean(counts == 0)
  assert 0.4 < unmasked < 0.6
  masked = counts[counts > 0]
  assert masked.max() <= int(196 * 0.5) and masked.min() >= 1
  assert masked.std() > 10  # the ratio varies per view
  # The fixed-ratio generator is unchanged.
  fixed = masking.MaskGenerator("blockwise", (14, 14), 0.4)
  np.testing.assert_array_equal(fixed.host(np.random.default_rng(1), 4),
                                masking.blockwise_mask(np.random.default_rng(1), 4, (14, 14), 78))


def test_variable_ratio_blockwise_draws_as_before():
  """The blockwise masks of a variable ratio are those of the per-sample rule they had: one
  generator, mask-or-not, the ratio, then BEiT's rectangles at budget int(N * r)."""
  gen = masking.MaskGenerator("blockwise", (14, 14), 0.3, ratio_range=(0.1, 0.5),
                              mask_probability=0.5)
  ref, want = np.random.default_rng(7), np.zeros((64, 196), bool)
  for b in range(64):
    if ref.random() >= 0.5:
      continue
    want[b] = masking.blockwise_mask(ref, 1, (14, 14), int(196 * ref.uniform(0.1, 0.5)))[0]
  np.testing.assert_array_equal(gen.host(np.random.default_rng(7), 64), want)


def test_random_masks_follow_ratio_range_and_mask_probability():
  """iBOT with masking.kind='random' (iBOT's 'rand' shape) draws its views' masks from the same
  range and probability as blockwise: 2,000 views of the real multi-crop transform (1,000
  images) on an 8x8 patch grid, kind random, ratio_range (0.1, 0.5), mask_probability 0.5.

  Tolerances are 4 standard errors of the sample: the masked-view fraction is a Bernoulli(0.5)
  mean over 2,000 views (SE 0.011); a masked view's ratio is N - int(N * (1 - r)) over N = 64
  for r ~ U(0.1, 0.5), whose mean is computed exactly below and whose spread is about
  0.4 / sqrt(12) = 0.115, over ~1,000 masked views (SE ~0.0037). A fixed ratio (the defect:
  every view at masking.ratio 0.75) fails both by far."""
  c = tiny_config(**{"masking.kind": "random", "masking.ratio_range": (0.1, 0.5),
                     "masking.min_block": 16, "image_size": (32, 32)})
  method = registry.build_method(c, TrainLength(8, 16))
  assert method.masks.kind == "random" and method.masks.grid_hw == (8, 8)
  aug = method.train_augment(c.data, (32, 32), 3)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  masks = np.concatenate([
      aug.random_map({"image": image, "label": 0}, rng)[multicrop.GLOBAL_MASKS_KEY]
      for _ in range(1000)])
  n, views = 64, len(masks)
  assert masks.shape == (2000, n)
  counts = masks.sum(axis=1)
  masked = counts > 0  # a masked view has at least N - int(N * 0.9) = 7 patches
  fraction = masked.mean()
  assert abs(fraction - 0.5) < 4 * np.sqrt(0.25 / views), fraction
  ratios = counts[masked] / n
  r = np.linspace(0.1, 0.5, 400_001)
  exact = np.mean(n - np.floor(n * (1 - r))) / n  # E[ratio | masked], ~0.308
  se = np.sqrt(0.4**2 / 12 / masked.sum())
  assert abs(ratios.mean() - exact) < 4 * se, (ratios.mean(), exact)
  assert ratios.min() >= (n - int(n * 0.9)) / n and ratios.max() <= (n - int(n * 0.5)) / n
  assert 0.09 < ratios.std() < 0.14  # spread over the range, not one fixed ratio
  # Masks that vary per view are drawn on the host only.
  with pytest.raises(ValueError, match="drawn on the host"):
    method.masks.device(jax.random.key(0), 2)
  assert method.masks.num_masked is None and method.masks.on_host


def test_local_views_use_their_own_sincos_grid(stepped):
  """An 8-px local view (a 2 x 2 patch grid) is encoded with the sin-cos table of a 2 x 2
  grid, as an encoder built for 8-px images encodes it with the same weights (not with rows of
  the 16-px global views' 4 x 4 table)."""
  method, _, states, _ = stepped
  params = states[1].params
  view = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  out = method.model.apply({"params": params}, view)
  assert out.shape == (2, 5, 32)
  encoder = method.model.encoder
  assert encoder.posemb == "sincos" and tuple(encoder.image_size) == (16, 16)
  native = encoder.clone(image_size=(8, 8), parent=None)
  want, _ = native.apply({"params": params["encoder"]}, view)
  got, _ = encoder.clone(parent=None).apply({"params": params["encoder"]}, view)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("ibot.teacher_temp", 0.0, "ibot.teacher_temp"),
    ("ibot.student_temp", -0.1, "ibot.student_temp"),
    ("ibot.momentum", 1.5, "ibot.momentum"),
    ("ibot.center_momentum", 1.0, "ibot.center_momentum"),
    ("ibot.warmup_teacher_temp_epochs", 5.0, "num_epochs=2"),
    ("multicrop.local_size", (6, 6), "multiples of the patch size 4"),
    ("multicrop.local_size", (20, 20), "at most image_size"),
    ("multicrop.num_local", -1, "multicrop.num_local"),
    ("multicrop.local_scale", (0.5, 0.2), "multicrop.local_scale"),
    ("masking.ratio_range", (0.5, 0.1), "masking.ratio_range"),
    ("masking.mask_probability", 1.5, "masking.mask_probability"),
    # Settings that would mask nothing, or views that feed no loss: refused, not trained on.
    ("masking.mask_probability", 0.0, r"mask_probability=0.0 is invalid: a probability in "
     r"\(0, 1\] \(iBOT: 0.5; 0 masks no sample\)"),
    ("masking.ratio_range", (0.0, 0.0), r"ratio_range=\(0.0, 0.0\) is invalid: \(lo, hi\) with "
     r"hi > 0"),
    ("ibot.lambda_cls", 0.0, r"multicrop.num_local=2 is invalid: 0 when ibot.lambda_cls=0: the "
     r"local views enter only the \[CLS\] loss"),
    # iBOT has no data.crop_scale (multi-crop's scales replace it); its views read crop_ratio.
    ("data.crop_ratio", (2.0, 1.0), r"data.crop_ratio=\(2.0, 1.0\) is invalid"),
])
def test_bad_fields_name_themselves(field, value, match):
  with pytest.raises(ConfigError, match=match):
    tiny_config(**{field: value})


def test_a_per_sample_ratio_goes_with_any_host_kind_but_not_a_fixed_count():
  """ratio_range / mask_probability hold for every kind drawn in the input pipeline (iBOT's
  'rand' shape too), are refused where every sample must mask the same count (MAE's
  visible-only encoder) and for attention masks, which the step chooses at masking.ratio."""
  from mim_jax.config import validation
  c = tiny_config(**{"masking.kind": "random", "masking.ratio_range": (0.1, 0.3),
                     "masking.min_block": 16})
  assert registry.build_method(c, TrainLength(8, 16)).masks.variable_ratio
  with pytest.raises(ConfigError, match=r"masking.min_block=2 is not used: only "
                     "masking.kind='blockwise' reads it"):
    tiny_config(**{"masking.kind": "random"})  # the file's min_block=2
  mae = tiny_mae_config(**{"masking.ratio_range": (0.5, 0.8)})
  with pytest.raises(ConfigError, match=r"masking.ratio_range=\(0.5, 0.8\) is invalid: \(\) "
                     "for method 'mae'. Its encoder sees only the visible patches"):
    registry.validate_config(mae)
  with pytest.raises(ConfigError, match=r"masking.mask_probability=0.5 is invalid: 1.0 with "
                     "masking.kind='attention'"):
    validation.validate_masking(
        config_defaults.override(tiny_mae_config(), **{"masking.kind": "attention",
                                                       "masking.mask_probability": 0.5}),
        (16, 16), 4, kinds=(*masking.MASK_KINDS, masking.ATTENTION_KIND))


# --- a short run on real data -----------------------------------------------------------------


@pytest.mark.long
@requires_fmnist
def test_short_fashion_mnist_run_lowers_the_loss_without_collapse():
  """40 steps with an EMA teacher (momentum 0.99) at a constant teacher temperature.

  The raw loss is no fixed objective here: it is the teacher's entropy plus the KL divergence
  from the teacher's targets to the student's predictions, and the entropy moves with the
  teacher and its centres (centring flattens the targets in the first steps). So the test
  compares the part the student controls, the [CLS] KL = cls_loss - teacher_entropy (exact:
  every teacher view enters the same number of pairs), at the start and the end: it must fall
  by half. A collapsed teacher would make that trivial, so the targets must also stay
  informative: sharper than uniform per image, and different across images (the batch-mean
  target has a higher entropy than the per-image ones)."""
  c = registry.base_config("ibot")
  config_defaults.use_fashion_mnist(c)
  c.model.update(depth=2)  # the demo width in two blocks (the six of the recipe: 2x the time)
  c.data.update(path=FMNIST_DIR, num_workers=0)
  c.masking.update(kind="blockwise", ratio_range=(0.1, 0.5), mask_probability=0.5,
                   min_block=4)
  c.ibot.update(out_dim=128, hidden_dim=128, bottleneck_dim=64, warmup_teacher_temp_epochs=0.0,
                freeze_last_layer_epochs=0.0, teacher_temp=0.04, teacher_patch_temp=0.04,
                momentum=0.99)
  c.multicrop.update(num_local=2, local_size=(12, 12), blur=False, grayscale_prob=0.0)
  c.global_batch_size = 32
  c.optimizer.update(warmup_epochs=0.0, b2=0.999, weight_decay=0.04, clip_grad_norm=3.0)
  c.num_epochs = 1
  registry.validate_config(c)
  method, it = _iterator(c)
  schedule = optax.constant_schedule(1e-3)
  tx = optim.build_optimizer(c.optimizer, schedule, decay_mask=method.decay_mask)
  state = jax.jit(lambda r: step_lib.init_train_state(method, tx, r, (1, 28, 28, 1)))(
      jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(method, tx, schedule), donate_argnums=(0,))
  kl, ent, mean_ent = [], [], []
  for _ in range(40):
    state, m = step(state, _device_batch(method, next(it)), jax.random.key(1))
    kl.append(float(m["cls_loss"]) - float(m["teacher_entropy"]))
    ent.append(float(m["teacher_entropy"]))
    mean_ent.append(float(m["teacher_mean_entropy"]))
  assert np.all(np.isfinite(kl)) and int(state.skipped_updates) == 0
  start, end = np.mean(kl[:3]), np.mean(kl[-5:])
  assert end < 0.5 * start, (start, end, kl)
  assert np.mean(ent[-5:]) < np.log(128) - 0.3, ent
  assert np.mean(mean_ent[-5:]) > np.mean(ent[-5:]) + 0.2, (mean_ent, ent)


def test_weight_decay_groups_are_ibots_in_the_trainers_optimizer():
  """iBOT decays every parameter of two or more dimensions (the cls token and the mask
  embedding too) and the prototypes' scales ([out_dim, 1] in the release), not biases or norm
  parameters; MAE's groups (the default) exempt the tokens. Checked on the optimizer the
  trainer builds (setup_run): one AdamW update with zero gradients is the decay alone."""
  from mim_jax.training.setup import setup_run

  c = tiny_config(**{"optimizer.weight_decay": 0.05, "optimizer.warmup_epochs": 0.0,
                     "ibot.freeze_last_layer_epochs": 0.0})
  run = setup_run(c, devices=jax.devices()[:1], num_examples=64)
  state = jax.jit(run.init_fn)(jax.random.key(0))
  # Every parameter at 1 (biases start at 0, where a decay would not show).
  params = jax.tree.map(np.ones_like, jax.device_get(state.params))
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = run.tx.update(zeros, run.tx.init(params), params)
  moved = {"/".join(str(getattr(k, "key", k)) for k in path): bool(np.any(u != 0))
           for path, u in jax.tree_util.tree_leaves_with_path(updates)}
  for name in ("encoder/cls_token", "encoder/mask_token", "head/last_layer_scale",
               "head/last_layer", "head/mlp_0/kernel", "encoder/patch_embed/kernel"):
    assert moved[name], name
  for name in ("encoder/patch_embed/bias", "head/mlp_0/bias",
               "encoder/transformer/norm/scale", "encoder/transformer/blocks_0/norm1/bias"):
    assert not moved[name], name
  mae = optim.weight_decay_mask(params)
  assert not mae["encoder"]["cls_token"] and not mae["head"]["last_layer_scale"]


def test_head_starts_as_dino_and_ibot_do():
  """The MLP from N(0, 0.02) truncated; the prototype directions from PyTorch's default linear
  init, U(+-1/sqrt(fan_in)), measured here on torch.nn.Linear itself (iBOT's head.py makes
  that layer after applying its init), so only the layout [in, out] vs [out, in] differs."""
  torch = pytest.importorskip("torch")
  from mim_jax.models.heads import DINOHead

  bottleneck, out = 128, 4096
  head = DINOHead(out_dim=out, hidden_dim=64, bottleneck_dim=bottleneck, norm_last_layer=False)
  params = head.init(jax.random.key(0), jnp.zeros((1, 32)))["params"]
  ours = np.asarray(params["last_layer"])
  torch.manual_seed(0)
  theirs = torch.nn.Linear(bottleneck, out, bias=False).weight.detach().numpy().T
  assert ours.shape == theirs.shape
  bound = 1 / np.sqrt(bottleneck)
  for w in (ours, theirs):
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.999 * bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.01)
    np.testing.assert_allclose(w.mean(), 0, atol=2e-4)
  # The column norms an optimizer step is measured against: the reference's, not 0.02's.
  np.testing.assert_allclose(np.linalg.norm(ours, axis=0).mean(),
                             np.linalg.norm(theirs, axis=0).mean(), rtol=0.01)
  np.testing.assert_array_equal(params["last_layer_scale"], np.ones(out))
  # timm's trunc_normal_(std=0.02) cuts at +-2 itself, not at 2 std: a plain N(0, 0.02) here.
  np.testing.assert_allclose(np.asarray(params["mlp_0"]["kernel"]).std(), 0.02, rtol=0.05)


def test_the_head_computes_in_the_models_dtype():
  """model.dtype=bfloat16 reaches the head's four matmuls (it ran them in float32 whatever the
  encoder did); its parameters, normalisations and logits stay float32, and in float32 it is
  the float32 head."""
  c = tiny_config(**{"model.dtype": "bfloat16"})
  method = registry.build_method(c, TrainLength(8, 16))
  head = method.model.head
  x = jax.random.normal(jax.random.key(0), (2, 5, 32), jnp.bfloat16)
  params = head.init(jax.random.key(1), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  dots = [e for e in jax.make_jaxpr(lambda p: head.apply({"params": p}, x))(params).eqns
          if e.primitive.name == "dot_general"]
  assert len(dots) == 4 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  logits = head.apply({"params": params}, x)
  assert logits.dtype == jnp.float32
  f32 = head.clone(dtype=jnp.float32).apply({"params": params}, x.astype(jnp.float32))
  np.testing.assert_allclose(logits, f32, rtol=0.05, atol=0.05)


def test_configs_follow_the_recipe():
  from ml_collections import config_flags

  from conftest import REPO

  def load(name):
    return config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
        "config", str(REPO / "configs" / name)).get_config(None)

  s = load("ibot_vits.py")
  assert (s.method, s.model.variant, s.global_batch_size, s.num_epochs) == ("ibot", "S/16", 1024, 800)
  o = s.optimizer
  assert (o.base_lr, o.lr_batch_reference, o.warmup_epochs, o.weight_decay, o.clip_grad_norm,
          o.min_lr) == (5e-4, 256, 10, 0.04, 3.0, 1e-6)
  assert (o.weight_decay_schedule, o.weight_decay_end) == ("cosine", 0.4)
  b = s.ibot
  assert (b.out_dim, b.hidden_dim, b.bottleneck_dim, b.norm_last_layer) == (8192, 2048, 256, False)
  assert (b.student_temp, b.warmup_teacher_temp, b.teacher_temp, b.warmup_teacher_temp_epochs,
          b.momentum, b.center_momentum, b.freeze_last_layer_epochs) == (
              0.1, 0.04, 0.07, 30, 0.996, 0.9, 1)
  m = s.multicrop
  assert (tuple(m.global_scale), tuple(m.local_scale), m.num_local, tuple(m.local_size)) == (
      (0.25, 1.0), (0.05, 0.25), 10, (96, 96))
  k = s.masking
  assert (k.kind, tuple(k.ratio_range), k.mask_probability, k.min_block) == (
      "blockwise", (0.1, 0.5), 0.5, 16)
  # The release's min_num_patches, (min(H, W) // 3) ** 2 of the grid: 81 on S/8's 28 x 28.
  s8 = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      "config", str(REPO / "configs" / "ibot_vits.py")).get_config("variant=S/8")
  assert s8.masking.min_block == (28 // 3) ** 2 == 81
  assert s.model.drop_path_rate == 0.1
  f, mae = load("ibot_fmnist.py"), load("mae_fmnist.py")
  assert f.model.to_dict() == {k: v for k, v in mae.model.items() if k in f.model}
  assert f.num_epochs == mae.num_epochs
  assert f.global_batch_size == mae.global_batch_size
  assert f.optimizer.base_lr == mae.optimizer.base_lr


def test_memory_plan_compiles_the_multi_crop_step():
  """The memory plan feeds iBOT's step the views and masks its pipeline makes."""
  from mim_jax import memory_plan
  c = tiny_config()
  plan = memory_plan.plan(c)
  b = c.global_batch_size
  # uint8 global + local views (8-bit data), int32 labels, bool masks.
  expected = b * (2 * 16 * 16 * 3 + 2 * 8 * 8 * 3) + b * (4 + 2 * 16)
  assert plan["batch"] == expected, plan
  assert plan["xla_temp"] > 0 and plan["params"] > 0 and plan["extra"] > 0, plan


def test_init_from_a_workdir_reads_the_teacher_it_exports(tmp_path):
  """iBOT releases its EMA teacher: a workdir's checkpoint is read as the teacher by init_from
  and the converter, the weights its export and the evaluations hold (it was the student)."""
  from mim_jax.convert import our_weights
  from mim_jax.training import loop as train
  workdir = str(tmp_path / "ibot")
  state = train.run(tiny_config(total_steps=2), workdir)
  _, from_checkpoint = our_weights.read_weights(workdir, all_parts=True)
  _, exported = our_weights.read_weights(f"{workdir}/encoder")
  teacher, student = state.extra["teacher"], state.params
  for a, b, t, s in zip(jax.tree.leaves(from_checkpoint["encoder"]),
                        jax.tree.leaves(exported["encoder"]),
                        jax.tree.leaves(teacher["encoder"]), jax.tree.leaves(student["encoder"]),
                        strict=True):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.asarray(t))
  assert any(not np.array_equal(t, s) for t, s in zip(jax.tree.leaves(teacher["encoder"]),
                                                      jax.tree.leaves(student["encoder"])))
  for a, t in zip(jax.tree.leaves(from_checkpoint["head"]), jax.tree.leaves(teacher["head"]),
                  strict=True):
    np.testing.assert_array_equal(a, np.asarray(t))
