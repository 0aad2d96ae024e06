"""Device mesh and shardings from the config.

`config.mesh` is a sequence of (axis_name, size) with size -1 meaning "all remaining devices";
`config.sharding_rules` is a sequence of (regex, spec): the first regex found (re.search) in a
parameter's path "encoder/transformer/blocks_0/attn/qkv/kernel" gives its PartitionSpec, a tuple
with one mesh-axis name (or None) per dimension; unmatched parameters are replicated. The batch
is split over the mesh axes named in `BATCH_AXES`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mim_jax.config_errors import config_error

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Sequence[Sequence[Any]], num_devices: int) -> dict[str, int]:
  """Resolves sizes (one -1 allowed) so that their product is `num_devices`."""
  names = [str(a[0]) for a in mesh_cfg]
  sizes = [int(a[1]) for a in mesh_cfg]
  if not names or len(set(names)) != len(names):
    raise config_error("mesh", list(map(tuple, mesh_cfg)), "a non-empty list of (axis, size) "
                       "pairs with distinct axis names, e.g. [('data', -1)]")
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
                       f"the sizes multiply to {math.prod(sizes)} but there are {num_devices} devices")
  return dict(zip(names, sizes))


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


def tree_shardings(mesh: Mesh, abstract_tree: Any, rules: Sequence[Sequence[Any]]) -> Any:
  """NamedShardings for every leaf of `abstract_tree` by the first matching rule."""
  compiled = [(re.compile(str(r[0])), tuple(r[1]) if r[1] is not None else ()) for r in rules]

  def leaf_sharding(path, leaf):
    name = path_string(path)
    for regex, spec in compiled:
      if regex.search(name):
        ndim = len(getattr(leaf, "shape", ()))
        if len(spec) > ndim:
          raise config_error("sharding_rules", (regex.pattern, spec),
                             f"the spec has {len(spec)} entries but {name} has {ndim} dims")
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_tree)


def host_batch_to_global(batch: Any, sharding: NamedSharding) -> Any:
  """Turns this process's local batch (numpy) into global jax Arrays split by `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
