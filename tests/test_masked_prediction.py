"""SimMIM and MaskFeat: the mask-token encoder, configured mask generators, losses on masked
patches, host-drawn masks through the input pipeline, and config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim_jax import data, registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.models.vit import patchify
from mim_jax.objectives import hog, losses, masking
from mim_jax.training import loop as train
from mim_jax.training import step as step_lib

from conftest import tiny_mae_config


def tiny_config(method: str, **overrides):
  """A micro SimMIM / MaskFeat config on synthetic 16x16 RGB images (16 patches of 4x4)."""
  c = tiny_mae_config(method=method)
  if method == "simmim":
    c.masking.update(kind="grouped", ratio=0.6, mask_patch_size=8)
    c.target.norm_pix = False
  else:
    c.masking.update(kind="blockwise", ratio=0.4, min_block=2)
    c.target.hog.update(cell_size=2, num_bins=9, gradient="sobel", gaussian_window=4)
  config_defaults.override(c, **overrides)  # again: the method defaults above must not win
  registry.validate_config(c)
  return c


def _batch(method, images, seed=0):
  batch = {"image": images}
  if method.mask_generator.on_host:
    batch[masking.TOKEN_MASK_KEY] = jnp.asarray(
        method.mask_generator.host(np.random.default_rng(seed), images.shape[0]))
  return batch


# --- mask generators ------------------------------------------------------------------------


@pytest.mark.parametrize("kind,ratio,group,want", [
    ("random", 0.75, 1, 147), ("grouped", 0.6, 2, 120), ("inverse_block", 0.8, 1, 157)])
def test_fixed_count_generators_mask_exactly_num_masked(kind, ratio, group, want):
  gen = masking.MaskGenerator(kind, (14, 14), ratio, group=group)
  assert gen.num_masked == want
  masks = gen.host(jax.random.key(0), 16)
  assert masks.shape == (16, 196) and masks.dtype == bool
  np.testing.assert_array_equal(masks.sum(axis=1), want)


def test_blockwise_generator_varies_within_its_budget():
  gen = masking.MaskGenerator("blockwise", (14, 14), 0.4)
  assert gen.num_masked is None and gen.budget == 78 and gen.on_host
  counts = gen.host(np.random.default_rng(0), 64).sum(axis=1)
  assert counts.max() <= 78 and counts.mean() > 70
  assert len(set(counts.tolist())) > 1  # the count really varies per sample


def test_grouped_generator_from_config_masks_whole_groups():
  cfg = tiny_config("simmim").masking  # 8-px groups over 4-px patches on a 4x4 grid
  gen = masking.mask_generator_from_config(cfg, (4, 4), 4)
  assert gen.group == 2
  m = np.asarray(gen.device(jax.random.key(3), 8)).reshape(8, 2, 2, 2, 2)
  # Every 2x2 group is all masked or all visible.
  per_group = m.transpose(0, 1, 3, 2, 4).reshape(8, 4, 4).sum(-1)
  assert set(np.unique(per_group)) <= {0, 4}


def test_host_kinds_read_the_batch_and_say_what_is_missing():
  gen = masking.MaskGenerator("blockwise", (4, 4), 0.4, min_block=2)
  images = jnp.zeros((2, 16, 16, 3))
  with pytest.raises(ValueError, match="token_mask"):
    gen.sample({"image": images}, jax.random.key(0))
  with pytest.raises(ValueError, match=r"shape \(2, 9\)"):
    gen.sample({"image": images, "token_mask": jnp.zeros((2, 9), bool)}, jax.random.key(0))
  m = gen.host(np.random.default_rng(0), 2)
  np.testing.assert_array_equal(gen.sample({"image": images, "token_mask": m}, None), m)


def test_pipeline_adds_reproducible_host_masks():
  cfg = tiny_mae_config().data
  gen = masking.MaskGenerator("blockwise", (4, 4), 0.5, min_block=2)
  kw = dict(image_size=(16, 16), channels=3, global_batch_size=8, seed=5,
            element_transforms=(data.AddTokenMask(gen),))
  it = data.make_train_iterator(cfg, **kw)
  first = next(it)
  assert first["token_mask"].shape == (8, 16) and first["token_mask"].dtype == bool
  assert (first["token_mask"].sum(axis=1) <= 8).all() and first["token_mask"].any()
  state = it.get_state()
  second = next(it)
  again = data.make_train_iterator(cfg, **kw)
  np.testing.assert_array_equal(next(again)["token_mask"], first["token_mask"])
  again.set_state(state)
  resumed = next(again)
  np.testing.assert_array_equal(resumed["token_mask"], second["token_mask"])
  np.testing.assert_array_equal(resumed["image"], second["image"])
  # The masks are their own random stream: images and labels are those of a run without them.
  plain = next(data.make_train_iterator(cfg, **{**kw, "element_transforms": ()}))
  np.testing.assert_array_equal(plain["image"], first["image"])


# --- losses ---------------------------------------------------------------------------------


def test_masked_l1_is_simmims_per_pixel_mean_over_masked_pixels():
  rng = np.random.default_rng(0)
  b, h, w, c, p = 2, 8, 8, 3, 4
  x = rng.normal(size=(b, h, w, c)).astype(np.float32)
  x_rec = rng.normal(size=(b, h, w, c)).astype(np.float32)
  mask = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], np.float32)
  # SimMIM: mask upsampled to pixels, l1 summed over masked pixels / mask.sum() / in_chans.
  pixel_mask = mask.reshape(b, 2, 2).repeat(p, 1).repeat(p, 2)[..., None]
  want = (np.abs(x - x_rec) * pixel_mask).sum() / pixel_mask.sum() / c
  got = losses.masked_l1(patchify(jnp.asarray(x_rec), p), patchify(jnp.asarray(x), p), mask)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_losses_ignore_visible_patches():
  rng = np.random.default_rng(1)
  pred, target = rng.normal(size=(2, 2, 6, 5)).astype(np.float32)
  mask = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]], np.float32)
  changed = np.where(mask[..., None] > 0, pred, pred + 100.0)
  for fn in (losses.masked_l1, losses.masked_mse):
    assert float(fn(pred, target, mask)) == float(fn(changed, target, mask))


# --- the methods ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simmim", "maskfeat", "mae"])
def test_masked_patch_content_never_reaches_the_prediction(name):
  """The encoder must not see masked pixels: noise in them leaves the predictions unchanged
  (a mask token replaces them, or MAE drops them)."""
  config = tiny_config(name) if name != "mae" else tiny_mae_config(
      **{"masking.kind": "grouped", "masking.mask_patch_size": 8, "masking.ratio": 0.5})
  method = registry.build_method(config)
  params, _ = method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  batch = _batch(method, images)
  out = method.reconstruct(params, batch, jax.random.key(7), {})
  mask = np.asarray(out["mask"]).astype(bool)
  assert mask.any() and (~mask).any()
  noise = jax.random.normal(jax.random.key(2), images.shape) * 10
  pixel_mask = np.repeat(np.repeat(mask.reshape(4, 4, 4), 4, 1), 4, 2)[..., None]
  scrambled = jnp.where(pixel_mask, images + noise, images)
  out2 = method.reconstruct(params, {**batch, "image": scrambled}, jax.random.key(7), {})
  np.testing.assert_array_equal(np.asarray(out2["mask"]), np.asarray(out["mask"]))
  np.testing.assert_allclose(np.asarray(out2["pred"]), np.asarray(out["pred"]), atol=1e-5)


def test_simmim_loss_is_l1_on_masked_pixels_of_its_prediction():
  method = registry.build_method(tiny_config("simmim"))
  params, extra = method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  loss, (metrics, _) = method.loss(params, extra, {"image": images}, jax.random.key(3),
                                   train=False)
  out = method.reconstruct(params, {"image": images}, jax.random.key(3), {})
  want = losses.masked_l1(out["pred"], patchify(images, 4), out["mask"])
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["mask_fraction"]), 0.75)  # ceil(4 x 0.6) of 4 groups


def test_maskfeat_targets_are_hog_and_masks_vary_per_sample():
  # 32x32 images: an 8x8 patch grid, where blockwise masks of budget 25 vary in count.
  config = tiny_config("maskfeat", image_size=(32, 32), **{"masking.min_block": 4})
  method = registry.build_method(config)
  params, extra = method.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  batch = _batch(method, images, seed=4)
  assert len(set(np.asarray(batch["token_mask"]).sum(1).tolist())) > 1
  out = method.reconstruct(params, batch, jax.random.key(0), {})
  np.testing.assert_array_equal(np.asarray(out["mask"]), np.asarray(batch["token_mask"]))
  want = hog.hog_patch_targets(images, 4, cell_size=2, num_bins=9, gradient="sobel",
                               gaussian_window=4)
  assert out["pred"].shape == want.shape == (16, 64, 4 * 3 * 9)
  np.testing.assert_allclose(np.asarray(out["target"]), np.asarray(want), atol=1e-6)
  loss, _ = method.loss(params, extra, batch, jax.random.key(0), train=False)
  np.testing.assert_allclose(float(loss), float(losses.masked_mse(out["pred"], want,
                                                                  out["mask"])), rtol=1e-6)


@pytest.mark.parametrize("name", ["simmim", "maskfeat"])
def test_training_lowers_the_loss(name):
  method = registry.build_method(tiny_config(name))
  tx = optax.adamw(3e-3, b1=0.9, b2=0.999)
  state = jax.jit(step_lib.init_train_state, static_argnums=(0, 1, 3))(
      method, tx, jax.random.key(0), (1, 16, 16, 3))
  step = jax.jit(step_lib.make_train_step(method, tx, lambda s: 3e-3), donate_argnums=(0,))
  images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3))
  batch = _batch(method, images)
  losses_ = []
  for _ in range(30):
    state, metrics = step(state, batch, jax.random.key(2))
    losses_.append(float(metrics["loss"]))
  assert all(np.isfinite(losses_))
  assert losses_[-1] < 0.8 * losses_[0], losses_


def test_export_of_a_mask_token_encoder_feeds_the_evaluations(tmp_path):
  """A SimMIM run draws pictures, exports its encoder (with its mask token), and a linear
  probe and fine-tuning load it."""
  pre = tiny_config("simmim", total_steps=2, viz_every=2)
  state = train.run(pre, str(tmp_path / "simmim"))
  assert "mask_token" in state.params["encoder"]
  assert (tmp_path / "simmim" / "reconstructions" / "step_00000002.png").exists()
  for name in ("linprobe", "finetune"):
    c = tiny_mae_config(method=name, total_steps=1, init_from=str(tmp_path / "simmim"))
    c.classifier.num_classes = 10
    c.optimizer.name = "sgd" if name == "linprobe" else "adamw"
    out = train.run(c, str(tmp_path / name))
    enc = state.params["encoder"]
    got = (out.extra["encoder"] if name == "linprobe" else out.params["encoder"])
    # The loaded weights: the probe's frozen copy, and fine-tuning's after its one step, which
    # ran at the warmup's first lr, 0 (AdamW's decoupled decay is scaled by the lr too).
    assert c.optimizer.warmup_epochs > 0
    assert "mask_token" not in got
    assert {"cls_token", "patch_embed", "transformer"} <= set(got) & set(enc), set(got)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get({k: got[k] for k in set(got) & set(enc)}),
                 jax.device_get({k: enc[k] for k in set(got) & set(enc)}))


def test_maskfeat_run_draws_hog_maps(tmp_path):
  c = tiny_config("maskfeat", total_steps=2, viz_every=2)
  train.run(c, str(tmp_path))
  from PIL import Image
  picture = np.asarray(Image.open(tmp_path / "reconstructions" / "step_00000002.png"))
  assert picture.ndim == 3 and picture.shape[1] > 4 * 16


# --- config errors --------------------------------------------------------------------------


@pytest.mark.parametrize("method,overrides,field,words", [
    ("mae", {"masking.kind": "blockwise"}, "masking.kind", "vary in count per sample"),
    ("simmim", {"masking.mask_patch_size": 6}, "masking.mask_patch_size", "multiple"),
    ("simmim", {"masking.mask_patch_size": 12}, "masking.mask_patch_size", "tile"),
    ("simmim", {"masking.kind": "spiral"}, "masking.kind", "one of"),
    ("maskfeat", {"target.hog.cell_size": 3}, "target.hog.cell_size", "divisor of the patch"),
    ("maskfeat", {"target.hog.gaussian_window": 5}, "target.hog.gaussian_window", "divisor"),
    ("maskfeat", {"target.hog.gradient": "prewitt"}, "target.hog.gradient", "sobel"),
    ("maskfeat", {"target.hog.binning": "dalal"}, "target.hog.binning", "maskfeat"),
    ("maskfeat", {"masking.min_block": 9}, "masking.min_block", "budget"),
    ("simmim", {"optimizer.schedule": "multistep", "optimizer.decay_epochs": (3.0,)},
     "optimizer.decay_epochs", "num_epochs"),
])
def test_incompatible_choices_fail_at_validation(method, overrides, field, words):
  c = tiny_mae_config() if method == "mae" else tiny_config(method)
  config_defaults.override(c, **overrides)
  with pytest.raises(ConfigError) as err:
    registry.validate_config(c)
  assert f"config.{field}" in str(err.value) and words in str(err.value), str(err.value)


def test_multistep_schedule_decays_at_the_given_epochs():
  from mim_jax.training import optim
  opt = registry.base_config("mae").optimizer
  opt.update(base_lr=1e-4, lr_batch_reference=512, warmup_epochs=2.0, schedule="multistep",
             decay_epochs=(7.0, 9.0), decay_factor=0.1)
  sched = optim.learning_rate_schedule(opt, 1024, steps_per_epoch=10, schedule_steps=100)
  lr = lambda s: float(sched(s))
  np.testing.assert_allclose([lr(0), lr(10), lr(20), lr(69), lr(70), lr(89), lr(90)],
                             [0, 1e-4, 2e-4, 2e-4, 2e-5, 2e-5, 2e-6], rtol=1e-5, atol=1e-12)
