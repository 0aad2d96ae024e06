"""BEiT stage 2: cross-entropy on masked patches only, the frozen tokenizer in `extra`, a short
run on Fashion-MNIST, and the config errors for a missing or unfitting tokenizer."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config.errors import ConfigError
from mim_jax.objectives import losses, masking
from mim_jax.training import loop as train

from conftest import (
  REPO,
  export_random_tokenizer,
  requires_fmnist,
  tiny_beit_config,
  tiny_mae_config,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return export_random_tokenizer(tiny_beit_config(), str(tmp_path_factory.mktemp("tok")))


# --- the loss -------------------------------------------------------------------------------


def test_masked_cross_entropy_equals_cross_entropy_on_known_numbers():
  logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 3.0, 0.0]]])
  labels = jnp.array([[0, 2, 1]])
  mask = jnp.array([[True, True, False]])
  lse = lambda row: np.log(np.sum(np.exp(row)))
  want = np.mean([lse([2.0, 0.0, -1.0]) - 2.0, lse([0.5, 0.5, 0.5]) - 0.5])
  assert float(losses.masked_cross_entropy(logits, labels, mask)) == pytest.approx(want, rel=1e-6)


def test_loss_counts_masked_positions_only():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 6))
  mask = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]], bool)
  base = losses.masked_cross_entropy(logits, labels, mask)
  logits2, labels2 = logits.copy(), labels.copy()
  logits2[~mask] = rng.normal(size=logits2[~mask].shape) * 10
  labels2[~mask] = (labels2[~mask] + 1) % 5
  assert float(losses.masked_cross_entropy(logits2, labels2, mask)) == pytest.approx(float(base))
  logits2[0, 0, labels[0, 0]] += 5.0  # a masked position does change it
  assert float(losses.masked_cross_entropy(logits2, labels2, mask)) < float(base)


# --- the method -----------------------------------------------------------------------------


def _state(config):
  method = registry.build_method(config)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  params, extra = method.init(jax.random.key(0), images)
  params, extra = method.load_pretrained(jax.device_get(params), jax.device_get(extra))
  mask = method.mask_generator.host(np.random.default_rng(0), 4)
  return method, params, extra, {"image": images, masking.TOKEN_MASK_KEY: jnp.asarray(mask)}


def test_a_fresh_state_takes_the_frozen_tokenizer_through_with_initial_weights(tokenizer_dir):
  """init_train_state holds zeros where the frozen tokenizer goes (a loop of one's own that
  stopped there trained against them without an error); with_initial_weights, what the
  trainer calls, reads it in; a method that reads no weights keeps its state as it is."""
  import optax

  from mim_jax.tokenizers import io
  from mim_jax.training import step as step_lib
  method = registry.build_method(tiny_beit_config(tokenizer_dir))
  tx = optax.adamw(1e-3)
  fresh = step_lib.init_train_state(method, tx, jax.random.key(0), (1, 16, 16, 3))
  assert not np.any(np.asarray(fresh.extra["tokenizer"]["codebook"]))
  state = step_lib.with_initial_weights(method, fresh)
  loaded, _ = io.load_tokenizer(tokenizer_dir)
  np.testing.assert_array_equal(state.extra["tokenizer"]["codebook"], loaded["codebook"])
  mae = registry.build_method(tiny_mae_config())
  mae_state = step_lib.init_train_state(mae, tx, jax.random.key(0), (1, 16, 16, 3))
  assert step_lib.with_initial_weights(mae, mae_state) is mae_state


def test_targets_are_the_frozen_tokenizers_codes_and_get_no_gradient(tokenizer_dir):
  from mim_jax.tokenizers import io
  from mim_jax.tokenizers import models as tokenizers_models
  method, params, extra, batch = _state(tiny_beit_config(tokenizer_dir))
  loaded, _ = io.load_tokenizer(tokenizer_dir)
  np.testing.assert_array_equal(extra["tokenizer"]["codebook"], loaded["codebook"])
  codes = method.targets(extra, batch["image"])
  np.testing.assert_array_equal(
      codes, tokenizers_models.tokenize(method.target.model, loaded, batch["image"], True))
  loss_of_extra = lambda ex: method.loss(params, ex, batch, jax.random.key(2))[0]
  grads = jax.grad(loss_of_extra)(jax.tree.map(jnp.asarray, extra))
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  loss, (metrics, new_extra) = method.loss(params, extra, batch, jax.random.key(2),
                                          train=False)
  jax.tree.map(np.testing.assert_array_equal, new_extra, extra)
  # By their formulas on the masked positions: cross-entropy against the codes, the accuracy
  # of the predicted code, the fraction masked.
  mask = np.asarray(batch[masking.TOKEN_MASK_KEY])
  logits = np.asarray(method.model.apply({"params": params}, batch["image"], mask), np.float64)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, np.asarray(codes)[..., None], -1)[..., 0]
  hit = logits.argmax(-1) == np.asarray(codes)
  assert 0 < mask.mean() < 1 and hit[mask].mean() != hit.mean()  # masked-only is visible
  np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-5)
  assert float(metrics["accuracy"]) == pytest.approx(hit[mask].mean())
  assert float(metrics["mask_fraction"]) == pytest.approx(mask.mean())
  out = method.reconstruct(params, batch, jax.random.key(3), extra)
  picture = method.picture(np.asarray(batch["image"]), jax.device_get(out))
  assert picture.dtype == np.uint8 and picture.shape[-1] == 3


# --- bad tokenizers -------------------------------------------------------------------------


@pytest.mark.parametrize("case,match", [
    ("empty", r"config.tokenizer.path=''.*--config=configs/beit_tokenizer_fmnist.py"),
    ("missing", r"nothing exists there.*beit_tokenizer_fmnist.py"),
    ("not_a_tokenizer", r"this is not a tokenizer.*--config.tokenizer.path"),
    ("vocab", r"config.tokenizer.vocab_size=32 is invalid: the vocabulary size 16"),
    ("image_size", r"config.image_size=\(32, 32\) is invalid: the image size \(16, 16\)"),
    ("patch", r"config.model.variant='mu/8' is invalid: a patch size of 4, the tokenizer's, not 8"),
    ("channels", r"config.channels=1 is invalid: the 3 channels"),
])
def test_bad_tokenizer_fails_at_start_up(case, match, tokenizer_dir, tmp_path):
  c = tiny_beit_config(tokenizer_dir)
  if case == "empty":
    c.tokenizer.path = ""
  elif case == "missing":
    c.tokenizer.path = str(tmp_path / "nowhere")
  elif case == "not_a_tokenizer":
    os.makedirs(tmp_path / "encoder")
    (tmp_path / "encoder" / "model.json").write_text("{}")
    c.tokenizer.path = str(tmp_path)
  elif case == "vocab":
    c.tokenizer.vocab_size = 32
  elif case == "image_size":
    c.image_size = (32, 32)
  elif case == "patch":
    c.model.variant = "mu/8"
    c.masking.min_block = 1  # a 2x2 grid: a budget of one patch
  elif case == "channels":
    c.channels = 1
    c.data.update(mean=(0.5,), std=(0.5,))
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(c)
  with pytest.raises(ConfigError, match=match):
    train.run(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")  # nothing started


# --- a short run on real data ---------------------------------------------------------------


@pytest.mark.long
@requires_fmnist
def test_short_beit_run_on_a_trained_tokenizer_lowers_its_loss(tmp_path):
  from ml_collections import config_flags
  load = lambda name: config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      "config", str(REPO / "configs" / name)).get_config()
  tok = load("beit_tokenizer_fmnist.py")
  tok.update(total_steps=30, log_every=30, viz_every=0, global_batch_size=64)
  tok.tokenizer.update(vocab_size=64, width=16, num_blocks=1, restart_after=10)
  tok.optimizer.update(base_lr=4e-3, warmup_epochs=0.01)  # peak 1e-3 after 10 steps
  train.run(tok, str(tmp_path / "tokenizer"))
  c = load("beit_fmnist.py")
  c.tokenizer.update(path=str(tmp_path / "tokenizer"), vocab_size=64)
  c.model.update(variant="mu/4", width=0, depth=0, num_heads=0, mlp_dim=0)
  c.update(total_steps=40, log_every=5, viz_every=40, global_batch_size=64, export_encoder=False)
  c.optimizer.update(base_lr=4e-3, warmup_epochs=0.01)
  train.run(c, str(tmp_path / "beit"))
  rows = [json.loads(l) for l in open(tmp_path / "beit" / "metrics.jsonl")]
  first = np.mean([r["loss"] for r in rows[:2]])
  last = np.mean([r["loss"] for r in rows[-2:]])
  assert last < first - 0.3, (first, last)
  assert os.path.isfile(tmp_path / "beit" / "reconstructions" / "step_00000040.png")


def test_beit_configs_follow_the_recipe():
  from ml_collections import config_flags
  load = lambda name: config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      "config", str(REPO / "configs" / name)).get_config()
  c = load("beit_vitb.py")
  assert (c.method, c.model.variant, c.global_batch_size, c.num_epochs) == ("beit", "B/16", 2048, 800)
  o = c.optimizer
  assert (o.base_lr * c.global_batch_size / o.lr_batch_reference, o.b1, o.b2) == (1.5e-3, 0.9, 0.999)
  assert (o.weight_decay, o.warmup_epochs, o.clip_grad_norm, c.model.drop_path_rate) == (
      0.05, 10, 3.0, 0.1)
  assert (c.masking.kind, c.masking.ratio, c.masking.min_block, c.masking.min_aspect) == (
      "blockwise", 0.4, 16, 0.3)
  assert c.tokenizer.vocab_size == 8192
  t = load("beit_tokenizer_imagenet.py")
  assert (t.method, t.model.variant, tuple(t.image_size), t.tokenizer.vocab_size) == (
      "vq_tokenizer", "B/16", (224, 224), 8192)
  f, tf = load("beit_fmnist.py"), load("beit_tokenizer_fmnist.py")
  mae = load("mae_fmnist.py")
  assert f.model.to_dict() == {k: v for k, v in mae.model.items() if k in f.model}
  assert f.num_epochs == mae.num_epochs
  assert f.optimizer.base_lr == mae.optimizer.base_lr and f.global_batch_size == 256
  assert f.tokenizer.vocab_size == tf.tokenizer.vocab_size == 512
  assert f.tokenizer.path == "/tmp/beit_tokenizer_fmnist"
