"""timm / official MAE / BEiT ViT state dicts <-> mim_jax params.

The official MAE code builds its encoder from timm's `VisionTransformer` blocks, so timm ViTs,
the MAE pre-training checkpoints (`mae_pretrain_vit_*.pth`, `*_full.pth` with the decoder) and
the MAE fine-tuned classifiers share one naming:

  timm / official MAE                            mim_jax
  cls_token [1, 1, D]                            encoder/cls_token
  pos_embed [1, 1+N, D]                          encoder/pos_embed [1+N, D] (posemb="learn"), or
                                                 nothing: checked equal to `vit.sincos_2d`
  patch_embed.proj Conv2d [D, C, p, p]           encoder/patch_embed Dense [p*p*C, D]
  blocks.{i}.norm1 / norm2                       encoder/transformer/blocks_{i}/norm1 / norm2
  blocks.{i}.attn.qkv Linear [3D, D]             .../attn/qkv [D, 3D] (q, k, v columns)
  blocks.{i}.attn.proj, mlp.fc1, mlp.fc2         .../attn/proj, mlp/fc1, mlp/fc2
  norm                                           encoder/transformer/norm
  fc_norm, head                                  `heads.ViTClassifier` fc_norm, head
  mask_token [1, 1, D] (no decoder)              encoder/mask_token (mask-token encoders)
  decoder_embed, mask_token [1, 1, D_dec]        decoder/decoder_embed, decoder/mask_token
  decoder_pos_embed [1, 1+N, D_dec]              nothing: checked equal to `vit.sincos_2d`
  decoder_blocks.{i}.*, decoder_norm             decoder/decoder/blocks_{i}/*, .../decoder_norm
  decoder_pred                                   decoder/decoder_pred

BEiT-style blocks (the official BEiT / BEiT v2 / data2vec / SimMIM checkpoints, timm's Beit)
convert exactly:
  blocks.{i}.gamma_1 / gamma_2 (timm ls1/ls2.gamma)  .../blocks_{i}/gamma_1 / gamma_2
                                                 (model.layer_scale > 0)
  blocks.{i}.attn.q_bias / v_bias                .../attn/qkv bias, zeros for k
  rel_pos_bias.relative_position_bias_table      encoder/transformer/rel_pos_bias/... (shared)
  blocks.{i}.attn.relative_position_bias_table   .../attn/rel_pos_bias/... (per_block)
  *.relative_position_index (buffers)            nothing: checked equal to ours
  no pos_embed (use_abs_pos_emb=False)           posemb="none"
  norm_pre (timm pre_norm=True, CLIP's ln_pre)   encoder/norm_pre (model.pre_norm)
A position table without a cls row (timm no_embed_class, e.g. DeiT III) gets a zero row for
it. Features mim_jax's ViT lacks are refused by name (`UNSUPPORTED`).

A state dict does not record timm's pooling: `norm` + `head` is read as global_pool="token"
(timm's default for ViTs); a model trained with global_pool="avg" and fc_norm=False (mean of
normed tokens) would need a pooling ViTClassifier does not have.

Pooling: timm's global_pool="token" keeps `norm` and reads the cls token (ViTClassifier
pool="cls"); global_pool="avg" (the official MAE fine-tuning) replaces `norm` by `fc_norm`
after the mean of the patch tokens (ViTClassifier pool="gap").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from mim_jax.convert.layouts import (
    check_sincos,
    count_indexed,
    dim,
    f32,
    linear_from_torch,
    linear_to_torch,
    materialize,
    norm_from_torch,
    norm_to_torch,
    patch_kernel_from_conv,
    patch_kernel_to_conv,
    square_grid,
    state_problems,
    to_numpy,
)
from mim_jax.models.attention import num_relative_positions, relative_position_index
from mim_jax.models.vit import sincos_2d

POSEMBS = ("sincos", "learn")

# Dotted name components of features mim_jax's ViT does not have -> what they are. A checkpoint
# holding any of them is refused with the keys named, rather than converted to a different
# function.
UNSUPPORTED = (
    (("reg_token",), "register tokens"),
    (("dist_token", "head_dist"), "a DeiT distillation token and head"),
    (("q_norm", "k_norm"), "query/key normalisation"),
    (("attn_pool",), "attention pooling (global_pool='map')"),
    (("lm_head",), "BEiT's visual-token prediction head"),
    (("mlp.norm", "attn.norm"), "normalisation inside attention or MLP (scale_*_norm)"),
)
_LIST_AT_MOST = 6


@dataclasses.dataclass(frozen=True)
class TimmLayout:
  """What a timm-named state dict holds, read from its keys and tensor shapes.

  `layer_scale` is "" (none), "gamma" (BEiT's gamma_1/gamma_2) or "ls" (timm's ls1/ls2.gamma);
  `cls_posemb` is False when pos_embed has no row for the cls token (timm no_embed_class, e.g.
  DeiT III); the decoder fields are 0 for encoder-only checkpoints; num_classes is 0 without a
  head.
  """
  width: int
  depth: int
  mlp_dim: int
  patch_size: int
  channels: int
  num_patches: int
  layer_scale: str = ""
  qv_bias: bool = False
  cls_posemb: bool = True
  final_norm: bool = True
  fc_norm: bool = False
  num_classes: int = 0
  encoder_mask_token: bool = False
  decoder_width: int = 0
  decoder_depth: int = 0
  decoder_mlp_dim: int = 0
  abs_posemb: bool = True
  pre_norm: bool = False      # norm_pre: a LayerNorm before the blocks (CLIP style)
  patch_bias: bool = True     # timm's pre_norm models have none
  rel_pos_bias: str = ""      # "" | "shared" | "per_block" (models.attention.REL_POS_BIAS)
  rel_pos_heads: int = 0

  @property
  def has_decoder(self) -> bool:
    return self.decoder_width > 0

  @property
  def pool(self) -> str:
    return "gap" if self.fc_norm else "cls"

  def describe(self) -> str:
    parts = [f"width {self.width}", f"depth {self.depth}", f"mlp {self.mlp_dim}",
             f"patch {self.patch_size}", f"{self.channels} channels",
             f"{self.num_patches} patches"]
    if self.has_decoder:
      parts.append(f"decoder width {self.decoder_width} depth {self.decoder_depth}")
    if self.num_classes:
      parts.append(f"{self.num_classes} classes")
    return ", ".join(parts)


def is_timm_vit(keys) -> bool:
  """Whether a state dict's keys use the timm / official MAE ViT names."""
  keys = set(keys)
  return "cls_token" in keys or "patch_embed.proj.weight" in keys or any(
      k.startswith("blocks.0.") for k in keys)


def refuse_unsupported(keys) -> None:
  """Raises ValueError naming the keys of any feature in `UNSUPPORTED`."""
  keys = sorted(keys)
  found = []
  for fragments, what in UNSUPPORTED:
    # Whole dotted components only: "q_norm" must not match a key "...freq_norm...".
    hits = [k for k in keys if any(f".{f}." in f".{k}." for f in fragments)]
    if hits:
      shown = ", ".join(hits[:_LIST_AT_MOST])
      more = f" and {len(hits) - _LIST_AT_MOST} more" if len(hits) > _LIST_AT_MOST else ""
      found.append(f"{shown}{more} ({len(hits)} key{'s' if len(hits) > 1 else ''}): {what}")
  if found:
    raise ValueError("checkpoint uses features mim_jax's ViT does not have, nothing was "
                     "converted:\n  " + "\n  ".join(found))


def _is_square(n: int) -> bool:
  return int(round(n ** 0.5)) ** 2 == n


def timm_layout(state: Mapping[str, np.ndarray]) -> TimmLayout:
  """Sizes and optional parts of a timm-named state dict (numpy values).

  Each size comes from the first key that has it, so that one missing key is reported once by
  `expected_timm_shapes` rather than as a cascade of shape mismatches.
  """
  keys = list(state)
  width = dim(state, [("cls_token", -1), ("patch_embed.proj.weight", 0), ("norm.weight", 0),
                      ("blocks.0.norm1.weight", 0)], 0)
  conv = state.get("patch_embed.proj.weight")
  patch, channels = (int(conv.shape[-1]), int(conv.shape[1])) if (
      conv is not None and conv.ndim == 4) else (16, 3)
  decoder = any(k.startswith("decoder_") for k in keys)
  decoder_width = dim(state, [("decoder_embed.weight", 0), ("decoder_norm.weight", 0),
                              ("mask_token", -1)], 0) if decoder else 0
  layer_scale = ("gamma" if any(k.endswith((".gamma_1", ".gamma_2")) for k in keys) else
                 "ls" if any(k.endswith((".ls1.gamma", ".ls2.gamma")) for k in keys) else "")
  rows = dim(state, [("pos_embed", 1)], 0)
  # A table of a square number of rows, one more than a square, has no cls row.
  cls_posemb = not (rows > 1 and _is_square(rows) and not _is_square(rows - 1))
  num_patches = rows - 1 if cls_posemb else rows
  rel_key = next((k for k in (SHARED_REL_TABLE, "blocks.0.attn.relative_position_bias_table")
                  if k in state), "")
  rel_rows = dim(state, [(rel_key, 0)], 0) if rel_key else 0
  if not rows and rel_rows > 3 and _is_square(rel_rows - 3):
    # (2s - 1)^2 offsets + 3 [CLS] entries for an s x s grid.
    num_patches = ((int(round((rel_rows - 3) ** 0.5)) + 1) // 2) ** 2
  elif not rows:
    num_patches = dim(state, [("decoder_pos_embed", 1)], 1) - 1
  return TimmLayout(
      width=width, depth=count_indexed(keys, "blocks."),
      mlp_dim=dim(state, [("blocks.0.mlp.fc1.weight", 0), ("blocks.0.mlp.fc1.bias", 0)],
                  4 * width),
      patch_size=patch, channels=channels, num_patches=num_patches,
      layer_scale=layer_scale, cls_posemb=cls_posemb,
      qv_bias=any(k.endswith((".attn.q_bias", ".attn.v_bias")) for k in keys),
      final_norm=any(k.startswith("norm.") for k in keys),
      fc_norm=any(k.startswith("fc_norm.") for k in keys),
      num_classes=dim(state, [("head.weight", 0), ("head.bias", 0)], 0),
      encoder_mask_token="mask_token" in state and not decoder,
      abs_posemb=rows > 0,
      pre_norm="norm_pre.weight" in state,
      patch_bias="patch_embed.proj.bias" in state or "norm_pre.weight" not in state,
      rel_pos_bias=("shared" if rel_key == SHARED_REL_TABLE else "per_block" if rel_key
                    else ""),
      rel_pos_heads=dim(state, [(rel_key, 1)], 0) if rel_key else 0,
      decoder_width=decoder_width,
      decoder_depth=count_indexed(keys, "decoder_blocks.") if decoder else 0,
      decoder_mlp_dim=dim(state, [("decoder_blocks.0.mlp.fc1.weight", 0),
                                  ("decoder_blocks.0.mlp.fc1.bias", 0)], 4 * decoder_width))


SHARED_REL_TABLE = "rel_pos_bias.relative_position_bias_table"


def _block_shapes(prefix: str, width: int, mlp_dim: int, layer_scale: str = "",
                  qv_bias: bool = False,
                  rel_table: tuple[int, ...] = ()) -> dict[str, tuple[int, ...]]:
  d, m = width, mlp_dim
  shapes = {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (m, d), f"{prefix}.mlp.fc1.bias": (m,),
            f"{prefix}.mlp.fc2.weight": (d, m), f"{prefix}.mlp.fc2.bias": (d,)}
  if qv_bias:
    shapes.update({f"{prefix}.attn.q_bias": (d,), f"{prefix}.attn.v_bias": (d,)})
  else:
    shapes[f"{prefix}.attn.qkv.bias"] = (3 * d,)
  if layer_scale:
    names = ("gamma_1", "gamma_2") if layer_scale == "gamma" else ("ls1.gamma", "ls2.gamma")
    shapes.update({f"{prefix}.{n}": (d,) for n in names})
  if rel_table:
    shapes[f"{prefix}.attn.relative_position_bias_table"] = rel_table
  return shapes


def expected_timm_shapes(layout: TimmLayout) -> dict[str, tuple[int, ...]]:
  """Every key a state dict with `layout` must hold -> its shape."""
  d, p, c, n = layout.width, layout.patch_size, layout.channels, layout.num_patches
  shapes = {"cls_token": (1, 1, d),
            "patch_embed.proj.weight": (d, c, p, p)}
  if layout.patch_bias:
    shapes["patch_embed.proj.bias"] = (d,)
  if layout.abs_posemb:
    shapes["pos_embed"] = (1, n + layout.cls_posemb, d)
  if layout.pre_norm:
    shapes.update({"norm_pre.weight": (d,), "norm_pre.bias": (d,)})
  rel_table = ()
  if layout.rel_pos_bias:
    rel_table = (num_relative_positions(square_grid(n)), layout.rel_pos_heads)
  if layout.rel_pos_bias == "shared":
    shapes[SHARED_REL_TABLE] = rel_table
  for i in range(layout.depth):
    shapes.update(_block_shapes(f"blocks.{i}", d, layout.mlp_dim, layout.layer_scale,
                                layout.qv_bias,
                                rel_table if layout.rel_pos_bias == "per_block" else ()))
  if layout.final_norm or not layout.fc_norm:
    shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
  if layout.fc_norm:
    shapes.update({"fc_norm.weight": (d,), "fc_norm.bias": (d,)})
  if layout.num_classes:
    shapes.update({"head.weight": (layout.num_classes, d), "head.bias": (layout.num_classes,)})
  if layout.encoder_mask_token:
    shapes["mask_token"] = (1, 1, d)
  if layout.has_decoder:
    dd = layout.decoder_width
    shapes.update({"decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
                   "mask_token": (1, 1, dd), "decoder_pos_embed": (1, 1 + n, dd),
                   "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,),
                   "decoder_pred.weight": (p * p * c, dd), "decoder_pred.bias": (p * p * c,)})
    for i in range(layout.decoder_depth):
      shapes.update(_block_shapes(f"decoder_blocks.{i}", dd, layout.decoder_mlp_dim))
  return shapes


def _block(state: Mapping[str, np.ndarray], prefix: str, layer_scale: str = "",
           qv_bias: bool = False, rel_table: bool = False) -> dict[str, Any]:
  """One timm / BEiT block -> one `models.vit.Block` param tree."""
  if qv_bias:
    q_bias = state[f"{prefix}.attn.q_bias"]
    qkv_bias = np.concatenate([q_bias, np.zeros_like(q_bias), state[f"{prefix}.attn.v_bias"]])
  else:
    qkv_bias = state[f"{prefix}.attn.qkv.bias"]
  block = {
      "norm1": norm_from_torch(state, f"{prefix}.norm1"),
      "attn": {"qkv": {"kernel": state[f"{prefix}.attn.qkv.weight"].T, "bias": qkv_bias},
               "proj": linear_from_torch(state, f"{prefix}.attn.proj")},
      "norm2": norm_from_torch(state, f"{prefix}.norm2"),
      "mlp": {"fc1": linear_from_torch(state, f"{prefix}.mlp.fc1"),
              "fc2": linear_from_torch(state, f"{prefix}.mlp.fc2")},
  }
  if layer_scale:
    names = ("gamma_1", "gamma_2") if layer_scale == "gamma" else ("ls1.gamma", "ls2.gamma")
    block["gamma_1"], block["gamma_2"] = (state[f"{prefix}.{n}"] for n in names)
  if rel_table:
    block["attn"]["rel_pos_bias"] = {
        "relative_position_bias_table": state[f"{prefix}.attn.relative_position_bias_table"]}
  return block


_POSEMB_HINT = ("Official MAE pre-training checkpoints hold exactly this fixed table; one that "
                "differs was trained with learned positions: import it with posemb='learn' "
                "(--posemb=learn) to keep its table as a learned `pos_embed` (fine-tuning "
                "then trains it further).")


def params_from_timm_vit(state_dict: Mapping[str, Any], *,
                         posemb: str = "sincos") -> tuple[dict[str, Any], TimmLayout]:
  """timm / official MAE / BEiT (absolute positions) state dict -> mim_jax params.

  Args:
    state_dict: name -> numpy array or torch tensor (the "model" entry of an official .pth,
      a timm state dict). Every key must be consumed.
    posemb: "sincos": `pos_embed` must equal the fixed 2-D sin-cos table (pre-training
      checkpoints) and is dropped, as `ViTEncoder(posemb="sincos")` computes it; "learn": it is
      kept as the learned `encoder/pos_embed` [1+N, D] of `ViTEncoder(posemb="learn")`.
      `decoder_pos_embed` is always checked: `MAEDecoder` has fixed positions.

  Returns:
    (params, layout): params holds "encoder" and, when present, "decoder" (a
    `MaskedAutoencoder` tree with "encoder") and "fc_norm" / "head" (a `ViTClassifier` tree
    with "encoder"), as float32 numpy arrays.

  Raises:
    ValueError naming the keys of unsupported features, every missing key, unknown key and
    shape mismatch, or a position table that differs from ours; nothing is converted partially.
  """
  if posemb not in POSEMBS:
    raise ValueError(f"posemb={posemb!r}: expected one of {POSEMBS}")
  state = {k: to_numpy(v) for k, v in state_dict.items()}
  refuse_unsupported(state)
  layout = timm_layout(state)
  _check_rel_index_buffers(state, layout)
  problems = state_problems(state, expected_timm_shapes(layout))
  if problems:
    raise ValueError(f"timm / MAE ViT state dict ({layout.describe()}) is not complete and "
                     "consistent:\n  " + "\n  ".join(problems))
  grid = square_grid(layout.num_patches, hint="only square patch grids are supported")

  encoder: dict[str, Any] = {
      "patch_embed": {"kernel": patch_kernel_from_conv(state["patch_embed.proj.weight"]),
                      # timm's pre_norm (CLIP) patch embedding has no bias: zeros add nothing
                      "bias": state.get("patch_embed.proj.bias",
                                        np.zeros(layout.width, np.float32))},
      "cls_token": state["cls_token"],
      "transformer": {f"blocks_{i}": _block(state, f"blocks.{i}", layout.layer_scale,
                                            layout.qv_bias, layout.rel_pos_bias == "per_block")
                      for i in range(layout.depth)},
  }
  if layout.final_norm:
    encoder["transformer"]["norm"] = norm_from_torch(state, "norm")
  if layout.pre_norm:
    encoder["norm_pre"] = norm_from_torch(state, "norm_pre")
  if layout.rel_pos_bias == "shared":
    encoder["transformer"]["rel_pos_bias"] = {
        "relative_position_bias_table": state[SHARED_REL_TABLE]}
  if layout.abs_posemb:
    table = state["pos_embed"][0]
    if not layout.cls_posemb:  # the cls token gets no position: a zero row adds nothing
      table = np.concatenate([np.zeros_like(table[:1]), table])
    if posemb == "learn":
      encoder["pos_embed"] = table
    else:
      check_sincos("pos_embed", table, layout.width, grid, hint=_POSEMB_HINT)
  if layout.encoder_mask_token:
    encoder["mask_token"] = state["mask_token"]
  params: dict[str, Any] = {"encoder": encoder}

  if layout.has_decoder:
    check_sincos("decoder_pos_embed", state["decoder_pos_embed"], layout.decoder_width, grid)
    blocks = {f"blocks_{i}": _block(state, f"decoder_blocks.{i}")
              for i in range(layout.decoder_depth)}
    blocks["decoder_norm"] = norm_from_torch(state, "decoder_norm")
    params["decoder"] = {"decoder_embed": linear_from_torch(state, "decoder_embed"),
                         "mask_token": state["mask_token"], "decoder": blocks,
                         "decoder_pred": linear_from_torch(state, "decoder_pred")}
  if layout.fc_norm:
    params["fc_norm"] = norm_from_torch(state, "fc_norm")
  if layout.num_classes:
    params["head"] = linear_from_torch(state, "head")
  return materialize(params), layout


def _check_rel_index_buffers(state: dict[str, np.ndarray], layout: TimmLayout) -> None:
  """Removes the `relative_position_index` buffers official BEiT checkpoints store, after
  checking each equals the index mim_jax computes (`attention.relative_position_index`): a table
  numbered another way would load without error and compute another function."""
  buffers = sorted(k for k in state if k.endswith("relative_position_index"))
  if not buffers:
    return
  grid = square_grid(layout.num_patches)
  ours = np.asarray(relative_position_index(grid, grid))[0]
  for key in buffers:
    value = state.pop(key)
    if value.shape != ours.shape or not np.array_equal(value.astype(np.int64), ours):
      raise ValueError(f"{key}: a relative position index numbered unlike BEiT's (shape "
                       f"{value.shape}, expected {ours.shape}); mim_jax reads tables in "
                       "BEiT's numbering only")


def _depth(tree: Mapping[str, Any]) -> int:
  return sum(1 for k in tree if re.fullmatch(r"blocks_\d+", k))


_ENCODER_PARTS = {"patch_embed", "cls_token", "transformer", "pos_embed", "mask_token",
                  "norm_pre"}


def timm_state_dict_from_params(params: Mapping[str, Any], *, patch_size: int, channels: int,
                                grid_hw: tuple[int, int],
                                encoder_mask_token: bool = False) -> dict[str, np.ndarray]:
  """mim_jax params -> timm / official MAE state dict (numpy float32), the inverse of
  `params_from_timm_vit` for plain blocks.

  `params` holds "encoder" and optionally "decoder" (written with the official MAE `*_full`
  names), "fc_norm" and "head"; with "fc_norm" (mean pooling) the encoder's unused final norm
  is left out, as timm's global_pool="avg" model has none. A fixed-position encoder gets the
  sin-cos table of `grid_hw` as `pos_embed` (timm adds whatever table it loads). An encoder
  `mask_token` is written only with `encoder_mask_token=True`: timm's ViT has none, and timm
  reads a top-level `mask_token` as a sign of a DINOv2 checkpoint.
  """
  enc = params["encoder"]
  unexpected = sorted(set(enc) - _ENCODER_PARTS)
  if unexpected:
    raise ValueError(f"encoder params with no timm ViT counterpart: {unexpected}")
  width = int(np.shape(enc["cls_token"])[-1])
  sd: dict[str, np.ndarray] = {}

  def put_block(prefix: str, tree: Mapping[str, Any]) -> None:
    norm_to_torch(sd, f"{prefix}.norm1", tree["norm1"])
    linear_to_torch(sd, f"{prefix}.attn.qkv", tree["attn"]["qkv"])
    linear_to_torch(sd, f"{prefix}.attn.proj", tree["attn"]["proj"])
    norm_to_torch(sd, f"{prefix}.norm2", tree["norm2"])
    linear_to_torch(sd, f"{prefix}.mlp.fc1", tree["mlp"]["fc1"])
    linear_to_torch(sd, f"{prefix}.mlp.fc2", tree["mlp"]["fc2"])

  sd["cls_token"] = f32(enc["cls_token"])
  table = enc["pos_embed"] if "pos_embed" in enc else sincos_2d(width, grid_hw, cls_token=True)
  sd["pos_embed"] = f32(table)[None]
  sd["patch_embed.proj.weight"] = patch_kernel_to_conv(enc["patch_embed"]["kernel"], patch_size,
                                                       channels)
  bias = f32(enc["patch_embed"]["bias"])
  if "norm_pre" not in enc:
    sd["patch_embed.proj.bias"] = bias
  elif np.any(bias):  # timm builds a pre_norm model's patch embedding without a bias
    raise ValueError("a pre_norm encoder with a non-zero patch-embedding bias has no timm "
                     "counterpart (timm's pre_norm=True patch embedding has no bias)")
  if "norm_pre" in enc:
    norm_to_torch(sd, "norm_pre", enc["norm_pre"])
  for i in range(_depth(enc["transformer"])):
    put_block(f"blocks.{i}", enc["transformer"][f"blocks_{i}"])
  if "norm" in enc["transformer"] and "fc_norm" not in params:
    # A mean-pooling classifier never applies the final norm (timm: Identity, no weights).
    norm_to_torch(sd, "norm", enc["transformer"]["norm"])
  if "mask_token" in enc and encoder_mask_token:
    if "decoder" in params:
      raise ValueError("an encoder mask_token and an MAE decoder cannot share the official "
                       "name `mask_token`")
    sd["mask_token"] = f32(enc["mask_token"])

  if "decoder" in params:
    dec = params["decoder"]
    decoder_width = int(np.shape(dec["mask_token"])[-1])
    linear_to_torch(sd, "decoder_embed", dec["decoder_embed"])
    sd["mask_token"] = f32(dec["mask_token"])
    sd["decoder_pos_embed"] = sincos_2d(decoder_width, grid_hw, cls_token=True)[None]
    for i in range(_depth(dec["decoder"])):
      put_block(f"decoder_blocks.{i}", dec["decoder"][f"blocks_{i}"])
    norm_to_torch(sd, "decoder_norm", dec["decoder"]["decoder_norm"])
    linear_to_torch(sd, "decoder_pred", dec["decoder_pred"])
  if "fc_norm" in params:
    norm_to_torch(sd, "fc_norm", params["fc_norm"])
  if "head" in params:
    linear_to_torch(sd, "head", params["head"])
  # Writable copies that own their memory (views of read-only jax buffers make torch warn).
  return {k: np.array(v, dtype=np.float32, order="C", copy=True) for k, v in sd.items()}
