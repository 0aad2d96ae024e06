"""The benchmark runs end to end on a micro config and reports both implementations."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_bench_prints_one_json_line_per_implementation():
  out = subprocess.run(
      [sys.executable, "-m", "mim_jax.bench", "--config=configs/mae_vitb.py:runlocal",
       "--steps=2", "--warmup=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["impl"] for r in rows] == ["mim_jax", "hf_transformers_pytorch"]
  # The same architecture on both sides.
  assert rows[0]["params"] == rows[1]["params"] > 0
  assert all(r["steps"] == 2 and r["images_per_s"] > 0 for r in rows)


def test_bench_times_other_methods_side_by_side():
  out = subprocess.run(
      [sys.executable, "-m", "mim_jax.bench", "--config=configs/mae_vitb.py:runlocal",
       "--also=configs/simmim_vitb.py:runlocal", "--also=configs/maskfeat_vitb.py:runlocal",
       "--peer=none", "--batch=4", "--steps=2", "--warmup=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["method"] for r in rows] == ["mae", "simmim", "maskfeat"]
  assert [r["masking"] for r in rows] == ["random", "grouped", "blockwise"]
  assert all(r["global_batch"] == 4 and r["images_per_s"] > 0 for r in rows)
  # The same encoder: MAE adds a decoder, SimMIM a mask token and a linear head.
  assert rows[0]["model"] == rows[1]["model"] == rows[2]["model"]
