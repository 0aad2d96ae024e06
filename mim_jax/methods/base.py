"""The one interface between the training loop and a method: every hook, with its default.

A method (a pre-training objective, a trained evaluation, a tokenizer) subclasses `Method` and
overrides what it needs; the loop (training/loop.py), the run set-up (training/setup.py), the
benchmark and the memory planner call these hooks and nothing else. Adding a method is one
module plus a config file and a line in `mim_jax/registry.py`; tests/test_registry.py proves it
with a toy method defined in the test.

State comes in two parts:
  params   the trainable parameters (the optimizer sees these and only these)
  extra    everything else the method carries from step to step and checkpoints with them:
           BatchNorm statistics, a frozen encoder, an EMA teacher; {} when there is none.

Hooks, by when they run:
  configuration (class methods, before anything is built)
    add_config(c)        adds the method's own config blocks / fields to the shared ones and
                         removes shared fields it does not read (registry.base_config)
    validate(config)     the checks of those fields (ConfigError naming field, value, allowed)
    unread_rules()       its fields read only under a condition (overrides must act)
    forward_flops(config)  {"encoder", "decoder", ..., "total"} forward FLOPs per image
  construction           Method(config, length): `length` (TrainLength) for epoch schedules;
                         schedules_by_length (such a method's train step needs it)
  state                  init(rng, images) -> (params, extra); wants_weights();
                         load_pretrained(params, extra) on fresh host state (through
                         training.step.with_initial_weights); weight_fields
                         (the config fields naming the weights it loads, for resumes)
  optimizer              decay_mask(params) (the parameters weight decay applies to),
                         wrap_optimizer(tx) (e.g. parameters held still for a while)
  input                  data_transforms(), train_augment(...), batch_keys, example_extras(...)
  step                   loss(...), after_update(...)
  outputs                encoder_params(...), export(...), draws + reconstruct(...) + picture(...),
                         evaluates + eval_metrics(...)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np

from mim_jax.config import defaults, validation
from mim_jax.data.transforms import AddTokenMask
from mim_jax.objectives import masking
from mim_jax.training import checkpoint, optim
from mim_jax.weights import continuation, pretrained

Params = Any
Extra = Any
Batch = Mapping[str, jax.Array]

# What every training batch carries to the step: images and labels (plus `batch_keys`).
BATCH_KEYS = ("image", "label")


@dataclasses.dataclass(frozen=True)
class TrainLength:
  """How long the run is, for methods whose own schedules (EMA momentum, teacher temperature)
  are given in epochs: `steps_per_epoch` and `schedule_steps` (the lr schedule's length)."""
  steps_per_epoch: int
  schedule_steps: int

  @classmethod
  def nominal(cls, config) -> "TrainLength":
    """One step per epoch: for tools that never train (benchmarks, pictures, shapes)."""
    return cls(1, max(1, int(round(config.num_epochs))))


class Method:
  """Base class of every method; see the module docstring for the hooks."""

  name: str = ""
  # "pretraining" (exports an encoder, k-NN monitor), "classifier" (scored on the evaluation
  # split, results.json) or "tokenizer" (exports a tokenizer).
  kind: str = "pretraining"
  # Extra keys of a pipeline element that reach the train step (e.g. multi-crop views).
  batch_keys: tuple[str, ...] = ()
  # The mask generator drawing this method's masks (None: no masks); host kinds are drawn in
  # the input pipeline's workers and arrive as batch["token_mask"]; `masks_per_image` > 1
  # draws that many per image ([B, M, N], data2vec 2.0's masked copies).
  mask_generator: Optional[masking.MaskGenerator] = None
  masks_per_image: int = 1
  # True when the loss is one mean over the masked patches of the mask it is given (host
  # masks: batch["token_mask"]): gradient accumulation then weighs each microbatch by its
  # share of the batch's masked patches, so that the update equals the whole batch's one mean
  # (training.step).
  loss_is_masked_mean: bool = False
  # The logged metrics that are such means too (the loss, BEiT's accuracy, each head's loss):
  # weighed like the loss under gradient accumulation, so each is the whole batch's.
  masked_mean_metrics: tuple[str, ...] = ("loss",)
  # Whether the method draws pictures (reconstruct + picture) and is scored (eval_metrics).
  draws: bool = False
  evaluates: bool = False
  # The mesh axis (or axes) the method reduces batch statistics over in a per-device step under
  # shard_map (set by `with_axis`); None in a global (jit) step. `shards` says whether every
  # batch reduction of the method honours it.
  axis_name = None
  shards: bool = True
  # The config fields naming weights the run reads when it starts (the encoder to continue
  # from, a frozen tokenizer or teacher), dotted: their arrays live in the checkpoints from
  # then on, so a resume does not read the path again (training/resume_check.py). A method
  # that adds such a field lists it here and names it `path` (tests/test_registry.py holds
  # every method's list to its config's init_from and *.path fields).
  weight_fields: tuple[str, ...] = ("init_from",)
  # Whether the method has schedules of its own given in epochs or as a fraction of the run
  # (EMA momentum, teacher temperature, a frozen last layer): it reads `self.length`, so a
  # train step needs the method built with the run's TrainLength (`make_train_step` checks).
  schedules_by_length: bool = False

  # --- configuration -------------------------------------------------------------------------
  @classmethod
  def add_config(cls, c: ml_collections.ConfigDict) -> None:
    """Adds this method's fields to `c` (in place): by default the shared fields of every
    method trained by the loop (config/defaults.py core_fields + training_fields)."""
    defaults.core_fields(c)
    defaults.training_fields(c)

  @classmethod
  def validate(cls, config) -> None:
    """Checks this method's fields; raises ConfigError."""

  @classmethod
  def unread_rules(cls) -> list:
    """(fields, reads(config) -> bool, why) of the method's fields read only under a
    condition (e.g. a target kind's settings): such a field that differs from its default
    while unread is an error (as config/validation.py's UNREAD_RULES for shared fields)."""
    return []

  @classmethod
  def forward_flops(cls, config) -> dict[str, float]:
    """Forward FLOPs per image by part, with "total"."""
    raise NotImplementedError(f"method {cls.name!r} has no FLOP count")

  # --- construction and state ------------------------------------------------------------------
  def __init__(self, config=None, length: Optional[TrainLength] = None):
    """`config` may be None for a method built by hand in user code (then it reads none)."""
    self.config = config
    self.length_given = length is not None
    self.length = length or (TrainLength.nominal(config) if config is not None
                             else TrainLength(1, 1))

  def init(self, rng: jax.Array, images: jax.Array) -> tuple[Params, Extra]:
    """Fresh (params, extra) for example images [B, H, W, C] (traceable)."""
    raise NotImplementedError

  def wants_weights(self) -> bool:
    """Whether fresh state must go through `load_pretrained` (init_from, a frozen tokenizer)."""
    return self.config is not None and continuation.wanted(self.config)

  def load_pretrained(self, params: Params, extra: Extra) -> tuple[Params, Extra]:
    """Existing weights into fresh host-side state. Default: continued pre-training from
    `config.init_from` (weights/continuation.py); teachers override to copy the student."""
    if continuation.wanted(self.config):
      params = continuation.load_into(params, self.config)
    return params, extra

  def with_axis(self, axis_name) -> "Method":
    """This method for a per-device step under shard_map over `axis_name`: its batch
    statistics (masked-loss counts, iBOT's centres, BatchNorm) become means over every
    device's share of the batch, so that the step's pmean of gradients and metrics equals the
    global step (training/step.py). A copy; the method itself is unchanged."""
    if not self.shards:
      raise NotImplementedError(
          f"method {self.name!r} has batch reductions that do not yet follow a mesh axis: use "
          "parallel.step='jit' (the global step over the same mesh)")
    clone = copy.copy(self)
    clone.axis_name = axis_name
    return clone

  # --- input -----------------------------------------------------------------------------------
  def data_transforms(self) -> tuple:
    """Per-example steps added to the input pipeline after augmentation (host-drawn masks)."""
    if self.mask_generator is not None and self.mask_generator.on_host:
      return (AddTokenMask(self.mask_generator, count=self.masks_per_image),)
    return ()

  def train_augment(self, data_cfg, image_size: tuple[int, int], channels: int):
    """A grain RandomMap replacing the default RandomResizedCrop + flip (multi-crop views), or
    None. It maps {"image": uint8 [h, w, C] or None, "label"} to a dict with "label", "valid"
    and the method's arrays (placeholder zeros with valid=False for a None image)."""
    return None

  def train_batch_keys(self) -> tuple[str, ...]:
    """The keys of a pipeline batch that the train step reads."""
    keys = BATCH_KEYS + tuple(self.batch_keys)
    if self.mask_generator is not None and self.mask_generator.on_host:
      keys += (masking.TOKEN_MASK_KEY,)
    return keys

  def example_extras(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the input pipeline adds to `batch_size` images besides "image" and "label"
    (host-drawn masks), drawn for a whole batch: a device-resident split's batches, pictures,
    benchmarks and shape planning."""
    if self.mask_generator is not None and self.mask_generator.on_host:
      m = self.masks_per_image
      masks = self.mask_generator.host(rng, batch_size * m)
      return {masking.TOKEN_MASK_KEY: masks if m == 1 else masks.reshape(batch_size, m, -1)}
    return {}

  # --- the step --------------------------------------------------------------------------------
  def loss(self, params: Params, extra: Extra, batch: Batch, rng: jax.Array,
           train: bool = True) -> tuple[jax.Array, tuple[dict[str, jax.Array], Extra]]:
    """(scalar loss, (scalar metrics, new extra)) for one batch; pure and jittable."""
    raise NotImplementedError

  def wrap_optimizer(self, tx):
    """The optimizer the method trains with, given the config's `tx` (an optax
    GradientTransformation): `tx` itself unless the method holds some parameters still for a
    while (iBOT's head prototypes). Loops that build their own `tx` pass it through here."""
    return tx

  def decay_mask(self, params: Params) -> Any:
    """Which parameters weight decay applies to (a tree of bools like `params`): matrices, not
    biases, norms, tokens or position tables (MAE's groups, `optim.weight_decay_mask`), unless
    the method's release groups them otherwise."""
    return optim.weight_decay_mask(params)

  def after_update(self, params: Params, extra: Extra, step: jax.Array) -> Extra:
    """Runs inside the jitted step after the optimizer update, on the new params (an EMA
    teacher follows the student here). `step` (int32 []) is the index of the update just
    applied (0 for the first), counting applied updates only, as the optimizer's schedules do;
    a step skipped for non-finite values discards the result."""
    return extra

  # --- outputs ---------------------------------------------------------------------------------
  def encoder_params(self, params: Params, extra: Extra) -> Params:
    """The encoder's sub-tree, which downstream evaluation and export use."""
    return self.released_params(params, extra)["encoder"]

  # Where in the training state the parameter tree the method releases ({"encoder", ...})
  # lies: its trained params, or e.g. ("extra", "teacher") for an EMA teacher. The loop writes
  # it to the workdir (RELEASED_FILE), and `init_from` and the converter read a workdir's
  # checkpoint there, so that they load what the export and the evaluations hold.
  released_path: tuple[str, ...] = ("params",)

  @classmethod
  def released_params(cls, params: Params, extra: Extra) -> Params:
    tree = {"params": params, "extra": extra}
    for key in cls.released_path:
      tree = tree[key]
    return tree

  def export(self, workdir: str, params: Params, extra: Extra, info: dict) -> None:
    """The run's end product: the encoder (Orbax + model.json) in `workdir`/encoder. Collective:
    every process calls it with the same host values."""
    checkpoint.export_encoder(os.path.join(workdir, "encoder"),
                              self.encoder_params(params, extra), info)

  def reconstruct(self, params: Params, batch: Batch, rng: jax.Array,
                  extra: Extra) -> dict[str, jax.Array]:
    """Device-side predictions for pictures of `batch` (when `draws`)."""
    raise NotImplementedError

  def picture(self, images: np.ndarray, out: dict) -> np.ndarray:
    """A picture (uint8 [H, W, 3]) of `reconstruct`'s output for `images` (when `draws`)."""
    raise NotImplementedError

  def eval_metrics(self, params: Params, extra: Extra, batch: Batch) -> dict[str, jax.Array]:
    """Sums over the valid rows (batch["mask"]): "correct", "loss", "count" (when `evaluates`)."""
    raise NotImplementedError


class Job(Method):
  """A method that trains nothing and runs once (frozen-feature evaluations): `run` replaces
  the training loop; the loop's hooks are never called."""

  kind = "job"

  @classmethod
  def add_config(cls, c):
    defaults.core_fields(c)
    defaults.init_from_field(c)

  @classmethod
  def unread_rules(cls):
    return [(("seed",), lambda c: c.init_from == pretrained.RANDOM,
             "frozen-feature jobs are deterministic; only the random-encoder baseline "
             "(init_from='random') draws its weights with it")]

  @classmethod
  def run(cls, config, workdir: str) -> dict:
    """Runs the job in `workdir` (results.json) and returns its metrics."""
    raise NotImplementedError


class PretrainingMethod(Method):
  """What pre-training methods share: masking, the k-NN monitor, pictures and the export."""

  kind = "pretraining"
  # What model.weight_init draws besides the encoder's layers, so that continued pre-training
  # knows whether it still reads it (weights/continuation.py): a mask token in the encoder
  # (mask-token methods), and a prediction head that the official code builds inside its ViT
  # (BEiT's and data2vec's lm_head, drawn as the encoder's layers: `models.initializers.head_init`);
  # other heads and decoders have inits of their own.
  mask_token_in_encoder = False
  head_in_vit = False

  @classmethod
  def encoder_mask_token(cls, config) -> bool:
    """Whether the encoder of a run of `config` holds a mask token."""
    return cls.mask_token_in_encoder

  @classmethod
  def draws_more_under_weight_init(cls, config) -> bool:
    """Whether a run of `config` draws arrays under model.weight_init beyond those
    `continuation.draws_under_weight_init` knows (e.g. BEiT v2's aggregation blocks when the
    source has none): model.weight_init is then read in continued pre-training too."""
    return False

  @classmethod
  def unread_rules(cls):
    return [(("model.weight_init",),
             lambda c: continuation.draws_under_weight_init(
                 c, mask_token=cls.encoder_mask_token(c), head_in_vit=cls.head_in_vit)
             or cls.draws_more_under_weight_init(c),
             "init_from replaces every array it draws (the whole encoder; it draws only a mask "
             "token the source lacks, a head inside the ViT, BEiT's or data2vec's, that the "
             "source's method did not train, and BEiT v2's aggregation blocks the source lacks)")]

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    defaults.pretraining_fields(c, pictures=cls.draws)

  @classmethod
  def validate(cls, config):
    validation.validate_pretraining_fields(config)
