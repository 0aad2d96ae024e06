"""Mesh, sharding rules, remat and the 8-device checks (simulated CPU devices, one subprocess)."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mim_jax import registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config import validation
from mim_jax.config.errors import ConfigError
from mim_jax.training import parallel
from mim_jax.training import step as step_lib

from conftest import FAST_COMPILE_XLA_FLAGS, REPO, imagenet_config_without_its_data, tiny_mae_config


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


def _fake_mesh(**shape):
  """What leaf_spec reads of a mesh: its axis sizes and device count."""
  return types.SimpleNamespace(shape=shape, devices=np.empty(int(np.prod(list(shape.values())))))


def test_largest_rule_shards_the_largest_divisible_dim():
  mesh = _fake_mesh(fsdp=4)
  parsed = parallel._parse_spec((".*", "largest:fsdp:100"), mesh)
  spec = lambda shape: parallel.leaf_spec(mesh, parsed, shape, (".*", "x"), "leaf")
  assert spec((768, 2304)) == P(None, "fsdp")
  assert spec((2304, 768)) == P("fsdp")
  assert spec((6, 768, 768)) == P(None, "fsdp")      # the first of equal largest dims
  assert spec((1, 197, 768)) == P(None, None, "fsdp")  # 197 is not divisible by 4
  assert spec((768,)) == P("fsdp")
  assert spec((10,)) == P()                           # below min_size: replicated
  assert spec((99, 3)) == P()                         # nothing divisible: replicated
  assert spec(()) == P()


def test_fsdp_preset_and_config_arguments(prepared_tfds_root):
  assert config_defaults.fsdp_rules() == ((".*", "largest:fsdp:16384"),)
  c = configs_mae_vith("fsdp,remat=dots_saveable,bf16")
  assert list(map(tuple, c.mesh)) == [("fsdp", -1)]
  assert list(map(tuple, c.sharding_rules)) == [(".*", "largest:fsdp:16384")]
  assert (c.model.remat, c.model.dtype) == ("dots_saveable", "bfloat16")
  registry.validate_config(c)


def configs_mae_vith(arg):
  import importlib.util
  spec = importlib.util.spec_from_file_location("mae_vith", REPO / "configs" / "mae_vith.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="module")
def mae_state():
  """A micro MAE method, its abstract train state and a 1-device mesh."""
  method = registry.build_method(tiny_mae_config())
  init = functools.partial(step_lib.init_train_state, method, optax.adamw(1e-3),
                           image_shape=(1, 16, 16, 3))
  return method, jax.eval_shape(init, jax.random.key(0)), parallel.make_mesh([("data", -1)])


@pytest.mark.parametrize("rules,match", [
    ([(".*qkv/kernal", (None, "data"))], r"matches none \(mesh \{'data': 1\} on 1 devices\)"),
    ([(".*", (None, "model"))], r"axis 'model' is not an axis of the mesh \{'data': 1\}"),
    ([(".*", "largest")], "largest:AXIS"),
    ([(".*", "largest:tensor")], "axis 'tensor'"),
    ([(".*", (None, None, None, None, None))], "has 5 entries but"),
    # The first matching rule applies: one behind a catch-all would never shard anything.
    ([(".*", ()), ("kernel", "largest:data")], r"every path this one matches is taken before "
     r"it, e.g. by \('.\*', \(\)\)"),
])
def test_bad_sharding_rules_fail_naming_rule_and_mesh(mae_state, rules, match):
  _, abstract, mesh = mae_state
  with pytest.raises(ConfigError, match=match):
    parallel.tree_shardings(mesh, abstract, rules)


def test_catch_all_rule_and_opt_state_paths(mae_state):
  _, abstract, mesh = mae_state
  shardings = parallel.tree_shardings(mesh, abstract, [("qkv/kernel", (None, "data")), (".*", ())])
  names = {parallel.path_string(p): s for p, s in
           jax.tree_util.tree_flatten_with_path(shardings)[0]}
  qkv = [n for n in names if n.endswith("transformer/blocks_0/attn/qkv/kernel")]
  # The rule reaches the parameter and both Adam moments of it.
  assert any(n.startswith("params/") for n in qkv) and len(qkv) == 3, qkv
  assert all(names[n].spec == P(None, "data") for n in qkv)


def test_indivisible_dim_fails_naming_sizes():
  mesh = _fake_mesh(fsdp=3)
  rule = ("qkv", (None, "fsdp"))
  with pytest.raises(ConfigError, match=r"size 100 in dim 1.*3 devices of axis 'fsdp'.*on 3 "):
    parallel.leaf_spec(mesh, parallel._parse_spec(rule, mesh), (32, 100), rule, "qkv")


def test_unsplittable_batch_names_mesh_and_sizes():
  config = tiny_mae_config(global_batch_size=12)
  with pytest.raises(ConfigError, match=r"global_batch_size=12.*= 8.*mesh \{'fsdp': 8\}"):
    validation.validate_for_devices(config, batch_parallelism=8, process_count=1,
                                           mesh_desc="mesh {'fsdp': 8} on 8 devices")


def test_constrain_batch_is_identity_without_a_mesh():
  x = jnp.ones((4, 3))
  assert parallel.constrain_batch(x) is x
  with parallel.activation_mesh(parallel.make_mesh([("data", -1)])):
    assert parallel.constrain_batch(x) is x  # one device: nothing to constrain


def test_remat_gives_the_same_loss_and_gradients():
  """Each policy recomputes every block (2 encoder + 1 decoder in the micro MAE) under its own
  policy, with the loss and gradients of no remat: a policy lost on the way to the model
  would pass the comparison alone."""
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  results = {}
  for policy, policy_name in (("none", None), ("full", "None"),
                              ("dots_saveable", "DotsSaveable")):
    method = registry.build_method(tiny_mae_config(**{"model.remat": policy}))
    params, extra = method.init(jax.random.key(1), images[:1])
    grad_fn = jax.value_and_grad(
        lambda p: method.loss(p, extra, {"image": images}, jax.random.key(2), train=True),
        has_aux=True)
    remats = [e for e in jax.make_jaxpr(grad_fn)(params).jaxpr.eqns
              if e.primitive.name.startswith("remat")]
    assert len(remats) == (0 if policy == "none" else 3), (policy, len(remats))
    assert all(repr(e.params["policy"]).startswith(policy_name) for e in remats), policy
    (loss, _), grads = jax.jit(grad_fn)(params)
    results[policy] = (loss, grads)
  ref_loss, ref_grads = results["none"]
  for policy, (loss, grads) in results.items():
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=policy)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)


def test_remat_is_validated():
  with pytest.raises(ConfigError, match=r"model.remat='some'.*one of"):
    registry.validate_config(tiny_mae_config(**{"model.remat": "some"}))


_SCRIPT = textwrap.dedent("""
    import functools, os, tempfile, time
    T0 = time.time()
    import chex, jax, jax.numpy as jnp, numpy as np, optax
    from mim_jax import memory_plan, registry
    from mim_jax.config import defaults as config_defaults
    from mim_jax.objectives import masking
    from mim_jax.training import checkpoint, loop as train, parallel
    from mim_jax.training import step as step_lib
    from conftest import tiny_mae_config

    assert jax.device_count() == 8, jax.devices()
    FSDP = config_defaults.fsdp_rules(min_size=64)
    REPLICATE = [(".*", ())]
    # SGD with momentum: the first update is linear in the gradient, so float-order differences
    # stay small (Adam's first step is ~sign(grad) and would amplify them on near-zero
    # gradients), and the momentum is optimizer state that the rules shard too.
    tx = optax.sgd(0.5, momentum=0.9)
    images = np.asarray(jax.random.normal(jax.random.key(0), (16, 16, 16, 3)))

    def setup(method, devices, mesh_cfg, rules):
      mesh = parallel.make_mesh(mesh_cfg, devices)
      init = functools.partial(step_lib.init_train_state, method, tx, image_shape=(1, 16, 16, 3))
      abstract = jax.eval_shape(init, jax.random.key(1))
      shardings = parallel.tree_shardings(mesh, abstract, rules)
      return mesh, init, abstract, shardings

    def one_step(method, batch, devices, mesh_cfg, rules, accum=1):
      mesh, init, abstract, shardings = setup(method, devices, mesh_cfg, rules)
      state = jax.jit(init, out_shardings=shardings)(jax.random.key(1))
      bsh = parallel.batch_sharding(mesh)
      batch = {k: parallel.host_batch_to_global(v, bsh) for k, v in batch.items()}
      assert len(batch["image"].addressable_shards) == len(devices)
      step = jax.jit(parallel.with_activation_mesh(
                         mesh, step_lib.make_train_step(method, tx, lambda s: 0.5, accum)),
                     in_shardings=(shardings, {k: bsh for k in batch}, parallel.replicated(mesh)),
                     out_shardings=(shardings, parallel.replicated(mesh)))
      lowered = step.lower(state, batch, jax.random.key(2))
      if len(devices) > 1:  # the blocks' activation constraints are in the program
        assert "@Sharding" in lowered.as_text() or "sharding_constraint" in lowered.as_text()
      if accum > 1:  # the micro-batch loop is in the program (one pass would match too)
        assert f"length={accum}" in str(jax.make_jaxpr(step)(state, batch, jax.random.key(2)))
      new_state, metrics = step(state, batch, jax.random.key(2))
      return new_state, jax.device_get(new_state.params), jax.device_get(metrics)

    def assert_same(ref, other, what):
      (_, p_ref, m_ref), (_, p, m) = ref, other
      chex.assert_trees_all_close((m["loss"], m["grad_norm"]),
                                  (m_ref["loss"], m_ref["grad_norm"]), rtol=1e-5,
                                  custom_message=what)
      chex.assert_trees_all_close(p, p_ref, rtol=1e-5, atol=1e-6, custom_message=what)

    # 1. One device, data parallel, FSDP and data x FSDP: the same step.
    method = registry.build_method(tiny_mae_config(global_batch_size=16))
    batch = {"image": images}
    ref = one_step(method, batch, jax.devices()[:1], [("data", -1)], REPLICATE)
    for mesh_cfg, rules in [([("data", -1)], REPLICATE), ([("fsdp", -1)], FSDP),
                            ([("data", 2), ("fsdp", -1)], FSDP)]:
      out = one_step(method, batch, jax.devices(), mesh_cfg, rules)
      assert_same(ref, out, str(mesh_cfg))
    # Under FSDP the big leaves (params and momentum) live in eighths on the devices.
    state = out[0]
    kernels = {parallel.path_string(p): x for p, x in
               jax.tree_util.tree_flatten_with_path(state)[0]
               if "transformer/blocks_0/mlp/fc1/kernel" in parallel.path_string(p)}
    assert len(kernels) == 2, list(kernels)  # the parameter and its momentum
    for name, x in kernels.items():
      assert "fsdp" in str(x.sharding.spec), (name, x.sharding)
      assert x.addressable_shards[0].data.size * 4 == x.size, name  # fsdp axis of 4
    print("same step on 1 device, data, fsdp, data x fsdp", time.time() - T0)

    # 2. Shape-first init: the jitted init with FSDP out_shardings gives each device only its
    # shards (XLA's own output size per device), never the whole state.
    mesh, init, abstract, shardings = setup(method, jax.devices(), [("fsdp", -1)], FSDP)
    compiled = jax.jit(init, out_shardings=shardings).lower(jax.random.key(1)).compile()
    total = checkpoint.tree_bytes(abstract)
    per_device = compiled.memory_analysis().output_size_in_bytes
    assert per_device < 0.3 * total, (per_device, total)
    assert abs(per_device - parallel.per_device_bytes(shardings, abstract)) < 0.05 * total
    print("init per device", per_device, "of", total, time.time() - T0)

    # 3. Gradient accumulation over 2 micro-batches = one step on the whole batch (SimMIM:
    # its masks come with the batch, so both see the same masks; 8 of 16 patches in every
    # example, so the mean over masked pixels of the batch is the mean of the micro-batches').
    sim = tiny_mae_config(method="simmim", global_batch_size=16)
    sim.masking.update(kind="blockwise", ratio=0.5, min_block=2)  # drawn on the host
    sim.target.norm_pix = False
    sim_method = registry.build_method(sim)
    assert sim_method.mask_generator.on_host
    rng = np.random.default_rng(0)
    sim_batch = {"image": images, masking.TOKEN_MASK_KEY: np.stack(
        [rng.permutation(16) < 8 for _ in range(16)])}
    assert_same(one_step(sim_method, sim_batch, jax.devices(), [("data", -1)], REPLICATE),
                one_step(sim_method, sim_batch, jax.devices(), [("fsdp", -1)], FSDP, accum=2),
                "accumulation")
    print("accumulation", time.time() - T0)

    # 4. A run on 8 devices with FSDP, restored onto other mesh shapes.
    workdir = tempfile.mkdtemp()
    config = tiny_mae_config(global_batch_size=16, total_steps=2, checkpoint_every=2,
                             export_encoder=False, mesh=[("fsdp", -1)], sharding_rules=FSDP)
    final = train.run(config, workdir)
    saved = jax.device_get(final)
    run_method = registry.build_method(config)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=2, keep=2)
    assert ckpt.latest_step() == 2
    for devices, mesh_cfg, rules in [(jax.devices()[:4], [("data", -1)], REPLICATE),
                                     (jax.devices()[:4], [("data", 2), ("fsdp", 2)], FSDP),
                                     (jax.devices()[:1], [("data", -1)], REPLICATE)]:
      mesh = parallel.make_mesh(mesh_cfg, devices)
      abstract = jax.eval_shape(lambda: final)
      shardings = parallel.tree_shardings(mesh, abstract, rules)
      target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            abstract, shardings)
      restored = ckpt.restore(2, target)
      for x, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert x.sharding == sh, (x.sharding, sh)
      for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(a, b)
    ckpt.close()
    print("restored onto 4 and 1 devices", time.time() - T0)

    # 5. The memory plan under FSDP: far less than the whole state per device, in XLA's count
    # of the step's arguments too.
    c = tiny_mae_config(global_batch_size=16, mesh=[("fsdp", -1)], sharding_rules=FSDP)
    plan = memory_plan.plan(c)
    assert plan["xla_temp"] > 0 and plan["per_device_batch"] == 2, plan
    whole = 4 * plan["num_params"]
    assert plan["params"] < 0.3 * whole and plan["opt_state"] < 0.3 * whole, plan
    assert plan["xla_arguments"] < 0.3 * checkpoint.tree_bytes(abstract) + plan["batch"], plan
    print(memory_plan.format_plan(plan, hbm_gib=1))
    print("OK")
""")


@pytest.mark.long
def test_on_8_devices_steps_match_init_is_sharded_and_checkpoints_change_mesh(tmp_path):
  """One subprocess with 8 simulated devices: a data-parallel, an FSDP and a data x FSDP step
  equal the 1-device step; the sharded init; accumulation; restore onto 4 and 1 devices."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             + FAST_COMPILE_XLA_FLAGS,
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
             TMPDIR=str(tmp_path))  # the script's workdir (tempfile.mkdtemp) goes with it
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-6000:]


def test_memory_plan_command(tmp_path):
  """The plan of a config whose dataset (ImageNet from TFDS) is not on the machine: the step is
  compiled from shapes on synthetic images of its size, as a laptop plans a cluster's run."""
  config = imagenet_config_without_its_data(tmp_path)
  out = subprocess.run(
      [sys.executable, "-m", "mim_jax.memory_plan", f"--config={config}",
       "--mesh=fsdp:4", "--rules=fsdp", "--batch=8", "--hbm_gib=1",
       "--config.model.remat=full",
       # The run's options (a GPU one here) are not applied to the CPU compile standing in.
       "--config.compiler_options=--xla_gpu_enable_command_buffer="],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 0, out.stderr[-4000:]
  assert "not applied: the plan is compiled by XLA:CPU" in out.stderr, out.stderr[-4000:]
  text = out.stdout
  assert "mesh {'fsdp': 4} (4 devices), global batch 8 = 2 per device" in text, text
  assert "remat full" in text and "fits in 1 GiB: yes" in text, text
  assert "non-finite guard select" in text, text  # an accelerator's step, not the CPU's
  for row in ("params", "opt_state", "xla temp", "peak estimate"):
    assert re.search(rf"^  {row} +[0-9.]+ GiB", text, re.M), (row, text)


@pytest.mark.parametrize("args, says", [
    (("--mesh=fsdp8",), "--mesh='fsdp8' is invalid: AXIS:SIZE[,AXIS:SIZE...] with positive"),
    (("--mesh=data:0",), "--mesh='data:0' is invalid"),
    (("--mesh=data:-1,fsdp:-1", "--devices=4"), "--mesh='data:-1,fsdp:-1' is invalid: at most "
     "one axis of size -1"),
    (("--mesh=fsdp:8", "--devices=4"), "--devices=4 is invalid: 8, the product of --mesh's "
     "sizes, or left out"),
    (("--mesh=data:-1,fsdp:2", "--devices=3"), "--devices=3 is invalid: a multiple of 2"),
    (("--mesh=data:-1", "--devices=-2"), "--devices=-2 is invalid: a device count >= 0"),
    # The config's own mesh, data:-1, with no machine to count: the field is named, not --mesh.
    ((), "config.mesh=(('data', -1),) is invalid: sizes that multiply to a device count: it "
     "has a -1 axis"),
    (("--mesh=data:2", "--batch=7"), "config.global_batch_size=7 is invalid: a multiple of"),
    (("--mesh=data:2", "--batch=-4"), "--batch=-4 is invalid"),
    (("--mesh=data:2", "--hbm_gib=-1"), "--hbm_gib=-1.0 is invalid"),
    (("--mesh=data:2", "--config=configs/knn_fmnist.py"), "config.method='knn' is invalid: a "
     "method with a train step"),
    (("--mesh=data:2", "--config.model.variant=B/4"), "config.model.variant='B/4' would not "
     "set the size"),
    (("--mesh=data:2", "--config.mesh=(('data', 4),)"), "--mesh='data:2' is invalid: given "
     "beside --config.mesh, which it replaces"),
    (("--mesh=data:2", "--batch=8", "--config.global_batch_size=16"), "--batch=8 is invalid: "
     "given beside --config.global_batch_size"),
    # Settings the compiled step never reads were planned as if absent.
    (("--mesh=data:2", "--config.total_steps=5", "--config.checkpoint_every=7"),
     "config.checkpoint_every=7, config.total_steps=5 would not change the plan: the plan "
     "compiles the train step, not the training loop"),
    # Nor do the values a compiled step holds as constants.
    (("--mesh=data:2", "--config.optimizer.base_lr=0.5", "--config.seed=7"),
     "config.optimizer.base_lr=0.5, config.seed=7 would not change the plan: a step compiled "
     "with other values"),
    # The step is planned on synthetic images: the data's fields would change nothing...
    (("--mesh=data:2", "--config.data.path=/no/such/fmnist"), "config.data.path='/no/such/"
     "fmnist' would not change the plan: the plan compiles the train step on synthetic images"),
    # ... except beside a device-resident split, whose copy is counted from the data: then a
    # missing path is named, and only the host pipeline's workers and buffers go unread.
    (("--mesh=data:2", "--config.data.augment_on=device", "--config.data.device_resident=True",
      "--config.data.path=/no/such/fmnist"), "config.data.path='/no/such/fmnist' is invalid"),
    (("--mesh=data:2", "--config.data.augment_on=device", "--config.data.device_resident=True",
      "--config.data.num_workers=3"), "config.data.num_workers=3 would not change the plan: "
     "the plan compiles the train step, and the host pipeline's workers"),
    # An unknown field: named with suggestions, no traceback.
    (("--mesh=data:2", "--config.modle.width=8"), "config.modle.width"),
])
def test_memory_plan_refuses_bad_flags_in_one_line_before_compiling(args, says):
  """Each bad value is one line naming the flag or field and exit 2, before JAX compiles
  anything (they were tracebacks, a plain --config=X among them, naming a --mesh never given);
  --devices beside a mesh of fixed sizes that it contradicts was silently ignored."""
  config = [a for a in args if a.startswith("--config=")] or ["--config=configs/mae_fmnist.py"]
  out = subprocess.run(
      [sys.executable, "-m", "mim_jax.memory_plan", *config,
       *[a for a in args if not a.startswith("--config=")]],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.startswith(f"error: {says}"), out.stderr[-3000:]
  assert "Traceback" not in out.stderr
