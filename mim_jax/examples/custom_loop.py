"""Using mim_jax's MAE parts from your own JAX training loop (no mim_jax trainer involved).

  python -m mim_jax.examples.custom_loop

Builds the MAE model, masks, loss and train step from mim_jax, and runs a few steps of a plain
loop on random images. Replace `images` with your own data pipeline.
"""

from __future__ import annotations

import jax
import optax

from mim_jax import registry
from mim_jax.methods.mae import MAE
from mim_jax.training.step import init_train_state, make_train_step, with_initial_weights


def main(steps: int = 5) -> list[float]:
  config = registry.base_config("mae")               # the MAE recipe's fields and defaults
  config.image_size, config.channels = (32, 32), 3
  config.model.variant = "mu/8"                      # any SIZE/PATCH, e.g. "B/16"
  config.decoder.update(width=64, depth=2, num_heads=4)

  method = MAE(config)                               # model + masking + norm-pix MSE loss
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, steps)
  # decay_mask: the method's weight-decay groups (MAE's: matrices, no biases, norms or tokens);
  # wrap_optimizer: `tx` itself for MAE; iBOT holds its head's prototypes still at first.
  tx = method.wrap_optimizer(optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.05,
                                          mask=method.decay_mask))
  state = jax.jit(init_train_state, static_argnums=(0, 1, 3))(
      method, tx, jax.random.key(0), (1, 32, 32, 3))
  # The weights a method reads at start (init_from, BEiT's tokenizer, a teacher): none here.
  state = with_initial_weights(method, state)
  train_step = jax.jit(make_train_step(method, tx, schedule), donate_argnums=(0,))

  rng, losses = jax.random.key(1), []
  for step in range(steps):
    images = jax.random.normal(jax.random.fold_in(rng, step), (16, 32, 32, 3))
    state, metrics = train_step(state, {"image": images}, rng)
    losses.append(float(metrics["loss"]))
    print(f"step {step}: loss {losses[-1]:.4f}")
  return losses


if __name__ == "__main__":
  main()
