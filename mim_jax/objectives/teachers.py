"""EMA teachers: the momentum update and its schedules (data2vec, iBOT), the centring of
their outputs (DINO, iBOT: `centre_state`, `accumulate_centre`, `update_centres`), and
data2vec's layer-averaged targets (`layer_average_targets`, shared by data2vec 2.0).

A teacher is a copy of (part of) the student's parameters kept in the method's `extra` state,
moved towards the student after every optimizer update (`Method.after_update`) and never
differentiated. Schedules take the index of the update just applied and the run's length, so
they are pure functions of the step and resume exactly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from mim_jax.objectives import losses


def ema_update(teacher, student, decay: jax.Array | float):
  """teacher <- decay * teacher + (1 - decay) * student, leaf by leaf (float32)."""
  decay = jnp.asarray(decay, jnp.float32)
  return jax.tree.map(lambda t, s: decay * t + (1.0 - decay) * s.astype(t.dtype),
                      teacher, student)


def linear_anneal(step: jax.Array, start: float, end: float, anneal_steps: int) -> jax.Array:
  """`start` at step 0 moving linearly to `end` at `anneal_steps`, then `end` (data2vec's EMA
  decay: 0.999 -> 0.9998)."""
  if anneal_steps <= 0:
    return jnp.asarray(end, jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  return start + (end - start) * t


def cosine_anneal(step: jax.Array, start: float, end: float, total_steps: int) -> jax.Array:
  """`start` at step 0 to `end` at `total_steps` along a half cosine, then `end` (DINO/iBOT's
  teacher momentum: 0.996 -> 1)."""
  if total_steps <= 0:
    return jnp.asarray(end, jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))


# Centring (DINO / iBOT): each centre is an EMA of the teacher's mean output, moved once per
# optimizer step by the whole batch's mean, whatever the gradient accumulation (moved per
# micro-batch it would move k times a step). The loss adds each micro-batch's mean to a sum
# beside the centre (`accumulate_centre`) and counts the micro-batches; after the update the
# centres move by sum / count and the sums are reset (`update_centres`).
MICRO_BATCHES = "batch_micro_batches"


def centre_state(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, jax.Array]:
  """Fresh `extra` entries for centres of `shapes` ({name: shape}, e.g. {"center_cls": (1, K)}):
  the zero centres, their zero sums "batch_<name>" and the micro-batch count."""
  state = {name: jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()}
  state.update({f"batch_{name}": jnp.zeros(shape, jnp.float32) for name, shape in shapes.items()})
  state[MICRO_BATCHES] = jnp.zeros([], jnp.float32)
  return state


def accumulate_centre(extra: dict, name: str, teacher_logits: jax.Array,
                      axis_name=None) -> dict:
  """`extra` with this micro-batch's mean teacher output (over every axis but the last, every
  device's share with `axis_name`) added to the sum of centre `name`. Count the micro-batch
  once with `count_micro_batch`, whatever the number of centres."""
  total = extra[f"batch_{name}"] + losses.mean_output(teacher_logits, extra[name].shape,
                                                      axis_name)
  return {**extra, f"batch_{name}": total}


def count_micro_batch(extra: dict) -> dict:
  return {**extra, MICRO_BATCHES: extra[MICRO_BATCHES] + 1.0}


def update_centres(extra: dict, names: Sequence[str], momentum: float) -> dict:
  """After an optimizer step: every centre of `names` moved by the step's mean teacher output
  (sum / micro-batches; the EMA of `losses.center_update` with nothing left to reduce), the
  sums and the count reset to zero."""
  # Counted, not read from the config: the step may be built with another accumulation.
  count = jnp.maximum(extra[MICRO_BATCHES], 1.0)
  out = {**extra, MICRO_BATCHES: jnp.zeros_like(extra[MICRO_BATCHES])}
  for name in names:
    out[name] = losses.center_update(extra[name], extra[f"batch_{name}"] / count, momentum)
    out[f"batch_{name}"] = jnp.zeros_like(extra[name])
  return out


# Parameter-free normalisations of teacher features (`normalize`).
TARGET_NORMS = ("instance", "layer", "none")
NORM_EPS = 1e-5  # PyTorch's instance_norm / layer_norm default


def normalize(x: jax.Array, kind: str, eps: float = NORM_EPS) -> jax.Array:
  """Parameter-free normalisation of features [B, N, D] (float32).

  "instance": each channel of each sample over its N tokens (`F.instance_norm` on [B, D, N]);
  "layer": each token over its D channels (`F.layer_norm` without affine); "none": unchanged.
  Biased variance, as PyTorch's normalisation layers use.
  """
  x = x.astype(jnp.float32)
  if kind == "none":
    return x
  axis = {"instance": 1, "layer": -1}[kind]
  mean = x.mean(axis=axis, keepdims=True)
  var = x.var(axis=axis, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps)


def layer_average_targets(blocks, top_k: int, block_norm: str, final_norm: str) -> jax.Array:
  """The mean of the last `top_k` of `blocks` (each [B, 1 + N, D]; the cls token is dropped),
  each normalised by `block_norm` first and the mean by `final_norm`: [B, N, D] float32."""
  layers = [normalize(b[:, 1:], block_norm) for b in blocks[-top_k:]]
  return normalize(sum(layers) / top_k, final_norm)


def feature_std(x: jax.Array, mask: jax.Array, axis_name=None) -> jax.Array:
  """Mean over channels of the std of x [B, N, D] over the masked tokens (a collapse monitor:
  fairseq's `target_var` / `pred_var`); with `axis_name`, over every device's tokens."""
  total = (lambda v: jax.lax.psum(v, axis_name)) if axis_name is not None else (lambda v: v)
  w = mask.astype(jnp.float32)[..., None]
  count = jnp.maximum(total(jnp.sum(w)), 2.0)
  mean = total(jnp.sum(x * w, axis=(0, 1))) / count
  var = total(jnp.sum(jnp.square(x - mean) * w, axis=(0, 1))) / (count - 1.0)
  return jnp.mean(jnp.sqrt(var + 1e-6))
