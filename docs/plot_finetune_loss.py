"""Draws the training loss and accuracy of fine-tuning runs against epochs: whether a schedule
ended while its loss was still falling (the curve beside the missed fine-tuning target of
docs/results.md).

  python docs/plot_finetune_loss.py ROOT OUT.png RUN [RUN ...]
  (e.g. RUN: tune_mae_e15_lr4e-3_nomix tune_mae_e30_lr4e-3_nomix; needs matplotlib:
  pip install -e ".[docs]")

Reads ROOT/RUN/metrics.jsonl (the logged training rows: `loss_mean`, the mean loss since the
previous row, and `accuracy` on the last batch, both on augmented, label-smoothed batches),
ROOT/RUN/config.json (num_epochs) and, when the run finished, its final evaluation row; for a
run no longer in ROOT, its record docs/curves/RUN.json (`python docs/fmnist_tools.py keep`).
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import fmnist_tools  # pylint: disable=wrong-import-position  # docs/, beside this script
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

# Points averaged per plotted point: a logged row every 50 steps is noisy on 256 images.
SMOOTH = 5


def _smoothed(values: list[float]) -> np.ndarray:
  """Means over consecutive windows of SMOOTH values (the last window may be shorter)."""
  v = np.asarray(values, np.float64)
  return np.array([v[i:i + SMOOTH].mean() for i in range(0, len(v), SMOOTH)])


def curve(root: str, run: str):
  """(epochs, loss, accuracy %, label) of a run's training rows, smoothed; the label names the
  run and its final evaluation (split and top-1) where there is one."""
  rec = fmnist_tools.run_record(root, run)
  if "train" not in rec:
    raise SystemExit(f"{run}: its record has no training rows (kept before they were)")
  config, train, evals = rec["config"], rec["train"], rec["eval"]
  if not train or "accuracy" not in train[0]:
    raise SystemExit(f"{run}: no logged training rows with an accuracy (a classifier's run)")
  # The schedule's length in steps is the last step of a finished run; an unfinished one
  # counts its epochs from the data (training rows / batch, dropping the last partial batch).
  # (The trainer's own count: the held-out images and a low-label subset left out.)
  import ml_collections  # pylint: disable=import-outside-toplevel

  from mim_jax import data  # pylint: disable=import-outside-toplevel
  try:
    rows_per_epoch = data.num_examples(ml_collections.ConfigDict(config["data"]),
                                       image_size=tuple(config["image_size"]),
                                       channels=config["channels"])
  except (OSError, ValueError) as e:  # a kept record drawn where its data is not (ConfigError)
    held_out = config["data"].get("holdout", 0)
    rows_per_epoch = round((60000 - held_out) * config["data"].get("label_fraction", 1.0))
    print(f"{run}: its data cannot be read here ({e}); epochs counted from "
          f"{rows_per_epoch} Fashion-MNIST images", file=sys.stderr)
  steps_per_epoch = rows_per_epoch // config["global_batch_size"]
  epochs = _smoothed([r["step"] / steps_per_epoch for r in train])
  label = f"{run} ({config['num_epochs']} epochs)"
  if evals:
    split = config["data"]["eval_split"] or "test"
    label += f": {split} top-1 {100 * evals[-1]['eval_accuracy']:.2f}"
  return (epochs, _smoothed([r["loss_mean"] for r in train]),
          100 * _smoothed([r["accuracy"] for r in train]), label)


def main(root: str, out: str, *runs: str) -> None:
  if not runs:
    raise SystemExit(__doc__)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
  for run in runs:
    epochs, loss, acc, label = curve(root, run)
    axes[0].plot(epochs, loss, label=label)
    axes[1].plot(epochs, acc, label=label)
  axes[0].set_ylabel("training loss (smoothed)")
  axes[1].set_ylabel("training top-1, augmented batches (%)")
  for ax in axes:
    ax.set_xlabel("fine-tuning epochs")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, loc="upper right")
  fig.suptitle("Fashion-MNIST fine-tuning: training loss and accuracy", fontsize=10)
  fig.tight_layout()
  fig.savefig(out)


if __name__ == "__main__":
  main(*sys.argv[1:])
