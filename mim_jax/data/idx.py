"""Reading IDX files (the MNIST / Fashion-MNIST format), gzipped or not.

IDX layout: a 4-byte big-endian magic `0x00 0x00 <dtype> <ndim>`, `ndim` big-endian uint32
dimensions, then the data in C order. Only dtype 0x08 (uint8) occurs in (Fashion-)MNIST.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import zlib

import numpy as np

_UINT8 = 0x08

# Split name -> file prefix, as published by Zalando and packaged by Debian.
FMNIST_PREFIXES = {"train": "train", "test": "t10k"}


class IdxFormatError(ValueError):
  """An IDX file is truncated, has a wrong header, or holds unexpected shapes."""


def _read_bytes(path: str) -> bytes:
  """Returns the (decompressed) contents of `path`; a truncated gzip stream names the file."""
  if not path.endswith(".gz"):
    with open(path, "rb") as f:
      return f.read()
  try:
    with gzip.open(path, "rb") as f:
      return f.read()
  except (EOFError, OSError, zlib.error) as e:
    raise IdxFormatError(f"IDX file {path} is truncated or not valid gzip ({e}); re-download "
                         "or reinstall it (e.g. sudo apt-get install --reinstall "
                         "dataset-fashion-mnist)") from e


def parse_idx(data: bytes, *, name: str = "<bytes>") -> np.ndarray:
  """Parses IDX bytes into a uint8 array of the shape the header declares.

  Raises IdxFormatError naming `name` on a bad magic, an unsupported dtype, or a length that
  does not match the header (truncated or with trailing bytes).
  """
  if len(data) < 4:
    raise IdxFormatError(f"IDX file {name} is truncated: {len(data)} bytes, no header")
  zero, dtype, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or ndim == 0:
    raise IdxFormatError(f"IDX file {name} has a bad magic number {data[:4].hex()} "
                         "(expected 0000 08 0N): not an IDX file")
  if dtype != _UINT8:
    raise IdxFormatError(f"IDX file {name} has dtype code 0x{dtype:02x}; only uint8 (0x08) "
                         "is supported")
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise IdxFormatError(f"IDX file {name} is truncated inside its header")
  shape = struct.unpack(f">{ndim}I", data[4:header_len])
  expected = int(np.prod(shape, dtype=np.int64))
  actual = len(data) - header_len
  if actual != expected:
    what = "truncated" if actual < expected else "longer than its header says"
    raise IdxFormatError(f"IDX file {name} is {what}: header {shape} needs {expected} data "
                         f"bytes, found {actual}")
  return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally .gz) into a read-only uint8 array.

  Kept per process while the file is unchanged (same path, size and modification time): a
  run opens its splits several times (training, evaluation, the example count), and
  decompressing Fashion-MNIST's training images takes about 0.5 s each time."""
  stat = os.stat(path)
  return _read_idx_unchanged(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)  # images and labels of a train and a test split
def _read_idx_unchanged(path: str, size: int, mtime_ns: int) -> np.ndarray:
  del size, mtime_ns  # part of the cache key only
  return parse_idx(_read_bytes(path), name=path)


def fmnist_file_candidates(folder: str, split: str, kind: str) -> list[str]:
  """The file names accepted for `split` ("train"/"test") and `kind` ("images"/"labels")."""
  prefix = FMNIST_PREFIXES[split]
  ndim = 3 if kind == "images" else 1
  names = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
  return [os.path.join(folder, n + ext) for n in names for ext in (".gz", "")]


def find_fmnist_file(folder: str, split: str, kind: str) -> str | None:
  """The first existing candidate file, or None."""
  for candidate in fmnist_file_candidates(folder, split, kind):
    if os.path.isfile(candidate):
      return candidate
  return None


def load_fmnist(folder: str, split: str) -> tuple[np.ndarray, np.ndarray, str]:
  """Loads a Fashion-MNIST split: (images uint8 [N, 28, 28], labels uint8 [N], images path).

  Checks that images are 3-D, labels 1-D and that both hold the same number of examples.
  """
  paths = {}
  for kind in ("images", "labels"):
    path = find_fmnist_file(folder, split, kind)
    if path is None:
      raise FileNotFoundError(
          f"no Fashion-MNIST {split} {kind} in {folder} (looked for "
          f"{[os.path.basename(c) for c in fmnist_file_candidates(folder, split, kind)]})")
    paths[kind] = path
  images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
  if images.ndim != 3:
    raise IdxFormatError(f"IDX file {paths['images']} holds shape {images.shape}; images need "
                         "3 dimensions (N, H, W)")
  if labels.ndim != 1 or len(labels) != len(images):
    raise IdxFormatError(f"IDX file {paths['labels']} holds shape {labels.shape}; expected "
                         f"({len(images)},) labels to match {paths['images']}")
  return images, labels, paths["images"]
