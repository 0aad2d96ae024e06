"""RandAugment and random erasing as timm applies them in fine-tuning (MAE, BEiT, data2vec).

The official fine-tuning recipes (MAE's `main_finetune.py`, through timm's `create_transform`)
add two steps to RandomResizedCrop + flip: RandAugment `"rand-m9-mstd0.5-inc1"` on the 8-bit
image, and random erasing of one rectangle with probability 0.25, filled with per-pixel
normal noise, on the normalised image. This module is those two steps for the grain workers:
PIL ops on uint8 [H, W, 1 or 3] arrays and numpy on the normalised float32 image, every random
draw from the element's `np.random.Generator` (so a run is reproducible and resumes exactly).

RandAugment (Cubuk et al., 2020) in timm's form, from its config string
`rand-m{M}-n{N}-mstd{S}-inc{0|1}-p{P}` (sections in any order; defaults M=10, N=2, S=0, inc0,
P=0.5): N ops drawn uniformly with replacement from the 15 of `OPS_INCREASING` (inc1) or `OPS`
(inc0); each applied with probability P at a magnitude drawn from N(M, S) (S = 0: M; S > 100:
uniform in [0, M], as timm reads it), clipped to [0, 10]; each op's argument is its magnitude
scaled as below, with a random sign where the op has one. Geometric ops resample bicubically and
fill with the data mean (timm's `img_mean` with `interpolation='bicubic'`, as MAE's recipe
passes them).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_LEVEL = 10.0  # magnitudes are clipped to [0, MAX_LEVEL] and scaled by 1 / MAX_LEVEL

# The op sets of timm's `_RAND_INCREASING_TRANSFORMS` (inc1: every op grows stronger with the
# magnitude) and `_RAND_TRANSFORMS` (inc0), in its order.
OPS_INCREASING = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                  "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                  "TranslateXRel", "TranslateYRel")
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "ColorIncreasing",
          "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}


def op_argument(name: str, magnitude: float, negate: bool = False):
  """The argument of op `name` at `magnitude` in [0, 10] (timm's level-to-argument rules);
  `negate` flips the sign of the ops in `SIGNED` (timm: a coin flip per application). None for
  the ops without an argument."""
  level = magnitude / MAX_LEVEL
  sign = -1.0 if negate else 1.0
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name == "Rotate":
    return sign * level * 30.0  # degrees
  if name in ("ShearX", "ShearY"):
    return sign * level * 0.3
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * level * 0.45  # a fraction of the image side
  if name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
    return max(0.1, 1.0 + sign * level * 0.9)  # enhancement factor, 1 = unchanged
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return level * 1.8 + 0.1
  if name == "Posterize":
    return int(level * 4)  # bits kept: fewer is stronger, so this one weakens with M
  if name == "PosterizeIncreasing":
    return 4 - int(level * 4)
  if name == "Solarize":
    return min(256, int(level * 256))  # threshold
  if name == "SolarizeIncreasing":
    return 256 - min(256, int(level * 256))
  if name == "SolarizeAdd":
    return min(128, int(level * 110))
  raise ValueError(f"unknown RandAugment op {name!r}")


def apply_op(name: str, img: Image.Image, arg, fill) -> Image.Image:
  """Op `name` with argument `arg` (`op_argument`) on a PIL image ("L" or "RGB"); geometric
  ops fill uncovered pixels with `fill` (an int for "L", a 3-tuple for "RGB")."""
  geometric = dict(resample=Image.Resampling.BICUBIC, fillcolor=fill)
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(arg, **geometric)
  affine = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg * img.size[0], 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, arg * img.size[1])}
  if name in affine:
    return img.transform(img.size, Image.Transform.AFFINE, affine[name], **geometric)
  if name.startswith("Posterize"):  # keep the `arg` high bits of each channel
    # As a table, as Pillow's posterize is, but also for 0 bits (black), which Pillow >= 12
    # refuses and the magnitudes reach (PosterizeIncreasing at 10, Posterize below 2.5).
    mask = ~(2 ** (8 - arg) - 1) & 0xFF
    return img if arg >= 8 else img.point([i & mask for i in range(256)] * len(img.getbands()))
  if name.startswith("Solarize") and name != "SolarizeAdd":
    return ImageOps.solarize(img, arg)
  if name == "SolarizeAdd":  # add to the pixels below 128, saturating at 255
    lut = [min(255, i + arg) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))
  enhancers = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
               "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
  base = name.removesuffix("Increasing")
  if base in enhancers:
    return enhancers[base](img).enhance(arg)
  raise ValueError(f"unknown RandAugment op {name!r}")


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """A parsed RandAugment policy (see the module docstring); call it on a uint8 [H, W, C]
  image (C = 1 or 3) with an element's rng."""
  ops: tuple[str, ...]
  magnitude: float = 10.0
  num_layers: int = 2
  magnitude_std: float = 0.0
  prob: float = 0.5

  @classmethod
  def parse(cls, spec: str) -> RandAugment:
    """timm's config string, e.g. "rand-m9-mstd0.5-inc1"; ValueError names a bad section."""
    parts = str(spec).split("-")
    if parts[0] != "rand":
      raise ValueError(f"a RandAugment spec starts with 'rand-' (e.g. 'rand-m9-mstd0.5-inc1'); "
                       f"got {spec!r}")
    fields = dict(magnitude=10.0, num_layers=2, magnitude_std=0.0, prob=0.5)
    increasing = False
    for part in parts[1:]:
      match = re.fullmatch(r"(mstd|inc|m|n|p)(\d+(?:\.\d+)?)", part)
      if match is None:
        raise ValueError(f"unknown section {part!r} in RandAugment spec {spec!r}: sections are "
                         "m<magnitude 0-10>, n<ops per image>, mstd<magnitude std>, inc<0|1>, "
                         "p<probability of each op>")
      key, value = match.groups()
      if key == "inc":
        increasing = bool(int(float(value)))
      else:
        name = {"m": "magnitude", "n": "num_layers", "mstd": "magnitude_std", "p": "prob"}[key]
        fields[name] = int(float(value)) if key == "n" else float(value)
    if fields["num_layers"] < 1 or not 0 <= fields["prob"] <= 1:
      raise ValueError(f"RandAugment spec {spec!r}: n must be >= 1 and p in [0, 1]")
    return cls(ops=OPS_INCREASING if increasing else OPS, **fields)

  def magnitude_draw(self, rng: np.random.Generator) -> float:
    """One op's magnitude: N(M, S) (M when S = 0; uniform in [0, M] when S > 100), clipped to
    [0, 10]."""
    magnitude = self.magnitude
    if self.magnitude_std > 100:
      magnitude = rng.uniform(0.0, magnitude)
    elif self.magnitude_std > 0:
      magnitude = rng.normal(magnitude, self.magnitude_std)
    return min(MAX_LEVEL, max(0.0, float(magnitude)))

  def __call__(self, image: np.ndarray, rng: np.random.Generator,
               fill: tuple[int, ...]) -> np.ndarray:
    """[H, W, C] (C = 1 or 3) -> the same shape and dtype; `fill` per channel (the data mean
    in 0-255). uint8 images go through the PIL ops as they are; float32 ones (high bit depth,
    in [0, 1]) are rounded to 8 bits first, the only depth the ops are defined for, and come
    back as float32 multiples of 1/255."""
    if image.shape[-1] not in (1, 3):
      raise ValueError(f"RandAugment runs on grayscale or RGB images; got {image.shape[-1]} "
                       "channels (config.data.rand_augment='' for other channel counts)")
    if image.dtype != np.uint8:
      unit = np.asarray(image, np.float32)
      out = self(np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8), rng, fill)
      return out.astype(np.float32) / np.float32(255.0)
    gray = image.shape[-1] == 1
    img = Image.fromarray(image[..., 0] if gray else image, "L" if gray else "RGB")
    pil_fill = int(fill[0]) if gray else tuple(int(f) for f in fill)
    for name in rng.choice(self.ops, size=self.num_layers, replace=True):
      if rng.random() > self.prob:
        continue
      magnitude = self.magnitude_draw(rng)
      negate = bool(name in SIGNED and rng.random() > 0.5)
      img = apply_op(str(name), img, op_argument(str(name), magnitude, negate), pil_fill)
    return np.asarray(img).reshape(image.shape)


def fill_value(mean, channels: int) -> tuple[int, ...]:
  """The data mean as `channels` 0-255 fill values (timm's `img_mean`: min(255,
  round(255 * m))); one mean value serves every channel, as in the normalisation."""
  values = np.broadcast_to(np.asarray(mean, np.float64), (channels,))
  return tuple(min(255, int(round(255 * float(m)))) for m in values)


def erase_box(rng: np.random.Generator, height: int, width: int, min_area: float = 0.02,
              max_area: float = 1 / 3, min_aspect: float = 0.3) -> tuple[int, int, int, int] | None:
  """timm's RandomErasing rectangle (top, left, h, w), count 1: ten tries of an area fraction
  ~ U(min_area, max_area) and an aspect ~ logU(min_aspect, 1 / min_aspect); the first that
  fits strictly inside wins; None if none does."""
  log_aspect = (np.log(min_aspect), np.log(1.0 / min_aspect))
  for _ in range(10):
    area = rng.uniform(min_area, max_area) * height * width
    aspect = np.exp(rng.uniform(*log_aspect))
    h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
    if w < width and h < height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  return None


def random_erasing(image: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
  """timm's RandomErasing(probability, mode='pixel') on a normalised float32 [H, W, C] image:
  with `probability`, one rectangle (`erase_box`) is replaced by N(0, 1) noise per pixel and
  channel, in a copy (the input is never modified; returned as it is when nothing is erased)."""
  if probability <= 0 or rng.random() > probability:
    return image
  box = erase_box(rng, image.shape[0], image.shape[1])
  if box is None:
    return image
  top, left, h, w = box
  out = np.array(image, np.float32)
  out[top:top + h, left:left + w] = rng.standard_normal((h, w, image.shape[-1]), np.float32)
  return out
