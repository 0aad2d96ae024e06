"""Hugging Face `ViTMAEForPreTraining` weights <-> mim_jax `MaskedAutoencoder` params.

HF keeps the official MAE's modules but names and lays them out the PyTorch way:

  HF (transformers >= 5 names)                     mim_jax
  vit.embeddings.patch_embeddings.projection       encoder/patch_embed
      Conv2d weight [D, C, p, p], bias [D]             Dense kernel [p*p*C, D] (row, col, channel)
  vit.embeddings.cls_token [1, 1, D]               encoder/cls_token [1, 1, D]
  vit.embeddings.position_embeddings [1, 1+N, D]   (none: fixed sin-cos, `vit.sincos_2d`)
  vit.layers.{i}.attention.{q,k,v}_proj            encoder/transformer/blocks_{i}/attn/qkv
      3 x Linear weight [D, D], bias [D]               kernel [D, 3D] (q, k, v), bias [3D]
  vit.layers.{i}.attention.o_proj                  .../attn/proj
  vit.layers.{i}.layernorm_before / _after         .../norm1 / norm2 (weight -> scale)
  vit.layers.{i}.mlp.fc1 / fc2                     .../mlp/fc1 / fc2
  vit.layernorm                                    encoder/transformer/norm
  decoder.decoder_embed, decoder.mask_token        decoder/decoder_embed, decoder/mask_token
  decoder.decoder_pos_embed [1, 1+N, D_dec]        (none: fixed sin-cos)
  decoder.decoder_layers.{i}.*                     decoder/decoder/blocks_{i}/* (as above)
  decoder.decoder_norm                             decoder/decoder/decoder_norm
  decoder.decoder_pred                             decoder/decoder_pred

Every torch Linear weight [out, in] becomes a Dense kernel [in, out]. Checkpoints saved by
transformers 4.x (and those on the Hub) use the older names (`vit.encoder.layer.{i}.attention.
attention.query`, `attention.output.dense`, `intermediate.dense`, `output.dense`); they are
accepted too and renamed first, the way transformers 5 itself renames them on load.

What a state dict cannot carry must match by construction: the HF config must use exact GELU
(`hidden_act="gelu"`) and `layer_norm_eps=1e-6` like the official MAE and `models.vit`. (HF's
*default* ViTMAEConfig has layer_norm_eps=1e-12, and its Hub configs for the released MAE
weights carry that too; the weights were trained with 1e-6.)

Nothing here imports torch: tensors are read through their own `.detach()/.float()/.numpy()`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import numpy as np

from mim_jax.convert.layouts import (
    POSEMB_ATOL,
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
from mim_jax.models.vit import sincos_2d

__all__ = ["POSEMB_ATOL", "expected_hf_shapes", "hf_vitmae_config", "hf_vitmae_geometry",
           "hf_vitmae_state_dict_from_params", "is_hf_vitmae", "params_from_hf_vitmae"]

_PATCH_CONV = "vit.embeddings.patch_embeddings.projection.weight"

# transformers 4.x names -> transformers 5 names (the renames of transformers' own
# conversion_mapping for ViTMAEForPreTraining, plus the `encoder.layer.` -> `layers.` move).
_LEGACY_RENAMES = (
    (re.compile(r"^vit\.encoder\.layer\.(\d+)\."), r"vit.layers.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
)


def _is_legacy(keys) -> bool:
  return any(k.startswith("vit.encoder.layer.") or ".attention.attention." in k for k in keys)


def _rename_legacy(key: str) -> str:
  for pattern, repl in _LEGACY_RENAMES:
    key = pattern.sub(repl, key)
  return key


def _to_legacy(key: str) -> str:
  """transformers 5 name -> transformers 4.x name (the inverse of `_rename_legacy`)."""
  key = re.sub(r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1.", key)
  for new, old in ((".attention.q_proj.", ".attention.attention.query."),
                   (".attention.k_proj.", ".attention.attention.key."),
                   (".attention.v_proj.", ".attention.attention.value."),
                   (".attention.o_proj.", ".attention.output.dense."),
                   (".mlp.fc1.", ".intermediate.dense."),
                   (".mlp.fc2.", ".output.dense.")):
    key = key.replace(new, old)
  return key


def is_hf_vitmae(keys) -> bool:
  """Whether a state dict's keys use HF ViTMAEForPreTraining names (either transformers)."""
  return any(k.startswith(("vit.embeddings.", "vit.layers.", "vit.encoder.layer.")) for k in keys)


def hf_vitmae_geometry(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """patch_size, channels, encoder_depth, decoder_depth of an HF ViTMAE state dict (4.x or 5
  names), read from the patch projection [D, C, p, p] and the highest layer indices; the
  arguments `params_from_hf_vitmae` needs, which then checks every tensor against them."""
  keys = [_rename_legacy(k) for k in state_dict] if _is_legacy(state_dict) else list(state_dict)
  conv = state_dict.get(_PATCH_CONV)
  shape = tuple(getattr(conv, "shape", ()))
  if len(shape) != 4 or shape[2] != shape[3]:
    raise ValueError(f"HF ViTMAE state dict: {_PATCH_CONV} should be a square Conv2d weight "
                     f"[D, C, p, p], got {shape if conv is not None else 'no such key'}")
  return {"patch_size": int(shape[2]), "channels": int(shape[1]),
          "encoder_depth": count_indexed(keys, "vit.layers."),
          "decoder_depth": count_indexed(keys, "decoder.decoder_layers.")}


def hf_vitmae_config(params: Mapping[str, Any], *, patch_size: int, channels: int,
                     image_size: int, num_heads: int, decoder_num_heads: int,
                     mask_ratio: float = 0.75, norm_pix_loss: bool = False) -> dict[str, Any]:
  """The config.json of `ViTMAEForPreTraining` for `MaskedAutoencoder` params.

  Exact GELU and LayerNorm eps 1e-6 are what `models.vit` computes (HF's defaults differ).
  """
  enc, dec = params["encoder"], params["decoder"]
  width = int(np.shape(enc["cls_token"])[-1])
  decoder_width = int(np.shape(dec["mask_token"])[-1])
  first_mlp = lambda tree: int(np.shape(tree["blocks_0"]["mlp"]["fc1"]["kernel"])[-1])
  return {
      "architectures": ["ViTMAEForPreTraining"], "model_type": "vit_mae",
      "image_size": int(image_size), "patch_size": int(patch_size),
      "num_channels": int(channels), "hidden_size": width,
      "num_hidden_layers": _depth(enc["transformer"]), "num_attention_heads": int(num_heads),
      "intermediate_size": first_mlp(enc["transformer"]),
      "decoder_hidden_size": decoder_width, "decoder_num_hidden_layers": _depth(dec["decoder"]),
      "decoder_num_attention_heads": int(decoder_num_heads),
      "decoder_intermediate_size": first_mlp(dec["decoder"]),
      "hidden_act": "gelu", "layer_norm_eps": 1e-6, "qkv_bias": True,
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
      "initializer_range": 0.02, "mask_ratio": float(mask_ratio),
      "norm_pix_loss": bool(norm_pix_loss), "torch_dtype": "float32",
  }


def _layer_shapes(prefix: str, width: int, mlp_dim: int) -> dict[str, tuple[int, ...]]:
  """Expected HF shapes of one ViTMAELayer under `prefix` (e.g. 'vit.layers.0')."""
  shapes = {}
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    shapes[f"{prefix}.attention.{name}.weight"] = (width, width)
    shapes[f"{prefix}.attention.{name}.bias"] = (width,)
  for name in ("layernorm_before", "layernorm_after"):
    shapes[f"{prefix}.{name}.weight"] = (width,)
    shapes[f"{prefix}.{name}.bias"] = (width,)
  shapes[f"{prefix}.mlp.fc1.weight"] = (mlp_dim, width)
  shapes[f"{prefix}.mlp.fc1.bias"] = (mlp_dim,)
  shapes[f"{prefix}.mlp.fc2.weight"] = (width, mlp_dim)
  shapes[f"{prefix}.mlp.fc2.bias"] = (width,)
  return shapes


def expected_hf_shapes(*, width: int, mlp_dim: int, decoder_width: int, decoder_mlp_dim: int,
                       patch_size: int, channels: int, num_patches: int, encoder_depth: int,
                       decoder_depth: int) -> dict[str, tuple[int, ...]]:
  """Every key of an HF ViTMAEForPreTraining state dict (transformers 5 names) -> its shape."""
  d, dd, p, c = width, decoder_width, patch_size, channels
  shapes = {
      "vit.embeddings.cls_token": (1, 1, d),
      "vit.embeddings.position_embeddings": (1, 1 + num_patches, d),
      "vit.embeddings.patch_embeddings.projection.weight": (d, c, p, p),
      "vit.embeddings.patch_embeddings.projection.bias": (d,),
      "vit.layernorm.weight": (d,),
      "vit.layernorm.bias": (d,),
      "decoder.mask_token": (1, 1, dd),
      "decoder.decoder_pos_embed": (1, 1 + num_patches, dd),
      "decoder.decoder_embed.weight": (dd, d),
      "decoder.decoder_embed.bias": (dd,),
      "decoder.decoder_norm.weight": (dd,),
      "decoder.decoder_norm.bias": (dd,),
      "decoder.decoder_pred.weight": (p * p * c, dd),
      "decoder.decoder_pred.bias": (p * p * c,),
  }
  for i in range(encoder_depth):
    shapes.update(_layer_shapes(f"vit.layers.{i}", d, mlp_dim))
  for i in range(decoder_depth):
    shapes.update(_layer_shapes(f"decoder.decoder_layers.{i}", dd, decoder_mlp_dim))
  return shapes


def _block(state, prefix: str) -> dict[str, Any]:
  """One HF ViTMAELayer -> one `models.vit.Block` param tree."""
  # Our attention reshapes the fused output as [3, heads, head_dim]: q columns, then k, then v,
  # each split into heads contiguously exactly as HF's `.view(..., heads, head_dim)` does.
  qkv_kernel = np.concatenate(
      [state[f"{prefix}.attention.{n}_proj.weight"].T for n in "qkv"], axis=1)
  qkv_bias = np.concatenate([state[f"{prefix}.attention.{n}_proj.bias"] for n in "qkv"])
  return {
      "attn": {"qkv": {"kernel": qkv_kernel, "bias": qkv_bias},
               "proj": linear_from_torch(state, f"{prefix}.attention.o_proj")},
      "norm1": norm_from_torch(state, f"{prefix}.layernorm_before"),
      "norm2": norm_from_torch(state, f"{prefix}.layernorm_after"),
      "mlp": {"fc1": linear_from_torch(state, f"{prefix}.mlp.fc1"),
              "fc2": linear_from_torch(state, f"{prefix}.mlp.fc2")},
  }


def _check_posemb(name: str, value: np.ndarray, width: int, grid_hw: tuple[int, int]) -> None:
  check_sincos(name, value, width, grid_hw,
               hint="(A ViTMAE built from scratch by some transformers versions has all-zero "
               "position embeddings.)")


def params_from_hf_vitmae(state_dict: Mapping[str, Any], *, patch_size: int, channels: int,
                          encoder_depth: int, decoder_depth: int,
                          grid_hw: Optional[tuple[int, int]] = None) -> dict[str, Any]:
  """HF ViTMAEForPreTraining state dict -> `MaskedAutoencoder` params (numpy float32).

  Args:
    state_dict: name -> numpy array or torch tensor, e.g. `model.state_dict()` or a loaded
      safetensors file, with transformers 5 or 4.x (Hub) names. Every key must be consumed.
    patch_size, channels: the patch size p and image channels C (HF `patch_size`,
      `num_channels`); they fix the patch-embedding layout [D, C, p, p] -> [p*p*C, D].
    encoder_depth, decoder_depth: HF `num_hidden_layers`, `decoder_num_hidden_layers`.
    grid_hw: the patch grid (H/p, W/p); by default the square grid of the position embeddings.

  Returns:
    {"encoder": ..., "decoder": ...}, the param tree of `MaskedAutoencoder(ViTEncoder(...),
    MAEDecoder(...))` with widths and MLP sizes taken from the tensors.

  Raises:
    ValueError listing every missing key, unknown key and shape mismatch (nothing is converted
    partially), or naming a fixed position embedding that differs from `vit.sincos_2d`.
  """
  state = {k: to_numpy(v) for k, v in state_dict.items()}
  legacy = _is_legacy(state)
  if legacy:
    state = {_rename_legacy(k): v for k, v in state.items()}

  # Sizes come from the tensors, each from the first key that has it, so that one missing key is
  # reported once rather than as a cascade of shape mismatches.
  width = dim(state, [("vit.embeddings.cls_token", -1), ("vit.layernorm.weight", 0),
                       ("vit.embeddings.patch_embeddings.projection.weight", 0)], 0)
  decoder_width = dim(state, [("decoder.mask_token", -1), ("decoder.decoder_norm.weight", 0),
                               ("decoder.decoder_embed.weight", 0)], 0)
  mlp_dim = dim(state, [("vit.layers.0.mlp.fc1.weight", 0), ("vit.layers.0.mlp.fc1.bias", 0)],
                 4 * width)
  decoder_mlp_dim = dim(state, [("decoder.decoder_layers.0.mlp.fc1.weight", 0),
                                 ("decoder.decoder_layers.0.mlp.fc1.bias", 0)], 4 * decoder_width)
  num_patches = dim(state, [("vit.embeddings.position_embeddings", 1),
                             ("decoder.decoder_pos_embed", 1)], 1) - 1
  expected = expected_hf_shapes(
      width=width, mlp_dim=mlp_dim, decoder_width=decoder_width, decoder_mlp_dim=decoder_mlp_dim,
      patch_size=patch_size, channels=channels, num_patches=num_patches,
      encoder_depth=encoder_depth, decoder_depth=decoder_depth)

  problems = state_problems(state, expected)
  if problems:
    raise ValueError(
        f"HF ViTMAE state dict does not match patch_size={patch_size}, channels={channels}, "
        f"encoder_depth={encoder_depth}, decoder_depth={decoder_depth} "
        f"(width {width}, decoder width {decoder_width})"
        + (", after renaming transformers 4.x keys to 5.x names" if legacy else "")
        + ":\n  " + "\n  ".join(problems))

  grid = tuple(grid_hw) if grid_hw is not None else square_grid(num_patches)
  if grid[0] * grid[1] != num_patches:
    raise ValueError(f"grid_hw={grid} has {grid[0] * grid[1]} patches, the position embeddings "
                     f"{num_patches}")
  _check_posemb("vit.embeddings.position_embeddings",
                state["vit.embeddings.position_embeddings"], width, grid)
  _check_posemb("decoder.decoder_pos_embed", state["decoder.decoder_pos_embed"], decoder_width,
                grid)

  patch_kernel = patch_kernel_from_conv(state["vit.embeddings.patch_embeddings.projection.weight"])
  encoder = {
      "patch_embed": {"kernel": patch_kernel,
                      "bias": state["vit.embeddings.patch_embeddings.projection.bias"]},
      "cls_token": state["vit.embeddings.cls_token"],
      "transformer": {f"blocks_{i}": _block(state, f"vit.layers.{i}")
                      for i in range(encoder_depth)},
  }
  encoder["transformer"]["norm"] = norm_from_torch(state, "vit.layernorm")
  decoder_blocks = {f"blocks_{i}": _block(state, f"decoder.decoder_layers.{i}")
                    for i in range(decoder_depth)}
  decoder_blocks["decoder_norm"] = norm_from_torch(state, "decoder.decoder_norm")
  decoder = {
      "decoder_embed": linear_from_torch(state, "decoder.decoder_embed"),
      "mask_token": state["decoder.mask_token"],
      "decoder": decoder_blocks,
      "decoder_pred": linear_from_torch(state, "decoder.decoder_pred"),
  }
  return {"encoder": materialize(encoder), "decoder": materialize(decoder)}


def _depth(tree: Mapping[str, Any]) -> int:
  return sum(1 for k in tree if re.fullmatch(r"blocks_\d+", k))


def hf_vitmae_state_dict_from_params(params: Mapping[str, Any], *, patch_size: int, channels: int,
                                     grid_hw: tuple[int, int],
                                     legacy_names: bool = False) -> dict[str, np.ndarray]:
  """`MaskedAutoencoder` params -> HF ViTMAEForPreTraining state dict (numpy float32).

  The inverse of `params_from_hf_vitmae`. Depths and widths come from `params`; `grid_hw` is the
  patch grid (H/p, W/p), needed to write HF's fixed position-embedding buffers. Keys use the
  transformers 5 names, or the 4.x ones with `legacy_names=True`. Load into torch with
  `model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.
  """
  enc, dec = params["encoder"], params["decoder"]
  unexpected = sorted(set(enc) - {"patch_embed", "cls_token", "transformer"})
  if unexpected:  # e.g. a SimMIM-style encoder `mask_token`: HF's ViTMAE has no such weight
    raise ValueError(f"encoder params with no HF ViTMAE counterpart: {unexpected}")
  width = int(np.shape(enc["cls_token"])[-1])
  decoder_width = int(np.shape(dec["mask_token"])[-1])
  sd = {}
  put_linear = lambda key, tree: linear_to_torch(sd, key, tree)
  put_norm = lambda key, tree: norm_to_torch(sd, key, tree)

  def put_block(prefix, tree):
    kernel, bias = f32(tree["attn"]["qkv"]["kernel"]), f32(tree["attn"]["qkv"]["bias"])
    for j, n in enumerate("qkv"):
      d = kernel.shape[0]
      sd[f"{prefix}.attention.{n}_proj.weight"] = kernel[:, j * d:(j + 1) * d].T
      sd[f"{prefix}.attention.{n}_proj.bias"] = bias[j * d:(j + 1) * d]
    put_linear(f"{prefix}.attention.o_proj", tree["attn"]["proj"])
    put_norm(f"{prefix}.layernorm_before", tree["norm1"])
    put_norm(f"{prefix}.layernorm_after", tree["norm2"])
    put_linear(f"{prefix}.mlp.fc1", tree["mlp"]["fc1"])
    put_linear(f"{prefix}.mlp.fc2", tree["mlp"]["fc2"])

  sd["vit.embeddings.cls_token"] = f32(enc["cls_token"])
  sd["vit.embeddings.position_embeddings"] = sincos_2d(width, grid_hw, cls_token=True)[None]
  sd["vit.embeddings.patch_embeddings.projection.weight"] = patch_kernel_to_conv(
      enc["patch_embed"]["kernel"], patch_size, channels)
  sd["vit.embeddings.patch_embeddings.projection.bias"] = f32(enc["patch_embed"]["bias"])
  for i in range(_depth(enc["transformer"])):
    put_block(f"vit.layers.{i}", enc["transformer"][f"blocks_{i}"])
  put_norm("vit.layernorm", enc["transformer"]["norm"])

  sd["decoder.mask_token"] = f32(dec["mask_token"])
  sd["decoder.decoder_pos_embed"] = sincos_2d(decoder_width, grid_hw, cls_token=True)[None]
  put_linear("decoder.decoder_embed", dec["decoder_embed"])
  for i in range(_depth(dec["decoder"])):
    put_block(f"decoder.decoder_layers.{i}", dec["decoder"][f"blocks_{i}"])
  put_norm("decoder.decoder_norm", dec["decoder"]["decoder_norm"])
  put_linear("decoder.decoder_pred", dec["decoder_pred"])

  # Writable copies that own their memory: views of (read-only) jax buffers would make
  # `torch.from_numpy` warn, and writing into them would be undefined.
  sd = {k: np.array(v, dtype=np.float32, order="C", copy=True) for k, v in sd.items()}
  return {_to_legacy(k): v for k, v in sd.items()} if legacy_names else sd
