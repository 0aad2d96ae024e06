"""Masked image modeling with the target chosen by config, on Fashion-MNIST: the target-level
study (docs/results.md), every target under the same encoder, masking and budget.

  python -m mim_jax.main --config=configs/mim_fmnist.py:target=hog --workdir=/tmp/mim_hog
  python -m mim_jax.main --config=configs/mim_fmnist.py:target=teacher_features \
      --config.target.teacher.path=MAE_WORKDIR --workdir=/tmp/mim_teacher
  python -m mim_jax.main --config=configs/mim_fmnist.py:target=tokens \
      --config.target.tokenizer.path=TOKENIZER_WORKDIR --workdir=/tmp/mim_tokens

The demo encoder and budget of configs/mae_fmnist.py (3 epochs, lr 1e-3, half-cosine);
blockwise masking of 40% of the 7x7 grid (blocks of at least 4 patches), as in
configs/maskfeat_fmnist.py; each target with its paper's loss (`target.loss=''`). `target=`
picks the kind (pixels, norm_pixels (default), hog, tokens, teacher_features) and its
Fashion-MNIST settings: HOG over 4x4-px cells (one per patch) with a 4-px Gaussian window, a
tokenizer of 512 codes (configs/beit_tokenizer_fmnist.py). `masking=random75` replaces the
blockwise masks by 75% of the patches at random (the study's second masking). Further
arguments: `variant=SIZE/4`, `runlocal`.
"""

from mim_jax import recipes, registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, allowed=("target", "masking", "variant", "runlocal"))
  c = registry.base_config("mim")
  c.target.kind = str(args.pop("target", "norm_pixels"))
  masking = str(args.pop("masking", "blockwise"))
  if masking == "blockwise":
    c.masking.update(kind="blockwise", ratio=0.4, min_block=4, min_aspect=0.3)
  elif masking == "random75":
    c.masking.update(kind="random", ratio=0.75)
  else:
    raise ValueError(f"configs/mim_fmnist.py: masking={masking!r}: expected blockwise or "
                     "random75")
  if c.target.kind == "hog":
    # scikit-image's bins (MaskFeat's mirrored and shifted by half a bin): the rows of
    # docs/results.md were measured with them.
    c.target.hog.update(cell_size=4, num_bins=9, gradient="sobel", gaussian_window=4,
                        binning="skimage")
  if c.target.kind == "tokens":
    c.target.tokenizer.vocab_size = 512
  rest = ",".join(k if v is True else f"{k}={v}" for k, v in args.items())
  return recipes.fmnist_pretraining(c, rest or None)
