"""Continued pre-training: a pre-training method started from existing weights (`init_from`).

  check_source_fits(config)                 ConfigError at start-up if the encoder cannot load
  merge_source(params, config) -> (params, report)
                                            every part of the source that fits, in fresh params

The source is anything `convert.our_weights.read_weights` reads: a training workdir (its
latest checkpoint: encoder, MAE decoder, predictors, heads), an export directory (`encoder/`
of a finished run) or an imported checkpoint (`python -m mim_jax.convert import`, e.g. the
official `mae_pretrain_vit_base_full.pth` with its decoder).

Rules, so that nothing is loaded silently wrong and nothing is silently dropped:
  * The encoder must fit: the configured size, patch and channels must equal the source's
    (refused at start-up with both sizes and the flags to set). Only two of its arrays may
    differ: a `mask_token` the source lacks starts fresh (MAE -> SimMIM), and one the model
    lacks, or the source's learned `pos_embed` (pre-training uses fixed sin-cos), goes unused.
  * Every other top-level part (MAE decoder, SimMIM / BEiT predictor, iBOT head) is loaded when
    the source was trained by the same method with the same shapes (and, for the decoder, the
    same head count); otherwise it starts fresh.
  * The report lists what was loaded, what starts fresh and what went unused; the trainer logs
    it. Optimizer state, step count and schedules always start fresh: this is a new run.
Methods with EMA teachers copy the loaded student into the teacher (methods/data2vec.py,
methods/ibot.py); BEiT's frozen tokenizer still comes from `tokenizer.path`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from typing import Any

import jax
import ml_collections
import numpy as np

from mim_jax import storage
from mim_jax.config.errors import config_error
from mim_jax.convert import our_weights
from mim_jax.models.vit import size_from_config
from mim_jax.weights import pretrained

log = logging.getLogger(__name__)

# Encoder arrays allowed to be absent on one side, and why (see the module docstring).
_MASK_TOKEN = "['mask_token']"
_FRESH_IF_MISSING = (_MASK_TOKEN,)
_UNUSED_IF_EXTRA = ("['mask_token']", "['pos_embed']")


@dataclasses.dataclass
class Report:
  """What `merge_source` did: part names and `path: reason` strings."""
  source: str
  source_method: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  fresh: list[str] = dataclasses.field(default_factory=list)
  unused: list[str] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    return (f"init_from={self.source} ({self.source_method} weights): loaded "
            f"{', '.join(self.loaded) or 'nothing'}; fresh: {', '.join(self.fresh) or 'nothing'}; "
            f"not used: {', '.join(self.unused) or 'nothing'}; optimizer state, step and "
            "schedules start fresh")


def check_source_fits(config) -> None:
  """Raises ConfigError (naming init_from, both encoders and the flags to set) unless the
  configured encoder has the source's size, patch and channels. Reads only model metadata."""
  try:
    info = our_weights.read_info(config.init_from)
  except FileNotFoundError as e:
    raise config_error("init_from", config.init_from,
                       "a training workdir, an export directory or an imported checkpoint "
                       "(python -m mim_jax.convert import ...)", str(e)) from None
  mismatches = pretrained.encoder_mismatches(config.model, config.channels, info)
  source_model = info["config"]["model"]
  # Every differing setting at once, each as a flag the shell passes as it is ('' for an empty
  # string), last in the message (no full stop to copy): set one by one, the next would be
  # refused in turn, or by validation (an encoder without rel_pos_bias needs abs_posemb=True).
  arch = [(name, *mismatches[f"model.{name}"]) for name in pretrained.ARCH_DEFAULTS
          if f"model.{name}" in mismatches]
  flags = [f"--config.model.{name}={shlex.quote(str(theirs))}" for name, _, theirs in arch]
  src_size, src_patch = size_from_config(ml_collections.ConfigDict(source_model))
  src_channels = int(info["channels"])
  resized = "size" in mismatches or "channels" in mismatches
  if resized:
    flags += [f"--config.model.variant={shlex.quote(source_model['variant'])}"]
    flags += [f"--config.model.{k}={getattr(src_size, k)}"
              for k in ("width", "depth", "num_heads", "mlp_dim")]
    flags += [f"--config.channels={src_channels}"]
  hint = ("Continued pre-training keeps the source's architecture; set it with "
          + " ".join(flags))
  if arch:
    name, ours, theirs = arch[0]
    others = "".join(f"; model.{n} is {o!r} here, {t!r} there" for n, o, t in arch[1:])
    raise config_error(
        f"model.{name}", ours,
        f"the source's value {theirs!r} (init_from={config.init_from}){others}"
        + ("; its size differs too" if resized else ""), hint)
  if resized:
    size, patch = size_from_config(config.model)
    raise config_error(
        "init_from", config.init_from,
        "weights whose encoder fits the configured one "
        f"({pretrained.describe_encoder(size, patch, config.channels)}); the source's encoder "
        f"has {pretrained.describe_encoder(src_size, src_patch, src_channels)}", hint)


def draws_under_weight_init(config, *, mask_token: bool, head_in_vit: bool) -> bool:
  """Whether a pre-training run of `config` draws any array under model.weight_init.

  Always, but in continued pre-training, whose source replaces the whole fresh encoder: then
  only the encoder's mask token (`mask_token`: the method's encoder has one) when the source's
  encoder has none (MAE -> SimMIM), and a head the official code builds inside its ViT
  (`head_in_vit`) unless the source is a training workdir of the same method (an export holds
  no predictor; another method's is not loaded). Reads the source's metadata, no array; any
  failure to read it counts as drawing (the load reports it).
  """
  if not wanted(config):
    return True
  try:
    info = our_weights.read_info(config.init_from)
    fresh_token = mask_token and _MASK_TOKEN not in our_weights.encoder_array_names(
        config.init_from)
  except Exception:  # pylint: disable=broad-except  # check_source_fits or the load says why
    return True
  export = storage.isfile(os.path.join(config.init_from, "model.json")) or not storage.isdir(
      os.path.join(config.init_from, "checkpoints"))
  return fresh_token or (head_in_vit and (export or info.get("method") != config.method))


def loadable_part(config, part: str) -> Any:
  """The array metadata (shape, dtype) of the `part` of the source that continued pre-training
  of `config` loads, or None where that part starts fresh: no source, an export (the encoder
  alone), another method's workdir, or a workdir without it (`merge_source` also compares its
  shapes). From the checkpoint's metadata alone; a source that cannot be read counts as None
  (check_source_fits or the load says why)."""
  if not wanted(config):
    return None
  try:
    info, _, parts = our_weights.saved_parts(config.init_from, all_parts=True)
  except Exception:  # pylint: disable=broad-except
    return None
  return parts.get(part) if info.get("method") == config.method else None


def _flat(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _shapes_equal(a: Any, b: Any) -> bool:
  fa, fb = _flat(a), _flat(b)
  return fa.keys() == fb.keys() and all(np.shape(fa[k]) == np.shape(fb[k]) for k in fa)


def _merge_encoder(fresh: Any, source: Any, report: Report, where: str) -> Any:
  """The source's encoder arrays in `fresh`'s tree; raises ValueError naming every array that
  is missing or has another shape."""
  want, have = _flat(fresh), _flat(source)
  problems = [f"{k}: model {np.shape(want[k])}, source {np.shape(have[k])}"
              for k in want if k in have and np.shape(want[k]) != np.shape(have[k])]
  problems += [f"{k}: missing in the source" for k in want
               if k not in have and k not in _FRESH_IF_MISSING]
  problems += [f"{k}: not in the model" for k in have
               if k not in want and k not in _UNUSED_IF_EXTRA]
  if problems:
    raise ValueError(f"the encoder in {where} does not fit the model: " + "; ".join(problems))
  report.fresh += [f"encoder{k}" for k in want if k not in have]
  report.unused += [f"encoder{k}" for k in have if k not in want]
  out = {k: np.asarray(have[k], np.asarray(v).dtype) if k in have else v for k, v in want.items()}
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh), list(out.values()))


def _decoder_heads(info: dict) -> int:
  return int(info["config"].get("decoder", {}).get("num_heads", 0))


def wanted(config) -> bool:
  """Whether `config.init_from` names weights to continue from."""
  return config.get("init_from", "") not in ("", "random")


def load_into(params: dict, config) -> dict:
  """`merge_source` for a method's `load_pretrained` hook: logs the report, returns params."""
  params, report = merge_source(params, config)
  log.info("%s", report)
  return params


def merge_source(params: dict, config) -> tuple[dict, Report]:
  """Fresh `params` ({"encoder", ...} of the configured method) with the source's weights.

  Raises ValueError naming arrays and shapes when the encoder does not fit (a source that
  passed `check_source_fits` only fails here if its files disagree with its metadata).
  """
  info, source = our_weights.read_weights(config.init_from, all_parts=True)
  report = Report(source=config.init_from, source_method=str(info.get("method", "?")))
  if "encoder" not in source:
    raise ValueError(f"{config.init_from} holds no encoder (parts: {sorted(source)})")
  params = dict(params)
  params["encoder"] = _merge_encoder(params["encoder"], source["encoder"], report,
                                     config.init_from)
  report.loaded.append("encoder")
  same_method = info.get("method") == config.method
  for part in sorted(set(params) - {"encoder"}):
    if part not in source:
      report.fresh.append(f"{part} (not in the source)")
    elif not same_method:
      report.fresh.append(f"{part} (the source was trained by {info.get('method')}, not "
                          f"{config.method})")
    elif not _shapes_equal(params[part], source[part]):
      report.fresh.append(f"{part} (its shapes differ from the source's)")
    elif part == "decoder" and _decoder_heads(info) not in (0, int(config.decoder.num_heads)):
      report.fresh.append(f"decoder (the source's has {_decoder_heads(info)} heads, "
                          f"decoder.num_heads={config.decoder.num_heads})")
    else:
      params[part] = jax.tree.map(lambda v, t: np.asarray(v, np.asarray(t).dtype),
                                  source[part], params[part])
      report.loaded.append(part)
  report.unused += [p for p in sorted(set(source) - set(params))]
  return params, report
