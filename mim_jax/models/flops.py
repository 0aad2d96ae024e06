"""Analytic model FLOPs, per image (for throughput, MFU and compute-matched baselines).

Each method counts its own (`Method.forward_flops`) with the helpers here.

Counted are the matrix multiplications of the work the model must do, 2 FLOPs per
multiply-add, as in the MFU convention of PaLM / MAE-style reports: MAE's encoder on the cls
token and the visible patches only, its decoder on all positions; mask-token methods' encoder
on all patches. Element-wise work (norms, softmax, GELU, the optimizer) is left out; a training
step costs 3x the forward pass (the backward pass needs the gradients of activations and of
weights, each as costly as the forward). `tests/test_flops.py` checks these numbers against
XLA's cost analysis of the step's lowered program.
"""

from __future__ import annotations

from mim_jax.models.vit import size_from_config

TRAIN_FORWARD_RATIO = 3.0
# Datasheet dense bf16 peaks (TFLOP/s) by a substring of jax's / torch's device kind; more
# specific keys come first.
PEAK_TFLOPS = {
    "H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "GH200": 989.4,
    "A100": 312.0, "L40S": 362.0, "TPU v6 lite": 918.0, "TPU v5p": 459.0,
    "TPU v5 lite": 197.0, "TPU v4": 275.0,
}


def peak_tflops(device_kind: str) -> float | None:
  """The dense bf16 peak of a device kind for MFU, or None when unknown (CPUs)."""
  for key, value in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return value
  return None


def transformer_forward_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` pre-norm blocks over `tokens` tokens.

  Per block: the qkv and output projections (4 D^2 per token), the MLP (2 D M per token) and
  the two attention products QK^T and AV (2 T D per token each), times 2 FLOPs per MAC.
  """
  t, d, m = tokens, width, mlp_dim
  per_block = 2 * t * (4 * d * d + 2 * d * m) + 2 * 2 * t * t * d
  return float(depth * per_block)


def embed_flops(num_patches: int, patch: int, channels: int, width: int) -> float:
  """The patch embedding of `num_patches` patches (a linear map of p*p*C pixels to width)."""
  return float(2 * num_patches * patch * patch * channels * width)


def encoder_flops(model_cfg, image_size, channels: int, tokens: int | None = None) -> float:
  """Forward FLOPs of the ViT encoder of `model_cfg` on one image of `image_size`: the patch
  embedding and the blocks over `tokens` patch tokens (default: all) plus the cls token."""
  size, patch = size_from_config(model_cfg)
  n = (image_size[0] // patch) * (image_size[1] // patch)
  tokens = n if tokens is None else tokens
  return embed_flops(tokens, patch, channels, size.width) + transformer_forward_flops(
      1 + tokens, size.width, size.depth, size.mlp_dim)


FORWARD_ONLY = ("teacher", "tokenizer", "target")


def train_flops(forward: dict[str, float]) -> float:
  """Model FLOPs of one training step per image from a method's forward FLOPs: 3 x the
  forward pass, except for parts that run forward only (an EMA teacher: "teacher", a frozen
  tokenizer: "tokenizer", a frozen network computing the target: "target"), counted once."""
  frozen = sum(forward.get(k, 0.0) for k in FORWARD_ONLY)
  return TRAIN_FORWARD_RATIO * (forward["total"] - frozen) + frozen
