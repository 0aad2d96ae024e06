"""The full set of config fields with their defaults (MAE ViT-B/16 ImageNet recipe).

Config files in `configs/` start from `base_config()` and change what their recipe needs, so
every field exists in every config and `--config.x=y` overrides are type-checked by
ml_collections against these defaults.
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)
FMNIST_PATH = "/usr/share/datasets/fashion-mnist"
# The Fashion-MNIST demo encoder: 6 blocks, 128 wide, 4-px patches (minutes on 2 CPU cores).
FMNIST_DEMO_MODEL = dict(variant="Ti/4", width=128, depth=6, num_heads=4, mlp_dim=512)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "mae"             # a pre-training method, "linprobe", "finetune" or "knn"
  c.seed = 0
  # Evaluations start from a pre-trained encoder: a pre-training workdir (its `encoder/` export)
  # or an encoder directory; its model.json fixes the encoder size and patch. "random" keeps
  # the seeded random initialisation of config.model (a baseline).
  c.init_from = ""

  # Input geometry: (height, width) and channels of the images the model sees.
  c.image_size = (224, 224)
  c.channels = 3

  c.model = ml_collections.ConfigDict(dict(
      variant="B/16",          # SIZE/PATCH, SIZE in mu, Ti, S, B, L, H
      # Non-zero values override the variant's size (an unpublished size, e.g. for CPU demos).
      width=0,
      depth=0,
      num_heads=0,
      mlp_dim=0,
      dtype="float32",         # computation dtype; parameters are always float32
      attention_impl="",       # "" lets JAX choose, or "xla" / "cudnn" (layers cuDNN rejects: XLA)
      # Activation checkpointing per transformer block (encoder and decoder): "none", "full"
      # (recompute everything in the backward pass), "dots_saveable" (keep matmul outputs),
      # "nothing_saveable" (= full, by policy); see models/vit.py REMAT_POLICIES.
      remat="none",
      drop_path_rate=0.0,
      # MAE only: encode all patches with mask tokens instead of the visible ones (the MAE
      # paper's "w/ [M]" ablation; slower, for comparisons).
      encoder_mask_tokens=False,
  ))
  c.decoder = ml_collections.ConfigDict(dict(width=512, depth=8, num_heads=16))
  c.masking = ml_collections.ConfigDict(dict(
      kind="random",           # random | grouped (SimMIM) | blockwise (BEiT) | inverse_block
      ratio=0.75,              # masked fraction (blockwise: budget int(N * ratio) per sample)
      mask_patch_size=0,       # grouped: side of a mask group in pixels (0: the patch size)
      min_block=16,            # blockwise: minimum rectangle area in patches
      min_aspect=0.3,          # blockwise: aspect ratios in [min_aspect, 1 / min_aspect]
      block=3,                 # inverse_block: side of a visible block in patches
      adjust=0.07,             # inverse_block: extra keep probability for the block count
      ratio_range=(),          # blockwise: (lo, hi) draws each sample's ratio from U(lo, hi)
      mask_probability=1.0,    # blockwise: fraction of samples masked (the rest stay whole)
  ))
  c.target = ml_collections.ConfigDict(dict(
      norm_pix=True,           # pixel targets: per-patch standardised (MAE's norm_pix_loss)
      # HOG targets (MaskFeat): orientation bins over cell_size^2 cells, L2-normalised per
      # cell and colour channel; gradient "sobel" (official MaskFeat) or "central"
      # (scikit-image); gaussian_window > 0 weights magnitudes by a tiled Gaussian window.
      hog=ml_collections.ConfigDict(dict(cell_size=8, num_bins=9, gradient="sobel",
                                         gaussian_window=16)),
  ))
  # EMA teacher and its regression targets (data2vec): the teacher encoder follows the student
  # with a decay annealed linearly from ema_decay to ema_end_decay over the first
  # ema_anneal_fraction of the lr schedule; targets average its top_k block outputs, each
  # normalised by block_norm ("instance": per channel over the tokens; "layer": per token over
  # the channels; "none"), then the average by final_norm (same choices); smooth-L1 with
  # loss_beta (0: L1) on the masked patches.
  c.teacher = ml_collections.ConfigDict(dict(
      ema_decay=0.999,
      ema_end_decay=0.9998,
      ema_anneal_fraction=1.0,
      top_k=6,
      block_norm="layer",
      final_norm="layer",
      loss_beta=2.0,
  ))

  # BEiT's discrete tokenizer: trained by method "vq_tokenizer" (one code per patch of
  # model.variant's grid), read by method "beit" from `path` (a tokenizer workdir or export).
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="vq",
      vocab_size=8192,         # number of codes (BEiT: 8192)
      code_dim=32,             # length of a code vector (BEiT v2: 32)
      l2_normalize=True,       # codes and encoder outputs on the unit sphere (BEiT v2, ViT-VQGAN)
      decay=0.99,              # codebook EMA decay
      eps=1e-5,                # Laplace smoothing of the EMA cluster sizes
      commitment=0.25,         # weight of the commitment loss (VQ-VAE: 0.25)
      restart_after=100,       # re-seed codes unused for this many steps (0: never)
      width=128,               # channels of the convolutional encoder / decoder
      num_blocks=2,            # residual blocks in each
      # dVAE ("dvae_tokenizer"): Gumbel-softmax temperature annealed (cosine) from temp_start to
      # temp_end over temp_anneal_fraction of the lr schedule; KL to the uniform prior weighted
      # by kl_weight.
      temp_start=1.0,
      temp_end=1.0 / 16,
      temp_anneal_fraction=0.5,
      kl_weight=0.01,
      path="",                 # beit: the trained tokenizer
  ))

  # iBOT (methods/ibot.py): DINO head, temperatures, EMA teacher and loss weights; defaults are
  # iBOT's ViT-S/16 values (bytedance/ibot main_ibot.py and its README command).
  c.ibot = ml_collections.ConfigDict(dict(
      out_dim=8192,            # prototypes of the shared [CLS] / patch head
      hidden_dim=2048,
      bottleneck_dim=256,
      norm_last_layer=False,   # True fixes the prototype norms at 1 (ViT-B)
      student_temp=0.1,
      warmup_teacher_temp=0.04,
      teacher_temp=0.07,
      warmup_teacher_patch_temp=0.04,
      teacher_patch_temp=0.07,
      warmup_teacher_temp_epochs=30.0,
      momentum=0.996,          # teacher EMA momentum, cosine to 1 over the lr schedule
      center_momentum=0.9,
      lambda_cls=1.0,
      lambda_patch=1.0,
      freeze_last_layer_epochs=1.0,
  ))
  # Multi-crop views (methods with `train_augment`, e.g. iBOT): two global crops at image_size
  # and num_local crops at local_size; photometric odds as in DINO / iBOT (data/multicrop.py).
  c.multicrop = ml_collections.ConfigDict(dict(
      global_scale=(0.25, 1.0),
      local_scale=(0.05, 0.25),
      num_local=10,
      local_size=(96, 96),
      jitter_prob=0.8,
      grayscale_prob=0.2,
      blur=True,
      solarize_prob=0.2,
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="tfds",           # fashion_mnist | image_folder | tfds | synthetic
      path="",                 # fashion_mnist / image_folder root
      split="train",
      tfds_name="imagenet2012",
      tfds_data_dir="",
      num_workers=8,           # grain worker processes for decode + augmentation
      prefetch_buffer_size=2,
      on_bad_image="skip",     # skip (warn + count) | raise
      crop_scale=(0.2, 1.0),
      crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
      hflip=True,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      synthetic_size=10_000,
      label_fraction=1.0,      # low-label runs: keep this fraction of every training class
      subset_seed=0,           # picks that subset; not `seed`, so every seed sees the same labels
      # Validation: this many training examples (the same share of every class, picked by
      # subset_seed) are left out of training and read as split "holdout"; choose
      # hyper-parameters with eval_split="holdout", never on the test split.
      holdout=0,
      eval_split="",           # split scored by evaluations; "" = the source's usual one
                               # (fashion_mnist "test", tfds "validation", image_folder eval_path)
      eval_path="",            # image_folder: folder of the evaluation images (path = train)
  ))

  c.global_batch_size = 4096
  c.grad_accum_steps = 1
  c.num_epochs = 800           # length of the lr schedule
  c.total_steps = -1           # stop after this global step (-1: the whole schedule)

  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",
      base_lr=1.5e-4,
      lr_batch_reference=256,  # lr = base_lr * global_batch_size / lr_batch_reference
      min_lr=0.0,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.05,
      weight_decay_schedule="constant",  # or "cosine": weight_decay -> weight_decay_end
      weight_decay_end=0.0,    # cosine: the coefficient at the end of the schedule
      warmup_epochs=40.0,
      schedule="cosine",       # after warmup: "cosine" (half-cosine to min_lr) or "multistep"
      decay_epochs=(),         # multistep: epochs at which the lr is multiplied by decay_factor
      decay_factor=0.1,
      clip_grad_norm=0.0,      # 0 disables clipping
      momentum=0.9,            # lars / sgd
      trust_coefficient=0.001,  # lars
      layer_decay=1.0,         # < 1: layer-wise lr decay (fine-tuning ViTs)
  ))

  # Classification heads and features for linprobe / finetune / knn (ignored by pre-training).
  c.classifier = ml_collections.ConfigDict(dict(
      num_classes=0,           # 0: from the dataset
      pool="cls",              # cls token, or "gap": mean of the patch tokens
      features="encoder",      # linprobe / knn: "encoder", or "pixels" (raw-pixel baseline)
      probe_layer=0,           # linprobe / knn features: 0 = encoder output, k = block k's output
      head_init_std=0.01,      # truncated-normal std of the head (MAE: 0.01 probe, 2e-5 fine-tune)
      label_smoothing=0.0,
      mixup_alpha=0.0,         # fine-tuning Mixup / CutMix (timm semantics); 0 disables each
      cutmix_alpha=0.0,
      mixup_prob=1.0,
      mixup_switch_prob=0.5,
  ))
  # The converged probe (method "probe", evaluate/logistic.py): multinomial logistic regression
  # on standardised cached features, L2 strength chosen from l2_grid on data.holdout examples,
  # L-BFGS until the gradient norm is below tol (or max_iter iterations).
  c.probe = ml_collections.ConfigDict(dict(l2_grid=(1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
                                           max_iter=3000, tol=1e-4))
  # Test-set evaluation of classifiers: every `every_epochs` (0: only at the end).
  c.eval = ml_collections.ConfigDict(dict(every_epochs=0.0, batch_size=256))
  # Weighted k-NN (DINO protocol) on encoder features; `every_epochs` > 0 also runs it during
  # pre-training.
  c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07, every_epochs=0.0))

  # Device mesh and parameter sharding (mim_jax/parallel.py, docs/scaling.md). The batch is
  # split over the data and fsdp axes; `fsdp_rules()` below is the fully-sharded preset.
  # Tuples, so that the command line can override them:
  #   --config.mesh='(("fsdp", -1),)' --config.sharding_rules='((".*", "largest:fsdp:16384"),)'
  c.mesh = (("data", -1),)
  c.sharding_rules = ((".*", ()),)  # replicate every parameter (pure data parallelism)

  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.viz_every = 1000           # 0 disables reconstruction pictures
  c.viz_num_images = 8
  c.export_encoder = True
  # Reliability (docs/reliability.md): a step with a NaN/Inf loss or gradient is skipped; this
  # many in a row stop the run (exit 3). This many failed checkpoint writes in a row stop it
  # too (exit 4) rather than training on without checkpoints.
  c.max_consecutive_nonfinite = 10
  c.max_consecutive_failed_saves = 3
  return c


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
  """Parses a config argument like "variant=L/16,runlocal" into {"variant": "L/16", "runlocal": True}."""
  out: dict[str, str | bool] = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    out[key.strip()] = value.strip() if sep else True
  unknown = set(out) - set(allowed)
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
  return out


def apply_runlocal(c: ml_collections.ConfigDict, keep_data: bool = False) -> ml_collections.ConfigDict:
  """Shrinks any recipe to a seconds-long smoke run (used by CI).

  The model becomes the micro size with the recipe's patch size; unless `keep_data`, the data
  become synthetic images of 2 x 2 patches.
  """
  patch = int(c.model.variant.split("/")[1])
  c.model.update(variant=f"mu/{patch}", width=0, depth=0, num_heads=0, mlp_dim=0)
  c.decoder.update(width=32, depth=1, num_heads=2)
  c.data.num_workers = 0
  if not keep_data:
    c.image_size = (2 * patch, 2 * patch)
    c.data.update(source="synthetic", synthetic_size=64)
  c.global_batch_size = 8
  c.num_epochs = 1
  c.optimizer.warmup_epochs = 0.5
  c.total_steps = 2
  c.log_every = 1
  c.checkpoint_every = 2
  c.viz_every = 2
  c.viz_num_images = 2
  c.eval.batch_size = 8
  return c


def mae_imagenet_config(arg: str | None, default_variant: str) -> ml_collections.ConfigDict:
  """The MAE ImageNet recipe for a ViT variant; `arg` may hold `variant=...` and `runlocal`."""
  args = parse_arg(arg, ("variant", "runlocal") + SCALE_ARGS)
  c = base_config()
  c.model.variant = str(args.get("variant", default_variant))
  apply_scale_args(c, args)
  if args.get("runlocal"):
    apply_runlocal(c)
  return c


def use_fashion_mnist(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """28x28 grayscale Fashion-MNIST from the Debian package, batch 256 (all fmnist recipes)."""
  c.image_size = (28, 28)
  c.channels = 1
  c.model.update(FMNIST_DEMO_MODEL)
  c.data.update(source="fashion_mnist", path=FMNIST_PATH, split="train",
                num_workers=1, mean=FMNIST_MEAN, std=FMNIST_STD,
                # Crops below ~1/3 of a 28x28 image are mostly upsampled blur.
                crop_scale=(0.35, 1.0))
  c.global_batch_size = 256
  c.eval.batch_size = 1000
  return c


def fmnist_pretraining(c: ml_collections.ConfigDict,
                       arg: str | None) -> ml_collections.ConfigDict:
  """The Fashion-MNIST pre-training budget every method shares, so their rows compare: 3 epochs
  of 256 images, AdamW at lr 1e-3 (a higher peak than ImageNet recipes suit a short schedule)
  after half an epoch of warmup, half-cosine; `arg` may hold `variant=SIZE/4` (a published
  encoder size instead of the demo one) and `runlocal`."""
  args = parse_arg(arg)
  use_fashion_mnist(c)
  if "variant" in args:
    c.model.update(variant=str(args["variant"]), width=0, depth=0, num_heads=0, mlp_dim=0)
  c.num_epochs = 3
  c.optimizer.update(base_lr=1e-3, lr_batch_reference=256, warmup_epochs=0.5, schedule="cosine")
  c.log_every = 20
  c.checkpoint_every = 200
  c.viz_every = 200
  if args.get("runlocal"):
    apply_runlocal(c, keep_data=True)
  return c


def linprobe_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The MAE linear probe (He et al. 2022, A.3): BatchNorm(affine=False) + linear head on the
  frozen cls token, LARS (momentum 0.9), base lr 0.1 x batch / 256, no weight decay, 90 epochs
  with 10 warmup, batch 16384, RandomResizedCrop + flip."""
  c.method = "linprobe"
  c.optimizer.update(name="lars", base_lr=0.1, weight_decay=0.0, warmup_epochs=10.0,
                     momentum=0.9, min_lr=0.0)
  c.classifier.update(pool="cls", probe_layer=0, head_init_std=0.01)
  c.num_epochs = 90
  c.global_batch_size = 16384
  c.data.crop_scale = (0.08, 1.0)
  c.viz_every = 0
  c.checkpoint_every = 1000
  c.export_encoder = False
  return c


# MAE fine-tuning (He et al. 2022, A.2 / official FINETUNE.md) by encoder size:
# (base lr, layer decay, drop path, epochs).
MAE_FINETUNE = {"B": (5e-4, 0.65, 0.1, 100), "L": (1e-3, 0.75, 0.2, 50),
                "H": (1e-3, 0.75, 0.3, 50)}


def finetune_recipe(c: ml_collections.ConfigDict, size: str = "B") -> ml_collections.ConfigDict:
  """The MAE end-to-end fine-tuning recipe: AdamW (0.9, 0.999), wd 0.05, batch 1024, layer-wise
  lr decay, drop path, 5 warmup epochs, cosine to 1e-6, Mixup 0.8 / CutMix 1.0, label smoothing
  0.1, global average pooling with fc_norm, head init std 2e-5."""
  base_lr, layer_decay, drop_path, epochs = MAE_FINETUNE[size]
  c.method = "finetune"
  c.model.drop_path_rate = drop_path
  c.optimizer.update(name="adamw", base_lr=base_lr, b1=0.9, b2=0.999, weight_decay=0.05,
                     layer_decay=layer_decay, warmup_epochs=5.0, min_lr=1e-6)
  c.classifier.update(pool="gap", head_init_std=2e-5, label_smoothing=0.1, mixup_alpha=0.8,
                      cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5)
  c.num_epochs = epochs
  c.global_batch_size = 1024
  c.data.crop_scale = (0.08, 1.0)
  c.viz_every = 0
  c.export_encoder = False
  return c


def knn_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Weighted k-NN on frozen cls-token features (DINO / iBOT: k = 20, T = 0.07)."""
  c.method = "knn"
  c.knn.update(k=20, temperature=0.07)
  c.classifier.update(pool="cls", probe_layer=0)
  c.eval.batch_size = 256
  return c
