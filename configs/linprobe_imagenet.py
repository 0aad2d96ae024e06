"""MAE linear probe on ImageNet-1k (He et al. 2022, A.3) of a pre-trained encoder.

  python -m mim_jax.main --config=configs/linprobe_imagenet.py \
      --config.init_from=/ckpt/mae_vitb --config.data.tfds_data_dir=/data/tfds --workdir=DIR

BatchNorm(affine=False) + linear head on the frozen cls token, LARS (momentum 0.9, trust
coefficient 0.001), base lr 0.1 (lr = 0.1 x 16384 / 256 = 6.4), no weight decay, 90 epochs
with 10 warmup, batch 16384, RandomResizedCrop + flip; evaluation on the validation split
(resize 256, centre crop 224). The encoder size comes from init_from. Arguments: `runlocal`.
"""

from mim_jax import recipes
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("runlocal",))
  c = recipes.linprobe_recipe()
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
  return c
