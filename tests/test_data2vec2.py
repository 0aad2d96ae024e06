"""data2vec 2.0: several masks per image sharing one teacher pass, the visible-only student, the
convolutional decoder, the loss (squared error on masked patches + the [CLS] loss), no gradient
into the teacher, masks drawn per image in the input pipeline, learning on Fashion-MNIST,
exact resume, and config errors."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.methods.base import TrainLength
from mim_jax.models.decoders import ConvDecoder, GroupedConv
from mim_jax.objectives import masking
from mim_jax.training import loop as train

from conftest import REPO, init_and_step, requires_fmnist, tiny_config

LENGTH = TrainLength(steps_per_epoch=4, schedule_steps=4)
M = 3  # masks per image


def tiny(**overrides):
  """Micro data2vec 2.0 on synthetic 16x16 RGB images (4x4 grid of 4-px patches, 2 blocks):
  inverse block masks of 75% (4 of 16 patches visible), 3 per image."""
  c = tiny_config("data2vec2", **{
      "masking.ratio": 0.75, "masking.block": 2, "masking.num_masks": M,
      "decoder.width": 32, "decoder.depth": 2, "decoder.groups": 4, "teacher.top_k": 2,
      "teacher.ema_decay": 0.5, "teacher.ema_end_decay": 0.9, "teacher.ema_anneal_fraction": 1.0,
      **overrides})
  registry.validate_config(c)
  return c


def _batch(method, images, seed=0):
  extras = method.example_extras(images.shape[0], np.random.default_rng(seed))
  return {"image": images, **{k: jnp.asarray(v) for k, v in extras.items()}}


@pytest.fixture(scope="module")
def stepped():
  config = tiny()
  method = registry.build_method(config, LENGTH)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  batch = _batch(method, images)
  states, metrics = init_and_step(method, batch)
  return method, batch, states, metrics


def test_masks_per_image_have_the_fixed_visible_count(stepped):
  method, batch, _, _ = stepped
  mask = np.asarray(batch[masking.TOKEN_MASK_KEY])
  assert mask.shape == (4, M, 16) and mask.dtype == bool
  assert (mask.sum(-1) == 12).all()  # exactly 4 of 16 visible in every mask
  assert len({m.tobytes() for m in mask.reshape(-1, 16)}) > 1  # independent masks


def test_loss_is_one_teacher_pass_shared_by_every_mask(stepped, monkeypatch):
  """The loss equals its definition computed by hand: the teacher encodes each image once,
  each of its M copies is encoded from its visible patches only, decoded by the conv decoder,
  and scored by squared error on its masked patches, plus the [CLS] loss against the targets'
  mean over patches; both in the release's units (summed over the D channels / sqrt(D))."""
  method, batch, states, _ = stepped
  state, rng = states[1], jax.random.key(7)
  params, teacher = state.params, state.extra["teacher"]
  loss, (metrics, _) = method.loss(params, state.extra, batch, rng, train=False)

  images = batch["image"]
  target = method.targets(teacher, images)  # [B, N, D], once per image
  assert target.shape == (4, 16, method.encoder.width)
  mask = np.asarray(batch[masking.TOKEN_MASK_KEY]).reshape(4 * M, 16)
  _, _, noise_rng = jax.random.split(rng, 3)
  info = masking.mask_to_ids(mask)
  copies = jnp.repeat(images, M, axis=0)
  latent, _ = method.encoder.apply({"params": params["encoder"]}, copies,
                                   ids_keep=info.ids_keep)
  assert latent.shape == (4 * M, 1 + 4, method.encoder.width)  # the student saw 4 visible patches per copy
  pred = method.decoder.apply({"params": params["decoder"]}, latent[:, 1:], info.ids_restore,
                              rngs={"mask_noise": noise_rng})
  t = np.repeat(np.asarray(target), M, axis=0)
  d = target.shape[-1]
  per_patch = np.sum((np.asarray(pred) - t) ** 2, axis=-1) / np.sqrt(d)
  regression = (per_patch * mask).sum() / mask.sum()
  cls = np.mean(np.sum((np.asarray(latent[:, 0])
                        - np.repeat(np.asarray(target).mean(1), M, 0)) ** 2, -1)) / np.sqrt(d)
  np.testing.assert_allclose(metrics["regression_loss"], regression, rtol=1e-5)
  np.testing.assert_allclose(metrics["cls_loss"], cls, rtol=1e-5)
  np.testing.assert_allclose(loss, regression + 2.56 * cls, rtol=1e-5)
  assert float(metrics["mask_fraction"]) == pytest.approx(0.75)

  # One teacher pass per image (B images), not one per copy (B x M): the targets are computed
  # once, from the unmasked images.
  calls = []
  targets = method.targets

  def recorded(teacher_params, images, **kwargs):
    calls.append(images.shape[0])
    return targets(teacher_params, images, **kwargs)
  monkeypatch.setattr(method, "targets", recorded)
  method.loss(params, state.extra, batch, rng, train=False)
  assert calls == [4]


def test_student_never_sees_masked_pixels_and_teacher_gets_no_gradient(stepped):
  method, batch, states, _ = stepped
  state, rng = states[1], jax.random.key(5)

  def loss_of_teacher(teacher):
    return method.loss(state.params, {**state.extra, "teacher": teacher}, batch, rng)[0]

  grads = jax.grad(loss_of_teacher)(state.extra["teacher"])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  shifted = jax.tree.map(lambda x: x * 1.5, state.extra["teacher"])
  assert float(loss_of_teacher(shifted)) != float(loss_of_teacher(state.extra["teacher"]))

  # The student's gradient w.r.t. the input pixels of each copy is zero on its masked patches.
  mask = np.asarray(batch[masking.TOKEN_MASK_KEY]).reshape(4 * M, 16)
  info = masking.mask_to_ids(mask)
  copies = jnp.repeat(batch["image"], M, axis=0)

  def student_output(images):
    latent, _ = method.encoder.apply({"params": state.params["encoder"]}, images,
                                     ids_keep=info.ids_keep)
    return jnp.sum(latent ** 2)

  g = np.asarray(jax.grad(student_output)(copies))  # [B*M, 16, 16, 3]
  per_patch = np.abs(g).reshape(4 * M, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(
      4 * M, 16, -1).sum(-1)
  assert np.all(per_patch[mask] == 0) and np.all(per_patch[~mask] > 0)


@pytest.mark.parametrize("groups,kernel", [(1, 3), (4, 3), (4, 5), (2, 1)])
def test_grouped_conv_equals_flax_conv_in_value_init_and_gradient(groups, kernel):
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 8))
  ours = GroupedConv(12, kernel, groups)
  ref = nn.Conv(12, (kernel, kernel), padding="SAME", feature_group_count=groups)
  p_ours = ours.init(jax.random.key(1), x)["params"]
  p_ref = ref.init(jax.random.key(1), x)["params"]
  jax.tree.map(np.testing.assert_array_equal, p_ours, p_ref)  # same shapes, same draws
  np.testing.assert_allclose(ours.apply({"params": p_ours}, x), ref.apply({"params": p_ref}, x),
                             rtol=1e-5, atol=1e-5)
  # Parameters and input: the input's gradient is the decoder's path to the encoder.
  g_ours = jax.grad(lambda p, v: jnp.sum(ours.apply({"params": p}, v) ** 2), (0, 1))(p_ours, x)
  g_ref = jax.grad(lambda p, v: jnp.sum(ref.apply({"params": p}, v) ** 2), (0, 1))(p_ref, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_ref)


def test_conv_decoder_is_local_grouped_and_fills_masked_positions_with_noise():
  dec = ConvDecoder(grid_hw=(4, 4), out_dim=8, width=8, depth=1, kernel=3, groups=2,
                    noise_std=0.01)
  visible = jax.random.normal(jax.random.key(0), (1, 4, 8))
  info = masking.mask_to_ids(np.array([[0, 1, 1, 1] * 4], bool))  # column 0 visible
  params = dec.init({"params": jax.random.key(1)}, visible, info.ids_restore)["params"]
  assert params["conv_0"]["kernel"].shape == (3, 3, 4, 8)  # 8 inputs in 2 groups of 4
  out = dec.apply({"params": params}, visible, info.ids_restore)
  assert out.shape == (1, 16, 8)
  # Without the rng the masked positions hold zeros; with it, noise of std 0.01 (which the
  # parameter-free LayerNorm rescales where no visible patch is in reach).
  noisy = dec.apply({"params": params}, visible, info.ids_restore,
                    rngs={"mask_noise": jax.random.key(2)})
  assert float(jnp.max(jnp.abs(noisy - out))) > 0
  # One 3x3 convolution: the output at grid (0, 1) sees the visible patches at (0, 0) and
  # (1, 0) (visible tokens 0 and 1), not those at (2, 0) and (3, 0).
  def at(v):
    return dec.apply({"params": params}, v, info.ids_restore)[0, 1].sum()
  g = np.abs(np.asarray(jax.grad(at)(visible))).sum(-1)[0]
  assert g[0] > 0 and g[1] > 0 and g[2] == 0 and g[3] == 0


def test_flops_count_every_copy_and_one_teacher_pass():
  c = tiny()
  f = registry.forward_flops(c)
  one = registry.forward_flops(tiny(**{"masking.num_masks": 1}))
  assert f["teacher"] == one["teacher"]
  assert f["encoder"] == pytest.approx(M * one["encoder"])
  assert f["decoder"] == pytest.approx(M * one["decoder"])
  assert f["total"] == pytest.approx(f["encoder"] + f["decoder"] + f["teacher"])


def test_pipeline_masks_train_checkpoint_and_resume_exactly(tmp_path):
  """Through the real loop: the input pipeline draws M masks per image; 2 + 2 steps after a
  resume equal 4 uninterrupted steps (teacher and masks included)."""
  straight = train.run(tiny(total_steps=4, checkpoint_every=2), str(tmp_path / "a"))
  train.run(tiny(total_steps=2, checkpoint_every=2), str(tmp_path / "b"))
  resumed = train.run(tiny(total_steps=4, checkpoint_every=2), str(tmp_path / "b"))
  for a, b in zip(jax.tree.leaves(straight.params) + jax.tree.leaves(straight.extra),
                  jax.tree.leaves(resumed.params) + jax.tree.leaves(resumed.extra)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.isfile(tmp_path / "a" / "encoder" / "model.json")


@requires_fmnist
def test_short_run_on_fashion_mnist_lowers_the_loss(tmp_path):
  """The Fashion-MNIST recipe's micro variant, 60 steps with a frozen teacher (decay 1: fixed
  targets, so a lower loss means the student learned to predict them)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / "data2vec2_fmnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("runlocal")
  config_defaults.override(c, **{
      "teacher.ema_decay": 1.0, "teacher.ema_end_decay": 1.0, "global_batch_size": 32,
      "total_steps": 60, "optimizer.warmup_epochs": 0.0, "optimizer.base_lr": 4e-3,
      "checkpoint_every": 1000, "export_encoder": False})
  workdir = str(tmp_path / "run")
  train.run(c, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  loss = [r["loss"] for r in rows if "loss" in r]
  assert len(loss) == 60 and all(np.isfinite(loss))
  first, last = np.mean(loss[:5]), np.mean(loss[-5:])
  assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("field,value,match", [
    ("masking.num_masks", 0, r"masking\.num_masks=0"),
    ("masking.kind", "blockwise", r"masking\.kind='blockwise'"),
    ("decoder.kernel", 2, r"decoder\.kernel=2 .*odd"),
    ("decoder.groups", 5, r"decoder\.groups=5 .*divisor"),
    ("decoder.noise_std", -1.0, r"decoder\.noise_std=-1\.0"),
    ("teacher.cls_weight", -0.5, r"teacher\.cls_weight=-0\.5"),
    ("teacher.top_k", 3, r"teacher\.top_k=3"),
])
def test_bad_fields_fail_naming_the_field(field, value, match):
  with pytest.raises(ConfigError, match=match):
    tiny(**{field: value})
