"""Weight interop: timm / official MAE / BEiT / HF checkpoints in, safetensors out.

Parity: small random PyTorch models (timm ViTs and BEiT, a transcription of the official MAE
`models_mae.py` built from timm blocks, HF ViTMAEForPreTraining) and their conversions run on
the same images (and masking noise); outputs agree to float32 round-off. Relative error is
max|ours - ref| / max|ref| over the whole array (scalars: |ours - ref| / |ref|), below
REL_TOL = 1e-5 (measured: ~3e-7 for features and logits).

Also: exact round trips ours -> export -> import, the export directories that `init_from`
accepts, reading checkpoints without executing their pickled code, and the messages for
checkpoints that do not fit.
"""

from __future__ import annotations

import argparse
import collections
import errno
import functools
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

import jax
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mim_jax import recipes, registry, viz  # noqa: E402  (after the skip: no torch, no tests)
from mim_jax.convert import safetensors_io  # noqa: E402
from mim_jax.convert.__main__ import main as cli  # noqa: E402
from mim_jax.convert.exporter import export_weights  # noqa: E402
from mim_jax.convert.importer import import_checkpoint, import_state_dict  # noqa: E402
from mim_jax.convert.our_weights import (  # noqa: E402
  build_classifier,
  build_encoder,
  build_mae,
  info_from_config,
  read_weights,
  write_weights,
)
from mim_jax.convert.state_dicts import read_state_dict  # noqa: E402
from mim_jax.convert.torch_checkpoint import NotACheckpointError, read_torch_zip  # noqa: E402
from mim_jax.methods import mae  # noqa: E402

from conftest import rel_err  # noqa: E402

try:
  import timm  # noqa: E402
  from timm.models.vision_transformer import Block as TimmBlock  # noqa: E402
  from timm.models.vision_transformer import PatchEmbed  # noqa: E402
except ImportError:  # timm needs torchvision, which not every torch build has
  timm = None
requires_timm = pytest.mark.skipif(timm is None, reason="timm is not installed")

IMAGE, PATCH = 32, 8
GRID = (IMAGE // PATCH, IMAGE // PATCH)
NUM_PATCHES = GRID[0] * GRID[1]
WIDTH, DEPTH, HEADS, MLP = 64, 2, 4, 256
DEC_WIDTH, DEC_DEPTH, DEC_HEADS = 32, 2, 4
NUM_CLASSES = 5
BATCH = 3
REL_TOL = 1e-5


def _images(channels: int = 3, seed: int = 1):
  """The same pixels NHWC (ours) and NCHW (torch)."""
  images = np.random.default_rng(seed).standard_normal(
      (BATCH, IMAGE, IMAGE, channels)).astype(np.float32)
  return images, torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@torch.no_grad()
def _randomize(model, seed: int = 0):
  """Random values for every trainable weight, including those initialised to 0 or 1, so that
  a swapped or transposed tensor cannot hide."""
  gen = torch.Generator().manual_seed(seed)
  for name, p in model.named_parameters():
    if not p.requires_grad:  # fixed sin-cos tables
      continue
    noise = torch.randn(p.shape, generator=gen)
    if p.ndim >= 2 and not name.endswith(("token", "pos_embed")):
      p.copy_(noise / float(np.sqrt(p[0].numel())))
    elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
      p.copy_(1.0 + 0.2 * noise)
    else:
      p.copy_(0.2 * noise)
  return model.eval()


def _timm_vit(channels: int = 3, **kwargs):
  kwargs = dict(dict(num_classes=0, global_pool="token"), **kwargs)
  return _randomize(timm.create_model(
      "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH,
      in_chans=channels, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / WIDTH,
      **kwargs))


def _numpy_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _assert_trees_equal(ours, ref):
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  jax.tree.map(np.testing.assert_array_equal, ours, ref)


# --- the official MAE (facebookresearch/mae models_mae.py), transcribed on timm blocks ---------

def official_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
  """util/pos_embed.py get_2d_sincos_pos_embed(..., cls_token=True) of the official code."""
  def one_d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32),
                              np.arange(grid_size, dtype=np.float32)), axis=0)
  grid = grid.reshape([2, 1, grid_size, grid_size])
  emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def _official_mae_class():
  nn = torch.nn

  class OfficialMAE(nn.Module):
    """MaskedAutoencoderViT with its random masking driven by given noise."""

    def __init__(self, channels=3, norm_pix_loss=True):
      super().__init__()
      norm = functools.partial(nn.LayerNorm, eps=1e-6)
      self.patch_embed = PatchEmbed(IMAGE, PATCH, channels, WIDTH)
      self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
      self.pos_embed = nn.Parameter(torch.zeros(1, NUM_PATCHES + 1, WIDTH), requires_grad=False)
      self.blocks = nn.ModuleList([TimmBlock(WIDTH, HEADS, MLP / WIDTH, qkv_bias=True,
                                             norm_layer=norm) for _ in range(DEPTH)])
      self.norm = norm(WIDTH)
      self.decoder_embed = nn.Linear(WIDTH, DEC_WIDTH, bias=True)
      self.mask_token = nn.Parameter(torch.zeros(1, 1, DEC_WIDTH))
      self.decoder_pos_embed = nn.Parameter(torch.zeros(1, NUM_PATCHES + 1, DEC_WIDTH),
                                            requires_grad=False)
      self.decoder_blocks = nn.ModuleList([TimmBlock(DEC_WIDTH, DEC_HEADS, 4.0, qkv_bias=True,
                                                     norm_layer=norm) for _ in range(DEC_DEPTH)])
      self.decoder_norm = norm(DEC_WIDTH)
      self.decoder_pred = nn.Linear(DEC_WIDTH, PATCH ** 2 * channels, bias=True)
      self.channels, self.norm_pix_loss = channels, norm_pix_loss
      self.pos_embed.data.copy_(torch.from_numpy(
          official_2d_sincos_pos_embed(WIDTH, GRID[0])).float().unsqueeze(0))
      self.decoder_pos_embed.data.copy_(torch.from_numpy(
          official_2d_sincos_pos_embed(DEC_WIDTH, GRID[0])).float().unsqueeze(0))

    def patchify(self, imgs):
      p, h = PATCH, imgs.shape[2] // PATCH
      x = imgs.reshape(shape=(imgs.shape[0], self.channels, h, p, h, p))
      x = torch.einsum("nchpwq->nhwpqc", x)
      return x.reshape(shape=(imgs.shape[0], h * h, p ** 2 * self.channels))

    def random_masking(self, x, mask_ratio, noise):
      n, length, d = x.shape
      len_keep = int(length * (1 - mask_ratio))
      ids_shuffle = torch.argsort(noise, dim=1)
      ids_restore = torch.argsort(ids_shuffle, dim=1)
      ids_keep = ids_shuffle[:, :len_keep]
      x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
      mask = torch.ones([n, length])
      mask[:, :len_keep] = 0
      return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore

    def forward(self, imgs, noise, mask_ratio=0.75):
      x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
      x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
      cls_token = self.cls_token + self.pos_embed[:, :1, :]
      x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
      for blk in self.blocks:
        x = blk(x)
      x = self.decoder_embed(self.norm(x))
      mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
      x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
      x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
      x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
      for blk in self.decoder_blocks:
        x = blk(x)
      pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
      target = self.patchify(imgs)
      if self.norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
      loss = ((pred - target) ** 2).mean(dim=-1)
      return (loss * mask).sum() / mask.sum(), pred, mask

  return OfficialMAE


# --- our models with random weights ---------------------------------------------------------

def _our_config(**model) -> ml_collections.ConfigDict:
  c = registry.base_config("mae")
  c.image_size, c.channels = (IMAGE, IMAGE), 3
  c.model.update(variant=f"mu/{PATCH}", width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP)
  c.model.update(model)
  c.decoder.update(width=DEC_WIDTH, depth=DEC_DEPTH, num_heads=DEC_HEADS)
  return c


def _perturbed(params, seed: int):
  """Non-trivial biases and norm scales (our init makes them 0 and 1)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def our_mae():
  """(model info, params) of a random mim_jax MAE, as an MAE run would export them."""
  config = _our_config()
  model = mae.build_model(config)
  images, _ = _images()
  params = model.init({"params": jax.random.key(3), "masking": jax.random.key(4)}, images)
  return info_from_config(config.to_dict()), _perturbed(params["params"], 5)


@pytest.fixture(scope="module")
def our_mae_dir(tmp_path_factory, our_mae):
  return write_weights(str(tmp_path_factory.mktemp("ours") / "mae"), our_mae[1], our_mae[0])


# --- timm: features and classifier logits ---------------------------------------------------

@requires_timm
@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grayscale"])
def test_timm_features_match(channels):
  model = _timm_vit(channels)
  images, images_nchw = _images(channels)
  with torch.no_grad():
    ref = model.forward_features(images_nchw).numpy()
  # A timm ViT's table is learned: keep it (auto would check it against sin-cos).
  imported = import_state_dict(model.state_dict(), num_heads=HEADS, posemb="learn")
  encoder = build_encoder(imported.model_info(), imported.params)
  tokens, _ = encoder.apply({"params": imported.params["encoder"]}, images)
  assert tokens.shape == ref.shape == (BATCH, 1 + NUM_PATCHES, WIDTH)
  assert rel_err(tokens, ref) < REL_TOL


@requires_timm
@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_timm_classifier_logits_match(global_pool):
  """avg: the official MAE fine-tuning head (mean of patch tokens, fc_norm, no final norm)."""
  model = _timm_vit(num_classes=NUM_CLASSES, global_pool=global_pool)
  assert (global_pool == "avg") == ("fc_norm.weight" in model.state_dict())
  images, images_nchw = _images()
  with torch.no_grad():
    ref = model(images_nchw).numpy()
  imported = import_state_dict(model.state_dict(), num_heads=HEADS)
  assert imported.pool == {"avg": "gap", "token": "cls"}[global_pool]
  assert imported.posemb == "learn" and imported.num_classes == NUM_CLASSES
  classifier, params = build_classifier(imported.model_info(), imported.params)
  logits = classifier.apply({"params": params}, images)
  assert logits.shape == ref.shape == (BATCH, NUM_CLASSES)
  assert rel_err(logits, ref) < REL_TOL


@requires_timm
def test_learned_table_is_resized_for_another_image_size():
  from mim_jax.models.vit import resize_posemb
  model = _timm_vit(num_classes=NUM_CLASSES, global_pool="avg")
  imported = import_state_dict(model.state_dict(), num_heads=HEADS, image_size=(48, 48))
  table = model.state_dict()["pos_embed"][0].numpy()
  np.testing.assert_array_equal(imported.params["encoder"]["pos_embed"],
                                resize_posemb(table, GRID, (6, 6)))
  assert imported.image_size == (48, 48) and imported.model_info()["image_size"] == [48, 48]
  assert any("resized from a (4, 4) to a (6, 6) patch grid" in n for n in imported.notes)
  classifier, params = build_classifier(imported.model_info(), imported.params)
  logits = classifier.apply({"params": params}, np.zeros((1, 48, 48, 3), np.float32))
  assert logits.shape == (1, NUM_CLASSES)


def _layer_scale_model(kind: str):
  """BEiT (gamma_1/2, q/v biases) or DeiT III (ls1/ls2, no cls position), random weights."""
  if kind == "beit":
    from timm.models.beit import Beit
    return _randomize(Beit(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                           num_heads=HEADS, num_classes=NUM_CLASSES, use_abs_pos_emb=True,
                           use_rel_pos_bias=False, init_values=0.1))
  return _randomize(timm.create_model(
      "deit3_small_patch16_224", pretrained=False, img_size=IMAGE, patch_size=PATCH,
      embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=NUM_CLASSES))


@requires_timm
@pytest.mark.parametrize("kind", ["beit", "deit3"])
def test_layer_scale_models_convert_exactly(kind):
  """Layer scales folded into proj / fc2; BEiT's q and v biases merged into the qkv bias;
  DeiT III's position table without a cls row padded with a zero row."""
  model = _layer_scale_model(kind)
  state = model.state_dict()
  assert {"beit": "blocks.0.attn.q_bias", "deit3": "blocks.0.ls1.gamma"}[kind] in state
  images, images_nchw = _images()
  with torch.no_grad():
    ref = model(images_nchw).numpy()
  imported = import_state_dict(state, num_heads=HEADS)
  assert imported.source_format == {"beit": "beit", "deit3": "timm"}[kind]
  classifier, params = build_classifier(imported.model_info(), imported.params)
  assert rel_err(classifier.apply({"params": params}, images), ref) < REL_TOL


@requires_timm
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"], ids=["laion", "openai"])
def test_clip_style_pre_norm_converts_exactly_and_exports_back(tmp_path, act):
  """A timm ViT with `norm_pre` (CLIP's ln_pre before the blocks), with exact GELU (LAION /
  OpenCLIP towers) or QuickGELU (OpenAI's): the imported encoder's tokens equal timm's
  forward_features, and the timm export of it loads back into timm with the same features."""
  model = _timm_vit(pre_norm=True, act_layer=act)
  assert "norm_pre.weight" in model.state_dict()
  images, images_nchw = _images()
  with torch.no_grad():
    ref = model.forward_features(images_nchw).numpy()
  imported = import_state_dict(model.state_dict(), num_heads=HEADS, posemb="learn", mlp_act=act)
  info = imported.model_info()
  assert info["config"]["model"]["pre_norm"] is True
  assert info["config"]["model"]["mlp_act"] == act
  # CLIP's input statistics (both families' preprocessing), not ImageNet's: a teacher reads
  # them from the export and re-normalises the student's view (it saw ImageNet's before).
  assert tuple(info["config"]["data"]["mean"]) == (0.48145466, 0.4578275, 0.40821073)
  assert tuple(info["config"]["data"]["std"]) == (0.26862954, 0.26130258, 0.27577711)
  encoder = build_encoder(info, imported.params)
  tokens, _ = encoder.apply({"params": imported.params["encoder"]}, images)
  assert rel_err(tokens, ref) < REL_TOL
  imported.write(str(tmp_path / "ours"))
  export_weights(str(tmp_path / "ours"), str(tmp_path / "timm"), "timm")
  again = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
  with torch.no_grad():
    assert rel_err(again.forward_features(images_nchw).numpy(), ref) < REL_TOL


@requires_timm
def test_clip_style_tower_needs_its_activation_named(tmp_path):
  """A state dict does not say whether a CLIP tower was trained with QuickGELU (OpenAI) or
  GELU (LAION): the import refuses to guess, and the wrong choice is a different function."""
  model = _timm_vit(pre_norm=True, act_layer="quick_gelu")
  with pytest.raises(ValueError, match="--mlp_act=quick_gelu"):
    import_state_dict(model.state_dict(), num_heads=HEADS, posemb="learn")
  images, images_nchw = _images()
  with torch.no_grad():
    ref = model.forward_features(images_nchw).numpy()
  wrong = import_state_dict(model.state_dict(), num_heads=HEADS, posemb="learn", mlp_act="gelu")
  tokens, _ = build_encoder(wrong.model_info(), wrong.params).apply(
      {"params": wrong.params["encoder"]}, images)
  assert rel_err(tokens, ref) > 100 * REL_TOL
  right = import_state_dict(model.state_dict(), num_heads=HEADS, posemb="learn",
                            mlp_act="quick_gelu")
  right.write(str(tmp_path / "ours"))
  for fmt in ("mae", "hf"):
    with pytest.raises(ValueError, match="quick_gelu in its encoder's MLPs"):
      export_weights(str(tmp_path / "ours"), str(tmp_path / fmt), fmt)
  # Plain ViTs (no norm_pre) are exact GELU without being told.
  assert import_state_dict(_timm_vit().state_dict(), num_heads=HEADS,
                           posemb="learn").mlp_act == "gelu"


@requires_timm
def test_an_import_records_the_input_normalisation_it_is_given(tmp_path):
  """--mean / --std: the statistics the weights were trained with, written to the export that
  evaluations and teachers normalise with; ImageNet's for a plain ViT by default; checked."""
  state = _timm_vit().state_dict()
  info = import_state_dict(state, num_heads=HEADS, posemb="learn").model_info()
  assert tuple(info["config"]["data"]["mean"]) == (0.485, 0.456, 0.406)
  given = import_state_dict(state, num_heads=HEADS, posemb="learn", mean=(0.5,), std=(0.25,))
  given.write(str(tmp_path / "ours"))
  from mim_jax.weights import pretrained
  assert pretrained.input_normalisation(pretrained.read_model_info(str(tmp_path / "ours")),
                                        "ours") == ((0.5,), (0.25,))
  with pytest.raises(ValueError, match="mean and std: give both or neither"):
    import_state_dict(state, num_heads=HEADS, posemb="learn", mean=(0.5,))
  with pytest.raises(ValueError, match=r"std=\[0.2, 0.0, 0.2\]: one value or one per channel "
                     r"\(3\), each > 0"):
    import_state_dict(state, num_heads=HEADS, posemb="learn", mean=(0.5,), std=(0.2, 0.0, 0.2))


def _with_index_buffers(model) -> dict[str, np.ndarray]:
  """The state dict as the official BEiT checkpoints store it: with the relative position
  index buffers (timm keeps them out of its state dict)."""
  state = _numpy_state(model)
  state.update({k: v.numpy() for k, v in model.named_buffers()
                if k.endswith("relative_position_index")})
  return state


def _rel_pos_beit(shared: bool, **kwargs):
  """timm's Beit (the official BEiT code's names) with relative positions only, random
  weights (tables included: zeros would hide a misread index)."""
  from timm.models.beit import Beit
  return _randomize(Beit(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH,
                         num_heads=HEADS, use_abs_pos_emb=False, use_rel_pos_bias=not shared,
                         use_shared_rel_pos_bias=shared, init_values=0.1, **kwargs))


@requires_timm
@pytest.mark.parametrize("shared", [False, True], ids=["per_block", "shared"])
def test_beit_relative_position_bias_converts_exactly(shared):
  """BEiT with a shared (pre-training) or per-block (fine-tuning) relative position bias, layer
  scale and no absolute positions: the imported encoder's tokens and classifier logits equal
  timm's; the index buffers official checkpoints store are checked and dropped. The shared
  case pools the cls token (the final norm kept), the per-block case the mean (fc_norm)."""
  model = _rel_pos_beit(shared, num_classes=NUM_CLASSES,
                        global_pool="token" if shared else "avg")
  state = _with_index_buffers(model)
  index = ("rel_pos_bias.relative_position_index" if shared
           else "blocks.0.attn.relative_position_index")
  assert index in state and ("rel_pos_bias.relative_position_bias_table" in state) == shared
  images, images_nchw = _images()
  with torch.no_grad():
    ref_logits = model(images_nchw).numpy()
    ref_tokens = model.forward_features(images_nchw).numpy()
  imported = import_state_dict(state, num_heads=HEADS)
  info = imported.model_info()
  assert info["posemb"] == "none"
  assert info["config"]["model"]["rel_pos_bias"] == ("shared" if shared else "per_block")
  assert info["config"]["model"]["layer_scale"] > 0
  classifier, params = build_classifier(info, imported.params)
  assert rel_err(classifier.apply({"params": params}, images), ref_logits) < REL_TOL
  if shared:  # with the final norm, the tokens themselves
    tokens, _ = classifier.encoder.apply({"params": params["encoder"]}, images)
    assert rel_err(tokens, ref_tokens) < REL_TOL


@requires_timm
@pytest.mark.parametrize("posemb", ["sincos", "learn"])
def test_a_position_mode_for_weights_without_a_position_table_is_refused(posemb):
  """--posemb sincos (check the table) or learn (keep it) cannot act on weights with relative
  positions only: refused, not silently imported with none."""
  state = _rel_pos_beit(shared=True).state_dict()
  with pytest.raises(ValueError, match=rf"posemb='{posemb}' does not apply: these weights have "
                     "no absolute position table"):
    import_state_dict(state, num_heads=HEADS, posemb=posemb)


def test_a_head_count_against_the_hf_config_is_refused(tmp_path, our_mae_dir):
  """HF directories record both head counts in config.json; a --num_heads or
  --decoder_num_heads that contradicts them would load the same weights as another model."""
  out = str(tmp_path / "hf")
  export_weights(our_mae_dir, out, "hf")
  for kwargs, name in (({"num_heads": 2 * HEADS}, "num_heads"),
                       ({"decoder_num_heads": 2 * DEC_HEADS}, "decoder_num_heads")):
    with pytest.raises(ValueError, match=rf"{name}=\d+ contradicts the checkpoint's "
                       rf"config.json, which records"):
      import_checkpoint(out, **kwargs)


@requires_timm
def test_beit_relative_index_numbered_otherwise_is_refused():
  state = _with_index_buffers(_rel_pos_beit(shared=True))
  state["rel_pos_bias.relative_position_index"] = state[
      "rel_pos_bias.relative_position_index"].T.copy()
  with pytest.raises(ValueError, match="relative_position_index: a relative position index "
                     "numbered unlike BEiT's"):
    import_state_dict(state, num_heads=HEADS)


@requires_timm
def test_beit_export_refuses_parts_timm_vit_cannot_hold(tmp_path):
  imported = import_state_dict(_numpy_state(_rel_pos_beit(shared=True)), num_heads=HEADS)
  imported.write(str(tmp_path / "beit"))
  with pytest.raises(ValueError, match="BEiT-style parts .*rel_pos_bias='shared'"):
    export_weights(str(tmp_path / "beit"), str(tmp_path / "out"), "timm")


# --- the official MAE, pre-training checkpoints with the decoder ----------------------------

@requires_timm
@pytest.mark.parametrize("norm_pix", [True, False], ids=["norm_pix", "pixels"])
def test_official_mae_full_checkpoint_matches(tmp_path, norm_pix):
  """A `*_full.pth` (state dict under "model") -> import -> same reconstruction and loss."""
  official = _randomize(_official_mae_class()(norm_pix_loss=norm_pix))
  images, images_nchw = _images()
  noise = np.random.default_rng(7).random((BATCH, NUM_PATCHES)).astype(np.float32)
  with torch.no_grad():
    ref_loss, ref_pred, ref_mask = official(images_nchw, torch.from_numpy(noise))
  path = str(tmp_path / "mae_pretrain_vit_tiny_full.pth")
  torch.save({"model": official.state_dict()}, path)

  assert cli(["import", path, str(tmp_path / "out"), "--num_heads", str(HEADS),
              "--decoder_num_heads", str(DEC_HEADS)]) == 0
  info, params = read_weights(str(tmp_path / "out"))
  assert info["imported_from"]["posemb"] == "sincos" and "pos_embed" not in params["encoder"]
  model, params = build_mae(info, params)
  pred, mask_info = model.apply({"params": params}, images, noise=noise)
  np.testing.assert_array_equal(np.asarray(mask_info.mask), ref_mask.numpy())
  assert rel_err(pred, ref_pred.numpy()) < REL_TOL
  loss = float(mae.mae_loss(pred, images, mask_info.mask, PATCH, norm_pix))
  assert rel_err(loss, float(ref_loss)) < REL_TOL


@requires_timm
def test_official_encoder_only_checkpoint_and_its_posemb_check():
  official = _randomize(_official_mae_class()())
  encoder_state = {k: v for k, v in _numpy_state(official).items()
                   if not k.startswith("decoder_") and k != "mask_token"}
  imported = import_state_dict(encoder_state, num_heads=HEADS)
  assert sorted(imported.params) == ["encoder"] and imported.posemb == "sincos"
  assert "pos_embed equals the fixed 2-D sin-cos table (checked)" in imported.notes[0]

  encoder_state["pos_embed"] = encoder_state["pos_embed"] + 0.01
  with pytest.raises(ValueError, match=r"pos_embed differs .*--posemb=learn"):
    import_state_dict(encoder_state, num_heads=HEADS)
  learned = import_state_dict(encoder_state, num_heads=HEADS, posemb="learn")
  np.testing.assert_array_equal(learned.params["encoder"]["pos_embed"],
                                encoder_state["pos_embed"][0])
  # Settings these weights have no use for are refused, not dropped.
  with pytest.raises(ValueError, match=r"decoder_num_heads=4: these weights hold no MAE decoder"):
    import_state_dict(encoder_state, num_heads=HEADS, posemb="learn", decoder_num_heads=4)
  with pytest.raises(ValueError, match=r"image size \[32, 32, 32\]: one side"):
    import_state_dict(encoder_state, num_heads=HEADS, posemb="learn", image_size=(32, 32, 32))


# --- exports that timm and HF load --------------------------------------------------------

@requires_timm
def test_timm_export_loads_into_timm(tmp_path, our_mae_dir, our_mae):
  info, params = our_mae
  out = str(tmp_path / "timm")
  export_weights(our_mae_dir, out, "timm")
  images, images_nchw = _images()
  encoder = build_encoder(info, params)
  ours = np.asarray(encoder.apply({"params": params["encoder"]}, images)[0])

  from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
  overlay = timm.create_model(
      "vit_tiny_patch16_224", pretrained=True, img_size=IMAGE, patch_size=PATCH,
      embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0,
      pretrained_cfg_overlay=dict(file=os.path.join(out, "model.safetensors"),
                                  num_classes=0)).eval()
  for model in (from_dir, overlay):
    with torch.no_grad():
      assert rel_err(ours, model.forward_features(images_nchw).numpy()) < REL_TOL
  # Key for key: a strict load raises on any missing or unexpected key.
  from safetensors.torch import load_file
  timm.create_model(f"local-dir:{out}", pretrained=False).load_state_dict(
      load_file(os.path.join(out, "model.safetensors")), strict=True)


def test_timm_export_crops_as_mim_jax_evaluates(our_mae):
  """pretrained_cfg's crop_pct is the evaluation's centre crop: 0.875 for photographs at up
  to 224 px (it was 1.0 for every export: timm's transform saw another crop), 1.0 for framed
  data and above 224 px."""
  import copy

  from mim_jax.convert.exporter import timm_config
  info, params = our_mae
  for source, size, crop in (("image_folder", [224, 224], 0.875),
                             ("fashion_mnist", [224, 224], 1.0), ("tfds", [384, 384], 1.0)):
    other = copy.deepcopy(info)
    other["config"]["data"]["source"], other["image_size"] = source, size
    assert timm_config(other, params)["pretrained_cfg"]["crop_pct"] == crop, source


@requires_timm
def test_finetuned_classifier_exports_to_timm_avg_pool(tmp_path):
  """A mean-pooling classifier -> timm global_pool='avg' (fc_norm, no final norm)."""
  model = _timm_vit(num_classes=NUM_CLASSES, global_pool="avg")
  imported = import_state_dict(model.state_dict(), num_heads=HEADS)
  imported.write(str(tmp_path / "imported"))
  export_weights(str(tmp_path / "imported"), str(tmp_path / "timm"), "timm")
  reloaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
  images, images_nchw = _images()
  classifier, params = build_classifier(imported.model_info(), imported.params)
  with torch.no_grad():
    ref = model(images_nchw).numpy()
    assert rel_err(reloaded(images_nchw).numpy(), ref) < REL_TOL
  assert rel_err(classifier.apply({"params": params}, images), ref) < REL_TOL


def test_hf_export_loads_into_transformers_with_the_same_loss(tmp_path, our_mae_dir, our_mae):
  transformers = pytest.importorskip("transformers")
  info, params = our_mae
  export_weights(our_mae_dir, str(tmp_path / "hf"), "hf")
  hf_model, loading = transformers.ViTMAEForPreTraining.from_pretrained(
      str(tmp_path / "hf"), output_loading_info=True)
  assert not any(loading.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  hf_model = hf_model.eval().float()
  assert hf_model.config.norm_pix_loss is True and hf_model.config.layer_norm_eps == 1e-6

  images, images_nchw = _images()
  noise = np.random.default_rng(8).random((BATCH, NUM_PATCHES)).astype(np.float32)
  with torch.no_grad():
    out = hf_model(pixel_values=images_nchw, noise=torch.from_numpy(noise))
  model, params = build_mae(info, params)
  pred, mask_info = model.apply({"params": params}, images, noise=noise)
  np.testing.assert_array_equal(np.asarray(mask_info.mask), out.mask.numpy())
  assert rel_err(pred, out.logits.numpy()) < REL_TOL
  loss = float(mae.mae_loss(pred, images, mask_info.mask, PATCH, True))
  assert rel_err(loss, float(out.loss)) < REL_TOL


# --- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["timm", "mae", "hf"])
def test_round_trip_is_exact(tmp_path, our_mae_dir, our_mae, fmt):
  """ours -> export -> import gives identical parameters (timm: the encoder only)."""
  info, params = our_mae
  out = str(tmp_path / fmt)
  export_weights(our_mae_dir, out, fmt)
  source = out if fmt == "hf" else os.path.join(out, "model.safetensors")
  decoder = {} if fmt == "timm" else {"decoder_num_heads": DEC_HEADS}  # timm: no decoder
  back = import_checkpoint(source, num_heads=HEADS, **decoder)
  expected = params if fmt != "timm" else {"encoder": params["encoder"]}
  _assert_trees_equal(back.params, expected)
  assert back.image_size == (IMAGE, IMAGE) and back.channels == 3
  if fmt == "hf":  # heads and the loss settings travel in config.json
    assert (back.num_heads, back.decoder_num_heads, back.norm_pix_loss) == (HEADS, DEC_HEADS, True)


def test_export_of_a_training_workdir(tmp_path, our_mae):
  """A workdir as `train.run` leaves it (config.json, checkpoints/<step>/state with the train
  state): the params of the latest step, decoder included, export."""
  import orbax.checkpoint as ocp
  info, params = our_mae
  workdir = tmp_path / "run"
  for step, scale in ((2, 0.0), (4, 1.0)):  # the latest step is the one exported
    state = {"step": np.int32(step), "params": jax.tree.map(lambda x: x * scale, params),
             "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}, "extra": {}}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(str(workdir / "checkpoints" / str(step) / "state"), state)
    checkpointer.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps(info["config"]))
  export_weights(str(workdir), str(tmp_path / "mae"), "mae")
  back = import_checkpoint(str(tmp_path / "mae" / "model.safetensors"), num_heads=HEADS,
                           decoder_num_heads=DEC_HEADS)
  _assert_trees_equal(back.params, params)
  # --step picks a workdir's checkpoint: an export (one set of weights) refuses it.
  export_weights(str(workdir), str(tmp_path / "mae_step2"), "mae", step=2)
  back = import_checkpoint(str(tmp_path / "mae_step2" / "model.safetensors"), num_heads=HEADS,
                           decoder_num_heads=DEC_HEADS)
  _assert_trees_equal(back.params, jax.tree.map(lambda x: x * 0.0, params))
  ours = tmp_path / "ours"
  write_weights(str(ours), params, info)
  with pytest.raises(ValueError, match=r"step=2 picks a checkpoint of a training workdir"):
    export_weights(str(ours), str(tmp_path / "again"), "mae", step=2)


# --- what init_from accepts ---------------------------------------------------------------

def _import_to(tmp_path, state_dict, **kwargs) -> str:
  path = str(tmp_path / "checkpoint.pth")
  torch.save({"model": state_dict}, path)
  return import_checkpoint(path, num_heads=HEADS, **kwargs).write(str(tmp_path / "imported"))


@requires_timm
def test_imported_classifier_fine_tunes_at_a_new_resolution(tmp_path):
  """init_from=<import>: config adopted from model.json, encoder loaded, table resized."""
  from mim_jax.evaluate.finetune import FineTune
  from mim_jax.models.vit import resize_posemb
  from mim_jax.weights import pretrained
  model = _timm_vit(num_classes=NUM_CLASSES, global_pool="avg")
  directory = _import_to(tmp_path, model.state_dict())
  config = recipes.finetune_recipe()
  config.init_from, config.image_size = directory, (48, 48)
  config.classifier.num_classes = NUM_CLASSES
  config = pretrained.adopt_encoder_config(config)
  assert (config.model.width, config.model.depth, config.model.num_heads) == (WIDTH, DEPTH, HEADS)
  method = FineTune(config)
  params, extra = method.init(jax.random.key(0), np.zeros((1, 48, 48, 3), np.float32))
  params, _ = method.load_pretrained(params, extra)
  state = _numpy_state(model)
  np.testing.assert_array_equal(params["encoder"]["cls_token"], state["cls_token"])
  expected_posemb = resize_posemb(state["pos_embed"][0], GRID, (6, 6))
  np.testing.assert_allclose(params["encoder"]["pos_embed"], expected_posemb, atol=1e-6)
  # The released classifier's head and fc_norm come along (same classes, same pooling)...
  np.testing.assert_array_equal(params["head"]["kernel"], state["head.weight"].T)
  np.testing.assert_array_equal(params["fc_norm"]["scale"], state["fc_norm.weight"])
  # ...and a head for another number of classes starts fresh.
  config.classifier.num_classes = NUM_CLASSES + 1
  method = FineTune(config)
  fresh, extra = method.init(jax.random.key(0), np.zeros((1, 48, 48, 3), np.float32))
  loaded, _ = method.load_pretrained(fresh, extra)
  np.testing.assert_array_equal(loaded["head"]["kernel"], fresh["head"]["kernel"])


@requires_timm
def test_a_released_head_that_fits_decides_head_init_std(tmp_path):
  """classifier.reuse_head=False trains a new head where the released one fits; while the
  released head loads, a command-line head_init_std is refused (it would do nothing), and it
  is accepted where the head does not fit or is not reused."""
  from mim_jax.config.errors import ConfigError
  from mim_jax.evaluate.finetune import FineTune
  from mim_jax.weights import pretrained
  model = _timm_vit(num_classes=NUM_CLASSES, global_pool="avg")
  directory = _import_to(tmp_path, model.state_dict())
  config = recipes.finetune_recipe()
  config.init_from, config.image_size = directory, (IMAGE, IMAGE)
  config.classifier.update(num_classes=NUM_CLASSES, pool="gap", reuse_head=False)
  config = pretrained.adopt_encoder_config(config)
  method = FineTune(config)
  fresh, extra = method.init(jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3), np.float32))
  loaded, _ = method.load_pretrained(fresh, extra)
  np.testing.assert_array_equal(loaded["head"]["kernel"], fresh["head"]["kernel"])
  assert not np.array_equal(loaded["head"]["kernel"], _numpy_state(model)["head.weight"].T)

  std = {"classifier.head_init_std": 0.01}
  pretrained.refuse_dropped_overrides(config, std)  # a new head: the std acts
  config.classifier.reuse_head = True
  with pytest.raises(ConfigError, match=r"head_init_std=0.01 is not used: .*reuse_head=False"):
    pretrained.refuse_dropped_overrides(config, std)
  # The benchmark and the memory planner load no weights (and must not start JAX here).
  pretrained.refuse_dropped_overrides(config, std, loads_weights=False)
  assert pretrained.has_released_head(directory)
  assert not pretrained.has_released_head(str(tmp_path / "no_export"))
  for field, value in (("num_classes", NUM_CLASSES + 1), ("pool", "cls")):
    other = config.copy_and_resolve_references()
    other.classifier[field] = value  # the released head does not fit: a new one, at this std
    pretrained.refuse_dropped_overrides(other, std)
    head = FineTune(other).init(jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3), np.float32))[0]
    assert not pretrained.head_fits(pretrained.released_head(directory), head)


def test_imported_pretraining_encoder_is_an_init_from_directory(tmp_path, our_mae, our_mae_dir):
  """An imported encoder-only checkpoint reads like an export of our own MAE run."""
  from mim_jax.weights import pretrained
  info, params = our_mae
  export_weights(our_mae_dir, str(tmp_path / "timm"), "timm")
  directory = str(tmp_path / "imported")
  assert cli(["import", str(tmp_path / "timm" / "model.safetensors"), directory,
              "--num_heads", str(HEADS)]) == 0
  config = registry.base_config("knn")
  config.init_from = directory
  adopted = pretrained.adopt_encoder_config(config)
  assert adopted.model.variant == f"mu/{PATCH}" and adopted.model.width == WIDTH
  # Loaded into zeros (loading into the expected weights could not show a loader that keeps
  # what it is given).
  zeros = jax.tree.map(np.zeros_like, params["encoder"])
  loaded = pretrained.load_encoder_into(zeros, directory, grid_hw=GRID)
  _assert_trees_equal(jax.tree.map(np.asarray, loaded), params["encoder"])


# --- reading checkpoints without running their code -------------------------------------------

def _touch(path: str) -> str:
  """What a malicious checkpoint would make the unpickler call."""
  with open(path, "w") as f:
    f.write("code from the checkpoint ran")
  return path


class _Evil:
  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return _touch, (self.path,)


def _training_checkpoint(path: str, state_dict, marker: str) -> None:
  """An official-MAE-style training checkpoint: args Namespace, optimizer, scaler, epoch."""
  args = argparse.Namespace(model="mae_vit_tiny", lr=1e-3, hook=_Evil(marker))
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
  torch.save({"model": state_dict, "optimizer": optimizer.state_dict(), "epoch": 799,
              "scaler": {"scale": 65536.0}, "args": args, "extra": _Evil(marker)}, path)


def test_training_checkpoint_with_namespace_reads_without_running_code(tmp_path, our_mae):
  info, params = our_mae
  from mim_jax.convert.timm_vit import timm_state_dict_from_params
  state = timm_state_dict_from_params(params, patch_size=PATCH, channels=3, grid_hw=GRID)
  path, marker = str(tmp_path / "checkpoint-799.pth"), str(tmp_path / "marker")
  _training_checkpoint(path, {k: torch.from_numpy(v) for k, v in state.items()}, marker)
  with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader refuses the file
    torch.load(path, map_location="cpu", weights_only=True)

  imported = import_checkpoint(path, num_heads=HEADS, decoder_num_heads=DEC_HEADS)
  assert not os.path.exists(marker)
  _assert_trees_equal(imported.params, params)
  notes = " ".join(imported.notes)
  assert "argparse.Namespace" in notes and "_touch" in notes
  assert "optimizer" in notes and "epoch" in notes and "'model'" in notes


def test_malicious_values_inside_the_state_dict_are_not_run(tmp_path):
  path, marker = str(tmp_path / "evil.pth"), str(tmp_path / "marker")
  torch.save({"model": {"cls_token": torch.zeros(1, 1, 8), "pos_embed": _Evil(marker)}}, path)
  with pytest.raises(NotACheckpointError, match="holds no state dict"):
    read_state_dict(path)
  torch.save(_Evil(marker), path)  # the whole file is one object
  with pytest.raises(NotACheckpointError):
    read_state_dict(path)
  assert not os.path.exists(marker)


def test_restricted_reader_equals_torch_load(tmp_path):
  base = torch.randn(6, 5)
  tensors = collections.OrderedDict(
      f32=torch.randn(2, 3), transposed=torch.randn(4, 4).t(), strided=base[1:4, ::2],
      shared=base, bf16=torch.randn(3).bfloat16(), f16=torch.randn(3).half(),
      i64=torch.arange(6).reshape(2, 3), empty=torch.zeros(0, 3), scalar=torch.tensor(2.5),
      param=torch.nn.Parameter(torch.randn(2)))
  path = str(tmp_path / "t.pth")
  torch.save({"model": tensors, "args": argparse.Namespace(x=1)}, path)
  obj, skipped = read_torch_zip(path)
  assert skipped == ["argparse.Namespace"]
  for key, ref in tensors.items():
    ref = ref.detach()
    ref = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
    ours = obj["model"][key]
    assert ours.shape == ref.shape, key
    if key != "bf16":  # numpy has no bfloat16 of torch's: compared as float32 values
      assert ours.dtype == ref.dtype, (key, ours.dtype, ref.dtype)
    np.testing.assert_array_equal(np.asarray(ours, ref.dtype), ref, err_msg=key)


def test_restricted_reader_checks_storage_bounds(tmp_path):
  path = str(tmp_path / "t.pth")
  torch.save({"w": torch.randn(4, 4)}, path)
  broken = str(tmp_path / "broken.pth")
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
    for item in src.infolist():
      data = src.read(item)
      dst.writestr(item, data[:8] if re.search(r"/data/\d+$", item.filename) else data)
  with pytest.raises(NotACheckpointError, match="bytes for 16 elements"):
    read_torch_zip(broken)


# --- safetensors ----------------------------------------------------------------------------

def test_safetensors_files_interoperate_with_the_reference_library(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  import ml_dtypes
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16),
            "c": np.arange(4, dtype=np.int64), "d": np.zeros((0, 2), np.float32),
            "e": np.asarray([1.5, -2.0], ml_dtypes.bfloat16)}
  ours = str(tmp_path / "ours.safetensors")
  safetensors_io.write_safetensors(ours, arrays, metadata={"format": "pt"})
  for key, value in st.load_file(ours).items():
    assert value.dtype == arrays[key].dtype, key
    np.testing.assert_array_equal(value, arrays[key])
  theirs = str(tmp_path / "theirs.safetensors")
  st.save_file(arrays, theirs, metadata={"format": "np"})
  read, metadata = safetensors_io.read_safetensors(theirs)
  assert metadata == {"format": "np"} and sorted(read) == sorted(arrays)
  for key, value in read.items():
    assert value.dtype == arrays[key].dtype
    np.testing.assert_array_equal(value, arrays[key])


# --- bad input: one message with every problem, nothing written --------------------------------

@pytest.fixture(scope="module")
def timm_state(our_mae):
  """The timm / official names of our MAE (encoder + decoder), as numpy."""
  from mim_jax.convert.timm_vit import timm_state_dict_from_params
  return timm_state_dict_from_params(our_mae[1], patch_size=PATCH, channels=3, grid_hw=GRID)


def _import_fails(tmp_path, state, match, capsys=None) -> str:
  """Import through the CLI; asserts status 2, the message (on stderr too, given `capsys`),
  and that nothing was written."""
  path = str(tmp_path / "bad.safetensors")
  safetensors_io.write_safetensors(path, state)
  with pytest.raises(ValueError, match=match) as excinfo:
    import_checkpoint(path, num_heads=HEADS, decoder_num_heads=DEC_HEADS)
  out = str(tmp_path / "out")
  if capsys is not None:
    capsys.readouterr()
  assert cli(["import", path, out, "--num_heads", str(HEADS), "--decoder_num_heads",
              str(DEC_HEADS)]) == 2
  if capsys is not None:
    assert re.search(match, capsys.readouterr().err), match
  assert not os.path.exists(out) and not any("partial" in p for p in os.listdir(tmp_path))
  return str(excinfo.value)


def test_missing_key_is_named(tmp_path, timm_state, capsys):
  state = dict(timm_state)
  del state["blocks.1.mlp.fc2.bias"]
  _import_fails(tmp_path, state, r"missing keys: blocks\.1\.mlp\.fc2\.bias$", capsys)


def test_unexpected_shapes_are_named(tmp_path, timm_state, capsys):
  state = dict(timm_state)
  state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:-1]
  state["decoder_pred.bias"] = np.zeros(7, np.float32)
  message = _import_fails(tmp_path, state, "shape mismatches", capsys)
  assert "blocks.0.attn.qkv.weight: got (191, 64), expected (192, 64)" in message
  assert "decoder_pred.bias: got (7,), expected (192,)" in message


def test_unknown_keys_and_unsupported_features_are_named(tmp_path, timm_state, capsys):
  state = dict(timm_state, **{"blocks.0.attn.extra.weight": np.zeros(3, np.float32)})
  _import_fails(tmp_path, state, r"unknown keys: blocks\.0\.attn\.extra\.weight", capsys)
  state = dict(timm_state, dist_token=np.zeros((1, 1, WIDTH), np.float32),
               **{"head_dist.weight": np.zeros((2, WIDTH), np.float32)})
  message = _import_fails(tmp_path, state, "DeiT distillation token", capsys)
  assert "dist_token" in message and "head_dist.weight" in message


def test_a_different_architecture_is_refused_with_its_keys(tmp_path, capsys):
  resnet = {"conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
            "bn1.weight": np.ones(64, np.float32), "fc.weight": np.zeros((10, 64), np.float32)}
  message = _import_fails(tmp_path, resnet, "not a ViT checkpoint of a known layout", capsys)
  assert "conv1.weight" in message and "fc.weight" in message


@pytest.mark.parametrize("content", [
    b"", b"hello, this is text\n", bytes(range(256)) * 8, b"PK\x03\x04 truncated zip",
    json.dumps({"cls_token": [0.0]}).encode(),
], ids=["empty", "text", "binary", "truncated_zip", "json"])
def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, content, capsys):
  path = str(tmp_path / "weights.pth")
  with open(path, "wb") as f:
    f.write(content)
  with pytest.raises(NotACheckpointError, match=r"weights\.pth is not a PyTorch checkpoint"):
    read_state_dict(path)
  capsys.readouterr()
  assert cli(["import", path, str(tmp_path / "out"), "--num_heads", str(HEADS)]) == 2
  assert "weights.pth is not a PyTorch checkpoint" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")


def test_a_zip_that_is_not_a_checkpoint_is_refused(tmp_path):
  path = str(tmp_path / "archive.pth")
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("readme.txt", "not weights")
  with pytest.raises(NotACheckpointError, match="zip archive but not a PyTorch checkpoint"):
    read_state_dict(path)


def test_a_truncated_safetensors_file_is_refused(tmp_path, timm_state):
  path = str(tmp_path / "w.safetensors")
  safetensors_io.write_safetensors(path, timm_state)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(NotACheckpointError, match="does not fit its byte range"):
    read_state_dict(path)


# --- the command line -----------------------------------------------------------------------

def test_cli_import_inspect_reconstruct(tmp_path, our_mae_dir):
  from PIL import Image
  export_weights(our_mae_dir, str(tmp_path / "mae"), "mae")
  checkpoint = str(tmp_path / "mae" / "model.safetensors")
  out = str(tmp_path / "imported")
  # The real entry point once, in a fresh process.
  result = subprocess.run(
      [sys.executable, "-m", "mim_jax.convert", "import", checkpoint, out, "--num_heads",
       str(HEADS), "--decoder_num_heads", str(DEC_HEADS)], capture_output=True, text=True,
      check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr
  assert "--config.init_from=" in result.stdout
  assert cli(["import", checkpoint, out, "--num_heads", "4"]) == 2  # exists: no overwrite

  buffer = io.StringIO()
  sys_stdout, sys.stdout = sys.stdout, buffer
  try:
    assert cli(["inspect", checkpoint]) == 0
  finally:
    sys.stdout = sys_stdout
  assert "decoder_pred.weight: (192, 32)" in buffer.getvalue()
  assert "imports as timm" in buffer.getvalue()

  paths = []
  for i, size in enumerate([(40, 50), (32, 32)]):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), np.uint8)).save(
        paths[-1])
  png = str(tmp_path / "recon.png")
  assert cli(["reconstruct", out, *paths, "--out", png, "--seed", "1"]) == 0
  picture = np.asarray(Image.open(png))
  s = viz.upscale_factor(IMAGE, IMAGE)
  side = s * IMAGE
  assert picture.shape == (2 * side + viz.GAP, 4 * side + 3 * viz.GAP, 3)
  # The second image is at the model's size (no resize): its first panel is its pixels
  # (the weights' normalisation undone, to rounding), and in the masked panel each patch is
  # grey (masked) or the original, as is the reconstruction + visible panel where visible.
  row = picture[side + viz.GAP:]
  original, masked, _, pasted = (row[:, c * (side + viz.GAP):c * (side + viz.GAP) + side]
                                 for c in range(4))
  pixels = np.asarray(Image.open(paths[1])).astype(int)
  np.testing.assert_allclose(original.astype(int), np.kron(pixels, np.ones((s, s, 1))), atol=1)
  grey, tile = np.uint8(round(viz.MASK_GREY * 255)), PATCH * s
  hidden = 0
  for y in range(0, side, tile):
    for x in range(0, side, tile):
      where = np.s_[y:y + tile, x:x + tile]
      if (masked[where] == grey).all():
        hidden += 1
      else:
        np.testing.assert_array_equal(masked[where], original[where])
        np.testing.assert_array_equal(pasted[where], original[where])
  assert hidden == round(0.75 * GRID[0] * GRID[1])  # the weights' mask ratio


def test_learned_position_tables_feed_the_probe_and_knn(tmp_path, our_mae, timm_state):
  """An import that keeps a learned table (posemb='learn') is evaluated with that table: the
  linear probe loads it and k-NN features use it, instead of failing or silently ignoring it."""
  from mim_jax.evaluate import frozen
  from mim_jax.evaluate.linear_probe import LinearProbe
  from mim_jax.models.heads import encoder_features
  from mim_jax.models.vit import sincos_2d
  from mim_jax.weights import pretrained
  encoder_keys = {k: v for k, v in timm_state.items()
                  if not k.startswith("decoder") and k != "mask_token"}
  table = sincos_2d(WIDTH, GRID, cls_token=True)[None]
  encoder_keys["pos_embed"] = table + 0.05 * np.random.default_rng(0).standard_normal(
      table.shape).astype(np.float32)
  path = str(tmp_path / "encoder.safetensors")
  safetensors_io.write_safetensors(path, encoder_keys)
  directory = import_checkpoint(path, num_heads=HEADS, posemb="learn").write(
      str(tmp_path / "imported"))
  assert pretrained.encoder_posemb(directory) == "learn"
  assert pretrained.encoder_posemb("random") == pretrained.encoder_posemb("") == "sincos"

  config = recipes.linprobe_recipe()
  config.update(init_from=directory, image_size=(IMAGE, IMAGE))
  config.classifier.num_classes = NUM_CLASSES
  config = pretrained.adopt_encoder_config(config)
  probe = LinearProbe(config)
  params, extra = probe.init(jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 3), np.float32))
  _, extra = probe.load_pretrained(params, extra)
  np.testing.assert_array_equal(extra["encoder"]["pos_embed"], encoder_keys["pos_embed"][0])

  monitor = frozen.KnnMonitor(config)
  assert monitor.encoder.posemb == "learn"
  images, _ = _images()
  learned = encoder_features(monitor.encoder, extra["encoder"], images, pool="cls")
  fixed = monitor.encoder.clone(parent=None, posemb="sincos")
  assert not np.allclose(learned, encoder_features(fixed, extra["encoder"], images, pool="cls"))


# --- what the command line writes, and what it refuses before writing -----------------------

@pytest.mark.parametrize("fmt", ["timm", "hf"])
def test_inspect_describes_every_export_format(tmp_path, our_mae_dir, fmt, capsys):
  """`inspect` imports what `export` writes: an encoder-only timm export (no decoder head count
  to give) and an HF directory whose config.json records the head counts."""
  export_weights(our_mae_dir, str(tmp_path / fmt), fmt)
  assert cli(["inspect", str(tmp_path / fmt)]) == 0
  out = capsys.readouterr().out
  assert "does not import" not in out
  assert f"width {WIDTH}, depth {DEPTH}" in out


def test_inspect_describes_our_own_exports_and_workdirs(tmp_path, our_mae_dir, our_mae,
                                                        capsys):
  """`inspect` on mim_jax's own weights said "a directory without config.json: pass the
  checkpoint file itself". It now describes an export directory and a training workdir (the
  arrays `read_weights` reads, shapes and dtypes from their metadata)."""
  assert cli(["inspect", our_mae_dir]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"{our_mae_dir}: a mim_jax export directory, method mae: encoder ")
  assert (f"(width {WIDTH}, depth {DEPTH}, patch {PATCH}), images {IMAGE}x{IMAGE}x3, "
          "positions sincos, parts ['decoder', 'encoder']") in out.splitlines()[0], out
  assert f"  encoder['cls_token']: (1, 1, {WIDTH}) float32" in out
  assert "  decoder['mask_token']" in out
  assert cli(["inspect", our_mae_dir, "--key", "model"]) == 2  # a key picks a file's entry
  err = capsys.readouterr()
  assert not err.out and "--key=model: a key picks the entry of a checkpoint file" in err.err
  import orbax.checkpoint as ocp
  info, params = our_mae
  workdir = tmp_path / "run"  # as train.run leaves it
  state = {"step": np.int32(3), "params": params, "extra": {},
           "opt_state": {"mu": jax.tree.map(np.zeros_like, params)}}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(workdir / "checkpoints" / "3" / "state"), state)
  checkpointer.wait_until_finished()
  (workdir / "config.json").write_text(json.dumps(info["config"]))
  assert cli(["inspect", str(workdir)]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"{workdir}: a mim_jax training workdir (checkpoint 3), method mae")
  for part in ("encoder", "decoder"):  # the optimizer state is not listed
    listed = [line for line in out.splitlines()[1:] if line.startswith(f"  {part}[")]
    assert len(listed) == len(jax.tree.leaves(params[part])), out
  assert len(out.splitlines()) == 1 + len(jax.tree.leaves(params))
  # A run that releases no encoder (a tokenizer's net and codebook): its parts, listed.
  tokenizer = tmp_path / "tokenizer_run"
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tokenizer / "checkpoints" / "2" / "state"),
                    {"step": np.int32(2), "params": {"net": params["decoder"]}, "extra": {}})
  checkpointer.wait_until_finished()
  (tokenizer / "config.json").write_text(json.dumps(dict(info["config"], method="tok")))
  assert cli(["inspect", str(tokenizer)]) == 0
  out = capsys.readouterr().out
  assert out.splitlines()[0] == (f"{tokenizer}: a mim_jax training workdir (checkpoint 2), "
                                 "method tok, parts ['net']"), out


def test_timm_architecture_names_are_registered_in_timm():
  """create_model("local-dir:...") looks the architecture name up before model_args apply, so
  every name an export can write must be one timm registers (there is no vit_huge_patch16)."""
  from mim_jax.convert.exporter import timm_architecture
  if timm is None:
    pytest.skip("timm is not installed")
  names = {timm_architecture(width, patch) for width in (64, 192, 384, 768, 1024, 1280, 2048)
           for patch in (4, 8, 14, 16, 32)}
  assert names <= set(timm.list_models("vit_*"))
  assert timm_architecture(1280, 16) == "vit_huge_patch14_224"
  assert timm_architecture(384, 8) == "vit_small_patch8_224"
  assert timm_architecture(96, 4) == "vit_tiny_patch16_224"  # nearest published width


def test_a_grayscale_export_imports_with_one_normalisation_value_per_channel(tmp_path):
  """A 1-channel MAE exported and imported again: model.json carried ImageNet's three
  mean / std values beside channels=1, so features and reconstruct failed on the import with
  a broadcasting error. The import now writes one value per channel (ImageNet's averaged,
  as the timm export does); both read it."""
  from PIL import Image

  from mim_jax import features
  config = _our_config()
  config.channels = 1
  model = mae.build_model(config)
  images, _ = _images(channels=1)
  params = model.init({"params": jax.random.key(3), "masking": jax.random.key(4)}, images)
  ours = write_weights(str(tmp_path / "ours"), params["params"],
                       info_from_config(config.to_dict()))
  export_weights(ours, str(tmp_path / "mae"), "mae")
  imported = str(tmp_path / "imported")
  assert cli(["import", str(tmp_path / "mae" / "model.safetensors"), imported, "--num_heads",
              str(HEADS), "--decoder_num_heads", str(DEC_HEADS)]) == 0
  info = json.loads((tmp_path / "imported" / "model.json").read_text())
  assert info["channels"] == 1
  assert len(info["config"]["data"]["mean"]) == len(info["config"]["data"]["std"]) == 1
  enc = features.load(imported)
  pixels = np.random.default_rng(0).integers(0, 256, (2, IMAGE, IMAGE), np.uint8)
  assert features.extract(enc, pixels)["cls_block0"].shape == (2, WIDTH)
  path = str(tmp_path / "gray.png")
  Image.fromarray(pixels[0]).save(path)
  assert cli(["reconstruct", imported, path, "--out", str(tmp_path / "r.png")]) == 0


def test_sixteen_bit_images_reconstruct_on_their_own_scale(tmp_path):
  """reconstruct divided every decoded image by 255, but 16-bit files decode as floats in
  [0, 1]: such an image came out nearly black. The same picture as 8 and as 16 bits now
  normalises alike."""
  from PIL import Image

  from mim_jax.convert.reconstructions import load_images
  pixels = np.random.default_rng(0).integers(0, 256, (IMAGE, IMAGE), np.uint8)
  Image.fromarray(pixels).save(tmp_path / "8.png")
  Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "16.png")  # 255 -> 65535
  eight, sixteen = load_images([str(tmp_path / "8.png"), str(tmp_path / "16.png")],
                               (IMAGE, IMAGE), 1, (0.5,), (0.25,))
  np.testing.assert_allclose(sixteen, eight, atol=1e-5)
  assert abs(float(eight.mean()) - (pixels.mean() / 255 - 0.5) / 0.25) < 1e-4


def test_import_replaces_only_an_earlier_export(tmp_path, our_mae_dir, capsys):
  """`import --overwrite` deleted whatever directory it named: one with other files, or the
  one holding the checkpoint being imported. It now replaces an earlier export only, and
  every such refusal comes before the checkpoint is read."""
  export_weights(our_mae_dir, str(tmp_path / "mae"), "mae")
  checkpoint = str(tmp_path / "mae" / "model.safetensors")
  heads = ["--num_heads", str(HEADS), "--decoder_num_heads", str(DEC_HEADS)]
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "notes.txt").write_text("keep")
  assert cli(["import", checkpoint, str(notes), "--overwrite", *heads]) == 2
  assert "holds notes.txt" in capsys.readouterr().err
  assert (notes / "notes.txt").read_text() == "keep"
  (notes / "model.json").write_text("{}")  # a model.json alone does not make an export
  assert cli(["import", checkpoint, str(notes), "--overwrite", *heads]) == 2
  assert "not a mim_jax export directory (it holds notes.txt)" in capsys.readouterr().err
  # The folder holding the checkpoint (an export with model.json beside it).
  export = tmp_path / "export"
  assert cli(["import", checkpoint, str(export), *heads]) == 0
  beside = export / "checkpoint.safetensors"
  beside.write_bytes((tmp_path / "mae" / "model.safetensors").read_bytes())
  assert cli(["import", str(beside), str(export), "--overwrite", *heads]) == 2
  assert "(it holds checkpoint.safetensors)" in capsys.readouterr().err
  inside = export / "params" / "checkpoint.safetensors"  # deeper: only its path tells
  beside.rename(inside)
  assert cli(["import", str(inside), str(export), "--overwrite", *heads]) == 2
  assert "holds the checkpoint being imported" in capsys.readouterr().err
  assert inside.exists()
  # An earlier export is replaced; a file is refused.
  assert cli(["import", checkpoint, str(export), "--overwrite", *heads]) == 0
  assert not inside.exists() and (export / "model.json").exists()
  assert cli(["import", checkpoint, str(notes / "notes.txt"), *heads]) == 2
  assert "is a file" in capsys.readouterr().err
  # Head counts and image sizes that cannot be: refused, nothing written.
  for extra, says in ((["--num_heads", "-2"], "num_heads=-2: expected a positive"),
                      (["--decoder_num_heads", "0"], "decoder_num_heads=0: expected a positive"),
                      (["--image_size", "0"], "expected positive sides")):
    assert cli(["import", checkpoint, str(tmp_path / "bad"), *heads, *extra]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_export_replaces_only_an_earlier_export(tmp_path, our_mae_dir, our_mae, capsys):
  """export wrote into any directory: an earlier export's model.safetensors was replaced
  silently, and its config.json stayed beside weights of another format; a refused HF
  export left an empty folder."""
  out = tmp_path / "out"
  assert cli(["export", our_mae_dir, str(out), "--format=timm"]) == 0
  assert (out / "config.json").exists()
  assert cli(["export", our_mae_dir, str(out), "--format=mae"]) == 2
  assert "pass --overwrite" in capsys.readouterr().err
  assert cli(["export", our_mae_dir, str(out), "--format=mae", "--overwrite"]) == 0
  assert sorted(os.listdir(out)) == ["model.safetensors"]  # timm's config.json went
  (out / "notes.txt").write_text("keep")
  assert cli(["export", our_mae_dir, str(out), "--format=timm", "--overwrite"]) == 2
  assert "notes.txt, which no export writes" in capsys.readouterr().err
  info, params = our_mae
  encoder = tmp_path / "encoder_only"
  write_weights(str(encoder), {"encoder": params["encoder"]}, info)
  assert cli(["export", str(encoder), str(tmp_path / "hf"), "--format=hf"]) == 2
  assert "has no MAE decoder" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists()


def test_reconstruct_refuses_an_out_it_cannot_write_before_the_model_loads(tmp_path, capsys,
                                                                           monkeypatch):
  """An --out under a regular file, or in a read-only folder, failed after the reconstructions
  had been computed, naming the parent folder (`File exists`) or a temporary file. Now one line
  naming --out before the model loads (absent here: it is never reached)."""
  from PIL import Image

  from mim_jax.training import checkpoint
  image = str(tmp_path / "a.png")
  Image.fromarray(np.zeros((IMAGE, IMAGE, 3), np.uint8)).save(image)
  afile, readonly = tmp_path / "afile", tmp_path / "readonly"
  afile.write_text("")
  readonly.mkdir()
  real_open = open

  def read_only_open(path, *args, **kwargs):  # root ignores chmod: fail as a read-only mount
    if str(path).startswith(str(readonly) + os.sep):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(checkpoint, "open", read_only_open, raising=False)
  for out, says in ((afile / "r.png", f"{afile} is a file, not a folder"),
                    (readonly / "r.png", f"{readonly} cannot be written (Read-only file")):
    assert cli(["reconstruct", str(tmp_path / "absent"), image, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out={str(out)!r} is invalid: a file in a folder"), err
    assert says in err and len(err.strip().splitlines()) == 1, err
  assert os.listdir(readonly) == []


def test_reconstruct_refuses_bad_input_in_one_line(tmp_path, our_mae_dir, capsys):
  """A mask ratio outside [0, 1) was a JAX traceback, an --out that is not a .png file an
  IsADirectoryError after the computation, a file that is not an image a PIL traceback."""
  from PIL import Image
  image = str(tmp_path / "a.png")
  Image.fromarray(np.zeros((IMAGE, IMAGE, 3), np.uint8)).save(image)
  for extra, says in ((["--mask_ratio", "1.5", "--out", str(tmp_path / "r.png")],
                       "--mask_ratio=1.5: expected"),
                      (["--out", str(tmp_path)], "expected the path of a .png file")):
    with pytest.raises(SystemExit) as exited:
      cli(["reconstruct", our_mae_dir, image, *extra])
    assert exited.value.code == 2 and says in capsys.readouterr().err
  with pytest.raises(SystemExit) as exited:  # before the model loads
    cli(["reconstruct", our_mae_dir, str(tmp_path / "absent.png"), "--out",
         str(tmp_path / "r.png")])
  assert exited.value.code == 2 and "no such image file" in capsys.readouterr().err
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png")
  assert cli(["reconstruct", our_mae_dir, str(broken), "--out", str(tmp_path / "r.png")]) == 2
  assert "broken.png: not an image" in capsys.readouterr().err
  assert not (tmp_path / "r.png").exists()
