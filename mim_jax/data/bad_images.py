"""A process-safe record of the images that were skipped because they could not be decoded.

Decoding runs in grain worker processes when `config.data.num_workers > 0`, so a plain module
counter would stay at zero in the training process. Instead every process appends the paths
it skipped to its own file (`<pid>.txt`) in one directory owned by the main process; the
directory travels to the workers inside the (pickled) decode transform. Bad images are rare, so
one small append per skip costs nothing measurable.

Read it from the main process with `num_skipped_images()` / `skipped_images()`. Each skip is
one entry: a bad file met in every epoch is counted once per epoch. With workers, the count
includes images decoded ahead of the batches consumed so far (prefetching).

The log names a process's first WARN_FIRST bad files, each once (not again every epoch), then
says only how many it skipped, at 10, 100, 1000, ... skips: a folder of thousands of bad files
(or one read for hundreds of epochs) does not bury the training log. Each decoding process
keeps its own budget: with data workers, up to WARN_FIRST names per worker.

The directory's name is chosen at start-up but the directory is made by the first skip: a run
without bad images leaves nothing behind, even when it is killed before its exit handlers run.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile
import threading

log = logging.getLogger(__name__)

_lock = threading.Lock()
_directory: str | None = None
_owner_pid: int | None = None

WARN_FIRST = 5  # bad files a process names in the log; after them, counts only
# Per skip log (`log_directory()`: one per run's main process): the files this process has
# named so far, and how many images it has skipped.
_named: dict[str, set[str]] = {}
_skips: dict[str, int] = {}


def log_directory() -> str:
  """The path of this (main) process's skip log; the directory exists once an image is skipped.

  The name is unguessable (64 random bits), so no other user can plant it in the shared
  temporary directory before the first skip makes it (private to this user, mode 0o700).
  """
  global _directory, _owner_pid
  with _lock:
    if _directory is None or _owner_pid != os.getpid():
      _directory = os.path.join(tempfile.gettempdir(), f"mim_jax_skipped_images_{os.getpid()}_"
                                f"{secrets.token_hex(8)}")
      _owner_pid = os.getpid()
      atexit.register(_cleanup, _directory, _owner_pid)
    return _directory


def _cleanup(directory: str, owner_pid: int) -> None:
  if os.getpid() == owner_pid:  # never from a forked child that inherited the handler
    shutil.rmtree(directory, ignore_errors=True)


def record_skip(directory: str, path: str, reason: str) -> None:
  """Appends the skipped `path` to this process's file in `directory`, and warns: naming it
  if it is one of the first WARN_FIRST bad files this process skips into `directory`, else at
  every power of ten of its skips there, with their count."""
  with _lock:  # the decision and its line together: the reader threads' lines stay in order
    named = _named.setdefault(directory, set())
    count = _skips[directory] = _skips.get(directory, 0) + 1
    if path not in named and len(named) < WARN_FIRST:
      named.add(path)
      log.warning("skipping bad image %s (%s); set config.data.on_bad_image='raise' to stop "
                  "instead%s", path, reason,
                  ". Further bad images are not named, only counted (a line at 10, 100, ... "
                  "skips)" if len(named) == WARN_FIRST else "")
    elif count >= 10 and str(count).rstrip("0") == "1":  # 10, 100, 1000, ...
      log.warning("%d bad images skipped so far by process %d (the first %d named above; "
                  "config.data.on_bad_image='raise' stops at the first, naming it)", count,
                  os.getpid(), len(named))
  with _lock:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(os.path.join(directory, f"{os.getpid()}.txt"), "a", encoding="utf-8") as f:
      f.write(path.replace("\n", " ") + "\n")


def skipped_images() -> list[str]:
  """Paths skipped so far by this process and its grain workers (one entry per skip)."""
  directory = log_directory()
  paths: list[str] = []
  if not os.path.isdir(directory):  # nothing skipped yet
    return paths
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      paths.extend(line.rstrip("\n") for line in f if line.strip())
  return paths


def num_skipped_images() -> int:
  """How many images were skipped so far by this process and its grain workers."""
  return len(skipped_images())


def reset_skipped_images() -> None:
  """Forgets all recorded skips (e.g. between tests or evaluation passes), and which files
  this process has named in the log."""
  directory = log_directory()
  with _lock:
    _named.clear()
    _skips.clear()
    if not os.path.isdir(directory):
      return
    for name in os.listdir(directory):
      os.remove(os.path.join(directory, name))
