"""Exporting mim_jax weights as safetensors that timm, the official MAE code or HF load.

  export_weights(source, directory, fmt)

  fmt "timm"  model.safetensors (timm ViT names) + config.json (timm's local-dir format):
              timm.create_model("local-dir:DIR", pretrained=True), or a timm ViT of the same
              size with pretrained_cfg_overlay=dict(file="DIR/model.safetensors", num_classes=0)
  fmt "mae"   model.safetensors with the official MAE names, the decoder included for MAE
              weights (the key layout of `mae_pretrain_vit_*_full.pth`)
  fmt "hf"    model.safetensors (transformers 4.x names, which transformers 5 also reads) +
              config.json: transformers.ViTMAEForPreTraining.from_pretrained(DIR)

`source` is an export directory (`--config.init_from` style, or a `python -m mim_jax.convert
import` output) or a training workdir (its latest checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from mim_jax import storage
from mim_jax.convert.hf_vitmae import hf_vitmae_config, hf_vitmae_state_dict_from_params
from mim_jax.convert.our_weights import entries_to_replace, read_weights
from mim_jax.convert.safetensors_io import write_safetensors
from mim_jax.convert.timm_vit import timm_state_dict_from_params
from mim_jax.data.pipeline import eval_crop_fraction
from mim_jax.models.vit import ViTSize, size_from_config

log = logging.getLogger(__name__)

FORMATS = ("timm", "mae", "hf")
WEIGHTS_FILE = "model.safetensors"
EXPORT_FILES = (WEIGHTS_FILE, "config.json")  # what an export directory holds
# timm architecture names, each registered in timm (create_model looks the name up before
# model_args set the exact size): the name of the same width and patch where timm has one, else
# the published size's default patch, else the size nearest in width. Huge has no patch-16 name.
TIMM_ARCH = {(192, 16): "vit_tiny_patch16_224",
             (384, 8): "vit_small_patch8_224", (384, 16): "vit_small_patch16_224",
             (384, 32): "vit_small_patch32_224",
             (768, 8): "vit_base_patch8_224", (768, 16): "vit_base_patch16_224",
             (768, 32): "vit_base_patch32_224",
             (1024, 14): "vit_large_patch14_224", (1024, 16): "vit_large_patch16_224",
             (1024, 32): "vit_large_patch32_224",
             (1280, 14): "vit_huge_patch14_224"}
TIMM_DEFAULT_PATCH = {192: 16, 384: 16, 768: 16, 1024: 16, 1280: 14}


def timm_architecture(width: int, patch: int) -> str:
  """A registered timm ViT name for an encoder `width` wide with `patch` x `patch` patches."""
  if (width, patch) in TIMM_ARCH:
    return TIMM_ARCH[width, patch]
  nearest = min(TIMM_DEFAULT_PATCH, key=lambda w: abs(w - width))
  return TIMM_ARCH[nearest, TIMM_DEFAULT_PATCH[nearest]]


def _model_size(info: dict) -> tuple[ViTSize, int]:
  """(encoder size, patch size) of model.json `info`."""
  return size_from_config(ml_collections.ConfigDict(info["config"]["model"]))


def _geometry(info: dict) -> tuple[int, int, tuple[int, int]]:
  """(patch size, channels, patch grid) of model.json `info`."""
  _, patch = _model_size(info)
  image_size = tuple(int(s) for s in info["image_size"])
  return patch, int(info["channels"]), (image_size[0] // patch, image_size[1] // patch)


def timm_config(info: dict, params: dict[str, Any]) -> dict[str, Any]:
  """timm's config.json for `create_model("local-dir:DIR")`: architecture + exact sizes."""
  size, patch = _model_size(info)
  channels, image_size = int(info["channels"]), [int(s) for s in info["image_size"]]
  num_classes = int(np.shape(params["head"]["kernel"])[-1]) if "head" in params else 0
  pool = "avg" if "fc_norm" in params else "token"
  arch = timm_architecture(size.width, patch)
  mean, std = info["config"]["data"]["mean"], info["config"]["data"]["std"]
  # timm's evaluation transform (resize to input / crop_pct, centre crop) as mim_jax evaluates
  # these weights: 0.875 for photographs at up to 224 px, 1.0 for framed data (it was 1.0
  # always, so an ImageNet classifier run through timm's transform saw another crop).
  crop_pct = eval_crop_fraction(ml_collections.ConfigDict(info["config"]["data"]),
                                tuple(image_size))
  if len(mean) != channels:  # timm wants one value per input channel
    mean, std = [float(np.mean(mean))] * channels, [float(np.mean(std))] * channels
  return {
      "architecture": arch, "num_classes": num_classes, "num_features": size.width,
      "global_pool": pool,
      "model_args": {"img_size": image_size, "patch_size": patch, "in_chans": channels,
                     "embed_dim": size.width, "depth": size.depth,
                     "num_heads": size.num_heads, "mlp_ratio": size.mlp_dim / size.width,
                     "global_pool": pool, "class_token": True, "qkv_bias": True,
                     "pre_norm": "norm_pre" in params["encoder"],
                     "act_layer": info["config"]["model"].get("mlp_act", "gelu")},
      "pretrained_cfg": {"num_classes": num_classes, "input_size": [channels, *image_size],
                         "fixed_input_size": True, "interpolation": "bicubic",
                         "crop_pct": crop_pct, "mean": list(mean), "std": list(std),
                         "first_conv": "patch_embed.proj", "classifier": "head"},
  }


def export_weights(source: str, directory: str, fmt: str, *, step: Optional[int] = None,
                   overwrite: bool = False) -> list[str]:
  """Writes `source`'s weights to `directory` in format `fmt`; returns the files written.
  A directory that holds files already is refused, unless `overwrite` and they are an earlier
  export's (model.safetensors, config.json): its config.json is removed first (so that it is
  never beside the new weights), its weights replaced. Every check runs before anything is
  written."""
  if fmt not in FORMATS:
    raise ValueError(f"format {fmt!r}: expected one of {FORMATS}")
  info, params = read_weights(source, step)
  model = info["config"]["model"]
  beit_style = [f"model.{k}={model[k]!r}" for k in ("layer_scale", "rel_pos_bias")
                if model.get(k)] + (["no absolute positions"] if info.get("posemb") == "none"
                                    or not model.get("abs_posemb", True) else [])
  if beit_style:
    # timm's VisionTransformer and HF ViTMAE have no place for these parameters: writing the
    # rest would be a different function under the same names.
    raise ValueError(f"{source} has BEiT-style parts ({', '.join(beit_style)}) that the "
                     f"{fmt!r} export layouts (timm VisionTransformer, HF ViTMAE) cannot hold; "
                     "use the mim_jax export directory itself")
  if model.get("mlp_act", "gelu") != "gelu" and fmt != "timm":
    # HF ViTMAE has one hidden_act for encoder and decoder (ours is GELU); the official MAE
    # layout has no config at all.
    raise ValueError(f"{source} computes {model['mlp_act']} in its encoder's MLPs, which the "
                     f"{fmt!r} layout cannot say; use --format=timm (its config.json sets "
                     "act_layer)")
  patch, channels, grid = _geometry(info)
  if fmt == "hf":
    if "decoder" not in params:
      raise ValueError(f"{source} has no MAE decoder: an HF ViTMAEForPreTraining export needs "
                       "MAE weights (use --format=timm for an encoder)")
    if grid[0] != grid[1]:
      raise ValueError(f"HF ViTMAE supports square inputs only; these weights are for a {grid} "
                       "patch grid")
  _check_output(directory, overwrite)
  storage.makedirs(directory)
  config_path = os.path.join(directory, "config.json")
  if storage.exists(config_path):  # an earlier export's (--overwrite): not beside new weights
    storage.remove(config_path)
    log.warning("removed %s, an earlier export's", config_path)
  weights_path = os.path.join(directory, WEIGHTS_FILE)
  written = [weights_path]
  config = None
  if fmt == "hf":
    cfg = info["config"]
    state = hf_vitmae_state_dict_from_params(params, patch_size=patch, channels=channels,
                                             grid_hw=grid, legacy_names=True)
    config = hf_vitmae_config(params, patch_size=patch, channels=channels,
                              image_size=grid[0] * patch,
                              num_heads=_model_size(info)[0].num_heads,
                              decoder_num_heads=int(cfg["decoder"]["num_heads"]),
                              mask_ratio=float(cfg["masking"]["ratio"]),
                              norm_pix_loss=bool(cfg["target"]["norm_pix"]))
  else:
    tree = dict(params)
    if fmt == "timm":
      tree.pop("decoder", None)  # timm's ViT has no decoder; "mae" keeps it
      config = timm_config(info, tree)
    state = timm_state_dict_from_params(tree, patch_size=patch, channels=channels, grid_hw=grid,
                                        encoder_mask_token=fmt == "mae")
  write_safetensors(weights_path, state, metadata={"format": "pt"})
  if config is not None:
    storage.write_text(config_path, json.dumps(config, indent=2))
    written.append(config_path)
  return written


def _check_output(directory: str, overwrite: bool) -> None:
  """FileExistsError for an output directory that holds files, unless `overwrite` and they
  are only an earlier export's (EXPORT_FILES)."""
  held = entries_to_replace(directory, overwrite=overwrite)
  others = [name for name in held if name not in EXPORT_FILES]
  if others:
    raise FileExistsError(f"{directory} holds {', '.join(others)}, which no export writes: "
                          "--overwrite replaces an earlier export only; name a new directory")

