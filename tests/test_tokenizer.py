"""The VQ tokenizer (BEiT stage 1): EMA codebook, restarts, usage, export / reload, training."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import registry
from mim_jax.config.errors import ConfigError
from mim_jax.tokenizers import codebook as cb
from mim_jax.tokenizers import io
from mim_jax.tokenizers import models as tokenizers_models
from mim_jax.training import loop as train

from conftest import REPO, requires_fmnist, tiny_mae_config, tool_flags


def tiny_tokenizer_config(**overrides):
  """A micro tokenizer run on synthetic 16x16 RGB images (a 4x4 grid of 4-px patches)."""
  method = overrides.pop("method", "vq_tokenizer")
  c = tiny_mae_config(method=method)
  c.tokenizer.update(vocab_size=16, code_dim=8, width=16, num_blocks=1)
  if method == "vq_tokenizer":
    c.tokenizer.restart_after = 2
  c.optimizer.update(base_lr=1e-3, weight_decay=0.0)
  c.total_steps = 4
  return _override(c, **overrides)


def _override(c, **overrides):
  from mim_jax.config import defaults as config_defaults
  config_defaults.override(c, **overrides)
  registry.validate_config(c)
  return c


# --- the codebook ---------------------------------------------------------------------------


def test_ema_update_equals_its_formula():
  rng = np.random.default_rng(0)
  k, d, decay, eps = 4, 3, 0.9, 1e-3
  state = {"codebook": rng.normal(size=(k, d)).astype(np.float32),
           "cluster_size": np.array([2.0, 1.0, 0.5, 3.0], np.float32),
           "embed_sum": rng.normal(size=(k, d)).astype(np.float32),
           "unused_steps": np.array([0, 4, 1, 7], np.int32)}
  z = rng.normal(size=(5, d)).astype(np.float32)
  codes = np.array([0, 2, 0, 3, 0], np.int32)
  new = jax.device_get(cb.ema_update(jax.tree.map(jnp.asarray, state), jnp.asarray(z),
                                     jnp.asarray(codes), decay=decay, eps=eps, l2=False))
  n = np.array([3.0, 0.0, 1.0, 1.0])
  s = np.stack([z[codes == i].sum(0) if (codes == i).any() else np.zeros(d) for i in range(k)])
  size = decay * state["cluster_size"] + (1 - decay) * n
  m = decay * state["embed_sum"] + (1 - decay) * s
  smoothed = (size + eps) / (size.sum() + k * eps) * size.sum()
  np.testing.assert_allclose(new["cluster_size"], size, rtol=1e-6)
  np.testing.assert_allclose(new["embed_sum"], m, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["codebook"], m / smoothed[:, None], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new["unused_steps"], [0, 5, 0, 0])
  # With l2 the codes are the same directions, unit length.
  unit = jax.device_get(cb.ema_update(jax.tree.map(jnp.asarray, state), jnp.asarray(z),
                                      jnp.asarray(codes), decay=decay, eps=eps, l2=True))
  want = m / smoothed[:, None]
  np.testing.assert_allclose(unit["codebook"], want / np.linalg.norm(want, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)


def test_dead_codes_are_restarted_from_the_batch():
  state = cb.init_state(jax.random.key(0), 4, 2, l2=False)
  state["unused_steps"] = jnp.array([0, 3, 2, 5], jnp.int32)
  z = jnp.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
  new, restarted = cb.restart_dead_codes(state, z, jax.random.key(1), restart_after=3)
  assert int(restarted) == 2
  for i in (1, 3):  # re-seeded: a row of z, N = 1, m = e, counter reset
    assert any(np.allclose(new["codebook"][i], row) for row in np.asarray(z))
    np.testing.assert_allclose(new["embed_sum"][i], new["codebook"][i])
    assert float(new["cluster_size"][i]) == 1.0 and int(new["unused_steps"][i]) == 0
  for i in (0, 2):  # alive: untouched
    np.testing.assert_array_equal(new["codebook"][i], state["codebook"][i])
    assert int(new["unused_steps"][i]) == int(state["unused_steps"][i])
  same, none = cb.restart_dead_codes(state, z, jax.random.key(1), restart_after=0)
  assert int(none) == 0 and same is state


def test_restart_candidates_are_a_uniform_draw_over_the_step_s_micro_batches():
  """Reservoir sampling across micro-batches: with three equal micro-batches each supplies
  about a third of the codes' restart candidates (the last one would supply all of them if
  each replaced the previous picks), and each pick is a row of its micro-batch."""
  k, d = 6000, 2
  extra = {**cb.init_state(jax.random.key(0), k, d, l2=False), **cb.init_step_stats(k, d)}
  for i in range(3):
    z = jnp.full((5, d), float(i + 1)) + jnp.arange(5.0)[:, None] * 10.0
    extra = cb.accumulate_step_stats(extra, z, jnp.zeros((5,), jnp.int32), jax.random.key(i))
  picks = np.asarray(extra["batch_picks"])
  source = picks[:, 0] % 10.0
  np.testing.assert_array_equal(picks[:, 1], picks[:, 0])  # whole rows
  assert set(np.unique(picks[:, 0] - source)) <= {0.0, 10.0, 20.0, 30.0, 40.0}
  shares = [np.mean(source == i + 1) for i in range(3)]
  np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.03)
  assert float(extra["batch_micro_batches"]) == 3 and float(extra["batch_counts"][0]) == 15
  after = cb.apply_step_stats({**extra, "unused_steps": jnp.full((k,), 9, jnp.int32)},
                              decay=0.9, eps=1e-5, l2=False, restart_after=5)
  assert int(after["restarted_codes"]) == k - 1  # code 0 was assigned this step
  np.testing.assert_array_equal(after["codebook"][1:], extra["batch_picks"][1:])
  assert not np.any(after["batch_counts"]) and float(after["batch_micro_batches"]) == 0


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_norm_ema_update_equals_beit_v2_s_quantizer():
  """BEiT v2's NormEMAVectorQuantizer update, transcribed from its release
  (norm_ema_quantizer.py) in numpy: one-hot encodings, bins with empty ones set to 1, the
  normalised mean of each code's vectors (the old code where a code got none), then
  weight <- l2norm(decay weight + (1 - decay) mean). Fed in two micro-batches, as under
  gradient accumulation: the step's statistics make one update."""
  rng = np.random.default_rng(0)
  k, d, decay = 5, 4, 0.9
  extra = {**cb.init_state(jax.random.key(0), k, d, l2=True), **cb.init_step_stats(k, d)}
  z = _unit(rng.normal(size=(12, d))).astype(np.float32)
  codes = np.array([0, 2, 0, 3, 0, 2, 2, 0, 3, 0, 0, 2], np.int32)  # codes 1 and 4 unused
  for half in (slice(0, 6), slice(6, 12)):
    extra = cb.accumulate_step_stats(extra, jnp.asarray(z[half]), jnp.asarray(codes[half]),
                                     jax.random.key(1))
  new = jax.device_get(cb.apply_step_stats(extra, decay=decay, eps=1e-5, l2=True,
                                           restart_after=0, update="norm_ema"))
  weight = np.asarray(extra["codebook"])
  encodings = np.eye(k, dtype=np.float32)[codes]
  bins = encodings.sum(0)
  zero = bins == 0
  mean = _unit((z.T @ encodings / np.where(zero, 1.0, bins)[None, :]).T)
  mean = np.where(zero[:, None], weight, mean)
  np.testing.assert_allclose(new["codebook"], _unit(decay * weight + (1 - decay) * mean),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new["codebook"][zero], weight[zero])  # unassigned: unmoved
  np.testing.assert_allclose(new["cluster_size"],
                             decay * np.asarray(extra["cluster_size"]) + (1 - decay) * bins,
                             rtol=1e-6)
  np.testing.assert_array_equal(new["unused_steps"], [0, 1, 0, 0, 1])
  # The rule differs from VQ-VAE's: the same statistics move the codes elsewhere.
  sums = jax.device_get(cb.apply_step_stats(extra, decay=decay, eps=1e-5, l2=True,
                                            restart_after=0))
  assert not np.allclose(sums["codebook"][~zero], new["codebook"][~zero], atol=1e-3)


@pytest.mark.parametrize("l2", [True, False])
def test_kmeans_is_lloyd_s_algorithm_from_distinct_rows(l2):
  """Against numpy's Lloyd iterations from the same starting rows (BEiT v2's `kmeans`:
  spherical with l2, a centre that gets no rows kept); the start is K distinct rows."""
  rng = np.random.default_rng(1)
  z = rng.normal(size=(40, 3)).astype(np.float32)
  z = _unit(z) if l2 else z
  key, k = jax.random.key(3), 6
  rows = np.asarray(jax.random.choice(key, 40, (k,), replace=False))
  assert len(set(rows.tolist())) == k
  centres = z[rows]
  for iteration in range(4):
    assign = np.argmin(((z[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(assign, minlength=k).astype(np.float32)
    means = np.stack([z[assign == i].mean(0) if counts[i] else centres[i] for i in range(k)])
    centres = _unit(means) if l2 else means
    if iteration == 0:
      one_iteration = centres
  got, got_counts = jax.device_get(cb.kmeans(key, jnp.asarray(z), k, 4, l2))
  np.testing.assert_allclose(got, centres, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got_counts, counts)
  np.testing.assert_allclose(cb.kmeans(key, jnp.asarray(z), k, 1, l2)[0], one_iteration,
                             rtol=1e-5, atol=1e-6)
  # Fewer rows than codes: the start repeats rows; a repeat gets no rows (the first of equal
  # centres wins) and stays where it started.
  start, _ = cb.kmeans(key, jnp.asarray(z[:3]), k, 0, l2)
  assert {tuple(r) for r in np.asarray(start).round(5)} <= {tuple(r) for r in z[:3].round(5)}
  few, few_counts = jax.device_get(cb.kmeans(key, jnp.asarray(z[:3]), k, 2, l2))
  empty = few_counts == 0
  assert empty.sum() >= k - 3
  np.testing.assert_array_equal(few[empty], np.asarray(start)[empty])


def test_kmeans_initialises_the_codebook_once_from_the_first_training_batch():
  """With tokenizer.kmeans_init, the first training step's loss replaces the random codes by
  k-means of that batch's encoder vectors before choosing codes, and marks it done; later
  steps, evaluation and pictures leave the codebook to the EMA."""
  config = tiny_tokenizer_config(**{"tokenizer.kmeans_init": 3,
                                    "tokenizer.codebook_update": "norm_ema"})
  method = registry.build_method(config)
  images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  params, extra = method.init(jax.random.key(1), images)
  assert int(extra[cb.INITTED]) == 0
  batch = {"image": images}
  _, (_, evaluated) = method.loss(params, extra, batch, jax.random.key(2), train=False)
  np.testing.assert_array_equal(evaluated["codebook"], extra["codebook"])
  _, (_, first) = method.loss(params, extra, batch, jax.random.key(2))
  z = tokenizers_models.encode(method.model, params, images, True).reshape(-1, 8)
  init_rng, _ = method.split_init_rng(jax.random.key(2), True)
  centres, _ = cb.kmeans(init_rng, z, 16, 3, True)
  np.testing.assert_allclose(first["codebook"], centres, rtol=1e-5, atol=1e-6)
  assert int(first[cb.INITTED]) == 1
  np.testing.assert_array_equal(  # the codes were chosen from the new codebook
      first["batch_counts"], cb.code_counts(cb.nearest_codes(z, centres), 16))
  _, (_, second) = method.loss(params, first, batch, jax.random.key(5))
  np.testing.assert_array_equal(second["codebook"], first["codebook"])  # not again


def test_codebook_takes_one_ema_step_per_update_with_gradient_accumulation(tmp_path):
  """Two micro-batches move the codebook exactly as the whole batch does: one EMA step from
  the whole batch's assignments (updated per micro-batch it took two steps of the decay)."""
  states = [train.run(tiny_tokenizer_config(total_steps=1, grad_accum_steps=a,
                                            export_encoder=False), str(tmp_path / str(a)))
            for a in (1, 2)]
  one, two = (s.extra for s in states)
  for key in ("codebook", "cluster_size", "embed_sum"):
    np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(two["unused_steps"], one["unused_steps"])
  assert set(np.unique(two["unused_steps"])) <= {0, 1}  # one step, counted once


def test_usage_and_perplexity_on_known_assignments():
  usage, ppl = cb.usage_and_perplexity(jnp.array([0, 0, 1, 1]), 4)
  assert float(usage) == pytest.approx(0.5) and float(ppl) == pytest.approx(2.0)
  usage, ppl = cb.usage_and_perplexity(jnp.array([[0, 1], [2, 3]]), 8)
  assert float(usage) == pytest.approx(0.5) and float(ppl) == pytest.approx(4.0)
  usage, ppl = cb.usage_and_perplexity(jnp.array([5, 5, 5]), 8)
  assert float(usage) == pytest.approx(1 / 8) and float(ppl) == pytest.approx(1.0)
  weighted = cb.code_counts(jnp.array([[0, 1], [2, 3]]), 4, jnp.array([[1, 1], [0, 0]]))
  np.testing.assert_array_equal(np.asarray(weighted), [1, 1, 0, 0])  # zero-weight rows left out


def test_nearest_codes():
  book = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  z = jnp.array([[0.9, 0.1], [0.1, 1.6], [-0.2, 0.1]])
  np.testing.assert_array_equal(cb.nearest_codes(z, book), [1, 2, 0])


# --- the method, export and reload -----------------------------------------------------------


def test_codes_are_stable_after_export_and_reload(tmp_path):
  c = tiny_tokenizer_config()
  method = registry.build_method(c)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  params, extra = method.init(jax.random.key(0), images)
  tok = {"params": params, "codebook": extra["codebook"]}
  codes = tokenizers_models.tokenize(method.model, tok, images, l2=True)
  assert codes.shape == (4, 16) and codes.dtype == jnp.int32
  np.testing.assert_array_equal(
      codes, tokenizers_models.tokenize(method.model, tok, images, l2=True))
  method.export(str(tmp_path), jax.device_get(params), jax.device_get(extra), {})
  loaded, info = io.load_tokenizer(str(tmp_path))  # a workdir: finds tokenizer/
  assert (info["vocab_size"], info["grid"], info["patch_size"], info["channels"]) == (
      16, [4, 4], 4, 3)
  np.testing.assert_array_equal(
      codes, tokenizers_models.tokenize(method.model, loaded, images, l2=True))
  _, again = io.load_tokenizer(str(tmp_path / "tokenizer"))  # the export directory itself
  assert again == info


def test_code_usage_over_a_split_counts_every_token_once(tmp_path):
  from mim_jax import data
  from mim_jax.tokenizers import usage
  c = tiny_tokenizer_config(**{"data.synthetic_size": 37})
  method = registry.build_method(c)
  params, extra = method.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  method.export(str(tmp_path), jax.device_get(params), jax.device_get(extra), {})
  # Batches of 10 over 37 images: the last batch's padding rows must not be counted.
  out = usage.code_usage(str(tmp_path), c.data, split="train", batch_size=10)
  images = next(data.make_eval_iterator(c.data, image_size=(16, 16), channels=3, batch_size=37,
                                        split="train"))["image"]
  tokenizer = {"params": params, "codebook": extra["codebook"]}
  codes = np.asarray(tokenizers_models.tokenize(method.model, tokenizer, jnp.asarray(images),
                                                l2=True))
  counts = np.bincount(codes.reshape(-1), minlength=16)
  p = counts[counts > 0] / counts.sum()
  assert out["tokens"] == 37 * 16 and out["vocab_size"] == 16
  assert out["codes_used"] == int((counts > 0).sum())
  np.testing.assert_allclose(out["perplexity"], np.exp(-np.sum(p * np.log(p))), rtol=1e-6)
  # The tokenizer's normalisation, not the config's: another data.mean counts the same codes,
  # while images normalised with it would give other ones.
  other = c.data.copy_and_resolve_references()
  other.mean = (0.9, 0.1, 0.5)
  assert usage.code_usage(str(tmp_path), other, split="train", batch_size=10) == out
  shifted = next(data.make_eval_iterator(other, image_size=(16, 16), channels=3, batch_size=37,
                                         split="train"))["image"]
  assert not np.array_equal(codes, np.asarray(tokenizers_models.tokenize(
      method.model, tokenizer, jnp.asarray(shifted), l2=True)))
  # A held-out split of a config that holds nothing out was read as no images and reported
  # as tokens=0, usage 0: the trainer's check names it before anything is read.
  with pytest.raises(ConfigError, match=r"split 'holdout' is the training images data.holdout "
                     r"holds out, and config.data.holdout is 0"):
    usage.code_usage(str(tmp_path), c.data, split="holdout", batch_size=10)
  # An export without its weights (only the JSON copied) is named by the tool's flag, after the
  # data's checks (it was a FileNotFoundError's traceback, before them).
  shutil.rmtree(os.path.join(io.tokenizer_directory(str(tmp_path)), io.WEIGHTS_DIR))
  with pytest.raises(ConfigError, match=r"--tokenizer=.* is invalid: a tokenizer export holding "
                     r"its weights/ beside tokenizer.json.*then pass --tokenizer=DIR"):
    usage.code_usage(str(tmp_path), c.data, split="train", batch_size=10, field="--tokenizer")


def _usage_refusal(flags_, monkeypatch, capsys) -> str:
  """What `python -m mim_jax.tokenizers.usage --config=configs/beit_tokenizer_fmnist.py
  --tokenizer=/nonexistent FLAGS` prints on stderr exiting with code 2, run in this process as
  the program runs it (its parser, then `run`)."""
  from mim_jax.tokenizers import usage
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as exit_:
    usage.run(tool_flags(usage, ["--config=configs/beit_tokenizer_fmnist.py",
                                 "--tokenizer=/nonexistent", *flags_], monkeypatch))
  assert exit_.value.code == 2
  return capsys.readouterr().err


def test_code_usage_refuses_config_overrides_it_would_not_read(monkeypatch, capsys):
  """The tool reads data.* and takes image size, channels and normalisation from the
  tokenizer: --config.image_size or --config.data.mean would do nothing (they were accepted).
  Refused by name with exit 2 before anything is read; data fields pass. (In this process; the
  first case also as the program.)"""
  done = subprocess.run(
      [sys.executable, "-m", "mim_jax.tokenizers.usage",
       "--config=configs/beit_tokenizer_fmnist.py", "--tokenizer=/nonexistent",
       "--config.image_size=(32,32)"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 2 and "error: config.image_size=" in done.stderr, done.stderr
  assert "Traceback" not in done.stderr
  for flag, field in (("--config.image_size=(32,32)", "image_size"),
                      ("--config.data.mean=(0.5,)", "data.mean"),
                      ("--config.data.hflip=False", "data.hflip"),
                      ("--config.data.label_fraction=0.5", "data.label_fraction")):
    err = _usage_refusal((flag,), monkeypatch, capsys)
    assert f"error: config.{field}=" in err
    assert "is not read by mim_jax.tokenizers.usage" in err
  # Flags of its own that would fail late or read nothing: one line, before the tokenizer.
  for flags_, says in ((("--batch_size=0",), "--batch_size=0 is invalid: a positive number"),
                       (("--split=test", "--config.data.source=synthetic"),
                        "--split='test' is invalid: left out, or 'holdout'"),
                       (("--split=test", "--config.data.eval_split=holdout"),
                        "--split='test' is invalid: left out beside "
                        "--config.data.eval_split='holdout'"),
                       (("--config.data.pth=/x",), "config.data.pth does not exist: did you "
                        "mean config.data.path"),
                       (("--config.data.tfds_name=foo",), "config.data.tfds_name='foo' is not "
                        "used: only data.source='tfds' reads it")):
    err = _usage_refusal(flags_, monkeypatch, capsys)
    assert err.startswith(f"error: {says}"), err
  # A data override is the tool's business: accepted, and the missing tokenizer named by flag.
  err = _usage_refusal(("--config.data.split=test",), monkeypatch, capsys)
  assert "error: --tokenizer='/nonexistent' is invalid: an existing tokenizer workdir" in err, err
  assert "then pass --tokenizer=DIR" in err  # the tool's flag, not the config field


@pytest.mark.parametrize("codebook", [{}, {"tokenizer.codebook_update": "norm_ema",
                                             "tokenizer.kmeans_init": 2}],
                         ids=["ema_sums", "norm_ema_kmeans"])
def test_training_updates_codebook_in_extra_and_resumes_exactly(tmp_path, caplog, codebook):
  straight = train.run(tiny_tokenizer_config(**codebook), str(tmp_path / "a"))
  train.run(tiny_tokenizer_config(total_steps=2, **codebook), str(tmp_path / "b"))
  with caplog.at_level(logging.INFO, logger=train.__name__):
    resumed = train.run(tiny_tokenizer_config(**codebook), str(tmp_path / "b"))
  assert "at step 2" in caplog.text  # resumed (a restart with the same seed ends alike)
  for key in ("codebook", "cluster_size", "embed_sum", "unused_steps", *straight.extra.keys()
              & {cb.INITTED}):
    np.testing.assert_array_equal(straight.extra[key], resumed.extra[key])
  jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
  fresh = cb.init_state(jax.random.key(0), 16, 8, True)
  assert not np.allclose(straight.extra["cluster_size"], fresh["cluster_size"])
  with open(tmp_path / "a" / "tokenizer" / "tokenizer.json") as f:
    assert json.load(f)["kind"] == "vq"
  rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
  assert {"recon_loss", "commit_loss", "codebook_usage", "perplexity"} <= set(rows[-1])


@pytest.mark.parametrize("field,value,match", [
    ("tokenizer.decay", 1.0, "tokenizer.decay=1.0"),
    ("tokenizer.vocab_size", 1, "tokenizer.vocab_size=1"),
    ("tokenizer.restart_after", -1, "tokenizer.restart_after=-1"),
    ("tokenizer.codebook_update", "norm", "tokenizer.codebook_update='norm'.*ema_sums"),
    ("tokenizer.kmeans_init", -1, "tokenizer.kmeans_init=-1")])
def test_bad_tokenizer_fields_are_rejected(field, value, match):
  with pytest.raises(ConfigError, match=match):
    tiny_tokenizer_config(**{field: value})


def test_norm_ema_needs_unit_codes_and_reads_no_smoothing():
  with pytest.raises(ConfigError, match="codebook_update='norm_ema'.*l2_normalize=False"):
    tiny_tokenizer_config(**{"tokenizer.codebook_update": "norm_ema",
                             "tokenizer.l2_normalize": False})
  with pytest.raises(ConfigError, match="config.tokenizer.eps=0.001 is not used"):
    tiny_tokenizer_config(**{"tokenizer.codebook_update": "norm_ema", "tokenizer.eps": 1e-3})


@requires_fmnist
def test_short_run_on_fashion_mnist_lowers_reconstruction_loss(tmp_path):
  from ml_collections import config_flags
  c = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      "config", str(REPO / "configs" / "beit_tokenizer_fmnist.py")).get_config()
  c.update(total_steps=40, log_every=10, viz_every=0, global_batch_size=128)
  c.tokenizer.update(width=32)
  c.optimizer.update(base_lr=2e-3, warmup_epochs=0.02)  # peak 1e-3 after 10 steps
  train.run(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  first, last = rows[0], rows[-1]
  assert last["recon_loss"] < 0.6 * first["recon_loss"], (first, last)
  assert last["codebook_usage"] > 0.1 and last["perplexity"] > 10
  assert os.path.isfile(tmp_path / "tokenizer" / "tokenizer.json")


# --- the dVAE -------------------------------------------------------------------------------


def test_dvae_kl_to_uniform_and_temperature_schedule():
  from mim_jax.methods.base import TrainLength
  from mim_jax.tokenizers.dvae import kl_to_uniform
  assert float(kl_to_uniform(jnp.zeros((2, 3, 8)))) == pytest.approx(0.0, abs=1e-6)
  q = np.array([0.7, 0.2, 0.1])
  logits = jnp.asarray(np.log(q))[None]
  assert float(kl_to_uniform(logits)) == pytest.approx(float(np.sum(q * np.log(3 * q))), rel=1e-5)
  c = tiny_tokenizer_config(method="dvae_tokenizer", **{"tokenizer.temp_anneal_fraction": 0.5})
  method = registry.build_method(c, TrainLength(steps_per_epoch=8, schedule_steps=100))
  assert float(method.temperature(0)) == pytest.approx(1.0)
  assert float(method.temperature(50)) == pytest.approx(1 / 16)
  assert float(method.temperature(90)) == pytest.approx(1 / 16)
  assert 1 / 16 < float(method.temperature(25)) < 1.0


def test_dvae_trains_exports_and_feeds_beit(tmp_path):
  from mim_jax.tokenizers.models import tokenizer_model
  c = tiny_tokenizer_config(method="dvae_tokenizer")
  state = train.run(c, str(tmp_path / "dvae"))
  assert int(state.extra["step"]) == 4  # the annealing clock follows the updates
  tok, info = io.load_tokenizer(str(tmp_path / "dvae"))
  assert (info["kind"], info["vocab_size"]) == ("dvae", 16)
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  model = tokenizer_model(info)
  logits = model.apply({"params": tok["params"]}, images, method=model.encode)
  codes = tokenizers_models.tokenize(model, tok, images, l2=False, kind="dvae")
  np.testing.assert_array_equal(codes, np.argmax(logits, -1).reshape(2, -1))
  b = tiny_mae_config(method="beit")
  b.masking.update(kind="blockwise", ratio=0.4, min_block=2)
  b.tokenizer.update(vocab_size=16, path=str(tmp_path / "dvae"))
  registry.validate_config(b)
  beit = registry.build_method(b)
  params, extra = beit.init(jax.random.key(0), images)
  _, extra = beit.load_pretrained(params, jax.device_get(extra))
  np.testing.assert_array_equal(beit.targets(extra, images), codes)
  # The placeholder the checkpoint is restored onto has the tokenizer's shapes (its decoder
  # reads code vectors, not the V logits): a BEiT run on a dVAE resumes.
  for name, s in jax.tree_util.tree_leaves_with_path(
      jax.eval_shape(beit.target.init_extra)["params"]):
    want = tok["params"]
    for k in name:
      want = want[k.key]
    assert s.shape == want.shape, (name, s.shape, want.shape)
  workdir = str(tmp_path / "beit")
  fields = {"masking.kind": "blockwise", "masking.ratio": 0.4, "masking.min_block": 2,
            "tokenizer.vocab_size": 16, "tokenizer.path": str(tmp_path / "dvae")}
  train.run(tiny_mae_config(method="beit", total_steps=1, **fields), workdir)
  assert int(train.run(tiny_mae_config(method="beit", total_steps=2, **fields), workdir).step) == 2
