"""gs:// workdirs end to end, against a Cloud Storage emulator the test starts on 127.0.0.1.

Everything a run writes (checkpoints through Orbax/TensorStore, metrics.jsonl, config.json,
pictures, TensorBoard events, the encoder export, results.json) and everything an evaluation
reads goes to the emulator through the same code paths as a real bucket: gcsfs and
google-cloud-storage read STORAGE_EMULATOR_HOST, TensorStore TENSORSTORE_GCS_HTTP_URL.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mim_jax import storage
from mim_jax.convert import our_weights
from mim_jax.training import metric_writers

from conftest import REPO, requires_fmnist

# Not imported here: gcsfs reads its environment (set by the fixture) when first imported.
pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("gcsfs") and importlib.util.find_spec("gcp_storage_emulator")),
    reason="needs the test extra (gcsfs, gcp-storage-emulator)")

BUCKET = "mim-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A running emulator with bucket BUCKET; its URL is set for this process and children."""
  port = _free_port()
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
  proc = subprocess.Popen(
      [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), "start",
       "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
      stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test",
         # gcsfs asks the storage-control API (which the emulator lacks) for the bucket type.
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    deadline = time.time() + 60
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        break
      except OSError:
        assert proc.poll() is None and time.time() < deadline, "the GCS emulator did not start"
        time.sleep(0.1)
    yield f"gs://{BUCKET}"
  finally:
    proc.kill()
    proc.wait()
    log.close()
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def test_storage_layer_reads_and_writes_gs(gcs):
  root = f"{gcs}/layer"
  storage.write_text(f"{root}/a/x.json", '{"a": 1}')
  storage.write_bytes(f"{root}/a/y.bin", b"\x00\x01")
  storage.write_with(f"{root}/a/z.npy", lambda f: np.save(f, np.arange(3)))
  np.testing.assert_array_equal(np.load(io.BytesIO(storage.read_bytes(f"{root}/a/z.npy"))),
                                np.arange(3))
  storage.remove(f"{root}/a/z.npy")
  assert storage.exists(f"{root}/a/x.json") and storage.isfile(f"{root}/a/x.json")
  assert storage.isdir(f"{root}/a") and not storage.isfile(f"{root}/a")
  assert json.loads(storage.read_text(f"{root}/a/x.json")) == {"a": 1}
  assert storage.read_bytes(f"{root}/a/y.bin") == b"\x00\x01"
  assert sorted(storage.listdir(f"{root}/a")) == ["x.json", "y.bin"]
  assert storage.glob(f"{root}/a/*.bin") == [f"{root}/a/y.bin"]
  # A folder moved whole (a damaged checkpoint set aside): every object copied, then deleted.
  storage.rename(f"{root}/a", f"{root}/a.damaged")
  assert sorted(storage.listdir(f"{root}/a.damaged")) == ["x.json", "y.bin"]
  assert not storage.exists(f"{root}/a/x.json") and not storage.isdir(f"{root}/a")
  storage.rename(f"{root}/a.damaged", f"{root}/a")
  storage.rmtree(f"{root}/a")
  assert not storage.exists(f"{root}/a/x.json")
  # metrics.jsonl without append: rows kept, the object rewritten whole at each flush.
  writer = metric_writers.MetricWriter(root, tensorboard=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.flush()
  assert metric_writers.read_metrics(root) == [{"step": 1, "loss": 1.0}]  # stored at the flush
  writer.write_scalars(2, {"loss": float("nan")})
  writer.close()
  assert metric_writers.read_metrics(root) == [{"step": 1, "loss": 1.0},
                                               {"step": 2, "loss": None}]
  with metric_writers.MetricWriter(root, tensorboard=False) as writer:  # a resumed run appends
    writer.write_scalars(3, {"loss": 0.5})
  assert [r["step"] for r in metric_writers.read_metrics(root)] == [1, 2, 3]


def _run(args: list[str], log_path) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "mim_jax.main", *args], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1"),
                          stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _committed_steps(checkpoints: str) -> list[int]:
  """Steps Orbax finished: on Cloud Storage (no rename) a step is done once its commit marker
  is written."""
  if not storage.isdir(checkpoints):
    return []
  return sorted(int(n) for n in storage.listdir(checkpoints) if n.isdigit() and
                storage.exists(f"{checkpoints}/{n}/commit_success.txt"))


@pytest.mark.long
@requires_fmnist
def test_fashion_mnist_run_in_a_bucket_survives_kill9_and_is_evaluated(gcs, tmp_path):
  run = f"{gcs}/runs/mae"
  args = [f"--config={REPO}/configs/mae_fmnist.py:runlocal", f"--workdir={run}",
          "--config.total_steps=12", "--config.num_epochs=1", "--config.checkpoint_every=3",
          "--config.keep_checkpoints=10", "--config.log_every=1", "--config.viz_every=6",
          "--config.export_encoder=True"]
  proc = _run(args, tmp_path / "run1.log")
  deadline = time.time() + 300
  while not [s for s in _committed_steps(f"{run}/checkpoints") if s >= 3]:
    assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
    assert time.time() < deadline, "no checkpoint reached the bucket"
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  killed_at = max(_committed_steps(f"{run}/checkpoints"))
  assert killed_at < 12
  # What exports and the lost-process message read: the newest committed step.
  assert our_weights.latest_step(f"{run}/checkpoints") == killed_at

  proc = _run(args, tmp_path / "run2.log")  # the same command resumes
  assert proc.wait(timeout=600) == 0, (tmp_path / "run2.log").read_text()[-3000:]
  log = (tmp_path / "run2.log").read_text()
  assert f"at step {killed_at}" in log, log[-3000:]
  steps = [row["step"] for row in metric_writers.read_metrics(run)]
  assert steps == list(range(1, 13)), steps  # one row per step across the kill
  names = set(storage.listdir(run))
  assert {"checkpoints", "config.json", "metrics.jsonl", "reconstructions", "tensorboard",
          "encoder"} <= names, names
  assert storage.listdir(f"{run}/reconstructions") == ["step_00000006.png",
                                                       "step_00000012.png"]
  assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{run}/tensorboard"))
  assert storage.isfile(f"{run}/encoder/model.json")

  # An evaluation reads the export from the bucket and writes its results there.
  knn = f"{gcs}/runs/knn"
  proc = _run([f"--config={REPO}/configs/knn_fmnist.py:runlocal", f"--workdir={knn}",
               f"--config.init_from={run}"], tmp_path / "knn.log")
  assert proc.wait(timeout=600) == 0, (tmp_path / "knn.log").read_text()[-3000:]
  results = json.loads(storage.read_text(f"{knn}/results.json"))
  assert results["init_from"] == run and 0 <= results["knn_top1_cls"] <= 1

