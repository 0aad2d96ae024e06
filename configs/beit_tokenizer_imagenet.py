"""BEiT stage 1 on ImageNet-1k: a VQ tokenizer of 8192 codes over the ViT-B/16 patch grid.

  python -m mim_jax.main --config=configs/beit_tokenizer_imagenet.py --workdir=DIR \
      --config.data.tfds_data_dir=/path/to/tfds

One code per 16-px patch of 224-px images (14x14 codes), 8192 codes as BEiT's DALL-E
tokenizer, 32-dimensional and l2-normalised as BEiT v2's codebook; EMA updates (decay 0.99,
Laplace smoothing), commitment 0.25, dead-code restarts after 100 unused steps. The network is
ours (a convolutional encoder / decoder 256 wide, 2 residual blocks each; MSE reconstruction
of the normalised image), not DALL-E's dVAE: AdamW lr 1e-3 at batch 1024, 100 epochs, 5
warmup. The export (DIR/tokenizer/) is what configs/beit_vitb.py reads through
--config.tokenizer.path=DIR. Arguments: `variant=B/16` (the patch grid of that encoder),
`runlocal`.
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("vq_tokenizer")
  c.model.variant = str(args.get("variant", "B/16"))
  c.tokenizer.update(vocab_size=8192, code_dim=32, l2_normalize=True, decay=0.99,
                     eps=1e-5, commitment=0.25, restart_after=100, width=256, num_blocks=2)
  c.data.crop_scale = (0.08, 1.0)
  c.global_batch_size = 1024
  c.num_epochs = 100
  c.optimizer.update(name="adamw", base_lr=1e-3, lr_batch_reference=1024, b1=0.9, b2=0.99,
                     weight_decay=1e-4, warmup_epochs=5.0, schedule="cosine")
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.tokenizer.update(vocab_size=16, width=16, num_blocks=1, restart_after=1)
  return c
