"""AdamW weight-decay mask and the warmup + half-cosine schedule."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mim_jax.methods import mae
from mim_jax.training import optim

from conftest import tiny_mae_config


def _opt_cfg(**kw):
  base = dict(name="adamw", base_lr=1.5e-4, lr_batch_reference=256, min_lr=1e-6, b1=0.9,
              b2=0.95, eps=1e-8, weight_decay=0.05, warmup_epochs=2.0, clip_grad_norm=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_schedule_warmup_peak_and_half_cosine():
  cfg = _opt_cfg()
  sched = optim.learning_rate_schedule(cfg, global_batch_size=4096, steps_per_epoch=10,
                                       schedule_steps=100)
  peak = 1.5e-4 * 4096 / 256
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(float(sched(20)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 1e-6 + (peak - 1e-6) * 0.5, rtol=1e-5)
  # A quarter into the decay, where a half cosine and a straight line differ (2.05e-3 vs 1.80e-3).
  np.testing.assert_allclose(float(sched(40)),
                             1e-6 + (peak - 1e-6) * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-5)
  np.testing.assert_allclose(float(sched(100)), 1e-6, rtol=1e-5)


def test_weight_decay_mask_excludes_biases_norms_and_tokens():
  model = mae.build_model(tiny_mae_config())
  params = jax.eval_shape(lambda r: model.init({"params": r, "masking": r},
                                               jnp.zeros((1, 16, 16, 3)))["params"],
                          jax.random.key(0))
  mask = optim.weight_decay_mask(params)
  enc, dec = mask["encoder"], mask["decoder"]
  assert enc["patch_embed"]["kernel"] and not enc["patch_embed"]["bias"]
  assert enc["transformer"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert not enc["transformer"]["blocks_0"]["attn"]["qkv"]["bias"]
  assert not enc["transformer"]["blocks_0"]["norm1"]["scale"]
  assert not enc["cls_token"] and not dec["mask_token"]
  assert dec["decoder_pred"]["kernel"]


def test_weight_decay_applies_only_to_masked_in_params():
  cfg = _opt_cfg(warmup_epochs=0.0, min_lr=1.0, base_lr=256.0, weight_decay=0.5)
  tx = optim.build_optimizer(cfg, lambda step: 1.0)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "cls_token": jnp.ones((1, 1, 2))}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  assert float(jnp.abs(updates["dense"]["kernel"]).sum()) > 0  # decayed
  assert float(jnp.abs(updates["dense"]["bias"]).sum()) == 0
  assert float(jnp.abs(updates["cls_token"]).sum()) == 0


@pytest.mark.parametrize("clip,expected_norm", [(1.0, 0.1), (0.0, 0.1 * 20.0)])
def test_gradient_clipping_is_applied_before_adam(clip, expected_norm):
  cfg = _opt_cfg(clip_grad_norm=clip, weight_decay=0.0)
  tx = optim.build_optimizer(cfg, lambda step: 1.0)
  grads = {"w": jnp.full((4,), 10.0)}  # global norm 20
  _, state = tx.update(grads, tx.init(grads), grads)
  adam_state = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
                if hasattr(s, "mu")][0]
  # Adam's first moment after one step is (1 - b1) * (clipped) gradient.
  np.testing.assert_allclose(float(optax.tree_utils.tree_norm(adam_state.mu)), expected_norm,
                             rtol=1e-5)


@pytest.mark.parametrize("warmup_epochs", [1.0, 0.96])
def test_a_warmup_as_long_as_the_run_is_a_linear_rise(warmup_epochs):
  """warmup_epochs = num_epochs passes validation; the cosine had no steps left and optax
  raised (also when rounding made the warmup the whole run)."""
  cfg = _opt_cfg(base_lr=1.0, lr_batch_reference=256, warmup_epochs=warmup_epochs)
  schedule = optim.learning_rate_schedule(cfg, 256, steps_per_epoch=10, schedule_steps=10)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5, 9)], [0.0, 0.5, 0.9],
                             rtol=1e-6)


def test_a_min_lr_that_rounding_leaves_unread_is_named_in_the_log(caplog):
  """Validation refuses min_lr with warmup_epochs = num_epochs; a warmup that rounds to the
  whole schedule in steps (0.96 epochs of 10 steps) cannot be seen there: the log says it."""
  cfg = _opt_cfg(base_lr=1.0, lr_batch_reference=256, warmup_epochs=0.96, min_lr=1e-5)
  with caplog.at_level(logging.WARNING, logger="mim_jax.training.optim"):
    optim.learning_rate_schedule(cfg, 256, steps_per_epoch=10, schedule_steps=10)
  assert "optimizer.min_lr=1e-05 is not used: warmup_epochs=0.96 rounds to all 10 steps" \
      in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="mim_jax.training.optim"):
    optim.learning_rate_schedule(cfg, 256, steps_per_epoch=10, schedule_steps=20)
  assert "min_lr" not in caplog.text


def test_per_tensor_clipping_scales_each_gradient_above_the_threshold_on_its_own():
  """optimizer.clip_per_tensor: DINO/iBOT's clip_gradients, each parameter's gradient scaled by
  clip / (norm + 1e-6) where that is < 1; the others untouched (a global clip would scale all)."""
  cfg = _opt_cfg(clip_grad_norm=3.0, clip_per_tensor=True, weight_decay=0.0)
  tx = optim.build_optimizer(cfg, lambda step: 1.0)
  grads = {"big": jnp.full((4,), 10.0), "small": jnp.array([0.3, -0.4])}  # norms 20 and 0.5
  _, state = tx.update(grads, tx.init(grads), grads)
  mu = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
        if hasattr(s, "mu")][0].mu
  np.testing.assert_allclose(mu["big"], 0.1 * 10.0 * 3.0 / (20.0 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(mu["small"], 0.1 * np.array([0.3, -0.4]), rtol=1e-6)


def test_cosine_weight_decay_schedule_decays_by_its_coefficient_at_each_step():
  """With zero gradients AdamW's update is -lr * wd(step) * param on decayed leaves only."""
  cfg = _opt_cfg(weight_decay=0.04, weight_decay_schedule="cosine", weight_decay_end=0.4)
  tx = optim.build_optimizer(cfg, lambda step: 1.0, schedule_steps=10)
  params = {"dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.ones(2)}}
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  expected = [0.4 + (0.04 - 0.4) * 0.5 * (1 + np.cos(np.pi * min(t / 10, 1.0)))
              for t in range(12)]
  for step in range(12):
    updates, state = tx.update(zero, state, params)
    np.testing.assert_allclose(np.asarray(updates["dense"]["kernel"]), -expected[step] * 2.0,
                               rtol=1e-5)
    assert float(jnp.abs(updates["dense"]["bias"]).sum()) == 0
  assert expected[0] == pytest.approx(0.04) and expected[10] == pytest.approx(0.4)


def test_weight_decay_schedule_needs_its_length_and_a_known_name():
  with pytest.raises(ValueError, match="schedule's length"):
    optim.build_optimizer(_opt_cfg(weight_decay_schedule="cosine", weight_decay_end=0.4),
                          lambda step: 1.0)
  with pytest.raises(ValueError, match="weight_decay_schedule='linear'"):
    optim.build_optimizer(_opt_cfg(weight_decay_schedule="linear"), lambda step: 1.0, 10)


def test_bfloat16_first_moment_keeps_the_second_in_float32_and_follows_float32_adam():
  params = {"w": jax.random.normal(jax.random.key(0), (64,))}
  runs = {}
  for mu_dtype in ("", "bfloat16"):
    tx = optim.build_optimizer(_opt_cfg(mu_dtype=mu_dtype, weight_decay=0.0), lambda s: 1e-2)
    p, state = params, tx.init(params)
    for i in range(10):
      grads = {"w": jax.random.normal(jax.random.key(i + 1), (64,)) + p["w"]}
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    runs[mu_dtype] = p["w"], adam
  assert runs["bfloat16"][1].mu["w"].dtype == jnp.bfloat16
  assert runs["bfloat16"][1].nu["w"].dtype == jnp.float32 == runs[""][1].mu["w"].dtype
  moved = np.abs(np.asarray(runs[""][0] - params["w"])).max()
  gap = np.abs(np.asarray(runs["bfloat16"][0] - runs[""][0])).max()
  assert gap < 0.02 * moved, (gap, moved)  # bfloat16 rounding, not a different optimizer


def test_mu_dtype_is_checked_and_read_by_adamw_only():
  from mim_jax.config.errors import ConfigError
  from mim_jax.registry import validate_config
  validate_config(tiny_mae_config(**{"optimizer.mu_dtype": "bfloat16"}))
  with pytest.raises(ConfigError, match="optimizer.mu_dtype='float16' is invalid"):
    validate_config(tiny_mae_config(**{"optimizer.mu_dtype": "float16"}))
  with pytest.raises(ConfigError, match="optimizer.mu_dtype.*only optimizer.name='adamw'"):
    validate_config(tiny_mae_config(**{"optimizer.mu_dtype": "bfloat16",
                                       "optimizer.name": "sgd"}))


def test_a_hold_keeps_the_masked_leaves_exactly_for_its_updates_then_lets_them_move():
  """optim.hold_during_first_updates: the selected leaves stay bitwise (weight decay
  included) for the first `steps` updates; the others move from the first one."""
  params = {"held": jnp.ones(2), "free": jnp.ones(2)}
  tx = optim.hold_during_first_updates(optax.adamw(0.1, weight_decay=0.5), 2,
                                       {"held": True, "free": False})
  state = tx.init(params)
  history = []
  for _ in range(3):
    updates, state = tx.update({k: jnp.full(2, 0.3) for k in params}, state, params)
    params = optax.apply_updates(params, updates)
    history.append({k: np.asarray(v) for k, v in params.items()})
  np.testing.assert_array_equal(history[1]["held"], np.ones(2))
  assert np.all(history[0]["free"] < 1) and np.all(history[2]["held"] < 1)
  sgd = optax.sgd(0.1)
  assert optim.hold_during_first_updates(sgd, 0, {"a": True}) is sgd  # no hold, no state
