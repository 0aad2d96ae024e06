"""The one place that chooses the training iterator: grain, or the split held on the devices.

Kept apart from data/pipeline.py and data/device_resident.py because it needs both, and
device_resident builds on pipeline (decoding, per-host shards): importing the chooser from
either would make the two import each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain

from mim_jax.config.errors import config_error
from mim_jax.data import device_resident, pipeline


def make_train_iterator(data_cfg, *, image_size: tuple[int, int], channels: int,
                        global_batch_size: int, seed: int, process_index: int | None = None,
                        process_count: int | None = None,
                        element_transforms: Sequence[grain.transforms.RandomMap] = (),
                        augment: grain.transforms.RandomMap | None = None,
                        batch_sharding=None, batch_extras: Callable | None = None):
  """An infinite iterator of this host's batches {"image": [B, H, W, C], "label": int32 [B]}.

  Without data.device_resident: the grain pipeline (`pipeline.make_train_iterator`), float32
  normalised images (a method's own `augment` may ship uint8, as iBOT's views), per-image
  `element_transforms` (a method's host-drawn masks) and a method's own `augment`. With
  data.device_resident the split is held on the devices of `batch_sharding` instead
  (data/device_resident.py): per-batch `batch_extras(n, rng)` (`Method.example_extras`) take the
  place of the per-image `element_transforms`, and a method's own `augment` cannot run there
  (refused with the field). Both resume exactly through `iterator_save_args` /
  `iterator_restore_args`.
  """
  if not data_cfg.get("device_resident", False):
    return pipeline.make_train_iterator(
        data_cfg, image_size=image_size, channels=channels,
        global_batch_size=global_batch_size, seed=seed, process_index=process_index,
        process_count=process_count, element_transforms=element_transforms, augment=augment)
  if augment is not None:
    raise config_error("data.device_resident", True,
                       "False with a method's own augmentation (e.g. multi-crop views), "
                       "which runs in the grain pipeline")
  if element_transforms and batch_extras is None:
    raise ValueError("data.device_resident: per-image element_transforms cannot run on the "
                     "split held on the devices; pass their per-batch form as batch_extras "
                     "(Method.example_extras)")
  if batch_sharding is None:
    raise ValueError("data.device_resident: make_train_iterator needs the batch's sharding "
                     "(batch_sharding) to place the split and its batches")
  return device_resident.make_train_iterator(
      data_cfg, image_size=image_size, channels=channels,
      global_batch_size=global_batch_size, seed=seed, batch_sharding=batch_sharding,
      batch_extras=batch_extras, process_index=process_index, process_count=process_count)
