"""Draws the masking-ratio sweep of docs/fmnist_results.sh: accuracy against MAE's mask ratio.

  python docs/plot_mask_ratio.py ROOT OUT.png      (needs matplotlib: pip install -e ".[docs]")

Today's `ratio` section (MAE_EPOCHS-epoch encoders at 0.5 / 0.6 / 0.9 beside the 0.75 one of
pretrain_mae): the probe and k-NN on mean-pooled tokens (probe_mae_e50_r*, probe_mae_e50) and
one fine-tuning seed (ft_mae_r*_s0, ft_mae_s0). Without those runs in ROOT, the first round's
3-epoch sweep (lp_mae_r*, knn_mae_r*: eval_accuracy, knn_top1), which the first results section
shows.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

RATIOS = (0.5, 0.6, 0.75, 0.9)
MAIN_RATIO = 0.75  # configs/mae_fmnist.py's: its runs are pretrain_mae's, without a suffix


def load(root: str, name: str, key: str) -> float | None:
  path = os.path.join(root, name, "results.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    value = json.load(f).get(key)
  return None if value is None else 100.0 * value


def series(root: str, epochs: int = 50) -> tuple[list, str]:
  """[(label, {ratio: accuracy}, marker)] and the title, for the runs ROOT holds."""
  def name(kind: str, r: float) -> str:
    if kind == "ft":
      return "ft_mae_s0" if r == MAIN_RATIO else f"ft_mae_r{r}_s0"
    return f"probe_mae_e{epochs}" + ("" if r == MAIN_RATIO else f"_r{r}")

  today = [("linear probe (mean-pooled)", "probe", "probe_top1_gap", "o"),
           ("k-NN, k=20 (mean-pooled)", "probe", "knn_top1_gap", "s"),
           ("fine-tuning (seed 0)", "ft", "eval_accuracy", "^")]
  out = [(label, {r: load(root, name(kind, r), key) for r in RATIOS}, marker)
         for label, kind, key, marker in today]
  swept = [points[r] for _, points, _ in out for r in RATIOS if r != MAIN_RATIO]
  if any(v is not None for v in swept):
    return out, f"MAE pre-training, {epochs} epochs; test top-1"
  first = [("linear probe", "lp", "eval_accuracy", "o"), ("k-NN (k=20)", "knn", "knn_top1", "s")]
  return ([(label, {r: load(root, f"{prefix}_mae_r{r}", key) for r in RATIOS}, marker)
           for label, prefix, key, marker in first],
          "MAE pre-training, 3 epochs; frozen-encoder evaluation")


def main(root: str, out: str) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
  drawn, title = series(root)
  for label, points, marker in drawn:
    points = [(r, v) for r, v in points.items() if v is not None]
    if not points:
      continue
    ax.plot([r for r, _ in points], [v for _, v in points], marker=marker, label=label)
    for r, v in points:
      ax.annotate(f"{v:.1f}", (r, v), textcoords="offset points", xytext=(0, 6), ha="center",
                  fontsize=8)
  ax.set_xlabel("MAE masking ratio")
  ax.set_ylabel("Fashion-MNIST test top-1 (%)")
  ax.set_xticks(RATIOS)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(out)
  print(f"wrote {out}")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
