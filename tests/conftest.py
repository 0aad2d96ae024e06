"""Shared test setup: small configs and a place for the repo root."""

from __future__ import annotations

import importlib.abc
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
sys.path.insert(0, str(REPO))

# One persistent XLA compilation cache for the whole session, shared by the pytest-xdist
# workers and every process a test starts (JAX reads these variables when it starts; set here,
# before any test imports it). Tests compile the same micro models' steps again and again, as
# fresh closures or in fresh processes, and on two cores compiling is a large share of the
# suite's time. A cache the caller set (JAX_COMPILATION_CACHE_DIR) is used as it is; a
# process started without one on purpose (JAX_ENABLE_COMPILATION_CACHE=false) makes none.
_OWN_XLA_CACHE = None
if ("JAX_COMPILATION_CACHE_DIR" not in os.environ
    and os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "").lower() not in ("false", "0")):
  _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="mim_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# For test processes that are bound by compilation (micro models, a few steps, many programs:
# the 8-device scripts, the multi-process runs): LLVM's lowest optimisation level roughly
# halves XLA:CPU's compile time (measured: the 8-device parallelism script 66 s instead of 99).
# XLA's program (HLO) is the same, and so is what the tests check; compiled code runs slower,
# so tests with real training work keep the default.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0"


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "long: about a minute or more on two cores (several processes, 8 simulated "
      "devices, kill-and-resume cycles); collected first, see pytest_collection_modifyitems")


def pytest_collection_modifyitems(config, items):
  """The long tests go first (otherwise in collection order): pytest-xdist hands out the rest
  as workers free up, so the suite does not end with one worker on a long test while the
  other waits. Every worker collects the same order, which xdist requires."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_unconfigure(config):
  """The process that made the cache (the controller, or a run without xdist) removes it."""
  if _OWN_XLA_CACHE is not None and not hasattr(config, "workerinput"):
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


def tiny_config(method: str = "mae", **overrides):
  """A micro config of `method` on synthetic 16x16 RGB images (4x4 patches -> 16 patches);
  only the fields the method has are set."""
  from mim_jax import registry
  from mim_jax.config import defaults as config_defaults
  c = registry.base_config(method)
  c.image_size = (16, 16)
  c.model.variant = "mu/4"
  if "decoder" in c:
    c.decoder.update({k: v for k, v in dict(width=32, depth=1, num_heads=2).items()
                      if k in c.decoder})
  c.data.update(source="synthetic", synthetic_size=64)
  if overrides.get("data.source", "synthetic") == "synthetic":
    # A few steps of a micro model on synthetic images are bound by compilation, as in
    # `:runlocal` (config.defaults.apply_runlocal); runs on real data train long enough
    # for the generated code's speed to matter and keep XLA's default.
    c.compiler_options = "--xla_backend_optimization_level=0"
  if "num_workers" in c.data:
    c.data.num_workers = 0
  if "optimizer" in c:
    c.global_batch_size = 8
    c.num_epochs = 2
    c.optimizer.warmup_epochs = 1.0
    c.log_every = 1
    c.checkpoint_every = 2
  if "viz_every" in c:
    c.viz_every = 0
  if overrides.get("data.source", "synthetic") != "synthetic":
    c.data.synthetic_size = registry.base_config(method).data.synthetic_size  # not read then
  return config_defaults.override(c, **overrides)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A micro MAE encoder (16x16 RGB, patch 4) trained 2 steps: a frozen teacher for the
  distillation tests (MaskDistill, mim with teacher features, VQ-KD)."""
  from mim_jax.training import loop as train
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.run(tiny_config("mae", total_steps=2), workdir)
  return workdir


def imagenet_config_without_its_data(tmp_path: pathlib.Path) -> pathlib.Path:
  """A config file of the runlocal MAE size reading ImageNet from TFDS in `tmp_path`, where no
  dataset is prepared: for the tools that build a step without the data (bench, memory_plan)."""
  config = tmp_path / "mae_imagenet_small.py"
  config.write_text(f"""
import importlib.util
spec = importlib.util.spec_from_file_location("mae_vitb", "{REPO}/configs/mae_vitb.py")
mae_vitb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mae_vitb)

def get_config(arg=None):
  c = mae_vitb.get_config("runlocal")
  c.data.update(source="tfds", tfds_name="imagenet2012", tfds_data_dir="{tmp_path}")
  return c
""")
  return config


def tiny_mae_config(**overrides):
  """`tiny_config` of MAE, or of `method=...` when the overrides name one."""
  return tiny_config(overrides.pop("method", "mae"), **overrides)


def tiny_beit_config(tokenizer_path: str = "", **overrides):
  """A micro BEiT config on synthetic 16x16 RGB images (16 patches of 4x4), 16 codes."""
  from mim_jax.config import defaults as config_defaults
  c = tiny_mae_config(method="beit")
  c.masking.update(kind="blockwise", ratio=0.4, min_block=2)
  c.tokenizer.update(vocab_size=16, path=tokenizer_path)
  return config_defaults.override(c, **overrides)


@pytest.fixture
def prepared_tfds_root(tmp_path, monkeypatch):
  """TFDS_DATA_DIR pointing at a folder where ImageNet looks prepared to the start-up check
  (imagenet2012/5.1.0/dataset_info.json), for tests that validate the ImageNet configs
  without reading any data."""
  version = tmp_path / "tfds" / "imagenet2012" / "5.1.0"
  version.mkdir(parents=True)
  (version / "dataset_info.json").write_text("{}")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  return str(tmp_path / "tfds")


class ImportAttempts(importlib.abc.MetaPathFinder):
  """Records every attempt to import the packages `names` (and their modules) while it is
  first on sys.meta_path. Where a package is not installed, `name not in sys.modules` holds
  whatever the code does; an attempt shows the code that would load it where it is (e.g.
  TensorFlow on a GPU image)."""

  def __init__(self, *names: str):
    self.packages, self.names = names, []

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in self.packages:
      self.names.append(name)
    return None  # the other finders decide

  def __enter__(self):
    sys.meta_path.insert(0, self)
    return self

  def __exit__(self, *exc):
    sys.meta_path.remove(self)


requires_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR),
    reason=f"Fashion-MNIST not installed at {FMNIST_DIR} (apt-get install -y dataset-fashion-mnist)")


def rel_err(ours, ref) -> float:
  """max|ours - ref| / max|ref| over the whole array (scalars: |ours - ref| / |ref|): the
  parity measure of the conversion tests."""
  import numpy as np
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def export_fresh_encoder(config, workdir: str) -> str:
  """What a finished MAE run on the same images as `config` leaves for evaluations and
  teachers (workdir/encoder: weights + model.json), with freshly initialised weights: only the
  initialisation is compiled, not a train step (a ViT-B/16 step costs ~25 s on 2 CPU cores)."""
  import jax
  import jax.numpy as jnp

  from mim_jax import registry
  from mim_jax.config import defaults as config_defaults
  from mim_jax.training import loop as train
  c = registry.base_config("mae")
  config_defaults.apply_runlocal(c, keep_data=True)
  c.update(image_size=tuple(config.image_size), channels=config.channels)
  # The size as `config` resolves it: a recipe's explicit width/depth/heads/MLP take
  # precedence over its variant's (apply_runlocal zeroed them for the micro model).
  c.model.variant = config.model.variant
  c.model.update({k: config.model.get(k, 0) for k in ("width", "depth", "num_heads", "mlp_dim")})
  c.data.update(source=config.data.source, path=config.data.path, mean=tuple(config.data.mean),
                std=tuple(config.data.std))
  if c.data.source != "synthetic":
    c.data.synthetic_size = registry.base_config("mae").data.synthetic_size
  registry.validate_config(c)
  method = registry.build_method(c)
  images = jnp.zeros((1, *c.image_size, c.channels), jnp.float32)
  params, extra = jax.jit(method.init)(jax.random.key(0), images)
  method.export(workdir, *jax.device_get((params, extra)), train._model_info(c))
  return workdir


def train_micro_mae_teacher(workdir: str, steps: int = 30) -> str:
  """A micro MAE encoder trained on Fashion-MNIST for `steps` steps (`mae_fmnist.py:runlocal`
  at batch 64 and lr 1e-3 from the first step: the runlocal schedule's warmup would leave it at
  its initial weights), for the tests that distil a trained teacher; checks that it learnt."""
  import json

  from mim_jax.config import defaults as config_defaults
  from mim_jax.config import files
  from mim_jax.training import loop as train
  config = files.load_config_file(f"{REPO}/configs/mae_fmnist.py:runlocal")
  train.run(config_defaults.override(config, **{
      "total_steps": steps, "global_batch_size": 64, "optimizer.warmup_epochs": 0.0,
      "optimizer.base_lr": 4e-3, "checkpoint_every": 1000}), workdir)
  loss = [r["loss"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
          if "loss" in r]
  assert sum(loss[-5:]) < 0.6 * sum(loss[:5]), loss  # 1.97 -> 0.77 on 2026-12-03
  return workdir


def export_random_tokenizer(config, directory: str, **tokenizer_overrides) -> str:
  """Exports a randomly initialised micro VQ tokenizer that fits BEiT `config` (its image size,
  patch grid, channels, vocabulary and normalisation) to `directory`; returns `directory`."""
  import jax
  import jax.numpy as jnp

  from mim_jax import registry
  from mim_jax.tokenizers.vq import VQTokenizer
  c = registry.base_config("vq_tokenizer")
  c.update(image_size=tuple(config.image_size), channels=config.channels)
  # The size as `config` resolves it: a recipe's explicit width/depth/heads/MLP take
  # precedence over its variant's (apply_runlocal zeroed them for the micro model).
  c.model.variant = config.model.variant
  c.model.update({k: config.model.get(k, 0) for k in ("width", "depth", "num_heads", "mlp_dim")})
  c.data.update(mean=tuple(config.data.mean), std=tuple(config.data.std))
  c.tokenizer.update(dict(width=8, num_blocks=1, code_dim=8,
                          vocab_size=int(config.tokenizer.vocab_size)), **tokenizer_overrides)
  method = VQTokenizer(c)
  params, extra = method.init(jax.random.key(0),
                              jnp.zeros((1, *tuple(c.image_size), c.channels), jnp.float32))
  method.export(directory, jax.device_get(params), jax.device_get(extra), {})
  return directory


def init_and_step(method, batch, num_steps: int = 2, lr: float = 1e-3):
  """A fresh state of `method` (AdamW at `lr`, init key 0, the batch's image shape) and
  `num_steps` jitted train steps on `batch` (step rng key 2): `take_steps`'s result."""
  import jax
  import optax

  from mim_jax.training import step as step_lib
  tx = optax.adamw(lr)
  state = jax.jit(step_lib.init_train_state, static_argnums=(0, 1, 3))(
      method, tx, jax.random.key(0), (1, *batch["image"].shape[1:]))
  step = jax.jit(step_lib.make_train_step(method, tx, lambda s: lr))
  return take_steps(step, state, batch, jax.random.key(2), num_steps)


def take_steps(step, state, batch, rng, num_steps: int = 2):
  """Applies a jitted train `step` `num_steps` times to the same batch:
  ([state, state_1, ..., state_n], [metrics_1, ..., metrics_n])."""
  states, metrics = [state], []
  for _ in range(num_steps):
    state, m = step(state, batch, rng)
    states.append(state)
    metrics.append(m)
  return states, metrics


def build_tfds_fashion_mnist(data_dir: str, train: int = 256, test: int = 64,
                             name: str = "fashion_mnist_mini") -> str:
  """Builds a real TFDS dataset `name` (ArrayRecord, version 1.0.0) in `data_dir` from the
  first `train` / `test` images of the Debian Fashion-MNIST files: a dataset builder as a user
  would write one, prepared by TFDS itself. The images are stored PNG-encoded (encoded here
  with PIL, so no TensorFlow is needed). Returns `name`; read it with tfds.data_source."""
  import io
  import types

  import tensorflow_datasets as tfds
  from PIL import Image

  from mim_jax.data import idx

  def examples(split, count):
    images, labels, _ = idx.load_fmnist(FMNIST_DIR, split)
    for i in range(count):
      buf = io.BytesIO()
      Image.fromarray(images[i]).save(buf, format="PNG")
      buf.seek(0)
      yield i, {"image": buf, "label": int(labels[i])}

  def body(ns):
    ns["VERSION"] = tfds.core.Version("1.0.0")
    ns["_info"] = lambda self: tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10)}))
    ns["_split_generators"] = lambda self, dl_manager: {
        "train": examples("train", train), "test": examples("test", test)}
    ns["_generate_examples"] = lambda self, *args: iter(())  # the splits above generate

  # TFDS names a builder after its class (FashionMnistMini -> fashion_mnist_mini); not
  # registered, so that every test can build its own.
  class_name = "".join(part.capitalize() for part in name.split("_"))
  builder = types.new_class(class_name, (tfds.core.GeneratorBasedBuilder,),
                            {"skip_registration": True}, body)
  # TFDS makes an empty temporary folder (tempfile.mkdtemp) for a builder whose dataset is not
  # prepared yet, and never removes it: made inside data_dir's parent, not left in /tmp.
  scratch = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(data_dir)))
  saved, tempfile.tempdir = tempfile.tempdir, scratch
  try:
    builder(data_dir=data_dir, file_format="array_record").download_and_prepare()
  finally:
    tempfile.tempdir = saved
    shutil.rmtree(scratch, ignore_errors=True)
  return name


def tool_flags(module, args, monkeypatch) -> list[str]:
  """`python -m MODULE ARGS` parsed in this process as the program parses it: `module`'s flags
  defined on a fresh FlagValues (its `define_flags`), read by the trainer's parser (a bad flag
  exits 2 with its one-line error), installed as the module's FLAGS for the test. Returns the
  remaining argv, for the module's `main(argv)` / `run(argv)`."""
  from absl import flags

  from mim_jax import main as trainer
  flag_values, argv = flags.FlagValues(), [module.__name__, *args]
  module.define_flags(flag_values, argv)
  remaining = trainer.parse_flags(argv, flag_values)
  monkeypatch.setattr(module, "FLAGS", flag_values)
  return remaining
