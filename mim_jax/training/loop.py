"""The one training loop of mim_jax, shared by every method, and the entry to every run.

  run(config, workdir)     a job (k-NN, probe) once, or `train`
  train(config, workdir)   the loop: the step of training/step.py on the set-up of
                           training/setup.py, fed by the data pipeline, with checkpoints
                           (exact resume), logs, pictures, evaluations and the export

The loop talks to the method only through `methods.base.Method`'s hooks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import jax
import numpy as np

from mim_jax import data, registry, storage, viz
from mim_jax.config.errors import ConfigError, config_error
from mim_jax.convert import our_weights
from mim_jax.evaluate import frozen
from mim_jax.models import vit
from mim_jax.training import (
  checkpoint,
  compiler_options,
  metric_writers,
  metrics_rewind,
  parallel,
  preemption,
  restore,
  resume_check,
  run_errors,
  setup,
  workdir_lock,
)
from mim_jax.training import step as step_lib

log = logging.getLogger(__name__)


def _model_info(config) -> dict:
  return {"method": config.method, "variant": config.model.variant,
          "image_size": list(config.image_size), "channels": config.channels,
          "config": config.to_dict()}


def run(config, workdir: str, file_config=None, resume_with_changes: bool = False):
  """Runs `config.method` in `workdir`: a job (k-NN, probe) once, anything else through the
  training loop (`train`). Returns the job's metrics or the final TrainState. `file_config`:
  see registry.validate_config (mim_jax.main passes the config file without overrides);
  `resume_with_changes`: see `train`. Holds the workdir's lock (training/workdir_lock.py)
  throughout: another run on a local `workdir` raises WorkdirInUseError (a ConfigError)."""
  data.sources.forget_listings()  # folders as they are now, not as an earlier run saw them
  if "data" in config:  # before the workdir is made: not inside the images it would read
    data.check_workdir_outside_images(config.data, workdir)
  config = setup.prepare(config, file_config)
  cls = registry.method_class(config.method)
  # Before any data is read or anything compiled; held until the run returns or raises.
  with workdir_lock.hold(workdir, jax.process_index()):
    if cls.kind == "job":
      if resume_with_changes:
        log.warning("--resume_with_changes is not used: method %r is a job that runs whole "
                    "each time, with no checkpoint to resume", config.method)
      return cls.run(config, workdir)
    return train(config, workdir, resume_with_changes=resume_with_changes)


def train(config, workdir: str, resume_with_changes: bool = False) -> step_lib.TrainState:
  """Trains a prepared `config` in `workdir`, resuming from its latest checkpoint if any.

  The method is a pre-training method, a tokenizer or a trained evaluation (linprobe,
  finetune, which start from `config.init_from` and score the evaluation split; results.json
  holds the final numbers). Returns the final TrainState. On SIGTERM (a preemption notice) it
  saves at the next step boundary, agreed by all processes, and raises run_errors.Preempted
  (exit code 75), so that no caller mistakes a stopped run for a finished one. Raises
  NonFiniteError after config.max_consecutive_nonfinite non-finite steps in a row and
  CheckpointSaveError after config.max_consecutive_failed_saves failed checkpoint writes in
  a row (see run_errors). A workdir with checkpoints resumes only under the config it started
  with, up to the fields of resume_check.CHANGEABLE_ON_RESUME, unless `resume_with_changes`
  (then the differences are logged and recorded in the workdir).
  """
  r = setup.setup_run(config)
  method, mesh, last_step = r.method, r.mesh, r.last_step
  checkpoint.ensure_writable(workdir)
  is_chief = jax.process_index() == 0
  image_size, channels = tuple(config.image_size), config.channels
  init_rng, base_rng = r.keys()
  log.info("%s, batch over %s: state %.1f MiB per device of %.1f MiB",
           parallel.describe_mesh(mesh), parallel.batch_axes(mesh),
           parallel.per_device_bytes(r.state_shardings, r.abstract_state) / 2**20,
           checkpoint.tree_bytes(r.abstract_state) / 2**20)
  # A workdir that cannot hold even one checkpoint fails now, not after the first interval.
  checkpoint.ensure_free_space(workdir, checkpoint.tree_bytes(r.abstract_state),
                               config.keep_checkpoints)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                                 max_consecutive_failures=config.max_consecutive_failed_saves)
  changes = []
  resumed = ckpt.latest_step() is not None
  if not resumed and resume_with_changes:
    log.warning("--resume_with_changes is not used: %s holds no checkpoint, so the run starts "
                "at step 0 with this config", workdir)
  if resumed:  # before the data (a device-resident split) is loaded
    try:
      changes = resume_check.check_same_run(
          workdir, config, weight_fields=method.weight_fields,
          allow_changes=resume_with_changes)
      # The step it would resume from, past damaged ones: past the end the loop would not
      # run (no evaluation, no export).
      newest = restore.newest_intact_step(ckpt) if ckpt.latest_step() > last_step else None
      if newest is not None and newest > last_step:
        field = "total_steps" if config.total_steps > 0 else "num_epochs"
        raise config_error(
            field, config[field], f"a schedule reaching the step of the newest intact "
            f"checkpoint in {ckpt.directory}, {newest}: this run ends at step {last_step}",
            "A shorter schedule cannot resume a run that is past its end; start it in another "
            "--workdir.")
    except ConfigError:
      ckpt.close()
      raise
  knn_every = _epochs_to_steps(config.knn.every_epochs if method.kind == "pretraining" else 0,
                               r.steps_per_epoch)
  knn = frozen.KnnMonitor(config) if knn_every else None
  if knn:
    try:
      knn.check_bank()  # before the data, a restore or a record, not at the first evaluation
    except ConfigError:
      ckpt.close()
      raise
  micro_shape = (config.global_batch_size // config.grad_accum_steps, *image_size, channels)
  try:  # a device-resident split is read here: its bad image must not leave ckpt open
    train_iter = data.make_train_iterator(
        config.data, image_size=image_size, channels=channels,
        global_batch_size=config.global_batch_size, seed=config.seed,
        element_transforms=method.data_transforms(),
        augment=method.train_augment(config.data, image_size, channels),
        batch_sharding=r.batch_sharding, batch_extras=method.example_extras)
  except BaseException:
    ckpt.close()
    raise
  writer = None
  host_batch = batch = None
  try:
    state, start_step = _restore_or_init(config, r, ckpt, train_iter, init_rng, changes)
    if resumed and is_chief:  # the changes, or a config.json that was missing or unreadable
      resume_check.record_changes(workdir, config, start_step, changes)
    train_step = r.jit_step()

    # Evaluations due at the checkpoint's step that have not run: a checkpoint written on a
    # preemption notice is flagged so (its pictures are owed too), and a run resumed at its
    # last step (a notice there, or a rerun whose results were removed) owes the end-of-run
    # ones. They run below, once the loop's monitors exist.
    owed = start_step > 0 and ckpt.evaluations_pending(start_step)
    catch_up = owed or 0 < start_step == last_step
    if is_chief:
      # Rows logged after the checkpoint are recomputed (identically, but loss_mean) from here
      # on; the evaluation rows of the checkpoint's step go too when its evaluations run again
      # (a catch-up that a second stop interrupted would otherwise log them twice).
      metrics_rewind.rewind_metrics(workdir, start_step, drop_evaluations=catch_up)
    writer = metric_writers.MetricWriter(workdir, enabled=is_chief)
    if start_step == 0:
      writer.write_hparams(config.to_dict())
    if is_chief:
      our_weights.write_released_path(workdir, method.released_path)
    progress = metric_writers.ProgressLogger(last_step, start_step=start_step,
                                             log_fn=(lambda s: log.info("%s", s)) if is_chief
                                             else (lambda s: None))
    log.info("%s %s: %d examples per epoch, %d steps/epoch, schedule %d steps, training to "
             "step %d on %d device(s), micro-batch %s", config.method,
             vit.describe_size(config.model),
             r.steps_per_epoch * config.global_batch_size, r.steps_per_epoch,
             r.schedule_steps, last_step, jax.device_count(), micro_shape)

    # Every process computes the pictures (the params span all processes); process 0 writes.
    viz_every = config.viz_every if method.draws else 0
    draw = _make_drawer(config, method, workdir, writer, base_rng, r.replicated,
                        is_chief) if viz_every else None
    evaluate = _make_evaluator(config, method, mesh, r.state_shardings) if (
        method.evaluates) else None
    eval_every = _epochs_to_steps(config.eval.every_epochs if method.evaluates else 0,
                                  r.steps_per_epoch)
    final_metrics: dict[str, float] = {}

    def eval_due(step: int, at_end: bool) -> bool:
      return evaluate is not None and (at_end or bool(eval_every and step % eval_every == 0))

    def knn_due(step: int, at_end: bool) -> bool:
      return knn is not None and (at_end or step % knn_every == 0)

    def draw_due(step: int, at_end: bool) -> bool:
      return draw is not None and (at_end or step % viz_every == 0)

    def evaluations(step: int, state, at_end: bool) -> None:
      """The evaluation and k-NN monitor due at `step` (both at the end of the run)."""
      if eval_due(step, at_end):
        final_metrics.update(evaluate(state))
        writer.write_scalars(step, final_metrics)
        log.info("step %d | %s", step, _format(final_metrics))
      if knn_due(step, at_end):
        final_metrics.update(knn(method.encoder_params(state.params, state.extra)))
        writer.write_scalars(step, final_metrics)
        log.info("step %d | %s", step, _format(final_metrics))

    def owed_evaluations(step: int, state) -> None:
      """The pictures and evaluations a preempted run left undone at `step`, so that its
      curves miss no point; at the last step the end-of-run evaluations."""
      at_end = step == last_step
      log.info("step %d: running the evaluations %s", step,
               "the preempted run left undone" if owed else "of the end of the run")
      if owed and draw_due(step, at_end):
        draw(step, state.params, state.extra)
      evaluations(step, state, at_end=at_end)

    batch_keys = r.batch_keys()
    step = start_step
    t_last, step_last = time.perf_counter(), step
    # The losses (device scalars, not read) since the last log: their finite mean is logged as
    # loss_mean beside the last step's loss, fetched with the metrics at the logging sync (no
    # per-step work). Not checkpointed: after a resume between two logging steps, the first
    # row's mean covers the steps since the resume (the only value of a rewound row that can
    # differ).
    interval_losses = []
    with preemption.PreemptionWatcher(start_step, sync_every=config.log_every) as preempted:
      if catch_up:  # inside the watcher: a notice during a long evaluation still exits 75
        owed_evaluations(start_step, state)
      while step < last_step:
        host_batch = next(train_iter)
        batch = parallel.host_batch_to_global(
            {k: host_batch[k] for k in batch_keys if k in host_batch}, r.batch_sharding)
        state, metrics = train_step(state, batch, base_rng)
        step += 1
        interval_losses.append(metrics["loss"])
        # The only host-device synchronisation in the loop besides checkpoints: metrics at the
        # logging interval.
        if step % config.log_every == 0 or step == last_step:
          metrics, losses = jax.device_get((metrics, interval_losses))
          metrics = {k: float(v) for k, v in metrics.items()}
          finite = [float(x) for x in losses if np.isfinite(x)]
          metrics["loss_mean"] = float(np.mean(finite)) if finite else float("nan")
          interval_losses = []
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
          # A run whose streak reached the limit stops (exit 3) without a checkpoint, as below.
          _check_nonfinite(int(state.nonfinite_streak), int(state.skipped_updates), step,
                           config, ckpt)
          # Before pictures and evaluations: the scheduler's grace period is short. Those due
          # now are flagged in the checkpoint and run by the resumed run.
          at_end = step == last_step
          pending = draw_due(step, at_end) or eval_due(step, at_end) or knn_due(step, at_end)
          ckpt.save(step, state, train_iter, force=True, evaluations_pending=pending)
          ckpt.wait()
          log.warning("checkpoint for step %d written after SIGTERM (a preemption notice) or "
                      "Ctrl-C; exiting", step)
          break
        if draw_due(step, at_end=step == last_step):
          draw(step, state.params, state.extra)
        evaluations(step, state, at_end=step == last_step)
        if ckpt.should_save(step):
          # The save copies the state to the host anyway, so reading the streak costs nothing;
          # a run that has diverged stops here instead of writing a checkpoint.
          _check_nonfinite(int(state.nonfinite_streak), int(state.skipped_updates), step,
                           config, ckpt)
          writer.flush()  # the rows up to a checkpoint are stored before it (gs:// buffers)
          ckpt.save(step, state, train_iter)

    if preempted.triggered:
      raise run_errors.Preempted(step, workdir)
    if ckpt.latest_step() != step:
      ckpt.save(step, state, train_iter, force=True)
    ckpt.wait()
    if config.get("export_encoder", False) and step == last_step:
      # The run's end product (the encoder, a tokenizer). Collective: every process gathers
      # the state and takes part in the Orbax save.
      method.export(workdir, step_lib.to_host(state.params), step_lib.to_host(state.extra),
                    _model_info(config))
    if final_metrics and step == last_step and is_chief:
      _write_results(workdir, config, step, final_metrics)
  except jax.errors.JaxRuntimeError:
    if jax.process_count() > 1:  # a collective failed: another process has most likely died
      ckpt.abandon()
    raise
  finally:
    # Also on errors: an in-flight checkpoint write completes (unless abandoned above: it
    # could not without the lost process), worker processes stop.
    ckpt.close()
    if writer is not None:
      writer.close()
    train_iter.close()  # stops grain worker processes
    # The last batches live in shared-memory blocks that the worker processes wrote, held by
    # this frame and by reference cycles inside grain's iterator. Dropped here and unlinked
    # before the process can exit (see data.release_shared_memory); left to interpreter exit,
    # Python's resource tracker would report them as leaked. Cleared locals also matter when
    # an exception's traceback keeps this frame alive (Preempted).
    train_iter = host_batch = batch = None
    data.release_shared_memory()
  return state


def _restore_or_init(config, r: setup.Run, ckpt: checkpoint.Checkpointer, train_iter,
                     init_rng: jax.Array,
                     changes: list = ()) -> tuple[step_lib.TrainState, int]:
  """(state, start step): the newest checkpoint that restores, else a fresh (or pre-trained)
  state.

  Orbax lists only committed step directories, so a checkpoint cut short by a crash is never
  chosen; its temporary directory was deleted when `ckpt` opened the folder. A committed step
  whose files were damaged later is skipped for the one before (restore.restore_newest).
  `changes`: the settings a resume changes (resume_check.check_same_run); a checkpoint written
  under other optimizer settings is read in that optimizer's state tree (clipping switched on
  after a divergence), and one the changed config's state does not fit is a ConfigError.
  """
  abstract_state, method = r.abstract_state, r.method
  if ckpt.latest_step() is not None:
    target = abstract_state
    saved_optimizer = {key.split(".", 1)[1]: old for key, old, _ in changes
                       if key.startswith("optimizer.")}
    if saved_optimizer:
      target = r.abstract_state_saved_with(saved_optimizer) or abstract_state
    state, start_step = restore.restore_newest(config, ckpt, train_iter, target, changes)
    if target is not abstract_state:  # read in the saved optimizer's tree: the same arrays
      state = state.replace(opt_state=jax.tree.unflatten(
          jax.tree.structure(abstract_state.opt_state), jax.tree.leaves(state.opt_state)))
    log.info("resumed from %s at step %d", ckpt.directory, start_step)
    return state, start_step
  state = r.init_state(init_rng)
  if method.wants_weights():
    # Pre-trained weights (or a frozen tokenizer) are merged on the host, then placed with
    # the state's shardings.
    state = step_lib.with_initial_weights(method, state, r.state_shardings)
    log.info("initial weights loaded: %s", config.get("init_from") or f"the {config.method} "
             "method's own weight files")
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
        f"training stopped at step {step}: the loss or gradients were NaN/Inf for "
        f"config.max_consecutive_nonfinite={config.max_consecutive_nonfinite} steps in a row; "
        f"the updates of the last {streak} steps were skipped, so the parameters are those of "
        f"step {step - streak}. The latest checkpoint ({ckpt.latest_step()}) "
        "is intact. Lower optimizer.base_lr, set optimizer.clip_grad_norm, use "
        "model.dtype='float32', or check the input data, then resume: the same command with "
        "the changed settings and --resume_with_changes.")


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  """An interval in epochs as a whole number of steps (0 stays 0: never)."""
  return max(1, int(round(epochs * steps_per_epoch))) if epochs > 0 else 0


def _format(metrics: dict[str, float]) -> str:
  return " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in sorted(metrics.items()))


def _write_results(workdir: str, config, step: int, metrics: dict[str, float]) -> None:
  """results.json: the final evaluation numbers of a run, for tables and scripts."""
  out = {"method": config.method, "init_from": config.get("init_from", ""), "step": step,
         "encoder": vit.describe_size(config.model), **metrics}
  storage.write_text(os.path.join(workdir, "results.json"), json.dumps(out, indent=2))


def _make_evaluator(config, method, mesh, state_shardings) -> Callable:
  """Scores the state on the evaluation split: {"eval_accuracy", "eval_loss", "eval_count"}."""
  sharding = parallel.batch_sharding(mesh)
  eval_fn = compiler_options.jit(
      config, lambda params, extra, batch: method.eval_metrics(params, extra, batch),
      in_shardings=(state_shardings.params, state_shardings.extra, sharding),
      out_shardings=parallel.replicated(mesh))
  local_batch = config.eval.batch_size // jax.process_count()

  def evaluate(state: step_lib.TrainState) -> dict[str, float]:
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
  batch = {"image": images,
           **method.example_extras(images.shape[0], np.random.default_rng(config.seed))}
  reconstruct = compiler_options.jit(config, method.reconstruct, out_shardings=replicated)
  viz_rng = jax.random.fold_in(rng, -1 % (2**31))
  device_batch = jax.device_put(batch, replicated)

  def draw(step: int, params, extra) -> None:
    out = jax.device_get(reconstruct(params, device_batch, viz_rng, extra))
    if not write:
      return
    grid = method.picture(images, out)
    viz.save_png(grid, os.path.join(workdir, "reconstructions", f"step_{step:08d}.png"))
    writer.write_image(step, "reconstructions", grid)

  return draw
