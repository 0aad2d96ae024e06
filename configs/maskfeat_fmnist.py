"""MaskFeat on Fashion-MNIST: the CPU-sized counterpart of configs/maskfeat_vitb.py.

  python -m mim_jax.main --config=configs/maskfeat_fmnist.py --workdir=/tmp/maskfeat_fmnist

The demo encoder and budget of configs/mae_fmnist.py (3 epochs, lr 1e-3, half-cosine), so the
rows of docs/results.md compare objectives, not schedules. Blockwise masking of 40% of the 7x7
patch grid (a budget of 19 patches; blocks of at least 4 patches, the ImageNet recipe's 16 of
196 scaled to 49), HOG targets with 9 bins over 4x4-px cells (one cell per 4-px patch, Sobel
gradients, a Gaussian window of the patch size as in the ViT-B/16 recipe), a linear head and
MSE on masked patches, AdamW (0.9, 0.999), clipping 0.02. Arguments: `variant=SIZE/4`,
`runlocal`.
"""

from mim_jax import recipes, registry


def get_config(arg=None):
  c = registry.base_config("maskfeat")
  c.masking.update(kind="blockwise", ratio=0.4, min_block=4, min_aspect=0.3)
  # scikit-image's bins (MaskFeat's mirrored and shifted by half a bin): the rows of
  # docs/results.md were measured with them.
  c.target.hog.update(cell_size=4, num_bins=9, gradient="sobel", gaussian_window=4,
                      binning="skimage")
  c.optimizer.update(b1=0.9, b2=0.999, weight_decay=0.05, clip_grad_norm=0.02)
  return recipes.fmnist_pretraining(c, arg)
