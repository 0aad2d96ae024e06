"""BEiT v2's patch aggregation (`config.patch_aggregation`, models/aggregation.py): what the head
reads, how its loss adds to BEiT's, its blocks' numbering, its checks, and continued
pre-training from BEiT v1 and v2 runs."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config.errors import ConfigError
from mim_jax.convert import our_weights
from mim_jax.models import aggregation, attention, decoders, vit
from mim_jax.objectives import masking
from mim_jax.training import loop as train
from mim_jax.weights import continuation

from conftest import export_random_tokenizer, tiny_beit_config


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return export_random_tokenizer(tiny_beit_config(), str(tmp_path_factory.mktemp("tok")))


def _v2(tokenizer: str = "", **overrides):
  """A 3-block micro BEiT v2: BEiT's ViT (shared relative position bias, layer scale, its
  init), the aggregation reading block 1's patches through 2 blocks."""
  return tiny_beit_config(tokenizer, **{
      "model.depth": 3, "model.rel_pos_bias": "shared", "model.layer_scale": 0.1,
      "model.abs_posemb": False, "model.weight_init": "beit",
      "patch_aggregation.from_block": 1, **overrides})


def _batch(method, n=4):
  images = jax.random.normal(jax.random.key(1), (n, 16, 16, 3))
  mask = method.mask_generator.host(np.random.default_rng(0), n)
  return {"image": images, masking.TOKEN_MASK_KEY: jnp.asarray(mask)}


def _init(method, batch):
  params, extra = method.init(jax.random.key(0), batch["image"])
  return method.load_pretrained(jax.device_get(params), jax.device_get(extra))


def test_the_aggregation_reads_the_last_cls_and_block_k_patches_through_its_blocks(
    tokenizer_dir):
  """The second prediction, written out from the parts: [block 3's CLS, block 1's patches]
  (before the final norm) -> two blocks (layer ids 2 and 3, reading the encoder's shared
  relative position bias) -> the encoder's final norm -> the same linear head."""
  method = registry.build_method(_v2(tokenizer_dir))
  batch = _batch(method)
  params, _ = _init(method, batch)
  assert set(params) == {"encoder", "predictor", "aggregation"}
  mask = batch[masking.TOKEN_MASK_KEY]
  pred, more = method.model.apply({"params": params}, batch["image"], mask)

  enc = method.model.encoder
  tokens, aux = enc.apply({"params": params["encoder"]}, batch["image"], token_mask=mask)
  head = decoders.LinearPredictor(16, kernel_init=nn.initializers.zeros)
  np.testing.assert_array_equal(pred, head.apply({"params": params["predictor"]}, tokens))
  x = jnp.concatenate([aux["blocks"][2][:, :1], aux["blocks"][0][:, 1:]], axis=1)
  own = params["encoder"]["transformer"]
  index = attention.relative_position_index((4, 4), (4, 4))
  bias = attention.RelativePositionBias((4, 4), 2).apply({"params": own["rel_pos_bias"]}, index)
  for j in range(2):
    block = vit.Block(2, 256, layer_scale=0.1, weight_init="beit", layer_id=2 + j)
    x = block.apply({"params": params["aggregation"]["blocks_" + str(j)]}, x, False, bias)
  x = nn.LayerNorm(epsilon=vit.LAYER_NORM_EPS).apply({"params": own["norm"]}, x)
  want = head.apply({"params": params["predictor"]}, x)
  np.testing.assert_allclose(more["aggregation"], want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(more["aggregation"], pred, atol=1e-3)


def test_the_two_cross_entropies_add_and_from_block_0_is_beit_v1(tokenizer_dir):
  """loss = BEiT's loss (the same number as a BEiT v1 model with these encoder and head
  weights) + the aggregation's cross-entropy on the same codes and masks; both heads' accuracy
  is logged, and the gradient reaches the aggregation blocks."""
  v2 = registry.build_method(_v2(tokenizer_dir))
  v1 = registry.build_method(_v2(tokenizer_dir, **{"patch_aggregation.from_block": 0}))
  batch = _batch(v2)
  params, extra = _init(v2, batch)
  loss, (m, _) = jax.jit(v2.loss)(params, extra, batch, jax.random.key(3))
  v1_params = {k: v for k, v in params.items() if k != "aggregation"}
  v1_loss, (v1_m, _) = jax.jit(v1.loss)(v1_params, extra, batch, jax.random.key(3))
  assert "mim_loss" not in v1_m and "aggregation_loss" not in v1_m
  np.testing.assert_allclose(m["mim_loss"], v1_loss, rtol=1e-6)
  np.testing.assert_allclose(loss, m["mim_loss"] + m["aggregation_loss"], rtol=1e-6)
  assert m["loss"] == loss and m["accuracy"] == v1_m["accuracy"]
  assert 0 <= float(m["aggregation_accuracy"]) <= 1 and float(m["aggregation_loss"]) > 0
  grads = jax.grad(lambda p: v2.loss(p, extra, batch, jax.random.key(3))[0])(params)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["aggregation"]))


def test_drop_path_rates_follow_the_releases_ramp():
  """torch.linspace(0, rate, max(depth, early + head))[early:early + head] of the release."""
  for depth, k, d in [(12, 9, 2), (24, 21, 2), (6, 5, 3), (2, 1, 1)]:
    want = np.linspace(0, 0.1, max(depth, k + d))[k:k + d]
    np.testing.assert_allclose(aggregation.drop_path_rates(0.1, depth, k, d), want, rtol=1e-12)


def test_the_heads_blocks_start_as_the_releases_layers_from_block_plus_one(tokenizer_dir):
  """BEiT's init divides a block's output projections by sqrt(2 * layer id): the head's blocks
  after block 2 of 4 are drawn as blocks 3 and 4 (fix_init_cls_pt_weight), not 1 and 2."""
  method = registry.build_method(_v2(tokenizer_dir, **{
      "model.depth": 4, "patch_aggregation.from_block": 2, "model.width": 128,
      "model.mlp_dim": 512}))
  params, _ = _init(method, _batch(method))
  std = lambda blocks, name: float(np.std(blocks[name]["mlp"]["fc2"]["kernel"]))
  enc, agg = params["encoder"]["transformer"], params["aggregation"]
  for j, layer in enumerate((3, 4)):
    ratio = std(agg, f"blocks_{j}") / std(enc, "blocks_0")
    np.testing.assert_allclose(ratio, 1 / np.sqrt(layer), rtol=0.03)
    np.testing.assert_allclose(std(agg, f"blocks_{j}") / std(enc, f"blocks_{layer - 1}"), 1,
                               rtol=0.03)


@pytest.mark.parametrize("overrides,field,match", [
    ({"patch_aggregation.from_block": 3}, "patch_aggregation.from_block", "block 1 .. 2"),
    ({"patch_aggregation.from_block": -1}, "patch_aggregation.from_block", "0 .off."),
    ({"patch_aggregation.depth": 0}, "patch_aggregation.depth", "an integer >= 1"),
    ({"patch_aggregation.from_block": 0, "patch_aggregation.depth": 3},
     "patch_aggregation.depth", "only patch_aggregation.from_block > 0 reads it")])
def test_bad_aggregation_settings_are_refused(overrides, field, match, tokenizer_dir):
  config = _v2(tokenizer_dir, **overrides)
  with pytest.raises(ConfigError, match=f"config.{field}=.*{match}"):
    registry.validate_config(config)


def test_continued_pre_training_loads_the_aggregation_from_a_beit2_run_only(tokenizer_dir,
                                                                             tmp_path):
  """From a BEiT v1 run the aggregation starts fresh (drawn under model.weight_init, which is
  then read); from a BEiT v2 run it is loaded (and weight_init, drawing nothing, is refused).
  The export holds the encoder alone; the run logs both heads' losses."""
  steps = {"total_steps": 2, "num_epochs": 1, "checkpoint_every": 2}
  v1_dir, v2_dir = str(tmp_path / "v1"), str(tmp_path / "v2")
  train.run(_v2(tokenizer_dir, **{"patch_aggregation.from_block": 0}, **steps), v1_dir)
  from_v1 = _v2(tokenizer_dir, init_from=v1_dir, **steps)
  registry.validate_config(from_v1)  # model.weight_init='beit' draws the aggregation: read
  method = registry.build_method(from_v1)
  fresh, _ = method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  _, report = continuation.merge_source(jax.device_get(fresh), from_v1)
  assert "aggregation (not in the source)" in report.fresh, report
  assert {"encoder", "predictor"} <= set(report.loaded), report
  train.run(from_v1, v2_dir)
  rows = [json.loads(line) for line in open(os.path.join(v2_dir, "metrics.jsonl"))]
  logged = next(r for r in rows if "aggregation_loss" in r)
  assert {"mim_loss", "aggregation_accuracy", "accuracy"} <= set(logged)
  assert logged["loss"] == pytest.approx(logged["mim_loss"] + logged["aggregation_loss"],
                                         rel=1e-5)
  _, _, parts = our_weights.saved_parts(os.path.join(v2_dir, "encoder"))
  assert set(parts) == {"encoder"}

  from_v2 = _v2(tokenizer_dir, init_from=v2_dir, **steps)
  with pytest.raises(ConfigError, match="config.model.weight_init=.*init_from replaces"):
    registry.validate_config(from_v2)
  from_v2.model.weight_init = registry.base_config("beit").model.weight_init
  registry.validate_config(from_v2)
  _, report = continuation.merge_source(jax.device_get(fresh), from_v2)
  assert {"encoder", "predictor", "aggregation"} <= set(report.loaded), report
