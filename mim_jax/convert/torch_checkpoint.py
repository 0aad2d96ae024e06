"""Reading PyTorch checkpoints (.pth / .bin) without running code from the file.

A torch checkpoint is a pickle, and unpickling can call any function the file names. Two
readers are used, in this order:

1. `torch.load(path, map_location="cpu", weights_only=True)`: torch's own restricted
   unpickler, which builds tensors, containers and primitive values only.
2. When torch refuses a global (training checkpoints pickle `args` as an `argparse.Namespace`,
   numpy scalars, ...) or torch is not installed, `read_torch_zip` reads the zip archive that
   `torch.save` writes with a restricted unpickler of this module: the only names it resolves
   are torch's tensor-rebuild functions and storage types (reimplemented here on numpy, with
   bounds checks), `OrderedDict` and a few builtin containers. Every other name becomes an
   inert `Skipped` placeholder whose constructor, `__setstate__` and item setters do nothing,
   so no code named by the file runs and those entries are simply not read.

`torch.serialization.add_safe_globals` is deliberately not used: allow-listing a class lets the
file run that class's constructor and `__setstate__` with arguments of its choosing.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any, Optional

import ml_dtypes
import numpy as np


class NotACheckpointError(ValueError):
  """The file is not a checkpoint this package can read."""


# Storage type names torch pickles (`torch.FloatStorage`, ...) -> element dtype.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"), "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"), "ComplexDoubleStorage": np.dtype("<c16"),
    "UntypedStorage": np.dtype("u1"),
}


class Skipped:
  """Stands for an object of a class the restricted reader does not construct.

  Whatever the pickle does with it (construct it, set its state, add items) does nothing.
  """
  global_name = "?"

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __setitem__(self, key, value):
    del key, value

  def append(self, value):
    del value

  def extend(self, values):
    del values

  def __iter__(self):
    return iter(())

  def __repr__(self) -> str:
    return f"<skipped {self.global_name}>"


class _StorageType:
  def __init__(self, name: str):
    self.name, self.dtype = name, STORAGE_DTYPES[name]


def _check_int_tuple(name: str, value: Any) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
    raise pickle.UnpicklingError(f"tensor {name} {value!r} is not a tuple of non-negative ints")
  return tuple(value)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    *unused: Any) -> np.ndarray:
  """torch._utils._rebuild_tensor(_v2) on numpy: a bounds-checked strided copy of a storage."""
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError("tensor without a storage read from the archive")
  size, stride = _check_int_tuple("size", size), _check_int_tuple("stride", stride)
  (offset,) = _check_int_tuple("offset", (storage_offset,))
  if len(size) != len(stride):
    raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:  # as_strided would read past the buffer
    raise pickle.UnpicklingError(f"tensor (offset {offset}, size {size}, stride {stride}) "
                                 f"overruns its storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride],
      writeable=False)
  return np.array(view, copy=True)


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
  del unused
  return data


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
  """Tensor subclasses: rebuild the plain tensor if `func` is one of ours, else skip."""
  del new_type, state
  if func in (_rebuild_tensor, _rebuild_parameter) and isinstance(args, tuple):
    return func(*args)
  return Skipped()


def _encode(text: Any, encoding: str = "utf-8") -> bytes:
  """`_codecs.encode`: protocol-2 pickles store bytes as encode(str, 'latin1')."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
    raise pickle.UnpicklingError("_codecs.encode is only allowed on text")
  return text.encode(encoding)


_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice}
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("_codecs", "encode"): _encode,
    **{(module, name): fn for module in ("builtins", "__builtin__")
       for name, fn in _BUILTINS.items()},
}


def _decode_storage(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
  """Raw storage bytes -> a read-only 1-D array of `dtype` in native byte order."""
  if not big_endian or dtype.itemsize == 1:
    return np.frombuffer(raw, dtype)
  if dtype.kind == "c" or dtype.itemsize not in (2, 4, 8):
    raise pickle.UnpicklingError(f"big-endian {dtype} storages are not supported")
  swapped = np.frombuffer(raw, np.uint8).reshape(-1, dtype.itemsize)[:, ::-1]
  return np.ascontiguousarray(swapped).view(dtype).reshape(-1)


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED` names and storage types; all else becomes `Skipped`."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
    super().__init__(io.BytesIO(data))
    self.archive, self.prefix, self.big_endian = archive, prefix, big_endian
    self.skipped: list[str] = []
    self.storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    full = f"{module}.{name}"
    if full not in self.skipped:
      self.skipped.append(full)
    # A fresh subclass per name, only to say in messages what was skipped.
    return type("Skipped", (Skipped,), {"global_name": full})

  def persistent_load(self, pid: Any) -> Any:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and isinstance(pid[4], int)):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if key not in self.storages:
      try:
        raw = self.archive.read(f"{self.prefix}data/{key}")
      except KeyError:
        raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
      dtype = storage_type.dtype
      if len(raw) != numel * dtype.itemsize and storage_type.name != "UntypedStorage":
        raise pickle.UnpicklingError(f"storage {key}: {len(raw)} bytes for {numel} elements of "
                                     f"{dtype}")
      self.storages[key] = _decode_storage(raw, dtype, self.big_endian)
    storage = self.storages[key]
    if storage_type.name == "UntypedStorage":
      return storage
    # Several typed views of one storage share its bytes; reinterpret like torch does.
    return storage.view(storage_type.dtype) if storage.dtype != storage_type.dtype else storage


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
  """The "<name>/" folder of the one data.pkl that a torch.save archive holds."""
  pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise NotACheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (it "
                              "needs exactly one <name>/data.pkl)")
  return pickles[0][:-len("data.pkl")]


def read_torch_zip(path: str) -> tuple[Any, list[str]]:
  """(object, skipped global names) of a zip-format torch checkpoint, tensors as numpy arrays.

  Executes nothing named by the file (see the module docstring).
  """
  if not zipfile.is_zipfile(path):
    raise NotACheckpointError(
        f"{path} is not a zip-format PyTorch checkpoint (torch.save has written zip archives "
        "since PyTorch 1.6); older formats need `pip install torch`")
  with zipfile.ZipFile(path) as archive:
    prefix = _archive_prefix(archive, path)
    byteorder = (archive.read(f"{prefix}byteorder").decode().strip()
                 if f"{prefix}byteorder" in archive.namelist() else "little")
    unpickler = _RestrictedUnpickler(archive.read(f"{prefix}data.pkl"), archive, prefix,
                                     big_endian=byteorder == "big")
    try:
      obj = unpickler.load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as e:
      raise NotACheckpointError(f"{path}: cannot read its pickle safely "
                                f"({type(e).__name__}: {e})") from None
  return obj, unpickler.skipped


def torch_or_none() -> Optional[Any]:
  """The torch module, or None where it is not installed."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return torch


def read_torch_checkpoint(path: str) -> tuple[Any, list[str]]:
  """(object, skipped global names) of a torch checkpoint, read without running its code.

  torch.load with weights_only=True first (values are torch tensors); if it refuses a global,
  or torch is missing, the restricted zip reader (values are numpy arrays; the names of the
  globals it did not construct are returned).
  """
  is_zip = zipfile.is_zipfile(path)
  if is_zip:
    with zipfile.ZipFile(path) as archive:
      _archive_prefix(archive, path)  # a clear message for zips that are not checkpoints
  torch = torch_or_none()
  if torch is not None:
    try:
      return torch.load(path, map_location="cpu", weights_only=True), []
    except pickle.UnpicklingError as e:
      if not is_zip:
        raise NotACheckpointError(f"{path} is not a PyTorch checkpoint ({e})") from None
    except (OSError, MemoryError):
      raise  # the file could not be read (permissions, a disk error) or fit: not its format
    except Exception as e:  # pylint: disable=broad-except  # whatever garbage makes it raise
      detail = (str(e).splitlines() or ["empty input"])[0]
      raise NotACheckpointError(f"{path} is not a PyTorch checkpoint (torch.load: "
                                f"{type(e).__name__}: {detail})") from None
  return read_torch_zip(path)
