"""The full set of config fields with their defaults (MAE ViT-B/16 ImageNet recipe).

Config files in `configs/` start from `base_config()` and change what their recipe needs, so
every field exists in every config and `--config.x=y` overrides are type-checked by
ml_collections against these defaults.
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.method = "mae"
  c.seed = 0

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
      attention_impl="",       # "" lets JAX choose, or "xla" / "cudnn"
      drop_path_rate=0.0,
  ))
  c.decoder = ml_collections.ConfigDict(dict(width=512, depth=8, num_heads=16))
  c.masking = ml_collections.ConfigDict(dict(kind="random", ratio=0.75))
  c.target = ml_collections.ConfigDict(dict(norm_pix=True))

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
      warmup_epochs=40.0,
      clip_grad_norm=0.0,      # 0 disables clipping
  ))

  c.mesh = [("data", -1)]
  c.sharding_rules = [(".*", ())]  # replicate every parameter (pure data parallelism)

  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.viz_every = 1000           # 0 disables reconstruction pictures
  c.viz_num_images = 8
  c.export_encoder = True
  return c


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
  return c


def mae_imagenet_config(arg: str | None, default_variant: str) -> ml_collections.ConfigDict:
  """The MAE ImageNet recipe for a ViT variant; `arg` may hold `variant=...` and `runlocal`."""
  args = parse_arg(arg)
  c = base_config()
  c.model.variant = str(args.get("variant", default_variant))
  if args.get("runlocal"):
    apply_runlocal(c)
  return c
