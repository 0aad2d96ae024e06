"""Config fields every method shares, the blocks several methods compose, and recipe helpers.

A config holds exactly the fields its method reads: `registry.base_config(method)` starts from
`core_fields` and lets the method class add its own (`Method.add_config`), usually through the
blocks here (`training_fields`, `pretraining_fields`, `masking_block`, ...). Config files in
`configs/` start from it and change what their recipe needs, so `--config.x=y` overrides are
type-checked by ml_collections, and an override of a field the method does not read is refused
by name ("config.ibot.momentum is not used by method='mae'").
"""

from __future__ import annotations

import ml_collections

from mim_jax.models.vit import parse_variant

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FMNIST_PATH = "/usr/share/datasets/fashion-mnist"
# The Fashion-MNIST demo encoder: 6 blocks, 128 wide, 4-px patches (minutes on 2 CPU cores).
FMNIST_DEMO_MODEL = dict(variant="Ti/4", width=128, depth=6, num_heads=4, mlp_dim=512)


def _block(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def core_fields(c: ml_collections.ConfigDict) -> None:
  """What every method reads: its name, seed, the input geometry, the encoder and the data."""
  c.method = ""
  c.seed = 0
  # XLA compiler options of this run's programs, as in XLA_FLAGS but per run
  # (training/compiler_options.py): e.g. "--xla_backend_optimization_level=0".
  c.compiler_options = ""
  # Input geometry: (height, width) and channels of the images the model sees.
  c.image_size = (224, 224)
  c.channels = 3
  c.model = _block(
      variant="B/16",          # SIZE/PATCH, SIZE in mu, Ti, S, B, L, H
      # Non-zero values override the variant's size (an unpublished size, e.g. for CPU demos).
      width=0,
      depth=0,
      num_heads=0,
      mlp_dim=0,
      dtype="float32",         # computation dtype; parameters are always float32
      # "": cuDNN's fused kernel on GPU (odd lengths padded), heads-major XLA attention with
      # blockwise qkv matmuls on CPU (faster there), XLA elsewhere; or "xla" / "cudnn" /
      # "heads_major" (models/attention.py); the same parameters and function in every case
      attention_impl="",
      # BEiT-style options (models/vit.py): the initial per-channel scale of each residual
      # branch (0: none), a learned relative position bias ("" | "shared" | "per_block"),
      # and whether absolute positions (2-D sin-cos; learned when fine-tuning) are added.
      layer_scale=0.0,
      rel_pos_bias="",
      abs_posemb=True,
      pre_norm=False,          # a LayerNorm before the first block (CLIP's ln_pre)
      mlp_act="gelu",          # MLP activation: exact "gelu", or "quick_gelu" (OpenAI CLIP)
      # How the encoder's weights start (models/initializers.py weight_inits): "xavier" (the
      # official MAE), "beit" (BEiT, BEiT v2, data2vec, SimMIM: N(0, 0.02) cut at +-0.02, branch
      # outputs divided by sqrt(2 * layer)), "dino" (DINO's ViT, iBOT's release: N(0, 0.02),
      # the patch embedding at PyTorch's default, a zero mask token) or "data2vec2" (data2vec
      # 2.0's: N(0, 0.02), a Xavier patch embedding, a N(0, 1) cls token); init_from's weights
      # keep their values.
      weight_init="xavier",
  )
  c.data = _block(
      source="tfds",           # fashion_mnist | image_folder | tfds | npy | synthetic
      path="",                 # fashion_mnist / image_folder root; npy: DIR with SPLIT.npy
      split="train",
      tfds_name="imagenet2012",
      tfds_data_dir="",
      synthetic_size=10_000,
      synthetic_classes=10,    # synthetic labels: image index % synthetic_classes
      on_bad_image="skip",     # skip (warn + count) | raise
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      label_fraction=1.0,      # low-label runs: keep this fraction of every training class
      subset_seed=0,           # picks that subset; not `seed`, so every seed sees the same labels
      # Validation: this many training examples (the same share of every class, picked by
      # subset_seed) are left out of training and read as split "holdout"; choose
      # hyper-parameters with eval_split="holdout", never on the test split.
      holdout=0,
      eval_split="",           # split scored by evaluations; "" = the source's usual one
                               # (fashion_mnist "test", tfds "validation", image_folder eval_path)
      eval_path="",            # image_folder: folder of the evaluation images (path = train)
  )


def training_fields(c: ml_collections.ConfigDict) -> None:
  """What every method trained by the loop reads: batch, schedule, optimizer, sharding,
  logging, checkpoints and the reliability limits."""
  # Device mesh (training/parallel.py, docs/scaling.md); the batch is split over its data and
  # fsdp axes. A tuple, so that the command line can override it: --config.mesh='(("fsdp", -1),)'
  # (Frozen-feature jobs run on one device and have no mesh.)
  c.mesh = (("data", -1),)
  c.model.remat = "none"       # per-block activation checkpointing: "none", "full",
                               # "dots_saveable", "nothing_saveable" (models/vit.py)
  c.model.drop_path_rate = 0.0
  c.data.update(
      num_workers=8,           # grain worker processes for decode + augmentation
      prefetch_buffer_size=2,
      crop_scale=(0.2, 1.0),   # RandomResizedCrop area range
      crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
      hflip=True,
      # timm's RandAugment after crop and flip (data/rand_augment.py), as its config string:
      # "" (off) or e.g. "rand-m9-mstd0.5-inc1" (MAE / BEiT fine-tuning); 8-bit images.
      rand_augment="",
      # Probability of timm's random erasing (one rectangle of per-pixel noise) on the
      # normalised image: 0 (off) or e.g. 0.25 (MAE / BEiT fine-tuning).
      random_erasing=0.0,
      # Where RandomResizedCrop, flip and normalisation run: "host" (grain workers, PIL) or
      # "device" (batched in the train step; the host draws the same boxes and flips, and
      # ships decoded images; sources whose images all have one size: fashion_mnist, npy,
      # synthetic).
      augment_on="host",
      # The training split decoded once and held in device memory, batches gathered there
      # (data/device_resident.py): no per-image host work, for small datasets on fast
      # accelerators. Needs augment_on="device"; at most 4 GiB per device.
      device_resident=False,
  )
  c.global_batch_size = 4096
  c.grad_accum_steps = 1
  c.num_epochs = 800           # length of the lr schedule
  c.total_steps = -1           # stop after this global step (-1: the whole schedule)
  c.optimizer = _block(
      name="adamw",            # adamw | lars | sgd
      base_lr=1.5e-4,
      lr_batch_reference=256,  # lr = base_lr * global_batch_size / lr_batch_reference
      min_lr=0.0,              # cosine: the lr at the end
      b1=0.9,                  # adamw
      b2=0.95,                 # adamw
      eps=1e-8,                # adamw
      mu_dtype="",             # adamw first moment: "" (float32, as the params) or "bfloat16"
      weight_decay=0.05,
      weight_decay_schedule="constant",  # or "cosine": weight_decay -> weight_decay_end
      weight_decay_end=0.0,    # cosine weight decay: the coefficient at the end
      warmup_epochs=40.0,
      schedule="cosine",       # after warmup: "cosine" (half-cosine to min_lr) or "multistep"
      decay_epochs=(),         # multistep: epochs at which the lr is multiplied by decay_factor
      decay_factor=0.1,        # multistep
      clip_grad_norm=0.0,      # 0 disables clipping
      clip_per_tensor=False,   # True: each parameter's gradient clipped on its own (DINO/iBOT)
      momentum=0.9,            # lars / sgd
      trust_coefficient=0.001,  # lars
  )
  # Parameter sharding rules (`fsdp_rules()` is the fully-sharded preset), e.g.
  #   --config.sharding_rules='((".*", "largest:fsdp:16384"),)'
  c.sharding_rules = ((".*", ()),)  # replicate every parameter (pure data parallelism)
  # The train step: "jit", the global step with the batch sharded over the mesh (XLA inserts
  # the communication; any sharding rules), or "shard_map", the per-device step with explicit
  # collectives over the batch axes (replicated state; training/step.py).
  c.parallel = _block(step="jit")
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  # Reliability (docs/reliability.md): a step with a NaN/Inf loss or gradient is skipped; this
  # many in a row stop the run (exit 3). This many failed checkpoint writes in a row stop it
  # too (exit 4) rather than training on without checkpoints.
  c.max_consecutive_nonfinite = 10
  # How a skipped step keeps its state (training/step.py): "select" (the update computed, the
  # old state kept by a select per leaf), "cond" (the update inside lax.cond) or "" (cond on a
  # CPU, where it is measured faster, select elsewhere). The same results either way.
  c.nonfinite_guard = ""
  c.max_consecutive_failed_saves = 3


def init_from_field(c: ml_collections.ConfigDict) -> None:
  """`init_from`: weights to start from. Evaluations: a finished pre-training or fine-tuning
  workdir (its `encoder/` export) or an encoder directory, whose model.json fixes the encoder
  size and patch; "random" keeps the seeded random initialisation (a baseline). Pre-training:
  continue from a workdir, an export or an imported checkpoint whose encoder fits the
  configured one."""
  c.init_from = ""


def masking_block(**overrides) -> ml_collections.ConfigDict:
  """`config.masking` (objectives/masking.py); fields a kind does not read must keep their
  defaults."""
  return _block(**{**dict(
      # random | grouped (SimMIM) | blockwise (BEiT) | inverse_block (data2vec 2.0) |
      # attention (AttMask; methods with a teacher)
      kind="random",
      ratio=0.75,              # masked fraction (blockwise: budget int(N * ratio) per sample)
      mask_patch_size=0,       # grouped: side of a mask group in pixels (0: the patch size)
      min_block=16,            # blockwise: minimum rectangle area in patches
      min_aspect=0.3,          # blockwise: aspect ratios in [min_aspect, 1 / min_aspect]
      exact_count=False,       # blockwise: top up a short mask to exactly its budget (BEiT v2)
      ratio_range=(),          # (lo, hi) draws each sample's ratio from U(lo, hi)
      mask_probability=1.0,    # fraction of samples masked (the rest stay whole)
      block=3,                 # inverse_block: side of a visible block in patches
      adjust=0.07,             # inverse_block: extra keep probability for the block count
      attention_order="high",  # attention: mask the most ("high") or least ("low") attended
      random_share=0.0,        # attention: share of the masked patches drawn at random
  ), **overrides})


def pretraining_fields(c: ml_collections.ConfigDict, *, masking: bool = True,
                       pictures: bool = True) -> None:
  """What pre-training methods share: init_from (continued pre-training), masking, pictures
  (for methods that draw), the encoder export and the k-NN monitor (frozen cls / mean-pooled
  encoder output, weighted k-NN on data.eval_split every `knn.every_epochs`; 0 = off)."""
  init_from_field(c)
  if masking:
    c.masking = masking_block()
  if pictures:
    c.viz_every = 1000         # 0 disables reconstruction pictures
    c.viz_num_images = 8
    # Channels the pictures show: () = the image's own 1 or 3 (the first 3 of more); (k,) one
    # channel in grayscale; (a, b, c) three as RGB.
    c.viz_channels = ()
  c.export_encoder = True
  c.knn = _block(k=20, temperature=0.07, every_epochs=0.0)
  c.eval = _block(batch_size=256)  # batch of the k-NN monitor's feature passes


def classifier_block(**fields) -> ml_collections.ConfigDict:
  """`config.classifier` with the given fields (each evaluation reads a different subset)."""
  known = dict(
      num_classes=0,           # 0: from the dataset
      pool="cls",              # cls token, or "gap": mean of the patch tokens
      features="encoder",      # "encoder", or "pixels" (raw-pixel baseline)
      probe_layer=0,           # features of block k (0: the encoder output)
      head_init_std=0.01,      # truncated-normal std of the head (MAE: 0.01 probe, 2e-5 fine-tune)
      label_smoothing=0.0,
      mixup_alpha=0.0,         # fine-tuning Mixup / CutMix (timm semantics); 0 disables each
      cutmix_alpha=0.0,
      mixup_prob=1.0,
      mixup_switch_prob=0.5,
  )
  unknown = set(fields) - set(known)
  if unknown:
    raise KeyError(f"unknown classifier fields {sorted(unknown)}")
  return _block(**{k: known[k] if fields[k] is None else fields[k] for k in fields})


def override(c: ml_collections.ConfigDict, **dotted) -> ml_collections.ConfigDict:
  """Sets fields by dotted name in place, e.g. override(c, **{"model.dtype": "bfloat16"})."""
  for key, value in dotted.items():
    node = c
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c


def fsdp_rules(axis: str = "fsdp", min_size: int = 2**14) -> tuple[tuple[str, str], ...]:
  """Pure FSDP: every state leaf of >= `min_size` elements (params, both Adam moments, EMA
  teachers, tokenizers) split along its largest dimension that the `axis` size divides;
  smaller leaves (biases, norms, counters) replicated. Use with a mesh that has `axis`, e.g.
  mesh=[("fsdp", -1)]; on the command line:
    --config.mesh='(("fsdp", -1),)' --config.sharding_rules='((".*", "largest:fsdp:16384"),)'
  or the config argument `fsdp` of the MAE ImageNet recipes (configs/mae_vit*.py:fsdp).
  """
  return ((".*", f"largest:{axis}:{int(min_size)}"),)


def apply_scale_args(c: ml_collections.ConfigDict, args: dict) -> ml_collections.ConfigDict:
  """Config arguments for large runs: `fsdp` (all devices on one fsdp axis, `fsdp_rules()`),
  `remat=POLICY` (model.remat) and `bf16` (model.dtype=bfloat16)."""
  if args.get("fsdp"):
    c.mesh = (("fsdp", -1),)
    c.sharding_rules = fsdp_rules()
  if "remat" in args:
    c.model.remat = "full" if args["remat"] is True else str(args["remat"])
  if args.get("bf16"):
    c.model.dtype = "bfloat16"
  return c


SCALE_ARGS = ("fsdp", "remat", "bf16")


def parse_arg(arg: str | None,
              allowed: tuple[str, ...] = ("variant", "runlocal")) -> dict[str, str | bool]:
  """Parses a config argument like "variant=L/16,runlocal" into
  {"variant": "L/16", "runlocal": True}."""
  out: dict[str, str | bool] = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    out[key.strip()] = value.strip() if sep else True
  unknown = set(out) - set(allowed)
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
  return out


def apply_runlocal(c: ml_collections.ConfigDict,
                   keep_data: bool = False) -> ml_collections.ConfigDict:
  """Shrinks any recipe to a seconds-long smoke run (used by CI).

  The model becomes the micro size with the recipe's patch size; unless `keep_data`, the data
  become synthetic images of 2 x 2 patches. An evaluation that keeps its real data scores
  1,000 held-out training images against 5% of the rest (not 10,000 test images against
  60,000 on Fashion-MNIST). Only the fields the config has are touched.
  """
  _, patch = parse_variant(c.model.variant)  # a bad variant named as given, before mu/ replaces it
  # Two steps of a micro model are bound by compilation: LLVM's lowest optimisation level
  # compiles a step about 1.4x faster (a Fashion-MNIST MAE smoke run 11 s instead of 16).
  c.compiler_options = "--xla_backend_optimization_level=0"
  c.model.variant = f"mu/{patch}"
  c.model.update({k: 0 for k in ("width", "depth", "num_heads", "mlp_dim") if k in c.model})
  if "decoder" in c:
    c.decoder.update({k: v for k, v in dict(width=32, depth=1, num_heads=2).items()
                      if k in c.decoder})
  if "num_workers" in c.data:
    c.data.num_workers = 0
  if not keep_data:
    c.image_size = (2 * patch, 2 * patch)
    c.data.update(source="synthetic", synthetic_size=64)
  if "optimizer" in c:
    # min_lr is absolute while the peak scales with the batch: keep the recipe's ratio (BEiT's
    # 1e-5 would lie above the peak of 8 images).
    c.optimizer.min_lr *= 8 / c.global_batch_size
    c.global_batch_size = 8
    c.num_epochs = 1
    c.optimizer.warmup_epochs = 0.5
    c.total_steps = 2
    c.log_every = 1
    c.checkpoint_every = 2
  if "viz_every" in c:
    c.viz_every = 2
  if "eval" in c and scores_eval_split(c):
    c.eval.batch_size = 8
    if keep_data:
      c.data.update(holdout=1000, eval_split="holdout", label_fraction=0.05)
  return c


def scores_eval_split(c: ml_collections.ConfigDict) -> bool:
  """Whether a run of `c` scores an evaluation split (and so reads eval.batch_size, eval_split
  and the k-NN settings): an evaluation always, a pre-training run only through its k-NN
  monitor. The presets set those fields only then; validation refuses them otherwise."""
  return "knn" not in c or "every_epochs" not in c.knn or c.knn.every_epochs > 0


def use_fashion_mnist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """28x28 grayscale Fashion-MNIST from the Debian package, batch 256 (all fmnist recipes)."""
  c.image_size = (28, 28)
  c.channels = 1
  # Tokenizers read only the variant (its patch sets the code grid).
  c.model.update({k: v for k, v in FMNIST_DEMO_MODEL.items() if k in c.model})
  c.data.update(source="fashion_mnist", path=FMNIST_PATH, split="train", mean=FMNIST_MEAN,
                std=FMNIST_STD)
  if "num_workers" in c.data:
    c.data.num_workers = 1
  if "crop_scale" in c.data:
    c.data.crop_scale = (0.35, 1.0)  # crops below ~1/3 of a 28x28 image are mostly blur
  if "optimizer" in c:
    c.global_batch_size = 256
  if "eval" in c and scores_eval_split(c):
    c.eval.batch_size = 1000
  return c
