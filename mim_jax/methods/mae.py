"""Masked Autoencoder (He et al., 2022): visible-only encoder, transformer decoder, pixel MSE.

Composed from the shared parts: a `masking.MaskGenerator` (random per patch by default; any
kind with the same masked count in every sample works), `models.vit.ViTEncoder` (visible-only
mode), `models.decoders.MAEDecoder`, `targets.pixel_targets`, `losses.masked_mse`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import continuation, losses, masking, targets, viz
from mim_jax.models.decoders import MAEDecoder
from mim_jax.models.vit import ViTEncoder, encoder_from_config


class MaskedAutoencoder(nn.Module):
  """Encoder over visible patches + decoder over all positions.

  images [B, H, W, C] -> (pred [B, N, p*p*C], MaskInfo). The mask comes from, in order:
  `token_mask` bool [B, N] (True = masked, the same count K in every row, given as `num_masked`),
  `noise` [B, N] (MAE's rule: the lowest-noise patches stay visible; fixes the mask e.g. to
  compare with another implementation), or noise drawn from the 'masking' rng.
  """
  encoder: ViTEncoder
  decoder: MAEDecoder
  mask_ratio: float
  # The paper's "encoder w/ [M]" ablation (Table 1c): all patches through the encoder with
  # masked ones replaced by a mask token. Same loss, ~3-4x the encoder cost at ratio 0.75.
  encoder_mask_tokens: bool = False

  def __call__(self, images: jax.Array, *, noise: Optional[jax.Array] = None,
               token_mask: Optional[jax.Array] = None, num_masked: Optional[int] = None,
               train: bool = False):
    num_patches = self.encoder.grid_hw[0] * self.encoder.grid_hw[1]
    if token_mask is not None:
      info = masking.mask_to_ids(token_mask, num_keep=num_patches - num_masked)
    else:
      if noise is None:
        noise = jax.random.uniform(self.make_rng("masking"), (images.shape[0], num_patches))
      info = masking.random_masking_from_noise(noise, self.mask_ratio)
    if self.encoder_mask_tokens:
      latent, _ = self.encoder(images, token_mask=info.mask > 0, train=train)
      # Every position is already in place: the decoder adds no mask tokens and keeps the order.
      identity = jnp.broadcast_to(jnp.arange(num_patches, dtype=jnp.int32), info.mask.shape)
      pred = self.decoder(latent, identity, train=train)
    else:
      latent, _ = self.encoder(images, ids_keep=info.ids_keep, train=train)
      pred = self.decoder(latent, info.ids_restore, train=train)
    return pred, info


def build_model(config) -> MaskedAutoencoder:
  """The MAE model described by a config (see configs/mae_*.py)."""
  encoder_mask_tokens = bool(config.model.get("encoder_mask_tokens", False))
  encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                use_mask_token=encoder_mask_tokens)
  p = encoder.patch_size
  decoder = MAEDecoder(
      grid_hw=encoder.grid_hw, out_dim=p * p * config.channels, width=config.decoder.width,
      depth=config.decoder.depth, num_heads=config.decoder.num_heads,
      dtype=jnp.dtype(config.model.dtype), attention_impl=config.model.get("attention_impl") or None,
      remat=config.model.get("remat", "none"))
  return MaskedAutoencoder(encoder=encoder, decoder=decoder, mask_ratio=config.masking.ratio,
                           encoder_mask_tokens=encoder_mask_tokens)


def mae_loss(pred: jax.Array, images: jax.Array, mask: jax.Array, patch_size: int,
             norm_pix_loss: bool) -> jax.Array:
  """MSE on masked patches against (optionally per-patch normalised) pixels."""
  return losses.masked_mse(pred, targets.pixel_targets(images, patch_size, norm_pix_loss), mask)


class MAE:
  """The MAE method as the training loop sees it (see `methods.base.Method`)."""

  name = "mae"

  def __init__(self, config):
    self.config = config
    self.model = build_model(config)
    self.norm_pix_loss = bool(config.target.norm_pix)
    self.patch_size = self.model.encoder.patch_size
    self.mask_generator = masking.mask_generator_from_config(
        config.masking, self.model.encoder.grid_hw, self.patch_size)
    self.display = (tuple(config.data.mean), tuple(config.data.std))

  def init(self, rng, images):
    params_rng, mask_rng = jax.random.split(rng)
    return self.model.init({"params": params_rng, "masking": mask_rng}, images)["params"], {}

  def load_pretrained(self, params, extra):
    """Continued pre-training from `config.init_from`: encoder and, when it fits, decoder."""
    return continuation.load_into(params, self.config), extra

  def _apply(self, params, batch, rng, train):
    mask_rng, drop_rng = jax.random.split(rng)
    kwargs = {}
    if self.mask_generator.kind != "random":
      # Random masking stays on MAE's noise rule (identical masks to the official code for the
      # same noise); other kinds are drawn by the generator and gathered by index.
      kwargs = dict(token_mask=self.mask_generator.sample(batch, mask_rng),
                    num_masked=self.mask_generator.num_masked)
    return self.model.apply({"params": params}, batch["image"], train=train,
                            rngs={"masking": mask_rng, "drop_path": drop_rng}, **kwargs)

  def loss(self, params, extra, batch, rng, train=True):
    pred, info = self._apply(params, batch, rng, train)
    loss = mae_loss(pred, batch["image"], info.mask, self.patch_size, self.norm_pix_loss)
    return loss, ({"loss": loss}, extra)

  def reconstruct(self, params, batch, rng):
    pred, info = self._apply(params, batch, rng, train=False)
    return {"pred": pred, "mask": info.mask}

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    return viz.reconstruction_grid(images, out["pred"], out["mask"], patch_size=self.patch_size,
                                   mean=self.display[0], std=self.display[1],
                                   norm_pix_loss=self.norm_pix_loss)

  def encoder_params(self, params, extra):
    return params["encoder"]
