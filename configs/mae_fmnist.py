"""MAE on Fashion-MNIST: the small recipe that runs in minutes on a CPU (the README demo).

  $(command -v sudo) apt-get install -y dataset-fashion-mnist   # 60k + 10k real 28x28 images
  python -m mim_jax.main --config=configs/mae_fmnist.py --workdir=/tmp/mae_fmnist

28x28 grayscale images, 4-px patches (a 7x7 grid of 49 patches), mask ratio 0.75 (12 visible
patches). The default encoder is a 6-block, 128-wide ViT with a 2-block, 64-wide decoder: about
450 to 700 images/s on 2 CPU cores (by machine), so 3 epochs take minutes. `variant=SIZE/4`
selects a published size instead (e.g. `variant=Ti/4`, 2.7x slower on a CPU); `runlocal` is a
seconds-long smoke run. On a GPU scale it up unchanged, e.g. `:variant=S/4 --config.num_epochs=100
--config.model.dtype=bfloat16`.
"""

from mim_jax import recipes, registry


def get_config(arg=None):
  c = registry.base_config("mae")
  c.decoder.update(width=64, depth=2, num_heads=4)
  return recipes.fmnist_pretraining(c, arg)
