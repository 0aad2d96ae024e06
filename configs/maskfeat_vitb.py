"""MaskFeat ViT-B/16 pre-training on ImageNet-1k (Wei et al., 2022, image recipe).

  python -m mim_jax.main --config=configs/maskfeat_vitb.py --workdir=DIR \
      --config.data.tfds_data_dir=/path/to/tfds

Arguments (after a colon): `variant=B/16` (any SIZE/PATCH), `runlocal` (a seconds-long smoke run
on synthetic data). Recipe: 1600 epochs (300 for the short schedule: --config.num_epochs=300),
batch 2048, AdamW (0.9, 0.999), wd 0.05, base lr 2e-4 (lr = base_lr x batch / 256), 30 warmup
epochs, half-cosine to 1e-6 (SOLVER.COSINE_END_LR; warmup starts at 0, not at 1e-6), gradient
clipping 0.02, no drop path; blockwise masking (BEiT's generator) of 40% of the patches (78 of
196, blocks of at least 16 patches); targets: HOG with 9 orientation bins over 8x8-px cells (2x2
cells per patch), Sobel gradients, a 16-px Gaussian window, L2-normalised per cell and colour
channel, 108 values per patch; a linear head and MSE on masked patches; RandomResizedCrop(0.5,
1) + flip. Not reproduced: the official ViT init; the encoder starts from MAE's
(`model.weight_init`).
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("maskfeat")
  c.model.variant = str(args.get("variant", "B/16"))
  c.masking.update(kind="blockwise", ratio=0.4, min_block=16, min_aspect=0.3)
  c.target.hog.update(cell_size=8, num_bins=9, gradient="sobel", gaussian_window=16,
                      binning="maskfeat")
  c.data.crop_scale = (0.5, 1.0)
  c.global_batch_size = 2048
  c.num_epochs = 1600
  c.optimizer.update(name="adamw", base_lr=2e-4, lr_batch_reference=256, b1=0.9, b2=0.999,
                     weight_decay=0.05, warmup_epochs=30.0, clip_grad_norm=0.02, min_lr=1e-6)
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.masking.min_block = 1  # 2x2-patch synthetic images: a budget of one patch
  return c
