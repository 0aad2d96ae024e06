"""Finding the state dict in a checkpoint file or directory.

  .safetensors file                     read with numpy (`safetensors_io`), no code executed
  .pth / .bin / .pt (torch.save zip)    `torch_checkpoint.read_torch_checkpoint` (no pickle
                                        code executed)
  Hugging Face model directory          config.json + model.safetensors (or its sharded
                                        index, or pytorch_model.bin)

Training checkpoints keep the weights under a key ("model" in the official MAE and BEiT code,
"state_dict" in timm's train script) beside extras (optimizer, scaler, epoch, args); those are
not converted, and any objects the restricted reader did not construct are named in `skipped`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from typing import Any, Optional

from mim_jax.convert import safetensors_io, torch_checkpoint
from mim_jax.convert.torch_checkpoint import NotACheckpointError

# Where training scripts keep the weights, in the order they are looked for.
CONTAINER_KEYS = ("model", "state_dict", "module", "model_state", "model_state_dict")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclasses.dataclass
class LoadedStateDict:
  """tensors: name -> numpy array or torch tensor; container: the top-level key they were
  under ("" for a bare state dict); skipped: what was not read; hf_config: the config.json of
  a Hugging Face model directory, if any."""
  tensors: dict[str, Any]
  path: str
  container: str = ""
  skipped: list[str] = dataclasses.field(default_factory=list)
  hf_config: Optional[dict] = None


def _is_tensor(value: Any) -> bool:
  return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(
      value, torch_checkpoint.Skipped)


def _is_state_dict(obj: Any) -> bool:
  return isinstance(obj, dict) and bool(obj) and all(
      isinstance(k, str) and _is_tensor(v) for k, v in obj.items())


def _describe(value: Any) -> str:
  if _is_tensor(value):
    return f"tensor {tuple(value.shape)}"
  if isinstance(value, dict):
    tensors = sum(_is_tensor(v) for v in value.values())
    return f"dict of {len(value)} entries, {tensors} tensors"
  return type(value).__name__ if not isinstance(value, torch_checkpoint.Skipped) else repr(value)


def _unwrap(obj: Any, path: str, key: Optional[str]) -> tuple[dict[str, Any], str, list[str]]:
  """(state dict, its container key, the other top-level entries) of a loaded checkpoint."""
  if key:
    if not isinstance(obj, dict) or key not in obj:
      found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise NotACheckpointError(f"{path} has no top-level entry {key!r} (it has {found})")
    candidates = [key]
  elif _is_state_dict(obj):
    return dict(obj), "", []
  else:
    candidates = [k for k in CONTAINER_KEYS if isinstance(obj, dict) and k in obj]
  for k in candidates:
    if _is_state_dict(obj[k]):
      return dict(obj[k]), k, [str(other) for other in obj if other != k]
  if isinstance(obj, dict):
    entries = "; ".join(f"{k!r}: {_describe(v)}" for k, v in list(obj.items())[:12])
    raise NotACheckpointError(
        f"{path} holds no state dict (a dict of named tensors) under "
        f"{candidates or list(CONTAINER_KEYS)}; its top-level entries are {entries}. Pass the "
        "entry that holds the weights with --key")
  raise NotACheckpointError(f"{path} holds a {_describe(obj)}, not a state dict")


def _strip_module_prefix(tensors: dict[str, Any]) -> dict[str, Any]:
  """DistributedDataParallel saves every name under "module."."""
  if tensors and all(k.startswith("module.") for k in tensors):
    return {k[len("module."):]: v for k, v in tensors.items()}
  return tensors


def _read_file(path: str) -> tuple[Any, list[str]]:
  """(loaded object, skipped names) of a single checkpoint file of any supported format."""
  if zipfile.is_zipfile(path):
    return torch_checkpoint.read_torch_checkpoint(path)
  try:
    tensors, _ = safetensors_io.read_safetensors(path)
    return tensors, []
  except safetensors_io.NotSafetensorsError as not_safetensors:
    if path.endswith(".safetensors") or torch_checkpoint.torch_or_none() is None:
      raise NotACheckpointError(f"{path} is not a checkpoint: {not_safetensors}") from None
  # Neither zip nor safetensors: a legacy (pre-1.6) torch pickle, or not a checkpoint at all.
  return torch_checkpoint.read_torch_checkpoint(path)


def _read_hf_directory(directory: str) -> tuple[Any, str, list[str], dict]:
  config_path = os.path.join(directory, "config.json")
  with open(config_path) as f:
    config = json.load(f)
  for name in HF_WEIGHT_FILES:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    if name.endswith(".index.json"):
      with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      tensors = {}
      for shard in shards:
        tensors.update(safetensors_io.read_safetensors(os.path.join(directory, shard))[0])
      return tensors, path, [], config
    obj, skipped = _read_file(path)
    return obj, path, skipped, config
  raise NotACheckpointError(f"{directory} has a config.json but none of {HF_WEIGHT_FILES}")


def read_state_dict(path: str, key: Optional[str] = None) -> LoadedStateDict:
  """The state dict in `path` (a file or a Hugging Face model directory).

  `key` names the top-level entry holding the weights (default: the first of CONTAINER_KEYS
  that holds a state dict, or the file itself when it is one). A leading "module." on every
  name is removed.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such checkpoint: {path}")
  hf_config = None
  if os.path.isdir(path):
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise NotACheckpointError(f"{path} is a directory without config.json: pass the "
                                "checkpoint file itself, or a Hugging Face model directory")
    obj, file_path, skipped, hf_config = _read_hf_directory(path)
  else:
    obj, skipped = _read_file(path)
    file_path = path
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.isfile(sibling):
      with open(sibling) as f:
        try:
          candidate = json.load(f)
        except json.JSONDecodeError:
          candidate = None
      if isinstance(candidate, dict) and candidate.get("model_type") == "vit_mae":
        hf_config = candidate
  tensors, container, extras = _unwrap(obj, file_path, key)
  notes = [f"not converted: top-level entries {', '.join(extras)}"] if extras else []
  if skipped:
    notes.append("objects not constructed (the restricted reader skips any class that is not a "
                 f"tensor or container): {', '.join(skipped)}")
  return LoadedStateDict(tensors=_strip_module_prefix(tensors), path=file_path,
                         container=container, skipped=notes, hf_config=hf_config)
