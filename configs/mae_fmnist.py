"""MAE on Fashion-MNIST: the small recipe that runs in minutes on a CPU (the README demo).

  sudo apt-get install -y dataset-fashion-mnist      # 60k + 10k real 28x28 images
  python -m mim_jax.main --config=configs/mae_fmnist.py --workdir=/tmp/mae_fmnist

28x28 grayscale images, 4-px patches (a 7x7 grid of 49 patches), ViT-Ti/4 encoder, a light
2-block decoder, mask ratio 0.75 (12 visible patches). Arguments after a colon:
`variant=SIZE/4`, `runlocal` (a seconds-long smoke run: micro model, few steps), e.g.
--config=configs/mae_fmnist.py:runlocal. The same config scales up unchanged on a GPU, e.g.
--config.num_epochs=100 --config.model.dtype=bfloat16.
"""

from mim_jax import config_defaults

FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  unknown = set(args) - {"variant", "runlocal"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; allowed: variant, runlocal")
  c = config_defaults.base_config()
  c.image_size = (28, 28)
  c.channels = 1
  c.model.variant = str(args.get("variant", "Ti/4"))
  c.decoder.update(width=128, depth=2, num_heads=4)
  c.data.update(source="fashion_mnist", path="/usr/share/datasets/fashion-mnist", split="train",
                num_workers=2, mean=FMNIST_MEAN, std=FMNIST_STD,
                # Crops below ~1/3 of a 28x28 image are mostly upsampled blur.
                crop_scale=(0.35, 1.0))
  c.global_batch_size = 256
  c.num_epochs = 10
  c.optimizer.warmup_epochs = 1.0
  c.log_every = 20
  c.checkpoint_every = 200
  c.viz_every = 200
  if args.get("runlocal"):
    c.model.variant = "mu/4"
    c.decoder.update(width=32, depth=1, num_heads=2)
    c.data.num_workers = 0
    c.global_batch_size = 16
    c.total_steps = 3
    c.log_every = 1
    c.checkpoint_every = 2
    c.viz_every = 3
    c.viz_num_images = 2
  return c
