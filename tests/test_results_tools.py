"""docs/fmnist_tools.py: the held-out choice of fine-tuning settings and the results summary."""

import importlib.util
import json
import pathlib
import shutil

import pytest

from conftest import requires_fmnist

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fmnist_tools", REPO / "docs" / "fmnist_tools.py")
tools = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tools)


def _run(root, name, results, eval_split="holdout", seconds=None, method="finetune"):
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps(
      {"method": method, "data": {"eval_split": eval_split, "source": "fashion_mnist"}}))
  if results is not None:
    (workdir / "results.json").write_text(json.dumps({"method": method, **results}))
  if seconds is not None:
    (root / f"{name}.seconds").write_text(str(seconds))


def test_pick_takes_the_best_held_out_point_of_the_whole_grid(tmp_path):
  scores = dict.fromkeys(tools.GRID, 0.84)
  scores.update({"lr1e-3": 0.85, "lr2e-3": 0.86, "lr1e-3_nomix": 0.87})
  for suffix, acc in scores.items():
    _run(tmp_path, f"tune_mae_{suffix}", {"eval_accuracy": acc})
  assert tools.pick(str(tmp_path), "tune_mae") == tools.GRID["lr1e-3_nomix"]


def test_pick_among_named_points_ignores_the_rest_of_the_grid(tmp_path):
  _run(tmp_path, "tune_mae_lr4e-3_nomix", {"eval_accuracy": 0.89})
  _run(tmp_path, "tune_mae_lr4e-3_nomix_ra", {"eval_accuracy": 0.90})
  assert tools.pick(str(tmp_path), "tune_mae", ["lr4e-3_nomix", "lr4e-3_nomix_ra"]) == [
      *tools.GRID["lr4e-3_nomix"], "--config.data.rand_augment=rand-m9-mstd0.5-inc1",
      "--config.data.random_erasing=0.25"]
  with pytest.raises(SystemExit, match="no grid point lr4e-3_ra"):
    tools.pick(str(tmp_path), "tune_mae", ["lr4e-3_ra"])


def test_pick_refuses_a_partial_grid_and_a_test_split(tmp_path):
  _run(tmp_path, "tune_mae_lr1e-3", {"eval_accuracy": 0.9})
  with pytest.raises(SystemExit, match="not finished: no .*tune_mae_lr2e-3"):
    tools.pick(str(tmp_path), "tune_mae")
  for suffix in list(tools.GRID)[1:]:
    _run(tmp_path, f"tune_mae_{suffix}", {"eval_accuracy": 0.5}, eval_split="test")
  with pytest.raises(SystemExit, match="not scored on the held-out split"):
    tools.pick(str(tmp_path), "tune_mae")


def test_pick_epochs_takes_the_best_held_out_length_ties_to_the_shorter(tmp_path):
  """The low-label rows' own lengths: the best held-out score wins, a tie the shorter run."""
  for epochs, acc in (("60", 0.70), ("240", 0.78), ("960", 0.78)):
    _run(tmp_path, f"tune_labels1_scratch_e{epochs}", {"eval_accuracy": acc})
  assert tools.pick_epochs(str(tmp_path), "tune_labels1_scratch", ["60", "240", "960"]) == "240"
  assert tools.pick_epochs(str(tmp_path), "tune_labels1_scratch", ["960", "60"]) == "960"
  with pytest.raises(SystemExit, match="not finished: no .*tune_labels1_scratch_e30"):
    tools.pick_epochs(str(tmp_path), "tune_labels1_scratch", ["30", "60"])
  _run(tmp_path, "tune_labels1_mae_e60", {"eval_accuracy": 0.9}, eval_split="test")
  with pytest.raises(SystemExit, match="not scored on the held-out split"):
    tools.pick_epochs(str(tmp_path), "tune_labels1_mae", ["60"])


def test_summary_lists_runs_and_seed_means(tmp_path):
  for seed, acc in enumerate((0.91, 0.92, 0.93)):
    # The final runs keep data.eval_split "" (the source's test split), as real ones do.
    _run(tmp_path, f"ft_mae_s{seed}", {"eval_accuracy": acc}, eval_split="", seconds=4800)
  _run(tmp_path, "probe_mae", {"eval_split": "test", "knn_top1_cls": 0.85,
                               "knn_top1_gap": 0.8541, "probe_top1_cls": 0.8605,
                               "probe_top1_gap": 0.8742}, seconds=850, method="probe")
  _run(tmp_path, "probe_mae_blocks", {"eval_split": "test", "knn_top1_cls": 0.85,
                                      "knn_top1_gap": 0.86, "probe_top1_cls": 0.87,
                                      "probe_top1_gap": 0.88, "probe_layer_cls": 4,
                                      "probe_layer_gap": 0}, seconds=65, method="probe")
  _run(tmp_path, "mae_e50", None, method="mae")
  (tmp_path / "mae_e50" / "encoder").mkdir()
  (tmp_path / "mae_e50" / "encoder" / "model.json").write_text("{}")
  _run(tmp_path, "unfinished", None)
  _run(tmp_path, "ft_simmim_s0", {"eval_accuracy": 0.9}, eval_split="", seconds=60)
  table = tools.summary(str(tmp_path)).splitlines()
  assert "| probe_mae | probe | test | 85.00 / 85.41 | 86.05 / 87.42 |  | 14m10s |" in table
  assert ("| probe_mae_blocks | probe (blocks 4 / 0) | test | 85.00 / 86.00 | 87.00 / 88.00 |  | "
          "1m05s |") in table
  assert "| ft_mae_s1 | finetune | test |  |  | 92.00 | 1h20m |" in table
  assert "| mae_e50 | mae |  |  |  |  |  |" in table
  assert not any("unfinished" in line for line in table)
  assert table[-2:] == ["| ft_mae_s* | 3 | 92.00 +- 1.00 |",
                        "| ft_simmim_s* | 1 | 90.00 (one seed: no spread) |"]


def test_status_lists_the_started_runs_that_have_not_finished(tmp_path):
  """What a rerun resumes: each unfinished run's last logged step of its schedule, its newest
  checkpoint, its seconds so far and whether a process trains it now; finished runs and
  folders that are not runs are left out."""
  import subprocess
  import sys
  _run(tmp_path, "ft_done_s0", {"eval_accuracy": 0.9}, eval_split="", seconds=60)
  _run(tmp_path, "ft_stopped_s0", None, seconds=1276)
  _run(tmp_path, "ft_running_s0", None)
  _run(tmp_path, "ft_new_s0", None)  # config.json written, nothing logged yet
  (tmp_path / "not_a_run").mkdir()
  (tmp_path / "commands.txt").write_text("python -m mim_jax.main ...\n")
  for name, steps, saved in (("ft_stopped_s0", (50, 100), (60, 100)),
                             ("ft_running_s0", (50,), ())):
    workdir = tmp_path / name
    (workdir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in steps) + "{cut sho")
    for step in saved:
      (workdir / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / f"{name}.log").write_text("... schedule 300 steps, training to step 300\n"
                                           "... resumed; schedule 3840 steps, training\n"
                                           "step 50/3840 (1.3%) | ... | ETA ?\n"
                                           "step 100/3840 (2.6%) | ... | ETA 1:02:03\n")
  # Named relative to the trainer's working directory, as a relative ROOT gives it.
  trainer = subprocess.Popen(
      [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)",
       "--workdir=./ft_running_s0"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
  try:
    # Popen returns once exec has begun, before the kernel has set the new command line
    # (/proc/PID/cmdline reads empty for a moment): wait for the interpreter to run.
    assert trainer.stdout.readline() == "up\n"
    for root in (str(tmp_path), str(tmp_path) + "//"):
      table = tools.status(root).splitlines()
      assert table[2:] == ["| ft_new_s0 |  |  |  |  | no |",
                           "| ft_running_s0 | 50 | 3840 |  |  | yes (1:02:03) |",
                           "| ft_stopped_s0 | 100 | 3840 | 100 | 1276 | no |"], table
  finally:
    trainer.kill()
    trainer.wait()


@requires_fmnist
def test_matched_epochs_spends_the_pre_training_flops_on_fine_tuning(tmp_path):
  """50 MAE epochs on 55,000 images of configs/mae_fmnist.py, counted by hand per image
  (2 FLOPs per multiply-add): encoder on 12 visible patches + cls, 6 blocks 128 wide (MLP
  512) = 31.24 MFLOPs; decoder (embedding 128 -> 64 of the 13 encoded tokens = 0.21, 2
  blocks 64 wide with MLP 256 over 50 tokens = 11.11, prediction head to 16 pixels of 49
  patches = 0.10) = 11.42 MFLOPs; a fine-tuning image: the encoder on all 49 patches + cls =
  125.85 MFLOPs. 3x forward each, so the pre-training buys
  50 * 55,000 * 42.66 / (60,000 * 125.85) = 15.54 fine-tuning epochs: 15 + 15.54 -> 31."""
  spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / "mae_fmnist.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.num_epochs = 50
  config.data.holdout = 5000
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  assert tools.matched_epochs(str(tmp_path), 15) == 31


@requires_fmnist
def test_a_kept_curve_stands_in_for_a_run_folder_that_is_gone(tmp_path, monkeypatch):
  """`keep` records a run's config, k-NN, training and evaluation rows (and the pixel line) in
  docs/curves: the curves' plots and the compute-matched epochs read the record once the run's
  folder went with its machine, the same as from the folder."""
  monkeypatch.setattr(tools, "CURVES", str(tmp_path / "curves"))
  root = tmp_path / "root"
  run = root / "mae_e50"
  run.mkdir(parents=True)
  config = json.loads((REPO / "docs" / "curves" / "mae_e50.json").read_text())["config"]
  (run / "config.json").write_text(json.dumps(config))
  rows = [{"step": 10, "loss": 0.9, "loss_mean": 0.95, "accuracy": 0.5, "grad_norm": 2.0},
          {"step": 1070, "knn_top1_cls": 0.81, "knn_top1_gap": 0.8, "knn_top5_cls": 0.97},
          {"step": 1070, "eval_accuracy": 0.9, "eval_loss": 0.3, "eval_top5": 0.99}]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "knn_pixels_holdout").mkdir()
  (root / "knn_pixels_holdout" / "results.json").write_text('{"knn_top1_pixels": 0.86}')
  # Not finished (no results.json): its curve would stop where the run stands.
  with pytest.raises(SystemExit, match="mae_e50: has not finished"):
    tools.keep(str(root), "mae_e50")
  (run / "results.json").write_text('{"knn_top1_cls": 0.81}')
  (root / "mae_e50.seconds").write_text("4356\n")
  assert [pathlib.Path(p).name for p in tools.keep(str(root), "mae_e50")] == [
      "mae_e50.json", "knn_pixels_holdout.json"]
  assert json.loads((tmp_path / "curves" / "mae_e50.json").read_text())["seconds"] == "4356"
  from_folder = tools.run_record(str(root), "mae_e50")
  assert from_folder["knn"] == [{"step": 1070, "knn_top1_cls": 0.81, "knn_top1_gap": 0.8}]
  # The training and evaluation rows docs/plot_finetune_loss.py draws, cut to their keys.
  assert from_folder["train"] == [{"step": 10, "loss_mean": 0.95, "accuracy": 0.5}]
  assert from_folder["eval"] == [{"step": 1070, "eval_accuracy": 0.9, "eval_loss": 0.3}]
  gone = tmp_path / "elsewhere"
  kept = tools.run_record(str(gone), "mae_e50")
  assert all(kept[k] == from_folder[k] for k in ("knn", "train", "eval"))
  assert kept["config"] == config
  # results.md's training-curve tables: window means of those rows, from the record.
  assert tools.windows(str(gone), "mae_e50") == [(1, 10, 0.95, 50.0)]
  assert "keep" in kept["source"]
  assert tools.matched_epochs(str(gone / "mae_e50"), 30) == tools.matched_epochs(str(run), 30)
  with pytest.raises(SystemExit, match="no run folder .* and no record"):
    tools.run_record(str(gone), "simmim_e30")


def test_lowlabel_lengths_reads_finished_tuning_runs_and_their_records(tmp_path, monkeypatch):
  """The held-out points of docs/plot_lowlabel.py: finished runs only (a run still training has
  no score yet), a kept record where the folder is gone, and no run scored on another split."""
  monkeypatch.setattr(tools, "CURVES", str(tmp_path / "curves"))
  root = tmp_path / "R"
  for name, acc in (("tune_labels1_mae_e60", 0.82), ("tune_labels1_scratch_e60", 0.55),
                    ("tune_labels1_scratch_e240", 0.76), ("tune_labels10_mae_e30", 0.887)):
    _run(root, name, {"eval_accuracy": acc})
    (root / name / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "loss_mean": 1.0, "accuracy": 0.5}) + "\n"
        + json.dumps({"step": 9, "eval_accuracy": acc, "eval_loss": 0.5}) + "\n")
  _run(root, "tune_labels1_mae_e240", None)  # still training: left out
  points = tools.lowlabel_lengths(str(root))
  assert {pct: {init: [(e, round(a, 6)) for e, a in pts] for init, pts in by_init.items()}
          for pct, by_init in points.items()} == {
      "1": {"mae": [(60, 82.0)], "scratch": [(60, 55.0), (240, 76.0)]},
      "10": {"mae": [(30, 88.7)]}}
  (tmp_path / "curves").mkdir()  # its record (as `keep` writes it), then the folder gone
  (tmp_path / "curves" / "tune_labels10_mae_e30.json").write_text(
      json.dumps(tools.run_record(str(root), "tune_labels10_mae_e30")))
  shutil.rmtree(root / "tune_labels10_mae_e30")
  assert tools.lowlabel_lengths(str(root))["10"] == {"mae": [(30, 88.7)]}
  _run(root, "tune_labels10_scratch_e30", {"eval_accuracy": 0.8}, eval_split="test")
  (root / "tune_labels10_scratch_e30" / "metrics.jsonl").write_text(
      json.dumps({"step": 9, "eval_accuracy": 0.8}) + "\n")
  with pytest.raises(SystemExit, match="tune_labels10_scratch_e30: no final evaluation on the "
                     "held-out split"):
    tools.lowlabel_lengths(str(root))


def test_the_length_grid_extends_while_its_longest_length_wins(tmp_path):
  """A length chosen at the grid's edge may only be the edge's: 4x the longest runs next, and
  again while it wins, unless that run would take more than the step budget."""
  def scored(epochs, acc):
    _run(tmp_path, f"tune_labels1_scratch_e{epochs}",
         {"eval_accuracy": acc, "step": 2 * int(epochs)})
  scored(60, 0.55)
  scored(240, 0.76)
  extend = lambda cap: tools.extended_epochs(str(tmp_path), "tune_labels1_scratch",
                                             ["60", "240"], 4, cap)
  assert extend(10_000) == (["60", "240"], "960")
  assert extend(1_919) == (["60", "240"], None)  # 4 x 480 steps: over the budget
  with pytest.raises(SystemExit, match="so 960 epochs run next"):
    tools.pick_length(str(tmp_path), "tune_labels1_scratch", ["60", "240"], 4, 10_000)
  scored(960, 0.78)  # won again: 3840 next
  assert extend(10_000) == (["60", "240", "960"], "3840")
  scored(3840, 0.78)  # a tie goes to the shorter: 960 is inside the grid now
  assert extend(10_000) == (["60", "240", "960", "3840"], None)
  assert tools.pick_length(str(tmp_path), "tune_labels1_scratch", ["60", "240"], 4,
                           10_000) == "960"
  assert tools.pick_length(str(tmp_path), "tune_labels1_scratch", ["60", "240"], 1,
                           10_000) == "240"  # factor 1: the grid as given
  # A results.json without its step could not bound the extension: refused, not doubled on.
  _run(tmp_path, "tune_labels10_mae_e30", {"eval_accuracy": 0.8})
  with pytest.raises(SystemExit, match="no 'step' to bound the grid's extension by"):
    tools.extended_epochs(str(tmp_path), "tune_labels10_mae", ["30"], 2, 10_000)


def test_sklearn_reference_with_the_probes_l2_solves_the_probes_objective(tmp_path):
  """`sklearn_pixels OUT DIR L2`: scikit-learn's fit with C = 1 / (L2 N) reaches the optimum of
  the probe's objective (mean cross-entropy + L2 / 2 |W|^2) on the same standardised pixels,
  so it scores what the probe's own L-BFGS does (tests/test_probe.py compares the weights)."""
  pytest.importorskip("sklearn")
  import numpy as np
  from test_data_labels import write_idx

  from mim_jax.data import idx
  from mim_jax.evaluate import logistic
  rng = np.random.default_rng(0)
  prototypes = 128 + rng.normal(0, 20, (3, 6, 6))
  data = {}
  for split, n in (("train", 300), ("test", 150)):
    labels = rng.integers(0, 3, n)
    noise = rng.normal(0, 90, (n, 6, 6))
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
    prefix = idx.FMNIST_PREFIXES[split]
    write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), images)
    write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    data[split] = (images.reshape(n, -1).astype(np.float32) / 255.0, labels.astype(np.int32))
  result = tools.sklearn_pixels(str(tmp_path / "out.json"), str(tmp_path), "1e-2")
  assert json.loads((tmp_path / "out.json").read_text()) == result
  assert result["C"] == pytest.approx(1 / (1e-2 * 300))
  (x, y), (xt, yt) = data["train"], data["test"]
  mean, scale = logistic.standardizer(x)
  params, info = logistic.fit((x - mean) * scale, y, 3, 1e-2, tol=1e-5)
  assert info.converged
  ours = logistic.accuracy(params, (xt - mean) * scale, yt)
  assert 0.5 < ours < 1.0  # a problem that is neither trivial nor hopeless
  assert result["test_top1"] == pytest.approx(ours, abs=1 / 150)
  # The same optimum of the same objective (accuracy alone hardly moves with the L2 strength).
  optimum = float(logistic._loss(params, (x - mean) * scale, y, 1e-2))
  assert result["objective"] == pytest.approx(optimum, rel=1e-4)


def test_the_mask_ratio_plot_reads_the_runs_of_today_s_ratio_section(tmp_path):
  """docs/plot_mask_ratio.py read only the first round's 3-epoch runs (lp_/knn_mae_r*, keys
  eval_accuracy / knn_top1), which the ratio section no longer writes: it drew nothing of it."""
  pytest.importorskip("matplotlib")
  spec = importlib.util.spec_from_file_location("plot", REPO / "docs" / "plot_mask_ratio.py")
  plot = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plot)

  def put(name, scores):
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(scores))
  put("lp_mae_r0.5", {"eval_accuracy": 0.7})
  assert plot.series(str(tmp_path))[1].startswith("MAE pre-training, 3 epochs")
  put("probe_mae_e50", {"probe_top1_gap": 0.874, "knn_top1_gap": 0.854})
  put("probe_mae_e50_r0.9", {"probe_top1_gap": 0.86, "knn_top1_gap": 0.84})
  put("ft_mae_r0.9_s0", {"eval_accuracy": 0.92})
  drawn, title = plot.series(str(tmp_path))
  assert title.startswith("MAE pre-training, 50 epochs")
  probe, knn, finetune = (points for _, points, _ in drawn)
  assert probe[0.75] == pytest.approx(87.4) and probe[0.9] == pytest.approx(86.0)
  assert knn[0.9] == pytest.approx(84.0) and finetune[0.9] == pytest.approx(92.0)
  assert finetune[0.75] is None and probe[0.5] is None
  plot.main(str(tmp_path), str(tmp_path / "ratio.png"))
  assert (tmp_path / "ratio.png").stat().st_size > 0
