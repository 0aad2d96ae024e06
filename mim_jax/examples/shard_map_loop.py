"""mim_jax's MAE step inside your own shard_map code, over your own mesh.

  python -m mim_jax.examples.shard_map_loop
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m mim_jax.examples.shard_map_loop

`make_train_step(..., axis_name=...)` returns the per-device step: each device holds its share
of the batch, the method's batch statistics follow the axis, gradients and metrics are
`pmean`ed explicitly. Here the mesh has one axis "dp" over every device; the state is
replicated (P()) and the batch split along its first dimension (P("dp")).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mim_jax import registry
from mim_jax.methods.mae import MAE
from mim_jax.training.step import init_train_state, make_train_step


def main(steps: int = 4, per_device_batch: int = 2) -> list[float]:
  mesh = Mesh(np.array(jax.devices()), ("dp",))
  config = registry.base_config("mae")
  config.image_size, config.channels = (32, 32), 3
  config.model.variant = "mu/8"
  config.decoder.update(width=64, depth=2, num_heads=4)
  method = MAE(config)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, steps)
  # decay_mask: the method's weight-decay groups (MAE's: matrices, no biases, norms or tokens);
  # wrap_optimizer: `tx` itself for MAE; iBOT holds its head's prototypes still at first.
  tx = method.wrap_optimizer(optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.05,
                                          mask=method.decay_mask))

  state = jax.jit(init_train_state, static_argnums=(0, 1, 3))(
      method, tx, jax.random.key(0), (1, 32, 32, 3))
  state_spec = jax.tree.map(lambda _: P(), state)
  step = jax.jit(jax.shard_map(
      make_train_step(method, tx, schedule, axis_name="dp"), mesh=mesh,
      in_specs=(state_spec, P("dp"), P()), out_specs=(state_spec, P())), donate_argnums=(0,))
  state = jax.device_put(state, NamedSharding(mesh, P()))

  losses = []
  batch = per_device_batch * mesh.size
  for i in range(steps):
    images = jax.random.normal(jax.random.key(100 + i), (batch, 32, 32, 3))
    images = jax.device_put(images, NamedSharding(mesh, P("dp")))
    state, metrics = step(state, {"image": images}, jax.random.key(1))
    losses.append(float(metrics["loss"]))
    print(f"step {i}: loss {losses[-1]:.4f} on {mesh.size} device(s)")
  return losses


if __name__ == "__main__":
  main()
