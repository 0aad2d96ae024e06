"""A discrete VAE tokenizer with the Gumbel-softmax relaxation ("dvae_tokenizer"), as BEiT's
DALL-E tokenizer is trained (Ramesh et al. 2021), on our convolutional networks.

The encoder gives logits over the V codes for each patch; during training a relaxed one-hot
sample y = softmax((logits + Gumbel noise) / tau) mixes the code vectors (a learned table,
[V, D]) that the decoder turns back into the image. The temperature tau is annealed from
`tokenizer.temp_start` to `temp_end` (cosine, over `temp_anneal_fraction` of the lr schedule;
DALL-E: 1 -> 1/16), the step count kept in `extra` by `after_update`.

  loss = mean (decoded - image)^2 + kl_weight * mean_patches KL(softmax(logits) || uniform)

with KL(q || U) = sum_k q_k log(V q_k), q the softmax of the encoder's logits (no noise, no
temperature, as DALL-E's). The codes are argmax(logits) (no noise); the export
(`tokenizers.io`, kind "dvae") holds the networks and the code table as its codebook.
Differences from DALL-E's dVAE training, kept on purpose: the MSE of the normalised image in
place of its logit-Laplace likelihood, means over pixels and patches in place of sums, a KL
weight fixed from the start (DALL-E raises beta from 0 to 6.6 over the first 5000 updates)
and the temperature annealed over a fraction of the run (DALL-E: its first 150,000 updates).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from mim_jax.config import validation as v
from mim_jax.models.vit import patchify
from mim_jax.objectives import teachers
from mim_jax.tokenizers import codebook as cb
from mim_jax.tokenizers import io
from mim_jax.tokenizers.vq import (
  VQTokenizer,
  tokenizer_fields,
  tokenizer_info,
  validate_tokenizer_fields,
)


def kl_to_uniform(logits: jax.Array) -> jax.Array:
  """Mean over positions of KL(softmax(logits) || uniform over the last axis)."""
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q + jnp.log(logits.shape[-1])), axis=-1))


class DVAETokenizer(VQTokenizer):
  """A dVAE tokenizer as the training loop sees it (see `methods.base.Method`)."""

  name = "dvae_tokenizer"
  schedules_by_length = True

  @classmethod
  def add_config(cls, c):
    # The Gumbel-softmax temperature is annealed (cosine) from temp_start to temp_end over
    # temp_anneal_fraction of the lr schedule; KL to the uniform prior weighted by kl_weight.
    tokenizer_fields(c, temp_start=1.0, temp_end=1.0 / 16, temp_anneal_fraction=0.5,
                     kl_weight=0.01)

  @classmethod
  def unread_rules(cls):
    return [*super().unread_rules(),
            (("tokenizer.temp_start",), lambda c: c.tokenizer.temp_anneal_fraction > 0,
             "the temperature is tokenizer.temp_end from the start "
             "(tokenizer.temp_anneal_fraction=0)")]

  @classmethod
  def validate(cls, config):
    validate_tokenizer_fields(config)
    t = config.tokenizer
    for name in ("temp_start", "temp_end"):
      v.require(v.is_number(t[name]) and t[name] > 0, f"tokenizer.{name}", t[name],
                "a positive number (DALL-E: 1 -> 1/16)")
    v.require(v.is_number(t.temp_anneal_fraction) and 0 <= t.temp_anneal_fraction <= 1,
              "tokenizer.temp_anneal_fraction", t.temp_anneal_fraction, "a number in [0, 1]")
    v.require(v.is_number(t.kl_weight) and t.kl_weight >= 0, "tokenizer.kl_weight",
              t.kl_weight, "a number >= 0")

  def __init__(self, config, length=None):
    super().__init__(config, length)
    t = config.tokenizer
    self.temp = (float(t.temp_start), float(t.temp_end),
                 int(round(float(t.temp_anneal_fraction) * self.length.schedule_steps)))
    self.kl_weight = float(t.kl_weight)

  def init(self, rng, images):
    net_rng, code_rng = jax.random.split(rng)
    net = self.model.init({"params": net_rng}, images, method=self.model.encode)["params"]
    table = 0.02 * jax.random.normal(code_rng, (self.vocab_size, self.info["code_dim"]))
    dec = self.model.init({"params": net_rng}, jnp.zeros((1, *self._grid(images), table.shape[1])),
                          method=self.model.decode)["params"]
    return {"net": {**net, **dec}, "codebook": table}, {"step": jnp.zeros([], jnp.int32)}

  def _grid(self, images):
    return images.shape[1] // self.patch_size, images.shape[2] // self.patch_size

  def temperature(self, step):
    return teachers.cosine_anneal(step, *self.temp)

  def after_update(self, params, extra, step):
    return {"step": (step + 1).astype(jnp.int32)}

  def _decode_soft(self, params, y):
    return self.model.apply({"params": params["net"]}, y @ params["codebook"],
                            method=self.model.decode)

  def loss(self, params, extra, batch, rng, train=True):
    images = batch["image"].astype(jnp.float32)
    logits = self.model.apply({"params": params["net"]}, images, method=self.model.encode)
    tau = self.temperature(extra["step"])
    noise = jax.random.gumbel(rng, logits.shape) if train else 0.0
    y = jax.nn.softmax((logits + noise) / tau, axis=-1)
    recon_loss = jnp.mean(jnp.square(self._decode_soft(params, y) - images))
    kl = kl_to_uniform(logits)
    loss = recon_loss + self.kl_weight * kl
    usage, perplexity = cb.usage_and_perplexity(jnp.argmax(logits, -1), self.vocab_size)
    return loss, ({"loss": loss, "recon_loss": recon_loss, "kl": kl, "temperature": tau,
                   "codebook_usage": usage, "perplexity": perplexity}, extra)

  def reconstruct(self, params, batch, rng, extra):
    """The decoding of the hard codes argmax(logits), as BEiT's pictures show them."""
    logits = self.model.apply({"params": params["net"]}, batch["image"], method=self.model.encode)
    y = jax.nn.one_hot(jnp.argmax(logits, -1), self.vocab_size)
    pred = patchify(self._decode_soft(params, y), self.patch_size)
    return {"pred": pred, "mask": jnp.zeros(pred.shape[:2], jnp.float32)}

  def encoder_params(self, params, extra):
    return params["net"]["encoder"]

  def export(self, path, params, extra, info):
    io.export_tokenizer(os.path.join(path, io.EXPORT_DIR), params["net"], params["codebook"],
                        {**self.info, "method": info.get("method", self.name)})


__all__ = ["DVAETokenizer", "kl_to_uniform", "tokenizer_info"]
