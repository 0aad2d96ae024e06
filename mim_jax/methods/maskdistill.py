"""MaskDistill (Peng et al., 2022, "A Unified View of Masked Image Modeling"): masked feature
distillation from a frozen teacher.

Composed from `masked_prediction.MaskedPrediction` with the `patch_targets.TeacherFeatures`
target: every patch through the encoder with a learned mask token in place of the masked ones
(BEiT's blockwise masking at 40%), a linear head from the student's width to the teacher's,
and smooth-L1 (or, as MVP, 1 - cosine) between the head's output and the teacher's
normalised features at the masked patches. The teacher (`teacher.path`) is any encoder mim_jax
loads: its own exports, or timm / HF ViTs imported with `python -m mim_jax.convert` (the paper
distils CLIP ViT-B/16). It sees the full, unmasked view; its features are its last block's
output after the final norm (`teacher.block=0`) or block k's, layer-normalised without affine
parameters (`teacher.norm="layer"`, as the paper normalises its targets). Its weights live in
the run's `extra` (checkpointed, never optimised).

The teacher helpers here (`teacher_fields`, `validate_teacher`, `teacher_target`) are shared
with the target-by-config method (`methods/mim.py`).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from mim_jax import viz
from mim_jax.config import validation as v
from mim_jax.config.errors import ConfigError, config_error
from mim_jax.methods.masked_prediction import MaskedPrediction
from mim_jax.models.vit import size_from_config
from mim_jax.objectives import losses, masking, patch_targets
from mim_jax.objectives.frozen_teacher import FrozenTeacher

DISTILL_LOSSES = ("smooth_l1", "cosine", "mse", "l1")
TEACHER_HINT = ("Train one first (e.g. python -m mim_jax.main --config=configs/mae_fmnist.py "
                "--workdir=DIR, then --config.teacher.path=DIR), or import a ViT with "
                "python -m mim_jax.convert.")


def teacher_fields() -> ml_collections.ConfigDict:
  """The frozen teacher: an encoder export / pre-training or fine-tuning workdir / import
  (`path`), the block whose output is the target (`block`: 0 = the output after the final
  norm, k = the output of block k, counted from 1, before that norm, as the probe's
  `classifier.probe_layer` and `mim_jax.features` count: `models.vit.block_output`), and the
  targets' normalisation (`norm`: "layer" = per-token LayerNorm without affine parameters, or
  "none")."""
  return ml_collections.ConfigDict(dict(path="", block=0, norm="layer"))


def build_teacher(config, t, prefix: str) -> FrozenTeacher:
  """The teacher of fields `t` (at `prefix`) for the student (or tokenizer) of `config`: the
  same view, its patch grid."""
  _, patch = size_from_config(config.model)
  grid = (config.image_size[0] // patch, config.image_size[1] // patch)
  if not isinstance(t.path, str) or not t.path:
    raise config_error(f"{prefix}.path", t.path, "the path of the frozen teacher encoder",
                       TEACHER_HINT)
  return FrozenTeacher.from_source(
      t.path, image_size=tuple(config.image_size), grid_hw=grid, channels=config.channels,
      mean=tuple(config.data.mean), std=tuple(config.data.std),
      dtype=config.model.get("dtype", "float32"),  # a tokenizer's model has no dtype field
      attention_impl=config.model.get("attention_impl", ""), field=f"{prefix}.path")


def validate_teacher(config, t, prefix: str) -> FrozenTeacher:
  """Checks the teacher fields `t` (at `prefix`): an encoder that exists, fits the student's
  channels, and has `block`. Returns the teacher."""
  teacher = build_teacher(config, t, prefix)
  v.require(v.is_int(t.block) and 0 <= t.block <= teacher.depth, f"{prefix}.block", t.block,
            f"0 (the output after the final norm) or a block in [1, {teacher.depth}] of the "
            f"teacher at {t.path}, counted from 1 as the probe counts")
  v.require(t.norm in patch_targets.FEATURE_NORMS, f"{prefix}.norm", t.norm,
            f"one of {patch_targets.FEATURE_NORMS}")
  return teacher


def teacher_target(config, t, prefix: str) -> patch_targets.TeacherFeatures:
  return patch_targets.TeacherFeatures(build_teacher(config, t, prefix), int(t.block), t.norm)


def teacher_width(config, t, prefix: str) -> int:
  try:
    return build_teacher(config, t, prefix).width
  except ConfigError:
    return 0  # unknown before the teacher exists (FLOPs of an unvalidated config)


def similarity_picture(images: np.ndarray, out: dict, grid_hw, patch: int, channels: int,
                       display: dict) -> np.ndarray:
  """original | masked | per-patch cosine similarity of prediction and target (white = 1),
  and with attention-guided masking the teacher's last-layer [CLS] attention of each head
  (white = the most attended patch of that head)."""
  pred, target = np.asarray(out["pred"], np.float32), np.asarray(out["target"], np.float32)
  cos = (pred * target).sum(-1) / np.maximum(
      np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1), 1e-8)
  masked = viz.masked_images(images, out["mask"], grid_hw, patch, display["mean"],
                             display["std"])
  sims = viz.patch_map_images(cos, grid_hw, patch, channels, display["mean"], display["std"],
                              value_range=(-1.0, 1.0))
  heads = []
  if "attention" in out:
    attention = np.asarray(out["attention"], np.float32)  # [B, heads, N]
    heads = [viz.patch_map_images(attention[:, h], grid_hw, patch, channels, display["mean"],
                                  display["std"]) for h in range(attention.shape[1])]
  return viz.image_rows([images, masked, sims, *heads], **display)


class MaskDistill(MaskedPrediction):
  name = "maskdistill"
  weight_fields = MaskedPrediction.weight_fields + ("teacher.path",)
  head_in_vit = True  # BEiT v2's code base

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio=0.4)
    c.teacher = teacher_fields()
    # smooth_l1 (the paper; PyTorch's default beta 1) or cosine (MVP); mse / l1 for studies.
    c.target = ml_collections.ConfigDict(dict(loss="smooth_l1", smooth_l1_beta=1.0))

  @classmethod
  def validate(cls, config):
    super().validate(config)
    t = config.target
    v.require(t.loss in DISTILL_LOSSES, "target.loss", t.loss, f"one of {DISTILL_LOSSES}")
    v.require(v.is_number(t.smooth_l1_beta) and t.smooth_l1_beta >= 0, "target.smooth_l1_beta",
              t.smooth_l1_beta, "a number >= 0 (0: L1)")
    validate_teacher(config, config.teacher, "teacher")

  @classmethod
  def mask_kinds(cls, config):
    return masking.MASK_KINDS + (masking.ATTENTION_KIND,)

  @classmethod
  def unread_rules(cls):
    return [*super().unread_rules(),
            (("target.smooth_l1_beta",), lambda c: c.target.loss == "smooth_l1",
             "only target.loss='smooth_l1' reads it")]

  @classmethod
  def target_dim(cls, config):
    return teacher_width(config, config.teacher, "teacher")

  @classmethod
  def target_flops(cls, config):
    # The teacher's forward pass counts: without the teacher its size is unknown, and a count
    # without it would under-state the step (BEiT's tokenizer is read the same way).
    return build_teacher(config, config.teacher, "teacher").forward_flops()

  def __init__(self, config, length=None):
    t = config.target
    super().__init__(config, length, target=teacher_target(config, config.teacher, "teacher"),
                     loss_fn=losses.masked_loss(t.loss, float(t.smooth_l1_beta)))
    self.channels = config.channels

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    return similarity_picture(images, out, self.grid_hw, self.patch_size, self.channels,
                              self.display)
