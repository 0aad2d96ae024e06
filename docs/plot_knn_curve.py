"""Draws k-NN accuracy on the held-out split against pre-training epochs (and compute) for the
pre-training runs of docs/fmnist_results.sh, beside the raw-pixel k-NN on the same split.

  python docs/plot_knn_curve.py ROOT OUT.png [RUN ...]   (default RUN: mae_e50;
  needs matplotlib: pip install -e ".[docs]")

Reads ROOT/RUN/metrics.jsonl (the k-NN monitor's rows), ROOT/RUN/config.json (steps per
epoch, batch, FLOPs via mim_jax.registry) and ROOT/knn_pixels_holdout/results.json (the
script's baselines section). A run whose folder is not in ROOT (it went with the machine that
trained it) is read from its record in docs/curves/RUN.json: its config and k-NN rows, written
by `python docs/fmnist_tools.py keep ROOT RUN...` from the run's folder, so that a figure of
runs trained on different machines can be drawn again. (docs/curves/mae_e50.json was
transcribed from the table of docs/results.md: its folder went with its VM before `keep`
existed; the record says so.)
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib
import ml_collections

matplotlib.use("Agg")
import fmnist_tools  # pylint: disable=wrong-import-position  # docs/, beside this script
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position


def curve(root: str, run: str):
  """(epochs, cls %, mean %, train PFLOPs per point) of a run's k-NN rows."""
  rec = fmnist_tools.run_record(root, run)
  config, rows = ml_collections.ConfigDict(rec["config"]), rec["knn"]
  steps_per_epoch = (60000 - config.data.holdout) // config.global_batch_size
  # Training FLOPs per step: 3x the forward pass, frozen teachers / tokenizers forward only.
  flops = fmnist_tools.train_flops_per_image(rec) * config.global_batch_size
  epochs = [r["step"] / steps_per_epoch for r in rows]
  return (epochs, [100 * r["knn_top1_cls"] for r in rows],
          [100 * r["knn_top1_gap"] for r in rows], [r["step"] * flops / 1e15 for r in rows])


def main(root: str, out: str, *runs: str) -> None:
  pixels_file = os.path.join(root, "knn_pixels_holdout", "results.json")
  if not os.path.isfile(pixels_file):
    pixels_file = os.path.join(fmnist_tools.CURVES, "knn_pixels_holdout.json")
  pixels = 100 * json.load(open(pixels_file))["knn_top1_pixels"]
  fig, axes = plt.subplots(1, 2, figsize=(9, 4.0), dpi=120, sharey=True)
  for i, run in enumerate(runs or ("mae_e50",)):
    epochs, cls, mean, pflops = curve(root, run)
    for ax, x in zip(axes, (epochs, pflops)):  # one colour per run: solid mean, dashed cls
      ax.plot(x, mean, "o-", color=f"C{i}", label=f"{run}, mean of patch tokens")
      ax.plot(x, cls, "s--", color=f"C{i}", alpha=0.7, label=f"{run}, cls token")
  for ax, xlabel in zip(axes, ("pre-training epochs", "pre-training compute (PFLOPs)")):
    ax.axhline(pixels, color="gray", linestyle=":", label="raw pixels")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("k-NN top-1, held-out 5,000 (%)")
  # Below the panels: inside, it hides the curves once several runs are drawn.
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3, frameon=False)
  fig.suptitle("Fashion-MNIST: k-NN (k=20) during pre-training", fontsize=10)
  rows = -(-len(labels) // 3)
  fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
  fig.savefig(out)


if __name__ == "__main__":
  main(*sys.argv[1:])
