"""Keeps a failed checkpoint write or read to the one line the Checkpointer logs about it.

When Orbax fails to write a step (a full disk, an I/O error) or to read one (a damaged
folder), the failure reaches the Checkpointer, which logs it in one line ("checkpoint for step
N could not be written (...)") or acts on it (training/restore.py). Around that line Orbax and
TensorStore print the same failure again, hundreds of times over (about 2,000 lines for four
failed saves of the demo model on a full disk): Orbax's own ERROR records with tracebacks,
asyncio's "Task exception was never retrieved" for every array write that failed beside the
first, and TensorStore's callbacks into the event loop that the failure closed ("RuntimeError:
Event loop is closed", through sys.unraisablehook, called from native code: no Python
caller). While a Checkpointer is open, those and only those are dropped:

  with orbax_noise.quiet(): ...     (or start() / stop(), counted: nested users are fine)

The Checkpointer starts it when it opens and stops it when it closes; the program
(`python -m mim_jax.main`) starts it once more for the whole process, since the last of it
arrives at exit (Orbax's unfinished write coroutines, collected as the interpreter shuts
down).

Anything else reaches its hook or handler as before.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading

# Orbax's reports of a failed background save, each with its traceback (absl logging): the
# exception is also kept for the waiter, which is the Checkpointer.
_ORBAX_FAILURE_REPORTS = ("_SignalingThread.run() raised an exception",
                          "Handler Commit operations or the Commit callback in background save",
                          "Save Finalize thread (save_finalize) failed")

_lock = threading.Lock()
_users = 0
_previous_hook = None


def _native_call_into_closed_loop(unraisable) -> bool:
  """TensorStore's echo: "Event loop is closed" raised by asyncio's call_soon_threadsafe
  called from native code (a TensorStore thread finishing a failed write), so that the
  traceback's first frame is call_soon_threadsafe itself; from Python code it starts at the
  caller's frame and is kept."""
  tb = getattr(unraisable, "exc_traceback", None)
  return (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) ==
          "Event loop is closed" and tb is not None and
          tb.tb_frame.f_code.co_name == "call_soon_threadsafe")


def _hook(unraisable) -> None:
  if _native_call_into_closed_loop(unraisable):
    return
  # An Orbax write coroutine that the failure left unfinished, collected at exit.
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None and "orbax" in code.co_filename:
    return
  (_previous_hook or sys.__unraisablehook__)(unraisable)


def _not_orbax_failure_report(record: logging.LogRecord) -> bool:
  if "orbax" not in record.pathname:
    return True
  message = record.getMessage()
  return not any(report in message for report in _ORBAX_FAILURE_REPORTS)


def _not_unretrieved_checkpoint_task(record: logging.LogRecord) -> bool:
  """False for asyncio's report of a task or future that failed unseen ("Task exception was
  never retrieved", "_GatheringFuture exception ..."), when it is a checkpoint's: its repr
  names Orbax's coroutine or its error the checkpoint's files."""
  first, _, rest = record.getMessage().partition("\n")
  return not (first.endswith("exception was never retrieved")
              and any(word in rest for word in ("orbax", "tensorstore", "ocdbt")))


def start() -> None:
  global _users, _previous_hook
  with _lock:
    _users += 1
    if _users > 1:
      return
    _previous_hook, sys.unraisablehook = sys.unraisablehook, _hook
    logging.getLogger("absl").addFilter(_not_orbax_failure_report)
    logging.getLogger("asyncio").addFilter(_not_unretrieved_checkpoint_task)


def stop() -> None:
  global _users, _previous_hook
  with _lock:
    if _users == 0:
      return
    _users -= 1
    if _users:
      return
    if sys.unraisablehook is _hook:  # else someone installed theirs since: leave it
      sys.unraisablehook = _previous_hook
    _previous_hook = None
    logging.getLogger("absl").removeFilter(_not_orbax_failure_report)
    logging.getLogger("asyncio").removeFilter(_not_unretrieved_checkpoint_task)


@contextlib.contextmanager
def quiet():
  start()
  try:
    yield
  finally:
    stop()
