"""The VQ tokenizer as a training method ("vq_tokenizer"), BEiT's stage 1.

The encoder (`tokenizers.models`) maps each patch of the BEiT grid to a vector z (unit length
with `tokenizer.l2_normalize`, as in BEiT v2 / ViT-VQGAN), which is replaced by its nearest
code; the decoder reconstructs the normalised image from the codes. Gradients pass the
quantiser unchanged (the straight-through estimator, z + sg(e - z)); the codebook is not
trained by gradients but follows the assigned vectors by EMA (`tokenizer.codebook_update`:
VQ-VAE's, with Laplace smoothing, or BEiT v2's) and dead-code restarts (`tokenizers.codebook`),
its state in the method's `extra`. The codebook takes one EMA step (and its restarts) per
optimizer step, in `after_update`, from statistics the loss sums over the step's micro-batches:
with `grad_accum_steps` = k it moves exactly as with the whole batch at once, as the parameters
do (a PyTorch quantiser, updated per forward pass, would take k EMA steps per update). With
`tokenizer.kmeans_init` the codes start as k-means of the first training step's encoder
vectors (of its first micro-batch under gradient accumulation). `restarted_codes` is the
number of codes the previous update re-seeded. VQ / VQ-KD checkpoints written before
2026-12-03 lack these step statistics in `extra` and do not restore.

  loss = mean (decoded - image)^2 + commitment * mean (z - sg(e))^2

Metrics: loss, recon_loss, commit_loss, codebook_usage (fraction of the codes used in the
batch), perplexity (exp of the entropy of the batch's code frequencies) and restarted_codes
(of the previous update). With `grad_accum_steps` = k, usage and perplexity are the means of
the k micro-batches' values, not the whole batch's (a micro-batch uses fewer codes); the EMA
step is the whole batch's.
At the end the run exports WORKDIR/tokenizer/ (`tokenizers.io`).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import viz
from mim_jax.config import defaults
from mim_jax.config import validation as v
from mim_jax.methods import base
from mim_jax.models.vit import parse_variant, patchify
from mim_jax.tokenizers import codebook as cb
from mim_jax.tokenizers import io, models
from mim_jax.tokenizers.models import tokenizer_model


def tokenizer_info(config) -> dict:
  """The tokenizer.json description of the tokenizer `config` trains."""
  t = config.tokenizer
  _, patch = parse_variant(config.model.variant)
  h, w = tuple(config.image_size)
  dvae = config.method == "dvae_tokenizer"
  return {"kind": "dvae" if dvae else "vq", "architecture": "conv",
          "vocab_size": int(t.vocab_size), "code_dim": int(t.code_dim),
          "l2_normalize": bool(t.get("l2_normalize", False)),
          "image_size": [h, w], "patch_size": patch, "grid": [h // patch, w // patch],
          "channels": int(config.channels), "mean": list(config.data.mean),
          "std": list(config.data.std), "width": int(t.width), "num_blocks": int(t.num_blocks)}


def tokenizer_fields(c, **fields) -> None:
  """The shared fields of a tokenizer run: the loop's (core + training, of the model only its
  variant, whose patch size sets the code grid), pictures, the export, and `config.tokenizer`
  with the sizes every tokenizer has plus `fields`."""
  defaults.core_fields(c)
  defaults.training_fields(c)
  c.model = ml_collections.ConfigDict(dict(variant=c.model.variant))
  c.viz_every = 1000
  c.viz_num_images = 8
  c.viz_channels = ()
  c.export_encoder = True
  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=8192,         # number of codes (BEiT: 8192)
      code_dim=32,             # length of a code vector (BEiT v2: 32)
      width=128,               # channels of the convolutional encoder / decoder
      num_blocks=2,            # residual blocks in each
      **fields))


def validate_tokenizer_fields(config) -> None:
  t = config.tokenizer
  v.require(v.is_int(t.vocab_size) and t.vocab_size >= 2, "tokenizer.vocab_size", t.vocab_size,
            "an integer >= 2 (BEiT: 8192)")
  for name in ("code_dim", "width", "num_blocks"):
    v.require(v.is_int(t[name]) and t[name] > 0, f"tokenizer.{name}", t[name],
              "a positive integer")
  v.require(v.is_int(config.viz_every) and config.viz_every >= 0, "viz_every",
            config.viz_every, "an integer >= 0 (0 disables pictures)")
  v.positive_int(config, "viz_num_images")
  v.validate_viz_channels(config)
  v.require(isinstance(config.export_encoder, bool), "export_encoder", config.export_encoder,
            "true or false (whether the run exports WORKDIR/tokenizer/)")


class VQTokenizer(base.Method):
  """A VQ tokenizer as the training loop sees it (see `methods.base.Method`)."""

  name = "vq_tokenizer"
  kind = "tokenizer"
  draws = True
  shards = False  # the codebook's EMA statistics are sums over the batch a step sees
  weight_fields = ()  # trained from scratch: no init_from

  @classmethod
  def add_config(cls, c):
    tokenizer_fields(
        c,
        l2_normalize=True,     # codes and encoder outputs on the unit sphere (BEiT v2, ViT-VQGAN)
        decay=0.99,            # codebook EMA decay
        eps=1e-5,              # Laplace smoothing of the EMA cluster sizes
        commitment=0.25,       # weight of the commitment loss (VQ-VAE: 0.25)
        restart_after=100,     # re-seed codes unused for this many steps (0: never)
        codebook_update="ema_sums",  # or "norm_ema" (BEiT v2's release; tokenizers.codebook)
        kmeans_init=0)         # k-means iterations on the first batch's vectors (0: random
                               # codes; BEiT v2's release: 10)

  @classmethod
  def unread_rules(cls):
    return [(("data.eval_split", "data.eval_path"), lambda c: False,
             "a tokenizer run scores no evaluation split (its pictures use data.split)"),
            (("data.synthetic_classes",),
             lambda c: c.data.get("holdout", 0) > 0 or c.data.get("label_fraction", 1.0) < 1,
             "a tokenizer reads labels only to draw data.holdout or a data.label_fraction "
             "subset, class by class"),
            (("tokenizer.eps",), lambda c: c.tokenizer.codebook_update == "ema_sums",
             "BEiT v2's codebook update (tokenizer.codebook_update='norm_ema') smooths no "
             "cluster sizes")]

  @classmethod
  def validate(cls, config):
    validate_tokenizer_fields(config)
    t = config.tokenizer
    v.require(v.is_number(t.decay) and 0 <= t.decay < 1, "tokenizer.decay", t.decay,
              "a number in [0, 1) (the codebook EMA decay, e.g. 0.99)")
    v.require(v.is_number(t.eps) and t.eps > 0, "tokenizer.eps", t.eps,
              "a positive number (Laplace smoothing, e.g. 1e-5)")
    v.require(v.is_number(t.commitment) and t.commitment >= 0, "tokenizer.commitment",
              t.commitment, "a number >= 0 (VQ-VAE: 0.25)")
    v.require(v.is_int(t.restart_after) and t.restart_after >= 0, "tokenizer.restart_after",
              t.restart_after, "an integer >= 0 (steps a code may go unused before it is "
              "re-seeded; 0 disables restarts)")
    v.require(isinstance(t.l2_normalize, bool), "tokenizer.l2_normalize", t.l2_normalize,
              "true or false")
    v.require(t.codebook_update in cb.UPDATES, "tokenizer.codebook_update", t.codebook_update,
              f"one of {', '.join(cb.UPDATES)} (VQ-VAE's EMA of assigned sums and counts, or "
              "BEiT v2's normalised EMA of unit codes)")
    v.require(t.codebook_update != "norm_ema" or t.l2_normalize is True,
              "tokenizer.codebook_update", t.codebook_update,
              "'ema_sums' with tokenizer.l2_normalize=False: 'norm_ema' moves unit codes")
    v.require(v.is_int(t.kmeans_init) and t.kmeans_init >= 0, "tokenizer.kmeans_init",
              t.kmeans_init, "an integer >= 0 (k-means iterations on the first batch's vectors; "
              "0 starts from random codes; BEiT v2: 10)")

  @classmethod
  def forward_flops(cls, config):
    info = tokenizer_info(config)
    enc, dec = models.encode_flops(info), models.decode_flops(info)
    return {"encoder": enc, "decoder": dec, "total": enc + dec}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    self.info = tokenizer_info(config)
    t = config.tokenizer
    self.model = tokenizer_model(self.info)
    self.vocab_size, self.l2 = int(t.vocab_size), bool(t.get("l2_normalize", False))
    if "decay" in t:  # a codebook trained by EMA (VQ, VQ-KD); a dVAE has none
      self.decay, self.eps = float(t.decay), float(t.eps)
      self.commitment, self.restart_after = float(t.commitment), int(t.restart_after)
      self.update, self.kmeans_init = str(t.codebook_update), int(t.kmeans_init)
    self.patch_size = self.info["patch_size"]
    # How pictures show the (normalised) images: the data's mean / std, the chosen channels.
    self.display = dict(mean=tuple(config.data.mean), std=tuple(config.data.std),
                        channels=tuple(config.viz_channels))

  def wants_weights(self) -> bool:
    return False  # a tokenizer trains from scratch (init_from does not exist for it)

  def init(self, rng, images):
    model_rng, code_rng = jax.random.split(rng)
    params = self.model.init({"params": model_rng}, images)["params"]
    code_dim = self.info["code_dim"]
    initted = {cb.INITTED: jnp.zeros([], jnp.int32)} if self.kmeans_init else {}
    return params, {**cb.init_state(code_rng, self.vocab_size, code_dim, self.l2),
                    **cb.init_step_stats(self.vocab_size, code_dim), **initted}

  def _forward(self, params, extra, images, rng=None):
    """(z, e, codes, decoded, extra); with `rng` (a training step) the codebook is first
    initialised by k-means of this batch's vectors if the run asks for it and has not yet."""
    z = models.encode(self.model, params, images, self.l2)
    flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
    if rng is not None and self.kmeans_init:
      extra = cb.init_by_kmeans(extra, flat, rng, iterations=self.kmeans_init, l2=self.l2)
    codes = cb.nearest_codes(flat, extra["codebook"])
    e = extra["codebook"][codes].reshape(z.shape)
    z_q = z + jax.lax.stop_gradient(e - z)  # straight-through estimator
    recon = self.model.apply({"params": params}, z_q, method=self.model.decode)
    return z, e, codes, recon, extra

  def split_init_rng(self, rng, train):
    """(the key of the codebook's k-means initialisation, or None where none can run; the key
    for the rest of the step): `rng` itself is the latter without k-means, so such runs draw
    their restarts as before the option existed."""
    if not (train and self.kmeans_init):
      return None, rng
    return tuple(jax.random.split(rng))

  def gather_codebook_stats(self, extra, z, codes, rng, train):
    """`extra` with the encoder's vectors z and their codes added to the step's codebook
    statistics (when training); `after_update` takes the EMA step from them."""
    if not train:
      return extra
    return cb.accumulate_step_stats(extra, jax.lax.stop_gradient(z), codes, rng)

  def after_update(self, params, extra, step):
    """The codebook's one EMA step of this optimizer step, and its dead-code restarts; other
    entries of `extra` (a VQ-KD teacher) are kept."""
    return cb.apply_step_stats(extra, decay=self.decay, eps=self.eps, l2=self.l2,
                               restart_after=self.restart_after, update=self.update)

  def loss(self, params, extra, batch, rng, train=True):
    images = batch["image"].astype(jnp.float32)
    init_rng, rng = self.split_init_rng(rng, train)
    z, e, codes, recon, extra = self._forward(params, extra, images, init_rng)
    recon_loss = jnp.mean(jnp.square(recon - images))
    commit_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
    loss = recon_loss + self.commitment * commit_loss
    usage, perplexity = cb.usage_and_perplexity(codes, self.vocab_size)
    metrics = {"loss": loss, "recon_loss": recon_loss, "commit_loss": commit_loss,
               "codebook_usage": usage, "perplexity": perplexity,
               "restarted_codes": extra["restarted_codes"].astype(jnp.float32)}
    extra = self.gather_codebook_stats(extra, z, codes, rng, train)
    return loss, (metrics, extra)

  def reconstruct(self, params, batch, rng, extra):
    """{"pred": decoded patches [B, N, p*p*C], "mask": zeros [B, N]} for pictures."""
    _, _, codes, recon, _ = self._forward(params, extra, batch["image"])
    pred = patchify(recon, self.patch_size)
    return {"pred": pred, "mask": jnp.zeros(pred.shape[:2], jnp.float32)}

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    """One row per image: original | the tokenizer's reconstruction from its codes."""
    h, w, c = images.shape[1:]
    recon = viz.unpatchify(np.asarray(out["pred"]), self.patch_size,
                           (h // self.patch_size, w // self.patch_size), c)
    return viz.image_rows([images, recon], **self.display)

  def encoder_params(self, params, extra):
    return params["encoder"]

  def export(self, path, params, extra, info):
    """Writes `path`/tokenizer/ (`tokenizers.io` layout): the network and the codebook."""
    io.export_tokenizer(os.path.join(path, io.EXPORT_DIR), params, extra["codebook"],
                        {**self.info, "method": info.get("method", self.name)})
