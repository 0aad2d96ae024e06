"""glibc malloc tunables: the entry points re-execute themselves with them, once, and leave a
user's own GLIBC_TUNABLES alone (mim_jax/training/malloc_tunables.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from mim_jax.training import malloc_tunables

from conftest import REPO

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_tuned_environment_only_where_glibc_reads_it_and_the_user_set_nothing():
  tuned = malloc_tunables.tuned_environment({"PATH": "/bin"}, "Linux", "glibc")
  assert tuned == {"PATH": "/bin", "GLIBC_TUNABLES": malloc_tunables.TUNABLES,
                   "MIM_JAX_MALLOC_TUNED": "1"}
  assert "glibc.malloc.hugetlb=1" in malloc_tunables.TUNABLES
  for environ, system, libc in (({"GLIBC_TUNABLES": ""}, "Linux", "glibc"),  # the user's
                                ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "Linux", "glibc"),
                                ({}, "Linux", ""),  # musl
                                ({}, "Darwin", "")):
    assert malloc_tunables.tuned_environment(environ, system, libc) is None


@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_a_program_re_executes_itself_once_with_the_tunables():
  """Same arguments, the variable set, then it runs on (the second start returns at once);
  an empty GLIBC_TUNABLES of the user's stays empty."""
  code = ("import os, sys; from mim_jax.training import malloc_tunables as m; "
          "print('start', flush=True); m.reexec_with_tunables(); "
          "print(sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MIM_JAX_MALLOC_TUNED")}
  out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == ["start", "start",
                                     f"['a', '--b=1'] {malloc_tunables.TUNABLES}"]
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**env, "GLIBC_TUNABLES": ""}, timeout=60)
  assert out.stdout.splitlines() == ["start", "[] "]
