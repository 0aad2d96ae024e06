"""A vector-quantisation codebook updated by exponential moving averages (no gradients).

The codebook state, kept in a method's `extra` (float32 unless noted):
  codebook      [K, D]  the code vectors (unit length when `l2` is set)
  cluster_size  [K]     EMA of how many vectors each code was assigned
  embed_sum     [K, D]  EMA of the sum of the vectors assigned to each code
  unused_steps  int32 [K]  training steps since each code was last assigned
and, for one EMA step per optimizer step under gradient accumulation (`init_step_stats`, below),
the step's summed statistics batch_counts [K], batch_sums [K, D], restart candidates
batch_picks [K, D], batch_micro_batches [] and the last update's restarted_codes (int32 []).

The update after a batch with per-code counts n_k and sums s_k (van den Oord et al. 2017,
appendix A.1; Razavi et al. 2019):
  N_k <- decay N_k + (1 - decay) n_k          m_k <- decay m_k + (1 - decay) s_k
  N'_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j     (Laplace smoothing)
  e_k = m_k / N'_k                            (then l2-normalised when `l2`)
Codes unassigned for `restart_after` steps in a row are re-seeded from encoder outputs of the
current batch (a dead-code restart, as in Jukebox / ViT-VQGAN), with N_k = 1 and m_k = e_k.
With `l2` (BEiT v2, ViT-VQGAN) vectors and codes live on the unit sphere, so the nearest code
is the one of largest cosine similarity; e_k is then the direction of m_k (the smoothing, a
positive factor, changes nothing), a code moving by its share of the recent assignments.

`update="norm_ema"` is BEiT v2's rule instead (its release's NormEMAVectorQuantizer, for unit
vectors only): each code assigned in the batch moves a fixed step towards the direction of its
vectors' mean, whatever their number, and unassigned codes stay where they are:
  e_k <- normalise(decay e_k + (1 - decay) normalise(s_k / n_k))    for n_k > 0
(N_k and m_k follow their EMAs as above, as statistics; the smoothing eps is not read). The
release restarts no codes (restart_after=0 reproduces it) and starts its codebook from k-means
of the first batch's vectors (`kmeans`, `init_by_kmeans`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# F.normalize's floor on the norm, 1e-12, as a floor on the squared norm (a floor of 1e-6 on
# it, as before, left vectors shorter than 1e-3 off the unit sphere). On the squared norm, not
# the norm: its gradient stays finite at a zero vector.
EPS_NORM = 1e-24


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


def assignment_stats(z: jax.Array, codes: jax.Array,
                     vocab_size: int) -> tuple[jax.Array, jax.Array]:
  """Vectors z [M, D] assigned to codes int [M] -> (n [K]: how many each code got, s [K, D]:
  the sum of its vectors), the batch statistics of the EMA step."""
  z = z.astype(jnp.float32).reshape(codes.size, -1)
  return (code_counts(codes, vocab_size),
          jax.ops.segment_sum(z, codes.reshape(-1), num_segments=vocab_size))


def ema_update(state: dict, z: jax.Array, codes: jax.Array, *, decay: float, eps: float,
               l2: bool) -> dict:
  """The EMA step of the module docstring for vectors z [M, D] assigned to codes int [M];
  `unused_steps` counts up for codes absent from `codes` and resets for the others."""
  counts, sums = assignment_stats(z, codes, state["codebook"].shape[0])
  return ema_update_from_stats(state, counts, sums, decay=decay, eps=eps, l2=l2)


def ema_update_from_stats(state: dict, counts: jax.Array, sums: jax.Array, *, decay: float,
                          eps: float, l2: bool) -> dict:
  """`ema_update` from a batch's statistics (`assignment_stats`): counts [K], sums [K, D]."""
  stats = _moving_statistics(state, counts, sums, decay)
  size, vocab_size = stats["cluster_size"], counts.shape[0]
  total = jnp.sum(size)
  smoothed = (size + eps) / (total + vocab_size * eps) * total
  codebook = stats["embed_sum"] / smoothed[:, None]
  return {**stats, "codebook": l2_normalize(codebook) if l2 else codebook}


def norm_ema_update_from_stats(state: dict, counts: jax.Array, sums: jax.Array, *,
                               decay: float) -> dict:
  """BEiT v2's update of unit codes from a batch's statistics counts [K], sums [K, D] (the
  module docstring's `norm_ema`); N_k, m_k and `unused_steps` as in `ema_update_from_stats`."""
  direction = l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None])
  moved = l2_normalize(decay * state["codebook"] + (1.0 - decay) * direction)
  return {**_moving_statistics(state, counts, sums, decay),
          "codebook": jnp.where((counts > 0)[:, None], moved, state["codebook"])}


def _moving_statistics(state: dict, counts: jax.Array, sums: jax.Array, decay: float) -> dict:
  """What both update rules keep alike: the EMAs N_k and m_k, and `unused_steps` counting up
  for codes absent from the batch and reset for the others."""
  return {"cluster_size": decay * state["cluster_size"] + (1.0 - decay) * counts,
          "embed_sum": decay * state["embed_sum"] + (1.0 - decay) * sums,
          "unused_steps": jnp.where(counts > 0, 0, state["unused_steps"] + 1).astype(jnp.int32)}


UPDATES = ("ema_sums", "norm_ema")  # the codebook update rules (module docstring)


def kmeans(rng: jax.Array, z: jax.Array, num_clusters: int, iterations: int,
           l2: bool) -> tuple[jax.Array, jax.Array]:
  """Lloyd's k-means of rows z [M, D] -> (centres [K, D] float32, counts [K] of the last
  assignment), as BEiT v2's release initialises its codebook: centres start at K distinct rows
  (drawn with replacement when M < K), each iteration assigns every row to its nearest centre
  and moves each centre that received rows to their mean (re-normalised when `l2`: spherical
  k-means, nearest by cosine); a centre without rows stays."""
  z = z.astype(jnp.float32).reshape(-1, z.shape[-1])
  rows = jax.random.choice(rng, z.shape[0], (num_clusters,), replace=z.shape[0] < num_clusters)

  def lloyd(_, carry):
    centres, _ = carry
    counts, sums = assignment_stats(z, nearest_codes(z, centres), num_clusters)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    means = l2_normalize(means) if l2 else means
    return jnp.where((counts > 0)[:, None], means, centres), counts

  return jax.lax.fori_loop(0, iterations, lloyd,
                           (z[rows], jnp.zeros((num_clusters,), jnp.float32)))


INITTED = "codebook_initted"  # in `extra` of a run with k-means initialisation: int32 0 / 1


def init_by_kmeans(extra: dict, z: jax.Array, rng: jax.Array, *, iterations: int,
                   l2: bool) -> dict:
  """`extra` whose codebook is, on the first call of a run (its INITTED entry 0), k-means
  (`kmeans`) of the vectors z [M, D] it is given, with N_k = 1, m_k = e_k as in `init_state`,
  and INITTED set; afterwards `extra` as it is. Only the branch taken runs (a `lax.cond`, on
  the codebook's entries alone: not through a teacher's weights beside them in `extra`)."""
  def initialise(state):
    centres, _ = kmeans(rng, jax.lax.stop_gradient(z), state["codebook"].shape[0], iterations,
                        l2)
    return {"codebook": centres, "embed_sum": centres,
            "cluster_size": jnp.ones_like(state["cluster_size"]),
            INITTED: jnp.ones_like(state[INITTED])}
  state = {k: extra[k] for k in ("codebook", "embed_sum", "cluster_size", INITTED)}
  return {**extra, **jax.lax.cond(extra[INITTED] > 0, lambda s: s, initialise, state)}


def restart_dead_codes(state: dict, z: jax.Array, rng: jax.Array, *,
                       restart_after: int) -> tuple[dict, jax.Array]:
  """Re-seeds codes with unused_steps >= restart_after from random rows of z [M, D].

  Returns (state, number of codes restarted). `restart_after` <= 0 disables restarts.
  """
  if restart_after <= 0:
    return state, jnp.zeros([], jnp.int32)
  return restart_dead_codes_from(state, random_rows(rng, z, state["codebook"].shape[0]),
                                 restart_after=restart_after)


def random_rows(rng: jax.Array, z: jax.Array, num: int) -> jax.Array:
  """`num` rows of z [M, D] drawn uniformly with replacement: [num, D] float32."""
  z = z.astype(jnp.float32).reshape(-1, z.shape[-1])
  return z[jax.random.randint(rng, (num,), 0, z.shape[0])]


def restart_dead_codes_from(state: dict, picks: jax.Array, *,
                            restart_after: int) -> tuple[dict, jax.Array]:
  """`restart_dead_codes` with the replacement vectors given: picks [K, D], row k for code k."""
  if restart_after <= 0:
    return state, jnp.zeros([], jnp.int32)
  dead = state["unused_steps"] >= restart_after
  keep = lambda new, old: jnp.where(dead.reshape(-1, *([1] * (old.ndim - 1))), new, old)
  state = {**state, "codebook": keep(picks, state["codebook"]),
           "cluster_size": keep(jnp.ones_like(state["cluster_size"]), state["cluster_size"]),
           "embed_sum": keep(picks, state["embed_sum"]),
           "unused_steps": keep(jnp.zeros_like(state["unused_steps"]), state["unused_steps"])}
  return state, jnp.sum(dead.astype(jnp.int32))


# --- one EMA step per optimizer step, whatever the gradient accumulation ----------------------
# The loss adds each micro-batch's statistics to these entries of the method's `extra`;
# `apply_step_stats` (in the method's after_update) takes the step's one EMA step from them and
# zeroes them. A batch split into k micro-batches then moves the codebook exactly as the whole
# batch does (updated per micro-batch it would take k EMA steps of the decay per update).
STEP_KEYS = ("batch_counts", "batch_sums", "batch_picks", "batch_micro_batches")


def init_step_stats(vocab_size: int, code_dim: int) -> dict:
  """Empty step statistics: counts [K], sums [K, D], restart candidates picks [K, D], and how
  many micro-batches they hold; plus `restarted_codes`, the latest update's restarts."""
  return {"batch_counts": jnp.zeros((vocab_size,), jnp.float32),
          "batch_sums": jnp.zeros((vocab_size, code_dim), jnp.float32),
          "batch_picks": jnp.zeros((vocab_size, code_dim), jnp.float32),
          "batch_micro_batches": jnp.zeros([], jnp.float32),
          "restarted_codes": jnp.zeros([], jnp.int32)}


def accumulate_step_stats(extra: dict, z: jax.Array, codes: jax.Array, rng: jax.Array) -> dict:
  """`extra` with one micro-batch's vectors z [M, D] and codes int [M] added to its step
  statistics. Each code's restart candidate is a reservoir sample: a random row of this
  micro-batch replaces it with probability 1 / (micro-batches so far + 1), so that with equal
  micro-batches it is a uniform draw over the whole batch, as without accumulation."""
  counts, sums = assignment_stats(z, codes, extra["batch_counts"].shape[0])
  pick_rng, keep_rng = jax.random.split(rng)
  picks = random_rows(pick_rng, z.reshape(codes.size, -1), counts.shape[0])
  seen = extra["batch_micro_batches"]
  replace = jax.random.uniform(keep_rng, counts.shape) * (seen + 1.0) < 1.0
  return {**extra, "batch_counts": extra["batch_counts"] + counts,
          "batch_sums": extra["batch_sums"] + sums,
          "batch_picks": jnp.where(replace[:, None], picks, extra["batch_picks"]),
          "batch_micro_batches": seen + 1.0}


def apply_step_stats(extra: dict, *, decay: float, eps: float, l2: bool,
                     restart_after: int, update: str = "ema_sums") -> dict:
  """The step's EMA update (`update`: one of UPDATES) and dead-code restarts from the
  statistics that `accumulate_step_stats` gathered; they are zeroed for the next step, the
  number of codes restarted kept in `restarted_codes`. Other entries of `extra` are kept."""
  state = {k: extra[k] for k in ("codebook", "cluster_size", "embed_sum", "unused_steps")}
  if update == "norm_ema":
    state = norm_ema_update_from_stats(state, extra["batch_counts"], extra["batch_sums"],
                                       decay=decay)
  elif update == "ema_sums":
    state = ema_update_from_stats(state, extra["batch_counts"], extra["batch_sums"],
                                  decay=decay, eps=eps, l2=l2)
  else:
    raise ValueError(f"codebook update {update!r} is not one of {UPDATES}")
  state, restarted = restart_dead_codes_from(state, extra["batch_picks"],
                                             restart_after=restart_after)
  cleared = {k: jnp.zeros_like(extra[k]) for k in STEP_KEYS}
  return {**extra, **state, **cleared, "restarted_codes": restarted.astype(jnp.int32)}
