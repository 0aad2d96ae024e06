"""Mesh construction and a data-parallel step on 8 simulated CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mim_jax import parallel
from mim_jax.config_errors import ConfigError

from conftest import REPO


def test_mesh_shape_resolves_minus_one():
  assert parallel.mesh_shape([("data", -1)], 8) == {"data": 8}
  assert parallel.mesh_shape([("data", -1), ("fsdp", 2)], 8) == {"data": 4, "fsdp": 2}


@pytest.mark.parametrize("mesh,match", [
    ([("data", 3)], "multiply to 3 but there are 8"),
    ([("data", -1), ("fsdp", -1)], "at most one -1"),
    ([("data", -1), ("fsdp", 3)], "must divide"),
    ([("data", 4), ("data", 2)], "distinct axis names"),
])
def test_bad_mesh_is_a_config_error(mesh, match):
  with pytest.raises(ConfigError, match=match):
    parallel.mesh_shape(mesh, 8)


_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, functools
    from mim_jax import parallel, train
    from mim_jax.methods import build_method
    from conftest import tiny_mae_config

    assert jax.device_count() == 8, jax.devices()
    config = tiny_mae_config(global_batch_size=16)
    method = build_method(config)
    # SGD: the update is linear in the gradient, so float-order differences stay small (Adam's
    # first step is ~sign(grad) and would amplify them on near-zero gradients).
    tx = optax.sgd(0.5)
    images = np.asarray(jax.random.normal(jax.random.key(0), (16, 16, 16, 3)))

    def one_step(devices, accum):
      mesh = parallel.make_mesh([("data", -1)], devices)
      init = functools.partial(train.init_train_state, method, tx, image_shape=(1, 16, 16, 3))
      abstract = jax.eval_shape(init, jax.random.key(1))
      shardings = parallel.tree_shardings(mesh, abstract, [(".*", ())])
      state = jax.jit(init, out_shardings=shardings)(jax.random.key(1))
      bsh = parallel.batch_sharding(mesh)
      batch = {"image": parallel.host_batch_to_global(images, bsh)}
      assert len(batch["image"].addressable_shards) == len(devices)
      step = jax.jit(train.make_train_step(method, tx, lambda s: 1e-3, accum),
                     in_shardings=(shardings, {"image": bsh}, parallel.replicated(mesh)),
                     out_shardings=(shardings, parallel.replicated(mesh)))
      new_state, metrics = step(state, batch, jax.random.key(2))
      return jax.device_get(new_state.params), jax.device_get(metrics)

    p1, m1 = one_step(jax.devices()[:1], 1)
    p8, m8 = one_step(jax.devices(), 1)
    p8a, m8a = one_step(jax.devices(), 2)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.isfinite(m8a["loss"])
    print("OK", float(m1["loss"]), float(m8["loss"]))
""")


def test_data_parallel_step_on_8_devices_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr
