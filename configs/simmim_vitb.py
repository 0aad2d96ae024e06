"""SimMIM ViT-B/16 pre-training on ImageNet-1k (Xie et al., 2022; the official ViT-B 800-epoch
recipe).

  python -m mim_jax.main --config=configs/simmim_vitb.py --workdir=DIR \
      --config.data.tfds_data_dir=/path/to/tfds

Arguments (after a colon): `variant=B/16` (any SIZE/PATCH), `runlocal` (a seconds-long smoke
run on synthetic data).
Recipe: 800 epochs, batch 2048, AdamW (0.9, 0.999), wd 0.05, base lr 1e-4 (lr = base_lr x
batch / 512), 10 warmup epochs, lr x0.1 at epoch 700 (`--config.optimizer.schedule=cosine` for
the cosine variant), gradient clipping 5.0, drop path 0.1; random masking of 60% of 32x32-px
groups (2x2 patches), a linear head to the 16x16x3 pixels of each patch, L1 loss on masked
pixels of the normalised image (no per-patch normalisation); RandomResizedCrop(0.67, 1) + flip.
The official ViT's shared relative position bias and layer scale 0.1, without absolute
positions, and its init (`model.rel_pos_bias`, `model.layer_scale`, `model.abs_posemb`,
`model.weight_init`: N(0, 0.02) cut at +-0.02, each block's branch outputs divided by
sqrt(2 * layer)).
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("simmim")
  c.model.variant = str(args.get("variant", "B/16"))
  c.model.drop_path_rate = 0.1
  # The official ViT: a relative position bias shared by all blocks, layer scale, no
  # absolute positions, and its init (models/initializers.py weight_inits).
  c.model.update(rel_pos_bias="shared", layer_scale=0.1, abs_posemb=False, weight_init="beit")
  c.masking.update(kind="grouped", ratio=0.6, mask_patch_size=32)
  c.target.norm_pix = False
  c.data.crop_scale = (0.67, 1.0)
  c.global_batch_size = 2048
  c.num_epochs = 800
  c.optimizer.update(name="adamw", base_lr=1e-4, lr_batch_reference=512, b1=0.9, b2=0.999,
                     weight_decay=0.05, warmup_epochs=10.0, schedule="multistep",
                     decay_epochs=(700,), decay_factor=0.1, clip_grad_norm=5.0)
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    # 2x2-patch synthetic images: one mask group per patch.
    c.masking.mask_patch_size = 0
    c.optimizer.decay_epochs = (0.75,)
  return c
