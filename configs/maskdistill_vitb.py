"""MaskDistill ViT-B/16 pre-training on ImageNet-1k (Peng et al., 2022), teacher CLIP ViT-B/16.

  python -m mim_jax.convert import CLIP_VIT_B16_VISION_CHECKPOINT /tmp/clip_b16 \
      --mlp_act=quick_gelu
  python -m mim_jax.main --config=configs/maskdistill_vitb.py --workdir=DIR \
      --config.teacher.path=/tmp/clip_b16 --config.data.tfds_data_dir=/path/to/tfds

Recipe (the paper's ViT-B setting, which follows BEiT v2's code base): 300 epochs, batch 2048,
AdamW (0.9, 0.98), lr 1.5e-3 (given for batch 2048), 10 warmup epochs then cosine to 1e-5,
wd 0.05, drop path 0.1, gradient clipping 3.0; blockwise masking of 40% of the 196 patches
(blocks of at least 16 patches); RandomResizedCrop(0.08, 1) + flip; a linear head to the
teacher's width, smooth-L1 on the teacher's layer-normalised last-layer patch features. The
teacher sees the student's view, re-normalised with its own statistics (CLIP's mean and std,
read from its export). Its features are CLIP's final-norm tokens at its width (768 for ViT-B/16):
not multiplied by CLIP's 512-wide output projection, which BEiT v2's VQ-KD release applies to
every token (the import keeps that projection as the classifier head, which the teacher does
not use); that choice is not checked against MaskDistill's own release.
The student is BEiT v2's ViT: a shared relative position bias, layer scale 0.1, no absolute
positions, and BEiT v2's init (`model.rel_pos_bias`, `model.layer_scale`, `model.abs_posemb`,
`model.weight_init`; unilm beit2/modeling_pretrain.py, BEiT's own). Arguments:
`variant=B/16` (any SIZE/PATCH), `runlocal`.
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("maskdistill")
  c.model.variant = str(args.get("variant", "B/16"))
  c.model.drop_path_rate = 0.1
  # The official ViT: a relative position bias shared by all blocks, layer scale, no
  # absolute positions, and its init (models/initializers.py weight_inits).
  c.model.update(rel_pos_bias="shared", layer_scale=0.1, abs_posemb=False, weight_init="beit")
  c.masking.update(kind="blockwise", ratio=0.4, min_block=16, min_aspect=0.3)
  c.data.crop_scale = (0.08, 1.0)
  c.global_batch_size = 2048
  c.num_epochs = 300
  c.optimizer.update(name="adamw", base_lr=1.5e-3, lr_batch_reference=2048, b1=0.9, b2=0.98,
                     weight_decay=0.05, warmup_epochs=10.0, min_lr=1e-5, clip_grad_norm=3.0)
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.masking.min_block = 1  # 2x2-patch synthetic images: a budget of one patch
  return c
