r"""Per-channel mean and std of a data source, printed as the config overrides that use them.

  python -m mim_jax.data.stats --config=configs/mae_fmnist.py \
      [--config.data.source=npy --config.data.path=/data/bands --config.channels=5] \
      [--max_images=0]

The training split the config names is read as training reads it (without the `data.holdout`
examples, only the `data.label_fraction` subset when below 1; same decoder: 8-bit images
in [0, 1] as x / 255, 16-bit images as a fraction of 65535, floats as they are; other
integer types are refused) but without augmentation, every image whole (`--max_images` > 0: the
first that many). Sums are accumulated in float64 over all pixels; std is the population std.
Prints one line, e.g.

  --config.data.mean='(0.286,)' --config.data.std='(0.353,)'

A channel with the same value in every pixel read is an error (the trainer refuses a std of 0),
as is a `--config` override this command would not read (the evaluation split, augmentation,
the host pipeline's settings, image_size of stored images).
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mim_jax.config import files, validation
from mim_jax.config.errors import ConfigError, config_error, refuse_extra_arguments
from mim_jax.data import bad_images, sources
from mim_jax.data.idx import IdxFormatError
from mim_jax.data.transforms import BadImageError, DecodeImage
from mim_jax.data.validation import validate_data_config
from mim_jax.training.run_errors import EXIT_BAD_INPUT

FLAGS = flags.FLAGS


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "A config file naming the data source.",
                                  lock_config=True)
  flags.DEFINE_integer("max_images", 0, "Read only the first this many images (0: all).")
  flags.mark_flags_as_required(["config"])


def channel_stats(data_cfg, *, image_size: tuple[int, int], channels: int,
                  max_images: int = 0) -> tuple[np.ndarray, ...]:
  """(mean [C], std [C], images used) of the training split of `data_cfg` as training reads
  it (`sources.build_train_source`: holdout and label subset applied), in [0, 1] units.
  `image_size` (the config's) matters where the source makes the images at the size asked
  (synthetic); stored images are read at their own size.

  An undecodable image is handled as training handles it (data.on_bad_image): "raise" stops
  with BadImageError, "skip" warns and leaves it out of the sums and the count."""
  source = sources.build_train_source(data_cfg, image_size=tuple(image_size), channels=channels)
  decode = DecodeImage(channels=channels, on_bad_image=data_cfg.on_bad_image,
                       skip_log_dir=bad_images.log_directory())
  read = len(source) if max_images <= 0 else min(max_images, len(source))
  total = np.zeros(channels, np.float64)
  total_sq = np.zeros(channels, np.float64)
  # A constant channel's std is 0, but E[x^2] - E[x]^2 over millions of pixels leaves a
  # rounding remainder (about 1e-7): whether a channel varies is read off its range instead.
  low, high = np.full(channels, np.inf), np.full(channels, -np.inf)
  pixels = count = 0
  for i in range(read):
    image = decode.map(source[i])["image"]  # uint8, or float32 already in [0, 1]
    if image is None:  # skipped (on_bad_image="skip"), warned by the decoder
      continue
    count += 1
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    flat = image.reshape(-1, channels).astype(np.float64) / scale
    total += flat.sum(axis=0)
    total_sq += np.square(flat).sum(axis=0)
    low, high = np.minimum(low, flat.min(axis=0)), np.maximum(high, flat.max(axis=0))
    pixels += flat.shape[0]
  if not pixels:
    raise BadImageError(f"none of the {read} images of {data_cfg.source} split "
                        f"{data_cfg.split!r} could be decoded")
  mean = total / pixels
  std = np.sqrt(np.maximum(total_sq / pixels - np.square(mean), 0.0))
  std[low == high] = 0.0
  return mean, std, count


def format_overrides(mean: np.ndarray, std: np.ndarray) -> str:
  """The overrides, each std to 4 significant digits (float data of a small range, 0.001 +-
  0.00002, printed a std of 0.0000 at 4 decimals) and each mean to a thousandth of its std at
  least (4 decimals at the least: 1000.123 +- 0.01 printed as 1000 is 12 std off)."""
  def number(x: float, decimals: int) -> str:
    text = f"{x:.{decimals}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text

  def decimals(s: float) -> int:
    return max(4, 3 - int(np.floor(np.log10(s)))) if s > 0 else 4

  tup = lambda parts: "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
  means = tup([number(m, decimals(s)) for m, s in zip(mean, std)])
  stds = tup([f"{s:.4g}" for s in std])
  return f"--config.data.mean='{means}' --config.data.std='{stds}'"


def refuse_unread_overrides(config, file_config, overridden) -> None:
  """ConfigError for a `--config.FIELD` this command would not act on: it reads the training
  images the data fields name (`sources.IMAGE_FIELDS`, the label subset), at the config's
  channels (and image_size, for synthetic images: stored ones are read at their own size),
  whole and without augmentation, and computes data.mean and data.std; nor a field made moot
  by those beside it. `overridden`: {dotted field: value} of the command line."""
  read = ("channels", "data.label_fraction", *(f"data.{f}" for f in sources.IMAGE_FIELDS),
          *(("image_size",) if config.data.source == "synthetic" else ()))
  validation.refuse_overrides_a_tool_ignores(
      config, file_config, overridden, read=read, tool="mim_jax.data.stats",
      reads="the training images the config's data source, path, split, subset and holdout "
      "fields name, whole and without augmentation, at its channels (image_size only for "
      "synthetic images), and computes data.mean and data.std")


def main(argv) -> None:
  refuse_extra_arguments(argv)
  config = FLAGS.config
  try:
    refuse_unread_overrides(config, files.load_config_file(FLAGS["config"].config_filename),
                            config_flags.get_override_values(FLAGS["config"]))
    if FLAGS.max_images < 0:
      raise config_error("--max_images", FLAGS.max_images, "an image count >= 0 (0: all)")
    # The checks training makes first (a missing folder or file is one line, not a traceback),
    # but for the normalisation this command computes: the config's may not fit the data yet.
    checked = config.data.copy_and_resolve_references()
    with checked.unlocked():
      checked.mean, checked.std = (0.0,), (1.0,)
    # No evaluation split is read: the training split alone is checked, whichever it is.
    validate_data_config(checked, image_size=tuple(config.image_size), channels=config.channels,
                         scores_eval_split=False)
    mean, std, count = channel_stats(config.data, image_size=config.image_size,
                                     channels=config.channels, max_images=FLAGS.max_images)
  except (BadImageError, ConfigError, IdxFormatError) as e:
    # Bad input, reported as the trainer reports it: one line and exit 2, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  flat = [int(c) for c in np.flatnonzero(std <= 0)]
  if flat:  # the trainer refuses a std of 0: say so here, not at the run's start
    print(f"error: channel(s) {flat} of the {count} images read have the same value in every "
          "pixel (std 0): data.std must be > 0; drop or fix those channels", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  print(f"{count} images of {config.data.source} split {config.data.split!r}, "
        f"{config.channels} channel(s):", file=sys.stderr)
  print(format_overrides(mean, std))


if __name__ == "__main__":
  _define_flags()
  from mim_jax import main as trainer  # its parser: unknown --config fields named, no traceback
  app.run(main, flags_parser=trainer.parse_flags)
