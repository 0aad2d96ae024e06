"""ViT encoder / MAE decoder: structure, parameter counts, position embeddings, cost."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config.errors import ConfigError
from mim_jax.methods import mae
from mim_jax.methods.base import TrainLength
from mim_jax.models import attention, vit

from conftest import tiny_config, tiny_mae_config  # noqa: E402


def _mae_config(variant, image_size=(224, 224), channels=3, decoder=(512, 8, 16), dtype="float32"):
  c = registry.base_config("mae")
  c.update(image_size=image_size, channels=channels)
  c.model.update(variant=variant, dtype=dtype)
  c.decoder.update(width=decoder[0], depth=decoder[1], num_heads=decoder[2])
  return c


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(config):
  model = mae.build_model(config)
  images = jax.ShapeDtypeStruct((1, *config.image_size, config.channels), jnp.float32)
  return jax.eval_shape(
      lambda r, x: model.init({"params": r, "masking": r}, x)["params"], jax.random.key(0), images)


# Official MAE (facebookresearch/mae models_mae.py) parameter counts. The official modules hold
# the fixed sin-cos position embeddings as frozen nn.Parameters; here they are constants, so
# the trainable counts below are the official totals minus (1 + N) * width for each embedding.
OFFICIAL_COUNTS = {
    # variant: (encoder incl. frozen pos_embed, decoder incl. frozen decoder_pos_embed)
    "B/16": (85_798_656, 26_109_184),   # total 111,907,840
    "L/16": (303_301_632, 26_240_256),  # total 329,541,888
}


@pytest.mark.parametrize("variant", sorted(OFFICIAL_COUNTS))
def test_parameter_counts_match_official_mae(variant):
  params = _abstract_params(_mae_config(variant))
  width = vit.VIT_SIZES[variant.split("/")[0]].width
  tokens = 1 + (224 // 16) ** 2
  enc_official, dec_official = OFFICIAL_COUNTS[variant]
  assert _count(params["encoder"]) + tokens * width == enc_official
  assert _count(params["decoder"]) + tokens * 512 == dec_official


def _official_sincos_2d(dim, grid_size):
  """An independent transcription of the official MAE get_2d_sincos_pos_embed (square grids)."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
  return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_matches_official_formula():
  ours = vit.sincos_2d(64, (14, 14), cls_token=True)
  np.testing.assert_allclose(ours, _official_sincos_2d(64, 14), atol=1e-6)


def test_sincos_non_square_grid_rows_and_columns():
  emb = vit.sincos_2d(32, (3, 5), cls_token=False).reshape(3, 5, 32)
  # First half depends on the column only, second half on the row only.
  np.testing.assert_allclose(emb[0, :, :16], emb[2, :, :16])
  np.testing.assert_allclose(emb[:, 0, 16:], emb[:, 4, 16:])
  assert not np.allclose(emb[0, 0, :16], emb[0, 1, :16])


@pytest.mark.parametrize("shape", [(2, 12, 20, 1), (2, 8, 8, 3)])
def test_patchify_round_trip(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  patches = vit.patchify(x, 4)
  assert patches.shape == (shape[0], (shape[1] // 4) * (shape[2] // 4), 16 * shape[3])
  np.testing.assert_array_equal(
      vit.unpatchify(patches, 4, (shape[1] // 4, shape[2] // 4), shape[3]), x)
  # Patch 1 is the second patch of the first row: rows 0..3, columns 4..7.
  np.testing.assert_array_equal(patches[:, 1].reshape(shape[0], 4, 4, shape[3]), x[:, :4, 4:8])


def test_non_square_grayscale_forward_shapes():
  config = _mae_config("mu/4", image_size=(12, 20), channels=1, decoder=(32, 1, 2))
  model = mae.build_model(config)
  images = jax.random.normal(jax.random.key(0), (3, 12, 20, 1))
  variables = jax.jit(model.init)({"params": jax.random.key(1), "masking": jax.random.key(2)},
                                  images)
  pred, info = jax.jit(model.apply)(variables, images, rngs={"masking": jax.random.key(3)})
  num_patches = 3 * 5
  assert pred.shape == (3, num_patches, 16)
  assert info.mask.shape == (3, num_patches)
  assert int(info.mask.sum()) == 3 * (num_patches - int(num_patches * 0.25))


def test_bfloat16_compute_keeps_float32_params():
  config = _mae_config("mu/4", image_size=(16, 16), decoder=(32, 1, 2), dtype="bfloat16")
  model = mae.build_model(config)
  images = jnp.ones((2, 16, 16, 3))
  variables = jax.jit(model.init)({"params": jax.random.key(1), "masking": jax.random.key(2)},
                                  images)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  latent, _ = jax.jit(model.encoder.apply)({"params": variables["params"]["encoder"]}, images)
  assert latent.dtype == jnp.bfloat16
  pred, _ = jax.jit(model.apply)(variables, images, rngs={"masking": jax.random.key(3)})
  assert pred.dtype == jnp.float32 and bool(jnp.isfinite(pred).all())


def test_mask_token_mode_shares_parameters_with_visible_mode():
  encoder = vit.ViTEncoder(image_size=(16, 16), patch_size=4, width=32, depth=2, num_heads=2,
                           mlp_dim=64, use_mask_token=True)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = encoder.init(jax.random.key(1), images)["params"]
  all_ids = jnp.tile(jnp.arange(16)[None], (2, 1))
  nothing_masked = jnp.zeros((2, 16), bool)
  a, _ = encoder.apply({"params": params}, images, ids_keep=all_ids)
  b, _ = encoder.apply({"params": params}, images, token_mask=nothing_masked)
  np.testing.assert_allclose(a, b, atol=1e-6)
  masked = nothing_masked.at[:, 3].set(True)
  c, _ = encoder.apply({"params": params}, images, token_mask=masked)
  assert not np.allclose(b, c)


def _encoder_flops(ratio: float) -> float:
  config = _mae_config("Ti/16", image_size=(224, 224), decoder=(64, 1, 2))
  model = mae.build_model(config)
  encoder = model.encoder
  images = jnp.zeros((2, 224, 224, 3))
  params = jax.eval_shape(encoder.init, jax.random.key(0), images)["params"]
  keep = int(196 * (1 - ratio))
  ids_keep = jnp.zeros((2, keep), jnp.int32)
  lowered = jax.jit(lambda p, x, i: encoder.apply({"params": p}, x, ids_keep=i)[0]).lower(
      params, images, ids_keep)
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_encoder_cost_scales_with_visible_patches():
  """XLA's own FLOP count: the MAE encoder at mask 0.75 costs about a quarter of mask 0."""
  ratio = _encoder_flops(0.75) / _encoder_flops(0.0)
  # 49 + 1 tokens vs 196 + 1 (the cls token and the patch embedding of all patches add a bit).
  assert 0.22 < ratio < 0.30, ratio


def test_unknown_variant_is_a_config_error():
  with pytest.raises(ConfigError, match=r"config.model.variant='X/16'.*Ti"):
    vit.parse_variant("X/16")


def test_size_overrides_change_only_the_named_dimensions():
  config = _mae_config("Ti/4", image_size=(28, 28), channels=1)
  config.model.update(width=128, depth=6, num_heads=4, mlp_dim=0)
  size, patch = vit.size_from_config(config.model)
  assert (size.width, size.depth, size.num_heads, patch) == (128, 6, 4, 4)
  assert size.mlp_dim == vit.VIT_SIZES["Ti"].mlp_dim  # 0 keeps the variant's value
  params = _abstract_params(config)["encoder"]
  assert sorted(k for k in params["transformer"] if k.startswith("blocks_")) == [
      f"blocks_{i}" for i in range(6)]
  assert params["transformer"]["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (128, 768)
  assert params["patch_embed"]["kernel"].shape == (4 * 4 * 1, 128)


def test_cudnn_attention_pads_odd_lengths_and_falls_back_only_for_rejected_shapes(
    monkeypatch, caplog):
  """Odd lengths (no cuDNN backward) are padded to a multiple of 8 and stay on cuDNN; a layer
  cuDNN still rejects (raised while tracing, also under grad) uses XLA's attention with the
  same result; other errors are left to cuDNN."""
  real = jax.nn.dot_product_attention
  calls = []

  def fake(q, k, v, bias=None, implementation=None, **lengths):
    calls.append((q.shape[1], implementation))
    if implementation == "cudnn":
      if q.shape[1] % 2 or q.shape[-1] % 8:
        raise NotImplementedError(f"Unsupported sequence length Q {q.shape[1]}")
      # stands in for the cuDNN kernel
      return real(q, k, v, bias, implementation="xla", **lengths)
    return real(q, k, v, bias, implementation=implementation, **lengths)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)

  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 7, 4, 8))
  expected = jax.grad(lambda q: (real(q, k, v, implementation="xla") ** 2).sum())(q)
  grad = jax.grad(lambda q: (attention.dot_product_attention(q, k, v, "cudnn") ** 2).sum())(q)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert calls == [(8, "cudnn")]  # 7 tokens padded to 8, on cuDNN

  calls.clear()
  attention.dot_product_attention(q[:, :6], k[:, :6], v[:, :6], "cudnn")
  assert calls == [(6, "cudnn")]  # an even length is not padded

  calls.clear()
  q4, k4, v4 = q[..., :4], k[..., :4], v[..., :4]  # head dim 4: rejected whatever the length
  with caplog.at_level("INFO", logger=attention.__name__):
    grad = jax.grad(lambda q: (attention.dot_product_attention(q, k4, v4, "cudnn") ** 2).sum())(q4)
  expected = jax.grad(lambda q: (real(q, k4, v4, implementation="xla") ** 2).sum())(q4)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)
  assert calls == [(8, "cudnn"), (7, "xla")]
  assert "uses XLA's attention" in caplog.text

  calls.clear()
  attention.dot_product_attention(q, k, v, "xla")  # XLA's attention, unpadded
  assert calls == [(7, "xla")]
  calls.clear()
  attention.dot_product_attention(q, k, v)  # this CPU's default: heads-major, no jax.nn
  assert calls == []
  monkeypatch.setattr(jax.nn, "dot_product_attention", real)
  with pytest.raises(RuntimeError, match="cuDNN"):  # no cuDNN on this machine: an error
    attention.dot_product_attention(q, k, v, "cudnn")


@pytest.mark.parametrize("tokens,multiple", [(197, 8), (197, 64), (50, 64), (17, 2)])
def test_padded_attention_equals_unpadded_in_value_and_gradient(tokens, multiple):
  """The padding of odd lengths for cuDNN, run through XLA's kernel with the same padding and
  length masks: the real tokens' outputs and all gradients are the unpadded ones."""
  q, k, v, w = jax.random.normal(jax.random.key(1), (4, 2, tokens, 3, 16))

  def loss(fn, q, k, v):
    return (fn(q, k, v) * w).sum()
  # Jitted: op by op, the gradients' hundreds of small operations take seconds each case.
  plain = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
  padded = jax.jit(lambda q, k, v: attention.padded_attention(q, k, v, multiple,
                                                              implementation="xla"))
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-6)
  grad = lambda fn: jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))
  for a, b in zip(grad(padded)(q, k, v), grad(plain)(q, k, v)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,head_dim,with_bias", [
    ("float32", 16, False), ("float32", 32, True), ("bfloat16", 32, True)])
def test_heads_major_attention_equals_jax_attention_in_value_and_gradient(
    dtype, head_dim, with_bias):
  """The CPU default (`heads_major_attention`) is `jax.nn.dot_product_attention`'s XLA path
  in value and in the gradients of q, k, v and the bias: float32 to rounding (the scale on q
  instead of the logits), bfloat16 to a few ulp."""
  keys = jax.random.split(jax.random.key(3), 5)
  q, k, v, w = (jax.random.normal(key, (3, 13, 4, head_dim), dtype) for key in keys[:4])
  bias = jax.random.normal(keys[4], (3, 4, 13, 13), jnp.float32) if with_bias else None

  def loss(fn, q, k, v, bias):
    return jnp.sum((fn(q, k, v, bias) * w).astype(jnp.float32))
  ours = lambda q, k, v, b: attention.dot_product_attention(q, k, v, "heads_major", bias=b)
  ref = lambda q, k, v, b: jax.nn.dot_product_attention(
      q, k, v, None if b is None else b.astype(q.dtype), implementation="xla")
  tol = 1e-5 if dtype == "float32" else 3e-2
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(jax.jit(ours)(q, k, v, bias)), f32(jax.jit(ref)(q, k, v, bias)),
                             rtol=tol, atol=tol)
  argnums = (0, 1, 2, 3) if with_bias else (0, 1, 2)
  grads = [jax.jit(jax.grad(lambda *a, fn=fn: loss(fn, *a), argnums=argnums))(q, k, v, bias)
           for fn in (ours, ref)]
  for a, b in zip(*grads):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(f32(a), f32(b), rtol=tol, atol=tol * np.abs(f32(b)).max())


@pytest.mark.parametrize("dtype,rel_pos", [("float32", False), ("bfloat16", True)])
def test_attention_layer_is_one_function_of_one_set_of_parameters_in_every_implementation(
    dtype, rel_pos):
  """The CPU default (blockwise qkv matmuls + heads-major core) and jax.nn's XLA path: the
  same parameter tree from the same key, the same outputs and gradients (parameters, input),
  float32 to rounding, bfloat16 with a relative position bias to bfloat16's rounding."""
  grid = (3, 4) if rel_pos else None  # 12 patches + [CLS]
  x = jax.random.normal(jax.random.key(0), (2, 13, 64)).astype(dtype)
  index = attention.relative_position_index(grid, grid) if rel_pos else None
  layers = {impl: attention.Attention(num_heads=4, dtype=jnp.dtype(dtype), implementation=impl,
                                rel_pos_grid=grid) for impl in ("heads_major", "xla")}
  params = {impl: layer.init(jax.random.key(1), x, rel_index=index)
            for impl, layer in layers.items()}
  chex.assert_trees_all_equal(params["heads_major"], params["xla"])
  # Perturbed, so that the (zero-initialised) bias table and qkv bias take part.
  leaves, tree = jax.tree.flatten(params["xla"])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  w = jax.random.normal(jax.random.key(2), x.shape)

  def loss(impl, p, x):
    return jnp.sum(layers[impl].apply(p, x, rel_index=index).astype(jnp.float32) * w)
  values = {impl: jax.jit(jax.value_and_grad(lambda p, x, i=impl: loss(i, p, x),
                                             argnums=(0, 1)))(params, x) for impl in layers}
  (value, grads), (ref_value, ref_grads) = values["heads_major"], values["xla"]
  tol = 1e-5 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(value, ref_value, rtol=tol, atol=tol * abs(float(ref_value)))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert a.dtype == b.dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
  if jax.default_backend() == "cpu":
    assert attention.default_attention_impl(None) == "heads_major"


def test_gelu_with_its_own_gradient_equals_the_exact_gelu():
  """models.vit.gelu (hand-written backward pass, docs/benchmarks.md) is nn.gelu's erf form
  in value and gradient, in float32 and bfloat16."""
  import flax.linen as nn

  from mim_jax.models.vit import gelu
  x = jnp.linspace(-8.0, 8.0, 4001)
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):  # bf16: 1-2 ulp
    xd = x.astype(dtype)
    np.testing.assert_allclose(np.asarray(gelu(xd), np.float32),
                               np.asarray(nn.gelu(xd, approximate=False), np.float32),
                               rtol=tol, atol=tol)
    ours = jax.grad(lambda v: jnp.sum(gelu(v).astype(jnp.float32)))(xd)
    ref = jax.grad(lambda v: jnp.sum(nn.gelu(v, approximate=False).astype(jnp.float32)))(xd)
    assert ours.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                               rtol=tol, atol=tol)


def test_permute_tokens_equals_the_gather_in_value_and_gradient():
  """The decoder's un-shuffle: a gather whose gradient is a gather (by the inverse
  permutation) equals take_along_axis and its scatter-add gradient exactly."""
  x = jax.random.normal(jax.random.key(0), (3, 10, 4))
  ids = jnp.stack([jax.random.permutation(jax.random.key(i), 10) for i in range(3)])
  w = jax.random.normal(jax.random.key(9), (3, 10, 4))
  f = lambda fn: jax.value_and_grad(lambda x: jnp.sum(fn(x, ids) * w))(x)
  (va, ga), (vb, gb) = f(vit.permute_tokens), f(vit.gather_tokens)
  np.testing.assert_array_equal(va, vb)
  np.testing.assert_array_equal(ga, gb)


def test_visible_only_encoder_equals_embedding_everything_then_picking():
  """Embedding only the visible patches gives the tokens (and gradients) of embedding all
  patches and gathering the visible ones (the previous path), to float round-off."""
  enc = vit.ViTEncoder(image_size=(16, 16), patch_size=4, width=32, depth=1, num_heads=2,
                       mlp_dim=64, channels=3)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  params = enc.init(jax.random.key(0), images)["params"]
  ids_keep = jnp.array([[3, 0, 9, 14], [15, 2, 7, 8]])
  # The previous path, by hand: embed every patch, add positions, gather the visible ones.
  emb = vit.patchify(images, 4) @ params["patch_embed"]["kernel"] + params["patch_embed"]["bias"]
  pos = vit.sincos_2d(32, (4, 4), cls_token=True)
  picked = vit.gather_tokens(emb + pos[None, 1:], ids_keep)
  ours = enc.apply({"params": params}, images, ids_keep=ids_keep)[0]
  # Compare the embedded tokens directly: the encoder's own input layer on both paths.
  got = enc.apply({"params": params}, images, ids_keep=ids_keep,
                  capture_intermediates=lambda mdl, name: mdl.name == "patch_embed")[1]
  embedded = got["intermediates"]["patch_embed"]["__call__"][0]
  np.testing.assert_allclose(embedded + pos[1:][ids_keep], picked, rtol=1e-6, atol=1e-6)
  assert ours.shape == (2, 5, 32)
  # The whole encoder, its own position gather included: every patch kept in a shuffled order
  # gives the full encoder's tokens in that order, and the same parameter gradients.
  order = jnp.stack([jax.random.permutation(jax.random.key(s), 16) for s in (2, 3)])
  weights = jax.random.normal(jax.random.key(4), (2, 17, 32))

  def shuffled(p):
    return enc.apply({"params": p}, images, ids_keep=order)[0]

  def full_then_gathered(p):
    out = enc.apply({"params": p}, images)[0]
    return jnp.concatenate([out[:, :1], vit.gather_tokens(out[:, 1:], order)], axis=1)
  np.testing.assert_allclose(shuffled(params), full_then_gathered(params), rtol=1e-5,
                             atol=1e-5)
  grads = [jax.grad(lambda p, f=f: jnp.sum(f(p) * weights))(params)
           for f in (shuffled, full_then_gathered)]
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_padded_attention_with_a_bias_equals_unpadded():
  """A relative position bias [B, heads, T, T] is padded with the tokens (cuDNN's odd
  lengths): the real tokens' outputs are the unpadded ones."""
  q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 17, 4, 8))
  bias = jax.random.normal(jax.random.key(3), (2, 4, 17, 17))
  plain = jax.nn.dot_product_attention(q, k, v, bias, implementation="xla")
  padded = attention.padded_attention(q, k, v, 8, implementation="xla", bias=bias)
  np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)


def _beit_style_encoder(rel_pos_bias: str, layer_scale: float = 0.1, **kwargs):
  return vit.ViTEncoder(image_size=(16, 16), patch_size=4, width=32, depth=2, num_heads=4,
                        mlp_dim=64, channels=1, rel_pos_bias=rel_pos_bias,
                        layer_scale=layer_scale, **kwargs)


def _randomized(params, seed=0):
  """Every leaf random (the bias tables start at zero, which would hide a misread index)."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("rel_pos_bias", ["shared", "per_block"])
def test_relative_position_bias_follows_the_visible_patches(rel_pos_bias):
  """The visible-only encoder (MAE) given every patch in a shuffled order computes the full
  encoder's tokens in that order: each token's bias is read at its own grid position."""
  enc = _beit_style_encoder(rel_pos_bias, posemb="none")
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  params = _randomized(jax.jit(enc.init)(jax.random.key(1), images))
  apply = jax.jit(enc.apply)
  full, _ = apply(params, images)
  order = jnp.stack([jax.random.permutation(jax.random.key(s), 16) for s in (2, 3)])
  shuffled, _ = apply(params, images, ids_keep=order)
  np.testing.assert_allclose(shuffled[:, 1:], vit.gather_tokens(full[:, 1:], order),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(shuffled[:, 0], full[:, 0], rtol=1e-5, atol=1e-5)
  # With positions only in the bias, the order of the patches matters only through it: a
  # shuffle read at the wrong positions would change the tokens.
  wrong = apply(params, vit.unpatchify(
      vit.gather_tokens(vit.patchify(images, 4), order), 4, (4, 4), 1))[0]
  assert not np.allclose(wrong[:, 1:], vit.gather_tokens(full[:, 1:], order), atol=1e-3)


def test_relative_index_of_a_smaller_grid_reads_the_same_offsets():
  """A 2 x 2 view (multi-crop) reads the entries of a 4 x 4 table that the top-left 2 x 2
  patches of a full image read: the same offsets."""
  small = attention.relative_position_index((4, 4), (2, 2))[0]
  full = attention.relative_position_index((4, 4), (4, 4))[0]
  tokens = np.array([0, 1, 2, 5, 6])  # [CLS], then grid cells (0,0) (0,1) (1,0) (1,1)
  np.testing.assert_array_equal(small, full[tokens][:, tokens])
  with pytest.raises(ValueError, match="cannot serve a"):
    attention.relative_position_index((2, 2), (4, 4))


def test_layer_scale_of_one_is_the_plain_block():
  """gamma = 1 on both branches computes the block without layer scale; the scales start at
  the configured value."""
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  plain = _beit_style_encoder("", layer_scale=0.0)
  scaled = _beit_style_encoder("", layer_scale=1.0)
  params = _randomized(plain.init(jax.random.key(1), images))
  scaled_params = scaled.init(jax.random.key(1), images)
  np.testing.assert_array_equal(
      scaled_params["params"]["transformer"]["blocks_1"]["gamma_2"], np.ones(32))
  merged = jax.tree_util.tree_map(lambda x: x, params)
  for i in range(2):
    block = merged["params"]["transformer"][f"blocks_{i}"]
    block["gamma_1"], block["gamma_2"] = jnp.ones(32), jnp.ones(32)
  np.testing.assert_allclose(scaled.apply(merged, images)[0], plain.apply(params, images)[0],
                             rtol=1e-6, atol=1e-6)


def test_layer_scale_multiplies_each_branch_by_its_own_gamma():
  """gamma_1 scales the attention branch, gamma_2 the MLP branch (a gamma of 1 cannot tell a
  scale from none, nor the two apart): zero scales leave the input, and each branch is the
  plain block's branch times its gamma, per channel."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  block = vit.Block(num_heads=4, mlp_dim=64, layer_scale=1.0)
  params = _randomized(block.init(jax.random.key(1), x))["params"]
  plain = vit.Block(num_heads=4, mlp_dim=64)

  def run(g1, g2):
    return block.apply({"params": {**params, "gamma_1": g1, "gamma_2": g2}}, x)
  zero, g = jnp.zeros(32), jax.random.uniform(jax.random.key(2), (32,), minval=0.5, maxval=2.0)
  np.testing.assert_allclose(run(zero, zero), x, rtol=0, atol=0)
  no_gamma = {k: v for k, v in params.items() if not k.startswith("gamma_")}
  no_mlp = jax.tree_util.tree_map(jnp.zeros_like, no_gamma["mlp"])  # fc2 output 0: no branch
  attn_branch = plain.apply({"params": {**no_gamma, "mlp": no_mlp}}, x) - x
  np.testing.assert_allclose(run(g, zero) - x, g * attn_branch, rtol=1e-5, atol=1e-6)
  no_attn = jax.tree_util.tree_map(jnp.zeros_like, no_gamma["attn"])  # proj output 0
  mlp_branch = plain.apply({"params": {**no_gamma, "attn": no_attn}}, x) - x
  np.testing.assert_allclose(run(zero, g) - x, g * mlp_branch, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    ({"model.rel_pos_bias": "global"}, r"config.model.rel_pos_bias='global'.*shared"),
    ({"model.layer_scale": -0.1}, r"config.model.layer_scale=-0.1"),
    ({"model.abs_posemb": False}, r"config.model.abs_posemb=False.*no positions"),
    ({"model.weight_init": "timm"},
     r"config.model.weight_init='timm'.*\('xavier', 'beit', 'dino', 'data2vec2'\)"),
])
def test_beit_style_model_fields_are_checked(overrides, match):
  config = tiny_mae_config()
  with config.unlocked():
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(config)


@pytest.mark.parametrize("attention_impl", ["heads_major", "xla"])
def test_beit_weight_init_is_the_official_pretraining_init(attention_impl):
  """model.weight_init='beit', against a transcription of the pre-training models of BEiT,
  BEiT v2, data2vec and SimMIM (unilm beit/ and beit2/ modeling_pretrain.py, data2vec_vision
  beit/modeling_cyclical.py, SimMIM models/simmim.py): every Linear (the patch embedding's conv
  too) and the cls / mask tokens drawn by trunc_normal_(std=0.02, a=-0.02, b=0.02), biases 0,
  then `fix_init_weight`: block i's attn.proj and mlp.fc2 weights divided by sqrt(2 * (i + 1)).
  Both qkv paths (the CPU's blockwise matmuls, the fused Dense). MAE's init stays the default."""
  images = jnp.zeros((1, 32, 32, 3))
  def init(weight_init, depth=4):
    encoder = vit.ViTEncoder(image_size=(32, 32), patch_size=4, width=256, depth=depth,
                             num_heads=4, mlp_dim=1024, use_mask_token=True,
                             weight_init=weight_init, attention_impl=attention_impl)
    return encoder.init(jax.random.key(0), images)["params"]
  beit, xavier = init("beit"), init("xavier")
  cut_std = 0.02 * 0.5396  # N(0, 1) cut at +-1 has std 0.5396
  blocks = beit["transformer"]
  drawn = {"patch_embed": beit["patch_embed"]["kernel"], "cls": beit["cls_token"],
           "mask": beit["mask_token"]}
  for i in range(4):
    b = blocks[f"blocks_{i}"]
    drawn |= {f"qkv{i}": b["attn"]["qkv"]["kernel"], f"fc1{i}": b["mlp"]["fc1"]["kernel"]}
    for name in ("proj", "fc2"):
      w = np.asarray((b["attn"] if name == "proj" else b["mlp"])[name]["kernel"])
      # Divided by sqrt(2 * layer_id): the draw itself is cut at +-0.02 with the cut std.
      undone = w * np.sqrt(2.0 * (i + 1))
      assert np.abs(undone).max() <= 0.02 + 1e-7
      assert abs(undone.std() / cut_std - 1) < 0.03, (name, i, undone.std())
  for name, w in drawn.items():
    w = np.asarray(w)
    assert np.abs(w).max() <= 0.02 + 1e-7, name
    if w.size > 10_000:
      assert abs(w.std() / cut_std - 1) < 0.03, (name, w.std())
  biases = [(jax.tree_util.keystr(path), leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(beit)
            if jax.tree_util.keystr(path).endswith("['bias']")
            and "norm" not in jax.tree_util.keystr(path)]
  assert len(biases) == 1 + 4 * 4  # patch embedding; qkv, proj, fc1, fc2 of each block
  for path, leaf in biases:
    np.testing.assert_array_equal(leaf, 0, err_msg=path)
  # Same parameter tree as the default, whose values are MAE's Xavier-uniform draws.
  assert jax.tree.structure(beit) == jax.tree.structure(xavier)
  fc1 = np.asarray(xavier["transformer"]["blocks_0"]["mlp"]["fc1"]["kernel"])
  assert abs(fc1.std() / np.sqrt(2.0 / (256 + 1024)) - 1) < 0.03
  # An encoder built from a config reads the field.
  config = tiny_mae_config(**{"model.weight_init": "beit"})
  built = vit.encoder_from_config(config.model, config.image_size, config.channels)
  assert built.weight_init == "beit"


@pytest.mark.parametrize("attention_impl", ["heads_major", "xla"])
def test_dino_weight_init_is_the_vit_of_ibots_release(attention_impl):
  """model.weight_init='dino', against a transcription of bytedance/ibot
  models/vision_transformer.py (DINO's ViT): every Linear and the cls token by DINO's
  utils.trunc_normal_(std=0.02) (timm's; cut at +-2: not cut), Linear biases 0, no per-block
  rescale; the patch-embedding Conv2d untouched by `_init_weights`, so PyTorch's default
  (kaiming_uniform_(a=sqrt(5)) weights and a uniform bias, both within +-1/sqrt(fan_in)); the
  mask embedding zeros."""
  # One channel: fan_in 16, where the conv default's bound (0.25) is far from Xavier's (0.149).
  patch, channels, width = 4, 1, 256
  images = jnp.zeros((1, 32, 32, channels))
  encoder = vit.ViTEncoder(image_size=(32, 32), patch_size=patch, width=width, depth=4,
                           num_heads=4, mlp_dim=1024, channels=channels, use_mask_token=True,
                           weight_init="dino", attention_impl=attention_impl)
  params = encoder.init(jax.random.key(0), images)["params"]
  fan_in = patch * patch * channels
  bound = 1 / np.sqrt(fan_in)
  for name in ("kernel", "bias"):
    w = np.asarray(params["patch_embed"][name])
    assert np.abs(w).max() <= bound + 1e-7, name
    assert np.abs(w).max() > 0.9 * bound, name  # filled to the bound: a uniform draw
    tolerance = 0.02 if w.size > 1000 else 0.15
    assert abs(w.std() / (bound / np.sqrt(3)) - 1) < tolerance, (name, w.std())
  np.testing.assert_array_equal(params["mask_token"], 0)
  drawn = {"cls": params["cls_token"]}
  for i in range(4):
    b = params["transformer"][f"blocks_{i}"]
    drawn |= {f"qkv{i}": b["attn"]["qkv"]["kernel"], f"proj{i}": b["attn"]["proj"]["kernel"],
              f"fc1{i}": b["mlp"]["fc1"]["kernel"], f"fc2{i}": b["mlp"]["fc2"]["kernel"]}
    for layer in (b["attn"]["qkv"], b["attn"]["proj"], b["mlp"]["fc1"], b["mlp"]["fc2"]):
      np.testing.assert_array_equal(layer["bias"], 0)
  for name, w in drawn.items():
    w = np.asarray(w)
    # Not cut at one std (beit's) and not rescaled per block: the same N(0, 0.02) everywhere.
    assert np.abs(w).max() > 0.05, name
    tolerance = 0.03 if w.size > 10_000 else 0.2
    assert abs(w.std() / 0.02 - 1) < tolerance, (name, w.std())
  xavier = vit.ViTEncoder(image_size=(32, 32), patch_size=patch, width=width, depth=4,
                          num_heads=4, mlp_dim=1024, channels=channels, use_mask_token=True).init(
                              jax.random.key(0), images)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(xavier)


def test_data2vec2_weight_init_is_the_fairseq_image_models():
  """model.weight_init='data2vec2', against a transcription of fairseq's data2vec 2.0
  (examples/data2vec/models/data2vec2.py: `init_bert_params` on every Linear, mae_init off;
  modalities/images.py: the patch-embedding conv's weight Xavier-uniform as [D, C p p], its
  bias left at PyTorch's default; modalities/base.py: the extra (cls) token nn.init.normal_,
  i.e. N(0, 1), with the image recipe's init_extra_token_zero false)."""
  patch, channels, width = 4, 1, 256
  images = jnp.zeros((1, 32, 32, channels))
  params = vit.ViTEncoder(image_size=(32, 32), patch_size=patch, width=width, depth=2,
                          num_heads=4, mlp_dim=1024, channels=channels,
                          weight_init="data2vec2").init(jax.random.key(0), images)["params"]
  fan_in = patch * patch * channels
  kernel = np.asarray(params["patch_embed"]["kernel"])
  xavier_bound = np.sqrt(6 / (fan_in + width))
  assert xavier_bound * 0.9 < np.abs(kernel).max() <= xavier_bound + 1e-7
  bias = np.asarray(params["patch_embed"]["bias"])
  assert 0.9 / np.sqrt(fan_in) < np.abs(bias).max() <= 1 / np.sqrt(fan_in) + 1e-7
  cls = np.asarray(params["cls_token"])
  assert abs(cls.std() - 1) < 0.15 and np.abs(cls).max() > 2  # N(0, 1): not N(0, 0.02)
  for i in range(2):
    b = params["transformer"][f"blocks_{i}"]
    for layer in (b["attn"]["qkv"], b["attn"]["proj"], b["mlp"]["fc1"], b["mlp"]["fc2"]):
      w = np.asarray(layer["kernel"])
      assert abs(w.std() / 0.02 - 1) < 0.03 and np.abs(w).max() > 0.05  # not cut, not scaled
      np.testing.assert_array_equal(layer["bias"], 0)


def test_a_head_inside_the_official_vit_follows_the_weight_init():
  """BEiT's, BEiT v2's (MaskDistill) and data2vec's lm_head is a layer of their ViT, drawn as its
  linear layers (cut at +-0.02 under 'beit'); SimMIM's pixel head is a separate layer with
  timm's trunc_normal_(0.02), as is every head under MAE's init."""
  assert registry.method_class("beit").head_in_vit
  assert registry.method_class("maskdistill").head_in_vit
  assert not registry.method_class("simmim").head_in_vit
  images = jnp.zeros((2, 16, 16, 3))
  for method, scheme, cut in (("data2vec", "beit", True), ("data2vec", "xavier", False),
                              ("simmim", "beit", False)):
    config = tiny_config(method, **{"model.weight_init": scheme})
    built = registry.build_method(config, TrainLength(4, 4))
    params, _ = built.init(jax.random.key(0), images)
    kernel = np.asarray(params["predictor"]["head"]["kernel"])
    assert kernel.size >= 1024
    assert (np.abs(kernel).max() <= 0.02 + 1e-7) == cut, (method, scheme)
    assert abs(kernel.std() / (0.02 * 0.5396 if cut else 0.02) - 1) < 0.1, (method, scheme)


def test_heads_start_from_the_official_truncated_normal():
  """The heads' init is timm's trunc_normal_(std) (cut at -2 and 2, not at -2 std and 2 std):
  its std is the one asked for (flax's truncated_normal(std) gives 0.88 std)."""
  from mim_jax.models import decoders, heads
  x = jnp.ones((2, 512))
  for module, std in ((heads.ProbeHead(num_classes=1000, head_init_std=0.01), 0.01),
                      (decoders.LinearPredictor(out_dim=1000), 0.02)):
    inputs = x if isinstance(module, heads.ProbeHead) else jnp.ones((2, 3, 512))
    kwargs = {"train": False} if isinstance(module, heads.ProbeHead) else {}
    params = module.init(jax.random.key(0), inputs, **kwargs)["params"]
    kernel = np.asarray(params["head"]["kernel"])
    assert abs(kernel.std() / std - 1) < 0.01, (type(module).__name__, kernel.std())
    assert np.abs(kernel).max() <= 5 * std * (1 + 1e-6)  # never a weight at the far cut
