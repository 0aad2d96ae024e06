"""EMA teachers: the momentum update and its schedules (data2vec, iBOT).

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
