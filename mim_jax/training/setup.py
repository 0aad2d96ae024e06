"""The one run set-up: mesh, method, optimizer, state shapes and shardings, the jitted step.

`training.loop.run`, `memory_plan.plan` and `bench` all start from `setup_run`, so the step
they train, plan or time is the same function with the same shardings.

  prepare(config) -> config      `~` in paths expanded; an evaluation adopts its encoder from
                                 init_from; validation
  setup_run(config, ...) -> Run  everything but data and checkpoints, from abstract shapes
  Run.jit_step()                 the jitted, sharded, donating train step
  Run.init_state()               the freshly initialised, sharded state
  abstract_batch(run, size)      ShapeDtypeStructs of a training batch (planning, benchmarks)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from mim_jax import data, registry
from mim_jax.config import checks, validation
from mim_jax.config.defaults import override
from mim_jax.config.errors import ConfigError, config_error
from mim_jax.data import device_augment, transforms
from mim_jax.evaluate import classifier_base
from mim_jax.methods.base import Method, TrainLength
from mim_jax.training import compiler_options, optim, parallel, step
from mim_jax.weights import pretrained

log = logging.getLogger(__name__)


# Config fields that hold a local path (besides each method's `weight_fields`).
DATA_PATH_FIELDS = ("data.path", "data.eval_path", "data.tfds_data_dir")


def expand_home(config):
  """`config`, or a copy with a leading `~` in its path fields (DATA_PATH_FIELDS and the
  method's `weight_fields`: init_from, teacher and tokenizer paths) replaced by the home folder.

  The shell expands `~` only at the start of a word, so `--config.data.path=~/fmnist` arrives
  as written; read literally it names a folder "~" in the current directory."""
  names = DATA_PATH_FIELDS + tuple(registry.method_class(config.method).weight_fields)
  home = {}
  for name in names:
    try:
      value = checks.get(config, name)
    except KeyError:  # a method without this field
      continue
    if isinstance(value, str) and value.startswith("~"):
      home[name] = os.path.expanduser(value)
  if not home:
    return config
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(home)
  return config


def prepare(config, file_config=None):
  """The config a run uses: `~` in its paths expanded (expand_home); an evaluation takes its
  encoder's size, patch and channels from the export in `init_from` (continued pre-training
  must fit the configured model instead); then every static check (`file_config`: see
  registry.validate_config). Raises ConfigError."""
  config = expand_home(config)
  adopts = registry.method_class(config.method).kind in ("classifier", "job")
  if adopts:
    config = pretrained.adopt_encoder_config(config, file_config)
  try:
    registry.validate_config(config, file_config)
  except ConfigError as e:
    # A refused channel count an evaluation took from its encoder, not from the command line.
    if adopts and e.field == "channels" and config.init_from not in ("", pretrained.RANDOM):
      raise ConfigError(f"{e} config.channels is the encoder's in config.init_from="
                        f"{config.init_from}: its images had {config.channels} channel(s); "
                        "evaluate it on data of that many") from None
    raise
  return config


def refuse_inert_overrides(config, file_config, overridden, loads_weights: bool = True
                           ) -> None:
  """ConfigError for a command-line override the run would not act on, given the config
  file's own config and the dotted fields the command line set (ml_collections' override
  values): an evaluation's encoder fields that its init_from decides
  (pretrained.refuse_dropped_overrides; with `loads_weights`, the trainer's case, also a head
  init that a released classifier head makes moot), a model.variant whose size the file's size
  fields override (validation.refuse_shadowed_variant) or a tokenizer does not read
  (validation.refuse_tokenizer_size). The trainer, the benchmark and the
  memory planner (which load no weights: loads_weights=False) call it before any data is read
  or anything compiled."""
  config = expand_home(config)
  kind = registry.method_class(config.method).kind
  if kind in ("classifier", "job"):
    pretrained.refuse_dropped_overrides(config, overridden, loads_weights=loads_weights)
  if kind == "tokenizer":
    validation.refuse_tokenizer_size(config, file_config, overridden)
  validation.refuse_shadowed_variant(config, file_config, overridden)


def on_synthetic_data(config, tool: str):
  """`config` reading synthetic images of its own size and channels instead of its dataset, for
  the tools that build a train step alone (`tool`: the benchmark times it on a generated batch,
  the memory planner compiles it from shapes), so the dataset need not be on the machine (an
  ImageNet config on a GPU host or a laptop). The fields only the dataset's source read (its
  path, split, TFDS name...) go back to their defaults: the unread-field checks would refuse
  them beside a synthetic source. A classifier keeps its dataset's class count (its head's
  size), which must then be readable here or given as classifier.num_classes; the synthetic
  source then has that many classes (data.synthetic_classes), whatever the count. Raises
  ConfigError."""
  def changed(**changes):
    return override(config.copy_and_resolve_references(), **changes)

  changes = {"data.source": "synthetic"}
  synthetic, base = changed(**changes), registry.base_config(config.method)
  for fields, reads, _ in validation.UNREAD_RULES:
    for field in fields:
      if (field.startswith("data.") and field[len("data."):] in base.data
          and not validation.rule_reads(reads, synthetic)):
        changes[field] = validation.get(base, field)
  if "classifier" in config:
    classes = config.classifier.num_classes
    if not classes:
      try:
        classes = data.num_classes(config.data)
      except (ConfigError, OSError) as err:
        raise ConfigError(
            f"{tool[:1].upper() + tool[1:]} builds the step on synthetic images and needs the "
            f"class count of the {config.method} head, which data.source="
            f"{config.data.source!r} cannot give here ({err}): set "
            "--config.classifier.num_classes") from err
    changes["classifier.num_classes"] = classes
    changes["data.synthetic_classes"] = classes  # the head's size, even below 10 classes
  return changed(**changes)


def schedule_lengths(config, num_examples: int) -> tuple[int, int, int]:
  """(steps_per_epoch, schedule_steps, last_step) for a dataset of `num_examples`.

  total_steps only stops a run early (-1: at the end of the schedule); the schedule's length
  is num_epochs. Raises ConfigError for a total_steps beyond the schedule (its last steps would
  train at the schedule's end value, min_lr)."""
  steps_per_epoch = num_examples // config.global_batch_size
  if steps_per_epoch < 1:
    # What made the split that small, where it is not the source itself.
    kept = [f"config.data.{name}={config.data[name]}" for name, default in
            (("label_fraction", 1.0), ("holdout", 0)) if config.data.get(name, default) != default]
    raise ConfigError(
        f"config.global_batch_size={config.global_batch_size} is invalid: it must not exceed "
        f"the {num_examples} training examples of config.data.source={config.data.source!r}"
        + (f" that {' and '.join(kept)} leave" if kept else "") + ".")
  schedule_steps = max(1, int(round(config.num_epochs * steps_per_epoch)))
  per_epoch = (f"{steps_per_epoch} steps per epoch ({num_examples} training examples // "
               f"global_batch_size={config.global_batch_size})")
  if config.total_steps > schedule_steps:
    epochs = math.ceil(config.total_steps / steps_per_epoch)
    raise config_error(
        "total_steps", config.total_steps,
        f"-1 (the whole schedule) or at most the schedule's {schedule_steps} steps "
        f"(num_epochs={config.num_epochs} x {per_epoch}); total_steps only stops a run early",
        f"Steps past the schedule would train at its end learning rate. To train longer, "
        f"lengthen the schedule: --config.num_epochs={epochs} gives "
        f"{int(round(epochs * steps_per_epoch))} steps (a run with checkpoints takes a longer "
        f"schedule with --resume_with_changes).")
  last_step = schedule_steps if config.total_steps == -1 else config.total_steps
  return steps_per_epoch, schedule_steps, last_step


@dataclasses.dataclass
class Run:
  """A run's pieces, built from shapes only (nothing materialised)."""
  config: Any
  mesh: jax.sharding.Mesh
  method: Method
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  steps_per_epoch: int
  schedule_steps: int
  last_step: int
  init_fn: Callable                 # rng -> TrainState (trace it under jit)
  abstract_state: Any               # TrainState of ShapeDtypeStructs with their shardings
  state_shardings: Any
  batch_sharding: jax.sharding.Sharding
  replicated: jax.sharding.Sharding

  def jit_step(self):
    """The train step under jit, with the state donated. `parallel.step="jit"`: the global
    step, traced under the mesh (the blocks pin their tokens' batch dim to the data axes);
    "shard_map": the per-device step with explicit collectives over the batch axes
    (training/step.py), the state replicated."""
    if self.config.parallel.step == "shard_map":
      axes = parallel.batch_axes(self.mesh)
      fn = step.make_train_step(self.method, self.tx, self.schedule,
                                self.config.grad_accum_steps, axis_name=axes,
                                norms_every=self.config.log_every, last_step=self.last_step,
                                stop_streak=self.config.max_consecutive_nonfinite,
                                nonfinite_guard=self.config.nonfinite_guard)
      state_spec = jax.tree.map(lambda _: P(), self.abstract_state)
      fn = jax.shard_map(fn, mesh=self.mesh, in_specs=(state_spec, P(axes), P()),
                         out_specs=(state_spec, P()))
    else:
      fn = parallel.with_activation_mesh(self.mesh, step.make_train_step(
          self.method, self.tx, self.schedule, self.config.grad_accum_steps,
          norms_every=self.config.log_every, last_step=self.last_step,
          stop_streak=self.config.max_consecutive_nonfinite,
          nonfinite_guard=self.config.nonfinite_guard))
    if self.config.data.get("augment_on", "host") == "device":
      fn = device_augment.augmenting(fn, self.config)
    return compiler_options.jit(
        self.config, fn, in_shardings=(self.state_shardings, self.batch_sharding,
                                       self.replicated),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

  def batch_keys(self) -> tuple[str, ...]:
    """The keys of a pipeline batch the jitted step reads."""
    keys = self.method.train_batch_keys()
    if self.config.data.get("augment_on", "host") == "device":
      keys += device_augment.KEYS
    return keys

  def keys(self) -> tuple[jax.Array, jax.Array]:
    """(init_rng, base_rng) of config.seed, made under jit and replicated over the mesh: with
    several processes a host-local key array cannot be device_put onto the others' devices."""
    seed = self.config.seed
    return compiler_options.jit(self.config, lambda: tuple(jax.random.split(jax.random.key(seed))),
                                out_shardings=self.replicated)()

  def init_state(self, init_rng: jax.Array):
    return compiler_options.jit(self.config, self.init_fn,
                                out_shardings=self.state_shardings)(init_rng)

  def abstract_state_saved_with(self, optimizer_fields: dict) -> Any:
    """`abstract_state` as a checkpoint written under other optimizer settings holds it
    (`optimizer_fields`: {name: value} of config.optimizer then, e.g. {"clip_grad_norm": 0.0}):
    the same arrays, with their shardings, in that optimizer's state tree. Clipping and
    layer-wise lr decay add or remove stages without state, so a run that diverged can resume
    with them (`--resume_with_changes`). None when that optimizer's state holds other arrays
    (another optimizer.name, or another count or shape of arrays): no checkpoint of it fits."""
    saved = {**self.config.optimizer.to_dict(), **optimizer_fields}
    if saved["name"] != self.config.optimizer.name:
      return None  # another optimizer's moments are not this one's, whatever their shapes
    tx = self.method.wrap_optimizer(optim.build_optimizer(
        ml_collections.ConfigDict(saved), self.schedule, self.schedule_steps,
        self.method.decay_mask))
    opt_state = jax.eval_shape(tx.init, self.abstract_state.params)
    theirs, ours = jax.tree.leaves(opt_state), jax.tree.leaves(self.abstract_state.opt_state)
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs, ours)):
      return None
    return self.abstract_state.replace(
        opt_state=jax.tree.unflatten(jax.tree.structure(opt_state), ours))


def setup_run(config, *, devices=None, num_examples: Optional[int] = None,
              process_count: Optional[int] = None) -> Run:
  """The run of a prepared `config` on `devices` (default: all). `num_examples` (default: the
  training source's size) sets the schedule's length in steps."""
  mesh = parallel.make_mesh(config.mesh, devices)
  validation.validate_for_devices(
      config, batch_parallelism=parallel.batch_parallelism(mesh),
      process_count=jax.process_count() if process_count is None else process_count,
      mesh_desc=parallel.describe_mesh(mesh))
  validation.validate_eval_for_devices(config, parallel.batch_parallelism(mesh))
  image_size, channels = tuple(config.image_size), config.channels
  if num_examples is None:  # the run's own data (else a nominal length: no data is read)
    num_examples = data.num_examples(config.data, image_size=image_size, channels=channels)
    classifier_base.check_num_classes(config)
  steps_per_epoch, schedule_steps, last_step = schedule_lengths(config, num_examples)
  schedule = optim.learning_rate_schedule(config.optimizer, config.global_batch_size,
                                          steps_per_epoch, schedule_steps)
  method = registry.build_method(config, TrainLength(steps_per_epoch, schedule_steps))
  tx = method.wrap_optimizer(optim.build_optimizer(config.optimizer, schedule, schedule_steps,
                                                   method.decay_mask))
  # Shape first, then shard: nothing is materialised before its sharding is known.
  init_fn = functools.partial(step.init_train_state, method, tx,
                              image_shape=(1, *image_size, channels))
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = parallel.tree_shardings(mesh, abstract, config.sharding_rules)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
  # Last: every other check of the run is static, this one compiles (a trivial program).
  compiler_options.check(config)
  return Run(config=config, mesh=mesh, method=method, tx=tx, schedule=schedule,
             steps_per_epoch=steps_per_epoch, schedule_steps=schedule_steps,
             last_step=last_step, init_fn=init_fn, abstract_state=abstract,
             state_shardings=shardings, batch_sharding=parallel.batch_sharding(mesh),
             replicated=parallel.replicated(mesh))


def abstract_batch(run: Run, batch_size: int, source_size: Optional[tuple[int, int]] = None
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The keys and shapes of a training batch of `batch_size` as the step reads it: the
  method's own augmentation's element (multi-crop views) or images + labels, plus what the
  method's input transforms add (host-drawn masks). With data.augment_on="device" the images
  arrive as decoded (uint8, `source_size`, default config.image_size) with their crop boxes
  and flips."""
  config, method = run.config, run.method
  augment = method.train_augment(config.data, tuple(config.image_size), config.channels)
  h, w = config.image_size
  if augment is not None:
    element = augment.random_map({"image": None, "label": np.int32(0)},
                                 np.random.default_rng(0))
  elif config.data.get("augment_on", "host") == "device":
    draws = transforms.DeviceAugmentDraws(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False,
        source_size=tuple(source_size or (h, w)), channels=config.channels)
    element = draws.random_map({"image": None, "label": np.int32(0)}, np.random.default_rng(0))
  else:
    element = {"image": np.zeros((h, w, config.channels), np.float32), "label": np.int32(0)}
  element.update({k: v[0] for k, v in method.example_extras(1, np.random.default_rng(0)).items()})
  return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(element[k])),
                                  jnp.asarray(element[k]).dtype)
          for k in run.batch_keys() if k in element}
