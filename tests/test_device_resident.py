"""A training split held in device memory (data.device_resident=True, data/device_resident.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mim_jax.config.errors import ConfigError
from mim_jax.data import device_resident, transforms
from mim_jax.data.transforms import CROP_BOX_KEY, FLIP_KEY
from mim_jax.objectives.masking import TOKEN_MASK_KEY
from mim_jax.registry import validate_config
from mim_jax.training import loop as train

from conftest import REPO, tiny_config

RESIDENT = {"data.augment_on": "device", "data.device_resident": True}


def _one_device_sharding():
  return NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)),
                       PartitionSpec("data"))


@pytest.mark.parametrize("height,width,scale,ratio", [
    (28, 28, (0.2, 1.0), (3 / 4, 4 / 3)),   # the Fashion-MNIST recipe
    (12, 40, (0.5, 1.0), (0.9, 1.1)),       # every try fails: the centred fallback crop
    (20, 40, (0.9, 1.0), (0.5, 2.0)),       # about half the images fit a try, half fall back
])
def test_batched_crop_boxes_follow_the_per_image_rule(height, width, scale, ratio):
  """Same distribution as transforms.random_resized_crop_box (torchvision's rule): the means
  of every coordinate and the share of fallback crops agree over 20,000 draws."""
  n = 20000
  batched = device_resident.random_resized_crop_boxes(np.random.default_rng(0), n, height,
                                                      width, scale, ratio)
  rng = np.random.default_rng(1)
  single = np.array([transforms.random_resized_crop_box(rng, height, width, scale, ratio)
                     for _ in range(n)], np.float32)
  assert batched.shape == (n, 4) and batched.dtype == np.float32
  for boxes in (batched, single):
    top, left, h, w = boxes.T
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert (boxes == np.round(boxes)).all()  # whole pixels
  np.testing.assert_allclose(batched.mean(0), single.mean(0), rtol=0.03, atol=0.15)
  np.testing.assert_allclose(batched.std(0), single.std(0), rtol=0.05, atol=0.15)
  full = lambda b: np.mean((b[:, 2] == height) | (b[:, 3] == width))  # noqa: E731
  assert abs(full(batched) - full(single)) < 0.02


def test_each_epoch_visits_each_example_once_across_the_hosts():
  """Every epoch is one permutation of the split, shared out position by position: the hosts'
  shares are disjoint, together the whole split, mixed across it (not fixed strided shards)."""
  n, batch = 51, 8  # 51 // 2 hosts = 25 per host (one row dropped): batches straddle epochs
  for count in (1, 2):
    per_host = n // count
    rows = {k: np.concatenate([device_resident.stream_rows(3, k, count, n, b, batch)
                               for b in range(3 * per_host // batch + 1)])
            for k in range(count)}
    dropped = []
    for epoch in range(3):
      chunks = np.concatenate([rows[k][epoch * per_host:(epoch + 1) * per_host]
                               for k in range(count)])
      assert len(set(chunks)) == len(chunks) == per_host * count and set(chunks) <= set(range(n))
      dropped.append(set(range(n)) - set(chunks))
    if count == 2:  # the row an epoch drops is drawn with its order, not always the last one
      assert len({min(d) for d in dropped}) > 1
    for k in range(count):  # epochs are reshuffled
      assert not np.array_equal(rows[k][:per_host], rows[k][per_host:2 * per_host])
    if count == 2:  # a host's rows are not one parity class of the split
      assert len({int(r) % 2 for r in rows[0][:per_host]}) == 2


def _iterator(config, sharding=None):
  return device_resident.make_train_iterator(
      config.data, image_size=tuple(config.image_size), channels=config.channels,
      global_batch_size=config.global_batch_size, seed=config.seed,
      batch_sharding=sharding or _one_device_sharding())


def test_batches_are_the_split_rows_with_their_labels_and_resume_exactly():
  config = tiny_config("mae", **RESIDENT)
  images, labels = device_resident.load_split(config.data, image_size=(16, 16), channels=3)
  it = _iterator(config)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  after = [next(it) for _ in range(3)]
  for batch in first + after:
    gathered = np.asarray(batch["image"])
    assert gathered.shape == (8, 16, 16, 3) and gathered.dtype == np.uint8
    assert batch[CROP_BOX_KEY].shape == (8, 4) and batch[FLIP_KEY].dtype == bool
    for image, label in zip(gathered, batch["label"]):  # every row is a row of the split
      row = np.flatnonzero((images == image).all(axis=(1, 2, 3)))
      assert len(row) >= 1 and labels[row[0]] == label
  fresh = _iterator(config)
  fresh.set_state(state)
  for a, b in zip(after, [next(fresh) for _ in range(3)]):
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  with pytest.raises(ConfigError, match="grain pipeline"):
    fresh.set_state(b'{"next_index": 3}')  # a grain iterator's position


def test_training_from_a_device_resident_split_resumes_bit_for_bit(tmp_path, caplog):
  """2 steps, stop, 2 more == 4 in one go; a method with host-drawn masks (blockwise) trains
  too (test_host_drawn_extras_... checks the masks themselves)."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  final = train.run(tiny_config("mae", total_steps=4, **RESIDENT), straight)
  train.run(tiny_config("mae", total_steps=2, **RESIDENT), resumed)
  with caplog.at_level(logging.INFO, logger=train.__name__):
    again = train.run(tiny_config("mae", total_steps=4, **RESIDENT), resumed)
  assert "at step 2" in caplog.text  # resumed, not started again with the same seed
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config = tiny_config("mim", total_steps=2, **RESIDENT, **{"masking.min_block": 2})
  assert config.masking.kind == "blockwise"  # drawn on the host, per batch here
  state = train.run(config, str(tmp_path / "blockwise"))
  assert int(state.step) == 2


def test_resuming_with_the_other_iterator_is_refused_before_anything_is_restored(tmp_path):
  grain_run, resident_run = str(tmp_path / "grain"), str(tmp_path / "resident")
  device_augment = {"data.augment_on": "device"}
  train.run(tiny_config("mae", total_steps=2, **device_augment), grain_run)
  with pytest.raises(ConfigError, match="data.device_resident: False in this run, True now"):
    train.run(tiny_config("mae", total_steps=4, **RESIDENT), grain_run)
  # Even as a change on purpose: the saved data position cannot serve the other iterator
  # (and nothing is recorded, so the run keeps its own setting).
  with pytest.raises(ConfigError, match="data position of the grain pipeline"):
    train.run(tiny_config("mae", total_steps=4, **RESIDENT), grain_run, resume_with_changes=True)
  train.run(tiny_config("mae", total_steps=2, **RESIDENT), resident_run)
  with pytest.raises(ConfigError, match="data position of a device-resident split"):
    train.run(tiny_config("mae", total_steps=4, **device_augment), resident_run,
              resume_with_changes=True)
  # Both runs still resume with their own setting.
  assert int(train.run(tiny_config("mae", total_steps=3, **device_augment), grain_run).step) == 3
  assert int(train.run(tiny_config("mae", total_steps=3, **RESIDENT), resident_run).step) == 3


def test_host_drawn_extras_are_added_per_batch_and_replayed_after_a_restore():
  config = tiny_config("mae", **RESIDENT)
  extras = lambda n, rng: {TOKEN_MASK_KEY: rng.random((n, 16)) < 0.5}  # noqa: E731
  make = lambda: device_resident.make_train_iterator(  # noqa: E731
      config.data, image_size=(16, 16), channels=3, global_batch_size=8, seed=0,
      batch_sharding=_one_device_sharding(), batch_extras=extras)
  it = make()
  first = next(it)
  state = it.get_state()
  second = next(it)
  assert first[TOKEN_MASK_KEY].shape == (8, 16)
  assert not np.array_equal(first[TOKEN_MASK_KEY], second[TOKEN_MASK_KEY])
  again = make()
  again.set_state(state)
  np.testing.assert_array_equal(next(again)[TOKEN_MASK_KEY], second[TOKEN_MASK_KEY])


@pytest.mark.parametrize("good,bad", [(6, 2), (1, 3)])
def test_undecodable_images_are_left_out_unless_most_are_bad(tmp_path, good, bad):
  from test_data import data_config, save_image
  rng = np.random.default_rng(0)
  for i in range(good):
    save_image(tmp_path / f"good_{i}.png", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
  for i in range(bad):
    (tmp_path / f"bad_{i}.png").write_bytes(b"not an image")
  cfg = data_config(source="image_folder", path=str(tmp_path), on_bad_image="skip")
  if bad > good:  # as the grain pipeline: a mostly unreadable folder is misconfigured
    with pytest.raises(transforms.BadImageError, match=f"{bad} of the {good + bad} images"):
      device_resident.load_split(cfg, image_size=(8, 8), channels=3)
  else:
    images, labels = device_resident.load_split(cfg, image_size=(8, 8), channels=3)
    assert images.shape == (good, 10, 12, 3) and labels.shape == (good,)


def test_cpu_devices_copies_of_the_split_count_together(tmp_path, monkeypatch):
  """CPU devices share the host's memory: the split's bound holds for all their copies, and
  the refusal names the device count that fits."""
  from test_data import data_config, save_image
  for i in range(4):
    save_image(tmp_path / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
  cfg = data_config(source="image_folder", path=str(tmp_path))
  monkeypatch.setattr(device_resident, "MAX_BYTES", 3 * 4 * 8 * 8 * 3)  # 3 copies of 4 images
  images, _ = device_resident.load_split(cfg, image_size=(8, 8), channels=3,
                                         copies_in_one_memory=3)
  assert images.shape == (4, 8, 8, 3)
  with pytest.raises(ConfigError, match=r"4 CPU devices' copies in the host's memory.*"
                     r"--cpu_devices=3\)"):
    device_resident.load_split(cfg, image_size=(8, 8), channels=3, copies_in_one_memory=4)


@pytest.mark.parametrize("overrides,match", [
    ({"data.device_resident": True}, "augment_on"),
    ({**RESIDENT, "data.num_workers": 4}, "no worker processes"),
])
def test_device_resident_is_refused_where_it_cannot_act(overrides, match):
  with pytest.raises(ConfigError, match=match):
    validate_config(tiny_config("mae", **overrides))


def test_device_resident_refused_for_images_of_mixed_sizes_names_what_works(tmp_path):
  """An image folder cannot be device-resident: the refusal says so, instead of advising
  data.augment_on='device', which that source refuses in turn; its advice is accepted."""
  from test_data import save_image
  save_image(tmp_path / "a" / "0.png", np.zeros((8, 8, 3), np.uint8))
  folder = {"data.source": "image_folder", "data.path": str(tmp_path)}
  with pytest.raises(ConfigError, match=r"config.data.device_resident=True is invalid: False "
                     r"for data.source='image_folder'"):
    validate_config(tiny_config("mae", **folder, **{"data.device_resident": True}))
  validate_config(tiny_config("mae", **folder, **{"data.device_resident": False}))


def test_the_chooser_refuses_what_the_device_resident_split_would_drop():
  """data.make_train_iterator with data.device_resident: a method's own augmentation and
  per-image transforms without their per-batch form are refused, not silently left out."""
  from mim_jax import data
  config = tiny_config("mae", **RESIDENT)
  kw = dict(image_size=(16, 16), channels=3, global_batch_size=8, seed=0,
            batch_sharding=_one_device_sharding())
  with pytest.raises(ConfigError, match="own augmentation"):
    data.make_train_iterator(config.data, augment=object(), **kw)
  with pytest.raises(ValueError, match="batch_extras"):
    data.make_train_iterator(config.data, element_transforms=(object(),), **kw)
  with pytest.raises(ValueError, match="batch_sharding"):
    data.make_train_iterator(config.data, **{**kw, "batch_sharding": None})


_SCRIPT = r"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from conftest import tiny_config
from mim_jax.data import device_resident
assert jax.device_count() == 4, jax.devices()  # else 1 device against itself
config = tiny_config("mae", global_batch_size=16, **{"data.augment_on": "device",
                                                     "data.device_resident": True})
def batches(devices):
  sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
  it = device_resident.make_train_iterator(config.data, image_size=(16, 16), channels=3,
      global_batch_size=16, seed=0, batch_sharding=sharding)
  out = [next(it) for _ in range(2)]
  assert out[0]["image"].sharding == sharding, out[0]["image"].sharding
  return [np.asarray(b["image"]) for b in out]
for a, b in zip(batches(jax.devices()[:4]), batches(jax.devices()[:1])):
  np.testing.assert_array_equal(a, b)
print("OK")
"""


def test_batches_gathered_on_4_devices_equal_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
  env.pop("JAX_NUM_CPU_DEVICES", None)  # it would override XLA_FLAGS' count
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-4000:]


def test_the_memory_plan_counts_the_split_each_device_holds():
  """memory_plan's peak adds the split's copy (outside the compiled step's arguments):
  64 synthetic 16x16 RGB uint8 images, the holdout left out as load_split leaves it."""
  from mim_jax import memory_plan
  config = tiny_config("mae", **RESIDENT, **{"data.holdout": 16})
  images, _ = device_resident.load_split(config.data, image_size=(16, 16), channels=3)
  assert device_resident.split_bytes(config.data, image_size=(16, 16), channels=3) \
      == images.nbytes == 48 * 16 * 16 * 3
  plan = memory_plan.plan(config)
  assert plan["resident_split"] == images.nbytes
  assert plan["peak"] == (plan["xla_arguments"] + plan["xla_outputs"] - plan["xla_aliased"]
                          + plan["xla_temp"] + images.nbytes)
  assert "training split      0.00 GiB (data.device_resident" in memory_plan.format_plan(plan)
  assert "a run refuses more than 4 GiB" in memory_plan.format_plan(
      {**plan, "resident_split": 5 * 2**30})
  assert "resident_split" not in memory_plan.plan(tiny_config("mae"))
