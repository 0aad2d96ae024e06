"""MAE ViT-B/16 pre-training on ImageNet-1k (He et al., 2022, Table 8 / Appendix A.1).

  python -m mim_jax.main --config=configs/mae_vitb.py --workdir=DIR \
      --config.data.tfds_data_dir=/path/to/tfds

Arguments (after a colon, comma-separated): `variant=B/16` (any SIZE/PATCH), `runlocal` (a
seconds-long smoke run on synthetic data), `fsdp` (every device on one FSDP axis), `remat=POLICY`
(activation checkpointing, e.g. `full`), `bf16` (bfloat16 compute), e.g.
--config=configs/mae_vitb.py:runlocal or --config=configs/mae_vitb.py:fsdp,remat=full,bf16.
Recipe: 800 epochs (the paper's main results also use 1600), batch 4096, AdamW (0.9, 0.95),
wd 0.05, base lr 1.5e-4 (lr = base_lr * batch / 256), 40 warmup epochs, half-cosine,
mask 0.75, norm_pix_loss, RandomResizedCrop(0.2, 1) + flip, decoder 512-d x 8.
"""

from mim_jax import recipes


def get_config(arg=None):
  return recipes.mae_imagenet_config(arg, default_variant="B/16")
