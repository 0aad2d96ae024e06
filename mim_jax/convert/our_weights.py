"""mim_jax weights wherever they live, and the Flax models that run them.

  read_weights(source)            (model info, params) of an export directory or a workdir
  read_info(source)               its model info alone (no arrays read)
  saved_parts(source)             its parts' array shapes and dtypes (no arrays read)
  array_leaves(tree)              (path, array) of every array of a parameter tree
  write_weights(directory, ...)   an export directory (what `--config.init_from` accepts)
  write_parts(directory, ...)     the same written in place, collectively (a run's own export)
  build_mae(info, params)         MaskedAutoencoder for params with a "decoder"
  build_classifier(info, params)  ViTClassifier for params with a "head"

An export directory is `checkpoint.export_encoder`'s layout (model.json + params/, the encoder)
plus, when the weights have them, Orbax sub-directories decoder/ (the MAE decoder, e.g. of an
official `*_full.pth`) and classifier/ ({"fc_norm", "head"} of a fine-tuned classifier: an
imported one, or a fine-tuning run's own export).
Evaluations read only the encoder part. `params` here are always one tree, shaped like the
model's: {"encoder", ["decoder"], ["fc_norm"], ["head"]}.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mim_jax import storage
from mim_jax.models.autoencoder import MaskedAutoencoder
from mim_jax.models.decoders import MAEDecoder
from mim_jax.models.heads import ViTClassifier
from mim_jax.models.vit import ViTEncoder, encoder_from_config
from mim_jax.training import checkpoint

DECODER_DIR, CLASSIFIER_DIR = "decoder", "classifier"
# What an export directory holds (checkpoint.export_encoder, write_parts).
EXPORT_ENTRIES = ("model.json", "params", DECODER_DIR, CLASSIFIER_DIR)
CLASSIFIER_PARTS = ("fc_norm", "head")


def _restore(path: str) -> Any:
  return checkpoint.restore_on_host(path)


def _save(path: str, tree: Any) -> None:
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(storage.absolute(path), tree, force=True)
  checkpointer.wait_until_finished()


def latest_step(checkpoint_dir: str) -> Optional[int]:
  """The newest finished step directory of an Orbax CheckpointManager folder (None if none).

  Locally an unfinished step has a temporary name; in Cloud Storage (no rename) it has its
  final name and is finished once Orbax has written its commit_success.txt.
  """
  if not storage.isdir(checkpoint_dir):
    return None

  def finished(name: str) -> bool:
    step_dir = os.path.join(checkpoint_dir, name)
    return storage.isdir(os.path.join(step_dir, "state")) and (
        not storage.is_url(checkpoint_dir)
        or storage.exists(os.path.join(step_dir, "commit_success.txt")))

  steps = [int(name) for name in storage.listdir(checkpoint_dir)
           if re.fullmatch(r"\d+", name) and finished(name)]
  return max(steps) if steps else None


def info_from_config(config: dict) -> dict:
  """A model.json (as `train._model_info` writes it) from a resolved config dict."""
  return {"method": config["method"], "variant": config["model"]["variant"],
          "image_size": list(config["image_size"]), "channels": config["channels"],
          "config": config}


def read_info(source: str) -> dict:
  """The model info (model.json) of what `read_weights(source)` reads, without the arrays."""
  if storage.isfile(os.path.join(source, "model.json")):
    return json.loads(storage.read_text(os.path.join(source, "model.json")))
  config_path = os.path.join(source, "config.json")
  if storage.isfile(config_path) and latest_step(os.path.join(source, "checkpoints")) is not None:
    return info_from_config(json.loads(storage.read_text(config_path)))
  if storage.isfile(os.path.join(source, "encoder", "model.json")):
    return read_info(os.path.join(source, "encoder"))
  raise FileNotFoundError(
      f"{source} is neither an export directory (model.json + params/) nor a training workdir "
      "(config.json + checkpoints/)")


RELEASED_FILE = "released_params.json"  # {"path": where the released params lie in the state}


def released_path(workdir: str) -> tuple[str, ...]:
  """Where in a workdir's checkpointed state its method's released params lie
  (`Method.released_path`, written by the loop); ("params",) for runs from before the file."""
  path = os.path.join(workdir, RELEASED_FILE)
  if not storage.isfile(path):
    return ("params",)
  return tuple(json.loads(storage.read_text(path))["path"])


def write_released_path(workdir: str, path: Sequence[str]) -> None:
  storage.write_text(os.path.join(workdir, RELEASED_FILE),
                     json.dumps({"path": list(path)}) + "\n")


def encoder_array_names(source: str) -> set[str]:
  """The paths (jax.tree_util.keystr, e.g. "['mask_token']") of the encoder arrays that
  `read_weights(source)` reads, from the checkpoint's metadata alone (no array is read)."""
  parts = saved_parts(source)[2]
  if "encoder" not in parts:
    raise ValueError(f"{source} holds no encoder (parts {sorted(parts)})")
  return {jax.tree_util.keystr(p) for p, _ in array_leaves(parts["encoder"])}


def array_leaves(tree: Any) -> list:
  """(path, leaf) of every array of `tree`, arrays or their metadata (shape, dtype)."""
  return jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda m: hasattr(m, "shape"))


def saved_parts(source: str, all_parts: bool = False) -> tuple[dict, str, dict]:
  """(model info, what `source` is, {part: its tree of array metadata (shape, dtype)}) of the
  weights `read_weights(source, all_parts=...)` reads, from the metadata alone (no array is
  read). FileNotFoundError when `source` is neither an export nor a training workdir with a
  checkpoint (nor one with an export); ValueError when it is one whose arrays' metadata is
  missing."""
  def tree(path: str) -> Any:
    saved = checkpoint.saved_tree(path) if storage.isdir(path) else None
    if saved is None:
      raise ValueError(f"{path}: no saved arrays there (a folder cut short?)")
    return saved

  if storage.isfile(os.path.join(source, "model.json")):
    parts = {"encoder": tree(os.path.join(source, "params"))}
    if storage.isdir(os.path.join(source, DECODER_DIR)):
      parts["decoder"] = tree(os.path.join(source, DECODER_DIR))
    if storage.isdir(os.path.join(source, CLASSIFIER_DIR)):
      parts.update(tree(os.path.join(source, CLASSIFIER_DIR)))
    return read_info(source), "a mim_jax export directory", parts
  config_path = os.path.join(source, "config.json")
  step = latest_step(os.path.join(source, "checkpoints"))
  if storage.isfile(config_path) and step is not None:
    info = info_from_config(json.loads(storage.read_text(config_path)))
    released = tree(os.path.join(source, "checkpoints", str(step), "state"))
    path = released_path(source)
    for key in path:
      released = released[key]
    where = "" if path == ("params",) else f", the weights it releases: {'.'.join(path)}"
    return (info, f"a mim_jax training workdir (checkpoint {step}{where})",
            _released_parts(info, released, all_parts))
  if storage.isfile(os.path.join(source, "encoder", "model.json")):
    info, _, parts = saved_parts(os.path.join(source, "encoder"))
    return info, "a mim_jax training workdir without checkpoints: its encoder/ export", parts
  raise FileNotFoundError(
      f"{source} is neither an export directory (model.json + params/) nor a training workdir "
      "(config.json + checkpoints/)")


def _released_parts(info: dict, released: dict, all_parts: bool) -> dict:
  """The parts of a workdir's released tree that `read_weights` returns: the encoder, an MAE
  run's decoder, a fine-tuning run's head; with `all_parts`, every part the run trains."""
  keep = {"mae": ("encoder", "decoder"), "finetune": ("encoder",) + CLASSIFIER_PARTS}.get(
      info["method"], ("encoder",))
  return {k: v for k, v in released.items() if all_parts or k in keep}


def read_weights(source: str, step: Optional[int] = None,
                 all_parts: bool = False) -> tuple[dict, dict]:
  """(model info, params) of an export directory or a training workdir.

  A workdir gives the params of its checkpoint at `step` (default: the latest), which include
  the decoder of an MAE run and the head of a fine-tuning run (with `all_parts`, every
  top-level part the run trains: predictors, iBOT's head, ...), as the method releases them
  (iBOT: its EMA teacher, which its export and evaluations hold); without checkpoints, its
  encoder/ export.
  """
  if step is not None and not storage.isfile(os.path.join(source, "config.json")):
    raise ValueError(f"step={step} picks a checkpoint of a training workdir (config.json + "
                     f"checkpoints/); {source} is not one (an export holds one set of weights)")
  if storage.isfile(os.path.join(source, "model.json")):
    encoder, info = checkpoint.load_encoder(source)
    params = {"encoder": encoder}  # numpy, as every restore here
    if storage.isdir(os.path.join(source, DECODER_DIR)):
      params["decoder"] = _restore(os.path.join(source, DECODER_DIR))
    if storage.isdir(os.path.join(source, CLASSIFIER_DIR)):
      params.update(_restore(os.path.join(source, CLASSIFIER_DIR)))
    return info, params
  config_path = os.path.join(source, "config.json")
  step = step if step is not None else latest_step(os.path.join(source, "checkpoints"))
  if storage.isfile(config_path) and step is not None:
    info = info_from_config(json.loads(storage.read_text(config_path)))
    path = os.path.join(source, "checkpoints", str(step), "state")
    if not storage.isdir(path):
      raise FileNotFoundError(f"{source} has no checkpoint of step {step}")
    released = checkpoint.restore_on_host(path)
    for key in released_path(source):
      released = released[key]
    params = _released_parts(info, released, all_parts)
    if "encoder" not in params:
      raise ValueError(f"the {info['method']} run in {source} trains no encoder of its own "
                       "(its encoder is frozen): export the workdir it was initialised from")
    return info, params
  if storage.isfile(os.path.join(source, "encoder", "model.json")):
    if step is not None:
      raise FileNotFoundError(f"{source} has no checkpoint of step {step} (only its encoder/ "
                              "export: read it without a step)")
    return read_weights(os.path.join(source, "encoder"))
  raise FileNotFoundError(
      f"{source} is neither an export directory (model.json + params/) nor a training workdir "
      "(config.json + checkpoints/)")


def write_weights(directory: str, params: dict, info: dict, *, overwrite: bool = False) -> str:
  """Writes `params` as an export directory, all or nothing.

  Everything goes to a temporary sibling directory first, renamed into place at the end, so an
  error leaves no partial export behind. Cloud Storage has no rename: a gs:// export is
  written in place, model.json last among the encoder's files.
  """
  directory = storage.absolute(directory)
  check_replaceable(directory, overwrite=overwrite)
  if storage.is_url(directory):
    storage.rmtree(directory)
    write_parts(directory, params, info)
    return directory
  tmp = f"{directory}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    write_parts(tmp, params, info)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


def check_replaceable(directory: str, *, overwrite: bool, source: str = "") -> None:
  """FileExistsError unless `directory` may become an export: absent or empty, or (with
  `overwrite`) an export directory itself (model.json beside nothing but EXPORT_ENTRIES),
  which must not hold `source`, the checkpoint being read. So --overwrite replaces an earlier
  export, never another folder."""
  directory = storage.absolute(directory)
  held = entries_to_replace(directory, overwrite=overwrite)
  if not held:
    return
  others = sorted(set(held) - set(EXPORT_ENTRIES))
  if not storage.isfile(os.path.join(directory, "model.json")) or others:
    raise FileExistsError(f"{directory} is not a mim_jax export directory (it holds "
                          f"{', '.join(others) if others else 'no model.json'}): --overwrite "
                          "replaces an earlier export only; name a new directory")
  if source and storage.is_within(source, directory):
    raise FileExistsError(f"{directory} holds the checkpoint being imported ({source}): "
                          "--overwrite would delete it; name another directory")


def entries_to_replace(directory: str, *, overwrite: bool) -> list[str]:
  """The entries of output `directory` a write would replace, sorted ([] if it is absent or
  empty). FileExistsError for a file, or for a directory with entries without `overwrite`;
  which entries may be replaced is the caller's to check (an export's own kinds)."""
  if storage.isfile(directory):
    raise FileExistsError(f"{directory} is a file: name a directory to write the export to")
  held = sorted(storage.listdir(directory)) if storage.exists(directory) else []
  if held and not overwrite:
    raise FileExistsError(f"{directory} holds {', '.join(held)}: pass --overwrite to replace "
                          "an earlier export, or name a new directory")
  return held


def write_parts(directory: str, params: dict, info: dict) -> None:
  """Writes `params` ({"encoder"[, "decoder"][, "fc_norm", "head"]}) into export `directory`
  in place: decoder/, classifier/, then the encoder and model.json (checkpoint.export_encoder)
  last, so that a write cut short leaves no model.json, which readers look for first (never
  an export that looks whole without its head). Collective, as Orbax's saves: every process
  of a run calls it with the same values."""
  if "decoder" in params:
    _save(os.path.join(directory, DECODER_DIR), params["decoder"])
  classifier = {k: params[k] for k in CLASSIFIER_PARTS if k in params}
  if classifier:
    _save(os.path.join(directory, CLASSIFIER_DIR), classifier)
  checkpoint.export_encoder(directory, params["encoder"], info)


def _config(info: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(info["config"])


def build_encoder(info: dict, params: dict) -> ViTEncoder:
  """The encoder of `params["encoder"]`: learned positions if it holds `pos_embed`, none if
  model.json says so (relative positions only), else fixed sin-cos."""
  config, enc = _config(info), params["encoder"]
  posemb = ("learn" if "pos_embed" in enc else
            "none" if info.get("posemb") == "none" else "sincos")
  return encoder_from_config(config.model, tuple(info["image_size"]), int(info["channels"]),
                             use_mask_token="mask_token" in enc, posemb=posemb)


def build_mae(info: dict, params: dict):
  """(MaskedAutoencoder, params) for weights with a decoder."""
  if "decoder" not in params:
    raise ValueError("these weights have no MAE decoder (import a `*_full.pth` checkpoint, or "
                     "export an MAE pre-training workdir)")
  config, dec = _config(info), params["decoder"]
  encoder = build_encoder(info, params)
  width = int(np.shape(dec["mask_token"])[-1])
  blocks = [k for k in dec["decoder"] if re.fullmatch(r"blocks_\d+", k)]
  mlp = int(np.shape(dec["decoder"]["blocks_0"]["mlp"]["fc1"]["kernel"])[-1]) if blocks else 0
  p, c = encoder.patch_size, encoder.channels
  decoder = MAEDecoder(grid_hw=encoder.grid_hw, out_dim=p * p * c, width=width,
                       depth=len(blocks), num_heads=int(config.decoder.num_heads),
                       mlp_ratio=mlp // width if blocks else 4, dtype=encoder.dtype,
                       attention_impl=encoder.attention_impl)
  return MaskedAutoencoder(encoder=encoder, decoder=decoder,
                           mask_ratio=float(config.masking.ratio)), params


def build_classifier(info: dict, params: dict):
  """(ViTClassifier, params) for weights with a classification head.

  A mean-pooling classifier has no use for the encoder's final LayerNorm, and checkpoints
  trained that way (the official MAE fine-tuning, timm global_pool="avg") have none; an
  identity-initialised one is filled in so that the Flax tree is complete (it is not used).
  """
  if "head" not in params:
    raise ValueError("these weights have no classification head")
  pool = "gap" if "fc_norm" in params else "cls"
  params = dict(params, encoder=dict(params["encoder"]))
  transformer = dict(params["encoder"]["transformer"])
  if "norm" not in transformer:
    width = int(np.shape(params["encoder"]["cls_token"])[-1])
    transformer["norm"] = {"scale": np.ones([width], np.float32),
                           "bias": np.zeros([width], np.float32)}
  params["encoder"]["transformer"] = transformer
  model = ViTClassifier(encoder=build_encoder(info, params),
                        num_classes=int(np.shape(params["head"]["kernel"])[-1]), pool=pool)
  return model, {k: v for k, v in params.items() if k in ("encoder",) + CLASSIFIER_PARTS}
