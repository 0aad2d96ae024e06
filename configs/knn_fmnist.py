"""Weighted k-NN (k = 20, T = 0.07) on Fashion-MNIST with a pre-trained encoder's features.

  python -m mim_jax.main --config=configs/knn_fmnist.py \
      --config.init_from=workdirs/mae_fmnist --workdir=workdirs/knn_fmnist

The 60,000 training images (no augmentation) are the bank, the 10,000 test images the queries.
Writes knn_top1 / knn_top5 of the cls token (`knn_top1_cls`, ...) and of the mean-pooled
patch tokens (`knn_top1_gap`, ...) to WORKDIR/results.json. Baselines: --config.classifier.features=
pixels (raw pixels), --config.init_from=random (a random encoder). Arguments: `runlocal`.
"""

from mim_jax import recipes
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("runlocal",))
  c = recipes.knn_recipe()
  config_defaults.use_fashion_mnist(c)
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c, keep_data=True)
  return c
