"""The grain pipelines: an infinite, sharded, shuffled training stream and a one-pass eval one.

Training, per host (process_index of process_count):

  source (data.split) -> per-class label subset (if data.label_fraction < 1; the same on every
  host) -> shuffle (one permutation of the whole split, the same on every host) -> repeat
  (reshuffled per epoch) -> each epoch's first process_count * (N // process_count) ->
  [process_index::process_count] (every host a disjoint, equal share of each epoch, as
  PyTorch's DistributedSampler) -> DecodeImage -> TrainAugment (random_map; an
  undecodable image becomes a row marked invalid) -> batch(local_batch) -> to_iter_dataset ->
  mp_prefetch (if num_workers > 0) -> DropInvalidRows -> NonEmptyBatch -> rebatch(local_batch)

Evaluation reads `data.split` or the `split` argument (e.g. data.eval_split), never subsetted.

Everything up to `to_iter_dataset` is index-based (a `MapDataset`), so an element's content
depends only on (seed, host, position in the stream): not on threads, workers or prefetching.
Batches are cut from the stream by position before the workers split it (worker w computes
batches w::num_workers, grain's `mp_prefetch` slicing, and they are interleaved back in
order), and the rows of skipped images are removed afterwards in the training process, so the
batches are the same, example for example, for every value of data.num_workers. The iterator
state (`get_state`/`set_state`) holds stream positions only, so a restore is exact for the
same config and num_workers.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Sequence

import grain
import numpy as np

from mim_jax.config.errors import config_error
from mim_jax.data import bad_images, rand_augment, sources, subsets, transforms

# Training stops if more than this fraction of images is bad (checked over windows of 1000
# images): a dataset that is mostly unreadable is misconfigured, and without the check an
# all-bad source would make the infinite stream spin forever.
MAX_BAD_IMAGE_FRACTION = 0.5
EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875, centre crop (224 <- 256), for real photos


def eval_crop_fraction(data_cfg, image_size: tuple[int, int]) -> float:
  """The evaluation's centre-crop fraction: 1.0 for sources whose images are already framed
  (Fashion-MNIST, arrays, synthetic) and, as MAE's evaluation transform, for inputs above 224
  pixels (fine-tuning at 384 or 448 resizes the whole image); 0.875 otherwise."""
  if sources.fixed_size_source(data_cfg) or max(image_size) > 224:
    return 1.0
  return EVAL_CROP_FRACTION


def _process_index_and_count(process_index: int | None,
                             process_count: int | None) -> tuple[int, int]:
  """Explicit values, or JAX's (imported lazily: the data package does not need devices)."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  return int(process_index), int(process_count)


def _derive_seeds(seed: int, process_index: int, stream: int = 1) -> tuple[int, int]:
  """(shuffle seed, per-host seed of random stream `stream`), uint32 each, independent
  streams from one config seed (stream 1: augmentation, 2, 3, ...: method transforms).

  The per-host seed folds in the host, so host k's i-th crop differs from host 0's.
  """
  shuffle_seed, = np.random.SeedSequence([seed % 2**63, 0]).generate_state(1)
  augment_seed, = np.random.SeedSequence([seed % 2**63, stream, process_index]).generate_state(1)
  return int(shuffle_seed), int(augment_seed)


def local_batch_size(global_batch_size: int, process_count: int) -> int:
  """Each host's share of the global batch (a ConfigError unless it divides evenly)."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise config_error("global_batch_size", global_batch_size,
                       f"a positive multiple of the number of processes {process_count}")
  return global_batch_size // process_count


def _read_options(num_workers: int, read_ahead: int) -> grain.ReadOptions:
  """Threads per process that run the map chain (PIL decode and resize release the GIL), and
  `read_ahead` elements of the dataset read buffered (at least one per thread)."""
  threads = 2 if num_workers > 0 else max(1, min(8, os.cpu_count() or 1))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, read_ahead))


# How often a worker checks that the training process is still alive (seconds).
PARENT_POLL_SECONDS = 0.5


def init_worker(worker_index: int, worker_count: int) -> None:
  """grain worker init: the worker outlives a SIGTERM and exits within PARENT_POLL_SECONDS of
  the training process, however that dies (kill -9 included, which runs no clean-up in the
  parent).

  SIGTERM is ignored because a preemption notice is the trainer's to handle: schedulers send
  it to every process of the job (SLURM, `kill -- -PGID`, `timeout`), and a worker that died
  of it would fail the trainer's next batch ("Worker process was terminated unexpectedly")
  before the checkpoint it is about to write; the trainer stops its workers once it has
  saved. A daemon thread compares the worker's parent pid with the one at start: once the
  parent is gone the worker is re-parented and the thread ends the process. Polling, not
  PR_SET_PDEATHSIG, because that signal follows the thread that started the worker, which
  may end long before the training process does.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  # Ctrl-C reaches the terminal's whole process group: the trainer saves first (preemption.py).
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # pylint: disable=protected-access  # no clean-up left to do: the run is over

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def release_shared_memory() -> None:
  """Unlinks the shared-memory blocks of every batch no longer referenced, before returning.

  Call after closing the iterators and dropping their batches, before the process exits.
  grain unlinks a dropped batch's blocks on a background thread pool
  (`SharedMemoryArray.enable_async_del`), and at interpreter exit multiprocessing terminates
  that pool and discards its pending requests: blocks dropped just before the exit would stay
  in /dev/shm until Python's resource tracker removes them and reports them as leaked
  (google/grain#398; under load, one preempted run in about twenty). Collects unreachable
  batches (grain's iterators hold them in reference cycles), then waits for the pool.
  """
  gc.collect()
  # Private to grain: there is no public way to wait for the pool. grain starts it with one
  # thread, so requests run in order and a no-op submitted last returns after all of them.
  # Runs in the loop's `finally`: a grain that moved or stopped the pool must not replace the
  # run's own outcome with an ImportError (the blocks are then the resource tracker's again).
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=protected-access
    pool = shared_memory_array.SharedMemoryArray._del_thread_pool
    if pool is not None:
      pool.apply(int)
  except (ImportError, AttributeError, ValueError) as e:  # ValueError: the pool has stopped
    logging.getLogger(__name__).debug("grain's shared-memory deletion pool not awaited: %r", e)


def _ensure_absl_flags_parsed() -> None:
  """Lets grain read its absl flags when the program did not parse flags (tests, notebooks).

  grain's `mp_prefetch` reads flags such as --grain_enable_multiprocess_worker_profiling and
  fails with UnparsedFlagAccessError otherwise; under `absl.app.run` (mim_jax.main) flags are
  already parsed and this does nothing.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _normalizer(data_cfg, channels: int) -> transforms.Normalizer:
  return transforms.Normalizer(tuple(float(m) for m in data_cfg.mean),
                               tuple(float(s) for s in data_cfg.std), channels)


def _decoder(data_cfg, channels: int) -> transforms.DecodeImage:
  return transforms.DecodeImage(channels=channels, on_bad_image=data_cfg.on_bad_image,
                                skip_log_dir=bad_images.log_directory())


class _EachEpochTrimmed(grain.MapDataset):
  """An infinite stream of `epoch_length`-element epochs with only the first `keep` of each.

  Equal shards drop an epoch's last `epoch_length - keep` (< process_count) elements; taken
  from each reshuffled epoch, they are other examples each epoch (cutting the source before the
  shuffle dropped the split's last files every epoch: never seen).
  """

  def __init__(self, parent: grain.MapDataset, *, epoch_length: int, keep: int):
    super().__init__(parent)
    self._epoch_length, self._keep = epoch_length, keep

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EachEpochTrimmed(keep={self._keep} of {self._epoch_length})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, offset = divmod(index, self._keep)
    return self._parent[epoch * self._epoch_length + offset]


def train_dataset(data_cfg, *, image_size: tuple[int, int], channels: int,
                  global_batch_size: int, seed: int, process_index: int | None = None,
                  process_count: int | None = None,
                  element_transforms: Sequence[grain.transforms.RandomMap] = (),
                  augment: grain.transforms.RandomMap | None = None) -> grain.IterDataset:
  """The training pipeline: grain IterDataset of {"image": f32 [B, H, W, C], "label": i32 [B]}
  (a method's own `augment` makes its own keys, e.g. iBOT's uint8 multi-crop views).

  Reads `data.split`, restricted to the per-class subset when data.label_fraction < 1 (see
  `sources.build_train_source`). `element_transforms` are a method's own per-example random
  steps after augmentation (e.g. `transforms.AddTokenMask`), each with its own seed stream.
  `augment` replaces the default RandomResizedCrop + flip (`transforms.TrainAugment`), e.g.
  with a method's multi-crop views; it keeps the augmentation's seed stream.
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  local_batch = local_batch_size(global_batch_size, process_count)
  image_size = tuple(int(s) for s in image_size)

  # The subset is taken from the whole source before sharding, so all hosts share one subset.
  source = sources.build_train_source(data_cfg, image_size=image_size, channels=channels)
  # Equal shards (dropping < process_count examples) keep every host's epoch the same length.
  per_host = len(source) // process_count
  if per_host == 0:
    raise ValueError(f"{source!r} has {len(source)} examples, fewer than the {process_count} "
                     "processes sharing it")
  shuffle_seed, augment_seed = _derive_seeds(seed, process_index)
  # One permutation of the whole split per epoch, then every process_count-th element: each
  # host a disjoint share of each epoch, mixing all of the split. (Sharding first and shuffling
  # each shard with the same seed made a global batch groups of process_count neighbouring
  # rows: a few classes per batch in a class-sorted image folder.)
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()  # reshuffled/epoch
  if per_host * process_count < len(source):
    ds = _EachEpochTrimmed(ds, epoch_length=len(source), keep=per_host * process_count)
  ds = ds[process_index::process_count]
  ds = ds.map(_decoder(data_cfg, channels))
  if augment is None and data_cfg.get("augment_on", "host") == "device":
    augment = transforms.DeviceAugmentDraws(
        crop_scale=tuple(float(s) for s in data_cfg.crop_scale),
        crop_ratio=tuple(float(r) for r in data_cfg.crop_ratio),
        hflip=bool(data_cfg.hflip), source_size=source_image_size(source, data_cfg, channels),
        channels=channels)
  if augment is None:
    augment = transforms.TrainAugment(
        image_size=image_size,
        crop_scale=tuple(float(s) for s in data_cfg.crop_scale),
        crop_ratio=tuple(float(r) for r in data_cfg.crop_ratio),
        hflip=bool(data_cfg.hflip),
        normalize=_normalizer(data_cfg, channels),
        rand_augment=(rand_augment.RandAugment.parse(data_cfg.rand_augment)
                      if data_cfg.get("rand_augment", "") else None),
        erasing=float(data_cfg.get("random_erasing", 0.0)))
  ds = ds.random_map(augment, seed=augment_seed)
  for i, transform in enumerate(element_transforms):
    ds = ds.random_map(transform, seed=_derive_seeds(seed, process_index, stream=2 + i)[1])

  num_workers = int(data_cfg.num_workers)
  # Batches are cut by stream position here, before workers split the stream, so that their
  # contents do not depend on the worker count; invalid rows are removed after the workers.
  ds = ds.batch(local_batch, drop_remainder=True)
  # As many batches read ahead as threads (at least 16 examples): more would only hold memory.
  it_ds = ds.to_iter_dataset(_read_options(num_workers, max(1, 16 // local_batch)))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=int(data_cfg.prefetch_buffer_size)),
        worker_init_fn=init_worker)
  it_ds = it_ds.map(transforms.DropInvalidRows(MAX_BAD_IMAGE_FRACTION, epoch_size=per_host,
                                               source=repr(source)))
  it_ds = it_ds.filter(transforms.NonEmptyBatch())
  # An emptied batch is expected (all its images bad) and DropInvalidRows bounds how many
  # there can be, so grain's warning about filtered-out elements would only mislead.
  it_ds = grain.experimental.WithOptionsIterDataset(
      it_ds, grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None))
  return grain.experimental.RebatchIterDataset(it_ds, local_batch, drop_remainder=True)


def source_image_size(source, data_cfg, channels: int) -> tuple[int, int]:
  """The (height, width) every image of a fixed-size source has (its first decoded one)."""
  first = _decoder(data_cfg, channels).map(source[0])["image"]
  if first is None:
    raise ValueError(f"the first image of {source!r} cannot be decoded")
  return tuple(int(s) for s in first.shape[:2])


def make_train_iterator(data_cfg, *, image_size: tuple[int, int], channels: int,
                        global_batch_size: int, seed: int, process_index: int | None = None,
                        process_count: int | None = None,
                        element_transforms: Sequence[grain.transforms.RandomMap] = (),
                        augment: grain.transforms.RandomMap | None = None
                        ) -> grain.DatasetIterator:
  """An infinite iterator of this host's batches {"image": float32 [B, H, W, C] normalised,
  "label": int32 [B]} (the source's class labels; 0 for a source without labels); a method's
  own `augment` sets its own keys and dtypes (iBOT: uint8 views, normalised in its step).

  B = global_batch_size // process_count. With data.label_fraction < 1 only the per-class
  subset of the training split is read (`num_examples` gives its size). Deterministic for
  (config, seed, host), whatever data.num_workers; `get_state()` / `set_state()` (or
  `iterator_save_args` / `iterator_restore_args` with Orbax) resume it exactly. Call `close()`
  when done to stop worker processes early. The grain pipeline only: callers go through
  `mim_jax.data.make_train_iterator` (data/train_iterator.py), which also honours
  data.device_resident.
  """
  return iter(train_dataset(data_cfg, image_size=image_size, channels=channels,
                            global_batch_size=global_batch_size, seed=seed,
                            process_index=process_index, process_count=process_count,
                            element_transforms=element_transforms, augment=augment))


def eval_dataset(data_cfg, *, image_size: tuple[int, int], channels: int, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 split: str | None = None, rows: np.ndarray | None = None) -> grain.IterDataset:
  """One pass over this host's shard, in source order, padded to whole batches.

  Reads `split` (e.g. data.eval_split for test-set evaluation) or, when None, data.split (the
  training split, e.g. for k-NN features): the whole split, or only its `rows` (int [M],
  positions in the split, read in that order; e.g. `sources.train_indices`, so that a
  low-label probe decodes its labelled subset, not every training image). data.label_fraction
  itself does not apply. Image folders: a split other than data.split is data.eval_path.

  Every host yields ceil(ceil(N / process_count) / batch_size) batches (the same count on all
  hosts, so a jitted eval step runs in lockstep); rows past the shard's end, and images that
  failed to decode with on_bad_image="skip", have mask=False, label=-1 and a zero image.
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size} must be positive")
  image_size = tuple(int(s) for s in image_size)
  source = sources.build_source(data_cfg, image_size=image_size, channels=channels,
                                split=split)
  if rows is not None:
    source = subsets.SubsetSource(source, rows, source.labels())
  shard = grain.MapDataset.source(source)[process_index::process_count]
  num_batches = math.ceil(math.ceil(len(source) / process_count) / batch_size)
  num_padding = num_batches * batch_size - len(shard)
  if num_batches == 0:  # an empty split or `rows`: no batches
    return grain.MapDataset.source([]).to_iter_dataset()

  crop_fraction = eval_crop_fraction(data_cfg, image_size)
  parts = []
  if len(shard):
    parts.append(shard.map(_decoder(data_cfg, channels)).map(transforms.EvalPreprocess(
        image_size=image_size, crop_fraction=crop_fraction,
        normalize=_normalizer(data_cfg, channels))))
  if num_padding:
    parts.append(grain.MapDataset.range(num_padding).map(
        transforms.EvalPadding(image_size=image_size, channels=channels)))
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  # In-process threads only: evaluation is one pass, and worker start-up (seconds) would
  # dominate the common case of reading a few batches (e.g. reconstruction pictures). Batched
  # before the read-ahead, so that each thread fills a whole batch: per image, grain's
  # iterator costs more Python than Fashion-MNIST's decode (its prefetch scans the whole
  # read-ahead buffer on every element), and a one-pass read of the 10,000 test images
  # took 3.1 s that way at batch 256 against 1.5 s batched first. The read-ahead is one batch
  # per thread (at most 8 in flight, about 1.2 GB for 224-px ImageNet batches of 256).
  return ds.batch(batch_size, drop_remainder=False).to_iter_dataset(
      _read_options(0, read_ahead=1))


def make_eval_iterator(data_cfg, *, image_size: tuple[int, int], channels: int,
                       batch_size: int, process_index: int | None = None,
                       process_count: int | None = None, split: str | None = None,
                       rows: np.ndarray | None = None) -> grain.DatasetIterator:
  """One pass of {"image": float32 [B, H, W, C], "label": int32 [B], "mask": bool [B]}.

  `split`: the split to read (callers pass split=data_cfg.eval_split for test-set evaluation);
  None reads data.split. `rows`: only these positions of the split, in that order (None: all).
  Never restricted by data.label_fraction itself.

  No shuffling, no random augmentation: resize + centre crop (crop fraction 0.875 for
  image_folder / tfds photos, the whole image for fashion_mnist / synthetic; nothing at all when
  an image already has `image_size`). See `eval_dataset` for padding and sharding.
  """
  return iter(eval_dataset(data_cfg, image_size=image_size, channels=channels,
                           batch_size=batch_size, process_index=process_index,
                           process_count=process_count, split=split, rows=rows))
