"""Logs a researcher can read: JSON lines, TensorBoard scalars/images and a progress line.

Files under `workdir`:
  metrics.jsonl   one JSON object per logged step, {"step": int, name: float | null, ...};
                  appended to, so a resumed run continues the same file (in a gs:// workdir
                  the file is rewritten whole at most every REMOTE_UPLOAD_SECONDS and at every
                  flush: Cloud Storage has no append)
  config.json     the run's config (pretty JSON)
  tensorboard/    tensorboardX event files (scalars, reconstruction images, config text)
"""

from __future__ import annotations

import datetime
import json
import math
import numbers
import os
import sys
import time
from typing import Any, Callable, Mapping

import numpy as np

from mim_jax import storage

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"
REMOTE_UPLOAD_SECONDS = 30.0


def _plain(value: Any) -> Any:
  """A JSON-safe Python value: numpy/JAX scalars -> int/float, non-finite floats -> None.

  JSON has no NaN/Infinity (json.dumps would write the invalid token `NaN`), so a diverged
  loss is written as null. Nested dicts/lists/tuples are converted recursively (tuples become
  lists); anything else that JSON cannot hold becomes its str().
  """
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, (bool, str)):
    return value
  if hasattr(value, "__array__") and np.ndim(value) == 0:  # numpy or JAX scalar
    value = np.asarray(value).item()
  elif hasattr(value, "__array__"):
    return _plain(np.asarray(value).tolist())
  if isinstance(value, bool):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    return value if math.isfinite(value) else None
  return str(value)


class _RemoteLines:
  """An append-only text file in Cloud Storage, which has no append: the lines are kept and
  the object rewritten whole, at most every `every` seconds and at each `flush`.

  The trainer flushes before each checkpoint, so the rows up to a checkpoint are stored
  before it; rows logged after it are recomputed by a resumed run anyway.
  """

  def __init__(self, path: str, every: float = REMOTE_UPLOAD_SECONDS):
    self.path, self.every = path, every
    text = storage.read_text(path) if storage.exists(path) else ""
    if text and not text.endswith("\n"):
      text += "\n"
    self._parts = [text]  # joined only to upload: appending to one string is quadratic
    self._dirty, self._uploaded = False, time.monotonic()

  def write(self, text: str) -> None:
    """Appends `text`; uploads when the last upload is `every` seconds old (an upload per
    row would dominate a fast loop)."""
    self._parts.append(text)
    self._dirty = True
    self.flush(force=False)

  def flush(self, force: bool = True) -> None:
    if self._dirty and (force or time.monotonic() - self._uploaded >= self.every):
      self._parts = ["".join(self._parts)]
      storage.write_text(self.path, self._parts[0])
      self._dirty, self._uploaded = False, time.monotonic()

  def close(self) -> None:
    self.flush()


def _summary_writer_class():
  """tensorboardX's SummaryWriter (pure Python protobufs, never TensorFlow), imported without
  PyTorch. When torch is installed, importing tensorboardX imports it too, only so that it can
  accept torch tensors, which this writer never passes: 1.5-3.7 s and a few hundred MB in every
  training process (and every host of a multi-host run). A process that has imported torch
  already keeps it; torch stays importable afterwards."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError while tensorboardX loads
    try:
      import tensorboardX  # noqa: F401
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter
  return SummaryWriter


def config_text(config: Mapping[str, Any]) -> str:
  """The text of a run's config.json: plain JSON (tuples as lists, numpy values as numbers)."""
  return json.dumps(_plain(config), indent=2, sort_keys=True, allow_nan=False)


class MetricWriter:
  """Appends metrics to `workdir/metrics.jsonl` and TensorBoard; a no-op when not enabled.

  Use `enabled=False` on non-zero processes of a multi-host run: nothing is created or
  written. `tensorboard=False` keeps only the JSON files. Usable as a context manager.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    storage.makedirs(workdir)
    path = os.path.join(workdir, METRICS_FILE)
    # Append mode: a resumed run continues the same file instead of erasing its history; line
    # buffered, so a crash or a `tail -f` sees every logged step.
    self._jsonl = (_RemoteLines(path) if storage.is_url(workdir)
                   else open(path, "a", buffering=1))
    if tensorboard:
      self._tb = _summary_writer_class()(logdir=os.path.join(workdir, TENSORBOARD_DIR))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Appends {"step": step, **scalars} as one JSON line and adds TensorBoard scalars."""
    if not self.enabled:
      return
    step = int(step)
    # `step` stays the argument even if `scalars` has a "step" entry of its own.
    row = {"step": step}
    row.update((str(k), _plain(v)) for k, v in scalars.items() if k != "step")
    self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        # TensorBoard plots NaN/inf itself, so it gets the raw value; non-numbers are skipped.
        if key != "step" and _is_real(value):
          self._tb.add_scalar(str(key), float(np.asarray(value)), step)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """Adds uint8 image [H, W, 3] to TensorBoard (no-op without TensorBoard)."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(tag, np.asarray(image), int(step), dataformats="HWC")

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    """Writes `workdir/config.json` (pretty, nested dicts kept) and a TensorBoard text summary."""
    if not self.enabled:
      return
    text = config_text(config)
    storage.write_text(os.path.join(self.workdir, CONFIG_FILE), text + "\n")
    if self._tb is not None:
      # Indented by 4 spaces: TensorBoard renders text summaries as markdown code blocks.
      self._tb.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      if self._tb is not None:
        self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files; later calls are no-ops."""
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
      self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _is_real(value: Any) -> bool:
  """Whether `value` is a real number (Python, numpy or JAX scalar), NaN included."""
  if value is None or isinstance(value, (str, bytes)):
    return False
  try:
    dtype = np.asarray(value).dtype
  except Exception:  # pylint: disable=broad-except
    return False
  return np.ndim(value) == 0 and (np.issubdtype(dtype, np.integer) or
                                  np.issubdtype(dtype, np.floating))


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl` in file order (null values come back as None).

  A final line cut short by a crash mid-write is skipped rather than failing the whole read.
  """
  rows = []
  lines = storage.read_text(os.path.join(workdir, METRICS_FILE)).splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise
  return rows


def _duration(seconds: float) -> str:
  """Seconds -> H:MM:SS (days shown when needed)."""
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class ProgressLogger:
  """One line per logged step, e.g.

    step 1200/20000 (6.0%) | loss 0.4123 | lr 1.20e-04 | 1532.4 img/s | elapsed 0:03:12 |
    ETA 0:49:37

  The rate behind the ETA is measured from the first `log` call, not from process start, so
  compilation before the first logged step does not distort it. `elapsed` counts from the
  logger's creation (this process). `time_fn` is injectable for tests.
  """

  def __init__(self, total_steps: int, *, start_step: int = 0,
               log_fn: Callable[[str], None] = print,
               time_fn: Callable[[], float] = time.monotonic):
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.log_fn = log_fn
    self._time = time_fn
    self._created = time_fn()
    self._first: tuple[int, float] | None = None  # (step, time) of the first log call

  def _eta(self, step: int, now: float) -> str:
    if step >= self.total_steps:
      return "0:00:00"
    first_step, first_time = self._first
    if step <= first_step or now <= first_time:
      return "?"  # no rate measured yet
    rate = (step - first_step) / (now - first_time)
    return _duration((self.total_steps - step) / rate)

  def format(self, step: int, scalars: Mapping[str, Any]) -> str:
    """The progress line for `step` (also starts the rate clock on the first call)."""
    step = int(step)
    now = self._time()
    if self._first is None:
      self._first = (step, now)
    # total_steps <= 0 (or a run resumed at/after its end) counts as complete, not 1/0.
    frac = min(step / self.total_steps, 1.0) if self.total_steps > 0 else 1.0
    parts = [f"step {step}/{self.total_steps} ({100.0 * frac:.1f}%)"]
    if "loss" in scalars:
      parts.append(f"loss {_number(scalars['loss'], '.4f')}")
    for key in ("learning_rate", "lr"):
      if key in scalars:
        parts.append(f"lr {_number(scalars[key], '.2e')}")
        break
    if "images_per_sec" in scalars:
      parts.append(f"{_number(scalars['images_per_sec'], '.1f')} img/s")
    parts.append(f"elapsed {_duration(now - self._created)}")
    parts.append(f"ETA {self._eta(step, now)}")
    return " | ".join(parts)

  def log(self, step: int, scalars: Mapping[str, Any]) -> None:
    self.log_fn(self.format(step, scalars))


def _number(value: Any, spec: str) -> str:
  """Formats a scalar (None for a null metric); shows 'nan'/'inf' as such."""
  if value is None:
    return "nan"
  try:
    return format(float(np.asarray(value)), spec)
  except (TypeError, ValueError):
    return str(value)
