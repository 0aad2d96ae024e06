"""Orbax checkpoints: train state + rng + data-iterator state in one step directory.

Saves are asynchronous (training continues while the write finishes), atomic (Orbax writes to a
temporary directory `<step>.orbax-checkpoint-tmp*` and renames it when every item is written,
so a half-written step is never chosen on restore, and leftover temporary directories are
deleted when the next run opens the folder), and pruned to the newest `keep` steps. A write
that fails (disk full, I/O error) is logged, its temporary directory removed and the save
tried again at the next interval; `max_consecutive_failures` failures in a row stop the run.

A step folder can still be damaged after it was committed: files deleted or cut short (a full
disk, a crashed file server, a copy of the workdir that stopped halfway, a hand-made cleanup).
On resume, training/restore.py tries the steps newest first. A step is damaged when its
files say so: `missing_parts` before a restore (no `state` item; no data-iterator position, or
this process's missing or unreadable), `damage` after one failed (state/_METADATA missing or
unreadable, or, where the saved arrays are those the run builds, the restore's error is
TensorStore's or Orbax's word for a missing, cut-short or undecodable file). A damaged step is
skipped with a one-line WARNING and the previous one tried; once one restores, the damaged
newer ones are moved aside to `<step>.damaged` (`set_aside`): kept, never deleted, and never
chosen again, as Orbax lists, prunes and cleans up only folders named by the step number alone.
The data iterator's position lives in the step folder, so it is always the restored step's. Any
other failure (a config whose arrays differ from the checkpoint's, a storage that refuses a
read) is not damage: it is raised and nothing is moved. When no step restores,
CheckpointRestoreError (exit 2) names every step tried and why, and nothing is moved. The
processes of a multi-process run share the folder and take each decision together (`agree`);
process 0 moves the folders.

Nothing here unpickles: Orbax stores arrays with TensorStore and metadata as JSON, the data
iterator's position is JSON, and model.json is JSON, so a checkpoint or encoder directory from
elsewhere cannot run code when it is loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mim_jax import data, storage
from mim_jax.config.errors import ConfigError
from mim_jax.training import orbax_noise
from mim_jax.training.run_errors import (
  CheckpointRestoreError,
  CheckpointSaveError,
  first_line,
)

log = logging.getLogger(__name__)

TMP_SUFFIX = ".orbax-checkpoint-tmp"
# A damaged step folder moved aside: `<step>.damaged` (then .damaged-2, ...). Orbax lists,
# prunes and cleans up only names matching its step pattern (digits, or its temporary suffix),
# so these are never restored, deleted or written over.
DAMAGED_SUFFIX = ".damaged"

# What restoring one step came to on one process; `agree` makes it the same on all.
RESTORED, DAMAGED, FAILED = 0, 1, 2

# TensorStore's status codes for stored bytes that are missing, cut short or cannot be decoded
# (Orbax's array reads raise its errors as "<CODE>: Error reading ..."). Only read as damage
# where the saved arrays are those the restore asked for: a shape or dtype that differs can
# fail an open with FAILED_PRECONDITION too.
_DAMAGE_STATUS = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION")


class WorkdirNotWritableError(OSError):
  """The workdir (or its checkpoint folder) cannot be created or written, or has no room."""


def ensure_writable(directory: str) -> None:
  """Creates `directory` and proves a file can be written there, before training starts.

  The probe is flushed to the device (fsync), so a full disk fails here (ENOSPC) and not at
  the first checkpoint. For a URL (gs://) the probe is an object written and deleted: a
  missing bucket or permission fails here.
  """
  probe = os.path.join(directory, f".write_probe_{uuid.uuid4().hex}")
  if storage.is_url(directory):
    try:
      storage.write_text(probe, "ok")
      storage.remove(probe)
    except Exception as e:  # pylint: disable=broad-except  # each backend raises its own
      raise WorkdirNotWritableError(
          f"cannot write to {directory!r} ({type(e).__name__}: {e}); checkpoints and logs go "
          "there, so pass a --workdir in a bucket this machine may write to") from e
    return
  try:
    os.makedirs(directory, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    try:
      os.remove(probe)
    except OSError:
      pass  # never created, or the directory refuses even that
    raise WorkdirNotWritableError(
        f"cannot write to {directory!r} ({e.strerror or e}); checkpoints and logs go there, so "
        "pass a writable --workdir with free space") from e


def tree_bytes(tree: Any) -> int:
  """Bytes of all array leaves of `tree` (arrays or jax.ShapeDtypeStruct), all shards together."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree)
             if hasattr(x, "dtype") and hasattr(x, "size"))


def ensure_free_space(directory: str, checkpoint_bytes: int, keep: int) -> None:
  """Fails before training if `directory` cannot hold one checkpoint of `checkpoint_bytes`.

  Warns when it cannot hold `keep` + 1 of them (the kept ones plus the one being written): the
  run would then stop with a failed save later, not now. A URL (a bucket) has no such limit.
  """
  if storage.is_url(directory):
    return
  free = shutil.disk_usage(directory).free
  if free < checkpoint_bytes:
    raise WorkdirNotWritableError(
        f"{directory!r} has {_size(free)} free but one checkpoint needs about "
        f"{_size(checkpoint_bytes)}; free some space or pass another --workdir")
  if free < (keep + 1) * checkpoint_bytes:
    log.warning("%s has %s free: room for fewer than keep_checkpoints + 1 = %d checkpoints of "
                "about %s; saves will fail once it is full", directory, _size(free), keep + 1,
                _size(checkpoint_bytes))


def _size(num_bytes: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if num_bytes < 1024 or unit == "GiB":
      return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  return ""


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the items mim_jax saves together, which
  survives failed writes: each is logged and retried at the next interval, and
  `max_consecutive_failures` failures in a row raise CheckpointSaveError."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
               max_consecutive_failures: int = 3):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        # A save that falls due while the previous one is still writing waits for it instead
        # of being skipped: no interval ever goes without a checkpoint.
        enable_should_save_is_saving_in_progress_check=False)
    self.directory = storage.absolute(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    orbax_noise.start()  # a failed write or read is one line of ours, until close()
    self.max_consecutive_failures = max_consecutive_failures
    self.consecutive_failures = 0
    self._in_flight: int | None = None  # step of the asynchronous save not yet confirmed
    self._failed_step: int | None = None  # the latest save attempt, if it failed
    self._abandoned = False  # a peer process is gone: close() must not wait on the save

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first."""
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def missing_parts(self, step: int) -> str | None:
    """What checkpoint `step` lacks that every restore reads, or None; checked before a
    restore, from the folder listing and the data positions (small JSON files) only.

    No `state` item (an emptied folder); no data-iterator position at all, or this process's
    missing among those of its process count, or unreadable: such a step would resume with
    another step's data order, or none (`has_iterator_state` takes a folder without this
    process's file for one written by another number of processes)."""
    step_dir = self.step_dir(step)
    if not storage.isdir(os.path.join(step_dir, "state")):
      names = storage.listdir(step_dir) if storage.isdir(step_dir) else []
      return "the folder is empty" if not names else (
          f"it has no state/ folder (the training state), only {', '.join(sorted(names))}")
    data_dir = os.path.join(step_dir, "data")
    names = storage.listdir(data_dir) if storage.isdir(data_dir) else []
    positions = [n for n in names if re.fullmatch(r"process_\d+-of-\d+\.json", n)]
    if not positions:
      return "it has no data-iterator position (data/process_*.json)"
    mine = self._iterator_file(step)
    name = os.path.basename(mine)
    if storage.exists(mine):
      try:
        json.loads(storage.read_text(mine))
      except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"data/{name} (the data-iterator position) is unreadable ({first_line(e)})"
    elif any(n.endswith(f"-of-{jax.process_count()}.json") for n in positions):
      return f"data/{name} (this process's data-iterator position) is missing"
    return None

  def damage(self, step: int, error: Exception, target: Any) -> str | None:
    """Why checkpoint `step` is damaged, given that restoring it onto `target` raised
    `error`; None when its files are not shown to be (then `error` has another cause: a
    config whose arrays differ from the checkpoint's, a storage that refused, a bug).

    Damaged: state/_METADATA (the state's tree and arrays) is missing or unreadable, or
    `error` comes from a missing, cut-short or undecodable file (TensorStore's status,
    FileNotFoundError, a JSON file cut short) while the saved arrays are `target`'s, or
    cannot be read either. Reads JSON only."""
    metadata = os.path.join(self.step_dir(step), "state", "_METADATA")
    if not storage.exists(metadata):
      return "state/_METADATA (the training state's tree and arrays) is missing"
    try:
      json.loads(storage.read_text(metadata))
    except (OSError, UnicodeDecodeError, ValueError) as e:
      return f"state/_METADATA is unreadable ({first_line(e)})"
    if self.arrays_differ(step, target):
      return None  # a true structure mismatch: not the files' fault
    return _read_damage(error)

  def arrays_differ(self, step: int, target: Any) -> bool:
    """Whether checkpoint `step`'s metadata readably holds other arrays (shapes, dtypes) than
    `target`: a structure mismatch (False when the metadata cannot be read to tell)."""
    saved = self.saved_arrays(step)
    return saved is not None and saved != arrays_of(target)

  def set_aside(self, steps: list[int]) -> dict[int, str]:
    """Moves the folders of damaged `steps` to `<step>.damaged` (a free name), where nothing
    reads, prunes or deletes them, and makes the manager forget them: its latest step (the
    next save's interval) is the restored one again. {step: new path} on process 0, which
    moves them (the folder is shared), {} on the others; every process must call it
    (a barrier), after all agreed on `steps` (`agree`). Raises CheckpointRestoreError (exit 2)
    when a move fails: a damaged folder left in place would be overwritten by the next save of
    its step."""
    moved, failure = {}, None
    if jax.process_index() == 0:
      for step in steps:
        target = self.step_dir(step) + DAMAGED_SUFFIX
        n = 1
        while storage.exists(target):
          n += 1
          target = f"{self.step_dir(step)}{DAMAGED_SUFFIX}-{n}"
        try:
          storage.rename(self.step_dir(step), target)
        except Exception as e:  # pylint: disable=broad-except  # each backend raises its own
          failure = CheckpointRestoreError(
              f"could not move the damaged checkpoint folder {self.step_dir(step)} aside to "
              f"{target} ({first_line(e)}); move or delete it, then run the same command again")
          break
        moved[step] = target
    if agree(FAILED if failure else RESTORED)[0] == FAILED:
      raise failure or CheckpointRestoreError(
          f"process 0 could not move a damaged checkpoint folder in {self.directory} aside (see "
          "its log); move or delete it, then run the same command again")
    self.manager.reload()
    return moved

  def should_save(self, step: int) -> bool:
    """Whether `step` is on the save interval (or a multi-host preemption sync point)."""
    return self.manager.should_save(step)

  def save(self, step: int, state: Any, data_iterator, *, force: bool = False,
           evaluations_pending: bool = False) -> bool:
    """Starts an asynchronous save if `step` is on the interval (or `force`).

    `evaluations_pending`: the evaluations (and pictures) due at `step` have not run, because
    a preemption notice came first; stored in the step's metadata, so that the run that
    resumes from it runs them (`evaluations_pending(step)`).

    Waits for the previous save first: if that one failed, or this one cannot start, the
    failure is logged and counted and training goes on (the next interval tries again);
    the `max_consecutive_failures`-th failure in a row raises CheckpointSaveError. Returns
    whether a save was started.
    """
    if not force and not self.manager.should_save(step):
      return False
    self._confirm_in_flight()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=data.iterator_save_args(data_iterator))
    metadata = {"evaluations_pending": True} if evaluations_pending else None
    try:
      started = self.manager.save(step, args=args, force=force, custom_metadata=metadata)
    except (TypeError, AttributeError):
      # A state or iterator position that cannot be saved is a bug to see now, not a storage
      # failure to retry for max_consecutive_failed_saves intervals without checkpoints.
      raise
    except Exception as e:  # pylint: disable=broad-except  # any I/O error of any backend
      self._record_failure(step, e)
      return False
    if started:
      self._in_flight = step
    return started

  def evaluations_pending(self, step: int) -> bool:
    """Whether checkpoint `step` was saved before the evaluations due at its step ran (see
    `save`). A checkpoint without the flag (any regular save, or one written before the flag
    existed) had them run before it was written."""
    pending = False
    try:
      metadata = self.manager.metadata(step).custom_metadata or {}
      pending = bool(metadata.get("evaluations_pending", False))
    except Exception as e:  # pylint: disable=broad-except  # any backend's read error
      log.warning("could not read the metadata of checkpoint %d (%s: %s): evaluations due at "
                  "its step are taken as done", step, type(e).__name__, e)
    if jax.process_count() > 1:
      # Process 0's answer for all: processes that disagreed would not all enter the
      # collective evaluations.
      pending = bool(multihost_utils.broadcast_one_to_all(np.int32(pending)))
    return pending

  def has_iterator_state(self, step: int) -> bool:
    """Whether checkpoint `step` holds this process's data-iterator position: not when it was
    written by a different number of processes (one position file per process)."""
    return storage.exists(self._iterator_file(step))

  def iterator_position(self, step: int) -> str:
    """This process's saved data-iterator position in checkpoint `step` (JSON text)."""
    return storage.read_text(self._iterator_file(step))

  def _iterator_file(self, step: int) -> str:
    """Grain's handler writes one position file per process under the "data" item."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return os.path.join(self.directory, str(step), "data", name)

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores the state onto `abstract_state`'s shardings and rewinds `data_iterator`.

    The shardings may differ from those the checkpoint was written with (another mesh shape,
    device count or process count): Orbax reads each device's part of every array. Without
    `data_iterator` only the state is read.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = data.iterator_restore_args(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items)).state

  def saved_arrays(self, step: int) -> list[tuple[tuple[int, ...], str]] | None:
    """(shape, dtype) of every array of checkpoint `step`'s state, sorted, from its metadata
    (nothing is read but the JSON); None when the metadata cannot be read (Orbax then logs
    that it failed and gives no tree, which is not a state without arrays)."""
    try:
      tree = saved_tree(os.path.join(self.directory, str(step), "state"))
      return arrays_of(jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape"))) or None
    except Exception:  # pylint: disable=broad-except  # only used to word an error
      return None

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises CheckpointSaveError if the latest
    save attempt failed.

    For the saves a run ends with (the last step, a preemption), which have no next interval.
    """
    self._confirm_in_flight()
    if self._failed_step is not None:
      raise CheckpointSaveError(
          f"the checkpoint for step {self._failed_step} could not be written to "
          f"{self.directory} (see the error above); the latest complete checkpoint is step "
          f"{self.latest_step()}. Fix the storage and run the same command to resume.")

  def close(self) -> None:
    """Waits for the save in flight (a failure is only logged) and releases the manager;
    after `abandon()`, returns at once."""
    if self._abandoned:
      orbax_noise.stop()
      return
    try:
      self._confirm_in_flight(count=False)
      self.manager.close()
    finally:
      orbax_noise.stop()

  def abandon(self) -> None:
    """For a multi-process run that lost a process: `close()` will not wait for the save in
    flight. That save ends with a barrier across all processes, which the dead one never
    reaches; waiting would hang until JAX's coordination service aborts this process (SIGABRT
    after its heartbeat timeout) instead of exiting with a clear message. The unfinished save
    is a temporary directory that the next start removes; the latest complete checkpoint is
    untouched."""
    self._abandoned = True

  def _confirm_in_flight(self, count: bool = True) -> bool:
    """Waits for the asynchronous save in flight; False if it failed (logged, and counted
    unless not `count`)."""
    step, self._in_flight = self._in_flight, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      if count:
        self._record_failure(step, e)
      else:
        log.error("checkpoint for step %s failed: %s", step, e)
      return False
    if step is not None:
      self.consecutive_failures = 0
      self._failed_step = None
    return True

  def _record_failure(self, step: int | None, error: Exception) -> None:
    self.consecutive_failures += 1
    self._failed_step = step
    self._remove_partial(step)
    latest = self.latest_step()
    log.error("checkpoint for step %s could not be written (%s: %s); the latest complete "
              "checkpoint is step %s. Failure %d of at most %d in a row: the next save interval "
              "tries again", step, type(error).__name__, error, latest,
              self.consecutive_failures, self.max_consecutive_failures)
    if self.consecutive_failures >= self.max_consecutive_failures:
      raise CheckpointSaveError(
          f"{self.consecutive_failures} checkpoint saves in a row failed (the last for step "
          f"{step}: {type(error).__name__}: {error}); stopping instead of training on without "
          f"checkpoints. The latest complete checkpoint in {self.directory} is step {latest}: "
          "fix the storage (free space, permissions) and run the same command to resume. "
          "config.max_consecutive_failed_saves sets how many failures are tolerated.") from error

  def _remove_partial(self, step: int | None) -> None:
    """Deletes the temporary directory a failed save left (Orbax would at the next start)."""
    if step is None or jax.process_index() != 0:
      return
    for path in storage.glob(os.path.join(self.directory, f"{step}{TMP_SUFFIX}*")):
      storage.rmtree(path)


def arrays_of(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  """(shape, dtype) of every array of `tree` (arrays or jax.ShapeDtypeStruct), sorted: what
  `Checkpointer.saved_arrays` reads from a checkpoint's metadata."""
  return sorted((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(tree))


def agree(outcome: int) -> tuple[int, int]:
  """(the worst of every process's `outcome` (RESTORED < DAMAGED < FAILED), the first process
  with it). Every process of a run must call it at the same point: one all-gather of an int.

  The checkpoint folder is shared, so the processes read the same files and mostly come to
  the same outcome; where they do not (a process that read only undamaged shards), they act
  on the worst: a step damaged for one is damaged for all. One limit: Orbax's restore ends
  with a barrier across processes, so a process whose restore succeeded while another's
  failed waits there until Orbax's barrier times out, and then fails (FAILED) too."""
  if jax.process_count() == 1:
    return outcome, 0
  outcomes = np.asarray(multihost_utils.process_allgather(np.int32(outcome))).reshape(-1)
  worst = int(outcomes.max())
  return worst, int(np.argmax(outcomes == worst))


def _read_damage(error: BaseException) -> str | None:
  """The line of `error` or its causes that says a file of the checkpoint is missing, cut
  short or undecodable, or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    line = first_line(error, with_type=False)
    if isinstance(error, FileNotFoundError) or line.split(":", 1)[0] in _DAMAGE_STATUS:
      return line
    if isinstance(error, json.JSONDecodeError):
      return f"a JSON file is cut short or corrupt ({line})"
    error = error.__cause__  # explicit chains only: not an error met while handling another
  return None


def export_encoder(directory: str, encoder_params: Any, model_info: dict) -> str:
  """Writes encoder-only parameters (Orbax) plus a JSON description for downstream use.

  Layout: `directory/params` (an Orbax StandardCheckpoint) and `directory/model.json`.
  In a multi-process run every process calls it (the Orbax save is collective) with the same
  host values; process 0 writes model.json.
  """
  directory = storage.absolute(directory)
  storage.makedirs(directory)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(directory, "params"), encoder_params, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    storage.write_text(os.path.join(directory, "model.json"), json.dumps(model_info, indent=2))
  return directory


def restore_on_host(path: str) -> Any:
  """A pytree that Orbax saved at `path` (a StandardCheckpointer item: a training state, an
  export) as numpy arrays on the host, whatever devices wrote it. Restoring without a target
  would place each array on the devices named in the checkpoint's sharding metadata, and fails
  in a process with other devices (a run on 8 GPUs, or on 2 CPU devices, read on 1)."""
  checkpointer = ocp.StandardCheckpointer()
  path = storage.absolute(path)
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), saved_tree(path),
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  with _quiet_item_metadata():
    return checkpointer.restore(path, target)


def saved_tree(path: str) -> Any:
  """The tree of what Orbax saved at `path`, each array's metadata (shape, dtype) in its place:
  only JSON is read."""
  with _quiet_item_metadata():
    metadata = ocp.StandardCheckpointer().metadata(storage.absolute(path))
  return getattr(metadata, "item_metadata", metadata)  # newer Orbax wraps the tree


@contextlib.contextmanager
def _quiet_item_metadata():
  """A training step's `state` item keeps its _CHECKPOINT_METADATA one level up, in the step's
  folder (CheckpointManager's layout); Orbax warns that the item has none, but the item is
  complete: that warning alone is dropped (an export's params folder has its own)."""
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_no_missing_item_metadata_warning)
  try:
    yield
  finally:
    absl_logger.removeFilter(_no_missing_item_metadata_warning)


def _no_missing_item_metadata_warning(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("Metadata file does not exist")


def load_encoder(directory: str) -> tuple[Any, dict]:
  """Reads what `export_encoder` wrote: (encoder params as numpy arrays, model info). A
  ConfigError naming `directory` (`unusable_export`) when it cannot be read."""
  directory = storage.absolute(directory)
  info = read_export_info(directory)
  try:
    return restore_on_host(os.path.join(directory, "params")), info
  except FileNotFoundError as e:  # Orbax's word for a params/ folder missing or cut short
    raise unusable_export(directory, "its params/ folder (the weights) is missing or "
                          f"incomplete ({first_line(e)})") from e


def read_export_info(directory: str) -> dict:
  """The model.json of export `directory`; a ConfigError naming it when the file cannot be
  read or lacks what every export writes (the encoder's image size, channels and config), so
  that a cut-short file or another program's folder is not a KeyError deep in a run."""
  try:
    info = json.loads(storage.read_text(os.path.join(directory, "model.json")))
  except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
    raise unusable_export(directory, f"its model.json is unreadable ({first_line(e)})") from e
  config = info.get("config") if isinstance(info, dict) else None
  model = config.get("model") if isinstance(config, dict) else None
  missing = [key for key in ("image_size", "channels") if not isinstance(info, dict)
             or key not in info]
  if not isinstance(model, dict) or "variant" not in model:
    missing.append("config.model.variant")
  if missing:
    raise unusable_export(directory, f"its model.json lacks {', '.join(missing)}")
  return info


def unusable_export(directory: str, problem: str) -> ConfigError:
  """The error for an encoder export (`export_encoder`'s layout) that cannot be loaded: a
  one-line message (exit 2 from the command line), not a traceback."""
  return ConfigError(
      f"the encoder export {directory} cannot be loaded: {problem}. Export it again with this "
      "mim_jax (run the command that wrote it: a finished run rewrites its export), or point "
      "to another export")
