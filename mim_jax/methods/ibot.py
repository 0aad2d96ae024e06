"""iBOT (Zhou et al., 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer").

Masked image modelling against an online tokenizer: the EMA teacher (encoder + DINO head) turns
each unmasked global view into prototype distributions, and the student (mask-token encoder +
the same head shape) predicts them
  * for [CLS] across views: student view i against teacher view j, i != j, over the two global
    and `multicrop.num_local` local views (`losses.cross_view_distillation`);
  * for patch tokens at the masked positions of the same global view
    (`losses.masked_patch_distillation`, per image over its masked count).
One head serves [CLS] and patch tokens (iBOT's shared head). Teacher outputs are centred
(centres in `extra`, EMA `ibot.center_momentum`, one step per update by the whole batch's mean
teacher output, also with gradient accumulation: `teachers.accumulate_centre` /
`update_centres`; iBOT checkpoints written before 2026-12-03 lack the sums batch_center_cls,
batch_center_patch and the count batch_micro_batches, and do not restore) and sharpened by a
temperature warmed up linearly from `warmup_teacher_temp` to `teacher_temp` over
`warmup_teacher_temp_epochs`; the student temperature is fixed. The teacher follows the
student after every update (`after_update`) with a momentum going from `ibot.momentum` to 1
along a half cosine over the lr schedule. The last layer of the student head (its
prototypes) stays exactly as it is for the first `freeze_last_layer_epochs`: no gradient
(`loss`) and no update, weight decay included (`wrap_optimizer`). The exported encoder is
the teacher's, as iBOT evaluates it.

Views and masks come from the input pipeline (`data.multicrop.MultiCropAugment` through
`train_augment`): "global_views" [B, 2, H, W, C], "local_views" [B, L, h, w, C] and
"global_masks" [B, 2, N] from `config.masking` (iBOT: blockwise, half the views masked with a
ratio drawn from (0.1, 0.5)). `masking.ratio_range` and `masking.mask_probability` hold for
every kind, as iBOT's pred_ratio range and masked-image probability hold for both its 'block'
and 'rand' shapes (`masking.MaskGenerator`: a variable ratio).

Differences from the official code, kept on purpose: the teacher temperature warms up per
step instead of per epoch; local views use the sin-cos table of their own grid (positions
0 .. g - 1) instead of an interpolated learned table; a step's `extra["step"]` counts applied
updates (it also stops during skipped non-finite steps); a random mask at ratio r masks
N - int(N * (1 - r)) patches (the project's MAE rule) where iBOT's 'rand' masks int(N * r);
after the last-layer freeze, AdamW's bias correction for the last layer counts from the start of
the run, not from its first gradient (see `wrap_optimizer`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mim_jax.config import validation as v
from mim_jax.data import multicrop
from mim_jax.methods import base
from mim_jax.models import flops
from mim_jax.models.heads import DINOHead, dino_head_flops
from mim_jax.models.vit import ViTEncoder, encoder_from_config, size_from_config
from mim_jax.objectives import losses, masking, teachers
from mim_jax.training import optim
from mim_jax.weights import continuation


class IBOTModel(nn.Module):
  """images [B, H, W, C] (+ token_mask [B, N]) -> head logits [B, 1 + N, K] (cls first), or
  [B, 1, K] with `cls_only`."""
  encoder: ViTEncoder
  head: DINOHead

  def __call__(self, images, token_mask=None, *, cls_only: bool = False, train: bool = False):
    tokens, _ = self.encoder(images, token_mask=token_mask, train=train)
    return self.head(tokens[:, :1] if cls_only else tokens)


# The parameters of the head's last layer (DINOHead: the prototype directions and, without
# norm_last_layer, their scales), frozen for `ibot.freeze_last_layer_epochs`.
LAST_LAYER = ("last_layer", "last_layer_scale")
CENTRES = ("center_cls", "center_patch")  # the teacher-output centres in `extra`


def last_layer_mask(params):
  """The pytree of `params` with True at the head's last-layer leaves, False elsewhere."""
  def frozen(path, _):
    keys = [getattr(k, "key", None) for k in path]
    return len(keys) >= 2 and keys[0] == "head" and keys[1] in LAST_LAYER
  return jax.tree_util.tree_map_with_path(frozen, params)


def _views_first(x: jax.Array) -> jax.Array:
  """[B, V, ...] -> [V * B, ...] (view-major)."""
  return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


class IBOT(base.PretrainingMethod):
  """iBOT as the training loop sees it (see `methods.base.Method` and its hooks)."""

  name = "ibot"
  schedules_by_length = True
  batch_keys = (multicrop.GLOBAL_VIEWS_KEY, multicrop.LOCAL_VIEWS_KEY,
                multicrop.GLOBAL_MASKS_KEY)

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    c.masking.update(kind="blockwise", ratio_range=(0.1, 0.5), mask_probability=0.5)
    # The views' scales are multicrop.global_scale / local_scale; multi-crop has its own
    # augmentation (no RandAugment or random erasing).
    for name in ("crop_scale", "rand_augment", "random_erasing"):
      del c.data[name]
    # DINO head, temperatures, EMA teacher and loss weights; defaults are iBOT's ViT-S/16
    # values (bytedance/ibot main_ibot.py and its README command).
    c.ibot = ml_collections.ConfigDict(dict(
        out_dim=8192,            # prototypes of the shared [CLS] / patch head
        hidden_dim=2048,
        bottleneck_dim=256,
        norm_last_layer=False,   # True fixes the prototype norms at 1 (ViT-B)
        student_temp=0.1,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_patch_temp=0.04,
        teacher_patch_temp=0.07,
        warmup_teacher_temp_epochs=30.0,
        momentum=0.996,          # teacher EMA momentum, cosine to 1 over the lr schedule
        center_momentum=0.9,
        lambda_cls=1.0,
        lambda_patch=1.0,
        freeze_last_layer_epochs=1.0,
    ))
    c.multicrop = multicrop.default_config()  # 2 global + 10 local views, DINO's photometrics

  @classmethod
  def unread_rules(cls):
    return [
        (("ibot.warmup_teacher_temp", "ibot.warmup_teacher_patch_temp"),
         lambda c: c.ibot.warmup_teacher_temp_epochs > 0,
         "the teacher temperatures start at their final values "
         "(ibot.warmup_teacher_temp_epochs=0)"),
        # A loss weighted 0 leaves its teacher temperatures in the logged metrics alone.
        (("ibot.teacher_temp", "ibot.warmup_teacher_temp"), lambda c: c.ibot.lambda_cls > 0,
         "the [CLS] loss is off (ibot.lambda_cls=0)"),
        (("ibot.teacher_patch_temp", "ibot.warmup_teacher_patch_temp"),
         lambda c: c.ibot.lambda_patch > 0, "the patch loss is off (ibot.lambda_patch=0)"),
        (("multicrop.local_scale", "multicrop.local_size"),
         lambda c: c.multicrop.num_local > 0, "there are no local views (multicrop.num_local=0)"),
        # 0 is what a one-channel image gets anyway (ibot_fmnist.py sets it).
        (("multicrop.grayscale_prob",),
         lambda c: c.channels == 3 or c.multicrop.grayscale_prob == 0,
         "grayscale conversion applies to 3-channel images only"),
    ]

  @classmethod
  def validate(cls, config):
    v.validate_pretraining_fields(config)
    v.require(config.data.augment_on == "host", "data.augment_on", config.data.augment_on,
              "'host' for method 'ibot' (its multi-crop views are made in the input pipeline)")
    image_size = tuple(config.image_size)
    _, patch = size_from_config(config.model)
    b = config.ibot
    for name in ("out_dim", "hidden_dim", "bottleneck_dim"):
      v.positive_int(config, f"ibot.{name}")
    v.require(isinstance(b.norm_last_layer, bool), "ibot.norm_last_layer", b.norm_last_layer,
              "true or false")
    for name in ("student_temp", "warmup_teacher_temp", "teacher_temp",
                 "warmup_teacher_patch_temp", "teacher_patch_temp"):
      v.require(v.is_number(b[name]) and b[name] > 0, f"ibot.{name}", b[name],
                "a positive temperature (iBOT: student 0.1, teacher 0.04 -> 0.07)")
    for name in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
      v.require(v.is_number(b[name]) and 0 <= b[name] <= config.num_epochs, f"ibot.{name}",
                b[name], f"a number of epochs in [0, num_epochs={config.num_epochs}]")
    v.require(v.is_number(b.momentum) and 0 <= b.momentum <= 1, "ibot.momentum", b.momentum,
              "a number in [0, 1] (iBOT: 0.996, annealed to 1)")
    v.require(v.is_number(b.center_momentum) and 0 <= b.center_momentum < 1,
              "ibot.center_momentum", b.center_momentum, "a number in [0, 1) (iBOT: 0.9)")
    for name in ("lambda_cls", "lambda_patch"):
      v.require(v.is_number(b[name]) and b[name] >= 0, f"ibot.{name}", b[name],
                "a number >= 0 (iBOT: 1.0)")
    v.require(b.lambda_cls + b.lambda_patch > 0, "ibot.lambda_patch", b.lambda_patch,
              "a positive weight when ibot.lambda_cls is 0 (one loss must remain)")
    v.require(b.lambda_cls > 0 or config.multicrop.num_local == 0, "multicrop.num_local",
              config.multicrop.num_local, "0 when ibot.lambda_cls=0: the local views enter "
              "only the [CLS] loss, so they would cost compute and change nothing")
    multicrop.validate_config(config.multicrop, image_size, patch)

  @classmethod
  def forward_flops(cls, config):
    """Per image: the student on 2 global views (all tokens through the head) and the local
    views ([CLS] through the head), the teacher on the 2 global views (forward only)."""
    size, patch = size_from_config(config.model)
    n = (config.image_size[0] // patch) * (config.image_size[1] // patch)
    local = tuple(config.multicrop.local_size)
    b = config.ibot
    head = lambda tokens: dino_head_flops(tokens, size.width, b.hidden_dim, b.bottleneck_dim,
                                          b.out_dim)
    glob = flops.encoder_flops(config.model, config.image_size, config.channels) + head(1 + n)
    loc = flops.encoder_flops(config.model, local, config.channels) + head(1)
    student = 2 * glob + int(config.multicrop.num_local) * loc
    return {"encoder": student, "teacher": 2 * glob, "total": student + 2 * glob}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    self.cfg, self.crop = config.ibot, config.multicrop
    encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                  use_mask_token=True)
    self.model = IBOTModel(encoder, DINOHead(
        out_dim=int(self.cfg.out_dim), hidden_dim=int(self.cfg.hidden_dim),
        bottleneck_dim=int(self.cfg.bottleneck_dim),
        norm_last_layer=bool(self.cfg.norm_last_layer)))
    self.grid_hw = encoder.grid_hw
    # Drawn per global view by the multi-crop transform (`mask_generator` stays None: the loop
    # adds no single-view mask of its own).
    self.masks = masking.mask_generator_from_config(config.masking, encoder.grid_hw,
                                                    encoder.patch_size)

  def _epochs(self, epochs: float) -> int:
    return int(round(float(epochs) * self.length.steps_per_epoch))

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` followed by a hold of the head's last layer: its updates are zero, weight decay
    included, while fewer than the freeze's steps (`ibot.freeze_last_layer_epochs`) have been
    applied; `tx` itself when there is no freeze.

    DINO / iBOT set the last layer's gradient to None while frozen (cancel_gradients_last_layer),
    so PyTorch's AdamW skips it: no decoupled weight decay and no moment update. Here `loss`
    stops its gradient, so its AdamW moments stay exactly zero (at the end of the freeze they
    equal PyTorch's state, which is created at the first gradient), and this hold removes the
    weight decay the zero gradient leaves (and any update the optimizer makes of zeros). The
    hold counts the updates it has seen in the optimizer state; a step skipped for non-finite
    values restores that state, so it agrees with `extra["step"]`, which `loss` reads.

    The hold adds a counter to the optimizer state: iBOT checkpoints written before it existed
    (2026-12-02) do not restore into runs with a freeze.

    Not reproduced: optax keeps one bias-correction count for every parameter, so once the
    freeze ends the last layer's first AdamW updates are corrected with the run's step count
    rather than PyTorch's per-parameter count from 1: with b1 0.9, b2 0.999 and a freeze of
    1,251 steps, its k-th update after the freeze is 2.7x PyTorch's at k = 1, 5.5x at k = 12,
    under 1.5x from k = 452. Matching it would need an Adam of its own for the last layer, with
    the learning-rate and weight-decay schedules still on the global step.
    """
    return optim.hold_during_first_updates(tx, self._epochs(self.cfg.freeze_last_layer_epochs),
                                           last_layer_mask)

  def train_augment(self, data_cfg, image_size, channels):
    return multicrop.augment_from_config(self.crop, data_cfg, image_size, channels, self.masks)

  def init(self, rng, images):
    params = self.model.init({"params": rng}, images)["params"]
    k = int(self.cfg.out_dim)
    return params, {"teacher": jax.tree.map(jnp.copy, params), "step": jnp.zeros([], jnp.int32),
                    **teachers.centre_state({"center_cls": (1, k), "center_patch": (1, 1, k)})}

  def load_pretrained(self, params, extra):
    """Continued pre-training from `config.init_from` (encoder, and the head of an iBOT
    source); the teacher starts as a copy of the loaded student."""
    params = continuation.load_into(params, self.config)
    return params, {**extra, "teacher": jax.tree.map(np.copy, params)}

  def teacher_temps(self, step):
    """(cls, patch) teacher temperatures at `step`: linear warmup, then constant."""
    n, c = self._epochs(self.cfg.warmup_teacher_temp_epochs), self.cfg
    return (teachers.linear_anneal(step, c.warmup_teacher_temp, c.teacher_temp, n),
            teachers.linear_anneal(step, c.warmup_teacher_patch_temp, c.teacher_patch_temp, n))

  def momentum(self, step):
    return teachers.cosine_anneal(step, float(self.cfg.momentum), 1.0, self.length.schedule_steps)

  def loss(self, params, extra, batch, rng, train=True):
    c, step = self.cfg, extra["step"]
    views = batch[multicrop.GLOBAL_VIEWS_KEY]
    nv, b = views.shape[1], views.shape[0]
    images, masks = _views_first(views), _views_first(batch[multicrop.GLOBAL_MASKS_KEY])
    head = dict(params["head"])
    frozen = step < self._epochs(c.freeze_last_layer_epochs)
    for name in LAST_LAYER:
      if name in head:  # no gradient to the prototypes while frozen (see wrap_optimizer)
        head[name] = jnp.where(frozen, jax.lax.stop_gradient(head[name]), head[name])
    student = {**params, "head": head}
    global_rng, local_rng = jax.random.split(rng)
    t_out = jax.lax.stop_gradient(self.model.apply({"params": extra["teacher"]}, images))
    s_out = self.model.apply({"params": student}, images, masks, train=train,
                             rngs={"drop_path": global_rng})
    s_cls = s_out[:, 0].reshape(nv, b, -1)
    local = batch.get(multicrop.LOCAL_VIEWS_KEY)
    if local is not None and local.shape[1]:
      s_local = self.model.apply({"params": student}, _views_first(local), cls_only=True,
                                 train=train, rngs={"drop_path": local_rng})
      s_cls = jnp.concatenate([s_cls, s_local[:, 0].reshape(local.shape[1], b, -1)])
    t_cls, t_patch = t_out[:, 0], t_out[:, 1:]
    temp, patch_temp = self.teacher_temps(step)
    p_cls = losses.teacher_probs(t_cls, extra["center_cls"], temp)
    p_patch = losses.teacher_probs(t_patch, extra["center_patch"], patch_temp)
    cls_loss = losses.cross_view_distillation(s_cls, p_cls.reshape(nv, b, -1), c.student_temp)
    k = s_out.shape[-1]
    patch_loss = losses.masked_patch_distillation(
        s_out[:, 1:].reshape(nv, b, -1, k), p_patch.reshape(nv, b, -1, k),
        masks.reshape(nv, b, -1), c.student_temp)
    loss = c.lambda_cls * cls_loss + c.lambda_patch * patch_loss
    entropy = -jnp.sum(p_cls * jnp.log(p_cls + 1e-12), axis=-1)
    mean_p = jnp.mean(p_cls, axis=0)
    if self.axis_name is not None:
      mean_p = jax.lax.pmean(mean_p, self.axis_name)
    metrics = {"loss": loss, "cls_loss": cls_loss, "patch_loss": patch_loss,
               "teacher_temp": temp, "teacher_momentum": self.momentum(step),
               "teacher_entropy": jnp.mean(entropy),
               "teacher_mean_entropy": -jnp.sum(mean_p * jnp.log(mean_p + 1e-12)),
               "mask_fraction": jnp.mean(masks.astype(jnp.float32))}
    for name, logits in (("center_cls", t_cls), ("center_patch", t_patch)):
      extra = teachers.accumulate_centre(extra, name, logits, self.axis_name)
    return loss, (metrics, teachers.count_micro_batch(extra))

  def after_update(self, params, extra, step):
    teacher = teachers.ema_update(extra["teacher"], params, self.momentum(step))
    extra = teachers.update_centres(extra, CENTRES, float(self.cfg.center_momentum))
    return {**extra, "teacher": teacher, "step": jnp.asarray(step + 1, jnp.int32)}

  released_path = ("extra", "teacher")  # iBOT releases (and evaluates) its EMA teacher
