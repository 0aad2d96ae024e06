"""BEiT ViT-B/16 pre-training on ImageNet-1k (Bao et al., 2022), stage 2.

Stage 1 first (the tokenizer, configs/beit_tokenizer_imagenet.py), then:

  python -m mim_jax.main --config=configs/beit_vitb.py --workdir=DIR \
      --config.tokenizer.path=TOKENIZER_WORKDIR --config.data.tfds_data_dir=/path/to/tfds

Recipe (paper, section 2.5 / appendix, and the 2021 release's pre-training script; the current
microsoft/unilm beit/README.md command sets drop path 0 and the current script's default
betas are (0.9, 0.98): the paper's values are kept): 800 epochs, batch 2048, AdamW (0.9,
0.999), lr 1.5e-3 (given for batch 2048, so lr_batch_reference=2048), 10 warmup epochs then
cosine (to min lr 1e-5,
the script's default), wd 0.05, drop path 0.1, gradient clipping 3.0; blockwise masking of
about 40% of the 196 patches (the official command masks 75; our budget is int(196 x 0.4) =
78) with blocks of at least 16 patches and aspect ratios in [0.3, 1/0.3];
RandomResizedCrop(0.08, 1) + flip; a linear head over 8192 visual tokens, cross-entropy on
masked patches.
The official ViT: a shared relative position bias, layer scale 0.1, no absolute positions and
its init (`model.rel_pos_bias`, `model.layer_scale`, `model.abs_posemb`, `model.weight_init`:
N(0, 0.02) cut at +-0.02, each block's branch outputs divided by sqrt(2 * layer)).
Differences kept on purpose: no colour jitter, and our VQ tokenizer
(trained on the same data, applied to the same 224-px view) instead of DALL-E's dVAE on a
112-px second view. BEiT v1's masks fall a few patches short of the budget when their last
blocks do not fit (31% of 4,000 masks on 14x14 at 78: 77.5 patches on average, at least 70);
BEiT v2's generator tops each up to exactly its count (`masking.exact_count`;
configs/beit2_vitb.py is BEiT v2's stage 2). Arguments: `variant=B/16` (any SIZE/PATCH), `runlocal`.
"""

from mim_jax import recipes


def get_config(arg=None):
  return recipes.beit_imagenet_config(arg, version=1)
