"""Trainable methods by name. Each is a small module implementing `base.Method`.

Pre-training methods live here; the trained evaluations (linear probe, fine-tuning) live in
`mim_jax.evaluate` and run through the same training loop.
"""

from __future__ import annotations

from mim_jax.evaluate.finetune import FineTune
from mim_jax.evaluate.linear_probe import LinearProbe
from mim_jax.methods import beit, data2vec, ibot, mae, maskfeat, simmim
from mim_jax.tokenizers.dvae import DVAETokenizer
from mim_jax.tokenizers.vq import VQTokenizer

METHODS = {"mae": mae.MAE, "simmim": simmim.SimMIM, "maskfeat": maskfeat.MaskFeat,
           "data2vec": data2vec.Data2Vec,
           "ibot": ibot.IBOT,
           "beit": beit.BEiT, "vq_tokenizer": VQTokenizer,
           "dvae_tokenizer": DVAETokenizer,
           "linprobe": LinearProbe, "finetune": FineTune}


def build_method(config, length=None):
  """Instantiates the method named by `config.method`.

  `length` (`base.TrainLength`) reaches methods with epoch-based schedules of their own
  (`needs_train_length`); without it they derive one from `config.num_epochs` and one step
  per epoch, which only tools that never train (benchmarks, pictures) should rely on.
  """
  cls = METHODS[config.method]
  if getattr(cls, "needs_train_length", False):
    return cls(config, length=length)
  return cls(config)
