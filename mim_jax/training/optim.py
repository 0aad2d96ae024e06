"""Optimizers and the learning-rate schedule shared by every method and evaluation.

AdamW (pre-training, fine-tuning), LARS (the MAE linear probe) and SGD, all with weight decay
masked off biases, norms, tokens and position embeddings by default (a method may group its
parameters otherwise: `Method.decay_mask`), optional global-norm clipping, and optional
layer-wise learning-rate decay for fine-tuning ViTs (BEiT / MAE).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from mim_jax.config.errors import config_error

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "lars", "sgd")
SCHEDULES = ("cosine", "multistep")

# Parameters exempt from weight decay besides biases and norm scales (ndim <= 1): tokens,
# position tables, and biases of more dimensions (flax's attention keeps [heads, head_dim]).
NO_DECAY_NAMES = frozenset({"cls_token", "mask_token", "pos_embed", "dist_token",
                            "query_token", "bias"})


def peak_learning_rate(opt_cfg, global_batch_size: int) -> float:
  """The linear scaling rule: lr = base_lr * global_batch / 256 (MAE, SimMIM uses /512)."""
  return opt_cfg.base_lr * global_batch_size / opt_cfg.lr_batch_reference


def learning_rate_schedule(opt_cfg, global_batch_size: int, steps_per_epoch: int,
                           schedule_steps: int) -> optax.Schedule:
  """Per-step linear warmup from 0 to the peak lr, then the decay of `optimizer.schedule`.

  cosine:     half-cosine down to `min_lr` at `schedule_steps` (MAE, MaskFeat).
  multistep:  constant, multiplied by `decay_factor` at each of `decay_epochs` (SimMIM's
              800-epoch recipe: x0.1 at epoch 700).
  """
  peak = peak_learning_rate(opt_cfg, global_batch_size)
  warmup_steps = min(int(round(opt_cfg.warmup_epochs * steps_per_epoch)), schedule_steps)
  name = opt_cfg.get("schedule", "cosine")
  if name == "cosine":
    if warmup_steps >= schedule_steps:  # warmup_epochs = num_epochs: no steps left to decay
      if opt_cfg.min_lr:  # validation refuses it in epochs; steps can round to the same end
        log.warning("optimizer.min_lr=%g is not used: warmup_epochs=%g rounds to all %d steps "
                    "of the schedule, which leaves no decay to end at it", opt_cfg.min_lr,
                    opt_cfg.warmup_epochs, schedule_steps)
      return optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=schedule_steps,
        end_value=opt_cfg.min_lr)
  if name == "multistep":
    # Boundaries count steps from the end of warmup in optax.join_schedules, hence the shift.
    steps = [int(round(e * steps_per_epoch)) for e in opt_cfg.decay_epochs]
    if len(set(steps)) < len(steps):
      # The boundaries are dict keys: two epochs on one step would merge into a single decay.
      raise config_error(
          "optimizer.decay_epochs", tuple(opt_cfg.decay_epochs),
          f"epochs on distinct steps; with {steps_per_epoch} steps per epoch they fall on steps "
          f"{steps}", "Space them at least one step apart, or give one epoch with a stronger "
          "decay_factor.")
    boundaries = {step - warmup_steps: opt_cfg.decay_factor for step in steps}
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
         optax.piecewise_constant_schedule(peak, boundaries)],
        boundaries=[warmup_steps])
  raise ValueError(f"optimizer.schedule={name!r}: expected one of {SCHEDULES}")


def _leaf_name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: matrices, not biases/norms/tokens/posembs."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.ndim > 1 and _leaf_name(path) not in NO_DECAY_NAMES, params)


_BLOCK = re.compile(r"(?:^|/)blocks_(\d+)(?:/|$)")
_EMBEDDING_NAMES = ("patch_embed", "cls_token", "pos_embed", "mask_token")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def vit_layer_id(path: str, depth: int) -> int:
  """Layer index of a parameter for layer-wise lr decay (as BEiT/MAE's `get_layer_id_for_vit`).

  Embeddings (patch embedding, cls/mask tokens, position table) are layer 0, transformer block i
  is layer i + 1, and everything after the blocks (final norm, fc_norm, head) is depth + 1.
  """
  match = _BLOCK.search(path)
  if match:
    return int(match.group(1)) + 1
  if any(name in path.split("/") for name in _EMBEDDING_NAMES):
    return 0
  return depth + 1


def layer_decay_scales(params: Any, decay: float) -> Any:
  """Per-parameter lr multipliers decay ** (depth + 1 - layer_id); depth from `blocks_i` names."""
  paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  blocks = [int(m.group(1)) for m in map(_BLOCK.search, paths) if m]
  depth = max(blocks) + 1 if blocks else 0
  return jax.tree_util.tree_map_with_path(
      lambda p, _: decay ** (depth + 1 - vit_layer_id(_path_str(p), depth)), params)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update (weight decay included) by its layer's lr multiplier.

  Scaling the final update is the same as giving each layer its own learning rate, which is
  how the official implementations apply layer decay (lr_scale per parameter group).
  """
  def scale(updates, params):
    del params
    scales = layer_decay_scales(updates, decay)
    return jax.tree.map(lambda u, s: u * s, updates, scales)
  return optax.stateless(scale)


WEIGHT_DECAY_SCHEDULES = ("constant", "cosine")


def weight_decay_schedule(opt_cfg, schedule_steps: Optional[int] = None):
  """`optimizer.weight_decay`, or a per-step schedule from it when one is configured.

  constant: the same coefficient every step.  cosine: half-cosine from `weight_decay` to
  `weight_decay_end` over `schedule_steps`, no warmup (DINO / iBOT raise it 0.04 -> 0.4).
  """
  kind = opt_cfg.get("weight_decay_schedule", "constant")
  if kind == "constant":
    return opt_cfg.weight_decay
  if kind != "cosine":
    raise ValueError(f"optimizer.weight_decay_schedule={kind!r}: expected one of "
                     f"{WEIGHT_DECAY_SCHEDULES}")
  if schedule_steps is None:
    raise ValueError("optimizer.weight_decay_schedule='cosine' needs the schedule's length")
  start, end, total = float(opt_cfg.weight_decay), float(opt_cfg.weight_decay_end), schedule_steps

  def cosine(step):
    progress = jnp.minimum(step / max(total, 1), 1.0)
    return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return cosine


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
  """DINO's and iBOT's `clip_gradients`: every parameter's gradient on its own is scaled by
  max_norm / (|g| + 1e-6) where that is below 1 (optax's clip_by_block_rms bounds the RMS, not
  the L2 norm). Stateless."""

  def clip(g):
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
    coef = max_norm / (norm + 1e-6)
    return jnp.where(coef < 1, g * coef.astype(g.dtype), g)

  return optax.stateless(lambda updates, params=None: jax.tree.map(clip, updates))


def hold_during_first_updates(tx: optax.GradientTransformation, steps: int,
                              mask) -> optax.GradientTransformation:
  """`tx`, then zero updates for the leaves `mask` selects (a pytree of bools like the params,
  or a function of them) while fewer than `steps` updates have been applied: they stay exactly
  as they are, weight decay included (DINO / iBOT's frozen last layer). `tx` itself for
  steps <= 0. The hold counts the updates it sees in its own state, so a step whose update is
  skipped (its state restored) does not count."""
  if steps <= 0:
    return tx
  hold = optax.transforms.conditionally_mask(optax.identity(), lambda count: count >= steps)
  return optax.chain(tx, optax.masked(hold, mask))


def build_optimizer(opt_cfg, schedule: optax.Schedule, schedule_steps: Optional[int] = None,
                    decay_mask=weight_decay_mask) -> optax.GradientTransformation:
  """The configured optimizer with masked weight decay, clipping and layer decay.

  adamw: decoupled weight decay (b1, b2, eps; the first moment in `mu_dtype`, e.g. bfloat16
  to halve its memory and traffic; the second stays float32, whose squares bfloat16's 8-bit
  mantissa would round too coarsely).  lars: the MAE linear-probe optimizer (trust
  ratio and weight decay skip biases and norms; momentum is applied before the learning rate,
  as in MAE's util/lars.py, whereas optax.lars applies it after).  sgd: momentum SGD with L2
  weight decay added to the gradient (as PyTorch's SGD). `schedule_steps` is the length of a
  weight-decay schedule (`optimizer.weight_decay_schedule`), needed only for one.
  `decay_mask` (params -> a tree of bools) picks the parameters weight decay applies to, and
  LARS's trust ratio (default `weight_decay_mask`; a method's own groups: `Method.decay_mask`).
  """
  weight_decay = weight_decay_schedule(opt_cfg, schedule_steps)
  parts = []
  if opt_cfg.clip_grad_norm > 0:
    parts.append(clip_each_by_norm(opt_cfg.clip_grad_norm) if opt_cfg.get("clip_per_tensor")
                 else optax.clip_by_global_norm(opt_cfg.clip_grad_norm))
  name = opt_cfg.name
  if name == "adamw":
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             mu_dtype=opt_cfg.get("mu_dtype") or None,
                             weight_decay=weight_decay, mask=decay_mask))
  elif name == "lars":
    parts.append(optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=opt_cfg.trust_coefficient,
                                                eps=0.0), decay_mask),
        optax.trace(decay=opt_cfg.momentum),
        optax.scale_by_learning_rate(schedule)))
  elif name == "sgd":
    parts.append(optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=opt_cfg.momentum or None)))
  else:
    raise ValueError(f"optimizer.name={name!r}: expected one of {OPTIMIZERS}")
  if opt_cfg.get("layer_decay", 1.0) < 1.0:
    parts.append(scale_by_layer_decay(opt_cfg.layer_decay))
  return optax.chain(*parts)
