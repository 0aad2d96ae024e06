"""Bad input fails fast, before compilation, with a message naming the field."""

from __future__ import annotations

import itertools
import logging
import os
import platform
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config import files, validation
from mim_jax.config.errors import ConfigError
from mim_jax.convert import our_weights
from mim_jax.training import cpu_devices

from conftest import REPO, tiny_mae_config


@pytest.mark.parametrize("overrides,match", [
    ({"masking.ratio": 1.0}, r"config.masking.ratio=1.0 is invalid: a number strictly between 0 and 1"),
    ({"masking.ratio": 0.0}, r"config.masking.ratio=0.0"),
    ({"masking.ratio": 0.99}, r"config.masking.ratio=0.99 .*at least one of the 16 patches"),
    ({"image_size": (16, 18)}, r"config.image_size=\(16, 18\) .*divisible by the patch size 4.*width 18"),
    ({"model.variant": "Q/4"}, r"config.model.variant='Q/4'"),
    ({"model.variant": "B16"}, r"config.model.variant='B16'.*SIZE/PATCH"),
    ({"method": "maee"}, r"config.method='maee' is invalid: one of \['attentive_probe', 'beit', "
     r"'data2vec', 'data2vec2', "
     r"'dvae_tokenizer', 'finetune', 'ibot', 'knn', 'linprobe', 'mae', 'maskdistill', "
     r"'maskfeat', 'mim', 'probe', 'simmim', 'vq_tokenizer', 'vqkd_tokenizer'\]"),
    ({"model.dtype": "float8"}, r"config.model.dtype='float8'"),
    # cuDNN's fused attention takes no float32: every layer would fall back to XLA's.
    ({"model.attention_impl": "cudnn"}, r"config.model.attention_impl='cudnn' is invalid: "
     r"'cudnn' with model.dtype='bfloat16'"),
    ({"masking.kind": "blockwise"}, r"config.masking.kind='blockwise' .*'random'"),
    ({"global_batch_size": 0}, r"config.global_batch_size=0"),
    ({"grad_accum_steps": 3}, r"config.global_batch_size=8 .*multiple of grad_accum_steps=3"),
    ({"total_steps": 0}, r"config.total_steps=0"),
    ({"optimizer.name": "adam"}, r"config.optimizer.name='adam' .*\('adamw', 'lars', 'sgd'\)"),
    ({"optimizer.b2": 1.0}, r"config.optimizer.b2=1.0"),
    ({"optimizer.warmup_epochs": 5.0}, r"config.optimizer.warmup_epochs=5.0 .*num_epochs=2"),
    ({"model.num_heads": 5}, r"config.model.num_heads=5 .*divisor of the encoder width"),
    ({"model.depth": -1}, r"config.model.depth=-1 .*integer >= 0 \(0 keeps the size"),
    ({"decoder.num_heads": 5}, r"config.decoder.num_heads=5 .*divisor of decoder.width=32"),
    ({"data.source": "imagenet"}, r"config.data.source='imagenet'"),
    ({"data.source": "fashion_mnist", "data.path": "/nonexistent/fmnist"},
     r"config.data.path='/nonexistent/fmnist'.*apt-get install -y dataset-fashion-mnist"),
    ({"data.source": "image_folder", "data.path": "/nonexistent/images"}, r"config.data.path"),
    ({"viz_every": -1}, r"config.viz_every=-1"),
    ({"nonfinite_guard": "where"}, r"config.nonfinite_guard='where' .*'select' or 'cond'"),
    # multistep without epochs would be a constant lr that ignores decay_factor.
    ({"optimizer.schedule": "multistep"}, r"config.optimizer.decay_epochs=\(\) is invalid"),
    # A repeated epoch would merge into one decay (the schedule keys decays by step).
    ({"optimizer.schedule": "multistep", "optimizer.decay_epochs": (1.0, 1.0)},
     r"config.optimizer.decay_epochs=\(1.0, 1.0\) is invalid: one or more strictly increasing"),
    # An axis nothing splits over: every device would compute the whole global batch.
    ({"mesh": (("dp", -1),)}, r"config.mesh=\(\('dp', -1\),\) is invalid: mesh axes named "
     r"'data' or 'fsdp'.*nothing splits over axis 'dp'"),
    ({"mesh": (("data", 2), ("model", -1))}, r"config.mesh=.* nothing splits over axis 'model'"),
    # Synthetic labels are index % 10: a smaller head would get empty one-hot targets.
    ({"method": "finetune", "classifier.num_classes": 5},
     r"config.classifier.num_classes=5 is invalid: 0 \(the dataset's class count\) or at "
     r"least the 10 classes of data.source='synthetic'"),
    ({"method": "linprobe", "init_from": "random", "classifier.num_classes": 9},
     r"config.classifier.num_classes=9 is invalid"),
])
def test_invalid_config_names_field_value_and_allowed(overrides, match):
  with pytest.raises(ConfigError, match=match):
    registry.validate_config(tiny_mae_config(**overrides))


# (method, field) of the table below that no setting of the method reads, so the refusal is
# all there is to test here.
NEVER_READ = {("linprobe", "model.drop_path_rate"), ("linprobe", "model.remat"),
              ("vq_tokenizer", "data.eval_split"), ("vqkd_tokenizer", "data.eval_path")}
# Read where no config setting alone makes it read: classifier.reuse_head reads the classifier
# an init_from export holds (a folder on disk: tests/test_convert.py accepts it there).
READ_FROM_FILES = {("finetune", "classifier.reuse_head")}


@pytest.mark.parametrize("method,overrides,match", [
    ("mae", {"data.eval_split": "holdout"}, r"data.eval_split='holdout' is not used: the k-NN "),
    ("linprobe", {"model.drop_path_rate": 0.1}, r"model.drop_path_rate=0.1 is not used: the "
     "probe's encoder is frozen"),
    ("linprobe", {"model.remat": "full"}, r"model.remat='full' is not used"),
    ("linprobe", {"classifier.features": "pixels", "model.weight_init": "beit"},
     r"model.weight_init='beit' is not used: classifier.features='pixels' runs no encoder"),
    ("finetune", {"model.weight_init": "beit", "init_from": "/exports/mae"},
     r"model.weight_init='beit' is not used: an evaluation's encoder weights all come from "
     r"init_from"),
    ("vq_tokenizer", {"data.eval_split": "test"}, r"data.eval_split='test' is not used: a "
     "tokenizer"),
    ("vqkd_tokenizer", {"data.eval_path": "/x"}, r"data.eval_path='/x' is not used"),
    ("knn", {"seed": 3}, r"seed=3 is not used: frozen-feature jobs are deterministic"),
    ("finetune", {"data.subset_seed": 1}, r"data.subset_seed=1 is not used"),
    ("mae", {"data.num_workers": 0, "data.prefetch_buffer_size": 8},
     r"data.prefetch_buffer_size=8 is not used"),
    ("mae", {"eval.batch_size": 64}, r"eval.batch_size=64 is not used: the k-NN monitor is off"),
    ("mae", {"data.source": "synthetic", "data.split": "validation"},
     r"data.split='validation' is not used: data.source='synthetic' has the same images"),
    ("mae", {"data.source": "synthetic", "data.synthetic_classes": 3},
     r"synthetic_classes=3 is not used: no label is read"),
    ("mae", {"data.source": "image_folder", "data.split": "val"},
     r"data.split='val' is not used: data.source='image_folder' trains on the folder"),
    ("mae", {"data.source": "fashion_mnist", "data.on_bad_image": "raise"},
     r"on_bad_image='raise' is not used: only data.source 'image_folder', 'tfds' and 'npy'"),
    ("mae", {"viz_every": 0, "viz_num_images": 4}, r"viz_num_images=4 is not used: pictures"),
    ("simmim", {"viz_every": 0, "viz_channels": (0,)}, r"viz_channels=\(0,\) is not used"),
    ("finetune", {"classifier.mixup_alpha": 0.0, "classifier.cutmix_alpha": 0.0,
                  "classifier.mixup_prob": 0.5}, r"mixup_prob=0.5 is not used: Mixup and CutMix"),
    ("finetune", {"classifier.mixup_alpha": 0.8, "classifier.mixup_switch_prob": 0.2},
     r"mixup_switch_prob=0.2 is not used: it chooses between Mixup and CutMix"),
    # mixup_prob=0 skips Mixup and CutMix whatever their settings (evaluate/mixup.py).
    ("finetune", {"classifier.mixup_prob": 0.0, "classifier.mixup_alpha": 0.8},
     r"mixup_alpha=0.8 is not used: Mixup and CutMix are never applied "
     r"\(classifier.mixup_prob=0\)"),
    ("finetune", {"classifier.mixup_prob": 0.0, "classifier.cutmix_alpha": 1.0},
     r"cutmix_alpha=1.0 is not used: Mixup and CutMix are never applied"),
    ("finetune", {"classifier.reuse_head": False},
     r"reuse_head=False is not used: init_from holds no classifier head"),
    ("finetune", {"data.source": "image_folder", "data.path": "/train", "data.holdout": 100,
                  "data.eval_split": "holdout", "data.eval_path": "/eval"},
     r"data.eval_path='/eval' is not used: only data.source='image_folder' reads it, for an "
     r"eval_split other than"),
    ("finetune", {"data.source": "synthetic", "data.eval_split": "test"},
     r"data.eval_split='test' is not used: data.source='synthetic' has the same images"),
    ("linprobe", {"classifier.features": "pixels", "classifier.pool": "gap"},
     r"classifier.pool='gap' is not used: classifier.features='pixels' runs no encoder"),
    ("ibot", {"channels": 1, "multicrop.grayscale_prob": 0.5},
     r"grayscale_prob=0.5 is not used: grayscale conversion"),
    ("ibot", {"multicrop.num_local": 0, "multicrop.local_size": (32, 32)},
     r"local_size=\(32, 32\) is not used: there are no local views"),
    ("ibot", {"ibot.warmup_teacher_temp_epochs": 0.0, "ibot.warmup_teacher_temp": 0.05},
     r"warmup_teacher_temp=0.05 is not used: the teacher temperatures start"),
    ("data2vec", {"teacher.ema_anneal_fraction": 0.0, "teacher.ema_decay": 0.99},
     r"ema_decay=0.99 is not used: the EMA decay is teacher.ema_end_decay"),
    ("data2vec2", {"teacher.ema_anneal_fraction": 0.0, "teacher.ema_decay": 0.99},
     r"ema_decay=0.99 is not used"),
    ("dvae_tokenizer", {"tokenizer.temp_anneal_fraction": 0.0, "tokenizer.temp_start": 2.0},
     r"temp_start=2.0 is not used: the temperature is tokenizer.temp_end"),
    # A loss weighted 0 reads none of its teacher temperatures.
    ("ibot", {"ibot.lambda_patch": 0.0, "ibot.teacher_patch_temp": 0.05},
     r"teacher_patch_temp=0.05 is not used: the patch loss is off \(ibot.lambda_patch=0\)"),
    ("ibot", {"ibot.lambda_cls": 0.0, "multicrop.num_local": 0, "ibot.teacher_temp": 0.05},
     r"teacher_temp=0.05 is not used: the \[CLS\] loss is off \(ibot.lambda_cls=0\)"),
    # The pixel probe fits one feature set: how sets are fitted changes nothing.
    ("probe", {"classifier.features": "pixels", "probe.fit_sets": "together"},
     r"fit_sets='together' is not used: classifier.features='pixels' runs no encoder"),
])
def test_fields_a_method_would_not_read_are_refused(method, overrides, match):
  """Settings that would silently do nothing (no k-NN monitor to score eval_split, a frozen
  probe encoder, a tokenizer without an evaluation) are errors, not ignored."""
  c = registry.base_config(method)
  c.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=match):
    validation.check_unread(c, registry.base_config(method),
                            registry.method_class(method).unread_rules())
  # With the setting that reads them, the same values are fine.
  # The setting that reads the refused field (the last one set); absent: never read.
  reading = {"data.eval_split": {"knn.every_epochs": 1}, "eval.batch_size": {"knn.every_epochs": 1},
             "data.prefetch_buffer_size": {"data.num_workers": 2},
             "data.on_bad_image": {"data.source": "npy"},
             "data.split": {"data.source": "tfds"},
             "data.synthetic_classes": {"knn.every_epochs": 1},
             "viz_num_images": {"viz_every": 10}, "viz_channels": {"viz_every": 10},
             "seed": {"init_from": "random"}, "data.subset_seed": {"data.holdout": 100},
             "classifier.mixup_prob": {"classifier.mixup_alpha": 0.8},
             "classifier.mixup_switch_prob": {"classifier.mixup_alpha": 0.8,
                                              "classifier.cutmix_alpha": 1.0},
             "classifier.mixup_alpha": {"classifier.mixup_prob": 1.0},
             "classifier.cutmix_alpha": {"classifier.mixup_prob": 1.0},
             "classifier.pool": {"classifier.features": "encoder"},
             "model.weight_init": {"classifier.features": "encoder"},
             "init_from": {"init_from": "random"},
             "probe.fit_sets": {"classifier.features": "encoder"},
             "multicrop.grayscale_prob": {"channels": 3},
             "multicrop.local_size": {"multicrop.num_local": 2},
             "ibot.warmup_teacher_temp": {"ibot.warmup_teacher_temp_epochs": 1.0},
             "teacher.ema_decay": {"teacher.ema_anneal_fraction": 0.5},
             "tokenizer.temp_start": {"tokenizer.temp_anneal_fraction": 0.5},
             "ibot.teacher_patch_temp": {"ibot.lambda_patch": 1.0},
             "ibot.teacher_temp": {"ibot.lambda_cls": 1.0}}
  # Where the field's reading setting depends on the case: keyed (method, field).
  reading.update({("finetune", "data.eval_path"): {"data.eval_split": "test"},
                  ("finetune", "data.eval_split"): {"data.source": "fashion_mnist"}})
  field = list(overrides)[-1]
  fix = reading.get((method, field), reading.get(field, {}))
  if (method, field) in NEVER_READ | READ_FROM_FILES:  # no setting alone: nothing to accept
    assert not (fix and all(validation._has(c, f) for f in fix)), (method, field)
    return
  assert fix and all(validation._has(c, f) for f in fix), (method, field)
  c.update_from_flattened_dict(fix)
  validation.check_unread(c, registry.base_config(method),
                          registry.method_class(method).unread_rules())


def test_arguments_that_are_not_flags_are_refused(tmp_path, capsys):
  """`config.seed=3` without its dashes, or a flag after a bare `--`, is left over by flag
  parsing: every tool refuses it instead of running without it."""
  from absl import app

  from mim_jax import main
  from mim_jax.config import errors
  for extra in (["config.total_steps=5"], ["--", "--config.seed=3"]):
    with pytest.raises(SystemExit) as exited:
      main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={tmp_path}", *extra])
    assert exited.value.code == 2
    assert f"unexpected argument(s) {extra[-1]}" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "config.json")
  with pytest.raises(app.UsageError, match=r"unexpected argument\(s\) x: every setting"):
    errors.refuse_extra_arguments(["mim_jax.bench", "x"])  # bench, memory_plan, stats, usage
  errors.refuse_extra_arguments(["mim_jax.bench"])


def test_command_line_checks_its_overrides_against_the_config_file():
  """mim_jax.main: the file's own settings are checked against the method's defaults, the
  overrides against the file, so switching a feature off (no local views) is fine although
  the file configures it, while an override the run would not read is still refused."""
  path = f"{REPO}/configs/ibot_fmnist.py"
  file_config = files.load_config_file(path)
  registry.check_unread_fields(file_config)
  final = files.load_config_file(path)
  final.multicrop.num_local = 0
  with pytest.raises(ConfigError, match=r"local_scale=\(0.1, 0.35\) is not used"):
    registry.validate_config(final)  # what a program building this config is told
  registry.validate_config(final, file_config=file_config)
  final.multicrop.local_size = (8, 8)
  with pytest.raises(ConfigError, match=r"local_size=\(8, 8\) is not used: there are no local "
                     r"views .* Leave it at its config file's value \(\(12, 12\)\)"):
    registry.validate_config(final, file_config=file_config)


def test_synthetic_eval_split_may_only_name_the_holdout():
  """data.source='synthetic' has one set of images for every split; only 'holdout' (training
  examples held out by data.holdout) reads other ones, so it stays allowed."""
  c = tiny_mae_config(method="finetune", **{"data.holdout": 16, "data.eval_split": "holdout"})
  registry.validate_config(c)
  c.data.eval_split = "validation"
  with pytest.raises(ConfigError, match=r"data.eval_split='validation' is not used"):
    registry.validate_config(c)


def test_mesh_axis_a_sharding_rule_names_is_allowed():
  """An axis besides data / fsdp is fine when a sharding rule shards over it."""
  from mim_jax.training import parallel
  parallel.check_mesh_axes((("data", 2), ("model", -1)), ((".*kernel", (None, "model")),))
  parallel.check_mesh_axes((("tp", -1),), ((".*", "largest:tp:16"),))
  with pytest.raises(ConfigError, match=r"nothing splits over axis 'model'"):
    parallel.check_mesh_axes((("data", 2), ("model", -1)), ((".*", "largest:fsdp"),))
  parallel.check_mesh_axes((("data", -1), ("model", 1)), ())  # size 1: repeats nothing
  for malformed in ((), (("data",),), (("data", "-1"),), ((-1, "data"),), 5):
    with pytest.raises(ConfigError, match=r"config.mesh=.*a non-empty tuple of \(axis name, "):
      parallel.check_mesh_axes(malformed, ())


def test_command_line_mixup_prob_0_refuses_only_what_it_changes():
  """Against the config file: switching Mixup / CutMix off (mixup_prob=0) over a recipe that
  configures them is fine, an override of a setting that then does nothing is refused."""
  path = f"{REPO}/configs/finetune_fmnist.py"
  file_config = files.load_config_file(path)
  registry.check_unread_fields(file_config)
  rules = registry.method_class("finetune").unread_rules()
  final = files.load_config_file(path)
  final.classifier.update(mixup_prob=0.0, label_smoothing=0.2)
  validation.check_unread(final, file_config, rules, reference="config file's value")
  final.classifier.mixup_switch_prob = 0.2
  with pytest.raises(ConfigError, match=r"mixup_switch_prob=0.2 is not used: Mixup and CutMix "
                     r"are never applied .* Leave it at its config file's value \(0.5\)"):
    validation.check_unread(final, file_config, rules, reference="config file's value")


# ------------------------------------------------- checks that need the dataset's size or labels

def _fmnist_mae_config():
  return files.load_config_file(f"{REPO}/configs/mae_fmnist.py")


def test_total_steps_past_the_schedule_is_refused_with_the_num_epochs_that_fits():
  """total_steps only stops a run early: past the schedule (Fashion-MNIST MAE: 3 epochs of
  60,000 // 256 = 234 steps) the last steps would train at min_lr."""
  from mim_jax.training import setup
  config = _fmnist_mae_config()
  assert setup.schedule_lengths(config, 60_000) == (234, 702, 702)
  config.total_steps = 702
  assert setup.schedule_lengths(config, 60_000) == (234, 702, 702)
  config.total_steps = 100
  assert setup.schedule_lengths(config, 60_000) == (234, 702, 100)
  config.total_steps = 1000
  with pytest.raises(ConfigError, match=r"config.total_steps=1000 is invalid: -1 \(the whole "
                     r"schedule\) or at most the schedule's 702 steps \(num_epochs=3 x 234 "
                     r"steps per epoch.* --config.num_epochs=5 gives 1170 steps"):
    setup.schedule_lengths(config, 60_000)


def test_decay_epochs_on_one_step_are_refused():
  """Distinct epochs that round to one step would merge into one decay (optim keys them by
  step): 8 steps per epoch put epochs 1.0 and 1.05 both at step 8."""
  from mim_jax.training import optim
  config = tiny_mae_config(**{"optimizer.schedule": "multistep",
                              "optimizer.decay_epochs": (1.0, 1.05)})
  registry.validate_config(config)  # the epochs alone are fine: the steps need the data size
  with pytest.raises(ConfigError, match=r"config.optimizer.decay_epochs=\(1.0, 1.05\) is "
                     r"invalid: epochs on distinct steps; with 8 steps per epoch they fall on "
                     r"steps \[8, 8\]"):
    optim.learning_rate_schedule(config.optimizer, 8, 8, 16)
  schedule = optim.learning_rate_schedule(config.optimizer, 8, 80, 160)  # steps 80 and 84
  # Two decays: one at step 80, the other at step 84.
  assert float(schedule(90)) == pytest.approx(float(schedule(82)) * 0.1, rel=1e-5)


def test_num_classes_below_an_image_folders_classes_is_refused_before_training(tmp_path):
  """An image folder counts its classes only by listing them: setup_run refuses a smaller
  classifier.num_classes once it has listed the training folder, before building anything."""
  from PIL import Image

  from mim_jax.evaluate import classifier_base
  from mim_jax.training import setup
  for folder, name in itertools.product(("train", "val"), ("a", "b", "c")):
    (tmp_path / folder / name).mkdir(parents=True)
    for i in range(4):
      Image.new("RGB", (16, 16), (i, 0, 0)).save(tmp_path / folder / name / f"{i}.png")
  folders = {"data.path": str(tmp_path / "train"), "data.eval_path": str(tmp_path / "val")}
  config = tiny_mae_config(method="finetune", global_batch_size=4, **{
      "data.source": "image_folder", **folders,
      "classifier.num_classes": 2})
  registry.validate_config(config)  # the class count needs the listing
  with pytest.raises(ConfigError, match=r"config.classifier.num_classes=2 is invalid: 0 \(the "
                     r"dataset's class count\) or at least the 3 classes of "
                     r"data.source='image_folder'"):
    setup.setup_run(config)
  for fine in (0, 3, 5):  # the dataset's count, exactly it, or more
    config.classifier.num_classes = fine
    classifier_base.check_num_classes(config)
  # The frozen-feature jobs run outside setup_run: they check it before any feature.
  from mim_jax.evaluate import frozen
  knn = tiny_mae_config(method="knn", init_from="random", **{
      "data.source": "image_folder", **folders,
      "classifier.num_classes": 2})
  with pytest.raises(ConfigError, match=r"config.classifier.num_classes=2 is invalid"):
    frozen._start(knn, str(tmp_path / "knn"))


def test_batch_must_split_over_devices_and_accumulation():
  config = tiny_mae_config(global_batch_size=12, grad_accum_steps=2)
  validation.validate_for_devices(config, batch_parallelism=2, process_count=1)
  with pytest.raises(ConfigError, match=r"global_batch_size=12 .*\(data-parallel devices 8\) x "
                     r"\(grad_accum_steps 2\) = 16"):
    validation.validate_for_devices(config, batch_parallelism=8, process_count=1)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "mim_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_LOG_COMPILES="1"))


def test_cli_bad_value_exits_2_before_compiling(tmp_path):
  out = _cli(f"--config={REPO}/configs/mae_fmnist.py:runlocal", f"--workdir={tmp_path}",
             "--config.masking.ratio=1.5")
  assert out.returncode == 2, out.stderr
  assert "config.masking.ratio=1.5 is invalid" in out.stderr
  assert "Compiling" not in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_cli_unknown_field_is_rejected(tmp_path):
  out = _cli(f"--config={REPO}/configs/mae_fmnist.py:runlocal", f"--workdir={tmp_path}",
             "--config.masking.ration=0.5")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert "config.masking.ration does not exist: did you mean config.masking.ratio" in out.stderr
  # A renamed field says what it is called now and how its values map.
  out = _cli(f"--config={REPO}/configs/maskdistill_fmnist.py:runlocal", f"--workdir={tmp_path}",
             "--config.teacher.layer=3")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert ("config.teacher.layer was renamed: config.teacher.block" in out.stderr
          and "teacher.layer=k (from 0; -1 the output after the final norm) is "
              "teacher.block=k+1" in out.stderr), out.stderr[-2000:]
  # Where the new field does not exist either, the old name is an unknown field as any other.
  from mim_jax.config.errors import unknown_field_error
  assert str(unknown_field_error("teacher.layer", ["masking.ratio"])).startswith(
      "config.teacher.layer does not exist")
  assert "was renamed" in str(unknown_field_error("teacher.layer", ["teacher.block"]))


def test_cgroup_cpu_quota_caps_the_usable_cores(tmp_path):
  """A container's CPU quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`), the smallest of the
  process's cgroup and those above it, rounds down to the cores "auto" uses."""
  def tree(files: dict[str, str], proc: str):
    for path, text in files.items():
      (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
      (tmp_path / path).write_text(text)
    (tmp_path / "proc").write_text(proc)
    return cpu_devices.cgroup_cpu_quota(str(tmp_path / "proc"), str(tmp_path / "cg"))

  assert tree({"cg/cpu.max": "max 100000\n"}, "0::/\n") is None
  assert tree({"cg/job/cpu.max": "150000 100000\n", "cg/job/task/cpu.max": "max 100000\n"},
              "0::/job/task\n") == 1.5
  v1 = {"cg/cpu,cpuacct/a/cpu.cfs_quota_us": "300000\n",
        "cg/cpu,cpuacct/a/cpu.cfs_period_us": "100000\n",
        "cg/cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cg/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}
  assert tree(v1, "4:memory:/x\n2:cpu,cpuacct:/a\n") == 3.0
  assert tree({}, "2:cpu,cpuacct:/unmounted\n") is None
  assert cpu_devices.cgroup_cpu_quota(str(tmp_path / "no_proc_file")) is None
  assert 1 <= cpu_devices.usable_cores() <= (os.cpu_count() or 1)


def test_importing_the_entry_points_leaves_the_process_alone():
  """mim_jax.main defined its absl flags (config, workdir, ...) on the global FLAGS at import,
  so a program of one's own with a flag of the same name failed to start; mim_jax.bench
  switched off JAX's GPU memory preallocation for the importing process."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
  out = subprocess.run(
      [sys.executable, "-c", "import os; from absl import flags; import mim_jax.main, "
       "mim_jax.bench; print(sorted(set(flags.FLAGS) & {'config', 'workdir', 'peer'}), "
       "'XLA_PYTHON_CLIENT_PREALLOCATE' in os.environ)"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[] False"


def test_cpu_device_count_is_reported_for_the_backend_that_trains():
  """On a GPU or TPU the CPU devices train nothing: an explicit --cpu_devices is reported as
  not used (it was logged as splitting the batch across the cores), "auto" says nothing."""
  import logging

  from mim_jax.training import cpu_devices
  assert cpu_devices.report(2, "auto", "cpu") == (
      logging.INFO, "2 JAX CPU devices (--cpu_devices=auto): the batch is split across the cores")
  assert cpu_devices.report(1, "1", "cpu") is None
  assert cpu_devices.report(None, "4", "cpu") is None  # set by XLA_FLAGS: said when configured
  assert cpu_devices.report(2, "auto", "gpu") is None
  assert cpu_devices.report(4, "4", "gpu") == (
      logging.WARNING, "--cpu_devices=4 is not used: the run trains on gpu, and the CPU devices "
      "only on the CPU")


def test_a_count_asked_for_after_jax_started_is_a_warning(monkeypatch, caplog):
  """main.cli() in a process whose JAX already runs (a notebook) cannot change the device
  count: an explicit --cpu_devices says so as a warning (it was an INFO line), auto quietly."""
  jax.devices()  # the backends run from here on, whatever count they started with
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
  config = tiny_mae_config(global_batch_size=12, **{"eval.batch_size": 12})
  with caplog.at_level(logging.INFO, logger=cpu_devices.__name__):
    assert cpu_devices.configure("3", [config], multi_process=False) is None
    assert cpu_devices.configure("auto", [config], multi_process=False) is None
  levels = [(r.levelno, "--cpu_devices=3" in r.getMessage()) for r in caplog.records
            if "could act" in r.getMessage()]
  assert levels == [(logging.WARNING, True), (logging.INFO, False)], caplog.text
  assert len(jax.devices()) == len(jax.devices("cpu"))  # nothing changed under the tests


def test_cpu_devices_split_the_batch_across_the_cores(tmp_path, monkeypatch, caplog):
  """On the CPU a run gets one JAX device per usable core, as many as split its batches
  evenly (the batch runs data parallel); an explicit count and XLA_FLAGS' own count win."""
  config = tiny_mae_config(global_batch_size=12, grad_accum_steps=2,
                           **{"eval.batch_size": 12})  # micro-batch 6
  assert [cpu_devices.count_for(config, cores) for cores in (1, 2, 4, 6, 16)] == [1, 2, 3, 6, 6]
  resident = tiny_mae_config(**{"eval.batch_size": 12, "data.device_resident": True,
                                "data.augment_on": "device"})
  # A split held on the devices is copied to each (data/device_resident.py bounds the copies'
  # memory): the step still splits across the cores, 1.22x faster on 2 (benchmarks.md).
  assert cpu_devices.count_for(resident, 16) == 4  # batch 8, evaluation batch 12
  config.eval.batch_size = 4  # the evaluation batch is split over the devices too
  assert cpu_devices.count_for(config, 16) == 2
  fixed = tiny_mae_config(mesh=(("data", 2), ("fsdp", -1)))
  assert cpu_devices.count_for(fixed, 16) == 1  # the config chose its devices
  large = tiny_mae_config(**{"model.variant": "B/16", "eval.batch_size": 12})
  assert cpu_devices.count_for(large, 16) == 1  # matmul-bound, and its state twice as costly
  # The encoder that init_from brings decides, not the config's own (an evaluation adopts it).
  export = tmp_path / "vitb_export"
  export.mkdir()
  (export / "model.json").write_text('{"config": {"model": {"variant": "B/16"}}}')
  brought = tiny_mae_config(global_batch_size=12, grad_accum_steps=2, init_from=str(export),
                            **{"eval.batch_size": 12})
  assert cpu_devices.count_for(brought, 16) == 1
  brought.init_from = str(tmp_path / "missing")  # unreadable: the run's own checks say so later
  assert cpu_devices.count_for(brought, 16) == 6
  with monkeypatch.context() as m:  # undone before anything starts this process's JAX
    m.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert cpu_devices.configure("auto", [config], multi_process=False) is None
    m.delenv("XLA_FLAGS")
    m.setenv("JAX_NUM_CPU_DEVICES", "3")
    with caplog.at_level(logging.WARNING):
      assert cpu_devices.configure("2", [config], multi_process=False) is None
    assert "--cpu_devices=2 is not used" in caplog.text
  with pytest.raises(ValueError, match="--cpu_devices='two'"):
    cpu_devices.configure("two", [config], multi_process=False)
  # A k-NN or probe job computes on one device: a count for it would do nothing.
  job = files.load_config_file(str(REPO / "configs" / "knn_fmnist.py"))
  with pytest.raises(ValueError, match="--cpu_devices=2: method 'knn' runs no training loop"):
    cpu_devices.configure("2", [job], multi_process=False)
  # A real start: two devices, and the run says so.
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  out = subprocess.run([sys.executable, "-m", "mim_jax.main",
                        f"--config={REPO}/configs/mae_fmnist.py:runlocal", "--cpu_devices=2",
                        "--config.export_encoder=False", f"--workdir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "2 JAX CPU devices" in out.stderr and "on 2 device(s)" in out.stderr
  if platform.libc_ver()[0] == "glibc" and "GLIBC_TUNABLES" not in env:
    assert "glibc malloc: huge pages" in out.stderr  # re-executed with malloc_tunables
  # Its checkpoint, written by 2 devices, reads in this 1-device process (init_from a workdir,
  # the converter): restored on the host, not onto the devices named in it.
  info, params = our_weights.read_weights(str(tmp_path))
  assert info["method"] == "mae" and len(jax.devices()) == 1
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params["encoder"]))


# ----------------------------------------------------------------------------- fuzzing

RUNLOCAL = f"--config={REPO}/configs/mae_vitb.py:runlocal"
# (flags, text the one-line error must contain: the field, and for typos the right field).
MALFORMED = [
    # Wrong types.
    (["--config.global_batch_size=abc"], "config.global_batch_size"),
    (["--config.seed=1.5"], "config.seed"),
    (["--config.masking.ratio=high"], "config.masking.ratio"),
    (["--config.data.hflip=maybe"], "config.data.hflip"),
    (["--config.model=3"], "config.model"),
    (["--config.optimizer.base_lr=1e-3x"], "config.optimizer.base_lr"),
    (["--config.export_encoder=2"], "config.export_encoder"),
    (["--config.image_size=(16,)"], "config.image_size"),
    (["--config.data.crop_scale=(0.5,)"], "config.data.crop_scale"),
    # Out of range.
    (["--config.masking.ratio=1.5"], "config.masking.ratio=1.5"),
    (["--config.masking.ratio=-0.1"], "config.masking.ratio=-0.1"),
    (["--config.global_batch_size=0"], "config.global_batch_size=0"),
    (["--config.log_every=0"], "config.log_every=0"),
    (["--config.checkpoint_every=-5"], "config.checkpoint_every=-5"),
    (["--config.keep_checkpoints=0"], "config.keep_checkpoints=0"),
    (["--config.optimizer.b1=1.0"], "config.optimizer.b1=1.0"),
    (["--config.optimizer.eps=0.0"], "config.optimizer.eps=0.0"),
    (["--config.optimizer.weight_decay=-1.0"], "config.optimizer.weight_decay=-1.0"),
    (["--config.model.drop_path_rate=1.0"], "config.model.drop_path_rate=1.0"),
    (["--config.data.num_workers=-1"], "config.data.num_workers=-1"),
    (["--config.max_consecutive_nonfinite=0"], "config.max_consecutive_nonfinite=0"),
    (["--config.max_consecutive_failed_saves=-1"], "config.max_consecutive_failed_saves=-1"),
    (["--config.total_steps=0"], "config.total_steps=0"),
    (["--config.data.label_fraction=0.0"], "config.data.label_fraction=0.0"),
    (["--config.channels=0"], "config.channels=0"),
    (["--config.seed=-1"], "config.seed=-1"),  # NumPy's generators refuse it (pictures)
    (["--config.seed=4294967296"], "config.seed=4294967296"),  # JAX keys keep 32 bits
    (["--config.optimizer.base_lr=inf"], "config.optimizer.base_lr=inf"),
    # The peak lr of 8 images: a min_lr above it makes the schedule climb.
    (["--config.optimizer.min_lr=1.0"], "config.optimizer.min_lr=1.0 is invalid: at most the "
                                        "peak lr"),
    # exp(cosine / T) of 20 votes overflows float32 below T = 0.0117: NaN scores.
    (["--config.knn.every_epochs=1.0", "--config.knn.temperature=0.005"],
     "config.knn.temperature=0.005"),
    (["--config.sharding_rules=(('[', ()),)"], "a rule whose regex compiles"),
    (["--config.sharding_rules=(-1.0,)"], "a sequence of (regex, spec) pairs"),
    # Not one of the allowed values.
    (["--config.data.on_bad_image=ignore"], "config.data.on_bad_image='ignore'"),
    (["--config.model.dtype=float64"], "config.model.dtype='float64'"),
    (["--config.method=byol"], "config.method='byol'"),
    (["--config.optimizer.name=adam"], "config.optimizer.name='adam'"),
    (["--config.optimizer.weight_decay_schedule=linear"],
     "config.optimizer.weight_decay_schedule='linear'"),
    (["--config.data.source=imagenet"], "config.data.source='imagenet'"),
    (["--config.masking.kind=checkerboard"], "config.masking.kind='checkerboard'"),
    # Unknown fields: typos get the field they were probably meant to be.
    (["--config.masking.ration=0.5"], "did you mean config.masking.ratio or "
                                      "config.masking.ratio_range?"),
    (["--config.ratio=0.5"], "did you mean config.masking.ratio?"),
    (["--config.optimiser.base_lr=0.1"], "did you mean config.optimizer.base_lr?"),
    (["--config.model.widht=64"], "did you mean config.model.width"),
    (["--config.data.num_worker=2"], "did you mean config.data.num_workers?"),
    (["--config.chekpoint_every=5"], "did you mean config.checkpoint_every?"),
    (["--config.lerning_rate=0.1"], "config.lerning_rate does not exist"),
    (["--confg.seed=3"], "Did you mean --config.seed?"),
    # Values that are fine alone but not together.
    (["--config.grad_accum_steps=3"], "multiple of grad_accum_steps=3"),
    (["--config.optimizer.warmup_epochs=5.0"], "config.optimizer.warmup_epochs=5.0"),
    (["--config.optimizer.weight_decay_schedule=cosine",
      "--config.optimizer.weight_decay_end=-0.1"], "config.optimizer.weight_decay_end=-0.1"),
    (["--config.masking.kind=blockwise"], "config.masking.kind='blockwise'"),
    (["--config.decoder.num_heads=5"], "config.decoder.num_heads=5"),
    (["--config.masking.mask_patch_size=32"], "config.masking.mask_patch_size=32"),
    (["--config.image_size=(40,40)"], "config.image_size=(40, 40)"),
    (["--config.data.synthetic_size=4"], "config.global_batch_size=8"),
    # 64 synthetic images // batch 8 x num_epochs 1: an 8-step schedule.
    (["--config.total_steps=9"], "config.total_steps=9 is invalid: -1 (the whole schedule) or "
                                 "at most the schedule's 8 steps"),
    (["--config.mesh=(('batch',-1),)"], "nothing splits over axis 'batch'"),
    # The shell ate the quotes: ml_collections gives the string's letters.
    (["--config.mesh=((fsdp,-1),)"], "arrived as the letters of '((fsdp,-1),)'"),
    (["--config.optimizer.schedule=multistep", "--config.optimizer.decay_epochs=(5.0,)"],
     "config.optimizer.decay_epochs"),
    (["--config.data.mean=(0.5,0.5)"], "config.data.mean"),
    (["--config.method=linprobe"], "is not used by method='linprobe'"),
    # 4 of the 64 synthetic images: the error names the field that left so few.
    (["--config.data.holdout=60"], "that config.data.holdout=60 leave"),
    # A config file that does not load (ml_collections reports it when the config is read).
    ([f"--config={REPO}/configs/no_such_recipe.py"], "no_such_recipe.py"),
    ([f"--config={REPO}/configs"], "Is a directory"),
]


def test_malformed_command_lines_fail_fast_naming_the_field(tmp_path, monkeypatch, capsys):
  """Every input exits 2 with `error: ...` naming the field, before a model is built."""
  import jax

  from mim_jax import main, registry

  def build_method(config, length=None):
    raise AssertionError("reached model building: the input was not rejected")
  monkeypatch.setattr(registry, "build_method", build_method)
  compiled = []

  def listener(event, *args, **kwargs):
    if "compile" in event:
      compiled.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for flags, expected in MALFORMED:
      with pytest.raises(SystemExit) as exit_info:
        main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={tmp_path / 'w'}", *flags])
      err = capsys.readouterr().err
      assert exit_info.value.code == 2, (flags, err)
      assert err.startswith("error: ") and expected in err, (flags, err)
      assert "Traceback" not in err, (flags, err)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(MALFORMED) >= 30 and not compiled, compiled


def test_a_config_file_that_fails_to_load_is_one_line(tmp_path, capsys):
  """A config file's own error (a mistyped field, a bad argument, not Python, not a
  ConfigDict) was a traceback, or a repr of a KeyError: one line now, at the file's line."""
  from mim_jax import main
  (tmp_path / "typo.py").write_text(
      "from mim_jax import registry\n\ndef get_config(arg=None):\n"
      "  c = registry.base_config('mae')\n  c.optimzer.base_lr = 1e-3\n  return c\n")
  (tmp_path / "dict.py").write_text("def get_config(arg=None):\n  return {'method': 'mae'}\n")
  (tmp_path / "none.py").write_text("def get_config(arg=None):\n  c = None\n")
  cases = {
      f"{tmp_path}/typo.py": "AttributeError: 'optimzer' Did you mean \"optimizer\" instead "
                             "of \"optimzer\"? (line 5)",
      f"{tmp_path}/dict.py": "returns an ml_collections.ConfigDict; it returns a dict",
      f"{tmp_path}/none.py": "its get_config(arg=None) returned None",
      f"{REPO}/README.md": "does not load: SyntaxError:",
      f"{REPO}/configs/mae_fmnist.py:runlocl": "does not load: ValueError: unknown config "
                                               "argument(s) ['runlocl']",
      f"{REPO}/configs/mae_fmnist.py:variant=Q/4,runlocal": "config.model.variant='Q/4' is "
                                                            "invalid",
  }
  for spec, expected in cases.items():
    with pytest.raises(SystemExit) as exit_info:
      main.cli(["mim_jax.main", f"--config={spec}", f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, (spec, err)
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, (spec, err)


def test_a_command_line_variant_sets_the_size_or_is_refused(tmp_path, capsys):
  """The Fashion-MNIST recipes set width, depth, heads and MLP beside variant Ti/4, and those
  fields take precedence over a variant's size: `--config.model.variant=S/4` alone trained the
  recipe's 128-wide encoder under the name S/4. It is refused with the flags that make it act
  (trainer and benchmark; the memory planner in test_parallel); the size fields set too, a new
  patch under the same size name, or a size that agrees pass."""
  from mim_jax import main
  from mim_jax.config import defaults as config_defaults
  path = f"{REPO}/configs/mae_fmnist.py"
  with pytest.raises(SystemExit) as exit_info:
    main.cli(["mim_jax.main", f"--config={path}", f"--workdir={tmp_path / 'w'}",
              "--config.model.variant=S/4"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2, err
  assert ("config.model.variant='S/4' would not set the size: the config file sets "
          "model.width=128, model.depth=6, model.num_heads=4, model.mlp_dim=512") in err, err
  assert ("Add --config.model.width=0 --config.model.depth=0 --config.model.num_heads=0 "
          "--config.model.mlp_dim=0 to train the S size") in err, err
  assert not os.path.exists(tmp_path / "w")
  out = subprocess.run([sys.executable, "-m", "mim_jax.bench", f"--config={path}",
                        "--config.model.variant=B/4", "--peer=none", "--steps=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "config.model.variant='B/4' would not set the size" in out.stderr
  # The same through a benchmark's --variant row, and a bench flag beside the field it sets.
  for flags, says in ((["--variant=model.variant=S/4"], "config.model.variant='S/4' would not"),
                      (["--batch=8", "--config.global_batch_size=16"],
                       "--batch=8 is invalid: given beside --config.global_batch_size")):
    out = subprocess.run([sys.executable, "-m", "mim_jax.bench", f"--config={path}", *flags,
                          "--peer=none", "--steps=1"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and says in out.stderr, out.stderr[-2000:]

  file_config = files.load_config_file(path)

  def check(**overrides):
    config = config_defaults.override(file_config.copy_and_resolve_references(), **overrides)
    validation.refuse_shadowed_variant(config, file_config, overrides)

  check(**{"model.variant": "S/4", "model.width": 0, "model.depth": 0, "model.num_heads": 0,
           "model.mlp_dim": 0})
  check(**{"model.variant": "Ti/2"})  # the file's size name: only the patch changes
  check(**{"model.width": 256})  # no variant given
  with pytest.raises(ConfigError, match=r"the config file sets model.depth=6, model.mlp_dim=512"
                     r".*Add --config.model.depth=0 --config.model.mlp_dim=0 to train the S"):
    check(**{"model.variant": "S/4", "model.width": 384, "model.num_heads": 6})
  # With weights to start from the encoder is theirs: no advice to resize it.
  with pytest.raises(ConfigError, match=r"would not set the size: the encoder is the one in "
                     r"init_from=/some/run .*Drop the flag"):
    check(**{"model.variant": "S/4", "init_from": "/some/run"})


def test_encoder_fields_beside_init_from_must_match_the_export(tmp_path, capsys):
  """An evaluation takes its encoder from init_from; a command-line encoder field that the
  export would silently replace is an error, one that agrees with it is accepted."""
  from mim_jax import main
  from mim_jax.config import defaults as config_defaults
  from mim_jax.weights import pretrained

  from conftest import export_fresh_encoder
  c = registry.base_config("finetune")
  config_defaults.use_fashion_mnist(c)
  export = export_fresh_encoder(c, str(tmp_path / "mae"))
  info = pretrained.read_model_info(export)["config"]["model"]
  base = [f"--config={REPO}/configs/finetune_fmnist.py:runlocal", f"--workdir={tmp_path / 'ft'}",
          f"--config.init_from={export}"]
  for flag, field in [("--config.model.width=256", "model.width"),
                      ("--config.model.variant=S/4", "model.variant"),
                      ("--config.model.mlp_act=quick_gelu", "model.mlp_act"),
                      ("--config.channels=3", "channels")]:
    with pytest.raises(SystemExit) as exit_info:
      main.cli(["mim_jax.main", *base, flag])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, (flag, err)
    assert f"config.{field}=" in err and f"init_from={export}" in err, err
  assert not os.path.exists(tmp_path / "ft")
  # Values equal to the export's pass the check.
  asked = {f"model.{k}": info[k] for k in pretrained.SIZE_FIELDS} | {"model.mlp_act": "gelu"}
  c.init_from = export
  c.model.update({k[6:]: v for k, v in asked.items()})
  pretrained.refuse_dropped_overrides(c, asked)
  # The raw-pixel baseline runs no encoder: its settings are refused, the variant too, and its
  # patch does not constrain the image size.
  c.init_from, c.classifier.features = "", "pixels"
  for field, value in (("model.dtype", "bfloat16"), ("model.variant", "mu/4")):
    with pytest.raises(ConfigError, match=rf"config.{field}='{value}' is not used: "
                       r"classifier.features='pixels' runs no encoder"):
      pretrained.refuse_dropped_overrides(c, {field: value})
  c.image_size = (30, 30)  # not a multiple of the variant's patch (4)
  validation.validate_model(c)
  c.classifier.features = "encoder"
  with pytest.raises(ConfigError, match=r"config.image_size=\(30, 30\) is invalid"):
    validation.validate_model(c)


def test_a_tokenizer_refuses_a_variant_that_changes_only_the_size():
  """A tokenizer reads only the variant's patch (its code grid): B/16 -> L/16 does nothing,
  B/16 -> B/8 changes the grid."""
  from mim_jax.training import setup
  file_config = files.load_config_file(f"{REPO}/configs/beit_tokenizer_imagenet.py")
  config = file_config.copy_and_resolve_references()
  config.model.variant = "L/16"
  with pytest.raises(ConfigError, match=r"config.model.variant='L/16' is not used: a "
                     r"tokenizer reads only the variant's patch size"):
    setup.refuse_inert_overrides(config, file_config, {"model.variant": "L/16"})
  config.model.variant = "B/8"
  setup.refuse_inert_overrides(config, file_config, {"model.variant": "B/8"})
  # Nor does it read labels: synthetic data's class count is refused as well.
  config.update_from_flattened_dict({"data.source": "synthetic", "data.synthetic_classes": 3})
  with pytest.raises(ConfigError, match=r"data.synthetic_classes=3 is not used: a tokenizer "
                     r"reads labels only to draw data.holdout"):
    registry.validate_config(config, file_config)


def test_continued_pre_training_reads_the_weight_init_for_what_the_export_lacks():
  """An evaluation from an export takes its whole encoder from it: model.weight_init is refused
  there (above). Continued pre-training keeps the init of what the export lacks (BEiT from an
  MAE export: the mask token), so the field is accepted."""
  c = registry.base_config("beit")
  c.update_from_flattened_dict({"init_from": "/exports/mae", "model.weight_init": "beit"})
  validation.check_unread(c, registry.base_config("beit"),
                          registry.method_class("beit").unread_rules())


def test_a_workdir_inside_the_image_folder_it_trains_on_is_refused(tmp_path, capsys):
  """--workdir in (or equal to) data.path of an image folder was accepted: the next run would
  list its pictures as images, in a class folder of their own. Refused in one line before
  the workdir is made, also through a symlink (to the folder, or a class folder linked in
  from the folder holding the workdir) and for data.eval_path; a folder beside the
  images (a name they prefix) is fine."""
  from PIL import Image

  from mim_jax import data, main
  images, evals = tmp_path / "images", tmp_path / "eval"
  for root in (images, evals):
    for label in ("a", "b"):
      (root / label).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / label / "0.png")
  (tmp_path / "link").symlink_to(images)
  common = [f"--config={REPO}/configs/mae_fmnist.py:runlocal",
            "--config.data.source=image_folder", f"--config.data.path={images}",
            f"--config.data.eval_path={evals}"]
  for workdir, field, root in ((images, "path", images), (images / "run", "path", images),
                               (tmp_path / "link" / "a" / "run", "path", images),
                               (evals / "run", "eval_path", evals)):
    with pytest.raises(SystemExit) as exit_info:
      main.cli(["mim_jax.main", *common, f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith(f"error: --workdir='{workdir}' is invalid: a folder outside the image "
                          f"folder config.data.{field}='{root}' that the run reads") and (
        err.count("\n") == 1), err
  assert sorted(os.listdir(images)) == ["a", "b"] and sorted(os.listdir(evals)) == ["a", "b"]
  cfg = files.load_config_file(f"{REPO}/configs/mae_fmnist.py").data
  cfg.update(source="image_folder", path=str(images))
  data.check_workdir_outside_images(cfg, str(tmp_path / "images_run"))
  data.check_workdir_outside_images(cfg, str(tmp_path))  # the images inside the workdir: fine
  # Under a hidden folder of the image folder: never listed, so fine; under a listed one, not.
  data.check_workdir_outside_images(cfg, str(images / ".runs" / "r1"))
  data.check_workdir_outside_images(cfg, str(images / "a" / ".runs"))
  with pytest.raises(ConfigError, match=r"that the run reads(?! \(through)"):
    data.check_workdir_outside_images(cfg, str(images / ".runs" / ".." / "a" / "r1"))
  # A class folder linked in from the folder that holds the workdir: the listing follows it.
  (tmp_path / "home" / "runs").mkdir(parents=True)
  (images / "c").symlink_to(tmp_path / "home")
  link, target = re.escape(str(images / "c")), re.escape(os.path.realpath(tmp_path / "home"))
  with pytest.raises(ConfigError, match=r"config.data.path='.*images' that the run reads "
                     rf"\(through the symlink {link} -> {target}\)"):
    data.check_workdir_outside_images(cfg, str(tmp_path / "home" / "runs" / "r1"))
  data.check_workdir_outside_images(cfg, str(tmp_path / "elsewhere"))
  # A hidden link is not listed (nor read): no refusal for it.
  (images / "c").rename(images / ".c")
  data.check_workdir_outside_images(cfg, str(tmp_path / "home" / "runs" / "r1"))
  # A class folder linked to the pictures inside the workdir: refused too.
  (images / "d").symlink_to(tmp_path / "home" / "runs" / "r1" / "reconstructions")
  with pytest.raises(ConfigError, match=r"through the symlink .*d -> "):
    data.check_workdir_outside_images(cfg, str(tmp_path / "home" / "runs" / "r1"))


def test_an_override_of_the_wrong_type_says_what_the_field_takes(capsys):
  """--config.num_epochs=1.5 said only "invalid literal for int() with base 10: '1.5'": now the
  field, the value and what it takes (a whole number; for num_epochs, how to train part of an
  epoch), for any integer, float or bool field."""
  from absl import flags

  from mim_jax import main
  cases = {
      ("--config.num_epochs=1.5",): "config.num_epochs='1.5' is invalid: a whole number (the "
                                    "field is an integer). For part of an epoch, "
                                    "--config.total_steps=N stops the run at step N",
      ("--config.knn.k", "2.5"): "config.knn.k='2.5' is invalid: a whole number (the field is an "
                                 "integer).\n",
      ("--config.seed=1e3",): "config.seed='1e3' is invalid: a whole number",
      ("--config.optimizer.base_lr=fast",): "config.optimizer.base_lr='fast' is invalid: a "
                                            "number (the field is a float).",
      ("--config.data.hflip=maybe",): "config.data.hflip='maybe' is invalid: True or False.",
  }
  for args, says in cases.items():
    argv = ["mim_jax.main", f"--config={REPO}/configs/mae_fmnist.py", *args]
    flag_values = flags.FlagValues()
    main.define_flags(flag_values, argv)
    with pytest.raises(SystemExit) as exit_info:
      main.parse_flags(argv, flag_values)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {says}"), (args, err)
    assert "invalid literal" not in err and "could not convert" not in err, err
