"""iBOT ViT-S/16 pre-training on ImageNet-1k (Zhou et al., 2022).

  python -m mim_jax.main --config=configs/ibot_vits.py --workdir=DIR \
      --config.data.tfds_data_dir=/path/to/tfds

Arguments (after a colon): `variant=S/16` (any SIZE/PATCH; ViT-B/16 in iBOT also sets
ibot.norm_last_layer=True and 50 teacher-temperature warmup epochs), `runlocal` (a
seconds-long smoke run on synthetic data).

Recipe (bytedance/ibot README, ViT-S/16 command, and main_ibot.py defaults): 800 epochs, batch
1024, AdamW, lr 5e-4 x batch / 256 after 10 warmup epochs, half-cosine to 1e-6, gradient
clipping 3.0 per parameter (utils.clip_gradients: each tensor's norm on its own), drop path 0.1,
weight decay 0.04 -> 0.4 along a cosine; shared DINO head with 8192 prototypes (3 layers, hidden
2048, bottleneck 256, last layer not norm-fixed); student temperature 0.1, teacher temperatures
0.04 -> 0.07 over 30 epochs for [CLS] and patches; teacher momentum 0.996 -> 1 (cosine), centre
momentum 0.9; last layer frozen for the first epoch; lambda 1 for both losses. Views: 2 global
crops at 224 px of scale (0.25, 1) and 10 local crops at 96 px of scale (0.05, 0.25), with
DINO's colour jitter / grayscale / blur / solarisation. Masking: blockwise (min block
(min(grid) // 3)^2 patches as the release derives it: 16 for the 14x14 grid of S/16 at 224 px,
81 for `variant=S/8`'s 28x28; a --config.model.variant override keeps the argument's, so set
masking.min_block with it; aspect 0.3 .. 1/0.3) on half of the global views, each with a ratio
drawn from (0.1, 0.5) (iBOT's pred_ratio 0 / 0.3 with pred_ratio_var 0 / 0.2). The ViT starts as the release's
(DINO's, `model.weight_init="dino"`): linear layers and the cls token trunc_normal_(0.02), the
patch-embedding conv at PyTorch's default, a zero mask embedding. Not reproduced: its learned
position table (trunc_normal_(0.02), interpolated for the 96-px views); the encoder adds the
fixed sin-cos table of each view's own grid, as MAE's. Weight decay follows the release's groups
(`IBOT.decay_mask`): every tensor of two or more dimensions, the cls token and the mask
embedding included, and the prototypes' scales.
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults
from mim_jax.models.vit import parse_variant


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("ibot")
  c.model.variant = str(args.get("variant", "S/16"))
  c.model.drop_path_rate = 0.1
  # DINO's ViT init, which iBOT's release keeps (models/initializers.py weight_inits).
  c.model.weight_init = "dino"
  grid = min(c.image_size) // parse_variant(c.model.variant)[1]
  c.masking.update(kind="blockwise", ratio_range=(0.1, 0.5), mask_probability=0.5,
                   min_block=(grid // 3) ** 2, min_aspect=0.3)
  c.ibot.update(out_dim=8192, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=False,
                student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07,
                warmup_teacher_temp_epochs=30.0, momentum=0.996, center_momentum=0.9,
                lambda_cls=1.0, lambda_patch=1.0, freeze_last_layer_epochs=1.0)
  c.multicrop.update(global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), num_local=10,
                     local_size=(96, 96), jitter_prob=0.8, grayscale_prob=0.2, blur=True,
                     solarize_prob=0.2)
  c.global_batch_size = 1024
  c.num_epochs = 800
  c.optimizer.update(name="adamw", base_lr=5e-4, lr_batch_reference=256, min_lr=1e-6,
                     b1=0.9, b2=0.999, weight_decay=0.04, weight_decay_schedule="cosine",
                     weight_decay_end=0.4, warmup_epochs=10.0, clip_grad_norm=3.0,
                     clip_per_tensor=True)
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.masking.min_block = 1  # 2x2-patch synthetic images
    c.multicrop.update(num_local=2, local_size=(16, 16))
    c.ibot.update(out_dim=64, hidden_dim=32, bottleneck_dim=16, warmup_teacher_temp_epochs=0.5,
                  freeze_last_layer_epochs=0.5)
  return c
