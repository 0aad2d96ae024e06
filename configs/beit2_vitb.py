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

from mim_jax import recipes


def get_config(arg=None):
  return recipes.beit_imagenet_config(arg, version=2)
