"""MaskDistill on Fashion-MNIST: distil a frozen teacher trained on the same images (e.g. the
MAE encoder of configs/mae_fmnist.py) into the demo encoder through masked prediction.

  python -m mim_jax.main --config=configs/mae_fmnist.py --workdir=/tmp/mae_fmnist
  python -m mim_jax.main --config=configs/maskdistill_fmnist.py \
      --config.teacher.path=/tmp/mae_fmnist --workdir=/tmp/maskdistill_fmnist

The demo encoder and budget of configs/mae_fmnist.py (3 epochs, lr 1e-3, half-cosine);
blockwise masking of 40% of the 7x7 grid (blocks of at least 4 patches), a linear head to the
teacher's width, smooth-L1 on its layer-normalised last-layer features at masked patches;
AdamW (0.9, 0.98), wd 0.05, clipping 3.0 as in the ImageNet recipe (configs/maskdistill_vitb.py).
Arguments: `variant=SIZE/4`, `runlocal`.
"""

from mim_jax import recipes, registry


def get_config(arg=None):
  c = registry.base_config("maskdistill")
  c.masking.update(kind="blockwise", ratio=0.4, min_block=4, min_aspect=0.3)
  c.optimizer.update(b1=0.9, b2=0.98, weight_decay=0.05, clip_grad_norm=3.0)
  return recipes.fmnist_pretraining(c, arg)
