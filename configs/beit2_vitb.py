"""BEiT v2 ViT-B/16 pre-training on ImageNet-1k (Peng et al., 2022), stage 2.

Stage 1 first, the VQ-KD tokenizer (configs/vqkd_tokenizer_imagenet.py), then:

  python -m mim_jax.main --config=configs/beit2_vitb.py --workdir=DIR \
      --config.tokenizer.path=VQKD_WORKDIR --config.data.tfds_data_dir=/path/to/tfds

Recipe (beit2/PRETRAINING.md's base command and run_beitv2_pretraining.py's defaults, 1,600
epochs): BEiT's masked prediction of the tokenizer's 8192 codes plus the patch aggregation
("cls_pt": the last block's [CLS] beside block 9's patch tokens through 2 more blocks, the
same head, the two cross-entropies added; `patch_aggregation`); batch 2048, AdamW (0.9,
0.999), lr 1.5e-3 at that batch, 10 warm-up epochs then cosine to 1e-5, weight decay 0.05,
gradient clipping 3.0, drop path 0.1; the BEiT ViT (a shared relative position bias, layer
scale 0.1, no absolute positions, BEiT's init); blockwise masks of exactly 75 of the 196
patches (blocks of at least 16, aspect ratios in [0.3, 1/0.3], short masks topped up:
`masking.exact_count`); RandomResizedCrop(0.2, 1) + flip, the tokenizer reading the same
224-px view. For the 300-epoch schedule the release sets b2 0.98 and drop path 0:
`--config.num_epochs=300 --config.optimizer.b2=0.98 --config.model.drop_path_rate=0`.
Differences kept on purpose: no colour jitter (the release's default 0.4), bilinear resizing
where the command asks for bicubic (both views), and our VQ-KD tokenizer
(configs/vqkd_tokenizer_imagenet.py says how it differs from the release's).
Arguments: `variant=B/16` (any SIZE/PATCH; the aggregation reads block depth - 3, the
release's 9 of 12 and 21 of 24; layer scale 0.1, and the release's 1e-5 from 24 blocks up),
`runlocal`.
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults
from mim_jax.models.vit import size_from_config


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("beit")
  c.model.variant = str(args.get("variant", "B/16"))
  c.model.drop_path_rate = 0.1
  c.model.weight_init = "beit"
  depth = size_from_config(c.model)[0].depth
  # The release's layer scale: 0.1 for its base model, 1e-5 for its large one.
  c.model.update(rel_pos_bias="shared", layer_scale=0.1 if depth < 24 else 1e-5,
                 abs_posemb=False)
  # 75 of 196 patches: int(196 * 75 / 196) = 75, BEiT v2's num_mask_patches, always reached.
  c.masking.update(kind="blockwise", ratio=75 / 196, min_block=16, min_aspect=0.3,
                   exact_count=True)
  c.tokenizer.update(vocab_size=8192, path="")
  c.data.crop_scale = (0.2, 1.0)
  c.global_batch_size = 2048
  c.num_epochs = 1600
  c.optimizer.update(name="adamw", base_lr=1.5e-3, lr_batch_reference=2048, b1=0.9, b2=0.999,
                     weight_decay=0.05, warmup_epochs=10.0, min_lr=1e-5, clip_grad_norm=3.0)
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.masking.min_block = 1  # 2x2-patch synthetic images: a budget of one patch
    c.tokenizer.vocab_size = 16  # the runlocal tokenizer of configs/vqkd_tokenizer_imagenet.py
  depth = size_from_config(c.model)[0].depth  # runlocal's micro model has 2
  c.patch_aggregation.update(from_block=max(depth - 3, 1), depth=2)  # 9 of 12, 21 of 24
  return c
