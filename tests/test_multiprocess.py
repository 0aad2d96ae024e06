"""Multi-process start-up: flags and cluster detection, and a real 2-process CPU run."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

from mim_jax.config.errors import ConfigError
from mim_jax.training import distributed, metric_writers, run_errors

from conftest import FAST_COMPILE_XLA_FLAGS, REPO

SRUN = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1"}
CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID",
                "SLURM_STEP_NODELIST", "SLURM_LOCALID", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                "MEGASCALE_NUM_SLICES", distributed.FORCE_ENV)


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize's keyword arguments instead of starting a service."""
  recorded: list[dict] = []
  for name in CLUSTER_VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(recorded))
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  return recorded


def test_single_process_initializes_nothing(calls):
  distributed.maybe_initialize()
  distributed.maybe_initialize(num_processes=1)
  distributed.maybe_initialize(num_processes=1, process_id=0)
  assert calls == []


def test_explicit_flags_are_passed_through_once(calls):
  distributed.maybe_initialize("10.0.0.1:1234", 4, 3)
  distributed.maybe_initialize("10.0.0.1:1234", 4, 3)
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}]


def test_explicit_flags_win_over_the_environment(calls, monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "16")
  distributed.maybe_initialize("host:1", 2, 0)
  assert calls == [{"coordinator_address": "host:1", "num_processes": 2, "process_id": 0}]


@pytest.mark.parametrize("args,match", [
    (("host:1", 2, -1), "missing --process_id"),
    (("", 2, 0), "missing --coordinator_address"),
    (("host:1", 0, 0), "missing --num_processes"),
    (("host:1", 2, 2), r"--process_id=2 must be in \[0, 2\)"),
    # Below the "not given" values: they were taken as not given, without a word.
    (("", -2, -1), r"--num_processes=-2 must be >= 1 \(or left out\)"),
    (("", 0, -5), r"--process_id=-5 must be >= 0 \(or left out\)"),
])
def test_incomplete_or_inconsistent_flags_are_rejected(calls, args, match):
  with pytest.raises(ValueError, match=match):
    distributed.maybe_initialize(*args)
  assert calls == []


@pytest.mark.parametrize("address,says", [
    ("localhost", "It has no port"),  # an IndexError inside JAX
    ("localhost:abc", "The port 'abc' is not a number"),  # a segfault or an RPC traceback
    ("localhost:99999", "The port '99999' is not a number"),  # waited for ever
    ("localhost:0", "The port '0' is not a number"),
    ("http://localhost:12355", "Drop the scheme"),  # waited for ever
    ("::1:12355", "An IPv6 address goes in brackets"),
    (":12355", "HOST:PORT or [IPv6]:PORT"),
    ("my host:12355", "HOST:PORT or [IPv6]:PORT"),
])
def test_a_malformed_coordinator_address_is_refused_before_jax_sees_it(calls, address, says):
  with pytest.raises(ConfigError) as raised:
    distributed.maybe_initialize(address, 2, 0)
  message = str(raised.value)
  assert message.startswith(f"--coordinator_address={address!r} is invalid: HOST:PORT")
  assert says in message and "\n" not in message
  assert calls == []


@pytest.mark.parametrize("address", ["localhost:12355", "10.0.0.1:1", "node-01.cluster:65535",
                                     "[::1]:12355", "[fe80::1%eth0]:8476"])
def test_well_formed_coordinator_addresses_pass(calls, address):
  distributed.maybe_initialize(address, 2, 1)
  assert calls == [{"coordinator_address": address, "num_processes": 2, "process_id": 1}]


def test_one_process_asked_inside_a_cluster_job_of_several_is_refused(calls, monkeypatch):
  """--num_processes=1 in every task of a multi-task srun step made each task train alone
  into the one workdir (an explicit flag wins over the environment)."""
  for name, value in {**SRUN, "SLURM_NTASKS": "4"}.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=r"--num_processes=1 inside a slurm job of several "
                     "processes: each of them would train alone"):
    distributed.maybe_initialize(num_processes=1)
  assert calls == []
  monkeypatch.setenv(distributed.FORCE_ENV, "0")  # each process alone, on purpose
  distributed.maybe_initialize(num_processes=1)
  monkeypatch.delenv(distributed.FORCE_ENV)
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task step: one process, as asked
  distributed.maybe_initialize(num_processes=1)
  assert calls == []


@pytest.mark.parametrize("env,cluster", [
    ({**SRUN, "SLURM_NTASKS": "8"}, "slurm"),
    ({**SRUN, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}, None),
    ({**SRUN, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "4"}, "slurm"),
    ({**SRUN, "SLURM_NTASKS": "1"}, None),
    # An allocation's shell or batch script without srun: no step, one process.
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, None),
    ({"SLURM_NTASKS": "8"}, None),  # not inside a SLURM job
    ({"TPU_WORKER_HOSTNAMES": "t1w0,t1w1,t1w2,t1w3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_PROCESS_ADDRESSES": "a:8476,b:8476"}, "tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({"MEGASCALE_NUM_SLICES": "2"}, "tpu"),
    ({"MEGASCALE_NUM_SLICES": "1"}, None),
    ({}, None),
])
def test_detect_cluster(env, cluster):
  assert distributed.detect_cluster(env) == cluster


def test_detected_cluster_lets_jax_fill_in_the_arguments(calls, monkeypatch):
  for name, value in {**SRUN, "SLURM_NTASKS": "8"}.items():
    monkeypatch.setenv(name, value)
  distributed.maybe_initialize()
  assert calls == [{}]


def test_environment_switch(calls, monkeypatch):
  monkeypatch.setenv(distributed.FORCE_ENV, "0")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
  distributed.maybe_initialize()
  assert calls == []
  monkeypatch.setenv(distributed.FORCE_ENV, "1")
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
  distributed.maybe_initialize()
  assert calls == [{}]
  monkeypatch.setenv(distributed.FORCE_ENV, "maybe")
  with pytest.raises(ValueError, match=distributed.FORCE_ENV):
    distributed.initialize_args()


def test_one_process_says_its_coordinator_is_not_used(caplog):
  with caplog.at_level(logging.INFO, logger="mim_jax.training.distributed"):
    assert distributed.initialize_args("10.0.0.1:1234", num_processes=1, process_id=0,
                                       env={}) is None
  assert "--coordinator_address=10.0.0.1:1234 is not used" in caplog.text


def test_cli_rejects_incomplete_flags(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "mim_jax.main", "--config=configs/mae_vitb.py:runlocal",
       f"--workdir={tmp_path}", "--num_processes=2", "--process_id=0"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "missing --coordinator_address" in proc.stderr


def test_cli_refuses_a_malformed_coordinator_address_in_one_line(tmp_path):
  """`localhost` ended in an IndexError traceback inside JAX (exit 1)."""
  proc = subprocess.run(
      [sys.executable, "-m", "mim_jax.main", "--config=configs/mae_vitb.py:runlocal",
       f"--workdir={tmp_path}", "--coordinator_address=localhost", "--num_processes=2",
       "--process_id=0"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert errors and errors[0].startswith("error: --coordinator_address='localhost' is invalid")
  assert "Traceback" not in proc.stderr


def _run_together(commands: list[list[str]], env: dict, timeout: int) -> tuple[list, list[str]]:
  """Starts every command at once from the repository root and waits for all of them:
  (processes, their combined stdout + stderr). Any still running at the end are killed."""
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for cmd in commands]
  try:
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return procs, outputs


def _one_device_per_process_env(**extra: str) -> dict:
  """The environment of a multi-process test: one CPU device per process (no simulated
  devices, no cluster variables that jax.distributed would read), the tests on the path."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
             PYTHONPATH=f"{REPO}:{REPO / 'tests'}", XLA_FLAGS=FAST_COMPILE_XLA_FLAGS, **extra)
  for name in CLUSTER_VARS:
    env.pop(name, None)
  return env


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.long
def test_two_cpu_processes_train_into_one_workdir(tmp_path):
  """Two processes, one CPU device each, one mesh of 2 devices: the runlocal MAE recipe."""
  workdir = tmp_path / "run"
  env = _one_device_per_process_env()
  port = _free_port()
  procs, outputs = _run_together(
      [[sys.executable, "-m", "mim_jax.main", "--config=configs/mae_vitb.py:runlocal",
        f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
        "--num_processes=2", f"--process_id={i}"] for i in range(2)], env, timeout=240)
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{out[-4000:]}"
    assert f"process {i} of 2, 1 local / 2 global device(s) (cpu)" in out, out[-4000:]
  assert re.search(r"training to step 2 on 2 device\(s\)", outputs[0]), outputs[0][-4000:]
  # Only process 0 reports progress.
  assert "step 2/2" in outputs[0] and "step 2/2" not in outputs[1]

  # One set of logs, each step once.
  assert [row["step"] for row in metric_writers.read_metrics(str(workdir))] == [1, 2]
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 2
  assert (workdir / "reconstructions" / "step_00000002.png").is_file()
  # The final checkpoint holds both processes' data-iterator positions.
  final = workdir / "checkpoints" / "2"
  assert (final / "commit_success.txt").is_file() or (final / "_CHECKPOINT_METADATA").is_file()
  assert sorted(p.name for p in (final / "data").glob("process_*.json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
  assert json.loads((workdir / "encoder" / "model.json").read_text())["variant"] == "mu/16"

  # The two processes' run resumes in one process (one device): the state is resharded, the
  # data iterator (saved per process) starts afresh.
  resumed = subprocess.run(
      [sys.executable, "-m", "mim_jax.main", "--config=configs/mae_vitb.py:runlocal",
       f"--workdir={workdir}", "--config.total_steps=3", "--config.export_encoder=false"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert "written by a different number of processes" in resumed.stderr, resumed.stderr[-4000:]
  assert "at step 2" in resumed.stderr, resumed.stderr[-4000:]
  assert [row["step"] for row in metric_writers.read_metrics(str(workdir))] == [1, 2, 3]

  # k-NN over two processes: each extracts its shard, and the gathered bank keeps every
  # feature beside its own label (features and labels gathered alike), so the scores equal a
  # single-process run's on the same encoder. (k-NN does not see the bank's order itself.)
  knn_args = ["--config=configs/knn_imagenet.py:runlocal", f"--config.init_from={workdir}"]
  knn_port = _free_port()
  procs, knn_out = _run_together(
      [[sys.executable, "-m", "mim_jax.main", *knn_args, f"--workdir={tmp_path / 'knn2'}",
        f"--coordinator_address=localhost:{knn_port}", "--num_processes=2",
        f"--process_id={i}"] for i in range(2)], env, timeout=240)
  assert all(proc.returncode == 0 for proc in procs), knn_out[0][-3000:] + knn_out[1][-3000:]
  assert "bank 64, queries 64" in knn_out[0], knn_out[0][-3000:]  # whole split, not a shard
  single = subprocess.run([sys.executable, "-m", "mim_jax.main", *knn_args,
                           f"--workdir={tmp_path / 'knn1'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
  assert single.returncode == 0, single.stderr[-3000:]
  two = json.loads((tmp_path / "knn2" / "results.json").read_text())
  one = json.loads((tmp_path / "knn1" / "results.json").read_text())
  assert all(two[k] == one[k] for k in ("knn_top1_cls", "knn_top5_cls", "knn_top1_gap"))


_SAME_STEPS = r"""
import os, sys
import jax
mode, pid, nproc, port, workdir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if nproc > 1:
  jax.distributed.initialize(f"localhost:{port}", nproc, pid)
import functools
import numpy as np, optax
from mim_jax import data, registry
from mim_jax.config import defaults as config_defaults
from mim_jax.training import checkpoint, parallel
from mim_jax.training import loop as train
from mim_jax.training import step as step_lib
from conftest import tiny_mae_config

assert jax.device_count() == nproc and jax.process_count() == nproc
config = tiny_mae_config(global_batch_size=8)
method = registry.build_method(config)
tx = optax.sgd(0.1, momentum=0.9)
mesh = parallel.make_mesh([("fsdp", -1)])
init = functools.partial(step_lib.init_train_state, method, tx, image_shape=(1, 16, 16, 3))
abstract = jax.eval_shape(init, jax.random.key(1))
shardings = parallel.tree_shardings(mesh, abstract, config_defaults.fsdp_rules(min_size=64))
rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
key = jax.jit(lambda: jax.random.key(2), out_shardings=rep)()
state = jax.jit(init, out_shardings=shardings)(jax.random.key(1))
step = jax.jit(parallel.with_activation_mesh(mesh, step_lib.make_train_step(method, tx, lambda s: 0.1)),
               in_shardings=(shardings, bsh, rep), out_shardings=(shardings, rep))
# The same global batches everywhere; each process feeds only its rows.
images = np.random.default_rng(0).normal(size=(4, 8, 16, 16, 3)).astype(np.float32)
rows = slice(pid * 8 // nproc, (pid + 1) * 8 // nproc)
for s in range(3):
  state, _ = step(state, parallel.host_batch_to_global({"image": images[s, rows]}, bsh), key)
params = step_lib.to_host(state.params)  # collective
iterator = data.make_train_iterator(config.data, image_size=(16, 16), channels=3,
                                    global_batch_size=8, seed=0)
if mode == "multi":
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
  ckpt.save(3, state, iterator, force=True)  # collective: every process writes its shards
  ckpt.wait()
  ckpt.close()
  if pid == 0:
    np.savez(os.path.join(workdir, "params.npz"), *jax.tree.leaves(params))
else:
  multi = np.load(os.path.join(workdir, "params.npz"))
  multi = [multi[f"arr_{i}"] for i in range(len(multi.files))]
  for a, b in zip(jax.tree.leaves(params), multi):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Resume the two processes' checkpoint here, on one device, and go on training.
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract, shardings)
  restored = ckpt.restore(3, target)
  ckpt.close()
  assert int(restored.step) == 3
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), multi):
    np.testing.assert_array_equal(a, b)
  batch = parallel.host_batch_to_global({"image": images[3]}, bsh)
  resumed, _ = step(restored, batch, key)
  straight, _ = step(state, batch, key)
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(jax.device_get(straight))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
print("OK", mode, pid)
"""


_RESIDENT_ROWS = r"""
import sys
import jax
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"localhost:{port}", 2, pid)
import numpy as np
from mim_jax.data import device_resident
from mim_jax.training import parallel
from conftest import tiny_config
config = tiny_config("mae", global_batch_size=8, **{"data.augment_on": "device",
                                                    "data.device_resident": True})
sharding = parallel.batch_sharding(parallel.make_mesh([("data", -1)]))
it = device_resident.make_train_iterator(config.data, image_size=(16, 16), channels=3,
                                         global_batch_size=8, seed=0, batch_sharding=sharding)
images, labels = device_resident.load_split(config.data, image_size=(16, 16), channels=3)
for b in range(3):  # 64 images, 32 per process: batch 2 ends the first epoch
  batch = next(it)
  rows = device_resident.stream_rows(0, pid, 2, len(labels), b, 4)
  local = np.concatenate([np.asarray(s.data) for s in batch["image"].addressable_shards])
  np.testing.assert_array_equal(local, images[rows])  # its rows, on its device, in order
  np.testing.assert_array_equal(batch["label"], labels[rows])  # and their labels beside them
print(f"OK {pid}")
"""


@pytest.mark.long
def test_two_processes_train_from_a_device_resident_split(tmp_path):
  """Each process draws the rows of its shard and the gather on the 2-device mesh puts exactly
  those rows, in order, on its device beside their labels; the CLI trains and checkpoints both
  positions (data/device_resident.py)."""
  env = _one_device_per_process_env()
  port = str(_free_port())
  procs, outputs = _run_together(
      [[sys.executable, "-c", _RESIDENT_ROWS, str(i), port] for i in range(2)], env,
      timeout=240)
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and f"OK {i}" in out, out[-4000:]

  workdir = tmp_path / "run"
  port = _free_port()
  procs, outputs = _run_together(
      [[sys.executable, "-m", "mim_jax.main", "--config=configs/mae_vitb.py:runlocal",
        "--config.data.augment_on=device", "--config.data.device_resident=True",
        "--config.viz_every=0", "--config.export_encoder=false", f"--workdir={workdir}",
        f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
       for i in range(2)], env, timeout=240)
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{out[-4000:]}"
  assert [row["step"] for row in metric_writers.read_metrics(str(workdir))] == [1, 2]
  for i in range(2):
    position = json.loads((workdir / "checkpoints" / "2" / "data" /
                           f"process_{i}-of-2.json").read_text())
    assert position == {"kind": "mim_jax.device_resident", "next_batch": 2}


@pytest.mark.long
def test_two_processes_take_the_same_steps_as_one_and_resume_in_one(tmp_path):
  """Two processes (one CPU device each, FSDP over both) train 3 steps on the same global
  batches as one process; their collective Orbax checkpoint resumes in the single process."""
  env = _one_device_per_process_env()
  port = str(_free_port())
  procs, outputs = _run_together(
      [[sys.executable, "-c", _SAME_STEPS, "multi", str(i), "2", port, str(tmp_path)]
       for i in range(2)], env, timeout=300)
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and f"OK multi {i}" in out, out[-4000:]
  single = subprocess.run([sys.executable, "-c", _SAME_STEPS, "single", "0", "1", port,
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
  assert single.returncode == 0 and "OK single 0" in single.stdout, single.stderr[-4000:]


@pytest.mark.long
def test_killing_one_process_stops_the_other_and_the_same_command_resumes_both(tmp_path):
  """kill -9 of process 1: process 0 stops within seconds with exit code 5 and one line naming
  the latest checkpoint (not a traceback, not a wait for the dead process); the same two
  commands then finish the run, each step logged once.

  The kill comes between saves (checkpoint 20 complete, the next one at step 40): a save in
  flight ends at a barrier across processes, where a dead peer is only noticed by JAX's
  coordination service after its heartbeat timeout (it then aborts the survivor)."""
  workdir = tmp_path / "run"
  env = _one_device_per_process_env(PYTHONUNBUFFERED="1")

  def commands(port: int) -> list[list[str]]:
    return [[sys.executable, "-m", "mim_jax.main", "--config=configs/mae_vitb.py:runlocal",
             f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={i}", "--config.total_steps=60",
             "--config.num_epochs=8", "--config.checkpoint_every=20", "--config.log_every=1",
             "--config.viz_every=0", "--config.export_encoder=false"] for i in range(2)]

  log0 = tmp_path / "p0.log"
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(tmp_path / f"p{i}.log", "w"),
                            stderr=subprocess.STDOUT)
           for i, cmd in enumerate(commands(_free_port()))]
  try:
    deadline = time.time() + 240
    while not ("step 22/60" in log0.read_text() and (workdir / "checkpoints" / "20").is_dir()):
      assert procs[0].poll() is None, log0.read_text()[-3000:]
      assert time.time() < deadline, "the run did not reach step 22 with checkpoint 20 written"
      time.sleep(0.05)
    assert "step 40/60" not in log0.read_text()  # no save in flight
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    assert procs[0].wait(timeout=150) == run_errors.EXIT_PEER_LOST, log0.read_text()[-3000:]
    assert time.time() - killed < 30  # not the 100 s heartbeat timeout
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  out = log0.read_text()
  assert "process 0 of 2 stops" in out and "Traceback" not in out, out[-3000:]
  latest = int(re.search(r"latest complete checkpoint in \S+ is step (\d+)", out).group(1))
  assert latest == 20

  resumed, outputs = _run_together(commands(_free_port()), env, timeout=300)
  for i, (proc, text) in enumerate(zip(resumed, outputs)):
    assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{text[-3000:]}"
  assert f"at step {latest}" in outputs[0], outputs[0][-3000:]
  assert [row["step"] for row in metric_writers.read_metrics(str(workdir))] == list(range(1, 61))


@pytest.mark.long
def test_two_processes_agree_to_skip_a_step_damaged_for_one_of_them(tmp_path):
  """Process 1's data position in the newest checkpoint (step 3) is cut short: only process 1
  finds the step damaged. A rerun with a schedule ending at step 2 is not refused for step 3
  (both agree it is damaged: had process 0 refused alone, process 1 would wait at the restore
  barrier), both skip it together before any restore (Orbax's restore ends with a barrier
  process 0 would wait at alone), resume step 2 and move step 3 aside once."""
  workdir = tmp_path / "run"
  env = _one_device_per_process_env()

  def commands(total_steps: int) -> list[list[str]]:
    port = _free_port()
    return [[sys.executable, "-m", "mim_jax.main", "--config=configs/mae_vitb.py:runlocal",
             f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={i}", f"--config.total_steps={total_steps}",
             "--config.checkpoint_every=1", "--config.viz_every=0",
             "--config.export_encoder=false"] for i in range(2)]

  for total_steps in (3, 2):
    procs, outputs = _run_together(commands(total_steps), env, timeout=240)
    for i, (proc, out) in enumerate(zip(procs, outputs)):
      assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{out[-4000:]}"
    if total_steps == 2:
      assert "data/process_1-of-2.json (the data-iterator position) is unreadable" in \
          outputs[1], outputs[1][-4000:]
      assert "process 1 found it damaged" in outputs[0], outputs[0][-4000:]
      assert all("at step 2" in out for out in outputs), outputs[0][-3000:]
    else:
      position = workdir / "checkpoints" / "3" / "data" / "process_1-of-2.json"
      position.write_text(position.read_text()[:5])
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if not p.name.startswith("_")) == ["1", "2", "3.damaged"]
  assert [row["step"] for row in metric_writers.read_metrics(str(workdir))
          if "loss" in row] == [1, 2]
