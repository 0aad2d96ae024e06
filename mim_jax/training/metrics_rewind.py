"""Rewinds metrics.jsonl to the checkpoint a run resumes from.

A run that was killed logged steps after its last checkpoint; the resumed run computes those
steps again (identically, see docs/reliability.md) and logs them again. Dropping the old rows
first keeps one row per step, and drops a last line cut short by the crash, which would
otherwise be glued to the first new row.
"""

from __future__ import annotations

import json
import os

from mim_jax import storage
from mim_jax.training.metric_writers import METRICS_FILE

TRAINING_KEY = "learning_rate"  # in every training step's row, in no evaluation's


def rewind_metrics(workdir: str, step: int, drop_evaluations: bool = False) -> int:
  """Keeps the rows of `workdir/metrics.jsonl` with "step" <= `step`; returns how many went.

  With `drop_evaluations` the evaluation rows of `step` itself go too (every row there but the
  training step's, which holds "learning_rate"): for a resume that runs them again. Unparseable
  lines (a torn write) are dropped too. The file is replaced atomically, so a crash during the
  rewind leaves either the old or the new file. No-op without the file.
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not storage.exists(path):
    return 0
  lines = storage.read_text(path).splitlines()

  def keep(line: str) -> bool:
    at = _step_of(line)
    if at is None or at > step:
      return False
    return not (drop_evaluations and at == step and TRAINING_KEY not in json.loads(line))
  kept = [line for line in lines if keep(line)]
  dropped = sum(1 for line in lines if line.strip()) - len(kept)
  if dropped:
    storage.write_text(path, "".join(line + "\n" for line in kept))
  return dropped


def _step_of(line: str) -> int | None:
  """The "step" of a metrics row, or None for a line that is not a complete row."""
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  step = row.get("step") if isinstance(row, dict) else None
  return step if isinstance(step, int) else None
