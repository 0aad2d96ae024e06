"""Starting an evaluation from a pre-trained encoder (`config.init_from`).

  encoder_directory(init_from)       the encoder export inside a workdir, or the path itself
  adopt_encoder_config(config[, file_config])  config with the encoder size/patch of the export
  refuse_dropped_overrides(config, fields)  an error for command-line encoder fields it replaces
  load_encoder_into(params, ...)     pre-trained weights merged into freshly initialised ones
  load_classifier_head_into(params, ...)  a released classifier head, when it fits
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import data, storage
from mim_jax.config.errors import ConfigError, config_error
from mim_jax.convert import our_weights
from mim_jax.models.vit import VIT_SIZES, resize_posemb, sincos_2d, size_from_config
from mim_jax.training import checkpoint

log = logging.getLogger(__name__)

SIZE_FIELDS = ("variant", "width", "depth", "num_heads", "mlp_dim")
# Architecture options that change the parameter tree (models/vit.py): adopted from the export
# like its size; an export without them had them off.
ARCH_DEFAULTS = {"layer_scale": 0.0, "rel_pos_bias": "", "abs_posemb": True, "pre_norm": False,
                 "mlp_act": "gelu"}
RANDOM = "random"  # init_from value: a randomly initialised encoder (baseline)


def is_pretrained(init_from: str) -> bool:
  """Whether `init_from` names weights to load (not "" or "random")."""
  return init_from not in ("", RANDOM)


def encoder_directory(init_from: str) -> str:
  """`init_from`/encoder if that holds an export (a finished pre-training or fine-tuning
  workdir), else `init_from`."""
  for candidate in (os.path.join(init_from, "encoder"), init_from):
    if storage.isfile(os.path.join(candidate, "model.json")):
      return candidate
  hint = ("run the pre-training config first, e.g. python -m mim_jax.main "
          "--config=configs/mae_fmnist.py --workdir=DIR, then pass --config.init_from=DIR")
  if _workdir_method(init_from) == "finetune":
    hint = ("it is a fine-tuning workdir without its export (unfinished, or run before "
            "fine-tuning exported its classifier): run its command again; a finished run "
            "resumes at its last step and writes encoder/ (add --config.export_encoder=True "
            "if it was turned off)")
  raise config_error(
      "init_from", init_from,
      "a pre-training workdir whose run finished, or a fine-tuning one (it holds "
      "encoder/model.json), or an encoder directory written by "
      "mim_jax.training.checkpoint.export_encoder", hint=hint)


def _workdir_method(directory: str) -> str | None:
  """The method of the training workdir `directory` (its config.json), or None."""
  try:
    return json.loads(storage.read_text(os.path.join(directory, "config.json"))).get("method")
  except (OSError, ValueError, AttributeError):
    return None


def read_model_info(init_from: str) -> dict:
  """The model.json of the export that `init_from` points to (`checkpoint.read_export_info`)."""
  return checkpoint.read_export_info(encoder_directory(init_from))


def input_normalisation(info: dict, source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) an export's model.json `info` normalises its inputs with: one value, or one
  per channel. ValueError for a count that fits neither (imports before 2026-12-05 wrote
  ImageNet's 3 values beside a 1-channel encoder)."""
  data = info["config"].get("data", {})
  mean, std = tuple(data.get("mean", (0.5,))), tuple(data.get("std", (0.5,)))
  channels = int(info["channels"])
  if {len(mean), len(std)} - {1, channels}:
    raise ValueError(f"{source}: model.json has {len(mean)} / {len(std)} normalisation values "
                     f"(mean / std) for a {channels}-channel encoder; import the checkpoint "
                     "again")
  return mean, std


def encoder_posemb(init_from: str) -> str:
  """The position-embedding kind of the encoder `init_from` names: "learn" when its export
  carries a learned table (fine-tuned classifiers, timm ViTs), else "sincos" (pre-training
  exports, random and from-scratch encoders)."""
  if not is_pretrained(init_from):
    return "sincos"
  return read_model_info(init_from).get("posemb", "sincos")


def adopt_encoder_config(config, file_config=None):
  """Returns a copy of `config` whose encoder size, patch and channels are the export's, and
  its input normalisation (data.mean / std) unless the command line set it.

  The encoder's shape is a property of the checkpoint, so evaluation configs need not repeat
  it; dtype, drop path and attention settings stay as configured. The image size may differ
  (fine-tuning at another resolution resizes the position table). Raises ConfigError where
  the adoption would silently drop what the config asked for: a `recipe_size` (fine-tuning)
  other than the encoder's size, or an architecture option that `file_config` (the config
  file's own config, when known) turns on and the encoder was not trained with.
  """
  if config.init_from in ("", RANDOM):
    return config
  info = read_model_info(config.init_from)
  model = info["config"]["model"]
  refuse_other_recipe_size(config, model, f"init_from={config.init_from}")
  if file_config is not None:
    _refuse_file_architecture(config, file_config, info)
  config = config.copy_and_resolve_references()
  replaced = []
  with config.unlocked():
    adopted = {**{f"model.{n}": model.get(n, config.model[n]) for n in SIZE_FIELDS},
               **{f"model.{n}": model.get(n, off) for n, off in ARCH_DEFAULTS.items()},
               "channels": int(info["channels"])}
    for field, value in adopted.items():
      block, name = (config.model, field[6:]) if field.startswith("model.") else (config, field)
      if block.get(name) != value:
        replaced.append(f"{field}={block.get(name)!r} -> {value!r}")
      block[name] = value
    if "data" in config:
      replaced += _adopt_normalisation(config, file_config, info)
  log.info("encoder from %s: %s (width %s, depth %s), trained on images %s%s", config.init_from,
           model["variant"], model.get("width"), model.get("depth"), info["image_size"],
           f"; the config's encoder fields replaced: {', '.join(replaced)}" if replaced else "")
  return config


def _adopt_normalisation(config, file_config, info: dict) -> list[str]:
  """Sets config.data.mean / std to those the encoder of model.json `info` was trained with
  (features.load reads the same), unless the command line set them (they differ from the
  config file's own `file_config`): an explicit choice is kept, with a warning. Without
  `file_config` (a program's config) they are replaced, with a warning. The evaluation configs'
  values (ImageNet's in the base configs) would otherwise feed the encoder inputs of another
  scale than it learned on, and the scores would silently drop. Returns what it replaced."""
  theirs = dict(zip(("mean", "std"), input_normalisation(info, config.init_from)))
  channels = int(info["channels"])
  replaced = []
  for name, value in theirs.items():
    ours = tuple(float(x) for x in config.data[name])
    if _per_channel(ours, channels) == _per_channel(value, channels):
      continue
    if file_config is not None and tuple(file_config.data.get(name, ())) != tuple(ours):
      log.warning("config.data.%s=%s from the command line, not the %s that the encoder in %s "
                  "was trained with", name, ours, value, config.init_from)
      continue
    replaced.append(f"data.{name}={ours!r} -> {tuple(value)!r}")
    config.data[name] = tuple(value)
  if replaced and file_config is None:
    # A program's config (no config file to tell its own values from a command line's): it
    # may have meant its values, so the replacement is a warning, not only the info line.
    log.warning("config.data normalisation replaced by the encoder's in %s (%s): pass "
                "file_config (the config before your changes) to keep values you set",
                config.init_from, ", ".join(replaced))
  return replaced


def _per_channel(values, channels: int) -> tuple[float, ...]:
  """One value per channel (a single value stands for every channel)."""
  values = tuple(float(v) for v in values)
  return values * channels if len(values) == 1 else values


def refuse_other_recipe_size(config, model, where: str) -> None:
  """ConfigError when `config.recipe_size` names another size than the encoder of `model` (a
  model block: the export's, or the config's own from scratch); `where` names that encoder."""
  recipe = config.get("recipe_size", "")
  if recipe not in VIT_SIZES:
    return  # "" (any encoder), or a bad name that validation reports
  theirs = size_from_config(ml_collections.ConfigDict(model))[0]
  if theirs == VIT_SIZES[recipe]:
    return
  named = [n for n, s in VIT_SIZES.items() if s == theirs]
  raise config_error(
      "recipe_size", recipe, f"{named[0]!r}, the size of the encoder in {where} (width "
      f"{theirs.width}, depth {theirs.depth})" if named else f"'' for the encoder in {where} "
      f"(width {theirs.width}, depth {theirs.depth}: no named size)",
      f"This config's lr, layer decay, drop path and epochs are the published recipe for "
      f"{recipe}: pick the recipe of the encoder's size (configs/finetune_imagenet.py:size=...),"
      " or set --config.recipe_size='' to run this one on it anyway.")


def _refuse_file_architecture(config, file_config, info: dict) -> None:
  """ConfigError when the config file turns on an architecture option (ARCH_DEFAULTS) the
  encoder of model.json `info` does not have and the run keeps it: adoption would replace it
  by the encoder's without a word. A command-line value (one that differs from the file's) is
  refuse_dropped_overrides' to judge: it may set the encoder's own value."""
  differs = encoder_mismatches(file_config.model, config.channels, info)
  for name, off in ARCH_DEFAULTS.items():
    asked, theirs = differs.get(f"model.{name}", (off, off))
    if asked != off and config.model.get(name, off) == asked:
      raise config_error(
          f"model.{name}", asked, f"{theirs!r}, the value the encoder in "
          f"init_from={config.init_from} was trained with (the config file sets another)",
          f"An evaluation builds the encoder its weights were trained as: remove the field from "
          f"the config file (or pass --config.model.{name}={theirs!r}), or pre-train / import "
          "an encoder with it.")


def describe_encoder(size, patch: int, channels: int | None = None) -> str:
  """"patch 16, width 768, depth 12, 12 heads, MLP 3072[, 3 channel(s)]" (error messages)."""
  text = (f"patch {patch}, width {size.width}, depth {size.depth}, {size.num_heads} heads, "
          f"MLP {size.mlp_dim}")
  return text if channels is None else f"{text}, {channels} channel(s)"


def encoder_mismatches(model_cfg, channels: int, info: dict) -> dict[str, tuple[Any, Any]]:
  """Where the configured encoder differs from the one model.json `info` describes, as
  {key: (ours, theirs)}: "model.<option>" for the ARCH_DEFAULTS options (their values),
  "size" for the size and patch ((ViTSize, patch) pairs), "channels"."""
  source = ml_collections.ConfigDict(info["config"]["model"])
  found = {}
  for name, off in ARCH_DEFAULTS.items():
    ours, theirs = model_cfg.get(name, off), source.get(name, off)
    if ours != theirs:
      found[f"model.{name}"] = (ours, theirs)
  ours, theirs = size_from_config(model_cfg), size_from_config(source)
  if ours != theirs:
    found["size"] = (ours, theirs)
  if int(channels) != int(info["channels"]):
    found["channels"] = (int(channels), int(info["channels"]))
  return found


def refuse_dropped_overrides(config, overridden, loads_weights: bool = True) -> None:
  """Raises ConfigError when the command line set an encoder field that `init_from` decides,
  or any encoder field but the variant for the raw-pixel baseline (which builds no encoder).

  `adopt_encoder_config` takes the encoder's size, patch, architecture options and channels
  from the export, so `--config.model.width=256` beside an init_from of another width would
  otherwise be accepted and silently replaced. `overridden`: the dotted fields set on the
  command line (ml_collections' override values); a value equal to the export's is fine.
  With `loads_weights` (the trainer; it reads init_from's classifier head with Orbax, which
  starts JAX: callers that set JAX's device count first pass False), also a
  classifier.head_init_std that a released head, loaded in its place, makes moot.
  """
  if config.get("classifier", {}).get("features") == "pixels":
    # The raw-pixel baseline runs no encoder: its settings would do nothing.
    for field in overridden:
      if field.startswith("model."):
        raise ConfigError(f"config.{field}={overridden[field]!r} is not used: "
                          "classifier.features='pixels' runs no encoder. Drop the flag, or "
                          "probe an encoder (classifier.features='encoder' with init_from).")
  if not is_pretrained(config.init_from):
    return
  size_fields = {f"model.{n}" for n in SIZE_FIELDS}
  keys = {"size", "channels"} | {f"model.{n}" for n in ARCH_DEFAULTS}
  mismatches = None
  for field in overridden:
    key = "size" if field in size_fields else field
    if key not in keys:
      continue
    if mismatches is None:
      mismatches = encoder_mismatches(config.model, config.channels,
                                      read_model_info(config.init_from))
    if key not in mismatches:
      continue
    ours, theirs = mismatches[key]
    if key == "size":  # width=0 means the variant's width: compare the resolved sizes
      ours, theirs = describe_encoder(*ours), describe_encoder(*theirs)
    else:
      ours, theirs = f"{key}={ours!r}", f"{key}={theirs!r}"
    raise config_error(
        field, overridden[field], f"the encoder in init_from={config.init_from} is {theirs} "
        f"(this flag asks for {ours})", "An evaluation builds the encoder its weights were "
        "trained as: drop the flag, or pre-train / import an encoder of the shape you want.")
  if (loads_weights and "classifier.head_init_std" in overridden
      and config.classifier.get("reuse_head") and _released_head_would_load(config)):
    raise ConfigError(
        f"config.classifier.head_init_std={overridden['classifier.head_init_std']!r} is not "
        f"used: init_from={config.init_from} holds a classifier head that fits this model "
        "(its classifier/ folder: same classes and pooling), and fine-tuning continues from "
        "it. Set --config.classifier.reuse_head=False to train a new head at this std, or "
        "drop the flag.")


def _released_head_would_load(config) -> bool:
  """Whether fine-tuning would load init_from's released classifier head
  (`load_classifier_head_into`): its class count and pooling (fc_norm for "gap") are the
  config's; its width is the encoder's, which the run adopts."""
  found = released_head(config.init_from)
  if "head" not in found:
    return False
  width = found["head"]["kernel"].shape[0]
  try:
    classes = config.classifier.num_classes or data.num_classes(config.data)
  except Exception:  # pylint: disable=broad-except  # data the validation then names
    return False
  vector = lambda n: jax.ShapeDtypeStruct((n,), np.float32)
  ours = {"head": {"kernel": jax.ShapeDtypeStruct((width, classes), np.float32),
                   "bias": vector(classes)}}
  if config.classifier.pool == "gap":
    ours["fc_norm"] = {"scale": vector(width), "bias": vector(width)}
  return head_fits(found, ours)


def encoder_params_for(module, init_from: str, image_size, channels: int) -> Any:
  """The encoder weights of export `init_from` laid out for encoder `module` at `image_size`
  (a learned position table resized to its patch grid: `load_encoder_into`), as numpy."""
  init = jax.eval_shape(module.init, jax.random.key(0),
                        jnp.zeros((1, *image_size, channels), jnp.float32))["params"]
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init)
  return load_encoder_into(init, init_from, grid_hw=module.grid_hw)


def load_encoder_into(init_params: Any, init_from: str, *, grid_hw: tuple[int, int]) -> Any:
  """Replaces the encoder weights in `init_params` by the pre-trained ones.

  Every pre-trained parameter must exist in `init_params` with the same shape, except a learned
  position table, which is resized (bicubic) when the patch grid differs. When pre-training
  used fixed sin-cos positions (no `pos_embed` in the export), a learned `pos_embed` starts
  from the pre-training grid's sin-cos table, resized to the new grid if it differs (as MAE's
  `interpolate_pos_embed` does with its checkpoints); other parameters the export lacks keep
  their initial values.
  """
  directory = encoder_directory(init_from)
  loaded, info = checkpoint.load_encoder(directory)
  src_patch = int(info["config"]["model"]["variant"].split("/")[1])
  src_grid = tuple(s // src_patch for s in info["image_size"])
  flat_init = {jax.tree_util.keystr(p): (p, v)
               for p, v in jax.tree_util.tree_leaves_with_path(init_params)}
  out = dict((k, v) for k, (_, v) in flat_init.items())
  for path, value in jax.tree_util.tree_leaves_with_path(loaded):
    key = jax.tree_util.keystr(path)
    if key == "['mask_token']" and key not in flat_init:
      # Mask-token pre-training (SimMIM, MaskFeat, ...) exports the token; a model that never
      # masks its input has no use for it.
      log.info("pre-trained %s is not used by this model (it sees unmasked images)", key)
      continue
    if key not in flat_init:
      raise checkpoint.unusable_export(
          directory, f"pre-trained parameter {key} has no counterpart in the model: the export "
          "was written by a different encoder type or an older layout of its parameters")
    target = flat_init[key][1]
    value = np.asarray(value)
    if key.endswith("['pos_embed']") and value.shape != target.shape:
      value = np.asarray(resize_posemb(value, src_grid, grid_hw))
    if value.shape != target.shape:
      raise checkpoint.unusable_export(
          directory, f"pre-trained parameter {key} has shape {value.shape}, the model expects "
          f"{target.shape}")
    out[key] = value.astype(target.dtype)
  loaded_keys = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(loaded)}
  loaded_keys &= set(flat_init)
  posemb_key = "['pos_embed']"
  if posemb_key in flat_init and posemb_key not in loaded_keys:
    width = flat_init[posemb_key][1].shape[-1]
    table = sincos_2d(width, src_grid, cls_token=True)
    out[posemb_key] = np.asarray(resize_posemb(jnp.asarray(table), src_grid, grid_hw))
    loaded_keys.add(posemb_key)
  missing = sorted(set(flat_init) - loaded_keys)
  if missing:
    log.info("parameters not in the pre-trained encoder (kept at init): %s", ", ".join(missing))
  treedef = jax.tree_util.tree_structure(init_params)
  return jax.tree_util.tree_unflatten(treedef, [out[k] for k in flat_init])


CLASSIFIER_PARTS = our_weights.CLASSIFIER_PARTS


def _shapes(tree: Any) -> Any:
  return jax.tree.map(lambda x: tuple(x.shape), tree)


def has_released_head(init_from: str) -> bool:
  """Whether the export `init_from` points to holds a classifier/ folder (an imported
  fine-tuned classifier); False for no export (validation names a bad init_from). Reads no
  weights (and starts no JAX backend)."""
  if not is_pretrained(init_from):
    return False
  try:
    directory = encoder_directory(init_from)
  except ConfigError:
    return False
  return storage.isdir(os.path.join(directory, our_weights.CLASSIFIER_DIR))


def released_head(init_from: str) -> dict:
  """The classifier parts ({"fc_norm", "head"}, numpy) that the export `init_from` points to
  holds in its classifier/ folder (a fine-tuned classifier), {} when it has none.
  Reads only that folder, not the encoder."""
  if not has_released_head(init_from):
    return {}
  found = checkpoint.restore_on_host(
      os.path.join(encoder_directory(init_from), our_weights.CLASSIFIER_DIR))
  return {k: found[k] for k in CLASSIFIER_PARTS if k in found}


def head_fits(head: dict, params: Any) -> bool:
  """Whether released classifier parts (`released_head`) have exactly the parts and shapes of
  a model's (params or jax.ShapeDtypeStructs: {"encoder", "head"[, "fc_norm"]})."""
  ours = {k: params[k] for k in CLASSIFIER_PARTS if k in params}
  return bool(head) and set(head) == set(ours) and all(
      _shapes(head[k]) == _shapes(ours[k]) for k in head)


def load_classifier_head_into(params: Any, init_from: str) -> Any:
  """Puts an imported classifier's `fc_norm` / `head` (an export's classifier/ folder, e.g. an
  official MAE fine-tuned checkpoint) into fine-tuning params when their shapes match, so
  fine-tuning continues from the released classifier (`classifier.reuse_head`, whose caller
  decides); otherwise the new head is kept (another number of classes, another pooling), with
  a log line saying so."""
  found = released_head(init_from)
  if not found:
    return params
  if not head_fits(found, params):
    log.info("the classifier head in %s does not fit this model (%s vs %s): a new head is "
             "trained", init_from, _shapes(found), _shapes({k: params[k] for k in
                                                            CLASSIFIER_PARTS if k in params}))
    return params
  log.info("classifier head loaded from %s (classifier.head_init_std is not used: fine-tuning "
           "continues from this head; classifier.reuse_head=False trains a new one)", init_from)
  return dict(params, **{k: jax.tree.map(lambda v, t: np.asarray(v, t.dtype), found[k],
                                         params[k]) for k in found})
