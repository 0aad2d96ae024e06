"""Helpers of docs/fmnist_results.sh: choices read off finished runs, never off test numbers.

  python docs/fmnist_tools.py grid [SUFFIX]
      the flags of one point of the tuning grid (run-name suffix, e.g. lr2e-3_nomix); without
      SUFFIX the points tuned by default (DEFAULT_POINTS: those of the recorded choice);
      --all: every point
  python docs/fmnist_tools.py pick ROOT PREFIX [POINT ...]
      the fine-tuning overrides whose run ROOT/PREFIX_* scored best on the held-out split
      (results.json eval_accuracy with eval_split "holdout"); prints them as flags. POINTs
      (default: DEFAULT_POINTS) name the grid points that compete
  python docs/fmnist_tools.py pick_epochs ROOT PREFIX EPOCHS...
      the length (of EPOCHS) whose run ROOT/PREFIX_eEPOCHS scored best on the held-out split,
      ties to the shorter (the low-label rows' own lengths)
  python docs/fmnist_tools.py pick_suffix ROOT PREFIX SUFFIX...
      the SUFFIX whose run ROOT/PREFIX_SUFFIX scored best on the held-out split, ties to the
      earlier one (the attentive probe's lr)
  python docs/fmnist_tools.py next_epochs ROOT PREFIX FACTOR MAX_STEPS EPOCHS...
      the length still to run before the choice of pick_length can be made (nothing when it
      can): FACTOR x the longest length tried, when that one won on the held-out split and a
      run FACTOR x as long would take at most MAX_STEPS steps (the grid extends along the
      winning direction until the best length is inside it)
  python docs/fmnist_tools.py pick_length ROOT PREFIX FACTOR MAX_STEPS EPOCHS...
      pick_epochs over EPOCHS and the extensions next_epochs asked for; fails while one of
      them has not run
  python docs/fmnist_tools.py matched_epochs PRETRAIN_WORKDIR FT_EPOCHS
      FT_EPOCHS plus the epochs of supervised fine-tuning that cost the pre-training's model
      FLOPs (images seen x training FLOPs per image), rounded (the pre-training's config from
      its record in docs/curves when the workdir is gone)
  python docs/fmnist_tools.py finished WORKDIR
      exit status 0 if the run in WORKDIR has finished: its results.json, or its tokenizer or
      encoder export when the run scores nothing (a fine-tuning run and a pre-training run
      with the k-NN monitor export just before they write results.json); else 1
  python docs/fmnist_tools.py summary ROOT
      every finished run under ROOT as a markdown table (k-NN, probe and fine-tuning accuracy
      with the split each was scored on, wall time from ROOT/NAME.seconds), then the runs
      that differ only by seed (NAME_sK) as mean +- sample std over their seeds
  python docs/fmnist_tools.py status ROOT
      every run under ROOT that started and has not finished, as a markdown table: its last
      logged step and its schedule's length, its newest checkpoint, its seconds so far
      (ROOT/NAME.seconds, the invocations that ended) and whether a process is training it
      now (with the time left its log's last line estimates); what a rerun of
      docs/fmnist_results.sh resumes
  python docs/fmnist_tools.py keep ROOT RUN [RUN ...]
      records each run's config, k-NN rows, training rows, evaluation rows and training
      FLOPs per image (counted while its teacher or tokenizer is at hand) in
      docs/curves/RUN.json (and the raw-pixel k-NN of ROOT/knn_pixels_holdout), from which
      docs/plot_knn_curve.py and docs/plot_finetune_loss.py draw a run whose folder is no
      longer in ROOT (it went with the machine that trained it)
  python docs/fmnist_tools.py windows ROOT RUN [STEPS]
      a run's training loss / accuracy (%) as means over each STEPS (500) steps, from its
      folder or its record: the training-curve tables of docs/results.md
  python docs/fmnist_tools.py lowlabel ROOT
      the low-label length tuning's held-out top-1 (%) per fraction, init and length, as
      markdown rows: the finished runs ROOT/tune_labels<PCT>_<INIT>_e<EPOCHS>
      (docs/fmnist_results.sh tune_lowlabel), from their folders or records;
      docs/plot_lowlabel.py draws them
  python docs/fmnist_tools.py sklearn_pixels OUT_JSON [DATA_DIR [L2]]
      the reference the converged linear probe is held to: scikit-learn's multinomial logistic
      regression (lbfgs) on standardised raw pixels, all 60,000 training images, scored on the
      10,000 test images. Without L2 (or ""): its defaults, C = 1 and 300 iterations; with L2,
      the probe's objective (mean cross-entropy + L2 / 2 x the squared weights: C = 1 / (L2 N))
      run to convergence (tol 1e-6, up to 10,000 iterations)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import ml_collections

# The tuning grid of docs/fmnist_results.sh: run-name suffix -> flags.
GRID = {
    "lr1e-3": ["--config.optimizer.base_lr=0.001"],
    "lr2e-3": ["--config.optimizer.base_lr=0.002"],
    "lr1e-3_nomix": ["--config.optimizer.base_lr=0.001", "--config.classifier.mixup_alpha=0",
                     "--config.classifier.cutmix_alpha=0"],
    "lr2e-3_nomix": ["--config.optimizer.base_lr=0.002", "--config.classifier.mixup_alpha=0",
                     "--config.classifier.cutmix_alpha=0"],
    # Added when lr2e-3_nomix won the four above at the grid's edge (MAE, 2026-11-30): the
    # grid extends along the winning direction until the best point is inside it.
    "lr4e-3_nomix": ["--config.optimizer.base_lr=0.004", "--config.classifier.mixup_alpha=0",
                     "--config.classifier.cutmix_alpha=0"],
}
# The points the tuning sections run and choose among by default: the grid of the recorded
# 3-epoch choice (docs/results.md). The later points below compare with a chosen point
# (TUNE_POINTS); in the default they would add runs the record never had, and could change
# the choice.
DEFAULT_POINTS = tuple(GRID)
# Added on 2026-12-04, when both inits had chosen their lr without Mixup/CutMix: the official
# fine-tuning recipe's RandAugment and random erasing on each init's chosen point (scratch
# 2e-3, MAE 4e-3), run beside that point again (TUNE_POINTS) for a same-machine comparison.
_AUGMENT = ["--config.data.rand_augment=rand-m9-mstd0.5-inc1", "--config.data.random_erasing=0.25"]
GRID.update({f"{point}_ra": GRID[point] + _AUGMENT for point in ("lr2e-3_nomix", "lr4e-3_nomix")})
# Added on 2026-12-04 for the 15-epoch held-out comparison (TUNE_EPOCHS=15): Mixup 0.8 /
# CutMix 1.0 at MAE's chosen lr, which the 3-epoch proxy switched off.
GRID["lr4e-3"] = ["--config.optimizer.base_lr=0.004"]


def pick(root: str, prefix: str, points: list[str] | None = None) -> list[str]:
  """The flags of the grid point (of `points`, default DEFAULT_POINTS) whose run
  ROOT/PREFIX_POINT scored best on the held-out split; ties go to the earlier point."""
  points = list(points or DEFAULT_POINTS)
  unknown = [p for p in points if p not in GRID]
  if unknown:
    raise SystemExit(f"no grid point {', '.join(unknown)}: one of {', '.join(GRID)}")
  scores = _held_out_scores(root, prefix, {p: f"{prefix}_{p}" for p in points})
  best = max(scores, key=lambda s: (scores[s], -points.index(s)))
  print(f"{prefix}: held-out accuracy {scores}; chose {best}", file=sys.stderr)
  return GRID[best]


def best_length(scores: dict[str, float]) -> str:
  """The length (epochs, as text) with the best held-out score; ties go to the shorter run."""
  return max(scores, key=lambda e: (scores[e], -float(e)))


def pick_epochs(root: str, prefix: str, epochs: list[str]) -> str:
  """The length (of `epochs`) whose run ROOT/PREFIX_eEPOCHS scored best on the held-out split;
  ties go to the shorter run."""
  scores = _held_out_scores(root, prefix, {e: f"{prefix}_e{e}" for e in epochs})
  best = best_length(scores)
  print(f"{prefix}: held-out accuracy by epochs {scores}; chose {best}", file=sys.stderr)
  return best


def pick_suffix(root: str, prefix: str, suffixes: list[str]) -> str:
  """The suffix (of `suffixes`) whose run ROOT/PREFIX_SUFFIX scored best on the held-out
  split; ties go to the earlier one."""
  scores = _held_out_scores(root, prefix, {s: f"{prefix}_{s}" for s in suffixes})
  best = max(scores, key=lambda s: (scores[s], -suffixes.index(s)))
  print(f"{prefix}: held-out accuracy {scores}; chose {best}", file=sys.stderr)
  return best


def extended_epochs(root: str, prefix: str, epochs: list[str], factor: int,
                    max_steps: int) -> tuple[list[str], str | None]:
  """(the lengths the choice is made from, the length still to run or None).

  `epochs`, and while the longest of them wins on the held-out split (ties to the shorter, as
  `pick_epochs`), `factor` x that one, if its run would take at most `max_steps` steps (the
  steps of the longest run, from its results.json, times `factor`): a length chosen at the
  grid's edge may only be the edge's, so the grid extends along the winning direction until
  the best is inside it, as the lr grid did (GRID)."""
  lengths = list(epochs)
  while True:
    scores = _held_out_scores(root, prefix, {e: f"{prefix}_e{e}" for e in lengths})
    best = best_length(scores)
    longest = max(lengths, key=float)
    if best != longest or factor <= 1:
      return lengths, None
    path = os.path.join(root, f"{prefix}_e{longest}", "results.json")
    with open(path) as f:
      results = json.load(f)
    if "step" not in results:  # 0 steps would pass any budget: the grid would double forever
      raise SystemExit(f"{path}: no 'step' to bound the grid's extension by")
    steps = int(results["step"])
    if steps * factor > max_steps:
      print(f"{prefix}: the longest length, {longest} epochs, won; {factor}x it would take "
            f"{steps * factor} steps, more than {max_steps}: not extended", file=sys.stderr)
      return lengths, None
    following = str(int(float(longest) * factor))
    if not finished(os.path.join(root, f"{prefix}_e{following}")):
      return lengths, following
    lengths.append(following)


def pick_length(root: str, prefix: str, epochs: list[str], factor: int, max_steps: int) -> str:
  """`pick_epochs` over `epochs` and their extensions (`extended_epochs`), all of which have
  run."""
  lengths, following = extended_epochs(root, prefix, epochs, factor, max_steps)
  if following is not None:
    raise SystemExit(f"{prefix}: the longest length tried won on the held-out split, so "
                     f"{following} epochs run next ({prefix}_e{following}, the tune_lowlabel "
                     "section) before the choice")
  return pick_epochs(root, prefix, lengths)


def _held_out_scores(root: str, prefix: str, runs: dict[str, str]) -> dict[str, float]:
  """{key: held-out accuracy of run ROOT/NAME} for `runs` {key: NAME}; refuses a grid with
  a run missing or scored on another split."""
  scores, missing = {}, []
  for key, name in runs.items():
    path = os.path.join(root, name, "results.json")
    if not os.path.isfile(path):
      missing.append(path)
      continue
    with open(path) as f:
      results = json.load(f)
    if _config(os.path.join(root, name)).data.eval_split != "holdout":
      raise SystemExit(f"{path} was not scored on the held-out split")
    scores[key] = results["eval_accuracy"]
  if missing:  # a choice from part of the grid would be a different experiment
    raise SystemExit(f"the tuning grid {prefix}_* is not finished: no {', '.join(missing)}")
  return scores


def finished(workdir: str) -> bool:
  """Whether the run in `workdir` has finished: its results.json is there, or, for a run that
  scores nothing (a pre-training run without the k-NN monitor, a tokenizer), its export. A
  fine-tuning run and a monitored pre-training run export just before their results.json, so
  their export alone is a run stopped in between (the rerun resumes at its last step)."""
  if os.path.isfile(os.path.join(workdir, "results.json")):
    return True
  if os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json")):
    return True
  if not os.path.isfile(os.path.join(workdir, "encoder", "model.json")):
    return False
  try:
    config = _config(workdir)
  except (OSError, ValueError):
    return False  # no config.json to tell: run it (a finished run resumes at its end)
  scores = config.get("method") == "finetune" or float(
      config.get("knn", {}).get("every_epochs", 0) or 0) > 0
  return not scores


def _row(root: str, name: str) -> dict | None:
  """One finished run's scores (fractions), the split they were measured on and its wall
  seconds; None if ROOT/NAME is not a finished run (`finished`)."""
  workdir = os.path.join(root, name)
  if not finished(workdir):
    return None
  path = os.path.join(workdir, "results.json")
  if os.path.isfile(path):
    with open(path) as f:
      r = json.load(f)
  else:
    r = {"method": _config(workdir).get("method", "?")}  # pre-training without a monitor
  row = {"name": name, "method": r.get("method", "?"), "split": r.get("eval_split")}
  if row["split"] is None and any(k.startswith("knn_") for k in r):  # pre-training's monitor
    row["split"] = _split(workdir)
  for key in ("knn_top1_cls", "knn_top1_gap", "knn_top1_pixels", "probe_top1_cls",
              "probe_top1_gap", "probe_top1_pixels"):
    if key in r:
      row[key] = r[key]
  if "probe_layer_cls" in r:  # probe.select_layer: the blocks chosen on the holdout
    row["method"] += f" (blocks {r['probe_layer_cls']} / {r['probe_layer_gap']})"
  if "eval_accuracy" in r:  # fine-tuning: the split is the run's data.eval_split
    row["finetune"] = r["eval_accuracy"]
    row["split"] = _split(workdir)
  seconds = os.path.join(root, f"{name}.seconds")
  if os.path.isfile(seconds):
    with open(seconds) as f:
      row["seconds"] = int(f.read().strip())
  return row


def _split(workdir: str) -> str:
  """The split a run scored: its data.eval_split, or the source's default when that is ""."""
  from mim_jax.data import sources
  return sources.eval_split(_config(workdir).data)


def _pct(value) -> str:
  return "" if value is None else f"{100 * value:.2f}"


def _pair(row: dict, kind: str) -> str:
  """'cls / mean' for an encoder, the single pixel score for raw pixels."""
  if f"{kind}_top1_pixels" in row:
    return _pct(row[f"{kind}_top1_pixels"]) + " (pixels)"
  if f"{kind}_top1_cls" not in row and f"{kind}_top1_gap" not in row:
    return ""
  return f"{_pct(row.get(f'{kind}_top1_cls'))} / {_pct(row.get(f'{kind}_top1_gap'))}"


def _wall(seconds) -> str:
  if seconds is None:
    return ""
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def summary(root: str) -> str:
  """Markdown: one row per finished run, then mean +- sample std over seeds (NAME_sK)."""
  import re
  import statistics
  rows = [r for name in sorted(os.listdir(root)) if (r := _row(root, name)) is not None]
  lines = ["| run | protocol | split | k-NN cls / mean | probe cls / mean | fine-tuning | wall |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['method']} | {r['split'] or ''} | {_pair(r, 'knn')} | "
                 f"{_pair(r, 'probe')} | {_pct(r.get('finetune'))} | {_wall(r.get('seconds'))} |")
  groups: dict[str, list[float]] = {}
  for r in rows:
    m = re.fullmatch(r"(.+)_s\d+", r["name"])
    if m and "finetune" in r and r["split"] == "test":
      groups.setdefault(m.group(1), []).append(r["finetune"])
  if groups:
    lines += ["", "| runs | seeds | fine-tuning, test: mean +- std |", "|---|---|---|"]
    for prefix, accs in groups.items():
      spread = (f" +- {100 * statistics.stdev(accs):.2f}" if len(accs) > 1
                else " (one seed: no spread)")
      lines.append(f"| {prefix}_s* | {len(accs)} | {100 * statistics.mean(accs):.2f}{spread} |")
  return "\n".join(lines)


def _last_step(workdir: str) -> int | None:
  """The step of the last line of WORKDIR/metrics.jsonl that has one (None: nothing logged)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))  # the last lines are enough
      lines = f.read().decode("utf-8", "replace").splitlines()
  except OSError:
    return None
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue
  return None


def _from_log(log: str) -> tuple[int | None, str]:
  """(the schedule's length the run's log names last, "schedule N steps", else None; the
  time left its last progress line estimates, "ETA H:MM:SS", else "")."""
  try:
    with open(log, errors="replace") as f:
      text = f.read()
  except OSError:
    return None, ""
  schedule = re.findall(r"schedule (\d+) steps", text)
  eta = re.findall(r"ETA (\d+:\d\d:\d\d)", text)
  return (int(schedule[-1]) if schedule else None), (eta[-1] if eta else "")


def _training_now(workdirs: set[str]) -> set[str]:
  """The workdirs (real paths) of `workdirs` that a running process names (--workdir=DIR or
  --workdir DIR, relative to its working directory; Linux /proc)."""
  wanted = {os.path.realpath(w) for w in workdirs}
  running = set()
  for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().decode("utf-8", "replace").split("\0")
      cwd = os.readlink(f"/proc/{pid}/cwd") if "--workdir" in " ".join(args) else ""
    except OSError:
      continue  # gone, or not ours to read
    named = [a.split("=", 1)[1] for a in args if a.startswith("--workdir=")]
    named += [b for a, b in zip(args, args[1:]) if a == "--workdir"]
    running.update(w for n in named if (w := os.path.realpath(os.path.join(cwd, n))) in wanted)
  return running


def status(root: str) -> str:
  """Markdown: each run under ROOT with a config.json that has not finished (`finished`)."""
  if not os.path.isdir(root):
    raise SystemExit(f"{root} is not a folder of runs")
  started = [name for name in sorted(os.listdir(root))
             if os.path.isfile(os.path.join(root, name, "config.json"))
             and not finished(os.path.join(root, name))]
  now = _training_now({os.path.join(root, name) for name in started})
  lines = ["| run | last logged step | schedule (steps) | newest checkpoint | seconds so far "
           "| training now (its log's ETA) |", "|---|---|---|---|---|---|"]
  for name in started:
    workdir = os.path.join(root, name)
    step, (total, eta) = _last_step(workdir), _from_log(os.path.join(root, f"{name}.log"))
    training = os.path.realpath(workdir) in now
    ckpts = os.path.join(workdir, "checkpoints")
    saved = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) \
        if os.path.isdir(ckpts) else []
    spent = ""
    if os.path.isfile(seconds := os.path.join(root, f"{name}.seconds")):
      with open(seconds, errors="replace") as f:
        spent = f.read().strip()
    lines.append(f"| {name} | {'' if step is None else step} | {total or ''} | "
                 f"{saved[-1] if saved else ''} | {spent} | "
                 f"{(f'yes ({eta})' if eta else 'yes') if training else 'no'} |")
  return "\n".join(lines)


def _config(workdir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def matched_epochs(pretrain_workdir: str, ft_epochs: float) -> int:
  """(The pre-training's config from its workdir, else from its record in docs/curves.)"""
  from mim_jax import data
  from mim_jax.models import flops
  folder = pretrain_workdir.rstrip("/")
  rec = run_record(os.path.dirname(folder), os.path.basename(folder))
  config = ml_collections.ConfigDict(rec["config"])
  images = data.num_examples(config.data, image_size=tuple(config.image_size),
                             channels=config.channels)
  pretrain = config.num_epochs * images * train_flops_per_image(rec)
  # A fine-tuning epoch: all 60,000 training images through the whole encoder, 3x forward.
  encoder = flops.encoder_flops(config.model, tuple(config.image_size), config.channels)
  ft_epoch = 60_000 * flops.TRAIN_FORWARD_RATIO * encoder
  extra = pretrain / ft_epoch
  print(f"pre-training {pretrain:.3e} FLOPs = {extra:.2f} fine-tuning epochs of "
        f"{ft_epoch:.3e}", file=sys.stderr)
  # Rounded up: the baseline gets at least the compute of pre-training + fine-tuning (a
  # rounding down, or Python's round-half-even at x.5, would give it less than it is matched to).
  return math.ceil(ft_epochs + extra - 1e-9)


CURVES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "curves")
KNN_KEYS = ("step", "knn_top1_cls", "knn_top1_gap")
# The logged training rows' loss (mean since the previous row) and last-batch accuracy (a
# classifier's only), and the evaluation rows' scores: what plot_finetune_loss.py draws.
TRAIN_KEYS = ("step", "loss_mean", "accuracy")
EVAL_KEYS = ("step", "eval_accuracy", "eval_loss")


def _rows(logged: list[dict], marker: str, keys: tuple[str, ...]) -> list[dict]:
  """The logged rows that have `marker`, each cut to those of `keys` it has."""
  return [{k: r[k] for k in keys if k in r} for r in logged if marker in r]


def run_record(root: str, run: str) -> dict:
  """{"config": the run's config, "knn": its k-NN rows (step, cls and mean-pooled top-1),
  "train": its training rows (step, loss_mean, accuracy), "eval": its evaluation rows (step,
  eval_accuracy, eval_loss)} from ROOT/RUN when that folder is there, else from its record
  docs/curves/RUN.json (`keep`; records kept before 2026-12-06 have "config" and "knn" only)."""
  from mim_jax.training import metric_writers
  folder = os.path.join(root, run)
  if os.path.isfile(os.path.join(folder, "config.json")):
    logged = (metric_writers.read_metrics(folder)
              if os.path.isfile(os.path.join(folder, metric_writers.METRICS_FILE)) else [])
    with open(os.path.join(folder, "config.json")) as f:
      return {"config": json.load(f), "knn": _rows(logged, "knn_top1_cls", KNN_KEYS),
              "train": _rows(logged, "loss_mean", TRAIN_KEYS),
              "eval": _rows(logged, "eval_accuracy", EVAL_KEYS)}
  kept = os.path.join(CURVES, f"{run}.json")
  if not os.path.isfile(kept):
    raise SystemExit(f"{run}: no run folder {folder} and no record {kept}")
  with open(kept) as f:
    rec = json.load(f)
  # Said every time: the record stands in by the run's name alone, whatever ROOT trained.
  print(f"{run}: not in {root}; its record {kept} stands in ({rec.get('source', '?')})",
        file=sys.stderr)
  return rec


def train_flops_per_image(rec: dict) -> float:
  """Training FLOPs per image of the run `rec` (`run_record`): the count `keep` stored, else
  counted from its config now. A frozen teacher's or tokenizer's forward pass counts, and
  counting it reads that folder: a record keeps the count made while the folder was there."""
  if "train_flops_per_image" in rec:
    return float(rec["train_flops_per_image"])
  from mim_jax import registry
  from mim_jax.models import flops
  return flops.train_flops(registry.forward_flops(ml_collections.ConfigDict(rec["config"])))


def keep(root: str, *runs: str) -> list[str]:
  """Writes docs/curves/RUN.json (`run_record`) for each run, and knn_pixels_holdout.json (the
  pixel line of the curves' plot) when ROOT has it; returns the files written."""
  os.makedirs(CURVES, exist_ok=True)
  written = []
  for run in runs:
    if not os.path.isfile(os.path.join(root, run, "config.json")):
      raise SystemExit(f"{run}: no run folder {os.path.join(root, run)} to keep")
    if not finished(os.path.join(root, run)):
      # Its curve would stop where the run stands and be drawn as the run's.
      raise SystemExit(f"{run}: has not finished ({os.path.join(root, run)}); keep it when it "
                       "has")
    rec = {"source": f"python docs/fmnist_tools.py keep ROOT {run}", **run_record(root, run)}
    for name, suffix in (("seconds", ".seconds"), ("args", ".args")):
      path = os.path.join(root, run + suffix)  # the wall time and settings the script recorded
      if os.path.isfile(path):
        with open(path, errors="replace") as f:
          rec[name] = f.read().strip()
    rec["train_flops_per_image"] = train_flops_per_image(rec)  # needs its teacher/tokenizer
    written.append(os.path.join(CURVES, f"{run}.json"))
    with open(written[-1], "w") as f:
      json.dump(rec, f, indent=1)
  pixels = os.path.join(root, "knn_pixels_holdout", "results.json")
  if os.path.isfile(pixels):
    with open(pixels) as f:
      value = json.load(f)["knn_top1_pixels"]
    written.append(os.path.join(CURVES, "knn_pixels_holdout.json"))
    with open(written[-1], "w") as f:
      json.dump({"knn_top1_pixels": value, "source": "python docs/fmnist_tools.py keep ROOT"},
                f, indent=1)
  return written


def lowlabel_lengths(root: str) -> dict:
  """{percent: {init: [(epochs, held-out top-1 %), ...]}} of the low-label length tuning
  (`tune_lowlabel` of docs/fmnist_results.sh, runs ROOT/tune_labels<PCT>_<INIT>_e<EPOCHS>,
  the grid's extensions included), sorted by fraction and length: the finished runs, from their
  folders, or their records (`keep`) where a folder is gone; a run neither finished nor kept
  is left out."""
  pattern = re.compile(r"tune_labels([0-9.]+)_(mae|scratch)_e([0-9]+)$")
  names = set(os.listdir(root)) if os.path.isdir(root) else set()
  if os.path.isdir(CURVES):
    names |= {n[:-len(".json")] for n in os.listdir(CURVES) if n.endswith(".json")}
  found: dict = {}
  for run in names:
    match = pattern.match(run)
    if not match or (os.path.isdir(os.path.join(root, run))
                     and not finished(os.path.join(root, run))):
      continue
    pct, init, epochs = match.groups()
    rec = run_record(root, run)
    if rec["config"]["data"]["eval_split"] != "holdout" or not rec.get("eval"):
      raise SystemExit(f"{run}: no final evaluation on the held-out split")
    acc = 100.0 * rec["eval"][-1]["eval_accuracy"]
    found.setdefault(pct, {}).setdefault(init, []).append((int(epochs), acc))
  return {pct: {init: sorted(found[pct][init]) for init in sorted(found[pct])}
          for pct in sorted(found, key=float)}


def windows(root: str, run: str, steps: int = 500) -> list[tuple[int, int, float, float]]:
  """(first step, last step, mean loss_mean, mean accuracy %) of the run's logged training
  rows over each `steps` steps (the last window ends at the last logged step)."""
  train = run_record(root, run).get("train")
  if not train or "accuracy" not in train[0]:
    raise SystemExit(f"{run}: no logged training rows with an accuracy (a classifier's run)")
  last, out = train[-1]["step"], []
  for lo in range(0, last, steps):
    rows = [r for r in train if lo < r["step"] <= lo + steps]
    if rows:
      out.append((lo + 1, min(lo + steps, last),
                  sum(r["loss_mean"] for r in rows) / len(rows),
                  100 * sum(r["accuracy"] for r in rows) / len(rows)))
  return out


def sklearn_pixels(out_json: str, data_dir: str = "", l2: str = "") -> dict:
  """scikit-learn's logistic regression on standardised pixels (data_dir: the Debian
  package's folder by default, as the configs read): its defaults, or with `l2` the probe's
  L2 strength, run to convergence (tests/test_probe.py checks the same match on a subset)."""
  import time

  import numpy as np
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import log_loss
  from sklearn.preprocessing import StandardScaler

  from mim_jax.config.defaults import FMNIST_PATH
  from mim_jax.data.idx import load_fmnist

  def split(name):
    x, y, _ = load_fmnist(data_dir or FMNIST_PATH, name)
    return x.reshape(len(x), -1).astype(np.float32) / 255.0, y
  (x, y), (x_test, y_test) = split("train"), split("test")
  start = time.perf_counter()
  scaler = StandardScaler().fit(x)
  settings = {"max_iter": 300}
  if l2:
    if float(l2) <= 0:
      raise SystemExit(f"sklearn_pixels: L2 {l2!r} is not a strength > 0 (C = 1 / (L2 N))")
    settings = {"C": 1.0 / (float(l2) * len(x)), "max_iter": 10_000, "tol": 1e-6}
  x = scaler.transform(x)
  model = LogisticRegression(**settings).fit(x, y)
  result = {"test_top1": float((model.predict(scaler.transform(x_test)) == y_test).mean()),
            "iterations": int(model.n_iter_.max()), "seconds": time.perf_counter() - start}
  result["converged"] = result["iterations"] < settings["max_iter"]
  if l2:
    # The probe's objective at scikit-learn's solution: equal to the probe's optimum when both
    # solve the same problem.
    ce = log_loss(y, model.predict_proba(x), labels=model.classes_)
    result |= {"l2": float(l2), "C": settings["C"], "tol": settings["tol"],
               "objective": ce + 0.5 * float(l2) * float(np.sum(model.coef_ ** 2))}
  with open(out_json, "w") as f:
    json.dump(result, f)
  return result


if __name__ == "__main__":
  command = sys.argv[1]
  if command == "grid":
    if len(sys.argv) > 2 and sys.argv[2] == "--all":
      print(" ".join(GRID))
    elif len(sys.argv) > 2 and sys.argv[2] == "--check":  # every point named, in one start
      unknown = [p for p in sys.argv[3:] if p not in GRID]
      if unknown:
        raise SystemExit(f"unknown {unknown[0]!r} (one of: {' '.join(GRID)})")
    elif len(sys.argv) > 2 and sys.argv[2] not in GRID:
      raise SystemExit(f"no grid point {sys.argv[2]!r}: one of {', '.join(GRID)}")
    else:
      print(" ".join(GRID[sys.argv[2]]) if len(sys.argv) > 2 else " ".join(DEFAULT_POINTS))
  elif command == "pick":
    print(" ".join(pick(sys.argv[2], sys.argv[3], sys.argv[4:])))
  elif command == "pick_epochs":
    print(pick_epochs(sys.argv[2], sys.argv[3], sys.argv[4:]))
  elif command == "pick_suffix":
    print(pick_suffix(sys.argv[2], sys.argv[3], sys.argv[4:]))
  elif command in ("next_epochs", "pick_length"):
    root, prefix, factor, max_steps, *lengths = sys.argv[2:]
    if command == "next_epochs":
      print(extended_epochs(root, prefix, lengths, int(factor), int(max_steps))[1] or "")
    else:
      print(pick_length(root, prefix, lengths, int(factor), int(max_steps)))
  elif command == "matched_epochs":
    print(matched_epochs(sys.argv[2], float(sys.argv[3])))
  elif command == "finished":
    sys.exit(0 if finished(sys.argv[2]) else 1)
  elif command == "summary":
    print(summary(sys.argv[2]))
  elif command == "status" and len(sys.argv) == 3:
    print(status(sys.argv[2]))
  elif command == "lowlabel":
    for pct, by_init in lowlabel_lengths(sys.argv[2]).items():
      for init, points in by_init.items():
        print(f"| {pct}% | {init} | " + ", ".join(f"{a:.2f} ({e} ep)" for e, a in points) + " |")
  elif command == "sklearn_pixels":
    print(sklearn_pixels(*sys.argv[2:5]))
  elif command == "windows":
    for first, last, loss, acc in windows(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:5])):
      print(f"{first:,}-{last:,}: {loss:.3f} / {acc:.1f}")
  elif command == "keep":
    print("\n".join(keep(sys.argv[2], *sys.argv[3:])))
  else:
    raise SystemExit(__doc__)
