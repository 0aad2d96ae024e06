"""glibc malloc settings for the training process: huge pages, and memory kept between steps.

XLA:CPU allocates the buffers of an executable (for the demo MAE step, one temporary block of
246 MB per device) afresh on every call, and glibc serves blocks above its mmap threshold with
a new `mmap` and gives them back with `munmap` on free: each step then page-faults its whole
working set in again, 4 KiB at a time, zeroing every page (4.4 M minor faults in a 30-step
benchmark; a quarter of the process's CPU time in the kernel). Smaller blocks come from
per-thread arenas that glibc grows and trims with an `mprotect` per step and block.

`GLIBC_TUNABLES` fixes both, but glibc reads it once, when the process starts, so
`python -m mim_jax.main` and `python -m mim_jax.bench` re-execute themselves with it (`execv`:
the same process id, arguments and environment plus this one variable) before anything else
runs:

  glibc.malloc.hugetlb=1           transparent huge pages for malloc's mmapped blocks and heap
                                   (madvise mode, the kernel's default; glibc >= 2.35): 2 MiB
                                   faults instead of 512 of 4 KiB
  glibc.malloc.mmap_threshold=32M  blocks up to 32 MiB (glibc's maximum) from the heap, not a
                                   fresh mmap each (the default threshold starts at 128 KiB)
  glibc.malloc.trim_threshold=4G,  freed memory stays in the process for the next step instead
  glibc.malloc.top_pad=64M         of going back to the kernel and faulting in again

Measured on a 2-core AMD EPYC VM (docs/benchmarks.md): the demo MAE step 0.517 s instead of
0.810 s (HF eager in the same processes: 0.499 vs 0.590 s), minor faults 68 k instead of 4.4 M.
The cost is memory: the process keeps its peak heap (rounded to huge pages) until it exits.

A `GLIBC_TUNABLES` already in the environment (even empty) is the user's choice and is left as
it is; other C libraries (musl) and other systems are left alone.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from typing import Mapping, Optional

log = logging.getLogger(__name__)

TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:"
            "glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=67108864")
VARIABLE = "GLIBC_TUNABLES"
# Set beside GLIBC_TUNABLES by the re-execution, so that the new process can say so in its log.
MARKER = "MIM_JAX_MALLOC_TUNED"


def tuned_environment(environ: Mapping[str, str], system: str,
                      libc: str) -> Optional[dict[str, str]]:
  """The environment to re-execute with, or None to run as we are: not Linux with glibc, or
  GLIBC_TUNABLES already set (by the user, or by an earlier re-execution)."""
  if system != "Linux" or libc != "glibc" or VARIABLE in environ:
    return None
  return {**environ, VARIABLE: TUNABLES, MARKER: "1"}


def reexec_with_tunables() -> None:
  """Replaces this process by itself with `TUNABLES` in its environment, when
  `tuned_environment` says so; returns only when it does not. Call it first thing in a
  program's `__main__` (before JAX starts threads or anything is written)."""
  env = tuned_environment(os.environ, platform.system(), platform.libc_ver()[0])
  if env is None:
    return
  argv = [sys.executable, *sys.orig_argv[1:]]
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError as e:  # e.g. a read-only or vanished interpreter: run untuned
    log.warning("could not re-execute with %s=%s (%s): glibc's defaults stay", VARIABLE,
                TUNABLES, e)


def log_if_tuned() -> None:
  """One INFO line when this process runs with `TUNABLES` set by `reexec_with_tunables`."""
  if os.environ.get(MARKER) == "1" and os.environ.get(VARIABLE) == TUNABLES:
    log.info("glibc malloc: huge pages and memory kept between steps (%s=%s; set %s yourself, "
             "even empty, to run with glibc's defaults)", VARIABLE, TUNABLES, VARIABLE)
