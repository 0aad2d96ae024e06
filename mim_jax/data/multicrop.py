"""Multi-crop views (DINO / iBOT): two global crops and `num_local` small local crops per image.

`MultiCropAugment` is a grain RandomMap that replaces the default crop + flip through a
method's `train_augment` hook. From one decoded image it makes

  "global_views"  [2, H, W, C]             RandomResizedCrop(global_scale) at the config size
  "local_views"   [L, h, w, C]             RandomResizedCrop(local_scale) at `local_size`
  "global_masks"  bool    [2, N]           (with a mask generator) host-drawn masks, one per
                                           global view, True = masked
  "label", "valid"

With photometric steps on (they need 8-bit images) the views ship as uint8, normalised in
the train step (`normalize_views`): a quarter of float32's bytes through the workers' shared
memory and onto the device, and no per-pixel normalisation on the host (1.33x images/s per
core on ImageNet's 12 views, docs/benchmarks.md). With every photometric step off, any
image (more than 8 bits too) gives float32 views normalised here, which `normalize_views`
passes through. One dtype per run, placeholders included: a batch never mixes them.

Photometric steps follow DINO / iBOT's recipe (each view: flip, colour jitter with probability
`jitter_prob` — brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1 in random order —,
grayscale with `grayscale_prob`; Gaussian blur (sigma in [0.1, 2]) with probability 1.0 on
global view 1, 0.1 on global view 2 and 0.5 on local views; solarisation with `solarize_prob`
on global view 2 only). Saturation, hue and grayscale act on colour only, so 1-channel images
get brightness / contrast jitter, blur and solarisation (configs choose which).

A method that trains on these views owns `config.multicrop` through `add_config(...)`,
`UNREAD_RULES`, `validate_config(...)` and `augment_from_config(...)` (iBOT does).

An undecodable image (None, skip mode) gives zero placeholders of every shape with
valid=False, as `transforms.TrainAugment` does. All randomness comes from the per-element
generator of grain's `random_map`, so the views are a function of (seed, stream position) and
resume exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from mim_jax.config import checks as v
from mim_jax.data.transforms import (
  VALID_KEY,
  Normalizer,
  random_resized_crop_box,
  resize_box,
)

GLOBAL_VIEWS_KEY = "global_views"
LOCAL_VIEWS_KEY = "local_views"
GLOBAL_MASKS_KEY = "global_masks"
NUM_GLOBAL = 2
# Blur probabilities of global view 1, global view 2 and the local views (DINO / iBOT).
BLUR_PROBS = (1.0, 0.1, 0.5)


@dataclasses.dataclass(frozen=True)
class Photometric:
  """DINO-style photometric augmentation of a uint8 [h, w, C] view (C = 1 or 3)."""
  jitter_prob: float = 0.8
  grayscale_prob: float = 0.2
  blur: bool = True
  solarize_prob: float = 0.2

  @property
  def active(self) -> bool:
    """Whether any step is on (each needs 8-bit pixels)."""
    return bool(self.jitter_prob or self.grayscale_prob or self.blur or self.solarize_prob)

  def __call__(self, image: np.ndarray, rng: np.random.Generator, view: int) -> np.ndarray:
    """`view`: 0 / 1 for the global views, 2 for a local one (picks the blur / solarise odds)."""
    c = image.shape[-1]
    if image.dtype != np.uint8 or c not in (1, 3):
      if self.active:
        raise ValueError(
            f"the photometric views work on 8-bit grayscale or RGB images, not {image.dtype} "
            f"with {c} channels: set multicrop.jitter_prob, grayscale_prob and solarize_prob "
            "to 0 and multicrop.blur to false for this data")
      return image
    pil = Image.fromarray(image[..., 0] if c == 1 else image, "L" if c == 1 else "RGB")
    if rng.random() < self.jitter_prob:
      ops = [("brightness", 0.4), ("contrast", 0.4)]
      if c == 3:
        ops += [("saturation", 0.2), ("hue", 0.1)]
      for i in rng.permutation(len(ops)):
        pil = _jitter(pil, *ops[i], rng)
    if c == 3 and rng.random() < self.grayscale_prob:
      pil = pil.convert("L").convert("RGB")
    if self.blur and rng.random() < BLUR_PROBS[view]:
      pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
    if view == 1 and rng.random() < self.solarize_prob:
      pil = ImageOps.solarize(pil, 128)
    return np.asarray(pil).reshape(image.shape)


def _jitter(pil: Image.Image, kind: str, strength: float, rng: np.random.Generator):
  """torchvision ColorJitter's factors: U(1 - s, 1 + s) for brightness / contrast /
  saturation, a hue shift U(-s, s) of the colour circle."""
  if kind == "hue":
    shift = int(round(float(rng.uniform(-strength, strength)) * 255))
    h, s, v = pil.convert("HSV").split()
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")
  factor = float(rng.uniform(max(0.0, 1 - strength), 1 + strength))
  enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
              "saturation": ImageEnhance.Color}[kind]
  return enhancer(pil).enhance(factor)


@dataclasses.dataclass(frozen=True)
class MultiCropAugment(grain.transforms.RandomMap):
  """{"image": uint8 [h, w, C] or None, "label"} -> the multi-crop views (module docstring).

  mask_generator: a `masking.MaskGenerator` whose `host` draws one mask per global view (any
  kind; iBOT: blockwise with a per-view ratio range), or None for no masks.
  """
  image_size: tuple[int, int]
  local_size: tuple[int, int]
  num_local: int
  global_scale: tuple[float, float]
  local_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  hflip: bool
  photometric: Photometric
  normalize: Normalizer
  mask_generator: Any = None

  def _view(self, image, rng, scale, size, view):
    box = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale, self.crop_ratio)
    out = resize_box(image, box, size)
    if self.hflip and rng.random() < 0.5:
      out = out[:, ::-1]
    return self.photometric(np.ascontiguousarray(out), rng, view)

  @property
  def views_dtype(self) -> type:
    """uint8 with photometric steps (which refuse other images), else float32 normalised."""
    return np.uint8 if self.photometric.active else np.float32

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image, c, dtype = element["image"], self.normalize.channels, self.views_dtype
    if image is None:
      out = {GLOBAL_VIEWS_KEY: np.zeros((NUM_GLOBAL, *self.image_size, c), dtype),
             LOCAL_VIEWS_KEY: np.zeros((self.num_local, *self.local_size, c), dtype),
             "label": np.int32(-1), VALID_KEY: np.bool_(False)}
      if self.mask_generator is not None:
        out[GLOBAL_MASKS_KEY] = np.zeros((NUM_GLOBAL, self.mask_generator.num_patches), bool)
    else:
      views = [self._view(image, rng, self.global_scale, self.image_size, v)
               for v in range(NUM_GLOBAL)]
      local = [self._view(image, rng, self.local_scale, self.local_size, 2)
               for _ in range(self.num_local)]
      # uint8 views are normalised in the step (`normalize_views`).
      ship = (lambda x: x) if dtype == np.uint8 else self.normalize
      out = {GLOBAL_VIEWS_KEY: ship(np.stack(views)),
             LOCAL_VIEWS_KEY: (ship(np.stack(local)) if local else
                               np.zeros((0, *self.local_size, c), dtype)),
             "label": np.int32(element["label"]), VALID_KEY: np.bool_(True)}
      if self.mask_generator is not None:
        out[GLOBAL_MASKS_KEY] = self.mask_generator.host(rng, NUM_GLOBAL)
    # No "image": the step reads the views only, and a copy of the first one would add a
    # fifth (ImageNet's 12 views) to a quarter (Fashion-MNIST's 4) of the bytes per image.
    return out


def normalize_views(views, mean, std):
  """In the train step: uint8 views [..., C] -> float32 (x / 255 - mean) / std, with the host's
  `Normalizer` constants (equal to rounding); float32 views (normalised on the host) pass
  through."""
  if views.dtype != jnp.uint8:
    return views
  scale, offset = Normalizer(tuple(mean), tuple(std), views.shape[-1]).constants(uint8=True)
  return views.astype(jnp.float32) * scale + offset


def default_config() -> ml_collections.ConfigDict:
  """`config.multicrop` of a method that trains on multi-crop views: two global crops at
  image_size and `num_local` crops at `local_size`; photometric odds as in DINO / iBOT."""
  return ml_collections.ConfigDict(dict(
      global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), num_local=10, local_size=(96, 96),
      jitter_prob=0.8, grayscale_prob=0.2, blur=True, solarize_prob=0.2))


def flatten_views(x):
  """[B, V, ...] -> [B * V, ...] (batch-major: image b's views are rows b * V .. b * V + V - 1):
  a batch's views as one batch for the encoder. A plain reshape, so the rows keep B's sharding
  over the mesh's batch axes; the view-major [V * B, ...] order merges V with the sharded B
  into one dimension, which no sharding expresses, and XLA gathered the whole batch of views
  onto every device for it."""
  return x.reshape(-1, *x.shape[2:])


def split_views(x, num_views: int):
  """[B * V, ...] (batch-major, `flatten_views`) -> [V, B, ...]: per-row outputs of the
  flattened views in the view-first layout the losses take. A reshape of the sharded rows into
  [B, V] and a transpose, both of which keep B's sharding."""
  return x.reshape(-1, num_views, *x.shape[1:]).swapaxes(0, 1)


def add_config(c: ml_collections.ConfigDict) -> None:
  """Gives a method's config `multicrop` (`default_config`) in place of the single-view
  augmentation fields it no longer reads: the views' scales are global_scale / local_scale,
  and multi-crop has its own photometrics (no RandAugment or random erasing)."""
  for name in ("crop_scale", "rand_augment", "random_erasing"):
    del c.data[name]
  c.multicrop = default_config()


# `Method.unread_rules` entries of `config.multicrop`.
UNREAD_RULES = [
    (("multicrop.local_scale", "multicrop.local_size"),
     lambda c: c.multicrop.num_local > 0, "there are no local views (multicrop.num_local=0)"),
    # 0 is what a one-channel image gets anyway (ibot_fmnist.py sets it).
    (("multicrop.grayscale_prob",),
     lambda c: c.channels == 3 or c.multicrop.grayscale_prob == 0,
     "grayscale conversion applies to 3-channel images only"),
]


def validate_config(c: ml_collections.ConfigDict, image_size: tuple[int, int],
                    patch: int) -> None:
  """Checks `config.multicrop` (ConfigError naming the field) for images of `image_size` cut
  into `patch`-pixel patches."""
  for name in ("global_scale", "local_scale"):
    p = v.pair(c[name])
    v.require(p is not None and 0 < p[0] <= p[1] <= 1, f"multicrop.{name}", c[name],
              "(min, max) area fractions, 0 < min <= max <= 1")
  v.require(v.is_int(c.num_local) and c.num_local >= 0, "multicrop.num_local", c.num_local,
            "an integer >= 0 (iBOT: 10 local views; 0: global views only)")
  size = tuple(c.local_size)
  v.require(len(size) == 2 and all(v.is_int(s) and s > 0 and s % patch == 0 for s in size),
            "multicrop.local_size", c.local_size,
            f"(height, width), positive multiples of the patch size {patch} (iBOT: 96)")
  v.require(all(s <= g for s, g in zip(size, image_size)), "multicrop.local_size",
            c.local_size, f"at most image_size={tuple(image_size)} on each side")
  for name in ("jitter_prob", "grayscale_prob", "solarize_prob"):
    v.require(v.is_number(c[name]) and 0 <= c[name] <= 1, f"multicrop.{name}", c[name],
              "a probability in [0, 1]")
  v.require(isinstance(c.blur, bool), "multicrop.blur", c.blur, "true or false")


def augment_from_config(c: ml_collections.ConfigDict, data_cfg: ml_collections.ConfigDict,
                        image_size: tuple[int, int], channels: int,
                        mask_generator: Any = None) -> MultiCropAugment:
  """The `MultiCropAugment` of `config.multicrop` (crop aspect ratios, flips and normalisation
  from `config.data`)."""
  return MultiCropAugment(
      image_size=tuple(image_size), local_size=tuple(int(s) for s in c.local_size),
      num_local=int(c.num_local), global_scale=tuple(c.global_scale),
      local_scale=tuple(c.local_scale), crop_ratio=tuple(data_cfg.crop_ratio),
      hflip=bool(data_cfg.hflip),
      photometric=Photometric(
          jitter_prob=float(c.jitter_prob), grayscale_prob=float(c.grayscale_prob),
          blur=bool(c.blur), solarize_prob=float(c.solarize_prob)),
      normalize=Normalizer(tuple(data_cfg.mean), tuple(data_cfg.std), channels),
      mask_generator=mask_generator)
