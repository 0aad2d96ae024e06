"""The input pipeline: sources, augmentation and deterministic, resumable grain iterators.

  validate_data_config(data_cfg, *, image_size, channels)            cheap config checks
  build_source(data_cfg, *, image_size, channels)                    raw random-access source
  num_examples(data_cfg, *, image_size, channels)                    len of the whole source
  make_train_iterator(data_cfg, *, image_size, channels, global_batch_size, seed,
                      process_index=None, process_count=None)        {"image": f32 [B,H,W,C]}
  make_eval_iterator(data_cfg, *, image_size, channels, batch_size,
                     process_index=None, process_count=None)         + "label", "mask"
  iterator_save_args(it) / iterator_restore_args(it)                 Orbax composite items
  num_skipped_images() / skipped_images()                            bad images dropped so far

`data_cfg` is `config.data` (see `config_defaults.base_config`).
"""

from mim_jax.data.bad_images import num_skipped_images, reset_skipped_images, skipped_images
from mim_jax.data.checkpointing import (ITERATOR_HANDLER, ITERATOR_HANDLER_NAME,
                                        iterator_restore_args, iterator_save_args)
from mim_jax.data.idx import IdxFormatError, parse_idx, read_idx
from mim_jax.data.pipeline import (eval_dataset, make_eval_iterator, make_train_iterator,
                                   train_dataset)
from mim_jax.data.sources import SOURCES, build_source, num_examples
from mim_jax.data.transforms import BadImageError
from mim_jax.data.validation import validate_data_config

__all__ = [
    "BadImageError", "ITERATOR_HANDLER", "ITERATOR_HANDLER_NAME", "IdxFormatError", "SOURCES",
    "build_source", "eval_dataset", "iterator_restore_args", "iterator_save_args",
    "make_eval_iterator", "make_train_iterator", "num_examples", "num_skipped_images",
    "parse_idx", "read_idx", "reset_skipped_images", "skipped_images", "train_dataset",
    "validate_data_config",
]
