"""Optimizer and learning-rate schedule of the MAE recipe (shared by every method)."""

from __future__ import annotations

from typing import Any

import jax
import optax

# Parameters exempt from weight decay besides biases and norm scales (ndim <= 1).
NO_DECAY_NAMES = frozenset({"cls_token", "mask_token", "pos_embed", "dist_token"})


def peak_learning_rate(opt_cfg, global_batch_size: int) -> float:
  """The linear scaling rule: lr = base_lr * global_batch / 256 (MAE, SimMIM uses /512)."""
  return opt_cfg.base_lr * global_batch_size / opt_cfg.lr_batch_reference


def learning_rate_schedule(opt_cfg, global_batch_size: int, steps_per_epoch: int,
                           schedule_steps: int) -> optax.Schedule:
  """Per-step linear warmup from 0, then half-cosine down to `min_lr` at `schedule_steps`."""
  warmup_steps = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_learning_rate(opt_cfg, global_batch_size),
      warmup_steps=min(warmup_steps, schedule_steps), decay_steps=schedule_steps,
      end_value=opt_cfg.min_lr)


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: matrices, not biases/norms/tokens/posembs."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim > 1 and _leaf_name(path) not in NO_DECAY_NAMES, params)


def build_optimizer(opt_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with masked weight decay and optional global-norm clipping."""
  parts = []
  if opt_cfg.clip_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.clip_grad_norm))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)
