"""Labels for supervised evaluation: labelled train batches, per-class low-label subsets,
evaluation splits and class counts.

Tiny IDX files and image folders are written to tmp_path; the real Fashion-MNIST files are used
where installed (6000 train examples per class, 10000 test examples).
"""

from __future__ import annotations

import gzip
import os
import struct

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mim_jax import data, registry
from mim_jax.config.errors import ConfigError
from mim_jax.data import idx, sources, subsets

from conftest import FMNIST_DIR, build_tfds_fashion_mnist, requires_fmnist, tiny_config

# ----------------------------------------------------------------------------- helpers


def data_config(**overrides) -> ml_collections.ConfigDict:
  """`config.data` from the defaults, small and in-process, with `overrides`."""
  fields = registry.base_config("mae").data.to_dict()
  fields.update(source="synthetic", synthetic_size=20, num_workers=0, prefetch_buffer_size=2)
  fields.update(overrides)  # not ConfigDict.update: bad-type values must get through
  return ml_collections.ConfigDict(fields)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes uint8 `array` as a gzipped IDX file."""
  array = np.asarray(array, np.uint8)
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def indexed_fmnist(folder, labels: np.ndarray, split: str = "train") -> str:
  """A tiny IDX 'Fashion-MNIST': image i is a constant 4x4 image of value 2 * i (so a batch
  reveals which examples it holds), with the given labels [N]."""
  os.makedirs(folder, exist_ok=True)
  n = len(labels)
  images = np.broadcast_to((2 * np.arange(n, dtype=np.uint8))[:, None, None], (n, 4, 4))
  prefix = idx.FMNIST_PREFIXES[split]
  write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
  write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)
  return str(folder)


def ids_of(images: np.ndarray) -> np.ndarray:
  """Example ids of `indexed_fmnist` images [B, 4, 4, 1] normalised with mean 0, std 1."""
  flat = images.reshape(len(images), -1)
  assert np.all(flat.max(1) == flat.min(1)), "indexed images must stay constant"
  return np.round(flat[:, 0] * 255 / 2).astype(int)


def identity_crops(**overrides) -> ml_collections.ConfigDict:
  """Crops that keep the whole image and no normalisation, so pixel values stay ids."""
  return data_config(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False, mean=(0.0,),
                     std=(1.0,), **overrides)


def save_png(path, value: int = 100) -> None:
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(str(path))


# ----------------------------------------------------------------------------- per_class_subset


@requires_fmnist
@pytest.mark.parametrize("fraction,per_class", [(0.01, 60), (0.1, 600)])
def test_per_class_subset_exact_counts_on_real_fashion_mnist(fraction, per_class):
  _, labels, _ = idx.load_fmnist(FMNIST_DIR, "train")
  assert np.all(np.bincount(labels) == 6000)
  subset = data.per_class_subset(labels, fraction, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[subset], minlength=10), [per_class] * 10)
  assert len(subset) == 10 * per_class
  assert np.all(np.diff(subset) > 0)  # sorted, no repeats
  assert subset.min() >= 0 and subset.max() < len(labels)


def test_per_class_subset_rounding_minimum_and_membership():
  # Class sizes 37, 3 and 120: fraction 0.1 keeps round(3.7)=4, max(1, round(0.3))=1, 12.
  labels = np.concatenate([np.full(37, 5), np.full(3, -1), np.full(120, 2)])
  labels = labels[np.random.default_rng(0).permutation(len(labels))]
  subset = data.per_class_subset(labels, 0.1, seed=3)
  kept = {c: int(np.sum(labels[subset] == c)) for c in (5, -1, 2)}
  assert kept == {5: 4, -1: 1, 2: 12}
  assert np.all(np.diff(subset) > 0)
  assert set(subset.tolist()) <= set(range(len(labels)))
  np.testing.assert_array_equal(data.per_class_subset(labels, 1.0, seed=3),
                                np.arange(len(labels)))
  for bad in (0.0, -0.5, 1.5):
    with pytest.raises(ValueError, match="fraction"):
      data.per_class_subset(labels, bad, seed=0)


def test_per_class_subset_deterministic_and_seeded():
  labels = np.arange(5000) % 10
  a = data.per_class_subset(labels, 0.1, seed=0)
  b = data.per_class_subset(labels.copy(), 0.1, seed=0)
  c = data.per_class_subset(labels, 0.1, seed=1)
  np.testing.assert_array_equal(a, b)
  assert len(a) == len(c) == 500 and not np.array_equal(a, c)
  # Not simply the first examples of each class.
  assert not np.array_equal(a, np.arange(500))
  # A class's choice does not depend on the other classes.
  only_class_3 = np.flatnonzero(labels == 3)
  sub3 = data.per_class_subset(labels[only_class_3], 0.1, seed=0)
  np.testing.assert_array_equal(only_class_3[sub3], a[labels[a] == 3])


# ----------------------------------------------------------------------------- source labels


def test_labels_method_of_each_source(tmp_path):
  fm_labels = np.array([3, 1, 4, 1, 5, 9, 2, 6], np.uint8)
  fm = sources.FashionMnistSource(indexed_fmnist(tmp_path / "fm", fm_labels), "train")
  assert fm.labels().dtype == np.int32
  np.testing.assert_array_equal(fm.labels(), fm_labels)
  assert [fm[i]["label"] for i in range(len(fm))] == fm_labels.tolist()

  syn = sources.SyntheticSource(23, (4, 4), 3)
  np.testing.assert_array_equal(syn.labels(), [syn[i]["label"] for i in range(23)])
  assert syn.labels().dtype == np.int32

  for name in ("b/1.png", "b/2.png", "a/x/3.png", "c/4.png"):
    save_png(tmp_path / "imgs" / name)
  folder = sources.ImageFolderSource(str(tmp_path / "imgs"))
  np.testing.assert_array_equal(folder.labels(), [folder[i]["label"] for i in range(4)])
  np.testing.assert_array_equal(folder.labels(), [0, 1, 1, 2])


@requires_fmnist
def test_tfds_labels_and_label_subsets(tmp_path):
  """The labels of a real TFDS dataset (read record by record) and a per-class subset."""
  name = build_tfds_fashion_mnist(str(tmp_path), train=300, test=10)
  cfg = data_config(source="tfds", tfds_name=name, split="train", tfds_data_dir=str(tmp_path))
  src = data.build_source(cfg, image_size=(28, 28), channels=1)
  want = idx.load_fmnist(FMNIST_DIR, "train")[1][:300]
  counts = np.bincount(want, minlength=10)  # TFDS keeps its own order of the examples
  np.testing.assert_array_equal(np.bincount(src.labels(), minlength=10), counts)
  cfg.label_fraction = 0.2
  subset = data.build_train_source(cfg, image_size=(28, 28), channels=1)
  assert np.bincount(subset.labels(), minlength=10).tolist() == [
      max(1, round(0.2 * c)) for c in counts]


# ----------------------------------------------------------------------------- train batches


def test_train_batches_carry_the_source_labels(tmp_path):
  labels = np.random.default_rng(0).integers(0, 10, 24).astype(np.uint8)
  cfg = identity_crops(source="fashion_mnist", path=indexed_fmnist(tmp_path / "fm", labels))
  it = data.make_train_iterator(cfg, image_size=(4, 4), channels=1, global_batch_size=8,
                                seed=0, process_index=0, process_count=1)
  ids, got = [], []
  for _ in range(6):  # two epochs
    batch = next(it)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
    ids.append(ids_of(batch["image"]))
    got.append(batch["label"])
  ids, got = np.concatenate(ids), np.concatenate(got)
  assert sorted(ids[:24]) == list(range(24))
  np.testing.assert_array_equal(got, labels[ids])


def test_label_subset_is_what_training_reads(tmp_path):
  """40 examples of 4 classes, fraction 0.5: one epoch is exactly the 20 subset examples,
  labels match, and hosts shard the same subset."""
  labels = (np.arange(40) % 4).astype(np.uint8)
  cfg = identity_crops(source="fashion_mnist", path=indexed_fmnist(tmp_path / "fm", labels),
                       label_fraction=0.5, subset_seed=5)
  expected = data.per_class_subset(labels, 0.5, seed=5)
  assert data.num_examples(cfg, image_size=(4, 4), channels=1) == 20
  assert data.num_examples(cfg, image_size=(4, 4), channels=1, split="train") == 40

  seen = []
  for host in range(2):
    it = data.make_train_iterator(cfg, image_size=(4, 4), channels=1, global_batch_size=10,
                                  seed=11, process_index=host, process_count=2)
    batches = [next(it) for _ in range(2)]  # 10 examples per host = its shard's epoch
    ids = np.concatenate([ids_of(b["image"]) for b in batches])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels[ids])
    seen.append(set(ids.tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(expected.tolist())

  # The subset follows subset_seed, not the training seed.
  cfg.subset_seed = 6
  other = data.build_train_source(cfg, image_size=(4, 4), channels=1)
  assert len(other) == 20 and not np.array_equal(other.indices, expected)


def test_resume_with_label_subset_is_exact():
  cfg = data_config(synthetic_size=50, label_fraction=0.2)
  kw = dict(image_size=(8, 8), channels=3, global_batch_size=4, seed=2, process_index=0,
            process_count=1)
  it = data.make_train_iterator(cfg, **kw)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]  # crosses the 10-example epoch boundary
  fresh = data.make_train_iterator(cfg, **kw)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_num_examples_with_fraction_synthetic():
  cfg = data_config(synthetic_size=1000, label_fraction=0.05)
  assert data.num_examples(cfg, image_size=(4, 4), channels=3) == 50
  cfg.label_fraction = 1.0
  assert data.num_examples(cfg, image_size=(4, 4), channels=3) == 1000


# ----------------------------------------------------------------------------- eval split


@requires_fmnist
def test_real_fashion_mnist_eval_split_is_the_whole_test_set():
  cfg = data_config(source="fashion_mnist", path=FMNIST_DIR, split="train", label_fraction=0.01,
                    mean=(0.0,), std=(1.0,))
  assert data.num_examples(cfg, image_size=(28, 28), channels=1) == 600
  assert data.num_examples(cfg, image_size=(28, 28), channels=1, split="test") == 10000
  batches = list(data.make_eval_iterator(cfg, image_size=(28, 28), channels=1, batch_size=2500,
                                         process_index=0, process_count=1,
                                         split=data.eval_split(cfg)))
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  test_images, test_labels, _ = idx.load_fmnist(FMNIST_DIR, "test")
  assert len(batches) == 4 and mask.all() and len(labels) == 10000
  np.testing.assert_array_equal(labels, test_labels)
  np.testing.assert_allclose(batches[-1]["image"][-1, ..., 0], test_images[-1] / 255,
                             atol=1e-6)
  # Without `split` the eval iterator reads the (whole, unsubsetted) training split.
  train_batch = next(data.make_eval_iterator(cfg, image_size=(28, 28), channels=1,
                                             batch_size=8, process_index=0, process_count=1))
  _, train_labels, _ = idx.load_fmnist(FMNIST_DIR, "train")
  np.testing.assert_array_equal(train_batch["label"], train_labels[:8])


def test_image_folder_eval_path_uses_the_training_class_names(tmp_path):
  for name in ("cat/1.png", "dog/2.png", "emu/3.png", "emu/4.png"):
    save_png(tmp_path / "train" / name)
  for name in ("dog/a.png", "emu/b.png"):  # no "cat": labels must still be dog=1, emu=2
    save_png(tmp_path / "val" / name)
  cfg = data_config(source="image_folder", path=str(tmp_path / "train"))
  with pytest.raises(ConfigError, match=r"^config\.data\.eval_path=''"):
    data.make_eval_iterator(cfg, image_size=(6, 6), channels=3, batch_size=2, process_index=0,
                            process_count=1, split=data.eval_split(cfg))
  cfg.eval_path = str(tmp_path / "val")
  data.validate_data_config(cfg, image_size=(6, 6), channels=3)
  batch = next(data.make_eval_iterator(cfg, image_size=(6, 6), channels=3, batch_size=4,
                                       process_index=0, process_count=1, split=data.eval_split(cfg)))
  np.testing.assert_array_equal(batch["label"], [1, 2, -1, -1])
  np.testing.assert_array_equal(batch["mask"], [True, True, False, False])
  assert data.num_examples(cfg, image_size=(6, 6), channels=3, split="test") == 2
  # The training split (split=None or data.split) is still data.path.
  assert data.num_examples(cfg, image_size=(6, 6), channels=3, split="train") == 4

  save_png(tmp_path / "val" / "fox" / "c.png")
  sources.list_image_folder.cache_clear()
  with pytest.raises(ValueError, match="fox"):
    data.build_source(cfg, image_size=(6, 6), channels=3, split="test")


def test_each_run_lists_an_image_folder_as_it_is_when_the_run_starts(tmp_path, monkeypatch):
  """Listings are cached within a process (a run lists its folder several times); a second
  run in the same process (a notebook) listed the folder as the first run saw it."""
  from mim_jax.training import loop
  for name in ("a/1.png", "b/2.png"):
    save_png(tmp_path / "images" / name)
  root = str(tmp_path / "images")
  seen = []
  monkeypatch.setattr(registry.method_class("knn"), "run", classmethod(
      lambda cls, c, w: seen.append(len(sources.list_image_folder(c.data.path)[0]))))
  save_png(tmp_path / "evaluation" / "a" / "1.png")
  config = tiny_config("knn", init_from="random", **{
      "data.source": "image_folder", "data.path": root,
      "data.eval_path": str(tmp_path / "evaluation"),
      "data.mean": (0.5,), "data.std": (0.5,)})
  loop.run(config, str(tmp_path / "first"))
  save_png(tmp_path / "images" / "b" / "3.png")
  loop.run(config, str(tmp_path / "second"))
  assert seen == [2, 3]


# ----------------------------------------------------------------------------- num_classes


def test_num_classes_for_each_source(tmp_path, monkeypatch):
  assert data.num_classes(data_config(source="fashion_mnist", path=str(tmp_path))) == 10
  assert data.num_classes(data_config(source="synthetic")) == 10

  for name in ("a/1.png", "b/x/2.png", "c/3.png", ".hidden/4.png"):
    save_png(tmp_path / "three" / name)
  assert data.num_classes(data_config(source="image_folder", path=str(tmp_path / "three"))) == 3
  save_png(tmp_path / "flat" / "1.png")
  assert data.num_classes(data_config(source="image_folder", path=str(tmp_path / "flat"))) == 1

  if os.path.isdir(FMNIST_DIR):  # a real TFDS dataset: the count from its info
    name = build_tfds_fashion_mnist(str(tmp_path / "tfds"), train=20, test=10)
    assert data.num_classes(data_config(source="tfds", tfds_name=name,
                                        tfds_data_dir=str(tmp_path / "tfds"))) == 10


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("fraction", [0, 0.0, 1.5, -0.1, True, "0.5"])
def test_bad_label_fraction_is_named(fraction):
  with pytest.raises(ConfigError) as e:
    data.validate_data_config(data_config(label_fraction=fraction), image_size=(8, 8),
                              channels=3)
  message = str(e.value)
  assert message.startswith(f"config.data.label_fraction={fraction!r} is invalid"), message
  assert "(0, 1]" in message


def test_other_new_fields_are_checked(tmp_path):
  kw = dict(image_size=(8, 8), channels=3)
  data.validate_data_config(data_config(label_fraction=1), **kw)
  data.validate_data_config(data_config(label_fraction=0.01), **kw)
  save_png(tmp_path / "train" / "a" / "1.png")
  folder = dict(source="image_folder", path=str(tmp_path / "train"))
  data.validate_data_config(data_config(**folder, eval_path=str(tmp_path / "train")), **kw)
  cases = [
      ("subset_seed", dict(subset_seed=0.5)),
      ("eval_split", dict(eval_split=3)),
      ("eval_path", dict(eval_path=None)),
      ("eval_path", dict(folder, eval_path=str(tmp_path / "missing"))),
  ]
  fm = indexed_fmnist(tmp_path / "fm", np.arange(4, dtype=np.uint8))
  cases.append(("eval_split", dict(source="fashion_mnist", path=fm, eval_split="validation")))
  for field, overrides in cases:
    with pytest.raises(ConfigError) as e:
      data.validate_data_config(data_config(**overrides), **kw)
    assert str(e.value).startswith(f"config.data.{field}="), (field, str(e.value))


def test_subset_source_records_keep_original_index():
  base = sources.SyntheticSource(30, (4, 4), 1)
  sub = subsets.SubsetSource(base, np.array([2, 7, 21]), base.labels())
  assert len(sub) == 3 and [sub[i]["index"] for i in range(3)] == [2, 7, 21]
  np.testing.assert_array_equal(sub.labels(), [2, 7, 1])
  np.testing.assert_array_equal(sub[1]["image"], base[7]["image"])
