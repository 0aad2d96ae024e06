"""The one training loop of mim_jax, shared by every pre-training method.

Reusable pieces, importable on their own:
  * `TrainState`            step, params and optimizer state (a pytree)
  * `make_train_step`       (state, batch, rng) -> (state, metrics), pure and jittable
  * `init_train_state`      shape-first, sharded initialisation
and `run(config, workdir)`, which wires them to data, checkpoints and logs.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from mim_jax import (checkpoint, config_validation, data, masking, metric_writers,
                     metrics_rewind, optim, parallel, preemption, run_errors, viz)
from mim_jax.methods import build_method
from mim_jax.models import vit

# What a training batch carries to the step: images, labels and, for methods whose masks are
# drawn in the input pipeline, those masks.
TRAIN_BATCH_KEYS = ("image", "label", masking.TOKEN_MASK_KEY)


def method_data_transforms(method) -> tuple:
  """The per-example steps a method adds to the input pipeline: host-drawn masks, if any."""
  generator = getattr(method, "mask_generator", None)
  if generator is not None and generator.on_host:
    return (data.AddTokenMask(generator),)
  return ()


def method_train_augment(method, config):
  """The method's own augmentation (e.g. multi-crop views), or None for the default crop+flip."""
  if hasattr(method, "train_augment"):
    return method.train_augment(config.data, tuple(config.image_size), config.channels)
  return None


def method_batch_keys(method) -> tuple[str, ...]:
  """The keys of a pipeline batch that the method's train step reads."""
  return TRAIN_BATCH_KEYS + tuple(getattr(method, "batch_keys", ()))

log = logging.getLogger(__name__)


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


def init_train_state(method, tx: optax.GradientTransformation, rng: jax.Array,
                     image_shape: tuple[int, ...]) -> TrainState:
  """Fresh state for images of `image_shape` [B, H, W, C] (traced: use under jit/eval_shape)."""
  params, extra = method.init(rng, jnp.zeros(image_shape, jnp.float32))
  zero = jnp.zeros([], jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), extra=extra,
                    skipped_updates=zero, nonfinite_streak=zero)


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


def make_train_step(method, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1) -> Callable:
  """Returns the pure step `(state, batch, rng) -> (state, metrics)`.

  `rng` is the run's base key; the step folds in `state.step`, so the randomness of step t is
  the same whether or not the run was interrupted. With `grad_accum_steps` > 1 the batch is
  split into that many microbatches whose gradients are averaged before one update.

  A step whose loss or gradients hold a NaN or Inf changes nothing but the counters: params,
  optimizer state and `extra` keep their values (one select per leaf, fused into the update),
  `skipped_updates` and `nonfinite_streak` grow by one; a finite step resets the streak.
  A method's `after_update(params, extra, step)` hook (EMA teachers) runs after the update. The
  step count advances either way, so the data and randomness of later steps do not shift.
  Metrics are scalars: the method's (loss, ...), learning_rate, grad/param/update norms,
  nonfinite (1 if this step was skipped), skipped_updates and nonfinite_streak.
  """
  after_update = getattr(method, "after_update", None)

  def grad_fn(params, extra, batch, rng):
    (loss, (metrics, extra)), grads = jax.value_and_grad(
        lambda p: method.loss(p, extra, batch, rng, train=True), has_aux=True)(params)
    return loss, metrics, grads, extra

  def step_fn(state: TrainState, batch: Any, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps == 1:
      loss, metrics, grads, extra = grad_fn(state.params, state.extra, batch, rng)
    else:
      micro = _split_microbatches(batch, grad_accum_steps)
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      shapes = jax.eval_shape(grad_fn, state.params, state.extra,
                              jax.tree.map(lambda x: x[0], micro), rng)[:2]
      loss_zero, metric_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

      def accumulate(carry, inputs):
        # `extra` (e.g. BatchNorm statistics) threads through the microbatches in order.
        loss_sum, metric_sum, grad_sum, extra = carry
        index, microbatch = inputs
        l, m, g, extra = grad_fn(state.params, extra, microbatch,
                                 jax.random.fold_in(rng, index))
        return (loss_sum + l, jax.tree.map(jnp.add, metric_sum, m),
                jax.tree.map(jnp.add, grad_sum, g), extra), None

      (loss, metrics, grads, extra), _ = jax.lax.scan(
          accumulate, (loss_zero, metric_zeros, zeros, state.extra),
          (jnp.arange(grad_accum_steps), micro))
      loss, metrics, grads = jax.tree.map(lambda x: x / grad_accum_steps,
                                          (loss, metrics, grads))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if after_update is not None:
      extra = after_update(params, extra, state.step)  # e.g. an EMA teacher follows params
    grad_norm = _global_norm(grads)
    # One NaN/Inf anywhere in the gradients makes their norm non-finite.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state, extra = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state, extra), (state.params, state.opt_state, state.extra))
    skipped = (~finite).astype(jnp.int32)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    metrics = dict(metrics)
    metrics.update(learning_rate=schedule(state.step), grad_norm=grad_norm,
                   param_norm=_global_norm(params), update_norm=_global_norm(updates),
                   nonfinite=skipped, skipped_updates=state.skipped_updates + skipped,
                   nonfinite_streak=streak)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, extra=extra,
                      skipped_updates=state.skipped_updates + skipped,
                      nonfinite_streak=streak), metrics

  return step_fn


def _schedule_lengths(config, num_examples: int) -> tuple[int, int, int]:
  """(steps_per_epoch, schedule_steps, last_step) for a dataset of `num_examples`."""
  steps_per_epoch = num_examples // config.global_batch_size
  if steps_per_epoch < 1:
    raise config_validation.ConfigError(
        f"config.global_batch_size={config.global_batch_size} is invalid: it must not exceed "
        f"the {num_examples} training examples of config.data.source={config.data.source!r}.")
  schedule_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
  last_step = schedule_steps if config.total_steps == -1 else config.total_steps
  return steps_per_epoch, schedule_steps, last_step


def _model_info(config) -> dict:
  return {"method": config.method, "variant": config.model.variant,
          "image_size": list(config.image_size), "channels": config.channels,
          "config": config.to_dict()}


def run(config, workdir: str) -> TrainState:
  """Trains `config.method` in `workdir`, resuming from its latest checkpoint if any.

  The method is a pre-training method or a trained evaluation (linprobe, finetune, which start
  from `config.init_from` and score the evaluation split; results.json holds the final
  numbers). Returns the final TrainState. On SIGTERM (a preemption notice) it saves at the
  next step boundary, agreed by all processes, and returns. Raises NonFiniteError after
  config.max_consecutive_nonfinite non-finite steps in a row and CheckpointSaveError after
  config.max_consecutive_failed_saves failed checkpoint writes in a row (see run_errors).
  """
  from mim_jax.evaluate import frozen, pretrained  # evaluation builds on this module's peers
  if config.method in config_validation.EVALUATION_METHODS:
    # An evaluation takes the encoder's size from its export; continued pre-training must fit
    # the configured model (checked by validation).
    config = pretrained.adopt_encoder_config(config)
  config_validation.validate_config(config)
  mesh = parallel.make_mesh(config.mesh)
  config_validation.validate_for_devices(
      config, batch_parallelism=parallel.batch_parallelism(mesh),
      process_count=jax.process_count(), mesh_desc=parallel.describe_mesh(mesh))
  config_validation.validate_eval_for_devices(config, parallel.batch_parallelism(mesh))
  checkpoint.ensure_writable(workdir)
  is_chief = jax.process_index() == 0

  image_size, channels = tuple(config.image_size), config.channels
  num_examples = data.num_examples(config.data, image_size=image_size, channels=channels)
  steps_per_epoch, schedule_steps, last_step = _schedule_lengths(config, num_examples)
  schedule = optim.learning_rate_schedule(config.optimizer, config.global_batch_size,
                                          steps_per_epoch, schedule_steps)
  tx = optim.build_optimizer(config.optimizer, schedule, schedule_steps)
  from mim_jax.methods.base import TrainLength
  method = build_method(config, TrainLength(steps_per_epoch, schedule_steps))

  batch_sharding = parallel.batch_sharding(mesh)
  replicated = parallel.replicated(mesh)
  # The keys are made under jit, replicated over the mesh: with several processes a host-local
  # key array cannot be device_put onto the other processes' devices.
  init_rng, base_rng = jax.jit(lambda: tuple(jax.random.split(jax.random.key(config.seed))),
                               out_shardings=replicated)()
  # Shape first, then shard: nothing is materialised before its sharding is known.
  micro_shape = (config.global_batch_size // config.grad_accum_steps, *image_size, channels)
  init_fn = functools.partial(init_train_state, method, tx, image_shape=(1, *image_size, channels))
  abstract_state = jax.eval_shape(init_fn, init_rng)
  state_shardings = parallel.tree_shardings(mesh, abstract_state, config.sharding_rules)
  log.info("%s, batch over %s: state %.1f MiB per device of %.1f MiB",
           parallel.describe_mesh(mesh), parallel.batch_axes(mesh),
           parallel.per_device_bytes(state_shardings, abstract_state) / 2**20,
           checkpoint.tree_bytes(abstract_state) / 2**20)
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      abstract_state, state_shardings)

  # A workdir that cannot hold even one checkpoint fails now, not after the first interval.
  checkpoint.ensure_free_space(workdir, checkpoint.tree_bytes(abstract_state),
                               config.keep_checkpoints)

  train_iter = data.make_train_iterator(
      config.data, image_size=image_size, channels=channels,
      global_batch_size=config.global_batch_size, seed=config.seed,
      element_transforms=method_data_transforms(method),
      augment=method_train_augment(method, config))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                                 max_consecutive_failures=config.max_consecutive_failed_saves)
  writer = None
  try:
    state, start_step = _restore_or_init(config, method, ckpt, abstract_state, train_iter,
                                         init_fn, init_rng, state_shardings)
    # Traced under the mesh: the blocks pin their tokens' batch dim to the data axes.
    train_step = jax.jit(
        parallel.with_activation_mesh(
            mesh, make_train_step(method, tx, schedule, config.grad_accum_steps)),
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated), donate_argnums=(0,))

    if is_chief:
      # Rows logged after the checkpoint are recomputed (identically) from here on.
      metrics_rewind.rewind_metrics(workdir, start_step)
    writer = metric_writers.MetricWriter(workdir, enabled=is_chief)
    if start_step == 0:
      writer.write_hparams(config.to_dict())
    progress = metric_writers.ProgressLogger(last_step, start_step=start_step,
                                             log_fn=(lambda s: log.info("%s", s)) if is_chief
                                             else (lambda s: None))
    log.info("%s %s: %d examples, %d steps/epoch, schedule %d steps, training to step %d on "
             "%d device(s), micro-batch %s", config.method, vit.describe_size(config.model),
             num_examples, steps_per_epoch, schedule_steps, last_step, jax.device_count(),
             micro_shape)

    # Every process computes the pictures (the params span all processes); process 0 writes.
    draw = _make_drawer(config, method, workdir, writer, base_rng, replicated, is_chief) if (
        config.viz_every and hasattr(method, "reconstruct")) else None
    evaluate = _make_evaluator(config, method, mesh, state_shardings) if hasattr(
        method, "eval_metrics") else None
    knn = frozen.KnnMonitor(config, mesh) if config.knn.every_epochs > 0 else None
    eval_every = _epochs_to_steps(config.eval.every_epochs, steps_per_epoch)
    knn_every = _epochs_to_steps(config.knn.every_epochs, steps_per_epoch)
    final_metrics: dict[str, float] = {}

    batch_keys = method_batch_keys(method)
    step = start_step
    t_last, step_last = time.perf_counter(), step
    with preemption.PreemptionWatcher(start_step, sync_every=config.log_every) as preempted:
      while step < last_step:
        host_batch = next(train_iter)
        batch = parallel.host_batch_to_global(
            {k: host_batch[k] for k in batch_keys if k in host_batch}, batch_sharding)
        state, metrics = train_step(state, batch, base_rng)
        step += 1
        # The only host-device synchronisation in the loop besides checkpoints: metrics at the
        # logging interval.
        if step % config.log_every == 0 or step == last_step:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          now = time.perf_counter()
          metrics["images_per_sec"] = ((step - step_last) * config.global_batch_size
                                       / (now - t_last))
          metrics["skipped_images"] = data.num_skipped_images()  # corrupt files dropped so far
          t_last, step_last = now, step
          writer.write_scalars(step, metrics)
          progress.log(step, metrics)
          _check_nonfinite(int(metrics["nonfinite_streak"]), int(metrics["skipped_updates"]),
                           step, config, ckpt)
        if preempted.should_stop(step):
          # Before pictures and evaluations: the scheduler's grace period is short.
          ckpt.save(step, state, train_iter, force=True)
          ckpt.wait()
          log.warning("checkpoint for step %d written after SIGTERM (a preemption notice); "
                      "exiting", step)
          break
        if draw is not None and (step % config.viz_every == 0 or step == last_step):
          draw(step, state.params, state.extra)
        if evaluate is not None and ((eval_every and step % eval_every == 0)
                                     or step == last_step):
          final_metrics.update(evaluate(state))
          writer.write_scalars(step, final_metrics)
          log.info("step %d | %s", step, _format(final_metrics))
        if knn is not None and (step % knn_every == 0 or step == last_step):
          final_metrics.update(knn(method.encoder_params(state.params, state.extra)))
          writer.write_scalars(step, final_metrics)
          log.info("step %d | %s", step, _format(final_metrics))
        if ckpt.should_save(step):
          # The save copies the state to the host anyway, so reading the streak costs nothing;
          # a run that has diverged stops here instead of writing a checkpoint.
          _check_nonfinite(int(state.nonfinite_streak), int(state.skipped_updates), step,
                           config, ckpt)
          ckpt.save(step, state, train_iter)

    if not preempted.triggered:
      if ckpt.latest_step() != step:
        ckpt.save(step, state, train_iter, force=True)
      ckpt.wait()
      if config.export_encoder and step == last_step and hasattr(method, "export"):
        # The method's own end product (a tokenizer); collective like the encoder export.
        method.export(workdir, _to_host(state.params), _to_host(state.extra),
                      _model_info(config))
      elif config.export_encoder and step == last_step:
        # Collective: every process gathers the encoder and takes part in the Orbax save.
        encoder = _to_host(method.encoder_params(state.params, state.extra))
        checkpoint.export_encoder(os.path.join(workdir, "encoder"), encoder,
                                  _model_info(config))
      if final_metrics and step == last_step and is_chief:
        _write_results(workdir, config, step, final_metrics)
  finally:
    # Also on errors: an in-flight checkpoint write completes, worker processes stop.
    ckpt.close()
    if writer is not None:
      writer.close()
    if hasattr(train_iter, "close"):
      train_iter.close()  # stops grain worker processes and frees their shared memory
  return state


def _restore_or_init(config, method, ckpt: checkpoint.Checkpointer, abstract_state: TrainState,
                     train_iter, init_fn: Callable, init_rng: jax.Array,
                     state_shardings: Any) -> tuple[TrainState, int]:
  """(state, start step): the latest complete checkpoint, else a fresh (or pre-trained) state.

  Orbax lists only committed step directories, so a checkpoint cut short by a crash is never
  chosen; its temporary directory was deleted when `ckpt` opened the folder.
  """
  from mim_jax.evaluate import pretrained
  start_step = ckpt.latest_step()
  if start_step is not None:
    if ckpt.has_iterator_state(start_step):
      state = ckpt.restore(start_step, abstract_state, train_iter)
    else:
      # Another process count: the state is resharded onto this mesh, but the per-process
      # data positions do not carry over, so the data order starts afresh.
      state = ckpt.restore(start_step, abstract_state)
      log.warning("checkpoint %d was written by a different number of processes: params and "
                  "optimizer state restored onto this mesh, the data iterator starts afresh",
                  start_step)
    log.info("resumed from %s at step %d", ckpt.directory, start_step)
    return state, start_step
  state = jax.jit(init_fn, out_shardings=state_shardings)(init_rng)
  if pretrained.is_pretrained(config.init_from) or getattr(method, "loads_weights", False):
    # Pre-trained weights (or a frozen tokenizer) are merged on the host, then placed with
    # the state's shardings.
    params, extra = method.load_pretrained(_to_host(state.params), _to_host(state.extra))
    state = jax.device_put(state.replace(params=params, extra=extra), state_shardings)
    log.info("initial weights loaded: %s", config.init_from or f"the {config.method} method's "
             "own weight files")
  return state, 0


def _check_nonfinite(streak: int, skipped: int, step: int, config,
                     ckpt: checkpoint.Checkpointer) -> None:
  """Raises NonFiniteError once `streak` steps in a row had a non-finite loss or gradient.

  Skipped steps leave the parameters unchanged, so the checkpoints already written hold the
  last good ones; stopping keeps the run from writing more checkpoints of a diverged run.
  """
  if streak and streak < config.max_consecutive_nonfinite:
    log.warning("step %d: non-finite loss or gradients for the last %d step(s); their updates "
                "were skipped (%d skipped in total)", step, streak, skipped)
  if streak >= config.max_consecutive_nonfinite:
    raise run_errors.NonFiniteError(
        f"training stopped at step {step}: the loss or gradients were NaN/Inf for the last "
        f"{streak} steps in a row (config.max_consecutive_nonfinite="
        f"{config.max_consecutive_nonfinite}); their updates were skipped, so the parameters "
        f"are those of step {step - streak}. The latest checkpoint ({ckpt.latest_step()}) "
        "is intact. Lower optimizer.base_lr, set optimizer.clip_grad_norm, use "
        "model.dtype='float32', or check the input data, then resume with the same command.")


def _to_host(tree: Any) -> Any:
  """The global value of every array as numpy, on every process.

  A collective when the run spans processes (all must call it): `jax.device_get` cannot read
  shards that live on other processes' devices.
  """
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """An interval in epochs as a whole number of steps (0 stays 0: never)."""
  return max(1, int(round(epochs * steps_per_epoch))) if epochs > 0 else 0


def _format(metrics: dict[str, float]) -> str:
  return " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in sorted(metrics.items()))


def _write_results(workdir: str, config, step: int, metrics: dict[str, float]) -> None:
  """results.json: the final evaluation numbers of a run, for tables and scripts."""
  import json
  out = {"method": config.method, "init_from": config.init_from, "step": step,
         "encoder": vit.describe_size(config.model), **metrics}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(out, f, indent=2)


def _make_evaluator(config, method, mesh, state_shardings) -> Callable:
  """Scores the state on the evaluation split: {"eval_accuracy", "eval_loss", "eval_count"}."""
  sharding = parallel.batch_sharding(mesh)
  eval_fn = jax.jit(lambda params, extra, batch: method.eval_metrics(params, extra, batch),
                    in_shardings=(state_shardings.params, state_shardings.extra, sharding),
                    out_shardings=parallel.replicated(mesh))
  local_batch = config.eval.batch_size // jax.process_count()

  def evaluate(state: TrainState) -> dict[str, float]:
    sums: dict[str, float] = {}
    for batch in data.make_eval_iterator(
        config.data, image_size=tuple(config.image_size), channels=config.channels,
        batch_size=local_batch, split=data.eval_split(config.data)):
      batch = parallel.host_batch_to_global(
          {k: batch[k] for k in ("image", "label", "mask")}, sharding)
      for k, v in jax.device_get(eval_fn(state.params, state.extra, batch)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    count = max(sums.get("count", 0.0), 1.0)
    return {"eval_accuracy": sums["correct"] / count, "eval_loss": sums["loss"] / count,
            "eval_count": int(sums["count"])}

  return evaluate


def _make_drawer(config, method, workdir: str, writer, rng: jax.Array,
                 replicated: jax.sharding.Sharding, write: bool = True) -> Callable:
  """Pictures of the method's predictions for a fixed set of (unaugmented) images at every call.

  `method.reconstruct` runs on device; `method.picture` turns its output into an image on the
  host (reconstruction grids for pixel targets, HOG maps for MaskFeat). Every process must call
  `draw` (the computation spans the mesh); only with `write` is the picture saved. The images
  (and host-drawn masks, if the method uses them) are the same on every process, replicated.
  """
  images = next(data.make_eval_iterator(
      config.data, image_size=tuple(config.image_size), channels=config.channels,
      batch_size=config.viz_num_images, process_index=0, process_count=1))["image"]
  batch = {"image": images}
  generator = getattr(method, "mask_generator", None)
  if generator is not None and generator.on_host:
    batch[masking.TOKEN_MASK_KEY] = generator.host(
        np.random.default_rng(config.seed), images.shape[0])
  reconstruct = jax.jit(method.reconstruct, out_shardings=replicated)
  reads_extra = getattr(method, "reconstruct_reads_extra", False)
  viz_rng = jax.random.fold_in(rng, -1 % (2**31))
  device_batch = jax.device_put(batch, replicated)

  def draw(step: int, params, extra=None) -> None:
    args = (params, device_batch, viz_rng) + ((extra,) if reads_extra else ())
    out = jax.device_get(reconstruct(*args))
    if not write:
      return
    grid = method.picture(images, out)
    viz.save_png(grid, os.path.join(workdir, "reconstructions", f"step_{step:08d}.png"))
    writer.write_image(step, "reconstructions", grid)

  return draw
