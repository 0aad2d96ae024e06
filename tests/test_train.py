"""The training loop: step semantics, accumulation, end-to-end run, exact resume, SIGTERM."""

from __future__ import annotations

import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim_jax import registry
from mim_jax.methods import base, mae
from mim_jax.training import checkpoint, metric_writers
from mim_jax.training import loop as train
from mim_jax.training import step as step_lib

from conftest import REPO, tiny_config, tiny_mae_config


class _LinearRegression(base.Method):
  """A toy method whose loss is a plain mean over examples (no masking randomness)."""
  name = "toy"

  def init(self, rng, images):
    return ({"w": jax.random.normal(rng, (images[0].size, 1)) * 0.1},
            {"seen": jnp.zeros([]), "passes": jnp.zeros([], jnp.int32)})

  def loss(self, params, extra, batch, rng, train=True):
    x = batch["image"].reshape(batch["image"].shape[0], -1)
    loss = jnp.mean(jnp.square(x @ params["w"] - 1.0))
    # `extra` threads through the microbatches: it counts the examples seen and the passes.
    return loss, ({"loss": loss}, {**extra, "seen": extra["seen"] + x.shape[0],
                                   "passes": extra["passes"] + 1})


def test_grad_accumulation_matches_full_batch():
  method, tx = _LinearRegression(), optax.adamw(1e-2)
  images = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
  state = step_lib.init_train_state(method, tx, jax.random.key(1), (1, 4, 4, 1))
  full = jax.jit(step_lib.make_train_step(method, tx, lambda s: 1e-2, 1))
  accum = jax.jit(step_lib.make_train_step(method, tx, lambda s: 1e-2, 4))
  s1, m1 = full(state, {"image": images}, jax.random.key(2))
  s4, m4 = accum(state, {"image": images}, jax.random.key(2))
  chex.assert_trees_all_close(s1.params, s4.params, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close((m1["loss"], m1["grad_norm"]), (m4["loss"], m4["grad_norm"]),
                              rtol=1e-5)
  assert int(s4.step) == 1
  assert float(s1.extra["seen"]) == float(s4.extra["seen"]) == 8
  # Four passes of 2 examples, not one of 8 (which would also match the full batch).
  assert int(s1.extra["passes"]) == 1 and int(s4.extra["passes"]) == 4


@pytest.mark.parametrize("method_name, overrides", [
    ("simmim", {}), ("data2vec", {"masking.min_block": 2})])  # blocks that fit a 4x4 grid
def test_accumulated_masked_means_equal_the_whole_batch_s(method_name, overrides):
  """Masks whose count varies per image (here half the images unmasked): each microbatch's
  masked mean was weighed the same, a microbatch of unmasked images as much as the others
  (a 16-21% gradient difference); weighed by its share of the masked patches, the update is
  the whole batch's to float rounding."""
  config = tiny_config(method_name, **{"masking.mask_probability": 0.5, **overrides})
  method = registry.build_method(config, base.TrainLength(1, 2))
  tx = optax.sgd(1.0)
  state = step_lib.init_train_state(method, tx, jax.random.key(0), (1, 16, 16, 3))
  state = step_lib.with_initial_weights(method, state, None)
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  masks = method.example_extras(8, np.random.default_rng(3))
  counts = np.asarray(masks["token_mask"]).sum(-1)
  assert (counts == 0).any() and (counts > 0).any()  # the case: some images unmasked
  batch = {"image": images, **masks}
  after = {}
  for k in (1, 2, 4):
    after[k], metrics = jax.jit(step_lib.make_train_step(method, tx, lambda s: 1.0, k))(
        state, batch, jax.random.key(2))
    assert float(metrics["update_norm"]) > 1e-3
  for k in (2, 4):
    chex.assert_trees_all_close(after[k].params, after[1].params, rtol=1e-4, atol=1e-6)


class _WithAverage(_LinearRegression):
  """The toy method with an `after_update` hook keeping an average of the weights."""

  def init(self, rng, images):
    params, extra = super().init(rng, images)
    return params, {**extra, "avg": params["w"], "last_step": jnp.zeros([], jnp.int32)}

  def after_update(self, params, extra, step):
    return {**extra, "avg": 0.5 * extra["avg"] + 0.5 * params["w"], "last_step": step}


def test_after_update_hook_sees_new_params_and_skipped_steps_discard_it():
  method, tx = _WithAverage(), optax.sgd(0.1)
  images = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
  state = step_lib.init_train_state(method, tx, jax.random.key(1), (1, 4, 4, 1))
  step = jax.jit(step_lib.make_train_step(method, tx, lambda s: 0.1))
  s1, _ = step(state, {"image": images}, jax.random.key(2))
  np.testing.assert_allclose(s1.extra["avg"], 0.5 * state.params["w"] + 0.5 * s1.params["w"],
                             rtol=1e-6)
  assert not np.allclose(s1.params["w"], state.params["w"])
  assert int(s1.extra["last_step"]) == 0
  s2, _ = step(s1, {"image": images}, jax.random.key(2))
  assert int(s2.extra["last_step"]) == 1
  # A NaN batch skips the update, and the hook's result with it.
  s3, m3 = step(s2, {"image": images * jnp.nan}, jax.random.key(2))
  assert int(m3["nonfinite"]) == 1
  np.testing.assert_array_equal(s3.extra["avg"], s2.extra["avg"])
  assert int(s3.extra["last_step"]) == 1


def test_mae_step_metrics_and_learning():
  config = tiny_mae_config()
  method = registry.build_method(config)
  tx = optax.adamw(3e-3, b1=0.9, b2=0.95)
  state = jax.jit(step_lib.init_train_state, static_argnums=(0, 1, 3))(
      method, tx, jax.random.key(0), (1, 16, 16, 3))
  step = jax.jit(step_lib.make_train_step(method, tx, lambda s: 3e-3), donate_argnums=(0,))
  images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3))
  losses = []
  for _ in range(30):
    state, metrics = step(state, {"image": images}, jax.random.key(2))
    losses.append(float(metrics["loss"]))
  assert set(metrics) >= {"loss", "learning_rate", "grad_norm", "param_norm", "update_norm"}
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state.step) == 30


def test_custom_loop_example_runs():
  from mim_jax.examples import custom_loop
  losses = custom_loop.main(steps=3)
  assert len(losses) == 3 and all(np.isfinite(losses))


def _readme_section_code(title: str) -> str:
  """The ```python block of README.md's section `title`."""
  readme = (REPO / "README.md").read_text()
  section = readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_snippet_for_your_own_loop_runs_as_written():
  # As a reader pastes it: eager init, then the donated, jitted step.
  scope = {}
  exec(compile(_readme_section_code("Using the parts from your own code"), "README.md", "exec"),
       scope)
  assert np.isfinite(float(scope["metrics"]["loss"]))
  assert int(scope["state"].step) == 1


def test_init_train_state_refuses_a_shape_the_method_was_not_built_for():
  config = registry.base_config("mae")
  config.image_size, config.channels, config.model.variant = (32, 32), 3, "mu/8"
  method, tx = mae.MAE(config), optax.adamw(1e-3)
  for shape in [(1, 224, 224, 3), (1, 32, 32, 1), (32, 32, 3)]:
    with pytest.raises(ValueError, match=r"config.image_size=\(32, 32\) and config.channels=3"):
      step_lib.init_train_state(method, tx, jax.random.key(0), shape)


def _final_params(workdir):
  mngr = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=10)
  step = mngr.latest_step()
  restored = mngr.manager.restore(step)
  mngr.close()
  return step, restored


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_run_writes_everything_and_resumes_exactly(tmp_path, caplog):
  """N steps, stop, N more == 2N in one go, bit for bit (params and per-step losses)."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  config = tiny_mae_config(total_steps=4, viz_every=2)
  final_straight = train.run(config, straight)
  train.run(tiny_mae_config(total_steps=2, viz_every=2), resumed)
  with caplog.at_level(logging.INFO, logger=train.__name__):
    final_resumed = train.run(tiny_mae_config(total_steps=4, viz_every=2), resumed)
  # Resumed at step 2, not started again (the same seed would give the same weights).
  assert f"resumed from {resumed}/checkpoints at step 2" in caplog.text

  for a, b in zip(jax.tree.leaves(final_straight.params), jax.tree.leaves(final_resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert _losses(straight) == _losses(resumed)
  assert sorted(_losses(straight)) == [1, 2, 3, 4]

  # What a researcher finds in the workdir.
  assert {"2", "4"} <= set(os.listdir(os.path.join(straight, "checkpoints")))
  assert glob.glob(os.path.join(straight, "tensorboard", "events.out.tfevents.*"))
  assert len(glob.glob(os.path.join(straight, "reconstructions", "*.png"))) == 2
  assert json.load(open(os.path.join(straight, "config.json")))["method"] == "mae"
  params, info = checkpoint.load_encoder(os.path.join(straight, "encoder"))
  assert info["variant"] == "mu/4"
  np.testing.assert_array_equal(
      params["patch_embed"]["kernel"], final_straight.params["encoder"]["patch_embed"]["kernel"])


def test_rerun_after_completion_is_a_no_op(tmp_path):
  """The finished run's state comes back and nothing trains again: no step is logged or
  checkpointed (a deterministic re-run from step 0 would end with the same weights)."""
  workdir = str(tmp_path / "w")
  first = train.run(tiny_mae_config(total_steps=2), workdir)
  metrics = open(os.path.join(workdir, "metrics.jsonl")).read()
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  again = train.run(tiny_mae_config(total_steps=2), workdir)
  assert int(again.step) == 2
  assert open(os.path.join(workdir, "metrics.jsonl")).read() == metrics
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints
  np.testing.assert_array_equal(np.asarray(first.params["encoder"]["cls_token"]),
                                np.asarray(again.params["encoder"]["cls_token"]))


def test_unwritable_workdir_fails_before_training(tmp_path):
  target = tmp_path / "ro"
  target.mkdir()
  os.chmod(target, 0o500)
  try:
    if os.access(target, os.W_OK):  # root ignores permissions: use a path under a file instead
      blocker = tmp_path / "file"
      blocker.write_text("x")
      target = blocker / "sub"
    with pytest.raises(checkpoint.WorkdirNotWritableError, match="cannot write"):
      train.run(tiny_mae_config(total_steps=1), str(target))
  finally:
    os.chmod(tmp_path / "ro", 0o700)


def test_sigterm_saves_and_exits_75_then_resume_finishes(tmp_path):
  """SIGTERM to every process of the run, as SLURM and `kill -- -PGID` send it: the data
  worker outlives it, the trainer saves and exits 75, and the same command resumes."""
  workdir = tmp_path / "w"
  # A data worker process and the k-NN monitor (on a held-out part of the synthetic split):
  # shared-memory batches and an evaluation at the end of the resumed run.
  cmd = [sys.executable, "-m", "mim_jax.main", f"--config={REPO}/configs/mae_vitb.py:runlocal",
         f"--workdir={workdir}", "--config.total_steps=100000", "--config.checkpoint_every=1000",
         "--config.viz_every=0", "--config.log_every=1", "--config.data.num_workers=1",
         "--config.data.holdout=16", "--config.data.eval_split=holdout",
         "--config.knn.every_epochs=1000",
         # A schedule that outlasts the test: total_steps may only stop a run early.
         "--config.num_epochs=100000"]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  deadline = time.time() + 120
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline and proc.poll() is None and not (
      metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[0]
  os.killpg(proc.pid, signal.SIGTERM)  # the trainer, its data worker, the resource tracker
  signalled = time.time()
  out, _ = proc.communicate(timeout=120)
  # Bounded: the step in progress, one checkpoint write and shutdown (generous for loaded CI).
  assert time.time() - signalled < 30, out
  # Not 0: a preempted run must not pass for a finished one (run_errors.EXIT_PREEMPTED).
  assert proc.returncode == 75, out
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert saved and saved[-1] >= 3, (saved, out)
  assert "after SIGTERM" in out and "run the same command to continue" in out
  # Every batch block in shared memory was released by the trainer, none left to Python's
  # resource tracker (which would also report a worker killed mid-batch).
  assert "leaked shared_memory" not in out, out
  # It stopped at a step boundary and saved exactly that step: the last one it logged.
  assert max(json.loads(line)["step"] for line in metrics.read_text().splitlines()) == saved[-1]

  # The same command with a bound resumes from the saved step instead of starting over.
  cmd[5] = f"--config.total_steps={saved[-1] + 2}"
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
  assert rerun.returncode == 0, rerun.stderr
  assert "resumed from" in rerun.stderr + rerun.stdout
  assert "knn_top1_cls" in rerun.stderr and "leaked shared_memory" not in rerun.stderr, (
      rerun.stderr)
  steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
  assert steps[-3:] == [saved[-1] + 1, saved[-1] + 2, saved[-1] + 2]  # the last: k-NN


def test_corrupt_image_is_skipped_and_counted_by_the_run(tmp_path):
  """The trainer's side of on_bad_image: the run goes on, counts and names the file ("skip"),
  or stops naming it ("raise"). That no skipped image reaches a batch is checked on the
  batches themselves, tests/test_data.py::test_corrupt_images_skipped_with_warning_and_count."""
  from PIL import Image

  from mim_jax import data
  root = tmp_path / "images" / "class_a"
  root.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(20):
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
  (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  data.reset_skipped_images()
  config = tiny_mae_config(total_steps=3, log_every=3)
  config.data.update(source="image_folder", path=str(tmp_path / "images"), on_bad_image="skip",
                     synthetic_size=10_000)  # the default: an image folder does not read it
  workdir = str(tmp_path / "w")
  train.run(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == 3 and rows[-1]["skipped_images"] >= 1
  assert any("broken.jpg" in path for path in data.skipped_images())

  config.data.on_bad_image = "raise"
  with pytest.raises(Exception, match="broken.jpg"):
    train.run(config, str(tmp_path / "w2"))


def test_train_step_compiles_once_per_run_across_logging_checkpoints_and_resume(tmp_path,
                                                                                caplog):
  """No recompilation after the first step: logging, checkpoint and evaluation boundaries and a
  resumed run all reuse the one compiled step (a changed shape, dtype or sharding would show up
  as a second compilation)."""
  def compilations(run_config):
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
      train.run(run_config, str(tmp_path))
    return sum(r.getMessage().startswith("Compiling jit(step_fn)") for r in caplog.records)

  config = tiny_mae_config(total_steps=5, log_every=2, checkpoint_every=2, viz_every=3)
  assert compilations(config) == 1
  config.total_steps = 8  # resume from step 5
  assert compilations(config) == 1


def test_config_nonfinite_guard_reaches_the_compiled_step():
  """config.nonfinite_guard picks the run's step: "cond" adds a conditional around the update
  to the diagnostics' one, "select" does not, and "" is "cond" on this CPU."""
  from mim_jax.training import setup
  cases = {}
  for guard in ("select", "cond", ""):
    r = setup.setup_run(setup.prepare(tiny_mae_config(nonfinite_guard=guard)), num_examples=64)
    batch = setup.abstract_batch(r, r.config.global_batch_size)
    text = r.jit_step().lower(r.abstract_state, batch, jax.random.key(0)).as_text()
    cases[guard] = text.count("stablehlo.case")
  assert cases["cond"] == cases["select"] + 1 and cases[""] == cases["cond"], cases


def test_norms_are_computed_at_logged_steps_only_with_the_same_values():
  """Parameter / update norms at the logging interval equal those of a step that computes
  them every step; in between they are NaN (not computed)."""
  method, tx = _LinearRegression(), optax.adamw(1e-2)
  images = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
  state = step_lib.init_train_state(method, tx, jax.random.key(1), (1, 4, 4, 1))
  every = jax.jit(step_lib.make_train_step(method, tx, lambda s: 1e-2))
  logged = jax.jit(step_lib.make_train_step(method, tx, lambda s: 1e-2, norms_every=2,
                                            last_step=5))
  a = b = state
  for i in range(5):
    a, ma = every(a, {"image": images}, jax.random.key(2))
    b, mb = logged(b, {"image": images}, jax.random.key(2))
    chex.assert_trees_all_equal(a.params, b.params)
    if (i + 1) % 2 == 0 or i + 1 == 5:
      assert float(mb["param_norm"]) == float(ma["param_norm"]) > 0
      assert float(mb["update_norm"]) == float(ma["update_norm"]) > 0
    else:
      assert np.isnan(float(mb["param_norm"])) and np.isnan(float(mb["update_norm"]))
    assert float(mb["grad_norm"]) == float(ma["grad_norm"])


def test_profile_reports_kernel_time_by_category(tmp_path):
  """bench's --profile: a traced step's kernels mapped to categories (the optimizer's by its
  named scope), the top kernels named."""
  from mim_jax import bench
  config = tiny_mae_config(global_batch_size=8)
  result = bench.bench_mim_jax(config, steps=2, warmup=1, profile_dir=str(tmp_path / "trace"),
                               profile_steps=2)
  profile = result["profile"]
  assert set(profile["categories"]) == {"attention", "matmul", "norms/reductions",
                                        "scatter/gather", "copies/transposes", "optimizer",
                                        "other"}
  assert profile["categories"]["matmul"] > 0 and profile["categories"]["attention"] > 0
  assert profile["categories"]["optimizer"] > 0
  assert profile["top_kernels"] and all(k["ms"] >= 0 for k in profile["top_kernels"])


def test_loss_mean_averages_the_logging_interval(tmp_path):
  """metrics.jsonl holds beside each logged step's loss the mean loss of the steps since the
  previous log (the last step's alone is a one-batch sample)."""
  every_step = tmp_path / "every"
  train.run(tiny_mae_config(total_steps=4, log_every=1), str(every_step))
  losses = [row["loss"] for row in metric_writers.read_metrics(str(every_step))]
  assert [row["loss_mean"] for row in metric_writers.read_metrics(str(every_step))] == losses
  pairs = tmp_path / "pairs"
  train.run(tiny_mae_config(total_steps=4, log_every=2), str(pairs))
  rows = metric_writers.read_metrics(str(pairs))
  assert [row["step"] for row in rows] == [2, 4]
  np.testing.assert_allclose([row["loss_mean"] for row in rows],
                             [np.mean(losses[:2]), np.mean(losses[2:])], rtol=1e-5)
