"""The converged frozen-feature protocols: logistic probe, held-out split, k-NN of every pool."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mim_jax import data, recipes, registry
from mim_jax.config import defaults as config_defaults
from mim_jax.config.errors import ConfigError
from mim_jax.data import idx, sources
from mim_jax.evaluate import frozen, logistic
from mim_jax.training import loop as train

from conftest import FMNIST_DIR, requires_fmnist, tiny_mae_config


def _pixels(split: str, n: int):
  x, y, _ = idx.load_fmnist(FMNIST_DIR, split)
  return x[:n].reshape(n, -1).astype(np.float32) / 255.0, y[:n].astype(np.int32)


@pytest.mark.long
@requires_fmnist
def test_probe_on_pixels_matches_scikit_learn():
  """On standardised raw pixels the probe is scikit-learn's multinomial logistic regression:
  the same L2 strength (C = 1 / (l2 N)) scores within 0.5 points on held-out test images."""
  sklearn = pytest.importorskip("sklearn.linear_model")
  x, y = _pixels("train", 6000)
  xt, yt = _pixels("test", 2000)
  mean, scale = logistic.standardizer(x)
  x, xt = (x - mean) * scale, (xt - mean) * scale
  l2 = 1e-3
  params, info = logistic.fit(x, y, 10, l2, max_iter=3000, tol=1e-4)
  ours = logistic.accuracy(params, xt, yt)
  ref = sklearn.LogisticRegression(C=1.0 / (l2 * len(x)), max_iter=2000, tol=1e-6).fit(x, y)
  assert info.converged, info
  assert abs(ours - ref.score(xt, yt)) <= 0.005, (ours, ref.score(xt, yt))
  # The same optimum: the weights agree, not only the accuracy.
  w = ref.coef_.T - ref.coef_.T.mean(1, keepdims=True)
  ours_w = params["w"] - params["w"].mean(1, keepdims=True)
  assert np.abs(ours_w - w).max() < 0.02 * np.abs(w).max()


def test_l2_is_chosen_on_the_validation_rows_only():
  """A noisy problem: strong regularisation wins on the validation rows; the choice follows
  them (not the training rows, where the weakest penalty always fits best)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 50)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  y_noisy = np.where(rng.random(200) < 0.3, 1 - y, y)
  xv = rng.normal(size=(400, 50)).astype(np.float32)
  chosen = logistic.select_l2(x, y_noisy, xv, (xv[:, 0] > 0).astype(np.int32), 2,
                              grid=(1.0, 1e-1, 1e-4))
  scores = chosen.scores
  assert set(scores) == {1.0, 1e-1, 1e-4}
  assert chosen.l2 == max(scores, key=lambda k: (scores[k], k))
  assert scores[1e-4] < max(scores.values())
  params, _ = logistic.fit(x, y_noisy, 2, chosen.l2)
  np.testing.assert_allclose(chosen.params["w"], params["w"], atol=1e-3)


def test_a_warm_start_reaches_the_same_optimum_in_fewer_iterations():
  """The regularisation path: a fit started from the solution of a stronger penalty converges
  to the optimum of a fit from zeros (strictly convex objective), in fewer iterations."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(300, 20)).astype(np.float32)
  y = np.argmax(x[:, :3] + 0.5 * rng.normal(size=(300, 3)), axis=1).astype(np.int32)
  strong, _ = logistic.fit(x, y, 3, 1e-3, tol=1e-6)
  cold, cold_info = logistic.fit(x, y, 3, 3e-4, tol=1e-6)
  warm, warm_info = logistic.fit(x, y, 3, 3e-4, tol=1e-6, init=strong)
  assert cold_info.converged and warm_info.converged
  assert warm_info.iterations < cold_info.iterations, (warm_info, cold_info)
  for k in ("w", "b"):
    np.testing.assert_allclose(warm[k], cold[k], atol=1e-4)


def test_sets_fitted_together_end_as_each_would_alone():
  """fit_together: one vmapped L-BFGS over several feature sets; the set that converges first
  is carried unchanged while the others iterate, so it ends at its own fit's iteration count,
  and every set at its own fit's weights (up to the rounding of batched matmuls).
  select_l2_many scores the strengths alike either way, in groups too."""
  rng = np.random.default_rng(2)
  xs = rng.normal(size=(3, 300, 12)).astype(np.float32)
  xs[0] *= 1e-3  # nearly no signal: another problem, another iteration count
  y = np.argmax(xs[1, :, :3] + xs[2, :, 3:6] + 0.5 * rng.normal(size=(300, 3)),
                axis=1).astype(np.int32)
  together, infos = logistic.fit_together(xs, y, 3, 1e-4, tol=1e-5, max_iter=500)
  alone = [logistic.fit(x, y, 3, 1e-4, tol=1e-5, max_iter=500) for x in xs]
  counts = [ref_info.iterations for _, ref_info in alone]
  assert len(set(counts)) > 1, counts  # the sets stop apart, so one is carried while others run
  first = int(np.argmin(counts))
  assert infos[first].iterations == counts[first], (infos, counts)  # frozen once converged
  for params, info, (ref, ref_info) in zip(together, infos, alone):
    assert info.converged and ref_info.converged
    for k in ("w", "b"):
      np.testing.assert_allclose(params[k], ref[k], atol=1e-4)
  xv = rng.normal(size=(3, 200, 12)).astype(np.float32)
  yv = np.argmax(xv[1, :, :3] + xv[2, :, 3:6], axis=1).astype(np.int32)
  grid = (1e-1, 1e-3, 1e-5)
  one_by_one = logistic.select_l2_many(list(xs), y, list(xv), yv, 3, grid, tol=1e-5)
  for per_program in (None, 2):  # all three in one program; a group of two, then one alone
    fitted = logistic.select_l2_many(xs, y, xv, yv, 3, grid, together=True, tol=1e-5,
                                     sets_per_program=per_program)
    for a, b in zip(one_by_one, fitted):
      assert a.scores.keys() == b.scores.keys()
      assert all(abs(a.scores[k] - b.scores[k]) <= 1 / len(yv) for k in a.scores)
  with pytest.raises(ValueError, match="2 training and 3 validation feature sets"):
    logistic.select_l2_many(list(xs[:2]), y, list(xv), yv, 3, grid)
  with pytest.raises(ValueError, match="one feature width; got a: 12, b: 5"):
    logistic.select_l2_many([xs[0], xs[1, :, :5]], y, [xv[0], xv[1, :, :5]], yv, 3, grid,
                            together=True, names=["a", "b"])


def test_holdout_rows_never_reach_training():
  config = tiny_mae_config()
  config.data.update(holdout=16, label_fraction=0.5)
  labels = data.build_source(config.data, image_size=(16, 16), channels=3).labels()
  held = sources.holdout_indices(config.data, labels)
  rows = sources.train_indices(config.data, labels)
  assert len(held) == 16 and not set(held) & set(rows)
  # Every class keeps its share out (within one example), and the label subset applies to
  # the rest.
  share = np.bincount(labels) * 16 / 64
  assert np.all(np.abs(np.bincount(labels[held], minlength=10) - share) < 1)
  rest = np.setdiff1d(np.arange(64), held)
  assert list(rows) == list(rest[data.per_class_subset(labels[rest], 0.5, 0)])
  train_source = data.build_train_source(config.data, image_size=(16, 16), channels=3)
  assert sorted(int(train_source[i]["index"]) for i in range(len(train_source))) == list(rows)
  holdout = data.build_source(config.data, image_size=(16, 16), channels=3, split="holdout")
  assert [int(holdout[i]["index"]) for i in range(len(holdout))] == list(held)
  # Another training seed does not move the holdout.
  config.seed = 5
  np.testing.assert_array_equal(sources.holdout_indices(config.data, labels), held)


def test_holdout_split_needs_a_holdout():
  config = tiny_mae_config()
  config.data.eval_split = "holdout"
  with pytest.raises(ConfigError, match="data.eval_split='holdout'.*data.holdout > 0"):
    registry.validate_config(config)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("encoder"))
  train.run(tiny_mae_config(total_steps=2), workdir)
  return workdir


def _probe_config(init_from: str, **overrides):
  c = recipes.knn_recipe("probe")
  c.init_from = init_from
  c.image_size = (16, 16)
  c.data.update(source="synthetic", synthetic_size=64, holdout=16)
  c.eval.batch_size = 16
  c.knn.k = 5
  c.probe.update(l2_grid=(1e-2, 1e-4), max_iter=200)
  return config_defaults.override(c, **overrides)


def test_probe_job_reports_every_pool_and_its_choices(tiny_encoder, tmp_path):
  metrics = train.run(_probe_config(tiny_encoder), str(tmp_path))
  results = json.load(open(tmp_path / "results.json"))
  for pool in ("cls", "gap"):
    assert 0 <= results[f"probe_top1_{pool}"] <= 1 and 0 <= results[f"knn_top1_{pool}"] <= 1
    assert results[f"probe_l2_{pool}"] in (1e-2, 1e-4)
    assert set(results[f"probe_holdout_top1_{pool}"]) == {"0.01", "0.0001"}
  assert results["num_holdout"] == 16 and results["num_train"] == 64
  assert metrics["probe_top1_cls"] == results["probe_top1_cls"]


def test_the_block_is_chosen_on_the_holdout_and_scored_as_a_fixed_block_would_be(tiny_encoder,
                                                                                tmp_path):
  """probe.select_layer: per pool, the block with the best held-out score among the output
  and every block; its test figures are those of a probe told that block. The choosing run
  fits its six feature sets together (one program per L2 strength, as on a GPU), the
  fixed ones one by one: the same figures."""
  chosen = train.run(_probe_config(tiny_encoder, **{"probe.select_layer": True,
                                                    "probe.fit_sets": "together"}),
                     str(tmp_path / "chosen"))
  results = json.load(open(tmp_path / "chosen" / "results.json"))
  assert results["probe_layers"] == [0, 1, 2] and "probe_layer" not in results
  for pool in ("cls", "gap"):
    by_layer = results[f"probe_holdout_by_layer_{pool}"]
    layer = results[f"probe_layer_{pool}"]
    assert set(by_layer) == {"0", "1", "2"}
    assert by_layer[str(layer)] == max(by_layer.values())
    assert by_layer[str(layer)] == max(results[f"probe_holdout_top1_{pool}"].values())
    assert set(results[f"probe_holdout_converged_{pool}"]) == {"0.01", "0.0001"}
    fixed = train.run(_probe_config(tiny_encoder, **{"classifier.probe_layer": layer,
                                                     "probe.fit_sets": "one_by_one"}),
                      str(tmp_path / f"{pool}{layer}"))
    assert chosen[f"knn_top1_{pool}"] == fixed[f"knn_top1_{pool}"]
    # Fitted together or alone: the same fits up to the rounding of batched matmuls, so the
    # same scores within one image (16 held out, 64 test) and, where the held-out scores
    # agree, the same strength.
    held_chosen, held_fixed = (r[f"probe_holdout_top1_{pool}"] for r in (chosen, fixed))
    assert held_chosen.keys() == held_fixed.keys()
    assert all(abs(held_chosen[k] - held_fixed[k]) <= 1 / 16 for k in held_chosen)
    assert abs(chosen[f"probe_top1_{pool}"] - fixed[f"probe_top1_{pool}"]) <= 1 / 64
    if held_chosen == held_fixed:
      assert chosen[f"probe_l2_{pool}"] == fixed[f"probe_l2_{pool}"]
  with pytest.raises(ConfigError, match="classifier.probe_layer=1 is not used.*select_layer"):
    registry.validate_config(_probe_config(tiny_encoder, **{"probe.select_layer": True,
                                                            "classifier.probe_layer": 1}))
  with pytest.raises(ConfigError, match="probe.fit_sets='all'.*one of.*together"):
    registry.validate_config(_probe_config(tiny_encoder, **{"probe.fit_sets": "all"}))
  with pytest.raises(ConfigError, match="probe.select_layer=True is not used.*pixels"):
    registry.validate_config(_probe_config("", **{"probe.select_layer": True,
                                                  "classifier.features": "pixels"}))


def test_dino_features_are_the_last_blocks_cls_tokens_through_the_final_norm(tiny_encoder,
                                                                             tmp_path):
  """probe.last_blocks (DINO / iBOT's linear evaluation): the cls tokens of the last blocks,
  each through the encoder's final LayerNorm, then with last_blocks_gap the mean patch token.
  With one block that is the encoder output's cls and mean tokens; an earlier block's part is
  its LayerNorm, computed here in numpy. The probe job fits and reports the set beside the
  pools (its width differs: fitted in a program of its own when the sets go together)."""
  from mim_jax.training import setup
  config = setup.prepare(_probe_config(
      tiny_encoder, **{"probe.last_blocks": 2, "probe.last_blocks_gap": True}))
  ex = frozen.job_extractor(config)
  width = ex.encoder.width
  assert ex.pools == ("cls", "gap", "dino") and ex.widths == (width, width, 3 * width)
  params = frozen._encoder_params(config)  # pylint: disable=protected-access
  feats, _ = ex.split(params, "test")
  dino = feats["dino"]
  np.testing.assert_allclose(dino[:, width:2 * width], feats["cls"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dino[:, 2 * width:], feats["gap"], rtol=1e-5, atol=1e-5)
  images = next(iter(data.make_eval_iterator(config.data, image_size=(16, 16), channels=3,
                                             batch_size=len(dino), split="test")))["image"]
  _, aux = ex.encoder.apply({"params": params}, images, train=False)
  first = np.asarray(aux["blocks"][0][:, 0], np.float64)  # block 1 of 2
  norm = params["transformer"]["norm"]
  mean, var = first.mean(-1, keepdims=True), first.var(-1, keepdims=True)
  expected = (first - mean) / np.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
  np.testing.assert_allclose(dino[:, :width], expected, rtol=1e-4, atol=1e-4)

  results = train.run(_probe_config(tiny_encoder, **{
      "probe.last_blocks": 2, "probe.last_blocks_gap": True, "probe.select_layer": True,
      "probe.fit_sets": "together"}), str(tmp_path))
  assert 0 <= results["probe_top1_dino"] <= 1 and 0 <= results["knn_top1_dino"] <= 1
  assert "probe_layer_dino" not in results and results["probe_layer_cls"] in (0, 1, 2)
  with pytest.raises(ConfigError, match=r"probe.last_blocks=3 is invalid: 0 \(no DINO feature "
                     r"set\) to the encoder's 2 blocks"):
    setup.prepare(_probe_config(tiny_encoder, **{"probe.last_blocks": 3}))


def test_the_block_with_the_best_held_out_score_wins_ties_to_the_lowest_index():
  def sel(*scores):
    return logistic.Selection(l2=1e-3, scores=dict(zip((1e-2, 1e-3), scores)),
                              converged={1e-2: True, 1e-3: True}, params={})
  assert frozen.choose_layer({0: sel(0.80, 0.81), 1: sel(0.83, 0.79), 2: sel(0.82, 0.80)}) == 1
  # A tie between blocks 3 and 5 (and the output below them) goes to block 3, listed or not
  # in order.
  assert frozen.choose_layer({5: sel(0.7, 0.9), 0: sel(0.8, 0.8), 3: sel(0.9, 0.1)}) == 3
  assert frozen.choose_layer({6: sel(0.9, 0.9), 0: sel(0.9, 0.2)}) == 0


def test_the_probe_refuses_to_score_its_holdout_and_features_beyond_memory(tiny_encoder,
                                                                           tmp_path,
                                                                           monkeypatch):
  with pytest.raises(ConfigError, match="data.eval_split='holdout'.*method 'probe'"):
    registry.validate_config(_probe_config(tiny_encoder, **{"data.eval_split": "holdout"}))
  # 64 training + 64 test images x 3 blocks x 2 pools x 64 floats = 196,608 bytes.
  monkeypatch.setattr(frozen.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1024,
                                                           "SC_PHYS_PAGES": 200}[name])
  with pytest.raises(ConfigError, match=r"128 images x 3 blocks x 2 pools .*select_layer=True.*"
                     r"0\.0 GiB.*probe_layer=k"):
    train.run(_probe_config(tiny_encoder, **{"probe.select_layer": True}), str(tmp_path / "a"))
  assert not (tmp_path / "a" / "results.json").exists()
  # 2 pools: 65,536 bytes, and 32,768 more for the standardised copy of the 48 training and 16
  # held-out rows when the two sets are fitted together; 81,920 bytes are allowed.
  monkeypatch.setattr(frozen.os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1024,
                                                           "SC_PHYS_PAGES": 100}[name])
  with pytest.raises(ConfigError, match=r"standardised copy of 64 of them.*"
                     r"fit_sets='one_by_one'"):
    train.run(_probe_config(tiny_encoder, **{"probe.fit_sets": "together"}),
              str(tmp_path / "c"))
  train.run(_probe_config(tiny_encoder, **{"probe.fit_sets": "one_by_one"}),
            str(tmp_path / "b"))


def test_a_low_label_probe_encodes_only_its_labelled_rows(tiny_encoder, tmp_path, monkeypatch):
  """With data.label_fraction < 1 the probe decodes the labelled subset and the holdout of
  the training split, not every training image (a 1%-label probe on ImageNet would otherwise
  encode 100x the images it uses); its final fit and k-NN bank hold the labelled rows alone
  (the holdout's labels only choose the L2 strength: they were fitted on as well)."""
  config = _probe_config(tiny_encoder, **{"data.label_fraction": 0.25})
  labels = data.build_source(config.data, image_size=(16, 16), channels=3).labels()
  wanted = set(sources.train_indices(config.data, labels)) | set(
      sources.holdout_indices(config.data, labels))
  read = set()
  build = sources.build_source

  class Recorded:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, index):
      read.add(int(index))
      return self.source[index]

    def labels(self):
      return self.source.labels()

  def recording(data_cfg, *, image_size, channels, split=None):
    source = build(data_cfg, image_size=image_size, channels=channels, split=split)
    return Recorded(source) if split in (None, data_cfg.split) else source

  monkeypatch.setattr(sources, "build_source", recording)
  fitted_rows, banks = [], []
  fit, knn_accuracy = frozen.logistic.fit, frozen.knn.knn_accuracy
  monkeypatch.setattr(frozen.logistic, "fit",
                      lambda x, *a, **k: fitted_rows.append(len(x)) or fit(x, *a, **k))
  monkeypatch.setattr(frozen.knn, "knn_accuracy",
                      lambda bank, *a, **k: banks.append(len(bank)) or knn_accuracy(bank, *a, **k))
  results = train.run(config, str(tmp_path))
  assert read == wanted and len(wanted) < 40  # of 64 training images
  assert set(fitted_rows) == set(banks) == {len(wanted) - 16}  # selection fits and the refit
  labelled = len(sources.train_indices(config.data, labels))
  assert results["num_train"] == labelled == len(wanted) - 16 and results["num_holdout"] == 16


def test_a_holdout_that_cannot_be_decoded_is_named(tmp_path):
  """data.on_bad_image='skip' leaves undecodable images out; when that leaves none of the
  held-out rows, the job stops with the reason instead of failing on empty arrays."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for folder, count in (("imgs", 8), ("val", 2)):
    for c in range(2):
      for i in range(count):
        path = tmp_path / folder / f"class{c}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
  config = _probe_config("", **{"classifier.features": "pixels", "data.source": "image_folder",
                                "data.path": str(tmp_path / "imgs"),
                                "data.eval_path": str(tmp_path / "val"), "data.holdout": 4,
                                "data.synthetic_size": 10000})  # the synthetic source's default
  source = data.build_source(config.data, image_size=(16, 16), channels=3)
  for index in sources.holdout_indices(config.data, source.labels()):
    with open(source.path(int(index)), "wb") as f:
      f.write(b"not an image")
  with pytest.raises(data.BadImageError, match="none of the images of the 4 rows of split "
                     "'train' read here could be decoded.*on_bad_image='skip'"):
    train.run(config, str(tmp_path / "w"))


def test_probe_on_pixels_and_without_a_holdout(tmp_path):
  pixels = _probe_config("", **{"classifier.features": "pixels"})
  results = train.run(pixels, str(tmp_path / "pixels"))
  # Synthetic classes are pixel patterns: a linear classifier separates them.
  assert results["probe_top1_pixels"] > 0.9 and "probe_top1_cls" not in results
  with pytest.raises(ConfigError, match="data.holdout=0.*method 'probe'"):
    registry.validate_config(_probe_config("", **{"classifier.features": "pixels", "data.holdout": 0}))
