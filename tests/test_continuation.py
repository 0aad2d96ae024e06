"""Continued pre-training (`init_from` on a pre-training method): what loads, what starts
fresh, what is refused, and that a continued run starts where its source left off."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import data, registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.convert.our_weights import read_weights
from mim_jax.training import loop as train
from mim_jax.weights import continuation

from conftest import tiny_mae_config


def _source(tmp_path_factory, name: str, **overrides) -> str:
  """A tiny finished pre-training run (4 steps on synthetic images); returns its workdir."""
  workdir = str(tmp_path_factory.mktemp(name))
  train.run(tiny_mae_config(total_steps=4, **overrides), workdir)
  return workdir


@pytest.fixture(scope="module")
def mae_source(tmp_path_factory):
  return _source(tmp_path_factory, "mae_source")


def _first_batch_and_rng(config):
  """The batch and step key of step 1 of a run of `config` (as train.run draws them)."""
  it = data.make_train_iterator(config.data, image_size=tuple(config.image_size),
                                channels=config.channels,
                                global_batch_size=config.global_batch_size, seed=config.seed,
                                element_transforms=registry.build_method(config).data_transforms())
  batch = {k: jnp.asarray(v) for k, v in next(it).items() if k in ("image", "label")}
  it.close()
  base_rng = jax.random.split(jax.random.key(config.seed))[1]
  return batch, jax.random.fold_in(base_rng, 0)


def _logged_losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("source_kind", ["workdir", "export"])
def test_continued_mae_run_starts_at_the_source_models_loss(tmp_path, mae_source, source_kind):
  """Step 1 of the continued run scores the source's weights (encoder and decoder) on that
  step's batch and masks, and differs from a fresh start."""
  source = mae_source if source_kind == "workdir" else os.path.join(mae_source, "encoder")
  if source_kind == "export":
    # An export with the decoder, as `convert import` of an official *_full.pth writes it.
    from mim_jax.convert.our_weights import write_weights
    info, params = read_weights(mae_source)
    source = write_weights(str(tmp_path / "export"), params, info)
  config = tiny_mae_config(total_steps=2, init_from=source, seed=7)
  workdir = str(tmp_path / "continued")
  train.run(config, workdir)

  _, src_params = read_weights(mae_source)
  method = registry.build_method(config)
  batch, rng = _first_batch_and_rng(config)
  loss = jax.jit(lambda params: method.loss(params, {}, batch, rng, train=True)[0])
  source_loss = float(loss(src_params))
  fresh_loss = float(loss(jax.jit(method.init)(jax.random.key(0), batch["image"][:1])[0]))
  logged = _logged_losses(workdir)[1]
  np.testing.assert_allclose(logged, source_loss, rtol=1e-5)
  assert abs(logged - fresh_loss) > 1e-3


def test_report_names_loaded_fresh_and_unused_parts(mae_source, tmp_path_factory):
  """MAE -> SimMIM: the encoder loads, its mask token and the predictor start fresh, the MAE
  decoder goes unused."""
  config = tiny_mae_config(method="simmim", init_from=mae_source)
  method = registry.build_method(config)
  params, _ = method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  merged, report = continuation.merge_source(jax.device_get(params), config)
  assert report.loaded == ["encoder"]
  assert "encoder['mask_token']" in report.fresh
  assert "predictor (not in the source)" in report.fresh
  assert report.unused == ["decoder"]
  _, src = read_weights(mae_source)
  np.testing.assert_array_equal(merged["encoder"]["patch_embed"]["kernel"],
                                src["encoder"]["patch_embed"]["kernel"])
  np.testing.assert_array_equal(merged["encoder"]["mask_token"], params["encoder"]["mask_token"])
  assert "not used: decoder" in str(report)


def test_continued_simmim_loads_its_predictor_and_keeps_the_source_loss(tmp_path_factory):
  source = _source(tmp_path_factory, "simmim_source", method="simmim")
  config = tiny_mae_config(method="simmim", init_from=source)
  method = registry.build_method(config)
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  params, _ = method.init(jax.random.key(0), images[:1])
  merged, report = continuation.merge_source(jax.device_get(params), config)
  assert report.loaded == ["encoder", "predictor"] and not report.fresh
  _, src = read_weights(source, all_parts=True)
  rng = jax.random.key(5)
  np.testing.assert_allclose(method.loss(merged, {}, {"image": images}, rng)[0],
                             method.loss(src, {}, {"image": images}, rng)[0], rtol=1e-6)


def _merged_under(config, weight_init: str):
  config = config.copy_and_resolve_references()
  config.model.weight_init = weight_init
  method = registry.build_method(config)
  params, _ = method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  return continuation.merge_source(jax.device_get(params), config)[0]


@pytest.mark.parametrize("source_method,method", [
    ("mae", "mae"), ("mae", "simmim"), ("mae", "data2vec"), ("simmim", "simmim"),
    ("simmim", "mae"), ("simmim_export", "simmim"), ("data2vec", "data2vec"),
    ("data2vec_export", "data2vec")])
def test_weight_init_counts_as_read_exactly_when_it_changes_the_loaded_params(
    tmp_path_factory, mae_source, source_method, method):
  # draws_under_weight_init decides, from the source's metadata alone, whether continued
  # pre-training reads model.weight_init: the weights after loading must differ between two
  # schemes exactly when it says so (a mask token the source lacks, data2vec's lm_head), and
  # validation refuses the field exactly when they do not.
  def data2vec_sized(config):
    if config.method == "data2vec":
      config.masking.update(kind="blockwise", ratio=0.5, min_block=2)
      config.teacher.top_k = 2
    return config

  name = source_method.removesuffix("_export")
  if name == "mae":
    source = mae_source
  else:  # one training run per method, its encoder/ export beside it (exports hold no head)
    source = str(tmp_path_factory.getbasetemp() / f"{name}_source")
    if not os.path.isdir(source):
      os.makedirs(source)
      train.run(data2vec_sized(tiny_mae_config(total_steps=4, method=name)), source)
  if source_method.endswith("_export"):
    source = os.path.join(source, "encoder")
  config = data2vec_sized(tiny_mae_config(method=method, init_from=source))
  a, b = _merged_under(config, "xavier"), _merged_under(config, "beit")
  changed = not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  cls = registry.method_class(method)
  assert continuation.draws_under_weight_init(
      config, mask_token=cls.encoder_mask_token(config), head_in_vit=cls.head_in_vit) == changed
  config.model.weight_init = "beit"
  if changed:
    registry.check_unread_fields(config)
  else:
    with pytest.raises(ConfigError, match=r"model.weight_init='beit' is not used"):
      registry.check_unread_fields(config)


def test_every_pre_training_method_keeps_the_weight_init_rule():
  # A method's own unread_rules extend its base class's (the continued pre-training rule).
  for name, cls in registry.METHODS.items():
    if cls.kind == "pretraining":
      assert any(fields == ("model.weight_init",) for fields, _, _ in cls.unread_rules()), name


def test_data2vec_teacher_starts_as_the_loaded_student(mae_source):
  config = tiny_mae_config(method="data2vec", init_from=mae_source)
  config.masking.update(kind="blockwise", ratio=0.5, min_block=2)
  config.teacher.top_k = 2
  method = registry.build_method(config)
  params, extra = jax.device_get(method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  params, extra = method.load_pretrained(params, extra)
  _, src = read_weights(mae_source)
  for tree in (params["encoder"], extra["teacher"]):
    np.testing.assert_array_equal(tree["patch_embed"]["kernel"],
                                  src["encoder"]["patch_embed"]["kernel"])


def test_mismatched_source_is_refused_before_training(tmp_path, mae_source):
  config = tiny_mae_config(init_from=mae_source)
  config.model.width = 32  # the source's encoder is 64 wide
  with pytest.raises(ConfigError, match=r"init_from=.*width 32.*width 64.*model.width=64"):
    train.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_decoder_of_another_size_starts_fresh_and_says_so(mae_source, caplog):
  config = tiny_mae_config(init_from=mae_source)
  config.decoder.width = 16
  method = registry.build_method(config)
  params, extra = jax.device_get(method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  with caplog.at_level(logging.INFO):
    loaded, _ = method.load_pretrained(params, extra)
  assert "decoder (its shapes differ from the source's)" in caplog.text
  np.testing.assert_array_equal(loaded["decoder"]["mask_token"], params["decoder"]["mask_token"])


def test_tokenizers_have_no_init_from():
  """A tokenizer trains from scratch: the field does not exist for it, and setting it is
  refused by name."""
  config = tiny_mae_config(method="vq_tokenizer")
  assert "init_from" not in config
  with config.unlocked():
    config.init_from = "/some/run"
  with pytest.raises(ConfigError, match="config.init_from is not used by method='vq_tokenizer'"):
    registry.validate_config(config)


@pytest.mark.parametrize("method", ["knn", "linprobe"])
def test_pixel_baselines_refuse_an_init_from(mae_source, method):
  config = registry.base_config(method)
  config_defaults.use_fashion_mnist(config)
  config.init_from = mae_source
  config.classifier.features = "pixels"
  with pytest.raises(ConfigError, match="raw-pixel baseline loads no encoder"):
    registry.validate_config(config)


def test_continues_from_an_imported_official_full_checkpoint(tmp_path, mae_source):
  """Official MAE layout (`mae_pretrain_vit_*_full.pth`: encoder + decoder under "model") ->
  `convert import` -> a continued run that starts at that model's loss and trains."""
  torch = pytest.importorskip("torch")
  from mim_jax.convert.__main__ import main as convert_cli
  from mim_jax.convert.exporter import export_weights
  from mim_jax.convert.safetensors_io import read_safetensors
  export_weights(mae_source, str(tmp_path / "official"), "mae")
  tensors, _ = read_safetensors(str(tmp_path / "official" / "model.safetensors"))
  assert any(k.startswith("decoder_blocks.") for k in tensors)
  pth = str(tmp_path / "mae_pretrain_vit_mu_full.pth")
  torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}}, pth)
  imported = str(tmp_path / "imported")
  assert convert_cli(["import", pth, imported, "--num_heads", "2",
                      "--decoder_num_heads", "2"]) == 0

  config = tiny_mae_config(total_steps=3, init_from=imported, seed=3)
  workdir = str(tmp_path / "continued")
  train.run(config, workdir)
  _, src_params = read_weights(mae_source)
  batch, rng = _first_batch_and_rng(config)
  source_loss = float(registry.build_method(config).loss(src_params, {}, batch, rng)[0])
  losses = _logged_losses(workdir)
  np.testing.assert_allclose(losses[1], source_loss, rtol=1e-5)
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())


def test_beit_style_encoder_carries_its_architecture_into_evaluations(tmp_path_factory):
  """A source pre-trained with a shared relative position bias, layer scale and no absolute
  positions: a fine-tuning run adopts the three fields with the size and loads every array;
  continued pre-training with another setting is refused by field before training."""
  from mim_jax.training import setup

  from conftest import tiny_config
  source = _source(tmp_path_factory, "beit_style", **{
      "model.rel_pos_bias": "shared", "model.layer_scale": 0.1, "model.abs_posemb": False})
  _, params = read_weights(source)
  assert "rel_pos_bias" in params["encoder"]["transformer"]
  assert "gamma_1" in params["encoder"]["transformer"]["blocks_0"]
  assert "pos_embed" not in params["encoder"]
  finetune = setup.prepare(tiny_config("finetune", init_from=source))
  assert (finetune.model.rel_pos_bias, finetune.model.layer_scale,
          finetune.model.abs_posemb) == ("shared", 0.1, False)
  workdir = str(tmp_path_factory.mktemp("ft"))
  train.run(tiny_config("finetune", init_from=source, total_steps=1), workdir)
  config = tiny_mae_config(init_from=source, **{"model.rel_pos_bias": "shared",
                                                "model.abs_posemb": False})
  with pytest.raises(ConfigError, match=r"config.model.layer_scale=0.0.*0.1"):
    setup.prepare(config)


def test_an_architecture_mismatch_gives_every_flag_that_fits_the_source(mae_source):
  """A BEiT-style config continuing from an MAE source differs in three settings: the refusal
  gives all three flags at once, an empty string quoted for the shell, and the config with
  them applied (as the shell passes them) is accepted. One by one, the old message's
  `--config.model.rel_pos_bias=.` set '.', and '' alone was refused for abs_posemb=False."""
  import shlex

  from absl import flags

  from mim_jax import main
  beit_style = ["--config.model.rel_pos_bias=shared", "--config.model.layer_scale=0.1",
                "--config.model.abs_posemb=False", "--config.model.depth=3"]

  def command_line(*extra):
    argv = ["mim_jax.main", "--config=configs/mae_vitb.py:runlocal",
            f"--config.init_from={mae_source}", "--config.image_size=(16, 16)",
            "--config.model.variant=mu/4", *beit_style, *extra]
    flag_values = flags.FlagValues()
    main.define_flags(flag_values, argv)
    main.parse_flags(argv, flag_values)
    return flag_values.config

  with pytest.raises(ConfigError) as err:
    registry.validate_config(command_line())
  message = str(err.value)
  assert message.startswith("config.model.layer_scale=0.1 is invalid: the source's value 0.0")
  advice = message.split("set it with ", 1)[1]
  assert "--config.model.rel_pos_bias='' " in advice and "depth=2" in advice
  registry.validate_config(command_line(*shlex.split(advice)))


def test_a_leading_tilde_in_path_fields_names_the_home_folder(mae_source, monkeypatch):
  """`--config.init_from=~/run` reaches the trainer with its `~` (the shell expands it only at
  the start of a word): init_from, data paths, teacher paths and --workdir read it as the home
  folder, and the caller's config is left as it was."""
  from types import SimpleNamespace

  from mim_jax import main
  from mim_jax.training import setup

  from conftest import tiny_config
  home, name = os.path.split(mae_source)
  monkeypatch.setenv("HOME", home)
  config = tiny_config("finetune", init_from=f"~/{name}")
  assert setup.prepare(config).init_from == mae_source  # read: it adopted the source's size
  assert config.init_from == f"~/{name}"
  folder = setup.expand_home(tiny_config("mae", **{"data.path": "~/images"}))
  assert folder.data.path == os.path.join(home, "images")
  teacher = setup.expand_home(tiny_config("maskdistill", **{"teacher.path": "~/t"}))
  assert teacher.teacher.path == os.path.join(home, "t")
  assert main.workdir_of(SimpleNamespace(workdir="~/run")) == os.path.join(home, "run")
