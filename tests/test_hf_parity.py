"""Parity with an independent implementation: HF transformers' ViTMAEForPreTraining (PyTorch).

A small randomly initialised HF model is converted with `mim_jax.convert.params_from_hf_vitmae`
and both models run on the same images and the same masking noise. Masks and ids_restore must
be identical, reconstructions and losses equal to float32 round-off. Relative error here is
max|ours - hf| / max|hf| over the whole array (for the scalar loss: |ours - hf| / |hf|).

Also: the reverse converter, strict key/shape checking, and parameter counts of the official
ViT-B/16 and ViT-L/16 MAE configs against HF's modules (built on the meta device: no memory).
"""

from __future__ import annotations

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mim_jax import registry  # noqa: E402
from mim_jax.convert import (  # noqa: E402  (after the skips, so no torch means a clean skip)
  expected_hf_shapes,
  hf_vitmae_state_dict_from_params,
  params_from_hf_vitmae,
)
from mim_jax.methods import mae  # noqa: E402
from mim_jax.models.decoders import MAEDecoder  # noqa: E402
from mim_jax.models.vit import Block, ViTEncoder  # noqa: E402

from conftest import rel_err  # noqa: E402

IMAGE, PATCH = 32, 8
GRID = (IMAGE // PATCH, IMAGE // PATCH)
NUM_PATCHES = GRID[0] * GRID[1]
WIDTH, DEPTH, HEADS, MLP = 64, 2, 4, 256
DEC_WIDTH, DEC_DEPTH, DEC_HEADS, DEC_MLP = 32, 2, 4, 128
MASK_RATIO = 0.75
BATCH = 3
# float32 round-off through ~4 blocks of matmuls, summed in different orders by XLA and ATen.
REL_TOL = 1e-5


def _hf_config(channels: int, **overrides):
  """The HF config matching `_our_model`: exact GELU and LayerNorm eps 1e-6 as the official MAE
  (HF's default eps is 1e-12)."""
  kwargs = dict(
      image_size=IMAGE, patch_size=PATCH, num_channels=channels, hidden_size=WIDTH,
      num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
      decoder_hidden_size=DEC_WIDTH, decoder_num_hidden_layers=DEC_DEPTH,
      decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=DEC_MLP,
      hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, mask_ratio=MASK_RATIO,
      norm_pix_loss=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  kwargs.update(overrides)
  return transformers.ViTMAEConfig(**kwargs)


@torch.no_grad()
def _fill_fixed_posembs(model) -> None:
  """Makes HF's fixed sin-cos buffers hold what HF's own init code computes.

  transformers 5.x leaves both all-zero in a model built from scratch: the encoder's init is
  skipped once the patch projection is flagged initialised, and the decoder's is zeroed by
  `_init_weights` (pretrained checkpoints store the real values, so loading is unaffected).
  HF's own `initialize_weights` methods are called here, so the test still compares against
  HF's sin-cos code, not ours.
  """
  emb, dec = model.vit.embeddings, model.decoder
  if not bool(emb.position_embeddings.abs().sum()):
    emb.patch_embeddings.projection.__dict__.pop("_is_hf_initialized", None)
    emb.initialize_weights()
  if not bool(dec.decoder_pos_embed.abs().sum()):
    dec.initialize_weights(emb.patch_embeddings.num_patches)
  assert bool(emb.position_embeddings.abs().sum()) and bool(dec.decoder_pos_embed.abs().sum())


@torch.no_grad()
def _randomize(model) -> None:
  """Random values for every trainable weight, including those HF initialises to 0 or 1
  (biases, LayerNorm scales, tokens), so that a swapped or transposed tensor cannot hide."""
  for name, p in model.named_parameters():
    if not p.requires_grad:  # the fixed position embeddings
      continue
    if name.endswith(("cls_token", "mask_token")):
      p.copy_(0.5 * torch.randn_like(p))
    elif p.ndim >= 2:  # Linear / Conv2d weights: unit-variance activations
      p.copy_(torch.randn_like(p) / float(np.sqrt(p[0].numel())))
    elif "norm" in name and name.endswith("weight"):
      p.copy_(1.0 + 0.2 * torch.randn_like(p))
    else:
      p.copy_(0.2 * torch.randn_like(p))


def _hf_model(channels: int, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.ViTMAEForPreTraining(_hf_config(channels))
  _fill_fixed_posembs(model)
  _randomize(model)
  return model.eval().float()


def _our_model(channels: int) -> mae.MaskedAutoencoder:
  encoder = ViTEncoder(image_size=(IMAGE, IMAGE), patch_size=PATCH, width=WIDTH, depth=DEPTH,
                       num_heads=HEADS, mlp_dim=MLP, channels=channels)
  decoder = MAEDecoder(grid_hw=GRID, out_dim=PATCH * PATCH * channels, width=DEC_WIDTH,
                       depth=DEC_DEPTH, num_heads=DEC_HEADS, mlp_ratio=DEC_MLP // DEC_WIDTH)
  return mae.MaskedAutoencoder(encoder=encoder, decoder=decoder, mask_ratio=MASK_RATIO)


def _convert(state_dict, channels: int):
  return params_from_hf_vitmae(state_dict, patch_size=PATCH, channels=channels,
                               encoder_depth=DEPTH, decoder_depth=DEC_DEPTH)


def _inputs(channels: int, seed: int = 1):
  """Images NHWC (ours) and NCHW (HF) holding the same pixels, and masking noise [B, N]."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((BATCH, IMAGE, IMAGE, channels)).astype(np.float32)
  noise = rng.random((BATCH, NUM_PATCHES)).astype(np.float32)
  return images, np.ascontiguousarray(images.transpose(0, 3, 1, 2)), noise


@torch.no_grad()
def _hf_forward(model, images_nchw, noise, norm_pix: bool):
  model.config.norm_pix_loss = norm_pix
  out = model(pixel_values=torch.from_numpy(images_nchw), noise=torch.from_numpy(noise))
  return types.SimpleNamespace(logits=out.logits.numpy(), loss=float(out.loss),
                               mask=out.mask.numpy(), ids_restore=out.ids_restore.numpy())


def _uses_legacy_names(state_dict) -> bool:
  """transformers < 5 names its modules `vit.encoder.layer.{i}.attention.attention.query` etc."""
  return any(k.startswith("vit.encoder.layer.") for k in state_dict)


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb", "grayscale"])
def case(request):
  """One HF model, its conversion, and both forwards on shared inputs (computed once)."""
  channels = request.param
  hf_model = _hf_model(channels)
  images, images_nchw, noise = _inputs(channels)
  hf = {norm_pix: _hf_forward(hf_model, images_nchw, noise, norm_pix) for norm_pix in (False, True)}

  params = _convert(hf_model.state_dict(), channels)
  model = _our_model(channels)
  pred, info = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))(
      params, images, noise)
  losses = {norm_pix: float(mae.mae_loss(pred, images, info.mask, PATCH, norm_pix))
            for norm_pix in (False, True)}
  latent = model.encoder.apply({"params": params["encoder"]}, images, ids_keep=info.ids_keep)[0]
  with torch.no_grad():
    hf_latent = hf_model.vit(pixel_values=torch.from_numpy(images_nchw),
                             noise=torch.from_numpy(noise)).last_hidden_state.numpy()
  return types.SimpleNamespace(
      channels=channels, hf_model=hf_model, hf=hf, params=params, images=images, noise=noise,
      pred=np.asarray(pred), info=jax.tree.map(np.asarray, info), losses=losses,
      latent=np.asarray(latent), hf_latent=hf_latent)


def test_masks_and_ids_restore_identical(case):
  hf = case.hf[False]
  np.testing.assert_array_equal(case.info.mask, hf.mask)
  np.testing.assert_array_equal(case.info.ids_restore, hf.ids_restore)
  assert case.info.mask.sum() == BATCH * (NUM_PATCHES - int(NUM_PATCHES * (1 - MASK_RATIO)))


def test_encoder_latents_match(case):
  """The encoder alone (cls + visible tokens after the final norm): localises a failure."""
  assert case.latent.shape == case.hf_latent.shape
  assert rel_err(case.latent, case.hf_latent) < REL_TOL


def test_reconstructions_match(case):
  hf = case.hf[False]
  assert case.pred.shape == hf.logits.shape == (BATCH, NUM_PATCHES, PATCH * PATCH * case.channels)
  err = rel_err(case.pred, hf.logits)
  assert err < REL_TOL, err
  # norm_pix_loss only changes the target: the HF logits must not depend on it.
  np.testing.assert_array_equal(case.hf[True].logits, hf.logits)


@pytest.mark.parametrize("norm_pix", [False, True], ids=["pixels", "norm_pix"])
def test_losses_match(case, norm_pix):
  hf = case.hf[norm_pix]
  assert rel_err(case.losses[norm_pix], hf.loss) < REL_TOL, (case.losses[norm_pix], hf.loss)
  # Our loss on HF's own outputs isolates the target/normalisation code from the model.
  ours_on_hf = float(mae.mae_loss(jnp.asarray(hf.logits), case.images, jnp.asarray(hf.mask),
                                  PATCH, norm_pix))
  assert rel_err(ours_on_hf, hf.loss) < REL_TOL, (ours_on_hf, hf.loss)


@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["unit", "small"])
def test_block_matches_hf_layer(case, scale):
  """One encoder block on its own. At activations of std 1e-3 the LayerNorm eps (1e-6 here,
  HF's default 1e-12) changes outputs ~2x; at unit scale it shifts them by only ~1e-6, below
  what the whole-model comparison resolves."""
  hf_model = case.hf_model
  hf_layer = (hf_model.vit.layers if hasattr(hf_model.vit, "layers")
              else hf_model.vit.encoder.layer)[0]
  x = (scale * np.random.default_rng(5).standard_normal((BATCH, 5, WIDTH))).astype(np.float32)
  with torch.no_grad():
    ref = hf_layer(torch.from_numpy(x))
  ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
  block = Block(num_heads=HEADS, mlp_dim=MLP)
  ours = block.apply({"params": case.params["encoder"]["transformer"]["blocks_0"]}, x)
  assert rel_err(ours, ref) < REL_TOL


def test_state_dict_round_trip_is_exact(case):
  hf_state = {k: v.numpy() for k, v in case.hf_model.state_dict().items()}
  back = hf_vitmae_state_dict_from_params(case.params, patch_size=PATCH, channels=case.channels,
                                          grid_hw=GRID,
                                          legacy_names=_uses_legacy_names(hf_state))
  assert sorted(back) == sorted(hf_state)
  for key, value in hf_state.items():
    assert back[key].dtype == np.float32 and back[key].shape == value.shape, key
    if key.endswith(("position_embeddings", "decoder_pos_embed")):
      np.testing.assert_allclose(back[key], value, rtol=0, atol=1e-6, err_msg=key)
    else:
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_legacy_key_names_convert_identically(case):
  legacy = hf_vitmae_state_dict_from_params(case.params, patch_size=PATCH, channels=case.channels,
                                            grid_hw=GRID, legacy_names=True)
  # The transformers 4.x / Hub layout of one block.
  assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
  assert "decoder.decoder_layers.0.output.dense.bias" in legacy
  params = _convert(legacy, case.channels)
  jax.tree.map(np.testing.assert_array_equal, params, case.params)


def test_our_params_load_into_hf_and_match():
  """The reverse direction end to end: our init -> HF state dict -> HF forward == ours."""
  channels = 3
  model = _our_model(channels)
  images, images_nchw, noise = _inputs(channels, seed=2)
  params = jax.jit(lambda r: model.init({"params": r, "masking": r}, images)["params"])(
      jax.random.key(3))
  # Non-trivial biases and norm scales (our init makes them 0 and 1); numpy, so that no
  # per-shape jax kernels get compiled.
  rng = np.random.default_rng(4)
  params = jax.tree.map(
      lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)
  hf_model = transformers.ViTMAEForPreTraining(_hf_config(channels)).eval()
  state = hf_vitmae_state_dict_from_params(
      params, patch_size=PATCH, channels=channels, grid_hw=GRID,
      legacy_names=_uses_legacy_names(hf_model.state_dict()))
  hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  hf = _hf_forward(hf_model, images_nchw, noise, norm_pix=True)
  pred, info = jax.jit(lambda p, x, n: model.apply({"params": p}, x, noise=n))(
      params, images, noise)
  np.testing.assert_array_equal(np.asarray(info.mask), hf.mask)
  assert rel_err(pred, hf.logits) < REL_TOL
  loss = float(mae.mae_loss(pred, images, info.mask, PATCH, True))
  assert rel_err(loss, hf.loss) < REL_TOL


# --- strict checking -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rgb_state():
  state = _hf_model(3).state_dict()
  if _uses_legacy_names(state):  # one naming for the key-specific tests below
    params = _convert(state, 3)
    return hf_vitmae_state_dict_from_params(params, patch_size=PATCH, channels=3, grid_hw=GRID)
  return {k: v.numpy() for k, v in state.items()}


def _raises(state, match, **overrides):
  kwargs = dict(patch_size=PATCH, channels=3, encoder_depth=DEPTH, decoder_depth=DEC_DEPTH)
  kwargs.update(overrides)
  with pytest.raises(ValueError, match=match) as excinfo:
    params_from_hf_vitmae(state, **kwargs)
  return str(excinfo.value)


def test_missing_key_is_named(rgb_state):
  state = dict(rgb_state)
  del state["vit.layers.1.mlp.fc2.bias"]
  _raises(state, r"missing keys: vit\.layers\.1\.mlp\.fc2\.bias$")


def test_wrong_shape_is_named(rgb_state):
  state = dict(rgb_state, **{"decoder.decoder_pred.weight":
                             rgb_state["decoder.decoder_pred.weight"][:-1]})
  _raises(state, re.escape("decoder.decoder_pred.weight: got (191, 32), expected (192, 32)"))


def test_unknown_key_is_named(rgb_state):
  state = dict(rgb_state, **{"vit.pooler.dense.weight": np.zeros((WIDTH, WIDTH), np.float32)})
  _raises(state, r"unknown keys: vit\.pooler\.dense\.weight")


def test_every_problem_is_listed_at_once(rgb_state):
  state = dict(rgb_state)
  del state["decoder.mask_token"]
  state["vit.layers.0.attention.k_proj.bias"] = np.zeros((WIDTH + 1,), np.float32)
  message = _raises(state, "missing keys")
  assert "decoder.mask_token" in message
  assert "vit.layers.0.attention.k_proj.bias: got (65,), expected (64,)" in message


def test_wrong_depth_or_channels_raise(rgb_state):
  message = _raises(rgb_state, r"unknown keys: vit\.layers\.1\.", encoder_depth=1)
  assert "decoder" not in message.split("unknown keys:")[1]
  _raises(rgb_state, r"missing keys: decoder\.decoder_layers\.2\.", decoder_depth=3)
  _raises(rgb_state, re.escape("vit.embeddings.patch_embeddings.projection.weight: got "
                               "(64, 3, 8, 8), expected (64, 1, 8, 8)"), channels=1)


def test_position_embeddings_must_be_ours(rgb_state):
  state = dict(rgb_state)
  state["vit.embeddings.position_embeddings"] = np.zeros_like(
      state["vit.embeddings.position_embeddings"])
  _raises(state, r"vit\.embeddings\.position_embeddings differs")
  state = dict(rgb_state)
  pos = state["decoder.decoder_pos_embed"]
  half = pos.shape[-1] // 2  # the [sin_h|cos_h|sin_w|cos_w] layout, before HF's h/w swap
  state["decoder.decoder_pos_embed"] = np.concatenate([pos[..., half:], pos[..., :half]], -1)
  _raises(state, r"decoder\.decoder_pos_embed differs")


def test_converter_does_not_import_torch():
  import subprocess
  import sys
  code = "import sys, mim_jax.convert; assert 'torch' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


# --- parameter counts of the official configurations ----------------------------------------

# Trainable parameters (HF: requires_grad; ours: all params), i.e. without the fixed sin-cos
# position embeddings, which HF and the official code hold as frozen parameters.
OFFICIAL = {
    # variant: (width, depth, heads, encoder, decoder)
    "B/16": (768, 12, 12, 85_647_360, 26_008_320),
    "L/16": (1024, 24, 16, 303_099_904, 26_139_392),
}


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant", sorted(OFFICIAL))
def test_parameter_counts_match_hf(variant):
  width, depth, heads, encoder_count, decoder_count = OFFICIAL[variant]
  config = transformers.ViTMAEConfig(
      image_size=224, patch_size=16, num_channels=3, hidden_size=width, num_hidden_layers=depth,
      num_attention_heads=heads, intermediate_size=4 * width, decoder_hidden_size=512,
      decoder_num_hidden_layers=8, decoder_num_attention_heads=16, decoder_intermediate_size=2048)
  with torch.device("meta"):  # shapes only: no memory, no init cost
    hf_model = transformers.ViTMAEForPreTraining(config)
  count = lambda m, trainable: sum(p.numel() for p in m.parameters()
                                   if p.requires_grad == trainable)
  hf_encoder, hf_decoder = count(hf_model.vit, True), count(hf_model.decoder, True)

  ours_config = registry.base_config("mae")  # ImageNet defaults: 224 px, decoder 512 x 8 x 16
  ours_config.model.variant = variant
  model = mae.build_model(ours_config)
  params = jax.eval_shape(
      lambda r, x: model.init({"params": r, "masking": r}, x)["params"], jax.random.key(0),
      jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))

  assert (hf_encoder, hf_decoder) == (encoder_count, decoder_count)
  assert (_count(params["encoder"]), _count(params["decoder"])) == (encoder_count, decoder_count)
  # The frozen ones are exactly the two [1, 1 + 196, width] sin-cos tables.
  assert count(hf_model.vit, False) == 197 * width
  assert count(hf_model.decoder, False) == 197 * 512

  # And the converter's shape table is HF's state dict, key for key.
  state = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
  if _uses_legacy_names(state):
    from mim_jax.convert.hf_vitmae import _rename_legacy
    state = {_rename_legacy(k): v for k, v in state.items()}
  assert state == expected_hf_shapes(
      width=width, mlp_dim=4 * width, decoder_width=512, decoder_mlp_dim=2048, patch_size=16,
      channels=3, num_patches=196, encoder_depth=depth, decoder_depth=8)


# --- training dynamics: optimizer steps beside the PyTorch reference ----------------------------

STEPS, STEPS_PER_EPOCH, TRAIN_BATCH = 10, 5, 8
BLR, WARMUP_EPOCHS, EPOCHS, WEIGHT_DECAY = 0.05, 1.0, 2, 0.05


def official_mae_lr(it: int) -> float:
  """The official MAE pre-training's lr at iteration `it` (util/lr_sched.py), transcribed: the
  linear scaling rule, then per-iteration linear warmup and a half-cosine over fractional
  epochs, set before each step."""
  lr = BLR * TRAIN_BATCH / 256
  epoch = it / STEPS_PER_EPOCH
  if epoch < WARMUP_EPOCHS:
    return lr * epoch / WARMUP_EPOCHS
  return lr * 0.5 * (1.0 + np.cos(np.pi * (epoch - WARMUP_EPOCHS) / (EPOCHS - WARMUP_EPOCHS)))


def official_param_groups(model):
  """AdamW groups as the official MAE pre-training builds them (timm's weight-decay groups):
  no decay on 1-d parameters (biases, norms) and on the cls / mask tokens; the sin-cos position
  tables are frozen and not in any group."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    skip = p.ndim <= 1 or name.endswith(".bias") or name.endswith(("cls_token", "mask_token"))
    (no_decay if skip else decay).append(p)
  return [{"params": no_decay, "weight_decay": 0.0},
          {"params": decay, "weight_decay": WEIGHT_DECAY}]


def test_adamw_steps_follow_hf_vitmae_with_the_official_optimizer():
  """Ten AdamW steps of our MAE (our optimizer, schedule and train step) and of HF
  ViTMAEForPreTraining with torch AdamW set up as the official MAE pre-training, from the same
  weights on the same batches and masks: the loss curves and the final weights agree.

  Tolerance: the forward passes agree to ~1e-6 relative (float32 round-off, REL_TOL above);
  Adam divides by sqrt(v), so gradients that differ by round-off give updates that differ by
  about the same relative amount, and ten steps of lr <= 1.6e-3 move a weight by at most
  ~1.6e-2. Differences of 1e-4 relative in the losses and 1e-5 absolute in the weights are
  ~100x the round-off and ~1000x below what one mis-set detail (weight decay on a token, a
  shifted schedule, another beta) produces: each alone breaks this test.
  """
  hf_model = _hf_model(3, seed=2)
  hf_model.config.norm_pix_loss = True
  hf_model.train()
  params = _convert(hf_model.state_dict(), 3)

  config = registry.base_config("mae")
  config.update(image_size=(IMAGE, IMAGE), channels=3, global_batch_size=TRAIN_BATCH,
                num_epochs=EPOCHS)
  config.model.update(variant=f"mu/{PATCH}", width=WIDTH, depth=DEPTH, num_heads=HEADS,
                      mlp_dim=MLP)
  config.decoder.update(width=DEC_WIDTH, depth=DEC_DEPTH, num_heads=DEC_HEADS)
  config.optimizer.update(base_lr=BLR, warmup_epochs=WARMUP_EPOCHS, weight_decay=WEIGHT_DECAY,
                          b1=0.9, b2=0.95, eps=1e-8, min_lr=0.0)
  from mim_jax.training import optim
  from mim_jax.training import step as step_lib
  schedule = optim.learning_rate_schedule(config.optimizer, TRAIN_BATCH, STEPS_PER_EPOCH, STEPS)
  tx = optim.build_optimizer(config.optimizer, schedule, STEPS)
  method = registry.build_method(config)
  state = step_lib.init_train_state(method, tx, jax.random.key(0), (1, IMAGE, IMAGE, 3))
  state = state.replace(params=params, opt_state=tx.init(params))
  train_step = jax.jit(step_lib.make_train_step(method, tx, schedule))
  opt = torch.optim.AdamW(official_param_groups(hf_model), lr=0.0, betas=(0.9, 0.95), eps=1e-8)

  rng = np.random.default_rng(5)
  ours, theirs = [], []
  for it in range(STEPS):
    images = rng.standard_normal((TRAIN_BATCH, IMAGE, IMAGE, 3)).astype(np.float32)
    noise = rng.random((TRAIN_BATCH, NUM_PATCHES)).astype(np.float32)
    assert float(schedule(it)) == pytest.approx(official_mae_lr(it), rel=1e-6, abs=1e-12)
    state, metrics = train_step(state, {"image": images, mae.NOISE_KEY: noise},
                                jax.random.key(it))
    ours.append(float(metrics["loss"]))
    for group in opt.param_groups:
      group["lr"] = official_mae_lr(it)
    out = hf_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                   noise=torch.from_numpy(noise))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    theirs.append(float(out.loss))

  np.testing.assert_allclose(ours, theirs, rtol=1e-4)
  assert ours[-1] < ours[0]  # it trains
  final = _convert(hf_model.state_dict(), 3)
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(params)))
  assert moved > 1e-3  # the weights did move, so the comparison below means something
  ours_final = jax.device_get(state.params)
  for (path, a), b, start in zip(jax.tree_util.tree_leaves_with_path(ours_final),
                                 jax.tree.leaves(final), jax.tree.leaves(params)):
    a, b, start, name = np.asarray(a), np.asarray(b), np.asarray(start), jax.tree_util.keystr(path)
    if name.endswith("['qkv']['bias']"):
      # The key bias adds q.b to every logit of a query: softmax ignores it, its gradient is
      # exactly 0, and both frameworks update it by round-off that Adam scales up to ~lr per
      # step. Its movement is bounded instead of compared.
      keys = np.s_[a.shape[-1] // 3:2 * a.shape[-1] // 3]
      for x in (a, b):
        assert np.max(np.abs(x[keys] - start[keys])) <= sum(map(official_mae_lr, range(STEPS)))
      a, b = np.delete(a, keys), np.delete(b, keys)
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)


def official_layer_id(name: str, num_layers: int) -> int:
  """`get_layer_id_for_vit` of the official MAE / BEiT fine-tuning (util/lr_decay.py),
  transcribed; `num_layers` = blocks + 1, names in timm's layout."""
  if name in ("cls_token", "pos_embed"):
    return 0
  if name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks"):
    return int(name.split(".")[1]) + 1
  return num_layers


def test_layer_decay_scales_equal_the_official_parameter_groups():
  """Our per-parameter lr scale under layer-wise decay equals the official assignment
  (`param_groups_lrd`: scale = decay ** (num_layers - layer_id)) for every parameter of a
  fine-tuning ViT, matched through the converter's timm names."""
  from mim_jax.convert import timm_state_dict_from_params
  from mim_jax.evaluate.finetune import FineTune
  from mim_jax.training import optim
  config = registry.base_config("finetune")
  config.update(image_size=(IMAGE, IMAGE), channels=3, init_from="")
  config.model.update(variant=f"mu/{PATCH}", width=WIDTH, depth=DEPTH, num_heads=HEADS,
                      mlp_dim=MLP)
  config.classifier.update(pool="gap", num_classes=10)
  method = FineTune(config)
  params = jax.device_get(method.init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))[0])
  # Tag every leaf with its index, so a timm tensor names the leaf it came from.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  tagged = jax.tree_util.tree_unflatten(
      treedef, [np.full(np.shape(x), float(i), np.float32) for i, x in enumerate(leaves)])
  decay = 0.65
  scales = jax.tree_util.tree_leaves(optim.layer_decay_scales(tagged, decay))
  state = timm_state_dict_from_params(tagged, patch_size=PATCH, channels=3, grid_hw=GRID)
  num_layers = DEPTH + 1
  seen = set()
  for name, tensor in state.items():
    index = int(np.asarray(tensor).flat[0])
    assert np.all(np.asarray(tensor) == index), name  # one leaf per timm tensor
    want = decay ** (num_layers - official_layer_id(name, num_layers))
    assert float(np.max(scales[index])) == pytest.approx(want, rel=1e-6), name
    seen.add(index)
  # Every parameter but the encoder's final norm, unused under mean pooling (timm has none).
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  unused = {i for i, p in enumerate(paths) if "['transformer']['norm']" in p}
  assert len(unused) == 2 and seen == set(range(len(leaves))) - unused
