"""DINO-style self-distillation against an EMA teacher's prototype distributions (iBOT's
online tokenizer; DINO's [CLS] objective), the parts a method composes:

  default_config / validate / unread_rules   the head, temperature, momentum and freeze fields
                                             of one config group (iBOT: `config.ibot`),
                                             defaults from iBOT's ViT-S/16 recipe (bytedance/ibot
                                             main_ibot.py and its README command)
  head_from_config / head_flops              the DINO head (`models.heads.DINOHead`)
  teacher_temps                              the teacher temperatures' linear warmup
  teacher_state / teacher_momentum / update_teacher / accumulate_centres
                                             the teacher in the method's `extra`: its EMA
                                             (`teachers.ema_update`, momentum cosine to 1) and
                                             centres (one step per update by the whole batch's
                                             mean output, also with gradient accumulation)
  distillation_losses                        the [CLS] and masked-patch losses (`losses`)
  stop_last_layer_gradient / hold_last_layer the head's last layer frozen for its first epochs
  collapse_metrics                           entropies that show a collapse
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mim_jax.config import validation as v
from mim_jax.models.heads import DINOHead, dino_head_flops
from mim_jax.objectives import losses, teachers
from mim_jax.training import optim

# The parameters of the head's last layer (`models.heads.DINOHead`: the prototype directions
# and, without norm_last_layer, their scales), frozen for `freeze_last_layer_epochs`.
LAST_LAYER = ("last_layer", "last_layer_scale")
CENTRES = ("center_cls", "center_patch")  # the teacher-output centres in `extra`
TEMPERATURES = ("student_temp", "warmup_teacher_temp", "teacher_temp",
                "warmup_teacher_patch_temp", "teacher_patch_temp")


def default_config() -> ml_collections.ConfigDict:
  """DINO head sizes, temperatures, teacher EMA and centring (iBOT ViT-S/16 values)."""
  return ml_collections.ConfigDict(dict(
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
      freeze_last_layer_epochs=1.0,
  ))


def validate(config, group: str) -> None:
  """The fields of `default_config()` in `config[group]`, against `config.num_epochs`."""
  b = config[group]
  for name in ("out_dim", "hidden_dim", "bottleneck_dim"):
    v.positive_int(config, f"{group}.{name}")
  v.require(isinstance(b.norm_last_layer, bool), f"{group}.norm_last_layer", b.norm_last_layer,
            "true or false")
  for name in TEMPERATURES:
    v.require(v.is_number(b[name]) and b[name] > 0, f"{group}.{name}", b[name],
              "a positive temperature (iBOT: student 0.1, teacher 0.04 -> 0.07)")
  for name in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
    v.require(v.is_number(b[name]) and 0 <= b[name] <= config.num_epochs, f"{group}.{name}",
              b[name], f"a number of epochs in [0, num_epochs={config.num_epochs}]")
  v.require(v.is_number(b.momentum) and 0 <= b.momentum <= 1, f"{group}.momentum", b.momentum,
            "a number in [0, 1] (iBOT: 0.996, annealed to 1)")
  v.require(v.is_number(b.center_momentum) and 0 <= b.center_momentum < 1,
            f"{group}.center_momentum", b.center_momentum, "a number in [0, 1) (iBOT: 0.9)")


def unread_rules(group: str) -> list:
  """`Method.unread_rules` entries of the fields in `config[group]` read under a condition."""
  return [((f"{group}.warmup_teacher_temp", f"{group}.warmup_teacher_patch_temp"),
           lambda c: c[group].warmup_teacher_temp_epochs > 0,
           f"the teacher temperatures start at their final values "
           f"({group}.warmup_teacher_temp_epochs=0)")]


def head_from_config(cfg, dtype: str = "float32") -> DINOHead:
  """The DINO head of `cfg` (the method's head fields), computing in `dtype` (model.dtype)."""
  return DINOHead(out_dim=int(cfg.out_dim), hidden_dim=int(cfg.hidden_dim),
                  bottleneck_dim=int(cfg.bottleneck_dim),
                  norm_last_layer=bool(cfg.norm_last_layer), dtype=jnp.dtype(dtype))


def head_flops(cfg, width: int, tokens: int) -> float:
  """Forward FLOPs of `head_from_config(cfg)` on `tokens` tokens of an encoder `width` wide."""
  return dino_head_flops(tokens, width, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim)


def teacher_temps(cfg, step: jax.Array, warmup_steps: int):
  """(cls, patch) teacher temperatures at `step`: linear warmup over `warmup_steps`, then
  constant (iBOT warms up per epoch; here per step)."""
  return (teachers.linear_anneal(step, cfg.warmup_teacher_temp, cfg.teacher_temp, warmup_steps),
          teachers.linear_anneal(step, cfg.warmup_teacher_patch_temp, cfg.teacher_patch_temp,
                                 warmup_steps))


def last_layer_mask(params):
  """The pytree of `params` with True at the head's last-layer leaves, False elsewhere."""
  def frozen(path, _):
    keys = [getattr(k, "key", None) for k in path]
    return len(keys) >= 2 and keys[0] == "head" and keys[1] in LAST_LAYER
  return jax.tree_util.tree_map_with_path(frozen, params)


def stop_last_layer_gradient(params, frozen: jax.Array):
  """`params` whose head's last layer gets no gradient while `frozen` (a traced bool)."""
  head = dict(params["head"])
  for name in LAST_LAYER:
    if name in head:
      head[name] = jnp.where(frozen, jax.lax.stop_gradient(head[name]), head[name])
  return {**params, "head": head}


def hold_last_layer(tx: optax.GradientTransformation,
                    freeze_steps: int) -> optax.GradientTransformation:
  """`tx` followed by a hold of the head's last layer: its updates are zero, weight decay
  included, while fewer than `freeze_steps` updates have been applied; `tx` itself when 0.

  DINO / iBOT set the last layer's gradient to None while frozen (cancel_gradients_last_layer),
  so PyTorch's AdamW skips it: no decoupled weight decay and no moment update. Here the loss
  stops its gradient (`stop_last_layer_gradient`), so its AdamW moments stay exactly zero (at
  the end of the freeze they equal PyTorch's state, which is created at the first gradient),
  and this hold removes the weight decay the zero gradient leaves (and any update the optimizer
  makes of zeros). The hold counts the updates it has seen in the optimizer state; a step
  skipped for non-finite values restores that state, so it agrees with the method's own update
  count, which the loss reads.

  The hold adds a counter to the optimizer state: iBOT checkpoints written before it existed
  (2026-12-02) do not restore into runs with a freeze.

  Not reproduced: optax keeps one bias-correction count for every parameter, so once the
  freeze ends the last layer's first AdamW updates are corrected with the run's step count
  rather than PyTorch's per-parameter count from 1: with b1 0.9, b2 0.999 and a freeze of
  1,251 steps, its k-th update after the freeze is 2.7x PyTorch's at k = 1, 5.5x at k = 12,
  under 1.5x from k = 452. Matching it would need an Adam of its own for the last layer, with
  the learning-rate and weight-decay schedules still on the global step.
  """
  return optim.hold_during_first_updates(tx, freeze_steps, last_layer_mask)


def teacher_state(params, out_dim: int) -> dict:
  """The method's `extra` at the start: the teacher as a copy of `params`, the count of applied
  updates, and the [CLS] / patch centres of `out_dim` prototypes."""
  k = int(out_dim)
  return {"teacher": jax.tree.map(jnp.copy, params), "step": jnp.zeros([], jnp.int32),
          **teachers.centre_state({"center_cls": (1, k), "center_patch": (1, 1, k)})}


def teacher_momentum(cfg, step: jax.Array, schedule_steps: int) -> jax.Array:
  """`cfg.momentum` at step 0, cosine to 1 at the end of the lr schedule."""
  return teachers.cosine_anneal(step, float(cfg.momentum), 1.0, schedule_steps)


def update_teacher(cfg, extra: dict, params, step, schedule_steps: int) -> dict:
  """`extra` after the update of `step`: the teacher one EMA step towards `params`, the centres
  one step towards the update's mean teacher outputs, the count of updates advanced."""
  teacher = teachers.ema_update(extra["teacher"], params,
                                teacher_momentum(cfg, step, schedule_steps))
  extra = teachers.update_centres(extra, CENTRES, float(cfg.center_momentum))
  return {**extra, "teacher": teacher, "step": jnp.asarray(step + 1, jnp.int32)}


def distillation_losses(cfg, extra: dict, temps, student_cls: jax.Array,
                        student_patch: jax.Array, teacher_out: jax.Array, masks: jax.Array):
  """iBOT's two losses against the centred, sharpened teacher outputs.

  student_cls [Vs, B, K]: the student's [CLS] logits of every view (the V global views first);
  student_patch [V, B, N, K]; teacher_out [V, B, 1 + N, K] ([CLS] first); masks [V, B, N]
  (True = masked); temps: the (cls, patch) teacher temperatures. Returns (cls_loss,
  patch_loss, the teacher's [CLS] probabilities [V, B, K]).
  """
  p_cls = losses.teacher_probs(teacher_out[:, :, 0], extra["center_cls"], temps[0])
  p_patch = losses.teacher_probs(teacher_out[:, :, 1:], extra["center_patch"], temps[1])
  cls_loss = losses.cross_view_distillation(student_cls, p_cls, cfg.student_temp)
  patch_loss = losses.masked_patch_distillation(student_patch, p_patch, masks, cfg.student_temp)
  return cls_loss, patch_loss, p_cls


def accumulate_centres(extra: dict, teacher_out: jax.Array, axis_name=None) -> dict:
  """`extra` with this micro-batch's teacher outputs [V, B, 1 + N, K] ([CLS] first) added to
  the sums the centres move to after the update (`update_teacher`)."""
  for name, logits in (("center_cls", teacher_out[:, :, 0]),
                       ("center_patch", teacher_out[:, :, 1:])):
    extra = teachers.accumulate_centre(extra, name, logits, axis_name)
  return teachers.count_micro_batch(extra)


def collapse_metrics(teacher_cls_probs: jax.Array, axis_name=None) -> dict[str, jax.Array]:
  """Entropy of the teacher's [CLS] distributions [..., K] (e.g. [V, B, K]): per image and view
  (near 0: sharpening wins) and of their mean (near 0: every image on one prototype, i.e.
  collapse)."""
  p = teacher_cls_probs
  mean_p = jnp.mean(p, axis=tuple(range(p.ndim - 1)))
  if axis_name is not None:
    mean_p = jax.lax.pmean(mean_p, axis_name)
  return {"teacher_entropy": jnp.mean(-jnp.sum(p * jnp.log(p + 1e-12), axis=-1)),
          "teacher_mean_entropy": -jnp.sum(mean_p * jnp.log(mean_p + 1e-12))}
