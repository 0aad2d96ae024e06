"""BEiT v2's VQ-KD tokenizer ("vqkd_tokenizer"): codes that stand for a teacher's features.

Vector-quantised knowledge distillation (Peng et al., 2022): the tokenizer's encoder maps
each patch to a unit vector z, which is replaced by its nearest code of an l2-normalised
codebook (nearest by cosine; the codebook follows the assigned vectors by EMA,
`tokenizers.codebook`: by default VQ-VAE's EMA of assigned sums and counts with dead-code
restarts; `tokenizer.codebook_update='norm_ema'`, `kmeans_init=10`, `restart_after=0` is the
release's NormEMAVectorQuantizer, as configs/vqkd_tokenizer_imagenet.py sets it); the decoder
then reconstructs not pixels but the frozen teacher's features of that patch, and the loss is
their cosine distance:

  loss = mean over patches (1 - cos(decoded, teacher features)) + commitment * |z - sg(e)|^2

so the codes keep what the teacher's features say about a patch (its semantics, for a CLIP
teacher) rather than its pixels. The teacher is any encoder mim_jax loads (`teacher.path`:
its own exports, or timm / HF / CLIP ViTs imported with `python -m mim_jax.convert`), run
forward only on the tokenizer's view, re-normalised with its own statistics; its weights live
in the run's `extra` beside the codebook (checkpointed, never optimised).

The export (WORKDIR/tokenizer/) has the layout of the VQ tokenizer's, with "feature_dim" in
tokenizer.json: BEiT stage 2 reads it with `--config.tokenizer.path` exactly as it reads a
pixel VQ tokenizer (only the encoder and the codebook make its targets).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import viz
from mim_jax.config import validation as v
from mim_jax.methods.maskdistill import (
  build_teacher,
  teacher_fields,
  teacher_target,
  teacher_width,
  validate_teacher,
)
from mim_jax.objectives import losses
from mim_jax.tokenizers import codebook as cb
from mim_jax.tokenizers import models
from mim_jax.tokenizers.models import tokenizer_model
from mim_jax.tokenizers.vq import VQTokenizer, tokenizer_info


class VQKDTokenizer(VQTokenizer):
  """A VQ-KD tokenizer as the training loop sees it (see `methods.base.Method`)."""

  name = "vqkd_tokenizer"
  weight_fields = VQTokenizer.weight_fields + ("teacher.path",)

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.teacher = teacher_fields()

  @classmethod
  def validate(cls, config):
    super().validate(config)
    v.require(config.tokenizer.l2_normalize is True, "tokenizer.l2_normalize",
              config.tokenizer.l2_normalize,
              "True: VQ-KD's codebook is l2-normalised (codes chosen by cosine similarity)")
    validate_teacher(config, config.teacher, "teacher")

  @classmethod
  def _info(cls, config) -> dict:
    info = tokenizer_info(config)
    # 0 before the teacher exists (FLOPs of an unchecked config): a decoder to 1 feature then
    info["feature_dim"] = teacher_width(config, config.teacher, "teacher") or 1
    info["teacher"] = {"path": str(config.teacher.path), "block": int(config.teacher.block),
                       "norm": str(config.teacher.norm)}
    return info

  @classmethod
  def forward_flops(cls, config):
    info = cls._info(config)
    enc, dec = models.encode_flops(info), models.decode_flops(info)
    # The teacher's forward pass counts (it runs in every step): no count without it.
    teacher = build_teacher(config, config.teacher, "teacher").forward_flops()
    return {"encoder": enc, "decoder": dec, "teacher": teacher, "total": enc + dec + teacher}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    self.info = self._info(config)
    self.model = tokenizer_model(self.info)
    self.target = teacher_target(config, config.teacher, "teacher")
    self.grid_hw = tuple(self.info["grid"])
    self.channels = int(config.channels)

  def wants_weights(self) -> bool:
    return True  # the teacher's weights (load_pretrained)

  def init(self, rng, images):
    params, state = super().init(rng, images)
    return params, {**state, "teacher": self.target.init_extra()}

  def load_pretrained(self, params, extra):
    return params, {**extra, "teacher": self.target.load_extra()}

  def _decode(self, params, extra, images, rng=None):
    """The VQ forward pass (`VQTokenizer._forward`) with the decoded features as [B, N, F]."""
    z, e, codes, decoded, extra = self._forward(params, extra, images, rng)
    return z, e, codes, decoded.reshape(z.shape[0], -1, decoded.shape[-1]), extra

  def loss(self, params, extra, batch, rng, train=True):
    images = batch["image"].astype(jnp.float32)
    target = jax.lax.stop_gradient(self.target(extra["teacher"], images))  # [B, N, F]
    init_rng, rng = self.split_init_rng(rng, train)
    z, e, codes, decoded, extra = self._decode(params, extra, images, init_rng)
    everywhere = jnp.ones(target.shape[:2], jnp.float32)
    recon_loss = losses.masked_cosine(decoded, target, everywhere)
    commit_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))
    loss = recon_loss + self.commitment * commit_loss
    usage, perplexity = cb.usage_and_perplexity(codes, self.vocab_size)
    metrics = {"loss": loss, "recon_loss": recon_loss, "commit_loss": commit_loss,
               "cosine": 1.0 - recon_loss, "codebook_usage": usage, "perplexity": perplexity,
               "restarted_codes": extra["restarted_codes"].astype(jnp.float32)}
    extra = self.gather_codebook_stats(extra, z, codes, rng, train)
    return loss, (metrics, extra)

  def reconstruct(self, params, batch, rng, extra):
    """{"pred": decoded features [B, N, F], "target": the teacher's [B, N, F]}."""
    images = batch["image"].astype(jnp.float32)
    _, _, _, decoded, _ = self._decode(params, extra, images)
    return {"pred": decoded, "target": self.target(extra["teacher"], images)}

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    """original | per-patch cosine similarity of the decoded and the teacher's features
    (white = 1, black = -1)."""
    pred, target = np.asarray(out["pred"], np.float32), np.asarray(out["target"], np.float32)
    cos = (pred * target).sum(-1) / np.maximum(
        np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1), 1e-8)
    sims = viz.patch_map_images(cos, self.grid_hw, self.patch_size, self.channels,
                                self.display["mean"], self.display["std"],
                                value_range=(-1.0, 1.0))
    return viz.image_rows([images, sims], **self.display)
