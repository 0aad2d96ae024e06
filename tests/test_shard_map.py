"""The shard_map form of the train step (explicit collectives) equals the global jit step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mim_jax import registry
from mim_jax.config.errors import ConfigError

from conftest import FAST_COMPILE_XLA_FLAGS, REPO, tiny_config

_SCRIPT = textwrap.dedent("""
    import chex, jax, numpy as np
    from mim_jax.methods.mae import NOISE_KEY
    from mim_jax.training import setup
    from mim_jax.training import step as step_lib
    from conftest import tiny_config

    assert jax.device_count() == 8

    def run(config, steps=3):
      r = setup.setup_run(setup.prepare(config), num_examples=64)
      state = r.init_state(r.keys()[0])
      state = step_lib.with_initial_weights(r.method, state, r.state_shardings)
      step = r.jit_step()
      shapes = setup.abstract_batch(r, 16)
      rng = np.random.default_rng(0)
      metrics = []
      for i in range(steps):
        batch = {}
        for key, spec in shapes.items():
          if spec.dtype == np.bool_:      # host-drawn masks: any pattern, varying per image
            batch[key] = rng.random(spec.shape) < 0.4
          elif np.issubdtype(spec.dtype, np.integer):
            batch[key] = rng.integers(0, 10, spec.shape).astype(spec.dtype)
          else:
            batch[key] = rng.standard_normal(spec.shape).astype(spec.dtype)
        if config.method == "mae":        # MAE's masks from given noise: the same in both steps
          batch[NOISE_KEY] = rng.random((16, 16)).astype(np.float32)
        batch = jax.device_put(batch, r.batch_sharding)
        if i == 0:  # the step asked for: shard_map or not, its micro-batch loop
          program = str(step.trace(state, batch, jax.random.key(7)).jaxpr)
          assert ("shard_map" in program) == (config.parallel.step == "shard_map"), config.method
          accum = int(config.grad_accum_steps)
          assert accum == 1 or f"length={accum}" in program, config.method
        state, m = step(state, batch, jax.random.key(7))
        metrics.append(jax.device_get(m))
      return jax.device_get(state), metrics

    # SGD at lr 0.25 from the first step: the weights move by about 0.1 a step, so that the
    # steps after the first compare updated weights (the tiny configs' AdamW warmup starts at
    # lr 0 and stays below 5e-6 over three steps).
    MOVING = {"optimizer.name": "sgd", "optimizer.base_lr": 4.0, "optimizer.warmup_epochs": 0.0,
              "optimizer.weight_decay": 0.0}

    def compare(method, guard="", **overrides):
      # `guard`: the shard_map step's nonfinite_guard ("select", the accelerators' default,
      # against the global step's "cond", this CPU's: the two equal across forms too).
      base = dict(global_batch_size=16, **{**MOVING, **overrides})
      g_state, g_metrics = run(tiny_config(method, **base))
      s_state, s_metrics = run(tiny_config(method, **{**base, "parallel.step": "shard_map",
                                                      "nonfinite_guard": guard}))
      for g, s in zip(g_metrics, s_metrics):
        assert float(g["update_norm"]) > 0.02, (method, g["update_norm"])
        chex.assert_trees_all_close({k: g[k] for k in ("loss", "grad_norm", "update_norm")},
                                    {k: s[k] for k in ("loss", "grad_norm", "update_norm")},
                                    rtol=2e-5)
      # The two steps sum the gradients in another order (per-device sums, then psum): float32
      # rounding of the gradients, taken at lr 0.25 and carried through three steps in which
      # the weights move by about 0.1 each (2.3e-6 seen on a parameter of 0.008 on an Intel
      # Xeon VM). A step that dropped a device's share would differ by about 0.1.
      chex.assert_trees_all_close(g_state.params, s_state.params, rtol=2e-5, atol=1e-5)
      chex.assert_trees_all_close(g_state.extra, s_state.extra, rtol=2e-5, atol=1e-5)
      print(method, "same after 3 steps: loss", [float(m["loss"]) for m in s_metrics])

    compare("mae")
    compare("ibot", guard="select", **{"masking.min_block": 1, "ibot.out_dim": 32, "ibot.hidden_dim": 32,
                       "ibot.bottleneck_dim": 16, "ibot.warmup_teacher_temp_epochs": 1.0,
                       "ibot.freeze_last_layer_epochs": 0.0, "multicrop.num_local": 2,
                       "multicrop.local_size": (8, 8), "multicrop.blur": False})
    compare("linprobe", init_from="random", **{"optimizer.name": "sgd",
                                               "optimizer.base_lr": 0.5,
                                               "optimizer.weight_decay": 0.0})
    compare("simmim", **{"masking.kind": "blockwise", "masking.ratio": 0.5,
                         "masking.min_block": 2}, guard="select", grad_accum_steps=2)
    # The trainer with the switch: checkpoints, metrics and the export as with the jit step.
    import os, tempfile
    from mim_jax.training import loop
    workdir = tempfile.mkdtemp()
    state = loop.run(tiny_config("mae", global_batch_size=16, total_steps=2,
                                 **{"parallel.step": "shard_map"}), workdir)
    assert int(state.step) == 2 and os.path.isfile(os.path.join(workdir, "encoder", "model.json"))
    print("OK")
""")


@pytest.mark.long
def test_shard_map_step_equals_the_jit_step_on_8_devices(tmp_path):
  """MAE (masks from noise), iBOT (per-view host masks of varying counts, centres), the linear
  probe (BatchNorm statistics) and SimMIM with accumulation: three steps of the per-device
  step under shard_map give the loss, gradient norm, parameters and extra state of the global
  step (iBOT's and SimMIM's with the other non-finite guard); the trainer runs with
  parallel.step='shard_map'."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             + FAST_COMPILE_XLA_FLAGS,
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
             TMPDIR=str(tmp_path))  # the script's workdir (tempfile.mkdtemp) goes with it
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-6000:]


def test_user_code_calls_the_step_under_its_own_shard_map():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "mim_jax.examples.shard_map_loop"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "step 3:" in out.stdout and "on 4 device(s)" in out.stdout


_FEW_MASKED_SCRIPT = textwrap.dedent("""
    import types
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from mim_jax.objectives import losses
    from mim_jax.objectives.masking import TOKEN_MASK_KEY
    from mim_jax.training import step as step_lib

    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()), ("d",))
    per_patch = np.random.default_rng(0).random((8, 16)).astype(np.float32)
    mask = np.zeros((8, 16), bool)
    mask[[0, 3, 5], [2, 7, 11]] = True  # 3 masked patches in the whole batch, on 3 devices
    per_device = jax.jit(jax.shard_map(
        lambda x, m: jax.lax.pmean(losses.masked_mean(x, m, "d"), "d"), mesh=mesh,
        in_specs=(P("d"), P("d")), out_specs=P()))
    np.testing.assert_allclose(per_device(per_patch, mask), losses.masked_mean(per_patch, mask),
                               rtol=1e-6)
    # The microbatches' weights in an accumulated step: rows 0 (microbatch 0), 3 and 5 (1).
    method = types.SimpleNamespace(loss_is_masked_mean=True)
    micro = {TOKEN_MASK_KEY: mask.reshape(4, 2, 16).swapaxes(0, 1)}
    weights = jax.jit(jax.shard_map(
        lambda m: step_lib._masked_share_weights(method, {TOKEN_MASK_KEY: m}, 2, "d"),
        mesh=mesh, in_specs=P(None, "d"), out_specs=P()))(micro[TOKEN_MASK_KEY])
    np.testing.assert_allclose(weights, step_lib._masked_share_weights(method, micro, 2, None))
    np.testing.assert_allclose(weights, [2 / 3, 4 / 3], rtol=1e-6)
    print("OK")
""")


def test_masked_means_equal_the_global_step_with_fewer_masked_patches_than_devices():
  """A batch with fewer masked patches than devices (3 on 4): the per-device masked mean and the
  accumulation weights are the whole batch's, as in the global step. The per-device count was
  floored at one patch on every device, dividing the sum by the device count (0.38 x the loss
  and gradients of the global step on 8 devices, 0.08 x with 2 microbatches)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-c", _FEW_MASKED_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-4000:]


@pytest.mark.parametrize("overrides, match", [
    ({"sharding_rules": ((".*", "largest:fsdp:16384"),), "mesh": (("fsdp", -1),)},
     r"config.sharding_rules=.*replicate-only rules"),
    ({"parallel.step": "pmap"}, r"config.parallel.step='pmap' is invalid: one of"),
])
def test_shard_map_needs_replicated_state(overrides, match):
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(tiny_config("mae", **{"parallel.step": "shard_map", **overrides}))


@pytest.mark.parametrize("spec", [(), "replicate", None, (None, None)])
def test_shard_map_takes_every_replicating_spec(spec):
  """The specs that replicate (parallel._parse_spec): "replicate" and (None, None) were refused
  as not replicate-only, None failed with a TypeError."""
  registry.validate_config(tiny_config("mae", **{"parallel.step": "shard_map",
                                                 "sharding_rules": ((".*", spec),)}))


def test_methods_whose_statistics_do_not_follow_an_axis_refuse_shard_map():
  with pytest.raises(ConfigError, match=r"config.parallel.step='shard_map' is invalid: 'jit' "
                     r"for method 'vq_tokenizer'"):
    registry.validate_config(tiny_config("vq_tokenizer", **{"parallel.step": "shard_map"}))
