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

from mim_jax.models.vit import sincos_2d

# Fixed embeddings must equal ours to this absolute tolerance (both are float64 sin/cos rounded
# to float32, so real checkpoints agree to the last bit; 1e-5 only allows for other roundings).
POSEMB_ATOL = 1e-5

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


def _to_numpy(value: Any) -> np.ndarray:
  """A numpy array or torch tensor (any float dtype, incl. bfloat16) -> float32 numpy array."""
  if hasattr(value, "detach"):  # a torch.Tensor; duck-typed so torch is never imported here
    value = value.detach().to("cpu").float().numpy()
  return np.asarray(value, dtype=np.float32)


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


def _dim(state: Mapping[str, np.ndarray], candidates, default: int) -> int:
  """The first available of (key, axis) dims in `state`; malformed tensors are reported later."""
  for key, axis in candidates:
    value = state.get(key)
    if value is not None and -value.ndim <= axis < value.ndim:
      return int(value.shape[axis])
  return default


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


def _square_grid(num_patches: int) -> tuple[int, int]:
  side = int(round(num_patches ** 0.5))
  if side * side != num_patches:
    raise ValueError(f"{num_patches} position embeddings do not form a square grid; pass grid_hw")
  return side, side


def _linear(state, key: str) -> dict[str, np.ndarray]:
  """torch Linear (weight [out, in], bias [out]) -> flax Dense {kernel [in, out], bias [out]}."""
  return {"kernel": state[f"{key}.weight"].T, "bias": state[f"{key}.bias"]}


def _norm(state, key: str) -> dict[str, np.ndarray]:
  return {"scale": state[f"{key}.weight"], "bias": state[f"{key}.bias"]}


def _block(state, prefix: str) -> dict[str, Any]:
  """One HF ViTMAELayer -> one `models.vit.Block` param tree."""
  # Our attention reshapes the fused output as [3, heads, head_dim]: q columns, then k, then v,
  # each split into heads contiguously exactly as HF's `.view(..., heads, head_dim)` does.
  qkv_kernel = np.concatenate(
      [state[f"{prefix}.attention.{n}_proj.weight"].T for n in "qkv"], axis=1)
  qkv_bias = np.concatenate([state[f"{prefix}.attention.{n}_proj.bias"] for n in "qkv"])
  return {
      "attn": {"qkv": {"kernel": qkv_kernel, "bias": qkv_bias},
               "proj": _linear(state, f"{prefix}.attention.o_proj")},
      "norm1": _norm(state, f"{prefix}.layernorm_before"),
      "norm2": _norm(state, f"{prefix}.layernorm_after"),
      "mlp": {"fc1": _linear(state, f"{prefix}.mlp.fc1"),
              "fc2": _linear(state, f"{prefix}.mlp.fc2")},
  }


def _check_posemb(name: str, value: np.ndarray, width: int, grid_hw: tuple[int, int]) -> None:
  ours = sincos_2d(width, grid_hw, cls_token=True)
  err = float(np.max(np.abs(value[0] - ours)))
  if not err <= POSEMB_ATOL:  # also catches NaN
    raise ValueError(
        f"{name} differs from the fixed 2-D sin-cos embedding mim_jax computes "
        f"(max abs difference {err:.3g} > {POSEMB_ATOL}); the converted model would compute a "
        "different function. (A ViTMAE built from scratch by some transformers versions has "
        "all-zero position embeddings.)")


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
  state = {k: _to_numpy(v) for k, v in state_dict.items()}
  legacy = _is_legacy(state)
  if legacy:
    state = {_rename_legacy(k): v for k, v in state.items()}

  # Sizes come from the tensors, each from the first key that has it, so that one missing key is
  # reported once rather than as a cascade of shape mismatches.
  width = _dim(state, [("vit.embeddings.cls_token", -1), ("vit.layernorm.weight", 0),
                       ("vit.embeddings.patch_embeddings.projection.weight", 0)], 0)
  decoder_width = _dim(state, [("decoder.mask_token", -1), ("decoder.decoder_norm.weight", 0),
                               ("decoder.decoder_embed.weight", 0)], 0)
  mlp_dim = _dim(state, [("vit.layers.0.mlp.fc1.weight", 0), ("vit.layers.0.mlp.fc1.bias", 0)],
                 4 * width)
  decoder_mlp_dim = _dim(state, [("decoder.decoder_layers.0.mlp.fc1.weight", 0),
                                 ("decoder.decoder_layers.0.mlp.fc1.bias", 0)], 4 * decoder_width)
  num_patches = _dim(state, [("vit.embeddings.position_embeddings", 1),
                             ("decoder.decoder_pos_embed", 1)], 1) - 1
  expected = expected_hf_shapes(
      width=width, mlp_dim=mlp_dim, decoder_width=decoder_width, decoder_mlp_dim=decoder_mlp_dim,
      patch_size=patch_size, channels=channels, num_patches=num_patches,
      encoder_depth=encoder_depth, decoder_depth=decoder_depth)

  problems = []
  missing = sorted(set(expected) - set(state))
  unknown = sorted(set(state) - set(expected))
  if missing:
    problems.append("missing keys: " + ", ".join(missing))
  if unknown:
    problems.append("unknown keys: " + ", ".join(unknown))
  bad = [f"{k}: got {tuple(state[k].shape)}, expected {expected[k]}"
         for k in sorted(set(expected) & set(state)) if tuple(state[k].shape) != expected[k]]
  if bad:
    problems.append("shape mismatches: " + "; ".join(bad))
  if problems:
    raise ValueError(
        f"HF ViTMAE state dict does not match patch_size={patch_size}, channels={channels}, "
        f"encoder_depth={encoder_depth}, decoder_depth={decoder_depth} "
        f"(width {width}, decoder width {decoder_width})"
        + (", after renaming transformers 4.x keys to 5.x names" if legacy else "")
        + ":\n  " + "\n  ".join(problems))

  grid = tuple(grid_hw) if grid_hw is not None else _square_grid(num_patches)
  if grid[0] * grid[1] != num_patches:
    raise ValueError(f"grid_hw={grid} has {grid[0] * grid[1]} patches, the position embeddings "
                     f"{num_patches}")
  _check_posemb("vit.embeddings.position_embeddings",
                state["vit.embeddings.position_embeddings"], width, grid)
  _check_posemb("decoder.decoder_pos_embed", state["decoder.decoder_pos_embed"], decoder_width,
                grid)

  conv = state["vit.embeddings.patch_embeddings.projection.weight"]  # [D, C, kh, kw]
  # A stride-p conv is a Dense on each flattened patch; our patches flatten as (row, col, chan).
  patch_kernel = conv.transpose(2, 3, 1, 0).reshape(patch_size * patch_size * channels, width)
  encoder = {
      "patch_embed": {"kernel": patch_kernel,
                      "bias": state["vit.embeddings.patch_embeddings.projection.bias"]},
      "cls_token": state["vit.embeddings.cls_token"],
      "transformer": {f"blocks_{i}": _block(state, f"vit.layers.{i}")
                      for i in range(encoder_depth)},
  }
  encoder["transformer"]["norm"] = _norm(state, "vit.layernorm")
  decoder_blocks = {f"blocks_{i}": _block(state, f"decoder.decoder_layers.{i}")
                    for i in range(decoder_depth)}
  decoder_blocks["decoder_norm"] = _norm(state, "decoder.decoder_norm")
  decoder = {
      "decoder_embed": _linear(state, "decoder.decoder_embed"),
      "mask_token": state["decoder.mask_token"],
      "decoder": decoder_blocks,
      "decoder_pred": _linear(state, "decoder.decoder_pred"),
  }
  return {"encoder": _materialize(encoder), "decoder": _materialize(decoder)}


def _materialize(tree):
  """Fresh contiguous float32 copies: no views into the caller's (or torch's) buffers."""
  if isinstance(tree, dict):
    return {k: _materialize(v) for k, v in tree.items()}
  return np.array(tree, dtype=np.float32, order="C", copy=True)


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
  np32 = lambda x: np.ascontiguousarray(np.asarray(x, dtype=np.float32))
  width = int(np.shape(enc["cls_token"])[-1])
  decoder_width = int(np.shape(dec["mask_token"])[-1])
  sd = {}

  def put_linear(key, tree):
    sd[f"{key}.weight"] = np32(tree["kernel"]).T
    sd[f"{key}.bias"] = np32(tree["bias"])

  def put_norm(key, tree):
    sd[f"{key}.weight"] = np32(tree["scale"])
    sd[f"{key}.bias"] = np32(tree["bias"])

  def put_block(prefix, tree):
    kernel, bias = np32(tree["attn"]["qkv"]["kernel"]), np32(tree["attn"]["qkv"]["bias"])
    for j, n in enumerate("qkv"):
      d = kernel.shape[0]
      sd[f"{prefix}.attention.{n}_proj.weight"] = kernel[:, j * d:(j + 1) * d].T
      sd[f"{prefix}.attention.{n}_proj.bias"] = bias[j * d:(j + 1) * d]
    put_linear(f"{prefix}.attention.o_proj", tree["attn"]["proj"])
    put_norm(f"{prefix}.layernorm_before", tree["norm1"])
    put_norm(f"{prefix}.layernorm_after", tree["norm2"])
    put_linear(f"{prefix}.mlp.fc1", tree["mlp"]["fc1"])
    put_linear(f"{prefix}.mlp.fc2", tree["mlp"]["fc2"])

  sd["vit.embeddings.cls_token"] = np32(enc["cls_token"])
  sd["vit.embeddings.position_embeddings"] = sincos_2d(width, grid_hw, cls_token=True)[None]
  kernel = np32(enc["patch_embed"]["kernel"])  # [p*p*C, D]
  sd["vit.embeddings.patch_embeddings.projection.weight"] = np.ascontiguousarray(
      kernel.reshape(patch_size, patch_size, channels, width).transpose(3, 2, 0, 1))
  sd["vit.embeddings.patch_embeddings.projection.bias"] = np32(enc["patch_embed"]["bias"])
  for i in range(_depth(enc["transformer"])):
    put_block(f"vit.layers.{i}", enc["transformer"][f"blocks_{i}"])
  put_norm("vit.layernorm", enc["transformer"]["norm"])

  sd["decoder.mask_token"] = np32(dec["mask_token"])
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
