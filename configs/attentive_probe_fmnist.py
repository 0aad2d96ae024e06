"""The attentive probe on Fashion-MNIST of a pre-trained encoder (method "attentive_probe").

  python -m mim_jax.main --config=configs/attentive_probe_fmnist.py \
      --config.init_from=workdirs/mae_fmnist --workdir=workdirs/attentive_probe_fmnist

The frozen encoder's output tokens ([CLS] and patches) read by a learned query through one
cross-attention block with an MLP, then a linear classifier (evaluate/attentive_probe.py);
only that head trains: AdamW (0.9, 0.999), wd 0.05, lr 1e-3 x batch / 256 with 1 epoch of
warmup then half-cosine, 10 epochs at batch 256, RandomResizedCrop (0.35, 1) + flip. Choose the
lr (and `classifier.probe_layer`, a block k instead of the output) on held-out training
images, never on the test set: --config.data.holdout=5000 --config.data.eval_split=holdout.
Baseline with the same protocol: --config.init_from=random (a random encoder).
Arguments: `runlocal` (a smoke run; still needs init_from).
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("runlocal",))
  c = registry.base_config("attentive_probe")
  config_defaults.use_fashion_mnist(c)
  c.optimizer.update(name="adamw", base_lr=1e-3, lr_batch_reference=256, b1=0.9, b2=0.999,
                     weight_decay=0.05, warmup_epochs=1.0, schedule="cosine", min_lr=1e-6)
  c.num_epochs = 10
  c.log_every = 50
  c.checkpoint_every = 500
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c, keep_data=True)
  return c
