r"""Weight interop from the command line: import, export, reconstruct, inspect.

  # official MAE / timm / BEiT (absolute positions) .pth or .safetensors, or an HF directory
  python -m mim_jax.convert import mae_pretrain_vit_base.pth weights/mae_vitb
  python -m mim_jax.main --config=configs/finetune_imagenet.py \
      --config.init_from=weights/mae_vitb --workdir=workdirs/ft

  # mim_jax weights (export directory or workdir) -> timm / official MAE / HF safetensors
  python -m mim_jax.convert export workdirs/mae_vitb out/timm --format=timm
  python -m mim_jax.convert export workdirs/mae_vitb out/hf --format=hf

  # reconstructions of MAE weights with a decoder on image files
  python -m mim_jax.convert reconstruct weights/mae_vitb_full a.jpg b.jpg --out=recon.png

  # what a checkpoint holds and how it would be read (also a mim_jax export or workdir)
  python -m mim_jax.convert inspect checkpoint.pth

Errors (unknown layout, missing or unexpected keys, wrong shapes, files that are not
checkpoints) print one message listing every problem and exit with status 2; nothing is
written then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m mim_jax.convert",
      description="Convert ViT weights between mim_jax and timm / official MAE / BEiT / HF.")
  sub = parser.add_subparsers(dest="command", required=True)

  imp = sub.add_parser("import", help="a checkpoint -> a mim_jax export directory "
                       "(what --config.init_from accepts)")
  imp.add_argument("checkpoint", help=".pth / .bin / .safetensors file, or an HF model directory")
  imp.add_argument("out", help="export directory to write")
  imp.add_argument("--key", default=None,
                   help="top-level entry holding the weights (default: model, state_dict, ...)")
  imp.add_argument("--num_heads", type=int, default=None,
                   help="encoder attention heads (needed for unpublished widths)")
  imp.add_argument("--decoder_num_heads", type=int, default=None,
                   help="MAE decoder attention heads (default 16 for the 512-wide decoder)")
  imp.add_argument("--image_size", type=int, nargs="+", default=None, metavar="SIZE",
                   help="H [W]: input size to set the weights up for (learned position "
                   "tables are resized)")
  imp.add_argument("--posemb", choices=("auto", "sincos", "learn"), default="auto",
                   help="sincos: check pos_embed is the fixed table (pre-training); learn: keep "
                   "it as a learned table; auto: learn for classifiers, else sincos")
  imp.add_argument("--mlp_act", choices=("gelu", "quick_gelu"), default=None,
                   help="the MLP activation, where the checkpoint does not record it (timm "
                   "state dicts): needed for CLIP-style towers, quick_gelu for OpenAI CLIP, "
                   "gelu for LAION / OpenCLIP")
  imp.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="the input normalisation the weights were trained with, one value or "
                   "one per channel (default: CLIP's for a CLIP-style tower, else ImageNet's); "
                   "evaluations and teachers apply it")
  imp.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                   help="the standard deviation of that normalisation (with --mean)")
  imp.add_argument("--overwrite", action="store_true",
                   help="replace an earlier mim_jax export directory at `out`")

  exp = sub.add_parser("export", help="mim_jax weights -> safetensors for timm / MAE / HF")
  exp.add_argument("source", help="export directory or training workdir")
  exp.add_argument("out", help="directory to write model.safetensors (+ config.json) to")
  exp.add_argument("--format", choices=("timm", "mae", "hf"), required=True)
  exp.add_argument("--step", type=int, default=None,
                   help="workdirs: the checkpoint step (default: the latest)")
  exp.add_argument("--overwrite", action="store_true",
                   help="replace the model.safetensors / config.json of an earlier export")

  rec = sub.add_parser("reconstruct", help="draw MAE reconstructions of image files")
  rec.add_argument("source", help="export directory with a decoder, or an MAE workdir")
  rec.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
  rec.add_argument("--out", required=True, type=os.path.expanduser, help="PNG to write")
  rec.add_argument("--mask_ratio", type=float, default=None)
  rec.add_argument("--seed", type=int, default=0, help="seed of the random masks")
  rec.add_argument("--norm_pix", choices=("auto", "true", "false"), default="auto",
                   help="whether the decoder predicts per-patch normalised pixels "
                   "(auto: from the weights' config)")

  ins = sub.add_parser("inspect", help="list a checkpoint's tensors and how it would import "
                       "(or a mim_jax export's or training workdir's arrays)")
  ins.add_argument("checkpoint")
  ins.add_argument("--key", default=None)
  return parser


# Each command imports what it needs when it runs: `--help` stays fast (no JAX, Orbax, torch).


def _import(args) -> None:
  from mim_jax.convert.importer import FORMAT_NAMES, import_checkpoint
  from mim_jax.convert.our_weights import check_replaceable
  # Before the checkpoint is read and converted (minutes for a ViT-H).
  check_replaceable(args.out, overwrite=args.overwrite, source=args.checkpoint)
  model = import_checkpoint(args.checkpoint, key=args.key, num_heads=args.num_heads,
                            decoder_num_heads=args.decoder_num_heads,
                            image_size=args.image_size, posemb=args.posemb,
                            mlp_act=args.mlp_act, mean=args.mean, std=args.std)
  directory = model.write(args.out, overwrite=args.overwrite)
  config = model.config()
  print(f"imported {args.checkpoint} ({FORMAT_NAMES[model.source_format]}): encoder "
        f"{config.model.variant} width {model.width} depth {model.depth} "
        f"heads {model.num_heads}, "
        f"images {model.image_size[0]}x{model.image_size[1]}x{model.channels}, "
        f"positions {model.posemb}, MLP {model.mlp_act}, parts {sorted(model.params)}")
  for note in model.notes:
    print(f"  - {note}")
  print(f"wrote {directory}; use it with --config.init_from={directory}")


def _export(args) -> None:
  from mim_jax.convert.exporter import export_weights
  for path in export_weights(args.source, args.out, args.format, step=args.step,
                            overwrite=args.overwrite):
    print(f"wrote {path}")


def _reconstruct(args) -> None:
  from mim_jax.convert.reconstructions import draw_reconstructions
  from mim_jax.features import check_out_file
  check_out_file("--out", args.out)  # before the model loads and runs
  norm_pix = None if args.norm_pix == "auto" else args.norm_pix == "true"
  draw_reconstructions(args.source, args.images, args.out, mask_ratio=args.mask_ratio,
                       seed=args.seed, norm_pix=norm_pix)
  print(f"wrote {args.out}")


def _inspect(args) -> None:
  from mim_jax.convert.importer import import_state_dict
  from mim_jax.convert.state_dicts import read_state_dict
  if _inspect_ours(args.checkpoint, key=args.key):
    return
  loaded = read_state_dict(args.checkpoint, args.key)
  print(f"{loaded.path}: {len(loaded.tensors)} tensors"
        + (f" under {loaded.container!r}" if loaded.container else ""))
  for note in loaded.skipped:
    print(f"  - {note}")
  for name, value in loaded.tensors.items():
    print(f"  {name}: {tuple(value.shape)} {value.dtype}")
  # Head counts and mlp_act only fill in what a state dict cannot record (no shape depends on
  # them); `import` asks for them where they matter. A count the checkpoint's config.json
  # records is left to it (a different one is refused), and a decoder count is given only to
  # weights that hold a decoder (an encoder-only export refuses one).
  recorded = loaded.hf_config or {}
  has_decoder = any(name.startswith("decoder") for name in loaded.tensors)
  try:
    model = import_state_dict(
        loaded.tensors, hf_config=loaded.hf_config, mlp_act="gelu",
        num_heads=None if recorded.get("num_attention_heads") else 1,
        decoder_num_heads=(None if recorded.get("decoder_num_attention_heads") or not has_decoder
                           else 1))
    print(f"imports as {model.source_format}: parts {sorted(model.params)}, "
          f"width {model.width}, depth {model.depth}, patch {model.patch_size}, "
          f"images {model.image_size}, positions {model.posemb}")
    if "norm_pre" in model.encoder:
      print("  a CLIP-style tower: `import` needs --mlp_act (quick_gelu for OpenAI CLIP, gelu "
            "for LAION / OpenCLIP)")
  except ValueError as e:
    print(f"does not import: {e}")


def _inspect_ours(source: str, key: Optional[str] = None) -> bool:
  """Describes the mim_jax weights in `source` (an export directory or a training workdir):
  the model and every array's shape and dtype of every part it releases, read from metadata.
  False when it holds none. ValueError for one whose metadata cannot be read, and for a `key`
  (it picks the entry of a checkpoint file)."""
  import jax
  import ml_collections

  from mim_jax.convert import our_weights
  from mim_jax.models.vit import size_from_config
  try:
    info, what, parts = our_weights.saved_parts(source, all_parts=True)
  except FileNotFoundError:
    return False
  except (KeyError, TypeError) as e:  # a config.json or state tree of another shape
    raise ValueError(f"{source} looks like mim_jax weights but cannot be read: "
                     f"{type(e).__name__}: {e}") from None
  if key:
    raise ValueError(f"--key={key}: a key picks the entry of a checkpoint file; {source} "
                     "holds mim_jax weights (inspect it without --key)")
  config = info["config"]
  described = f"method {info['method']}"
  if "encoder" in parts and "model" in config:
    model = config["model"]
    size, patch = size_from_config(ml_collections.ConfigDict(model))
    posemb = info.get("posemb") or ("learn" if "pos_embed" in parts["encoder"] else
                                    "sincos" if model.get("abs_posemb", True) else "none")
    height, width = info["image_size"]
    described += (f": encoder {model['variant']} (width {size.width}, depth {size.depth}, "
                  f"patch {patch}), images {height}x{width}x{info['channels']}, positions "
                  f"{posemb}")
  print(f"{source}: {what}, {described}, parts {sorted(parts)}")
  for part, tree in parts.items():
    for path, leaf in our_weights.array_leaves(tree):
      print(f"  {part}{jax.tree_util.keystr(path)}: {tuple(leaf.shape)} {leaf.dtype}")
  return True


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.command == "reconstruct":
    if args.mask_ratio is not None and not 0 <= args.mask_ratio < 1:
      parser.error(f"--mask_ratio={args.mask_ratio}: expected the masked fraction in [0, 1)")
    if os.path.isdir(args.out) or not args.out.lower().endswith(".png"):
      parser.error(f"--out={args.out}: expected the path of a .png file to write")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:  # before the model loads
      parser.error(f"no such image file: {', '.join(missing)}")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  command = {"import": _import, "export": _export, "reconstruct": _reconstruct,
             "inspect": _inspect}[args.command]
  try:
    command(args)
  except (ValueError, OSError) as e:  # OSError: missing, unreadable or undecodable files
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
