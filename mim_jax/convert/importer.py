"""Importing other implementations' ViT checkpoints as mim_jax weights.

  import_checkpoint(path, ...)      file or HF directory -> ImportedModel (nothing written)
  import_state_dict(tensors, ...)   the same from a state dict in memory
  ImportedModel.write(directory)    an export directory that `--config.init_from` accepts

Layouts: HF `ViTMAEForPreTraining` (`hf_vitmae`), and the timm naming shared by timm ViTs, the
official MAE pre-training (`mae_pretrain_vit_*.pth`, `*_full.pth`) and fine-tuned checkpoints
and BEiT models with absolute positions (`timm_vit`). Sizes come from the tensors; what the
tensors cannot tell (the number of attention heads, for sizes other than the published ones)
comes from arguments or a Hugging Face config.json.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import registry
from mim_jax.convert import our_weights
from mim_jax.convert.hf_vitmae import (
  hf_vitmae_geometry,
  is_hf_vitmae,
  params_from_hf_vitmae,
)
from mim_jax.convert.layouts import square_grid
from mim_jax.convert.state_dicts import read_state_dict
from mim_jax.convert.timm_vit import (
  is_timm_vit,
  params_from_timm_vit,
  refuse_unsupported,
)
from mim_jax.models.vit import MLP_ACTS, VIT_SIZES, ViTSize, resize_posemb

log = logging.getLogger(__name__)

POSEMB_MODES = ("auto", "sincos", "learn")
FORMAT_NAMES = {"timm": "timm / official MAE names", "beit": "BEiT names (absolute positions)",
                "hf-vitmae": "HF ViTMAEForPreTraining"}
# OpenAI CLIP's input statistics, which OpenCLIP's LAION towers keep too (open_clip's
# OPENAI_DATASET_MEAN / STD): a CLIP-style tower's default, since a state dict records none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Heads of the published widths (ViT Ti/S/B/L/H; the MAE decoder is 512 wide with 16 heads).
HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEADS_BY_WIDTH = {512: 16}


@dataclasses.dataclass
class ImportedModel:
  """Converted weights and what is needed to run them.

  params: {"encoder", ["decoder"], ["fc_norm"], ["head"]} as float32 numpy arrays;
  image_size: the (H, W) the weights are set up for (position table resized if it changed);
  notes: what was skipped, folded, resized or assumed, for the user to read.
  """
  params: dict[str, Any]
  source: str
  source_format: str  # "timm" (timm / official MAE names), "beit", "hf-vitmae"
  patch_size: int
  channels: int
  image_size: tuple[int, int]
  num_heads: int
  decoder_num_heads: int = 0
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  notes: list[str] = dataclasses.field(default_factory=list)
  abs_posemb: bool = True      # False: BEiT's relative positions only (posemb "none")
  mlp_act: str = "gelu"        # "quick_gelu": OpenAI CLIP towers (models.vit.MLP_ACTS)
  # The input normalisation the weights were trained with (one value, or one per channel);
  # None: the base config's (ImageNet's).
  mean: Optional[tuple[float, ...]] = None
  std: Optional[tuple[float, ...]] = None

  @property
  def encoder(self) -> dict[str, Any]:
    return self.params["encoder"]

  @property
  def width(self) -> int:
    return int(self.encoder["cls_token"].shape[-1])

  @property
  def depth(self) -> int:
    return sum(1 for k in self.encoder["transformer"] if k.startswith("blocks_"))

  @property
  def mlp_dim(self) -> int:
    return int(self.encoder["transformer"]["blocks_0"]["mlp"]["fc1"]["kernel"].shape[-1])

  @property
  def posemb(self) -> str:
    if not self.abs_posemb:
      return "none"
    return "learn" if "pos_embed" in self.encoder else "sincos"

  @property
  def layer_scale(self) -> float:
    """model.layer_scale: > 0 when the blocks carry gamma_1 / gamma_2 (their values are the
    weights'; the field's value only initialises fresh models)."""
    return 0.1 if "gamma_1" in self.encoder["transformer"]["blocks_0"] else 0.0

  @property
  def rel_pos_bias(self) -> str:
    transformer = self.encoder["transformer"]
    if "rel_pos_bias" in transformer:
      return "shared"
    return "per_block" if "rel_pos_bias" in transformer["blocks_0"]["attn"] else ""

  @property
  def pool(self) -> str:
    return "gap" if "fc_norm" in self.params else "cls"

  @property
  def num_classes(self) -> int:
    return int(self.params["head"]["kernel"].shape[-1]) if "head" in self.params else 0

  def config(self) -> ml_collections.ConfigDict:
    """A full mim_jax config (`registry.base_config`) describing these weights: a fine-tuned
    classifier's, or an MAE's."""
    c = registry.base_config("finetune" if "head" in self.params else "mae")
    c.image_size = tuple(self.image_size)
    c.channels = self.channels
    if self.mean is not None:
      c.data.mean, c.data.std = tuple(self.mean), tuple(self.std)
    elif len(c.data.mean) != self.channels:
      # The checkpoints record no normalisation; the base config's is ImageNet's RGB one. One
      # value per channel, as exporter.timm_config writes for timm (features and reconstruct
      # normalise each channel with its own).
      c.data.mean = (float(np.mean(c.data.mean)),) * self.channels
      c.data.std = (float(np.mean(c.data.std)),) * self.channels
    c.model.update(model_size_fields(ViTSize(self.width, self.depth, self.num_heads,
                                             self.mlp_dim), self.patch_size))
    c.model.update(layer_scale=self.layer_scale, rel_pos_bias=self.rel_pos_bias,
                   abs_posemb=self.abs_posemb, pre_norm="norm_pre" in self.encoder,
                   mlp_act=self.mlp_act)
    if "decoder" in self.params:
      dec = self.params["decoder"]["decoder"]
      c.decoder.update(width=int(self.params["decoder"]["mask_token"].shape[-1]),
                       depth=sum(1 for k in dec if k.startswith("blocks_")),
                       num_heads=self.decoder_num_heads)
    if "masking" in c:  # an MAE
      c.masking.ratio = self.mask_ratio
      c.target.norm_pix = self.norm_pix_loss
    if "head" in self.params:
      c.classifier.update(pool=self.pool, num_classes=self.num_classes)
    return c

  def model_info(self) -> dict[str, Any]:
    """model.json: what `train._model_info` writes, plus where the weights came from."""
    info = our_weights.info_from_config(self.config().to_dict())
    # Read by evaluate.pretrained.encoder_posemb: how evaluations build this encoder.
    info["posemb"] = self.posemb
    info["imported_from"] = {"path": self.source, "format": self.source_format,
                             "posemb": self.posemb, "parts": sorted(self.params),
                             "notes": list(self.notes)}
    return info

  def write(self, directory: str, *, overwrite: bool = False) -> str:
    """Writes the export directory (encoder params + model.json, decoder/, classifier/)."""
    return our_weights.write_weights(directory, self.params, self.model_info(),
                                     overwrite=overwrite)


def model_size_fields(size: ViTSize, patch_size: int) -> dict[str, Any]:
  """config.model fields for a size: a published variant name, or the nearest name with
  explicit width/depth/num_heads/mlp_dim overrides."""
  for name, published in VIT_SIZES.items():
    if published == size:
      return dict(variant=f"{name}/{patch_size}", width=0, depth=0, num_heads=0, mlp_dim=0)
  base = next((n for n, s in VIT_SIZES.items() if s.width == size.width), "mu")
  return dict(variant=f"{base}/{patch_size}", width=size.width, depth=size.depth,
              num_heads=size.num_heads, mlp_dim=size.mlp_dim)


def _heads(given: Optional[int], width: int, table: dict[int, int], what: str,
           flag: str) -> int:
  if given:
    if width % given:
      raise ValueError(f"{what} width {width} is not divisible by {flag}={given}")
    return int(given)
  if width in table:
    return table[width]
  raise ValueError(f"the {what} is {width} wide, not a published size, so its number of "
                   f"attention heads is unknown (weights do not record it): pass {flag}")


def _image_size(image_size: Optional[Sequence[int]], patch: int,
                source_grid: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  """(target image size, target grid): `image_size` if given, else the checkpoint's."""
  if not image_size:
    return (source_grid[0] * patch, source_grid[1] * patch), source_grid
  if len(image_size) not in (1, 2):
    raise ValueError(f"image size {list(image_size)}: one side (square) or height and width")
  size = (int(image_size[0]), int(image_size[-1]))
  if min(size) < 1:
    raise ValueError(f"image size {list(image_size)}: expected positive sides")
  if size[0] % patch or size[1] % patch:
    raise ValueError(f"image size {size} is not a multiple of the patch size {patch}")
  return size, (size[0] // patch, size[1] // patch)


def _from_hf(tensors: dict[str, Any], hf_config: Optional[dict], posemb: str,
             notes: list[str]) -> dict[str, Any]:
  if posemb == "learn":
    raise ValueError("HF ViTMAE position embeddings are fixed sin-cos tables; posemb='learn' "
                     "does not apply (fine-tuning makes them learned from the same table)")
  config = hf_config or {}
  if config.get("hidden_act", "gelu") != "gelu":
    # One hidden_act covers HF's encoder and decoder; mim_jax's MAE decoder is exact GELU.
    raise ValueError(f"HF config hidden_act={config['hidden_act']!r}: mim_jax's MAE computes "
                     "exact GELU ('gelu')")
  if not config.get("qkv_bias", True):
    raise ValueError("HF config qkv_bias=false: mim_jax's ViT has qkv biases")
  eps = config.get("layer_norm_eps", 1e-6)
  if eps != 1e-6:
    notes.append(f"config.json has layer_norm_eps={eps}; mim_jax uses 1e-6, the value the "
                 "official MAE weights were trained with (the HF Hub configs carry HF's default)")
  geometry = hf_vitmae_geometry(tensors)
  params = params_from_hf_vitmae(tensors, **geometry)
  notes.append("position embeddings equal the fixed 2-D sin-cos tables (checked)")
  num_patches = int(np.shape(tensors["vit.embeddings.position_embeddings"])[1]) - 1
  return dict(params=params, source_format="hf-vitmae", patch_size=geometry["patch_size"],
              channels=geometry["channels"], grid=square_grid(num_patches),
              num_heads=config.get("num_attention_heads"),
              decoder_num_heads=config.get("decoder_num_attention_heads"),
              mask_ratio=float(config.get("mask_ratio", 0.75)),
              norm_pix_loss=bool(config.get("norm_pix_loss", False)), mlp_act="gelu")


def _from_timm(tensors: dict[str, Any], posemb: str, notes: list[str]) -> dict[str, Any]:
  has_head = any(k.startswith(("head.", "fc_norm.")) for k in tensors)
  mode = posemb if posemb != "auto" else ("learn" if has_head else "sincos")
  params, layout = params_from_timm_vit(tensors, posemb=mode)
  if layout.abs_posemb and mode == "sincos":
    notes.append("pos_embed equals the fixed 2-D sin-cos table (checked): the encoder uses "
                 "fixed positions")
  elif layout.abs_posemb:
    notes.append("pos_embed kept as a learned table (encoder posemb='learn')")
  if layout.layer_scale:
    notes.append("layer scales (gamma) kept as the blocks' gamma_1 / gamma_2 "
                 "(model.layer_scale)")
  if layout.rel_pos_bias:
    notes.append(f"relative position bias tables kept ({layout.rel_pos_bias}; index buffers, "
                 "if any, checked equal to BEiT's numbering)")
  if not layout.abs_posemb:
    if posemb != "auto":
      raise ValueError(f"posemb={posemb!r} does not apply: these weights have no absolute "
                       "position table (pos_embed), so the encoder adds none (relative "
                       "positions only, e.g. BEiT); leave posemb at 'auto'")
    notes.append("no absolute position table: the encoder adds none (posemb='none')")
  if layout.pre_norm:
    notes.append("norm_pre kept: a LayerNorm before the first block (model.pre_norm)")
  if not layout.cls_posemb:
    notes.append("pos_embed has no cls row (timm no_embed_class): a zero row was added")
  if layout.qv_bias:
    notes.append("q_bias / v_bias merged into the qkv bias (k bias 0)")
  if not layout.final_norm:
    notes.append("no final `norm` (mean pooling + fc_norm): the encoder export has no "
                 "transformer/norm; cls-token features need a new one")
  return dict(params=params, patch_size=layout.patch_size, channels=layout.channels,
              grid=square_grid(layout.num_patches), num_heads=None, decoder_num_heads=None,
              mask_ratio=0.75, norm_pix_loss=True, abs_posemb=layout.abs_posemb,
              pre_norm=layout.pre_norm,
              num_heads_hint=layout.rel_pos_heads,
              source_format="beit" if layout.layer_scale == "gamma" or layout.qv_bias else "timm")


def _has_rel_pos_bias(encoder: dict[str, Any]) -> bool:
  transformer = encoder["transformer"]
  return "rel_pos_bias" in transformer or "rel_pos_bias" in transformer["blocks_0"]["attn"]


def _mlp_act(found: dict[str, Any], given: Optional[str], notes: list[str]) -> str:
  """The MLP activation of the imported blocks: what the checkpoint records (HF: exact GELU,
  checked), else `given`.

  A timm state dict does not record its activation. For ViTs and BEiTs it is exact GELU; a
  CLIP-style tower (norm_pre) is ambiguous: OpenAI's CLIP weights were trained with QuickGELU,
  LAION / OpenCLIP's with GELU, and the wrong one silently changes every feature, so it must be
  named.
  """
  recorded = found.get("mlp_act")
  if recorded is not None:
    if given is not None and given != recorded:
      raise ValueError(f"mlp_act={given!r} does not apply: {found['source_format']} "
                       f"checkpoints import with {recorded!r} MLPs")
    return recorded
  if given is not None:
    if given != "gelu":
      notes.append(f"MLP activation {given} (as asked: the state dict does not record it)")
    return given
  if found.get("pre_norm"):
    raise ValueError(
        "a CLIP-style tower (norm_pre before the blocks): its state dict does not record the "
        "MLP activation, and the two CLIP families differ: OpenAI CLIP weights need QuickGELU, "
        "LAION / OpenCLIP weights exact GELU. Name it: --mlp_act=quick_gelu (OpenAI) or "
        "--mlp_act=gelu (python -m mim_jax.convert import), mlp_act=... (import_state_dict)")
  return "gelu"


def _normalisation(found: dict[str, Any], mean: Optional[Sequence[float]],
                   std: Optional[Sequence[float]], notes: list[str]
                   ) -> tuple[Optional[tuple[float, ...]], Optional[tuple[float, ...]]]:
  """(mean, std) of the imported weights' inputs: as given (both; each one value or one per
  channel, std > 0), else CLIP's for a CLIP-style tower (norm_pre: a teacher fed
  ImageNet-normalised pixels would compute its targets off the distribution it learned on),
  else (None, None): the base config's ImageNet statistics."""
  if (mean is None) != (std is None):
    raise ValueError("mean and std: give both or neither (the input normalisation the weights "
                     "were trained with)")
  if mean is None:
    if not found.get("pre_norm"):
      return None, None
    notes.append("input normalisation: CLIP's mean and std (a CLIP-style tower; the state dict "
                 "records none; --mean / --std to give others)")
    return CLIP_MEAN, CLIP_STD
  channels = int(found["channels"])
  out = []
  for name, given in (("mean", mean), ("std", std)):
    values = tuple(float(v) for v in given)
    if len(values) not in (1, channels) or (name == "std" and min(values) <= 0):
      raise ValueError(f"{name}={list(values)}: one value or one per channel ({channels})"
                       + (", each > 0" if name == "std" else ""))
    out.append(values)
  return out[0], out[1]


def import_state_dict(tensors: dict[str, Any], *, num_heads: Optional[int] = None,
                      decoder_num_heads: Optional[int] = None,
                      image_size: Optional[Sequence[int]] = None, posemb: str = "auto",
                      hf_config: Optional[dict] = None, source: str = "",
                      notes: Sequence[str] = (), mlp_act: Optional[str] = None,
                      mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None) -> ImportedModel:
  """A state dict (name -> numpy array or torch tensor) -> ImportedModel.

  posemb: "sincos" checks `pos_embed` against the fixed sin-cos table and drops it (official
  MAE pre-training checkpoints); "learn" keeps it as a learned table; "auto" is "learn" for
  classifiers (a head or fc_norm), else "sincos". image_size (H, W): the input size the
  weights are for; a learned table is resized (bicubic) to its patch grid. mlp_act: the
  blocks' activation ("gelu" | "quick_gelu") where the checkpoint does not record it; a
  CLIP-style tower (norm_pre) needs it named (OpenAI CLIP: "quick_gelu"). mean, std (both or
  neither): the input normalisation the weights were trained with (one value or one per
  channel), which evaluations and teachers then apply; by default CLIP's for a CLIP-style
  tower, else the base config's (ImageNet's).
  """
  if posemb not in POSEMB_MODES:
    raise ValueError(f"posemb={posemb!r}: expected one of {POSEMB_MODES}")
  if mlp_act is not None and mlp_act not in MLP_ACTS:
    raise ValueError(f"mlp_act={mlp_act!r}: expected one of {tuple(MLP_ACTS)}")
  for name, given in (("num_heads", num_heads), ("decoder_num_heads", decoder_num_heads)):
    if given is not None and given < 1:
      raise ValueError(f"{name}={given}: expected a positive number of attention heads")
  notes = list(notes)
  keys = list(tensors)
  refuse_unsupported(keys)
  if is_hf_vitmae(keys):
    found = _from_hf(tensors, hf_config, posemb, notes)
  elif is_timm_vit(keys):
    found = _from_timm(tensors, posemb, notes)
  else:
    shown = ", ".join(sorted(keys)[:10]) + (f", ... ({len(keys)} keys)" if len(keys) > 10 else "")
    raise ValueError(
        "not a ViT checkpoint of a known layout: expected timm / official MAE names "
        "(cls_token, pos_embed, patch_embed.proj.weight, blocks.0.attn.qkv.weight, ...) or HF "
        f"ViTMAE names (vit.embeddings.cls_token, ...); found {shown}")

  params, patch = found["params"], found["patch_size"]
  act = _mlp_act(found, mlp_act, notes)
  mean, std = _normalisation(found, mean, std, notes)
  width = int(params["encoder"]["cls_token"].shape[-1])
  for name, given, recorded in (("num_heads", num_heads, found["num_heads"]),
                                ("decoder_num_heads", decoder_num_heads,
                                 found.get("decoder_num_heads"))):
    if given and recorded and given != recorded:  # HF's config.json records both
      raise ValueError(f"{name}={given} contradicts the checkpoint's config.json, which "
                       f"records {recorded}; leave it out (the qkv weights' shapes do not tell "
                       "the head count, so the wrong one would load and change every feature)")
  heads = _heads(num_heads or found["num_heads"] or found.get("num_heads_hint"), width,
                 HEADS_BY_WIDTH, "encoder", "--num_heads")
  decoder_heads = 0
  if decoder_num_heads and "decoder" not in params:
    raise ValueError(f"decoder_num_heads={decoder_num_heads}: these weights hold no MAE decoder "
                     "(an encoder or classifier checkpoint); leave it out")
  if "decoder" in params:
    decoder_width = int(params["decoder"]["mask_token"].shape[-1])
    decoder_heads = _heads(decoder_num_heads or found["decoder_num_heads"], decoder_width,
                           DECODER_HEADS_BY_WIDTH, "decoder", "--decoder_num_heads")
  size, grid = _image_size(image_size, patch, found["grid"])
  if grid != found["grid"]:
    if _has_rel_pos_bias(params["encoder"]):
      raise ValueError(f"image size {size}: these weights' relative position bias tables are for "
                       f"a {found['grid']} patch grid; resizing them is not supported, import "
                       "at the checkpoint's own size")
    if "pos_embed" in params["encoder"]:
      params["encoder"]["pos_embed"] = np.asarray(
          resize_posemb(jnp.asarray(params["encoder"]["pos_embed"]), found["grid"], grid))
      notes.append(f"pos_embed resized from a {found['grid']} to a {grid} patch grid (bicubic)")
    else:
      notes.append(f"fixed sin-cos positions computed for a {grid} patch grid (trained on "
                   f"{found['grid']})")
  model = ImportedModel(
      params=params, source=source, source_format=found["source_format"], patch_size=patch,
      channels=found["channels"], image_size=size, num_heads=heads,
      decoder_num_heads=decoder_heads, mask_ratio=found["mask_ratio"],
      norm_pix_loss=found["norm_pix_loss"], notes=notes,
      abs_posemb=found.get("abs_posemb", True), mlp_act=act, mean=mean, std=std)
  for note in notes:
    log.info("%s", note)
  return model


def import_checkpoint(path: str, *, key: Optional[str] = None, **kwargs) -> ImportedModel:
  """Reads a checkpoint file or Hugging Face directory and converts it (see
  `import_state_dict` for the keyword arguments). Nothing from the file is executed."""
  loaded = read_state_dict(path, key)
  notes = ([f"weights read from the top-level entry {loaded.container!r}"]
           if loaded.container else []) + loaded.skipped
  return import_state_dict(loaded.tensors, hf_config=loaded.hf_config, source=loaded.path,
                           notes=notes, **kwargs)
