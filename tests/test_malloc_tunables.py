"""glibc malloc tunables: the entry points re-execute themselves with them, once, and leave a
user's own GLIBC_TUNABLES alone (mim_jax/training/malloc_tunables.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mim_jax.training import malloc_tunables

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROGRAM = """
import os, sys
from mim_jax.training import malloc_tunables as m
print("start", flush=True)
m.reexec_with_tunables("tunedprog")
print(sys.argv[1:], m.active(), os.environ.get("GLIBC_TUNABLES"),
      os.environ.get("MIM_JAX_MALLOC_TUNED"))
"""


def test_tuned_environment_only_where_glibc_reads_it_and_the_user_set_nothing():
  tuned = malloc_tunables.tuned_environment({"PATH": "/bin"}, "Linux", "glibc")
  assert tuned == {"PATH": "/bin", "GLIBC_TUNABLES": malloc_tunables.TUNABLES,
                   "MIM_JAX_MALLOC_TUNED": "1"}
  assert "glibc.malloc.hugetlb=1" in malloc_tunables.TUNABLES
  for environ, system, libc in (({"GLIBC_TUNABLES": ""}, "Linux", "glibc"),  # the user's
                                ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "Linux", "glibc"),
                                ({"MIM_JAX_MALLOC_TUNED": "1"}, "Linux", "glibc"),  # done once
                                ({}, "Linux", ""),  # musl
                                ({}, "Darwin", "")):
    assert malloc_tunables.tuned_environment(environ, system, libc) is None


def test_started_as_reads_the_interpreter_command_line():
  main_file = sys.modules["mim_jax.training.malloc_tunables"].__file__
  module = "mim_jax.training.malloc_tunables"
  assert malloc_tunables.started_as(module, ["python", "-m", module, "--x"])
  assert malloc_tunables.started_as(module, ["python", "-X", "dev", "-u", "-m", module])
  assert malloc_tunables.started_as(module, ["python", "-B", main_file, "--x"])
  assert not malloc_tunables.started_as(module, ["python", "-m", "IPython"])  # runpy inside
  assert not malloc_tunables.started_as(module, ["python", "-c", "import runpy"])
  assert not malloc_tunables.started_as(module, ["python", "-X", main_file, "other.py"])


@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_a_program_re_executes_itself_once_with_the_tunables(tmp_path):
  """Started as a module or a script: the same arguments, the tunables active, and the
  variables out of the environment again (children run with glibc's defaults). Run through
  runpy inside another program, or under the user's own GLIBC_TUNABLES (even empty): as is."""
  (tmp_path / "tunedprog.py").write_text(PROGRAM)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "MIM_JAX_MALLOC_TUNED")}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))

  def run(args, **extra):
    out = subprocess.run([sys.executable, *args], cwd=tmp_path, env={**env, **extra},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()

  tuned = f"['a', '--b=1'] {malloc_tunables.TUNABLES} None None"
  assert run(["-m", "tunedprog", "a", "--b=1"]) == ["start", "start", tuned]
  assert run([str(tmp_path / "tunedprog.py"), "a", "--b=1"]) == ["start", "start", tuned]
  assert run(["-c", "import runpy; runpy.run_module('tunedprog', run_name='__main__')"]) == [
      "start", "[] None None None"]
  assert run(["-m", "tunedprog"], GLIBC_TUNABLES="") == ["start", "[]   None"]
