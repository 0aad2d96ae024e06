"""Fine-tuning on Fashion-MNIST from a pre-trained encoder, or from scratch without init_from.

  python -m mim_jax.main --config=configs/finetune_fmnist.py \
      --config.init_from=workdirs/mae_fmnist --workdir=workdirs/finetune_fmnist

The MAE fine-tuning recipe (AdamW 0.9/0.999, wd 0.05, layer-wise lr decay 0.75, drop path 0.1,
Mixup 0.8 / CutMix 1.0, label smoothing 0.1, mean pooling + fc_norm) on a short schedule: 3
epochs with 0.5 of warmup at batch 256. Leave init_from empty for the supervised from-scratch
baseline with the same recipe. Low-label fine-tuning: --config.data.label_fraction=0.01 (or
0.1): a fixed per-class subset of the training labels. Arguments: `runlocal`.
"""

from mim_jax import config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("runlocal",))
  c = config_defaults.finetune_recipe(config_defaults.base_config(), size="B")
  config_defaults.use_fashion_mnist(c)
  c.optimizer.update(base_lr=1e-3, layer_decay=0.75)
  c.num_epochs = 3
  c.optimizer.warmup_epochs = 0.5
  c.log_every = 50
  c.checkpoint_every = 500
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c, keep_data=True)
  return c
