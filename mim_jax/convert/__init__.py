"""Weight converters between mim_jax params and other implementations' checkpoints.

  hf_vitmae         HF ViTMAEForPreTraining state dicts <-> MaskedAutoencoder params
  timm_vit          timm / official MAE / BEiT (absolute positions) state dicts <-> params
  state_dicts       the state dict inside a .pth / .bin / .safetensors file or HF directory,
                    read without executing code from the file (torch_checkpoint,
                    safetensors_io)
  importer          checkpoint -> export directory for `--config.init_from`
  exporter          mim_jax weights -> safetensors (+ config.json) for timm / MAE / HF
  reconstructions   MAE reconstruction pictures of image files
  python -m mim_jax.convert   the command line (import / export / reconstruct / inspect)

Importing this package never imports torch: converters take plain dicts of numpy arrays (or
torch tensors, read through their own methods). The file-level functions (`import_checkpoint`,
`export_weights`, ...) load on first use, since they pull in Orbax and the data pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any

from mim_jax.convert.hf_vitmae import (
    expected_hf_shapes,
    hf_vitmae_state_dict_from_params,
    params_from_hf_vitmae,
)
from mim_jax.convert.safetensors_io import read_safetensors, write_safetensors
from mim_jax.convert.state_dicts import read_state_dict
from mim_jax.convert.timm_vit import params_from_timm_vit, timm_state_dict_from_params

_LAZY = {
    "import_checkpoint": "mim_jax.convert.importer",
    "import_state_dict": "mim_jax.convert.importer",
    "export_weights": "mim_jax.convert.exporter",
    "read_weights": "mim_jax.convert.our_weights",
    "draw_reconstructions": "mim_jax.convert.reconstructions",
}

__all__ = ["expected_hf_shapes", "hf_vitmae_state_dict_from_params", "params_from_hf_vitmae",
           "params_from_timm_vit", "read_safetensors", "read_state_dict",
           "timm_state_dict_from_params", "write_safetensors", *_LAZY]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'mim_jax.convert' has no attribute {name!r}")
