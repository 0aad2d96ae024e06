"""Draws the masking-ratio sweep of docs/fmnist_results.sh: probe and k-NN accuracy vs ratio.

  python docs/plot_mask_ratio.py ROOT OUT.png      (needs matplotlib: pip install -e ".[docs]")
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

RATIOS = (0.5, 0.6, 0.75, 0.9)


def load(root: str, name: str, key: str) -> float | None:
  path = os.path.join(root, name, "results.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return 100.0 * json.load(f)[key]


def main(root: str, out: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
  for label, prefix, key, marker in [("linear probe", "lp", "eval_accuracy", "o"),
                                     ("k-NN (k=20)", "knn", "knn_top1", "s")]:
    points = [(r, load(root, f"{prefix}_mae_r{r}", key)) for r in RATIOS]
    points = [(r, v) for r, v in points if v is not None]
    ax.plot([r for r, _ in points], [v for _, v in points], marker=marker, label=label)
    for r, v in points:
      ax.annotate(f"{v:.1f}", (r, v), textcoords="offset points", xytext=(0, 6), ha="center",
                  fontsize=8)
  ax.set_xlabel("MAE masking ratio")
  ax.set_ylabel("Fashion-MNIST test top-1 (%)")
  ax.set_xticks(RATIOS)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("MAE pre-training, 3 epochs; frozen-encoder evaluation", fontsize=9)
  fig.tight_layout()
  fig.savefig(out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
