"""iBOT (Zhou et al., 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer").

Masked image modelling against an online tokenizer: the EMA teacher (encoder + DINO head) turns
each unmasked global view into prototype distributions, and the student (mask-token encoder +
the same head shape) predicts them
  * for [CLS] across views: student view i against teacher view j, i != j, over the two global
    and `multicrop.num_local` local views (`losses.cross_view_distillation`);
  * for patch tokens at the masked positions of the same global view
    (`losses.masked_patch_distillation`, per image over its masked count).
One head serves [CLS] and patch tokens (iBOT's shared head). The self-distillation parts
(`objectives.self_distillation`): head fields, temperature warmup, the last layer's freeze,
the teacher's EMA (momentum cosine to 1) and centres (one step per update by the whole batch's
mean, also with gradient accumulation; iBOT checkpoints written before 2026-12-03 lack the
centre sums and do not restore). The exported encoder is the teacher's, as iBOT evaluates it.

Views and masks come from the input pipeline (`data.multicrop.MultiCropAugment` through
`train_augment`): "global_views" [B, 2, H, W, C], "local_views" [B, L, h, w, C] and
"global_masks" [B, 2, N] from `config.masking` (iBOT: blockwise, half the views masked with a
ratio drawn from (0.1, 0.5); `masking.ratio_range` and `mask_probability` hold for every kind,
as iBOT's pred_ratio range and masked-image probability hold for its 'block' and 'rand').

Differences from the official code, kept on purpose: local views use the sin-cos table of
their own grid (positions 0 .. g - 1) instead of an interpolated learned table; `extra["step"]`
counts applied updates (it stops during skipped non-finite steps); the teacher temperature
warms up per step and, after the last-layer freeze, AdamW's bias correction counts from the
start of the run (`self_distillation`); a random mask at ratio r masks N - int(N * (1 - r))
patches (the project's MAE rule) where iBOT's 'rand' masks int(N * r).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.config import validation as v
from mim_jax.data import multicrop
from mim_jax.methods import base
from mim_jax.models import flops
from mim_jax.models.heads import DINOHead
from mim_jax.models.vit import ViTEncoder, encoder_from_config, size_from_config
from mim_jax.objectives import masking
from mim_jax.objectives import self_distillation as sd
from mim_jax.weights import continuation


class IBOTModel(nn.Module):
  """images [B, H, W, C] (+ token_mask [B, N]) -> head logits [B, 1 + N, K] (cls first), or
  [B, 1, K] with `cls_only`."""
  encoder: ViTEncoder
  head: DINOHead

  def __call__(self, images, token_mask=None, *, cls_only: bool = False, train: bool = False):
    tokens, _ = self.encoder(images, token_mask=token_mask, train=train)
    return self.head(tokens[:, :1] if cls_only else tokens)


class IBOT(base.PretrainingMethod):
  """iBOT as the training loop sees it (see `methods.base.Method` and its hooks)."""

  name = "ibot"
  schedules_by_length = True
  batch_keys = (multicrop.GLOBAL_VIEWS_KEY, multicrop.LOCAL_VIEWS_KEY,
                multicrop.GLOBAL_MASKS_KEY)
  mask_token_in_encoder = True

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio_range=(0.1, 0.5), mask_probability=0.5)
    multicrop.add_config(c)  # 2 global + 10 local views, DINO's photometrics
    # DINO head, temperatures, EMA teacher (`self_distillation`) and iBOT's loss weights.
    c.ibot = sd.default_config()
    c.ibot.update(lambda_cls=1.0, lambda_patch=1.0)

  @classmethod
  def unread_rules(cls):
    return [
        *super().unread_rules(), *sd.unread_rules("ibot"), *multicrop.UNREAD_RULES,
        # A loss weighted 0 leaves its teacher temperatures in the logged metrics alone.
        (("ibot.teacher_temp", "ibot.warmup_teacher_temp"), lambda c: c.ibot.lambda_cls > 0,
         "the [CLS] loss is off (ibot.lambda_cls=0)"),
        (("ibot.teacher_patch_temp", "ibot.warmup_teacher_patch_temp"),
         lambda c: c.ibot.lambda_patch > 0, "the patch loss is off (ibot.lambda_patch=0)")]

  @classmethod
  def validate(cls, config):
    v.validate_pretraining_fields(config)
    v.require(config.data.augment_on == "host", "data.augment_on", config.data.augment_on,
              "'host' for method 'ibot' (its multi-crop views are made in the input pipeline)")
    b = config.ibot
    sd.validate(config, "ibot")  # head, temperatures, momenta, freeze
    for name in ("lambda_cls", "lambda_patch"):
      v.require(v.is_number(b[name]) and b[name] >= 0, f"ibot.{name}", b[name],
                "a number >= 0 (iBOT: 1.0)")
    v.require(b.lambda_cls + b.lambda_patch > 0, "ibot.lambda_patch", b.lambda_patch,
              "a positive weight when ibot.lambda_cls is 0 (one loss must remain)")
    v.require(b.lambda_cls > 0 or config.multicrop.num_local == 0, "multicrop.num_local",
              config.multicrop.num_local, "0 when ibot.lambda_cls=0: the local views enter "
              "only the [CLS] loss, so they would cost compute and change nothing")
    multicrop.validate_config(config.multicrop, tuple(config.image_size),
                              size_from_config(config.model)[1])

  @classmethod
  def forward_flops(cls, config):
    """Per image: the student on 2 global views (all tokens through the head) and the local
    views ([CLS] through the head), the teacher on the 2 global views (forward only)."""
    size, patch = size_from_config(config.model)
    n = (config.image_size[0] // patch) * (config.image_size[1] // patch)
    local, head = tuple(config.multicrop.local_size), config.ibot
    glob = (flops.encoder_flops(config.model, config.image_size, config.channels)
            + sd.head_flops(head, size.width, 1 + n))
    loc = (flops.encoder_flops(config.model, local, config.channels)
           + sd.head_flops(head, size.width, 1))
    student = 2 * glob + int(config.multicrop.num_local) * loc
    return {"encoder": student, "teacher": 2 * glob, "total": student + 2 * glob}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    self.cfg, self.crop = config.ibot, config.multicrop
    self.norm = (tuple(config.data.mean), tuple(config.data.std))  # 8-bit views' normalisation
    encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                  use_mask_token=True)
    self.model = IBOTModel(encoder, sd.head_from_config(self.cfg, config.model.dtype))
    self.grid_hw = encoder.grid_hw
    # Drawn per global view by the multi-crop transform (`mask_generator` stays None: the loop
    # adds no single-view mask of its own).
    self.masks = masking.mask_generator_from_config(config.masking, encoder.grid_hw,
                                                    encoder.patch_size)

  def _epochs(self, epochs: float) -> int:
    return int(round(float(epochs) * self.length.steps_per_epoch))

  def decay_mask(self, params):
    """iBOT's groups (its utils.get_params_groups): every parameter but biases and vectors
    decays, the cls token and the mask embedding included, and the prototypes' scales, which
    the release holds as [out_dim, 1] (weight norm's g) and mim_jax as a vector."""
    return jax.tree.map(lambda x, last: x.ndim > 1 or last, params, sd.last_layer_mask(params))

  def wrap_optimizer(self, tx):
    """The head's last layer holds still for `ibot.freeze_last_layer_epochs`."""
    return sd.hold_last_layer(tx, self._epochs(self.cfg.freeze_last_layer_epochs))

  def train_augment(self, data_cfg, image_size, channels):
    return multicrop.augment_from_config(self.crop, data_cfg, image_size, channels, self.masks)

  def init(self, rng, images):
    params = self.model.init({"params": rng}, images)["params"]
    return params, sd.teacher_state(params, self.cfg.out_dim)

  def load_pretrained(self, params, extra):
    """Continued pre-training from `config.init_from` (encoder, and the head of an iBOT
    source); the teacher starts as a copy of the loaded student."""
    params = continuation.load_into(params, self.config)
    return params, {**extra, "teacher": jax.tree.map(np.copy, params)}

  def teacher_temps(self, step):
    """(cls, patch) teacher temperatures at `step`."""
    return sd.teacher_temps(self.cfg, step, self._epochs(self.cfg.warmup_teacher_temp_epochs))

  def momentum(self, step):
    return sd.teacher_momentum(self.cfg, step, self.length.schedule_steps)

  def loss(self, params, extra, batch, rng, train=True):
    """Views enter the encoders batch-major (multicrop.flatten_views), leave as [V, B, ...]."""
    c, step = self.cfg, extra["step"]
    views = multicrop.normalize_views(batch[multicrop.GLOBAL_VIEWS_KEY], *self.norm)
    nv, images = views.shape[1], multicrop.flatten_views(views)            # [B * V, H, W, C]
    row_masks = multicrop.flatten_views(batch[multicrop.GLOBAL_MASKS_KEY])  # [B * V, N]
    masks = multicrop.split_views(row_masks, nv)                           # [V, B, N]
    student = sd.stop_last_layer_gradient(  # see wrap_optimizer
        params, step < self._epochs(c.freeze_last_layer_epochs))
    global_rng, local_rng = jax.random.split(rng)
    teacher = jax.lax.stop_gradient(self.model.apply({"params": extra["teacher"]}, images))
    t_out = multicrop.split_views(teacher, nv)  # [V, B, 1 + N, K]
    s_out = multicrop.split_views(self.model.apply({"params": student}, images, row_masks,
        train=train, rngs={"drop_path": global_rng}), nv)  # [V, B, 1 + N, K]
    s_cls = s_out[:, :, 0]
    local = batch.get(multicrop.LOCAL_VIEWS_KEY)
    if local is not None and local.shape[1]:
      local = multicrop.normalize_views(local, *self.norm)
      s_local = self.model.apply({"params": student}, multicrop.flatten_views(local),
                                 cls_only=True, train=train, rngs={"drop_path": local_rng})
      s_cls = jnp.concatenate([s_cls, multicrop.split_views(s_local[:, 0], local.shape[1])])
    temp, patch_temp = self.teacher_temps(step)
    cls_loss, patch_loss, p_cls = sd.distillation_losses(
        c, extra, (temp, patch_temp), s_cls, s_out[:, :, 1:], t_out, masks)
    loss = c.lambda_cls * cls_loss + c.lambda_patch * patch_loss
    metrics = {"loss": loss, "cls_loss": cls_loss, "patch_loss": patch_loss,
               "teacher_temp": temp, "teacher_momentum": self.momentum(step),
               "mask_fraction": jnp.mean(masks.astype(jnp.float32)),
               **sd.collapse_metrics(p_cls, self.axis_name)}
    return loss, (metrics, sd.accumulate_centres(extra, t_out, self.axis_name))

  def after_update(self, params, extra, step):
    return sd.update_teacher(self.cfg, extra, params, step, self.length.schedule_steps)

  released_path = ("extra", "teacher")  # iBOT releases (and evaluates) its EMA teacher
