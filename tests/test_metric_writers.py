"""Tests for mim_jax.training.metric_writers: JSON lines, TensorBoard files and the progress line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from mim_jax.training import metric_writers


def _event_files(workdir):
  tb = os.path.join(workdir, "tensorboard")
  if not os.path.isdir(tb):
    return []
  return [os.path.join(tb, f) for f in os.listdir(tb) if f.startswith("events.out.tfevents.")]


def test_metrics_append_across_writers_resume(tmp_path):
  workdir = str(tmp_path / "run")
  with metric_writers.MetricWriter(workdir, tensorboard=False) as w:
    w.write_scalars(1, {"loss": np.float32(0.5), "learning_rate": 1e-4})
    w.write_scalars(2, {"loss": 0.25, "skipped_images": np.int64(3)})
  # A resumed run opens a new writer on the same workdir: it must append, not truncate.
  with metric_writers.MetricWriter(workdir, tensorboard=False) as w:
    w.write_scalars(3, {"loss": 0.125})
  rows = metric_writers.read_metrics(workdir)
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert rows[0] == {"step": 1, "loss": 0.5, "learning_rate": 1e-4}
  assert rows[1]["skipped_images"] == 3 and isinstance(rows[1]["skipped_images"], int)


def test_non_finite_written_as_null(tmp_path):
  workdir = str(tmp_path)
  with metric_writers.MetricWriter(workdir, tensorboard=False) as w:
    w.write_scalars(7, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "ok": 1.0})
  with open(tmp_path / "metrics.jsonl") as f:
    line = f.read()
  assert "NaN" not in line and "Infinity" not in line
  # Strict parse: reject the non-standard tokens Python's json would otherwise accept.
  row = json.loads(line, parse_constant=lambda t: pytest.fail(f"invalid JSON token {t}"))
  assert row == {"step": 7, "loss": None, "grad_norm": None, "ok": 1.0}


def test_metrics_flushed_each_call(tmp_path):
  w = metric_writers.MetricWriter(str(tmp_path), tensorboard=False)
  w.write_scalars(1, {"loss": 1.0})
  # Readable before close: a crash or `tail -f` still sees the step.
  assert metric_writers.read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0}]
  w.close()


def _events(path: str):
  """The records of a TensorBoard event file (TFRecord framing: an 8-byte length, its 4-byte
  CRC, the payload, the payload's CRC), parsed as Event protos."""
  from tensorboardX.proto import event_pb2
  with open(path, "rb") as f:
    data = f.read()
  at = 0
  while at < len(data):
    length = int.from_bytes(data[at:at + 8], "little")
    yield event_pb2.Event.FromString(data[at + 12:at + 12 + length])
    at += 12 + length + 4


def test_tensorboard_event_files_and_hparams(tmp_path):
  workdir = str(tmp_path)
  config = {"model": {"variant": "mu/4", "patch": (4, 4)}, "lr": 1.5e-4, "seed": 0}
  with metric_writers.MetricWriter(workdir) as w:
    w.write_hparams(config)
    w.write_scalars(1, {"loss": 0.5, "note": "text is skipped by TensorBoard"})
    w.write_image(1, "reconstructions", np.zeros((8, 12, 3), np.uint8))
  files = _event_files(workdir)
  assert files and all(os.path.getsize(f) > 0 for f in files)
  # What the event files hold (a writer always writes a version record, so a size says
  # nothing): the scalar, the image and the config text, and no string scalar.
  tags = {}
  for event in (e for f in files for e in _events(f)):
    for value in event.summary.value:
      kind = value.WhichOneof("value")
      tags[value.tag] = (event.step, value.simple_value if kind == "simple_value" else kind)
  assert tags == {"loss": (1, 0.5), "reconstructions": (1, "image"),
                  "config/text_summary": (0, "tensor")}, tags
  with open(tmp_path / "config.json") as f:
    text = f.read()
  assert "\n  " in text  # pretty-printed
  assert json.loads(text) == {"model": {"variant": "mu/4", "patch": [4, 4]}, "lr": 1.5e-4,
                              "seed": 0}


def test_tensorboard_without_loading_torch(tmp_path):
  """tensorboardX imports torch when it is installed (seconds and hundreds of MB per training
  process); the writer loads it without, and torch stays importable after."""
  script = f"""
import importlib.util, os, sys
import numpy as np
from mim_jax.training import metric_writers
with metric_writers.MetricWriter({str(tmp_path)!r}) as w:
  w.write_scalars(1, {{"loss": 0.5}})
  w.write_image(1, "reconstructions", np.zeros((4, 4, 3), np.uint8))
assert "torch" not in sys.modules, "torch was imported"
assert any(f.startswith("events.out.tfevents.") for f in os.listdir({str(tmp_path / "tensorboard")!r}))
if importlib.util.find_spec("torch") is not None:
  import torch
  print("torch", torch.__version__)
print("OK")
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr[-3000:]


def test_disabled_writer_is_a_no_op(tmp_path):
  workdir = tmp_path / "not_created"
  w = metric_writers.MetricWriter(str(workdir), enabled=False)
  w.write_hparams({"a": 1})
  w.write_scalars(1, {"loss": 1.0})
  w.write_image(1, "x", np.zeros((4, 4, 3), np.uint8))
  w.flush()
  w.close()
  assert not workdir.exists()


class _Clock:
  """A fake time source the test advances by hand."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_progress_line_format_and_eta_ignores_time_before_first_log():
  lines, clock = [], _Clock()
  logger = metric_writers.ProgressLogger(20000, start_step=1000, log_fn=lines.append,
                                         time_fn=clock)
  clock.now += 120.0  # compilation: must not slow the measured rate
  logger.log(1100, {"loss": 0.5})
  assert "ETA ?" in lines[-1]  # no rate yet
  clock.now += 100.0  # 100 steps in 100 s -> 1 step/s
  logger.log(1200, {"loss": 0.41234, "learning_rate": 1.2e-4, "images_per_sec": 1532.42})
  line = lines[-1]
  assert line.startswith("step 1200/20000 (6.0%)")
  assert "loss 0.4123" in line
  assert "lr 1.20e-04" in line
  assert "1532.4 img/s" in line
  assert "elapsed 0:03:40" in line
  assert line.endswith("ETA 5:13:20")  # 18800 steps at 1 step/s (120 s compile excluded)


def test_progress_without_optional_metrics_and_finished_runs():
  lines = []
  metric_writers.ProgressLogger(10, log_fn=lines.append).log(3, {})
  assert "step 3/10 (30.0%)" in lines[-1]
  assert "loss" not in lines[-1] and "img/s" not in lines[-1]
  # total_steps <= start_step: nothing to do, but logging must not divide by zero.
  metric_writers.ProgressLogger(0, start_step=5, log_fn=lines.append).log(5, {"loss": math.nan})
  assert "step 5/0 (100.0%)" in lines[-1] and "loss nan" in lines[-1]
  assert "ETA 0:00:00" in lines[-1]
