"""Saving the data iterator inside an Orbax `CheckpointManager` composite checkpoint.

Grain registers `CheckpointSave` / `CheckpointRestore` with its `CheckpointHandler` when Orbax
is importable, so a manager needs no extra setup:

  manager.save(step, args=ocp.args.Composite(state=..., data=iterator_save_args(it)))
  manager.restore(step, args=ocp.args.Composite(state=..., data=iterator_restore_args(it)))

The handler writes one JSON file per process (`process_<i>-of-<n>.json`, indices from JAX)
holding `it.get_state()`, and restoring calls `it.set_state(...)` on the given iterator in
place. Managers built with explicit `item_handlers` register `ITERATOR_HANDLER` under the
item name instead (e.g. `item_handlers={"data": ITERATOR_HANDLER()}`).
"""

from __future__ import annotations

import grain

ITERATOR_HANDLER = grain.checkpoint.CheckpointHandler
ITERATOR_HANDLER_NAME = ITERATOR_HANDLER.typestr()  # "grain._src.python.checkpoint.handler..."


def iterator_save_args(iterator: grain.DatasetIterator):
  """Orbax args that save `iterator`'s position (a `grain.checkpoint.CheckpointSave`)."""
  return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
  """Orbax args that rewind `iterator` to the saved position (`CheckpointRestore`)."""
  return grain.checkpoint.CheckpointRestore(iterator)
