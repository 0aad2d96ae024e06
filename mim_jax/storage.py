"""One path layer for everything a run reads and writes: local paths and gs:// URLs.

Checkpoints, metrics.jsonl, config.json, results.json, pictures, encoder and tokenizer exports
and converted weights all go through these functions, so a workdir can be a local folder or a
Cloud Storage URL such as `gs://bucket/runs/mae` (what a Cloud TPU VM wants: its disk is
small and goes away with the VM). Orbax and TensorBoard (tensorboardX) take the same strings
and speak gs:// themselves.

Local paths keep the guarantees they always had: a file is written to a temporary sibling and
renamed over its name, so a reader never sees half a file. A URL goes through etils.epath (the
path layer Orbax uses; without TensorFlow its gs:// backend is gcsfs): one object per write,
and Cloud Storage makes an object visible only once its upload is complete, which gives the
same guarantee. Cloud Storage has no append, so the caller rewrites a growing file whole
(`write_text`), and no directories: `makedirs` is a no-op there.

A test points all of it at a local emulator (tests/test_gcs.py): gcsfs and google-cloud-storage
read STORAGE_EMULATOR_HOST, TensorStore (Orbax's array storage) TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import glob as glob_lib
import io
import os
import shutil
import tempfile
from typing import Any, BinaryIO, Callable


def is_url(path: str) -> bool:
  """Whether `path` names remote storage (gs://bucket/...) rather than a local file."""
  return "://" in str(path)


def absolute(path: str) -> str:
  """The absolute form of a local path; a URL as it is."""
  return str(path) if is_url(path) else os.path.abspath(path)


def _epath(path: str):
  """An etils.epath.Path for a URL, with a clear error when its backend is not installed."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if str(path).startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise ImportError(
          f"{path!r} is a Cloud Storage URL; reading and writing gs:// needs gcsfs: "
          "pip install 'mim_jax[gcs]' (or pip install gcsfs)") from e
  return epath.Path(path)


def _fresh(path: str):
  """`_epath(path)` after dropping gcsfs's cached listings of it and its parents: other writers
  (TensorStore under Orbax, other processes) change a bucket behind gcsfs's back, and a stale
  listing would hide a checkpoint or an export."""
  p = _epath(path)
  if str(path).startswith("gs://"):
    from etils.epath import backend  # pylint: disable=g-import-not-at-top
    backend.fsspec_backend.fs(str(path)).invalidate_cache(str(path).rstrip("/"))
  return p


def exists(path: str) -> bool:
  return _fresh(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _fresh(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _fresh(path).is_file() if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names (not paths) of the entries of directory `path`."""
  if is_url(path):
    return [p.name for p in _fresh(path).iterdir()]
  return os.listdir(path)


def glob(pattern: str) -> list[str]:
  """Paths matching a shell pattern in the last component of `pattern`."""
  if is_url(pattern):
    parent, name = pattern.rsplit("/", 1)
    return [os.fspath(p) for p in _fresh(parent).glob(name)]
  return glob_lib.glob(pattern)


def makedirs(path: str) -> None:
  """Creates directory `path` and its parents (nothing to create in Cloud Storage)."""
  if is_url(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def rmtree(path: str) -> None:
  """Deletes `path` and everything below it, if it exists."""
  if is_url(path):
    p = _epath(path)
    if p.exists():
      p.rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def is_within(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or lies inside it: local paths after `~` and symlinks are
  resolved (either may not exist yet), URLs by their text; a URL is never within a local
  folder, nor a local path within a URL."""
  if is_url(path) or is_url(folder):
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")
  path, folder = (os.path.realpath(os.path.expanduser(p)) for p in (path, folder))
  return os.path.commonpath([path, folder]) == folder


def rename(path: str, new_path: str) -> None:
  """Moves file or directory `path` to `new_path`, which must not exist. Local: one atomic
  rename. URL: Cloud Storage has no rename, so every object is copied, then deleted; a move
  cut short leaves a partial copy, with the original (or what is left of it) still there.
  (Not gcsfs's `mv`, which first tries an object-move API that some buckets and the test
  emulator refuse, and falls back to the same copy only after retrying for half a minute.)"""
  if exists(new_path):
    raise FileExistsError(f"{new_path} already exists")
  if not is_url(path):
    os.rename(path, new_path)
    return
  _fresh(new_path)
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  fs = backend.fsspec_backend.fs(str(path))
  source = str(_fresh(path)).rstrip("/")
  fs.copy(source, str(new_path).rstrip("/"), recursive=fs.isdir(source))
  fs.rm(source, recursive=True)
  _fresh(path)


def remove(path: str) -> None:
  """Deletes file `path` if it exists."""
  if is_url(path):
    p = _epath(path)
    if p.exists():
      p.unlink()
  elif os.path.exists(path):
    os.remove(path)


def read_text(path: str) -> str:
  return _epath(path).read_text() if is_url(path) else _read_local(path, "r")


def read_bytes(path: str) -> bytes:
  return _epath(path).read_bytes() if is_url(path) else _read_local(path, "rb")


def _read_local(path: str, mode: str):
  with open(path, mode) as f:  # pylint: disable=unspecified-encoding
    return f.read()


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader sees the old or the new file, never a part."""
  write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
  """The process's umask: from /proc on Linux; elsewhere read by setting it and setting it
  back (a thread creating a file in between would get 022)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically, creating parent directories (see `write_with`)."""
  write_with(path, lambda f: f.write(data))


def write_with(path: str, write: Callable[[BinaryIO], Any]) -> None:
  """Writes `path` atomically through `write(file)`, creating parent directories: a reader
  sees the old file or the whole new one, never a part.

  Local: `write` fills a temporary file in the same directory, which is then renamed over
  `path` with the mode open() would have given it. URL: `write` fills memory, uploaded as one
  object, which Cloud Storage publishes only when complete.
  """
  if is_url(path):
    buffer = io.BytesIO()
    write(buffer)
    _epath(path).write_bytes(buffer.getvalue())
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private (0600)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:
      e.filename = path  # a failed write() names no file: say which (a full disk's message)
    raise
