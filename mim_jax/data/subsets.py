"""Deterministic low-label subsets of a training source (1% / 10% ImageNet-style protocols).

`per_class_subset` picks, for every class, the same fraction of its examples, so a 1% subset
keeps the class balance of the full split. The choice depends only on the labels, the fraction
and `subset_seed`, never on the training seed or the number of hosts: every host computes the
same subset from the whole source and shards it afterwards, and runs with different training
seeds see the same labelled examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def per_class_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Sorted int64 indices [M] into `labels` (int [N]) keeping `fraction` of every class.

  Class c with n_c examples keeps max(1, round(fraction * n_c)) of them (Python's round, so
  6000 * 0.01 -> 60), chosen as the first entries of a permutation of that class's positions
  drawn from a generator seeded by (seed, c). Seeding per class keeps a class's choice the same
  when other classes are added or removed. fraction == 1 returns every index.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  fraction = float(fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction={fraction} must be in (0, 1]")
  if fraction == 1.0:
    return np.arange(len(labels), dtype=np.int64)
  return _take_per_class(labels, lambda counts: [max(1, round(fraction * int(n)))
                                                 for n in counts], seed)


def per_class_count_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
  """Sorted int64 indices [count] into `labels` (int [N]): exactly `count` examples, each
  class's share proportional to its size (largest remainders round up, ties to the lower
  class), chosen as in `per_class_subset`. Used for held-out validation examples."""
  labels = np.asarray(labels)
  if not 0 <= count <= len(labels):
    raise ValueError(f"count={count} must be in [0, {len(labels)}]")

  def quotas(counts):
    exact = np.asarray(counts, np.float64) * count / len(labels)
    base = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(base)), -(exact - base)))  # largest remainder first
    base[order[:count - int(base.sum())]] += 1
    return base.tolist()

  return _take_per_class(labels, quotas, seed)


def _take_per_class(labels: np.ndarray, quotas, seed: int) -> np.ndarray:
  """Sorted indices: the first quotas(class sizes)[i] entries of a per-class permutation."""
  # One stable sort instead of a `labels == c` scan per class: O(N log N) for 1000 classes.
  order = np.argsort(labels, kind="stable")
  classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
  kept = []
  for c, start, n, k in zip(classes, starts, counts, quotas(counts)):
    # `% 2**32` maps any int32 label (including -1 for "unlabelled") to a distinct seed word.
    rng = np.random.default_rng([int(seed) % 2**64, int(c) % 2**32])
    kept.append(order[start + rng.permutation(int(n))[:k]])
  indices = np.concatenate(kept) if kept else np.zeros(0, np.int64)
  return np.sort(indices).astype(np.int64)


class SubsetSource:
  """The examples `indices` (int [M]) of a random-access `source`, in that order.

  Records are the wrapped source's records unchanged, so "index" and "path" still name the
  example's position in the full source (useful in error messages and for checking a subset).
  """

  def __init__(self, source: Any, indices: np.ndarray, labels: np.ndarray):
    """`labels` are the full source's labels (int [N]); the subset's are sliced from them."""
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self._labels = np.asarray(labels, np.int32)[self.indices]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.indices[int(index)])]

  def labels(self) -> np.ndarray:
    """int32 [M]: the label of every example of the subset."""
    return self._labels.copy()

  def __repr__(self) -> str:
    return f"SubsetSource({self.source!r}, n={len(self)})"
