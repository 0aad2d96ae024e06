"""RandomResizedCrop, flip and normalisation on the device, batched (data.augment_on="device").

The input pipeline draws each image's crop box and flip on the host exactly as the host path
does (`transforms.DeviceAugmentDraws`: the same generator, the same calls) and ships the
decoded image as it is; `apply` then crops, resizes (bicubic, Keys a = -0.5 with
antialiasing, as PIL's resize of a box), flips and normalises the whole batch inside the
jitted train step, so a fast accelerator is not held back by per-image resizing on the host.

  apply(batch, image_size, mean, std) -> batch with "image" float32 [B, H, W, C] normalised
  augmenting(step_fn, config)         a train step fed such batches, augmented first
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mim_jax.data.transforms import CROP_BOX_KEY, FLIP_KEY

KEYS = (CROP_BOX_KEY, FLIP_KEY)


def crop_resize(image: jax.Array, box: jax.Array, out_size: tuple[int, int]) -> jax.Array:
  """image [h, w, C] float32, box (top, left, height, width) in source pixels ->
  [H, W, C]: the box resampled to `out_size`, bicubic with antialiasing."""
  top, left, height, width = box[0], box[1], box[2], box[3]
  scale = jnp.stack([out_size[0] / height, out_size[1] / width])
  translation = -jnp.stack([top, left]) * scale  # the box's corner lands on the output's
  return jax.image.scale_and_translate(image, (*out_size, image.shape[-1]), (0, 1), scale,
                                       translation, method="cubic", antialias=True)


def apply(batch: dict[str, Any], image_size: Sequence[int], mean: Sequence[float],
          std: Sequence[float]) -> dict[str, Any]:
  """The batch with its images augmented: [B, h, w, C] uint8 (or float32 in [0, 1]) +
  crop_box [B, 4] + flip [B] -> image float32 [B, H, W, C], (x - mean) / std. From uint8 the
  resized pixels are clipped to [0, 1] and rounded to 1/255, as the host path's are."""
  images = batch["image"]
  scale = 1.0 / 255.0 if images.dtype == jnp.uint8 else 1.0
  x = images.astype(jnp.float32) * scale
  out_size = tuple(int(s) for s in image_size)
  x = jax.vmap(lambda im, b: crop_resize(im, b, out_size))(x, batch[CROP_BOX_KEY])
  if images.dtype == jnp.uint8:
    # The host path's 8-bit resize (PIL) clips bicubic's overshoot at sharp edges to [0, 255]
    # and rounds. So here: a tokenizer or teacher trained on one path then reads the other's
    # images in the range it was trained on (Fashion-MNIST's black background, next to bright
    # edges, undershoots by up to 0.13 without it).
    x = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0) / 255.0
  x = jnp.where(batch[FLIP_KEY][:, None, None, None], x[:, :, ::-1], x)
  channels = x.shape[-1]
  mean = jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (channels,))
  std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), (channels,))
  out = {k: v for k, v in batch.items() if k not in KEYS}
  out["image"] = (x - mean) / std
  return out


def augmenting(step_fn: Callable, config) -> Callable:
  """`step_fn` (state, batch, rng) fed batches of the input pipeline's device augmentation
  (data.augment_on='device'): each batch is augmented with `apply` first, at config's
  image_size and data.mean / data.std. Wrap before jax.jit."""
  size, mean, std = tuple(config.image_size), tuple(config.data.mean), tuple(config.data.std)

  def fn(state, batch, rng):
    return step_fn(state, apply(batch, size, mean, std), rng)
  return fn

