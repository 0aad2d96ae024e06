"""config.compiler_options: XLA options of one run's programs, checked before the run starts."""

from __future__ import annotations

import glob
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
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_ENABLE_COMPILATION_CACHE="false", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True,
                 capture_output=True, timeout=300)
  modules = {os.path.basename(p).split(".")[1] for p in glob.glob(str(dump / "*.debug_options"))}
  assert {"jit_step_fn", "jit_init_train_state"} <= modules, modules
  for path in glob.glob(str(dump / "*.debug_options")):
    assert "xla_backend_optimization_level: 0" in open(path).read()


def test_the_lowest_optimisation_level_leaves_the_results_alone(tmp_path):
  """The weights after 2 steps at LLVM O0 are XLA's defaults' up to rounding (LLVM's
  optimisations reorder a few float operations; Adam's normalised update carries that into
  weights near zero, up to ~1e-8)."""
  fast = train.run(tiny_mae_config(total_steps=2,
                                   compiler_options="--xla_backend_optimization_level=0"),
                   str(tmp_path / "o0"))
  plain = train.run(tiny_mae_config(total_steps=2, compiler_options=""), str(tmp_path / "plain"))
  for a, b in zip(jax.tree.leaves(fast.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
