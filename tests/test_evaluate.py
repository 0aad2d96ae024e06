"""Linear probe, fine-tuning and k-NN: pre-trained weights, frozen encoders, layer decay, jobs."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mim_jax import registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.evaluate.finetune import FineTune
from mim_jax.evaluate.linear_probe import LinearProbe
from mim_jax.models import vit
from mim_jax.models.heads import encoder_features
from mim_jax.training import checkpoint, optim
from mim_jax.training import loop as train
from mim_jax.weights import pretrained

from conftest import export_fresh_encoder, tiny_config, tiny_mae_config


@pytest.fixture(scope="module")
def pretrained_workdir(tmp_path_factory):
  """A finished (3-step) micro MAE pre-training on 16x16 synthetic images, with its export."""
  workdir = str(tmp_path_factory.mktemp("mae"))
  train.run(tiny_mae_config(total_steps=3, log_every=3), workdir)
  assert os.path.isfile(os.path.join(workdir, "encoder", "model.json"))
  return workdir


def _eval_config(method, init_from, **overrides):
  c = tiny_mae_config(method=method, init_from=init_from)
  c.eval.batch_size = 16
  if method == "linprobe":
    c.optimizer.update(name="sgd", base_lr=0.1, weight_decay=0.0)
  if method == "finetune":
    c.optimizer.layer_decay = 0.75 if init_from not in ("", "random") else 1.0
    c.classifier.update(pool="gap", mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
  return config_defaults.override(c, **overrides)


# ---- layer-wise learning-rate decay ---------------------------------------------------------

def test_layer_ids_follow_beit_mae_convention():
  depth = 12
  assert optim.vit_layer_id("encoder/patch_embed/kernel", depth) == 0
  assert optim.vit_layer_id("encoder/cls_token", depth) == 0
  assert optim.vit_layer_id("encoder/pos_embed", depth) == 0
  assert optim.vit_layer_id("encoder/transformer/blocks_0/mlp/fc1/kernel", depth) == 1
  assert optim.vit_layer_id("encoder/transformer/blocks_11/attn/qkv/bias", depth) == 12
  assert optim.vit_layer_id("encoder/transformer/encoder_norm/scale", depth) == 13
  assert optim.vit_layer_id("head/kernel", depth) == 13
  assert optim.vit_layer_id("fc_norm/scale", depth) == 13


def test_layer_decay_scales_updates_per_layer():
  params = {"encoder": {"patch_embed": {"kernel": jnp.ones((4, 2))},
                        "transformer": {"blocks_0": {"w": jnp.ones((2, 2))},
                                        "blocks_1": {"w": jnp.ones((2, 2))}}},
            "head": {"kernel": jnp.ones((2, 3))}}
  cfg = ml_collections.ConfigDict(dict(name="sgd", momentum=0.0, weight_decay=0.0,
                                       clip_grad_norm=0.0, layer_decay=0.5))
  tx = optim.build_optimizer(cfg, optax.constant_schedule(1.0))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # depth 2: embeddings 0.5^3, block 0 0.5^2, block 1 0.5, head 1.
  assert float(updates["encoder"]["patch_embed"]["kernel"][0, 0]) == pytest.approx(-0.125)
  assert float(updates["encoder"]["transformer"]["blocks_0"]["w"][0, 0]) == pytest.approx(-0.25)
  assert float(updates["encoder"]["transformer"]["blocks_1"]["w"][0, 0]) == pytest.approx(-0.5)
  assert float(updates["head"]["kernel"][0, 0]) == pytest.approx(-1.0)


def test_lars_momentum_is_applied_before_the_learning_rate():
  """MAE's LARS: mu = m * mu + update; p -= lr * mu (lr of the current step)."""
  params = {"w": jnp.ones((2, 2))}
  cfg = ml_collections.ConfigDict(dict(name="lars", momentum=0.9, weight_decay=0.0,
                                       trust_coefficient=1.0, clip_grad_norm=0.0))
  lrs = [1.0, 0.5]
  tx = optim.build_optimizer(cfg, lambda step: jnp.asarray(lrs)[step])
  state = tx.init(params)
  grads = {"w": jnp.ones((2, 2))}
  _, state = tx.update(grads, state, params)
  second, _ = tx.update(grads, state, params)
  # trust ratio 1 * |w| / |g| = 1: updates are the momentum buffer (1.9 at step 2) x lr 0.5.
  np.testing.assert_allclose(second["w"], -0.5 * 1.9, rtol=1e-6)


def test_lars_skips_weight_decay_and_trust_ratio_on_biases():
  params = {"head": {"kernel": jnp.full((4, 3), 2.0), "bias": jnp.full((3,), 2.0)}}
  cfg = ml_collections.ConfigDict(dict(name="lars", momentum=0.0, weight_decay=0.5,
                                       trust_coefficient=0.001, clip_grad_norm=0.0))
  tx = optim.build_optimizer(cfg, optax.constant_schedule(1.0))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["head"]["bias"], -1.0)  # plain SGD step for the bias
  # kernel: g + wd * w = 2 per entry; trust ratio 0.001 * |w| / |g + wd w| = 0.001
  np.testing.assert_allclose(updates["head"]["kernel"], -0.002, rtol=1e-5)


# ---- position embeddings and loading pre-trained encoders ---------------------------------

def test_resize_posemb_keeps_cls_and_is_identity_on_same_grid():
  table = jnp.asarray(vit.sincos_2d(32, (4, 4), cls_token=True)).at[0].set(7.0)
  assert vit.resize_posemb(table, (4, 4), (4, 4)) is table
  resized = vit.resize_posemb(table, (4, 4), (6, 8))
  assert resized.shape == (1 + 48, 32)
  np.testing.assert_array_equal(resized[0], table[0])
  const = jnp.concatenate([table[:1], jnp.full((16, 32), 0.25)])
  np.testing.assert_allclose(vit.resize_posemb(const, (4, 4), (2, 3))[1:], 0.25, atol=1e-6)
  with pytest.raises(ValueError, match="rows"):
    vit.resize_posemb(table, (3, 3), (4, 4))
  # Rows stay rows and columns columns (a non-square grid, so a swapped axis shows): channel 0
  # ramps down the rows, channel 1 across the columns, and so after the resize.
  rows, cols = np.meshgrid(np.arange(3.0), np.arange(5.0), indexing="ij")
  grid = np.zeros((3, 5, 32), np.float32)
  grid[..., 0], grid[..., 1] = rows, cols
  ramps = jnp.concatenate([table[:1], jnp.asarray(grid.reshape(15, 32))])
  out = np.asarray(vit.resize_posemb(ramps, (3, 5), (6, 10))[1:]).reshape(6, 10, 32)
  np.testing.assert_allclose(out[..., 0], out[:, :1, 0].repeat(10, 1), atol=1e-5)
  np.testing.assert_allclose(out[..., 1], out[:1, :, 1].repeat(6, 0), atol=1e-5)
  assert (np.diff(out[:, 0, 0]) >= -1e-6).all() and out[-1, 0, 0] - out[0, 0, 0] > 1.5
  assert (np.diff(out[0, :, 1]) >= -1e-6).all() and out[0, -1, 1] - out[0, 0, 1] > 3


def test_finetune_starts_from_the_pretrained_function(pretrained_workdir):
  """At step 0 the fine-tuning encoder (learned positions) equals the pre-trained one."""
  config = pretrained.adopt_encoder_config(_eval_config("finetune", pretrained_workdir))
  method = FineTune(config)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params, extra = method.init(jax.random.key(1), images)
  params, extra = method.load_pretrained(jax.device_get(params), extra)
  loaded, _ = checkpoint.load_encoder(os.path.join(pretrained_workdir, "encoder"))
  np.testing.assert_array_equal(params["encoder"]["patch_embed"]["kernel"],
                                loaded["patch_embed"]["kernel"])
  np.testing.assert_allclose(params["encoder"]["pos_embed"],
                             vit.sincos_2d(64, (4, 4), cls_token=True))
  sincos_encoder = vit.encoder_from_config(config.model, (16, 16), 3)
  learned_encoder = method.model.encoder
  want = encoder_features(sincos_encoder, loaded, images, pool="gap")
  got = encoder_features(learned_encoder, params["encoder"], images, pool="gap")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_finetune_at_a_new_resolution_resizes_positions(pretrained_workdir):
  config = pretrained.adopt_encoder_config(
      _eval_config("finetune", pretrained_workdir, image_size=(24, 32)))
  method = FineTune(config)
  params, extra = method.init(jax.random.key(1), jnp.zeros((1, 24, 32, 3)))
  params, _ = method.load_pretrained(jax.device_get(params), extra)
  # Pre-training used fixed sin-cos positions on a 4x4 grid: that table, resized (MAE's
  # interpolate_pos_embed), starts the learned positions of the 6x8 grid.
  want = vit.resize_posemb(jnp.asarray(vit.sincos_2d(64, (4, 4), cls_token=True)), (4, 4), (6, 8))
  np.testing.assert_allclose(params["encoder"]["pos_embed"], want, rtol=1e-6, atol=1e-6)
  assert params["encoder"]["pos_embed"].shape == (1 + 48, 64)


def test_incompatible_pretrained_encoder_is_reported(pretrained_workdir):
  config = pretrained.adopt_encoder_config(_eval_config("finetune", pretrained_workdir))
  config.model.width = 32  # not the exported width
  config.model.num_heads = 2
  method = FineTune(config)
  params, extra = method.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match=r"pre-trained parameter .* has shape \(1, 1, 64\), the model expects \(1, 1, 32\)"):
    method.load_pretrained(jax.device_get(params), extra)


@pytest.mark.parametrize("damage", ["other_encoder", "model_json_without_config",
                                    "model_json_cut_short", "params_missing"])
def test_an_export_that_cannot_be_loaded_is_one_config_error_naming_it(tmp_path, damage):
  """An export of another encoder type (or an older parameter layout), a model.json without
  the encoder's config or cut short, a params/ folder gone (a re-export cut short): a
  ConfigError naming the folder (exit 2, one line), not a KeyError or Orbax's traceback."""
  good = export_fresh_encoder(tiny_mae_config(), str(tmp_path / "good"))
  export = tmp_path / "export"
  shutil.copytree(os.path.join(good, "encoder"), export)
  info = json.loads((export / "model.json").read_text())
  if damage == "other_encoder":
    shutil.rmtree(export / "params")
    checkpoint.export_encoder(str(export), {"blocks": {"w": np.zeros((3, 3), np.float32)}},
                              info)
  elif damage == "model_json_without_config":
    (export / "model.json").write_text(json.dumps({k: v for k, v in info.items()
                                                   if k != "config"}))
  elif damage == "model_json_cut_short":
    (export / "model.json").write_text((export / "model.json").read_text()[:40])
  else:
    shutil.rmtree(export / "params")
  config = pretrained.adopt_encoder_config(_eval_config("linprobe", good))
  encoder = vit.encoder_from_config(config.model, config.image_size, config.channels)
  what = {"other_encoder": r"has no counterpart in the model",
          "model_json_without_config": r"model.json lacks config.model.variant",
          "model_json_cut_short": r"model.json is unreadable",
          "params_missing": r"params/ folder \(the weights\) is missing"}[damage]
  with pytest.raises(ConfigError, match=f"the encoder export {re.escape(str(export))} cannot "
                     f"be loaded: .*{what}"):
    pretrained.encoder_params_for(encoder, str(export), config.image_size, config.channels)
  if damage.startswith("model_json"):  # what an evaluation reads first: the encoder's config
    with pytest.raises(ConfigError, match=re.escape(str(export))):
      pretrained.adopt_encoder_config(_eval_config("linprobe", str(export)))


def test_adopt_encoder_config_takes_size_from_the_export(pretrained_workdir, caplog):
  """The export decides the encoder; the fields it replaces are named in the log (a config
  file's or a program's values; the command line's are refused, `refuse_dropped_overrides`)."""
  config = _eval_config("linprobe", pretrained_workdir)
  config.model.update(variant="B/16", width=0)
  with caplog.at_level(logging.INFO, logger="mim_jax.weights.pretrained"):
    adopted = pretrained.adopt_encoder_config(config)
  assert adopted.model.variant == "mu/4" and config.model.variant == "B/16"
  assert "the config's encoder fields replaced: model.variant='B/16' -> 'mu/4'" in caplog.text


def test_an_evaluation_normalises_its_inputs_as_the_encoder_learned(tmp_path, caplog):
  """The jobs and classifiers normalised with their config's mean / std (ImageNet's in the
  base configs) whatever the encoder was trained with: features of another input scale, no
  word said. The export's values are adopted, unless the command line set others."""
  export_fresh_encoder(tiny_config("mae", **{"data.mean": (0.9,), "data.std": (0.05,)}),
                       str(tmp_path))
  job = tiny_config("knn", init_from=str(tmp_path))
  assert tuple(job.data.mean) != (0.9,)
  with caplog.at_level(logging.INFO, logger="mim_jax.weights.pretrained"):
    adopted = pretrained.adopt_encoder_config(job, file_config=job)
  assert tuple(adopted.data.mean) == (0.9,) and tuple(adopted.data.std) == (0.05,)
  assert f"data.mean={tuple(job.data.mean)!r} -> (0.9,)" in caplog.text
  # One value per channel equal to the single stored one: nothing to replace.
  same = config_defaults.override(job.copy_and_resolve_references(),
                                  **{"data.mean": (0.9,) * 3, "data.std": (0.05,) * 3})
  assert tuple(pretrained.adopt_encoder_config(same, file_config=same).data.mean) == (0.9,) * 3
  # Set on the command line (it differs from the file's): kept, with a warning.
  command_line = config_defaults.override(job.copy_and_resolve_references(),
                                          **{"data.mean": (0.25,)})
  with caplog.at_level(logging.WARNING, logger="mim_jax.weights.pretrained"):
    kept = pretrained.adopt_encoder_config(command_line, file_config=job)
  assert tuple(kept.data.mean) == (0.25,) and tuple(kept.data.std) == (0.05,)
  assert "config.data.mean=(0.25,) from the command line, not the (0.9,)" in caplog.text


def test_a_size_recipe_refuses_an_encoder_of_another_size(pretrained_workdir):
  """configs/finetune_imagenet.py:size=L holds ViT-L's lr, layer decay and drop path: on the
  exported mu/4 encoder (width 64, depth 2) they would apply unnoticed."""
  from mim_jax.config import files as config_files
  from mim_jax.training import setup
  imagenet = config_files.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "finetune_imagenet.py:size=L"))
  imagenet.init_from = pretrained_workdir
  with pytest.raises(ConfigError, match=r"config.recipe_size='L' is invalid: 'mu', the size "
                     r"of the encoder in init_from=.* \(width 64, depth 2\).*recipe_size=''"):
    setup.prepare(imagenet)
  config = _eval_config("finetune", pretrained_workdir)
  config.recipe_size = "mu"  # the encoder's own size
  assert pretrained.adopt_encoder_config(config).model.variant == "mu/4"
  config.recipe_size = ""  # any encoder
  assert pretrained.adopt_encoder_config(config).model.variant == "mu/4"


def test_a_size_recipe_from_scratch_refuses_a_configured_encoder_of_another_size():
  """Without init_from the encoder is the config's own: a recipe of another size would train
  it with that size's lr, layer decay and drop path just the same."""
  from mim_jax import registry
  from mim_jax.config import files as config_files
  config = config_files.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "finetune_fmnist.py:scratch"))
  config.recipe_size = "L"
  with pytest.raises(ConfigError, match=r"config.recipe_size='L' is invalid: '' for the encoder "
                     r"in the config's model.\* .*\(width 128, depth 6: no named size\)"):
    registry.validate_config(config)
  config.update(recipe_size="S", model=dict(variant="S/4", width=0, depth=0, num_heads=0,
                                            mlp_dim=0))
  registry.validate_config(config)  # the configured encoder is ViT-S


def test_an_architecture_option_of_the_config_file_must_be_the_encoders(pretrained_workdir):
  """The command line's encoder fields are refused by refuse_dropped_overrides; a config file's
  option the encoder lacks would be replaced by the encoder's (layer scale off) silently."""
  config = _eval_config("finetune", pretrained_workdir)
  config.model.layer_scale = 0.1
  file_config = config.copy_and_resolve_references()
  from mim_jax.training import setup
  with pytest.raises(ConfigError, match=r"config.model.layer_scale=0.1 is invalid: 0.0, the "
                     r"value the encoder in init_from=.* was trained with"):
    setup.prepare(config, file_config)  # as training.loop.run prepares a command line's run
  config.model.layer_scale = 0.0  # the command line sets the encoder's value: accepted
  assert pretrained.adopt_encoder_config(config, file_config).model.layer_scale == 0.0
  file_config.model.layer_scale = 0.0  # the file asks for nothing the encoder lacks
  config.model.layer_scale = 0.1  # (a command-line 0.1 is refuse_dropped_overrides' to refuse)
  assert pretrained.adopt_encoder_config(config, file_config).model.layer_scale == 0.0


# ---- the jobs, end to end ---------------------------------------------------------------------

def test_linear_probe_trains_only_the_head(pretrained_workdir, tmp_path):
  config = _eval_config("linprobe", pretrained_workdir, total_steps=4, log_every=2)
  state = train.run(config, str(tmp_path))
  loaded, _ = checkpoint.load_encoder(os.path.join(pretrained_workdir, "encoder"))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.extra["encoder"]), loaded)
  assert set(state.params) == {"head"}
  assert float(jnp.abs(state.extra["batch_stats"]["bn"]["mean"]).sum()) > 0
  # The head did learn: every logged step moved it (no weight decay here: a frozen head's
  # update would be exactly 0).
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  moved = [r["update_norm"] for r in rows if "update_norm" in r]
  assert moved and all(m > 0 for m in moved), moved
  results = json.load(open(tmp_path / "results.json"))
  assert results["method"] == "linprobe" and results["eval_count"] == 64
  assert 0.0 <= results["eval_accuracy"] <= 1.0


def test_linear_probe_learns_a_separable_problem():
  """A probe on fixed features of class-dependent images reaches high accuracy."""
  config = _eval_config("linprobe", "")
  method = LinearProbe(config)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 256).astype(np.int32)
  base = rng.normal(size=(10, 16, 16, 3)).astype(np.float32)
  images = base[labels] + 0.1 * rng.normal(size=(256, 16, 16, 3)).astype(np.float32)
  params, extra = method.init(jax.random.key(0), jnp.asarray(images[:2]))
  tx = optax.sgd(0.5, momentum=0.9)
  opt_state = tx.init(params)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}

  @jax.jit
  def step(params, extra, opt_state):
    (loss, (_, extra)), grads = jax.value_and_grad(
        lambda p: method.loss(p, extra, batch, jax.random.key(0)), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), extra, opt_state, loss

  for _ in range(60):
    params, extra, opt_state, loss = step(params, extra, opt_state)
  sums = method.eval_metrics(params, extra, dict(batch, mask=jnp.ones(256, bool)))
  assert float(sums["correct"]) / float(sums["count"]) > 0.95, float(loss)


def test_finetune_from_pretrained_and_low_label_run(pretrained_workdir, tmp_path, caplog):
  config = _eval_config("finetune", pretrained_workdir, total_steps=3, log_every=3)
  config.export_encoder = False  # fine-tuning exports by default: off, it writes no encoder/
  with caplog.at_level(logging.INFO, logger=train.__name__):
    train.run(config.copy_and_resolve_references(), str(tmp_path / "all_labels"))
    config.data.label_fraction = 0.5
    state = train.run(config, str(tmp_path))
  # Half the labelled examples per epoch: the run trains on the labelled subset only.
  all_labels, half = [int(m) for m in re.findall(r"(\d+) examples per epoch", caplog.text)]
  assert half <= all_labels // 2 + config.global_batch_size, (all_labels, half)
  assert half < all_labels
  assert int(state.step) == 3
  assert not (tmp_path / "encoder").exists()
  results = json.load(open(tmp_path / "results.json"))
  assert results["eval_count"] == 64 and np.isfinite(results["eval_loss"])
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert any("eval_accuracy" in r for r in rows)
  # Resumed from its final checkpoint without results (as after a preemption at the last
  # step), the run evaluates again instead of ending without results.json.
  os.remove(tmp_path / "results.json")
  assert int(train.run(config, str(tmp_path)).step) == 3
  assert json.load(open(tmp_path / "results.json")) == results


def test_a_fine_tuned_workdir_is_an_init_from(pretrained_workdir, tmp_path):
  """Fine-tuning exported nothing: its encoder and head left the workdir only through
  `convert export` (timm, HF), and init_from refused it. It now writes workdir/encoder, the
  fine-tuned encoder with its learned positions and the head beside it (classifier/): k-NN
  and fine-tuning again read it, the latter taking the head as well."""
  ft = tmp_path / "ft"
  state = train.run(_eval_config("finetune", pretrained_workdir, total_steps=3, log_every=3),
                    str(ft))
  info = json.load(open(ft / "encoder" / "model.json"))
  assert info["method"] == "finetune" and info["posemb"] == "learn"
  assert pretrained.encoder_posemb(str(ft)) == "learn" and pretrained.has_released_head(str(ft))
  encoder, _ = checkpoint.load_encoder(str(ft / "encoder"))
  final = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(encoder), jax.tree.leaves(final["encoder"]), strict=True):
    np.testing.assert_array_equal(a, b)
  assert "pos_embed" in encoder  # learned in fine-tuning, kept

  knn = _eval_config("knn", str(ft))
  knn.knn.k = 5
  assert train.run(knn, str(tmp_path / "knn"))["knn_top1_gap"] > 0.2
  from mim_jax import features
  enc = features.load(str(ft))
  for a, b in zip(jax.tree.leaves(enc.params), jax.tree.leaves(final["encoder"]), strict=True):
    np.testing.assert_array_equal(a, b)
  # At another resolution the k-NN and probe jobs resize its learned position table, as the
  # loop's probes and mim_jax.features do (they loaded the table as stored, and failed).
  from mim_jax.evaluate import frozen
  from mim_jax.training import setup
  at_24 = frozen._encoder_params(setup.prepare(_eval_config("knn", str(ft), image_size=(24, 24))))
  want = features.load(str(ft), image_size=(24, 24)).params
  assert at_24["pos_embed"].shape == (1 + 36, 64)
  for a, b in zip(jax.tree.leaves(at_24), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  again = _eval_config("finetune", str(ft), total_steps=1, log_every=1)
  method = FineTune(pretrained.adopt_encoder_config(again))
  params, extra = method.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  params, _ = method.load_pretrained(jax.device_get(params), extra)
  for part in ("encoder", "head", "fc_norm"):
    for a, b in zip(jax.tree.leaves(params[part]), jax.tree.leaves(final[part]), strict=True):
      np.testing.assert_array_equal(a, b)

  # A fine-tuning workdir without the export (unfinished, or older): init_from says how to
  # get it.
  (tmp_path / "bare").mkdir()
  (tmp_path / "bare" / "config.json").write_text((ft / "config.json").read_text())
  with pytest.raises(ConfigError, match=r"it is a fine-tuning workdir without its export .*run "
                     r"its command again; a finished run resumes at its last step"):
    pretrained.encoder_directory(str(tmp_path / "bare"))


def test_knn_job_writes_results(pretrained_workdir, tmp_path):
  config = _eval_config("knn", pretrained_workdir)
  config.knn.k = 5
  metrics = train.run(config, str(tmp_path))
  results = json.load(open(tmp_path / "results.json"))
  for pool in ("cls", "gap"):  # every pool is reported
    key = f"knn_top1_{pool}"
    assert results[key] == metrics[key] and 0 <= results[key] <= 1
    # Synthetic images of the same class are alike, so even a 3-step encoder beats chance.
    assert results[key] > 0.2


def test_knn_during_pretraining_is_logged(tmp_path):
  config = tiny_mae_config(total_steps=4, log_every=2)
  config.knn.update(every_epochs=0.25, k=5)
  config.eval.batch_size = 32
  train.run(config, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "knn_top1_cls" in r and "knn_top1_gap" in r] == [2, 4]


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method,overrides,match", [
    ("linprobe", {"init_from": ""}, r"config.init_from='' .*a pre-training or fine-tuning workdir"),
    ("knn", {"init_from": "/nonexistent/run"}, r"config.init_from='/nonexistent/run'.*"
     r"encoder/model.json.*--config.init_from=DIR"),
    ("linprobe", {"classifier.probe_layer": 3}, r"config.classifier.probe_layer=3 .*\[0, 2\]"),
    ("linprobe", {"classifier.pool": "max"}, r"config.classifier.pool='max'"),
    ("linprobe", {"classifier.mixup_alpha": 0.8},
     r"config.classifier.mixup_alpha is not used by method='linprobe'; it is a field of "
     r"'finetune'"),
    ("finetune", {"optimizer.layer_decay": 0.0}, r"config.optimizer.layer_decay=0.0"),
    ("finetune", {"optimizer.name": "adam"}, r"config.optimizer.name='adam' .*'lars'"),
    ("finetune", {"classifier.label_smoothing": 1.0}, r"config.classifier.label_smoothing=1.0"),
    ("knn", {"knn.k": 0}, r"config.knn.k=0"),
    ("finetune", {"optimizer.layer_decay": 0.75, "init_from": ""},
     r"config.optimizer.layer_decay=0.75 is invalid: 1.0 without init_from"),
    ("knn", {"classifier.features": "rgb"}, r"config.classifier.features='rgb'"),
    ("finetune", {"data.label_fraction": 0.0}, r"data.label_fraction"),
])
def test_bad_evaluation_configs_fail_fast(pretrained_workdir, method, overrides, match):
  config = _eval_config(method, pretrained_workdir)
  config_defaults.override(config, **overrides)
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(config)


# ---- baselines ----------------------------------------------------------------------------------

def test_raw_pixel_and_random_encoder_baselines(tmp_path):
  pixels = _eval_config("knn", "")
  pixels.classifier.features = "pixels"
  pixels.knn.k = 5
  # Synthetic classes are pixel patterns: raw-pixel k-NN separates them well.
  assert train.run(pixels, str(tmp_path / "knn_pixels"))["knn_top1_pixels"] > 0.5
  random = _eval_config("knn", "random")
  random.knn.k = 5
  assert 0 <= train.run(random, str(tmp_path / "knn_random"))["knn_top1_cls"] <= 1

  probe = _eval_config("linprobe", "", total_steps=2, log_every=2)
  probe.classifier.features = "pixels"
  state = train.run(probe, str(tmp_path / "probe_pixels"))
  assert state.params["head"]["head"]["kernel"].shape == (16 * 16 * 3, 10)
  probe = _eval_config("linprobe", "random", total_steps=2, log_every=2)
  state = train.run(probe, str(tmp_path / "probe_random"))
  assert state.params["head"]["head"]["kernel"].shape == (64, 10)
  # Both random-encoder baselines score the same (seeded) encoder.
  knn_encoder = json.load(open(tmp_path / "knn_random" / "results.json"))
  assert knn_encoder["init_from"] == "random"
  from mim_jax.models.vit import encoder_from_config
  enc = encoder_from_config(probe.model, probe.image_size, probe.channels)
  init_rng = jax.random.split(jax.random.key(probe.seed))[0]
  want = enc.init(jax.random.split(init_rng)[0], jnp.zeros((1, 16, 16, 3)))["params"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state.extra["encoder"]), want)  # jit vs eager rounding
  # The k-NN job's encoder is that one too (run_knn scores frozen._encoder_params(config)).
  from mim_jax.evaluate import frozen
  from mim_jax.training import setup
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(frozen._encoder_params(setup.prepare(random))), want)
