"""BEiT stage 1 on Fashion-MNIST: a VQ tokenizer with one code per 4-px patch (7x7 codes).

  python -m mim_jax.main --config=configs/beit_tokenizer_fmnist.py --workdir=/tmp/beit_tokenizer_fmnist

The run ends by exporting the tokenizer to WORKDIR/tokenizer/ (tokenizer.json + Orbax
weights, see mim_jax/tokenizers/io.py), which configs/beit_fmnist.py reads. The grid is the
patch grid of the Fashion-MNIST demo encoder (model.variant Ti/4: the tokenizer's
downsampling factor is its patch size); the encoder itself is not trained here.
Recipe (ours): a convolutional encoder / decoder 64 channels wide with 2 residual blocks
each, 512 codes of 32 dimensions (8192 would leave most codes of 4x4-px grayscale patches
unused; 512 keep the cross-entropy of stage 2 meaningful at this size), l2-normalised
(BEiT v2 / ViT-VQGAN), EMA decay 0.99 with Laplace smoothing, commitment 0.25, codes unused
for 50 steps re-seeded from the batch; MSE reconstruction of the normalised image; AdamW
lr 1e-3 (batch 256), 3 epochs (about 700 steps, ~5 minutes on 2 CPU cores).
Arguments: `runlocal` (a seconds-long smoke run), `dvae` (a Gumbel-softmax dVAE of the same
networks and vocabulary instead: temperature 1 -> 1/16 over the first half, KL to the
uniform prior weighted 0.01; `--config=configs/beit_tokenizer_fmnist.py:dvae`).
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg, ("runlocal", "dvae"))
  c = registry.base_config("dvae_tokenizer" if args.get("dvae") else "vq_tokenizer")
  config_defaults.use_fashion_mnist(c)
  c.tokenizer.update(vocab_size=512, code_dim=32, width=64, num_blocks=2)
  if args.get("dvae"):
    c.tokenizer.update(temp_start=1.0, temp_end=1.0 / 16, temp_anneal_fraction=0.5,
                       kl_weight=0.01)
  else:
    c.tokenizer.update(l2_normalize=True, decay=0.99, eps=1e-5, commitment=0.25,
                       restart_after=50)
  c.num_epochs = 3
  c.optimizer.update(name="adamw", base_lr=1e-3, lr_batch_reference=256, b1=0.9, b2=0.99,
                     weight_decay=1e-4, warmup_epochs=0.2, schedule="cosine")
  c.log_every = 20
  c.checkpoint_every = 200
  c.viz_every = 200
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c, keep_data=True)
    c.tokenizer.update(vocab_size=16, width=16, num_blocks=1)
    if not args.get("dvae"):
      c.tokenizer.restart_after = 1
  return c
