"""Errors that end a training run early, each with the exit code `python -m mim_jax.main` uses.

  0  the run finished
  1  an unexpected error: a bug, reported with Python's traceback
  2  bad input found before training: configuration, command line, workdir (also one whose
     checkpoints are all damaged), data files
  3  training diverged: the loss or gradients were non-finite for too many consecutive steps
  4  checkpoints could not be written for too many consecutive attempts, or the workdir's
     storage filled up (a log or picture could not be written; the command line's message)
  5  a multi-process run lost one of its processes (killed, crashed, preempted without notice):
     the others stop too instead of waiting for it
 75  the run stopped cleanly after a preemption notice (SIGTERM): its checkpoint is written and
     the same command continues it (75 is sysexits' EX_TEMPFAIL, "try again later"; not 0, so
     that a scheduler, a job array or a script never takes a preempted run for a finished one)

A `RunError` carries its own code; main.py maps the start-up errors of other modules to 2.
In every case the checkpoints already written stay intact: a run is resumed from the latest
one by running the same command again.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_CHECKPOINT_FAILED = 4
EXIT_PEER_LOST = 5
EXIT_PREEMPTED = 75


def first_line(error: BaseException, with_type: bool = True, limit: int = 300) -> str:
  """`error`'s first line for a one-line message ("Type: text", or the text alone without
  `with_type`; the type's name when it has no text), without TensorStore's spec dump, at most
  `limit` characters."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  text = text.split(" [tensorstore_spec", 1)[0]
  if with_type or not text:
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


class RunError(RuntimeError):
  """A run stopped on purpose, with a message for the user and a process exit code."""
  exit_code = 1


class NonFiniteError(RunError):
  """The loss or gradients stayed NaN / Inf for `config.max_consecutive_nonfinite` steps."""
  exit_code = EXIT_DIVERGED


class CheckpointSaveError(RunError):
  """Checkpoint writes failed `config.max_consecutive_failed_saves` times in a row, or the
  final / preemption checkpoint could not be written."""
  exit_code = EXIT_CHECKPOINT_FAILED


class CheckpointRestoreError(RunError):
  """No checkpoint of the workdir could be restored: every step folder is damaged (files
  missing, cut short or unreadable). Bad input found before training, like a bad workdir."""
  exit_code = EXIT_BAD_INPUT


class Preempted(RunError):
  """The run saved a checkpoint after a preemption notice (SIGTERM) or a first Ctrl-C and
  stopped before its end.

  Not a failure: `python -m mim_jax.main` prints the message without "error:" and exits
  EXIT_PREEMPTED, and the same command resumes from `step`.
  """
  exit_code = EXIT_PREEMPTED

  def __init__(self, step: int, workdir: str):
    super().__init__(f"stopped after a preemption notice (SIGTERM) or Ctrl-C with the "
                     f"checkpoint of step {step} written in {workdir}: run the same command to "
                     "continue")
    self.step = step
