"""A process-safe record of the images that were skipped because they could not be decoded.

Decoding runs in grain worker processes when `config.data.num_workers > 0`, so a plain module
counter would stay at zero in the training process. Instead every process appends the paths
it skipped to its own file (`<pid>.txt`) in one directory owned by the main process; the
directory travels to the workers inside the (pickled) decode transform. Bad images are rare, so
one small append per skip costs nothing measurable.

Read it from the main process with `num_skipped_images()` / `skipped_images()`. Each skip is
one entry: a bad file met in every epoch is counted once per epoch. With workers, the count
includes images decoded ahead of the batches consumed so far (prefetching).

The log names the first WARN_FIRST bad files, each once (not again every epoch, nor again by
another worker), then each process says only how many it skipped, at 10, 100, 1000, ... skips:
a folder of thousands of bad files (or one read for hundreds of epochs) does not bury the
training log. The budget is shared by a host's main process and its data workers through the
directory (each host of a multi-host run has its own): a name is claimed by creating its file
there (`named/`, O_EXCL, so that two workers never both win one).

The directory's name is chosen at start-up but the directory is made by the first skip: a run
without bad images leaves nothing behind, even when it is killed before its exit handlers run.
"""

from __future__ import annotations

import atexit
import hashlib
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

WARN_FIRST = 5  # bad files a host names in the log (its processes together); then counts
# Per skip log (`log_directory()`: one per run's main process): how many images this process
# has skipped into it.
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
  if it is one of the first WARN_FIRST bad files this host's processes skip into `directory`,
  else at every power of ten of this process's skips there, with their count."""
  with _lock:  # the decision and its line together: the reader threads' lines stay in order
    os.makedirs(directory, mode=0o700, exist_ok=True)  # private: the mode applies to the leaf
    count = _skips[directory] = _skips.get(directory, 0) + 1
    slot = _claim_name(directory, path)
    if slot is not None:
      log.warning("skipping bad image %s (%s); set config.data.on_bad_image='raise' to stop "
                  "instead%s", path, reason,
                  ". Further bad images are not named, only counted (a line at 10, 100, ... "
                  "skips)" if slot == WARN_FIRST - 1 else "")
    elif count >= 10 and str(count).rstrip("0") == "1":  # 10, 100, 1000, ...
      log.warning("%d bad images skipped so far by process %d (the first bad files, up to "
                  "%d, are named in the log; config.data.on_bad_image='raise' stops at the "
                  "first, naming it)", count, os.getpid(), WARN_FIRST)
    with open(os.path.join(directory, f"{os.getpid()}.txt"), "a", encoding="utf-8") as f:
      f.write(path.replace("\n", " ") + "\n")


_NAMED = "named"  # sub-folder of the skip log: the claims of the files named in the log
_budget_spent: set[str] = set()  # skip logs whose every slot this process has seen taken


def _claim_name(directory: str, path: str) -> int | None:
  """The slot (0 .. WARN_FIRST - 1) this process won to name `path` in the log, or None: the
  path was named already (by any process sharing `directory`) or every slot is taken. Claims
  are files created with O_EXCL, first one per path, then one per slot in order, so no two
  processes win one; once the last slot is taken no claim is made (no file per bad image). A
  claim that cannot be made (the folder reset meanwhile) names nothing."""
  named = os.path.join(directory, _NAMED)
  last_slot = os.path.join(named, f"slot_{WARN_FIRST - 1}")
  if directory in _budget_spent or os.path.exists(last_slot):
    _budget_spent.add(directory)
    return None
  try:
    os.makedirs(named, mode=0o700, exist_ok=True)
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    if not _create(os.path.join(named, f"path_{digest}")):
      return None
    return next((i for i in range(WARN_FIRST) if _create(os.path.join(named, f"slot_{i}"))),
                None)
  except OSError:
    return None


def _create(path: str) -> bool:
  """Creates the empty file `path`; False when it exists."""
  try:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
  except FileExistsError:
    return False
  return True


def skipped_images() -> list[str]:
  """Paths skipped so far by this process and its grain workers (one entry per skip)."""
  directory = log_directory()
  paths: list[str] = []
  if not os.path.isdir(directory):  # nothing skipped yet
    return paths
  for name in sorted(n for n in os.listdir(directory) if n.endswith(".txt")):
    with open(os.path.join(directory, name), encoding="utf-8") as f:
      paths.extend(line.rstrip("\n") for line in f if line.strip())
  return paths


def num_skipped_images() -> int:
  """How many images were skipped so far by this process and its grain workers."""
  return len(skipped_images())


def reset_skipped_images() -> None:
  """Forgets all recorded skips (e.g. between tests or evaluation passes), and which files
  the run has named in the log."""
  directory = log_directory()
  with _lock:
    _skips.clear()
    _budget_spent.clear()
    if not os.path.isdir(directory):
      return
    for name in os.listdir(directory):
      path = os.path.join(directory, name)
      if os.path.isdir(path):  # the claims of named files (a worker may still claim one)
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
