"""Checks a config before any data is read or anything is compiled.

Each failure raises `ConfigError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import numbers

from mim_jax import continuation
from mim_jax.config_errors import ConfigError, config_error
from mim_jax.masking import MASK_KINDS, num_visible
from mim_jax.models.vit import parse_variant, size_from_config

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots_saveable", "nothing_saveable")  # models/vit.py
# Visible-only encoders (MAE) need the same masked count in every sample; methods that encode
# all tokens with mask tokens take any kind.
FIXED_COUNT_MASK_KINDS = ("random", "grouped", "inverse_block")
MASK_KINDS_BY_METHOD = {"mae": FIXED_COUNT_MASK_KINDS, "simmim": MASK_KINDS,
                        "maskfeat": MASK_KINDS, "data2vec": MASK_KINDS, "beit": MASK_KINDS,
                        "ibot": MASK_KINDS}
HOG_GRADIENTS = ("sobel", "central")
PRETRAINING_METHODS = tuple(MASK_KINDS_BY_METHOD)
# Evaluations of a pre-trained encoder; knn trains nothing and is run by its own job.
EVALUATION_METHODS = ("linprobe", "finetune", "knn", "probe")
# Jobs on frozen features (evaluate/frozen.py): they compute features once and train nothing.
FEATURE_JOBS = ("knn", "probe")


def _require(ok: bool, field: str, value, allowed: str, hint: str = "") -> None:
  if not ok:
    raise config_error(field, value, allowed, hint)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _positive_int(config, field: str) -> int:
  value = config[field] if "." not in field else _get(config, field)
  _require(_is_int(value) and value > 0, field, value, "a positive integer")
  return value


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate_model(config) -> None:
  from mim_jax.methods import METHODS  # here, not at import: methods import this module's peers
  known = sorted(set(METHODS) | set(EVALUATION_METHODS))
  _require(config.method in known, "method", config.method, f"one of {known}")
  parse_variant(config.model.variant)
  for name in ("width", "depth", "num_heads", "mlp_dim"):
    value = config.model[name]
    _require(_is_int(value) and value >= 0, f"model.{name}", value,
             "an integer >= 0 (0 keeps the size of model.variant)")
  size, patch = size_from_config(config.model)
  _require(size.width % size.num_heads == 0, "model.num_heads", size.num_heads,
           f"a divisor of the encoder width {size.width}")
  _require(config.model.dtype in DTYPES, "model.dtype", config.model.dtype, f"one of {DTYPES}")
  _require(config.model.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
           config.model.attention_impl, f"one of {ATTENTION_IMPLS} ('' lets JAX choose)")
  remat = config.model.get("remat", "none")
  _require(remat in REMAT_POLICIES, "model.remat", remat, f"one of {REMAT_POLICIES}")
  rate = config.model.drop_path_rate
  _require(_is_number(rate) and 0 <= rate < 1, "model.drop_path_rate", rate, "a number in [0, 1)")

  image_size = tuple(config.image_size)
  _require(len(image_size) == 2 and all(_is_int(s) and s > 0 for s in image_size),
           "image_size", image_size, "(height, width), two positive integers")
  for axis, s in zip(("height", "width"), image_size):
    _require(s % patch == 0, "image_size", image_size,
             f"each side divisible by the patch size {patch} of model.variant="
             f"{config.model.variant!r}; the {axis} {s} is not")
  _require(_is_int(config.channels) and config.channels > 0, "channels", config.channels,
           "a positive integer (1 for grayscale, 3 for RGB)")
  _require(size.width % 4 == 0, "model.variant", config.model.variant,
           "a width divisible by 4 (2-D sin-cos position embeddings)")
  from mim_jax.tokenizers import validation as tokenizer_validation
  if config.method in PRETRAINING_METHODS:
    validate_pretraining(config, image_size, patch)
  elif config.method in tokenizer_validation.TOKENIZER_METHODS:
    _require(config.init_from == "", "init_from", config.init_from,
             f"'' for method {config.method!r} (a tokenizer trains from scratch; BEiT reads a "
             "trained one through tokenizer.path)")
    tokenizer_validation.validate_tokenizer_training(config)
  else:
    validate_evaluation(config, size.depth)


def validate_pretraining(config, image_size: tuple[int, int], patch: int) -> None:
  if config.method == "mae":
    dec = config.decoder
    for name in ("width", "depth", "num_heads"):
      _positive_int(config, f"decoder.{name}")
    _require(dec.width % dec.num_heads == 0, "decoder.num_heads", dec.num_heads,
             f"a divisor of decoder.width={dec.width}")
    _require(dec.width % 4 == 0, "decoder.width", dec.width,
             "a multiple of 4 (2-D sin-cos position embeddings)")
  validate_masking(config, image_size, patch)
  emt = config.model.encoder_mask_tokens
  _require(isinstance(emt, bool), "model.encoder_mask_tokens", emt, "true or false")
  _require(not emt or config.method == "mae", "model.encoder_mask_tokens", emt,
           f"false for method {config.method!r} (its encoder always sees mask tokens; the "
           "option is MAE's 'w/ [M]' ablation)")
  _require(isinstance(config.target.norm_pix, bool), "target.norm_pix", config.target.norm_pix,
           "true or false")
  if config.method == "maskfeat":
    validate_hog(config, image_size, patch)
  if config.method == "beit":  # its frozen tokenizer exists and fits this config
    from mim_jax.tokenizers.validation import validate_beit_tokenizer
    validate_beit_tokenizer(config, image_size, patch)
  if config.method == "data2vec":
    validate_teacher(config)
  if config.method == "ibot":
    validate_ibot(config, image_size, patch)
  if continuation.wanted(config):
    continuation.check_source_fits(config)  # continued pre-training: the encoder must fit


def validate_ibot(config, image_size: tuple[int, int], patch: int) -> None:
  """iBOT's head, temperatures, teacher and loss weights (`config.ibot`) and its multi-crop
  views (`config.multicrop`)."""
  b = config.ibot
  for name in ("out_dim", "hidden_dim", "bottleneck_dim"):
    _positive_int(config, f"ibot.{name}")
  _require(isinstance(b.norm_last_layer, bool), "ibot.norm_last_layer", b.norm_last_layer,
           "true or false")
  for name in ("student_temp", "warmup_teacher_temp", "teacher_temp",
               "warmup_teacher_patch_temp", "teacher_patch_temp"):
    _require(_is_number(b[name]) and b[name] > 0, f"ibot.{name}", b[name],
             "a positive temperature (iBOT: student 0.1, teacher 0.04 -> 0.07)")
  for name in ("warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
    _require(_is_number(b[name]) and 0 <= b[name] <= config.num_epochs, f"ibot.{name}",
             b[name], f"a number of epochs in [0, num_epochs={config.num_epochs}]")
  _require(_is_number(b.momentum) and 0 <= b.momentum <= 1, "ibot.momentum", b.momentum,
           "a number in [0, 1] (iBOT: 0.996, annealed to 1)")
  _require(_is_number(b.center_momentum) and 0 <= b.center_momentum < 1,
           "ibot.center_momentum", b.center_momentum, "a number in [0, 1) (iBOT: 0.9)")
  for name in ("lambda_cls", "lambda_patch"):
    _require(_is_number(b[name]) and b[name] >= 0, f"ibot.{name}", b[name],
             "a number >= 0 (iBOT: 1.0)")
  _require(b.lambda_cls + b.lambda_patch > 0, "ibot.lambda_patch", b.lambda_patch,
           "a positive weight when ibot.lambda_cls is 0 (one loss must remain)")
  c = config.multicrop
  for name in ("global_scale", "local_scale"):
    pair = tuple(c[name]) if isinstance(c[name], (tuple, list)) else ()
    _require(len(pair) == 2 and all(_is_number(x) for x in pair) and 0 < pair[0] <= pair[1] <= 1,
             f"multicrop.{name}", c[name], "(min, max) area fractions, 0 < min <= max <= 1")
  _require(_is_int(c.num_local) and c.num_local >= 0, "multicrop.num_local", c.num_local,
           "an integer >= 0 (iBOT: 10 local views; 0: global views only)")
  size = tuple(c.local_size)
  _require(len(size) == 2 and all(_is_int(s) and s > 0 and s % patch == 0 for s in size),
           "multicrop.local_size", c.local_size,
           f"(height, width), positive multiples of the patch size {patch} (iBOT: 96)")
  _require(all(s <= g for s, g in zip(size, image_size)), "multicrop.local_size",
           c.local_size, f"at most image_size={tuple(image_size)} on each side")
  for name in ("jitter_prob", "grayscale_prob", "solarize_prob"):
    _require(_is_number(c[name]) and 0 <= c[name] <= 1, f"multicrop.{name}", c[name],
             "a probability in [0, 1]")
  _require(isinstance(c.blur, bool), "multicrop.blur", c.blur, "true or false")


def validate_teacher(config) -> None:
  """data2vec's EMA teacher and targets (`config.teacher`)."""
  from mim_jax.methods.data2vec import NORMS
  t = config.teacher
  depth = size_from_config(config.model)[0].depth
  _require(_is_int(t.top_k) and 1 <= t.top_k <= depth, "teacher.top_k", t.top_k,
           f"an integer in [1, {depth}] (the encoder depth; data2vec ViT-B: 6 of 12 blocks)")
  for name in ("ema_decay", "ema_end_decay"):
    _require(_is_number(t[name]) and 0 <= t[name] <= 1, f"teacher.{name}", t[name],
             "a number in [0, 1] (data2vec: 0.999 -> 0.9998)")
  _require(t.ema_end_decay >= t.ema_decay, "teacher.ema_end_decay", t.ema_end_decay,
           f"at least teacher.ema_decay={t.ema_decay} (the teacher slows down, never speeds up)")
  frac = t.ema_anneal_fraction
  _require(_is_number(frac) and 0 <= frac <= 1, "teacher.ema_anneal_fraction", frac,
           "a fraction of the lr schedule in [0, 1] (0: ema_end_decay from the start)")
  for name in ("block_norm", "final_norm"):
    _require(t[name] in NORMS, f"teacher.{name}", t[name], f"one of {NORMS}")
  _require(_is_number(t.loss_beta) and t.loss_beta >= 0, "teacher.loss_beta", t.loss_beta,
           "a number >= 0 (0: L1; data2vec: 2)")


def validate_masking(config, image_size: tuple[int, int], patch: int) -> None:
  m = config.masking
  kinds = MASK_KINDS_BY_METHOD[config.method]
  if config.method == "mae" and m.kind == "blockwise":
    raise config_error(
        "masking.kind", m.kind, f"one of {kinds} for method 'mae'",
        "MAE's encoder sees only the visible patches, so every sample must mask the same number "
        "of patches; blockwise masks vary in count per sample. Use a mask-token method "
        "(simmim, maskfeat) for blockwise masking, or 'random' / 'grouped' / 'inverse_block'.")
  _require(m.kind in kinds, "masking.kind", m.kind, f"one of {kinds} for method {config.method!r}")
  ratio = m.ratio
  _require(_is_number(ratio) and 0 < ratio < 1, "masking.ratio", ratio,
           "a number strictly between 0 and 1 (MAE uses 0.75, SimMIM 0.6, BEiT / MaskFeat 0.4)")
  grid = (image_size[0] // patch, image_size[1] // patch)
  num_patches = grid[0] * grid[1]
  _require(num_visible(num_patches, ratio) >= 1, "masking.ratio", ratio,
           f"a ratio that leaves at least one of the {num_patches} patches visible")
  mask_patch = m.mask_patch_size
  _require(_is_int(mask_patch) and mask_patch >= 0, "masking.mask_patch_size", mask_patch,
           "an integer >= 0 (0: the model's patch size)")
  if mask_patch:
    _require(mask_patch % patch == 0, "masking.mask_patch_size", mask_patch,
             f"a multiple of the model's patch size {patch} (SimMIM: 32 over 16-px patches)")
    group = mask_patch // patch
    _require(grid[0] % group == 0 and grid[1] % group == 0, "masking.mask_patch_size",
             mask_patch, f"a size whose groups of {group}x{group} patches tile the {grid[0]}x"
             f"{grid[1]} patch grid of image_size={tuple(image_size)}")
    _require(m.kind == "grouped" or group == 1, "masking.mask_patch_size", mask_patch,
             f"0 or the patch size {patch} unless masking.kind='grouped'")
  ratio_range = tuple(m.get("ratio_range", ()))
  _require(ratio_range == () or (len(ratio_range) == 2 and all(_is_number(r) for r in ratio_range)
                                 and 0 <= ratio_range[0] <= ratio_range[1] < 1),
           "masking.ratio_range", ratio_range,
           "() (use masking.ratio) or (lo, hi) with 0 <= lo <= hi < 1 (iBOT: (0.1, 0.5))")
  prob = m.get("mask_probability", 1.0)
  _require(_is_number(prob) and 0 <= prob <= 1, "masking.mask_probability", prob,
           "a probability in [0, 1] (iBOT: 0.5)")
  _require(m.kind == "blockwise" or (ratio_range == () and prob == 1), "masking.kind", m.kind,
           "'blockwise' when masking.ratio_range or masking.mask_probability is set")
  _require(config.method != "mae" or (ratio_range == () and prob == 1),
           "masking.ratio_range", ratio_range, "() for method 'mae' (fixed masked counts)")
  if m.kind == "blockwise":
    _require(_is_int(m.min_block) and m.min_block > 0, "masking.min_block", m.min_block,
             "a positive integer (BEiT: 16 patches)")
    budget = int(num_patches * ratio)
    _require(m.min_block <= budget, "masking.min_block", m.min_block,
             f"at most the masking budget int({num_patches} x {ratio}) = {budget} patches")
    _require(_is_number(m.min_aspect) and 0 < m.min_aspect <= 1, "masking.min_aspect",
             m.min_aspect, "a number in (0, 1] (BEiT: 0.3)")
  if m.kind == "inverse_block":
    _require(_is_int(m.block) and 0 < m.block <= min(grid), "masking.block", m.block,
             f"a positive integer at most the patch grid side {min(grid)} (data2vec 2.0: 3)")
    _require(_is_number(m.adjust) and m.adjust >= 0, "masking.adjust", m.adjust,
             "a number >= 0 (data2vec 2.0: 0.07)")


def validate_hog(config, image_size: tuple[int, int], patch: int) -> None:
  h = config.target.hog
  _require(_is_int(h.cell_size) and h.cell_size > 0, "target.hog.cell_size", h.cell_size,
           "a positive integer (MaskFeat: 8)")
  _require(patch % h.cell_size == 0, "target.hog.cell_size", h.cell_size,
           f"a divisor of the patch size {patch} (each patch holds whole HOG cells)")
  _require(_is_int(h.num_bins) and h.num_bins > 0, "target.hog.num_bins", h.num_bins,
           "a positive integer (MaskFeat: 9)")
  _require(h.gradient in HOG_GRADIENTS, "target.hog.gradient", h.gradient,
           f"one of {HOG_GRADIENTS}")
  window = h.gaussian_window
  _require(_is_int(window) and window >= 0, "target.hog.gaussian_window", window,
           "an integer >= 0 (0: no Gaussian weighting; MaskFeat: 16)")
  if window:
    _require(image_size[0] % window == 0 and image_size[1] % window == 0,
             "target.hog.gaussian_window", window,
             f"a divisor of both image sides {tuple(image_size)} (the window is tiled)")


def validate_evaluation(config, depth: int) -> None:
  """linprobe / finetune / knn: the classifier, k-NN and evaluation fields."""
  from mim_jax.models.heads import POOLS
  c = config.classifier
  _require(c.features in ("encoder", "pixels"), "classifier.features", c.features,
           "'encoder' or 'pixels' (the raw-pixel baseline, for linprobe and knn)")
  if config.method == "finetune":
    _require(c.features == "encoder", "classifier.features", c.features,
             "'encoder' for finetune")
  if c.features == "pixels":
    _require(config.init_from == "", "init_from", config.init_from,
             "'' with classifier.features='pixels' (the raw-pixel baseline loads no encoder)")
  if config.method in ("linprobe",) + FEATURE_JOBS and c.features == "encoder":
    _require(isinstance(config.init_from, str) and config.init_from != "", "init_from",
             config.init_from, f"a pre-training workdir or encoder directory ({config.method} "
             "evaluates a pre-trained encoder), or 'random' for a random-encoder baseline")
  if config.init_from not in ("", "random"):
    from mim_jax.evaluate.pretrained import encoder_directory
    encoder_directory(config.init_from)  # raises a ConfigError naming init_from
  _require(_is_int(c.num_classes) and c.num_classes >= 0, "classifier.num_classes",
           c.num_classes, "an integer >= 0 (0: the dataset's class count)")
  _require(c.pool in POOLS, "classifier.pool", c.pool, f"one of {POOLS}")
  _require(_is_int(c.probe_layer) and 0 <= c.probe_layer <= depth, "classifier.probe_layer",
           c.probe_layer, f"an integer in [0, {depth}] (0: encoder output, k: block k)")
  _require(_is_number(c.head_init_std) and c.head_init_std > 0, "classifier.head_init_std",
           c.head_init_std, "a positive number")
  _require(_is_number(c.label_smoothing) and 0 <= c.label_smoothing < 1,
           "classifier.label_smoothing", c.label_smoothing, "a number in [0, 1)")
  for name in ("mixup_alpha", "cutmix_alpha"):
    _require(_is_number(c[name]) and c[name] >= 0, f"classifier.{name}", c[name],
             "a number >= 0 (0 disables it)")
  for name in ("mixup_prob", "mixup_switch_prob"):
    _require(_is_number(c[name]) and 0 <= c[name] <= 1, f"classifier.{name}", c[name],
             "a probability in [0, 1]")
  if config.method == "linprobe" and (c.mixup_alpha or c.cutmix_alpha):
    raise config_error("classifier.mixup_alpha", (c.mixup_alpha, c.cutmix_alpha),
                       "0 for linprobe (Mixup / CutMix apply to fine-tuning only)")
  _positive_int(config, "eval.batch_size")
  if config.method == "probe":
    validate_probe(config)
  _require(_is_number(config.eval.every_epochs) and config.eval.every_epochs >= 0,
           "eval.every_epochs", config.eval.every_epochs, "a number >= 0 (0: only at the end)")


def validate_probe(config) -> None:
  """The converged probe's L2 grid and stopping rule (`config.probe`)."""
  p = config.probe
  grid = tuple(p.l2_grid) if isinstance(p.l2_grid, (tuple, list)) else ()
  _require(len(grid) > 0 and all(_is_number(x) and x >= 0 for x in grid), "probe.l2_grid",
           p.l2_grid, "a non-empty tuple of L2 strengths >= 0, e.g. (1e-2, 1e-3, 1e-4)")
  _positive_int(config, "probe.max_iter")
  _require(_is_number(p.tol) and p.tol > 0, "probe.tol", p.tol, "a positive gradient norm")
  _require(_is_int(config.data.holdout) and config.data.holdout > 0, "data.holdout",
           config.data.holdout, "a positive number of training examples for method 'probe', "
           "which chooses its L2 strength on them (e.g. 5000 of Fashion-MNIST's 60,000)")


def validate_knn(config) -> None:
  k = config.knn
  _require(_is_int(k.k) and k.k > 0, "knn.k", k.k, "a positive integer (DINO uses 20)")
  _require(_is_number(k.temperature) and k.temperature > 0, "knn.temperature", k.temperature,
           "a positive number (DINO uses 0.07)")
  _require(_is_number(k.every_epochs) and k.every_epochs >= 0, "knn.every_epochs",
           k.every_epochs, "a number >= 0 (0: k-NN only as its own job)")
  if config.method not in PRETRAINING_METHODS:
    _require(k.every_epochs == 0, "knn.every_epochs", k.every_epochs,
             f"0 for method {config.method!r} (k-NN monitoring is for pre-training; classifiers "
             "report eval_accuracy)")


def validate_optimization(config) -> None:
  _positive_int(config, "global_batch_size")
  _positive_int(config, "grad_accum_steps")
  _require(config.global_batch_size % config.grad_accum_steps == 0, "global_batch_size",
           config.global_batch_size,
           f"a multiple of grad_accum_steps={config.grad_accum_steps}")
  _require(_is_number(config.num_epochs) and config.num_epochs > 0, "num_epochs",
           config.num_epochs, "a positive number")
  _require(_is_int(config.total_steps) and (config.total_steps == -1 or config.total_steps > 0),
           "total_steps", config.total_steps, "-1 (the whole schedule) or a positive integer")
  opt = config.optimizer
  from mim_jax.optim import OPTIMIZERS
  _require(opt.name in OPTIMIZERS, "optimizer.name", opt.name, f"one of {OPTIMIZERS}")
  _require(_is_number(opt.momentum) and 0 <= opt.momentum < 1, "optimizer.momentum",
           opt.momentum, "a number in [0, 1)")
  _require(_is_number(opt.layer_decay) and 0 < opt.layer_decay <= 1, "optimizer.layer_decay",
           opt.layer_decay, "a number in (0, 1] (1 disables layer-wise lr decay)")
  _require(opt.layer_decay == 1 or config.init_from not in ("", "random"),
           "optimizer.layer_decay", opt.layer_decay,
           "1.0 without init_from: layer-wise lr decay protects pre-trained lower layers, and "
           "a from-scratch encoder has none (it would only handicap the baseline)",
           "Set --config.optimizer.layer_decay=1.0 (configs/finetune_*.py:scratch does).")
  _require(_is_number(opt.trust_coefficient) and opt.trust_coefficient > 0,
           "optimizer.trust_coefficient", opt.trust_coefficient, "a positive number")
  _require(_is_number(opt.base_lr) and opt.base_lr > 0, "optimizer.base_lr", opt.base_lr,
           "a positive number")
  _require(_is_number(opt.lr_batch_reference) and opt.lr_batch_reference > 0,
           "optimizer.lr_batch_reference", opt.lr_batch_reference, "a positive number")
  _require(_is_number(opt.min_lr) and 0 <= opt.min_lr, "optimizer.min_lr", opt.min_lr,
           "a number >= 0")
  for name in ("b1", "b2"):
    _require(_is_number(opt[name]) and 0 <= opt[name] < 1, f"optimizer.{name}", opt[name],
             "a number in [0, 1)")
  _require(_is_number(opt.eps) and opt.eps > 0, "optimizer.eps", opt.eps, "a positive number")
  _require(_is_number(opt.weight_decay) and opt.weight_decay >= 0, "optimizer.weight_decay",
           opt.weight_decay, "a number >= 0")
  from mim_jax.optim import WEIGHT_DECAY_SCHEDULES
  wd_schedule = opt.get("weight_decay_schedule", "constant")
  _require(wd_schedule in WEIGHT_DECAY_SCHEDULES, "optimizer.weight_decay_schedule",
           wd_schedule, f"one of {WEIGHT_DECAY_SCHEDULES}")
  if wd_schedule == "cosine":
    _require(_is_number(opt.get("weight_decay_end")) and opt.weight_decay_end >= 0,
             "optimizer.weight_decay_end", opt.get("weight_decay_end"), "a number >= 0")
  _require(_is_number(opt.warmup_epochs) and 0 <= opt.warmup_epochs, "optimizer.warmup_epochs",
           opt.warmup_epochs, "a number >= 0")
  _require(opt.warmup_epochs <= config.num_epochs, "optimizer.warmup_epochs", opt.warmup_epochs,
           f"at most num_epochs={config.num_epochs}")
  from mim_jax.optim import SCHEDULES
  _require(opt.schedule in SCHEDULES, "optimizer.schedule", opt.schedule, f"one of {SCHEDULES}")
  if opt.schedule == "multistep":
    epochs = tuple(opt.decay_epochs)
    _require(all(_is_number(e) and opt.warmup_epochs <= e <= config.num_epochs for e in epochs)
             and list(epochs) == sorted(epochs), "optimizer.decay_epochs", epochs,
             f"increasing epochs between warmup_epochs={opt.warmup_epochs} and "
             f"num_epochs={config.num_epochs}")
    _require(_is_number(opt.decay_factor) and 0 < opt.decay_factor <= 1,
             "optimizer.decay_factor", opt.decay_factor, "a number in (0, 1]")
  _require(_is_number(opt.clip_grad_norm) and opt.clip_grad_norm >= 0, "optimizer.clip_grad_norm",
           opt.clip_grad_norm, "a number >= 0 (0 disables clipping)")


def validate_logging(config) -> None:
  for name in ("log_every", "checkpoint_every", "keep_checkpoints", "viz_num_images",
               "max_consecutive_nonfinite", "max_consecutive_failed_saves"):
    _positive_int(config, name)
  _require(_is_int(config.viz_every) and config.viz_every >= 0, "viz_every", config.viz_every,
           "an integer >= 0 (0 disables pictures)")
  _require(_is_int(config.seed), "seed", config.seed, "an integer")
  _require(isinstance(config.export_encoder, bool), "export_encoder", config.export_encoder,
           "true or false")


def validate_config(config) -> None:
  """Static checks (no devices, no files beyond the data paths). Raises ConfigError."""
  from mim_jax import data  # the data package validates its own sub-config
  validate_model(config)
  validate_knn(config)
  validate_optimization(config)
  validate_logging(config)
  data.validate_data_config(config.data, image_size=tuple(config.image_size),
                            channels=config.channels)


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
  if config.method in EVALUATION_METHODS and config.eval.batch_size % batch_parallelism:
    raise config_error("eval.batch_size", config.eval.batch_size,
                       f"a multiple of the data-parallel device count {batch_parallelism}")


__all__ = ["ConfigError", "validate_config", "validate_eval_for_devices", "validate_for_devices"]
