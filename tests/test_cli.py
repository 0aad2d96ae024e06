"""Bad input fails fast, before compilation, with a message naming the field."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mim_jax import config_validation
from mim_jax.config_errors import ConfigError

from conftest import REPO, tiny_mae_config


@pytest.mark.parametrize("overrides,match", [
    ({"masking.ratio": 1.0}, r"config.masking.ratio=1.0 is invalid: a number strictly between 0 and 1"),
    ({"masking.ratio": 0.0}, r"config.masking.ratio=0.0"),
    ({"masking.ratio": 0.99}, r"config.masking.ratio=0.99 .*at least one of the 16 patches"),
    ({"image_size": (16, 18)}, r"config.image_size=\(16, 18\) .*divisible by the patch size 4.*width 18"),
    ({"model.variant": "Q/4"}, r"config.model.variant='Q/4'"),
    ({"model.variant": "B16"}, r"config.model.variant='B16'.*SIZE/PATCH"),
    ({"method": "maee"}, r"config.method='maee' is invalid: one of \['finetune', 'knn', 'linprobe', 'mae'\]"),
    ({"model.dtype": "float8"}, r"config.model.dtype='float8'"),
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
])
def test_invalid_config_names_field_value_and_allowed(overrides, match):
  with pytest.raises(ConfigError, match=match):
    config_validation.validate_config(tiny_mae_config(**overrides))


def test_batch_must_split_over_devices_and_accumulation():
  config = tiny_mae_config(global_batch_size=12, grad_accum_steps=2)
  config_validation.validate_for_devices(config, batch_parallelism=2, process_count=1)
  with pytest.raises(ConfigError, match=r"global_batch_size=12 .*\(data-parallel devices 8\) x "
                     r"\(grad_accum_steps 2\) = 16"):
    config_validation.validate_for_devices(config, batch_parallelism=8, process_count=1)


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
  assert out.returncode != 0
  assert "ration" in out.stderr
