"""iBOT on Fashion-MNIST: the CPU-sized counterpart of configs/ibot_vits.py.

  python -m mim_jax.main --config=configs/ibot_fmnist.py --workdir=/tmp/ibot_fmnist

The demo encoder and budget of configs/mae_fmnist.py (3 epochs, lr 1e-3, half-cosine), so the
rows of docs/results.md compare objectives, not schedules. Scaled down from the ImageNet
recipe: a shared head of 1024 prototypes (hidden 256, bottleneck 128) instead of 8192 (hidden
2048, bottleneck 256), so that the head costs about a fifth of the encoder per token; 2 global
28-px views of scale (0.35, 1) (the Fashion-MNIST crop floor) and 2 local 12-px views (3x3
patches) of scale (0.1, 0.35); blockwise masks on the 7x7 grid with blocks of
at least 4 patches (iBOT's (side // 3)^2 rule), half the views masked at a ratio from
(0.1, 0.5). Teacher momentum 0.99 -> 1 instead of 0.996 (a 700-step run would leave a 0.996
teacher close to its initialisation), teacher temperature 0.04 -> 0.07 over the first epoch,
last layer frozen for 0.1 epoch, AdamW (0.9, 0.999), constant wd 0.04 (not ImageNet's
0.04 -> 0.4 cosine: the results table was measured with it), clipping 3.0 of the global
gradient norm (ImageNet's recipe clips each parameter's: `optimizer.clip_per_tensor=True`; the
results table was measured with the global clip).

Photometric views for 1-channel images: brightness / contrast jitter (p 0.8) and solarisation
of the second global view (p 0.2) are kept; saturation, hue and grayscale act on colour only,
and Gaussian blur (sigma up to 2 px) is off, since it wipes out most of a 28-px garment.
The exported encoder is the teacher's. The ViT starts from MAE's init, as does every Fashion-MNIST
recipe (configs/ibot_vits.py starts it as DINO's: `model.weight_init`). Arguments:
`variant=SIZE/4`, `runlocal`.

Cost: a step runs the student over 2 masked global views (forward + backward) and 2 local
views and the teacher over 2 global views, about 3.0x a SimMIM step on the same encoder and
batch (measured side by side); at SimMIM's 0.96 s per step on 2 cores (docs/benchmarks.md)
that projects to about 2.9 s per step, 34 minutes for the 702 steps. `multicrop.num_local=0`
saves about 8%.
"""

from mim_jax import recipes, registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  c = registry.base_config("ibot")
  c.masking.update(kind="blockwise", ratio_range=(0.1, 0.5), mask_probability=0.5,
                   min_block=4, min_aspect=0.3)
  c.ibot.update(out_dim=1024, hidden_dim=256, bottleneck_dim=128, norm_last_layer=False,
                warmup_teacher_temp_epochs=1.0, momentum=0.99, freeze_last_layer_epochs=0.1)
  c.multicrop.update(global_scale=(0.35, 1.0), local_scale=(0.1, 0.35), num_local=2,
                     local_size=(12, 12), jitter_prob=0.8, grayscale_prob=0.0, blur=False,
                     solarize_prob=0.2)
  c.optimizer.update(b1=0.9, b2=0.999, weight_decay=0.04, clip_grad_norm=3.0)
  c = recipes.fmnist_pretraining(c, arg)
  if config_defaults.parse_arg(arg).get("runlocal"):
    c.multicrop.num_local = 2
    c.ibot.update(out_dim=64, hidden_dim=32, bottleneck_dim=16, warmup_teacher_temp_epochs=0.5)
  return c
