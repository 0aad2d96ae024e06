"""Weighted k-NN on ImageNet-1k (DINO / iBOT protocol: k = 20, T = 0.07) of a pre-trained encoder.

  python -m mim_jax.main --config=configs/knn_imagenet.py \
      --config.init_from=/ckpt/mae_vitb --config.data.tfds_data_dir=/data/tfds --workdir=DIR

The 1.28M training images (resize 256, centre crop 224) are the bank, the validation split the
queries; features are the frozen cls token and the mean-pooled patch tokens, each scored
(`knn_top1_cls`, `knn_top1_gap`). Arguments: `runlocal`.
"""

from mim_jax import recipes
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("runlocal",))
  c = recipes.knn_recipe()
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
  return c
