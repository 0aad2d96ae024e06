"""Classification heads on top of the ViT encoder (linear probe and fine-tuning).

  pool_tokens      tokens [B, T, D] -> features [B, D] (cls token or mean of patch tokens)
  last_blocks_features  DINO / iBOT's linear-evaluation features: the last blocks' cls tokens
  ProbeHead        BatchNorm without affine parameters + linear layer (the MAE linear probe)
  AttentivePoolingHead  a learned query attending over frozen tokens, then a linear layer
                   (the attentive probe); attentive_head_flops its cost
  ViTClassifier    encoder + pooling (+ fc_norm for mean pooling) + linear head (fine-tuning)
  DINOHead         DINO / iBOT's projection head over prototypes; dino_head_flops its cost
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.initializers import dense_init, trunc_normal
from mim_jax.models.vit import LAYER_NORM_EPS, Mlp, ViTEncoder, block_output

POOLS = ("cls", "gap")


def pool_tokens(tokens: jax.Array, pool: str) -> jax.Array:
  """[B, 1 + N, D] -> [B, D]: the cls token ("cls") or the mean of the N patch tokens ("gap")."""
  if pool == "cls":
    return tokens[:, 0]
  if pool == "gap":
    return jnp.mean(tokens[:, 1:], axis=1)
  raise ValueError(f"pool={pool!r}: expected one of {POOLS}")


def last_blocks_features(block_outputs, encoder_params, *, last: int, with_gap: bool,
                         dtype: Any = jnp.float32) -> jax.Array:
  """DINO's (and iBOT's) linear-evaluation features, float32 [B, (last + with_gap) * D]: the
  cls tokens of the `last` blocks, each through the encoder's final LayerNorm (DINO's
  `get_intermediate_layers`), concatenated, then with `with_gap` the mean patch token of the
  last block, normalised the same way (`avgpool_patchtokens`). DINO evaluates ViT-S/16 with
  the last 4 blocks and ViT-B/16 with the last block and the mean patch token.

  block_outputs: the encoder's per-block outputs (aux["blocks"], each [B, 1 + N, D]);
  encoder_params: its parameters (the final norm is transformer/norm)."""
  norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype)
  normed = [norm.apply({"params": encoder_params["transformer"]["norm"]}, t)
            for t in block_outputs[len(block_outputs) - last:]]
  parts = [t[:, 0] for t in normed] + ([pool_tokens(normed[-1], "gap")] if with_gap else [])
  return jnp.concatenate(parts, axis=-1).astype(jnp.float32)


def encoder_features(encoder: ViTEncoder, encoder_params, images: jax.Array, *, pool: str,
                     layer: int = 0) -> jax.Array:
  """Frozen-encoder features [B, D] of images [B, H, W, C] (all patches, no masking).

  layer 0 takes the encoder output (after its final LayerNorm); layer k in 1..depth takes the
  output of block k, since masked-image-modeling features are often best below the top.
  """
  tokens, aux = encoder.apply({"params": encoder_params}, images, train=False)
  return pool_tokens(block_output(tokens, aux, layer), pool).astype(jnp.float32)


class ProbeHead(nn.Module):
  """features [B, D] -> logits [B, num_classes] through BatchNorm(affine=False) + Dense.

  The parameter-free BatchNorm (eps 1e-6, as in MAE) puts features of any scale on the same
  footing, which matters for MIM encoders whose features are not linearly separable at their
  raw scale. Its running statistics live in the "batch_stats" collection.
  """
  num_classes: int
  head_init_std: float = 0.01
  # A per-device step under shard_map: batch statistics over every device's share.
  axis_name: Any = None

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    # Two-pass variance: E[x^2] - E[x]^2 loses precision on features with a large mean.
    x = nn.BatchNorm(use_running_average=not train, use_bias=False, use_scale=False,
                     momentum=0.9, epsilon=1e-6, use_fast_variance=False,
                     axis_name=self.axis_name, name="bn")(features.astype(jnp.float32))
    return nn.Dense(self.num_classes,
                    kernel_init=trunc_normal(self.head_init_std),
                    name="head")(x)


class AttentivePoolingHead(nn.Module):
  """tokens [B, N, D] -> logits [B, num_classes] (float32): the attentive probe's head.

  V-JEPA's attentive classifier with one query and one block: a learned token (`query_token`)
  attends over the layer-normalised frozen tokens with `num_heads` heads (residual to the
  query), then an MLP (`mlp_ratio` x D, pre-norm, residual), then, unlike V-JEPA, a LayerNorm
  before the linear classifier (as fine-tuning's fc_norm). (4 + 2 mlp_ratio) D^2 parameters
  besides the classifier. A linear probe reads one pooled vector; this head chooses per image
  which patches to read, so features that are not linearly separable once averaged (MIM's, at
  their raw scale) can still be read out without fine-tuning the encoder.
  """
  num_classes: int
  num_heads: int
  mlp_ratio: float = 4.0
  head_init_std: float = 0.01

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    tokens = tokens.astype(jnp.float32)
    batch, _, width = tokens.shape
    query = self.param("query_token", trunc_normal(0.02), (1, 1, width))
    x = jnp.broadcast_to(query, (batch, 1, width))
    keys = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="norm_tokens")(tokens)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, kernel_init=dense_init, name="attn")(x, keys)
    x = x + Mlp(int(self.mlp_ratio * width), name="mlp")(
        nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="norm_mlp")(x))
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, name="norm")(x)[:, 0]
    return nn.Dense(self.num_classes, kernel_init=trunc_normal(self.head_init_std),
                    name="head")(x)


def attentive_head_flops(tokens: int, width: int, mlp_dim: int, num_classes: int) -> float:
  """Forward FLOPs of `AttentivePoolingHead` over `tokens` tokens (2 per multiply-add): the
  key and value projections of every token, the query's projection, its attention over the
  tokens, the output projection, the MLP and the classifier."""
  macs = (2 * tokens * width * width + 2 * width * width + 2 * tokens * width
          + 2 * width * mlp_dim + width * num_classes)
  return 2.0 * macs


class ViTClassifier(nn.Module):
  """images [B, H, W, C] -> logits [B, num_classes] (float32): the fine-tuning network.

  pool "cls": the cls token after the encoder's final norm. pool "gap": the mean of the patch
  tokens from the last block, then a new LayerNorm `fc_norm` (the MAE fine-tuning default).
  """
  encoder: ViTEncoder
  num_classes: int
  pool: str = "cls"
  head_init_std: float = 2e-5

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    tokens, aux = self.encoder(images, train=train)
    if self.pool == "gap":
      x = pool_tokens(aux["blocks"][-1], "gap")
      x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.encoder.dtype, name="fc_norm")(x)
    else:
      x = pool_tokens(tokens, self.pool)
    return nn.Dense(self.num_classes,
                    kernel_init=trunc_normal(self.head_init_std),
                    name="head")(x.astype(jnp.float32))


def dino_head_flops(tokens: int, width: int, hidden_dim: int, bottleneck_dim: int,
                    out_dim: int) -> float:
  """Forward FLOPs of `DINOHead` (3 linear layers + the prototypes) on `tokens` tokens."""
  h, b, k = int(hidden_dim), int(bottleneck_dim), int(out_dim)
  return float(2 * tokens * (width * h + h * h + h * b + b * k))


# PyTorch's nn.Linear default (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
PROTOTYPE_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class DINOHead(nn.Module):
  """tokens [..., D] -> prototype logits [..., out_dim] (float32): DINO / iBOT's projection head.

  An MLP of `num_layers` linear layers (GELU between them, `hidden_dim` wide, the last one to
  `bottleneck_dim`), an L2 normalisation, then a weight-normalised linear layer without bias
  whose columns (one per prototype) have unit norm times a scale: fixed at 1 with
  `norm_last_layer` (DINO's default, iBOT ViT-B), a trainable per-prototype `last_layer_scale`
  otherwise (iBOT ViT-S: norm_last_layer false). Sizes of iBOT: 3 layers, hidden 2048,
  bottleneck 256, 8192 prototypes. The MLP's layers start from N(0, 0.02) truncated, biases 0;
  the prototype directions `last_layer` [bottleneck_dim, out_dim] from U(+-1/sqrt(bottleneck_dim)),
  PyTorch's default for a linear layer, which DINO / iBOT keep because they create that layer
  after applying their init: with unit-norm columns only its direction counts, but its norm
  sets how far an optimizer step turns a prototype (N(0, 0.02) columns would turn 1.8x faster
  at bottleneck 256, 2.5x at 128).

  `dtype`: the matmuls' compute dtype (the encoder's `model.dtype`; DINO / iBOT run the head
  under autocast too); parameters, the L2 normalisations and the logits stay float32.
  """
  out_dim: int
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = trunc_normal(0.02)
    x = x.astype(self.dtype)
    for i in range(self.num_layers - 1):
      x = nn.gelu(nn.Dense(self.hidden_dim, kernel_init=init, dtype=self.dtype,
                           name=f"mlp_{i}")(x), approximate=False)
    x = nn.Dense(self.bottleneck_dim, kernel_init=init, dtype=self.dtype,
                 name=f"mlp_{self.num_layers - 1}")(x).astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v = self.param("last_layer", PROTOTYPE_INIT, (self.bottleneck_dim, self.out_dim))
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if not self.norm_last_layer:
      w = w * self.param("last_layer_scale", nn.initializers.ones, (self.out_dim,))
    return jnp.matmul(x.astype(self.dtype), w.astype(self.dtype),
                      preferred_element_type=jnp.float32)
