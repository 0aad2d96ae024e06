"""What a masked patch is asked to predict: the targets of the mask-token methods, as parts.

Each target maps the (normalised, augmented) images to one target per patch, computed inside
the jitted step under stop_gradient:

  kind              target [B, N, F]                                 frozen state (extra[key])
  pixels            the patch's pixels (SimMIM)                      -
  norm_pixels       the patch's pixels, standardised per patch (MAE) -
  hog               HOG histograms of the patch's cells (MaskFeat)   -
  tokens            int32 [B, N] codes of a frozen tokenizer (BEiT)  "tokenizer"
  teacher_features  a frozen teacher's patch features (MaskDistill)  "teacher"

A target with frozen state says so with `key`: the method keeps that state in its `extra`
(checkpointed with the run, never optimised), `init_extra` gives placeholders of its shapes
and `load_extra` the real weights, read once at the start of a fresh run.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from mim_jax.objectives import hog, targets, teachers
from mim_jax.objectives.frozen_teacher import FrozenTeacher
from mim_jax.tokenizers import io
from mim_jax.tokenizers import models as tokenizers

# The loss each target kind is trained with in its paper (a study may override it).
DEFAULT_LOSS = {"pixels": "l1", "norm_pixels": "mse", "hog": "mse", "tokens": "cross_entropy",
                "teacher_features": "smooth_l1"}
KINDS = tuple(DEFAULT_LOSS)
FEATURE_NORMS = ("layer", "none")


class PatchTarget:
  """A target kind (see the module docstring)."""
  kind: str = ""
  key: Optional[str] = None  # the extra entry of its frozen state, None if it has none
  discrete: bool = False     # int32 codes (cross-entropy) instead of vectors

  def __init__(self, dim: int):
    self.dim = int(dim)  # F, the predictor's output width (the vocabulary for codes)

  def __call__(self, state: Any, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> targets [B, N, F] float32 (or int32 [B, N] codes)."""
    raise NotImplementedError

  def init_extra(self) -> Any:
    """Placeholders of the frozen state's shapes (traceable); None without state."""
    return None

  def load_extra(self) -> Any:
    """The frozen state's real values (host arrays); None without state."""
    return None

  def forward_flops(self) -> float:
    """Forward FLOPs per image of computing the target (a frozen network's pass)."""
    return 0.0


class Pixels(PatchTarget):
  kind = "pixels"

  def __init__(self, patch_size: int, channels: int, norm_pix: bool = False):
    super().__init__(patch_size * patch_size * channels)
    self.patch_size, self.norm_pix = patch_size, norm_pix
    self.kind = "norm_pixels" if norm_pix else "pixels"

  def __call__(self, state, images):
    return targets.pixel_targets(images, self.patch_size, self.norm_pix)


class Hog(PatchTarget):
  kind = "hog"

  def __init__(self, patch_size: int, channels: int, *, cell_size: int, num_bins: int,
               gradient: str, gaussian_window: int, binning: str = "skimage"):
    super().__init__(hog.hog_feature_dim(patch_size, channels, cell_size, num_bins))
    self.patch_size = patch_size
    self.kwargs = dict(cell_size=cell_size, num_bins=num_bins, gradient=gradient,
                       gaussian_window=gaussian_window, binning=binning)

  def __call__(self, state, images):
    return hog.hog_patch_targets(images, self.patch_size, **self.kwargs)


class Tokens(PatchTarget):
  """A frozen tokenizer's code of each patch (the tokenizer export at `path`)."""
  kind, key, discrete = "tokens", "tokenizer", True

  def __init__(self, path: str):
    self.path = str(path)
    self.info = io.read_info(self.path)
    self.model = tokenizers.tokenizer_model(self.info)
    self.l2 = bool(self.info.get("l2_normalize", False))
    super().__init__(int(self.info["vocab_size"]))

  def __call__(self, state, images):
    return tokenizers.tokenize(self.model, jax.lax.stop_gradient(state), images, self.l2,
                               self.info["kind"])

  def init_extra(self):
    # The encoder's shapes from images, the decoder's from code vectors: a dVAE's encoder emits
    # V logits while its decoder reads code_dim-wide codes (a full forward pass would size the
    # decoder for V, and a checkpoint could not be restored onto those shapes).
    model, (h, w), p = self.model, self.info["image_size"], int(self.info["patch_size"])
    images = jnp.zeros((1, h, w, self.info["channels"]))
    codes = jnp.zeros((1, h // p, w // p, int(self.info["code_dim"])))
    enc = jax.eval_shape(lambda: model.init(jax.random.key(0), images, method=model.encode))
    dec = jax.eval_shape(lambda: model.init(jax.random.key(0), codes, method=model.decode))
    shapes = {**enc["params"], **dec["params"]}
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    codebook = jnp.zeros((self.dim, int(self.info["code_dim"])), jnp.float32)
    return {"params": zeros, "codebook": codebook}

  def load_extra(self):
    tokenizer, _ = io.load_tokenizer(self.path)
    want = jax.tree.structure(jax.eval_shape(self.init_extra))
    if jax.tree.structure(tokenizer) != want:
      raise ValueError(f"the tokenizer at {self.path} does not hold the parameters its "
                       f"tokenizer.json describes ({jax.tree.structure(tokenizer)} vs {want})")
    return tokenizer

  def decode(self, state, codes: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """Codes [B, N] -> the tokenizer's decoded images [B, H, W, C]."""
    return tokenizers.decode(self.model, state, codes, grid_hw)

  def forward_flops(self):
    return tokenizers.encode_flops(self.info)


class TeacherFeatures(PatchTarget):
  """A frozen teacher's features of each patch (objectives/frozen_teacher.py), from `block`
  (0: its output after the final norm; k: block k's, from 1, before it), normalised by `norm`
  (teachers.normalize: "layer", per token without affine parameters, as MaskDistill
  normalises them, or "none")."""
  kind, key = "teacher_features", "teacher"

  def __init__(self, teacher: FrozenTeacher, block: int = 0, norm: str = "layer"):
    super().__init__(teacher.width)
    self.teacher, self.block, self.norm = teacher, int(block), norm

  def __call__(self, state, images):
    return teachers.normalize(self.teacher.features(state, images, self.block), self.norm)

  def with_attention(self, state, images) -> tuple[jax.Array, jax.Array]:
    """(targets [B, N, D], the teacher's last [CLS] attention [B, heads, N]) in one pass."""
    feats, attention = self.teacher.features(state, images, self.block, attention=True)
    return teachers.normalize(feats, self.norm), attention

  def init_extra(self):
    return self.teacher.init_params()

  def load_extra(self):
    return self.teacher.load_params()

  def forward_flops(self):
    return self.teacher.forward_flops()
