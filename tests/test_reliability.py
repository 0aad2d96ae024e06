"""Fault injection: kill -9, preemption, NaNs, bad data, failing storage, untrusted files.

Each test proves one guarantee of docs/reliability.md and fails if it breaks. Faults are
injected from the test side only (signals, monkeypatched I/O, a wrapped train step), never
through switches in the library.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import json
import logging
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from mim_jax import data, main, storage
from mim_jax.config.errors import ConfigError
from mim_jax.data import transforms
from mim_jax.methods import base
from mim_jax.training import checkpoint, metric_writers, run_errors, workdir_lock
from mim_jax.training import loop as train
from mim_jax.training import step as step_lib

from conftest import FAST_COMPILE_XLA_FLAGS, REPO, tiny_config, tiny_mae_config

RUNLOCAL = f"--config={REPO}/configs/mae_vitb.py:runlocal"
# 12 steps of a 16-step schedule (so every step changes the parameters), a checkpoint every 3.
KILL_RUN_FLAGS = ("--config.num_epochs=2", "--config.total_steps=12",
                  "--config.checkpoint_every=3", "--config.keep_checkpoints=10",
                  "--config.log_every=1", "--config.viz_every=0",
                  "--config.export_encoder=False")

# `python -c` launcher that SIGKILLs its own process in the middle of writing checkpoint
# KILL_STEP: after every item is written but before the atomic rename ("commit"), or while
# the data-iterator item is being written ("data"). Then it runs the normal command line.
KILL_DURING_WRITE = r"""
import os, signal
import grain
from orbax.checkpoint._src.path import atomicity
step, point = os.environ["KILL_STEP"], os.environ["KILL_POINT"]
def die():
  os.kill(os.getpid(), signal.SIGKILL)
finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize_or_die(self, *args, **kwargs):
  if point == "commit" and self.get_final().name == step:
    die()
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die
save = grain.checkpoint.CheckpointHandler.save
def save_or_die(self, directory, *args, **kwargs):
  if point == "data" and directory.parent.name.startswith(step + "."):
    die()
  return save(self, directory, *args, **kwargs)
grain.checkpoint.CheckpointHandler.save = save_or_die
from absl import app
from mim_jax import main
main.define_flags(main.FLAGS)
app.run(main.main, flags_parser=main.parse_flags)
"""


# ----------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
              XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)


def _start(args: list[str], log_path: pathlib.Path, env: dict | None = None,
           launcher: list[str] | None = None) -> subprocess.Popen:
  """`python -m mim_jax.main ARGS` (or `launcher` ARGS) with stdout + stderr in `log_path`."""
  cmd = [sys.executable, *(launcher or ["-m", "mim_jax.main"]), *args]
  return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=open(log_path, "w"),
                          stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 180) -> None:
  """Polls `condition()` until true; fails if `proc` exits first or time runs out."""
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"the run exited ({proc.returncode}) before the fault"
    assert time.time() < deadline, "timed out waiting for the moment to inject the fault"
    time.sleep(0.02)


def _kill9(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL


def _logged_steps(workdir: pathlib.Path) -> set[int]:
  path = workdir / metric_writers.METRICS_FILE
  if not path.exists():
    return set()
  return {row["step"] for row in metric_writers.read_metrics(str(workdir))}


def _committed(workdir: pathlib.Path) -> list[int]:
  folder = workdir / "checkpoints"
  if not folder.exists():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _partial(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").glob(f"*{checkpoint.TMP_SUFFIX}*"))


def _saved_params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
  state = checkpoint.restore_on_host(str(workdir / "checkpoints" / str(step) / "state"))
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
  return [(row["step"], row["loss"]) for row in metric_writers.read_metrics(str(workdir))]


# ----------------------------------------------------------------------------- 1. kill -9


@pytest.mark.long
def test_kill9_at_random_moments_resumes_bit_exact(tmp_path):
  """Killed during a step, at start-up and while a checkpoint is written, then resumed: same
  final parameters and per-step losses as an uninterrupted run; no partial checkpoint used."""
  rng = random.Random(8)  # the moments are random but fixed: the test is reproducible
  straight, chain = tmp_path / "straight", tmp_path / "chain"
  args = lambda w: [RUNLOCAL, f"--workdir={w}", *KILL_RUN_FLAGS]  # noqa: E731
  baseline = _start(args(straight), tmp_path / "straight.log")

  # 1. During a step: as soon as a random step has been logged (7+ steps before the end, so
  # the kill lands mid-training even on a slow machine).
  kill_step = rng.randint(4, 5)
  proc = _start(args(chain), tmp_path / "run1.log")
  _wait_for(lambda: kill_step in _logged_steps(chain), proc)
  _kill9(proc)

  # 2. During start-up: after the checkpoint is restored, before training starts.
  proc = _start(args(chain), tmp_path / "run2.log")
  _wait_for(lambda: "training to step" in (tmp_path / "run2.log").read_text(), proc)
  time.sleep(rng.uniform(0.0, 0.3))
  _kill9(proc)

  # 3. During the asynchronous write of a random later checkpoint.
  resume_step = max(_committed(chain), default=0)
  write_step = rng.choice([s for s in (3, 6, 9) if s > resume_step])
  point = rng.choice(["commit", "data"])
  proc = _start(args(chain), tmp_path / "run3.log",
                env=dict(_env(), KILL_STEP=str(write_step), KILL_POINT=point),
                launcher=["-c", KILL_DURING_WRITE])
  assert proc.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "run3.log").read_text()[-3000:]
  assert write_step not in _committed(chain)
  assert any(name.startswith(f"{write_step}.") for name in _partial(chain)), _partial(chain)

  # 4. Run to the end: resumes from the last complete checkpoint, ignoring the partial one.
  last_complete = max(_committed(chain), default=0)
  proc = _start(args(chain), tmp_path / "run4.log")
  assert proc.wait(timeout=300) == 0, (tmp_path / "run4.log").read_text()[-3000:]
  assert baseline.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
  log4 = (tmp_path / "run4.log").read_text()
  if last_complete:
    assert f"at step {last_complete}" in log4, log4[-3000:]
  assert _partial(chain) == []  # the half-written checkpoint was cleaned up

  for a, b in zip(_saved_params(straight, 12), _saved_params(chain, 12), strict=True):
    np.testing.assert_array_equal(a, b)
  # Every step logged once (rows after the resume point were rewound), losses bit-equal.
  assert _losses(chain) == _losses(straight)
  assert [s for s, _ in _losses(chain)] == list(range(1, 13))


# ----------------------------------------------------------------------------- 2. preemption


@pytest.mark.long
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """JAX's preemption sync: SIGTERM to process 1 only; both save the same step and exit 75."""
  from test_multiprocess import _free_port, _one_device_per_process_env
  workdir = tmp_path / "run"
  env = _one_device_per_process_env(PYTHONUNBUFFERED="1")
  port = _free_port()
  args = [RUNLOCAL, f"--workdir={workdir}", "--config.num_epochs=100000",
          "--config.total_steps=100000", "--config.checkpoint_every=1000", "--config.log_every=1", "--config.viz_every=0",
          f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  procs = [_start([*args, f"--process_id={i}"], logs[i], env=env) for i in range(2)]
  try:
    _wait_for(lambda: len(_logged_steps(workdir)) >= 3, procs[0], timeout=240)
    procs[1].send_signal(signal.SIGTERM)
    signalled = time.time()
    codes = [proc.wait(timeout=120) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  outputs = [log.read_text() for log in logs]
  assert codes == [75, 75], outputs[0][-2000:] + outputs[1][-2000:]
  assert time.time() - signalled < 60
  stops = [set(map(int, re.findall(r"checkpoint for step (\d+) written after SIGTERM", out)))
           for out in outputs]
  assert len(stops[0]) == 1 and stops[0] == stops[1], stops
  step = stops[0].pop()
  assert max(_logged_steps(workdir)) == step  # process 0 trained no further than the save
  assert sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]


def test_preemption_watcher_single_process_and_allgather_fallback(monkeypatch):
  """One process: SIGTERM sets the flag. Several without JAX's preemption service: the flags
  are all-gathered every `sync_every` steps, so a signal to any process stops all at once."""
  from mim_jax.training import preemption
  before = signal.getsignal(signal.SIGTERM)
  with preemption.PreemptionWatcher(start_step=0) as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.should_stop(2) and watcher.stopped_at == 2
  assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back

  gathered = []
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption, "_jax_preemption_service_running", lambda step: False)

  def allgather(flag):
    gathered.append(int(flag))
    return np.asarray([int(flag), 1])  # the other process was signalled
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather", allgather)
  with preemption.PreemptionWatcher(start_step=10, sync_every=4) as watcher:
    assert [watcher.should_stop(step) for step in (11, 12)] == [False, True]
  assert gathered == [0] and watcher.triggered


def test_a_first_ctrl_c_saves_as_a_preemption_notice_a_second_stops_at_once():
  """Ctrl-C lost every step since the last checkpoint (up to checkpoint_every - 1). The first
  now sets the flag (save at the step boundary, exit 75); the second is Python's again."""
  from mim_jax.training import preemption
  def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(50):  # Python runs the handler between bytecodes
      time.sleep(0.01)

  before = signal.getsignal(signal.SIGINT)
  with preemption.PreemptionWatcher(start_step=0) as watcher:
    assert not watcher.should_stop(1)
    ctrl_c()  # no KeyboardInterrupt: the flag
    assert watcher.should_stop(2)
    with pytest.raises(KeyboardInterrupt):
      ctrl_c()
  assert signal.getsignal(signal.SIGINT) == before
  # A background job of a script starts with SIGINT ignored: the watcher leaves it so.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    with preemption.PreemptionWatcher(start_step=0) as watcher:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, before)


# ----------------------------------------------------------------------------- 3. NaN / Inf


class _Quadratic(base.Method):
  """A toy method with a BatchNorm-like `extra` counter, to see what a skipped step keeps."""

  def init(self, rng, images):
    return {"w": jax.random.normal(rng, (images[0].size, 1))}, {"seen": jnp.zeros([])}

  def loss(self, params, extra, batch, rng, train=True):
    x = batch["image"].reshape(batch["image"].shape[0], -1)
    loss = jnp.mean(jnp.square(x @ params["w"] - 1.0))
    return loss, ({"loss": loss}, {"seen": extra["seen"] + x.shape[0]})


@pytest.mark.parametrize("accum,bad,guard", [(1, jnp.nan, "select"), (2, jnp.inf, "select"),
                                             (1, jnp.inf, "cond"), (2, jnp.nan, "cond")])
def test_nonfinite_step_changes_nothing_but_the_counters(accum, bad, guard):
  method, tx = _Quadratic(), optax.adamw(1e-2)
  state = step_lib.init_train_state(method, tx, jax.random.key(0), (1, 2, 2, 1))
  step = jax.jit(step_lib.make_train_step(method, tx, lambda s: 1e-2, accum,
                                          nonfinite_guard=guard))
  good = {"image": jnp.ones((4, 2, 2, 1))}
  poisoned = {"image": good["image"].at[1, 0, 0, 0].set(bad)}

  state, _ = step(state, good, jax.random.key(1))
  before = state
  state, metrics = step(state, poisoned, jax.random.key(1))
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state, before.extra)),
                  jax.tree.leaves((state.params, state.opt_state, state.extra)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert int(state.step) == 2 and int(metrics["nonfinite"]) == 1
  assert np.isnan(float(metrics["update_norm"]))  # no update was applied
  state, metrics = step(state, poisoned, jax.random.key(1))
  assert int(state.nonfinite_streak) == 2 and int(metrics["skipped_updates"]) == 2
  state, metrics = step(state, good, jax.random.key(1))
  assert int(state.nonfinite_streak) == 0 and int(state.skipped_updates) == 2
  assert int(metrics["nonfinite"]) == 0 and np.isfinite(float(metrics["loss"]))
  assert not np.array_equal(before.params["w"], state.params["w"])  # training went on


def test_both_nonfinite_guards_train_alike():
  """'cond' (the CPU default) and 'select' give the same states and metrics over finite,
  skipped and streak-held steps; a streak that reached `stop_streak` holds under both."""
  method, tx = _Quadratic(), optax.adamw(1e-2)
  good = {"image": jnp.ones((4, 2, 2, 1))}
  poisoned = {"image": good["image"].at[1, 0, 0, 0].set(jnp.nan)}
  batches = (good, poisoned, good, poisoned, poisoned, good)
  runs = {}
  for guard in step_lib.NONFINITE_GUARDS:
    state = step_lib.init_train_state(method, tx, jax.random.key(0), (1, 2, 2, 1))
    step = jax.jit(step_lib.make_train_step(method, tx, lambda s: 1e-2, stop_streak=2,
                                            nonfinite_guard=guard))
    rows = []
    for batch in batches:
      state, metrics = step(state, batch, jax.random.key(1))
      rows.append(metrics)
    runs[guard] = (state, rows)
  chex.assert_trees_all_equal(runs["cond"], runs["select"])
  state, rows = runs["cond"]
  assert [int(m["nonfinite"]) for m in rows] == [0, 1, 0, 1, 1, 1]  # the last held, finite
  assert step_lib.default_nonfinite_guard("") == "cond"  # the test process runs on the CPU
  with pytest.raises(ValueError, match="nonfinite_guard='where'"):
    step_lib.make_train_step(method, tx, lambda s: 1e-2, nonfinite_guard="where")


def test_schedules_run_on_applied_updates_after_a_skipped_step():
  """The optimizer's count (lr, weight decay) stops on a skipped step; the method's schedules
  (after_update's step) and the logged lr stop with it, so they stay on one clock (the logged
  lr was the global step's, and EMA / temperature schedules ran ahead by the skips)."""
  class Recording(_Quadratic):
    def after_update(self, params, extra, step):
      return {**extra, "clock": jnp.asarray(step, jnp.int32)}

  method = Recording()
  schedule = lambda s: 0.1 * (s + 1.0)  # noqa: E731
  tx = optax.sgd(schedule)
  state = step_lib.init_train_state(method, tx, jax.random.key(0), (1, 2, 2, 1))
  state = state.replace(extra={**state.extra, "clock": jnp.zeros([], jnp.int32)})
  step = jax.jit(step_lib.make_train_step(method, tx, schedule))
  good = {"image": jnp.ones((4, 2, 2, 1))}
  poisoned = {"image": good["image"].at[0, 0, 0, 0].set(jnp.nan)}
  rows = []
  for batch in (good, poisoned, poisoned, good, good):
    state, metrics = step(state, batch, jax.random.key(1))
    rows.append((int(state.extra["clock"]), float(metrics["learning_rate"])))
  count = int(optax.tree_utils.tree_get(state.opt_state, "count"))
  assert count == 3 and int(state.step) == 5  # 3 applied updates of 5 steps
  assert rows[-1] == (2, pytest.approx(schedule(2)))  # the update that made count 3 used lr(2)


def _poison_steps(monkeypatch, steps: set[int]) -> None:
  """Makes the images of the given (1-based) steps NaN inside the jitted train step."""
  make = step_lib.make_train_step
  bad = jnp.asarray(sorted(steps))

  def make_poisoned(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def poisoned(state, batch, rng):
      hit = jnp.any(state.step + 1 == bad)
      batch = dict(batch, image=jnp.where(hit, jnp.nan, batch["image"]))
      return step_fn(state, batch, rng)
    return poisoned
  monkeypatch.setattr(step_lib, "make_train_step", make_poisoned)


def test_nan_batches_are_skipped_counted_then_stop_the_run(tmp_path, monkeypatch):
  """One NaN batch is skipped and training goes on; 3 in a row stop the run (exit 3) with
  every checkpoint finite and the last one holding the last good parameters."""
  _poison_steps(monkeypatch, {2, 5, 6, 7, 8, 9, 10})
  workdir = tmp_path / "w"
  config = tiny_mae_config(total_steps=10, checkpoint_every=2, keep_checkpoints=10,
                           max_consecutive_nonfinite=3)
  with pytest.raises(run_errors.NonFiniteError, match=r"step 7: .*NaN/Inf for .*=3 steps in a row; the updates of the last 3 "):
    train.run(config, str(workdir))
  rows = {row["step"]: row for row in metric_writers.read_metrics(str(workdir))}
  assert rows[2]["nonfinite"] == 1 and rows[2]["loss"] is None  # NaN is logged as null
  assert rows[3]["nonfinite"] == 0 and rows[3]["skipped_updates"] == 1
  assert rows[7]["nonfinite_streak"] == 3 and rows[7]["skipped_updates"] == 4
  assert max(rows) == 7
  # Steps 5 and 6 were skipped, so checkpoint 6 holds the parameters of checkpoint 4. (Orbax
  # also saves the first step of a fresh run.)
  assert _committed(workdir) == [1, 2, 4, 6]
  for step in (1, 2, 4, 6):
    assert all(np.isfinite(p).all() for p in _saved_params(workdir, step))
  for a, b in zip(_saved_params(workdir, 4), _saved_params(workdir, 6), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_streak_between_two_logging_steps_still_stops_the_run(tmp_path, monkeypatch):
  """The loop reads the streak every log_every steps: steps 2-3 reach the limit of 2 and step
  4 would reset it, but the reached streak holds (steps 4 and 5 are skipped although finite),
  so the run stops at the logging step 5 with the parameters of step 1."""
  _poison_steps(monkeypatch, {2, 3})
  workdir = tmp_path / "w"
  config = tiny_mae_config(total_steps=10, log_every=5, checkpoint_every=100,
                           max_consecutive_nonfinite=2)
  with pytest.raises(run_errors.NonFiniteError, match=r"step 5: .*the updates of the last 4 "
                     r"steps were skipped, so the parameters are those of step 1"):
    train.run(config, str(workdir))
  rows = {row["step"]: row for row in metric_writers.read_metrics(str(workdir))}
  assert rows[5]["nonfinite_streak"] == 4 and rows[5]["skipped_updates"] == 4
  assert rows[5]["nonfinite"] == 1 and np.isfinite(rows[5]["loss"])  # finite, yet skipped


def test_a_notice_after_a_reached_streak_stops_the_run_without_a_checkpoint(tmp_path,
                                                                            monkeypatch):
  """SIGTERM after step 4, when steps 2-3 have reached the limit of 2 but no logging step has
  read the streak yet: the run ends as diverged (exit 3), not preempted (exit 75), and writes no
  checkpoint after the notice, so a rerun does not resume into the latched streak."""
  from mim_jax.training import preemption
  _poison_steps(monkeypatch, {2, 3})
  should_stop = preemption.PreemptionWatcher.should_stop

  def notice_after_step_4(self, step):
    if step == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return should_stop(self, step)
  monkeypatch.setattr(preemption.PreemptionWatcher, "should_stop", notice_after_step_4)
  workdir = tmp_path / "w"
  config = tiny_mae_config(total_steps=10, log_every=5, checkpoint_every=100,
                           max_consecutive_nonfinite=2)
  with pytest.raises(run_errors.NonFiniteError, match=r"step 4: .*the updates of the last 3 "
                     r"steps were skipped, so the parameters are those of step 1"):
    train.run(config, str(workdir))
  assert _committed(workdir) == [1]  # Orbax's save of a fresh run's first step, nothing later


def test_run_errors_map_to_exit_codes(monkeypatch, tmp_path, capsys):
  for error in (run_errors.NonFiniteError("diverged"), run_errors.CheckpointSaveError("disk"),
                ConfigError("config.x=1 is invalid"), data.IdxFormatError("truncated")):
    def fail(config, workdir, file_config=None, resume_with_changes=False, error=error):
      raise error
    monkeypatch.setattr(train, "run", fail)
    with pytest.raises(SystemExit) as exit_info:
      main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={tmp_path}"])
    expected = getattr(error, "exit_code", run_errors.EXIT_BAD_INPUT)
    assert exit_info.value.code == expected
    assert capsys.readouterr().err.strip() == f"error: {error}"
  assert (run_errors.NonFiniteError.exit_code, run_errors.CheckpointSaveError.exit_code) == (3, 4)
  # A preempted run is not an error, and not a finished run either.
  def preempted(config, workdir, file_config=None, resume_with_changes=False):
    raise run_errors.Preempted(7, workdir)
  monkeypatch.setattr(train, "run", preempted)
  with pytest.raises(SystemExit) as exit_info:
    main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={tmp_path}"])
  assert exit_info.value.code == run_errors.EXIT_PREEMPTED == 75
  err = capsys.readouterr().err.strip()
  assert err.startswith("stopped after a preemption notice") and "step 7" in err
  # `--help` (the module docstring) lists the codes as they are: 75 after SIGTERM, not 0.
  codes = " ".join(main.__doc__.split("Exit codes")[1].split())
  assert "0 finished;" in codes and "75 stopped after SIGTERM" in codes


# ----------------------------------------------------------------------------- 4. data faults


def _png(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_unusual_image_modes_are_converted_not_skipped(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(1, 255, (6, 5, 3), dtype=np.uint8)
  files = {
      "gray_alpha.png": Image.fromarray(rng.integers(1, 255, (6, 5, 2), dtype=np.uint8), "LA"),
      "rgba.png": Image.fromarray(rng.integers(1, 255, (6, 5, 4), dtype=np.uint8), "RGBA"),
      "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
      "palette.png": Image.fromarray(rgb).convert("P"),
      "gray16.png": Image.fromarray(rng.integers(1, 60000, (6, 5), dtype=np.uint16)),
  }
  for channels in (1, 3):
    decode = transforms.DecodeImage(channels=channels, on_bad_image="raise",
                                    skip_log_dir=str(tmp_path / "skips"))
    for name, image in files.items():
      image.save(tmp_path / name)
      out = decode.map({"path": str(tmp_path / name)})["image"]
      # 16-bit grayscale keeps its bits (float32 in [0, 1]); the others become 8-bit.
      dtype = np.float32 if name == "gray16.png" else np.uint8
      assert out.shape == (6, 5, channels) and out.dtype == dtype and out.any(), name


@pytest.mark.parametrize("shape", [(6, 5, 2), (0, 5, 3), (6, 5, 5)])
def test_array_record_with_wrong_channels_is_a_named_bad_image(tmp_path, shape, caplog):
  record = {"image": np.ones(shape, np.uint8), "path": "tfds:demo/train[7]", "label": 1}
  with pytest.raises(data.BadImageError, match=r"tfds:demo/train\[7\]"):
    transforms.DecodeImage(channels=3, on_bad_image="raise",
                           skip_log_dir=str(tmp_path)).map(record)
  with caplog.at_level(logging.WARNING):
    out = transforms.DecodeImage(channels=3, on_bad_image="skip",
                                 skip_log_dir=str(tmp_path)).map(record)
  assert out["image"] is None and "tfds:demo/train[7]" in caplog.text


def test_empty_class_folder_warns_or_fails_at_startup(tmp_path, caplog):
  root = tmp_path / "images"
  for cls in ("cat", "dog"):
    _png(root / cls / "0.png", np.full((4, 4, 3), 9, np.uint8))
  (root / "cow").mkdir()
  (root / "cow" / "notes.txt").write_text("no images")
  config = tiny_mae_config()
  config.data.update(source="image_folder", path=str(root), on_bad_image="raise")
  with pytest.raises(ConfigError, match=r"config.data.path=.*1 hold none: .*cow"):
    data.validate_data_config(config.data, image_size=(16, 16), channels=3)
  config.data.on_bad_image = "skip"
  with caplog.at_level(logging.WARNING):
    data.validate_data_config(config.data, image_size=(16, 16), channels=3)
  assert str(root / "cow") in caplog.text
  assert data.num_classes(config.data) == 2


def test_mostly_unreadable_stream_stops_with_a_clear_error():
  drop = transforms.DropInvalidRows(max_bad_fraction=0.5, window=8)
  batch = {"image": np.arange(4.0), "label": np.arange(4), "valid": np.array([1, 0, 1, 1], bool)}
  out = drop.map(batch)
  np.testing.assert_array_equal(out["label"], [0, 2, 3])
  assert "valid" not in out
  with pytest.raises(data.BadImageError, match="of the last 8 training images could not be"):
    drop.map(dict(batch, valid=np.zeros(4, bool)))


def _fmnist_folder(folder: pathlib.Path, truncate: int = 0) -> str:
  from test_data import indexed_images, write_fmnist
  write_fmnist(folder, indexed_images(16), gz=False)
  images = folder / "train-images-idx3-ubyte"
  if truncate:
    images.write_bytes(images.read_bytes()[:-truncate])
  return str(folder)


def test_bad_data_files_give_exit_2_and_one_line_naming_the_file(tmp_path, capsys):
  """A truncated IDX file (at start-up) and a corrupt image met by a worker process in
  on_bad_image='raise' mode: `error: ...` naming the file, no traceback."""
  folder = _fmnist_folder(tmp_path / "fm", truncate=5)
  base = ["mim_jax.main", RUNLOCAL, "--config.data.source=fashion_mnist",
          f"--config.data.path={folder}", "--config.image_size=(32,32)", "--config.channels=1",
          "--config.data.mean=(0.5,)", "--config.data.std=(0.5,)"]
  with pytest.raises(SystemExit) as exit_info:
    main.cli([*base, f"--workdir={tmp_path / 'w1'}"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert "train-images-idx3-ubyte is truncated" in err and "Traceback" not in err

  images = tmp_path / "images" / "a"
  for i in range(7):
    _png(images / f"{i}.png", np.full((8, 8, 3), 50 + i, np.uint8))
  (images / "3.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(SystemExit) as exit_info:
    main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={tmp_path / 'w2'}",
              "--config.data.source=image_folder", f"--config.data.path={images.parent}",
              "--config.data.on_bad_image=raise", "--config.data.num_workers=1",
              "--config.global_batch_size=7", "--config.num_epochs=2"])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2, err
  assert err.strip().splitlines()[-1].startswith(f"error: cannot decode image {images / '3.png'}")


def test_a_run_stopped_by_a_bad_image_resumes_skipping_it(tmp_path):
  """BadImageError advises on_bad_image='skip': a run that checkpointed under 'raise' resumes
  under 'skip' (a field that may change on resume) instead of being refused."""
  images = tmp_path / "images" / "a"
  for i in range(14):
    _png(images / f"{i}.png", np.full((8, 8, 3), 50 + i, np.uint8))
  run = ["mim_jax.main", RUNLOCAL, f"--workdir={tmp_path / 'w'}",
         "--config.data.source=image_folder", f"--config.data.path={images.parent}",
         "--config.global_batch_size=7", "--config.num_epochs=3", "--config.log_every=1"]
  main.cli([*run, "--config.data.on_bad_image=raise", "--config.total_steps=2"])
  (images / "3.png").write_bytes(b"\x89PNG not really")  # the file goes bad meanwhile
  data.reset_skipped_images()  # the skip log is this process's: other tests' skips out
  main.cli([*run, "--config.data.on_bad_image=skip", "--config.total_steps=6"])
  rows = metric_writers.read_metrics(str(tmp_path / "w"))
  assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
  assert rows[-1]["skipped_images"] >= 1
  assert {os.path.basename(p) for p in data.skipped_images()} == {"3.png"}


# ----------------------------------------------------------------------------- 5. storage


def test_full_disk_is_detected_before_training(tmp_path, monkeypatch):
  def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  with monkeypatch.context() as m:
    m.setattr(os, "fsync", no_space)  # what a full disk does to a buffered write
    with pytest.raises(checkpoint.WorkdirNotWritableError, match="No space left on device"):
      checkpoint.ensure_writable(str(tmp_path / "full"))
  assert os.listdir(tmp_path / "full") == []  # no probe file left behind

  def restore_or_init(*args, **kwargs):
    raise AssertionError("reached the model's initialisation: the full disk was not detected")
  monkeypatch.setattr(train, "_restore_or_init", restore_or_init)
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda path: type("Usage", (), {"free": 1000})())
  with pytest.raises(checkpoint.WorkdirNotWritableError, match="1000 B free but one checkpoint"):
    train.run(tiny_mae_config(total_steps=2), str(tmp_path / "small"))
  assert not (tmp_path / "small" / "checkpoints").exists()


def test_failed_checkpoint_writes_are_retried_then_stop_the_run(tmp_path, monkeypatch, caplog):
  """Step 2's write fails in the background and step 5's and 6's fail at once (disk full):
  the first is retried at step 3; with max_consecutive_failed_saves=2 the run stops at 6."""
  import grain
  from orbax.checkpoint._src.path import atomicity
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  save = grain.checkpoint.CheckpointHandler.save

  async def failing_finalize(self, *args, **kwargs):
    if self.get_final().name == "2":
      raise OSError(errno.ENOSPC, "No space left on device")
    return await finalize(self, *args, **kwargs)

  def failing_save(self, directory, *args, **kwargs):
    if directory.parent.name.split(".")[0] in ("5", "6"):
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(self, directory, *args, **kwargs)
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", failing_finalize)
  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", failing_save)

  workdir = tmp_path / "w"
  config = tiny_mae_config(total_steps=8, checkpoint_every=1, keep_checkpoints=10,
                           max_consecutive_failed_saves=2)
  with caplog.at_level(logging.ERROR):
    with pytest.raises(run_errors.CheckpointSaveError,
                       match=r"2 checkpoint saves in a row failed \(the last for step 6.*"
                             r"latest complete checkpoint .* is step 4"):
      train.run(config, str(workdir))
  assert "checkpoint for step 2 could not be written" in caplog.text
  # Each failure is our one line, not Orbax's own reports of it with their tracebacks too.
  assert [r.name for r in caplog.records if r.name != "mim_jax.training.checkpoint"] == []
  assert _committed(workdir) == [1, 3, 4]
  assert _partial(workdir) == []
  assert max(_logged_steps(workdir)) == 6


def test_orbax_noise_drops_only_a_failed_checkpoint_s_echoes(monkeypatch):
  """While quiet: TensorStore's "Event loop is closed" (raised in a call from native code) and
  Orbax's unfinished write coroutines (unraisable), and asyncio's never-retrieved errors of
  checkpoint writes are dropped; any other unraisable (the same error from Python code) or
  asyncio error still reaches its hook or handler, and all is restored."""
  import _thread
  import asyncio
  import types

  from mim_jax.training import orbax_noise
  # From a clean slate: an in-process CLI run of an earlier test left it on for the process.
  monkeypatch.setattr(orbax_noise, "_users", 0)
  monkeypatch.setattr(orbax_noise, "_previous_hook", None)
  for name in ("absl", "asyncio"):
    monkeypatch.setattr(logging.getLogger(name), "filters", [])
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)

  def unraisable(exc, obj=None, tb=None):
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, object=obj,
                                 exc_traceback=tb)

  # TensorStore's echo, as Python delivers it: a thread with no Python caller (TensorStore's,
  # here one started on the method itself) calls into the closed loop, so the traceback
  # starts in call_soon_threadsafe. From a Python caller it starts there, and is kept.
  loop = asyncio.new_event_loop()
  loop.close()

  def unraisable_of_thread(function, *args):
    """The thread's own unraisable (not another one that reached the hook meanwhile)."""
    _thread.start_new_thread(function, args)
    deadline = time.time() + 30
    while time.time() < deadline:
      ours = [u for u in seen if str(u.exc_value) == "Event loop is closed"]
      if ours:
        seen.remove(ours[0])
        return ours[0]
      time.sleep(0.01)
    raise AssertionError("the thread's unraisable never reached the hook")
  from_native = unraisable_of_thread(loop.call_soon_threadsafe, print)
  from_python = unraisable_of_thread(lambda: loop.call_soon_threadsafe(print))
  assert from_native.exc_traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"
  assert str(from_python.exc_value) == "Event loop is closed"
  assert from_python.exc_traceback.tb_frame.f_code.co_name == "<lambda>"

  async def not_orbax():
    pass
  coroutine = not_orbax()
  coroutine.close()
  orbax_code = types.SimpleNamespace(cr_code=types.SimpleNamespace(
      co_filename="/site-packages/orbax/checkpoint/_src/serialization/serialization.py"))
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  asyncio_log = logging.getLogger("asyncio")
  asyncio_log.addHandler(handler)
  try:
    with orbax_noise.quiet():
      sys.unraisablehook(from_native)
      sys.unraisablehook(from_python)
      sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
      sys.unraisablehook(unraisable(ImportError("shutting down"), orbax_code))
      sys.unraisablehook(unraisable(RuntimeError("something else"), coroutine))
      asyncio_log.error("Task exception was never retrieved\nfuture: <Task coro=<write() "
                        "defined at /x/orbax/checkpoint/y.py>>")
      asyncio_log.error("Task exception was never retrieved\nfuture: <Task coro=<mine()>>")
    sys.unraisablehook(from_native)
    asyncio_log.error("Task exception was never retrieved\nfuture: <Task coro=<orbax>>")
  finally:
    asyncio_log.removeHandler(handler)
  assert [str(u.exc_value) for u in seen] == ["Event loop is closed"] * 2 + ["something else",
                                                                           "Event loop is closed"]
  assert [seen[0], seen[3]] == [from_python, from_native]
  assert [r.getMessage().split("coro=<")[1][:5] for r in records] == ["mine(", "orbax"]


def test_a_full_disk_outside_the_checkpoints_is_one_error(tmp_path, monkeypatch, capsys):
  """A write other than a checkpoint's that finds the storage full (here the first
  reconstruction picture) ends the run with exit 4 and one line naming the workdir and the
  latest complete checkpoint, not a traceback."""
  from mim_jax import viz

  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(viz, "save_png", no_space)
  run = train.run
  monkeypatch.setattr(train, "run", lambda config, workdir, **kwargs: run(
      tiny_mae_config(total_steps=2, viz_every=2), workdir, **kwargs))
  workdir = tmp_path / "w"
  with pytest.raises(SystemExit) as exit_info:
    main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={workdir}"])
  err = capsys.readouterr().err
  assert exit_info.value.code == run_errors.EXIT_CHECKPOINT_FAILED == 4, err
  assert "Traceback" not in err, err
  assert err.startswith(f"error: the storage of {workdir} is full (No space left on device); "
                        f"the latest complete checkpoint in {workdir} is step 1: free space"), err
  # A full disk elsewhere (a temporary folder) is named as such, not blamed on the workdir.
  elsewhere = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "tmp" / "x"))
  assert main._storage_full_message(elsewhere, str(workdir)).startswith(
      f"the storage of {tmp_path / 'tmp' / 'x'} is full (No space left on device writing ")


def test_failed_last_checkpoint_fails_the_run(tmp_path, monkeypatch):
  """The final or preemption checkpoint has no next interval: its failure raises at once."""
  import grain

  def no_space(self, directory, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", no_space)
  it = data.make_train_iterator(tiny_mae_config().data, image_size=(8, 8), channels=3,
                                global_batch_size=4, seed=0, process_index=0, process_count=1)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=10, keep=2)
  assert not ckpt.save(7, {"w": np.zeros(2, np.float32)}, it, force=True)
  with pytest.raises(run_errors.CheckpointSaveError, match="checkpoint for step 7 could not"):
    ckpt.wait()
  ckpt.close()
  it.close()
  assert _partial(tmp_path) == [] and _committed(tmp_path) == []


def test_a_state_that_cannot_be_saved_raises_at_once(tmp_path, monkeypatch):
  """A TypeError from the save (an unserialisable state or data position) is a bug: raised at
  the first save, not logged and retried as a storage failure for several intervals."""
  it = data.make_train_iterator(tiny_mae_config().data, image_size=(8, 8), channels=3,
                                global_batch_size=4, seed=0, process_index=0, process_count=1)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=2)

  def unserialisable(*args, **kwargs):
    raise TypeError("cannot serialise an object of type 'generator'")
  monkeypatch.setattr(ckpt.manager, "save", unserialisable)
  with pytest.raises(TypeError, match="generator"):
    ckpt.save(1, {"w": np.zeros(2, np.float32)}, it)
  assert ckpt.consecutive_failures == 0
  monkeypatch.undo()
  ckpt.close()
  it.close()


def test_an_abandoned_checkpointer_closes_without_waiting_for_its_save(tmp_path, monkeypatch):
  """After a peer process died the save in flight can never pass its barrier: close() must
  return at once (the process then exits with code 5), not wait for it."""
  it = data.make_train_iterator(tiny_mae_config().data, image_size=(8, 8), channels=3,
                                global_batch_size=4, seed=0, process_index=0, process_count=1)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=10, keep=2)
  assert ckpt.save(7, {"w": np.zeros(2, np.float32)}, it, force=True)
  ckpt.manager.wait_until_finished()
  waits = []
  monkeypatch.setattr(ckpt.manager, "wait_until_finished", lambda: waits.append(1))
  ckpt.abandon()
  ckpt.close()
  assert waits == []
  monkeypatch.undo()
  ckpt.manager.close()
  it.close()


# ----------------------------------------------------------------------------- 7. determinism


def test_data_order_does_not_depend_on_the_number_of_workers(tmp_path):
  """Batches (images, labels, host-drawn masks) are identical for 0 and 2 workers, also when
  bad images are dropped."""
  from mim_jax.objectives import masking
  root = tmp_path / "images"
  rng = np.random.default_rng(0)
  for i in range(13):
    _png(root / f"c{i % 3}" / f"{i}.png", rng.integers(0, 255, (9, 11, 3), dtype=np.uint8))
  (root / "c1" / "broken.png").write_bytes(b"not an image")
  cfg = tiny_mae_config().data
  cfg.update(source="image_folder", path=str(root))
  # A host-drawn mask kind, so the per-example random streams are compared too.
  generator = masking.MaskGenerator(kind="blockwise", grid_hw=(4, 4), ratio=0.5, min_block=2)
  extra = (data.AddTokenMask(generator),)
  batches = {}
  for workers in (0, 2):
    cfg.num_workers = workers
    it = data.make_train_iterator(cfg, image_size=(8, 8), channels=3, global_batch_size=4,
                                  seed=3, process_index=0, process_count=1,
                                  element_transforms=extra)
    batches[workers] = [next(it) for _ in range(7)]  # > 2 epochs of the 13 good images
    it.close()
  for a, b in zip(batches[0], batches[2], strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# ----------------------------------------------------------------------------- 8. untrusted files


def test_no_module_can_unpickle_what_it_loads():
  """Loading paths use Orbax (TensorStore + JSON) and json; nothing imports pickle or loads
  numpy files with allow_pickle (mim_jax/convert is checked by its own tests)."""
  banned_imports = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
  problems = []
  for path in sorted((REPO / "mim_jax").rglob("*.py")):
    if "convert" in path.relative_to(REPO / "mim_jax").parts:
      continue
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name.split(".")[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module.split(".")[0]]
      problems += [f"{path}:{node.lineno} imports {n}" for n in names if n in banned_imports]
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        call = ast.unparse(node.func)
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if call in ("np.load", "numpy.load") and keywords.get("allow_pickle") != "False":
          problems.append(f"{path}:{node.lineno} np.load without allow_pickle=False")
        if call == "torch.load" and keywords.get("weights_only") != "True":
          problems.append(f"{path}:{node.lineno} torch.load without weights_only=True")
  assert not problems, problems


class _Payload:
  """Unpickling this creates a marker file: proof that a loader executed the file's code."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_tampered_checkpoint_and_encoder_do_not_run_code(tmp_path):
  marker = tmp_path / "pwned"
  payload = pickle.dumps(_Payload(str(marker)))
  cfg = tiny_mae_config().data
  it = data.make_train_iterator(cfg, image_size=(8, 8), channels=3, global_batch_size=4, seed=0,
                                process_index=0, process_count=1)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=2)
  state = {"w": np.arange(4.0, dtype=np.float32)}
  ckpt.save(1, state, it, force=True)
  ckpt.wait()
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  np.testing.assert_array_equal(ckpt.restore(1, abstract, it)["w"], state["w"])  # loads intact
  for path in [p for p in (tmp_path / "ckpt" / "1").rglob("*") if p.is_file()]:
    path.write_bytes(payload)  # every file of the checkpoint, metadata included
  with pytest.raises(Exception):
    ckpt.restore(1, abstract, it)
  ckpt.close()

  info = {"image_size": [8, 8], "channels": 3, "config": {"model": {"variant": "mu/4"}}}
  encoder = checkpoint.export_encoder(str(tmp_path / "enc"), state, info)
  assert checkpoint.load_encoder(encoder)[1] == info  # loads intact
  for path in [p for p in pathlib.Path(encoder).rglob("*") if p.is_file()]:
    path.write_bytes(payload)
  with pytest.raises(Exception):
    checkpoint.load_encoder(encoder)
  it.close()
  assert not marker.exists()


def _children(pid: int) -> set[int]:
  """The pids whose parent is `pid` (from /proc)."""
  out = set()
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        out.add(int(entry))
  return out


def _alive(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process parents from /proc")
def test_data_workers_exit_when_the_trainer_is_killed(tmp_path):
  """kill -9 of the trainer (no clean-up runs in it): its grain worker processes are gone
  within a few seconds instead of lingering with their memory."""
  workdir = tmp_path / "run"
  proc = _start([RUNLOCAL, f"--workdir={workdir}", "--config.data.num_workers=2",
                 "--config.num_epochs=100000", "--config.total_steps=100000",
                 "--config.log_every=1",
                 "--config.checkpoint_every=100000"], tmp_path / "log.txt")
  try:
    _wait_for(lambda: len(_logged_steps(workdir)) >= 2, proc)
    workers = _children(proc.pid)
    def is_worker(pid):  # grain's workers are multiprocessing's spawned children
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          return b"spawn_main" in f.read()
      except OSError:
        return False
    assert sum(map(is_worker, workers)) == 2, workers  # both (and a resource tracker)
  finally:
    _kill9(proc)
  deadline = time.time() + 10
  while any(map(_alive, workers)) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(map(_alive, workers)), [w for w in workers if _alive(w)]


def test_resume_refuses_a_config_that_would_train_something_else(tmp_path):
  """A workdir with checkpoints resumes the run that wrote them: another init_from, lr or
  seed would be silently ignored (the checkpoint's weights win) or change the run halfway, so
  it is refused before anything is restored; where it stops, logging and the machine's
  settings may change."""
  from mim_jax.training import resume_check
  workdir = str(tmp_path / "run")
  train.run(tiny_mae_config(total_steps=2, checkpoint_every=2), workdir)
  saved = (tmp_path / "run" / "config.json").read_text()
  steps = sorted(os.listdir(tmp_path / "run" / "checkpoints"))

  with pytest.raises(ConfigError) as err:
    train.run(tiny_mae_config(total_steps=3, seed=7, **{"optimizer.base_lr": 0.5}), workdir)
  message = str(err.value)
  assert "config.seed: 0 in this run, 7 now" in message
  assert "config.optimizer.base_lr" in message and "total_steps" not in message
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == steps  # none written
  assert (tmp_path / "run" / "config.json").read_text() == saved  # nothing rewritten

  # Stopping later, logging and checkpoint cadence may change: it resumes.
  state = train.run(tiny_mae_config(total_steps=3, log_every=1, checkpoint_every=3), workdir)
  assert int(state.step) == 3

  # On purpose (--resume_with_changes): recorded, and later resumes compare with the new
  # settings.
  lower_lr = {"optimizer.base_lr": 1e-4}
  state = train.run(tiny_mae_config(total_steps=4, **lower_lr), workdir, resume_with_changes=True)
  assert int(state.step) == 4
  changes = [json.loads(line) for line in
             (tmp_path / "run" / resume_check.CHANGES_FILE).read_text().splitlines()]
  assert changes == [{"step": 3, "changes": {"optimizer.base_lr": {"was": 1.5e-4,
                                                                   "now": 1e-4}}}]
  assert int(train.run(tiny_mae_config(total_steps=5, **lower_lr), workdir).step) == 5

  # The comparison itself: nested fields, the changeable ones and fields only one side has.
  saved_cfg = {"init_from": "/a", "data": {"path": "/x", "holdout": 0, "on_bad_image": "raise"},
               "old_field": 1, "model": {"remat": False, "dtype": "float32"}}
  new_cfg = {"init_from": "/b", "data": {"path": "/y", "holdout": 5000, "on_bad_image": "skip"},
             "new_field": 2, "model": {"remat": True, "dtype": "float32"}}
  assert resume_check.changed_fields(saved_cfg, new_cfg) == [
      ("data.holdout", 0, 5000), ("init_from", "/a", "/b")]
  # A field added later, which a config file may set otherwise: compared with the value the
  # run used before it existed, where the run had its block.
  hog = {"cell_size": 8, "num_bins": 9}
  assert resume_check.changed_fields({"target": {"hog": hog}},
                                     {"target": {"hog": {**hog, "binning": "maskfeat"}}}) == [
      ("target.hog.binning", "skimage", "maskfeat")]
  assert resume_check.changed_fields({"target": {"hog": hog}},
                                     {"target": {"hog": {**hog, "binning": "skimage"}}}) == []
  assert resume_check.changed_fields({"target": {"kind": "pixels"}}, {"target": {
      "kind": "pixels", "hog": {**hog, "binning": "maskfeat"}}}) == []
  recipe = {"crop_scale": [0.08, 1.0], "rand_augment": "rand-m9-mstd0.5-inc1",
            "random_erasing": 0.25}
  assert resume_check.changed_fields({"data": {"crop_scale": [0.08, 1.0]}}, {"data": recipe}) == [
      ("data.rand_augment", "", "rand-m9-mstd0.5-inc1"), ("data.random_erasing", 0.0, 0.25)]
  # Runs from before model.weight_init started from MAE's init.
  model = {"variant": "B/16"}
  assert resume_check.changed_fields({"model": model},
                                     {"model": {**model, "weight_init": "xavier"}}) == []
  assert resume_check.changed_fields({"model": model},
                                     {"model": {**model, "weight_init": "beit"}}) == [
      ("model.weight_init", "xavier", "beit")]
  # Tokenizer runs from before BEiT v2's codebook: VQ-VAE's update from random codes.
  tokenizer = {"vocab_size": 16, "decay": 0.99}
  assert resume_check.changed_fields({"tokenizer": tokenizer}, {"tokenizer": {
      **tokenizer, "codebook_update": "ema_sums", "kmeans_init": 0}}) == []
  assert resume_check.changed_fields({"tokenizer": tokenizer}, {"tokenizer": {
      **tokenizer, "codebook_update": "norm_ema", "kmeans_init": 10}}) == [
      ("tokenizer.codebook_update", "ema_sums", "norm_ema"), ("tokenizer.kmeans_init", 0, 10)]
  assert resume_check.changed_fields({"masking": {"kind": "blockwise"}}, {"masking": {
      "kind": "blockwise", "exact_count": True}}) == [("masking.exact_count", False, True)]
  # A renamed field: the run's value under the old name, compared as the new field's.
  teacher = {"path": "/t", "norm": "layer"}
  for saved_layer, block, was in ((-1, 0, None), (2, 3, None), (-1, 1, 0), (2, 0, 3)):
    for wrap, prefix in ((lambda t: t, ""), (lambda t: {"target": t}, "target.")):
      got = resume_check.changed_fields(wrap({"teacher": {**teacher, "layer": saved_layer}}),
                                        wrap({"teacher": {**teacher, "block": block}}))
      assert got == ([] if was is None else [(f"{prefix}teacher.block", was, block)]), got
  assert resume_check.changed_fields({"teacher": {"layer": None}}, {"teacher": {"block": 0}}) == [
      ("teacher.block", None, 0)]  # an edited config.json: refused as a change, not a crash


def test_a_diverged_run_resumes_with_clipping_switched_on(tmp_path, caplog):
  """NonFiniteError advises setting optimizer.clip_grad_norm and resuming with
  --resume_with_changes: clipping adds a stage to the optimizer's state tree (without arrays),
  and the checkpoint written without it is read into the new tree, its moments intact (a clip
  that never triggers trains exactly as the uninterrupted run), and back off again."""
  straight = train.run(tiny_mae_config(total_steps=3), str(tmp_path / "straight"))
  workdir = str(tmp_path / "run")
  train.run(tiny_mae_config(total_steps=2), workdir)
  clip = {"optimizer.clip_grad_norm": 1e9}
  with caplog.at_level(logging.INFO, logger=train.__name__):
    state = train.run(tiny_mae_config(total_steps=3, **clip), workdir, resume_with_changes=True)
  assert int(state.step) == 3 and "at step 2" in caplog.text  # resumed, not started again
  # The clip is in the optimizer (its stage in the state tree) and in the recorded config.
  assert jax.tree.structure(state.opt_state) != jax.tree.structure(straight.opt_state)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optimizer"]["clip_grad_norm"] == 1e9
  for a, b in zip(_saved_params(tmp_path / "run", 3), _saved_params(tmp_path / "straight", 3),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  state = train.run(tiny_mae_config(total_steps=4), workdir, resume_with_changes=True)
  assert int(state.step) == 4


def test_a_shorter_schedule_than_the_checkpoint_is_refused_not_silently_done(tmp_path):
  """total_steps may change on resume; below the checkpoint's step the loop never ran and the
  run exited 0 without evaluations, export or results: now a ConfigError naming the field."""
  workdir = str(tmp_path / "run")
  train.run(tiny_mae_config(total_steps=3), workdir)
  with pytest.raises(ConfigError, match=r"config.total_steps=2 is invalid: a schedule reaching "
                     r"the step of the newest intact checkpoint .*, 3: this run ends at step 2"):
    train.run(tiny_mae_config(total_steps=2), workdir, resume_with_changes=True)
  assert int(train.run(tiny_mae_config(total_steps=3), workdir).step) == 3  # unchanged


def test_resume_with_changes_refuses_another_number_of_data_workers(tmp_path):
  """The resume refusal offers --resume_with_changes, but the saved data position is per
  worker: another data.num_workers is refused by name before anything is restored (it was a
  KeyError from grain's restore)."""
  workdir = str(tmp_path / "run")
  train.run(tiny_mae_config(total_steps=2), workdir)
  saved = (tmp_path / "run" / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"config.data.num_workers=0 \(1 now\).*resumes only "
                     r"with data.num_workers=0 \(also with --resume_with_changes\)"):
    train.run(tiny_mae_config(total_steps=3, **{"data.num_workers": 1}), workdir,
              resume_with_changes=True)
  assert (tmp_path / "run" / "config.json").read_text() == saved


def test_resume_with_changes_refuses_another_global_batch(tmp_path):
  """The saved data position and the step count batches of the run's size: resumed at another
  batch (accepted before, with a warning), the stream went on at another example and the
  epochs and schedule changed meaning. Refused by name, nothing written."""
  workdir = str(tmp_path / "run")
  train.run(tiny_mae_config(total_steps=2), workdir)
  saved = (tmp_path / "run" / "config.json").read_text()
  with pytest.raises(ConfigError, match=r"config.global_batch_size=8 \(16 now\).*grad_accum_steps"
                     r".*resumes only with global_batch_size=8 \(also with --resume_with_changes"):
    train.run(tiny_mae_config(total_steps=3, global_batch_size=16), workdir,
              resume_with_changes=True)
  assert (tmp_path / "run" / "config.json").read_text() == saved


def test_resume_with_changes_where_nothing_resumes_says_so(tmp_path, caplog, monkeypatch):
  """A fresh workdir, or a job (k-NN, probe) that runs whole each time: the flag has nothing
  to act on, and the log says so instead of accepting it without a word."""
  from mim_jax import registry
  with caplog.at_level(logging.WARNING, logger="mim_jax.training.loop"):
    train.run(tiny_mae_config(total_steps=1), str(tmp_path / "fresh"), resume_with_changes=True)
  assert f"--resume_with_changes is not used: {tmp_path / 'fresh'} holds no checkpoint" \
      in caplog.text
  caplog.clear()
  monkeypatch.setattr(registry.method_class("knn"), "run", classmethod(lambda cls, c, w: {}))
  with caplog.at_level(logging.WARNING, logger="mim_jax.training.loop"):
    train.run(tiny_config("knn", init_from="random"), str(tmp_path / "knn"),
              resume_with_changes=True)
  assert "--resume_with_changes is not used: method 'knn' is a job" in caplog.text


def test_resume_refuses_initial_values_it_would_not_read(tmp_path):
  """classifier.head_init_std, model.layer_scale and model.weight_init set initial weights
  only: a resume restores the weights, so another value is refused, also with
  --resume_with_changes (it was logged and recorded as a change taken, and changed nothing)."""
  from mim_jax.training import metric_writers, resume_check
  for method, field, value in (("finetune", "classifier.head_init_std", 0.02),
                               ("mae", "model.layer_scale", 0.2),
                               ("mae", "model.weight_init", "beit")):
    started = tiny_config(method, **{"model.layer_scale": 0.1})
    workdir = tmp_path / field
    workdir.mkdir()
    (workdir / metric_writers.CONFIG_FILE).write_text(
        metric_writers.config_text(started.to_dict()))
    resumed = tiny_config(method, **{"model.layer_scale": 0.1, field: value})
    for allow in (False, True):
      with pytest.raises(ConfigError, match=rf"config.{field}=.* \({value!r} now\): {field} "
                         r"sets initial weights only.*\(also with --resume_with_changes\)"):
        resume_check.check_same_run(str(workdir), resumed, weight_fields=(),
                                    allow_changes=allow)
  # To or from 0 the scale parameters come or go: not an initial value, the restore decides.
  no_scale = tiny_config("mae", **{"model.layer_scale": 0.0})
  assert resume_check.check_same_run(str(tmp_path / "model.layer_scale"), no_scale,
                                     weight_fields=(),
                                     allow_changes=True) == [("model.layer_scale", 0.1, 0.0)]


def test_a_moved_weights_path_resumes_only_on_purpose_and_says_what_it_means(tmp_path, caplog):
  """init_from and a frozen tokenizer's or teacher's path were read at step 0 and live in the
  checkpoint: another path is refused with the reason, and --resume_with_changes takes it as
  the same weights moved (a new machine, another mount), saying that they are not read again
  (it listed the path as a change taken, while the restored arrays stayed the old ones)."""
  from mim_jax import registry
  from mim_jax.training import metric_writers, resume_check
  for method, field in (("mae", "init_from"), ("beit", "tokenizer.path"),
                        ("maskdistill", "teacher.path"), ("mim", "target.tokenizer.path"),
                        ("mim", "target.teacher.path"), ("vqkd_tokenizer", "teacher.path")):
    started = tiny_config(method)
    started.unlock()
    parent, _, leaf = ("." + field).rpartition(".")
    block = started
    for name in filter(None, parent.split(".")):
      block = block[name]
    block[leaf] = "/weights/first"
    workdir = tmp_path / method / field
    workdir.mkdir(parents=True)
    (workdir / metric_writers.CONFIG_FILE).write_text(metric_writers.config_text(started.to_dict()))
    block[leaf] = "/mnt/weights/first"
    weights = registry.method_class(method).weight_fields
    with pytest.raises(ConfigError, match=rf"config.{field}: '/weights/first' in this run, "
                       rf"'/mnt/weights/first' now\n.* {field}: the weights were read when the "
                       r"run started .* taken as the same weights moved"):
      resume_check.check_same_run(str(workdir), started, weight_fields=weights)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mim_jax.training.resume_check"):
      changes = resume_check.check_same_run(str(workdir), started, weight_fields=weights,
                                            allow_changes=True)
    assert changes == [(field, "/weights/first", "/mnt/weights/first")]
    assert f"config.{field} changed on resume: the run keeps the weights its checkpoint holds" \
        in caplog.text


def test_resume_with_changes_that_do_not_fit_the_checkpoint_is_a_config_error(tmp_path):
  """--resume_with_changes cannot give a checkpoint another model depth or optimizer: a
  ConfigError naming the fields (exit 2, nothing recorded), not Orbax's ValueError."""
  workdir = str(tmp_path / "run")
  train.run(tiny_mae_config(total_steps=2), workdir)
  saved = (tmp_path / "run" / "config.json").read_text()
  for change in ({"model.depth": 3}, {"optimizer.name": "sgd"}):
    with pytest.raises(ConfigError, match=r"cannot be resumed with the changed settings \(.*"
                       + re.escape(f"config.{next(iter(change))}")):
      train.run(tiny_mae_config(total_steps=3, **change), workdir, resume_with_changes=True)
  assert (tmp_path / "run" / "config.json").read_text() == saved
  assert not (tmp_path / "run" / "config_changes.jsonl").exists()


def test_a_restore_failure_unrelated_to_the_changed_settings_keeps_its_own_error(
    tmp_path, monkeypatch):
  """The changed settings are blamed only when the arrays they build differ from the
  checkpoint's (read from its metadata): another failure of the restore (here an injected
  one) under a changed lr keeps its own error instead of a ConfigError naming base_lr."""
  workdir = str(tmp_path / "run")
  train.run(tiny_mae_config(total_steps=2), workdir)

  def failing_restore(*args, **kwargs):
    raise ValueError("the storage said no")
  monkeypatch.setattr(checkpoint.Checkpointer, "restore", failing_restore)
  with pytest.raises(ValueError, match="the storage said no") as e:
    train.run(tiny_mae_config(total_steps=3, **{"optimizer.base_lr": 1e-4}), workdir,
              resume_with_changes=True)
  assert not isinstance(e.value, ConfigError)
  with pytest.raises(ConfigError, match=r"changed settings \(config.model.depth\)"):
    train.run(tiny_mae_config(total_steps=3, **{"model.depth": 3}), workdir,
              resume_with_changes=True)


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> pathlib.Path:
  """A tiny MAE run of 4 steps with checkpoints 1, 2 and 4, which the damaged-checkpoint tests
  copy (each its own) and damage; its own folders stay whole, to compare with."""
  workdir = tmp_path_factory.mktemp("checkpointed") / "run"
  train.run(tiny_mae_config(total_steps=4), str(workdir))
  assert _committed(workdir) == [1, 2, 4]
  return workdir


def _damage(step_dir: pathlib.Path, how: str) -> None:
  """Damages a committed checkpoint folder as a full disk, a copy that stopped halfway or a
  hand-made cleanup does."""
  if how == "emptied":
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  elif how == "truncated":  # the array data files (Orbax's OCDBT layout) cut short
    files = list(step_dir.glob("state/ocdbt.process_*/d/*"))
    assert files, sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*"))
    for f in files:
      f.write_bytes(f.read_bytes()[:10])
  elif how == "metadata cut short":  # the state's tree and array metadata
    metadata = step_dir / "state" / "_METADATA"
    metadata.write_text(metadata.read_text()[:100])
  elif how == "position cut short":  # the data iterator's position (JSON)
    position = next(step_dir.glob("data/process_0-of-*.json"))
    position.write_text(position.read_text()[:5])
  else:
    raise ValueError(how)


def _listing(folder: pathlib.Path) -> dict[str, int]:
  return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
          if p.is_file()}


@pytest.mark.parametrize("how, reason", [
    ("emptied", "the folder is empty"),
    ("truncated", 'OUT_OF_RANGE: Error reading "'),
    ("position cut short", "data/process_0-of-1.json (the data-iterator position) is "
                           "unreadable (JSONDecodeError"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    checkpointed_run, tmp_path, caplog, how, reason):
  """A committed step folder emptied or cut short later ended the resume in Orbax's
  traceback. Now one WARNING line names the folder and the reason, the run resumes from the
  previous step with that step's data position (the step it writes again equals the lost
  one bit for bit), and the damaged folder is moved aside, kept, and never listed again."""
  workdir = tmp_path / "run"
  shutil.copytree(checkpointed_run, workdir)
  damaged = workdir / "checkpoints" / "4"
  _damage(damaged, how)
  kept = _listing(damaged)
  with caplog.at_level(logging.WARNING, logger="mim_jax.training.restore"):
    state = train.run(tiny_mae_config(total_steps=5), str(workdir))
  assert int(state.step) == 5
  warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warnings) == 1 and "\n" not in warnings[0], warnings
  assert warnings[0].startswith(f"checkpoint folder {damaged} is damaged, not resumed from: "
                                f"{reason}"), warnings[0]
  assert warnings[0].endswith("trying the previous one, step 2"), warnings[0]
  assert f"moved the damaged checkpoint folder {damaged} aside to {damaged}.damaged" \
      in caplog.text
  set_aside = workdir / "checkpoints" / "4.damaged"
  assert _listing(set_aside) == kept  # moved whole, as it was found
  assert _committed(workdir) == [2, 4, 5]
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=2, keep=3)
  assert ckpt.all_steps() == [2, 4, 5]  # Orbax does not list it
  ckpt.close()
  for a, b in zip(_saved_params(workdir, 4), _saved_params(checkpointed_run, 4), strict=True):
    np.testing.assert_array_equal(a, b)
  assert [row["step"] for row in metric_writers.read_metrics(str(workdir))
          if "loss" in row] == [1, 2, 3, 4, 5]


def test_a_damaged_step_past_a_shorter_schedule_does_not_refuse_the_resume(
    checkpointed_run, tmp_path):
  """The shorter-schedule refusal read the newest step folder even when it was damaged: a run
  ending at step 3 was refused for step 4, which it would never have resumed from. It now
  resumes from step 2 and trains to its end; an intact step past the end is still refused."""
  workdir = tmp_path / "run"
  shutil.copytree(checkpointed_run, workdir)
  _damage(workdir / "checkpoints" / "4", "emptied")
  assert int(train.run(tiny_mae_config(total_steps=3), str(workdir)).step) == 3
  assert (workdir / "checkpoints" / "4.damaged").is_dir()
  with pytest.raises(ConfigError, match=r"a schedule reaching the step of the newest intact "
                     r"checkpoint in .*, 3: this run ends at step 2"):
    train.run(tiny_mae_config(total_steps=2), str(workdir))


def test_no_restorable_checkpoint_is_one_error_naming_each_step(checkpointed_run, tmp_path,
                                                                monkeypatch, capsys):
  """Every step folder damaged: exit 2 (bad input, as a bad workdir) and one error naming the
  workdir, each step tried and why, and what to do; no traceback, nothing moved."""
  workdir = tmp_path / "run"
  shutil.copytree(checkpointed_run, workdir)
  folders = workdir / "checkpoints"
  for step, how in ((4, "emptied"), (2, "truncated"), (1, "metadata cut short")):
    _damage(folders / str(step), how)
  before = _listing(folders)
  run = train.run
  monkeypatch.setattr(train, "run", lambda config, workdir, **kwargs: run(
      tiny_mae_config(total_steps=5), workdir, **kwargs))
  with pytest.raises(SystemExit) as exit_info:
    main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={workdir}"])
  err = capsys.readouterr().err
  assert exit_info.value.code == run_errors.EXIT_BAD_INPUT == 2, err
  assert "Traceback" not in err, err
  assert err.startswith(f"error: no checkpoint in {folders} can be restored: every step "
                        "folder is damaged"), err
  assert f"  step 4 ({folders / '4'}): the folder is empty\n" in err, err
  assert f"  step 2 ({folders / '2'}): OUT_OF_RANGE: Error reading " in err, err
  assert f"  step 1 ({folders / '1'}): state/_METADATA is unreadable (JSONDecodeError" in err
  assert "Start the run afresh in another --workdir" in err
  assert "move or delete these step folders" in err
  assert _listing(folders) == before  # nothing moved aside, nothing deleted


def test_resume_with_changes_does_not_blame_the_changes_for_a_damaged_checkpoint(
    checkpointed_run, tmp_path, caplog):
  """Under --resume_with_changes a damaged newest step (its state/_METADATA cut short) was a
  ConfigError saying the changed settings change the state's arrays. The damage is now told
  from a true mismatch: the run resumes the previous step under the changes, recorded there;
  a true mismatch (another depth) still names the field."""
  from mim_jax.training import resume_check
  workdir = tmp_path / "run"
  shutil.copytree(checkpointed_run, workdir)
  _damage(workdir / "checkpoints" / "4", "metadata cut short")
  lower_lr = {"optimizer.base_lr": 1e-4}
  with caplog.at_level(logging.WARNING, logger="mim_jax.training.restore"):
    state = train.run(tiny_mae_config(total_steps=5, **lower_lr), str(workdir),
                      resume_with_changes=True)
  assert int(state.step) == 5
  warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
  assert "state/_METADATA is unreadable (JSONDecodeError" in warning, warning
  assert "base_lr" not in warning and "changed settings" not in warning, warning
  changes = [json.loads(line) for line in
             (workdir / resume_check.CHANGES_FILE).read_text().splitlines()]
  assert changes == [{"step": 2, "changes": {"optimizer.base_lr": {"was": 1.5e-4,
                                                                   "now": 1e-4}}}]
  assert (workdir / "checkpoints" / "4.damaged").is_dir()
  with pytest.raises(ConfigError, match=r"checkpoint 5 in .* cannot be resumed with the changed "
                     r"settings \(config.model.depth\)"):
    train.run(tiny_mae_config(total_steps=6, **lower_lr, **{"model.depth": 3}), str(workdir),
              resume_with_changes=True)
  assert not list((workdir / "checkpoints").glob("5.damaged*"))  # a mismatch is not damage


# Holds the workdir lock of argv[1], forks a child that outlives it (as a data worker can),
# prints the child's pid and sleeps until killed.
HOLD_LOCK = r"""
import os, sys, time
from mim_jax.training import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  child = os.fork()
  if child == 0:
    time.sleep(600)
    os._exit(0)
  print(child, flush=True)
  time.sleep(600)
"""


def test_a_second_run_on_a_busy_workdir_stops_before_it_starts(tmp_path, monkeypatch, capsys):
  """Two runs on one workdir both resumed the same checkpoint and saved the same steps over
  each other's, and both exited 0. The second now stops with exit 2 and one line naming the
  workdir and the process holding it, before it compiles, reads or restores anything. The lock
  goes with its holder, also on kill -9 (a child it forked does not keep it); each process of a
  multi-process run holds its own; a run releases it when it returns or raises."""
  workdir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, text=True)
  child = None
  try:
    child = int(holder.stdout.readline())
    calls = []

    def fake_train(config, workdir, resume_with_changes=False):
      calls.append(workdir)
      return "trained"
    monkeypatch.setattr(train, "train", fake_train)
    with pytest.raises(SystemExit) as exit_info:
      main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={workdir}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {workdir} is in use by another run (pid {holder.pid} on host "
                          f"{socket.gethostname()}, started "), err
    assert not calls and os.listdir(workdir) == [workdir_lock.LOCK_FILE]
    _kill9(holder)
    assert _alive(child)  # its forked child lives on, without the lock
    assert train.run(tiny_mae_config(), str(workdir)) == "trained"
  finally:
    if holder.poll() is None:
      _kill9(holder)
    if child:
      with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
  assert calls == [str(workdir)]

  def failing_train(config, workdir, resume_with_changes=False):
    raise RuntimeError("a failed run")
  monkeypatch.setattr(train, "train", failing_train)
  with pytest.raises(RuntimeError, match="a failed run"):
    train.run(tiny_mae_config(), str(workdir))
  with workdir_lock.hold(str(workdir), 0), workdir_lock.hold(str(workdir), 1):
    with pytest.raises(workdir_lock.WorkdirInUseError, match=rf"\(pid {os.getpid()} on host "):
      with workdir_lock.hold(str(workdir), 1):
        pass
  with workdir_lock.hold(str(workdir), 1):
    pass
  with workdir_lock.hold("gs://no-such-bucket/run"):  # not locked, nothing touched
    pass


def test_a_workdir_without_its_config_json_resumes_only_on_purpose(tmp_path, capsys):
  """A workdir with checkpoints whose config.json was deleted resumed under changed settings
  without a word, and never wrote config.json again, so no later resume was checked; a corrupt
  one was a JSONDecodeError traceback. Both are now a one-line error naming the file (exit 2),
  checkpoints untouched; --resume_with_changes resumes, records it and writes config.json."""
  from mim_jax.training import resume_check
  workdir = tmp_path / "run"
  config_json = workdir / metric_writers.CONFIG_FILE
  train.run(tiny_mae_config(total_steps=2), str(workdir))
  steps = _committed(workdir)
  lower_lr = tiny_mae_config(total_steps=3, **{"optimizer.base_lr": 1e-4})
  config_json.unlink()
  with pytest.raises(ConfigError, match=re.escape(
      f"{config_json} is missing, but {workdir} holds checkpoints to resume") +
      r".*Restore config.json .* --resume_with_changes \(config.json is then written from it\)"):
    train.run(lower_lr, str(workdir))
  assert not config_json.exists() and _committed(workdir) == steps
  config_json.write_text("{bad json")
  with pytest.raises(ConfigError, match=re.escape(f"{config_json} is unreadable "
                                                  "(JSONDecodeError: ")):
    train.run(lower_lr, str(workdir))
  with pytest.raises(SystemExit) as exit_info:
    main.cli(["mim_jax.main", RUNLOCAL, f"--workdir={workdir}"])
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
  assert err.startswith(f"error: {config_json} is unreadable"), err
  assert config_json.read_text() == "{bad json" and _committed(workdir) == steps

  state = train.run(lower_lr, str(workdir), resume_with_changes=True)
  assert int(state.step) == 3
  assert json.loads(config_json.read_text()) == json.loads(
      metric_writers.config_text(lower_lr.to_dict()))
  entry = json.loads((workdir / resume_check.CHANGES_FILE).read_text())
  assert entry["step"] == 2 and entry["changes"] == {}, entry
  assert entry["unchecked"].startswith("config.json is unreadable (JSONDecodeError"), entry
  # Later resumes are checked against it again.
  with pytest.raises(ConfigError, match=r"config.optimizer.base_lr: 0.0001 in this run, "
                     r"0.00015 now"):
    train.run(tiny_mae_config(total_steps=4), str(workdir))


def test_evaluations_due_at_a_preempted_step_run_when_the_run_resumes(tmp_path, monkeypatch):
  """A notice at step 2, where a k-NN point and a picture are due: the checkpoint is written
  first (the grace period is short) and flagged; the resumed run measures and draws step 2
  before training on, so the curve misses no point. A crash before the next checkpoint makes
  the next resume run them again, without logging step 2 twice. A notice at the last step owes
  the end-of-run evaluations and the picture. A regular checkpoint carries no flag."""
  from mim_jax.training import preemption
  should_stop = preemption.PreemptionWatcher.should_stop

  def notice_at(*steps):
    def watcher(self, step):
      if step in steps:
        os.kill(os.getpid(), signal.SIGTERM)
      return should_stop(self, step)
    return watcher
  workdir = tmp_path / "w"
  # 8 steps per epoch: k-NN and pictures every 2 steps, a regular checkpoint every 4 steps.
  config = tiny_mae_config(total_steps=8, checkpoint_every=4, keep_checkpoints=10, viz_every=2,
                           **{"knn.every_epochs": 0.25, "export_encoder": False})

  def run_with_notice(*steps):
    with monkeypatch.context() as m:
      m.setattr(preemption.PreemptionWatcher, "should_stop", notice_at(*steps))
      with pytest.raises(run_errors.Preempted):
        train.run(config, str(workdir))

  def knn_steps():
    return sorted(row["step"] for row in metric_writers.read_metrics(str(workdir))
                  if "knn_top1_cls" in row)

  def pictures():
    return sorted(int(p.stem.split("_")[1]) for p in (workdir / "reconstructions").glob("*.png"))
  run_with_notice(2)
  assert _committed(workdir) == [1, 2] and knn_steps() == [] and pictures() == []
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=4, keep=10)
  assert [ckpt.evaluations_pending(s) for s in (1, 2)] == [False, True]
  ckpt.close()

  def crash_after_step_3(self, step):
    if step == 3:
      raise RuntimeError("the machine died")
    return should_stop(self, step)
  with monkeypatch.context() as m:  # the owed step-2 evaluations run, then a crash
    m.setattr(preemption.PreemptionWatcher, "should_stop", crash_after_step_3)
    with pytest.raises(RuntimeError, match="the machine died"):
      train.run(config, str(workdir))
  assert _committed(workdir) == [1, 2] and knn_steps() == [2] and pictures() == [2]
  run_with_notice(8)  # from step 2 again (once more its owed evaluations), then the last step
  assert knn_steps() == [2, 4, 6] and pictures() == [2, 4, 6]
  train.run(config, str(workdir))
  assert knn_steps() == [2, 4, 6, 8] and pictures() == [2, 4, 6, 8]
  assert (workdir / "encoder").exists() is False and _committed(workdir)[-1] == 8


LATE_DEVICE_PROGRAM = """
import time
import jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
jax.config.update("jax_num_cpu_devices", 2)
mesh = Mesh(jax.devices(), ("d",))

def late(x):  # device 1 reaches the all-reduce 4 s after device 0
  time.sleep(4.0)
  return x

def body(x):
  y = jax.lax.cond(jax.lax.axis_index("d") == 1,
                   lambda x: jax.pure_callback(late, jax.ShapeDtypeStruct(x.shape, x.dtype), x),
                   lambda x: x, x)
  return jax.lax.psum(y.sum(), "d")[None]

f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=False))
print("sum", f(jnp.ones(4)).tolist(), flush=True)
"""


@pytest.mark.parametrize("timeout_s, survives", [(2, False), (30, True)])
def test_a_late_cpu_device_is_waited_for_not_aborted(timeout_s, survives, monkeypatch):
  """XLA:CPU aborts the whole process when the devices of a collective arrive too far apart
  (40 s after a 20 s warning by default): a 2-device training run on a shared 2-core machine,
  its threads starved by other work, died that way with SIGABRT. The trainer sets a long
  timeout (cpu_devices.wait_for_late_devices). Shown here with short ones so the test is
  quick: the flag it sets is read by this jaxlib and decides between the abort and the wait
  (a misspelled flag would abort every run at start-up instead)."""
  from mim_jax.training import cpu_devices
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_collective_call_warn_stuck_timeout_seconds=1 "
                     f"{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}={timeout_s}")
  cpu_devices.wait_for_late_devices()  # a value given already stays
  assert f"{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}={timeout_s}" in os.environ["XLA_FLAGS"]
  assert os.environ["XLA_FLAGS"].count(cpu_devices.COLLECTIVE_TIMEOUT_FLAG) == 1
  result = subprocess.run([sys.executable, "-c", LATE_DEVICE_PROGRAM], capture_output=True,
                          text=True, timeout=120, check=False)
  if survives:
    assert result.returncode == 0 and "sum [4.0, 4.0]" in result.stdout, result.stderr[-2000:]
  else:
    assert result.returncode == -signal.SIGABRT, result.stderr[-2000:]
    assert "Termination timeout" in result.stderr and "Unknown flag" not in result.stderr


def test_the_trainer_sets_the_long_collective_timeout(monkeypatch):
  from mim_jax.training import cpu_devices
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
  # The count left alone (were JAX not started in this worker yet, it would keep 2 devices).
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "1")
  assert cpu_devices.configure("2", [tiny_mae_config()], multi_process=False) is None
  assert os.environ["XLA_FLAGS"] == ("--xla_cpu_multi_thread_eigen=true "
                                     f"{cpu_devices.COLLECTIVE_TIMEOUT_FLAG}="
                                     f"{cpu_devices.COLLECTIVE_TIMEOUT_S}")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_local_atomic_writes_get_the_mode_open_would_give(tmp_path, umask):
  """The temporary file behind an atomic write is private (mkstemp: 0600): exported
  config.json files and pictures came out unreadable to the group where open() would have
  made them readable."""
  old = os.umask(umask)
  try:
    storage.write_bytes(str(tmp_path / "a.json"), b"{}")
    storage.write_with(str(tmp_path / "b.npz"), lambda f: np.savez(f, x=np.zeros(2)))
  finally:
    os.umask(old)
  for name in ("a.json", "b.npz"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask
  assert np.load(tmp_path / "b.npz")["x"].shape == (2,)
  assert sorted(os.listdir(tmp_path)) == ["a.json", "b.npz"]  # no temporary file left
