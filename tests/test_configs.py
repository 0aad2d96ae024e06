"""Every config file loads, validates, and its runlocal variant trains a few steps."""

from __future__ import annotations

import glob
import os

import pytest
from ml_collections import config_flags

from mim_jax import config_validation, train

from conftest import REPO

CONFIG_FILES = sorted(glob.glob(str(REPO / "configs" / "*.py")))


def _load(path, arg=None):
  return config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      "config", path).get_config(arg)


def test_there_are_configs():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {"mae_vitb.py", "mae_vitl.py", "mae_vith.py", "mae_fmnist.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_validates(path):
  config = _load(path)
  if config.data.source == "fashion_mnist" and not os.path.isdir(config.data.path):
    pytest.skip("Fashion-MNIST not installed")
  config_validation.validate_config(config)


def test_imagenet_configs_follow_the_paper():
  for name, variant in [("mae_vitb.py", "B/16"), ("mae_vitl.py", "L/16"), ("mae_vith.py", "H/14")]:
    c = _load(str(REPO / "configs" / name))
    assert c.model.variant == variant
    assert (c.global_batch_size, c.optimizer.base_lr, c.optimizer.weight_decay) == (4096, 1.5e-4, 0.05)
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.warmup_epochs) == (0.9, 0.95, 40)
    assert (c.masking.ratio, c.target.norm_pix, tuple(c.data.crop_scale)) == (0.75, True, (0.2, 1.0))
    assert (c.decoder.width, c.decoder.depth, c.decoder.num_heads) == (512, 8, 16)


def test_unknown_config_argument_is_rejected():
  with pytest.raises(ValueError, match="unknown config argument"):
    _load(str(REPO / "configs" / "mae_vitb.py"), "runlocl")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_runlocal_variant_trains(path, tmp_path):
  config = _load(path, "runlocal")
  if config.data.source == "fashion_mnist" and not os.path.isdir(config.data.path):
    pytest.skip("Fashion-MNIST not installed")
  state = train.run(config, str(tmp_path))
  assert int(state.step) == config.total_steps
  assert os.path.isdir(tmp_path / "checkpoints" / str(config.total_steps))
