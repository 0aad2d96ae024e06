"""MAE on Fashion-MNIST: the small recipe that runs in minutes on a CPU (the README demo).

  sudo apt-get install -y dataset-fashion-mnist      # 60k + 10k real 28x28 images
  python -m mim_jax.main --config=configs/mae_fmnist.py --workdir=/tmp/mae_fmnist

28x28 grayscale images, 4-px patches (a 7x7 grid of 49 patches), mask ratio 0.75 (12 visible
patches). The default encoder is a 6-block, 128-wide ViT with a 2-block, 64-wide decoder: about
440 images/s on 2 CPU cores, so 3 epochs take minutes. `variant=SIZE/4` selects a published size
instead (e.g. `variant=Ti/4`, 2.7x slower on a CPU); `runlocal` is a seconds-long smoke run.
On a GPU scale it up unchanged, e.g. `:variant=S/4 --config.num_epochs=100
--config.model.dtype=bfloat16`.
"""

from mim_jax import config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = config_defaults.use_fashion_mnist(config_defaults.base_config())
  if "variant" in args:  # a published size instead of the demo encoder
    c.model.update(variant=str(args["variant"]), width=0, depth=0, num_heads=0, mlp_dim=0)
  c.decoder.update(width=64, depth=2, num_heads=4)
  c.num_epochs = 3
  # A short schedule: a higher peak lr than ImageNet's 1.5e-4 x batch/256 and a short warmup.
  c.optimizer.base_lr = 1e-3
  c.optimizer.warmup_epochs = 0.5
  c.log_every = 20
  c.checkpoint_every = 200
  c.viz_every = 200
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c, keep_data=True)
  return c
