"""Weighted k-NN classification (DINO / iBOT protocol) and feature extraction."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.evaluate import knn

from conftest import REPO


def _reference_scores(train, train_labels, test, num_classes, k, temperature):
  """Brute force in float64: the full similarity matrix, a stable argsort and DINO's weights."""
  train = train.astype(np.float64)
  test = test.astype(np.float64)
  train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
  test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
  valid = train_labels >= 0
  train, train_labels = train[valid], train_labels[valid]
  sims = test @ train.T  # [Nte, Ntr]
  order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
  scores = np.zeros((test.shape[0], num_classes))
  for i in range(test.shape[0]):
    for j in order[i]:
      scores[i, train_labels[j]] += np.exp(sims[i, j] / temperature)
  return scores


def _random_problem(seed, num_train, num_test, dim, num_classes):
  rng = np.random.default_rng(seed)
  train = rng.normal(size=(num_train, dim)).astype(np.float32)
  test = rng.normal(size=(num_test, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=num_train).astype(np.int32)
  return train, labels, test


@pytest.mark.parametrize("k,temperature,query_chunk,bank_chunk", [
    (20, 0.07, 16, 64),   # chunks divide both sizes
    (5, 0.1, 7, 13),      # neither divides
    (20, 0.07, 50, 7),    # bank chunk smaller than k
    (1, 0.5, 3, 200),     # one bank chunk larger than the bank
    (33, 0.07, 64, 11),   # k spans several bank chunks
])
def test_matches_brute_force_reference(k, temperature, query_chunk, bank_chunk):
  train, labels, test = _random_problem(k, num_train=128, num_test=48, dim=12, num_classes=7)
  got = knn.knn_scores(train, labels, test, num_classes=7, k=k, temperature=temperature,
                       query_chunk=query_chunk, bank_chunk=bank_chunk)
  want = _reference_scores(train, labels, test, 7, k, temperature)
  assert got.shape == (48, 7) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_device_arrays_give_the_same_scores_as_host_arrays():
  train, labels, test = _random_problem(4, num_train=50, num_test=9, dim=6, num_classes=5)
  kwargs = dict(num_classes=5, k=7, query_chunk=4, bank_chunk=16)
  host = knn.knn_scores(train, labels, test, **kwargs)
  device = knn.knn_scores(jnp.asarray(train), jnp.asarray(labels), jnp.asarray(test), **kwargs)
  np.testing.assert_array_equal(host, device)
  test_labels = jnp.asarray(labels[:9])
  assert (knn.knn_accuracy(train, labels, test, test_labels, **kwargs)
          == knn.knn_accuracy(jnp.asarray(train), labels, jnp.asarray(test), test_labels, **kwargs))


def test_padding_rows_are_never_neighbours():
  train, labels, test = _random_problem(1, num_train=40, num_test=10, dim=8, num_classes=4)
  # Padding rows identical to the queries would be their nearest neighbours if they counted.
  padded_train = np.concatenate([train, test, np.zeros((5, 8), np.float32)])
  padded_labels = np.concatenate([labels, np.full(15, -1, np.int32)])
  got = knn.knn_scores(padded_train, padded_labels, test, num_classes=4, k=10,
                       query_chunk=4, bank_chunk=6)
  want = knn.knn_scores(train, labels, test, num_classes=4, k=10, query_chunk=4, bank_chunk=6)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, _reference_scores(train, labels, test, 4, 10, 0.07),
                             rtol=2e-5)


def test_bank_smaller_than_k_uses_every_row_once():
  train, labels, test = _random_problem(2, num_train=6, num_test=3, dim=5, num_classes=3)
  got = knn.knn_scores(train, labels, test, num_classes=3, k=20, bank_chunk=4)
  np.testing.assert_allclose(got, _reference_scores(train, labels, test, 3, 6, 0.07), rtol=2e-5)


def test_hand_built_example():
  # Unit vectors on a circle; the query sits at angle 0.
  def unit(deg):
    r = np.deg2rad(deg)
    return [np.cos(r), np.sin(r)]

  train = np.array([unit(0), unit(60), unit(90), unit(180), unit(-60)], np.float32) * [
      [1.0], [3.0], [0.5], [2.0], [1.0]]  # norms must not matter
  labels = np.array([0, 1, 1, 2, 0], np.int32)
  test = np.array([unit(0)], np.float32) * 7.0
  t = 0.5
  # k = 3: neighbours at 0 deg (cos 1, class 0) and +-60 deg (cos 0.5, classes 1 and 0).
  got = knn.knn_scores(train, labels, test, num_classes=3, k=3, temperature=t, bank_chunk=2)
  want = [[np.exp(1 / t) + np.exp(0.5 / t), np.exp(0.5 / t), 0.0]]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # k = 4 adds the 90 deg neighbour (cos 0) to class 1; 180 deg (class 2) still stays out.
  got = knn.knn_scores(train, labels, test, num_classes=3, k=4, temperature=t, bank_chunk=3)
  want = [[np.exp(1 / t) + np.exp(0.5 / t), np.exp(0.5 / t) + 1.0, 0.0]]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_accuracy_ignores_padded_test_rows_and_counts_top5():
  # Each class is a tight cluster around its own axis, so 1-NN is always right.
  rng = np.random.default_rng(3)
  num_classes, dim = 6, 6
  centres = np.eye(dim, dtype=np.float32) * 10
  train_labels = np.repeat(np.arange(num_classes), 10).astype(np.int32)
  train = centres[train_labels] + rng.normal(size=(60, dim)).astype(np.float32)
  test_labels = np.array([0, 1, 2, 3, 4, 5, -1, -1], np.int32)
  test = centres[np.maximum(test_labels, 0)] + rng.normal(size=(8, dim)).astype(np.float32)
  acc = knn.knn_accuracy(train, train_labels, test, test_labels, num_classes=num_classes, k=5,
                         query_chunk=3, bank_chunk=16)
  assert acc == {"top1": 1.0, "top5": 1.0}
  # Permuting the test labels (the -1 rows keep theirs) makes every top-1 wrong.
  wrong = np.array([1, 2, 3, 4, 5, 0, -1, -1], np.int32)
  acc = knn.knn_accuracy(train, train_labels, test, wrong, num_classes=num_classes, k=5)
  assert acc["top1"] == 0.0
  acc = knn.knn_accuracy(train, train_labels, test[:2], [0, 1], num_classes=4, k=5)
  assert set(acc) == {"top1"}


def test_topk_correct_breaks_ties_towards_lower_class():
  scores = np.array([[0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
  assert knn.topk_correct(scores, np.array([1]), 1)[0]
  assert not knn.topk_correct(scores, np.array([2]), 1)[0]
  # Stable descending order: classes 1, 2, 0, 3, 4, 5, 6.
  assert knn.topk_correct(scores, np.array([4]), 5)[0]
  assert not knn.topk_correct(scores, np.array([5]), 5)[0]


def test_extract_features_drops_masked_rows():
  calls = []

  def feature_fn(images):
    calls.append(images.shape)  # traced once per batch shape
    return jnp.mean(images, axis=(1, 2))  # [B, C]

  def batches():
    for b in range(3):
      images = np.full((4, 2, 2, 3), float(b), np.float32) + np.arange(4)[:, None, None, None]
      mask = np.array([True, True, True, True]) if b < 2 else np.array([True, False, True, False])
      yield {"image": images, "label": np.arange(4) + 10 * b, "mask": mask}

  features, labels = knn.extract_features(feature_fn, batches())
  assert features.dtype == np.float32 and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, [0, 1, 2, 3, 10, 11, 12, 13, 20, 22])
  np.testing.assert_allclose(features[:, 0], [0, 1, 2, 3, 1, 2, 3, 4, 2, 4])
  assert features.shape == (10, 3)
  assert len(calls) == 1  # jitted: compiled once for the fixed batch shape


def test_extract_features_empty_iterator():
  features, labels = knn.extract_features(lambda x: x, iter([]))
  assert features.shape[0] == 0 and labels.shape == (0,)


def test_a_temperature_whose_votes_overflow_is_refused_and_nan_scores_count_as_wrong():
  """Below min_temperature(k) the votes exp(cosine / T) of k neighbours overflow float32: the
  scores became inf and NaN (inf x 0 in the vote sum), and a NaN row ranked its true class
  first, so random features scored near 100%. Refused now; a NaN row counts as wrong."""
  train, labels, test = _random_problem(5, num_train=40, num_test=6, dim=4, num_classes=3)
  floor = knn.min_temperature(20)
  # The bound is tight: finite at it, inf 1% below.
  assert 20 * np.exp(np.float32(1 / floor)) < np.finfo(np.float32).max
  assert not np.isfinite(np.float32(20) * np.exp(np.float32(1 / (0.99 * floor))))
  scores = knn.knn_scores(train, labels, test, num_classes=3, k=20, temperature=floor)
  assert np.isfinite(scores).all()
  with pytest.raises(ValueError, match=r"temperature must be >= 0.01166 for k = 20"):
    knn.knn_scores(train, labels, test, num_classes=3, k=20, temperature=0.005)
  nan_row = np.array([[np.nan, 0.0, 0.0], [0.2, 0.5, 0.1]])
  np.testing.assert_array_equal(knn.topk_correct(nan_row, np.array([0, 1]), 1), [False, True])


_TWO_DEVICE_SCRIPT = """
import jax
import numpy as np
from conftest import tiny_config
from mim_jax import data
from mim_jax.evaluate import frozen
assert jax.local_device_count() == 2
config = tiny_config("mae", **{"eval.batch_size": 8})
split = data.eval_split(config.data)
extractor = frozen.FeatureExtractor(config)
params = extractor.encoder.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
params = params["params"]
features, seen = extractor._features, set()
def spy(p, images):
  seen.add(len(images.sharding.device_set) if isinstance(images, jax.Array) else 1)
  return features(p, images)
extractor._features = spy
both, labels = extractor.split(params, split)  # batches of 8: half on each device
assert seen == {2}, seen
config.eval.batch_size = 7  # batches the devices cannot split: one device
one, one_labels = frozen.FeatureExtractor(config).split(params, split)
np.testing.assert_array_equal(labels, one_labels)
assert len(labels) == 64 and set(both) == set(one) == set(extractor.pools)
for pool in extractor.pools:
  np.testing.assert_allclose(both[pool], one[pool], rtol=1e-5, atol=1e-5)
print("OK")
"""


def test_features_of_a_split_on_two_devices_equal_those_on_one():
  """In a process with several devices (a data-parallel run's k-NN monitor) each batch is split
  across them; a batch they cannot split evenly runs on one: the same features and labels."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
  out = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-4000:]


def test_a_k_beyond_the_bank_is_refused_before_the_first_evaluation():
  """knn.k=100000 against a bank of 54 images ran (a pre-training monitor's only after its
  first epochs), each query voting with every image: refused when the monitor is built."""
  from mim_jax.config.errors import ConfigError
  from mim_jax.evaluate import frozen

  from conftest import tiny_config
  config = tiny_config("mae", **{"knn.every_epochs": 1, "knn.k": 65})  # 64 synthetic images
  with pytest.raises(ConfigError, match=r"config.knn.k=65 is invalid: at most the 64 training "
                     r"images of the k-NN bank"):
    frozen.KnnMonitor(config).check_bank()
  config.knn.k = 64
  frozen.KnnMonitor(config).check_bank()


def test_the_training_loop_checks_the_bank_before_it_trains(tmp_path):
  from mim_jax.config.errors import ConfigError
  from mim_jax.training import loop

  from conftest import tiny_config
  config = tiny_config("mae", **{"knn.every_epochs": 1, "knn.k": 65, "total_steps": 2})
  with pytest.raises(ConfigError, match=r"config.knn.k=65 is invalid"):
    loop.run(config, str(tmp_path / "w"))
  assert not os.listdir(tmp_path / "w" / "checkpoints")


def test_the_probe_job_checks_its_bank_before_the_features(tmp_path):
  from mim_jax.config.errors import ConfigError
  from mim_jax.evaluate import frozen

  from conftest import tiny_config
  config = tiny_config("probe", **{"init_from": "random", "knn.k": 65, "data.holdout": 4})
  with pytest.raises(ConfigError, match=r"config.knn.k=65 is invalid: at most the 64 "):
    frozen.run_probe(config, str(tmp_path / "probe"))
