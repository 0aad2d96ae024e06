"""MAE end-to-end fine-tuning on ImageNet-1k (He et al. 2022, A.2; official FINETUNE.md).

  python -m mim_jax.main --config=configs/finetune_imagenet.py:size=L \
      --config.init_from=/ckpt/mae_vitl --config.data.tfds_data_dir=/data/tfds --workdir=DIR

By encoder size (argument `size`, default B): base lr 5e-4 / 1e-3 / 1e-3 (lr = base_lr x
batch / 256), layer decay 0.65 / 0.75 / 0.75, drop path 0.1 / 0.2 / 0.3, 100 / 50 / 50 epochs
for B / L / H; AdamW (0.9, 0.999), wd 0.05, batch 1024, 5 warmup epochs, cosine to 1e-6,
Mixup 0.8, CutMix 1.0, label smoothing 0.1, mean pooling + fc_norm, RandomResizedCrop
(0.08, 1) + flip, RandAugment rand-m9-mstd0.5-inc1 and random erasing 0.25 (timm's, as the
official code applies them: data/rand_augment.py).
Arguments: `size=B|L|H` (the size of the encoder in init_from: the encoder's shape comes from
the export, the recipe from this argument, and an encoder of another size is refused; set
--config.recipe_size='' to run this size's recipe on another encoder anyway), `runlocal`.
"""

from mim_jax import recipes
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("size", "runlocal"))
  size = str(args.get("size", "B"))
  if size not in recipes.MAE_FINETUNE:
    raise ValueError(f"size={size!r}: expected one of {sorted(recipes.MAE_FINETUNE)}")
  c = recipes.finetune_recipe(size=size)
  c.model.variant = {"B": "B/16", "L": "L/16", "H": "H/14"}[size]
  c.recipe_size = size  # an init_from encoder of another size is refused
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.recipe_size = ""  # the smoke run's micro encoder is no recipe's size
  return c
