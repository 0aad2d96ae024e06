"""One run per workdir: an exclusive lock on the workdir, held from start-up to exit.

Two runs on one workdir would both resume from its latest checkpoint and save the same steps
over each other's (and the checkpointer of the one would delete the other's unfinished
writes). `hold(workdir)` takes an `fcntl.flock` on `<workdir>/.run.lock` before anything
expensive starts; a second run gets `WorkdirInUseError` (exit 2) naming the process that holds
it, before it reads a checkpoint. The kernel drops an flock when its process ends, however it
ends (kill -9 included), so the lock is never stale: the file stays in the workdir, and only a
live holder blocks. Do not delete it while a run holds it: a new run would lock a new file.

Each process of a multi-process run locks its own file (process i > 0: `.run.lock.<i>`): the
processes of one run share the workdir, and another run's process of the same index is refused.
gs:// workdirs are not locked: Cloud Storage has no lock that a dying process releases, so two
runs on one bucket path are not detected.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from typing import Iterator

from mim_jax import storage
from mim_jax.config.errors import ConfigError
from mim_jax.training.checkpoint import WorkdirNotWritableError

log = logging.getLogger(__name__)

LOCK_FILE = ".run.lock"

# The descriptors of the locks this process holds. A forked child closes its copies (see
# `_close_in_child`): a lock shared with a child outliving a kill -9 would block the resume.
_held: set[int] = set()


def _close_in_child() -> None:
  # close, not LOCK_UN: unlocking a shared descriptor would release the parent's lock too.
  for fd in _held:
    with contextlib.suppress(OSError):
      os.close(fd)
  _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


class WorkdirInUseError(ConfigError):
  """Another live process (another run) holds the workdir's lock."""


def lock_path(workdir: str, process_index: int = 0) -> str:
  return os.path.join(workdir, LOCK_FILE + (f".{process_index}" if process_index else ""))


def _holder(path: str) -> str:
  """Who holds the lock at `path`, as its holder wrote it."""
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
    return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
  except (OSError, ValueError, KeyError, TypeError):  # written a moment after the lock
    return "a process that has not written its pid and host yet"


@contextlib.contextmanager
def hold(workdir: str, process_index: int = 0) -> Iterator[None]:
  """Holds the lock of `workdir` for process `process_index` of a run while the block runs.

  Raises WorkdirInUseError when another process holds it and WorkdirNotWritableError when the
  lock file cannot be created. A URL (gs://) is not locked (see the module's docstring)."""
  if storage.is_url(workdir):
    yield
    return
  path = lock_path(workdir, process_index)
  try:
    os.makedirs(workdir, exist_ok=True)
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by exec'd children
    except PermissionError:  # another user's lock file: flock needs no write access
      fd = os.open(path, os.O_RDONLY)
  except OSError as e:
    raise WorkdirNotWritableError(
        f"cannot write to {workdir!r} ({e.strerror or e}); checkpoints and logs go there, so "
        "pass a writable --workdir with free space") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    locked = True
  except BlockingIOError:
    os.close(fd)
    raise WorkdirInUseError(
        f"{workdir} is in use by another run ({_holder(path)}; lock file {path}): two runs "
        "would resume the same checkpoint and overwrite each other's. Wait for it to end or "
        "stop it, or pass another --workdir.") from None
  except OSError as e:  # a filesystem without flock (some FUSE mounts): run, but say so
    os.close(fd)
    log.warning("cannot lock %s (%s): a second run on this workdir would not be stopped",
                path, e.strerror or e)
    locked = False
  if not locked:
    yield
    return
  _held.add(fd)
  try:
    # In place, not storage.write_text: a rename would put the lock on a file no one opens.
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "process_index": process_index,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:  # for another run's message only: a full disk or a read-only descriptor is no error
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
    except OSError:
      pass
    yield
  finally:
    if fd in _held:  # else a forked child, which closed its copy
      _held.discard(fd)
      fcntl.flock(fd, fcntl.LOCK_UN)  # also where a forked child kept a copy of the descriptor
      os.close(fd)
