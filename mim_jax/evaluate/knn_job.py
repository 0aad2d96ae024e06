"""k-NN evaluation of an encoder: as its own job (`method="knn"`) and during pre-training.

Features of the training split (resize / centre crop, no augmentation) form the bank; each
evaluation-split image votes with its k most cosine-similar bank images, weighted by
exp(similarity / T) (DINO / iBOT protocol: k = 20, T = 0.07; `config.knn`). Features come from
`classifier.probe_layer` with `classifier.pool`, as for the linear probe; with
`classifier.features="pixels"` they are the flattened normalised pixels (a baseline), and with
`init_from="random"` a seeded random encoder's.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from mim_jax import checkpoint, config_validation, data, metric_writers
from mim_jax.evaluate import classifier_base, knn, pretrained
from mim_jax.models.heads import encoder_features
from mim_jax.models.vit import encoder_from_config

log = logging.getLogger(__name__)


class KnnMonitor:
  """Callable: encoder params -> {"knn_top1", "knn_top5"} on the evaluation split."""

  def __init__(self, config, mesh=None):
    del mesh  # features are computed on each process's default device, then gathered
    self.config = config
    self.encoder = encoder_from_config(config.model, config.image_size, config.channels,
                                       posemb=pretrained.encoder_posemb(config.init_from))
    self.num_classes = classifier_base.num_classes(config)
    pool, layer = config.classifier.pool, int(config.classifier.probe_layer)
    if config.classifier.features == "pixels":
      self._features = jax.jit(lambda params, images: images.reshape(images.shape[0], -1))
    else:
      self._features = jax.jit(lambda params, images: encoder_features(
          self.encoder, params, images, pool=pool, layer=layer))

  def _split_features(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], labels [N]) of a whole split, in source order, on every process."""
    count = jax.process_count()
    it = data.make_eval_iterator(self.config.data, image_size=tuple(self.config.image_size),
                                 channels=self.config.channels,
                                 batch_size=self.config.eval.batch_size // count, split=split)
    if count == 1:
      return knn.extract_features(lambda images: self._features(params, images), it)
    # Every process holds rows p, p + P, p + 2P, ... of the split, padded to the same number of
    # batches; gather the padded arrays, interleave them back into source order, drop padding.
    local_params = jax.device_put(_local_copy(params), jax.local_devices()[0])
    feats, labels, mask = [], [], []
    for batch in it:
      feats.append(np.asarray(self._features(local_params, batch["image"]), np.float32))
      labels.append(np.asarray(batch["label"], np.int32))
      mask.append(np.asarray(batch["mask"], bool))
    local = (np.concatenate(feats), np.concatenate(labels), np.concatenate(mask))
    gathered = multihost_utils.process_allgather(local)  # each [P, n_local, ...]
    feats, labels, mask = (np.swapaxes(np.asarray(g), 0, 1).reshape(-1, *g.shape[2:])
                           for g in gathered)
    return feats[mask], labels[mask]

  def __call__(self, encoder_params) -> dict[str, float]:
    start = time.perf_counter()
    cfg = self.config
    bank, bank_labels = self._split_features(encoder_params, cfg.data.split)
    if cfg.data.label_fraction < 1:
      # The same per-class subset the trainer uses: chosen on the source's labels, so the bank
      # must hold every source row (a skipped corrupt image would shift the positions).
      source_labels = data.build_source(cfg.data, image_size=tuple(cfg.image_size),
                                        channels=cfg.channels).labels()
      if len(source_labels) != len(bank_labels):
        raise ValueError(f"k-NN with data.label_fraction={cfg.data.label_fraction} needs every "
                         f"training image: {len(source_labels) - len(bank_labels)} could not "
                         "be decoded")
      keep = data.per_class_subset(source_labels, cfg.data.label_fraction, cfg.data.subset_seed)
      bank, bank_labels = bank[keep], bank_labels[keep]
    queries, query_labels = self._split_features(encoder_params, data.eval_split(cfg.data))
    acc = knn.knn_accuracy(bank, bank_labels, queries, query_labels,
                           num_classes=self.num_classes, k=cfg.knn.k,
                           temperature=cfg.knn.temperature)
    out = {f"knn_{k}": v for k, v in acc.items()}
    log.info("k-NN (k=%d, T=%g): bank %d, queries %d, %s in %.1fs", cfg.knn.k,
             cfg.knn.temperature, len(bank_labels), len(query_labels),
             ", ".join(f"{k} {v:.4f}" for k, v in out.items()), time.perf_counter() - start)
    return out


def _local_copy(params):
  """Numpy values of parameters that may span processes, on every process (a collective)."""
  def to_numpy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(to_numpy, params)


def run(config, workdir: str) -> dict[str, float]:
  """The k-NN job: scores the encoder of `config.init_from`; writes results.json to workdir."""
  config = pretrained.adopt_encoder_config(config)
  config_validation.validate_config(config)
  checkpoint.ensure_writable(workdir)
  if config.classifier.features == "pixels":
    params = {}
  elif config.init_from == pretrained.RANDOM:
    image = jax.numpy.zeros((1, *config.image_size, config.channels))
    encoder = encoder_from_config(config.model, config.image_size, config.channels)
    # The key the linear probe's random encoder gets (train.run's init key, then the
    # method's encoder key), so both baselines score the same encoder.
    init_rng = jax.random.split(jax.random.key(config.seed))[0]
    params = encoder.init(jax.random.split(init_rng)[0], image)["params"]
  else:
    params, _ = checkpoint.load_encoder(pretrained.encoder_directory(config.init_from))
  start = time.perf_counter()
  metrics = KnnMonitor(config)(params)
  metrics["seconds"] = time.perf_counter() - start
  writer = metric_writers.MetricWriter(workdir, enabled=jax.process_index() == 0)
  writer.write_scalars(0, metrics)
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"method": "knn", "init_from": config.init_from, "k": config.knn.k,
                 "temperature": config.knn.temperature, **metrics}, f, indent=2)
  return metrics
