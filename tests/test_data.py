"""The input pipeline: sources, transforms, determinism, sharding, resume, bad images, config.

Test data is written to tmp_path (tiny IDX files, PNG/JPEG folders, corrupt files); the real
Fashion-MNIST files are used where installed.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import os
import re
import stat
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mim_jax import data, registry
from mim_jax.config.errors import ConfigError
from mim_jax.data import idx, sources, transforms

from conftest import (
  FMNIST_DIR,
  REPO,
  ImportAttempts,
  build_tfds_fashion_mnist,
  requires_fmnist,
)

# ----------------------------------------------------------------------------- helpers


def write_idx(path, array: np.ndarray, *, gz: bool = True, truncate: int = 0) -> str:
  """Writes uint8 `array` as an IDX file (header + data), dropping the last `truncate` bytes."""
  array = np.asarray(array, np.uint8)
  raw = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  raw += array.tobytes()
  raw = raw[:len(raw) - truncate]
  path = str(path)
  if gz:
    with gzip.open(path, "wb") as f:
      f.write(raw)
  else:
    with open(path, "wb") as f:
      f.write(raw)
  return path


def write_fmnist(folder, images: np.ndarray, labels=None, split: str = "train",
                 gz: bool = True) -> str:
  """A Fashion-MNIST-style folder holding `images` [N, H, W] for `split`."""
  os.makedirs(folder, exist_ok=True)
  prefix = idx.FMNIST_PREFIXES[split]
  ext = ".gz" if gz else ""
  labels = np.arange(len(images)) % 10 if labels is None else labels
  write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), images, gz=gz)
  write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), labels, gz=gz)
  return str(folder)


def indexed_images(n: int, size: int = 4) -> np.ndarray:
  """n constant images [n, size, size]; image i has every pixel = 10 * i (recoverable)."""
  return np.repeat((10 * np.arange(n, dtype=np.uint8))[:, None, None], size * size,
                   axis=1).reshape(n, size, size)


def save_image(path, array: np.ndarray, fmt: str | None = None) -> str:
  os.makedirs(os.path.dirname(str(path)), exist_ok=True)
  Image.fromarray(array).save(str(path), format=fmt)
  return str(path)


def data_config(**overrides) -> ml_collections.ConfigDict:
  """`config.data` from the defaults, made small and in-process, with `overrides`."""
  fields = registry.base_config("mae").data.to_dict()
  fields.update(source="synthetic", synthetic_size=20, num_workers=0, prefetch_buffer_size=2)
  fields.update(overrides)  # not ConfigDict.update: bad-type values must get through
  return ml_collections.ConfigDict(fields)


def take(it, n: int) -> list[np.ndarray]:
  return [next(it)["image"] for _ in range(n)]


def ids_from_batches(batches) -> list[int]:
  """Example ids of `indexed_images` batches normalised with mean 0, std 1."""
  values = np.concatenate([b.reshape(b.shape[0], -1) for b in batches])
  assert np.all(values.max(1) == values.min(1)), "indexed images must stay constant"
  return [int(round(v * 255 / 10)) for v in values[:, 0]]


@pytest.fixture
def indexed_fmnist(tmp_path):
  """A tiny IDX 'Fashion-MNIST' of 24 constant 4x4 images whose pixel value encodes the index,
  with crops that keep the whole image, so batches reveal which examples they hold."""
  folder = write_fmnist(tmp_path / "fmnist", indexed_images(24))
  return data_config(source="fashion_mnist", path=folder, split="train", crop_scale=(1.0, 1.0),
                     crop_ratio=(1.0, 1.0), mean=(0.0,), std=(1.0,))


@pytest.fixture
def bad_folder(tmp_path):
  """An image folder with 6 good PNGs, a truncated JPEG and a '.png' that is not an image."""
  root = tmp_path / "imgs"
  rng = np.random.default_rng(0)
  for i in range(6):
    save_image(root / f"good_{i}.png", rng.integers(50, 256, (10, 12, 3), dtype=np.uint8))
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
  truncated = root / "truncated.jpg"
  truncated.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  garbage = root / "garbage.png"
  garbage.write_bytes(b"this is not a png" * 10)
  return str(root), {str(truncated), str(garbage)}


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_tiny(tmp_path, gz):
  images = np.random.default_rng(0).integers(0, 256, (5, 3, 7), dtype=np.uint8)
  path = write_idx(tmp_path / ("x.idx3" + (".gz" if gz else "")), images, gz=gz)
  out = idx.read_idx(path)
  assert out.shape == (5, 3, 7) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, images)


def test_idx_read_again_only_when_the_file_changed(tmp_path):
  path = write_idx(tmp_path / "x.idx3.gz", np.zeros((5, 3, 7), np.uint8), gz=True)
  first = idx.read_idx(path)
  assert idx.read_idx(path) is first and not first.flags.writeable  # kept, and shared safely
  write_idx(tmp_path / "x.idx3.gz", np.ones((6, 3, 7), np.uint8), gz=True)  # rewritten
  os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))  # even within the clock's resolution
  again = idx.read_idx(path)
  assert again.shape == (6, 3, 7) and again.min() == 1


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated_file_names_it(tmp_path, gz):
  path = write_idx(tmp_path / ("t.idx3" + (".gz" if gz else "")), np.ones((4, 5, 5)), gz=gz,
                   truncate=7)
  with pytest.raises(idx.IdxFormatError, match="truncated") as e:
    idx.read_idx(path)
  assert path in str(e.value)


def test_idx_truncated_gzip_stream_names_it(tmp_path):
  path = write_idx(tmp_path / "g.gz", np.ones((50, 8, 8)))
  blob = open(path, "rb").read()
  open(path, "wb").write(blob[:len(blob) // 2])
  with pytest.raises(idx.IdxFormatError, match="truncated") as e:
    idx.read_idx(path)
  assert path in str(e.value)


def test_idx_bad_magic_and_trailing_bytes():
  with pytest.raises(idx.IdxFormatError, match="magic"):
    idx.parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8, name="m")
  good = struct.pack(">HBBI", 0, 8, 1, 3) + b"abc"
  assert idx.parse_idx(good).tolist() == list(b"abc")
  with pytest.raises(idx.IdxFormatError, match="longer"):
    idx.parse_idx(good + b"z", name="m")


def test_fashion_mnist_source_from_tiny_uncompressed_files(tmp_path):
  images = indexed_images(7, size=5)
  folder = write_fmnist(tmp_path / "f", images, labels=np.arange(7)[::-1], split="test",
                        gz=False)
  src = data.build_source(data_config(source="fashion_mnist", path=folder, split="test"),
                          image_size=(5, 5), channels=1)
  assert len(src) == 7
  rec = src[3]
  assert rec["image"].shape == (5, 5, 1) and rec["label"] == 3 and rec["index"] == 3
  np.testing.assert_array_equal(rec["image"][..., 0], images[3])


def test_fashion_mnist_mismatched_label_count(tmp_path):
  folder = write_fmnist(tmp_path / "f", indexed_images(5), labels=np.zeros(4))
  with pytest.raises(idx.IdxFormatError, match="labels"):
    idx.load_fmnist(folder, "train")


@requires_fmnist
def test_real_fashion_mnist_files():
  images, labels, _ = idx.load_fmnist(FMNIST_DIR, "train")
  assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
  assert set(np.unique(labels)) == set(range(10))
  test_images, _, _ = idx.load_fmnist(FMNIST_DIR, "test")
  assert test_images.shape == (10000, 28, 28)
  cfg = data_config(source="fashion_mnist", path=FMNIST_DIR, split="train")
  assert data.num_examples(cfg, image_size=(28, 28), channels=1) == 60000


@requires_fmnist
def test_real_fashion_mnist_eval_is_exact_pixels():
  """Same size as the source: no resize; rows are the IDX pixels normalised, in order."""
  cfg = data_config(source="fashion_mnist", path=FMNIST_DIR, split="test", mean=(0.25,),
                    std=(0.5,))
  batch = next(data.make_eval_iterator(cfg, image_size=(28, 28), channels=1, batch_size=6,
                                       process_index=0, process_count=1))
  images, labels, _ = idx.load_fmnist(FMNIST_DIR, "test")
  np.testing.assert_allclose(batch["image"][..., 0], (images[:6] / 255 - 0.25) / 0.5,
                             atol=1e-6)
  np.testing.assert_array_equal(batch["label"], labels[:6])
  assert batch["mask"].all()


# ----------------------------------------------------------------------------- image folder


def test_image_folder_labels_and_recursive_listing(tmp_path):
  root = tmp_path / "root"
  px = np.full((6, 6, 3), 128, np.uint8)
  b = save_image(root / "b_class" / "x.png", px)
  a_deep = save_image(root / "a_class" / "sub" / "deep" / "y.jpg", px)
  a = save_image(root / "a_class" / "z.PNG", px, fmt="PNG")
  save_image(root / ".hidden" / "w.png", px)       # hidden folder: ignored
  (root / "a_class" / "notes.txt").write_text("not an image")
  src = data.build_source(data_config(source="image_folder", path=str(root)),
                          image_size=(6, 6), channels=3)
  labels = {src[i]["path"]: src[i]["label"] for i in range(len(src))}
  assert labels == {a_deep: 0, a: 0, b: 1}
  assert src.classes == ("a_class", "b_class")
  assert "image" not in src[0]  # listing does not decode


def test_image_folder_lists_each_image_once_through_links_that_loop(tmp_path):
  """A symlink back up the tree (to the root; to a linked-in class's own folder) is not
  descended again: os.walk(followlinks=True) alone lists x.png about 40 times (up to the
  kernel's limit on links in a path). A link to a folder elsewhere (a class linked in) is still
  followed."""
  root, px = tmp_path / "root", np.full((4, 4, 3), 7, np.uint8)
  x = save_image(root / "a" / "x.png", px)
  save_image(tmp_path / "elsewhere" / "y.png", px)
  (root / "a" / "up").symlink_to(root)
  (root / "b").symlink_to(tmp_path / "elsewhere")
  (tmp_path / "elsewhere" / "back").symlink_to(tmp_path / "elsewhere")
  src = data.build_source(data_config(source="image_folder", path=str(root)),
                          image_size=(4, 4), channels=3)
  assert sorted(src[i]["path"] for i in range(len(src))) == [x, str(root / "b" / "y.png")]
  assert src.classes == ("a", "b")


def test_image_folder_root_images_get_label_zero(tmp_path):
  root = tmp_path / "flat"
  for i in range(3):
    save_image(root / f"{i}.png", np.full((4, 4, 3), 9, np.uint8))
  src = data.build_source(data_config(source="image_folder", path=str(root)),
                          image_size=(4, 4), channels=3)
  assert len(src) == 3 and {src[i]["label"] for i in range(3)} == {0}


# ----------------------------------------------------------------------------- channels


def test_grayscale_source_to_three_channels(indexed_fmnist):
  kw = dict(image_size=(4, 4), batch_size=8, process_index=0, process_count=1)
  one = next(data.make_eval_iterator(indexed_fmnist, channels=1, **kw))["image"]
  three = next(data.make_eval_iterator(indexed_fmnist, channels=3, **kw))["image"]
  assert one.shape == (8, 4, 4, 1) and three.shape == (8, 4, 4, 3)
  for c in range(3):
    np.testing.assert_array_equal(three[..., c], one[..., 0])
  assert ids_from_batches([one]) == list(range(8))


def test_rgb_to_one_channel_is_pil_luminance(tmp_path):
  root = tmp_path / "rgb"
  save_image(root / "red.png", np.tile(np.array([255, 0, 0], np.uint8), (5, 5, 1)))
  save_image(root / "teal.png", np.tile(np.array([0, 128, 128], np.uint8), (5, 5, 1)))
  cfg = data_config(source="image_folder", path=str(root), mean=(0.0,), std=(1.0,))
  batch = next(data.make_eval_iterator(cfg, image_size=(5, 5), channels=1, batch_size=2,
                                       process_index=0, process_count=1))
  assert batch["image"].shape == (2, 5, 5, 1)
  expected = [Image.new("RGB", (1, 1), c).convert("L").getpixel((0, 0))
              for c in [(255, 0, 0), (0, 128, 128)]]  # sorted order: red.png, teal.png
  np.testing.assert_allclose(batch["image"][:, 0, 0, 0] * 255, expected, atol=1e-3)
  assert expected[0] != expected[1]


def test_to_channels_array_paths():
  rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
  gray = transforms.to_channels(rgb, 1)
  assert gray.shape == (3, 4, 1)
  np.testing.assert_array_equal(gray[..., 0], np.asarray(Image.fromarray(rgb).convert("L")))
  assert transforms.to_channels(rgb[..., :1], 3).shape == (3, 4, 3)


# ----------------------------------------------------------------------------- crops


def test_random_resized_crop_box_follows_scale_and_ratio():
  rng = np.random.default_rng(0)
  areas, aspects, centres = [], [], []
  for _ in range(300):
    top, left, h, w = transforms.random_resized_crop_box(rng, 100, 80, (0.2, 0.5), (0.75, 1.5))
    assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 80
    areas.append(h * w / 8000)
    aspects.append(w / h)
    centres.append((top + h / 2, left + w / 2))
  # Positions are uniform over the valid range: centres spread over the image.
  assert np.ptp([c[0] for c in centres]) > 30 and np.ptp([c[1] for c in centres]) > 20
  # Rounding to whole pixels moves area/aspect slightly outside the sampled ranges.
  assert 0.18 < min(areas) and max(areas) < 0.53 and np.ptp(areas) > 0.2
  assert 0.7 < min(aspects) and max(aspects) < 1.6
  assert len(set(zip(areas, aspects))) > 100  # actually random


def test_random_resized_crop_fallback_is_centred():
  rng = np.random.default_rng(0)
  # An aspect of 10 never fits a 50x60 image: fallback = full width, height 60/10, centred.
  assert transforms.random_resized_crop_box(rng, 50, 60, (0.5, 1.0), (10.0, 10.0)) == (
      22, 0, 6, 60)
  assert transforms.random_resized_crop_box(rng, 50, 60, (1.0, 1.0), (1.2, 1.2)) == (
      0, 0, 50, 60)


def test_train_batches_shape_and_range_non_square():
  cfg = data_config(synthetic_size=12, mean=(0.0,), std=(1.0,))
  it = data.make_train_iterator(cfg, image_size=(12, 20), channels=3, global_batch_size=4,
                                seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (4, 12, 20, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
  assert batch["image"].std() > 0.02


def test_normalisation_uses_mean_and_std(indexed_fmnist):
  indexed_fmnist.update(mean=(0.5,), std=(0.25,))
  batch = next(data.make_eval_iterator(indexed_fmnist, image_size=(4, 4), channels=1,
                                       batch_size=4, process_index=0, process_count=1))
  np.testing.assert_allclose(batch["image"][:, 0, 0, 0], (10 * np.arange(4) / 255 - 0.5) / 0.25,
                             rtol=1e-6)


def test_hflip_flag(tmp_path):
  half = np.zeros((6, 8, 8), np.uint8)
  half[:, :, 4:] = 255  # left dark, right bright
  folder = write_fmnist(tmp_path / "h", half)
  cfg = data_config(source="fashion_mnist", path=folder, crop_scale=(1.0, 1.0),
                    crop_ratio=(1.0, 1.0), mean=(0.0,), std=(1.0,))

  def bright_right(hflip):
    cfg.hflip = hflip
    it = data.make_train_iterator(cfg, image_size=(8, 8), channels=1, global_batch_size=6,
                                  seed=1, process_index=0, process_count=1)
    imgs = np.concatenate(take(it, 6))[..., 0]
    return imgs[:, :, 4:].mean((1, 2)) > imgs[:, :, :4].mean((1, 2))

  assert bright_right(False).all()
  flipped = ~bright_right(True)
  assert 0 < flipped.sum() < len(flipped)


def test_eval_resize_and_centre_crop(tmp_path):
  root = tmp_path / "wide"
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, :10] = 255  # a bright left quarter that the centre crop must cut away
  save_image(root / "w.png", img)
  cfg = data_config(source="image_folder", path=str(root), mean=(0.0,), std=(1.0,))
  batch = next(data.make_eval_iterator(cfg, image_size=(8, 8), channels=3, batch_size=1,
                                       process_index=0, process_count=1))
  assert batch["image"].shape == (1, 8, 8, 3)
  assert batch["image"].max() < 0.05
  # Above 224 pixels, MAE's evaluation resizes the whole image (crop fraction 1.0).
  assert data.pipeline.eval_crop_fraction(cfg, (224, 224)) == 0.875
  assert data.pipeline.eval_crop_fraction(cfg, (384, 384)) == 1.0


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_batches_different_seed_differs():
  cfg = data_config(synthetic_size=10)
  kw = dict(image_size=(8, 8), channels=3, global_batch_size=4, process_index=0,
            process_count=1)
  a = take(data.make_train_iterator(cfg, seed=3, **kw), 4)
  b = take(data.make_train_iterator(cfg, seed=3, **kw), 4)
  c = take(data.make_train_iterator(cfg, seed=4, **kw), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_epochs_cover_data_and_reshuffle(indexed_fmnist):
  it = data.make_train_iterator(indexed_fmnist, image_size=(4, 4), channels=1,
                                global_batch_size=8, seed=0, process_index=0, process_count=1)
  epoch1, epoch2 = ids_from_batches(take(it, 3)), ids_from_batches(take(it, 3))
  assert sorted(epoch1) == sorted(epoch2) == list(range(24))
  assert epoch1 != epoch2 and epoch1 != list(range(24))


def test_per_host_shards_are_disjoint_and_cover(indexed_fmnist):
  shards = []
  for host in range(2):
    it = data.make_train_iterator(indexed_fmnist, image_size=(4, 4), channels=1,
                                  global_batch_size=8, seed=0, process_index=host,
                                  process_count=2)
    batches = take(it, 3)  # 12 examples per host = one epoch of its shard
    assert batches[0].shape == (4, 4, 4, 1)  # local batch = 8 / 2
    shards.append(ids_from_batches(batches))
  assert len(set(shards[0])) == len(set(shards[1])) == 12
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(range(24))
  # One permutation of the split shared out, as DistributedSampler: a host's share mixes the
  # whole split (fixed strided shards gave host 0 the even rows, a global batch neighbours).
  assert {i % 2 for i in shards[0]} == {0, 1}


def test_uneven_shards_drop_other_examples_each_epoch(indexed_fmnist):
  """24 examples on 5 hosts: 4 each, 4 dropped per epoch, drawn with each epoch's permutation
  (cutting the source first dropped examples 20..23 every epoch: never seen)."""
  epochs = [[] for _ in range(3)]
  for host in range(5):
    it = data.make_train_iterator(indexed_fmnist, image_size=(4, 4), channels=1,
                                  global_batch_size=5, seed=0, process_index=host,
                                  process_count=5)
    ids = ids_from_batches(take(it, 12))  # local batch 1: three epochs of 4
    for e in range(3):
      epochs[e] += ids[4 * e:4 * (e + 1)]
  for ids in epochs:
    assert len(set(ids)) == 20 and set(ids) <= set(range(24))
  assert set().union(*map(set, epochs)) == set(range(24))
  assert len({frozenset(ids) for ids in epochs}) == 3



# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_with_get_and_set_state(num_workers):
  cfg = data_config(synthetic_size=10, num_workers=num_workers)
  kw = dict(image_size=(8, 12), channels=3, global_batch_size=4, seed=7, process_index=0,
            process_count=1)
  it = data.make_train_iterator(cfg, **kw)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)  # crosses an epoch boundary (10 examples, 4 per batch)
  it.close()
  fresh = data.make_train_iterator(cfg, **kw)
  fresh.set_state(state)
  resumed = take(fresh, 4)
  fresh.close()
  for x, y in zip(expected, resumed):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(expected[0], expected[1])


def test_workers_process_the_same_examples_as_in_process():
  """Augmentation is per element: 2 workers give the same examples, grouped differently."""
  kw = dict(image_size=(8, 8), channels=3, global_batch_size=4, seed=0, process_index=0,
            process_count=1)
  rows = {}
  for workers in (0, 2):
    it = data.make_train_iterator(data_config(synthetic_size=10, num_workers=workers), **kw)
    rows[workers] = sorted(x.tobytes() for b in take(it, 2) for x in b)
    it.close()
  assert rows[0] == rows[2]


@pytest.mark.parametrize("release", ["release_shared_memory", "gc.collect", "nothing"])
def test_release_shared_memory_unlinks_the_last_batches_before_exit(release):
  """Batches from worker processes live in shared memory that grain unlinks on a thread pool,
  whose pending requests interpreter exit discards. Slowed down here so that they are always
  pending: collecting the dropped batches alone (the loop's clean-up before the fix) or
  nothing leaves blocks that the resource tracker reports as leaked; release_shared_memory,
  which also waits for the pool, none."""
  script = f"""
import time
from grain._src.python.ipc import shared_memory_array
from mim_jax import data
import test_data

unlink = shared_memory_array.SharedMemoryArray.close_shm_async.__func__
def slow_unlink(cls, shm, unlink_too):
  time.sleep(0.2)
  unlink(cls, shm, unlink_too)
shared_memory_array.SharedMemoryArray.close_shm_async = classmethod(slow_unlink)

it = data.make_train_iterator(test_data.data_config(synthetic_size=10, num_workers=1),
                              image_size=(8, 8), channels=3, global_batch_size=4, seed=0,
                              process_index=0, process_count=1)
batches = [next(it) for _ in range(3)]
it.close()
it = batches = None
if {release!r} == "release_shared_memory":
  data.release_shared_memory()
elif {release!r} == "gc.collect":
  import gc
  gc.collect()
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=os.path.dirname(__file__), timeout=300)
  assert out.returncode == 0, out.stderr
  leaked = "leaked shared_memory" in out.stderr
  assert leaked == (release != "release_shared_memory"), out.stderr


def test_orbax_checkpoint_manager_roundtrip(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  cfg = data_config(synthetic_size=10)
  kw = dict(image_size=(8, 8), channels=3, global_batch_size=4, seed=0, process_index=0,
            process_count=1)
  it = data.make_train_iterator(cfg, **kw)
  take(it, 2)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  manager.save(2, args=ocp.args.Composite(data=data.iterator_save_args(it)))
  manager.wait_until_finished()
  manager.close()
  expected = take(it, 3)
  assert os.path.exists(tmp_path / "ckpt" / "2" / "data" / "process_0-of-1.json")

  fresh = data.make_train_iterator(cfg, **kw)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  restored = manager.restore(2, args=ocp.args.Composite(
      data=data.iterator_restore_args(fresh))).data
  manager.close()
  assert restored is fresh
  for x, y in zip(expected, take(fresh, 3)):
    np.testing.assert_array_equal(x, y)
  assert data.ITERATOR_HANDLER_NAME.endswith("CheckpointHandler")


# ----------------------------------------------------------------------------- bad images


def test_corrupt_images_skipped_with_warning_and_count(bad_folder, caplog):
  root, bad = bad_folder
  data.reset_skipped_images()
  cfg = data_config(source="image_folder", path=root, on_bad_image="skip", mean=(0.0,),
                    std=(1.0,), crop_scale=(0.5, 1.0))
  it = data.make_train_iterator(cfg, image_size=(8, 8), channels=3, global_batch_size=4,
                                seed=0, process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING):
    batches = take(it, 4)  # 16 examples > 2 epochs of the 6 good images
  for b in batches:
    assert b.shape == (4, 8, 8, 3)
    assert (b.reshape(4, -1).max(1) > 0.1).all()  # no zero images: good pixels are >= 50/255
  warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  for path in bad:
    assert path in warned
  assert set(data.skipped_images()) == bad
  assert data.num_skipped_images() >= 4  # each bad file at least once per epoch


def test_an_epoch_of_bad_images_across_a_resume_is_not_an_unreadable_split():
  """The count of images without one that decodes starts where the stream resumed: one
  epoch's length of bad images can span two epochs' shuffles of a half-readable split (here 4
  bad in a row of an epoch of 4), which is no reason to stop; 2 x 4 - 1 in a row is."""
  from mim_jax.data import transforms
  drop = transforms.DropInvalidRows(max_bad_fraction=1.0, epoch_size=4, source="S")

  def batch(*valid):
    return {"image": np.zeros((len(valid), 2)), transforms.VALID_KEY: np.array(valid)}
  for valid in ((False, False), (False, False), (True, True)):
    drop.map(batch(*valid))
  stuck = transforms.DropInvalidRows(max_bad_fraction=1.0, epoch_size=4, source="S")
  stuck.map(batch(False, False, False, False))
  stuck.map(batch(False, False))
  with pytest.raises(data.BadImageError, match="none of the 8 images this process read in a row "
                     r"of S could be decoded: a whole epoch of its share \(4 images\)"):
    stuck.map(batch(False, False))


def test_an_unreadable_folder_is_one_error_after_a_few_warnings_naming_the_files(
    tmp_path, caplog, monkeypatch):
  """Every file corrupt: each skip was a warning quoting PIL's "<_io.BytesIO object at
  0x...>" for the file, repeated every epoch until 1000 images had been read. Now the first
  WARN_FIRST files are named by their paths, then counts only, and one BadImageError once an
  epoch's worth of images has failed."""
  from mim_jax.data import bad_images
  root = tmp_path / "unreadable"
  root.mkdir()
  for i in range(12):
    (root / f"{i:02d}.png").write_bytes(b"not a png" * 3)
  # A skip log of its own: an earlier test's unclosed iterator may still decode its bad files
  # ahead, into the process's log and its budget of named files.
  monkeypatch.setattr(bad_images, "_directory", str(tmp_path / "skips"))
  monkeypatch.setattr(bad_images, "_owner_pid", os.getpid())
  data.reset_skipped_images()
  cfg = data_config(source="image_folder", path=str(root), on_bad_image="skip", mean=(0.0,),
                    std=(1.0,))
  it = data.make_train_iterator(cfg, image_size=(8, 8), channels=3, global_batch_size=4,
                                seed=0, process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING), pytest.raises(
      data.BadImageError, match=rf"none of the 24 images this process read in a row of "
      rf"ImageFolderSource\('{root}', n=12, classes=0\) could be decoded: a whole epoch of its "
      r"share \(12 images\)"):
    next(it)
  warned = [r.getMessage() for r in caplog.records if r.name == bad_images.log.name]
  named = [line for line in warned if line.startswith("skipping bad image")
           and str(root) in line]
  counts = [line.split(" by process")[0] for line in warned
            if line.startswith(tuple("0123456789"))]
  assert len(named) == bad_images.WARN_FIRST, warned
  for line in named:
    assert re.match(rf"skipping bad image {root}/\d\d\.png \(ValueError: not an image format "
                    r"PIL recognises \(data starting b'not a pn'\)\)", line), line
  assert "Further bad images are not named" in named[-1]
  # 12 images and a few batches of read-ahead: the count's line at 10, not yet at 100.
  assert counts in ([], ["10 bad images skipped so far"]), counts
  assert "BytesIO" not in " ".join(warned)
  data.reset_skipped_images()


def test_the_skip_log_is_private_and_claims_stop_with_the_budget(tmp_path):
  """The skip log lists file paths in the shared temporary folder: mode 0o700 (the claims'
  sub-folder had made it with the umask's mode). Once the named files' budget is spent, later
  bad files leave no claim file behind (a folder of a million bad images made a million)."""
  from mim_jax.data import bad_images
  directory = tmp_path / "skips"
  for i in range(3 * bad_images.WARN_FIRST):
    bad_images.record_skip(str(directory), f"/images/{i}.png", "bad")
  assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
  claims = sorted(os.listdir(directory / "named"))
  assert len(claims) == 2 * bad_images.WARN_FIRST, claims  # a path and a slot per named file
  assert (directory / f"{os.getpid()}.txt").read_text().count("\n") == 3 * bad_images.WARN_FIRST


def test_data_workers_share_the_budget_of_named_bad_files(tmp_path):
  """With data workers each worker named its own first WARN_FIRST bad files (2 workers, 10
  names, some files twice). A host's processes now share one budget through the skip log: 5
  names in all, each file at most once."""
  root = tmp_path / "unreadable"
  root.mkdir()
  for i in range(16):
    (root / f"{i:02d}.png").write_bytes(b"not a png" * 3)
  script = f"""
import logging
from mim_jax import data
import test_data
logging.basicConfig(level=logging.WARNING, format="%(message)s")
cfg = test_data.data_config(source="image_folder", path={str(root)!r}, on_bad_image="skip",
                            num_workers=2, mean=(0.0,), std=(1.0,))
it = data.make_train_iterator(cfg, image_size=(8, 8), channels=3, global_batch_size=4,
                              seed=0, process_index=0, process_count=1)
try:
  next(it)
except data.BadImageError as e:
  print("BadImageError", flush=True)
it.close()
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=os.path.dirname(__file__), timeout=300)
  assert "BadImageError" in out.stdout, out.stderr[-3000:]
  named = re.findall(r"skipping bad image (\S+) \(", out.stderr)
  assert len(named) == 5 == len(set(named)), out.stderr[-3000:]
  assert all(path.startswith(str(root)) for path in named), named


def test_skip_count_is_seen_from_worker_processes(bad_folder):
  root, bad = bad_folder
  data.reset_skipped_images()
  cfg = data_config(source="image_folder", path=root, num_workers=2)
  it = data.make_train_iterator(cfg, image_size=(8, 8), channels=3, global_batch_size=4,
                                seed=0, process_index=0, process_count=1)
  take(it, 4)
  it.close()
  # Only this folder's files: a previous test's read-ahead may still finish a batch.
  assert {p for p in data.skipped_images() if p.startswith(root)} == bad


def test_a_run_without_bad_images_leaves_no_skip_log_even_when_killed(tmp_path):
  """The skip log's directory is made by the first skip, not at start-up: runs that end
  without their exit handlers (kill -9, a lost peer's os._exit) used to leave one behind."""
  root = tmp_path / "imgs"
  rng = np.random.default_rng(0)
  for i in range(4):
    save_image(root / f"good_{i}.png", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
  script = f"""
import os
from mim_jax import data
from mim_jax.data import bad_images
import test_data
cfg = test_data.data_config(source="image_folder", path={str(root)!r})
it = data.make_train_iterator(cfg, image_size=(8, 8), channels=3, global_batch_size=4,
                              seed=0, process_index=0, process_count=1)
next(iter(it))
print(bad_images.log_directory(), data.num_skipped_images(), flush=True)
os._exit(0)  # no atexit handlers, as after kill -9
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=os.path.dirname(__file__), timeout=300, check=True)
  directory, skipped = out.stdout.split()
  assert skipped == "0"
  assert "mim_jax_skipped_images_" in directory and not os.path.exists(directory)


def test_corrupt_image_raise_mode_names_the_file(bad_folder):
  root, bad = bad_folder
  cfg = data_config(source="image_folder", path=root, on_bad_image="raise")
  it = data.make_train_iterator(cfg, image_size=(8, 8), channels=3, global_batch_size=4,
                                seed=0, process_index=0, process_count=1)
  with pytest.raises(data.BadImageError) as e:
    take(it, 4)
  assert any(path in str(e.value) for path in bad)


def test_decode_rejects_truncated_jpeg():
  buf = io.BytesIO()
  Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 7).save(buf, format="JPEG")
  assert transforms.decode_image(buf.getvalue(), 3).shape == (32, 32, 3)
  with pytest.raises(OSError):
    transforms.decode_image(buf.getvalue()[:len(buf.getvalue()) // 2], 3)


def test_eval_masks_bad_images_instead_of_dropping(bad_folder):
  root, bad = bad_folder
  cfg = data_config(source="image_folder", path=root)
  batches = list(data.make_eval_iterator(cfg, image_size=(8, 8), channels=3, batch_size=5,
                                         process_index=0, process_count=1))
  assert len(batches) == 2  # 8 files -> 5 + 3, padded with 2 rows
  mask = np.concatenate([b["mask"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  src = data.build_source(cfg, image_size=(8, 8), channels=3)
  expected_mask = [src[i]["path"] not in bad for i in range(len(src))] + [False, False]
  np.testing.assert_array_equal(mask, expected_mask)
  assert (images[~mask] == 0).all() and (np.abs(images[mask]) > 0).any(axis=(1, 2, 3)).all()


# ----------------------------------------------------------------------------- eval


def test_eval_iterator_padding_and_mask():
  cfg = data_config(synthetic_size=11)
  per_host = []
  for host in range(2):
    batches = list(data.make_eval_iterator(cfg, image_size=(8, 8), channels=3, batch_size=4,
                                           process_index=host, process_count=2))
    assert len(batches) == 2  # ceil(ceil(11 / 2) / 4) on both hosts
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert batches[0]["label"].dtype == np.int32 and mask.dtype == bool
    assert images.shape == (8, 8, 8, 3)
    assert (images[~mask] == 0).all() and (labels[~mask] == -1).all()
    assert (np.abs(images[mask]).reshape(mask.sum(), -1).max(1) > 0).all()
    per_host.append(labels[mask])
  # Host 0 has examples 0, 2, ..., 10 and host 1 has 1, 3, ..., 9, in order (label = i % 10).
  np.testing.assert_array_equal(per_host[0], [0, 2, 4, 6, 8, 0])
  np.testing.assert_array_equal(per_host[1], [1, 3, 5, 7, 9])


# ----------------------------------------------------------------------------- synthetic, tfds


def test_synthetic_source_deterministic_and_smooth():
  a = sources.SyntheticSource(5, (16, 24), 3)
  b = sources.SyntheticSource(5, (16, 24), 3)
  r0 = a[0]["image"]
  assert r0.shape == (16, 24, 3) and r0.dtype == np.uint8
  np.testing.assert_array_equal(r0, b[0]["image"])
  assert not np.array_equal(r0, a[1]["image"])
  assert np.ptp(r0) > 50  # not flat
  noise = np.random.default_rng(0).integers(0, 256, r0.shape).astype(float)
  neighbour_diff = lambda x: np.abs(np.diff(x.astype(float), axis=1)).mean()
  assert neighbour_diff(r0) < 0.25 * neighbour_diff(noise)
  assert sources.SyntheticSource(3, (8, 8), 1)[2]["image"].shape == (8, 8, 1)
  cfg = data_config(synthetic_size=37)
  assert data.num_examples(cfg, image_size=(8, 8), channels=3) == 37


@requires_fmnist
def test_tfds_dataset_is_read_by_name_without_tensorflow(tmp_path):
  """A real TFDS dataset (ArrayRecord, built by TFDS from the Fashion-MNIST files) read through
  tfds.data_source: sizes, class count from its info, labels and decoded pixels; TensorFlow is
  never imported."""
  name = build_tfds_fashion_mnist(str(tmp_path))
  cfg = data_config(source="tfds", tfds_name=name, split="train", tfds_data_dir=str(tmp_path),
                    mean=(0.0,), std=(1.0,))
  with ImportAttempts("tensorflow") as tensorflow_imports:
    _read_tfds_fashion_mnist(cfg)
  assert tensorflow_imports.names == []
  assert "tensorflow" not in sys.modules


def _read_tfds_fashion_mnist(cfg):
  data.validate_data_config(cfg, image_size=(28, 28), channels=1)
  assert data.num_examples(cfg, image_size=(28, 28), channels=1) == 256
  assert data.num_classes(cfg) == 10  # from the dataset's info
  # TFDS stores examples in its own (hashed) order: every decoded image is one of the first 64
  # test images, with its label.
  images, labels, _ = idx.load_fmnist(FMNIST_DIR, "test")
  batch = next(data.make_eval_iterator(cfg, image_size=(28, 28), channels=1, batch_size=8,
                                       process_index=0, process_count=1, split="test"))
  for image, label in zip(batch["image"][..., 0], batch["label"]):
    found = np.flatnonzero(np.all(np.abs(images[:64] / 255.0 - image) < 1e-6, axis=(1, 2)))
    assert len(found) >= 1 and labels[found[0]] == label
  source = data.build_source(cfg, image_size=(28, 28), channels=1)
  np.testing.assert_array_equal(np.bincount(source.labels(), minlength=10),
                                np.bincount(idx.load_fmnist(FMNIST_DIR, "train")[1][:256],
                                            minlength=10))


# ----------------------------------------------------------------------------- config checks


@pytest.fixture
def fmnist_folder(tmp_path):
  return write_fmnist(tmp_path / "fm", indexed_images(4))


def _bad_cases(tmp_path, fmnist_folder):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no images here")
  fm = dict(source="fashion_mnist", path=fmnist_folder, split="train")
  return [
      ("source", dict(source="imagenet")),
      ("path", dict(fm, path=str(tmp_path / "nope"))),
      ("path", dict(fm, path=str(empty))),             # folder without the IDX files
      ("split", dict(fm, split="validation")),
      ("synthetic_size", dict(source="synthetic", synthetic_size=0)),
      ("synthetic_classes", dict(source="synthetic", synthetic_classes=0)),
      ("path", dict(source="image_folder", path=str(tmp_path / "missing"))),
      ("path", dict(source="image_folder", path=str(empty))),
      ("tfds_name", dict(source="tfds", tfds_name="")),
      ("synthetic_size", dict(synthetic_size=0)),
      ("crop_scale", dict(crop_scale=(0.0, 1.0))),
      ("crop_scale", dict(crop_scale=(0.6, 0.4))),
      ("crop_scale", dict(crop_scale=(0.2, 1.5))),
      ("crop_ratio", dict(crop_ratio=(0.0, 1.0))),
      ("crop_ratio", dict(crop_ratio=(2.0, 1.0))),
      ("on_bad_image", dict(on_bad_image="ignore")),
      ("num_workers", dict(num_workers=-1)),
      ("prefetch_buffer_size", dict(prefetch_buffer_size=0)),
      ("mean", dict(mean=(0.5, 0.5))),
      ("std", dict(std=(0.2, 0.2, 0.2, 0.2))),
      ("std", dict(std=(0.2, 0.0, 0.2))),
      ("hflip", dict(hflip="yes")),
  ]


def test_each_bad_field_is_named(tmp_path, fmnist_folder):
  for field, overrides in _bad_cases(tmp_path, fmnist_folder):
    cfg = data_config(**overrides)
    with pytest.raises(ConfigError) as e:
      data.validate_data_config(cfg, image_size=(8, 8), channels=3)
    assert str(e.value).startswith(f"config.data.{field}="), (field, overrides, str(e.value))


def test_an_evaluation_may_not_score_its_training_split(fmnist_folder):
  """Scoring the split it trains on is refused where a run scores an evaluation split; a run
  (or tool) reading the training split alone may name any split, the test split included."""
  cfg = data_config(source="fashion_mnist", path=fmnist_folder, mean=(0.3,), std=(0.3,),
                    eval_split="train")
  with pytest.raises(ConfigError, match=r"config.data.eval_split='train' is invalid: a split "
                     r"other than the training split data.split='train'"):
    data.validate_data_config(cfg, image_size=(28, 28), channels=1, scores_eval_split=True)
  data.validate_data_config(cfg, image_size=(28, 28), channels=1)


def test_fmnist_missing_hint_and_valid_configs(tmp_path, fmnist_folder):
  cfg = data_config(source="fashion_mnist", path=str(tmp_path / "nope"), mean=(0.3,),
                    std=(0.3,))
  with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
    data.validate_data_config(cfg, image_size=(28, 28), channels=1)
  # Valid: 1-element mean/std broadcast.
  data.validate_data_config(data_config(source="fashion_mnist", path=fmnist_folder,
                                        mean=(0.3,), std=(0.3,)), image_size=(4, 4), channels=3)
  data.validate_data_config(data_config(), image_size=(8, 16), channels=3)
  # Any channel count; the statistics must give one value per channel (or one for all).
  with pytest.raises(ConfigError, match=r"config.data.mean=.*a tuple of 2 numbers"):
    data.validate_data_config(data_config(), image_size=(8, 8), channels=2)
  data.validate_data_config(data_config(mean=(0.5, 0.4), std=(0.2, 0.3)), image_size=(8, 8),
                            channels=2)


def test_an_unprepared_tfds_dataset_is_named_with_the_command_that_prepares_it(tmp_path):
  with pytest.raises(ConfigError, match=r"config.data.tfds_name='imagenet2012'.*"
                     r"tfds build imagenet2012 --data_dir=.*--file_format=array_record"):
    data.validate_data_config(data_config(source="tfds", tfds_name="imagenet2012",
                                          tfds_data_dir=str(tmp_path)),
                              image_size=(224, 224), channels=3)


def test_the_evaluation_split_a_run_scores_is_checked_before_it_starts(tmp_path):
  """An evaluation split that cannot be read failed at the first evaluation (for fine-tuning:
  at the end, before its last checkpoint), and a split name TFDS lacks only inside TFDS:
  checked by validation now, where the run scores that split."""
  def check(cfg, scores=True, channels=1):
    data.validate_data_config(cfg, image_size=(8, 8), channels=channels,
                              scores_eval_split=scores)

  # An image folder: the evaluation split is data.eval_path, which must be set.
  for folder, name in itertools.product(("img", "val"), ("a", "b")):
    (tmp_path / folder / name).mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / folder / name / "0.png")
  folder = data_config(source="image_folder", path=str(tmp_path / "img"), mean=(0.5,),
                       std=(0.5,))
  check(folder, scores=False)  # pre-training without a k-NN monitor never reads it
  with pytest.raises(ConfigError, match=r"config.data.eval_path='' is invalid: a folder of "
                     r"evaluation images: this run scores split 'eval'"):
    check(folder)
  check(data_config(**{**folder.to_dict(), "holdout": 1, "eval_split": "holdout"}))
  # Any other name would read data.eval_path just the same: a name that does nothing.
  with_eval = {**folder.to_dict(), "eval_path": str(tmp_path / "val")}
  check(data_config(**{**with_eval, "eval_split": "eval"}))
  # The training folder, or one inside it or holding it, as the evaluation images: scored on
  # what it trains on (a random encoder's k-NN scored 97% on random noise that way).
  for inside in ("img", "img/a", "."):
    with pytest.raises(ConfigError, match=r"config.data.eval_path=.* is invalid: a folder apart "
                       r"from the training images data.path=.*img' \(neither inside the other"):
      check(data_config(**{**with_eval, "eval_path": str(tmp_path / inside)}))
  with pytest.raises(ConfigError, match=r"config.data.eval_split='validation' is invalid: one "
                     r"of \('', 'eval', 'holdout'\) for data.source='image_folder'"):
    check(data_config(**{**with_eval, "eval_split": "validation"}))
  # .npy arrays: the evaluation split's file, read by its header.
  npy = tmp_path / "npy"
  npy.mkdir()
  np.save(npy / "train.npy", np.zeros((4, 8, 8), np.uint8))
  arrays = data_config(source="npy", path=str(npy), mean=(0.5,), std=(0.5,))
  check(arrays, scores=False)
  with pytest.raises(ConfigError, match=r"config.data.eval_split='' is invalid: .*test.npy .*"
                     r"does not exist"):
    check(arrays)
  with pytest.raises(ConfigError, match=r"config.data.eval_split='val' is invalid: .*val.npy"):
    check(data_config(**{**arrays.to_dict(), "eval_split": "val"}))
  np.save(npy / "test.npy", np.zeros((4, 8, 8, 3), np.float32))  # 3 bands of floats
  with pytest.raises(ConfigError, match=r"config.channels=1 is invalid: .*they have 3, stored "
                     r"as float32.*set config.channels=3"):
    check(arrays)
  for split in ("train", "test"):
    np.save(npy / f"{split}_labels.npy", np.array([0, 1, 0, 1]))
  check(arrays, channels=3)
  # TFDS: split names from the prepared dataset's dataset_info.json, slices and sums allowed.
  (tmp_path / "tfds" / "toy" / "1.0.0").mkdir(parents=True)
  (tmp_path / "tfds" / "toy" / "1.0.0" / "dataset_info.json").write_text(
      '{"name": "toy", "splits": [{"name": "train"}, {"name": "validation"}]}')
  tfds_cfg = dict(source="tfds", tfds_name="toy", tfds_data_dir=str(tmp_path / "tfds"),
                  mean=(0.5,), std=(0.5,))
  check(data_config(**tfds_cfg, split="train[:90%]+validation[:10]",
                    eval_split="validation[10:]"))
  with pytest.raises(ConfigError, match=r"config.data.split='trian' is invalid: a split of the "
                     r"prepared 'toy': one of \['train', 'validation'\]"):
    check(data_config(**tfds_cfg, split="trian"), scores=False)
  with pytest.raises(ConfigError, match=r"config.data.eval_split='val' is invalid"):
    check(data_config(**tfds_cfg, split="train", eval_split="val"))
  check(data_config(**tfds_cfg, split="train", eval_split="val"), scores=False)


def test_labels_a_run_scores_must_name_classes(tmp_path):
  """A run that scores labels (an evaluation, a k-NN monitor) scored labels it did not have:
  npy without a labels file (every label 0: accuracy 1.0), float or negative labels, a flat
  image folder, an evaluation folder with classes the training folder lacks (found only at
  the first evaluation, after training). Each is refused by validation now."""
  def check(cfg, scores=True):
    data.validate_data_config(cfg, image_size=(8, 8), channels=1, scores_eval_split=scores)

  npy = tmp_path / "npy"
  npy.mkdir()
  for split in ("train", "test"):
    np.save(npy / f"{split}.npy", np.zeros((4, 8, 8), np.uint8))
  arrays = data_config(source="npy", path=str(npy), mean=(0.5,), std=(0.5,))
  check(arrays, scores=False)  # pre-training reads no labels
  # A tool that reads an evaluation split's images alone (tokenizers.usage --split=test).
  data.validate_data_config(arrays, image_size=(8, 8), channels=1, scores_eval_split=True,
                            scores_labels=False)
  with pytest.raises(ConfigError, match=r"config.data.split='train' is invalid: a split with "
                     r"its labels file .*train_labels.npy does not exist"):
    check(arrays)
  bad = {"float64": np.array([0.0, 1.0, 0.5, 1.0]), "smallest is -1": np.array([0, 1, -1, 1]),
         r"holds only label\(s\) \[1\]": np.ones(4, np.int64)}
  for says, labels in bad.items():
    np.save(npy / "train_labels.npy", labels)
    with pytest.raises(ConfigError, match=says):
      check(arrays)
  np.save(npy / "train_labels.npy", np.array([0, 1, 0, 1]))
  with pytest.raises(ConfigError, match=r"config.data.eval_split='test' is invalid: .*"
                     r"test_labels.npy does not exist"):
    check(arrays)
  np.save(npy / "test_labels.npy", np.array([1, 0, 1, 2]))
  with pytest.raises(ConfigError, match=r"labels are among the training split's; "
                     r"test_labels.npy also has \[2\]"):
    check(arrays)
  np.save(npy / "test_labels.npy", np.array([1, 0, 1, 0]))
  check(arrays)

  def folder(root, classes, loose=False):
    for name in classes:
      (root / name).mkdir(parents=True)
      Image.new("L", (8, 8)).save(root / name / "0.png")
    root.mkdir(parents=True, exist_ok=True)
    if loose:
      Image.new("L", (8, 8)).save(root / "stray.png")
    return str(root)

  def images(train, evaluation):
    return data_config(source="image_folder", path=train, eval_path=evaluation, mean=(0.5,),
                       std=(0.5,))
  train = folder(tmp_path / "train", ["a", "b"])
  with pytest.raises(ConfigError, match=r"config.data.path=.* is invalid: a training folder of "
                     r"at least 2 class sub-folders .* it has 1"):
    check(images(folder(tmp_path / "one", ["a"]), train))
  with pytest.raises(ConfigError, match=r"config.data.eval_path=.* is invalid: a folder whose "
                     r"images lie in class sub-folders.* 1 lie directly in it"):
    check(images(train, folder(tmp_path / "flat", [], loose=True)))
  with pytest.raises(ConfigError, match=r"config.data.eval_path=.* is invalid: an evaluation "
                     r"folder whose class sub-folders are among .* also has \['c'\]"):
    check(images(train, folder(tmp_path / "bc", ["b", "c"])))
  check(images(train, folder(tmp_path / "b", ["b"])))
  check(images(train, folder(tmp_path / "bc2", ["b", "c"])), scores=False)


@requires_fmnist
def test_a_channel_count_the_images_cannot_take_is_refused_before_training(tmp_path):
  """`channels=2` on Fashion-MNIST (or 1 on 3-band float arrays) made every image fail to
  convert: all skipped as undecodable, and the run stopped at its first batch blaming
  data.path. Validation applies to_channels' rules to what the source holds."""
  with pytest.raises(ConfigError, match=r"config.channels=2 is invalid: a channel count the "
                     r"images of data.source='fashion_mnist' convert to \(they have 1, stored as "
                     r"uint8\): cannot convert an image with 1 channels to 2"):
    data.validate_data_config(data_config(source="fashion_mnist", path=FMNIST_DIR,
                                          mean=(0.5,), std=(0.5,)),
                              image_size=(28, 28), channels=2)
  for stored, shape, channels, ok in ((np.uint8, (3, 4, 4, 4), 1, True),  # RGBA -> luma
                                      (np.uint8, (3, 4, 4, 2), 3, False),
                                      (np.uint16, (3, 4, 4), 3, True),   # gray -> RGB
                                      (np.uint16, (3, 4, 4, 3), 1, False)):
    np.save(tmp_path / "train.npy", np.zeros(shape, stored))
    cfg = data_config(source="npy", path=str(tmp_path), mean=(0.5,), std=(0.5,))
    if ok:
      data.validate_data_config(cfg, image_size=(4, 4), channels=channels)
      transforms.to_channels(np.zeros(shape[1:], stored), channels)  # and it converts
    else:
      with pytest.raises(ConfigError, match=f"config.channels={channels} is invalid"):
        data.validate_data_config(cfg, image_size=(4, 4), channels=channels)
      with pytest.raises(ValueError, match="cannot convert"):
        transforms.to_channels(np.zeros(shape[1:], stored), channels)


def test_validation_imports_neither_tfds_nor_tensorflow():
  code = ("import sys\n"
          "sys.path.insert(0, 'tests')\n"
          "from conftest import ImportAttempts\n"
          "attempts = ImportAttempts('tensorflow', 'tensorflow_datasets').__enter__()\n"
          "from mim_jax import data, registry\n"
          "c = registry.base_config('mae')\n"
          "try:\n"
          "  data.validate_data_config(c.data, image_size=(224, 224), channels=3)\n"
          "except Exception as e:\n"
          "  assert 'tfds build imagenet2012' in str(e), e  # not prepared here: named\n"
          "assert not attempts.names, attempts.names\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-2000:]


@requires_fmnist
def test_training_reads_a_tfds_dataset_by_name(tmp_path):
  """The trainer on a real TFDS ArrayRecord dataset: two MAE steps, then a k-NN of the export
  that reads the dataset's test split (its labels: twice chance at least, as any encoder of
  these images scores with 256 labelled neighbours)."""
  from mim_jax.training import loop

  from conftest import tiny_config
  name = build_tfds_fashion_mnist(str(tmp_path / "tfds"))
  tfds_fields = {"data.source": "tfds", "data.tfds_name": name, "data.mean": (0.5,),
                 "data.std": (0.5,), "data.tfds_data_dir": str(tmp_path / "tfds"),
                 "image_size": (28, 28), "channels": 1}
  state = loop.run(tiny_config("mae", total_steps=2, **tfds_fields), str(tmp_path / "mae"))
  assert int(state.step) == 2
  results = loop.run(tiny_config("knn", init_from=str(tmp_path / "mae"), **{
      "knn.k": 5, "data.eval_split": "test", **tfds_fields}), str(tmp_path / "knn"))
  assert 0.2 < results["knn_top1_cls"] <= 1, results


@requires_fmnist
def test_runs_that_score_a_split_may_not_score_their_training_split():
  """registry.validate_config passes validate_data_config whether the run scores an evaluation
  split: a k-NN job, and a pre-training run with its k-NN monitor on, are refused one that is
  their training split; the same pre-training run without the monitor reads no evaluation
  split and may train on any split."""
  from conftest import tiny_config
  fmnist = {"data.source": "fashion_mnist", "data.path": FMNIST_DIR, "image_size": (28, 28),
            "channels": 1, "data.mean": (0.3,), "data.std": (0.3,)}
  same = "a split other than the training split"
  with pytest.raises(ConfigError, match=same):
    registry.validate_config(tiny_config("knn", **fmnist, **{"data.eval_split": "train"}))
  with pytest.raises(ConfigError, match=same):
    registry.validate_config(tiny_config("mae", **fmnist, **{"data.split": "test",
                                                               "knn.every_epochs": 1}))
  registry.validate_config(tiny_config("mae", **fmnist, **{"data.split": "test"}))
