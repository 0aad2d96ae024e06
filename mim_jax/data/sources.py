"""Random-access sources (grain `RandomAccessDataSource`: `__len__` + `__getitem__`).

Every source returns raw records, dicts with
  "index"  int    position in the source
  "label"  int    class label (0 when the source has none)
  "path"   str    where the example comes from, for error messages ("file.gz[17]" for IDX)
and the pixels either as
  "image"  uint8 [h, w, c] array or encoded image bytes (fashion_mnist, tfds, synthetic)
or, for image folders, no "image": the file at "path" is read and decoded by the pipeline's
`DecodeImage` map, i.e. in the grain workers, never at listing time.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from PIL import Image

from mim_jax.data import idx

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SOURCES = ("fashion_mnist", "image_folder", "tfds", "synthetic")


class FashionMnistSource:
  """Fashion-MNIST from the IDX files: records {"image": uint8 [28, 28, 1], "label", ...}.

  The whole split is parsed eagerly (47 MB for train), so header/length errors surface at
  construction, and it is shared with grain workers by pickling.
  """

  def __init__(self, folder: str, split: str):
    self.images, self.labels, self.images_path = idx.load_fmnist(folder, split)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    return {"image": self.images[index][..., None], "label": int(self.labels[index]),
            "index": index, "path": f"{self.images_path}[{index}]"}

  def __repr__(self) -> str:
    return f"FashionMnistSource({self.images_path!r}, n={len(self)})"


def _is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_images(root: str):
  """Yields image file paths under `root` in sorted, deterministic order (hidden dirs skipped)."""
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if _is_image_file(name):
        yield os.path.join(dirpath, name)


def has_any_image(root: str) -> bool:
  """True as soon as one image file is found under `root` (cheap check for validation)."""
  return next(_walk_images(root), None) is not None


@functools.lru_cache(maxsize=8)
def list_image_folder(root: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
  """(paths, labels, class names) of all images under `root`, recursively, sorted.

  Label = index of the image's first-level sub-folder among the sorted first-level
  sub-folders that contain images; images directly in `root` get label 0. Cached per process
  because num_examples, the train and the eval iterator all need it (ImageNet: ~1.3M files).
  """
  paths = tuple(_walk_images(root))
  firsts = [os.path.relpath(p, root).split(os.sep) for p in paths]
  classes = tuple(sorted({parts[0] for parts in firsts if len(parts) > 1}))
  class_index = {c: i for i, c in enumerate(classes)}
  labels = tuple(class_index[parts[0]] if len(parts) > 1 else 0 for parts in firsts)
  return paths, labels, classes


class ImageFolderSource:
  """Image files under a root folder: records {"path", "label", "index"} (decoded later).

  Paths are kept relative to the root as one fixed-width bytes array (and labels as int32):
  the source is pickled into every grain worker, and one buffer of ~40 bytes per file pickles
  far faster than a million Python strings.
  """

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    paths, labels, self.classes = list_image_folder(self.root)
    if not paths:
      raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}")
    self._rel_paths = np.array(
        [os.path.relpath(p, self.root).encode("utf-8", "surrogateescape") for p in paths])
    self._labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._labels)

  def path(self, index: int) -> str:
    rel = self._rel_paths[index].decode("utf-8", "surrogateescape")
    return os.path.join(self.root, rel)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    return {"path": self.path(index), "label": int(self._labels[index]), "index": index}

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, n={len(self)}, classes={len(self.classes)})"


class TfdsSource:
  """A TFDS dataset prepared as ArrayRecord, read through `tfds.data_source` (no TensorFlow).

  Images are fetched undecoded (`SkipDecoding`) so that PIL decodes them in the pipeline, where
  bad images are handled. The tfds reader is opened lazily and re-opened after unpickling, so
  each grain worker has its own file handles.
  """

  def __init__(self, name: str, split: str, data_dir: str = ""):
    self.name, self.split, self.data_dir = name, split, data_dir or None
    self._source = None
    self._len = len(self._data_source())

  def _data_source(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy, optional
      self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                      download=False,
                                      decoders={"image": tfds.decode.SkipDecoding()})
    return self._source

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    record = self._data_source()[index]
    image = record["image"]
    if not isinstance(image, np.ndarray) or image.dtype == object:
      image = bytes(image.item() if isinstance(image, np.ndarray) else image)
    return {"image": image, "label": int(record.get("label", 0)), "index": index,
            "path": f"tfds:{self.name}/{self.split}[{index}]"}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


class SyntheticSource:
  """Deterministic smooth random images: record i is the same in every process and run.

  A random grid of 2..8 x 2..8 colours from a Generator seeded by (tag, i), upsampled bicubic
  to `image_size`, so crops and resizes cost what real images cost. Label = i % 10.
  """

  _TAG = 0x5EED

  def __init__(self, size: int, image_size: tuple[int, int], channels: int):
    self.size, self.image_size, self.channels = int(size), tuple(image_size), int(channels)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    rng = np.random.default_rng([self._TAG, index])
    gh, gw = rng.integers(2, 9, size=2)
    grid = rng.integers(0, 256, size=(gh, gw, self.channels), dtype=np.uint8)
    h, w = self.image_size
    mode = "L" if self.channels == 1 else "RGB"
    pil = Image.fromarray(grid[..., 0] if self.channels == 1 else grid, mode)
    image = np.asarray(pil.resize((w, h), Image.Resampling.BICUBIC)).reshape(h, w, self.channels)
    return {"image": image, "label": index % 10, "index": index, "path": f"synthetic[{index}]"}

  def __repr__(self) -> str:
    return f"SyntheticSource(n={self.size}, image_size={self.image_size})"


def build_source(data_cfg, *, image_size: tuple[int, int], channels: int):
  """The random-access source `config.data.source` names (records: see module docstring)."""
  source = data_cfg.source
  if source == "fashion_mnist":
    return FashionMnistSource(data_cfg.path, data_cfg.split)
  if source == "image_folder":
    return ImageFolderSource(data_cfg.path)
  if source == "tfds":
    return TfdsSource(data_cfg.tfds_name, data_cfg.split, data_cfg.tfds_data_dir)
  if source == "synthetic":
    return SyntheticSource(data_cfg.synthetic_size, image_size, channels)
  from mim_jax.config_errors import config_error  # pylint: disable=g-import-not-at-top
  raise config_error("data.source", source, f"one of {SOURCES}")


def num_examples(data_cfg, *, image_size: tuple[int, int], channels: int) -> int:
  """Number of examples in the whole source (all hosts together)."""
  return len(build_source(data_cfg, image_size=image_size, channels=channels))


def fixed_size_source(data_cfg) -> bool:
  """True for sources whose images are already framed (no eval centre crop needed)."""
  return data_cfg.source in ("fashion_mnist", "synthetic")
