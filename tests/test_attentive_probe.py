"""The attentive probe (evaluate/attentive_probe.py, models.heads.AttentivePoolingHead)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim_jax import registry
from mim_jax.config.errors import ConfigError
from mim_jax.models import flops
from mim_jax.models.heads import AttentivePoolingHead, attentive_head_flops
from mim_jax.training import checkpoint, optim
from mim_jax.training import step as step_lib

from conftest import export_fresh_encoder, tiny_config


def _head_and_params(width=16, heads=2, classes=5, tokens=7):
  head = AttentivePoolingHead(num_classes=classes, num_heads=heads, mlp_ratio=2.0)
  x = jax.random.normal(jax.random.key(0), (3, tokens, width))
  return head, head.init(jax.random.key(1), x)["params"], x


def test_the_head_reads_every_token_as_a_set():
  """The learned query attends over the tokens without positions: the same logits for the
  tokens in any order, other logits when one token changes; float32 [B, classes]."""
  head, params, x = _head_and_params()
  logits = head.apply({"params": params}, x)
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  shuffled = x[:, np.random.default_rng(0).permutation(x.shape[1])]
  np.testing.assert_allclose(head.apply({"params": params}, shuffled), logits, atol=1e-5)
  other = jax.random.normal(jax.random.key(5), x[:, 4].shape)  # not a shift: it is normalised
  changed = head.apply({"params": params}, x.at[:, 4].set(other))
  assert np.abs(np.asarray(changed - logits)).min() > 1e-4
  # Softmax attention: a copy of every token changes nothing (the weights split evenly).
  np.testing.assert_allclose(head.apply({"params": params}, jnp.concatenate([x, x], 1)),
                             logits, atol=1e-5)


def test_the_head_flops_match_xla_within_its_elementwise_share():
  head, params, x = _head_and_params(width=64, heads=4, tokens=50)
  cost = jax.jit(lambda p, t: head.apply({"params": p}, t)).lower(params, x).compile()
  xla = cost.cost_analysis()
  xla = (xla[0] if isinstance(xla, list) else xla)["flops"] / x.shape[0]
  ours = attentive_head_flops(50, 64, 128, 5)
  assert 0.9 < xla / ours < 1.15, (xla, ours)


def _probe_config(encoder_dir, **overrides):
  return tiny_config("attentive_probe", init_from=encoder_dir, **overrides)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  return export_fresh_encoder(tiny_config("mae"), str(tmp_path_factory.mktemp("encoder")))


@pytest.mark.parametrize("block", [0, 1])
def test_the_probe_reads_the_loaded_encoder_at_its_block(encoder_dir, block):
  """The exported weights are loaded into the frozen encoder (not its random init), and the
  tokens read are block `probe_layer`'s (0: the output after the final norm)."""
  config = _probe_config(encoder_dir, **{"classifier.probe_layer": block})
  method = registry.build_method(config)
  state = step_lib.with_initial_weights(method, step_lib.init_train_state(
      method, optax.adamw(1e-3), jax.random.key(1), (1, *config.image_size, config.channels)))
  loaded, _ = checkpoint.load_encoder(os.path.join(encoder_dir, "encoder"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extra["encoder"]), loaded)
  images = jax.random.normal(jax.random.key(0), (2, *config.image_size, config.channels))
  out, aux = method.encoder.apply({"params": loaded}, images, train=False)
  np.testing.assert_allclose(method.tokens(state.extra["encoder"], images),
                             out if block == 0 else aux["blocks"][block - 1], atol=1e-6)


def test_weight_decay_skips_the_heads_biases_and_query():
  head, params, _ = _head_and_params()
  mask = optim.weight_decay_mask(params)
  assert mask["attn"]["query"]["kernel"] and mask["mlp"]["fc1"]["kernel"] and mask["head"][
      "kernel"]
  assert params["attn"]["query"]["bias"].ndim == 2 and not mask["attn"]["query"]["bias"]
  assert not (mask["query_token"] or mask["mlp"]["fc1"]["bias"] or mask["norm"]["scale"])


@pytest.mark.parametrize("init_from", ["encoder", "random"])
def test_training_moves_the_head_only(encoder_dir, init_from):
  """Steps of the loop's train step: the head learns a fixed batch (its loss falls) from the
  loaded encoder's tokens and from a random encoder's (the baseline); the encoder, in extra,
  stays as it was."""
  config = _probe_config(encoder_dir if init_from == "encoder" else "random",
                         **{"optimizer.base_lr": 1e-2, "optimizer.warmup_epochs": 0.0})
  registry.validate_config(config)
  method = registry.build_method(config)
  images = jax.random.normal(jax.random.key(0), (8, *config.image_size, config.channels))
  batch = {"image": images, "label": jnp.arange(8) % 4}
  tx = optax.adamw(1e-2)
  state = step_lib.with_initial_weights(method, step_lib.init_train_state(
      method, tx, jax.random.key(1), (1, *images.shape[1:])))
  params, extra = state.params, state.extra
  step = jax.jit(step_lib.make_train_step(method, tx, lambda s: 1e-2))
  first = None
  for _ in range(30):
    state, metrics = step(state, batch, jax.random.key(2))
    first = float(metrics["loss"]) if first is None else first
  assert float(metrics["loss"]) < 0.5 * first, (first, float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, state.extra["encoder"], extra["encoder"])
  assert not np.allclose(state.params["head"]["query_token"], params["head"]["query_token"])


def test_forward_flops_count_the_frozen_encoder_once(encoder_dir):
  config = _probe_config(encoder_dir)
  forward = registry.forward_flops(config)
  assert forward["teacher"] == forward["encoder"] > forward["head"] > 0
  assert flops.train_flops(forward) == pytest.approx(forward["encoder"] + 3 * forward["head"])


@pytest.mark.parametrize("overrides,match", [
    ({"init_from": ""}, r"config.init_from='' is invalid: a pre-training or fine-tuning"),
    ({"attentive.num_heads": 3}, r"config.attentive.num_heads=3 is invalid: 0 \(the encoder's "
                                 r"heads\) or a divisor of the encoder width"),
    ({"attentive.mlp_ratio": 0}, r"config.attentive.mlp_ratio=0.0 is invalid: a positive number"),
    ({"attentive.mlp_ratio": 0.001}, r"config.attentive.mlp_ratio=0.001 is invalid: .*at least "
                                     r"one unit wide"),
    ({"classifier.probe_layer": 9}, r"config.classifier.probe_layer=9 is invalid"),
    ({"model.drop_path_rate": 0.1}, r"model.drop_path_rate=0.1 is not used: the probe's "
                                    r"encoder is frozen"),
])
def test_bad_fields_are_refused_naming_them(encoder_dir, overrides, match):
  config = _probe_config(encoder_dir)
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(config)
