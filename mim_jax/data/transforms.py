"""Per-element image transforms: decoding, RandomResizedCrop, flip, resize + centre crop, and
normalisation, plus the grain transform classes that apply them.

Images between transforms are numpy arrays [h, w, c] with c the model's channel count: uint8 for
8-bit files (PIL's exact L / RGB path, unchanged since the first results), float32 in [0, 1] for
everything else (16-bit PNG / TIFF, float or uint16 arrays, any channel count), so no bit of a
16-bit image is lost (float32 holds 24). Only the last step normalises. Randomness comes
exclusively from the per-element `np.random.Generator` that grain's `random_map` derives from
(seed, element position), so an element's augmentation does not depend on worker count, threads
or prefetching.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Optional, Sequence

import grain
import numpy as np
import simplejpeg
import tifffile
from PIL import Image, UnidentifiedImageError

from mim_jax.data import bad_images
from mim_jax.data import rand_augment as rand_augment_lib
from mim_jax.objectives.masking import TOKEN_MASK_KEY

Box = tuple[int, int, int, int]  # (top, left, height, width) in source pixels
# Training rows carry this flag until `DropInvalidRows` removes the undecodable ones.
VALID_KEY = "valid"


class BadImageError(ValueError):
  """An image file is corrupt, truncated or not an image PIL can open."""


# ----------------------------------------------------------------------------- channels


def stored_dtype_error(stored: np.dtype) -> str | None:
  """Why images stored as `stored` are not read, or None when they are: integers other than
  uint8 and uint16 have no one meaning as pixel values (an int64 array of 0..255, what
  `np.array` of a list of ints gives, read as a fraction of int64's maximum would be all
  ~1e-17; signed data has no zero level), so the user says what they mean by converting."""
  stored = np.dtype(stored)
  if stored in (np.uint8, np.uint16) or not np.issubdtype(stored, np.integer):
    return None
  return (f"{stored} pixel values are not read: store 8-bit data as uint8, 16-bit as uint16 "
          "(read as fractions of 65535), or anything else as float32 in the units you mean "
          "(then `python -m mim_jax.data.stats` gives the normalisation)")


def as_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 stays uint8; uint16 becomes float32 in [0, 1] (divided by 65535), floats float32
  as they are; other integer types are refused (`stored_dtype_error`)."""
  if image.dtype == np.uint8:
    return image
  error = stored_dtype_error(image.dtype)
  if error:
    raise ValueError(error)
  if image.dtype == np.uint16:
    return (image.astype(np.float32) / 65535.0).astype(np.float32)
  return image.astype(np.float32)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """[h, w, c] or [h, w] -> [h, w, channels] (uint8 stays uint8, other types become float32
  in [0, 1], see `as_unit_range`).

  Grayscale to RGB repeats the channel; RGB to grayscale is PIL's 'L' conversion (ITU-R 601-2
  luma), so array sources and decoded files convert identically. Other channel counts must
  match the model's.
  """
  stored = np.asarray(image).dtype
  image = as_unit_range(np.asarray(image))
  if image.ndim == 2:
    image = image[..., None]
  c = image.shape[-1]
  error = channel_conversion_error(stored, c, channels)
  if error:
    raise ValueError(error)
  if c == channels:
    return image
  if c == 1:  # grayscale to RGB
    return np.repeat(image, 3, axis=-1)
  if c == 4:  # RGBA (8 bits): drop alpha first
    image = image[..., :3]
    if channels == 3:
      return np.ascontiguousarray(image)
  return np.asarray(Image.fromarray(np.ascontiguousarray(image), "RGB").convert("L"))[..., None]


def channel_conversion_error(stored: np.dtype, c: int, channels: int) -> str | None:
  """Why `to_channels` cannot turn an image of `c` channels stored as `stored` into `channels`
  channels, or None when it can (validation asks before a run reads an image)."""
  if c == channels or (c == 1 and channels == 3):
    return None
  if np.dtype(stored) != np.uint8:
    return (f"cannot convert a {np.dtype(stored)} image with {c} channels to {channels}: "
            "beyond 8 bits a channel may be a band rather than alpha or colour, so none is "
            f"dropped or mixed; set config.channels={c} or convert the data beforehand")
  if (c == 4 and channels in (1, 3)) or (c == 3 and channels == 1):
    return None
  return f"cannot convert an image with {c} channels to {channels}"


def check_image_array(image: np.ndarray) -> np.ndarray:
  """Returns [h, w, c] `image` unchanged; raises ValueError for an empty one (0 x w)."""
  if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
    raise ValueError(f"image has shape {image.shape}; expected [height, width, channels] with "
                     "a positive height and width")
  return image


class NonFiniteImageError(ValueError):
  """An image whose stored float pixels include NaN or inf."""


def check_stored_floats(image: np.ndarray) -> np.ndarray:
  """Returns `image` as stored; raises ValueError when it holds floats that are NaN or inf (a
  float TIFF's or array record's: they would make the loss NaN). Integer images, and the
  floats converted from them, are finite: only stored floats pay for the check."""
  if np.issubdtype(image.dtype, np.floating):
    finite = np.isfinite(image)
    if not finite.all():
      raise NonFiniteImageError(f"{int(finite.size - finite.sum())} NaN or inf pixel "
                                "value(s): pixel values must be finite numbers")
  return image


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _png_bit_depth_and_colour(data: bytes) -> tuple[int, int] | None:
  """(bit depth, colour type) from a PNG's IHDR, or None for other data."""
  if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 26:
    return data[24], data[25]
  return None


def _decode_tiff(data: bytes, channels: int) -> np.ndarray:
  """A TIFF (any bit depth, any channel count, [h, w], [h, w, c] or planar [c, h, w]) ->
  [h, w, channels], read with tifffile."""
  array = check_stored_floats(np.asarray(tifffile.imread(io.BytesIO(data))))
  if array.ndim == 3 and array.shape[-1] != channels and array.shape[0] == channels:
    array = np.moveaxis(array, 0, -1)  # planar (channel-first) storage
  return to_channels(array, channels)


JPEG_MAGIC = b"\xff\xd8"
# JPEG colour spaces simplejpeg decodes exactly as PIL would for `channels` (others: PIL).
_FAST_JPEG = {1: ("Gray", "GRAY"), 3: ("YCbCr", "RGB")}


def _decode_jpeg_fast(data: bytes, channels: int) -> np.ndarray | None:
  """A baseline 8-bit JPEG through simplejpeg (libjpeg-turbo's TurboJPEG API, about twice
  PIL's images/s per core; the same islow DCT and fancy upsampling, so the same pixels), or
  None where PIL's path decides (CMYK, colour to grayscale, anything simplejpeg refuses)."""
  if channels not in _FAST_JPEG:
    return None
  try:
    _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace != _FAST_JPEG[channels][0]:
      return None
    array = simplejpeg.decode_jpeg(data, colorspace=_FAST_JPEG[channels][1])  # strict: warns raise
  except ValueError:
    return None  # e.g. truncated: PIL raises the error a user reads
  return array.reshape(array.shape[0], array.shape[1], channels)


def decode_named(data: bytes, channels: int, name: str) -> np.ndarray:
  """`decode_image` of the file `name`, whose failure (PIL's UnidentifiedImageError is an
  OSError) is a ValueError naming it: a tool's one-line error."""
  try:
    return decode_image(data, channels)
  except NonFiniteImageError as e:  # decoded, but unusable
    raise NonFiniteImageError(f"{name}: {e}") from None
  except (OSError, ValueError) as e:
    raise ValueError(f"{name}: not an image this reader decodes ({e})") from None


def _open_image(data: bytes) -> Image.Image:
  """PIL's Image.open of `data`. Data PIL cannot identify is a ValueError saying so: PIL's own
  message names the io.BytesIO object it read ("cannot identify image file <_io.BytesIO
  object at 0x...>"), not the file, which the callers name."""
  try:
    return Image.open(io.BytesIO(data))
  except UnidentifiedImageError:
    what = "an empty file" if not data else f"data starting {bytes(data[:8])!r}"
    raise ValueError(f"not an image format PIL recognises ({what})") from None


# config.channels -> the PIL mode an 8-bit file is converted to (alpha kept for 2 and 4).
_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# 8-bit TIFF modes PIL converts by what their values mean (palette, inverted grayscale,
# CMYK, YCbCr, bilevel; JPEG-compressed too), which tifffile's raw samples do not say.
_PIL_TIFF_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


def _as_tuple(value) -> tuple:
  return value if isinstance(value, tuple) else (value,)


def _pil_reads_8_bit_tiff(data: bytes, channels: int) -> bool:
  """Whether a TIFF is decoded through PIL: unsigned 8-bit (or bilevel) images of a mode PIL
  converts into grayscale or RGB (`_PIL_TIFF_MODES`), with no band beyond the mode's, when the
  model takes 1 or 3 channels. Any other TIFF (16-bit, float, signed, extra bands, or a model
  of other channel counts) keeps every sample as stored through tifffile."""
  if channels not in (1, 3):
    return False
  try:
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
      # PIL names some 16-bit TIFFs by an 8-bit mode (RGB, RGBA) and cuts them to 8 bits:
      # the samples' stored depth decides, not the mode.
      # Signed 8-bit samples (SampleFormat 2) PIL reads as unsigned grey levels, and extra
      # bands beyond its mode's it drops (RGB + 2 bands opens as "RGB"): tifffile keeps both
      # as they are, where they are refused or read whole.
      tags = img.tag_v2
      bits, formats = (_as_tuple(tags.get(tag, (default,))) for tag, default in
                       ((258, 1), (339, 1)))  # BitsPerSample, SampleFormat (1: unsigned)
      samples = int(tags.get(277, 1))  # SamplesPerPixel
      return (img.mode in _PIL_TIFF_MODES and all(b in (1, 8) for b in bits)
              and all(f == 1 for f in formats) and samples == len(img.getbands()))
  except Exception:  # pylint: disable=broad-except  # PIL cannot: tifffile decides or says why
    return False


def decode_image(data: bytes, channels: int) -> np.ndarray:
  """Encoded JPEG/PNG/TIFF bytes -> [h, w, channels]: uint8 for 8-bit images, float32 in
  [0, 1] for 16-bit PNG (grayscale) and 16-bit or float TIFF (any channel count). 8-bit
  JPEG / PNG / BMP / WebP files become grayscale, gray + alpha, RGB or RGBA for 1, 2, 3, 4
  channels; 8-bit TIFFs are read by PIL for 1 or 3 channels (palette, CMYK, inverted
  grayscale converted), else sample by sample (tifffile). Raises on corrupt data, and on
  16-bit colour PNG, which PIL would cut to 8 bits (store those as TIFF).

  `load()` forces the full decode here, so a truncated file fails now (PIL otherwise decodes
  lazily and would fail later inside a resize).
  """
  if data[:4] in TIFF_MAGIC:
    if _pil_reads_8_bit_tiff(data, channels):
      try:
        return _decode_with_pil(data, channels)
      except (OSError, ValueError):
        pass  # a compression PIL's build lacks: tifffile's reading, or its reason
    return _decode_tiff(data, channels)
  if data[:2] == JPEG_MAGIC:
    fast = _decode_jpeg_fast(data, channels)
    if fast is not None:
      return fast
  png = _png_bit_depth_and_colour(data)
  if png is not None and png[0] == 16 and png[1] != 0:
    kind = "grayscale + alpha" if png[1] == 4 else "colour"
    raise ValueError(f"16-bit {kind} PNG: PIL reads it as 8 bits; store the image as TIFF or "
                     "in a .npy array to keep its bits")
  return _decode_with_pil(data, channels)


def _decode_with_pil(data: bytes, channels: int) -> np.ndarray:
  """`decode_image`'s PIL path: 16-bit grayscale kept (float32 in [0, 1]), 8-bit images
  converted to the mode of `channels` (_PIL_MODES)."""
  with _open_image(data) as img:
    img.load()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: every bit kept
      array = np.asarray(img)
      # Older Pillow (10, 11) opens 16-bit grayscale PNGs as 32-bit "I" (TIFFs, the one format
      # with real 32-bit integers, do not come here): their values are 16-bit, and scaled as
      # int32 they would all be near 0.
      if img.mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"32-bit integer {img.format} image: store it as a .npy array or a "
                         "TIFF (float or integer) to keep its range")
      return to_channels(array.astype(np.uint16), channels)
    mode = _PIL_MODES.get(channels)
    if mode is None:
      raise ValueError(f"a {img.format} image ({img.mode}) has at most 4 channels, not the "
                       f"{channels} of config.channels: multi-band data goes in TIFF or .npy")
    if img.mode != mode:
      # Palette / alpha / CMYK / 16-bit images go through RGB first so 'L' sees real colours.
      img = img.convert("RGB") if mode == "L" and img.mode not in ("RGB", "L") else img
      img = img.convert(mode)
    array = np.asarray(img)
  return array.reshape(array.shape[0], array.shape[1], channels)


# ----------------------------------------------------------------------------- geometry


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: Sequence[float], ratio: Sequence[float]) -> Box:
  """torchvision `RandomResizedCrop.get_params`: the crop box for a [height, width] image.

  Ten tries of (area fraction ~ U(scale), aspect w/h ~ logU(ratio)); the first crop that fits
  wins. Otherwise the largest centred crop whose aspect is clamped into `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return fallback_crop_box(height, width, ratio)


def fallback_crop_box(height: int, width: int, ratio: Sequence[float]) -> Box:
  """RandomResizedCrop's box when no try fits: the largest centred crop whose aspect (w/h) is
  clamped into `ratio`."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(height: int, width: int, out_size: tuple[int, int],
                    crop_fraction: float) -> tuple[float, float, float, float]:
  """Box (top, left, h, w), possibly fractional, of "resize shorter side, centre crop".

  Equivalent to resizing the image so that it covers `out_size / crop_fraction` and cutting
  the central `out_size`; computed in source pixels so one resize does both.
  """
  out_h, out_w = out_size
  scale = max(out_h / height, out_w / width) / crop_fraction
  h, w = min(out_h / scale, height), min(out_w / scale, width)
  return (height - h) / 2, (width - w) / 2, h, w


def resize_box(image: np.ndarray, box: Sequence[float], out_size: tuple[int, int]) -> np.ndarray:
  """Bicubic resize of `image[box]` ([h, w, c]) to [out_h, out_w, c] of the same dtype.

  uint8: PIL's 8-bit resize (RGB at once, any other channel count channel by channel; rounded
  to uint8, as the normalisation expects of uint8). float32 (high bit depth, any channel
  count): PIL's 32-bit float resize of each channel, no rounding. The bicubic filter
  reads the pixels just outside the box where the image has them (PIL's `resize(box=)`);
  torchvision's RandomResizedCrop crops first and so repeats the box's edge: the outermost
  output pixels differ slightly, the interior is the same.
  """
  top, left, h, w = box
  out_h, out_w = out_size
  c = image.shape[-1]
  pil_box = (left, top, left + w, top + h)
  if image.dtype == np.uint8 and c == 3:
    pil = Image.fromarray(image, "RGB").resize((out_w, out_h), Image.Resampling.BICUBIC,
                                               box=pil_box)
    return np.asarray(pil)
  if image.dtype == np.uint8:  # any other count: each channel as 8-bit grayscale, still uint8
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., k]), "L")
                                .resize((out_w, out_h), Image.Resampling.BICUBIC, box=pil_box))
                     for k in range(c)], axis=-1)
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., k], np.float32), "F")
                         .resize((out_w, out_h), Image.Resampling.BICUBIC, box=pil_box))
              for k in range(c)]
  return np.stack(channels, axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------- normalisation


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """[..., C] -> float32 (x / 255 - mean) / std for uint8, (x - mean) / std for float32 in
  [0, 1] (see `as_unit_range`): one multiply-add per pixel."""
  mean: tuple[float, ...]
  std: tuple[float, ...]
  channels: int

  def constants(self, uint8: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 [C]: the normalised image is x * scale + offset (x uint8, or
    float32 in [0, 1]). Also applied in a train step to uint8 data (`multicrop.normalize_views`)."""
    mean = np.broadcast_to(np.asarray(self.mean, np.float32), (self.channels,))
    std = np.broadcast_to(np.asarray(self.std, np.float32), (self.channels,))
    scale = (1.0 / ((255.0 if uint8 else 1.0) * std)).astype(np.float32)
    return scale, (-mean / std).astype(np.float32)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    scale, offset = self.constants(image.dtype == np.uint8)
    return image.astype(np.float32) * scale + offset


# ----------------------------------------------------------------------------- grain transforms


@dataclasses.dataclass(frozen=True)
class DecodeImage(grain.transforms.Map):
  """Raw source record -> {"image": uint8 [h, w, channels] or None, "label", "path"}.

  A record carries its pixels as "image" (uint8 array, or encoded bytes) or, for files, only a
  "path" that is read here (so listing never opens files). A file that cannot be read or
  decoded, or whose pixels have an unusable shape (no height or width, a channel count that
  cannot be converted): on_bad_image="raise" raises BadImageError naming it; "skip" warns,
  records the skip (see `bad_images`) and returns image=None, which training drops
  (`TrainAugment` marks the row invalid, `DropInvalidRows` removes it) and evaluation masks.
  """
  channels: int
  on_bad_image: str
  skip_log_dir: str

  def map(self, record: dict[str, Any]) -> dict[str, Any]:
    path = str(record.get("path", "<unknown>"))
    image = record.get("image")
    try:
      if isinstance(image, np.ndarray):
        # Array records can hold channel counts no conversion exists for (e.g. 2): that is a
        # bad image like a corrupt file, handled by the same policy and named the same way.
        decoded = check_image_array(to_channels(check_stored_floats(image), self.channels))
      else:
        if image is None:
          with open(path, "rb") as f:
            image = f.read()
        decoded = check_image_array(decode_image(bytes(image), self.channels))
    except Exception as e:  # pylint: disable=broad-except  # anything PIL/IO/numpy raises
      reason = f"{type(e).__name__}: {e}"
      if self.on_bad_image == "raise":
        raise BadImageError(f"cannot decode image {path}: {reason}. Remove or replace the "
                            "file, or set config.data.on_bad_image='skip'") from e
      bad_images.record_skip(self.skip_log_dir, path, reason)
      decoded = None
    return {"image": decoded, "label": int(record.get("label", 0)), "path": path}


@dataclasses.dataclass(frozen=True)
class TrainAugment(grain.transforms.RandomMap):
  """{"image": uint8 [h, w, C] or None, "label"} -> {"image": float32 [H, W, C] normalised,
  "label": int32 [], "valid": bool []}.

  RandomResizedCrop (bicubic) to `image_size`, horizontal flip with p=0.5 if `hflip`, then
  (timm's fine-tuning order) `rand_augment` on the 8-bit image, normalisation, and random
  erasing with probability `erasing` (data/rand_augment.py). A record
  whose image could not be decoded (None, skip mode) becomes a placeholder row with
  valid=False: positions in the stream stay fixed (so batches can be formed before workers
  split the stream) and `DropInvalidRows` removes the row before any batch is fed.
  """
  image_size: tuple[int, int]
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  hflip: bool
  normalize: Normalizer
  rand_augment: Optional[rand_augment_lib.RandAugment] = None
  erasing: float = 0.0

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = element["image"]
    if image is None:
      return {"image": np.zeros((*self.image_size, self.normalize.channels), np.float32),
              "label": np.int32(-1), VALID_KEY: np.bool_(False)}
    box = random_resized_crop_box(rng, image.shape[0], image.shape[1], self.crop_scale,
                                  self.crop_ratio)
    image = resize_box(image, box, self.image_size)
    if self.hflip and rng.random() < 0.5:
      image = image[:, ::-1]
    if self.rand_augment is not None:
      image = self.rand_augment(np.ascontiguousarray(image), rng, rand_augment_lib.fill_value(
          self.normalize.mean, self.normalize.channels))
    image = self.normalize(image)
    if self.erasing > 0:
      image = rand_augment_lib.random_erasing(image, rng, self.erasing)
    return {"image": image, "label": np.int32(element["label"]), VALID_KEY: np.bool_(True)}


# Keys of a training element whose crop and flip are applied on the device (device_augment.py).
CROP_BOX_KEY, FLIP_KEY = "crop_box", "flip"


@dataclasses.dataclass(frozen=True)
class DeviceAugmentDraws(grain.transforms.RandomMap):
  """`TrainAugment`'s random draws without its pixel work: {"image": [h, w, C] or None,
  "label"} -> {"image": the decoded image as it is, "crop_box": float32 [4] (top, left,
  height, width), "flip": bool, "label", "valid"}.

  The same per-element generator, called in the same order (the RandomResizedCrop box, then
  the flip coin), so the boxes and flips equal the host path's for the same seed; the crop,
  resize, flip and normalisation run batched on the device (`device_augment.apply`). All
  images of a source must have one size (they are batched before the resize).
  """
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  hflip: bool
  source_size: tuple[int, int]
  channels: int

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = element["image"]
    if image is None:
      return {"image": np.zeros((*self.source_size, self.channels), np.uint8),
              CROP_BOX_KEY: np.zeros(4, np.float32), FLIP_KEY: np.bool_(False),
              "label": np.int32(-1), VALID_KEY: np.bool_(False)}
    if tuple(image.shape[:2]) != tuple(self.source_size):
      raise ValueError(f"image of size {image.shape[:2]}: augmentation on the device needs "
                       f"every image at {tuple(self.source_size)} (data.augment_on='host' "
                       "takes any size)")
    box = random_resized_crop_box(rng, image.shape[0], image.shape[1], self.crop_scale,
                                  self.crop_ratio)
    flip = bool(self.hflip and rng.random() < 0.5)
    return {"image": image, CROP_BOX_KEY: np.asarray(box, np.float32), FLIP_KEY: np.bool_(flip),
            "label": np.int32(element["label"]), VALID_KEY: np.bool_(True)}


class DropInvalidRows(grain.transforms.Map):
  """Removes the placeholder rows of undecodable images from a batch (and its "valid" key).

  Runs in the training process on the batches the workers return, so the stream of kept
  examples, and hence every batch after `RebatchIterDataset`, is the same for any number of
  workers. Raises BadImageError when more than `max_bad_fraction` of a window of
  `window` consecutive images was bad: a mostly unreadable dataset is misconfigured, and an
  all-bad one would otherwise make the infinite stream spin forever. `epoch_size` (this
  process's images per epoch, 0: unknown) makes 2 x `epoch_size` - 1 images in a row without
  one that decodes an error at once, naming `source`: that run holds a whole epoch of this
  process's share, so none of its images decodes (a folder smaller than the window would
  otherwise be read, and its skips logged, for many epochs first). Not `epoch_size` alone: the
  count starts where the stream was resumed, and a stretch of one epoch's length across two
  epochs' shuffles need not hold every image.
  """

  def __init__(self, max_bad_fraction: float, window: int = 1000, epoch_size: int = 0,
               source: str = ""):
    self.max_bad_fraction = max_bad_fraction
    self.window = window
    self.epoch_size = epoch_size
    self.source = source
    self._seen = 0
    self._bad = 0
    self._read_without_valid = 0  # images read before the first that decoded (-1: one did)

  def map(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    valid = np.asarray(batch.pop(VALID_KEY), bool)
    self._count(valid)
    if valid.all():
      return batch  # the common case: no copy
    return {k: v[valid] for k, v in batch.items()}

  def _count(self, valid: np.ndarray) -> None:
    if self._read_without_valid >= 0:
      self._read_without_valid = -1 if valid.any() else self._read_without_valid + valid.size
      if self.epoch_size and self._read_without_valid >= 2 * self.epoch_size - 1:
        source = self.source or "the training split"
        raise BadImageError(
            f"none of the {self._read_without_valid} images this process read in a row of "
            f"{source} could be decoded: a whole epoch of its share ({self.epoch_size} images) "
            "is among them; the warnings above name the first: check config.data.path / "
            "config.data.source")
    self._seen += valid.size
    self._bad += int(valid.size - valid.sum())
    if self._seen < self.window:
      return
    if self._bad > self.max_bad_fraction * self._seen:
      raise BadImageError(
          f"{self._bad} of the last {self._seen} training images could not be decoded (more "
          f"than {self.max_bad_fraction:.0%}; the warnings above name them): the dataset is "
          "mostly unreadable, so check config.data.path / config.data.source")
    self._seen = self._bad = 0


class NonEmptyBatch(grain.transforms.Filter):
  """Drops a batch whose rows were all removed (every image in it was undecodable)."""

  def filter(self, batch: dict[str, Any]) -> bool:
    return len(batch["label"]) > 0


@dataclasses.dataclass(frozen=True)
class AddTokenMask(grain.transforms.RandomMap):
  """Adds a method's host-drawn mask: element["token_mask"] = bool [N], True = masked; with
  `count` > 1, that many independent masks, bool [count, N] (data2vec 2.0's masks per image).

  `generator` is a `masking.MaskGenerator` of a host kind (blockwise, inverse_block), whose
  data-dependent loops run here in the worker processes instead of inside the train step. The
  per-element generator makes the masks a function of (seed, position in the stream), so they
  are reproduced exactly on resume.
  """
  generator: Any
  count: int = 1

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    masks = self.generator.host(rng, self.count)
    return {**element, TOKEN_MASK_KEY: masks if self.count > 1 else masks[0]}


@dataclasses.dataclass(frozen=True)
class EvalPreprocess(grain.transforms.Map):
  """Decoded record -> {"image": float32 [H, W, C], "label": int32, "mask": bool}.

  Resize + centre crop keeping `crop_fraction` of the covering size, as torchvision's
  Resize(size / crop_fraction) + CenterCrop(size) (1.0: the whole image, a plain resize when
  the aspect already matches). An image already at the output size is taken as framed and
  passes unchanged whatever the fraction (a TFDS Fashion-MNIST or CIFAR at its own size; a
  torchvision pipeline would enlarge and crop it). A record whose
  image failed to decode (skip mode) becomes a zero image with mask=False and label -1, so
  every host still yields the same number of batches.
  """
  image_size: tuple[int, int]
  crop_fraction: float
  normalize: Normalizer

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    image = element["image"]
    if image is None:
      return padding_element(self.image_size, self.normalize.channels)
    h, w = image.shape[:2]
    if (h, w) != tuple(self.image_size):
      box = center_crop_box(h, w, self.image_size, self.crop_fraction)
      image = resize_box(image, box, self.image_size)
    return {"image": self.normalize(image), "label": np.int32(element["label"]),
            "mask": np.bool_(True)}


def padding_element(image_size: tuple[int, int], channels: int) -> dict[str, Any]:
  """A masked-out eval row: zero image, label -1, mask False."""
  return {"image": np.zeros((*image_size, channels), np.float32), "label": np.int32(-1),
          "mask": np.bool_(False)}


@dataclasses.dataclass(frozen=True)
class EvalPadding(grain.transforms.Map):
  """Maps anything to `padding_element` (fills the last eval batch)."""
  image_size: tuple[int, int]
  channels: int

  def map(self, element: Any) -> dict[str, Any]:
    del element
    return padding_element(self.image_size, self.channels)
