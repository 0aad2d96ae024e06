r"""Features of a pre-trained encoder for downstream work: embeddings, patch tokens, attention.

  python -m mim_jax.features --encoder=workdirs/mae_fmnist --images=photos/ --out=feats.npz \
      [--blocks=0,4] [--patch_tokens] [--attention] [--image_size=224,224] [--pictures=maps.png]

From Python:

  from mim_jax import features
  enc = features.load("workdirs/mae_fmnist", image_size=(28, 28))   # any encoder mim_jax reads
  out = features.extract(enc, images)        # images: uint8 / uint16 / float [N, H, W, C]
  out["cls_block0"], out["gap_block0"]       # [N, D]: cls token, mean of the patch tokens

The encoder is a pre-training workdir (its encoder/ export), an export directory, or a
checkpoint imported with `python -m mim_jax.convert import` (official MAE, timm, BEiT, HF).
Images are resized to the encoder's resolution (or `image_size`: the position table is resized,
bicubic, if it is learned; sin-cos tables are recomputed for the grid), centre-cropped to
`crop_fraction` when their size differs (1.0, the whole image, as the evaluations of
Fashion-MNIST and arrays; 0.875 as those of image folders up to 224 px, the command's default
for a folder) and normalised with the export's mean/std, as the evaluations see them. Blocks: 0
is the encoder's output (after its final LayerNorm), k the output of block k. The output holds,
per block b, `cls_block{b}` and `gap_block{b}` [N, D], with `patch_tokens` also `patch_block{b}`
[N, h*w, D]; with `attention`, `attention` [N, heads, 1 + h*w, 1 + h*w] of the last block and
`rollout` [N, h, w] (attention rollout, Abnar & Zuidema 2020: the heads' mean plus the residual
identity, rows renormalised, multiplied through the blocks; the cls row). Results are
deterministic (no dropout, no masking) and batched over every local device.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tifffile
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from mim_jax import storage, viz
from mim_jax.config.errors import ConfigError, config_error
from mim_jax.data import pipeline, sources, transforms
from mim_jax.models.heads import pool_tokens
from mim_jax.models.vit import ViTEncoder, block_output, encoder_from_config, size_from_config
from mim_jax.training import checkpoint
from mim_jax.weights import pretrained


@dataclasses.dataclass
class Encoder:
  """A loaded encoder: the module, its parameters and how its inputs are prepared."""
  module: ViTEncoder
  params: Any
  image_size: tuple[int, int]
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  info: dict

  @property
  def grid(self) -> tuple[int, int]:
    return self.module.grid_hw


def check_out_file(flag: str, path: str) -> None:
  """ConfigError naming `flag` unless a file can be written at local `path`: its folder exists
  or can be created (no part of it is a file) and takes a new file. Creates nothing; a URL
  (gs://) is left to its write. Command lines call it before their work, which a failed write
  after it would lose."""
  if storage.is_url(path):
    return
  allowed = "a file in a folder that exists or can be created, and that this process may write to"
  existing = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(existing):  # the folders the write would create
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    kind = "a file, not" if os.path.isfile(existing) else "not"
    raise config_error(flag, path, allowed, f"{existing} is {kind} a folder.")
  try:
    checkpoint.ensure_writable(existing)  # a probe file: permissions, read-only, disk full
  except checkpoint.WorkdirNotWritableError as e:
    reason = getattr(e.__cause__, "strerror", None) or e.__cause__ or e
    raise config_error(flag, path, allowed, f"{existing} cannot be written ({reason}).") from None


def load(source: str, *, image_size: Optional[Sequence[int]] = None) -> Encoder:
  """The encoder in `source` (workdir, export or imported checkpoint) at `image_size`
  (default: the resolution it was trained at)."""
  try:
    info = pretrained.read_model_info(source)
  except ConfigError:  # its message names the trainer's config.init_from
    raise ValueError(f"encoder {source!r}: not a pre-training workdir whose run finished, or "
                     "a fine-tuning one (it holds encoder/model.json), an export directory, "
                     "or a checkpoint imported with python -m mim_jax.convert import") from None
  config = ml_collections.ConfigDict(info["config"])
  size = tuple(int(s) for s in (image_size or info["image_size"]))
  patch = size_from_config(config.model)[1]
  if size[0] % patch or size[1] % patch:
    raise ValueError(f"image size {size}: not a multiple of the encoder's patch size {patch}")
  mean, std = pretrained.input_normalisation(info, source)
  posemb = pretrained.encoder_posemb(source)
  module = encoder_from_config(config.model, size, int(info["channels"]), posemb=posemb)
  params = pretrained.encoder_params_for(module, source, size, int(info["channels"]))
  return Encoder(module=module, params=params, image_size=size, channels=int(info["channels"]),
                 mean=mean, std=std, info=info)


def prepare(enc: Encoder, images: np.ndarray, crop_fraction: float = 1.0) -> np.ndarray:
  """Raw images [N, H, W(, C)] (uint8, uint16, or float in [0, 1]) ->
  normalised float32 [N, *image_size, C]: the evaluation preprocessing (resize + centre
  crop keeping `crop_fraction` when the size differs), as `data.make_eval_iterator` does it."""
  normalize = transforms.Normalizer(enc.mean, enc.std, enc.channels)
  out = []
  for image in images:
    image = transforms.to_channels(np.asarray(image), enc.channels)
    h, w = image.shape[:2]
    if (h, w) != enc.image_size:
      box = transforms.center_crop_box(h, w, enc.image_size, crop_fraction)
      image = transforms.resize_box(image, box, enc.image_size)
    out.append(normalize(image))
  return np.stack(out)


def read_images(path: str) -> np.ndarray:
  """An .npy array [N, H, W(, C)], or every image file of a folder (sorted paths), as arrays
  of their own dtype (8-bit uint8, 16-bit and TIFF float32 in [0, 1])."""
  if path.endswith(".npy"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: no such file")
    try:
      images = np.load(path, allow_pickle=False)
    except ValueError as e:  # object (pickled) arrays, a file that is not .npy
      raise ValueError(f"{path}: not an array of images ({e})") from None
    numeric = np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype,
                                                                       np.floating)
    if images.ndim not in (3, 4) or not numeric or not len(images):
      raise ValueError(f"{path}: expected images [N, H, W] or [N, H, W, C] of integers or "
                       f"floats, N >= 1; it holds {images.dtype} {list(images.shape)}")
    error = transforms.stored_dtype_error(images.dtype)
    if error:
      raise ValueError(f"{path}: {error}")
    bad = sources.nonfinite_report(images)  # NaN or inf pixels would give NaN feature rows
    if bad:
      raise ValueError(f"{path}: it holds {bad}: {sources.NONFINITE_ADVICE}")
    return images
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such folder (or .npy file)")
  # The image folders' own listing (hidden files and folders skipped, linked folders
  # followed, each folder's files before its sub-folders), so that rows come in the order and
  # number the evaluations read the same folder.
  paths = list(sources.walk_images(path))
  if not paths:
    raise FileNotFoundError(f"no {'/'.join(sources.IMAGE_EXTENSIONS)} images under {path}")
  decoded = []
  for p in paths:
    with open(p, "rb") as f:
      data = f.read()
    # (A float TIFF's NaN or inf is refused by the decoder: it would give NaN feature rows.)
    decoded.append(transforms.decode_named(data, _file_channels(data), p))
  return _stack(decoded)


def check_channels(enc: Encoder, images, source: str, encoder: str) -> None:
  """Raises ValueError naming the first image of `images` (from `source`) whose channels the
  encoder (from `encoder`) cannot take, before anything is computed."""
  for i, image in enumerate(images):
    image = np.asarray(image)
    c = 1 if image.ndim == 2 else image.shape[-1]
    if transforms.channel_conversion_error(image.dtype, c, enc.channels):
      raise ValueError(
          f"{source}: image {i} has {c} channel(s) ({image.dtype}) and the encoder at "
          f"{encoder} takes {enc.channels}; only grayscale to RGB and, for 8-bit images, RGB(A) "
          "to grayscale are converted: give images of its channel count")
    if isinstance(images, np.ndarray) and images.dtype != object:
      return  # one array: every image has the first one's channels


def _file_channels(data: bytes) -> int:
  """The channel count a file has (its own, not converted)."""
  if data[:4] in transforms.TIFF_MAGIC:
    shape = tifffile.TiffFile(io.BytesIO(data)).series[0].shape
    return 1 if len(shape) == 2 else int(min(shape[0], shape[-1]))
  try:
    with Image.open(io.BytesIO(data)) as img:
      return 1 if img.mode in ("L", "I", "I;16", "I;16B", "I;16L", "1", "F") else 3
  except OSError:  # not an image PIL opens: decoding it fails too, naming the file
    return 3


def _stack(images: list[np.ndarray]) -> np.ndarray:
  if len({(im.shape, im.dtype) for im in images}) > 1:
    # Differently sized files, each resized on its own by `prepare`, or of other types (8-bit
    # uint8 0..255 beside 16-bit float32 0..1: stacked, the 8-bit ones would become floats of
    # 0..255 read as if in [0, 1]): kept as a list of arrays (filled one by one: np.asarray
    # would make arrays of one shape a single array of objects).
    out = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):
      out[i] = image
    return out
  return np.stack(images)


def attention_rollout(attentions: Sequence[jax.Array]) -> jax.Array:
  """[B, heads, T, T] per block -> [B, T - 1]: the cls token's rolled-out attention to the
  patches (heads averaged, + identity for the residual path, rows renormalised, multiplied
  from the first block to the last), normalised to sum 1."""
  rollout = None
  for a in attentions:
    a = jnp.mean(a, axis=1)
    a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1], dtype=a.dtype)
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    rollout = a if rollout is None else jnp.einsum("bij,bjk->bik", a, rollout)
  cls = rollout[:, 0, 1:]
  return cls / jnp.sum(cls, axis=-1, keepdims=True)


def _feature_fn(enc: Encoder, blocks: tuple[int, ...], patch_tokens: bool, attention: bool):
  depth = enc.module.depth

  def fn(params, images):
    if attention:
      (tokens, aux), state = enc.module.apply({"params": params}, images,
                                              mutable=["intermediates"])
      maps = [state["intermediates"]["transformer"][f"blocks_{i}"]["attn"]["attention"][0]
              for i in range(depth)]
    else:
      tokens, aux = enc.module.apply({"params": params}, images)
    out = {}
    for b in blocks:
      t = block_output(tokens, aux, b)
      out[f"cls_block{b}"] = pool_tokens(t, "cls").astype(jnp.float32)
      out[f"gap_block{b}"] = pool_tokens(t, "gap").astype(jnp.float32)
      if patch_tokens:
        out[f"patch_block{b}"] = t[:, 1:].astype(jnp.float32)
    if attention:
      out["attention"] = maps[-1]
      out["rollout"] = attention_rollout(maps).reshape(-1, *enc.grid)
    return out

  return fn


def extract(enc: Encoder, images: Any, *, blocks: Sequence[int] = (0,),
            patch_tokens: bool = False, attention: bool = False,
            batch_size: int = 64, crop_fraction: float = 1.0) -> dict[str, np.ndarray]:
  """Features of raw `images` ([N, H, W(, C)] array or list of arrays) in input order
  (`crop_fraction`: see `prepare`)."""
  blocks = tuple(int(b) for b in blocks)
  for b in blocks:
    if not 0 <= b <= enc.module.depth:
      raise ValueError(f"block {b}: expected 0 (the encoder output) to {enc.module.depth}")
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("batch",))
  batch_size = -(-batch_size // len(devices)) * len(devices)  # a multiple of the devices
  fn = jax.jit(_feature_fn(enc, blocks, patch_tokens, attention),
               in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))))
  params = jax.device_put(enc.params, NamedSharding(mesh, P()))
  chunks: dict[str, list[np.ndarray]] = {}
  n = len(images)
  for start in range(0, n, batch_size):
    batch = prepare(enc, images[start:start + batch_size], crop_fraction)
    real = len(batch)
    if real < batch_size:  # static shapes: pad the last batch, drop the padding after
      batch = np.concatenate([batch, np.zeros((batch_size - real, *batch.shape[1:]),
                                              batch.dtype)])
    out = jax.device_get(fn(params, batch))
    for k, v in out.items():
      chunks.setdefault(k, []).append(np.asarray(v)[:real])
  return {k: np.concatenate(v) for k, v in chunks.items()}


def attention_picture(enc: Encoder, images: np.ndarray, out: dict[str, np.ndarray],
                      max_rows: int = 8, crop_fraction: float = 1.0) -> np.ndarray:
  """uint8 picture, one row per image: the image | the last block's cls attention of each
  head | the rollout, maps scaled to [0, 1] per panel and upsampled to the image."""
  prepared = prepare(enc, images[:max_rows], crop_fraction)
  shown = viz._to_display(prepared, enc.mean, enc.std)  # pylint: disable=protected-access
  gh, gw = enc.grid
  cls = out["attention"][:max_rows, :, 0, 1:].reshape(len(prepared), -1, gh, gw)
  maps = [cls[:, h] for h in range(cls.shape[1])] + [out["rollout"][:max_rows]]
  ph, pw = prepared.shape[1] // gh, prepared.shape[2] // gw

  def panel(m):
    m = m - m.min(axis=(1, 2), keepdims=True)
    m = m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)
    m = m.repeat(ph, axis=1).repeat(pw, axis=2)
    return np.repeat(m[..., None], 3, axis=-1)

  panels = [shown] + [panel(np.asarray(m, np.float32)) for m in maps]
  s = viz.upscale_factor(*shown.shape[1:3])
  # pylint: disable-next=protected-access
  return viz._tile([p.repeat(s, axis=1).repeat(s, axis=2) for p in panels])


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mim_jax.features", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  # type=expanduser: the shell leaves `~` in `--out=~/feats.npz` as written.
  parser.add_argument("--encoder", required=True, type=os.path.expanduser,
                      help="workdir, export or imported checkpoint")
  parser.add_argument("--images", required=True, type=os.path.expanduser,
                      help="a folder of images or an .npy array")
  parser.add_argument("--out", required=True, type=os.path.expanduser, help=".npz file to write")
  parser.add_argument("--blocks", default="0", help="comma-separated blocks (0: the output)")
  parser.add_argument("--patch_tokens", action="store_true", help="also per-patch tokens")
  parser.add_argument("--attention", action="store_true", help="attention maps and rollout")
  parser.add_argument("--image_size", default="",
                      help="H,W or one side for square images (default: the encoder's own)")
  parser.add_argument("--batch_size", type=int, default=64, help="images per encoder call")
  parser.add_argument("--crop_fraction", type=float, default=None,
                      help="centre crop of images of another size (default: as the "
                      "evaluations, 0.875 for a folder at up to 224 px, else 1.0)")
  parser.add_argument("--pictures", default="", type=os.path.expanduser,
                      help="with --attention: a PNG file of the maps")
  args = parser.parse_args(argv)
  try:
    blocks = [int(b) for b in args.blocks.split(",")]
  except ValueError:
    blocks = [-1]
  if min(blocks) < 0:
    parser.error(f"--blocks={args.blocks}: expected comma-separated block numbers >= 0 (0: the "
                 "encoder's output, k: the output of block k)")
  if os.path.isdir(args.out) or not args.out.lower().endswith(".npz"):
    parser.error(f"--out={args.out}: expected the path of a .npz file to write")
  if storage.is_url(args.images):
    parser.error(f"--images={args.images}: a local folder or .npy file (copy bucket data "
                 "here first)")
  if not os.path.exists(args.images):
    parser.error(f"--images={args.images}: no such folder or .npy file")
  if args.pictures and not args.attention:
    parser.error("--pictures draws the attention maps: pass --attention too")
  if args.pictures and (os.path.isdir(args.pictures)
                        or not args.pictures.lower().endswith(".png")):
    parser.error(f"--pictures={args.pictures}: expected the path of a .png file to write")
  if args.crop_fraction is not None and not 0 < args.crop_fraction <= 1:
    parser.error(f"--crop_fraction={args.crop_fraction}: expected a number in (0, 1]")
  if args.batch_size < 1:
    parser.error(f"--batch_size={args.batch_size}: expected a positive number of images")
  size = None
  if args.image_size:
    try:
      size = tuple(int(s) for s in args.image_size.split(","))
    except ValueError:
      size = ()
    if len(size) == 1:
      size = size * 2
    if len(size) != 2 or min(size) < 1:
      parser.error(f"--image_size={args.image_size}: expected H,W or one side, positive "
                   "integers")
  # Bad input (the encoder, the images, where to write): one line and exit 2, as
  # mim_jax.main; an error of the extraction itself keeps its traceback.
  try:
    check_out_file("--out", args.out)
    if args.pictures:
      check_out_file("--pictures", args.pictures)
    enc = load(args.encoder, image_size=size)
    if max(blocks) > enc.module.depth:  # before the images are read
      raise ValueError(f"--blocks={args.blocks}: this encoder has {enc.module.depth} blocks "
                       f"(0: its output, 1 to {enc.module.depth}: a block's)")
    images = read_images(args.images)
    check_channels(enc, images, args.images, args.encoder)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out, picture = _features_and_picture(args, enc, images, blocks)
  try:
    storage.write_with(args.out, lambda f: np.savez(f, **out))  # whole or not at all
    if picture is not None:
      viz.save_png(picture, args.pictures)
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in out.items()),
        file=sys.stderr)
  return 0


def _features_and_picture(args, enc: Encoder, images, blocks: list[int]):
  """The features the command line asks for, and the attention picture (None without
  --pictures)."""
  crop = args.crop_fraction
  if crop is None:  # the evaluations' rule for this kind of source
    source = "npy" if args.images.endswith(".npy") else "image_folder"
    crop = pipeline.eval_crop_fraction(ml_collections.ConfigDict({"source": source}),
                                       enc.image_size)
  out = extract(enc, images, blocks=blocks, patch_tokens=args.patch_tokens,
                attention=args.attention, batch_size=args.batch_size, crop_fraction=crop)
  picture = (attention_picture(enc, images, out, crop_fraction=crop) if args.pictures
             else None)
  return out, picture


if __name__ == "__main__":
  sys.exit(main())
