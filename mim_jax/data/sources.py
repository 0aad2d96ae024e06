"""Random-access sources (grain `RandomAccessDataSource`: `__len__` + `__getitem__`).

Every source returns raw records, dicts with
  "index"  int    position in the source
  "label"  int    class label (0 when the source has none)
  "path"   str    where the example comes from, for error messages ("file.gz[17]" for IDX)
and the pixels either as
  "image"  uint8 [h, w, c] array or encoded image bytes (fashion_mnist, tfds, synthetic)
or, for image folders, no "image": the file at "path" is read and decoded by the pipeline's
`DecodeImage` map, i.e. in the grain workers, never at listing time.

Every source also has `labels()`, int32 [N], the label of every record without reading the
images (cheap except for TFDS, see `TfdsSource.labels`); the low-label subsets of
`build_train_source` are chosen from it.

Splits: `build_source(..., split=None)` reads `config.data.split`; an explicit `split` reads that
split instead (`config.data.eval_split` for evaluation). Fashion-MNIST has "train" and "test",
TFDS takes any split string. Image folders have no split names: the folder `config.data.path`
is the training split and `config.data.eval_path` holds the images of every other split, with
the same class sub-folders (labels are looked up by the training folder's class names, so a
class missing from one folder does not shift the others). A sub-folder-per-split convention
was not used because a sub-folder named like a split could as well be a class. The synthetic
source has the same images for every split.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from PIL import Image

from mim_jax.config.errors import ConfigError, config_error
from mim_jax.data import idx, subsets

# PIL decodes the last two (transforms.decode_image); torchvision's folders read them too.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
SOURCES = ("fashion_mnist", "image_folder", "tfds", "npy", "synthetic")
# The data fields that say which images a split holds (its held-out part too) and how an
# undecodable one is handled: what a tool reading a split whole, without augmentation, reads.
IMAGE_FIELDS = ("source", "path", "split", "tfds_name", "tfds_data_dir", "synthetic_size",
                "synthetic_classes", "on_bad_image", "holdout", "subset_seed")
FMNIST_NUM_CLASSES = 10

class FashionMnistSource:
  """Fashion-MNIST from the IDX files: records {"image": uint8 [28, 28, 1], "label", ...}.

  The whole split is parsed eagerly (47 MB for train), so header/length errors surface at
  construction, and it is shared with grain workers by pickling.
  """

  def __init__(self, folder: str, split: str):
    self.images, self._labels, self.images_path = idx.load_fmnist(folder, split)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    return {"image": self.images[index][..., None], "label": int(self._labels[index]),
            "index": index, "path": f"{self.images_path}[{index}]"}

  def labels(self) -> np.ndarray:
    """int32 [N]: the labels IDX file, already in memory."""
    return self._labels.astype(np.int32)

  def __repr__(self) -> str:
    return f"FashionMnistSource({self.images_path!r}, n={len(self)})"


class NpySource:
  """Arrays in .npy files: DIR/SPLIT.npy holds the images [N, H, W] or [N, H, W, C] of
  dtype (uint8; uint16, read as a fraction of 65535; other integer types are refused; floats as
  they are, e.g. reflectances in [0, 1], finite: NaN or inf is refused); DIR/SPLIT_labels.npy,
  if present, the int labels [N] (else every label is 0). Opened memory-mapped: arrays larger
  than memory work."""

  def __init__(self, folder: str, split: str):
    self.images_path = os.path.join(folder, f"{split}.npy")
    self.images = np.load(self.images_path, mmap_mode="r", allow_pickle=False)
    # Bad input, as the trainer reports it (ConfigError: one line, exit 2), not a traceback.
    if self.images.ndim not in (3, 4):
      raise ConfigError(f"{self.images_path} holds an array of shape {self.images.shape}; "
                        "expected [N, H, W] or [N, H, W, C] (config.data.path)")
    # Float images with NaN or inf would turn the loss NaN (training) or print nan statistics:
    # refused here too, for the callers that build a source without data validation (the
    # scan is remembered per file, so after validation this costs nothing).
    bad = npy_nonfinite(self.images_path, self.images)
    if bad:
      raise ConfigError(f"{self.images_path} holds {bad} (config.data.path): "
                        f"{NONFINITE_ADVICE}")
    labels_path = os.path.join(folder, f"{split}_labels.npy")
    self._labels = (np.asarray(np.load(labels_path, allow_pickle=False), np.int32).reshape(-1)
                    if os.path.isfile(labels_path) else np.zeros(len(self.images), np.int32))
    if len(self._labels) != len(self.images):
      raise ConfigError(f"{labels_path} has {len(self._labels)} labels for "
                        f"{len(self.images)} images (config.data.path)")

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    image = np.asarray(self.images[index])
    return {"image": image if image.ndim == 3 else image[..., None],
            "label": int(self._labels[index]), "index": index,
            "path": f"{self.images_path}[{index}]"}

  def labels(self) -> np.ndarray:
    return self._labels.copy()

  def __repr__(self) -> str:
    return f"NpySource({self.images_path!r}, n={len(self)})"


# Float images are scanned for NaN and inf in chunks of about this many bytes: one pass over a
# memory-mapped array, never all of it in memory at once.
_SCAN_BYTES = 64 * 2**20
NONFINITE_ADVICE = ("pixel values must be finite numbers (NaN or inf input makes the loss, "
                    "statistics and features NaN); replace or drop those images")


def nonfinite_report(images: np.ndarray) -> str:
  """"" when every value of the images `images` [N, ...] is finite (integer images always are),
  else what is not: "3 NaN and 1 inf value(s) in 2 image(s), the first in image 17". One pass,
  chunk by chunk, so that a memory-mapped array is read but never loaded whole."""
  if not np.issubdtype(images.dtype, np.floating) or not images.size:
    return ""
  step = max(1, _SCAN_BYTES // max(1, images[:1].nbytes))
  nan = inf = bad_images = 0
  first = -1
  for start in range(0, len(images), step):
    chunk = np.asarray(images[start:start + step])
    finite = np.isfinite(chunk)
    if finite.all():  # the common case: one reduction, no counting
      continue
    bad_rows = ~finite.reshape(len(chunk), -1).all(axis=1)
    if first < 0:
      first = start + int(np.argmax(bad_rows))
    bad_images += int(bad_rows.sum())
    count_nan = int(np.isnan(chunk).sum())
    nan += count_nan
    inf += int(finite.size - finite.sum()) - count_nan
  if first < 0:
    return ""
  kinds = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "inf")) if n)
  return (f"{kinds} value(s) in {bad_images} of its {len(images)} image(s), the first in "
          f"image {first}")


_NONFINITE_SCANS: dict[tuple[str, int, int, int, int], str] = {}


def npy_nonfinite(path: str, images: np.ndarray | None = None) -> str:
  """`nonfinite_report` of the .npy file at `path` (`images`: the file already opened),
  remembered per version of the file (inode, size, modification and change times), so that
  validation and the sources a run builds from the file scan it once per process."""
  stat = os.stat(path)
  key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
  if key not in _NONFINITE_SCANS:
    if images is None:
      images = np.load(path, mmap_mode="r", allow_pickle=False)
    _NONFINITE_SCANS[key] = nonfinite_report(images)
  return _NONFINITE_SCANS[key]


def is_listed_name(name: str) -> bool:
  """Whether an image folder's listing reads the file or folder `name` (hidden ones: no)."""
  return not name.startswith(".")


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and is_listed_name(name)


def walk_images(root: str):
  """Yields image file paths under `root` in sorted, deterministic order (hidden dirs skipped).

  Symlinked folders are followed (class folders linked in from elsewhere), except a link back
  to a folder on the way down to it (`cls/all -> ..`): os.walk would descend it again and
  again until the kernel's limit on links in a path, listing every image below it ~40 times
  (and 2^40 times with two such links). Each folder is listed once along any path.
  """
  above: dict[str, frozenset[str]] = {}  # folder -> real paths of the folders from root to it
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    on_the_way = above.pop(dirpath, frozenset()) | {os.path.realpath(dirpath)}
    kept = []
    for d in sorted(d for d in dirnames if is_listed_name(d)):
      path = os.path.join(dirpath, d)
      if os.path.realpath(path) not in on_the_way:
        kept.append(d)
        above[path] = on_the_way
    dirnames[:] = kept
    for name in sorted(filenames):
      if is_image_file(name):
        yield os.path.join(dirpath, name)


def has_any_image(root: str) -> bool:
  """True as soon as one image file is found under `root` (cheap check for validation)."""
  return next(walk_images(root), None) is not None


def _sub_folders(root: str) -> list[str]:
  return sorted(n for n in os.listdir(root)
                if is_listed_name(n) and os.path.isdir(os.path.join(root, n)))


def empty_class_folders(root: str) -> list[str]:
  """First-level sub-folders of `root` (classes) with no image in them, sorted.

  `list_image_folder` ignores them (a class needs an image), so they are not classes: worth a
  warning, since a class folder that lost its images shifts the labels of the ones after it.
  """
  return [os.path.join(root, n) for n in _sub_folders(root)
          if not has_any_image(os.path.join(root, n))]


def class_folders(root: str) -> list[str]:
  """The names of `root`'s classes, sorted: its first-level sub-folders that hold an image (as
  `list_image_folder` finds them, without listing every file: one image each is enough)."""
  return [n for n in _sub_folders(root) if has_any_image(os.path.join(root, n))]


@functools.lru_cache(maxsize=8)
def list_image_folder(
    root: str, classes: tuple[str, ...] | None = None,
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
  """(paths, labels, class names) of all images under `root`, recursively, sorted.

  Label = index of the image's first-level sub-folder among `classes`, by default the sorted
  first-level sub-folders of `root` that contain images; images directly in `root` get label
  0. An evaluation folder passes the training folder's `classes`, so its labels mean the same
  classes; a sub-folder that is not among them raises ConfigError. Cached per process because
  num_examples, num_classes, the train and the eval iterator all need it (ImageNet: ~1.3M
  files); callers pass both arguments positionally, as lru_cache keys on how they were given.
  """
  paths = tuple(walk_images(root))
  firsts = [os.path.relpath(p, root).split(os.sep) for p in paths]
  found = sorted({parts[0] for parts in firsts if len(parts) > 1})
  if classes is None:
    classes = tuple(found)
  unknown = sorted(set(found) - set(classes))
  if unknown:
    raise ConfigError(f"image folder {root} has class sub-folders {unknown[:5]} that the "
                      f"training folder does not have (its {len(classes)} classes start "
                      f"{list(classes)[:5]})")
  class_index = {c: i for i, c in enumerate(classes)}
  labels = tuple(class_index[parts[0]] if len(parts) > 1 else 0 for parts in firsts)
  return paths, labels, classes


def image_folder_classes(root: str) -> tuple[str, ...]:
  """The class names (sorted first-level sub-folders with images) of the folder `root`."""
  return list_image_folder(os.path.abspath(root), None)[2]


class ImageFolderSource:
  """Image files under a root folder: records {"path", "label", "index"} (decoded later).

  Paths are kept relative to the root as one fixed-width bytes array (and labels as int32):
  the source is pickled into every grain worker, and one buffer of ~40 bytes per file pickles
  far faster than a million Python strings.
  """

  def __init__(self, root: str, classes: tuple[str, ...] | None = None):
    """`classes`: the class names labels index (default: this folder's own sub-folders)."""
    self.root = os.path.abspath(root)
    paths, labels, self.classes = list_image_folder(
        self.root, None if classes is None else tuple(classes))
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

  def labels(self) -> np.ndarray:
    """int32 [N]: the labels from the folder structure (no file is opened)."""
    return self._labels.copy()

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

  def labels(self) -> np.ndarray:
    """int32 [N]: the "label" of every record (0 where a record has none).

    ArrayRecord has no label column, so this reads every record, image bytes included: correct
    but slow (minutes for ImageNet's 1.28M records). Cached per process by (name, split,
    data_dir), so a subset's size and the subset itself read the records once.
    """
    return _tfds_labels(self.name, self.split, self.data_dir, self._data_source()).copy()

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


_TFDS_LABELS: dict[tuple[str, str, str | None], np.ndarray] = {}


def forget_listings() -> None:
  """Drops the cached image-folder listings: a run reads its folders as they are when it
  starts (a notebook may add images between two runs), then from the cache. (TFDS labels
  stay cached: a prepared dataset does not change, and ImageNet's take minutes to read.)"""
  list_image_folder.cache_clear()


def _tfds_labels(name: str, split: str, data_dir: str | None, source: Any) -> np.ndarray:
  """int32 [len(source)]: labels of a tfds data source, read record by record, cached."""
  key = (name, split, data_dir)
  if key not in _TFDS_LABELS:
    _TFDS_LABELS[key] = np.fromiter((int(source[i].get("label", 0)) for i in range(len(source))),
                                    np.int32, count=len(source))
  return _TFDS_LABELS[key]


def tfds_num_classes(name: str, data_dir: str | None) -> int:
  """`num_classes` of the dataset info's "label" feature (the prepared dataset must exist)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy, optional
  features = tfds.builder(name, data_dir=data_dir).info.features
  if "label" not in features:
    raise ConfigError(f"TFDS dataset {name!r} has no 'label' feature (features: "
                      f"{sorted(features.keys())}; config.data.tfds_name)")
  return int(features["label"].num_classes)


class SyntheticSource:
  """Deterministic smooth random images: record i is the same in every process and run.

  A random grid of 2..8 x 2..8 colours from a Generator seeded by (tag, i), upsampled bicubic
  to `image_size`, so crops and resizes cost what real images cost. Label = i % num_classes.
  Every split is the same images.
  """

  _TAG = 0x5EED

  def __init__(self, size: int, image_size: tuple[int, int], channels: int,
               num_classes: int = 10):
    self.size, self.image_size, self.channels = int(size), tuple(image_size), int(channels)
    self.num_classes = int(num_classes)

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
    return {"image": image, "label": index % self.num_classes, "index": index,
            "path": f"synthetic[{index}]"}

  def labels(self) -> np.ndarray:
    """int32 [N]: i % num_classes, the rule `__getitem__` uses."""
    return (np.arange(self.size) % self.num_classes).astype(np.int32)

  def __repr__(self) -> str:
    return f"SyntheticSource(n={self.size}, image_size={self.image_size})"


# The split evaluations read when config.data.eval_split is "" (image folders: data.eval_path).
DEFAULT_EVAL_SPLITS = {"fashion_mnist": "test", "tfds": "validation", "image_folder": "eval",
                       "npy": "test",
                       "synthetic": "test"}


# The split name of the examples `data.holdout` keeps out of the training split (validation).
HOLDOUT_SPLIT = "holdout"


def eval_split(data_cfg) -> str:
  """config.data.eval_split, or the source's usual evaluation split when it is ""."""
  return data_cfg.eval_split or DEFAULT_EVAL_SPLITS.get(data_cfg.source, "test")


def holdout_indices(data_cfg, labels: np.ndarray) -> np.ndarray:
  """Sorted indices [M] into the training split (`labels`, int [N]) of the held-out examples.

  `data.holdout` examples in all (0: none), the same share of every class, chosen with
  `data.subset_seed`: the same for every training seed, host count and method, so
  hyper-parameters chosen on it are chosen on data no run of that config trains on.
  """
  count = int(data_cfg.get("holdout", 0))
  if count <= 0:
    return np.zeros(0, np.int64)
  if count >= len(labels):
    raise config_error("data.holdout", count,
                       f"fewer than the {len(labels)} examples of split {data_cfg.split!r}")
  return subsets.per_class_count_subset(labels, count, int(data_cfg.subset_seed))


def train_indices(data_cfg, labels: np.ndarray) -> np.ndarray:
  """Sorted indices into the training split (`labels`, int [N]) that training reads: all of
  them but the `data.holdout` examples, then the per-class `data.label_fraction` of the rest."""
  indices = np.setdiff1d(np.arange(len(labels)), holdout_indices(data_cfg, labels))
  fraction = float(data_cfg.label_fraction)
  if fraction < 1.0:
    indices = indices[subsets.per_class_subset(labels[indices], fraction,
                                               int(data_cfg.subset_seed))]
  return indices.astype(np.int64)


def build_source(data_cfg, *, image_size: tuple[int, int], channels: int,
                 split: str | None = None):
  """The random-access source `config.data.source` names (records: see module docstring).

  `split` None reads `config.data.split`; otherwise that split (image folders: see the module
  docstring, any split other than `config.data.split` is the folder `config.data.eval_path`).
  No label subset: see `build_train_source`.
  """
  source = data_cfg.source
  split = data_cfg.split if split is None else split
  if split == HOLDOUT_SPLIT:
    train = build_source(data_cfg, image_size=image_size, channels=channels)
    labels = train.labels()
    return subsets.SubsetSource(train, holdout_indices(data_cfg, labels), labels)
  if source == "npy":
    return NpySource(data_cfg.path, split)
  if source == "fashion_mnist":
    return FashionMnistSource(data_cfg.path, split)
  if source == "image_folder":
    if split == data_cfg.split:
      return ImageFolderSource(data_cfg.path)
    if not data_cfg.eval_path:
      raise config_error("data.eval_path", data_cfg.eval_path,
                         f"a folder of evaluation images to read split {split!r} of "
                         "data.source='image_folder' (data.path is the training split "
                         f"{data_cfg.split!r})")
    return ImageFolderSource(data_cfg.eval_path, classes=image_folder_classes(data_cfg.path))
  if source == "tfds":
    return TfdsSource(data_cfg.tfds_name, split, data_cfg.tfds_data_dir)
  if source == "synthetic":
    return SyntheticSource(data_cfg.synthetic_size, image_size, channels,
                           data_cfg.synthetic_classes)
  raise config_error("data.source", source, f"one of {SOURCES}")


def build_train_source(data_cfg, *, image_size: tuple[int, int], channels: int):
  """The training split without the `data.holdout` examples, restricted to the per-class
  subset when data.label_fraction < 1 (`train_indices`).

  Both are chosen from the whole source (all hosts compute the same ones); the pipeline
  shards the result across hosts afterwards.
  """
  source = build_source(data_cfg, image_size=image_size, channels=channels)
  if float(data_cfg.label_fraction) >= 1.0 and int(data_cfg.get("holdout", 0)) <= 0:
    return source
  labels = source.labels()
  return subsets.SubsetSource(source, train_indices(data_cfg, labels), labels)


def num_examples(data_cfg, *, image_size: tuple[int, int], channels: int,
                 split: str | None = None) -> int:
  """Number of examples (all hosts together) the training iterator draws from.

  That is the label subset's size when data.label_fraction < 1 (the trainer derives steps per
  epoch from it). With an explicit `split`, the size of that whole split, as the eval iterator
  reads it (no subset).
  """
  if split is not None:
    return len(build_source(data_cfg, image_size=image_size, channels=channels, split=split))
  return len(build_train_source(data_cfg, image_size=image_size, channels=channels))


def num_classes(data_cfg) -> int:
  """Number of classes: 10 for Fashion-MNIST, data.synthetic_classes for synthetic, the class
  sub-folders of an image folder (at least 1: a folder of unsorted images is one class), and
  the "label" feature's `num_classes` of a TFDS dataset's info."""
  source = data_cfg.source
  if source == "npy":  # the largest label of the training split + 1
    return int(NpySource(data_cfg.path, data_cfg.split).labels().max(initial=0)) + 1
  if source == "fashion_mnist":
    return FMNIST_NUM_CLASSES
  if source == "synthetic":
    return data_cfg.synthetic_classes
  if source == "image_folder":
    if not (isinstance(data_cfg.path, str) and os.path.isdir(data_cfg.path)):
      # Counted as one class otherwise (a folder of unsorted images), with no images behind it.
      raise config_error("data.path", data_cfg.path,
                         "an existing folder of images for data.source='image_folder'")
    return max(1, len(image_folder_classes(data_cfg.path)))
  if source == "tfds":
    return tfds_num_classes(data_cfg.tfds_name, data_cfg.tfds_data_dir or None)
  raise config_error("data.source", source, f"one of {SOURCES}")


def fixed_size_source(data_cfg) -> bool:
  """True for sources whose images are already framed (no eval centre crop needed)."""
  return data_cfg.source in ("fashion_mnist", "synthetic", "npy")
