"""Config checks for tokenizer runs (`config.tokenizer`) and for BEiT's frozen tokenizer."""

from __future__ import annotations

import numbers

from mim_jax.config_errors import config_error
from mim_jax.tokenizers import io

TOKENIZER_METHODS = ("vq_tokenizer", "dvae_tokenizer")
KIND_OF_METHOD = {"vq_tokenizer": "vq", "dvae_tokenizer": "dvae"}


def _require(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise config_error(field, value, allowed)


def _int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _num(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_tokenizer_training(config) -> None:
  """The `config.tokenizer` fields of a tokenizer run."""
  t = config.tokenizer
  kind = KIND_OF_METHOD[config.method]
  _require(t.kind == kind, "tokenizer.kind", t.kind,
           f"{kind!r} for method {config.method!r} (method 'vq_tokenizer' trains kind 'vq', "
           "'dvae_tokenizer' kind 'dvae')")
  _require(_int(t.vocab_size) and t.vocab_size >= 2, "tokenizer.vocab_size", t.vocab_size,
           "an integer >= 2 (BEiT: 8192)")
  for name in ("code_dim", "width", "num_blocks"):
    _require(_int(t[name]) and t[name] > 0, f"tokenizer.{name}", t[name], "a positive integer")
  _require(_num(t.decay) and 0 <= t.decay < 1, "tokenizer.decay", t.decay,
           "a number in [0, 1) (the codebook EMA decay, e.g. 0.99)")
  _require(_num(t.eps) and t.eps > 0, "tokenizer.eps", t.eps,
           "a positive number (Laplace smoothing, e.g. 1e-5)")
  _require(_num(t.commitment) and t.commitment >= 0, "tokenizer.commitment", t.commitment,
           "a number >= 0 (VQ-VAE: 0.25)")
  _require(_int(t.restart_after) and t.restart_after >= 0, "tokenizer.restart_after",
           t.restart_after, "an integer >= 0 (steps a code may go unused before it is "
           "re-seeded; 0 disables restarts)")
  _require(isinstance(t.l2_normalize, bool), "tokenizer.l2_normalize", t.l2_normalize,
           "true or false")
  if kind == "dvae":
    for name in ("temp_start", "temp_end"):
      _require(_num(t[name]) and t[name] > 0, f"tokenizer.{name}", t[name],
               "a positive number (DALL-E: 1 -> 1/16)")
    _require(_num(t.temp_anneal_fraction) and 0 <= t.temp_anneal_fraction <= 1,
             "tokenizer.temp_anneal_fraction", t.temp_anneal_fraction, "a number in [0, 1]")
    _require(_num(t.kl_weight) and t.kl_weight >= 0, "tokenizer.kl_weight", t.kl_weight,
             "a number >= 0")


def validate_beit_tokenizer(config, image_size: tuple[int, int], patch: int) -> None:
  """BEiT's `config.tokenizer.path` names a tokenizer that fits this config."""
  t = config.tokenizer
  _require(_int(t.vocab_size) and t.vocab_size >= 2, "tokenizer.vocab_size", t.vocab_size,
           "an integer >= 2 (BEiT: 8192)")
  io.check_matches(t.path, vocab_size=t.vocab_size, image_size=image_size, patch_size=patch,
                   channels=config.channels, mean=config.data.mean, std=config.data.std,
                   variant=config.model.variant)
