"""How a ViT's weights start: the initialisers of the official recipes (`model.weight_init`).

Each scheme is a transcription of one official code base's init (MAE, BEiT / SimMIM /
data2vec, DINO / iBOT, data2vec 2.0; `weight_inits`), so that a run started from scratch draws
its weights as the paper's code does; the heads' `trunc_normal` is timm's, not flax's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.config.errors import config_error

# Xavier-uniform on every linear layer and N(0, 0.02) on learned tokens, as in the official MAE
# (model.weight_init='xavier', the default; `weight_inits` has BEiT's too).
dense_init = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=0.02)

def trunc_normal(std: float) -> nn.initializers.Initializer:
  """timm's `trunc_normal_(std=std)` (the official heads' init): N(0, std^2) cut at the
  absolute values -2 and 2. flax's `truncated_normal(std)` cuts at -2 std and 2 std instead,
  which makes its standard deviation 12% smaller than asked (0.88 std). Cuts beyond 5 std are
  made at 5 std: float32's erf rounds to +-1 further out, where the inverse-CDF draw could
  return the cut itself (a weight of exactly -2 in ~1e-7 of draws, as in PyTorch); the
  std changes by under 2e-5 of itself."""
  bound = min(2.0 / std, 5.0)
  return nn.initializers.truncated_normal(std, lower=-bound, upper=bound)


# model.weight_init: how an encoder built from the config starts (see `weight_inits`).
WEIGHT_INITS = ("xavier", "beit", "dino", "data2vec2")
# BEiT's, BEiT v2's, data2vec's and SimMIM's pre-training code wrap timm's trunc_normal_ with
# a = -std, b = std: the draws are cut at one standard deviation (+-0.02), not two, so their
# std is 0.54 x 0.02.
BEIT_STD = 0.02


def _divided(init: nn.initializers.Initializer, divisor: float) -> nn.initializers.Initializer:
  def scaled(key, shape, dtype=jnp.float32):
    return init(key, shape, dtype) / divisor
  return scaled


def _torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias of a Linear / Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return uniform


def _zero_bias(fan_in: int) -> nn.initializers.Initializer:
  del fan_in
  return nn.initializers.zeros


@dataclasses.dataclass(frozen=True)
class WeightInit:
  """Initialisers of one block's linear layers: `kernel` for qkv and fc1, `out` for the branch
  outputs (attention proj, MLP fc2), `token` for the cls token; and of the embedding:
  `patch_kernel` for the patch embedding [p * p * C, D], `patch_bias(fan_in)` its bias's
  initialiser for fan_in = p * p * C, `mask_token` for the mask token."""
  kernel: nn.initializers.Initializer
  out: nn.initializers.Initializer
  token: nn.initializers.Initializer
  patch_kernel: nn.initializers.Initializer
  patch_bias: Callable[[int], nn.initializers.Initializer]
  mask_token: nn.initializers.Initializer


def weight_inits(scheme: str = "xavier", layer_id: int = 1) -> WeightInit:
  """The initialisers of `scheme` (`model.weight_init`) for block `layer_id` (1 .. depth).

  "xavier": Xavier-uniform linear layers (the patch embedding too) and N(0, 0.02) tokens, as
  the official MAE. "beit": the pre-training init of BEiT, BEiT v2, data2vec and SimMIM (unilm
  beit/ and beit2/ modeling_pretrain.py, data2vec_vision modeling_cyclical.py, SimMIM
  models/simmim.py, whose encoder overrides its ViT's `_trunc_normal_` the same way): linear
  layers (the patch embedding too) and tokens N(0, 0.02) cut at +-0.02 (BEIT_STD), and each
  block's two branch outputs divided by sqrt(2 * layer_id) (their `fix_init_weight`), so the
  residual stream grows more slowly with depth. "dino": the ViT of DINO that iBOT's release
  builds on (bytedance/ibot models/vision_transformer.py): linear layers and the cls token
  DINO's (timm's) trunc_normal_(0.02) (cut at +-2, i.e. not at all), no rescale, the patch
  embedding left at PyTorch's Conv2d default (kaiming_uniform_(a=sqrt(5)): weights and bias
  U(-1/sqrt(fan_in), 1/sqrt(fan_in))), and a zero mask token (its `masked_embed`).
  "data2vec2": data2vec 2.0's image model (fairseq examples/data2vec: Data2VecMultiModel
  applies `init_bert_params`, its `mae_init` off by default; modalities/images.py): linear
  layers N(0, 0.02) (fairseq's normal_, not cut; here cut at 5 std, `trunc_normal`'s float32
  guard), no rescale, the patch-embedding conv Xavier-uniform with its bias at PyTorch's
  default, and the cls token (its extra token, `init_extra_token_zero` off in the image
  recipe) N(0, 1); its student encodes the visible patches only, so no mask token is read.
  Block biases start at 0 in all four; the patch embedding's bias at 0 under "xavier" and
  "beit" (the official MAE leaves its conv bias at PyTorch's uniform default; "xavier" keeps
  it 0, as every recorded run started).
  """
  if scheme == "xavier":
    return WeightInit(dense_init, dense_init, token_init, patch_kernel=dense_init,
                      patch_bias=_zero_bias, mask_token=token_init)
  if scheme == "beit":
    cut = nn.initializers.truncated_normal(BEIT_STD, lower=-1.0, upper=1.0)
    return WeightInit(cut, _divided(cut, math.sqrt(2.0 * layer_id)), cut, patch_kernel=cut,
                      patch_bias=_zero_bias, mask_token=cut)
  if scheme == "dino":
    normal = trunc_normal(0.02)
    # kaiming_uniform_(a=sqrt(5)): gain^2 = 2 / (1 + 5), bound sqrt(3 * gain^2 / fan_in).
    conv_default = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    return WeightInit(normal, normal, normal, patch_kernel=conv_default,
                      patch_bias=_torch_default_bias, mask_token=nn.initializers.zeros)
  if scheme == "data2vec2":
    normal = trunc_normal(0.02)
    return WeightInit(normal, normal, nn.initializers.normal(1.0), patch_kernel=dense_init,
                      patch_bias=_torch_default_bias, mask_token=token_init)
  raise config_error("model.weight_init", scheme, f"one of {WEIGHT_INITS}")


def head_init(scheme: str = "xavier") -> nn.initializers.Initializer:
  """The init of a prediction head that the official code builds inside its ViT (BEiT's,
  BEiT v2's and data2vec's `lm_head`), so that `_init_weights` draws it as the encoder's
  linear layers: under "beit" N(0, 0.02) cut at +-0.02; otherwise timm's trunc_normal_(0.02)."""
  if scheme == "beit":
    return weight_inits(scheme).kernel
  return trunc_normal(BEIT_STD)
