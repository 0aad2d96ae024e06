"""Tokenizer files: the export a tokenizer run writes and BEiT reads (`config.tokenizer.path`).

Layout of an export directory (a finished tokenizer run writes WORKDIR/tokenizer/):
  tokenizer.json   what the tokenizer is, e.g.
                   {"format": "mim_jax.tokenizer/1", "kind": "vq", "architecture": "conv",
                    "vocab_size": 512, "code_dim": 32, "l2_normalize": true,
                    "image_size": [28, 28], "patch_size": 4, "grid": [7, 7], "channels": 1,
                    "mean": [0.286], "std": [0.353], "width": 64, "num_blocks": 2}
  weights/         an Orbax StandardCheckpoint (TensorStore) of {"params": the ConvTokenizer
                   parameters (tokenizers.models), "codebook": float32 [vocab_size, code_dim]}
For kind "dvae" the encoder's last layer gives logits over the vocabulary, the code of a
patch is their argmax and "codebook" is the dVAE's table of code vectors; for kind "vq" the
code is the nearest codebook entry to the (l2-normalised with "l2_normalize") encoder output.
A tokenizer trained elsewhere loads when it is written in this layout: its network must be
`tokenizers.models.ConvTokenizer` with the JSON's sizes, its images normalised with the
JSON's mean and std. `config.tokenizer.path` may name the export directory or a tokenizer
run's workdir.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mim_jax import storage
from mim_jax.config.errors import ConfigError, config_error
from mim_jax.training import checkpoint

EXPORT_DIR = "tokenizer"
INFO_FILE = "tokenizer.json"
WEIGHTS_DIR = "weights"
FORMAT = "mim_jax.tokenizer/1"
KINDS = ("vq", "dvae")


def train_hint(field: str = "tokenizer.path") -> str:
  """How to get a tokenizer, ending with the flag that takes it: `field` as it is when a tool's
  flag ("--tokenizer"), else the config field's override."""
  flag = field if field.startswith("--") else f"--config.{field}"
  return ("Train a tokenizer first: python -m mim_jax.main "
          "--config=configs/beit_tokenizer_fmnist.py --workdir=DIR "
          "(configs/beit_tokenizer_imagenet.py for ImageNet, same image size, patch size and "
          f"vocabulary as the BEiT config), then pass {flag}=DIR (the workdir or its "
          "tokenizer/ export directory).")


def export_tokenizer(directory: str, params: Any, codebook: Any, info: dict) -> str:
  """Writes `directory`/weights and `directory`/tokenizer.json (see the module docstring).

  Collective in a multi-process run (every process calls it with the same host values).
  """
  directory = storage.absolute(directory)
  storage.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, WEIGHTS_DIR),
                    {"params": params, "codebook": np.asarray(codebook, np.float32)}, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    storage.write_text(os.path.join(directory, INFO_FILE),
                       json.dumps({"format": FORMAT, **info}, indent=2))
  return directory


def tokenizer_directory(path: str, field: str = "tokenizer.path") -> str:
  """The export directory `path` names (a tokenizer workdir or the export itself), else a
  ConfigError on `field` that says how to get one."""
  if not isinstance(path, str) or not path:
    raise config_error(field, path, "the path of a trained tokenizer (BEiT predicts "
                       "its codes)", train_hint(field))
  if not storage.exists(path):
    raise config_error(field, path, "an existing tokenizer workdir or export "
                       "directory; nothing exists there", train_hint(field))
  for candidate in (os.path.join(path, EXPORT_DIR), path):
    if storage.isfile(os.path.join(candidate, INFO_FILE)):
      return candidate
  raise config_error(
      field, path,
      f"a tokenizer workdir whose run finished (it holds {EXPORT_DIR}/{INFO_FILE}) or a "
      f"tokenizer export directory (holding {INFO_FILE} and {WEIGHTS_DIR}/); this is not a "
      "tokenizer", train_hint(field))


def read_info(path: str, field: str = "tokenizer.path") -> dict:
  """The tokenizer.json of the tokenizer `path` names (errors name the config's `field`)."""
  directory = tokenizer_directory(path, field)
  try:
    info = json.loads(storage.read_text(os.path.join(directory, INFO_FILE)))
  except (OSError, ValueError) as e:
    raise config_error(field, path, f"a readable {INFO_FILE} ({e})", train_hint(field))
  if not isinstance(info, dict) or info.get("format") != FORMAT:
    raise config_error(field, path,
                       f"a tokenizer export of format {FORMAT!r}; its {INFO_FILE} says "
                       f"{info.get('format') if isinstance(info, dict) else info!r}",
                       train_hint(field))
  return info


def load_tokenizer(path: str, field: str = "tokenizer.path") -> tuple[dict, dict]:
  """({"params", "codebook"} as numpy arrays, info) of the tokenizer `path` names (errors name
  `field`: the config's, or a tool's flag such as "--tokenizer")."""
  directory = tokenizer_directory(path, field)
  info = read_info(directory, field)
  weights = os.path.join(directory, WEIGHTS_DIR)
  if not storage.isdir(weights):  # e.g. only the tokenizer.json was copied
    raise config_error(field, path, f"a tokenizer export holding its {WEIGHTS_DIR}/ beside "
                       f"{INFO_FILE}; {weights} does not exist", train_hint(field))
  try:
    return checkpoint.restore_on_host(weights), info
  except (OSError, ValueError) as e:  # a truncated or foreign checkpoint
    raise config_error(field, path, f"a tokenizer export whose {WEIGHTS_DIR}/ Orbax can "
                       f"read ({type(e).__name__}: {str(e)[:300]})", train_hint(field)) from e


def check_matches(path: str, *, vocab_size: int, image_size: tuple[int, int], patch_size: int,
                  channels: int, mean, std, variant: str = "", prefix: str = "tokenizer") -> dict:
  """The info of the tokenizer at `path` after checking that it fits the BEiT config: its
  kind, vocabulary, image size, patch grid, channels and normalisation. Raises ConfigError
  naming the config's fields (the tokenizer's under `prefix`)."""
  info = read_info(path, f"{prefix}.path")
  where = f"the tokenizer at {tokenizer_directory(path)}"

  def require(ok, field, value, allowed):
    if not ok:
      raise config_error(field, value, allowed, f"Point config.{prefix}.path to a tokenizer "
                         f"trained for this config, or train one. {train_hint(prefix + '.path')}")

  require(info.get("kind") in KINDS, f"{prefix}.path", path,
          f"a tokenizer of kind {KINDS}; {where} has kind {info.get('kind')!r}")
  require(info.get("vocab_size") == vocab_size, f"{prefix}.vocab_size", vocab_size,
          f"the vocabulary size {info.get('vocab_size')} of {where}")
  require(tuple(info.get("image_size", ())) == tuple(image_size), "image_size",
          tuple(image_size), f"the image size {tuple(info.get('image_size', ()))} of {where}")
  require(info.get("patch_size") == patch_size, "model.variant", variant or patch_size,
          f"a patch size of {info.get('patch_size')}, the tokenizer's, not {patch_size} ({where} "
          f"gives one code per patch: grid "
          f"{info.get('grid')})")
  require(info.get("channels") == channels, "channels", channels,
          f"the {info.get('channels')} channels of {where}")
  same = lambda a, b: len(a) == len(b) and np.allclose(a, b, atol=1e-6)
  require(same(list(info.get("mean", ())), list(mean)) and same(list(info.get("std", ())),
                                                                 list(std)),
          "data.mean", (tuple(mean), tuple(std)),
          f"the normalisation (mean, std) = ({info.get('mean')}, {info.get('std')}) {where} "
          "was trained with")
  return info


__all__ = ["ConfigError", "check_matches", "export_tokenizer", "load_tokenizer", "read_info",
           "tokenizer_directory"]
