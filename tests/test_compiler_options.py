"""config.compiler_options: XLA options of one run's programs, checked before the run starts."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config.errors import ConfigError
from mim_jax.training import compiler_options
from mim_jax.training import loop as train

from conftest import REPO, tiny_mae_config


def test_options_are_parsed_as_xla_takes_them():
  assert compiler_options.parse("") == {}
  assert compiler_options.parse(
      " --xla_backend_optimization_level=0  --xla_cpu_enable_fast_math=false "
      "--xla_dump_to=/tmp/x --xla_gpu_enable_command_buffer= --xla_some_ratio=0.5") == {
          "xla_backend_optimization_level": "0", "xla_cpu_enable_fast_math": False,
          "xla_dump_to": "/tmp/x", "xla_gpu_enable_command_buffer": "", "xla_some_ratio": "0.5"}


@pytest.mark.parametrize("text", [
    "--xla_backend_optimization_level=0",  # int
    "--xla_cpu_enable_fast_math=false",  # bool
    "--xla_gpu_auto_spmd_partitioning_memory_budget_ratio=1",  # float written as an integer
    "--xla_dump_hlo_module_re=1",  # text that reads as a number
    "--xla_gpu_enable_command_buffer=",  # an empty list of enums
])
def test_xla_accepts_each_kind_of_option_value(text):
  compiler_options.check(tiny_mae_config(compiler_options=text))


@pytest.mark.parametrize("text", ["xla_backend_optimization_level=0", "--xla_opt", "--foo=1"])
def test_malformed_options_are_refused_by_validation(text):
  config = tiny_mae_config(compiler_options=text)
  with pytest.raises(ConfigError, match=r"config.compiler_options=.*--xla_NAME=VALUE"):
    registry.validate_config(config)


def test_an_option_xla_does_not_know_fails_before_the_run_builds_anything(tmp_path):
  config = tiny_mae_config(total_steps=1, compiler_options="--xla_no_such_option=1")
  with pytest.raises(ConfigError, match="compiler_options.*No such compile option: "
                                        "'xla_no_such_option'"):
    train.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _dumped_programs(script: str, dump) -> set[str]:
  """Runs `script` in a fresh Python on the CPU without the persistent compilation cache and
  returns the names of the programs XLA dumped to `dump` (the script's --xla_dump_to)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_ENABLE_COMPILATION_CACHE="false", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  return {os.path.basename(p).split(".")[1] for p in glob.glob(str(dump / "*.debug_options"))}


def test_the_options_reach_the_runs_programs(tmp_path):
  """XLA dumps every program compiled with --xla_dump_to: the run's initialisation and train
  step are there, compiled at the optimisation level asked for. In a fresh process without
  the persistent compilation cache, whose key leaves --xla_dump_to out (a cached program is
  not compiled, so not dumped)."""
  dump = tmp_path / "dump"
  script = (
      "import sys; sys.path.insert(0, 'tests')\n"
      "from conftest import tiny_mae_config\n"
      "from mim_jax.training import loop\n"
      f"loop.run(tiny_mae_config(total_steps=2, compiler_options='--xla_dump_to={dump} "
      f"--xla_backend_optimization_level=0'), {str(tmp_path / 'run')!r})\n")
  modules = _dumped_programs(script, dump)
  assert {"jit_step_fn", "jit_init_train_state"} <= modules, modules
  for path in glob.glob(str(dump / "*.debug_options")):
    assert "xla_backend_optimization_level: 0" in open(path).read()


def test_the_lowest_optimisation_level_leaves_the_results_alone(tmp_path):
  """Two steps at LLVM O0 give XLA's defaults' losses, gradient norms and weights up to
  rounding (LLVM's optimisations reorder a few float operations). SGD at lr 0.03 from the
  first step: the weights move by about 0.1 a step (the tiny config's AdamW warmup would
  start at lr 0, leaving nothing to compare but the initial weights; Adam's normalised update
  would turn rounding in near-zero gradients into whole steps)."""
  sgd = {"optimizer.name": "sgd", "optimizer.base_lr": 1.0, "optimizer.warmup_epochs": 0.0}
  runs = {}
  for name, options in (("o0", "--xla_backend_optimization_level=0"), ("plain", "")):
    state = train.run(tiny_mae_config(total_steps=2, compiler_options=options, **sgd),
                      str(tmp_path / name))
    metrics = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    runs[name] = state, [m for m in metrics if "loss" in m]
  (fast, fast_metrics), (plain, plain_metrics) = runs["o0"], runs["plain"]
  assert len(fast_metrics) == len(plain_metrics) == 2
  for f, p in zip(fast_metrics, plain_metrics):
    assert p["update_norm"] > 0.05, p
    np.testing.assert_allclose([f[k] for k in ("loss", "grad_norm", "update_norm")],
                               [p[k] for k in ("loss", "grad_norm", "update_norm")], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_knn_and_probe_helpers_compile_with_the_options_they_are_given():
  """k-NN scoring and the logistic probe's L-BFGS fit are library helpers (no config): the
  options passed reach their programs (an option XLA does not know fails in them), and
  without options they keep XLA's defaults."""
  from mim_jax.evaluate import knn, logistic
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(40, 6)).astype(np.float32), rng.integers(0, 3, 40)
  unknown = {"xla_no_such_option": "1"}
  with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
    knn.knn_scores(x, y, x[:8], num_classes=3, k=5, compiler_options=unknown)
  with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
    logistic.fit(x, y, 3, 1e-2, max_iter=20, compiler_options=unknown)
  o0 = compiler_options.parse("--xla_backend_optimization_level=0")
  np.testing.assert_allclose(knn.knn_scores(x, y, x[:8], num_classes=3, k=5, compiler_options=o0),
                             knn.knn_scores(x, y, x[:8], num_classes=3, k=5), rtol=1e-6)
  fitted, _ = logistic.fit(x, y, 3, 1e-2, max_iter=20, compiler_options=o0)
  plain, _ = logistic.fit(x, y, 3, 1e-2, max_iter=20)
  np.testing.assert_allclose(fitted["w"], plain["w"], rtol=1e-5, atol=1e-6)
  # The option's type is part of the cached program's key: XLA takes True and "1" apart.
  assert compiler_options.jit_with(len, {"xla_a": True}) is not compiler_options.jit_with(
      len, {"xla_a": 1})
  assert compiler_options.jit_with(len, {"xla_a": True}) is compiler_options.jit_with(
      len, {"xla_a": True})


def test_the_probe_jobs_knn_and_logistic_programs_get_the_runs_options(tmp_path):
  """The probe job's k-NN kernels and L-BFGS fit are compiled with config.compiler_options,
  as its feature pass is (they kept XLA's defaults). In a fresh process, as above."""
  dump = tmp_path / "dump"
  script = (
      "import sys; sys.path.insert(0, 'tests')\n"
      "from mim_jax import recipes\n"
      "from mim_jax.training import loop\n"
      "c = recipes.knn_recipe('probe')\n"
      "c.image_size = (16, 16); c.classifier.features = 'pixels'; c.eval.batch_size = 16\n"
      "c.data.update(source='synthetic', synthetic_size=64, holdout=16); c.knn.k = 5\n"
      "c.probe.update(l2_grid=(1e-2,), max_iter=50)\n"
      f"c.compiler_options = '--xla_dump_to={dump} --xla_backend_optimization_level=0'\n"
      f"loop.run(c, {str(tmp_path / 'run')!r})\n")
  # Dumped at all means compiled with the run's options (--xla_dump_to is one of them).
  modules = _dumped_programs(script, dump)
  assert {"jit__normalize_queries", "jit__merge_bank_chunk", "jit__class_scores",
          "jit__fit"} <= modules, modules
