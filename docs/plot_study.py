"""The target-level study of docs/fmnist_results.sh (section `study`) as one table and one plot:
test k-NN of every target under every masking, beside raw pixels and the held-out k-NN each
run scored at its end (the number the study's choices may rest on).

  python docs/plot_study.py ROOT OUT.png   (needs matplotlib: pip install -e ".[docs]")

Reads ROOT/knn_study_TARGET[_random75]/results.json (test split), the last k-NN row of
ROOT/study_TARGET[_random75]/metrics.jsonl (held-out split), ROOT/study_*.seconds and
ROOT/probe_pixels/ or ROOT/knn_pixels/results.json (raw pixels' test k-NN, if there); prints
the markdown table of docs/results.md and writes the bar chart. Runs not finished yet are left
out of both.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from mim_jax.training import metric_writers  # pylint: disable=wrong-import-position

TARGETS = ("pixels", "norm_pixels", "hog", "tokens", "teacher_features")
MASKINGS = {"": "blockwise 0.4", "_random75": "random 0.75"}
POOLS = {"gap": "mean of patch tokens", "cls": "cls token"}


def _json(path: str):
  with open(path) as f:
    return json.load(f)


def study_rows(root: str) -> list[dict]:
  """One row per finished run: target, masking, test and held-out k-NN (%) per pool, seconds."""
  rows = []
  for suffix, masking in MASKINGS.items():
    for target in TARGETS:
      name = f"study_{target}{suffix}"
      result = os.path.join(root, f"knn_{name}", "results.json")
      if not os.path.isfile(result):
        continue
      test = _json(result)
      knn_rows = [r for r in metric_writers.read_metrics(os.path.join(root, name))
                  if "knn_top1_gap" in r]
      seconds = os.path.join(root, f"{name}.seconds")
      rows.append({
          "target": target, "masking": masking,
          **{f"test_{p}": 100 * test[f"knn_top1_{p}"] for p in POOLS},
          **{f"holdout_{p}": 100 * knn_rows[-1][f"knn_top1_{p}"] if knn_rows else None
             for p in POOLS},
          "seconds": int(open(seconds).read()) if os.path.isfile(seconds) else None})
  return rows


def markdown(rows: list[dict], pixels: float) -> str:
  lines = ["| masking | target | k-NN test, mean / cls | k-NN held-out (end), mean / cls "
           "| wall time |", "|---|---|---|---|---|"]
  fmt = lambda v: "–" if v is None else f"{v:.2f}"
  for r in rows:
    lines.append(f"| {r['masking']} | {r['target']} | {fmt(r['test_gap'])} / "
                 f"{fmt(r['test_cls'])} | {fmt(r['holdout_gap'])} / {fmt(r['holdout_cls'])} | "
                 f"{'–' if r['seconds'] is None else str(r['seconds']) + ' s'} |")
  if pixels is not None:
    lines.append(f"| – | raw pixels | {pixels:.2f} | | |")
  return "\n".join(lines)


def main(root: str, out: str) -> None:
  rows = study_rows(root)
  if not rows:
    raise SystemExit(f"no finished study runs under {root} (knn_study_*/results.json)")
  pixels = None
  for run in ("probe_pixels", "knn_pixels"):  # the same k-NN of raw pixels on test
    path = os.path.join(root, run, "results.json")
    if os.path.isfile(path):
      pixels = 100 * _json(path)["knn_top1_pixels"]
      break
  print(markdown(rows, pixels))
  maskings = [m for m in MASKINGS.values() if any(r["masking"] == m for r in rows)]
  fig, ax = plt.subplots(figsize=(8, 3.4), dpi=120)
  width = 0.8 / len(maskings)
  for i, masking in enumerate(maskings):
    by_target = {r["target"]: r for r in rows if r["masking"] == masking}
    xs = [t for t in range(len(TARGETS)) if TARGETS[t] in by_target]
    ax.bar([x + (i - (len(maskings) - 1) / 2) * width for x in xs],
           [by_target[TARGETS[x]]["test_gap"] for x in xs], width, label=masking)
  if pixels is not None:
    ax.axhline(pixels, color="gray", linestyle=":", label="raw pixels")
  values = [r["test_gap"] for r in rows] + ([pixels] if pixels is not None else [])
  ax.set_ylim(min(values) - 3, max(values) + 1.5)
  ax.set_xticks(range(len(TARGETS)), [t.replace("_", " ") for t in TARGETS])
  ax.set_ylabel("k-NN top-1, test (%)\nmean of patch tokens")
  ax.grid(axis="y", alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  fig.suptitle("Fashion-MNIST: what to predict at masked patches (same encoder, masking and "
               "budget)", fontsize=10)
  fig.tight_layout()
  fig.savefig(out)


if __name__ == "__main__":
  main(*sys.argv[1:])
