"""BEiT v2's VQ-KD tokenizer on Fashion-MNIST: codes that reconstruct a teacher's features.

  python -m mim_jax.main --config=configs/mae_fmnist.py --workdir=/tmp/mae_fmnist  # teacher
  python -m mim_jax.main --config=configs/vqkd_tokenizer_fmnist.py --workdir=/tmp/vqkd \
      --config.teacher.path=/tmp/mae_fmnist
  python -m mim_jax.main --config=configs/beit_fmnist.py --workdir=/tmp/beit_vqkd \
      --config.tokenizer.path=/tmp/vqkd

One code per 4-px patch (7x7 codes) of the demo encoder's grid; the teacher is any encoder of
the same images (here the MAE demo encoder: on Fashion-MNIST there is no CLIP), its last
output after the final norm, layer-normalised per patch. The same convolutional networks and
codebook as configs/beit_tokenizer_fmnist.py (512 codes of 32 dimensions, l2-normalised, EMA
decay 0.99, commitment 0.25, restarts after 50 unused steps), a feature decoder in place of
the pixel decoder, 1 - cosine to the teacher's features as the loss; AdamW lr 1e-3 (batch
256), 3 epochs. Arguments: `runlocal` (a seconds-long smoke run).
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, ("runlocal",))
  c = registry.base_config("vqkd_tokenizer")
  config_defaults.use_fashion_mnist(c)
  c.tokenizer.update(vocab_size=512, code_dim=32, width=64, num_blocks=2, l2_normalize=True,
                     decay=0.99, eps=1e-5, commitment=0.25, restart_after=50)
  c.num_epochs = 3
  c.optimizer.update(name="adamw", base_lr=1e-3, lr_batch_reference=256, b1=0.9, b2=0.99,
                     weight_decay=1e-4, warmup_epochs=0.2, schedule="cosine")
  c.log_every = 20
  c.checkpoint_every = 200
  c.viz_every = 200
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c, keep_data=True)
    c.tokenizer.update(vocab_size=16, width=16, num_blocks=1, restart_after=1)
  return c
