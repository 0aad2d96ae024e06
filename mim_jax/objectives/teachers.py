"""EMA teachers: the momentum update and its schedules (data2vec, iBOT), and data2vec's
layer-averaged targets (`layer_average_targets`, shared by data2vec 2.0).

A teacher is a copy of (part of) the student's parameters kept in the method's `extra` state,
moved towards the student after every optimizer update (`Method.after_update`) and never
differentiated. Schedules take the index of the update just applied and the run's length, so
they are pure functions of the step and resume exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
