"""A small training split held in device memory (data.device_resident=True).

The grain pipeline does per-image Python work on the host (decode, one generator and a few
draws per image): about 9,000 Fashion-MNIST images/s per process on a 2-core VM, fewer than a
GPU trains a small ViT on. Here the split is decoded once, copied to every device (replicated,
as decoded: uint8, or float32 for data beyond 8 bits), and each batch is a gather on the
device. The host draws only the batch's rows, crop boxes and flips, with batched numpy, and
the method's host-drawn masks (`Method.example_extras`); the crop, resize, flip and
normalisation run in the train step, as with data.augment_on="device" (required).

The stream: every epoch is one permutation of the split (holdout and label subset taken first,
as in the grain pipeline; seeded by (seed, epoch), the same on every host), of which host k
reads positions k, k + process_count, ... (a disjoint, equal share; the permutation's last
N % process_count rows are left out, other rows each epoch); batch b is positions
[b B, (b + 1) B) of the epochs laid end to end, so a batch may span two epochs (as in the
grain pipeline). The boxes, flips and masks of batch b come from generators seeded by (seed,
stream, host, b): the iterator's state is one integer, a restore is exact, and the batches do
not depend on how many were drawn before. The draws have the grain pipeline's distributions
but are a different stream (it seeds one generator per image, the cost this path avoids).
Undecodable images (data.on_bad_image='skip') are left out once, at load, and counted once.

  make_train_iterator(data_cfg, *, image_size, channels, global_batch_size, seed,
                      batch_sharding, batch_extras=None, process_index=None,
                      process_count=None) -> DeviceResidentIterator
  DeviceResidentIterator: next() -> {"image": global jax.Array [G, h, w, C] (sharded like the
      batch), "label": int32 [B], "crop_box": float32 [B, 4], "flip": bool [B], + extras}
      (B = G / process_count: this host's rows, numpy), get_state() / set_state() (JSON bytes,
      saved by the same Orbax item as a grain iterator's position), close()
"""

from __future__ import annotations

import functools
import json
import logging
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from mim_jax.config.errors import config_error
from mim_jax.data import pipeline, sources, transforms
from mim_jax.data.transforms import CROP_BOX_KEY, FLIP_KEY

log = logging.getLogger(__name__)

# A copy of the split lives on every device: beyond this it would crowd out the model (and it
# is no longer a "small" dataset; use the grain pipeline with workers). CPU devices share the
# host's memory, so there the bound holds for all their copies together.
MAX_BYTES = 4 * 2**30
_SHUFFLE, _AUGMENT, _EXTRAS = 11, 12, 13  # generator streams, apart from the grain pipeline's
_STATE_KIND = "mim_jax.device_resident"


def random_resized_crop_boxes(rng: np.random.Generator, n: int, height: int, width: int,
                              scale: Sequence[float], ratio: Sequence[float]) -> np.ndarray:
  """float32 [n, 4] (top, left, height, width): `transforms.random_resized_crop_box` (the
  torchvision rule) for n images at once: ten tries each of area ~ U(scale) x image area and
  aspect ~ logU(ratio), the first that fits wins; else the largest centred crop whose aspect
  is clamped into `ratio`. The same distribution, drawn in a different order."""
  area = height * width
  target = area * rng.uniform(scale[0], scale[1], (n, 10))
  aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, 10)))
  w = np.round(np.sqrt(target * aspect))  # round half to even, as Python's round()
  h = np.round(np.sqrt(target / aspect))
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = fits.argmax(axis=1)
  rows = np.arange(n)
  h, w = h[rows, first], w[rows, first]
  top = np.floor(rng.random(n) * (height - h + 1))  # uniform integers in [0, height - h]
  left = np.floor(rng.random(n) * (width - w + 1))
  boxes = np.stack([top, left, h, w], axis=1)
  boxes[~fits.any(axis=1)] = transforms.fallback_crop_box(height, width, ratio)
  return boxes.astype(np.float32)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, rows: int) -> np.ndarray:
  """The split's order in `epoch` (computed once per epoch: a permutation of 60,000 costs
  about a millisecond, more than the rest of a batch's draws)."""
  order = np.random.default_rng([seed % 2**63, _SHUFFLE, epoch]).permutation(rows)
  order.flags.writeable = False
  return order


def stream_rows(seed: int, process_index: int, process_count: int, num_examples: int,
                batch_index: int, local_batch: int) -> np.ndarray:
  """int64 [local_batch]: the split's rows in this host's batch `batch_index`."""
  # Equal shards, as in the grain pipeline: each epoch's permutation is of the whole split and
  # its last num_examples % process_count rows are dropped, other rows each epoch (a
  # permutation of only the first rows would never show the split's last ones).
  per_host = num_examples // process_count
  positions = batch_index * local_batch + np.arange(local_batch)
  epochs, offsets = np.divmod(positions, per_host)
  rows = np.empty(local_batch, np.int64)
  for epoch in np.unique(epochs):
    order = _epoch_order(seed, int(epoch), num_examples)
    here = epochs == epoch
    rows[here] = order[offsets[here] * process_count + process_index]  # host k: k::count
  return rows


class DeviceResidentIterator:
  """This host's training batches, gathered from the split held on the devices (module doc)."""

  def __init__(self, *, table, labels: np.ndarray, gather: Callable, batch_sharding,
               local_batch: int, seed: int, process_index: int, process_count: int,
               crop_scale, crop_ratio, hflip: bool,
               batch_extras: Optional[Callable[[int, np.random.Generator], dict]]):
    self._table, self._labels, self._gather = table, labels, gather
    self._sharding, self._local_batch, self._seed = batch_sharding, local_batch, seed
    self._process_index, self._process_count = process_index, process_count
    self._crop = (tuple(crop_scale), tuple(crop_ratio))
    self._hflip, self._batch_extras = hflip, batch_extras
    self._next_batch = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    import jax  # pylint: disable=g-import-not-at-top  # the data package loads without JAX
    b, n = self._next_batch, self._local_batch
    rows = stream_rows(self._seed, self._process_index, self._process_count,
                       len(self._labels), b, n)

    def generator(stream: int) -> np.random.Generator:
      return np.random.default_rng([self._seed % 2**63, stream, self._process_index, b])

    draws = generator(_AUGMENT)
    height, width = self._table.shape[1:3]
    boxes = random_resized_crop_boxes(draws, n, height, width, *self._crop)
    flips = draws.random(n) < 0.5 if self._hflip else np.zeros(n, bool)
    batch = {"label": self._labels[rows], CROP_BOX_KEY: boxes, FLIP_KEY: flips}
    if self._batch_extras is not None:
      batch.update(self._batch_extras(n, generator(_EXTRAS)))
    indices = jax.make_array_from_process_local_data(self._sharding, rows.astype(np.int32))
    batch["image"] = self._gather(self._table, indices)
    self._next_batch = b + 1
    return batch

  # The Orbax item that saves a grain iterator's position saves this one's: JSON bytes.
  def get_state(self) -> bytes:
    return json.dumps({"kind": _STATE_KIND, "next_batch": self._next_batch}).encode()

  def set_state(self, state: bytes) -> None:
    check_saved_position(state, resident=True)
    self._next_batch = int(json.loads(state)["next_batch"])

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore: nothing is prefetched here."""

  def close(self) -> None:
    self._table = None  # the device copy is freed with the last reference


def check_saved_position(position: str | bytes, *, resident: bool) -> None:
  """ConfigError unless a saved iterator position (JSON) was written by the iterator this run
  builds: a device-resident split's position means nothing to a grain pipeline and back."""
  try:
    saved = json.loads(position)
    was_resident = isinstance(saved, dict) and saved.get("kind") == _STATE_KIND
  except ValueError:
    was_resident = False
  if was_resident != resident:
    writer = "a device-resident split" if was_resident else "the grain pipeline"
    raise config_error("data.device_resident", resident, f"{not resident} to resume this run: "
                       f"its checkpoint holds the data position of {writer}")


def _open_split(data_cfg, image_size: tuple[int, int], channels: int):
  """(the training source, holdout and label subset applied; its decoder)."""
  source = sources.build_train_source(data_cfg, image_size=image_size, channels=channels)
  return source, pipeline._decoder(data_cfg, channels)  # pylint: disable=protected-access


def split_bytes(data_cfg, *, image_size: tuple[int, int], channels: int) -> int:
  """The bytes of one device's copy of the training split, from its length and its first
  decodable image: what load_split would hold, before any undecodable image is left out (the
  memory planner's estimate)."""
  source, decoder = _open_split(data_cfg, image_size, channels)
  for i in range(len(source)):
    image = decoder.map(source[i])["image"]
    if image is not None:
      return len(source) * image.nbytes
  return 0


def load_split(data_cfg, *, image_size: tuple[int, int], channels: int,
               copies_in_one_memory: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, h, w, C] as decoded, labels int32 [N]) of the training split (holdout and
  label subset applied); undecodable images are left out (data.on_bad_image='skip').
  `copies_in_one_memory`: the device copies that will share one memory (CPU devices share
  the host's), all of which MAX_BYTES bounds."""
  source, decoder = _open_split(data_cfg, image_size, channels)
  images = labels = None
  kept = 0
  for i in range(len(source)):
    record = decoder.map(source[i])
    image = record["image"]
    if image is None:
      continue
    if images is None:  # the first decodable image sets the size, dtype and memory
      size = len(source) * image.nbytes
      if size * copies_in_one_memory > MAX_BYTES:
        fit = MAX_BYTES // size  # the CPU devices whose copies fit together
        shared = (f", {copies_in_one_memory} CPU devices' copies in the host's memory, "
                  f"{size * copies_in_one_memory / 2**30:.1f} GiB"
                  + (f" (or fewer devices: --cpu_devices={fit})" if fit >= 1 else "")
                  if copies_in_one_memory > 1 else "")
        raise config_error("data.device_resident", True,
                           f"False for {source!r}: its {size / 2**30:.1f} GiB would be copied "
                           f"to every device{shared}; at most {MAX_BYTES / 2**30:.0f} GiB; "
                           "the grain pipeline with data.num_workers reads it from the host")
      images = np.empty((len(source), *image.shape), image.dtype)
      labels = np.empty(len(source), np.int32)
    elif image.shape != images.shape[1:]:
      raise ValueError(f"{record['path']} has shape {image.shape}, the first image "
                       f"{images.shape[1:]}: data.device_resident needs one size")
    images[kept], labels[kept] = image, record["label"]
    kept += 1
  if kept == 0 or kept < (1 - pipeline.MAX_BAD_IMAGE_FRACTION) * len(source):  # as grain
    raise transforms.BadImageError(
        f"{len(source) - kept} of the {len(source)} images of {source!r} cannot be decoded "
        f"(more than {pipeline.MAX_BAD_IMAGE_FRACTION:.0%}): is data.path the right folder?")
  return images[:kept], labels[:kept]


def make_train_iterator(data_cfg, *, image_size: tuple[int, int], channels: int,
                        global_batch_size: int, seed: int, batch_sharding,
                        batch_extras: Optional[Callable] = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> DeviceResidentIterator:
  """The training split copied to the devices of `batch_sharding`'s mesh (replicated) and an
  iterator of this host's batches gathered from it (module doc). `batch_extras(n, rng)` adds
  per-batch host arrays (a method's host-drawn masks)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

  # pylint: disable-next=protected-access
  process_index, process_count = pipeline._process_index_and_count(process_index, process_count)
  local_batch = pipeline.local_batch_size(global_batch_size, process_count)
  local_devices = batch_sharding.mesh.local_devices
  on_cpu = all(d.platform == "cpu" for d in local_devices)
  images, labels = load_split(data_cfg, image_size=image_size, channels=channels,
                              copies_in_one_memory=len(local_devices) if on_cpu else 1)
  if len(labels) < process_count:
    raise ValueError(f"{len(labels)} decodable training images, fewer than the "
                     f"{process_count} processes sharing them")
  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  table = jax.make_array_from_callback(images.shape, replicated, lambda index: images[index])
  log.info("training split held on every device: %d images %s %s, %.1f MiB per device",
           len(labels), images.shape[1:], images.dtype, images.nbytes / 2**20)
  gather = jax.jit(lambda t, i: t[i], out_shardings=batch_sharding)
  return DeviceResidentIterator(
      table=table, labels=labels, gather=gather, batch_sharding=batch_sharding,
      local_batch=local_batch, seed=seed,
      process_index=process_index, process_count=process_count,
      crop_scale=tuple(float(s) for s in data_cfg.crop_scale),
      crop_ratio=tuple(float(r) for r in data_cfg.crop_ratio), hflip=bool(data_cfg.hflip),
      batch_extras=batch_extras)
