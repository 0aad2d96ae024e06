"""BEiT v2's VQ-KD tokenizer on ImageNet-1k, distilling a CLIP ViT-B/16 (Peng et al., 2022).

  python -m mim_jax.convert import CLIP_VIT_B16_VISION_CHECKPOINT /tmp/clip_b16 \
      --mlp_act=quick_gelu
  python -m mim_jax.main --config=configs/vqkd_tokenizer_imagenet.py --workdir=DIR \
      --config.teacher.path=/tmp/clip_b16 --config.data.tfds_data_dir=/path/to/tfds
  python -m mim_jax.main --config=configs/beit2_vitb.py --config.tokenizer.path=DIR ...

From the paper and its release: 8192 codes of 32 dimensions, l2-normalised (codes chosen by
cosine similarity), the release's codebook (NormEMAVectorQuantizer: each code assigned in a
batch moves by 1 - decay = 0.01 towards the normalised mean of its vectors; codes start from 10
iterations of spherical k-means on the first batch's vectors; no dead-code restarts),
commitment weight 1 (modeling_vqkd.py's beta), cosine loss to the teacher's last-layer patch
features, the teacher seeing the same 224-px view (re-normalised with its own statistics),
RandomResizedCrop(0.08, 1), AdamW (0.9, 0.99), weight decay 1e-4, 100 epochs.
Differences kept on purpose: the tokenizer's networks are mim_jax's convolutional encoder and
feature decoder (256 wide, 2 residual blocks each), not the release's ViT-B encoder and
3-block transformer decoder; the k-means runs on the first step's whole batch (its first
micro-batch under gradient accumulation; in the release each GPU clusters its own share);
lr 1e-3 at batch 1024 with 5 warm-up epochs (the release: batch 512, 10 warm-up epochs); the
targets are the teacher's final-norm patch tokens layer-normalised (teacher.norm), where the
release takes CLIP's tokens after its 512-wide output projection, without a further norm.
Arguments: `variant=B/16` (the patch grid), `runlocal`.
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("vqkd_tokenizer")
  c.model.variant = str(args.get("variant", "B/16"))
  c.tokenizer.update(vocab_size=8192, code_dim=32, l2_normalize=True, decay=0.99,
                     codebook_update="norm_ema", kmeans_init=10, commitment=1.0,
                     restart_after=0, width=256, num_blocks=2)
  c.data.crop_scale = (0.08, 1.0)
  c.global_batch_size = 1024
  c.num_epochs = 100
  c.optimizer.update(name="adamw", base_lr=1e-3, lr_batch_reference=1024, b1=0.9, b2=0.99,
                     weight_decay=1e-4, warmup_epochs=5.0, schedule="cosine")
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.tokenizer.update(vocab_size=16, width=16, num_blocks=1)
  return c
