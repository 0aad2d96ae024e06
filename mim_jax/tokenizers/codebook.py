"""A vector-quantisation codebook updated by exponential moving averages (no gradients).

The codebook state, kept in a method's `extra` (float32 unless noted):
  codebook      [K, D]  the code vectors (unit length when `l2` is set)
  cluster_size  [K]     EMA of how many vectors each code was assigned
  embed_sum     [K, D]  EMA of the sum of the vectors assigned to each code
  unused_steps  int32 [K]  training steps since each code was last assigned

The update after a batch with per-code counts n_k and sums s_k (van den Oord et al. 2017,
appendix A.1; Razavi et al. 2019):
  N_k <- decay N_k + (1 - decay) n_k          m_k <- decay m_k + (1 - decay) s_k
  N'_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j     (Laplace smoothing)
  e_k = m_k / N'_k                            (then l2-normalised when `l2`)
Codes unassigned for `restart_after` steps in a row are re-seeded from encoder outputs of the
current batch (a dead-code restart, as in Jukebox / ViT-VQGAN), with N_k = 1 and m_k = e_k.
With `l2` (BEiT v2, ViT-VQGAN) vectors and codes live on the unit sphere, so the nearest code
is the one of largest cosine similarity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS_NORM = 1e-6


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis, keepdims=True), EPS_NORM))


def init_state(rng: jax.Array, vocab_size: int, code_dim: int, l2: bool) -> dict:
  """A fresh state: random normal codes (unit length when `l2`), N_k = 1, m_k = e_k."""
  codebook = jax.random.normal(rng, (vocab_size, code_dim), jnp.float32)
  if l2:
    codebook = l2_normalize(codebook)
  return {"codebook": codebook, "cluster_size": jnp.ones((vocab_size,), jnp.float32),
          "embed_sum": codebook, "unused_steps": jnp.zeros((vocab_size,), jnp.int32)}


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """z [M, D], codebook [K, D] -> int32 [M]: the index of the closest code (squared L2)."""
  z = z.astype(jnp.float32)
  dist = (jnp.sum(jnp.square(z), -1, keepdims=True) - 2.0 * z @ codebook.T
          + jnp.sum(jnp.square(codebook), -1)[None, :])
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def code_counts(codes: jax.Array, vocab_size: int,
                weights: jax.Array | None = None) -> jax.Array:
  """codes int [...] -> float32 [K]: how often each code occurs (each occurrence counted with
  its `weights` entry, same shape as codes, when given: 0 leaves padding rows out)."""
  weights = (jnp.ones((codes.size,), jnp.float32) if weights is None
             else jnp.asarray(weights, jnp.float32).reshape(-1))
  return jax.ops.segment_sum(weights, codes.reshape(-1), num_segments=vocab_size)


def usage_and_perplexity_of_counts(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """counts [K] (how often each code occurs) -> (fraction of the K codes that occur,
  exp(entropy) of their frequencies)."""
  counts = jnp.asarray(counts, jnp.float32)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.mean((counts > 0).astype(jnp.float32)), jnp.exp(entropy)


def usage_and_perplexity(codes: jax.Array, vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """(fraction of the K codes that occur in `codes`, exp(entropy) of their frequencies)."""
  return usage_and_perplexity_of_counts(code_counts(codes, vocab_size))


def ema_update(state: dict, z: jax.Array, codes: jax.Array, *, decay: float, eps: float,
               l2: bool) -> dict:
  """The EMA step of the module docstring for vectors z [M, D] assigned to codes int [M];
  `unused_steps` counts up for codes absent from `codes` and resets for the others."""
  vocab_size = state["codebook"].shape[0]
  z = z.astype(jnp.float32).reshape(-1, state["codebook"].shape[1])
  counts = code_counts(codes, vocab_size)
  sums = jax.ops.segment_sum(z, codes.reshape(-1), num_segments=vocab_size)
  size = decay * state["cluster_size"] + (1.0 - decay) * counts
  embed_sum = decay * state["embed_sum"] + (1.0 - decay) * sums
  total = jnp.sum(size)
  smoothed = (size + eps) / (total + vocab_size * eps) * total
  codebook = embed_sum / smoothed[:, None]
  if l2:
    codebook = l2_normalize(codebook)
  unused = jnp.where(counts > 0, 0, state["unused_steps"] + 1).astype(jnp.int32)
  return {"codebook": codebook, "cluster_size": size, "embed_sum": embed_sum,
          "unused_steps": unused}


def restart_dead_codes(state: dict, z: jax.Array, rng: jax.Array, *,
                       restart_after: int) -> tuple[dict, jax.Array]:
  """Re-seeds codes with unused_steps >= restart_after from random rows of z [M, D].

  Returns (state, number of codes restarted). `restart_after` <= 0 disables restarts.
  """
  if restart_after <= 0:
    return state, jnp.zeros([], jnp.int32)
  z = z.astype(jnp.float32).reshape(-1, state["codebook"].shape[1])
  dead = state["unused_steps"] >= restart_after
  picks = z[jax.random.randint(rng, (state["codebook"].shape[0],), 0, z.shape[0])]
  keep = lambda new, old: jnp.where(dead.reshape(-1, *([1] * (old.ndim - 1))), new, old)
  state = {"codebook": keep(picks, state["codebook"]),
           "cluster_size": keep(jnp.ones_like(state["cluster_size"]), state["cluster_size"]),
           "embed_sum": keep(picks, state["embed_sum"]),
           "unused_steps": keep(jnp.zeros_like(state["unused_steps"]), state["unused_steps"])}
  return state, jnp.sum(dead.astype(jnp.int32))
