"""Losses over masked positions.

Each takes pred, target [B, N, P] and mask [B, N] (1 = masked), computes a per-patch loss (the
mean over P) and averages it over the masked patches only, as MAE's `forward_loss` does. SimMIM's
per-pixel average over masked pixels is the same number, since every patch has P values.
"""

from __future__ import annotations

from typing import Hashable, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp

# A named mesh axis (or several) of a per-device step under shard_map; None in a global step.
AxisName = Optional[Union[Hashable, Sequence[Hashable]]]


def masked_mean(per_patch: jax.Array, mask: jax.Array,
                axis_name: AxisName = None) -> jax.Array:
  """Mean of per_patch [B, N] over the masked entries of mask [B, N] (0 when none are).

  With `axis_name` (a per-device step under shard_map, each device holding an equal share of
  the batch) each device returns its sum over the mean count of the devices, and the mean of
  those over the devices is the mean over the whole batch, also when devices hold different
  numbers of masked patches. The floor of one patch applies to the whole batch's count, as in
  the global step (floored per device, a batch with fewer masked patches than devices would
  have its mean divided by the device count instead of the patch count).
  """
  chex.assert_rank(per_patch, 2)
  chex.assert_equal_shape([per_patch, mask])
  mask = mask.astype(jnp.float32)
  count = jnp.sum(mask)
  total = jnp.sum(per_patch * mask)
  if axis_name is None:
    return total / jnp.maximum(count, 1.0)
  devices = jax.lax.psum(1, axis_name)
  return total * devices / jnp.maximum(jax.lax.psum(count, axis_name), 1.0)


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array,
               axis_name: AxisName = None) -> jax.Array:
  """Mean squared error over masked patches (MAE, MaskFeat): pred, target [B, N, F]."""
  chex.assert_equal_shape([pred, target])
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return masked_mean(per_patch, mask, axis_name)


def masked_l1(pred: jax.Array, target: jax.Array, mask: jax.Array,
              axis_name: AxisName = None) -> jax.Array:
  """Mean absolute error over masked patches (SimMIM's `l1_loss` on masked pixels)."""
  chex.assert_equal_shape([pred, target])
  per_patch = jnp.mean(jnp.abs(pred.astype(jnp.float32) - target), axis=-1)
  return masked_mean(per_patch, mask, axis_name)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Huber-style smooth L1 of a difference x: 0.5 x^2 / beta where |x| < beta, else
  |x| - 0.5 beta (PyTorch's `smooth_l1_loss`; beta = 0 is plain L1)."""
  a = jnp.abs(x)
  if beta <= 0:
    return a
  return jnp.where(a < beta, 0.5 * jnp.square(x) / beta, a - 0.5 * beta)


def masked_smooth_l1(pred: jax.Array, target: jax.Array, mask: jax.Array,
                     beta: float = 1.0, axis_name: AxisName = None) -> jax.Array:
  """Smooth L1 averaged over channels, then over masked patches (data2vec's regression loss:
  with every patch holding D values this equals the mean over all masked values, as PyTorch's
  `smooth_l1_loss` with mean reduction on the masked rows computes it)."""
  chex.assert_equal_shape([pred, target])
  per_patch = jnp.mean(smooth_l1(pred.astype(jnp.float32) - target, beta), axis=-1)
  return masked_mean(per_patch, mask, axis_name)


def masked_cosine(pred: jax.Array, target: jax.Array, mask: jax.Array,
                  axis_name: AxisName = None) -> jax.Array:
  """1 - cosine similarity of each masked patch's prediction and target, averaged over the
  masked patches (the feature-distillation loss of MVP / BEiT v2's VQ-KD): pred, target
  [B, N, F]."""
  chex.assert_equal_shape([pred, target])
  pred = pred.astype(jnp.float32)
  cos = jnp.sum(pred * target, -1) / jnp.maximum(
      jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1), 1e-8)
  return masked_mean(1.0 - cos, mask, axis_name)


LOSSES = ("l1", "mse", "smooth_l1", "cosine", "cross_entropy")


def masked_loss(name: str, beta: float = 1.0):
  """The masked loss `name` (one of LOSSES) as fn(pred, target, mask, axis_name=None);
  `beta` is smooth-L1's."""
  if name == "smooth_l1":
    return lambda pred, target, mask, axis_name=None: masked_smooth_l1(
        pred, target, mask, beta=beta, axis_name=axis_name)
  fns = {"l1": masked_l1, "mse": masked_mse, "cosine": masked_cosine,
         "cross_entropy": masked_cross_entropy}
  if name not in fns:
    raise ValueError(f"loss {name!r}: expected one of {LOSSES}")
  return fns[name]


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                         axis_name: AxisName = None) -> jax.Array:
  """Cross-entropy of logits [B, N, V] against integer labels [B, N], averaged over the masked
  patches only (BEiT's loss on the visual tokens of masked positions)."""
  chex.assert_equal_shape_prefix([logits, labels], 2)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_patch = -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return masked_mean(per_patch, mask, axis_name)


# ---------------------------------------------------------------------------------------------
# Self-distillation (DINO, iBOT): a student's logits against a centred, sharpened teacher.


def teacher_probs(logits: jax.Array, center: jax.Array, temperature: jax.Array | float):
  """softmax((logits - center) / temperature) over the last axis (float32, no gradient)."""
  z = (logits.astype(jnp.float32) - center) / temperature
  return jax.lax.stop_gradient(jax.nn.softmax(z, axis=-1))


def soft_cross_entropy(student_logits: jax.Array, probs: jax.Array,
                       student_temp: float) -> jax.Array:
  """-sum_k p_k log softmax(s / student_temp)_k over the last axis, computed as
  logsumexp(z) - sum_k p_k z_k with z = s / student_temp (the teacher's probabilities sum to
  1): the log-probabilities [..., K] are never formed, and the backward is softmax(z) - p.
  On 2 CPU cores iBOT's patch loss at [2, 256, 49, 1024] runs its forward and backward 1.37x
  faster this way (docs/benchmarks.md), equal to float32 rounding."""
  z = student_logits.astype(jnp.float32) / student_temp
  return jax.nn.logsumexp(z, axis=-1) - jnp.sum(probs * z, axis=-1)


def cross_view_distillation(student_logits: jax.Array, probs: jax.Array,
                            student_temp: float) -> jax.Array:
  """DINO / iBOT's [CLS] loss: the mean over view pairs (i, j), i != j, of the batch-mean cross
  entropy between teacher view j and student view i.

  student_logits [Vs, B, K]: student views, the first Vt of them the teacher's views (global)
  and the rest local views; probs [Vt, B, K]: teacher probabilities. Pairs: every student view
  against every teacher view except itself, Vt * Vs - Vt of them.
  """
  vt, vs = probs.shape[0], student_logits.shape[0]
  ce = jnp.mean(jax.vmap(lambda p: jax.vmap(
      lambda s: soft_cross_entropy(s, p, student_temp))(student_logits))(probs), axis=-1)
  same = jnp.arange(vt)[:, None] == jnp.arange(vs)[None, :]  # ce: [Vt, Vs]
  return jnp.sum(jnp.where(same, 0.0, ce)) / (vt * vs - vt)


def masked_patch_distillation(student_logits: jax.Array, probs: jax.Array, mask: jax.Array,
                              student_temp: float) -> jax.Array:
  """iBOT's patch loss: per view and image the cross entropy averaged over its masked patches
  (an image without masked patches counts as 0), then the mean over images and views.

  student_logits, probs [V, B, N, K]; mask [V, B, N] (True = masked). The teacher saw the same
  view unmasked; only the masked positions enter the loss.
  """
  m = mask.astype(jnp.float32)
  ce = soft_cross_entropy(student_logits, probs, student_temp)  # [V, B, N]
  per_image = jnp.sum(ce * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
  return jnp.mean(per_image)


def center_update(center: jax.Array, teacher_logits: jax.Array, momentum: float,
                  axis_name: AxisName = None) -> jax.Array:
  """center <- momentum * center + (1 - momentum) * mean of teacher_logits over all axes but
  the last (the batch's mean teacher output; DINO / iBOT keep one per output kind). With
  `axis_name` the mean covers every device's share of the batch (iBOT's all-reduce)."""
  return momentum * center + (1.0 - momentum) * mean_output(teacher_logits, center.shape,
                                                            axis_name)


def mean_output(teacher_logits: jax.Array, shape: tuple[int, ...],
                axis_name: AxisName = None) -> jax.Array:
  """The mean of teacher_logits over all axes but the last (every device's share with
  `axis_name`), float32 in `shape` (a centre's)."""
  # A mean over the axes, not over a reshape to [-1, K]: merging a sharded batch axis with a
  # leading one (iBOT's [V, B, ...]) is no sharding XLA can express, and it would gather them.
  x = teacher_logits.astype(jnp.float32)
  batch_mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
  if axis_name is not None:
    batch_mean = jax.lax.pmean(batch_mean, axis_name)
  return batch_mean.reshape(shape)
