"""Device mesh and shardings from the config.

`config.mesh` is a sequence of (axis_name, size) with size -1 meaning "all remaining devices",
e.g. [("data", -1)] (data parallel), [("fsdp", -1)] (fully sharded) or
[("data", 2), ("fsdp", -1)]. The batch is split over the mesh axes named in `BATCH_AXES`
(data x fsdp), so every device of such a mesh sees its own slice of the batch. Any other axis
must be one that `config.sharding_rules` shard over (`check_mesh_axes`, run by validation): an
axis nothing splits over would only repeat the same work on its devices.

`config.sharding_rules` is a sequence of (regex, spec). Every leaf of the TrainState (params,
optimizer state, and `extra`: EMA teachers, frozen tokenizers) has a path such as
"params/encoder/transformer/blocks_0/attn/qkv/kernel" or
"opt_state/1/0/mu/encoder/transformer/blocks_0/attn/qkv/kernel"; the first rule whose regex is
found in it (re.search) gives its sharding, unmatched leaves are replicated. A spec is

  * a tuple with one entry per leading dimension: a mesh-axis name, None, or a tuple of axis
    names, e.g. (None, "fsdp") shards dim 1 over the fsdp axis; () replicates;
  * "replicate";
  * "largest:AXIS" or "largest:AXIS:MIN_SIZE": shard the largest dimension that the size of
    mesh axis AXIS divides (the first of equal ones) over AXIS, for leaves of at least
    MIN_SIZE elements; smaller leaves, and leaves with no divisible dimension, are replicated.
    This is pure FSDP as in MaxText; `config_defaults.fsdp_rules()` returns the preset.

Every rule must match at least one leaf, every named axis must exist in the mesh and divide the
dimension it shards: a mistake fails at start-up (ConfigError) naming the rule, the mesh and
the device count.

Activations: `constrain_batch(x)` pins the batch dimension of a [B, ...] activation to the
batch axes. It does something only while `activation_mesh(mesh)` is active (the train step is
traced inside it) and is free otherwise, so models stay usable on one device without a mesh.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mim_jax.config.errors import config_error

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Sequence[Sequence[Any]], num_devices: int) -> dict[str, int]:
  """Resolves sizes (one -1 allowed) so that their product is `num_devices`."""
  check_mesh_form(mesh_cfg)
  names = [a[0] for a in mesh_cfg]
  sizes = [a[1] for a in mesh_cfg]
  if len(set(names)) != len(names):
    raise config_error("mesh", list(map(tuple, mesh_cfg)), "(axis, size) pairs with distinct "
                       "axis names, e.g. (('data', 2), ('fsdp', -1))")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise config_error("mesh", list(map(tuple, mesh_cfg)),
                       "sizes must be positive, with at most one -1 (= the remaining devices)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise config_error("mesh", list(map(tuple, mesh_cfg)),
                         f"the fixed sizes (product {known}) must divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise config_error("mesh", list(map(tuple, mesh_cfg)),
                       f"the sizes multiply to {math.prod(sizes)} but there are {num_devices} "
                       "devices")
  return dict(zip(names, sizes))


def rule_axes(rules: Sequence[Sequence[Any]]) -> tuple[str, ...]:
  """The mesh axes `config.sharding_rules` shard over, in order of first use (a malformed rule
  names none here: `tree_shardings` reports it)."""
  axes: list[str] = []
  for rule in rules:
    spec = tuple(rule)[1] if len(tuple(rule)) == 2 else None
    if isinstance(spec, str):
      parts = spec.split(":")
      named = parts[1:2] if parts[0] == LARGEST else []
    elif isinstance(spec, (tuple, list)):
      named = [a for e in spec for a in (e if isinstance(e, (tuple, list)) else (e,))]
    else:
      named = []
    axes += [str(a) for a in named if a is not None and str(a) not in axes]
  return tuple(axes)


def check_rule_form(rules: Any) -> None:
  """ConfigError unless `rules` is a sequence of (regex, spec) pairs whose regexes compile (the
  specs are checked against the mesh and the state by `tree_shardings`)."""
  example = "e.g. ((\".*qkv/kernel\", (None, \"fsdp\")), (\".*\", ()))"
  try:
    listed = [tuple(rule) for rule in rules]
  except TypeError:
    raise config_error("sharding_rules", rules, f"a sequence of (regex, spec) pairs, {example}"
                       ) from None
  for rule in listed:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise config_error("sharding_rules", rule, f"a (regex, spec) pair, {example}")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise config_error("sharding_rules", rule, f"a rule whose regex compiles ({e})") from None


def check_mesh_form(mesh_cfg: Any) -> None:
  """ConfigError unless `mesh_cfg` is a non-empty sequence of (axis name, integer size) pairs.

  A command-line value that is not a Python literal reaches the config as its characters:
  the shell drops the quotes of --config.mesh=(("fsdp",-1),), and ml_collections turns the
  string ((fsdp,-1),) into a tuple of its 12 characters; the message says so."""
  allowed = "a non-empty tuple of (axis name, size) pairs, e.g. (('data', -1),)"
  try:
    axes = [tuple(a) for a in mesh_cfg]
  except TypeError:
    raise config_error("mesh", mesh_cfg, allowed) from None
  if axes and all(len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], int)
                  and not isinstance(a[1], bool) for a in axes):
    return
  letters = [a for a in axes if len(a) > 2 and all(isinstance(c, str) and len(c) == 1 for c in a)]
  hint = ""
  if letters:
    hint = (f"The value arrived as the letters of {''.join(letters[0])!r}, which is not a Python "
            "literal: the shell removed its quotes. Quote the whole value, e.g. "
            "--config.mesh='((\"fsdp\", -1),)'.")
  raise config_error("mesh", tuple(axes), allowed, hint)


def check_mesh_axes(mesh_cfg: Sequence[Sequence[Any]], rules: Sequence[Sequence[Any]]) -> None:
  """ConfigError for malformed rules (`check_rule_form`) and for a mesh axis that nothing
  splits over: not a batch axis (`BATCH_AXES`) and named by no sharding rule. Its devices would
  each hold the same state and compute the same batch slice (with only such axes, the whole
  global batch), so it is a typo, not a layout."""
  check_rule_form(rules)
  check_mesh_form(mesh_cfg)
  # An axis of size 1 splits nothing and repeats nothing: harmless (e.g. a model axis kept for
  # later).
  names = [a[0] for a in mesh_cfg if a[1] != 1]
  used = rule_axes(rules)
  allowed = BATCH_AXES + tuple(a for a in used if a not in BATCH_AXES)
  for name in names:
    if name not in allowed:
      raise config_error(
          "mesh", tuple(map(tuple, mesh_cfg)),
          f"mesh axes named {' or '.join(repr(a) for a in allowed)}: the batch is split over "
          f"{' x '.join(repr(a) for a in BATCH_AXES)}"
          + (f", and config.sharding_rules shard over {used}" if used else "")
          + f"; nothing splits over axis {name!r}, so each of its devices would compute the "
          "same batch",
          "Rename it, e.g. mesh=(('data', -1),) for data parallelism or (('fsdp', -1),) with "
          "sharding_rules=config_defaults.fsdp_rules() (docs/scaling.md).")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds the device mesh described by `config.mesh`."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  arr = np.asarray(devices).reshape(tuple(shape.values()))
  return Mesh(arr, tuple(shape.keys()))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes the batch dimension is split over."""
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axes, the rest replicated."""
  axes = batch_axes(mesh)
  return NamedSharding(mesh, P(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_string(path) -> str:
  """'encoder/transformer/blocks_0/attn/qkv/kernel' for a pytree key path."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


LARGEST = "largest"


def describe_mesh(mesh: Mesh) -> str:
  """"mesh {'data': 2, 'fsdp': 4} on 8 devices" (for error messages and logs)."""
  return f"mesh {dict(mesh.shape)} on {mesh.devices.size} devices"


def _parse_spec(rule, mesh: Mesh):
  """A rule's spec as ("explicit", tuple) or ("largest", axis, min_size)."""
  spec = rule[1]
  if spec is None or (isinstance(spec, str) and spec == "replicate"):
    return ("explicit", ())
  if isinstance(spec, str):
    parts = spec.split(":")
    ok = parts[0] == LARGEST and len(parts) in (2, 3) and parts[1]
    if ok and len(parts) == 3:
      ok = parts[2].isdigit()
    if not ok:
      raise config_error("sharding_rules", tuple(rule),
                         "a spec that is a tuple of mesh axes (one per dimension), 'replicate', "
                         "or 'largest:AXIS[:MIN_SIZE]'")
    axis, min_size = parts[1], int(parts[2]) if len(parts) == 3 else 0
    if axis not in mesh.shape:
      raise config_error("sharding_rules", tuple(rule),
                         f"axis {axis!r} is not an axis of the {describe_mesh(mesh)}")
    return (LARGEST, axis, min_size)
  entries = tuple(tuple(e) if isinstance(e, list) else e for e in spec)
  for entry in entries:
    for axis in (entry if isinstance(entry, tuple) else (entry,)):
      if axis is not None and axis not in mesh.shape:
        raise config_error("sharding_rules", tuple(rule),
                           f"axis {axis!r} is not an axis of the {describe_mesh(mesh)}")
  return ("explicit", entries)


def _axes_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  return math.prod(mesh.shape[a] for a in (entry if isinstance(entry, tuple) else (entry,)))


def leaf_spec(mesh: Mesh, parsed, shape: tuple[int, ...], rule, name: str) -> P:
  """The PartitionSpec a parsed rule gives a leaf of `shape` (checked against the mesh)."""
  if parsed[0] == LARGEST:
    _, axis, min_size = parsed
    n = mesh.shape[axis]
    if n == 1 or math.prod(shape) < max(min_size, 1) or not shape:
      return P()
    candidates = [d for d in range(len(shape)) if shape[d] % n == 0]
    if not candidates:
      return P()
    dim = max(candidates, key=lambda d: (shape[d], -d))
    return P(*([None] * dim + [axis]))
  spec = parsed[1]
  if len(spec) > len(shape):
    raise config_error("sharding_rules", tuple(rule),
                       f"the spec has {len(spec)} entries but {name} has {len(shape)} dims")
  for dim, entry in enumerate(spec):
    size = _axes_size(mesh, entry)
    if shape[dim] % size:
      raise config_error("sharding_rules", tuple(rule),
                         f"{name} has size {shape[dim]} in dim {dim}, which the {size} devices "
                         f"of axis {entry!r} ({describe_mesh(mesh)}) do not divide")
  return P(*spec)


def tree_shardings(mesh: Mesh, abstract_tree: Any, rules: Sequence[Sequence[Any]]) -> Any:
  """NamedShardings for every leaf of `abstract_tree` by the first matching rule.

  Raises ConfigError for a rule whose regex matches no leaf path (a typo would otherwise
  silently replicate what it meant to shard) or only paths an earlier rule already takes (it
  would never apply), an unknown axis, or an axis size that does not divide the dimension it
  shards.
  """
  rules = [tuple(r) for r in rules]
  for rule in rules:
    if len(rule) != 2:
      raise config_error("sharding_rules", rule, "(regex, spec) pairs")
  compiled = [(re.compile(str(r[0])), _parse_spec(r, mesh), r) for r in rules]
  names = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]]
  for regex, _, rule in compiled:
    if not any(regex.search(n) for n in names):
      example = next((n for n in names if "kernel" in n), names[0] if names else "")
      raise config_error(
          "sharding_rules", rule,
          f"a regex that matches at least one path of the training state ({len(names)} "
          f"leaves, e.g. {example!r}); this rule matches none ({describe_mesh(mesh)})")
  first = {next(i for i, (regex, _, _) in enumerate(compiled) if regex.search(n))
           for n in names if any(regex.search(n) for regex, _, _ in compiled)}
  for i, (regex, _, rule) in enumerate(compiled):
    if i not in first:
      earlier = next(r for rx, _, r in compiled[:i] if any(
          rx.search(n) for n in names if regex.search(n)))
      raise config_error(
          "sharding_rules", rule,
          "a rule that is the first to match at least one path of the training state (the "
          f"first matching rule applies); every path this one matches is taken before it, "
          f"e.g. by {earlier!r}: move it before that rule or drop it")

  def leaf_sharding(path, leaf):
    name = path_string(path)
    for regex, parsed, rule in compiled:
      if regex.search(name):
        return NamedSharding(mesh, leaf_spec(mesh, parsed, tuple(getattr(leaf, "shape", ())),
                                             rule, name))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def per_device_bytes(shardings: Any, abstract_tree: Any) -> int:
  """Bytes of `abstract_tree` held by one device under `shardings` (the largest shard)."""
  total = 0
  for sh, leaf in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract_tree)):
    shape = sh.shard_shape(tuple(leaf.shape))
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


# --- activation sharding -------------------------------------------------------------------------

_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_mesh(mesh: Mesh):
  """While active, `constrain_batch` pins activations' batch dim to the mesh's batch axes."""
  previous = getattr(_ACTIVE, "mesh", None)
  _ACTIVE.mesh = mesh
  try:
    yield mesh
  finally:
    _ACTIVE.mesh = previous


def with_activation_mesh(mesh: Mesh, fn: Callable) -> Callable:
  """`fn` traced with `activation_mesh(mesh)` active (wrap before jax.jit)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with activation_mesh(mesh):
      return fn(*args, **kwargs)
  return wrapped


def constrain_batch(x: jax.Array) -> jax.Array:
  """`x` [B, ...] with B split over the batch axes of the active mesh; `x` itself when no
  mesh is active, the mesh has one device, or B does not split evenly."""
  mesh = getattr(_ACTIVE, "mesh", None)
  if mesh is None or mesh.devices.size == 1 or not getattr(x, "ndim", 0):
    return x
  axes = batch_axes(mesh)
  if not axes or x.shape[0] % batch_parallelism(mesh):
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes)))


def host_batch_to_global(batch: Any, sharding: NamedSharding) -> Any:
  """Turns this process's local batch (numpy) into global jax Arrays split by `sharding`;
  arrays that are global already (a device-resident split's images) pass as they are."""
  return jax.tree.map(lambda x: x if isinstance(x, jax.Array)
                      else jax.make_array_from_process_local_data(sharding, x), batch)
