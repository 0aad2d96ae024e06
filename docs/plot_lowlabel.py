"""Draws the low-label length tuning: held-out top-1 against fine-tuning epochs, MAE-initialised
and from scratch, one panel per label fraction (what each init's own length is chosen from).

  python docs/plot_lowlabel.py ROOT OUT.png      (needs matplotlib: pip install -e ".[docs]")

Reads the finished runs ROOT/tune_labels<PCT>_<INIT>_e<EPOCHS> (`fmnist_tools.lowlabel_lengths`:
their folders, or their records in docs/curves); each init's best held-out length so far
(ties to the shorter run, as `pick_epochs`) is drawn as a filled star: the choice, once the
tuning has finished (docs/fmnist_results.sh tune_lowlabel, whose grid extends while its longest
length wins).
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import fmnist_tools  # pylint: disable=wrong-import-position  # docs/, beside this script
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

STYLE = {"mae": ("MAE-initialised", "tab:blue", "o"),
         "scratch": ("from scratch (no layer decay)", "tab:orange", "s")}


def main(root: str, out: str) -> None:
  points = fmnist_tools.lowlabel_lengths(root)
  if not points:
    raise SystemExit(f"no finished low-label tuning run under {root} (or in docs/curves)")
  fig, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points), 3.6), dpi=120,
                           squeeze=False)
  for ax, (pct, by_init) in zip(axes[0], points.items()):
    for init, pts in by_init.items():
      label, color, marker = STYLE[init]
      epochs, accs = [e for e, _ in pts], [a for _, a in pts]
      ax.plot(epochs, accs, marker=marker, color=color, label=label)
      best = int(fmnist_tools.best_length({str(e): a for e, a in pts}))  # pick_epochs' rule
      ax.plot(best, dict(pts)[best], marker="*", markersize=14, color=color, linestyle="none")
      for e, a in pts:
        ax.annotate(f"{a:.1f}", (e, a), textcoords="offset points", xytext=(0, 7),
                    ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({e for pts in by_init.values() for e, _ in pts}))
    ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax.set_xlabel("fine-tuning epochs (of the labelled images)")
    ax.set_ylabel("held-out top-1 (%), 5,000 images")
    ax.set_title(f"{pct}% of the labels", fontsize=10)
    ax.margins(x=0.08, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  fig.suptitle("Low-label fine-tuning length on the held-out split (star: the best length)",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(out)
  print(f"wrote {out}")


if __name__ == "__main__":
  if len(sys.argv) != 3:
    raise SystemExit(__doc__)
  main(*sys.argv[1:])
