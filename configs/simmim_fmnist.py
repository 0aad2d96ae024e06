"""SimMIM on Fashion-MNIST: the CPU-sized counterpart of configs/simmim_vitb.py.

  python -m mim_jax.main --config=configs/simmim_fmnist.py --workdir=/tmp/simmim_fmnist

The demo encoder and budget of configs/mae_fmnist.py (3 epochs, lr 1e-3, half-cosine), so the
rows of docs/results.md compare objectives, not schedules. SimMIM's ImageNet recipe masks 60% of
a 7x7 grid of 32-px groups; on 28x28 images with 4-px patches the patch grid is that 7x7 grid,
so the groups are single patches (`masking.mask_patch_size=4`). Linear head to the 4x4 pixels
of each patch, L1 loss on masked pixels of the normalised image, AdamW (0.9, 0.999), clipping
5.0. Arguments: `variant=SIZE/4`, `runlocal`.
"""

from mim_jax import recipes, registry


def get_config(arg=None):
  c = registry.base_config("simmim")
  c.masking.update(kind="grouped", ratio=0.6, mask_patch_size=4)
  c.target.norm_pix = False
  c.optimizer.update(b1=0.9, b2=0.999, weight_decay=0.05, clip_grad_norm=5.0)
  return recipes.fmnist_pretraining(c, arg)
