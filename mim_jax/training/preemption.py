"""Preemption notices (SIGTERM) turned into one agreed step at which every process stops.

Cluster schedulers (SLURM, Kubernetes, Cloud TPU maintenance) send SIGTERM some time before
they kill a job. The training loop asks `PreemptionWatcher.should_stop(step)` after every
step; when it says yes, the loop writes a checkpoint for that step, waits for the write and
stops (run_errors.Preempted: `python -m mim_jax.main` exits 75), so the same command resumes
from it.

  * One process: a Python SIGTERM handler sets a flag; the loop stops after the step in
    progress. Ctrl-C (SIGINT) does the same, once: a second Ctrl-C stops at once, as Python
    does, without a checkpoint (a first one lost every step since the last checkpoint).
  * Several processes: JAX's preemption sync manager (started by `jax.distributed.initialize`)
    catches SIGTERM in any process, tells the others through the coordination service, and
    `multihost_utils.reached_preemption_sync_point(step)` becomes true at the same step in
    every process (the largest step any of them had reached, plus one), so all of them save
    that step together and nobody is left waiting in a collective. Only one process needs to
    receive the signal. No Python handler is installed then: it would replace JAX's.
  * Several processes with the JAX preemption service disabled (jax_enable_preemption_service
    false): each process's flag is combined with the others' by an all-gather every
    `sync_every` steps, at a step boundary every process reaches, so they still stop at the
    same step (at most `sync_every` steps after the signal).
"""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _jax_preemption_service_running(step: int) -> bool:
  """Whether `reached_preemption_sync_point` works (several processes, service enabled).

  Probes with the step the loop starts from, the same in every process: if a notice came
  already, that is the step this process reports, and the agreed step is the next one.
  """
  try:
    multihost_utils.reached_preemption_sync_point(step)
  except RuntimeError:  # not initialised, or disabled by jax_enable_preemption_service
    return False
  return True


class PreemptionWatcher:
  """Context manager: `should_stop(step)` says when every process must save and stop.

  `start_step` is the step the loop resumes from (the same in every process). `sync_every` is
  the step interval at which the processes' flags are all-gathered when JAX's preemption
  service is unavailable in a multi-process run (the loop's logging interval is a good
  choice: it synchronises with the devices there anyway).
  """

  def __init__(self, start_step: int = 0, sync_every: int = 1):
    self.start_step = int(start_step)
    self.sync_every = max(1, int(sync_every))
    self.signalled = False  # this process received SIGTERM (local flag)
    self.stopped_at: int | None = None
    self._previous_handlers: dict[int, object] = {}
    self._use_jax_service = False

  def __enter__(self) -> PreemptionWatcher:
    self._use_jax_service = (jax.process_count() > 1
                             and _jax_preemption_service_running(self.start_step))
    if self._use_jax_service:
      log.info("preemption: SIGTERM is handled by JAX's preemption sync manager")
      return self

    def handler(signum, frame):
      del frame
      if signum == signal.SIGINT:
        # The next Ctrl-C is Python's own again: KeyboardInterrupt, no checkpoint.
        signal.signal(signal.SIGINT, self._previous_handlers.pop(signal.SIGINT))
        log.warning("Ctrl-C: saving a checkpoint at the next step boundary, then stopping "
                    "(Ctrl-C again: stop at once, without it)")
      else:
        log.warning("received signal %d: saving a checkpoint at the next step boundary", signum)
      self.signalled = True
    # SIGINT only where it is Python's Ctrl-C: a background job of a script starts with it
    # ignored (docs/script_args.sh passes its own signals on as SIGTERM).
    ours = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT)
                               is signal.default_int_handler else [])
    for signum in ours:
      try:
        self._previous_handlers[signum] = signal.signal(signum, handler)
      except ValueError:  # not the main thread (e.g. called from a notebook worker)
        break
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous_handlers.items():
      signal.signal(signum, previous)
    self._previous_handlers.clear()

  @property
  def triggered(self) -> bool:
    """Whether the run stopped (or must stop) because of a preemption notice."""
    return self.stopped_at is not None

  def should_stop(self, step: int) -> bool:
    """Call once per step, in every process, after `step` is done: True means save and stop.

    The same answer in every process for the same `step`.
    """
    if self._use_jax_service:
      stop = bool(multihost_utils.reached_preemption_sync_point(step))
    elif jax.process_count() == 1:
      stop = self.signalled
    elif step % self.sync_every == 0:
      flags = multihost_utils.process_allgather(np.asarray(self.signalled, np.int32))
      stop = bool(np.any(flags))
    else:
      stop = False
    if stop:
      self.stopped_at = step
    return stop
