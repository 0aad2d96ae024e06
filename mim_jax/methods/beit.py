"""BEiT (Bao et al., 2022): masked image modeling with visual tokens, stage 2.

Composed from `masked_prediction.MaskedPrediction`: blockwise masking (`config.masking`), every
patch through the encoder with a learned mask token in place of the masked ones, a linear
head over the tokenizer's vocabulary, and cross-entropy against the tokenizer's code of each
masked patch (`losses.masked_cross_entropy`). The tokenizer (stage 1, trained by
`configs/beit_tokenizer_*.py`, see `mim_jax.tokenizers`) is frozen: it is read from
`config.tokenizer.path` into the method's `extra` (the `patch_targets.Tokens` target: its
state is checkpointed with the run) and encodes the batch inside the jitted step under
stop_gradient.

BEiT v2's patch aggregation (`config.patch_aggregation`, `models.aggregation`): with
`from_block` k > 0, `depth` more blocks read the last block's [CLS] beside block k's patch
tokens and the same head predicts the same codes from them; the two cross-entropies add
(BEiT v2: k = 9 of 12, 2 blocks, with a VQ-KD tokenizer; configs/beit2_vitb.py). The blocks
are dropped after pre-training, as in the release.

Differences from the official recipe, kept on purpose: fixed 2-D sin-cos positions instead of
relative position bias, no layer scale (the encoder every method here shares), and our own VQ
tokenizer, trained on the same data and applied to the same augmented view at the encoder's
resolution, instead of DALL-E's dVAE on a second 112-px view.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import viz
from mim_jax.config import validation
from mim_jax.methods.masked_prediction import MaskedPrediction, num_patches
from mim_jax.models.aggregation import AggregatingMaskTokenModel, aggregation_flops
from mim_jax.models.vit import size_from_config
from mim_jax.objectives import losses, patch_targets
from mim_jax.tokenizers import io
from mim_jax.tokenizers.models import encode_flops
from mim_jax.weights import continuation


class BEiT(MaskedPrediction):
  name = "beit"
  weight_fields = MaskedPrediction.weight_fields + ("tokenizer.path",)
  head_in_vit = True

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio=0.4)
    # The frozen tokenizer: a tokenizer workdir or export (`tokenizers.io`); its vocabulary
    # must be vocab_size (BEiT: 8192) and its geometry this config's (checked at start-up).
    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=8192))
    # BEiT v2's patch aggregation: from_block 0 is off (BEiT v1); k reads block k's patches.
    c.patch_aggregation = ml_collections.ConfigDict(dict(from_block=0, depth=2))

  @classmethod
  def unread_rules(cls):
    return super().unread_rules() + [(("patch_aggregation.depth",),
                                      lambda c: c.patch_aggregation.from_block > 0,
                                      "only patch_aggregation.from_block > 0 reads it")]

  @classmethod
  def draws_more_under_weight_init(cls, config):
    """The aggregation blocks, unless continued from a BEiT workdir that has as many (the
    encoder fits, `check_source_fits`, so the count is what can differ)."""
    if not config.patch_aggregation.from_block:
      return False
    saved = continuation.loadable_part(config, "aggregation")
    return saved is None or len(saved) != config.patch_aggregation.depth

  @classmethod
  def validate(cls, config):
    super().validate(config)
    t, image_size, agg = config.tokenizer, tuple(config.image_size), config.patch_aggregation
    size, patch = size_from_config(config.model)
    validation.require(
        validation.is_int(agg.from_block) and 0 <= agg.from_block < size.depth,
        "patch_aggregation.from_block", agg.from_block,
        f"0 (off) or the block 1 .. {size.depth - 1} of this {size.depth}-block encoder whose "
        "patch tokens the aggregation reads (BEiT v2: 9 of 12)")
    validation.require(validation.is_int(agg.depth) and agg.depth >= 1,
                       "patch_aggregation.depth", agg.depth, "an integer >= 1 (BEiT v2: 2)")
    validation.require(validation.is_int(t.vocab_size) and t.vocab_size >= 2,
                       "tokenizer.vocab_size", t.vocab_size, "an integer >= 2 (BEiT: 8192)")
    io.check_matches(t.path, vocab_size=t.vocab_size, image_size=image_size, patch_size=patch,
                     channels=config.channels, mean=config.data.mean, std=config.data.std,
                     variant=config.model.variant)

  @classmethod
  def target_dim(cls, config):
    return int(config.tokenizer.vocab_size)

  @classmethod
  def target_flops(cls, config):
    return encode_flops(io.read_info(str(config.tokenizer.path)))

  @classmethod
  def forward_flops(cls, config):
    out = super().forward_flops(config)
    if config.patch_aggregation.from_block:
      size, _ = size_from_config(config.model)
      out["aggregation"] = aggregation_flops(num_patches(config), size.width, size.mlp_dim,
                                             config.patch_aggregation.depth, cls.target_dim(config))
      out["total"] += out["aggregation"]
    return out

  def __init__(self, config, length=None):
    super().__init__(config, length, target=patch_targets.Tokens(config.tokenizer.path),
                     loss_fn=losses.masked_cross_entropy)
    agg = config.patch_aggregation
    self.masked_mean_metrics = ("loss", "accuracy")
    if agg.from_block:
      self.model = AggregatingMaskTokenModel(self.model.encoder, self.model.predictor,
                                             from_block=agg.from_block, depth=agg.depth)
      self.masked_mean_metrics += ("mim_loss", "aggregation_loss", "aggregation_accuracy")

  def extra_metrics(self, pred, target, mask):
    hit = (jnp.argmax(pred, axis=-1) == target).astype(jnp.float32)
    return {"accuracy": losses.masked_mean(hit, mask, self.axis_name)}

  def reconstruct(self, params, batch, rng, extra):
    out = self.forward(params, extra, batch, rng, train=False)
    if self.target.info.get("feature_dim"):
      # A VQ-KD tokenizer decodes to a teacher's features, not pixels: show where the
      # predicted code is right instead.
      hit = jnp.argmax(out["pred"], axis=-1) == out["target"]
      return {"hit": hit.astype(jnp.float32), "mask": out["mask"].astype(jnp.float32)}
    return decoded_codes(self.target, extra, out["pred"], out["target"], out["mask"],
                         self.grid_hw)

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    if "hit" in out:
      return hit_picture(images, out, self.grid_hw, self.patch_size, self.display)
    return token_picture(images, out, self.grid_hw, self.patch_size, self.display)


def decoded_codes(target: patch_targets.Tokens, extra, logits, codes, mask, grid_hw) -> dict:
  """Decoded images [B, H, W, C] of the target codes and of the predicted codes (predictions
  at masked patches, targets at visible ones), and the mask [B, N] (float32)."""
  pred = jnp.where(mask, jnp.argmax(logits, axis=-1).astype(jnp.int32), codes)
  decoded = target.decode(extra[target.key], jnp.concatenate([codes, pred]), grid_hw)
  b = codes.shape[0]
  return {"target": decoded[:b], "pred": decoded[b:], "mask": mask.astype(jnp.float32)}


def hit_picture(images: np.ndarray, out: dict, grid_hw, patch: int, display: dict):
  """original | masked | masked patches whose code was predicted right (white), wrong (black);
  visible patches grey."""
  masked = viz.masked_images(images, out["mask"], grid_hw, patch, display["mean"],
                             display["std"])
  mask = np.asarray(out["mask"]) > 0
  value = np.where(mask, np.asarray(out["hit"]), 0.5)
  hits = viz.patch_map_images(value, grid_hw, patch, images.shape[-1], display["mean"],
                              display["std"], value_range=(0.0, 1.0))
  return viz.image_rows([images, masked, hits], **display)


def token_picture(images: np.ndarray, out: dict, grid_hw, patch: int, display: dict):
  """original | masked | tokenizer decoding of the target codes | of the predicted codes."""
  masked = viz.masked_images(images, out["mask"], grid_hw, patch, display["mean"],
                             display["std"])
  return viz.image_rows([images, masked, out["target"], out["pred"]], **display)
