"""Analytic model FLOPs of pre-training methods, per image (for throughput and MFU).

Counted are the matrix multiplications of the work the model must do, 2 FLOPs per
multiply-add, as in the MFU convention of PaLM / MAE-style reports: MAE's encoder on the cls
token and the visible patches only, its decoder on all positions; mask-token methods' encoder
on all patches. Element-wise work (norms, softmax, GELU, the optimizer) is left out; a training
step costs 3x the forward pass (the backward pass needs the gradients of activations and of
weights, each as costly as the forward). `tests/test_flops.py` checks these numbers against
XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

from mim_jax import masking
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


def forward_flops_per_image(config) -> dict[str, float]:
  """{"encoder", "decoder" (predictor), "total"} forward FLOPs for one image of `config`."""
  size, patch = size_from_config(config.model)
  grid = (config.image_size[0] // patch, config.image_size[1] // patch)
  n = grid[0] * grid[1]
  pixels = patch * patch * config.channels
  d = size.width
  if config.method == "mae":
    generator = masking.mask_generator_from_config(config.masking, grid, patch)
    visible = n - generator.num_masked
    encoded = n if config.model.get("encoder_mask_tokens", False) else visible
    encoder = 2 * encoded * pixels * d + transformer_forward_flops(
        1 + encoded, d, size.depth, size.mlp_dim)
    dd = config.decoder.width
    decoder = (2 * (1 + encoded) * d * dd
               + transformer_forward_flops(1 + n, dd, config.decoder.depth, 4 * dd)
               + 2 * n * dd * pixels)
  elif config.method in ("simmim", "maskfeat"):
    encoder = 2 * n * pixels * d + transformer_forward_flops(1 + n, d, size.depth, size.mlp_dim)
    if config.method == "simmim":
      out_dim = pixels
    else:
      from mim_jax.hog import hog_feature_dim
      out_dim = hog_feature_dim(patch, config.channels, config.target.hog.cell_size,
                                config.target.hog.num_bins)
    decoder = 2 * n * d * out_dim
  elif config.method == "data2vec":
    # Student and EMA teacher each encode all patches; the head maps tokens to the width.
    encoder = 2 * n * pixels * d + transformer_forward_flops(1 + n, d, size.depth, size.mlp_dim)
    decoder = 2 * n * d * d
    return {"encoder": float(encoder), "decoder": float(decoder), "teacher": float(encoder),
            "total": float(2 * encoder + decoder)}
  else:
    raise ValueError(f"no FLOPs formula for method {config.method!r}")
  return {"encoder": float(encoder), "decoder": float(decoder),
          "total": float(encoder + decoder)}


def train_flops_per_image(config) -> float:
  """Model FLOPs of one training step per image: 3 x the forward pass (an EMA teacher's
  forward pass, which has no backward, once)."""
  forward = forward_flops_per_image(config)
  teacher = forward.get("teacher", 0.0)
  return TRAIN_FORWARD_RATIO * (forward["total"] - teacher) + teacher
