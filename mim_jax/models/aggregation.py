"""BEiT v2's patch aggregation ("[CLS] pre-training", Peng et al., 2022, section 2.3).

Beside the masked prediction, a shallow head of transformer blocks sees the last block's [CLS]
token next to the patch tokens of an earlier block (`from_block`), and the same linear head
predicts every patch's target from its output. The earlier patch tokens have not seen what the
later blocks computed, so this second loss is lowered by packing the image's summary into
[CLS]: it is what lifts BEiT v2's linear probe. The head is dropped after pre-training (the
encoder export holds the encoder alone), as in the release.

  AggregatingMaskTokenModel  images, token_mask -> (predictions, {"aggregation": predictions})
  drop_path_rates            the head blocks' stochastic-depth rates
  aggregation_flops          the head's forward FLOPs per image
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models import flops
from mim_jax.models.attention import RelativePositionBias, relative_position_index
from mim_jax.models.vit import LAYER_NORM_EPS, ViTEncoder, block_class, block_output
from mim_jax.training import parallel


def drop_path_rates(rate: float, encoder_depth: int, from_block: int, depth: int) -> list[float]:
  """The aggregation blocks' stochastic-depth rates: entries from_block .. from_block + depth
  - 1 of the linear ramp from 0 to `rate` over max(encoder_depth, from_block + depth) blocks
  (the encoder's own ramp when the head ends inside it)."""
  ramp = max(encoder_depth, from_block + depth)
  return [rate * layer / max(ramp - 1, 1) for layer in range(from_block, from_block + depth)]


class AggregationBlocks(nn.Module):
  """`depth` blocks of the encoder's kind continuing its numbering: block j is block
  `from_block + j + 1` of a ViT max(encoder depth, from_block + depth) deep for its
  stochastic-depth rate and its init (the release's drop-path ramp and `fix_init_weight`).
  tokens [B, T, D] -> [B, T, D] (before any final norm)."""
  encoder: ViTEncoder
  from_block: int
  depth: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, shared_bias, rel_index) -> jax.Array:
    e = self.encoder
    own_grid = tuple(e.grid_hw) if e.rel_pos_bias == "per_block" else None
    rates = drop_path_rates(e.drop_path_rate, e.depth, self.from_block, self.depth)
    block = block_class(e.remat)
    for j in range(self.depth):
      layer = self.from_block + j  # 0-based, as the encoder's Transformer counts
      x = parallel.constrain_batch(x)
      x = block(e.num_heads, e.mlp_dim, drop_path=rates[j],
                dtype=e.dtype, attention_impl=e.attention_impl, layer_scale=e.layer_scale,
                rel_pos_grid=own_grid, mlp_act=e.mlp_act, weight_init=e.weight_init,
                layer_id=layer + 1, name=f"blocks_{j}")(
                    x, train, shared_bias, rel_index if own_grid else None)
    return x


class AggregatingMaskTokenModel(nn.Module):
  """`masked_prediction.MaskTokenModel` with BEiT v2's patch aggregation:
  images [B, H, W, C], token_mask bool [B, N] -> (predictions [B, N, F],
  {"aggregation": predictions [B, N, F]}), both float32 from the one `predictor`.

  The aggregation path: [last block's CLS, block `from_block`'s N patch tokens] (both before
  the final norm) -> `depth` blocks (reading the encoder's shared relative position bias, if it
  has one) -> the encoder's final LayerNorm -> `predictor`: the release's shared_lm_head=True,
  so the head adds only the blocks' parameters ("aggregation")."""
  encoder: ViTEncoder
  predictor: nn.Module
  from_block: int
  depth: int

  @nn.compact
  def __call__(self, images: jax.Array, token_mask: jax.Array, *, train: bool = False):
    e = self.encoder
    tokens, aux = e(images, token_mask=token_mask, train=train)
    x = jnp.concatenate([block_output(tokens, aux, e.depth)[:, :1],
                         block_output(tokens, aux, self.from_block)[:, 1:]], axis=1)
    own = e.variables["params"]["transformer"]
    rel_index = shared_bias = None
    if e.rel_pos_bias:
      grid = (images.shape[1] // e.patch_size, images.shape[2] // e.patch_size)
      rel_index = relative_position_index(tuple(e.grid_hw), grid)
    if e.rel_pos_bias == "shared":
      # The encoder's table, applied as a function (parent=None: no module of this one).
      shared_bias = RelativePositionBias(tuple(e.grid_hw), e.num_heads, parent=None).apply(
          {"params": own["rel_pos_bias"]}, rel_index)
    x = AggregationBlocks(e, self.from_block, self.depth, name="aggregation")(
        x, train, shared_bias, rel_index)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=e.dtype, parent=None).apply(
        {"params": own["norm"]}, x)
    return self.predictor(tokens), {"aggregation": self.predictor(x)}


def aggregation_flops(num_patches: int, width: int, mlp_dim: int, depth: int,
                      out_dim: int) -> float:
  """Forward FLOPs per image of the aggregation path: `depth` blocks over 1 + N tokens and the
  shared linear head's second pass over the N patch tokens."""
  return (flops.transformer_forward_flops(1 + num_patches, width, depth, mlp_dim)
          + 2.0 * num_patches * width * out_dim)
