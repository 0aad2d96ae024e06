"""A frozen teacher encoder: any encoder mim_jax can load, giving features to predict.

The teacher is an export (a pre-training or fine-tuning workdir,
`mim_jax.training.checkpoint.export_encoder`) or a checkpoint imported through
`mim_jax.convert` (timm / HF ViTs). It sees the student's augmented view, un-normalised with
the student's statistics and normalised with its own, and resized when its patch size differs
so that its patch grid is the student's (a /14 teacher of a /16 student at 224 px sees 196 px,
as MaskAlign feeds CLIP-L/14). Its parameters travel in
the method's `extra` (checkpointed with the run, never optimised) and its outputs are under
stop_gradient.

  teacher = FrozenTeacher.from_source(path, image_size=..., channels=..., mean=..., std=...)
  teacher.features(params, images, block=0) -> [B, N, D] patch features
  teacher.features(params, images, block=0, attention=True) -> (features, cls_attention
      [B, heads, N]: the last block's [CLS] attention over the patches)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.config.errors import ConfigError, config_error
from mim_jax.models import flops
from mim_jax.models.vit import ViTEncoder, block_output, encoder_from_config, size_from_config
from mim_jax.weights import pretrained


@dataclasses.dataclass(frozen=True)
class FrozenTeacher:
  """The teacher at `source` for a student with `image_size`, `channels`, `mean` and `std`."""
  source: str
  module: ViTEncoder
  model_cfg: Any
  image_size: tuple[int, int]           # the teacher's input size (its patch x the grid)
  student_size: tuple[int, int]
  channels: int
  student_mean: tuple[float, ...]
  student_std: tuple[float, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @classmethod
  def from_source(cls, source: str, *, image_size: Sequence[int], grid_hw: Sequence[int],
                  channels: int, mean: Sequence[float], std: Sequence[float],
                  dtype: str = "float32", attention_impl: str = "",
                  field: str = "teacher.path") -> "FrozenTeacher":
    """The teacher at `source` fed at the size that gives the student's `grid_hw` patches (a
    learned position table is resized to that grid on loading). Raises ConfigError naming
    `field` when `source` holds no encoder or one whose channels differ."""
    try:
      info = pretrained.read_model_info(source)
    except ConfigError as err:
      raise config_error(field, source, "a finished pre-training or fine-tuning workdir, an "
                         "encoder export or an imported checkpoint (python -m mim_jax.convert)"
                         ) from err
    if int(info["channels"]) != channels:
      raise config_error(field, source, f"an encoder of {channels} channels (the student's); "
                         f"this one takes {info['channels']}")
    model_cfg = ml_collections.ConfigDict(info["config"]["model"])
    with model_cfg.unlocked():  # frozen: the student's compute settings, no regularisation
      model_cfg.update(dtype=dtype, attention_impl=attention_impl, drop_path_rate=0.0,
                       remat="none")
    _, patch = size_from_config(model_cfg)
    size = (int(grid_hw[0]) * patch, int(grid_hw[1]) * patch)
    module = encoder_from_config(model_cfg, size, channels,
                                 posemb=pretrained.encoder_posemb(source))
    data = info["config"].get("data", {})
    return cls(source=source, module=module, model_cfg=model_cfg, image_size=size,
               student_size=tuple(int(s) for s in image_size), channels=channels,
               student_mean=tuple(float(m) for m in mean),
               student_std=tuple(float(s) for s in std),
               mean=tuple(float(m) for m in data.get("mean", mean)),
               std=tuple(float(s) for s in data.get("std", std)))

  @property
  def width(self) -> int:
    return self.module.width

  @property
  def depth(self) -> int:
    return self.module.depth

  def init_params(self) -> Any:
    """Zeros of the teacher's parameter shapes (placeholders until `load_params`)."""
    shapes = jax.eval_shape(self.module.init, jax.random.key(0),
                            jnp.zeros((1, *self.image_size, self.channels), jnp.float32))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])

  def load_params(self) -> Any:
    """The teacher's weights (numpy), in the layout of `init_params`."""
    return pretrained.encoder_params_for(self.module, self.source, self.image_size,
                                         self.channels)

  def prepare(self, images: jax.Array) -> jax.Array:
    """Student-normalised images [B, H, W, C] (H, W: the student's size) -> the teacher's
    input [B, h, w, C]."""
    if tuple(images.shape[1:3]) != self.student_size:  # static: raised while tracing
      raise ValueError(f"images of {tuple(images.shape[1:3])} px for a teacher set up for the "
                       f"student's {self.student_size}: its grid would not be the student's")
    x = images.astype(jnp.float32)
    if (self.mean, self.std) != (self.student_mean, self.student_std):
      x = x * jnp.asarray(self.student_std) + jnp.asarray(self.student_mean)
      x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    if tuple(x.shape[1:3]) != self.image_size:
      x = jax.image.resize(x, (x.shape[0], *self.image_size, x.shape[-1]), "bicubic")
    return x

  def features(self, params, images: jax.Array, block: int = 0, attention: bool = False):
    """Patch features [B, N, D] (float32, no gradient) of `block` (0: the encoder's output
    after its final norm; k >= 1: the output of block k, counted from 1, before that norm:
    `models.vit.block_output`); with `attention`, also the last block's [CLS] attention over
    the patches [B, heads, N]."""
    x = self.prepare(images)
    if attention:
      (tokens, aux), state = self.module.apply({"params": params}, x, train=False,
                                               mutable=["intermediates"])
    else:
      tokens, aux = self.module.apply({"params": params}, x, train=False)
    out = block_output(tokens, aux, block)
    feats = jax.lax.stop_gradient(out[:, 1:].astype(jnp.float32))
    if not attention:
      return feats
    return feats, jax.lax.stop_gradient(cls_attention(state["intermediates"], self.depth))

  def forward_flops(self) -> float:
    return flops.encoder_flops(self.model_cfg, self.image_size, self.channels)


def cls_attention(intermediates, depth: int) -> jax.Array:
  """The last block's [CLS] attention over the patches, [B, heads, N], from the
  "intermediates" a ViTEncoder sows when that collection is mutable (models/attention.Attention)."""
  weights = intermediates["transformer"][f"blocks_{depth - 1}"]["attn"]["attention"][0]
  return weights[:, :, 0, 1:]
