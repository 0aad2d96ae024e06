"""Every method by name, and what needs to know them all: configs, validation, FLOPs.

Imports run one way: registry -> methods / evaluate / tokenizers -> parts (models, objectives,
data, weights, config, training infrastructure). Nothing below imports this module; the
entry point, the loop's set-up, the benchmark, the memory planner and the config files do.

  METHODS                    name -> Method class (methods/base.py)
  register(cls)              adds a method (a test's toy method, a user's own)
  method_class(name)         the class, or a ConfigError listing the known names
  base_config(name)          the shared fields + exactly the fields that method reads
  validate_config(config)    shared checks, the method's checks, and no field it ignores
  build_method(config, length=None)
  forward_flops(config)      the method's FLOPs per image
"""

from __future__ import annotations

import ml_collections

from mim_jax.config import validation
from mim_jax.config.errors import ConfigError, config_error, dotted_keys, unknown_field_error
from mim_jax.evaluate.attentive_probe import AttentiveProbe
from mim_jax.evaluate.finetune import FineTune
from mim_jax.evaluate.frozen import KnnJob, ProbeJob
from mim_jax.evaluate.linear_probe import LinearProbe
from mim_jax.methods import (
  beit,
  data2vec,
  data2vec2,
  ibot,
  mae,
  maskdistill,
  maskfeat,
  mim,
  simmim,
)
from mim_jax.methods.base import Method, TrainLength
from mim_jax.tokenizers.dvae import DVAETokenizer
from mim_jax.tokenizers.vq import VQTokenizer
from mim_jax.tokenizers.vqkd import VQKDTokenizer

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method], replace: bool = False) -> type[Method]:
  """Adds `cls` under `cls.name` (usable as a class decorator); returns it. A name already
  taken by another class is an error unless `replace` (a method of one's own that stands in
  for a built-in one on purpose; as a decorator: `functools.partial(register, replace=True)`)."""
  if not cls.name:
    raise ValueError(f"{cls.__name__} has no name")
  taken = METHODS.get(cls.name)
  # The same class defined again (a notebook cell run twice) is no other method.
  same = taken is not None and (taken.__module__, taken.__qualname__) == (cls.__module__,
                                                                          cls.__qualname__)
  if taken is not None and not same and not replace:
    raise ValueError(f"method name {cls.name!r} is taken by {taken.__module__}."
                     f"{taken.__qualname__}: give {cls.__qualname__} another name, or "
                     "register(cls, replace=True) to stand in for it")
  METHODS[cls.name] = cls
  return cls


for _cls in (mae.MAE, simmim.SimMIM, maskfeat.MaskFeat, data2vec.Data2Vec, data2vec2.Data2Vec2,
             ibot.IBOT, beit.BEiT,
             maskdistill.MaskDistill, mim.MIM,
             VQTokenizer, VQKDTokenizer, DVAETokenizer, LinearProbe, AttentiveProbe, FineTune,
             KnnJob, ProbeJob):
  register(_cls)


def method_class(name: str) -> type[Method]:
  if name not in METHODS:
    raise config_error("method", name, f"one of {sorted(METHODS)}")
  return METHODS[name]


def base_config(name: str) -> ml_collections.ConfigDict:
  """A config with the shared fields and the fields of method `name`, at their defaults."""
  cls = method_class(name)
  c = ml_collections.ConfigDict()
  cls.add_config(c)
  c.method = name
  return c


def owners(field: str) -> list[str]:
  """The methods whose configs have `field`."""
  return sorted(n for n in METHODS if field in set(dotted_keys(base_config(n))))


def unused_field_error(field: str, method: str) -> ConfigError | None:
  """"config.X is not used by method=M" when another method reads X, else None."""
  names = owners(field)
  if not names:
    return None
  return ConfigError(f"config.{field} is not used by method={method!r}; it is a field of "
                     f"{', '.join(repr(o) for o in names)}. Remove the override, or use that "
                     "method's config file.")


def validate_config(config, file_config=None) -> None:
  """All static checks (no devices, no data read beyond paths). Raises ConfigError.

  `file_config`: for a command line, its config file loaded without the overrides; settings
  a run would not read are then checked in the overrides only (the file's own are checked by
  `check_unread_fields(file_config)`), else in every field that differs from the method's base
  config.
  """
  cls = method_class(config.method)
  want, have = set(dotted_keys(base_config(config.method))), set(dotted_keys(config))
  for field in sorted(have - want):
    raise unused_field_error(field, config.method) or unknown_field_error(field, want)
  if want - have:
    raise ConfigError(f"the config of method {config.method!r} lacks the field(s) "
                      f"{', '.join(sorted(want - have))}: start it from "
                      f"registry.base_config({config.method!r})")
  validation.validate_shared(config)
  if config.get("parallel", {}).get("step") == "shard_map" and not cls.shards:
    raise config_error("parallel.step", "shard_map",
                       f"'jit' for method {config.method!r}: its batch statistics do not yet "
                       "follow a mesh axis")
  cls.validate(config)
  if file_config is None:
    check_unread_fields(config)
  else:
    validation.check_unread(config, file_config, cls.unread_rules(),
                            reference="config file's value")


def check_unread_fields(config) -> None:
  """ConfigError for a field that differs from the method's base config while the config
  does not read it (validation.check_unread with the method's rules)."""
  validation.check_unread(config, base_config(config.method),
                          method_class(config.method).unread_rules())


def build_method(config, length: TrainLength | None = None) -> Method:
  """The method `config.method` names, for a run of `length` (None: a nominal length, for
  tools that never train)."""
  return method_class(config.method)(config, length)


def forward_flops(config) -> dict[str, float]:
  """{"encoder", ..., "total"}: forward FLOPs per image of the method's model."""
  return method_class(config.method).forward_flops(config)
