"""End-to-end ImageNet-1k fine-tuning with the official recipe of the method that pre-trained
the encoder (mim_jax/recipes.py: FINETUNE_RECIPES; each recipe's docstring cites its numbers).

  python -m mim_jax.main --config=configs/finetune_imagenet.py:size=L \
      --config.init_from=/ckpt/mae_vitl --config.data.tfds_data_dir=/data/tfds --workdir=DIR
  python -m mim_jax.main --config=configs/finetune_imagenet.py:recipe=beit,size=B \
      --config.init_from=/ckpt/beit_vitb --config.data.tfds_data_dir=/data/tfds --workdir=DIR

Default: MAE's recipe (He et al. 2022, A.2; official FINETUNE.md). By encoder size: base lr
5e-4 / 1e-3 / 1e-3 (lr = base_lr x batch / 256), layer decay 0.65 / 0.75 / 0.75, drop path
0.1 / 0.2 / 0.3, 100 / 50 / 50 epochs for B / L / H; AdamW (0.9, 0.999), wd 0.05, batch 1024,
5 warmup epochs, cosine to 1e-6, Mixup 0.8, CutMix 1.0, label smoothing 0.1, mean pooling +
fc_norm, RandomResizedCrop (0.08, 1) + flip, RandAugment rand-m9-mstd0.5-inc1 and random
erasing 0.25 (timm's, as the official code applies them: data/rand_augment.py).
Other recipes (`recipe=`, the sizes each release publishes): beit (B, L), simmim (B), maskfeat
(B, L), data2vec (B, L), data2vec2 (B, L), ibot (S, B, L). They differ in lr and its batch,
batch, epochs, warmup, layer decay, drop path, weight decay, betas, min lr, gradient clipping,
Mixup and pooling (iBOT: the [CLS] token). Relative position bias, layer scale and the input
normalisation are the encoder's, read from init_from, whatever the recipe. No MaskDistill
recipe: its fine-tuning numbers could not be checked against a primary source.
The recipe is named, not read from init_from: an imported checkpoint records no pre-training
method, and the command line's overrides apply after this file.
Arguments: `recipe=mae|beit|simmim|maskfeat|data2vec|data2vec2|ibot` (default mae),
`size=S|B|L|H` (default B; the size of the encoder in init_from: the encoder's shape comes from
the export, the recipe from this argument, and an encoder of another size is refused; set
--config.recipe_size='' to run this size's recipe on another encoder anyway), `runlocal`.
"""

from mim_jax import recipes
from mim_jax.config import defaults as config_defaults

VARIANTS = {"S": "S/16", "B": "B/16", "L": "L/16", "H": "H/14"}  # each size as its paper's


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("recipe", "size", "runlocal"))
  recipe, size = str(args.get("recipe", "mae")), str(args.get("size", "B"))
  c = recipes.finetune_recipe(size=size, recipe=recipe)  # ValueError: unknown recipe or size
  c.model.variant = VARIANTS[size]
  c.recipe_size = size  # an init_from encoder of another size is refused
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.recipe_size = ""  # the smoke run's micro encoder is no recipe's size
  return c
