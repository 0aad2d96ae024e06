"""The pure training step every method shares, importable on its own.

  TrainState                 step, params, optimizer state, the method's extra state (a pytree)
  init_train_state(...)      fresh state (under jit / eval_shape, or eagerly)
  make_train_step(...)       (state, batch, rng) -> (state, metrics), pure and jittable

No data, checkpoints or logs here (training/loop.py wires those); a user's own loop can call
these directly (mim_jax/examples/custom_loop.py).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import flax
import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils

from mim_jax.objectives.masking import TOKEN_MASK_KEY


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (besides the data iterator).

  step              int32 []  number of training steps taken (batches consumed) so far
  params            pytree    trainable parameters (float32)
  opt_state         pytree    optimizer state
  extra             pytree    the method's other state (BatchNorm statistics, a frozen
                              encoder, ...)
  skipped_updates   int32 []  steps whose update was skipped for a non-finite loss/gradient
  nonfinite_streak  int32 []  how many of the latest steps in a row were skipped
  """
  step: jax.Array
  params: Any
  opt_state: Any
  extra: Any
  skipped_updates: jax.Array
  nonfinite_streak: jax.Array


# The key of the crop boxes a batch for device augmentation carries (data/transforms.py's
# CROP_BOX_KEY; not imported: the step stays free of the input pipeline's modules).
DEVICE_AUGMENT_KEY = "crop_box"


def init_train_state(method, tx: optax.GradientTransformation, rng: jax.Array,
                     image_shape: tuple[int, ...]) -> TrainState:
  """Fresh state for images of `image_shape` [B, H, W, C], the size the method's config was
  built for (`config.image_size`, `config.channels`; refused otherwise). Under jit or
  eval_shape (the trainer) or eagerly.

  A method that reads weights when a run starts (`method.wants_weights()`: init_from, BEiT's
  frozen tokenizer, MaskDistill's teacher) holds placeholders for them here, zeros for a
  tokenizer: pass the state through `with_initial_weights` before the first step."""
  _check_image_shape(method, tuple(image_shape))
  params, extra = method.init(rng, jnp.zeros(image_shape, jnp.float32))
  # Three arrays, not one shared: eagerly one buffer in three leaves could not be donated.
  step, skipped, streak = (jnp.zeros([], jnp.int32) for _ in range(3))
  return TrainState(step=step, params=params, opt_state=tx.init(params), extra=extra,
                    skipped_updates=skipped, nonfinite_streak=streak)


def _check_image_shape(method, image_shape: tuple[int, ...]) -> None:
  """Refuses an `image_shape` [B, H, W, C] other than the size the method was built for: its
  position tables, patch grid and masks come from `config.image_size` / `config.channels`,
  and a state of another size fails only later, deep in the loss."""
  config = getattr(method, "config", None)
  if config is None or "image_size" not in config or "channels" not in config:
    return  # a method of one's own without a config
  built = (*(int(n) for n in config.image_size), int(config.channels))
  if len(image_shape) != 4 or tuple(image_shape[1:]) != built:
    raise ValueError(
        f"image_shape {image_shape}: expected [B, H, W, C] with (H, W, C) = {built}, the "
        f"config.image_size={tuple(config.image_size)} and config.channels={config.channels} "
        f"the method was built with; set those to the images' size before building the method")


def to_host(tree: Any) -> Any:
  """The global value of every array as numpy, on every process.

  A collective when the run spans processes (all must call it): `jax.device_get` cannot read
  shards that live on other processes' devices.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def with_initial_weights(method, state: TrainState, shardings: Any = None) -> TrainState:
  """A fresh `state` (`init_train_state`) with the weights `method` reads when a run starts:
  the encoder `init_from` names, a frozen tokenizer or teacher; `state` itself for a method
  that reads none (`method.wants_weights()` false, e.g. MAE from scratch).

  On the host, not under jit (it reads files): once, before the first step, on every process
  of a run (a collective then). The merged arrays are placed with `shardings` (the state's
  NamedShardings, or None: JAX's default device). A resumed run restores them from its
  checkpoint instead."""
  if not method.wants_weights():
    return state
  params, extra = method.load_pretrained(to_host(state.params), to_host(state.extra))
  return jax.device_put(state.replace(params=params, extra=extra), shardings)


def _global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves of a pytree (in float32)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _split_microbatches(batch: Any, num_micro: int) -> Any:
  """[B, ...] -> [num_micro, B / num_micro, ...] taking rows i::num_micro for microbatch i.

  Strided rows keep every device's contiguous shard of the batch inside each microbatch, so
  splitting needs no communication when the batch is sharded over devices.
  """
  def split(x):
    x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _to_varying(x: jax.Array, axis_name) -> jax.Array:
  """`x` marked as differing per device along `axis_name` (jax.lax.pcast; pvary before it)."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(x, axis_name, to="varying")
  return jax.lax.pvary(x, axis_name)


NONFINITE_GUARDS = ("select", "cond")


def default_nonfinite_guard(guard: str) -> str:
  """How a step keeps its state at a NaN / Inf: `guard`, or for "" the backend's default
  ("cond" on a CPU, where it was measured faster; "select" elsewhere, until measured)."""
  if guard:
    return guard
  return "cond" if jax.default_backend() == "cpu" else "select"


def _masked_share_weights(method, micro: Any, k: int, axis_name) -> jax.Array:
  """float32 [k]: each microbatch's weight in the accumulated mean. 1 each (every microbatch's
  loss its own mean, as PyTorch accumulates), except for a method whose loss is one mean over
  the masked patches of host-drawn masks (`loss_is_masked_mean`, batch["token_mask"] [k, B/k,
  N]): k x its share of the batch's masked patches, so that the mean of the weighted
  microbatch means is the whole batch's mean, with masks whose count varies per image too
  (`masking.mask_probability` < 1, a `ratio_range`). Under shard_map the counts are summed
  over the devices: the whole batch's, as in the global step."""
  ones = jnp.ones((k,), jnp.float32)
  if (not getattr(method, "loss_is_masked_mean", False) or not isinstance(micro, dict)
      or TOKEN_MASK_KEY not in micro or getattr(method, "masks_per_image", 1) != 1):
    return ones
  counts = jnp.sum(micro[TOKEN_MASK_KEY].reshape(k, -1).astype(jnp.float32), axis=1)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  total = jnp.sum(counts)
  return jnp.where(total > 0, k * counts / jnp.maximum(total, 1.0), ones)


def make_train_step(method, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1, axis_name=None, norms_every: int = 1,
                    last_step: Optional[int] = None,
                    stop_streak: Optional[int] = None,
                    nonfinite_guard: str = "") -> Callable:
  """Returns the pure step `(state, batch, rng) -> (state, metrics)`.

  Without `axis_name` the step is global: jit it with the batch sharded over a mesh and XLA
  inserts the communication. With `axis_name` (a mesh axis name or a tuple of them) it is the
  per-device step for `jax.shard_map` over those axes, its collectives explicit: the state is
  replicated, each device holds an equal share of the batch, the method's batch statistics
  follow the axis (`Method.with_axis`: masked-loss counts, iBOT's centres, BatchNorm), and the
  gradients, loss and metrics are `pmean`ed, so the update equals the global step's. Each
  device draws its own randomness (the key folded with its index on the axis). See
  mim_jax/examples/shard_map_loop.py.

  `rng` is the run's base key; the step folds in `state.step`, so the randomness of step t is
  the same whether or not the run was interrupted. With `grad_accum_steps` > 1 the batch is
  split into that many microbatches whose gradients are averaged before one update. Each
  microbatch's loss is its own mean, as PyTorch's accumulation computes it (BEiT's
  `update_freq`), except where a method's loss is one mean over host-drawn masks
  (`loss_is_masked_mean`: SimMIM, MaskFeat, BEiT, data2vec, MaskDistill, mim): there each
  microbatch is weighed by its share of the batch's masked patches (`_masked_share_weights`),
  and the update is the whole batch's (unweighted, a microbatch of unmasked images under
  `masking.mask_probability` < 1 weighed as much as the others: a 16-21% gradient difference
  on a tiny SimMIM). iBOT's loss is a mean per image, the same either way; MAE's fixed-count
  masks too.
  Statistics a method keeps by EMA (iBOT's centres, VQ codebooks) move once per update from
  the whole batch (summed in `extra` by the loss, applied in `after_update`); BatchNorm running
  statistics (the linear probe's) move once per microbatch, as in PyTorch.

  A step whose loss or gradients hold a NaN or Inf changes nothing but the counters: params,
  optimizer state and `extra` keep their values, `skipped_updates` and `nonfinite_streak` grow
  by one; a finite step resets the streak. `nonfinite_guard` says how (the same results):
  "select" computes the update and keeps the old state by one select per leaf; "cond" runs the
  update inside `lax.cond` and no update at a skipped step; "" picks by backend
  (`default_nonfinite_guard`). On XLA:CPU the selects are kernels of their own, a read of the
  new and old state and a write per leaf every step (docs/benchmarks.md: 3-7% of a ViT-B/16
  MAE step), which "cond" saves; on a GPU, XLA reads a conditional's predicate on the host.
  With `stop_streak` (the loop's `max_consecutive_nonfinite`) a streak that reaches it holds:
  every later step is skipped too, finite or not, so that a loop which reads the streak only at
  its logging steps still sees a streak that ended between two of them, and stops there with
  the parameters of the step before the streak.
  A method's `after_update(params, extra, step)` hook (EMA teachers) runs after the update. The
  step count advances either way, so the data and randomness of later steps do not shift.
  Metrics are scalars: the method's (loss, ...), learning_rate, grad/param/update norms,
  nonfinite (1 if this step was skipped), skipped_updates and nonfinite_streak. The parameter
  and update norms are computed only at the steps that are logged (`norms_every`: the loop's
  logging interval, and `last_step`) and are NaN in between; the gradient norm, which the
  finiteness check needs, every step.
  """
  if (getattr(method, "schedules_by_length", False)
      and not getattr(method, "length_given", True)):
    # Built without the run's length, its epochs would be steps (TrainLength.nominal: one
    # step per epoch): a teacher temperature warmed up over 30 steps, a momentum at 1 after
    # num_epochs steps, all without an error.
    raise ValueError(
        f"method {method.name!r} schedules its own settings over the run (EMA momentum, "
        "teacher temperature, annealing): build it with the run's length, "
        "registry.build_method(config, TrainLength(steps_per_epoch, schedule_steps)), "
        "before making its train step")
  guard = default_nonfinite_guard(nonfinite_guard)
  if guard not in NONFINITE_GUARDS:
    raise ValueError(f"nonfinite_guard={nonfinite_guard!r}: one of {('',) + NONFINITE_GUARDS}")
  if axis_name is not None:
    method = method.with_axis(axis_name)

  def grad_fn(params, extra, batch, rng):
    if axis_name is not None:
      # Differentiate per device: replicated params would get their cotangents summed over
      # the axis by autodiff; the explicit pmean below averages the devices' gradients.
      params = jax.tree.map(lambda p: _to_varying(p, axis_name), params)
    (loss, (metrics, extra)), grads = jax.value_and_grad(
        lambda p: method.loss(p, extra, batch, rng, train=True), has_aux=True)(params)
    return loss, metrics, grads, extra

  def step_fn(state: TrainState, batch: Any, rng: jax.Array):
    if isinstance(batch, dict) and DEVICE_AUGMENT_KEY in batch:
      # Raw images and their crop boxes (data.augment_on='device'): trained on as they are,
      # the images would be neither cropped nor normalised.
      raise ValueError(
          f"the batch holds {DEVICE_AUGMENT_KEY!r}: its images are to be augmented on the "
          "device (data.augment_on='device'); wrap the step with "
          "mim_jax.data.device_augment.augmenting(step, config) (as the trainer does)")
    # Every array of the batch is per example: one leading batch dimension, split into
    # micro-batches below.
    chex.assert_equal_shape_prefix(jax.tree.leaves(batch), 1)
    chex.assert_rank(state.step, 0)
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    if grad_accum_steps == 1:
      loss, metrics, grads, extra = grad_fn(state.params, state.extra, batch, rng)
    else:
      micro = _split_microbatches(batch, grad_accum_steps)
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      shapes = jax.eval_shape(grad_fn, state.params, state.extra,
                              jax.tree.map(lambda x: x[0], micro), rng)[:2]
      loss_zero, metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      if axis_name is not None:  # the sums hold per-device values until the pmean
        zeros, loss_zero, metric_zeros = jax.tree.map(
            lambda x: _to_varying(x, axis_name), (zeros, loss_zero, metric_zeros))

      weights = _masked_share_weights(method, micro, grad_accum_steps, axis_name)
      masked_means = getattr(method, "masked_mean_metrics", ("loss",))

      def accumulate(carry, inputs):
        # `extra` (e.g. BatchNorm statistics) threads through the microbatches in order.
        loss_sum, metric_sum, grad_sum, extra = carry
        index, microbatch, weight = inputs
        l, m, g, extra = grad_fn(state.params, extra, microbatch,
                                 jax.random.fold_in(rng, index))
        l, g = l * weight, jax.tree.map(lambda x: x * weight, g)
        m = {k: v * weight if k in masked_means else v for k, v in m.items()}
        return (loss_sum + l, jax.tree.map(jnp.add, metric_sum, m),
                jax.tree.map(jnp.add, grad_sum, g), extra), None

      (loss, metrics, grads, extra), _ = jax.lax.scan(
          accumulate, (loss_zero, metric_zeros, zeros, state.extra),
          (jnp.arange(grad_accum_steps), micro, weights))
      loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps,
                                          (loss, metrics, grads))
    if axis_name is not None:
      loss, metrics, grads = jax.lax.pmean((loss, metrics, grads), axis_name)

    # The updates applied before this one: the optimizer's own count (a skipped step restores
    # its state), so the method's schedules (EMA momentum, temperatures) and the logged lr run
    # on the clock the lr and weight-decay schedules run on, skipped steps or not.
    applied = state.step - state.skipped_updates
    grad_norm = _global_norm(grads)
    # One NaN/Inf anywhere in the gradients makes their norm non-finite.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite
    if stop_streak is not None:
      apply &= state.nonfinite_streak < stop_streak

    def update(_):
      with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
      return params, opt_state, method.after_update(params, extra, applied), updates

    if guard == "cond":
      def keep(_):
        return (state.params, state.opt_state, state.extra,
                jax.tree.map(jnp.zeros_like, state.params))
      params, opt_state, extra, updates = jax.lax.cond(apply, update, keep, None)
    else:
      params, opt_state, extra, updates = update(None)
      params, opt_state, extra = jax.tree.map(
          lambda new, old: jnp.where(apply, new, old),
          (params, opt_state, extra), (state.params, state.opt_state, state.extra))
    skipped = (~apply).astype(jnp.int32)
    streak = jnp.where(apply, 0, state.nonfinite_streak + 1)
    # Parameter and update norms are only read where they are logged: computed there alone.
    logged = (state.step + 1) % norms_every == 0
    if last_step is not None:
      logged |= state.step + 1 == last_step
    with jax.named_scope("diagnostics"):
      param_norm, update_norm = jax.lax.cond(
          logged, lambda: (_global_norm(params), _global_norm(updates)),
          lambda: (jnp.float32(jnp.nan), jnp.float32(jnp.nan)))
    # A skipped step applied no update (whatever the discarded one held): NaN under either
    # guard.
    update_norm = jnp.where(apply, update_norm, jnp.float32(jnp.nan))
    metrics = dict(metrics)
    metrics.update(learning_rate=schedule(applied), grad_norm=grad_norm,
                   param_norm=param_norm, update_norm=update_norm,
                   nonfinite=skipped, skipped_updates=state.skipped_updates + skipped,
                   nonfinite_streak=streak)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=extra,
                      skipped_updates=state.skipped_updates + skipped,
                      nonfinite_streak=streak), metrics

  return step_fn
