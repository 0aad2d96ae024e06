"""How much of its codebook a trained tokenizer uses on a whole dataset split.

  python -m mim_jax.tokenizers.usage --config=configs/beit_tokenizer_fmnist.py \
      --tokenizer=WORKDIR [--split=test]

Tokenizes every image of the split (the evaluation split by default; centre view, no
augmentation) and prints one JSON line: how many of the vocabulary's codes occur
(`codes_used`, `usage` = codes_used / vocab_size) and the perplexity exp(H) of the code
frequencies over all tokens. The training metrics report the same per batch; a whole split
shows whether the codes a BEiT model learns to predict cover the data.

The config names the images (its `data` block: source, path, splits); their size, channels
and normalisation are the tokenizer's, as a BEiT run reading it must have them. A command-line
override the tool would not act on (outside the data fields that name the images: the
augmentation, the label subset, data.mean / data.std, ...; data.eval_split beside --split) is
refused.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mim_jax import data
from mim_jax.config import files, validation
from mim_jax.config.errors import ConfigError, config_error, refuse_extra_arguments
from mim_jax.data import sources
from mim_jax.tokenizers import codebook as cb
from mim_jax.tokenizers import io
from mim_jax.tokenizers.models import tokenize, tokenizer_model
from mim_jax.training.run_errors import EXIT_BAD_INPUT


def code_usage(path: str, data_cfg, *, split: str, batch_size: int = 500,
               field: str = "tokenizer.path") -> dict:
  """Counts the codes of tokenizer `path` over `split` of `data_cfg`: a dict with vocab_size,
  tokens, codes_used, usage and perplexity. Images are read at the tokenizer's size and
  channels and normalised with its mean and std (not data_cfg's: codes of images normalised
  otherwise would count codes the tokenizer never gives its BEiT run). Errors name `field`
  for the path (a tool passes its flag, "--tokenizer")."""
  info = io.read_info(path, field)  # the geometry the data is checked at; weights below
  if "mean" not in info or "std" not in info:
    raise ConfigError(f"the tokenizer at {path} records no normalisation (mean and std) in its "
                      f"{io.INFO_FILE}: export it with mim_jax, which writes them")
  data_cfg = copy.deepcopy(data_cfg)
  data_cfg.mean, data_cfg.std = tuple(info["mean"]), tuple(info["std"])
  if split == data.HOLDOUT_SPLIT and not data_cfg.holdout:  # read as no images: tokens=0
    raise ConfigError(f"split {split!r} is the training images data.holdout holds out, and "
                      "config.data.holdout is 0: set it (e.g. 5000), or read another split")
  # The checks training makes before it reads (a missing folder or file, a split name the
  # source lacks) with `split` as the evaluation split, unless it is the training split
  # (which an evaluation may not read, this tool may).
  if split != data_cfg.split:
    data_cfg.eval_split = split
  data.validate_data_config(data_cfg, image_size=tuple(info["image_size"]),
                            channels=int(info["channels"]),
                            scores_eval_split=split != data_cfg.split, scores_labels=False)
  tokenizer, _ = io.load_tokenizer(path, field)
  model = tokenizer_model(info)
  kind, l2 = info["kind"], bool(info.get("l2_normalize", False))
  vocab = int(info["vocab_size"])

  @jax.jit
  def batch_counts(images, valid):
    codes = tokenize(model, tokenizer, images, l2, kind)  # [B, N]
    weights = jnp.broadcast_to(valid[:, None], codes.shape)  # padding rows count 0
    return cb.code_counts(codes, vocab, weights)

  # Summed on the host in int64: float32 counts stop being exact past 2^24 tokens.
  counts = np.zeros(vocab, np.int64)
  for batch in data.make_eval_iterator(data_cfg, image_size=tuple(info["image_size"]),
                                       channels=int(info["channels"]), batch_size=batch_size,
                                       split=split, process_index=0, process_count=1):
    counts += np.asarray(batch_counts(jnp.asarray(batch["image"]),
                                      jnp.asarray(batch["mask"]))).astype(np.int64)
  usage, perplexity = cb.usage_and_perplexity_of_counts(counts)
  used = int((counts > 0).sum())
  return {"vocab_size": vocab, "tokens": int(counts.sum()), "codes_used": used,
          "usage": float(usage), "perplexity": float(perplexity)}


def refuse_unread_overrides(config, file_config, overridden, split_flag: str = "") -> None:
  """Raises ConfigError for a `--config.FIELD` the tool would not act on: it reads the data
  fields that name a split's images (`sources.IMAGE_FIELDS`, the evaluation split) and every
  image of the split whole, at the tokenizer's own size, channels and normalisation; nor a
  field made moot by those beside it, nor data.eval_split beside another `split_flag`
  (--split names the split read). `overridden`: {dotted field: value} of the command line."""
  read = tuple(f"data.{f}" for f in (*sources.IMAGE_FIELDS, "eval_split", "eval_path"))
  validation.refuse_overrides_a_tool_ignores(
      config, file_config, overridden, read=read, tool="mim_jax.tokenizers.usage",
      reads="every image of a split the config's data source, path, split and holdout fields "
      "name, whole, at the tokenizer's image size and channels and with its normalisation")
  if split_flag and overridden.get("data.eval_split", split_flag) != split_flag:
    raise config_error("--split", split_flag, "left out beside --config.data.eval_split="
                       f"{overridden['data.eval_split']!r}: --split names the split read, and "
                       "the evaluation split would go unread")


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS,
                 argv: Sequence[str] | None = None) -> None:
  """The tool's flags, on `flag_values` (`argv`: the command line whose `--config.FIELD`
  overrides they take; None: sys.argv). Defined by `main`, not at import, so that importing
  `code_usage` next to mim_jax.main (which has its own --config) in one process does not
  clash."""
  config_flags.DEFINE_config_file("config", None, "a config naming the data to read",
                                  flag_values=flag_values,
                                  sys_argv=None if argv is None else list(argv))
  flags.DEFINE_string("tokenizer", None, "a tokenizer directory or its training workdir",
                      flag_values=flag_values)
  flags.DEFINE_string("split", "", "the split to read ('': the evaluation split)",
                      flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 500, "images per tokenizer call", flag_values=flag_values)
  flags.mark_flags_as_required(["config", "tokenizer"], flag_values=flag_values)


def run(argv) -> None:
  """The tool on the parsed FLAGS: refuses a bad command line (one line on stderr, exit 2,
  before the tokenizer or any image is read), then prints the usage as one JSON line."""
  refuse_extra_arguments(argv)
  config = FLAGS.config
  split_flag, batch = FLAGS.split, FLAGS.batch_size
  split = split_flag or data.eval_split(config.data)
  try:
    refuse_unread_overrides(config, files.load_config_file(FLAGS["config"].config_filename),
                            config_flags.get_override_values(FLAGS["config"]), split_flag)
    if batch <= 0:
      raise config_error("--batch_size", batch, "a positive number of images per tokenizer call")
    if split_flag and config.data.source == "synthetic" and split_flag != data.HOLDOUT_SPLIT:
      raise config_error("--split", split_flag, "left out, or 'holdout' (training images held "
                         "out by data.holdout): data.source='synthetic' has the same images "
                         "for every split")
    out = code_usage(FLAGS.tokenizer, config.data, split=split, batch_size=batch,
                     field="--tokenizer")
  except (ConfigError, data.IdxFormatError, data.BadImageError) as e:
    # Bad input, reported as the trainer reports it: one line and exit 2, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  print(json.dumps({"tokenizer": FLAGS.tokenizer, "split": split, **out}))


def main() -> None:
  define_flags()
  from mim_jax import main as trainer  # its parser: unknown --config fields named, no traceback
  app.run(run, flags_parser=trainer.parse_flags)


if __name__ == "__main__":
  main()
