"""The input pipeline: sources, augmentation and deterministic, resumable grain iterators.

  validate_data_config(data_cfg, *, image_size, channels)            cheap config checks
  check_workdir_outside_images(data_cfg, workdir)                    no workdir in the images
  build_source(data_cfg, *, image_size, channels)                    raw random-access source
  build_train_source(data_cfg, *, image_size, channels)              + the label subset
  num_examples(data_cfg, *, image_size, channels, split=None)        examples per epoch
  num_classes(data_cfg)                                              classes of the source
  per_class_subset(labels, fraction, seed)                           sorted kept indices
  make_train_iterator(data_cfg, *, image_size, channels, global_batch_size, seed,
                      process_index=None, process_count=None)        {"image": f32 [B,H,W,C],
                                                                      "label": i32 [B]}
  make_eval_iterator(data_cfg, *, image_size, channels, batch_size,
                     process_index=None, process_count=None,
                     split=None, rows=None)                          + "mask": bool [B]
  make_train_iterator(..., batch_sharding=, batch_extras=) with data.device_resident: the
                      split held on the devices (small datasets, data/device_resident.py;
                      the choice is made in data/train_iterator.py)
  check_saved_position(position, resident=)                          resume with the iterator
                                                                     that wrote the position
  iterator_save_args(it) / iterator_restore_args(it)                 Orbax composite items
  num_skipped_images() / skipped_images()                            bad images dropped so far
  release_shared_memory()                                            unlink dropped batches'
                                                                     blocks before exit

`data_cfg` is `config.data` (see `config.defaults.core_fields`).

Labels are the source's class labels (0 for a source without labels, e.g. a flat image
folder). Training reads `data.split`; with `data.label_fraction` < 1 only a per-class subset of
it, chosen by `data.subset_seed` before per-host sharding (`num_examples` then counts the
subset). Evaluation reads `data.split` or the `split` passed (callers pass
`split=eval_split(data_cfg)` for test-set metrics) and never a subset. Image folders have no
named splits: `data.path` is the training split and `data.eval_path` the evaluation one.
"""

from mim_jax.data.bad_images import (
                                        num_skipped_images,
                                        reset_skipped_images,
                                        skipped_images,
)
from mim_jax.data.checkpointing import (
                                        ITERATOR_HANDLER,
                                        ITERATOR_HANDLER_NAME,
                                        iterator_restore_args,
                                        iterator_save_args,
)
from mim_jax.data.device_resident import check_saved_position
from mim_jax.data.idx import IdxFormatError, parse_idx, read_idx
from mim_jax.data.pipeline import (
                                        eval_dataset,
                                        make_eval_iterator,
                                        release_shared_memory,
                                        train_dataset,
)
from mim_jax.data.sources import (
                                        HOLDOUT_SPLIT,
                                        SOURCES,
                                        build_source,
                                        build_train_source,
                                        eval_split,
                                        num_classes,
                                        num_examples,
)
from mim_jax.data.subsets import SubsetSource, per_class_subset
from mim_jax.data.train_iterator import make_train_iterator
from mim_jax.data.transforms import AddTokenMask, BadImageError
from mim_jax.data.validation import check_workdir_outside_images, validate_data_config

__all__ = [
    "AddTokenMask",
    "BadImageError", "HOLDOUT_SPLIT", "ITERATOR_HANDLER", "ITERATOR_HANDLER_NAME",
    "IdxFormatError", "SOURCES",
    "SubsetSource", "build_source", "build_train_source", "check_saved_position",
    "check_workdir_outside_images",
    "eval_dataset", "eval_split",
    "iterator_restore_args", "iterator_save_args", "make_eval_iterator", "make_train_iterator",
    "num_classes", "num_examples", "num_skipped_images", "parse_idx", "per_class_subset",
    "read_idx", "release_shared_memory", "reset_skipped_images", "skipped_images",
    "train_dataset", "validate_data_config",
]
