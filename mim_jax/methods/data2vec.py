"""data2vec (Baevski et al., 2022), vision: regress an EMA teacher's layer-averaged features.

Student: the mask-token ViT encoder with a linear regression head to the encoder width
(`masked_prediction.MaskTokenModel`), masked by `config.masking` (BEiT's blockwise masking at
60% in configs/data2vec_*.py). Teacher: a copy of the student's encoder kept in
extra["teacher"], so it is checkpointed and sharded like the student but never optimised; it
sees the unmasked image, without stochastic depth, under stop_gradient. After every update it
follows the student, teacher <- d * teacher + (1 - d) * student (`teachers.ema_update`), with d
annealed linearly from `teacher.ema_decay` to `teacher.ema_end_decay` over the first
`teacher.ema_anneal_fraction` of the lr schedule (then constant).

Targets: the patch tokens of the teacher's last `teacher.top_k` block outputs (each block's
output after its residual, before the final LayerNorm: the official vision code's "end" layer
results), each normalised without affine parameters (`teacher.block_norm`), averaged, and the
average normalised again (`teacher.final_norm`). The loss is smooth-L1 with beta
`teacher.loss_beta` averaged over the channels and the masked patches (`losses.masked_smooth_l1`:
the official vision code's mean-reduced `smooth_l1_loss` with its loss scale off; fairseq's port
instead sums over channels and scales by 1/sqrt(D), the same objective times sqrt(D)).

The exported encoder is the student's (`encoder_params`), as in the official release.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mim_jax.config import validation as v
from mim_jax.methods import base
from mim_jax.methods.masked_prediction import MaskTokenModel
from mim_jax.models import flops
from mim_jax.models.decoders import LinearPredictor
from mim_jax.models.initializers import head_init
from mim_jax.models.vit import encoder_from_config, size_from_config
from mim_jax.objectives import losses, masking, teachers
from mim_jax.objectives.frozen_teacher import cls_attention
from mim_jax.weights import continuation


def validate_ema_teacher(config) -> None:
  """The EMA teacher's fields shared by data2vec and data2vec 2.0: top_k, the decays and their
  annealing, the target normalisations."""
  t = config.teacher
  depth = size_from_config(config.model)[0].depth
  v.require(v.is_int(t.top_k) and 1 <= t.top_k <= depth, "teacher.top_k", t.top_k,
            f"an integer in [1, {depth}] (the encoder depth; data2vec ViT-B: 6 of 12 blocks)")
  for name in ("ema_decay", "ema_end_decay"):
    v.require(v.is_number(t[name]) and 0 <= t[name] <= 1, f"teacher.{name}", t[name],
              "a number in [0, 1] (data2vec: 0.999 -> 0.9998)")
  v.require(t.ema_end_decay >= t.ema_decay, "teacher.ema_end_decay", t.ema_end_decay,
            f"at least teacher.ema_decay={t.ema_decay} (the teacher slows down, never "
            "speeds up)")
  frac = t.ema_anneal_fraction
  v.require(v.is_number(frac) and 0 <= frac <= 1, "teacher.ema_anneal_fraction", frac,
            "a fraction of the lr schedule in [0, 1] (0: ema_end_decay from the start)")
  for name in ("block_norm", "final_norm"):
    v.require(t[name] in teachers.TARGET_NORMS, f"teacher.{name}", t[name],
              f"one of {teachers.TARGET_NORMS}")


class Data2Vec(base.PretrainingMethod):
  """data2vec as the training loop sees it (see `methods.base.Method`)."""
  name = "data2vec"
  schedules_by_length = True
  mask_token_in_encoder = True
  head_in_vit = True  # its lm_head
  loss_is_masked_mean = True  # losses.masked_smooth_l1

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio=0.6)
    # The EMA teacher and its regression targets (module docstring): decay annealed linearly
    # from ema_decay to ema_end_decay over the first ema_anneal_fraction of the lr schedule;
    # targets average its top_k block outputs, each normalised by block_norm ("instance": per
    # channel over the tokens; "layer": per token over the channels; "none"), the average by
    # final_norm; smooth-L1 with loss_beta (0: L1) on the masked patches.
    c.teacher = ml_collections.ConfigDict(dict(
        ema_decay=0.999, ema_end_decay=0.9998, ema_anneal_fraction=1.0, top_k=6,
        block_norm="layer", final_norm="layer", loss_beta=2.0))

  @classmethod
  def unread_rules(cls):
    return [*super().unread_rules(),
            (("teacher.ema_decay",), lambda c: c.teacher.ema_anneal_fraction > 0,
             "the EMA decay is teacher.ema_end_decay from the start "
             "(teacher.ema_anneal_fraction=0)")]

  @classmethod
  def validate(cls, config):
    # The EMA teacher's attention can pick the masks (AttMask, masking.kind='attention').
    v.validate_pretraining_fields(config,
                                  mask_kinds=masking.MASK_KINDS + (masking.ATTENTION_KIND,))
    validate_ema_teacher(config)
    t = config.teacher
    v.require(v.is_number(t.loss_beta) and t.loss_beta >= 0, "teacher.loss_beta", t.loss_beta,
              "a number >= 0 (0: L1; data2vec: 2)")

  @classmethod
  def forward_flops(cls, config):
    # Student and EMA teacher each encode all patches; the head maps tokens to the width.
    size, patch = size_from_config(config.model)
    n = (config.image_size[0] // patch) * (config.image_size[1] // patch)
    encoder = flops.encoder_flops(config.model, config.image_size, config.channels)
    decoder = float(2 * n * size.width * size.width)
    return {"encoder": encoder, "decoder": decoder, "teacher": encoder,
            "total": 2 * encoder + decoder}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                  use_mask_token=True)
    self.model = MaskTokenModel(
        encoder=encoder,
        predictor=LinearPredictor(encoder.width, dtype=jnp.dtype(config.model.dtype),
                                  # its lm_head is a layer of the official ViT
                                  kernel_init=head_init(config.model.get("weight_init", "xavier"))))
    self.teacher = encoder.clone(drop_path_rate=0.0)  # same parameters, no stochastic depth
    self.grid_hw = encoder.grid_hw
    self.mask_generator = masking.mask_generator_from_config(
        config.masking, encoder.grid_hw, encoder.patch_size)
    self.read_teacher_fields(config.teacher)
    self.beta = float(config.teacher.loss_beta)

  def read_teacher_fields(self, t) -> None:
    """The EMA schedule and the target recipe of `config.teacher` (data2vec and 2.0 alike)."""
    self.anneal_steps = int(round(float(t.ema_anneal_fraction) * self.length.schedule_steps))
    self.decay_start, self.decay_end = float(t.ema_decay), float(t.ema_end_decay)
    self.top_k, self.block_norm, self.final_norm = int(t.top_k), t.block_norm, t.final_norm

  def ema_decay(self, step: jax.Array) -> jax.Array:
    """The decay of the update with index `step` (0 for the first)."""
    return teachers.linear_anneal(step, self.decay_start, self.decay_end, self.anneal_steps)

  def init(self, rng, images):
    mask = jnp.zeros((images.shape[0], self.grid_hw[0] * self.grid_hw[1]), bool)
    params = self.model.init({"params": rng}, images, mask)["params"]
    # The decay the next update will use, kept for the metrics of the step that applies it.
    extra = {"teacher": jax.tree.map(jnp.copy, params["encoder"]),
             "ema_decay": self.ema_decay(jnp.zeros([], jnp.int32))}
    return params, extra

  def load_pretrained(self, params, extra):
    """Continued pre-training from `config.init_from`; the teacher starts as the loaded
    student's encoder."""
    params = continuation.load_into(params, self.config)
    return params, {**extra, "teacher": jax.tree.map(np.copy, params["encoder"])}

  def targets(self, teacher_params, images, attention: bool = False):
    """Teacher targets [B, N, D] for the unmasked images (no gradient); with `attention`, also
    its last block's [CLS] attention over the patches [B, heads, N]."""
    if attention:
      (_, aux), state = self.teacher.apply({"params": teacher_params}, images, train=False,
                                           mutable=["intermediates"])
    else:
      _, aux = self.teacher.apply({"params": teacher_params}, images, train=False)
    target = teachers.layer_average_targets(aux["blocks"], self.top_k, self.block_norm,
                                            self.final_norm)
    if not attention:
      return jax.lax.stop_gradient(target)
    return jax.lax.stop_gradient(
        (target, cls_attention(state["intermediates"], self.teacher.depth)))

  def loss(self, params, extra, batch, rng, train=True):
    mask_rng, drop_rng = jax.random.split(rng)
    if self.mask_generator.needs_scores:  # AttMask: the teacher's attention picks the masks
      target, attention = self.targets(extra["teacher"], batch["image"], attention=True)
      mask = self.mask_generator.from_scores(attention.mean(axis=1), mask_rng)
    else:
      mask = self.mask_generator.sample(batch, mask_rng)
      target = self.targets(extra["teacher"], batch["image"])
    pred = self.model.apply({"params": params}, batch["image"], mask, train=train,
                            rngs={"drop_path": drop_rng})
    loss = losses.masked_smooth_l1(pred, target, mask, beta=self.beta,
                                   axis_name=self.axis_name)
    metrics = {"loss": loss, "mask_fraction": jnp.mean(mask.astype(jnp.float32)),
               "ema_decay": extra["ema_decay"],
               "target_std": teachers.feature_std(target, mask, self.axis_name),
               "pred_std": teachers.feature_std(pred, mask, self.axis_name)}
    return loss, (metrics, extra)

  def after_update(self, params, extra, step):
    teacher = teachers.ema_update(extra["teacher"], params["encoder"], self.ema_decay(step))
    return {"teacher": teacher, "ema_decay": self.ema_decay(step + 1)}
