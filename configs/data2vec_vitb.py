"""data2vec ViT-B/16 pre-training on ImageNet-1k (Baevski et al., 2022; the official vision
release's ViT-B 800-epoch command).

  python -m mim_jax.main --config=configs/data2vec_vitb.py --workdir=DIR \
      --config.data.tfds_data_dir=/path/to/tfds

Arguments (after a colon): `variant=B/16` (any SIZE/PATCH), `runlocal` (a seconds-long smoke run
on synthetic data). Recipe (release command: 16 GPUs x 128 images): 800 epochs, batch 2048,
AdamW (0.9, 0.999), wd 0.05, lr 2e-3 at batch 2048 (scaled linearly with the batch), 10 warmup
epochs, half-cosine to 1e-5 (run_cyclical.py's min_lr), gradient clipping 3.0, drop path 0.25;
BEiT's blockwise masking of 60% of the patches (the paper; the release masks 120 of 196, 61%) in
blocks of at least 16 patches with aspect ratio in [0.3, 1/0.3]; targets: the mean of the last 6
block outputs of the EMA teacher (block outputs after the residual, the release's `layer_results
end`), each normalised per token over channels without affine (its training engine's default)
and the mean normalised again (`--post_target_layer_norm`); smooth-L1 with beta 2 on masked
patches, no extra loss scale (`--loss_scale -1`); teacher decay 0.999 -> 0.9998 linearly over
the whole run, as fairseq's data2vec_vision config anneals it (the release command holds 0.9998
from the first step: --config.teacher.ema_anneal_fraction=0.0); RandomResizedCrop(0.08, 1) +
flip (BEiT's crop). The official ViT's shared relative position bias and layer scale 1e-4,
without absolute positions, and its init (`model.rel_pos_bias`, `model.layer_scale`,
`model.abs_posemb`, `model.weight_init`). Not
reproduced: attention dropout 0.05 and colour jitter. `--config.teacher.block_norm=instance
--config.teacher.final_norm=none` gives the per-channel instance-normalised targets of the
data2vec paper's speech setup.
"""

from mim_jax import registry
from mim_jax.config import defaults as config_defaults


def get_config(arg=None):
  args = config_defaults.parse_arg(arg)
  c = registry.base_config("data2vec")
  c.model.variant = str(args.get("variant", "B/16"))
  c.model.drop_path_rate = 0.25
  # The official ViT: a relative position bias shared by all blocks, layer scale, no
  # absolute positions, and its init (N(0, 0.02) cut at +-0.02, branch outputs divided by
  # sqrt(2 * layer): models/initializers.py weight_inits).
  c.model.weight_init = "beit"
  c.model.update(rel_pos_bias="shared", layer_scale=1e-4, abs_posemb=False)
  c.masking.update(kind="blockwise", ratio=0.6, min_block=16, min_aspect=0.3)
  c.teacher.update(ema_decay=0.999, ema_end_decay=0.9998, ema_anneal_fraction=1.0, top_k=6,
                   block_norm="layer", final_norm="layer", loss_beta=2.0)
  c.data.crop_scale = (0.08, 1.0)
  c.global_batch_size = 2048
  c.num_epochs = 800
  c.optimizer.update(name="adamw", base_lr=2e-3, lr_batch_reference=2048, b1=0.9, b2=0.999,
                     weight_decay=0.05, warmup_epochs=10.0, clip_grad_norm=3.0, min_lr=1e-5)
  if args.get("runlocal"):
    config_defaults.apply_runlocal(c)
    c.masking.min_block = 1  # 2x2-patch synthetic images: a budget of two patches
    c.teacher.top_k = 2      # the micro encoder has 2 blocks
  return c
