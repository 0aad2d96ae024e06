"""Linear probe on Fashion-MNIST of a pre-trained encoder (e.g. from configs/mae_fmnist.py).

  python -m mim_jax.main --config=configs/linprobe_fmnist.py \
      --config.init_from=workdirs/mae_fmnist --workdir=workdirs/linprobe_fmnist

The MAE protocol (BatchNorm without affine + linear head on the frozen cls token, no weight
decay) on a short schedule: 5 epochs with 0.5 of warmup at batch 256, with momentum SGD (lr 0.1)
instead of LARS: LARS at the linearly scaled lr of batch 256 (0.1 instead of ImageNet's 6.4)
hardly moves the head (after one epoch: train loss 2.25 with LARS, 1.21 with SGD). The encoder's size
comes from the export in init_from. Features from an intermediate block:
--config.classifier.probe_layer=K; mean-pooled patch tokens: --config.classifier.pool=gap.
Test accuracy is logged as eval_accuracy and written to WORKDIR/results.json. Baselines with
the same protocol: --config.classifier.features=pixels (raw pixels), --config.init_from=random
(a randomly initialised encoder of the demo's size).
Arguments: `runlocal` (a seconds-long smoke run; still needs init_from).
"""

from mim_jax import config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("runlocal",))
  c = config_defaults.linprobe_recipe(config_defaults.base_config())
  config_defaults.use_fashion_mnist(c)
  c.optimizer.update(name="sgd", base_lr=0.1, momentum=0.9)
  c.num_epochs = 5
  c.optimizer.warmup_epochs = 0.5
  c.log_every = 50
  c.checkpoint_every = 500
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c, keep_data=True)
  return c
