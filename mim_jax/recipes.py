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


def beit_imagenet_config(arg: str | None, version: int = 1) -> ml_collections.ConfigDict:
  """BEiT's ImageNet stage 2 (`version` 1: configs/beit_vitb.py; 2: BEiT v2's release,
  configs/beit2_vitb.py, whose docstrings give the sources); `arg` may hold `variant=...`
  (default B/16) and `runlocal`.

  Shared: the BEiT ViT (a shared relative position bias, layer scale, no absolute positions,
  BEiT's init: N(0, 0.02) cut at +-0.02, branch outputs divided by sqrt(2 * layer)), drop
  path 0.1, blockwise masks (blocks of at least 16 patches, aspect ratios in [0.3, 1/0.3]),
  8192 codes, batch 2048, AdamW (0.9, 0.999) at lr 1.5e-3 for that batch, 10 warm-up epochs
  then cosine to 1e-5, weight decay 0.05, clipping 3.0. Version 1: 800 epochs, 40% masked,
  crops from 8% of the image, layer scale 0.1. Version 2: 1,600 epochs, exactly 75 of 196
  masked, crops from 20%, layer scale 0.1 (1e-5 from 24 blocks up), the patch aggregation
  reading block depth - 3 through 2 blocks."""
  from mim_jax.models.vit import size_from_config
  args = parse_arg(arg)
  c = registry.base_config("beit")
  c.model.variant = str(args.get("variant", "B/16"))
  depth = size_from_config(c.model)[0].depth
  c.model.update(drop_path_rate=0.1, weight_init="beit", rel_pos_bias="shared",
                 layer_scale=0.1 if version == 1 or depth < 24 else 1e-5, abs_posemb=False)
  c.masking.update(kind="blockwise", min_block=16, min_aspect=0.3)
  if version == 1:
    c.masking.ratio = 0.4
  else:  # int(196 * 75 / 196) = 75, the release's num_mask_patches, each mask topped up to it
    c.masking.update(ratio=75 / 196, exact_count=True)
  c.tokenizer.update(vocab_size=8192, path="")
  c.data.crop_scale = (0.08 if version == 1 else 0.2, 1.0)
  c.global_batch_size = 2048
  c.num_epochs = 800 if version == 1 else 1600
  c.optimizer.update(name="adamw", base_lr=1.5e-3, lr_batch_reference=2048, b1=0.9, b2=0.999,
                     weight_decay=0.05, warmup_epochs=10.0, min_lr=1e-5, clip_grad_norm=3.0)
  if args.get("runlocal"):
    apply_runlocal(c)
    c.masking.min_block = 1  # 2x2-patch synthetic images: a budget of one patch
    c.tokenizer.vocab_size = 16  # the runlocal tokenizers of configs/*_tokenizer_imagenet.py
  if version == 2:
    depth = size_from_config(c.model)[0].depth  # runlocal's micro model has 2
    c.patch_aggregation.update(from_block=max(depth - 3, 1), depth=2)  # 9 of 12, 21 of 24
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

RAND_M9 = "rand-m9-mstd0.5-inc1"  # timm's RandAugment string, the default of every release below


def _values(base_lr: float, layer_decay: float, drop_path: float, epochs: float, *,
            lr_batch_reference: int = 256, batch: int = 1024, warmup_epochs: float = 5.0,
            weight_decay: float = 0.05, b2: float = 0.999, min_lr: float = 1e-6,
            clip_grad_norm: float = 0.0, mixup: float = 0.8, cutmix: float = 1.0,
            mixup_prob: float = 1.0, pool: str = "gap", head_init_std: float = 2e-5,
            random_erasing: float = 0.25) -> dict:
  """One size of a fine-tuning recipe. The defaults are the values the releases below share
  (BEiT's run_class_finetuning.py lineage and MAE's main_finetune.py): AdamW (0.9, b2), label
  smoothing 0.1, Mixup / CutMix switched with probability 0.5, RandAugment rand-m9-mstd0.5-inc1,
  RandomResizedCrop (0.08, 1) + flip, a head initialised at std 2e-5 (trunc_normal 0.02 scaled
  by 0.001), warmup from 0 then cosine to min_lr. `lr_batch_reference`: lr = base_lr x batch /
  lr_batch_reference; a release that gives its lr for its own batch has that batch here, so a
  changed --config.global_batch_size scales the lr linearly."""
  return dict(base_lr=base_lr, layer_decay=layer_decay, drop_path=drop_path, epochs=epochs,
              lr_batch_reference=lr_batch_reference, batch=batch, warmup_epochs=warmup_epochs,
              weight_decay=weight_decay, b2=b2, min_lr=min_lr, clip_grad_norm=clip_grad_norm,
              mixup=mixup, cutmix=cutmix, mixup_prob=mixup_prob, pool=pool,
              head_init_std=head_init_std, random_erasing=random_erasing)


def mae_finetuning() -> dict[str, dict]:
  """MAE (He et al. 2022, A.2; facebookresearch/mae FINETUNE.md and main_finetune.py): base lr
  5e-4 / 1e-3 / 1e-3 x batch / 256, layer decay 0.65 / 0.75 / 0.75, drop path 0.1 / 0.2 / 0.3,
  100 / 50 / 50 epochs for B / L / H (MAE_FINETUNE); batch 1024 (FINETUNE.md: 32 x 4 nodes x 8
  GPUs), 5 warmup epochs, cosine to 1e-6, AdamW (0.9, 0.999), wd 0.05, Mixup 0.8, CutMix 1.0,
  label smoothing 0.1, random erasing 0.25 (main_finetune.py defaults), mean pooling + fc_norm
  (--global_pool), head init 2e-5."""
  return {size: _values(lr, decay, drop, epochs)
          for size, (lr, decay, drop, epochs) in MAE_FINETUNE.items()}


def beit_finetuning() -> dict[str, dict]:
  """BEiT (Bao et al. 2022), microsoft/unilm beit/get_started_for_image_classification.md, the
  commands for checkpoints self-supervised only (with Mixup / CutMix): ViT-B 8 GPUs x 128 =
  batch 1024, lr 4e-3 (the lr itself: run_class_finetuning.py does not scale it, so it is given
  for batch 1024), 20 warmup epochs, 100 epochs, layer decay 0.65, drop path 0.1, wd 0.05, Mixup
  0.8, CutMix 1.0; ViT-L 8 x 64 x update_freq 2 = 1024, lr 1e-3, 5 warmup epochs, 50 epochs,
  layer decay 0.75, drop path 0.2, wd 0.05. beit/run_class_finetuning.py defaults: min lr 1e-6,
  label smoothing 0.1, random erasing 0.25, RandAugment rand-m9-mstd0.5-inc1, mean pooling +
  fc_norm (use_mean_pooling), head init_scale 0.001, no gradient clipping; betas (0.9, 0.999)
  (beit/utils.py create_ds_config: the commands run DeepSpeed). Not from the recipe: relative
  position bias and layer scale are the export's (model.json), as is the input normalisation
  (the commands normalise with (0.5, 0.5, 0.5), BEiT's pre-training's too). Not reproduced: the
  warmup starts at 0, not at the script's warmup_lr 1e-6."""
  return {"B": _values(4e-3, 0.65, 0.1, 100, lr_batch_reference=1024, warmup_epochs=20),
          "L": _values(1e-3, 0.75, 0.2, 50, lr_batch_reference=1024, warmup_epochs=5)}


def simmim_finetuning() -> dict[str, dict]:
  """SimMIM (Xie et al. 2022), microsoft/SimMIM configs/vit_base__800ep/
  simmim_finetune__vit_base__img224__800ep.yaml (ViT-B; no ViT-L recipe is released): base lr
  1.25e-3 x batch / 512 (main_finetune.py scales BASE_LR, WARMUP_LR and MIN_LR by batch / 512),
  layer decay 0.65, drop path 0.1, 100 epochs, 20 warmup epochs, wd 0.05, mean pooling + fc_norm
  (USE_MEAN_POOLING); batch 2048 (the README's fine-tuning command: 16 GPUs x 128; the yaml sets
  none); MIN_LR 2.5e-7 x 2048 / 512 = 1e-6 (absolute here: it does not follow a changed batch).
  config.py defaults: AdamW (0.9, 0.999), gradient clipping 5.0, label smoothing 0.1, Mixup 0.8,
  CutMix 1.0 (prob 1.0, switch 0.5), RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25;
  head init_scale 0.001 (models/vision_transformer.py). Not from the recipe: relative position
  bias and layer scale are the export's. Not reproduced: the warmup starts at 0, not at
  WARMUP_LR 2.5e-7 x batch / 512."""
  return {"B": _values(1.25e-3, 0.65, 0.1, 100, lr_batch_reference=512, batch=2048,
                       warmup_epochs=20, clip_grad_norm=5.0)}


def maskfeat_finetuning() -> dict[str, dict]:
  """MaskFeat (Wei et al. 2022), facebookresearch/SlowFast configs/masked_ssl/
  in1k_VIT_B_MaskFeat_FT.yaml and in1k_VIT_L_MaskFeat_FT.yaml: ViT-B batch 512 (TRAIN.BATCH_SIZE
  on NUM_SHARDS 1; BASE_LR_SCALE_NUM_SHARDS scales the lr with the machines, so with the batch),
  lr 2e-3, layer decay 0.65, 100 epochs, 20 warmup epochs; ViT-L batch 256, lr 1e-3, layer decay
  0.75, 50 epochs, 5 warmup epochs; both drop path 0.1, AdamW, wd 0.05 (ZERO_WD_1D_PARAM), cosine
  to COSINE_END_LR 1e-6, Mixup 0.8, CutMix 1.0 (PROB 1.0, SWITCH_PROB 0.5), label smoothing 0.1,
  RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mean pooling (USE_MEAN_POOLING), head
  init scale 0.001, no gradient clipping set. Betas (0.9, 0.999): SlowFast's SOLVER.BETAS
  default, as the MaskFeat pre-training config (configs/maskfeat_vitb.py) takes it. Not
  reproduced: the warmup starts at 0, not at WARMUP_START_LR 1e-8."""
  return {"B": _values(2e-3, 0.65, 0.1, 100, lr_batch_reference=512, batch=512,
                       warmup_epochs=20),
          "L": _values(1e-3, 0.75, 0.1, 50, lr_batch_reference=256, batch=256,
                       warmup_epochs=5)}


def data2vec_finetuning() -> dict[str, dict]:
  """data2vec (Baevski et al. 2022), facebookresearch/data2vec_vision beit/README.md fine-tuning
  commands: ViT-B 8 GPUs x 128 = batch 1024, lr 4e-3 (not scaled by run_class_finetuning.py:
  given for batch 1024), 10 warmup epochs, 100 epochs, layer decay 0.65, drop path 0.2, weight
  decay 0.0, Mixup 0.8, CutMix 1.0; ViT-L 16 x 64 = 1024, lr 5e-3, 50 epochs, layer decay 0.65,
  drop path 0.25, wd 0.05, Mixup 0.8, CutMix 1.0. The ViT-L warmup is not established: the
  command passes `--warmup_epochs $WARMUP` without a value; 5 here is beit/
  run_class_finetuning.py's default, not a published number. run_class_finetuning.py defaults:
  min lr 1e-6, label smoothing 0.1, random erasing 0.25, RandAugment rand-m9-mstd0.5-inc1, mean
  pooling + fc_norm, head init_scale 0.001, no gradient clipping; betas (0.9, 0.999)
  (beit/utils.py create_ds_config, DeepSpeed). Not from the recipe: relative position bias and
  layer scale are the export's, as is the input normalisation (the release pre-trains with
  ImageNet's mean / std, and its fine-tuning commands leave (0.5, 0.5, 0.5)). Not reproduced:
  the warmup starts at 0, not at warmup_lr 1e-6."""
  return {"B": _values(4e-3, 0.65, 0.2, 100, lr_batch_reference=1024, warmup_epochs=10,
                       weight_decay=0.0),
          "L": _values(5e-3, 0.65, 0.25, 50, lr_batch_reference=1024, warmup_epochs=5)}


# data2vec 2.0's schedules count updates of 512 images: 1,281,167 // 512 = 2502 a epoch.
_D2V2_STEPS_PER_EPOCH = 2502


def data2vec2_finetuning() -> dict[str, dict]:
  """data2vec 2.0 (Baevski et al. 2023), facebookresearch/fairseq examples/data2vec/config/
  vision/finetuning/mae_imagenet_clean.yaml (ViT-B) and mae_imagenet_large_clean.yaml (ViT-L):
  batch 16 GPUs x 32 = 512, lr 1e-3 / 5e-4 (fairseq does not scale it: given for batch 512),
  250,200 / 125,200 updates (100 / 50.04 epochs; 50 here), 16,000 warmup updates (6.39
  epochs), cosine to 1e-6 / 1e-7, Adam betas (0.9, 0.95), wd 0.05, gradient clipping none / 4,
  Mixup 0.7 applied with probability 0.9; layer decay 0.65 / 0.75, drop path 0.1 / 0.2 (ViT-B:
  the defaults of examples/data2vec/models/mae_image_classification.py; ViT-L: the yaml). That
  model's defaults also give CutMix 1.0, switch probability 0.5, label smoothing 0.1, mean
  pooling + fc_norm, and a head initialised trunc_normal(0.02) (not scaled down);
  data/mae_finetuning_image_dataset.py: RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25.
  Not reproduced: layer decay of the data2vec-multi encoder scales the blocks only (patch
  embedding and positions keep the full lr); here they take the lowest scale, as in MAE."""
  warmup = 16000 / _D2V2_STEPS_PER_EPOCH
  common = dict(lr_batch_reference=512, batch=512, warmup_epochs=warmup, b2=0.95, mixup=0.7,
                mixup_prob=0.9, head_init_std=0.02)
  return {"B": _values(1e-3, 0.65, 0.1, 100, **common),
          "L": _values(5e-4, 0.75, 0.2, 50, min_lr=1e-7, clip_grad_norm=4.0, **common)}


def ibot_finetuning() -> dict[str, dict]:
  """iBOT (Zhou et al. 2022), bytedance/ibot run.sh (`imagenet_cls`) and evaluation/README.md:
  run.sh passes 100 epochs, 20 warmup epochs, layer decay 0.65, Mixup 0.8, CutMix 1.0, no layer
  scale, no relative position bias, absolute positions, and `--use_cls` (the final-normed [CLS]
  token, no fc_norm); the README overrides per size: ViT-S 200 epochs, layer decay 0.75; ViT-B
  100 epochs, layer decay 0.65; ViT-L 50 epochs, layer decay 0.75, batch 64 x update_freq 2,
  drop path 0.2, 5 warmup epochs. evaluation/classification_layer_decay/run_class_finetuning.py
  defaults: batch 128 per GPU on 8 GPUs = 1024, lr 4e-3 (not scaled by batch: given for 1024),
  drop path 0.1, wd 0.05, min lr 1e-6, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1,
  random erasing 0.25, head init_scale 0.001, no gradient clipping, AdamW (0.9, 0.999). The
  README says the lr was swept; the per-size lr of the published runs is not given there, so
  4e-3 is the script's default that the commands run with, not a tuned value."""
  common = dict(lr_batch_reference=1024, pool="cls")
  return {"S": _values(4e-3, 0.75, 0.1, 200, warmup_epochs=20, **common),
          "B": _values(4e-3, 0.65, 0.1, 100, warmup_epochs=20, **common),
          "L": _values(4e-3, 0.75, 0.2, 50, warmup_epochs=5, **common)}


# The official ImageNet-1k fine-tuning recipe of each pre-training method, by encoder size
# (configs/finetune_imagenet.py:recipe=...). MaskDistill has none: its paper defers to BEiT v2's
# code base and the fine-tuning numbers of its appendix could not be checked here.
FINETUNE_RECIPES = {"mae": mae_finetuning, "beit": beit_finetuning,
                    "simmim": simmim_finetuning, "maskfeat": maskfeat_finetuning,
                    "data2vec": data2vec_finetuning, "data2vec2": data2vec2_finetuning,
                    "ibot": ibot_finetuning}


def finetune_sizes(recipe: str) -> tuple[str, ...]:
  """The encoder sizes `recipe` publishes fine-tuning values for."""
  return tuple(FINETUNE_RECIPES[recipe]())


def finetune_recipe(size: str = "B", recipe: str = "mae") -> ml_collections.ConfigDict:
  """Pre-training method `recipe`'s ImageNet-1k fine-tuning recipe for a `size` encoder
  (FINETUNE_RECIPES; each recipe's docstring cites its numbers); ValueError for a recipe or a
  size it does not publish. MAE's (the default): AdamW (0.9, 0.999), wd 0.05, batch 1024,
  layer-wise lr decay, drop path, 5 warmup epochs, cosine to 1e-6, Mixup 0.8 / CutMix 1.0,
  label smoothing 0.1, global average pooling with fc_norm, head init std 2e-5;
  RandomResizedCrop (0.08, 1), flip, RandAugment "rand-m9-mstd0.5-inc1" and random erasing
  0.25 (timm's `create_transform` as MAE's main_finetune.py calls it)."""
  if recipe not in FINETUNE_RECIPES:
    raise ValueError(f"recipe={recipe!r}: expected one of {sorted(FINETUNE_RECIPES)}")
  by_size = FINETUNE_RECIPES[recipe]()
  if size not in by_size:
    raise ValueError(f"size={size!r}: the {recipe} recipe is published for "
                     f"{', '.join(by_size)} only")
  r = by_size[size]
  c = registry.base_config("finetune")
  c.model.drop_path_rate = r["drop_path"]
  c.optimizer.update(name="adamw", base_lr=r["base_lr"],
                     lr_batch_reference=r["lr_batch_reference"], b1=0.9, b2=r["b2"],
                     weight_decay=r["weight_decay"], layer_decay=r["layer_decay"],
                     warmup_epochs=float(r["warmup_epochs"]), min_lr=r["min_lr"],
                     clip_grad_norm=r["clip_grad_norm"])
  c.classifier.update(pool=r["pool"], head_init_std=r["head_init_std"], label_smoothing=0.1,
                      mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"],
                      mixup_prob=r["mixup_prob"], mixup_switch_prob=0.5)
  c.num_epochs = r["epochs"]
  c.global_batch_size = r["batch"]
  c.data.update(crop_scale=(0.08, 1.0), rand_augment=RAND_M9, random_erasing=r["random_erasing"])
  return c


def knn_recipe(method: str = "knn") -> ml_collections.ConfigDict:
  """Weighted k-NN on frozen features (DINO / iBOT: k = 20, T = 0.07); `method` "probe" adds
  the converged linear probe on the same features."""
  c = registry.base_config(method)
  c.knn.update(k=20, temperature=0.07)
  c.eval.batch_size = 256
  return c
