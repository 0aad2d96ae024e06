"""Weighted k-NN classification on frozen features (the DINO / iBOT protocol).

For every test feature the k most cosine-similar training features vote for their class with
weight exp(similarity / temperature); the class scores are the per-class sums of those weights,
exactly as `knn_classifier` in DINO's `eval_knn.py`.

Memory: the training bank is streamed through the device in chunks of `bank_chunk` rows while a
running top-k (similarity and label) is kept for every test feature, so the largest intermediate
is one [query_chunk, bank_chunk + k] similarity block (and, once at the end, one [query_chunk,
k, C] one-hot vote block, used instead of a scatter-add so that the sums are deterministic on
GPU). Device memory beyond that is the normalised test set [Nte, D] and the running top-k [Nte,
k]; the bank may live on the host and be arbitrarily large. Every kernel sees static shapes (the
last chunk is padded), so each compiles once per (chunk sizes, k, D) and not once per chunk.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.training.compiler_options import jit_with

# Same epsilon as torch.nn.functional.normalize, which DINO applies to its features.
_NORM_EPS = 1e-12


def _l2_normalize(x: jax.Array) -> jax.Array:
  """Row-wise L2 normalisation of [..., D]; zero rows (padding) stay zero instead of NaN."""
  x = x.astype(jnp.float32)
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, _NORM_EPS)


def _normalize_queries(queries: jax.Array) -> jax.Array:
  """[Q, qc, D] -> the same rows L2-normalised, float32."""
  return _l2_normalize(queries)


def _merge_bank_chunk(queries: jax.Array, top_sims: jax.Array, top_labels: jax.Array,
                      bank: jax.Array, bank_labels: jax.Array, *, k: int
                      ) -> tuple[jax.Array, jax.Array]:
  """Folds one bank chunk into the running top-k of every query.

  queries     float32 [Q, qc, D]  normalised test features, Q query chunks of qc rows
  top_sims    float32 [Q, qc, k]  running top-k similarities (-inf where not yet filled)
  top_labels  int32   [Q, qc, k]  labels of those neighbours (-1 where not yet filled)
  bank        [bc, D]             raw training features of this chunk (normalised here)
  bank_labels int32   [bc]        their labels; -1 marks padding rows
  Returns the updated (top_sims, top_labels), same shapes.
  """
  bank = _l2_normalize(bank)
  valid = bank_labels >= 0
  bank_labels = bank_labels.astype(jnp.int32)

  def one_query_chunk(_, xs):
    q, sims_run, labels_run = xs
    # HIGHEST: TF32 matmuls on GPU would perturb similarities enough to reorder neighbours.
    sims = jnp.dot(q, bank.T, precision=jax.lax.Precision.HIGHEST)  # [qc, bc]
    # Padding rows can never be neighbours, whatever their (zero) features give.
    sims = jnp.where(valid[None, :], sims, -jnp.inf)
    # The running entries come first so that, on exact ties, earlier bank rows win, matching a
    # stable sort over the whole bank.
    cat_sims = jnp.concatenate([sims_run, sims], axis=1)  # [qc, k + bc]
    cat_labels = jnp.concatenate(
        [labels_run, jnp.broadcast_to(bank_labels[None, :], sims.shape)], axis=1)
    new_sims, idx = jax.lax.top_k(cat_sims, k)
    new_labels = jnp.take_along_axis(cat_labels, idx, axis=1)
    return None, (new_sims, new_labels)

  # scan, not vmap: only one [qc, k + bc] block is live at a time.
  _, (top_sims, top_labels) = jax.lax.scan(one_query_chunk, None,
                                           (queries, top_sims, top_labels))
  return top_sims, top_labels


def _class_scores(top_sims: jax.Array, top_labels: jax.Array, *, num_classes: int,
                  temperature: float) -> jax.Array:
  """[Q, qc, k] neighbour similarities and labels -> float32 [Q, qc, C] weighted votes."""

  def one_query_chunk(xs):
    sims, labels = xs
    # exp(-inf) = 0 and one_hot(-1) = 0: unfilled slots (bank smaller than k) add nothing.
    weights = jnp.exp(sims / temperature)  # [qc, k]
    votes = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [qc, k, C]
    return jnp.einsum("qk,qkc->qc", weights, votes, precision=jax.lax.Precision.HIGHEST)

  return jax.lax.map(one_query_chunk, (top_sims, top_labels))


def _pad_rows(x: Any, rows: int, value: Any) -> Any:
  """Pads axis 0 of `x` (NumPy or JAX, kept as it is) up to `rows` with `value`."""
  if x.shape[0] == rows:
    return x
  pad = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.pad(x, pad, constant_values=value)


def _as_float32(x: Any) -> Any:
  """float32 view of `x`, staying on the device for JAX arrays and on the host otherwise."""
  return x.astype(jnp.float32) if isinstance(x, jax.Array) else np.asarray(x, np.float32)


def min_temperature(k: int) -> float:
  """The lowest temperature at which k votes of the largest weight, exp(1 / T) (cosine 1), add
  up to a finite float32; below it the class scores overflow to inf, then NaN (inf x 0)."""
  return 1.0 / (float(np.log(np.finfo(np.float32).max)) - float(np.log(k)))


def knn_scores(train_features: Any, train_labels: Any, test_features: Any, *,
               num_classes: int, k: int = 20, temperature: float = 0.07,
               query_chunk: int = 1024, bank_chunk: int = 8192,
               compiler_options: Mapping[str, Any] | None = None) -> np.ndarray:
  """Weighted k-NN class scores (DINO `knn_classifier`).

  Args:
    train_features: [Ntr, D] bank features (host or device array); need not be normalised.
    train_labels: int [Ntr] bank labels; rows labelled -1 are padding and never neighbours.
    test_features: [Nte, D] query features; need not be normalised.
    num_classes: C, the number of classes.
    k: neighbours per query. A bank with fewer than k valid rows just contributes fewer votes.
    temperature: votes are exp(cosine / temperature); at least `min_temperature(k)` (0.0117
      for k = 20), below which the votes overflow float32 (as they would in DINO).
    query_chunk: test rows per kernel step.
    bank_chunk: bank rows per kernel step; may be smaller than k.
    compiler_options: XLA options of its programs ({name: value}, a run's
      `training.compiler_options.of(config)`); None: XLA's defaults.

  Returns:
    float32 [Nte, C] (NumPy): per-class sums of the neighbour weights.
  """
  if k < 1 or query_chunk < 1 or bank_chunk < 1:
    raise ValueError(f"k, query_chunk and bank_chunk must be >= 1, got {k}, {query_chunk}, "
                     f"{bank_chunk}")
  if not temperature >= min_temperature(k):
    raise ValueError(f"temperature must be >= {min_temperature(k):.4g} for k = {k} (the votes "
                     f"overflow float32 below), got {temperature}")
  train_labels = np.asarray(train_labels).astype(np.int32).reshape(-1)
  num_train, num_test = train_labels.shape[0], test_features.shape[0]
  if train_features.shape[0] != num_train:
    raise ValueError(f"{train_features.shape[0]} train features but {num_train} labels")
  if train_features.shape[1] != test_features.shape[1]:
    raise ValueError(f"feature dims differ: train {train_features.shape}, "
                     f"test {test_features.shape}")
  if num_test == 0:
    return np.zeros((0, num_classes), np.float32)
  dim = test_features.shape[1]

  num_q = -(-num_test // query_chunk)
  queries = _pad_rows(_as_float32(test_features), num_q * query_chunk, 0.0)
  normalize = jit_with(_normalize_queries, compiler_options)
  merge = jit_with(_merge_bank_chunk, compiler_options, static_argnames=("k",))
  class_scores = jit_with(_class_scores, compiler_options,
                          static_argnames=("num_classes", "temperature"))
  queries = normalize(jnp.asarray(queries.reshape(num_q, query_chunk, dim)))
  top_sims = jnp.full((num_q, query_chunk, k), -jnp.inf, jnp.float32)
  top_labels = jnp.full((num_q, query_chunk, k), -1, jnp.int32)

  for start in range(0, num_train, bank_chunk):
    stop = min(start + bank_chunk, num_train)
    # A host bank is sliced on the host so only this chunk is transferred; a device bank is
    # sliced where it lives.
    bank = _pad_rows(_as_float32(train_features[start:stop]), bank_chunk, 0.0)
    labels = _pad_rows(train_labels[start:stop], bank_chunk, -1)
    top_sims, top_labels = merge(queries, top_sims, top_labels, bank, labels, k=k)

  scores = class_scores(top_sims, top_labels, num_classes=num_classes,
                        temperature=float(temperature))
  return np.asarray(scores).reshape(num_q * query_chunk, num_classes)[:num_test]


def topk_correct(scores: np.ndarray, labels: np.ndarray, topk: int) -> np.ndarray:
  """bool [N]: whether labels[n] is among the `topk` highest scores[n] ([N, C]).

  Ties are broken towards the lower class index (a stable descending sort), so the answer is
  deterministic: the rank of the true class is the number of classes scoring strictly higher
  plus the number of lower-indexed classes scoring the same. A row with a NaN score counts as
  wrong (a comparison with NaN is false, which would rank its true class first).
  """
  scores = np.asarray(scores)
  labels = np.asarray(labels).astype(np.int64)
  true = np.take_along_axis(scores, labels[:, None], axis=1)  # [N, 1]
  lower = np.arange(scores.shape[1])[None, :] < labels[:, None]
  rank = (scores > true).sum(axis=1) + ((scores == true) & lower).sum(axis=1)
  return (rank < topk) & ~np.isnan(scores).any(axis=1)


def knn_accuracy(train_features: Any, train_labels: Any, test_features: Any, test_labels: Any,
                 *, num_classes: int, k: int = 20, temperature: float = 0.07,
                 query_chunk: int = 1024, bank_chunk: int = 8192,
                 compiler_options: Mapping[str, Any] | None = None) -> dict[str, float]:
  """k-NN accuracy as fractions in [0, 1]: {"top1"} plus {"top5"} when num_classes >= 5.

  test_labels int [Nte]; rows labelled -1 (padding) are ignored. NaN when no row is valid.
  Other arguments as in `knn_scores`.
  """
  test_labels = np.asarray(test_labels).astype(np.int32).reshape(-1)
  if test_labels.shape[0] != test_features.shape[0]:
    raise ValueError(f"{test_features.shape[0]} test features but {test_labels.shape[0]} labels")
  keep = test_labels >= 0
  if not isinstance(test_features, jax.Array):
    test_features = np.asarray(test_features)
  test_features = test_features[keep]
  test_labels = test_labels[keep]
  topks = [1, 5] if num_classes >= 5 else [1]
  if test_labels.shape[0] == 0:
    return {f"top{t}": float("nan") for t in topks}
  scores = knn_scores(train_features, train_labels, test_features, num_classes=num_classes,
                      k=k, temperature=temperature, query_chunk=query_chunk,
                      bank_chunk=bank_chunk, compiler_options=compiler_options)
  return {f"top{t}": float(topk_correct(scores, test_labels, t).mean()) for t in topks}


def extract_features(feature_fn: Callable[[jax.Array], jax.Array],
                     iterator: Iterable[Mapping[str, Any]], *,
                     jit: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Runs `feature_fn` over an evaluation iterator and keeps the real (unpadded) rows.

  Args:
    feature_fn: images [B, H, W, C] -> features [B, D] (or [B, ...]: rows are what is kept);
      jitted here unless `jit` is False (a caller that calls its own compiled program, e.g.
      one with compiler options).
    iterator: batches {"image" [B, H, W, C], "label" int [B], "mask" bool [B]}; rows with
      mask False pad the last batch and are dropped. Without "mask" every row is kept.

  Returns:
    (features float32 [N, D] (or [N, ...]), labels int32 [N]) on the host, N the number of
    kept rows.
  """
  fn = jax.jit(feature_fn) if jit else feature_fn
  features: list[np.ndarray] = []
  labels: list[np.ndarray] = []
  pending = None

  def collect(item):
    out, label, mask = item
    # Blocking here, one batch behind the dispatch, lets the device run ahead by a batch.
    out = np.asarray(out, np.float32)
    features.append(out[mask])
    labels.append(label[mask])

  for batch in iterator:
    label = np.asarray(batch["label"]).astype(np.int32).reshape(-1)
    mask = batch.get("mask")
    mask = np.ones(label.shape, bool) if mask is None else np.asarray(mask).astype(bool)
    out = fn(batch["image"])
    if pending is not None:
      collect(pending)
    pending = (out, label, mask)
  if pending is not None:
    collect(pending)
  if not features:
    return np.zeros((0, 0), np.float32), np.zeros((0,), np.int32)
  return np.concatenate(features, axis=0), np.concatenate(labels, axis=0)
