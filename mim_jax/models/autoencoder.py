"""The MAE model: a ViT encoder over the visible patches and a transformer decoder over all
positions (He et al., 2022). The method around it (loss, masks, pictures) is methods/mae.py."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.decoders import MAEDecoder
from mim_jax.models.vit import ViTEncoder
from mim_jax.objectives import masking


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
