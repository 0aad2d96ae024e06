"""data2vec on Fashion-MNIST: the CPU-sized counterpart of configs/data2vec_vitb.py.

  python -m mim_jax.main --config=configs/data2vec_fmnist.py --workdir=/tmp/data2vec_fmnist

The demo encoder and budget of configs/mae_fmnist.py (3 epochs, lr 1e-3, half-cosine), so the
rows of docs/results.md compare objectives, not schedules. Blockwise masking of 60% of the 7x7
patch grid (a budget of 29 patches; blocks of at least 4 patches, the ImageNet recipe's 16 of
196 scaled to 49); targets: the mean of the teacher's last 3 of 6 blocks (ViT-B: 6 of 12; the
upper half of any `variant`), normalised as in the ViT-B recipe; smooth-L1 with beta 2; AdamW
(0.9, 0.999), clipping 3.0. The teacher decay is sized for runs of hundreds to thousands of steps: 0.99 ->
0.999 (averaging over ~100 -> ~1000 steps), annealed over the whole schedule (642 steps at the
default 3 epochs, 6,420 at the 30 of docs/fmnist_results.sh), instead of ImageNet's 0.999 ->
0.9998, whose ~5000-step window would leave the teacher near its random initialisation for
most of such a run. Left out of the ViT-B recipe at this size, so the encoder is MAE's demo ViT
as for every method: drop path 0.25, layer scale 1e-4, the shared relative position bias in
place of absolute positions, and BEiT's init (configs/data2vec_vitb.py sets them). Arguments:
`variant=SIZE/4`, `runlocal`.
"""

from mim_jax import recipes, registry
from mim_jax.models.vit import size_from_config


def get_config(arg=None):
  c = registry.base_config("data2vec")
  c.masking.update(kind="blockwise", ratio=0.6, min_block=4, min_aspect=0.3)
  c.teacher.update(ema_decay=0.99, ema_end_decay=0.999, ema_anneal_fraction=1.0,
                   block_norm="layer", final_norm="layer", loss_beta=2.0)
  c.optimizer.update(b1=0.9, b2=0.999, weight_decay=0.05, clip_grad_norm=3.0)
  c = recipes.fmnist_pretraining(c, arg)
  # The upper half of the blocks, whatever the encoder (variant=..., runlocal's micro model;
  # --config.model.depth=N or --config.model.variant=... on the command line keep this
  # value: set teacher.top_k too).
  c.teacher.top_k = max(1, size_from_config(c.model)[0].depth // 2)
  return c
