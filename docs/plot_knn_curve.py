"""Draws k-NN accuracy on the held-out split against pre-training epochs (and compute) for the
pre-training runs of docs/fmnist_results.sh, beside the raw-pixel k-NN on the same split.

  python docs/plot_knn_curve.py ROOT OUT.png [RUN ...]   (default RUN: mae_e50;
  needs matplotlib: pip install -e ".[docs]")

Reads ROOT/RUN/metrics.jsonl (the k-NN monitor's rows), ROOT/RUN/config.json (steps per
epoch, batch, FLOPs via mim_jax.registry) and ROOT/knn_pixels_holdout/results.json (the
script's baselines section).
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib
import ml_collections

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from mim_jax import registry  # pylint: disable=wrong-import-position
from mim_jax.models import flops as model_flops  # pylint: disable=wrong-import-position
from mim_jax.training import metric_writers  # pylint: disable=wrong-import-position


def curve(root: str, run: str):
  """(epochs, cls %, mean %, train PFLOPs per point) of a run's k-NN rows."""
  config = ml_collections.ConfigDict(json.load(open(os.path.join(root, run, "config.json"))))
  rows = [r for r in metric_writers.read_metrics(os.path.join(root, run))
          if "knn_top1_cls" in r]
  steps_per_epoch = (60000 - config.data.holdout) // config.global_batch_size
  # Training FLOPs per step: 3x the forward pass, frozen teachers / tokenizers forward only.
  flops = model_flops.train_flops(registry.forward_flops(config)) * config.global_batch_size
  epochs = [r["step"] / steps_per_epoch for r in rows]
  return (epochs, [100 * r["knn_top1_cls"] for r in rows],
          [100 * r["knn_top1_gap"] for r in rows], [r["step"] * flops / 1e15 for r in rows])


def main(root: str, out: str, *runs: str) -> None:
  pixels = 100 * json.load(open(os.path.join(root, "knn_pixels_holdout",
                                             "results.json")))["knn_top1_pixels"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=120, sharey=True)
  for run in runs or ("mae_e50",):
    epochs, cls, mean, pflops = curve(root, run)
    for ax, x in zip(axes, (epochs, pflops)):
      ax.plot(x, mean, "o-", label=f"{run}, mean of patch tokens")
      ax.plot(x, cls, "s--", label=f"{run}, cls token")
  for ax, xlabel in zip(axes, ("pre-training epochs", "pre-training compute (PFLOPs)")):
    ax.axhline(pixels, color="gray", linestyle=":", label="raw pixels")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("k-NN top-1, held-out 5,000 (%)")
  axes[1].legend(fontsize=7, loc="lower right")
  fig.suptitle("Fashion-MNIST: k-NN (k=20) during pre-training", fontsize=10)
  fig.tight_layout()
  fig.savefig(out)


if __name__ == "__main__":
  main(*sys.argv[1:])
