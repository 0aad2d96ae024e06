"""Logs a researcher can read: JSON lines, TensorBoard scalars/images and a progress line."""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import numpy as np


def _plain(value: Any) -> Any:
  """Python scalars for JSON; non-finite floats become null (JSON has no NaN)."""
  if isinstance(value, (np.generic, np.ndarray)):
    value = np.asarray(value).item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricWriter:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard; a no-op when not enabled.

  Appending (not truncating) lets a resumed run continue the same files.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pure Python; no TensorFlow
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, float(value), int(step))

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """image uint8 [H, W, 3]."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, image, int(step), dataformats="HWC")

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    with open(os.path.join(self.workdir, "config.json"), "w") as f:
      f.write(text + "\n")
    if self._tb is not None:
      self._tb.add_text("config", f"```\n{text}\n```", 0)

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
      self.enabled = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class ProgressLogger:
  """One line per logged step with loss, lr, images/s, elapsed time and ETA.

  The rate is measured from the first `log` call, so compilation before it does not distort
  the ETA.
  """

  def __init__(self, total_steps: int, *, start_step: int = 0,
               log_fn: Callable[[str], None] = print):
    self.total_steps = total_steps
    self.log_fn = log_fn
    self._start = time.perf_counter()
    self._first: tuple[int, float] | None = None

  def format(self, step: int, scalars: Mapping[str, Any]) -> str:
    now = time.perf_counter()
    if self._first is None:
      self._first = (step, now)
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / max(self.total_steps, 1):.1f}%)"]
    if "loss" in scalars:
      parts.append(f"loss {float(scalars['loss']):.4f}")
    if "learning_rate" in scalars:
      parts.append(f"lr {float(scalars['learning_rate']):.2e}")
    if "images_per_sec" in scalars:
      parts.append(f"{float(scalars['images_per_sec']):.1f} img/s")
    parts.append(f"elapsed {_duration(now - self._start)}")
    first_step, first_time = self._first
    if step > first_step and self.total_steps > step:
      rate = (step - first_step) / (now - first_time)
      parts.append(f"ETA {_duration((self.total_steps - step) / rate)}")
    return " | ".join(parts)

  def log(self, step: int, scalars: Mapping[str, Any]) -> None:
    self.log_fn(self.format(step, scalars))
