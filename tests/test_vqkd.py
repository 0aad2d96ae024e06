"""The VQ-KD tokenizer (BEiT v2's stage 1): codes through an l2-normalised codebook, decoded to
a frozen teacher's features; its loss, the frozen teacher, and BEiT stage 2 reading its
export."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.objectives.teachers import normalize
from mim_jax.tokenizers import io
from mim_jax.training import loop as train

from conftest import REPO, requires_fmnist, tiny_config, train_micro_mae_teacher


def tiny_vqkd_config(teacher: str, **overrides):
  return tiny_config("vqkd_tokenizer", **{
      "teacher.path": teacher, "tokenizer.vocab_size": 16, "tokenizer.code_dim": 8,
      "tokenizer.width": 16, "tokenizer.num_blocks": 1, **overrides})


def test_loss_is_the_cosine_distance_to_the_teachers_normalised_features(teacher_dir):
  method = registry.build_method(tiny_vqkd_config(teacher_dir))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  params, extra = method.init(jax.random.key(0), images)
  params, extra = method.load_pretrained(jax.device_get(params), jax.device_get(extra))
  _, (metrics, _) = method.loss(params, extra, {"image": images}, jax.random.key(2),
                                train=False)
  teacher = method.target.teacher
  target = normalize(teacher.features(extra["teacher"], images, 0), "layer")
  out = method.reconstruct(params, {"image": images}, jax.random.key(2), extra)
  np.testing.assert_allclose(out["target"], target, rtol=1e-5, atol=1e-5)
  pred = np.asarray(out["pred"])
  cos = (pred * np.asarray(target)).sum(-1) / (
      np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1))
  np.testing.assert_allclose(metrics["recon_loss"], np.mean(1 - cos), rtol=1e-5)
  assert out["pred"].shape == (4, 16, teacher.width)
  # The teacher is state, not a parameter: the gradient has no teacher entry at all.
  grads = jax.grad(lambda p: method.loss(p, extra, {"image": images}, jax.random.key(2),
                                         train=False)[0])(params)
  assert set(grads) == set(params) and "teacher" not in params


def test_training_keeps_the_teacher_frozen_and_the_codebook_on_the_sphere(
    teacher_dir, tmp_path):
  workdir = str(tmp_path / "run")
  state = train.run(tiny_vqkd_config(teacher_dir, total_steps=4), workdir)
  loaded = registry.build_method(tiny_vqkd_config(teacher_dir)).target.load_extra()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extra["teacher"]), loaded)
  np.testing.assert_allclose(np.linalg.norm(state.extra["codebook"], axis=-1), 1.0, rtol=1e-5)
  info = io.read_info(workdir)
  assert info["feature_dim"] == 64 and info["kind"] == "vq" and info["l2_normalize"]


@pytest.mark.parametrize("overrides,match", [
    ({"tokenizer.l2_normalize": False}, r"config.tokenizer.l2_normalize=False.*cosine"),
    ({"teacher.block": 7}, r"config.teacher.block=7.*\[1, 2\]"),
    ({"teacher.block": 3}, r"config.teacher.block=3.*\[1, 2\]"),  # the teacher has 2 blocks
    ({"teacher.block": -1}, r"config.teacher.block=-1.*0 \(the output"),  # teacher.layer's -1
    ({"teacher.norm": "batch"}, r"config.teacher.norm='batch'"),
])
def test_bad_fields_fail_at_start_up_naming_the_field(teacher_dir, overrides, match):
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(tiny_vqkd_config(teacher_dir, **overrides))


def _fmnist_config(name: str, **overrides):
  spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_defaults.override(module.get_config("runlocal"), **overrides)


@requires_fmnist
def test_short_run_on_fashion_mnist_lowers_the_loss_and_beit_reads_the_export(tmp_path):
  """A micro MAE teacher trained on Fashion-MNIST, 40 VQ-KD steps distilling it, then BEiT
  stage 2 on the exported codes (with its picture of right and wrong predicted codes)."""
  teacher, tokenizer = str(tmp_path / "teacher"), str(tmp_path / "vqkd")
  train_micro_mae_teacher(teacher)
  train.run(_fmnist_config("vqkd_tokenizer_fmnist.py", **{
      "teacher.path": teacher, "global_batch_size": 64, "total_steps": 40,
      "optimizer.warmup_epochs": 0.0, "optimizer.base_lr": 3e-3, "checkpoint_every": 1000,
      "log_every": 1}), tokenizer)
  loss = [r["recon_loss"] for r in map(json.loads, open(os.path.join(tokenizer, "metrics.jsonl")))
          if "recon_loss" in r]
  assert len(loss) == 40 and all(np.isfinite(loss))
  assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5]), (loss[:5], loss[-5:])
  beit = _fmnist_config("beit_fmnist.py", **{"tokenizer.path": tokenizer, "total_steps": 2,
                                             "viz_every": 2})
  state = train.run(beit, str(tmp_path / "beit"))
  assert int(state.step) == 2
  pictures = [f for f in os.listdir(tmp_path / "beit" / "reconstructions")]
  assert pictures
  codes = registry.build_method(beit).target(
      state.extra["tokenizer"], jnp.zeros((2, 28, 28, 1), jnp.float32))
  assert codes.shape == (2, 49) and codes.dtype == jnp.int32
  # BEiT's frozen tokenizer is the export, every array of it (not a fresh one of its shape).
  exported, _ = io.load_tokenizer(tokenizer)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extra["tokenizer"]),
               exported)
