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


@pytest.mark.parametrize("rel_pos_bias", ["shared", "per_block"])
def test_the_aggregation_reads_the_last_cls_and_block_k_patches_through_its_blocks(
    rel_pos_bias, tokenizer_dir):
  """The second prediction, written out from the parts: [block 3's CLS, block 1's patches]
  (before the final norm) -> two blocks (layer ids 2 and 3, reading the encoder's shared
  relative position bias, or each its own table) -> the encoder's final norm -> the same
  linear head."""
  method = registry.build_method(_v2(tokenizer_dir, **{"model.rel_pos_bias": rel_pos_bias}))
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
  shared = rel_pos_bias == "shared"
  bias = attention.RelativePositionBias((4, 4), 2).apply(
      {"params": own["rel_pos_bias"]}, index) if shared else None
  for j in range(2):
    block = vit.Block(2, 256, layer_scale=0.1, weight_init="beit", layer_id=2 + j,
                      rel_pos_grid=None if shared else (4, 4))
    x = block.apply({"params": params["aggregation"]["blocks_" + str(j)]}, x, False, bias,
                    None if shared else index)
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
  assert m["accuracy"] == v1_m["accuracy"]
  assert 0 <= float(m["aggregation_accuracy"]) <= 1 and float(m["aggregation_loss"]) > 0
  # The aggregation's loss alone reaches its blocks, the encoder's final norm and shared
  # bias table it reads, and the blocks above block 1 through the [CLS] token only.
  grads = jax.grad(lambda p: v2.loss(p, extra, batch, jax.random.key(3))[1][0][
      "aggregation_loss"])(params)
  enc = grads["encoder"]["transformer"]
  for part in (grads["aggregation"], enc["norm"], enc["rel_pos_bias"], enc["blocks_2"]):
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(part))


def test_gradient_accumulation_gives_the_whole_batchs_step_and_metrics(tokenizer_dir):
  """Half the images unmasked, so micro-batches hold different counts of masked patches: with
  2 micro-batches the update and every masked mean logged (both heads' losses and accuracies)
  are the whole batch's, and the logged loss is still the sum of the two."""
  import optax

  from mim_jax.methods.base import TrainLength
  from mim_jax.training import step as step_lib
  method = registry.build_method(_v2(tokenizer_dir, **{"masking.mask_probability": 0.5}),
                                 TrainLength(1, 2))
  tx = optax.sgd(1.0)
  state = step_lib.with_initial_weights(
      method, step_lib.init_train_state(method, tx, jax.random.key(0), (1, 16, 16, 3)), None)
  batch = {"image": jax.random.normal(jax.random.key(1), (8, 16, 16, 3)),
           **method.example_extras(8, np.random.default_rng(3))}
  counts = np.asarray(batch[masking.TOKEN_MASK_KEY]).reshape(2, -1).sum(1)
  assert counts[0] != counts[1], counts  # the case: unequal shares
  out = {k: jax.jit(step_lib.make_train_step(method, tx, lambda s: 1.0, k))(
      state, batch, jax.random.key(2)) for k in (1, 2)}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               out[2][0].params, out[1][0].params)
  for name in ("loss", "mim_loss", "aggregation_loss", "accuracy", "aggregation_accuracy"):
    np.testing.assert_allclose(out[2][1][name], out[1][1][name], rtol=1e-5, err_msg=name)
  m = out[2][1]
  np.testing.assert_allclose(m["loss"], m["mim_loss"] + m["aggregation_loss"], rtol=1e-5)


def test_each_head_block_drops_its_path_at_its_own_rate():
  """The rates reach the blocks: a block at rate 0 never drops (the same output under every
  drop-path rng), one at 0.9 does."""
  enc = vit.ViTEncoder((16, 16), 4, width=32, depth=2, num_heads=2, mlp_dim=64,
                       drop_path_rate=0.9)
  x = jax.random.normal(jax.random.key(0), (8, 17, 32))
  for from_block, drops in ((0, False), (1, True)):  # rates [0] and [0.9]
    head = aggregation.AggregationBlocks(enc, from_block, 1)
    params = head.init(jax.random.key(1), x, False, None, None)
    outs = [head.apply(params, x, True, None, None, rngs={"drop_path": jax.random.key(s)})
            for s in range(3)]
    assert (not np.allclose(outs[0], outs[1]) or not np.allclose(outs[0], outs[2])) == drops


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
  # The export is the encoder alone: the same arrays as BEiT v1's.
  assert our_weights.encoder_array_names(os.path.join(v2_dir, "encoder")) == \
      our_weights.encoder_array_names(os.path.join(v1_dir, "encoder"))
  assert set(our_weights.saved_parts(os.path.join(v2_dir, "encoder"))[2]) == {"encoder"}

  from_v2 = _v2(tokenizer_dir, init_from=v2_dir, **steps)
  with pytest.raises(ConfigError, match="config.model.weight_init=.*init_from replaces"):
    registry.validate_config(from_v2)
  from_v2.model.weight_init = registry.base_config("beit").model.weight_init
  registry.validate_config(from_v2)
  _, report = continuation.merge_source(jax.device_get(fresh), from_v2)
  assert {"encoder", "predictor", "aggregation"} <= set(report.loaded), report
  # A head of another depth starts fresh, drawn under model.weight_init, which is read.
  deeper = _v2(tokenizer_dir, init_from=v2_dir, **{"patch_aggregation.depth": 3}, **steps)
  registry.validate_config(deeper)
  fresh3, _ = registry.build_method(deeper).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  _, report = continuation.merge_source(jax.device_get(fresh3), deeper)
  assert "aggregation (its shapes differ from the source's)" in report.fresh, report
