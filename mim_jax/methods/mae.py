"""Masked Autoencoder (He et al., 2022): visible-only encoder, transformer decoder, pixel MSE.

Composed from the shared parts: a `masking.MaskGenerator` (random per patch by default; any
kind with the same masked count in every sample works), `models.vit.ViTEncoder` (visible-only
mode), `models.decoders.MAEDecoder`, `targets.pixel_targets`, `losses.masked_mse`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import viz
from mim_jax.config import validation
from mim_jax.methods import base
from mim_jax.models import flops
from mim_jax.models.autoencoder import MaskedAutoencoder
from mim_jax.models.decoders import MAEDecoder
from mim_jax.models.vit import encoder_from_config, size_from_config
from mim_jax.objectives import losses, masking, targets


def build_model(config) -> MaskedAutoencoder:
  """The MAE model described by a config (see configs/mae_*.py)."""
  encoder_mask_tokens = bool(config.model.encoder_mask_tokens)
  encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                use_mask_token=encoder_mask_tokens)
  p = encoder.patch_size
  decoder = MAEDecoder(
      grid_hw=encoder.grid_hw, out_dim=p * p * config.channels, width=config.decoder.width,
      depth=config.decoder.depth, num_heads=config.decoder.num_heads,
      dtype=jnp.dtype(config.model.dtype),
      attention_impl=config.model.get("attention_impl") or None,
      remat=config.model.get("remat", "none"))
  return MaskedAutoencoder(encoder=encoder, decoder=decoder, mask_ratio=config.masking.ratio,
                           encoder_mask_tokens=encoder_mask_tokens)


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix_loss: bool, axis_name=None) -> jax.Array:
  """MSE on masked patches against (optionally per-patch normalised) pixels."""
  return losses.masked_mse(pred, targets.pixel_targets(images, patch_size, norm_pix_loss), mask,
                           axis_name)


# A batch key that fixes random masking: uniform noise [B, N], the lowest-noise patches stay
# visible (as the official MAE and HF ViTMAE take it).
NOISE_KEY = "noise"


class MAE(base.PretrainingMethod):
  """The MAE method as the training loop sees it (see `methods.base.Method`)."""

  name = "mae"
  draws = True

  @classmethod
  def encoder_mask_token(cls, config) -> bool:
    return bool(config.model.get("encoder_mask_tokens", False))

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    # The paper's "encoder w/ [M]" ablation (Table 1c): all patches with mask tokens.
    c.model.encoder_mask_tokens = False
    c.decoder = ml_collections.ConfigDict(dict(width=512, depth=8, num_heads=16))
    c.target = ml_collections.ConfigDict(dict(norm_pix=True))  # per-patch standardised pixels

  @classmethod
  def validate(cls, config):
    v = validation
    v.validate_pretraining_fields(config, mask_kinds=v.FIXED_COUNT_MASK_KINDS, fixed_count=True)
    dec = config.decoder
    for name in ("width", "depth", "num_heads"):
      v.positive_int(config, f"decoder.{name}")
    v.require(dec.width % dec.num_heads == 0, "decoder.num_heads", dec.num_heads,
              f"a divisor of decoder.width={dec.width}")
    v.require(dec.width % 4 == 0, "decoder.width", dec.width,
              "a multiple of 4 (2-D sin-cos position embeddings)")
    for name in ("model.encoder_mask_tokens", "target.norm_pix"):
      v.require(isinstance(v.get(config, name), bool), name, v.get(config, name), "true or false")

  @classmethod
  def forward_flops(cls, config):
    size, patch = size_from_config(config.model)
    gh, gw = config.image_size[0] // patch, config.image_size[1] // patch
    n, pixels = gh * gw, patch * patch * config.channels
    visible = n - masking.mask_generator_from_config(config.masking, (gh, gw), patch).num_masked
    encoded = n if config.model.encoder_mask_tokens else visible
    encoder = flops.encoder_flops(config.model, config.image_size, config.channels, encoded)
    dd = config.decoder.width
    decoder = (2 * (1 + encoded) * size.width * dd
               + flops.transformer_forward_flops(1 + n, dd, config.decoder.depth, 4 * dd)
               + 2 * n * dd * pixels)
    return {"encoder": encoder, "decoder": float(decoder), "total": encoder + decoder}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    self.model = build_model(config)
    self.norm_pix_loss = bool(config.target.norm_pix)
    self.patch_size = self.model.encoder.patch_size
    self.mask_generator = masking.mask_generator_from_config(
        config.masking, self.model.encoder.grid_hw, self.patch_size)
    # How pictures show the (normalised) images: the data's mean / std, the chosen channels.
    self.display = dict(mean=tuple(config.data.mean), std=tuple(config.data.std),
                        channels=tuple(config.viz_channels))

  def init(self, rng, images):
    params_rng, mask_rng = jax.random.split(rng)
    return self.model.init({"params": params_rng, "masking": mask_rng}, images)["params"], {}

  def _apply(self, params, batch, rng, train):
    mask_rng, drop_rng = jax.random.split(rng)
    kwargs = {}
    if NOISE_KEY in batch:
      # Masks fixed by the caller (MAE's rule on given noise [B, N]), e.g. to train step by
      # step beside another implementation (tests/test_hf_parity.py).
      kwargs = dict(noise=batch[NOISE_KEY])
    elif self.mask_generator.kind != "random":
      # Random masking stays on MAE's noise rule (identical masks to the official code for the
      # same noise); other kinds are drawn by the generator and gathered by index.
      kwargs = dict(token_mask=self.mask_generator.sample(batch, mask_rng),
                    num_masked=self.mask_generator.num_masked)
    return self.model.apply({"params": params}, batch["image"], train=train,
                            rngs={"masking": mask_rng, "drop_path": drop_rng}, **kwargs)

  def loss(self, params, extra, batch, rng, train=True):
    pred, info = self._apply(params, batch, rng, train)
    loss = mae_loss(pred, batch["image"], info.mask, self.patch_size, self.norm_pix_loss,
                    self.axis_name)
    return loss, ({"loss": loss}, extra)

  def reconstruct(self, params, batch, rng, extra):
    pred, info = self._apply(params, batch, rng, train=False)
    return {"pred": pred, "mask": info.mask}

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    return viz.reconstruction_grid(images, out["pred"], out["mask"], patch_size=self.patch_size,
                                   **self.display,
                                   norm_pix_loss=self.norm_pix_loss)
