"""The VQ tokenizer as a training method ("vq_tokenizer"), BEiT's stage 1.

The encoder (`tokenizers.models`) maps each patch of the BEiT grid to a vector z (unit length
with `tokenizer.l2_normalize`, as in BEiT v2 / ViT-VQGAN), which is replaced by its nearest
code; the decoder reconstructs the normalised image from the codes. Gradients pass the
quantiser unchanged (the straight-through estimator, z + sg(e - z)); the codebook is not
trained by gradients but follows the assigned vectors by EMA with Laplace smoothing and
dead-code restarts (`tokenizers.codebook`), its state in the method's `extra`.

  loss = mean (decoded - image)^2 + commitment * mean (z - sg(e))^2

Metrics: loss, recon_loss, commit_loss, codebook_usage (fraction of the codes used in the
batch), perplexity (exp of the entropy of the batch's code frequencies) and restarted codes.
At the end the run exports WORKDIR/tokenizer/ (`tokenizers.io`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import viz
from mim_jax.models.vit import patchify, size_from_config
from mim_jax.tokenizers import codebook as cb
from mim_jax.tokenizers import io
from mim_jax.tokenizers.models import tokenizer_model


def tokenizer_info(config) -> dict:
  """The tokenizer.json description of the tokenizer `config` trains."""
  t = config.tokenizer
  _, patch = size_from_config(config.model)
  h, w = tuple(config.image_size)
  dvae = config.method == "dvae_tokenizer"
  return {"kind": "dvae" if dvae else "vq", "architecture": "conv",
          "vocab_size": int(t.vocab_size), "code_dim": int(t.code_dim),
          "l2_normalize": bool(t.l2_normalize) and not dvae,
          "image_size": [h, w], "patch_size": patch, "grid": [h // patch, w // patch],
          "channels": int(config.channels), "mean": list(config.data.mean),
          "std": list(config.data.std), "width": int(t.width), "num_blocks": int(t.num_blocks)}


def encode(model, params, images: jax.Array, l2: bool) -> jax.Array:
  """images [B, H, W, C] -> the encoder's vectors z [B, gh, gw, D] (unit length when `l2`)."""
  z = model.apply({"params": params}, images, method=model.encode)
  return cb.l2_normalize(z) if l2 else z


def tokenize(model, tokenizer: dict, images: jax.Array, l2: bool, kind: str = "vq") -> jax.Array:
  """images -> codes int32 [B, gh*gw] (patch order) of a tokenizer {"params", "codebook"}:
  the nearest code (VQ) or the most likely one (dVAE)."""
  z = encode(model, tokenizer["params"], images, l2)
  if kind == "dvae":
    return jnp.argmax(z, axis=-1).astype(jnp.int32).reshape(z.shape[0], -1)
  return cb.nearest_codes(z.reshape(-1, z.shape[-1]), tokenizer["codebook"]).reshape(
      z.shape[0], -1)


def decode(model, tokenizer: dict, codes: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """codes int [B, gh*gw] -> decoded images [B, H, W, C] (normalised pixels)."""
  e = jnp.asarray(tokenizer["codebook"])[codes].reshape(codes.shape[0], *grid_hw, -1)
  return model.apply({"params": tokenizer["params"]}, e, method=model.decode)


class VQTokenizer:
  """A VQ tokenizer as the training loop sees it (see `methods.base.Method`)."""

  name = "vq_tokenizer"
  reconstruct_reads_extra = True

  def __init__(self, config):
    self.info = tokenizer_info(config)
    t = config.tokenizer
    self.model = tokenizer_model(self.info)
    self.vocab_size, self.l2 = int(t.vocab_size), bool(t.l2_normalize)
    self.decay, self.eps = float(t.decay), float(t.eps)
    self.commitment, self.restart_after = float(t.commitment), int(t.restart_after)
    self.patch_size = self.info["patch_size"]
    self.display = (tuple(config.data.mean), tuple(config.data.std))

  def init(self, rng, images):
    model_rng, code_rng = jax.random.split(rng)
    params = self.model.init({"params": model_rng}, images)["params"]
    return params, cb.init_state(code_rng, self.vocab_size, self.info["code_dim"], self.l2)

  def load_pretrained(self, params, extra):
    return params, extra

  def _forward(self, params, extra, images):
    z = encode(self.model, params, images, self.l2)
    flat = z.reshape(-1, z.shape[-1])
    codes = cb.nearest_codes(jax.lax.stop_gradient(flat), extra["codebook"])
    e = extra["codebook"][codes].reshape(z.shape)
    z_q = z + jax.lax.stop_gradient(e - z)  # straight-through estimator
    recon = self.model.apply({"params": params}, z_q, method=self.model.decode)
    return z, e, codes, recon

  def loss(self, params, extra, batch, rng, train=True):
    images = batch["image"].astype(jnp.float32)
    z, e, codes, recon = self._forward(params, extra, images)
    recon_loss = jnp.mean(jnp.square(recon - images))
    commit_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
    loss = recon_loss + self.commitment * commit_loss
    usage, perplexity = cb.usage_and_perplexity(codes, self.vocab_size)
    restarted = jnp.zeros([], jnp.int32)
    if train:
      flat = jax.lax.stop_gradient(z).reshape(-1, z.shape[-1])
      extra = cb.ema_update(extra, flat, codes, decay=self.decay, eps=self.eps, l2=self.l2)
      extra, restarted = cb.restart_dead_codes(extra, flat, rng,
                                               restart_after=self.restart_after)
    metrics = {"loss": loss, "recon_loss": recon_loss, "commit_loss": commit_loss,
               "codebook_usage": usage, "perplexity": perplexity,
               "restarted_codes": restarted.astype(jnp.float32)}
    return loss, (metrics, extra)

  def reconstruct(self, params, batch, rng, extra):
    """{"pred": decoded patches [B, N, p*p*C], "mask": zeros [B, N]} for pictures."""
    _, _, codes, recon = self._forward(params, extra, batch["image"])
    pred = patchify(recon, self.patch_size)
    return {"pred": pred, "mask": jnp.zeros(pred.shape[:2], jnp.float32)}

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    """One row per image: original | the tokenizer's reconstruction from its codes."""
    h, w, c = images.shape[1:]
    recon = viz.unpatchify(np.asarray(out["pred"]), self.patch_size,
                           (h // self.patch_size, w // self.patch_size), c)
    return viz.image_rows([images, recon], mean=self.display[0], std=self.display[1])

  def encoder_params(self, params, extra):
    return params["encoder"]

  def export(self, path, params, extra, info):
    """Writes `path`/tokenizer/ (`tokenizers.io` layout): the network and the codebook."""
    io.export_tokenizer(os.path.join(path, io.EXPORT_DIR), params, extra["codebook"],
                        {**self.info, "method": info.get("method", self.name)})
