"""Frozen-feature evaluations: features computed once, then k-NN and a converged linear probe.

  FeatureExtractor(config)   features of whole splits: {"cls", "gap"} of
                             `classifier.probe_layer` from one encoder pass ({"pixels"} for
                             the raw-pixel baseline; "cls_block<k>", ... for several blocks;
                             "dino", DINO's concatenated last blocks, with probe.last_blocks)
  KnnMonitor(config)         callable: encoder params -> k-NN scores of every pool (the `knn`
                             job, and k-NN during pre-training)
  run_knn(config, workdir)   method "knn": weighted k-NN (DINO: k = 20, T = 0.07)
  run_probe(config, workdir) method "probe": k-NN plus multinomial logistic regression on
                             standardised cached features (evaluate/logistic.py), its L2
                             strength (and with `probe.select_layer`, the block) chosen on
                             `data.holdout` training examples; the feature sets are fitted
                             together on a GPU, one after another elsewhere
                             (`probe.fit_sets`)

Protocol. The bank / training rows are the training split as training reads it
(`data.label_fraction` applies); images are resized / centre-cropped, never augmented. Scored
rows are `data.eval_split` ("holdout": the held-out training examples, which then leave the
bank). The probe picks its L2 strength by fitting on the training rows without the holdout
and scoring the holdout, then refits on all training rows and scores the evaluation split
once (with `data.label_fraction` < 1, on the labelled rows alone: the holdout's labels only
choose). With `probe.select_layer` it does so for the encoder output and every block (one encoder
pass gives them all) and keeps, per pool, the block and strength with the best held-out score
(BEiT and data2vec report their probes at the best block: MIM features are often most
linear in the middle of the encoder); the k-NN row of that pool uses the same block. Every
number is reported per pool: `knn_top1_cls`, `knn_top1_gap`, `probe_top1_cls`, ...
(`*_pixels` for the baseline).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mim_jax import data, storage
from mim_jax.config import validation as v
from mim_jax.config.errors import ConfigError, config_error
from mim_jax.data import sources
from mim_jax.evaluate import classifier_base, knn, logistic
from mim_jax.methods import base
from mim_jax.models import flops
from mim_jax.models.heads import last_blocks_features, pool_tokens
from mim_jax.models.vit import block_output, encoder_from_config, size_from_config
from mim_jax.training import checkpoint, compiler_options, metric_writers
from mim_jax.weights import pretrained

log = logging.getLogger(__name__)

ENCODER_POOLS = ("cls", "gap")
DINO_SET = "dino"  # probe.last_blocks: DINO / iBOT's linear-evaluation features
FIT_SETS = ("auto", "together", "one_by_one")


def _local_copy(params):
  """Numpy values of parameters that may span processes, on every process (a collective)."""
  def to_numpy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(to_numpy, params)


class FeatureExtractor:
  """Features of whole splits, in source order, on every process."""

  def __init__(self, config, *, pixels: bool = False, layer: int = 0,
               layers: tuple[int, ...] | None = None, last_blocks: int = 0,
               with_gap: bool = False):
    """Features of `config`'s encoder (`pixels`: of the raw pixels instead) at block `layer`
    (0: the encoder output), named by pool; or at each of `layers`, named
    "<pool>_block<k>" (features.extract's names). `last_blocks` > 0 adds the set "dino":
    DINO's linear-evaluation features (heads.last_blocks_features, `with_gap` its mean patch
    token)."""
    self.config = config
    self.pixels = pixels
    self.layers = (layer,) if layers is None else tuple(layers)
    if self.pixels:
      self.pools = ("pixels",)
    elif layers is None:
      self.pools = ENCODER_POOLS
    else:
      self.pools = tuple(f"{p}_block{k}" for k in self.layers for p in ENCODER_POOLS)
    if last_blocks and not pixels:
      self.pools += (DINO_SET,)
    # A pre-training run's own encoder has fixed sin-cos positions; a job's, its export's.
    posemb = pretrained.encoder_posemb(config.init_from) if "classifier" in config else "sincos"
    self.encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                       posemb=posemb)
    # Each set's width, in the order of self.pools: the rows are their concatenation.
    width = (int(np.prod(config.image_size)) * config.channels if pixels
             else self.encoder.width)
    self.widths = tuple((last_blocks + with_gap) * width if p == DINO_SET else width
                        for p in self.pools)

    def features(params, images):
      """images [B, H, W, C] -> [B, sum(self.widths)]: the sets of `self.pools`, side by
      side."""
      if self.pixels:
        return images.reshape(images.shape[0], -1).astype(jnp.float32)
      output, aux = self.encoder.apply({"params": params}, images, train=False)
      rows = []
      for k in self.layers:
        tokens = block_output(output, aux, k)
        rows += [pool_tokens(tokens, p).astype(jnp.float32) for p in ENCODER_POOLS]
      if last_blocks:
        rows.append(last_blocks_features(aux["blocks"], params, last=last_blocks,
                                         with_gap=with_gap, dtype=self.encoder.dtype))
      return jnp.concatenate(rows, 1)

    self._features = compiler_options.jit(config, features)

  def split(self, params, split: str, rows: np.ndarray | None = None
            ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({pool: float32 [N, D]}, labels int32 [N]) of a whole split, or of its `rows` (int
    positions, in that order); images that failed to decode (data.on_bad_image="skip") are
    left out."""
    count = jax.process_count()
    batch_size = self.config.eval.batch_size // count
    it = data.make_eval_iterator(self.config.data, image_size=tuple(self.config.image_size),
                                 channels=self.config.channels, batch_size=batch_size,
                                 split=split, rows=rows)
    devices = jax.local_devices()
    if count == 1 and len(devices) > 1 and batch_size % len(devices) == 0:
      # One process with several devices (a data-parallel run: GPUs of one host, or one CPU
      # device per core): each batch split across them, the parameters replicated. On 2 CPU
      # cores the Fashion-MNIST k-NN monitor took 67.6 instead of 71.5 s (docs/benchmarks.md);
      # on N accelerators the pass is split N ways instead of running on one.
      # One process: every array is addressable, so the parameters (replicated over the same
      # devices in a data-parallel run, or FSDP-sharded) are resharded without a host copy.
      mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
      params = jax.device_put(params, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec()))
      rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
      feats, labels = knn.extract_features(
          lambda images: self._features(params, jax.device_put(images, rows_sharding)), it,
          jit=False)
    elif count == 1:
      if len(devices) > 1:
        # A batch the devices cannot split evenly: one copy on one device does the pass once
        # (with unsharded images, replicated parameters would run it on every device).
        params = jax.device_put(_local_copy(params), devices[0])
      feats, labels = knn.extract_features(lambda images: self._features(params, images), it,
                                           jit=False)
    else:
      # Parameters that span processes: one copy on one device of each process.
      params = jax.device_put(_local_copy(params), devices[0])
      # Every process holds rows p, p + P, ... of the split, padded to the same number of
      # batches; gather the padded arrays, interleave them back into source order.
      parts = ([], [], [])
      for batch in it:
        parts[0].append(np.asarray(self._features(params, batch["image"]), np.float32))
        parts[1].append(np.asarray(batch["label"], np.int32))
        parts[2].append(np.asarray(batch["mask"], bool))
      if not parts[0]:  # no rows at all
        return self._checked_empty(split, rows)
      gathered = multihost_utils.process_allgather(tuple(np.concatenate(p) for p in parts))
      feats, labels, mask = (np.swapaxes(np.asarray(g), 0, 1).reshape(-1, *g.shape[2:])
                             for g in gathered)
      feats, labels = feats[mask], labels[mask]
    if not len(labels):
      return self._checked_empty(split, rows)
    sets = np.split(feats, np.cumsum(self.widths)[:-1], axis=1)
    return dict(zip(self.pools, sets)), labels

  def _checked_empty(self, split: str, rows: np.ndarray | None
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """No features: fine when no rows were asked for, else every image failed to decode."""
    if rows is None or len(rows):
      asked = f"split {split!r}" if rows is None else f"the {len(rows)} rows of split {split!r}"
      raise data.BadImageError(
          f"none of the images of {asked} read here could be decoded, and features need at "
          f"least one (data.on_bad_image={self.config.data.on_bad_image!r} leaves undecodable "
          "images out; the warnings above name them)")
    return {p: np.zeros((0, 0), np.float32) for p in self.pools}, np.zeros(0, np.int32)

  def training_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout): sorted positions in the training split of the rows training reads
    (no holdout, the `data.label_fraction` subset) and of the `data.holdout` examples. Only
    these are encoded: a 1%-label probe reads 1% of the training images."""
    cfg = self.config
    labels = data.build_source(cfg.data, image_size=tuple(cfg.image_size),
                               channels=cfg.channels).labels()
    return sources.train_indices(cfg.data, labels), sources.holdout_indices(cfg.data, labels)


def job_extractor(config) -> FeatureExtractor:
  """The features a job's `config.classifier` asks for (every block with the probe's
  `probe.select_layer`)."""
  c, probe = config.classifier, config.get("probe", {})
  dino = dict(last_blocks=int(probe.get("last_blocks", 0)),
              with_gap=bool(probe.get("last_blocks_gap", False)))
  if selects_layer(config):
    return FeatureExtractor(config, layers=candidate_layers(config), **dino)
  return FeatureExtractor(config, pixels=c.features == "pixels", layer=int(c.probe_layer),
                          **dino)


def selects_layer(config) -> bool:
  """Whether the job chooses the block on the held-out split (the probe, on an encoder)."""
  return bool(config.get("probe", {}).get("select_layer")) and (
      config.classifier.features != "pixels")


def candidate_layers(config) -> tuple[int, ...]:
  """The blocks `probe.select_layer` chooses from: 0 (the encoder output), 1, ..., depth."""
  return tuple(range(size_from_config(config.model)[0].depth + 1))


def check_bank_size(config, bank_size: int) -> None:
  """ConfigError for a knn.k beyond the `bank_size` training images of the k-NN bank."""
  if config.knn.k > bank_size:
    raise config_error("knn.k", config.knn.k, f"at most the {bank_size} training images of "
                       "the k-NN bank (the official protocol: 20)")


class KnnMonitor:
  """Callable: encoder params -> {"knn_top1_<pool>", "knn_top5_<pool>"} on data.eval_split.

  During pre-training it scores the encoder output; the k-NN job passes its own extractor.
  """

  def __init__(self, config, extractor: FeatureExtractor | None = None):
    self.config = config
    self.extractor = extractor or FeatureExtractor(config)
    self.encoder = self.extractor.encoder
    self.num_classes = classifier_base.num_classes(config)
    self._bank_rows = None

  @property
  def bank_rows(self) -> np.ndarray:
    """Positions in the training split of the bank's images (read once)."""
    if self._bank_rows is None:
      self._bank_rows = self.extractor.training_rows()[0]
    return self._bank_rows

  def check_bank(self) -> None:
    """ConfigError for a knn.k beyond the bank: each query would vote with every image, at the
    cost of sorting k of them. Callers ask before the first evaluation (a monitor's comes
    after epochs of training)."""
    check_bank_size(self.config, len(self.bank_rows))

  def __call__(self, encoder_params) -> dict[str, float]:
    start = time.perf_counter()
    cfg, ex = self.config, self.extractor
    bank, bank_labels = ex.split(encoder_params, cfg.data.split, self.bank_rows)
    queries, query_labels = ex.split(encoder_params, data.eval_split(cfg.data))
    out = {}
    for pool in ex.pools:
      acc = knn.knn_accuracy(bank[pool], bank_labels, queries[pool], query_labels,
                             num_classes=self.num_classes, k=cfg.knn.k,
                             temperature=cfg.knn.temperature,
                             compiler_options=compiler_options.of(cfg))
      out.update({f"knn_{k}_{pool}": v for k, v in acc.items()})
    log.info("k-NN (k=%d, T=%g): bank %d, queries %d (%s), %s in %.1fs", cfg.knn.k,
             cfg.knn.temperature, len(bank_labels), len(query_labels), data.eval_split(cfg.data),
             ", ".join(f"{k} {v:.4f}" for k, v in out.items()), time.perf_counter() - start)
    return out


def _encoder_params(config):
  """The parameters the job scores: {} for pixels, a seeded random encoder, or the export."""
  if config.classifier.features == "pixels":
    return {}
  if config.init_from == pretrained.RANDOM:
    image = jnp.zeros((1, *config.image_size, config.channels))
    encoder = encoder_from_config(config.model, config.image_size, config.channels)
    # The key the loop's linear probe gives its random encoder (train.run's init key, then
    # the method's encoder key), so every baseline scores the same encoder.
    init_rng = jax.random.split(jax.random.key(config.seed))[0]
    return encoder.init(jax.random.split(init_rng)[0], image)["params"]
  # Into the job's encoder at config.image_size: a learned position table (a fine-tuned
  # export) is resized to the job's patch grid, as the loop's classifiers and features do.
  encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                posemb=pretrained.encoder_posemb(config.init_from))
  return pretrained.encoder_params_for(encoder, config.init_from, config.image_size,
                                       config.channels)


def _start(config, workdir: str):
  """`config` comes prepared (its encoder adopted from init_from and validated:
  `registry.prepare`, which training.loop.run calls before it runs a job)."""
  checkpoint.ensure_writable(workdir)
  compiler_options.check(config)
  # A head too small would fail in the scoring, after every feature.
  classifier_base.check_num_classes(config)
  return config


def _finish(config, workdir: str, metrics: dict) -> dict:
  writer = metric_writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write_scalars(0, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
  writer.close()
  if jax.process_index() == 0:
    storage.write_text(os.path.join(workdir, "results.json"), json.dumps(
        {"method": config.method, "init_from": config.init_from,
         "features": config.classifier.features,
         **({"probe_layers": list(candidate_layers(config))} if selects_layer(config) else
            {"probe_layer": int(config.classifier.probe_layer)}),
         "eval_split": data.eval_split(config.data), "k": config.knn.k,
         "temperature": config.knn.temperature, **metrics}, indent=2))
  return metrics


def run_knn(config, workdir: str) -> dict[str, float]:
  """The k-NN job (method "knn"): scores the encoder of `config.init_from`."""
  config = _start(config, workdir)
  start = time.perf_counter()
  monitor = KnnMonitor(config, job_extractor(config))
  monitor.check_bank()  # before the encoder's features
  metrics = monitor(_encoder_params(config))
  metrics["seconds"] = time.perf_counter() - start
  return _finish(config, workdir, metrics)


def fits_together(config, extractor: FeatureExtractor) -> bool:
  """`probe.fit_sets`: whether the probe fits its feature sets (pools x blocks), when it has
  more than one, as one program per L2 strength ("together") or one after another
  ("one_by_one"); "auto": together on a GPU, whose time per fit is host round trips (XLA:GPU
  reads each loop condition on the host), one by one on a CPU, whose time is arithmetic, and
  on a TPU, which runs loops on the device (evaluate/logistic.py)."""
  mode = config.probe.fit_sets
  return len(extractor.pools) > 1 and (
      mode == "together" or (mode == "auto" and jax.default_backend() == "gpu"))


def _select_all(train_feats: dict, train_labels, hold_feats: dict, hold_labels, names,
                num_classes, grid, fit_kwargs, together: bool) -> dict[str, logistic.Selection]:
  """{name: the L2 strength fitted on the training rows of feature set `name` and chosen on the
  held-out rows (both standardised with the training rows' statistics)}. One by one, each set
  is standardised just before its fits (one set's copy in memory at a time); together, all of
  them into one [K, N, D] array (`check_feature_memory` counts it)."""
  def standardized(name):
    mean, scale = logistic.standardizer(train_feats[name])
    return (train_feats[name] - mean) * scale, (hold_feats[name] - mean) * scale

  if not together:
    return {name: logistic.select_l2_many([x], train_labels, [x_val], hold_labels,
                                          num_classes, grid, names=[name], **fit_kwargs)[0]
            for name in names for x, x_val in [standardized(name)]}
  out = {}
  # One program per width: DINO's concatenated set is wider than the pools.
  for width in dict.fromkeys(train_feats[name].shape[1] for name in names):
    group = [name for name in names if train_feats[name].shape[1] == width]
    xs = np.empty((len(group), *train_feats[group[0]].shape), np.float32)
    xs_val = np.empty((len(group), *hold_feats[group[0]].shape), np.float32)
    for i, name in enumerate(group):
      xs[i], xs_val[i] = standardized(name)
    out.update(zip(group, logistic.select_l2_many(
        xs, train_labels, xs_val, hold_labels, num_classes, grid, together=True, names=group,
        **fit_kwargs)))
  return {name: out[name] for name in names}


def _refit(train, val, test, num_classes, chosen: logistic.Selection, fit_kwargs):
  """(test top-1, FitInfo): refit with the chosen strength on train + val (`val` None: on
  train alone), warm-started from the selection's fit, scored on test."""
  all_x = train[0] if val is None else np.concatenate([train[0], val[0]])
  all_y = train[1] if val is None else np.concatenate([train[1], val[1]])
  mean, scale = logistic.standardizer(all_x)
  params, info = logistic.fit((all_x - mean) * scale, all_y,
                              num_classes, chosen.l2, init=chosen.params, **fit_kwargs)
  return logistic.accuracy(params, (test[0] - mean) * scale, test[1]), info


def choose_layer(selections: dict[int, logistic.Selection]) -> int:
  """The block whose best L2 strength scores highest on the held-out rows; ties go to the
  lowest block index (0, the encoder output, first)."""
  return max(selections, key=lambda k: (max(selections[k].scores.values()), -k))


def check_feature_memory(extractor: FeatureExtractor, rows: int,
                         standardized_rows: int = 0) -> None:
  """Raises ConfigError before any encoding when the cached features of `rows` images (every
  name of `extractor.pools`, float32, on every process after the gather), plus the
  standardised copy of `standardized_rows` of them that fitting the sets together makes,
  would not fit in 80% of this host's memory (e.g. probe.select_layer on ImageNet)."""
  width = sum(extractor.widths)  # every set side by side
  need = (rows + standardized_rows) * width * 4
  try:
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return  # no way to know here
  if need > 0.8 * have:
    what = (f"{len(extractor.layers)} blocks x {len(ENCODER_POOLS)} pools (probe.select_layer"
            "=True)" if len(extractor.pools) > 2 else f"{len(extractor.pools)} pool(s)")
    copy = (f" (plus a standardised copy of {standardized_rows:,} of them, to fit the sets "
            "together: probe.fit_sets='one_by_one' fits one at a time)"
            if standardized_rows else "")
    raise ConfigError(
        f"the probe caches {rows:,} images x {what} x {width} float32 features{copy}: "
        f"{need / 2**30:.1f} GiB, more than 80% of this host's {have / 2**30:.1f} GiB. Use "
        "data.label_fraction < 1, or probe.select_layer=False with classifier.probe_layer=k "
        "(one block)")


def run_probe(config, workdir: str) -> dict:
  """The probe job (method "probe"): k-NN and the converged logistic probe of every pool."""
  config = _start(config, workdir)
  start = time.perf_counter()
  cfg = config
  ex = job_extractor(cfg)
  params = _encoder_params(cfg)
  rows, holdout = ex.training_rows()
  # Its k-NN bank (below): every training row, the holdout too unless labels are a subset.
  check_bank_size(cfg, len(rows) + (0 if float(cfg.data.label_fraction) < 1.0 else len(holdout)))
  test_rows = len(data.build_source(cfg.data, image_size=tuple(cfg.image_size),
                                    channels=cfg.channels, split=data.eval_split(cfg.data)))
  together = fits_together(cfg, ex)
  check_feature_memory(ex, len(rows) + len(holdout) + test_rows,
                       standardized_rows=len(rows) + len(holdout) if together else 0)
  train_feats, train_labels = ex.split(params, cfg.data.split, rows)
  hold_feats, hold_labels = ex.split(params, cfg.data.split, holdout)
  test_feats, test_labels = ex.split(params, data.eval_split(cfg.data))
  num_classes = classifier_base.num_classes(cfg)
  fit_kwargs = dict(max_iter=int(cfg.probe.max_iter), tol=float(cfg.probe.tol),
                    compiler_options=compiler_options.of(cfg))
  grid = tuple(cfg.probe.l2_grid)
  # Feature name of every (pool, block): one block per pool unless the block is chosen.
  if selects_layer(cfg):
    named = {p: {k: f"{p}_block{k}" for k in ex.layers} for p in ENCODER_POOLS}
    if DINO_SET in ex.pools:  # its blocks are fixed: the last ones
      named[DINO_SET] = {0: DINO_SET}
  else:
    named = {p: {int(cfg.classifier.probe_layer): p} for p in ex.pools}
  metrics: dict = {}
  # The k-NN bank, like the probe's final fit, uses every training row, holdout included; with
  # data.label_fraction < 1 only the labelled rows: the holdout's labels choose the L2 strength
  # (and block) and nothing else, so a 1%-label probe is fitted on 1% of the labels (it was
  # fitted on them plus the 5,000 held-out ones), at the size its L2 was chosen for.
  low_label = float(cfg.data.label_fraction) < 1.0
  all_labels = train_labels if low_label else np.concatenate([train_labels, hold_labels])
  by_name = _select_all(train_feats, train_labels, hold_feats, hold_labels,
                        [name for blocks in named.values() for name in blocks.values()],
                        num_classes, grid, fit_kwargs, together)
  for pool, blocks in named.items():
    selections = {k: by_name[name] for k, name in blocks.items()}
    layer = choose_layer(selections)
    chosen, name = selections[layer], blocks[layer]
    if not chosen.converged[chosen.l2]:
      log.warning("%s: the chosen fit (block %d, L2 %g) stopped at probe.max_iter=%d before "
                  "its gradient norm reached probe.tol: its held-out score, and so the choice, "
                  "may move with a larger max_iter", pool, layer, chosen.l2,
                  fit_kwargs["max_iter"])
    top1, info = _refit((train_feats[name], train_labels),
                        None if low_label else (hold_feats[name], hold_labels),
                        (test_feats[name], test_labels), num_classes, chosen, fit_kwargs)
    bank = (train_feats[name] if low_label
            else np.concatenate([train_feats[name], hold_feats[name]]))
    acc = knn.knn_accuracy(bank, all_labels, test_feats[name], test_labels,
                           num_classes=num_classes, k=cfg.knn.k, temperature=cfg.knn.temperature,
                           compiler_options=compiler_options.of(cfg))
    metrics.update({f"knn_{k}_{pool}": v for k, v in acc.items()})
    metrics.update({f"probe_top1_{pool}": top1, f"probe_l2_{pool}": chosen.l2,
                    f"probe_holdout_top1_{pool}": {f"{k:g}": v for k, v in chosen.scores.items()},
                    f"probe_holdout_converged_{pool}": {
                        f"{k:g}": v for k, v in chosen.converged.items()},
                    f"probe_iterations_{pool}": info.iterations,
                    f"probe_converged_{pool}": info.converged})
    if len(blocks) > 1:
      by_layer = {str(k): max(sel.scores.values()) for k, sel in selections.items()}
      metrics[f"probe_layer_{pool}"] = layer
      metrics[f"probe_holdout_by_layer_{pool}"] = by_layer
      log.info("%s: block %d chosen (held-out best per block: %s)", pool, layer, by_layer)
    log.info("%s: k-NN %.4f, probe %.4f (L2 %g chosen on %d held-out examples: %s; final fit "
             "%d L-BFGS iterations, |grad| %.2e)", pool, acc["top1"], top1, chosen.l2,
             len(hold_labels), ", ".join(f"{k:g} {v:.4f}" for k, v in chosen.scores.items()),
             info.iterations, info.grad_norm)
  metrics["seconds"] = time.perf_counter() - start
  metrics["num_train"], metrics["num_holdout"] = len(all_labels), len(hold_labels)
  return _finish(cfg, workdir, metrics)


class KnnJob(base.Job):
  """Method "knn": weighted k-NN on frozen features of every pool (module docstring)."""

  name = "knn"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    classifier_base.add_classifier_config(c, features=None, probe_layer=None)
    c.knn = ml_collections.ConfigDict(dict(k=20, temperature=0.07))

  @classmethod
  def validate(cls, config):
    v.validate_classifier(config)
    v.validate_knn(config)

  @classmethod
  def forward_flops(cls, config):
    encoder = (0.0 if config.classifier.features == "pixels" else
               flops.encoder_flops(config.model, config.image_size, config.channels))
    return {"encoder": encoder, "total": encoder}

  @classmethod
  def run(cls, config, workdir):
    return run_knn(config, workdir)


class ProbeJob(KnnJob):
  """Method "probe": k-NN and the converged logistic probe on the same cached features."""

  name = "probe"

  @classmethod
  def add_config(cls, c):
    super().add_config(c)
    # Multinomial logistic regression on standardised cached features (evaluate/logistic.py),
    # its L2 strength chosen from l2_grid on data.holdout examples; L-BFGS until the gradient
    # norm is below tol (or max_iter iterations).
    # select_layer: choose, per pool, the block (0: the output, 1..depth) on the holdout too,
    # instead of reading classifier.probe_layer.
    # fit_sets: "together" fits every feature set (pool, block) as one program per strength,
    # "one_by_one" one after another, "auto" together on a GPU only (fits_together).
    # last_blocks > 0 adds the feature set "dino", DINO / iBOT's linear-evaluation protocol:
    # the cls tokens of the last `last_blocks` blocks through the final LayerNorm,
    # concatenated (DINO ViT-S/16: 4), and with last_blocks_gap the mean patch token of the
    # last block (ViT-B/16: 1 block and the mean).
    c.probe = ml_collections.ConfigDict(dict(l2_grid=logistic.DEFAULT_L2_GRID, max_iter=3000,
                                             tol=1e-4, select_layer=False, fit_sets="auto",
                                             last_blocks=0, last_blocks_gap=False))
    c.data.holdout = 5000

  @classmethod
  def validate(cls, config):
    super().validate(config)
    p = config.probe
    grid = tuple(p.l2_grid) if isinstance(p.l2_grid, (tuple, list)) else ()
    v.require(len(grid) > 0 and all(v.is_number(x) and x >= 0 for x in grid), "probe.l2_grid",
              p.l2_grid, "a non-empty tuple of L2 strengths >= 0, e.g. (1e-2, 1e-3, 1e-4)")
    v.positive_int(config, "probe.max_iter")
    v.require(v.is_number(p.tol) and p.tol > 0, "probe.tol", p.tol, "a positive gradient norm")
    v.require(isinstance(p.select_layer, bool), "probe.select_layer", p.select_layer,
              "True (choose the block on data.holdout) or False (classifier.probe_layer)")
    depth = size_from_config(config.model)[0].depth
    v.require(v.is_int(p.last_blocks) and 0 <= p.last_blocks <= depth, "probe.last_blocks",
              p.last_blocks, f"0 (no DINO feature set) to the encoder's {depth} blocks")
    v.require(isinstance(p.last_blocks_gap, bool), "probe.last_blocks_gap",
              p.last_blocks_gap, "True or False")
    v.require(p.fit_sets in FIT_SETS, "probe.fit_sets", p.fit_sets,
              f"one of {FIT_SETS}: 'together' fits the probe's feature sets as one program per "
              "L2 strength, 'one_by_one' one after another, 'auto' together on a GPU only")
    v.require(config.data.eval_split != "holdout", "data.eval_split", config.data.eval_split,
              "the test split ('' or 'test') for method 'probe': it chooses its L2 strength "
              "(and block) on the data.holdout rows and refits on them, so it cannot score "
              "them")
    v.require(v.is_int(config.data.holdout) and config.data.holdout > 0, "data.holdout",
              config.data.holdout, "a positive number of training examples for method "
              "'probe', which chooses its L2 strength on them (e.g. 5000 of Fashion-MNIST's "
              "60,000)")

  @classmethod
  def unread_rules(cls):
    return [*super().unread_rules(),
            (("classifier.probe_layer",), lambda c: not c.probe.select_layer,
             "probe.select_layer=True chooses the block on data.holdout"),
            (("probe.last_blocks_gap",), lambda c: c.probe.last_blocks > 0,
             "it adds the mean patch token to the DINO feature set, which "
             "probe.last_blocks=0 leaves out"),
            (("probe.select_layer", "probe.fit_sets", "probe.last_blocks",
              "probe.last_blocks_gap"), lambda c: c.classifier.features != "pixels",
             "classifier.features='pixels' runs no encoder (no block to choose, and one feature "
             "set, which fit_sets does not change)")]

  @classmethod
  def run(cls, config, workdir):
    return run_probe(config, workdir)
