"""glibc malloc settings for the training process: huge pages, and memory kept between steps.

XLA:CPU allocates the buffers of an executable (for the demo MAE step, one temporary block of
246 MB per device) afresh on every call, and glibc serves blocks above its mmap threshold with
a new `mmap` and gives them back with `munmap` on free: each step then page-faults its whole
working set in again, 4 KiB at a time, zeroing every page (4.4 M minor faults in a 30-step
benchmark; a quarter of the process's CPU time in the kernel). Smaller blocks come from
per-thread arenas that glibc grows and trims with an `mprotect` per step and block.

`GLIBC_TUNABLES` fixes both, but glibc reads it once, when the process starts, so
`python -m mim_jax.main` and `python -m mim_jax.bench`, started as programs, re-execute
themselves with it (`os.execve`: the same process id and arguments) before anything else runs:

  glibc.malloc.hugetlb=1           transparent huge pages for malloc's mmapped blocks and heap
                                   (glibc >= 2.35; acts where the kernel's THP mode is
                                   `madvise` or `always`, not `never`): 2 MiB faults instead of
                                   512 of 4 KiB
  glibc.malloc.mmap_threshold=32M  blocks up to 32 MiB (glibc's maximum) from the heap, not a
                                   fresh mmap each (the default threshold starts at 128 KiB)
  glibc.malloc.trim_threshold=4G,  freed memory stays in the process for the next step instead
  glibc.malloc.top_pad=64M         of going back to the kernel and faulting in again

Measured on a 2-core AMD EPYC VM (docs/benchmarks.md, "glibc malloc tunables"): the demo MAE
step 0.533 s instead of 0.735 s, ours 1.05x faster than HF eager in the same processes (HF
1.26-1.31x faster under glibc's defaults); minor faults 68 k instead of 4.4 M. Accelerator
hosts get the same settings for their host memory (not measured there). The cost is memory:
the process keeps its peak heap, rounded to huge pages, until it exits.

The re-executed process removes the variable from its environment again, so that the
processes it starts (grain's workers, tools) run with glibc's defaults. A `GLIBC_TUNABLES`
already in the environment (even empty) is the user's choice and is left as it is; other C
libraries (musl) and other systems are left alone.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import sys
from typing import Mapping, Optional, Sequence

log = logging.getLogger(__name__)

TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:"
            "glibc.malloc.trim_threshold=4294967296:glibc.malloc.top_pad=67108864")
VARIABLE = "GLIBC_TUNABLES"
# Set beside GLIBC_TUNABLES by the re-execution: the new process knows it is the tuned one
# (and never re-executes again, even where something stripped GLIBC_TUNABLES on the way).
MARKER = "MIM_JAX_MALLOC_TUNED"

# The interpreter's options that take the next argument as their value (`python -X dev -m ...`).
_OPTIONS_WITH_VALUE = ("-W", "-X", "--check-hash-based-pycs")

_active: Optional[str] = None  # the tunables this process started with, once taken from env


def tuned_environment(environ: Mapping[str, str], system: str,
                      libc: str) -> Optional[dict[str, str]]:
  """The environment to re-execute with, or None to run as we are: not Linux with glibc,
  GLIBC_TUNABLES already set by the user, or this process is the re-executed one."""
  if system != "Linux" or libc != "glibc" or VARIABLE in environ or MARKER in environ:
    return None
  return {**environ, VARIABLE: TUNABLES, MARKER: "1"}


def started_as(module: str, orig_argv: Sequence[str]) -> bool:
  """Whether the interpreter's own command line runs `module` (`python [options] -m module`,
  or its file as a script): not a host program that runs it through runpy (IPython's
  `%run -m`, a debugger), whose process must not be replaced."""
  spec = importlib.util.find_spec(module)
  origin = os.path.realpath(spec.origin) if spec and spec.origin else None
  args = iter(orig_argv[1:])
  for arg in args:
    if arg == "-m":
      return next(args, None) == module
    if arg == "-c":
      return False
    if arg in _OPTIONS_WITH_VALUE:
      next(args, None)
    elif not arg.startswith("-"):  # the script: what python runs, the rest its arguments
      return origin is not None and os.path.realpath(arg) == origin
  return False


def reexec_with_tunables(module: str) -> None:
  """Replaces this process by itself with `TUNABLES` in its environment, when it was started
  as `module` and `tuned_environment` says so; returns only when it does not. In the
  re-executed process, takes the variables out of the environment again (see the module
  doc). Call it first thing in a program's `__main__`, before JAX starts threads."""
  global _active
  if os.environ.get(MARKER) == "1":
    _active = os.environ.pop(VARIABLE, None)
    os.environ.pop(MARKER)
    return
  if not started_as(module, sys.orig_argv):
    return
  env = tuned_environment(os.environ, platform.system(), platform.libc_ver()[0])
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # e.g. a vanished interpreter: run untuned
    log.warning("could not re-execute with %s=%s (%s): glibc's defaults stay", VARIABLE,
                TUNABLES, e)


def active() -> Optional[str]:
  """The GLIBC_TUNABLES this process runs with: ours, the user's, or None."""
  return _active if _active is not None else os.environ.get(VARIABLE)


def log_if_tuned() -> None:
  """One INFO line when this process runs with `TUNABLES` set by `reexec_with_tunables`."""
  if _active == TUNABLES:
    log.info("glibc malloc: huge pages and memory kept between steps (%s=%s; set %s yourself, "
             "even empty, to run with glibc's defaults)", VARIABLE, TUNABLES, VARIABLE)
