"""The converged linear probe on Fashion-MNIST of a pre-trained encoder (method "probe").

  python -m mim_jax.main --config=configs/linprobe_fmnist.py \
      --config.init_from=workdirs/mae_fmnist --workdir=workdirs/linprobe_fmnist

Features of the frozen encoder are computed once (no augmentation) for the 60,000 training and
10,000 test images: the cls token and the mean of the patch tokens of the encoder output
and of every block. On each, a multinomial logistic regression on standardised features (what
the MAE probe's BatchNorm without affine parameters + linear head converges to) is fitted with
full-batch L-BFGS until its gradient vanishes; the block and the L2 strength (`probe.l2_grid`)
are chosen per pool by fitting on 55,000 training images and scoring the other 5,000
(`data.holdout`), then the probe is refitted on all 60,000 and scored once on the test set
(`--config.probe.select_layer=False --config.classifier.probe_layer=k`: block k only, 0 the
output). The same features of the chosen block give the k-NN scores (k = 20, T = 0.07).
WORKDIR/results.json holds probe_top1_cls / probe_top1_gap / knn_top1_cls / knn_top1_gap, the
chosen blocks and L2 strengths and their held-out scores. Baselines with the same protocol:
--config.classifier.features=pixels (raw pixels), --config.init_from=random (a random
encoder). The SGD probe through the training loop with augmentation (the official MAE
ImageNet recipe) is configs/linprobe_imagenet.py.
Arguments: `runlocal` (a smoke run: one L2 strength, a few iterations; still needs init_from).
"""

from mim_jax import recipes
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("runlocal",))
  c = recipes.knn_recipe("probe")  # data.holdout: 5,000 training images
  config_defaults.use_fashion_mnist(c)
  c.probe.select_layer = True
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c, keep_data=True)
    c.data.eval_split = ""  # the probe chooses on the holdout: it scores the test split
    c.probe.update(l2_grid=(1e-3,), max_iter=20)
  return c
