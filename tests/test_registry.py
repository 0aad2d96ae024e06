"""One method, one file: a method defined here trains through the loop with no other file
changed; every config holds exactly its method's fields; the import graph has no cycle."""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from mim_jax import registry
from mim_jax.config import validation as v
from mim_jax.config.errors import ConfigError
from mim_jax.methods import base, mae
from mim_jax.models import flops
from mim_jax.models.vit import encoder_from_config, patchify
from mim_jax.training import loop

from conftest import REPO, tiny_config


class ToyDenoiser(base.PretrainingMethod):
  """A toy objective: the encoder's patch tokens regress the noise-free patches of a noisy
  image through a linear head. Owns one field, `toy.noise`."""

  name = "toy_denoiser"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    del c["masking"]  # it masks nothing
    c.toy = ml_collections.ConfigDict(dict(noise=0.5))

  @classmethod
  def validate(cls, config):
    v.validate_pretraining_fields(config)
    v.require(v.is_number(config.toy.noise) and config.toy.noise >= 0, "toy.noise",
              config.toy.noise, "a number >= 0")

  @classmethod
  def forward_flops(cls, config):
    encoder = flops.encoder_flops(config.model, config.image_size, config.channels)
    return {"encoder": encoder, "total": encoder}

  def __init__(self, config, length=None):
    super().__init__(config, length)
    self.encoder = encoder_from_config(config.model, config.image_size, config.channels)
    self.head = nn.Dense(self.encoder.patch_size ** 2 * config.channels)
    self.noise = float(config.toy.noise)

  def init(self, rng, images):
    enc_rng, head_rng = jax.random.split(rng)
    encoder = self.encoder.init(enc_rng, images)["params"]
    tokens, _ = self.encoder.apply({"params": encoder}, images)
    return {"encoder": encoder, "head": self.head.init(head_rng, tokens)["params"]}, {}

  def loss(self, params, extra, batch, rng, train=True):
    images = batch["image"]
    noisy = images + self.noise * jax.random.normal(rng, images.shape)
    tokens, _ = self.encoder.apply({"params": params["encoder"]}, noisy)
    pred = self.head.apply({"params": params["head"]}, tokens[:, 1:])
    loss = jnp.mean(jnp.square(pred - patchify(images, self.encoder.patch_size)))
    return loss, ({"loss": loss}, extra)


@pytest.fixture
def toy():
  registry.register(ToyDenoiser)
  yield ToyDenoiser
  del registry.METHODS[ToyDenoiser.name]


def test_a_name_taken_by_another_method_is_not_silently_replaced(toy):
  """register() replaced a built-in method of the same name without a word."""
  class Impostor(ToyDenoiser):
    name = "mae"

  with pytest.raises(ValueError, match=r"method name 'mae' is taken by mim_jax.methods.mae.MAE"):
    registry.register(Impostor)
  assert registry.method_class("mae").__name__ == "MAE"
  registry.register(toy)  # the same class again: nothing changes
  redefined = type("ToyDenoiser", (ToyDenoiser,), {"__module__": ToyDenoiser.__module__,
                                                   "__qualname__": ToyDenoiser.__qualname__})
  registry.register(redefined)  # its definition run again (a notebook cell): taken as it
  registry.register(toy, replace=True)
  registry.register(Impostor, replace=True)  # on purpose
  try:
    assert registry.method_class("mae") is Impostor
  finally:
    registry.register(mae.MAE, replace=True)


def _toy_config(**overrides):
  return tiny_config("toy_denoiser", **{"num_epochs": 1, "optimizer.warmup_epochs": 0.0,
                                        "checkpoint_every": 2, **overrides})


def test_a_method_is_one_class_and_a_config(toy, tmp_path, caplog):
  """Registered, it validates, trains, checkpoints, resumes exactly and exports; its field
  is refused for other methods and theirs for it."""
  config = _toy_config()
  assert set(config.keys()) >= {"toy", "knn", "export_encoder"} and "masking" not in config
  registry.validate_config(config)
  assert registry.forward_flops(config)["total"] > 0

  # Two steps of a run of 8 (64 synthetic images / 8), then the rest: the same as one run.
  interrupted, whole = str(tmp_path / "interrupted"), str(tmp_path / "whole")
  loop.run(_toy_config(total_steps=2), interrupted)
  assert max(map(int, os.listdir(os.path.join(interrupted, "checkpoints")))) == 2
  with caplog.at_level(logging.INFO, logger=loop.__name__):
    resumed = loop.run(_toy_config(), interrupted)
  assert "at step 2" in caplog.text  # resumed (a restart with the same seed ends alike)
  uninterrupted = loop.run(_toy_config(), whole)
  assert int(resumed.step) == int(uninterrupted.step) == 8
  chex.assert_trees_all_equal(jax.device_get(resumed.params),
                              jax.device_get(uninterrupted.params))
  info = json.load(open(os.path.join(interrupted, "encoder", "model.json")))
  assert info["method"] == "toy_denoiser" and info["config"]["toy"]["noise"] == 0.5

  with pytest.raises(ConfigError, match=r"config.toy.noise=-1.0 is invalid: a number >= 0"):
    registry.validate_config(_toy_config(**{"toy.noise": -1.0}))
  mae = tiny_config("mae")
  with mae.unlocked():
    mae.toy = ml_collections.ConfigDict(dict(noise=0.1))
  with pytest.raises(ConfigError, match=r"config.toy is not used by method='mae'.*'toy_denoiser'"):
    registry.validate_config(mae)


def test_each_pre_training_method_is_one_file_of_under_200_lines():
  """A method composes the shared parts (masking, targets, teachers, decoders, losses); one
  that grows past 200 lines is keeping a part to itself that belongs among them."""
  files = {name: pathlib.Path(inspect.getsourcefile(cls)) for name, cls in registry.METHODS.items()
           if issubclass(cls, base.PretrainingMethod) and cls.__module__.startswith(
               "mim_jax.methods.")}
  assert {"mae", "simmim", "maskfeat", "data2vec", "data2vec2", "ibot", "beit",
          "maskdistill"} <= set(files)
  lines = {name: len(path.read_text().splitlines()) for name, path in files.items()}
  assert max(lines.values()) < 200, lines


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_every_config_field_is_read_by_its_method(method):
  """Blocks only some methods read exist only for them (the audit of issue 19)."""
  c = registry.base_config(method)
  keys = set(c.keys())
  owned = {"decoder": {"mae", "data2vec2"},
           "teacher": {"data2vec", "data2vec2", "maskdistill", "vqkd_tokenizer"},
           "ibot": {"ibot"},
           "multicrop": {"ibot"},
           "tokenizer": {"beit", "vq_tokenizer", "vqkd_tokenizer", "dvae_tokenizer"},
           "probe": {"probe"},
           "classifier": {"linprobe", "finetune", "knn", "probe", "attentive_probe"},
           "attentive": {"attentive_probe"}}
  for block, methods in owned.items():
    assert (block in keys) == (method in methods), (method, block)
  assert ("masking" in keys) == (registry.method_class(method).kind == "pretraining")
  assert ("optimizer" in keys) == (registry.method_class(method).kind != "job")
  if method == "ibot":
    assert "crop_scale" not in c.data  # its views use multicrop.global_scale
  if "tokenizer" in keys and method == "dvae_tokenizer":
    assert not {"decay", "eps", "commitment", "restart_after", "l2_normalize",
                "codebook_update", "kmeans_init"} & set(c.tokenizer)


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_each_method_declares_the_weight_paths_its_config_has(method):
  """`Method.weight_fields` names exactly the fields of the method's config that point at
  weights read at start (init_from, every *.path outside data.*): a resume compares them as
  moved weights (resume_check), so a method whose field is missing there would refuse or
  take a moved path without saying that its weights are not read again."""
  from mim_jax.config.errors import dotted_keys
  fields = {key for key in dotted_keys(registry.base_config(method))
            if not key.startswith("data.") and (key == "init_from" or key.endswith(".path"))}
  assert set(registry.method_class(method).weight_fields) == fields


@pytest.mark.parametrize("overrides, message", [
    # Fields read only under a condition that does not hold keep their defaults.
    ({"optimizer.name": "sgd", "optimizer.b2": 0.99}, r"optimizer.b2=0.99 is not used"),
    ({"optimizer.schedule": "multistep", "optimizer.min_lr": 1e-5,
      "optimizer.decay_epochs": (1.0,)}, r"optimizer.min_lr=1e-05 is not used"),
    # A warmup-only schedule (warmup_epochs = num_epochs) has no decay to end at min_lr.
    ({"optimizer.warmup_epochs": 2.0, "optimizer.min_lr": 1e-5},
     r"optimizer.min_lr=1e-05 is not used: .*warmup_epochs = num_epochs leaves no decay"),
    ({"masking.kind": "random", "masking.min_block": 4}, r"masking.min_block=4 is not used"),
    ({"data.tfds_name": "cifar10"}, r"data.tfds_name='cifar10' is not used"),
    ({"knn.k": 5}, r"knn.k=5 is not used: the k-NN monitor is off"),
    # A method's own conditional fields (Method.unread_rules): a target kind's settings.
    ({"method": "mim", "target.tokenizer.vocab_size": 512},
     r"target.tokenizer.vocab_size=512 is not used: only target.kind='tokens'"),
])
def test_fields_a_setting_does_not_read_must_keep_their_defaults(overrides, message):
  overrides = dict(overrides)
  method = overrides.pop("method", "mae")
  with pytest.raises(ConfigError, match=message):
    registry.validate_config(tiny_config(method, **{"masking.min_block": 2, **overrides}
                                         if method != "mae" else overrides))


def test_ibot_ratio_is_not_read_beside_a_ratio_range():
  c = tiny_config("ibot", **{"masking.ratio_range": (0.1, 0.5), "masking.min_block": 1,
                             "masking.ratio": 0.3, "ibot.warmup_teacher_temp_epochs": 1.0,
                             "ibot.freeze_last_layer_epochs": 0.0,
                             "multicrop.local_size": (8, 8)})
  with pytest.raises(ConfigError, match=r"masking.ratio=0.3 is not used: masking.ratio_range"):
    registry.validate_config(c)


def _imports(path: pathlib.Path) -> set[str]:
  """Every mim_jax module `path` imports, at the top or inside a function."""
  tree = ast.parse(path.read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("mim_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mim_jax"):
      out.add(node.module)
      out |= {f"{node.module}.{a.name}" for a in node.names}
  return out


def test_the_import_graph_has_no_cycle():
  """Imports run one way, lazy ones included (registry -> methods / evaluate / tokenizers ->
  parts); a cycle means a layer is wrong."""
  root = REPO / "mim_jax"
  modules = {}
  for path in root.rglob("*.py"):
    rel = path.relative_to(REPO).with_suffix("")
    name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    modules[name] = path
  def with_packages(target):  # importing a.b.c runs the __init__ of a.b too
    parts = target.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts) + 1)}

  graph = {name: {m for t in _imports(path) for m in with_packages(t)
                  if m in modules and m != name and not name.startswith(m + ".")}
           for name, path in modules.items()}
  state: dict[str, int] = {}

  def visit(node, stack):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 2

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


@pytest.mark.parametrize("method, field, value", [
    # The audit of issue 19: each of these was accepted and silently did nothing.
    ("linprobe", "classifier.label_smoothing", 0.9),   # the probe has no label smoothing
    ("ibot", "teacher.ema_decay", 0.9),                # iBOT's teacher reads ibot.momentum
    ("simmim", "decoder.width", 64),                    # only MAE has a decoder
    ("ibot", "data.crop_scale", (0.5, 1.0)),           # iBOT crops with multicrop.*_scale
    ("dvae_tokenizer", "tokenizer.l2_normalize", True),  # VQ-only fields
    ("dvae_tokenizer", "tokenizer.decay", 0.9),
    ("vq_tokenizer", "tokenizer.kind", "vq"),          # the method is the kind (no method has it)
    ("mae", "classifier.probe_layer", 3),              # the k-NN monitor reads the output
    ("knn", "optimizer.base_lr", 0.1),                 # a job trains nothing
])
def test_fields_a_method_does_not_read_are_refused_by_name(method, field, value):
  c = tiny_config(method)
  node = c
  with c.unlocked():
    for part in field.split(".")[:-1]:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[field.split(".")[-1]] = value
  block = field.split(".")[0] if field.split(".")[0] not in registry.base_config(method) else field
  message = (rf"config.{block} is not used by method='{method}'" if registry.owners(block)
             else rf"config.{block} does not exist")
  with pytest.raises(ConfigError, match=message):
    registry.validate_config(c)


def test_pretraining_validates_what_its_k_nn_monitor_reads():
  with pytest.raises(ConfigError, match=r"config.eval.batch_size=0"):
    registry.validate_config(tiny_config("mae", **{"eval.batch_size": 0}))


def test_exports_describe_only_parts_that_exist(tmp_path):
  """A SimMIM encoder's model.json carries no decoder, no iBOT or tokenizer fields."""
  loop.run(tiny_config("simmim", total_steps=1), str(tmp_path))
  info = json.load(open(tmp_path / "encoder" / "model.json"))
  assert not {"decoder", "ibot", "tokenizer", "teacher", "classifier"} & set(info["config"])


@pytest.mark.parametrize("name", ["ibot", "data2vec", "data2vec2", "dvae_tokenizer"])
def test_a_method_with_schedules_over_the_run_needs_its_length_for_a_train_step(name):
  """Built without the run's TrainLength, a method's epochs were steps (one per epoch): iBOT's
  teacher warmed up over 30 steps and its momentum reached 1 after num_epochs steps, with no
  error. Its train step now asks for the length; with it, the step is made."""
  import optax

  from mim_jax.methods.base import TrainLength
  from mim_jax.training import step as step_lib
  config = registry.base_config(name)
  tx = optax.sgd(0.1)
  with pytest.raises(ValueError, match=rf"method {name!r} schedules its own settings over the "
                     r"run .* build it with the run's length"):
    step_lib.make_train_step(registry.build_method(config), tx, optax.constant_schedule(0.1))
  method = registry.build_method(config, TrainLength(steps_per_epoch=10, schedule_steps=100))
  assert callable(step_lib.make_train_step(method, tx, optax.constant_schedule(0.1)))
  # The methods without such schedules need none (a MAE step built as README shows).
  assert callable(step_lib.make_train_step(registry.build_method(registry.base_config("mae")),
                                           tx, optax.constant_schedule(0.1)))

