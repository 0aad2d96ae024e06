"""PyTorch module layouts <-> Flax parameter layouts, shared by every converter.

  torch Linear   weight [out, in], bias [out]   <->  Dense {kernel [in, out], bias [out]}
  torch LayerNorm weight [D], bias [D]           <->  LayerNorm {scale [D], bias [D]}
  patch Conv2d   weight [D, C, p, p] (stride p)  <->  Dense kernel [p*p*C, D] over patches
                                                      flattened in (row, col, channel) order

and the checks every converter makes before it converts anything: every expected key present,
no unknown key, every shape as expected (`state_problems`), fixed position embeddings equal to
`vit.sincos_2d` (`check_sincos`). Nothing here imports torch: tensors are read through their
own `.detach()/.float()/.numpy()`.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np

from mim_jax.models.vit import sincos_2d

# Fixed embeddings must equal ours to this absolute tolerance (both are float64 sin/cos rounded
# to float32, so real checkpoints agree to the last bit; 1e-5 only allows for other roundings).
POSEMB_ATOL = 1e-5


def to_numpy(value: Any) -> np.ndarray:
  """A numpy array or torch tensor (any float dtype, incl. bfloat16) -> float32 numpy array."""
  if hasattr(value, "detach"):  # a torch.Tensor; duck-typed so torch is never imported here
    value = value.detach().to("cpu").float().numpy()
  return np.asarray(value, dtype=np.float32)


def f32(value: Any) -> np.ndarray:
  """A contiguous float32 numpy view or copy of a numpy / jax array."""
  return np.ascontiguousarray(np.asarray(value, dtype=np.float32))


def linear_from_torch(state: Mapping[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
  """torch Linear `key` (weight [out, in], bias [out]) -> Dense {kernel [in, out], bias}."""
  return {"kernel": state[f"{key}.weight"].T, "bias": state[f"{key}.bias"]}


def norm_from_torch(state: Mapping[str, np.ndarray], key: str) -> dict[str, np.ndarray]:
  """torch LayerNorm `key` -> flax LayerNorm {scale, bias}."""
  return {"scale": state[f"{key}.weight"], "bias": state[f"{key}.bias"]}


def linear_to_torch(out: dict, key: str, tree: Mapping[str, Any]) -> None:
  """Writes Dense `tree` into `out` as torch Linear `key`.weight [out, in] / `key`.bias."""
  out[f"{key}.weight"] = f32(tree["kernel"]).T
  out[f"{key}.bias"] = f32(tree["bias"])


def norm_to_torch(out: dict, key: str, tree: Mapping[str, Any]) -> None:
  out[f"{key}.weight"] = f32(tree["scale"])
  out[f"{key}.bias"] = f32(tree["bias"])


def patch_kernel_from_conv(conv: np.ndarray) -> np.ndarray:
  """Conv2d weight [D, C, p, p] -> Dense kernel [p*p*C, D] on (row, col, channel) patches.

  A stride-p convolution is a Dense layer on each flattened patch.
  """
  width, channels, p, _ = conv.shape
  return conv.transpose(2, 3, 1, 0).reshape(p * p * channels, width)


def patch_kernel_to_conv(kernel: Any, patch_size: int, channels: int) -> np.ndarray:
  """Dense kernel [p*p*C, D] -> Conv2d weight [D, C, p, p] (the inverse)."""
  kernel = f32(kernel)
  p = patch_size
  return np.ascontiguousarray(kernel.reshape(p, p, channels, -1).transpose(3, 2, 0, 1))


def sincos_difference(value: np.ndarray, width: int, grid_hw: tuple[int, int]) -> float:
  """max |value - sincos_2d| for a table [1, 1 + h*w, D] or [1 + h*w, D] (NaN -> inf)."""
  ours = sincos_2d(width, grid_hw, cls_token=True)
  err = float(np.max(np.abs(np.reshape(value, ours.shape) - ours)))
  return err if np.isfinite(err) else float("inf")


def check_sincos(name: str, value: np.ndarray, width: int, grid_hw: tuple[int, int],
                 hint: str = "") -> None:
  """Raises ValueError unless the table `name` is the fixed 2-D sin-cos embedding we compute."""
  err = sincos_difference(value, width, grid_hw)
  if not err <= POSEMB_ATOL:
    raise ValueError(
        f"{name} differs from the fixed 2-D sin-cos embedding mim_jax computes "
        f"(max abs difference {err:.3g} > {POSEMB_ATOL}); the converted model would compute a "
        "different function." + (f" {hint}" if hint else ""))


def materialize(tree: Any) -> Any:
  """Fresh contiguous float32 copies: no views into the caller's (or torch's) buffers."""
  if isinstance(tree, dict):
    return {k: materialize(v) for k, v in tree.items()}
  return np.array(tree, dtype=np.float32, order="C", copy=True)


def dim(state: Mapping[str, np.ndarray], candidates: Iterable[tuple[str, int]],
        default: int) -> int:
  """The first available of (key, axis) dims in `state`; malformed tensors are reported later."""
  for key, axis in candidates:
    value = state.get(key)
    if value is not None and -value.ndim <= axis < value.ndim:
      return int(value.shape[axis])
  return default


def count_indexed(keys: Iterable[str], prefix: str) -> int:
  """1 + the largest i of keys `prefix{i}.*` (0 if none): a missing middle block is then
  reported as missing keys rather than shortening the model."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  indices = [int(m.group(1)) for m in map(pattern.match, keys) if m]
  return 1 + max(indices) if indices else 0


def square_grid(num_patches: int, hint: str = "pass grid_hw") -> tuple[int, int]:
  """The (side, side) patch grid of `num_patches` position embeddings."""
  side = int(round(num_patches ** 0.5))
  if side * side != num_patches:
    raise ValueError(f"{num_patches} position embeddings do not form a square grid; {hint}")
  return side, side


def state_problems(state: Mapping[str, np.ndarray],
                   expected: Mapping[str, tuple[int, ...]]) -> list[str]:
  """Every missing key, unknown key and shape mismatch of `state` against `expected`."""
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
  return problems
