"""Recipes several config files share: a method's config (`registry.base_config`) with the
values of a paper's protocol or of the Fashion-MNIST budget. Config files in configs/ call
these and change what their recipe needs."""

from __future__ import annotations

import ml_collections

from mim_jax import registry
from mim_jax.config.defaults import (
  SCALE_ARGS,
  apply_runlocal,
  apply_scale_args,
  parse_arg,
  use_fashion_mnist,
)


def mae_imagenet_config(arg: str | None, default_variant: str) -> ml_collections.ConfigDict:
  """The MAE ImageNet recipe for a ViT variant; `arg` may hold `variant=...` and `runlocal`."""
  args = parse_arg(arg, ("variant", "runlocal") + SCALE_ARGS)
  c = registry.base_config("mae")
  c.model.variant = str(args.get("variant", default_variant))
  apply_scale_args(c, args)
  if args.get("runlocal"):
    apply_runlocal(c)
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
  if "viz_every" in c:
    c.viz_every = 200
  if args.get("runlocal"):
    apply_runlocal(c, keep_data=True)
  return c


def linprobe_recipe() -> ml_collections.ConfigDict:
  """The MAE linear probe through the training loop (He et al. 2022, A.3): BatchNorm
  (affine=False) + linear head on the frozen cls token, LARS (momentum 0.9), base lr 0.1 x
  batch / 256, no weight decay, 90 epochs with 10 warmup, batch 16384, RandomResizedCrop +
  flip."""
  c = registry.base_config("linprobe")
  c.optimizer.update(name="lars", base_lr=0.1, weight_decay=0.0, warmup_epochs=10.0,
                     momentum=0.9, min_lr=0.0)
  c.classifier.update(pool="cls", probe_layer=0, head_init_std=0.01)
  c.num_epochs = 90
  c.global_batch_size = 16384
  c.data.crop_scale = (0.08, 1.0)
  c.checkpoint_every = 1000
  return c


# MAE fine-tuning (He et al. 2022, A.2 / official FINETUNE.md) by encoder size:
# (base lr, layer decay, drop path, epochs).
MAE_FINETUNE = {"B": (5e-4, 0.65, 0.1, 100), "L": (1e-3, 0.75, 0.2, 50),
                "H": (1e-3, 0.75, 0.3, 50)}


def finetune_recipe(size: str = "B") -> ml_collections.ConfigDict:
  """The MAE end-to-end fine-tuning recipe: AdamW (0.9, 0.999), wd 0.05, batch 1024, layer-wise
  lr decay, drop path, 5 warmup epochs, cosine to 1e-6, Mixup 0.8 / CutMix 1.0, label smoothing
  0.1, global average pooling with fc_norm, head init std 2e-5; RandomResizedCrop (0.08, 1),
  flip, RandAugment "rand-m9-mstd0.5-inc1" and random erasing 0.25 (timm's `create_transform`
  as MAE's main_finetune.py calls it)."""
  base_lr, layer_decay, drop_path, epochs = MAE_FINETUNE[size]
  c = registry.base_config("finetune")
  c.model.drop_path_rate = drop_path
  c.optimizer.update(name="adamw", base_lr=base_lr, b1=0.9, b2=0.999, weight_decay=0.05,
                     layer_decay=layer_decay, warmup_epochs=5.0, min_lr=1e-6)
  c.classifier.update(pool="gap", head_init_std=2e-5, label_smoothing=0.1, mixup_alpha=0.8,
                      cutmix_alpha=1.0, mixup_prob=1.0, mixup_switch_prob=0.5)
  c.num_epochs = epochs
  c.global_batch_size = 1024
  c.data.update(crop_scale=(0.08, 1.0), rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
  return c


def knn_recipe(method: str = "knn") -> ml_collections.ConfigDict:
  """Weighted k-NN on frozen features (DINO / iBOT: k = 20, T = 0.07); `method` "probe" adds
  the converged linear probe on the same features."""
  c = registry.base_config(method)
  c.knn.update(k=20, temperature=0.07)
  c.eval.batch_size = 256
  return c
