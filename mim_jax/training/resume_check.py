"""Refuses to resume a run under a config that would train something else.

A workdir with checkpoints is resumed, not started: its weights, optimizer state and data
position come from the checkpoint, and `init_from`, the schedule, the model and the method's
settings were fixed when the run started. Resuming it with another value for one of those
would silently keep the old one (e.g. a probe rerun with another `init_from` scores the first
encoder again, and results.json would name the second), or would change the run halfway
(another lr or number of epochs). So the config is compared with the `config.json` the run
wrote at step 0, and a difference in any field outside `CHANGEABLE_ON_RESUME` is an error
before anything is restored.

Fields missing on either side are not compared: a field added by a newer mim_jax has its
default, which is what the run used before the field existed. A field whose config file may
set another value than that (`VALUE_BEFORE_FIELD`) is compared with the value the run used.

A change on purpose (a lower lr or gradient clipping after a divergence, a recipe whose
defaults moved) resumes with `allow_changes` (`python -m mim_jax.main ...
--resume_with_changes`): the differences are logged, appended to the workdir's
config_changes.jsonl with the step they start at, and config.json then holds the new config,
which later resumes are compared with. A workdir with checkpoints whose config.json is missing
or unreadable resumes only with `allow_changes` too (unchecked: there is nothing to compare
with), and config.json is then written from the new config.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from mim_jax import storage
from mim_jax.config.errors import RENAMED_FIELDS, ConfigError
from mim_jax.training import metric_writers

log = logging.getLogger(__name__)

# One JSON line per resume with changed settings: {"step": ..., "changes": {field: {was, now}}}.
CHANGES_FILE = "config_changes.jsonl"

# Fields that may differ when a run is resumed: they decide where and how the same training
# runs (machine, devices, memory, logging, checkpoint cadence, where it stops, what is
# monitored on the side), not what it learns. Dotted prefixes: "data.path" covers it alone.
CHANGEABLE_ON_RESUME = (
    # Where to stop: the schedule comes from num_epochs; total_steps only ends it earlier.
    "total_steps",
    # Machine and memory: the same global batch and recipe. Not bit-exact against an
    # uninterrupted run: micro-batches draw their own randomness (grad_accum_steps), and a
    # shard_map step's depends on the device index (mesh).
    "mesh", "sharding_rules", "parallel.step", "grad_accum_steps", "compiler_options",
    "model.remat", "model.attention_impl", "nonfinite_guard",
    # Files that move with the machine, and how the host reads them (not data.num_workers:
    # the saved data position is per worker, docs/reliability.md). data.on_bad_image: a run
    # stopped by a corrupt file under "raise" resumes with "skip", as BadImageError advises
    # (the position counts images before bad rows are dropped; a device-resident split loaded
    # under "raise" has no bad rows to drop).
    "data.path", "data.eval_path", "data.tfds_data_dir", "data.prefetch_buffer_size",
    "data.on_bad_image",
    # Logging, pictures, checkpoints, failure limits.
    "log_every", "viz_every", "viz_num_images", "viz_channels", "checkpoint_every",
    "keep_checkpoints", "max_consecutive_nonfinite", "max_consecutive_failed_saves",
    "export_encoder",
    # Evaluations on the side, which never feed back into training.
    "eval.every_epochs", "eval.batch_size", "knn.every_epochs", "knn.k", "knn.temperature",
)


# Fields that no resume may change, not even with `allow_changes`, with why: the checkpoint's
# data position is saved per worker process (docs/reliability.md), and grain cannot restore it
# into another number of workers; it counts batches of the run's size, so under another batch
# it would point at other examples (part of an epoch skipped or seen twice) while the step
# counter's epochs and schedule changed meaning.
FIXED_ON_RESUME = {
    "data.num_workers": "its checkpoints hold the data position of each worker process, which "
                        "no other number of workers can take up",
    "global_batch_size": "its checkpoints hold the data position and the schedule's step in "
                         "batches of that size, which under another batch would skip or repeat "
                         "examples (a machine with fewer devices keeps the batch with "
                         "--config.grad_accum_steps)",
}

# Fields read only when the weights are first made (initial values): a resume restores the
# weights, so another value would change nothing, with or without `allow_changes`.
READ_AT_INIT = ("classifier.head_init_std", "classifier.reuse_head", "model.layer_scale",
                "model.weight_init")

# Fields added after runs had started, with the value those runs used implicitly, for fields
# a config file may set otherwise (configs/maskfeat_vitb.py asks MaskFeat's own HOG bins, the
# ImageNet fine-tuning recipe RandAugment and random erasing, configs/vqkd_tokenizer_imagenet.py
# BEiT v2's codebook; the earlier runs binned as scikit-image does, augmented without them,
# updated VQ-VAE's way from random codes and left short blockwise masks short). Compared only
# where the run's config.json has the field's parent block.
VALUE_BEFORE_FIELD = {"target.hog.binning": "skimage", "data.rand_augment": "",
                      "data.random_erasing": 0.0, "model.weight_init": "xavier",
                      "tokenizer.codebook_update": "ema_sums", "tokenizer.kmeans_init": 0,
                      "masking.exact_count": False}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"data.path": ..., "seed": ...}: the leaves of nested dicts by dotted path."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}.{key}" if prefix else key
    if isinstance(value, dict):
      out.update(_flatten(value, path))
    else:
      out[path] = value
  return out


def _changeable(key: str) -> bool:
  return any(key == field or key.startswith(field + ".") for field in CHANGEABLE_ON_RESUME)


def changed_fields(saved: dict, config: dict) -> list[tuple[str, Any, Any]]:
  """(field, saved value, new value) for every compared field that differs, sorted by field.

  Both are plain JSON-like dicts (config.json's, and the config as `write_hparams` writes it).
  """
  old, new = _flatten(saved), _flatten(config)
  # A field renamed since the run started is compared under its new name (else it would be
  # missing on one side, not compared).
  for key, renamed in RENAMED_FIELDS.items():
    if key in old and renamed.name not in old:
      value = old.pop(key)
      try:
        old[renamed.name] = renamed.value(value)
      except TypeError:  # not a value the old field could hold: compared as it is
        old[renamed.name] = value
  for key, before in VALUE_BEFORE_FIELD.items():
    parent = key.rsplit(".", 1)[0] + "."
    if key not in old and key in new and any(k.startswith(parent) for k in old):
      old[key] = before
  return sorted((key, old[key], new[key]) for key in old.keys() & new.keys()
                if old[key] != new[key] and not _changeable(key))


def check_same_run(workdir: str, config, *, weight_fields: tuple[str, ...],
                   allow_changes: bool = False) -> list:
  """The changes to record (`record_changes`) once the run has resumed: [] when `config`
  matches the run's saved config.json in every field that cannot change on resume. Raises
  ConfigError for a difference unless `allow_changes`, which logs them instead. Call it only
  when `workdir` holds a checkpoint to resume. A config.json that is missing or unreadable
  (deleted, cut short) leaves nothing to compare with: a ConfigError naming it, unless
  `allow_changes`, which resumes unchecked (and `record_changes` writes it again).

  `weight_fields` (the method's `Method.weight_fields`) name the weights the run read when it
  started and keeps in its checkpoints: a resume restores those arrays whatever the path says
  now, so another path resumes only with `allow_changes`, taken as the same weights moved (a
  new machine, a bucket mounted elsewhere); other weights need another workdir."""
  saved, problem = _read_saved(workdir)
  if saved is None:
    path = os.path.join(workdir, metric_writers.CONFIG_FILE)
    if not allow_changes:
      raise ConfigError(
          f"{path} {problem}, but {workdir} holds checkpoints to resume: without the config "
          "the run started with, this config cannot be checked against it. Restore config.json "
          "(e.g. from a copy of the workdir), or resume with this config on purpose: "
          "--resume_with_changes (config.json is then written from it).")
    log.warning("%s %s: resuming %s with this config unchecked (--resume_with_changes); "
                "config.json is written from it once the checkpoint is restored", path,
                problem, workdir)
    return []
  changes = changed_fields(saved, json.loads(metric_writers.config_text(config.to_dict())))
  if not changes:
    return []
  lines = "\n".join(f"  config.{key}: {old!r} in this run, {new!r} now"
                    for key, old, new in changes)
  fixed = [(key, old, new) for key, old, new in changes if key in FIXED_ON_RESUME]
  if fixed:
    key, old, new = fixed[0]
    raise ConfigError(
        f"{workdir} holds a run to resume, started with config.{key}={old!r} ({new!r} now): "
        f"{FIXED_ON_RESUME[key]}, so it resumes only with {key}={old!r} (also with "
        "--resume_with_changes). Give the new setting another --workdir.")
  # layer_scale 0 means no scale parameters: to or from 0 the state's arrays change, which
  # the restore reports; between non-zero values only the (restored) initial value does.
  at_init = [(key, old, new) for key, old, new in changes if key in READ_AT_INIT
             and not (key == "model.layer_scale" and 0 in (old, new))]
  if at_init:
    key, old, new = at_init[0]
    raise ConfigError(
        f"{workdir} holds a run to resume, started with config.{key}={old!r} ({new!r} now): "
        f"{key} sets initial weights only, and a resume restores the weights from the "
        f"checkpoint, so the new value would change nothing (also with --resume_with_changes). "
        f"Resume it as it started with --config.{key}={old!r}, or give the new setting another "
        "--workdir.")
  moved = [key for key, _, _ in changes if key in weight_fields]
  if not allow_changes:
    weights = (f" {', '.join(moved)}: the weights were read when the run started and are "
               "restored from its checkpoints, so with --resume_with_changes the new path is "
               "taken as the same weights moved elsewhere (not read again); other weights need "
               "another --workdir." if moved else "")
    raise ConfigError(
        f"{workdir} holds a run to resume, started with other settings:\n{lines}\n"
        "Resuming keeps the run's weights, optimizer state and schedule, so these values would "
        "be ignored or change the run halfway. Run the command that started it, give the new "
        "settings another --workdir, or resume with them on purpose: --resume_with_changes "
        "(not for settings that change the arrays of the training state, such as the model's "
        f"size or optimizer.name).{weights}")
  log.warning("resuming %s with changed settings (--resume_with_changes):\n%s", workdir, lines)
  for key in moved:
    log.warning("config.%s changed on resume: the run keeps the weights its checkpoint holds "
                "(read from the old path when it started); the new path is recorded as where "
                "the same weights lie now, not read into the run", key)
  return changes


def _read_saved(workdir: str) -> tuple[dict | None, str]:
  """(the run's saved config, "") or (None, what is wrong with its config.json)."""
  path = os.path.join(workdir, metric_writers.CONFIG_FILE)
  if not storage.exists(path):
    return None, "is missing"
  try:
    saved = json.loads(storage.read_text(path))
  except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
    first_line = (str(e).splitlines() or [""])[0][:200]
    return None, f"is unreadable ({type(e).__name__}: {first_line})"
  if not isinstance(saved, dict):
    return None, f"is unreadable (a JSON {type(saved).__name__}, not an object)"
  return saved, ""


def record_changes(workdir: str, config, step: int, changes: list) -> None:
  """After a resume at `step` with `changes` (from `check_same_run`): appends them to
  config_changes.jsonl and makes config.json the new config, which later resumes compare with.
  A config.json that was missing or unreadable (a resume `check_same_run` allowed unchecked) is
  written again, and the entry says so; otherwise, without changes, nothing is written. Only
  once the checkpoint has been restored, so a resume that fails records nothing."""
  _, problem = _read_saved(workdir)
  if not changes and not problem:
    return
  entry = {"step": step, "changes": {key: {"was": old, "now": new}
                                     for key, old, new in changes}}
  if problem:
    entry["unchecked"] = (f"{metric_writers.CONFIG_FILE} {problem}: written from the resumed "
                          "config, which nothing was compared with")
  log_path = os.path.join(workdir, CHANGES_FILE)
  previous = storage.read_text(log_path) if storage.exists(log_path) else ""
  storage.write_text(log_path, previous + json.dumps(entry) + "\n")
  storage.write_text(os.path.join(workdir, metric_writers.CONFIG_FILE),
                     metric_writers.config_text(config.to_dict()) + "\n")
