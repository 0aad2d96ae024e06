"""BEiT (Bao et al., 2022): masked image modeling with visual tokens, stage 2.

Composed from `masked_prediction.MaskedPrediction`: blockwise masking (`config.masking`), every
patch through the encoder with a learned mask token in place of the masked ones, a linear
head over the tokenizer's vocabulary, and cross-entropy against the tokenizer's code of each
masked patch (`losses.masked_cross_entropy`). The tokenizer (stage 1, trained by
`configs/beit_tokenizer_*.py`, see `mim_jax.tokenizers`) is frozen: it is read from
`config.tokenizer.path` into the method's `extra` (`wants_weights` + `load_pretrained`, so it
is checkpointed with the run) and encodes the batch inside the jitted step under
stop_gradient.

Differences from the official recipe, kept on purpose: fixed 2-D sin-cos positions instead of
relative position bias, no layer scale (the encoder every method here shares), and our own VQ
tokenizer, trained on the same data and applied to the same augmented view at the encoder's
resolution, instead of DALL-E's dVAE on a second 112-px view.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax import viz
from mim_jax.config import validation
from mim_jax.methods.masked_prediction import MaskedPrediction
from mim_jax.models.vit import size_from_config
from mim_jax.objectives import losses
from mim_jax.tokenizers import io, vq
from mim_jax.tokenizers.models import encode_flops, tokenizer_model


class BEiT(MaskedPrediction):
  name = "beit"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio=0.4)
    # The frozen tokenizer: a tokenizer workdir or export (`tokenizers.io`); its vocabulary
    # must be vocab_size (BEiT: 8192) and its geometry this config's (checked at start-up).
    c.tokenizer = ml_collections.ConfigDict(dict(path="", vocab_size=8192))

  @classmethod
  def validate(cls, config):
    super().validate(config)
    t, image_size = config.tokenizer, tuple(config.image_size)
    _, patch = size_from_config(config.model)
    validation.require(validation.is_int(t.vocab_size) and t.vocab_size >= 2,
                       "tokenizer.vocab_size", t.vocab_size, "an integer >= 2 (BEiT: 8192)")
    io.check_matches(t.path, vocab_size=t.vocab_size, image_size=image_size, patch_size=patch,
                     channels=config.channels, mean=config.data.mean, std=config.data.std,
                     variant=config.model.variant)

  @classmethod
  def target_dim(cls, config):
    return int(config.tokenizer.vocab_size)

  @classmethod
  def forward_flops(cls, config):
    out = super().forward_flops(config)
    tokenizer = encode_flops(io.read_info(str(config.tokenizer.path)))
    return {**out, "tokenizer": tokenizer, "total": out["total"] + tokenizer}

  def __init__(self, config, length=None):
    self.tokenizer_path = str(config.tokenizer.path)
    self.tokenizer_info = io.read_info(self.tokenizer_path)
    self.tokenizer = tokenizer_model(self.tokenizer_info)
    self.l2 = bool(self.tokenizer_info.get("l2_normalize", False))
    self.vocab_size = int(self.tokenizer_info["vocab_size"])
    super().__init__(config, length, target_fn=None, loss_fn=losses.masked_cross_entropy)

  def wants_weights(self) -> bool:
    return True  # the frozen tokenizer comes from its own files, with or without init_from

  def init(self, rng, images):
    params, _ = super().init(rng, images)
    # Placeholders of the tokenizer's shapes; `load_pretrained` (or a checkpoint) fills them.
    shapes = jax.eval_shape(self.tokenizer.init, jax.random.key(0), images)["params"]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    codebook = jnp.zeros((self.vocab_size, int(self.tokenizer_info["code_dim"])), jnp.float32)
    return params, {"tokenizer": {"params": zeros, "codebook": codebook}}

  def load_pretrained(self, params, extra):
    tokenizer, _ = io.load_tokenizer(self.tokenizer_path)
    want = jax.tree.structure(extra["tokenizer"])
    if jax.tree.structure(tokenizer) != want:
      raise ValueError(f"the tokenizer at {self.tokenizer_path} does not hold the parameters its "
                       f"tokenizer.json describes ({jax.tree.structure(tokenizer)} vs {want})")
    params, extra = super().load_pretrained(params, extra)  # init_from, if any
    return params, {**extra, "tokenizer": tokenizer}

  def targets(self, extra, images):
    """The frozen tokenizer's codes, int32 [B, N]."""
    return vq.tokenize(self.tokenizer, jax.lax.stop_gradient(extra["tokenizer"]), images,
                       self.l2, self.tokenizer_info["kind"])

  def extra_metrics(self, pred, target, mask):
    hit = (jnp.argmax(pred, axis=-1) == target).astype(jnp.float32)
    return {"accuracy": losses.masked_mean(hit, mask, self.axis_name)}

  def reconstruct(self, params, batch, rng, extra):
    """Decoded images [B, H, W, C] of the target codes and of the predicted codes (predictions
    at masked patches, targets at visible ones), and the mask [B, N] (float32)."""
    logits, mask = self._predict(params, batch, rng, train=False)
    target = self.targets(extra, batch["image"])
    pred = jnp.where(mask, jnp.argmax(logits, axis=-1).astype(jnp.int32), target)
    decoded = vq.decode(self.tokenizer, extra["tokenizer"], jnp.concatenate([target, pred]),
                        self.grid_hw)
    b = target.shape[0]
    return {"target": decoded[:b], "pred": decoded[b:], "mask": mask.astype(jnp.float32)}

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    """original | masked | tokenizer decoding of the target codes | of the predicted codes."""
    (gh, gw), p = self.grid_hw, self.patch_size
    mask = np.asarray(out["mask"]).reshape(-1, gh, gw).repeat(p, 1).repeat(p, 2)[..., None] > 0
    mean, std = (np.asarray(self.display[k], np.float32) for k in ("mean", "std"))
    grey = (viz.MASK_GREY - mean) / std  # shows as mid-grey after de-normalisation
    masked = np.where(mask, grey, images)
    return viz.image_rows([images, masked, out["target"], out["pred"]], **self.display)
