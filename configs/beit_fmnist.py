"""BEiT on Fashion-MNIST: the CPU-sized counterpart of configs/beit_vitb.py.

Train the tokenizer first (stage 1, ~5 minutes on 2 CPU cores); it is exported to
/tmp/beit_tokenizer_fmnist/tokenizer/, where this config looks by default:

  python -m mim_jax.main --config=configs/beit_tokenizer_fmnist.py --workdir=/tmp/beit_tokenizer_fmnist
  python -m mim_jax.main --config=configs/beit_fmnist.py --workdir=/tmp/beit_fmnist

(another tokenizer: --config.tokenizer.path=ITS_WORKDIR_OR_EXPORT; its image size, patch grid,
channels, vocabulary and normalisation must match, which config validation checks).
The demo encoder and budget of configs/mae_fmnist.py (3 epochs, lr 1e-3, half-cosine), so the
rows of docs/results.md compare objectives. Blockwise masking of 40% of the 7x7 patch grid (a
budget of 19 patches, blocks of at least 4 patches: BEiT's 16 of 196 scaled to 49), mask
tokens, a linear head over the 512 codes, cross-entropy on masked patches; AdamW (0.9, 0.999),
wd 0.05, clipping 3.0 as in the ImageNet recipe. Left out of the ViT-B recipe at this size, so
the encoder is MAE's demo ViT as for every method: drop path 0.1, layer scale 0.1, the shared
relative position bias in place of absolute positions, and BEiT's init (configs/beit_vitb.py
sets them). Arguments: `variant=SIZE/4`, `runlocal`.
"""

from mim_jax import recipes, registry
from mim_jax.config import defaults as config_defaults

TOKENIZER_WORKDIR = "/tmp/beit_tokenizer_fmnist"


def get_config(arg=None):
  c = registry.base_config("beit")
  c.masking.update(kind="blockwise", ratio=0.4, min_block=4, min_aspect=0.3)
  c.tokenizer.update(path=TOKENIZER_WORKDIR, vocab_size=512)
  c.optimizer.update(b1=0.9, b2=0.999, weight_decay=0.05, clip_grad_norm=3.0)
  c = recipes.fmnist_pretraining(c, arg)
  if config_defaults.parse_arg(arg).get("runlocal"):
    c.tokenizer.vocab_size = 16  # the runlocal tokenizer of configs/beit_tokenizer_fmnist.py
  return c
