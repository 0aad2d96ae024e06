"""Which checkpoint a run resumes from: the newest that restores, past damaged ones.

  newest_intact_step(ckpt) -> step | None   the step a resume would start from, judged
                                            from the folder listing alone (cheap)
  restore_newest(config, ckpt, train_iter, target, changes) -> (state, step)

A committed step folder can be damaged afterwards (files deleted or cut short); the steps are
tried newest first, a damaged one is skipped in one warning and, once an older one restores,
moved aside (checkpoint.Checkpointer.missing_parts / damage / set_aside). Everything else that
fails is raised as it is, so a changed config is still named as the cause where it is one.
"""

from __future__ import annotations

import logging

from mim_jax import data
from mim_jax.config.errors import ConfigError
from mim_jax.training import checkpoint, run_errors
from mim_jax.training import step as step_lib

log = logging.getLogger(__name__)


def newest_intact_step(ckpt: checkpoint.Checkpointer) -> int | None:
  """The newest step without missing parts (Checkpointer.missing_parts), agreed by every
  process as restore_newest agrees, or None: where a resume starts unless restoring it shows
  its arrays cut short. Reads the folder listings and the data positions only, so the loop
  can refuse a schedule that ends before it ahead of loading data or restoring anything. A
  storage error listing a step counts the step as intact (restore_newest raises it)."""
  for step in ckpt.all_steps()[::-1]:
    outcome, _, _, error = _agreed_listing(ckpt, step)
    if error is not None:
      log.warning("could not list checkpoint folder %s (%s): taken as intact",
                  ckpt.step_dir(step), run_errors.first_line(error))
    if outcome != checkpoint.DAMAGED:
      return step
  return None


def _agreed_listing(ckpt: checkpoint.Checkpointer, step: int):
  """(outcome agreed by every process, the first process with it, this process's missing
  parts, this process's listing error) of checkpoint `step`'s folder, before any restore:
  DAMAGED where a process misses a part (Checkpointer.missing_parts), FAILED where one could
  not list it (a storage that refuses the listing is not damage), else RESTORED."""
  reason = error = None
  try:
    reason = ckpt.missing_parts(step)
  except Exception as e:  # pylint: disable=broad-except  # each storage backend its own
    error = e
  outcome, process = checkpoint.agree(checkpoint.FAILED if error is not None else
                                      checkpoint.DAMAGED if reason else checkpoint.RESTORED)
  return outcome, process, reason, error


def restore_newest(config, ckpt: checkpoint.Checkpointer, train_iter, target,
                   changes) -> tuple[step_lib.TrainState, int]:
  """(state, step) of the newest checkpoint that restores onto `target`, `train_iter` rewound
  to that step's position.

  A damaged step (files missing, cut short or unreadable: Checkpointer.missing_parts and
  .damage) is logged in one WARNING line and the previous one tried; once one restores, the
  damaged ones are moved aside (`<step>.damaged`), kept but never chosen again, and the steps
  after the restored one are trained (and saved) again. Any other failure is raised as it was,
  nothing moved: a changed config whose arrays differ from the checkpoint's (a ConfigError
  naming `changes`), a storage that refuses a read. No step restoring is a
  CheckpointRestoreError (exit 2) naming each step and why; nothing is moved then, so the
  workdir stays as it was found. Every process takes each decision together (checkpoint.agree),
  on the shared folder.
  """
  steps = ckpt.all_steps()[::-1]
  damaged: list[tuple[int, str]] = []
  # A failed attempt may have rewound the iterator already; a step without this process's
  # position (written by another process count) then starts from the fresh position.
  fresh_position = train_iter.get_state() if len(steps) > 1 else None
  for i, step in enumerate(steps):
    state = None
    # Agreed before any process restores: Orbax's restore ends with a barrier across the
    # processes, which one that skipped the step (its own data position missing) never joins.
    # A listing error is raised below (FAILED).
    outcome, process, reason, error = _agreed_listing(ckpt, step)
    if outcome == checkpoint.RESTORED:
      try:  # every failure reaches `agree` below: the other processes wait there
        state = _restore_step(config, ckpt, step, target, train_iter,
                              fresh_position if damaged else None)
      except Exception as e:  # pylint: disable=broad-except  # damage, or raised below
        reason = None if isinstance(e, ConfigError) else ckpt.damage(step, e, target)
        error = None if reason else e
      outcome, process = checkpoint.agree(checkpoint.FAILED if error is not None else
                                          checkpoint.DAMAGED if reason else checkpoint.RESTORED)
    if outcome == checkpoint.FAILED:
      _raise_restore_error(error or run_errors.RunError(
          f"process {process} could not restore checkpoint {step} in {ckpt.directory} (see "
          "its log)"), ckpt, step, target, changes)
    if outcome == checkpoint.DAMAGED:
      reason = reason or f"process {process} found it damaged (see its log)"
      damaged.append((step, reason))
      log.warning("checkpoint folder %s is damaged, not resumed from: %s; %s", ckpt.step_dir(step),
                  reason, f"trying the previous one, step {steps[i + 1]}" if i + 1 < len(steps)
                  else "no older checkpoint is left to try")
      continue
    if damaged:
      moved = ckpt.set_aside([s for s, _ in damaged])
      for s, path in moved.items():
        log.warning("moved the damaged checkpoint folder %s aside to %s (kept, never read "
                    "again); the run resumes from step %d and trains the steps after it again",
                    ckpt.step_dir(s), path, step)
    return state, step
  tried = "\n".join(f"  step {s} ({ckpt.step_dir(s)}): {reason}" for s, reason in damaged)
  raise run_errors.CheckpointRestoreError(
      f"no checkpoint in {ckpt.directory} can be restored: every step folder is damaged "
      f"(files missing, cut short or unreadable):\n{tried}\nNothing was moved or deleted. "
      "Start the run afresh in another --workdir, or, to restart this workdir from step 0, "
      "move or delete these step folders first (its logs are then rewound to step 0).")


def _restore_step(config, ckpt: checkpoint.Checkpointer, step: int, target, train_iter,
                  fresh_position) -> step_lib.TrainState:
  """Checkpoint `step` onto `target`, rewinding `train_iter` to its position when it holds
  this process's (else to `fresh_position`, when not None)."""
  if ckpt.has_iterator_state(step):
    data.check_saved_position(ckpt.iterator_position(step),
                              resident=config.data.get("device_resident", False))
    return ckpt.restore(step, target, train_iter)
  # Another process count: the state is resharded onto this mesh, but the per-process data
  # positions do not carry over, so the data order starts afresh.
  state = ckpt.restore(step, target)
  if fresh_position is not None:
    train_iter.set_state(fresh_position)
  log.warning("checkpoint %d was written by a different number of processes: params and "
              "optimizer state restored onto this mesh, the data iterator starts afresh", step)
  return state


def _raise_restore_error(error: Exception, ckpt: checkpoint.Checkpointer, step: int, target,
                         changes) -> None:
  """Raises `error`, a failed restore of an undamaged `step`: as a ConfigError naming the
  changed settings when the arrays they build differ from those the checkpoint's metadata
  holds (Orbax's ValueError), else as it is (the changes are not blamed for what they did not
  cause, nor when the metadata cannot be read to tell)."""
  if changes and isinstance(error, ValueError) and not isinstance(error, ConfigError):
    if ckpt.arrays_differ(step, target):
      fields = ", ".join(f"config.{key}" for key, _, _ in changes)
      orbax_said = run_errors.first_line(error, with_type=False)
      raise ConfigError(
          f"checkpoint {step} in {ckpt.directory} cannot be resumed with the changed "
          f"settings ({fields}): one of them changes the arrays of the training state (model "
          f"size, optimizer.name, method parts) that the checkpoint holds (Orbax: "
          f"{orbax_said}). Give the new settings another --workdir, or resume without "
          "them.") from error
  raise error
