"""Checks every method shares, and the helpers methods write their own checks with.

Each failure raises `ConfigError` naming the field, the value and what is allowed, before any
data is read or anything is compiled. `registry.validate_config` runs, in order: the field set
(exactly the method's), `validate_shared`, the method's `validate`, and `check_unread` (a field
its method reads only under a condition that does not hold must keep its default).

  require(ok, field, value, allowed, hint="")     the one way to fail a check (config/checks.py)
  is_int / is_number / positive_int / pair        value tests (config/checks.py)
  validate_shared(config)                          model, geometry, data, training fields
  validate_pretraining_fields(config)              masking (per method), k-NN monitor, pictures
  validate_masking(config, kinds, fixed_count)     config.masking for a method's allowed kinds
  validate_classifier(config)                      config.classifier of an evaluation
  check_unread(config, defaults)                   conditional fields left at their defaults
  validate_for_devices / validate_eval_for_devices the checks that need the mesh
"""

from __future__ import annotations

from typing import Any, Callable

from mim_jax import data

# Re-exported: methods write their checks as v.require(...), v.is_number(...).
from mim_jax.config import defaults
from mim_jax.config.checks import get, is_int, is_number, pair, positive_int, require  # noqa: F401
from mim_jax.config.errors import ConfigError, config_error
from mim_jax.evaluate import knn
from mim_jax.models.attention import REL_POS_BIAS
from mim_jax.models.initializers import WEIGHT_INITS
from mim_jax.models.vit import MLP_ACTS, VIT_SIZES, parse_variant, size_from_config
from mim_jax.objectives.masking import ATTENTION_ORDERS, MASK_KINDS, num_visible
from mim_jax.training import compiler_options, optim, parallel, step
from mim_jax.weights import continuation, pretrained

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("", "xla", "cudnn", "heads_major")
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")  # models/vit.py
OPTIMIZERS = ("adamw", "lars", "sgd")  # training/optim.py
PARALLEL_STEPS = ("jit", "shard_map")  # training/setup.py
SCHEDULES = ("cosine", "multistep")
WEIGHT_DECAY_SCHEDULES = ("constant", "cosine")
# Visible-only encoders (MAE) need the same masked count in every sample.
FIXED_COUNT_MASK_KINDS = ("random", "grouped", "inverse_block")
POOLS = ("cls", "gap")  # models/heads.py


# --- shared ----------------------------------------------------------------------------------

def validate_model(config) -> None:
  m = config.model
  parse_variant(m.variant)
  for name in ("width", "depth", "num_heads", "mlp_dim"):
    if name in m:
      require(is_int(m[name]) and m[name] >= 0, f"model.{name}", m[name],
              "an integer >= 0 (0 keeps the size of model.variant)")
  size, patch = size_from_config(m)
  require(size.width % size.num_heads == 0, "model.num_heads", size.num_heads,
          f"a divisor of the encoder width {size.width}")
  require(size.width % 4 == 0, "model.variant", m.variant,
          "a width divisible by 4 (2-D sin-cos position embeddings)")
  if "dtype" in m:
    require(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
  if "attention_impl" in m:
    require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl", m.attention_impl,
            f"one of {ATTENTION_IMPLS} ('': cuDNN on GPU, heads_major on CPU, XLA elsewhere)")
    # cuDNN's fused attention takes bfloat16 / float16 only: asked for in float32, every layer
    # would fall back to XLA's attention (models.attention.dot_product_attention) under its name.
    require(m.attention_impl != "cudnn" or m.get("dtype", "float32") != "float32",
            "model.attention_impl", m.attention_impl, "'cudnn' with model.dtype='bfloat16' or "
            "'float16' (cuDNN's fused attention takes no float32; '' picks it where it runs)")
  if "remat" in m:
    require(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"one of {REMAT_POLICIES}")
  if "layer_scale" in m:
    require(is_number(m.layer_scale) and m.layer_scale >= 0, "model.layer_scale",
            m.layer_scale, "a number >= 0: the initial per-channel scale of each residual "
            "branch (0: no layer scale; BEiT uses 0.1 for ViT-B, 1e-5 for ViT-L)")
  if "pre_norm" in m:
    require(isinstance(m.pre_norm, bool), "model.pre_norm", m.pre_norm, "True or False")
  if "weight_init" in m:
    require(m.weight_init in WEIGHT_INITS, "model.weight_init", m.weight_init,
            f"one of {WEIGHT_INITS} (xavier: the official MAE's; beit: that of BEiT, BEiT v2, "
            "data2vec and SimMIM; dino: that of DINO's ViT, which iBOT's release uses; data2vec2: "
            "data2vec 2.0's image model)")
  if "mlp_act" in m:
    require(m.mlp_act in MLP_ACTS, "model.mlp_act", m.mlp_act,
            f"one of {tuple(MLP_ACTS)} (quick_gelu: OpenAI CLIP towers)")
  if "abs_posemb" in m:
    require(isinstance(m.abs_posemb, bool), "model.abs_posemb", m.abs_posemb, "True or False")
    require(m.abs_posemb or m.get("rel_pos_bias", ""), "model.abs_posemb", m.abs_posemb,
            "True unless model.rel_pos_bias is set: an encoder with neither has no positions")
  if "rel_pos_bias" in m:
    require(m.rel_pos_bias in REL_POS_BIAS, "model.rel_pos_bias", m.rel_pos_bias,
            f"one of {REL_POS_BIAS} ('': none; 'shared': one table for all blocks, as BEiT "
            "pre-training; 'per_block': one per block, as BEiT fine-tuning)")
  if "drop_path_rate" in m:
    rate = m.drop_path_rate
    require(is_number(rate) and 0 <= rate < 1, "model.drop_path_rate", rate,
            "a number in [0, 1)")
  image_size = tuple(config.image_size)
  require(len(image_size) == 2 and all(is_int(s) and s > 0 for s in image_size),
          "image_size", image_size, "(height, width), two positive integers")
  # The raw-pixel baseline runs no encoder: any image size is its features' size.
  pixels = config.get("classifier", {}).get("features") == "pixels"
  for axis, s in zip(("height", "width"), image_size if not pixels else ()):
    require(s % patch == 0, "image_size", image_size,
            f"each side divisible by the patch size {patch} of model.variant="
            f"{m.variant!r}; the {axis} {s} is not")
  require(is_int(config.channels) and config.channels > 0, "channels", config.channels,
          "a positive integer (1 for grayscale, 3 for RGB)")


def refuse_tokenizer_size(config, file_config, overridden) -> None:
  """ConfigError when the command line set a tokenizer's model.variant to one of the config
  file's patch size: a tokenizer reads only the patch (its code grid), so another size name
  (B/16 -> L/16) would change nothing."""
  if "model.variant" not in overridden or "variant" not in file_config.get("model", {}):
    return
  variant, file_variant = config.model.variant, file_config.model.variant
  try:
    patch, file_patch = parse_variant(variant)[1], parse_variant(file_variant)[1]
  except ConfigError:
    return  # validate_model names a bad variant
  if variant != file_variant and patch == file_patch:
    raise ConfigError(
        f"config.model.variant={variant!r} is not used: a tokenizer reads only the variant's "
        f"patch size (its code grid), and {variant!r} has the patch {patch} of the config "
        f"file's {file_variant!r}. Drop the flag (the encoder that reads the tokenizer may be "
        "of any size with that patch).")


def refuse_shadowed_variant(config, file_config, overridden) -> None:
  """ConfigError when the command line set model.variant to another size than its config
  file's, while size fields the file sets stay: they take precedence over the variant's size
  (size_from_config), so `--config.model.variant=S/4` on a Fashion-MNIST recipe (width 128,
  depth 6) would train the recipe's encoder under the name S/4. A new patch under the file's
  size name (Ti/4 -> Ti/7) changes only the patch, as asked; size fields also set on the
  command line are the user's own. `overridden`: the dotted fields the command line set."""
  if "model.variant" not in overridden or "variant" not in file_config.get("model", {}):
    return
  if config.get("classifier", {}).get("features") == "pixels":
    return  # the raw-pixel baseline runs no encoder (pretrained.refuse_dropped_overrides)
  variant, file_variant = config.model.variant, file_config.model.variant
  name = variant.partition("/")[0]
  if name == file_variant.partition("/")[0] or name not in VIT_SIZES:
    return  # same size name, or a bad variant (validate_model names it)
  wanted = VIT_SIZES[name]
  kept = [f for f in ("width", "depth", "num_heads", "mlp_dim")
          if f"model.{f}" not in overridden and config.model.get(f, 0)
          and config.model[f] != getattr(wanted, f)]
  if not kept:
    return
  if pretrained.is_pretrained(config.get("init_from", "")):
    raise ConfigError(
        f"config.model.variant={variant!r} would not set the size: the encoder is the one in "
        f"init_from={config.init_from} (an evaluation takes its size from the export, continued "
        "pre-training must match it). Drop the flag.")
  raise ConfigError(
      f"config.model.variant={variant!r} would not set the size: the config file sets "
      f"{', '.join(f'model.{f}={config.model[f]}' for f in kept)}, which take precedence over "
      f"the size of {name!r} (width {wanted.width}, depth {wanted.depth}, num_heads "
      f"{wanted.num_heads}, mlp_dim {wanted.mlp_dim}). Add "
      f"{' '.join(f'--config.model.{f}=0' for f in kept)} to train the {name} size (0 keeps "
      "the variant's), or set the size fields you want; a recipe that takes a variant argument "
      f"(the pre-training *_fmnist.py files: --config=FILE:variant={variant}) also sizes what "
      "it derives from the encoder (e.g. data2vec's teacher.top_k, its decoder width).")


def validate_optimization(config) -> None:
  positive_int(config, "global_batch_size")
  positive_int(config, "grad_accum_steps")
  require(config.global_batch_size % config.grad_accum_steps == 0, "global_batch_size",
          config.global_batch_size, f"a multiple of grad_accum_steps={config.grad_accum_steps}")
  require(is_number(config.num_epochs) and config.num_epochs > 0, "num_epochs",
          config.num_epochs, "a positive number")
  require(is_int(config.total_steps) and (config.total_steps == -1 or config.total_steps > 0),
          "total_steps", config.total_steps, "-1 (the whole schedule) or a positive integer "
          "(the step to stop at: at most the schedule's length, which num_epochs sets)")
  opt = config.optimizer
  require(opt.name in OPTIMIZERS, "optimizer.name", opt.name, f"one of {OPTIMIZERS}")
  require(is_number(opt.momentum) and 0 <= opt.momentum < 1, "optimizer.momentum",
          opt.momentum, "a number in [0, 1)")
  require(is_number(opt.trust_coefficient) and opt.trust_coefficient > 0,
          "optimizer.trust_coefficient", opt.trust_coefficient, "a positive number")
  require(is_number(opt.base_lr) and opt.base_lr > 0, "optimizer.base_lr", opt.base_lr,
          "a positive number")
  require(is_number(opt.lr_batch_reference) and opt.lr_batch_reference > 0,
          "optimizer.lr_batch_reference", opt.lr_batch_reference, "a positive number")
  require(is_number(opt.min_lr) and 0 <= opt.min_lr, "optimizer.min_lr", opt.min_lr,
          "a number >= 0")
  for name in ("b1", "b2"):
    require(is_number(opt[name]) and 0 <= opt[name] < 1, f"optimizer.{name}", opt[name],
            "a number in [0, 1)")
  require(is_number(opt.eps) and opt.eps > 0, "optimizer.eps", opt.eps, "a positive number")
  if "mu_dtype" in opt:
    require(opt.mu_dtype in ("", "bfloat16"), "optimizer.mu_dtype", opt.mu_dtype,
            "'' (float32) or 'bfloat16'")
  require(is_number(opt.weight_decay) and opt.weight_decay >= 0, "optimizer.weight_decay",
          opt.weight_decay, "a number >= 0")
  require(opt.weight_decay_schedule in WEIGHT_DECAY_SCHEDULES,
          "optimizer.weight_decay_schedule", opt.weight_decay_schedule,
          f"one of {WEIGHT_DECAY_SCHEDULES}")
  require(is_number(opt.weight_decay_end) and opt.weight_decay_end >= 0,
          "optimizer.weight_decay_end", opt.weight_decay_end, "a number >= 0")
  require(is_number(opt.warmup_epochs) and 0 <= opt.warmup_epochs, "optimizer.warmup_epochs",
          opt.warmup_epochs, "a number >= 0")
  require(opt.warmup_epochs <= config.num_epochs, "optimizer.warmup_epochs", opt.warmup_epochs,
          f"at most num_epochs={config.num_epochs}")
  require(opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, f"one of {SCHEDULES}")
  if opt.schedule == "cosine" and opt.warmup_epochs < config.num_epochs:  # it reads min_lr
    peak = optim.peak_learning_rate(opt, config.global_batch_size)
    require(opt.min_lr <= peak, "optimizer.min_lr", opt.min_lr,
            f"at most the peak lr {peak:g} (base_lr={opt.base_lr:g} x global_batch_size="
            f"{config.global_batch_size} / lr_batch_reference={opt.lr_batch_reference:g}): the "
            "schedule decays from the peak to min_lr, so a larger one would make it climb")
  if opt.schedule == "multistep":
    epochs = tuple(opt.decay_epochs)
    # Empty would be a constant lr that ignores decay_factor: say 'cosine' or give epochs.
    # Strictly increasing: the schedule keys its decays by step, so a repeated epoch would
    # merge into one decay (optim.learning_rate_schedule also refuses epochs on one step).
    require(epochs and all(is_number(e) and opt.warmup_epochs <= e <= config.num_epochs
                           for e in epochs)
            and all(a < b for a, b in zip(epochs, epochs[1:])), "optimizer.decay_epochs",
            epochs, f"one or more strictly increasing epochs (no repeats) between "
            f"warmup_epochs={opt.warmup_epochs} and num_epochs={config.num_epochs} "
            "(schedule='multistep' decays the lr there, by decay_factor at each)",
            "For a larger drop at one epoch give it once with a smaller decay_factor.")
    require(is_number(opt.decay_factor) and 0 < opt.decay_factor <= 1,
            "optimizer.decay_factor", opt.decay_factor, "a number in (0, 1]")
  require(is_number(opt.clip_grad_norm) and opt.clip_grad_norm >= 0, "optimizer.clip_grad_norm",
          opt.clip_grad_norm, "a number >= 0 (0 disables clipping)")
  require(isinstance(opt.clip_per_tensor, bool), "optimizer.clip_per_tensor",
          opt.clip_per_tensor, "True (each parameter's gradient clipped to clip_grad_norm on its "
          "own, as DINO and iBOT) or False (the global norm of all of them)")
  for name in ("log_every", "checkpoint_every", "keep_checkpoints", "max_consecutive_nonfinite",
               "max_consecutive_failed_saves"):
    positive_int(config, name)
  require(config.nonfinite_guard in ("",) + step.NONFINITE_GUARDS, "nonfinite_guard",
          config.nonfinite_guard, "'' (the backend's choice), 'select' or 'cond'")
  require(config.parallel.step in PARALLEL_STEPS, "parallel.step", config.parallel.step,
          f"one of {PARALLEL_STEPS}")
  parallel.check_mesh_axes(config.mesh, config.sharding_rules)
  if config.parallel.step == "shard_map":
    rules = tuple(tuple(r) for r in config.sharding_rules)
    # Replicating specs: (), "replicate", None or a tuple of Nones (parallel._parse_spec).
    require(not parallel.rule_axes(rules), "sharding_rules", rules,
            "replicate-only rules ((\".*\", ()),) with parallel.step='shard_map' (its state is "
            "replicated; shard parameters with the global step, parallel.step='jit')")


def validate_shared(config) -> None:
  """The fields `config.defaults.core_fields` and `training_fields` create, where present."""
  # JAX keys hold 32 bits of the seed (x64 off): 2**32 + 5 would repeat seed 5; NumPy's
  # generators (pictures, host masks) refuse negative seeds.
  require(is_int(config.seed) and 0 <= config.seed < 2**32, "seed", config.seed,
          "an integer in [0, 2**32)")
  compiler_options.validate(config)
  validate_model(config)
  if "optimizer" in config:
    validate_optimization(config)
  data.validate_data_config(config.data, image_size=tuple(config.image_size),
                            channels=config.channels,
                            # Tokenizers (no eval block) score no split.
                            scores_eval_split="eval" in config
                            and defaults.scores_eval_split(config))


# --- pre-training ----------------------------------------------------------------------------

def validate_pretraining_fields(config, *, mask_kinds: tuple[str, ...] = MASK_KINDS,
                                fixed_count: bool = False) -> None:
  """What `defaults.pretraining_fields` adds: masking (of `mask_kinds`; `fixed_count` for a
  visible-only encoder), pictures, export, the k-NN monitor, and an init_from that fits."""
  if "masking" in config:
    size, patch = size_from_config(config.model)
    validate_masking(config, tuple(config.image_size), patch, mask_kinds, fixed_count)
  if "viz_every" in config:
    require(is_int(config.viz_every) and config.viz_every >= 0, "viz_every", config.viz_every,
            "an integer >= 0 (0 disables pictures)")
    positive_int(config, "viz_num_images")
    validate_viz_channels(config)
  require(isinstance(config.export_encoder, bool), "export_encoder", config.export_encoder,
          "true or false")
  validate_knn(config)
  positive_int(config, "eval.batch_size")
  if continuation.wanted(config):
    continuation.check_source_fits(config)  # continued pre-training: the encoder must fit


def validate_viz_channels(config) -> None:
  shown = tuple(config.viz_channels)
  require(len(shown) in (0, 1, 3) and all(is_int(k) and 0 <= k < config.channels for k in shown),
          "viz_channels", shown, f"(), one channel or three, each in [0, {config.channels}) "
          "(the pictures' grayscale or RGB)")


def validate_knn(config) -> None:
  k = config.knn
  require(is_int(k.k) and k.k > 0, "knn.k", k.k, "a positive integer (DINO uses 20)")
  require(is_number(k.temperature) and k.temperature > 0, "knn.temperature", k.temperature,
          "a positive number (DINO uses 0.07)")
  lowest = knn.min_temperature(k.k)
  require(k.temperature >= lowest, "knn.temperature", k.temperature,
          f">= {lowest:.4g} for knn.k={k.k}: below it the votes exp(cosine / T) overflow "
          "float32 and every score is inf or NaN (DINO uses 0.07)")
  if "every_epochs" in k:
    require(is_number(k.every_epochs) and k.every_epochs >= 0, "knn.every_epochs",
            k.every_epochs, "a number >= 0 (0: k-NN only as its own job)")


def validate_masking(config, image_size: tuple[int, int], patch: int,
                     kinds: tuple[str, ...] = MASK_KINDS, fixed_count: bool = False) -> None:
  m = config.masking
  if fixed_count and m.kind == "blockwise":
    raise config_error(
        "masking.kind", m.kind, f"one of {kinds} for method {config.method!r}",
        "Its encoder sees only the visible patches, so every sample must mask the same number "
        "of patches; blockwise masks vary in count per sample. Use a mask-token method "
        "(simmim, maskfeat) for blockwise masking, or 'random' / 'grouped' / 'inverse_block'.")
  require(m.kind in kinds, "masking.kind", m.kind, f"one of {kinds} for method {config.method!r}",
          "masking.kind='attention' (AttMask) needs a teacher whose attention picks the "
          "patches: methods 'data2vec', 'maskdistill', and 'mim' with "
          "target.kind='teacher_features'." if m.kind == "attention" else None)
  ratio = m.ratio
  require(is_number(ratio) and 0 < ratio < 1, "masking.ratio", ratio,
          "a number strictly between 0 and 1 (MAE uses 0.75, SimMIM 0.6, BEiT / MaskFeat 0.4)")
  grid = (image_size[0] // patch, image_size[1] // patch)
  num_patches = grid[0] * grid[1]
  require(num_visible(num_patches, ratio) >= 1, "masking.ratio", ratio,
          f"a ratio that leaves at least one of the {num_patches} patches visible")
  mask_patch = m.mask_patch_size
  require(is_int(mask_patch) and mask_patch >= 0, "masking.mask_patch_size", mask_patch,
          "an integer >= 0 (0: the model's patch size)")
  if mask_patch:
    require(mask_patch % patch == 0, "masking.mask_patch_size", mask_patch,
            f"a multiple of the model's patch size {patch} (SimMIM: 32 over 16-px patches)")
    group = mask_patch // patch
    require(grid[0] % group == 0 and grid[1] % group == 0, "masking.mask_patch_size",
            mask_patch, f"a size whose groups of {group}x{group} patches tile the {grid[0]}x"
            f"{grid[1]} patch grid of image_size={tuple(image_size)}")
  ratio_range = tuple(m.ratio_range)
  require(ratio_range == () or (len(ratio_range) == 2 and all(is_number(r) for r in ratio_range)
                                and 0 <= ratio_range[0] <= ratio_range[1] < 1),
          "masking.ratio_range", ratio_range,
          "() (use masking.ratio) or (lo, hi) with 0 <= lo <= hi < 1 (iBOT: (0.1, 0.5))")
  # Nothing masked in any sample: the masked-patch losses are empty (0) and the masking
  # settings unread, so the run would train nothing without a word.
  require(ratio_range == () or ratio_range[1] > 0, "masking.ratio_range", ratio_range,
          "(lo, hi) with hi > 0 ((0, 0) masks no patch in any sample)")
  prob = m.mask_probability
  require(is_number(prob) and 0 < prob <= 1, "masking.mask_probability", prob,
          "a probability in (0, 1] (iBOT: 0.5; 0 masks no sample)")
  if ratio_range or prob < 1:  # a per-sample ratio (MaskGenerator.variable_ratio)
    field, value = (("masking.ratio_range", ratio_range) if ratio_range
                    else ("masking.mask_probability", prob))
    if fixed_count:
      raise config_error(
          field, value, f"{'()' if ratio_range else '1.0'} for method {config.method!r}",
          "Its encoder sees only the visible patches, so every sample must mask the same "
          "number of patches (masking.ratio); a per-sample ratio varies it.")
    require(m.kind != "attention", field, value,
            f"{'()' if ratio_range else '1.0'} with masking.kind='attention' (its masks are "
            "chosen in the step from the teacher's attention, at masking.ratio)")
  if m.kind == "attention":
    require(m.attention_order in ATTENTION_ORDERS, "masking.attention_order",
            m.attention_order, f"one of {ATTENTION_ORDERS}")
    share = m.random_share
    require(is_number(share) and 0 <= share <= 1, "masking.random_share", share,
            "a fraction in [0, 1] of the masked patches drawn at random")
  if m.kind == "blockwise":
    require(is_int(m.min_block) and m.min_block > 0, "masking.min_block", m.min_block,
            "a positive integer (BEiT: 16 patches)")
    # The budget of the largest ratio a sample can draw.
    top = ratio_range[1] if ratio_range else ratio
    budget = int(num_patches * top)
    require(m.min_block <= budget, "masking.min_block", m.min_block,
            f"at most the masking budget int({num_patches} x {top}) = {budget} patches")
    require(is_number(m.min_aspect) and 0 < m.min_aspect <= 1, "masking.min_aspect",
            m.min_aspect, "a number in (0, 1] (BEiT: 0.3)")
    require(isinstance(m.get("exact_count", False), bool), "masking.exact_count",
            m.get("exact_count"), "true or false (BEiT v2 tops up short masks: true)")
  if m.kind == "inverse_block":
    require(is_int(m.block) and 0 < m.block <= min(grid), "masking.block", m.block,
            f"a positive integer at most the patch grid side {min(grid)} (data2vec 2.0: 3)")
    require(is_number(m.adjust) and m.adjust >= 0, "masking.adjust", m.adjust,
            "a number >= 0 (data2vec 2.0: 0.07)")


# --- evaluations -----------------------------------------------------------------------------

def validate_classifier(config) -> None:
  """The `config.classifier` fields an evaluation has, and its init_from."""
  c = config.classifier
  if "features" in c:
    require(c.features in ("encoder", "pixels"), "classifier.features", c.features,
            "'encoder' or 'pixels' (the raw-pixel baseline)")
    if c.features == "pixels":
      require(config.init_from == "", "init_from", config.init_from,
              "'' with classifier.features='pixels' (the raw-pixel baseline loads no encoder)")
    else:
      require(isinstance(config.init_from, str) and config.init_from != "", "init_from",
              config.init_from, "a pre-training or fine-tuning workdir or an encoder "
              f"directory ({config.method} evaluates a trained encoder), or 'random' for a "
              "random-encoder baseline")
  if config.init_from not in ("", "random"):
    pretrained.encoder_directory(config.init_from)  # raises a ConfigError naming init_from
  require(is_int(c.num_classes) and c.num_classes >= 0, "classifier.num_classes",
          c.num_classes, "an integer >= 0 (0: the dataset's class count)")
  if config.data.source in CONSTANT_CLASS_SOURCES:
    check_num_classes(config, data.num_classes(config.data))
  if "pool" in c:
    require(c.pool in POOLS, "classifier.pool", c.pool, f"one of {POOLS}")
  if "probe_layer" in c:
    depth = size_from_config(config.model)[0].depth
    require(is_int(c.probe_layer) and 0 <= c.probe_layer <= depth, "classifier.probe_layer",
            c.probe_layer, f"an integer in [0, {depth}] (0: encoder output, k: block k)")
  if "head_init_std" in c:
    require(is_number(c.head_init_std) and c.head_init_std > 0, "classifier.head_init_std",
            c.head_init_std, "a positive number")
  positive_int(config, "eval.batch_size")


# Sources whose class count is a constant (data/sources.py): checked here. The others know
# theirs only from their files (class folders, labels, TFDS info), counted where training
# builds its source (training/setup.py: setup_run).
CONSTANT_CLASS_SOURCES = ("fashion_mnist", "synthetic")


def check_num_classes(config, dataset_classes: int) -> None:
  """classifier.num_classes, when set (> 0), must cover the `dataset_classes` classes of
  config.data: a smaller head would get empty one-hot targets for the labels beyond it."""
  n = config.classifier.num_classes
  if n and n < dataset_classes:
    raise config_error(
        "classifier.num_classes", n, f"0 (the dataset's class count) or at least the "
        f"{dataset_classes} classes of data.source={config.data.source!r}",
        f"Its labels run to {dataset_classes - 1}: a head of {n} outputs has none for the "
        f"labels from {n} on, whose one-hot targets would be empty. More classes than the "
        "dataset has are fine (an unused output stays unused).")


# --- fields read only under a condition --------------------------------------------------------

# (fields, reads(config) -> bool, why): each field is read only when `reads` holds; otherwise
# it must keep its default, so that an override never silently does nothing.
UNREAD_RULES: list[tuple[tuple[str, ...], Callable[[Any], bool], str]] = [
    # Continued pre-training: the method's own rule (methods.base.PretrainingMethod).
    (("model.weight_init",),
     lambda c: "classifier" not in c or not pretrained.is_pretrained(c.get("init_from", "")),
     "an evaluation's encoder weights all come from init_from (its head has its own init)"),
    (("optimizer.b1", "optimizer.b2", "optimizer.eps", "optimizer.mu_dtype"),
     lambda c: c.optimizer.name == "adamw", "only optimizer.name='adamw' reads it"),
    (("optimizer.momentum",), lambda c: c.optimizer.name in ("lars", "sgd"),
     "only optimizer.name='lars' or 'sgd' reads it"),
    (("optimizer.trust_coefficient",), lambda c: c.optimizer.name == "lars",
     "only optimizer.name='lars' reads it"),
    (("optimizer.decay_epochs", "optimizer.decay_factor"),
     lambda c: c.optimizer.schedule == "multistep", "only optimizer.schedule='multistep' reads it"),
    (("optimizer.min_lr",),
     lambda c: c.optimizer.schedule == "cosine" and c.optimizer.warmup_epochs < c.num_epochs,
     "only optimizer.schedule='cosine' reads it, after the warmup (multistep decays by "
     "decay_factor; warmup_epochs = num_epochs leaves no decay to end at min_lr)"),
    (("optimizer.clip_per_tensor",), lambda c: c.optimizer.clip_grad_norm > 0,
     "only clipping (optimizer.clip_grad_norm > 0) reads it"),
    (("optimizer.weight_decay_end",), lambda c: c.optimizer.weight_decay_schedule == "cosine",
     "only optimizer.weight_decay_schedule='cosine' reads it"),
    (("masking.mask_patch_size",), lambda c: c.masking.kind == "grouped",
     "only masking.kind='grouped' reads it"),
    (("masking.min_block", "masking.min_aspect", "masking.exact_count"),
     lambda c: c.masking.kind == "blockwise",
     "only masking.kind='blockwise' reads it"),
    # Every kind drawn in the input pipeline honours a per-sample ratio (MaskGenerator._variable,
    # iBOT's 'block' and 'rand' shapes); attention masks are chosen in the step (refused there).
    (("masking.ratio",), lambda c: not c.masking.ratio_range,
     "masking.ratio_range sets each sample's ratio instead"),
    (("masking.block", "masking.adjust"), lambda c: c.masking.kind == "inverse_block",
     "only masking.kind='inverse_block' reads it"),
    (("masking.attention_order", "masking.random_share"),
     lambda c: c.masking.kind == "attention", "only masking.kind='attention' reads it"),
    (("data.path",), lambda c: c.data.source in ("fashion_mnist", "image_folder", "npy"),
     "only data.source 'fashion_mnist', 'image_folder' and 'npy' read it"),
    (("data.eval_path",),
     lambda c: c.data.source == "image_folder"
     and c.data.eval_split not in (data.sources.HOLDOUT_SPLIT, c.data.split),
     "only data.source='image_folder' reads it, for an eval_split other than the training "
     "folder's data.split and 'holdout' (both read data.path)"),
    (("data.tfds_name", "data.tfds_data_dir"), lambda c: c.data.source == "tfds",
     "only data.source='tfds' reads it"),
    (("data.synthetic_size", "data.synthetic_classes"), lambda c: c.data.source == "synthetic",
     "only data.source='synthetic' reads it"),
    # Labels are read by evaluations, the k-NN monitor and the label-stratified subsets; a
    # pre-training run without them trains on the images alone.
    (("data.synthetic_classes",),
     lambda c: c.data.source != "synthetic" or defaults.scores_eval_split(c)
     or c.data.get("label_fraction", 1.0) < 1 or c.data.get("holdout", 0) > 0,
     "no label is read: the run scores no evaluation split (knn.every_epochs=0) and takes no "
     "data.label_fraction subset or data.holdout"),
    (("data.split",), lambda c: c.data.source != "synthetic",
     "data.source='synthetic' has the same images for every split"),
    (("data.split",), lambda c: c.data.source != "image_folder",
     "data.source='image_folder' trains on the folder data.path whatever the split's name "
     "(evaluation splits other than 'holdout' read data.eval_path)"),
    (("data.eval_split",),
     lambda c: c.data.source != "synthetic" or c.data.eval_split == data.sources.HOLDOUT_SPLIT,
     "data.source='synthetic' has the same images for every split (only 'holdout', training "
     "examples held out by data.holdout, is other images)"),
    # Fashion-MNIST's IDX arrays and generated images cannot be undecodable (a malformed IDX
    # file is an error of its own): only decoded files and free-form arrays can be bad.
    (("data.on_bad_image",), lambda c: c.data.source in ("image_folder", "tfds", "npy"),
     "only data.source 'image_folder', 'tfds' and 'npy' can hold undecodable images"),
    (("knn.k", "knn.temperature", "data.eval_split", "data.eval_path", "eval.batch_size"),
     defaults.scores_eval_split,
     "the k-NN monitor is off (knn.every_epochs=0), and nothing else of a pre-training run "
     "scores an evaluation split"),
    (("classifier.probe_layer", "classifier.pool", "model.weight_init"),
     lambda c: c.classifier.get("features") != "pixels",
     "classifier.features='pixels' runs no encoder (no block to read, no tokens to pool)"),
    (("viz_num_images", "viz_channels"), lambda c: c.viz_every > 0,
     "pictures are off (viz_every=0)"),
    (("data.subset_seed",), lambda c: c.data.label_fraction < 1 or c.data.holdout > 0,
     "it draws only a label subset (data.label_fraction < 1) or a holdout (data.holdout > 0)"),
    (("data.prefetch_buffer_size",), lambda c: c.data.num_workers > 0,
     "only worker processes (data.num_workers > 0) prefetch"),
    # 0 says what a device-resident split does anyway (tests set it everywhere).
    (("data.num_workers", "data.prefetch_buffer_size"),
     lambda c: not c.data.device_resident or c.data.num_workers == 0,
     "a device-resident split (data.device_resident=True) is read by no worker processes "
     "(data.num_workers=0 says so and is accepted)"),
]


def check_unread(config, defaults, method_rules=(), reference: str = "default") -> None:
  """Raises ConfigError for a field that differs from its value in `defaults` while its rule
  (UNREAD_RULES, or the method's own) says the config does not read it.

  `defaults` is the method's base config (every field a config file or a program sets is
  checked), or, for a command line, the config file as loaded without its overrides
  (`reference="config file's value"`): then only what the command line changed is checked, so
  an override that switches a feature off (e.g. viz_every=0) does not make the file's settings
  for that feature errors.
  """
  for fields, reads, why in [*UNREAD_RULES, *method_rules]:
    # Values first: a condition may read files (continued pre-training's source metadata).
    changed = [f for f in fields if _has(config, f) and _has(defaults, f)
               and _normal(get(config, f)) != _normal(get(defaults, f))]
    if not changed or rule_reads(reads, config):
      continue
    field = changed[0]
    value, default = get(config, field), get(defaults, field)
    raise ConfigError(f"config.{field}={value!r} is not used: {why}. Leave it at its "
                      f"{reference} ({default!r}) or change the setting that would read it.")


def refuse_overrides_a_tool_ignores(config, file_config, overridden, *, read, tool: str,
                                    reads: str) -> None:
  """ConfigError for a command-line override (`overridden`: {dotted field: value}) that
  `tool` (e.g. "mim_jax.data.stats") would not act on: a field outside `read` (`reads` says
  what it reads, for the message), then one the fields beside it make moot (UNREAD_RULES,
  against `file_config`, the config file's own values, as the trainer refuses it)."""
  for field, value in sorted(overridden.items()):
    if field not in read:
      raise ConfigError(f"config.{field}={value!r} is not read by {tool}: it reads {reads}. "
                        "Drop the flag.")
  check_unread(config, file_config, reference="config file's value")


def rule_reads(reads, config) -> bool:
  """Whether an UNREAD_RULES condition holds for `config` (a rule whose condition field the
  config lacks counts as reading: nothing to check)."""
  try:
    return bool(reads(config))
  except (AttributeError, KeyError):
    return True  # the rule's condition field is absent: nothing to check


def _has(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      return False
    node = node[part]
  return True


def _normal(value):
  return tuple(_normal(v) for v in value) if isinstance(value, (tuple, list)) else value


# --- with the mesh -----------------------------------------------------------------------------

def validate_for_devices(config, *, batch_parallelism: int, process_count: int,
                         mesh_desc: str = "") -> None:
  """Checks that need the mesh: the batch must split evenly over devices and accumulation.
  `mesh_desc` (parallel.describe_mesh) is named in the message."""
  per_step = batch_parallelism * config.grad_accum_steps
  if config.global_batch_size % per_step:
    raise config_error(
        "global_batch_size", config.global_batch_size,
        f"a multiple of (data-parallel devices {batch_parallelism}) x (grad_accum_steps "
        f"{config.grad_accum_steps}) = {per_step}",
        f"The batch is split over the data and fsdp axes of the {mesh_desc}." if mesh_desc
        else "")
  if config.global_batch_size % process_count:
    raise config_error("global_batch_size", config.global_batch_size,
                       f"a multiple of the number of processes {process_count}")


def validate_eval_for_devices(config, batch_parallelism: int) -> None:
  """The evaluation batch must split evenly over the data-parallel devices."""
  if "eval" in config and config.eval.batch_size % batch_parallelism:
    raise config_error("eval.batch_size", config.eval.batch_size,
                       f"a multiple of the data-parallel device count {batch_parallelism}")


__all__ = ["ConfigError", "require", "validate_shared", "validate_for_devices",
           "validate_eval_for_devices", "check_unread"]
