"""Checks of `config.data` before training reads or compiles anything: cheap, but for one pass
over the pixels of a float .npy split (NaN and inf), once per file per process.

Every failure is a `ConfigError` naming the field as `config.data.<field>` (or --workdir, for
a workdir inside the images: `check_workdir_outside_images`). Nothing here opens an image or
imports tfds: the paths are checked for existence (image folders: for at least one image file,
and for class sub-folders without any, which are an error with data.on_bad_image='raise' and a
warning otherwise), .npy files by their header (shape, dtype: convertible to config.channels;
float arrays also by one chunked pass for NaN and inf, once per file per process), TFDS split
names by the prepared dataset's dataset_info.json, and the evaluation split where the run
scores one. A run that scores labels also has them checked: npy labels files are read whole
(integers, one per image), and an image folder's first-level sub-folders are its classes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import numpy as np

from mim_jax import storage
from mim_jax.config.checks import is_int as _is_int
from mim_jax.config.checks import is_number as _is_number
from mim_jax.config.checks import pair as _pair
from mim_jax.config.errors import config_error
from mim_jax.data import idx, rand_augment, sources, transforms
from mim_jax.data.sources import (
  IMAGE_EXTENSIONS,
  SOURCES,
  empty_class_folders,
  has_any_image,
)

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("skip", "raise")
FMNIST_HINT = ("Install it with `sudo apt-get install -y dataset-fashion-mnist` or set "
               "config.data.path to the folder holding the IDX files.")


def _require(ok: bool, field: str, value: Any, allowed: str, hint: str = "") -> None:
  if not ok:
    raise config_error(f"data.{field}", value, allowed, hint)


def _check_fmnist_split(path: str, split: str) -> None:
  for kind in ("images", "labels"):
    if idx.find_fmnist_file(path, split, kind) is None:
      names = [os.path.basename(c) for c in idx.fmnist_file_candidates(path, split, kind)]
      _require(False, "path", path, f"a folder containing one of {names[:2]} (missing the "
               f"{split} {kind} file)", FMNIST_HINT)


def _check_channels(field: str, value: Any, stored: np.dtype, stored_channels: int,
                    channels: int) -> None:
  """The model's `channels` against images of `stored_channels` channels of dtype `stored`:
  every image would otherwise fail to convert, and be skipped as undecodable."""
  error = transforms.channel_conversion_error(stored, stored_channels, channels)
  if error:
    raise config_error("channels", channels, f"a channel count the images of data.{field}="
                       f"{value!r} convert to (they have {stored_channels}, stored as "
                       f"{np.dtype(stored)}): {error}")


def _check_npy_split(data_cfg, split: str, field: str, channels: int) -> None:
  """SPLIT.npy exists, holds [N, H, W(, C)] and converts to `channels` (header only)."""
  path = data_cfg.path
  file = os.path.join(path, f"{split}.npy") if isinstance(path, str) else ""
  value = data_cfg[field]
  _require(bool(file) and os.path.isfile(file), field, value,
           f"a split whose images are a file of data.path, for data.source='npy': {split}.npy "
           f"(images [N, H, W(, C)]) and optionally {split}_labels.npy; {file or path!r} does "
           "not exist")
  try:
    images = np.load(file, mmap_mode="r", allow_pickle=False)  # reads the header only
  except ValueError as e:
    raise config_error(f"data.{field}", value, f"a split whose {file} is a .npy array "
                       f"({_npy_load_problem(file, e)})") from None
  _require(images.ndim in (3, 4), field, value, f"a split whose {file} holds images [N, H, W] "
           f"or [N, H, W, C]; it holds an array of shape {images.shape}")
  error = transforms.stored_dtype_error(images.dtype)
  _require(not error, field, value, f"a split whose {file} holds pixels of a type that is "
           f"read; {error}")
  _check_channels(field, value, images.dtype, 1 if images.ndim == 3 else images.shape[-1],
                  channels)
  # The one check here that reads the pixels: float images only, in one chunked pass over the
  # memory-mapped file, once per file per process (sources.npy_nonfinite). In a multi-host
  # run every host scans the file it reads (in parallel: one scan's wall time); sharing the
  # scan would need a collective inside validation, which a process that refused an earlier
  # field never reaches (the others would wait there).
  bad = sources.npy_nonfinite(file, images)
  _require(not bad, field, value, f"a split whose {file} holds finite pixel values; it holds "
           f"{bad}", "NaN or inf input makes the loss NaN: replace or drop those images.")


def _npy_load_problem(file: str, error: ValueError) -> str:
  """Why np.load refused `file`: a truncated file (numpy's "mmap length is greater than file
  size") said as such, with the sizes; else numpy's own reason."""
  try:
    with open(file, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
      header = f.tell()
    need = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = os.path.getsize(file)
  except Exception:  # pylint: disable=broad-except  # not even a .npy header: numpy's reason
    return str(error)
  if size < need:
    return (f"the file is truncated: its header describes {dtype} {list(shape)}, {need} bytes "
            f"with the header, and it has {size}")
  return str(error)


def _validate_source(data_cfg, channels: int) -> None:
  source = data_cfg.source
  _require(source in SOURCES, "source", source, f"one of {SOURCES}")
  if source == "fashion_mnist":
    split = data_cfg.split
    _require(split in idx.FMNIST_PREFIXES, "split", split,
             f"one of {tuple(idx.FMNIST_PREFIXES)} for data.source='fashion_mnist'")
    path = data_cfg.path
    _require(isinstance(path, str) and os.path.isdir(path), "path", path,
             "an existing folder with the Fashion-MNIST IDX files", FMNIST_HINT)
    _check_fmnist_split(path, split)
    _check_channels("source", source, np.uint8, 1, channels)
  elif source == "image_folder":
    path = data_cfg.path
    _require(isinstance(path, str) and bool(path) and os.path.isdir(path), "path", path,
             "an existing folder of images for data.source='image_folder'")
    _require(has_any_image(path), "path", path,
             f"a folder containing {'/'.join(IMAGE_EXTENSIONS)} images (searched recursively); "
             "none found")
    _check_empty_classes(data_cfg, "path", path)
    # Checked when set; `_validate_eval_source` requires it where a run scores the split.
    eval_path = data_cfg.eval_path
    if eval_path:
      _require(os.path.isdir(eval_path) and has_any_image(eval_path), "eval_path", eval_path,
               f"an existing folder containing {'/'.join(IMAGE_EXTENSIONS)} images (the "
               "evaluation split of data.source='image_folder')")
      _check_empty_classes(data_cfg, "eval_path", eval_path)
  elif source == "tfds":
    name = data_cfg.tfds_name
    _require(isinstance(name, str) and bool(name.strip()), "tfds_name", name,
             "a TFDS dataset name such as 'imagenet2012' for data.source='tfds'")
    _require(isinstance(data_cfg.split, str) and bool(data_cfg.split), "split", data_cfg.split,
             "a TFDS split such as 'train' or 'validation'")
    _require(isinstance(data_cfg.tfds_data_dir, str), "tfds_data_dir", data_cfg.tfds_data_dir,
             "a folder path string ('' = the TFDS default)")
    _require_prepared_tfds(name, data_cfg.tfds_data_dir)
    _require_tfds_split(data_cfg, data_cfg.split, "split")
  elif source == "npy":
    path = data_cfg.path
    _require(isinstance(path, str) and os.path.isdir(path), "path", path,
             f"an existing folder holding {data_cfg.split}.npy (images [N, H, W(, C)]) and "
             f"optionally {data_cfg.split}_labels.npy for data.source='npy'")
    _check_npy_split(data_cfg, data_cfg.split, "split", channels)
  elif source == "synthetic":
    size = data_cfg.synthetic_size
    _require(_is_int(size) and size > 0, "synthetic_size", size, "a positive integer")
    classes = data_cfg.synthetic_classes
    _require(_is_int(classes) and classes > 0, "synthetic_classes", classes,
             "a positive integer")


def _validate_eval_source(data_cfg, channels: int) -> None:
  """The evaluation split a run scores can be read: its folder, file or TFDS split exists
  ('holdout' is training images, checked with the training split)."""
  split = sources.eval_split(data_cfg)
  source = data_cfg.source
  if split == sources.HOLDOUT_SPLIT:
    pass
  elif source == "fashion_mnist":
    _check_fmnist_split(data_cfg.path, split)
  elif source == "image_folder":
    _require(bool(data_cfg.eval_path), "eval_path", data_cfg.eval_path,
             f"a folder of evaluation images: this run scores split {split!r}, which "
             f"data.source='image_folder' reads from data.eval_path (data.path is the training "
             f"split {data_cfg.split!r}); or data.eval_split='holdout' with data.holdout > 0")
  elif source == "npy":
    _check_npy_split(data_cfg, split, "eval_split", channels)
  elif source == "tfds":
    _require_tfds_split(data_cfg, split, "eval_split")


def _validate_scored_labels(data_cfg) -> None:
  """Labels a run scores must name classes: an npy split's labels file (integers >= 0), at
  least 2 classes to train on, and an evaluation folder's classes among the training folder's.
  Without these a run scored labels it did not have (every label 0: accuracy 1.0)."""
  split = sources.eval_split(data_cfg)
  if data_cfg.source == "npy":
    train = _npy_labels(data_cfg, "split", data_cfg.split)
    present = np.unique(train)
    _require(len(present) >= 2, "split", data_cfg.split, "a training split of at least 2 "
             f"classes for a run that scores labels; {data_cfg.split}_labels.npy holds only "
             f"label(s) {present.tolist()}")
    if split != sources.HOLDOUT_SPLIT:
      extra = np.setdiff1d(_npy_labels(data_cfg, "eval_split", split), present)
      _require(not len(extra), "eval_split", split, f"an evaluation split whose labels are "
               f"among the training split's; {split}_labels.npy also has {extra[:5].tolist()}, "
               "which no classifier or k-NN bank of the training images can predict")
  elif data_cfg.source == "image_folder":
    roots = [("path", data_cfg.path)]
    if split != sources.HOLDOUT_SPLIT:
      roots.append(("eval_path", data_cfg.eval_path))
    for field, root in roots:
      loose = sorted(n for n in os.listdir(root) if sources.is_image_file(n)
                     and os.path.isfile(os.path.join(root, n)))
      _require(not loose, field, root, "a folder whose images lie in class sub-folders, for a "
               f"run that scores labels: {len(loose)} lie directly in it (e.g. {loose[:1]}), "
               "where they would all count as the first class")
    classes = sources.class_folders(data_cfg.path)
    _require(len(classes) >= 2, "path", data_cfg.path, "a training folder of at least 2 class "
             f"sub-folders with images, for a run that scores labels; it has {len(classes)}")
    if split != sources.HOLDOUT_SPLIT:
      unknown = sorted(set(sources.class_folders(data_cfg.eval_path)) - set(classes))
      _require(not unknown, "eval_path", data_cfg.eval_path, "an evaluation folder whose class "
               f"sub-folders are among the training folder's {len(classes)} (labels are the "
               f"training folder's class indices); it also has {unknown[:5]}")


def _npy_labels(data_cfg, field: str, name: str) -> np.ndarray:
  """The labels of npy split `name` (data.`field`), which must exist as integers >= 0."""
  file = os.path.join(data_cfg.path, f"{name}_labels.npy")
  _require(os.path.isfile(file), field, name, f"a split with its labels file for a run that "
           f"scores labels: {file} does not exist (without it every label would be 0)")
  try:
    labels = np.load(file, allow_pickle=False)
  except ValueError as e:
    raise config_error(f"data.{field}", name, f"a split whose {file} is a .npy array ({e})"
                       ) from None
  _require(np.issubdtype(labels.dtype, np.integer), field, name, f"integer class labels in "
           f"{file}; it holds {labels.dtype}")
  _require(labels.min(initial=0) >= 0, field, name, f"class labels >= 0 in {file}; its "
           f"smallest is {labels.min()}")
  return labels


def tfds_data_dir(data_dir: str) -> str:
  """The folder TFDS reads prepared datasets from: `data_dir`, else $TFDS_DATA_DIR, else
  ~/tensorflow_datasets (TFDS's own default), without importing tensorflow_datasets."""
  return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "")
                            or "~/tensorflow_datasets")


def _require_prepared_tfds(name: str, data_dir: str) -> None:
  """A prepared TFDS dataset is a folder DATA_DIR/NAME/VERSION/ with dataset_info.json."""
  root = tfds_data_dir(data_dir)
  folder = os.path.join(root, name.split(":")[0])
  # storage: a gs:// data_dir (TFDS reads buckets itself) is checked the same way.
  prepared = storage.isdir(folder) and any(
      storage.isfile(os.path.join(folder, v, "dataset_info.json"))
      for v in storage.listdir(folder))
  if not prepared:
    manual = ("; ImageNet's tars go to " + os.path.join(root, "downloads", "manual") + " first"
              if name.startswith("imagenet") else "")
    raise config_error(
        "data.tfds_name", name, f"a TFDS dataset prepared in {root} (no {folder}/VERSION/"
        "dataset_info.json there)",
        f"Prepare it once with `tfds build {name} --data_dir={root} "
        f"--file_format=array_record`{manual}, or point --config.data.tfds_data_dir at the "
        "folder holding it.")


def _tfds_split_names(name: str, data_dir: str) -> set[str]:
  """The split names the prepared versions of TFDS dataset `name` list in their
  dataset_info.json (empty when none lists any)."""
  dataset, _, version = name.partition(":")
  folder = os.path.join(tfds_data_dir(data_dir), dataset)
  names: set[str] = set()
  for v in [version] if version else storage.listdir(folder):
    info = os.path.join(folder, v, "dataset_info.json")
    if not storage.isfile(info):
      continue
    try:
      splits = json.loads(storage.read_text(info)).get("splits", [])
      names.update(str(s["name"]) for s in splits)
    except (ValueError, KeyError, TypeError, AttributeError):
      continue  # an unreadable file: TFDS itself reports it
  return names


def _require_tfds_split(data_cfg, split: str, field: str) -> None:
  """Each split a TFDS split expression names ('train', 'train[:10%]+validation') is one the
  prepared dataset has."""
  known = _tfds_split_names(data_cfg.tfds_name, data_cfg.tfds_data_dir)
  if not known or not isinstance(split, str):
    return
  for part in split.split("+"):
    base = re.sub(r"\[.*\]$", "", part.strip())
    _require(base in known, field, split, f"a split of the prepared {data_cfg.tfds_name!r}: one "
             f"of {sorted(known)}" + (" (with an optional [slice])" if base != part else ""))


def _check_empty_classes(data_cfg, field: str, root: str) -> None:
  """Class folders without images: an error with on_bad_image='raise', else a warning.

  Either way before training: such a folder is no class, so the labels of the classes after
  it are one lower than a complete copy of the dataset would give them.
  """
  empty = empty_class_folders(root)
  if not empty:
    return
  shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
  _require(data_cfg.on_bad_image != "raise", field, root,
           "an image folder whose class sub-folders all hold images",
           f"{len(empty)} hold none: {shown}. Remove them, or set "
           "config.data.on_bad_image='skip' to ignore them (they are then no class).")
  log.warning("image folder %s: %d class folder(s) hold no images and are ignored (no class, "
              "no label): %s", root, len(empty), shown)


def _validate_labels_and_splits(data_cfg, scores_eval_split: bool, scores_labels: bool) -> None:
  """The label subset and the evaluation split (checked without reading any data); the
  evaluation split against the training split only where a run scores it."""
  fraction = data_cfg.label_fraction
  _require(_is_number(fraction) and 0 < fraction <= 1, "label_fraction", fraction,
           "a number in (0, 1]: the fraction of each class of the training split to train on "
           "(1.0 = all)")
  _require(_is_int(data_cfg.subset_seed), "subset_seed", data_cfg.subset_seed, "an integer")
  holdout = data_cfg.get("holdout", 0)
  _require(_is_int(holdout) and holdout >= 0, "holdout", holdout,
           "an integer >= 0: training examples kept out of training, the same share of every "
           "class, scored as split 'holdout' (e.g. 5000 of Fashion-MNIST's 60,000)")
  eval_split = data_cfg.eval_split
  _require(eval_split != sources.HOLDOUT_SPLIT or holdout > 0, "eval_split", eval_split,
           "'holdout' only with config.data.holdout > 0 (how many training examples to hold "
           "out)")
  _require(isinstance(eval_split, str), "eval_split", eval_split,
           "a split name such as 'test' (TFDS ImageNet: 'validation'), or '' for the source's "
           "usual evaluation split")
  # synthetic: every split is the same images anyway
  if data_cfg.source != "synthetic" and scores_eval_split:
    _require(sources.eval_split(data_cfg) != data_cfg.split, "eval_split", eval_split,
             f"a split other than the training split data.split={data_cfg.split!r}: "
             "evaluations would score the images they train on (k-NN finds every query in its "
             "own bank); for a validation score use 'holdout' with data.holdout > 0")
    # Image folders have no split names: their evaluation images are data.eval_path.
    eval_path, path = data_cfg.get("eval_path", ""), data_cfg.get("path", "")
    _require(not (data_cfg.source == "image_folder" and eval_split != sources.HOLDOUT_SPLIT
                  and isinstance(eval_path, str) and eval_path and isinstance(path, str)
                  and path and (storage.is_within(eval_path, path)
                                or storage.is_within(path, eval_path))),
             "eval_path", eval_path, f"a folder apart from the training images data.path="
             f"{path!r} (neither inside the other): evaluations would score images they train "
             "on (k-NN finds every query in its own bank); for a validation score use "
             "eval_split='holdout' with data.holdout > 0")
  folder_splits = ("", sources.DEFAULT_EVAL_SPLITS["image_folder"], sources.HOLDOUT_SPLIT)
  # A run's evaluation split (tools naming a split with a flag of their own, e.g.
  # tokenizers.usage --split, put it here too, and may name the folder as they like).
  _require(not scores_labels or data_cfg.source != "image_folder" or eval_split in folder_splits,
           "eval_split",
           eval_split, f"one of {folder_splits} for data.source='image_folder': its evaluation "
           "images are the folder data.eval_path ('' or 'eval') whatever the split's name, or "
           "'holdout' (data.holdout training images)")
  if data_cfg.source == "fashion_mnist" and eval_split != sources.HOLDOUT_SPLIT:
    eval_split = sources.eval_split(data_cfg)
    _require(eval_split in idx.FMNIST_PREFIXES, "eval_split", eval_split,
             f"one of {tuple(idx.FMNIST_PREFIXES)} for data.source='fashion_mnist'")
  _require(isinstance(data_cfg.eval_path, str), "eval_path", data_cfg.eval_path,
           "a folder path string ('' = none; only data.source='image_folder' reads it)")


FIXED_SIZE_SOURCES = ("fashion_mnist", "npy", "synthetic")


def _validate_augmentation(data_cfg) -> None:
  if "augment_on" in data_cfg:
    where = data_cfg.augment_on
    _require(where in ("host", "device"), "augment_on", where, "'host' or 'device'")
    _require(where == "host" or data_cfg.source in FIXED_SIZE_SOURCES, "augment_on", where,
             f"'host' for data.source={data_cfg.source!r}: on the device every image must have "
             f"one size (sources {FIXED_SIZE_SOURCES})")
  if "device_resident" in data_cfg:
    resident = data_cfg.device_resident
    _require(isinstance(resident, bool), "device_resident", resident, "true or false")
    # Before the augment_on advice below, which such a source cannot follow.
    _require(not resident or data_cfg.source in FIXED_SIZE_SOURCES, "device_resident",
             resident, f"False for data.source={data_cfg.source!r}: the images held on the "
             "device are augmented there (data.augment_on='device'), which needs images of one "
             f"size (sources {FIXED_SIZE_SOURCES}); the grain pipeline reads this source")
    _require(not resident or data_cfg.get("augment_on") == "device", "device_resident",
             resident, "False with data.augment_on='host': the images held on the device are "
             "augmented there (set data.augment_on='device')")
  # Each field where the method has it: frozen-feature jobs never augment (none of them), and
  # iBOT's multi-crop views take their scales from config.multicrop (no crop_scale).
  if "crop_scale" in data_cfg:
    scale = _pair(data_cfg.crop_scale)
    _require(scale is not None and 0 < scale[0] <= scale[1] <= 1, "crop_scale",
             data_cfg.crop_scale, "(min, max) area fractions with 0 < min <= max <= 1")
  if "crop_ratio" not in data_cfg:
    return
  ratio = _pair(data_cfg.crop_ratio)
  _require(ratio is not None and 0 < ratio[0] <= ratio[1], "crop_ratio", data_cfg.crop_ratio,
           "(min, max) aspect ratios (width/height) with 0 < min <= max")
  _require(isinstance(data_cfg.hflip, bool), "hflip", data_cfg.hflip, "true or false")


def _validate_rand_augment(data_cfg, channels: int) -> None:
  """RandAugment and random erasing: a parseable spec, a probability, and the host pipeline
  (they run in the grain workers, not in the device augmentation)."""
  spec, erasing = data_cfg.get("rand_augment", ""), data_cfg.get("random_erasing", 0.0)
  _require(isinstance(spec, str), "rand_augment", spec,
           "a timm RandAugment string such as 'rand-m9-mstd0.5-inc1', or '' (off)")
  if spec:
    try:
      rand_augment.RandAugment.parse(spec)
    except ValueError as e:
      _require(False, "rand_augment", spec, f"a timm RandAugment string ({e})")
  _require(_is_number(erasing) and 0 <= erasing <= 1, "random_erasing", erasing,
           "a probability in [0, 1] (0: off; MAE fine-tuning: 0.25)")
  _require(not spec or channels in (1, 3), "rand_augment", spec,
           f"'' for a {channels}-channel model input: its ops are defined for grayscale and RGB")
  on_host = data_cfg.get("augment_on", "host") == "host"
  for name, value, off in (("rand_augment", spec, ""), ("random_erasing", erasing, 0.0)):
    _require(on_host or value == off, name, value,
             f"{off!r} with data.augment_on='device': it runs in the host pipeline's workers")


def _validate_normalisation(data_cfg, channels: int) -> None:
  for name in ("mean", "std"):
    value = data_cfg[name]
    try:
      values = tuple(value)
    except TypeError:
      values = ()
    _require(len(values) in (1, channels) and all(_is_number(v) for v in values), name, value,
             f"a tuple of {channels} numbers (one per channel of the {channels}-channel model "
             "input) or of 1 number for all channels")
  _require(all(s > 0 for s in data_cfg.std), "std", data_cfg.std, "positive numbers")


def _validate_loading(data_cfg) -> None:
  _require(data_cfg.on_bad_image in ON_BAD_IMAGE, "on_bad_image", data_cfg.on_bad_image,
           f"one of {ON_BAD_IMAGE}")
  if "num_workers" not in data_cfg:  # no training pipeline (frozen-feature jobs)
    return
  _require(_is_int(data_cfg.num_workers) and data_cfg.num_workers >= 0, "num_workers",
           data_cfg.num_workers, "an integer >= 0 (0 decodes in the training process)")
  _require(_is_int(data_cfg.prefetch_buffer_size) and data_cfg.prefetch_buffer_size > 0,
           "prefetch_buffer_size", data_cfg.prefetch_buffer_size,
           "a positive integer (batches buffered per worker)")


def check_workdir_outside_images(data_cfg, workdir: str) -> None:
  """ConfigError when a run's `workdir` is, or lies inside, an image folder it reads
  (data.path, data.eval_path of data.source='image_folder'): its reconstruction pictures
  (PNG) would be listed as images by the next run (in a class sub-folder of their own: a new
  class, shifting the labels after it), and every run would list its checkpoints too. Also
  when a symlink in the folder's first level leads to the workdir, a folder holding it or one
  inside it. A workdir under a hidden folder of the image folder (`.runs/r1`) is fine: the
  listing skips hidden folders (sources.is_listed_name)."""
  if data_cfg.get("source") != "image_folder" or not workdir:
    return
  for field in ("path", "eval_path"):
    root = data_cfg.get(field)
    if not (isinstance(root, str) and root):
      continue
    where = "" if _listed_within(workdir, root) else _link_to(workdir, root)
    if where is not None:
      raise config_error("--workdir", workdir, f"a folder outside the image folder "
                         f"config.data.{field}={root!r} that the run reads{where}",
                         "Its pictures and checkpoints would be read as images (a new class "
                         "folder) by the next run: choose a --workdir elsewhere.")


def _listed_within(workdir: str, root: str) -> bool:
  """Whether `workdir` is local image folder `root`, or lies inside it where its listing reads
  (no hidden folder on the way: sources.is_listed_name)."""
  if not storage.is_within(workdir, root):
    return False
  if storage.is_url(workdir) or storage.is_url(root):
    inside = workdir.rstrip("/")[len(root.rstrip("/")):]
  else:
    inside = os.path.relpath(*(os.path.realpath(os.path.expanduser(p)) for p in (workdir, root)))
  parts = [p for p in inside.replace(os.sep, "/").split("/") if p not in ("", ".")]
  return all(sources.is_listed_name(p) for p in parts)


def _link_to(workdir: str, root: str) -> str | None:
  """" (through the symlink LINK -> TARGET)" when a symlink among the entries of local image
  folder `root` that its listing reads (sources.is_listed_name) leads to `workdir`, a folder
  holding it or a folder inside it, else None. The listing follows links; first-level ones
  only are looked at (the usual layout: class folders linked in from elsewhere), in one scan
  of the root that reads no file's metadata (d_type); a URL or a missing folder: None
  (reported elsewhere)."""
  if storage.is_url(root) or not os.path.isdir(root):
    return None
  try:
    with os.scandir(root) as entries:
      for entry in entries:
        if (sources.is_listed_name(entry.name) and entry.is_symlink()
            and (storage.is_within(workdir, entry.path)
                 or storage.is_within(entry.path, workdir))):
          return f" (through the symlink {entry.path} -> {os.path.realpath(entry.path)})"
  except OSError:
    pass
  return None


def validate_data_config(data_cfg, *, image_size: tuple[int, int], channels: int,
                         scores_eval_split: bool = False,
                         scores_labels: bool | None = None) -> None:
  """Checks `config.data` (and the geometry it is used with). Raises ConfigError.

  `scores_eval_split`: the run reads the evaluation split (an evaluation, a k-NN monitor), so
  that split's folder, file or TFDS split must exist too, and must not be the training split
  (a run or tool that reads the training split alone may name any split). `scores_labels`
  (default: as `scores_eval_split`): it scores labels, which must then name classes (a tool
  that reads an evaluation split's images alone passes False).
  """
  size = tuple(image_size)
  if not (len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
    raise config_error("image_size", image_size, "(height, width), two positive integers")
  if not (_is_int(channels) and channels >= 1):
    raise config_error("channels", channels, "a positive integer (1 grayscale, 3 RGB, or the "
                       "band count of multi-channel data)")
  _validate_loading(data_cfg)
  _validate_augmentation(data_cfg)
  if "crop_scale" in data_cfg:  # a training pipeline with the default augmentation
    _validate_rand_augment(data_cfg, channels)
  _validate_normalisation(data_cfg, channels)
  scores_labels = scores_eval_split if scores_labels is None else scores_labels
  _validate_labels_and_splits(data_cfg, scores_eval_split, scores_labels)
  _validate_source(data_cfg, channels)  # last: the checks that touch the file system
  if scores_eval_split:
    _validate_eval_source(data_cfg, channels)
  if scores_labels:
    _validate_scored_labels(data_cfg)
