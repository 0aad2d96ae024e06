"""Which config fields a train step reads, for the tools that build the step alone.

The benchmark times train steps on a generated batch and the memory planner compiles one; the
training loop around the step (monitoring, checkpoints, exports, the run's length) and most of
the input pipeline never reach it, so a command-line override of those fields would do
nothing there. `unread_by_step` names them, for the tools to refuse.
"""

from __future__ import annotations

from typing import Iterable

# Settings of the training loop around the step (prefixes of the dotted fields). log_every is
# not one: the step computes its parameter and update norms on logged steps only.
LOOP_FIELDS = ("knn.", "eval.", "viz_", "checkpoint_every", "keep_checkpoints",
               "export_encoder", "max_consecutive_", "total_steps")

# Numbers the step reads as values only (the lr schedule's, Adam's, the seed), and the run's
# length in epochs (the schedule's scale): the step compiled with others has the same shapes,
# memory and speed. The tools that compile or time a step refuse them (`values_only`).
VALUE_FIELDS = ("seed", "num_epochs", "optimizer.base_lr", "optimizer.lr_batch_reference",
                "optimizer.min_lr", "optimizer.warmup_epochs", "optimizer.decay_epochs",
                "optimizer.decay_factor", "optimizer.b1", "optimizer.b2", "optimizer.eps",
                "optimizer.weight_decay_end")

# The input settings a step reads: the augmentation it runs itself and the normalisation it
# applies (data.augment_on=device).
STEP_DATA_FIELDS = ("data.augment_on", "data.mean", "data.std")
# The host pipeline's workers and buffers: never part of the step or of a resident split.
HOST_PIPELINE_FIELDS = ("data.num_workers", "data.prefetch_buffer_size")
# A classifier's dataset: its class count sizes the head.
CLASS_COUNT_FIELDS = tuple("data." + f for f in ("source", "path", "split", "tfds_name",
                                                 "tfds_data_dir", "synthetic_classes"))


def unread_by_step(config, fields: Iterable[str], *, reads_data: bool = False
                   ) -> tuple[list[str], list[str]]:
  """(input fields, loop fields): the dotted `fields` (command-line overrides) that a train
  step of `config` does not read, each sorted.

  reads_data: the tool also checks the run's data as the run would and accounts for
  data.device_resident's copy of the training split (the memory planner), so the data fields
  naming, subsetting or decoding the data act: then only the host pipeline's own fields go
  unread. Without it (the benchmark: steps on a generated batch) every data field but the
  in-step ones does.
  """
  fields = sorted(fields)
  if reads_data:
    data = [f for f in fields if f in HOST_PIPELINE_FIELDS]
  else:
    read = set(STEP_DATA_FIELDS) | (set(CLASS_COUNT_FIELDS) if "classifier" in config else set())
    data = [f for f in fields if f.startswith("data.") and f not in read]
  loop = [f for f in fields if f.startswith(LOOP_FIELDS)]
  return data, loop


def values_only(fields: Iterable[str]) -> list[str]:
  """The dotted `fields` (command-line overrides) in VALUE_FIELDS, sorted."""
  return sorted(f for f in fields if f in VALUE_FIELDS)
