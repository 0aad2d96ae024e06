"""Orbax checkpoints: train state + rng + data-iterator state in one step directory.

Saves are asynchronous (training continues while the write finishes), atomic (Orbax writes to a
temporary directory and renames it, so a half-written step is never chosen on restore), and
pruned to the newest `keep` steps.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import jax
import orbax.checkpoint as ocp

from mim_jax import data


class WorkdirNotWritableError(OSError):
  """The workdir (or its checkpoint folder) cannot be created or written."""


def ensure_writable(directory: str) -> None:
  """Creates `directory` and proves a file can be written there, before training starts."""
  probe = os.path.join(directory, f".write_probe_{uuid.uuid4().hex}")
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirNotWritableError(
        f"cannot write to {directory!r} ({e.strerror or e}); checkpoints and logs go there, so "
        "pass a writable --workdir") from e


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the items mim_jax saves together."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        # A save that falls due while the previous one is still writing waits for it instead
        # of being skipped: no interval ever goes without a checkpoint.
        enable_should_save_is_saving_in_progress_check=False)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator, *, force: bool = False) -> bool:
    """Starts an asynchronous save if `step` is on the interval (or `force`)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=data.iterator_save_args(data_iterator))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
    """Restores the state onto `abstract_state`'s shardings and rewinds `data_iterator`."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=data.iterator_restore_args(data_iterator))
    return self.manager.restore(step, args=args).state

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def export_encoder(directory: str, encoder_params: Any, model_info: dict) -> str:
  """Writes encoder-only parameters (Orbax) plus a JSON description for downstream use.

  Layout: `directory/params` (an Orbax StandardCheckpoint) and `directory/model.json`.
  In a multi-process run every process calls it (the Orbax save is collective) with the same
  host values; process 0 writes model.json.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), encoder_params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, "model.json"), "w") as f:
      json.dump(model_info, f, indent=2)
  return directory


def load_encoder(directory: str) -> tuple[Any, dict]:
  """Reads what `export_encoder` wrote: (encoder params as numpy/jax arrays, model info)."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, "model.json")) as f:
    info = json.load(f)
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
  return params, info
