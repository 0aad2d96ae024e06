"""data2vec 2.0 ViT-B/16 pre-training on ImageNet-1k (Baevski et al., 2023; the release's
examples/data2vec/config/v2/base_images_only_task.yaml).

  python -m mim_jax.main --config=configs/data2vec2_vitb.py --workdir=DIR \
      --config.data.tfds_data_dir=/path/to/tfds

Arguments (after a colon): `variant=B/16` (any SIZE/PATCH), `runlocal` (a seconds-long smoke
run on synthetic data).
Recipe (release: 16 GPUs x 16 images, each masked 16 times): 375,300 updates of 256 images
(75 epochs), AdamW (0.9, 0.95), wd 0.05, lr 1e-3 at batch 256 (scaled linearly with the
batch), 50,040 warmup updates (10 epochs), cosine, gradient clipping 4; RandomResizedCrop(0.2,
1) + flip; inverse block masking of 80% of the patches (visible blocks of 3 x 3, keep
probability adjusted by 0.07, then exactly 39 of 196 visible in every mask), 16 masks per
image sharing one teacher pass; the student encodes the visible patches only; a decoder of 6
grouped 3 x 3 convolutions (768 channels, 16 groups, residual) with noise of std 0.01 at the
masked positions; targets: the mean of the EMA teacher's last 10 of 12 block outputs, each
instance-normalised, the mean layer-normalised; squared error on masked patches plus the [CLS]
loss; teacher decay 0.9998 -> 0.99999 linearly over the first 100,000 updates (27% of the run).

The [CLS] loss weight: the release's cls_loss 0.01 multiplies a per-sample loss summed over
each GPU's 256 samples (16 images x 16 masks) and normalised by the masked-token count, which
against the regression's per-token mean is 0.01 x 256 = 2.56 times the per-sample mean that
`teacher.cls_weight` weights here.

Differences (model, not method): the release's image blocks are post-LayerNorm and take
targets from each block's feed-forward output before its residual; mim_jax's ViT is
pre-LayerNorm and takes block outputs (see mim_jax/methods/data2vec2.py). The encoder starts
as the release's (`model.weight_init="data2vec2"`: linear layers N(0, 0.02), a Xavier-uniform
patch embedding, the cls token N(0, 1)); its convolutional decoder keeps mim_jax's init, not
the release's PyTorch defaults.
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("data2vec2")
  c.model.variant = str(args.get("variant", "B/16"))
  c.model.weight_init = "data2vec2"  # fairseq's init_bert_params and image encoder
  c.masking.update(kind="inverse_block", ratio=0.8, block=3, adjust=0.07, num_masks=16)
  c.decoder.update(width=768, depth=6, kernel=3, groups=16, noise_std=0.01)
  c.teacher.update(ema_decay=0.9998, ema_end_decay=0.99999, ema_anneal_fraction=100_000 / 375_300,
                   top_k=10, block_norm="instance", final_norm="layer", cls_weight=2.56)
  c.data.crop_scale = (0.2, 1.0)
  c.global_batch_size = 256
  c.num_epochs = 75
  c.optimizer.update(name="adamw", base_lr=1e-3, lr_batch_reference=256, b1=0.9, b2=0.95,
                     weight_decay=0.05, warmup_epochs=10.0, clip_grad_norm=4.0)
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.masking.update(ratio=0.5, block=1, num_masks=2)  # 2 x 2-patch synthetic images
    c.decoder.update(width=32, depth=2, groups=4)
    c.teacher.top_k = 2  # the micro encoder has 2 blocks
  return c
