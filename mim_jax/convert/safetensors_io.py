"""Reading and writing .safetensors files with numpy alone (no torch, no pickle).

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}, then the raw little-endian tensor bytes. Reading it executes no code, which is why
it is the preferred input. Tensors are memory-mapped, so a file larger than memory converts
one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping, Optional

import ml_dtypes
import numpy as np

from mim_jax import storage

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# A header is JSON text; anything near this size is not a tensor index.
MAX_HEADER_BYTES = 100 * 2**20


class NotSafetensorsError(ValueError):
  """The file is not a well-formed safetensors file."""


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, metadata) of a .safetensors file; tensors are read-only memory-mapped arrays."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise NotSafetensorsError(f"{path} is {size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", prefix)
    if not 2 <= header_len <= min(MAX_HEADER_BYTES, size - 8):
      raise NotSafetensorsError(f"{path} does not start with a safetensors header length "
                                f"(read {header_len} for a {size}-byte file)")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise NotSafetensorsError(f"{path}: the safetensors header is not JSON ({e})") from None
  if not isinstance(header, dict):
    raise NotSafetensorsError(f"{path}: the safetensors header is not a JSON object")
  metadata = header.pop("__metadata__", None) or {}
  data_start = 8 + header_len
  data_len = size - data_start
  data = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
          if data_len else np.zeros((0,), np.uint8))
  tensors = {}
  for name, info in header.items():
    try:
      dtype = DTYPES[info["dtype"]]
      shape = tuple(int(s) for s in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise NotSafetensorsError(f"{path}: malformed header entry for {name!r}: {info!r}") from None
    count = int(np.prod(shape, dtype=np.int64))
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_len or (
        end - begin != count * dtype.itemsize):
      raise NotSafetensorsError(f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) does "
                                f"not fit its byte range [{begin}, {end}) of {data_len}")
    tensors[name] = data[begin:end].view(dtype).reshape(shape)
  return tensors, metadata


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Optional[Mapping[str, str]] = None) -> str:
  """Writes numpy arrays (little-endian) to `path` atomically (a temporary file renamed; a
  gs:// URL gets one object upload, see mim_jax.storage)."""
  arrays = {}
  for name, value in tensors.items():
    array = np.asarray(value)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype not in _NAMES:
      raise ValueError(f"tensor {name!r}: dtype {array.dtype} has no safetensors name")
    arrays[name] = np.ascontiguousarray(array, dtype=dtype)
  header, offset = {}, 0
  # Sorted names: the same tensors always give the same bytes.
  for name in sorted(arrays):
    array = arrays[name]
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)  # tensor data 8-byte aligned, as the reference writer does

  def chunks():  # one array at a time: a large model's bytes are not all held at once locally
    yield struct.pack("<Q", len(text))
    yield text
    for name in sorted(arrays):
      yield arrays[name].tobytes()

  if storage.is_url(path):
    storage.write_bytes(path, b"".join(chunks()))
    return path
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    for chunk in chunks():
      f.write(chunk)
  os.replace(tmp, path)
  return path
