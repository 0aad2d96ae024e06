"""The benchmark runs end to end on micro configs: JSON lines with the fields docs rely on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from mim_jax.config import files

from conftest import REPO, imagenet_config_without_its_data, tool_flags


def _bench(*args, stderr=None):
  # Few steps for step rows; --pipeline and --feed time no steps (and refuse the flags).
  steps = [] if {"--pipeline", "--feed"} & set(args) else ["--steps=2", "--warmup=1"]
  out = subprocess.run([sys.executable, "-m", "mim_jax.bench", *args, *steps],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  if stderr is not None:
    stderr.append(out.stderr)
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.long
def test_bench_times_mae_its_mask_token_variant_and_the_hf_peer(tmp_path):
  log = []
  rows = _bench("--config=configs/mae_vitb.py:runlocal", "--asymmetry", "--peer=hf",
                f"--profile={tmp_path}", stderr=log)
  assert [(r["impl"], r["encoder_mask_tokens"]) for r in rows] == [
      ("mim_jax", False), ("mim_jax", True), ("hf_transformers_pytorch", False)]
  # The same architecture on both sides (the mask-token variant adds the token).
  assert rows[0]["params"] == rows[2]["params"] == rows[1]["params"] - 64 > 0
  for r in rows:
    assert r["steps"] == 2 and r["images_per_s"] > 0 and r["step_s_min"] <= r["step_s_median"]
    assert r["train_gflops_per_image"] > 0 and r["achieved_tflops"] > 0
    assert r["device"] == "cpu" and r["mfu"] is None  # no datasheet peak for CPUs
  assert rows[1]["train_gflops_per_image"] > rows[0]["train_gflops_per_image"]
  assert rows[0]["xla_gflops_per_image"] >= rows[0]["train_gflops_per_image"]
  # --profile: both sides broken down into the same categories, matmuls and attention found.
  from mim_jax.profiling import CATEGORIES
  for r in rows:
    profile = r["profile"]
    assert tuple(profile["categories"]) == CATEGORIES
    assert profile["categories"]["matmul"] > 0 and profile["categories"]["attention"] > 0
    assert profile["kernel_ms_per_step"] > 0 and profile["top_kernels"]
  # PyTorch's operator names come through (which of them rank highest varies with load: under
  # a busy machine the matmuls fell out of the top list).
  assert any(k["kernel"].startswith("aten::") for k in rows[2]["profile"]["top_kernels"])
  # Each row's trace in the folder, the peer's too.
  assert json.loads((tmp_path / "peer_hf" / "trace.json").read_text())["traceEvents"]
  assert list(tmp_path.glob("0_mae/**/*.xplane.pb"))
  # Several CPU devices share one thread pool: their kernels' times include waits, said so.
  shared = "a kernel's time includes waiting for the thread pool the devices share"
  several = rows[0]["device"] == "cpu" and rows[0]["device_count"] > 1
  assert (shared in log[0]) == several, log[0][-2000:]


def test_bench_times_other_methods_side_by_side():
  rows = _bench("--config=configs/mae_vitb.py:runlocal", "--also=configs/simmim_vitb.py:runlocal",
                "--also=configs/maskfeat_vitb.py:runlocal", "--peer=none", "--batch=4")
  assert [r["method"] for r in rows] == ["mae", "simmim", "maskfeat"]
  assert [r["masking"] for r in rows] == ["random", "grouped", "blockwise"]
  assert all(r["global_batch"] == 4 and r["images_per_s"] > 0 for r in rows)
  # The same encoder: MAE adds a decoder, SimMIM a mask token and a linear head.
  assert rows[0]["model"] == rows[1]["model"] == rows[2]["model"]
  for r in rows:  # the rates from the timed steps and the model's FLOPs, not just positive
    assert r["images_per_s"] == pytest.approx(r["global_batch"] / r["step_s_median"], rel=2e-3)
    assert r["achieved_tflops"] == pytest.approx(
        r["train_gflops_per_image"] * r["images_per_s"] / 1e3, rel=2e-3)
    assert r["mfu"] is None  # a CPU has no peak to divide by
  from mim_jax.training import malloc_tunables
  if platform.libc_ver()[0] == "glibc" and malloc_tunables.VARIABLE not in os.environ:
    # The bench re-executed itself with glibc's malloc settings, as mim_jax.main does.
    assert all(r["glibc_tunables"] == malloc_tunables.TUNABLES for r in rows), rows[0]


def test_a_row_divides_its_achieved_flops_by_the_devices_peak():
  """MFU: achieved TFLOP/s (training FLOPs per image x images/s) over the dense bf16 peak of
  the devices that ran the step (an H100's 989 TFLOP/s each)."""
  from mim_jax import bench, registry
  from mim_jax.models import flops
  config = files.load_config_file(str(REPO / "configs" / "mae_vitb.py"))
  row = bench._summary("mim_jax", [0.5, 0.4, 0.6], config, "NVIDIA H100 80GB HBM3")
  per_image = flops.train_flops(registry.forward_flops(config))
  achieved = per_image * config.global_batch_size / 0.5 / 1e12
  assert row["images_per_s"] == pytest.approx(config.global_batch_size / 0.5, rel=1e-3)
  assert row["achieved_tflops"] == pytest.approx(achieved, rel=1e-3)
  assert row["peak_tflops_bf16"] == flops.peak_tflops("H100")
  assert row["mfu"] == pytest.approx(achieved / row["peak_tflops_bf16"], rel=1e-3)
  # The same throughput from 8 devices is an eighth of the utilisation.
  eight = bench._summary("mim_jax", [0.5, 0.4, 0.6], config, "NVIDIA H100 80GB HBM3",
                         device_count=8)
  assert eight["device_count"] == 8 and eight["mfu"] == pytest.approx(row["mfu"] / 8, rel=1e-3)


def test_the_default_peer_is_hf_beside_mae_and_none_beside_other_methods():
  """--peer=auto (the default): a SimMIM config is timed alone (HF's peer is an MAE), as is an
  MAE config HF's MAE does not match; an explicit --peer=hf beside SimMIM, or auto beside a
  named peer, is refused. (The HF peer beside a matching MAE config: the test above.)"""
  rows = _bench("--config=configs/simmim_vitb.py:runlocal", "--batch=4")
  assert [(r["impl"], r["method"]) for r in rows] == [("mim_jax", "simmim")]
  # Beside an MAE config HF's MAE does not match (its blocks recomputed), no peer either, and
  # the log says why.
  log = []
  rows = _bench("--config=configs/mae_vitb.py:runlocal", "--config.model.remat=full",
                "--batch=4", stderr=log)
  assert [(r["impl"], r["method"]) for r in rows] == [("mim_jax", "mae")]
  assert "--peer=auto times no peer: --peer times HF's MAE, which uses model.remat='none'" in (
      log[0]), log[0][-2000:]
  for args, says in {("--config=configs/simmim_vitb.py:runlocal", "--peer=hf"):
                         "--peer and --asymmetry compare against MAE",
                     ("--config=configs/mae_fmnist.py", "--peer=auto,hf"):
                         "auto picks the peer itself"}.items():
    out = subprocess.run([sys.executable, "-m", "mim_jax.bench", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and says in out.stderr, out.stderr[-2000:]


def test_bench_alternates_a_variant_with_its_base_row_in_rounds():
  """--rounds: the rows timed in turn, each row's steps split over the rounds."""
  rows = _bench("--config=configs/mae_vitb.py:runlocal", "--variant=model.attention_impl=xla",
                "--peer=none", "--batch=4", "--rounds=2")
  assert [(r["variant"], r["attention_impl"]) for r in rows] == [
      ("", "heads_major"), ("model.attention_impl=xla", "xla")]  # this CPU's default
  for r in rows:
    assert r["rounds"] == 2 and r["steps"] == 2 and r["images_per_s"] > 0


def test_rounds_without_train_step_rows_is_refused():
  """--rounds acts on the mim_jax step rows only: with none to time it is an error, not a
  flag that silently does nothing."""
  out = subprocess.run([sys.executable, "-m", "mim_jax.bench", "--config=configs/mae_fmnist.py",
                        "--pipeline", "--rounds=2"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0 and "--rounds would have no effect" in out.stderr


@pytest.mark.parametrize("flag, says", [
    ("--steps=0", "flag --steps=0: 0 is not a positive integer"),  # a median of no steps
    ("--warmup=-1", "flag --warmup=-1: -1 is not a non-negative integer"),
    ("--rounds=0", "flag --rounds=0: 0 is not a positive integer"),
    ("--pipeline_batches=0", "flag --pipeline_batches=0: 0 is not a positive integer"),
    ("--batch=-8", "flag --batch=-8: -8 is not a non-negative integer"),
])
def test_counts_out_of_range_are_refused_when_the_flags_are_parsed(flag, says):
  """--steps=0 failed at statistics.median([]) after compiling and warming up."""
  out = subprocess.run([sys.executable, "-m", "mim_jax.bench", "--config=configs/mae_fmnist.py",
                        flag], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and says in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def _refusal(args, monkeypatch, capsys) -> str:
  """What `python -m mim_jax.bench --config=configs/mae_fmnist.py ARGS` says refusing its
  command line, from its checks run in this process as the program runs them (its flag parser,
  then `checked_command`, both before JAX starts a backend); "" if nothing is refused."""
  from absl import app

  from mim_jax import bench
  monkeypatch.chdir(REPO)
  try:
    tool_flags(bench, ["--config=configs/mae_fmnist.py", *args], monkeypatch)
    bench.checked_command()
  except SystemExit:
    return capsys.readouterr().err
  except app.UsageError as e:
    return str(e)
  return ""


def test_feed_pipeline_and_peers_only_refuse_flags_they_do_not_read(monkeypatch, capsys):
  """--feed and --pipeline time the input, not train steps: a step flag given with them (or
  the other mode) is refused by name, as is a pipeline row that would time something else than
  it reports (a batch the generated images cannot fill, augmentation on the device);
  --peers_only refuses rows of ours it would not run; the HF peer (random masking, AdamW) a
  config that masks otherwise. (In this process; the first case also as the program.)"""
  cases = {("--feed", "--steps=3"): "--feed times the input pipeline and reads only --batch, "
                                    "--config, --cpu_devices, --pipeline_batches: --steps would",
           ("--pipeline", "--feed", "--dtype=bfloat16"): "--dtype, --pipeline would have no",
           ("--pipeline", "--batch=300"): "--batch=300 needs --pipeline_images >= 600",
           ("--pipeline", "--config.data.augment_on=device"): "pass --config.data.augment_on=host",
           ("--pipeline", "--config.data.num_workers=4"): "--pipeline sets data.source, "
                                                        "data.path, data.num_workers, seed itself",
           ("--feed", "--config.data.device_resident=True"): "--config.data.device_resident "
                                                             "would have no effect",
           ("--feed", "--config.model.dtype=bfloat16"): "builds no model, optimizer or loss: "
                                                        "--config.model.dtype would have no",
           ("--config.data.num_workers=4",): "timed on a generated batch (--feed and "
                                             "--pipeline time the input): "
                                             "--config.data.num_workers would have no effect",
           ("--variant=data.num_workers=4",): "--variant=data.num_workers=4: the train step is "
                                              "timed on a generated batch (--feed and "
                                              "--pipeline time the input): data.num_workers "
                                              "would have no effect",
           ("--variant=total_steps=5",): "for the loop): total_steps would have no",
           ("--config.optimizer.base_lr=0.1",): "a step with other values of the lr schedule, "
                                                "Adam's constants or the seed runs the same "
                                                "computation: --config.optimizer.base_lr would",
           ("--variant=model.no_such_field=1",): "--variant=model.no_such_field=1: the config "
                                                 "has no field 'model.no_such_field'",
           ("--pipeline_batches=3",): "--pipeline_batches would have no effect: it sizes the "
                                      "input timings of --feed and --pipeline",
           ("--pipeline", "--cpu_devices=2"): "--pipeline times the input pipeline and reads "
                                              "only --batch, --config, --pipeline_batches, "
                                              "--pipeline_images: --cpu_devices would have",
           ("--pipeline", "--config.mesh=(('data',1),)"): "--config.mesh would have no effect",
           ("--feed", "--config.masking.ratio=0.5"): "--config.masking.ratio would have no",
           ("--peers_only", "--cpu_devices=1"): "--cpu_devices (JAX's CPU devices) would have",
           ("--peers_only", "--config.model.attention_impl=xla"):
               "--peers_only times only HF's MAE, which reads the size, dtype, decoder size, "
               "mask ratio, norm_pix, weight decay, batch and image "
               "fields: --config.model.attention_impl would have no effect",
           ("--config.data.augment_on=device", "--config.data.device_resident=True"):
               "--config.data.device_resident would have no effect",
           ("--peers_only", "--variant=model.remat=full"): "--also, --variant and --asymmetry add",
           ("--config.masking.kind=blockwise", "--peer=hf"): "--peer times HF's MAE, which uses "
                                                  "masking.kind='random': the first config has "
                                                  "'blockwise'",
           ("--config.knn.every_epochs=5", "--config.checkpoint_every=7"):
               "not the training loop around them (time a run of python -m mim_jax.main for "
               "the loop): --config.checkpoint_every, --config.knn.every_epochs would have no "
               "effect",
           ("--config.model.remat=full", "--peer=hf"): "--peer times HF's MAE, which uses "
                                           "model.remat='none': the first config has 'full'"}
  for args, message in cases.items():
    said = _refusal(args, monkeypatch, capsys)
    assert message in " ".join(said.split()), (args, said[-500:])
  (args, message), = list(cases.items())[:1]
  out = subprocess.run([sys.executable, "-m", "mim_jax.bench", "--config=configs/mae_fmnist.py",
                        *args], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and f"error: {message}" in out.stderr, out.stderr[-500:]


def test_alternated_rows_take_turns_round_by_round(monkeypatch):
  """bench_alternated: every row warmed up first, then the rows in turn, `steps / rounds`
  timed steps each per round (not one row's steps after the other's)."""
  from mim_jax import bench
  calls = []
  monkeypatch.setattr(bench, "prepare_mim_jax",
                      lambda c: bench._Prepared(lambda: calls.append(c), None, {}, 1, 0.0))
  monkeypatch.setattr(bench, "summarise_mim_jax",
                      lambda p, times, c, variant, rounds: (c, len(times), variant, rounds))
  rows = bench.bench_alternated(["a", "b"], steps=6, warmup=2, rounds=3, variants=["", "v"])
  assert rows == [("a", 6, "", 3), ("b", 6, "v", 3)]
  assert "".join(calls) == "aabb" + "aabb" * 3


def test_bench_times_a_config_whose_dataset_is_not_on_the_machine(tmp_path):
  """The step runs on a generated batch: an ImageNet config benchmarks on a host without
  ImageNet (a GPU machine), where a training run is refused at start-up."""
  config = imagenet_config_without_its_data(tmp_path)
  rows = _bench(f"--config={config}", "--peer=none", "--batch=4")
  assert len(rows) == 1 and rows[0]["images_per_s"] > 0
  # Telling the step where the data is would change nothing: refused.
  out = subprocess.run([sys.executable, "-m", "mim_jax.bench", f"--config={config}",
                        f"--config.data.tfds_data_dir={tmp_path}", "--peer=none"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "--config.data.tfds_data_dir would have no" in out.stderr


def test_a_classifier_off_its_dataset_keeps_the_head_size_it_is_given(tmp_path):
  """The class count a classifier's dataset cannot give here (the folder is on another
  machine) comes from classifier.num_classes, as the refusal advises, even below the synthetic
  source's 10 classes (the advice used to fail validation against those 10)."""
  from mim_jax import data, registry
  from mim_jax.config.errors import ConfigError
  from mim_jax.training import setup
  config = files.load_config_file(f"{REPO}/configs/finetune_fmnist.py:scratch")
  config.data.update(source="image_folder", path=str(tmp_path / "elsewhere"))
  with pytest.raises(ConfigError, match=r"data.path=.*--config.classifier.num_classes"):
    setup.on_synthetic_data(config, "the benchmark")
  config.classifier.num_classes = 5
  synthetic = setup.on_synthetic_data(config, "the benchmark")
  assert synthetic.classifier.num_classes == 5 and synthetic.data.synthetic_classes == 5
  registry.validate_config(synthetic)
  source = data.build_train_source(synthetic.data, image_size=(28, 28), channels=1)
  assert sorted({int(source[i]["label"]) for i in range(10)}) == [0, 1, 2, 3, 4]


def test_pipeline_benchmark_reports_images_per_core():
  rows = _bench("--config=configs/mae_vitb.py", "--pipeline", "--pipeline_images=16",
                "--pipeline_batches=2", "--batch=8")
  assert len(rows) == 1 and rows[0]["images_per_s_per_core"] > 0
  assert rows[0]["images_per_s"] >= rows[0]["images_per_s_per_core"]
  assert rows[0]["image_size"] == [224, 224] and rows[0]["batch"] == 8
  assert rows[0]["augment"] == "RandomResizedCrop + flip"


def test_pipeline_benchmark_runs_a_methods_own_augmentation():
  """iBOT's multi-crop views (it crashed on the default augmentation's missing crop fields)."""
  rows = _bench("--config=configs/ibot_vits.py", "--pipeline", "--pipeline_images=8",
                "--pipeline_batches=1", "--batch=4")
  assert len(rows) == 1 and rows[0]["images_per_s_per_core"] > 0
  assert rows[0]["augment"] == "the method's own" and rows[0]["crop_scale"] is None


def test_feed_benchmark_times_every_training_iterator_on_the_configs_data():
  rows = _bench("--config=configs/mae_vitb.py:runlocal", "--feed", "--pipeline_batches=2",
                "--batch=8")
  assert [r["iterator"] for r in rows] == ["grain_host_augment", "grain_device_augment",
                                           "device_resident"]
  for r in rows:
    assert r["images_per_s"] > 0 and r["batch"] == 8 and r["rounds"] == 3
    assert r["images_per_s_range"][0] <= r["images_per_s"] <= r["images_per_s_range"][1]


def test_feed_benchmark_times_a_methods_own_augmentation_in_grain():
  """iBOT's multi-crop views run only in the grain pipeline: its one feed (it crashed on the
  missing crop fields of the default feeds)."""
  # The model's fields act here (iBOT's masks follow the encoder's patch grid): accepted.
  rows = _bench("--config=configs/ibot_fmnist.py:runlocal", "--feed", "--pipeline_batches=2",
                "--batch=8", "--config.model.variant=mu/4")
  assert [r["iterator"] for r in rows] == ["grain_method_augment"]
  assert rows[0]["images_per_s"] > 0 and rows[0]["batch"] == 8
  # A method without its own augmentation is not built for it: BEiT's would read a tokenizer,
  # and --feed times the input alone.
  rows = _bench("--config=configs/beit_fmnist.py", "--config.tokenizer.path=/nonexistent",
                "--feed", "--pipeline_batches=1", "--batch=8")
  assert [r["iterator"] for r in rows] == ["grain_host_augment", "grain_device_augment",
                                           "device_resident"]


def test_peak_table_matches_device_kinds():
  from mim_jax.models.flops import (
    peak_tflops,  # not mim_jax.bench: its flags clash with main's
  )
  assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
  assert peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert peak_tflops("NVIDIA H200") == 989.4
  assert peak_tflops("TPU v5 lite") == 197.0
  assert peak_tflops("cpu") is None


def test_also_configs_take_the_command_lines_overrides(monkeypatch):
  """--config.FIELD overrides act on every row (they changed --config alone, so an --also row
  was timed under other settings); a field an --also config lacks is a usage error."""
  from mim_jax import bench
  monkeypatch.setattr(bench, "FLAGS", {"config": None})
  overrides = {"model.remat": "full", "masking.ratio": 0.5}
  monkeypatch.setattr(bench.config_flags, "get_override_values", lambda flag: overrides)
  spec = f"{REPO}/configs/simmim_fmnist.py"
  config = bench.with_overrides(files.load_config_file(spec), spec)
  assert config.model.remat == "full" and config.masking.ratio == 0.5
  for missing in ("decoder.depth", "masking.no_such_field"):  # SimMIM has no decoder
    overrides = {missing: 2}
    with pytest.raises(bench.app.UsageError, match=r"--also=.*simmim_fmnist.py: the --config "
                       r"overrides act on every row, and this config cannot take one of "
                       rf"\['{missing}'\]"):
      bench.with_overrides(files.load_config_file(spec), spec)


def test_also_and_feed_inputs_that_do_not_load_are_one_line_errors(tmp_path, monkeypatch,
                                                                   capsys):
  """--also naming a missing file or a config whose code fails, and --feed on a missing folder
  or a truncated .npy, were tracebacks; an --also config of an unknown method was refused
  without naming the --also row. Now one line naming the flag and the file, before JAX starts
  (as a bad --config is reported)."""
  (tmp_path / "raises.py").write_text(
      "from mim_jax import registry\n\ndef get_config(arg=None):\n"
      "  return registry.base_config('nosuch')\n")
  (tmp_path / "unknown.py").write_text(
      "from mim_jax import registry\n\ndef get_config(arg=None):\n"
      "  c = registry.base_config('mae')\n  c.method = 'nosuch'\n  return c\n")
  np.save(tmp_path / "train.npy", np.zeros((16, 8, 8), np.float32))
  whole = (tmp_path / "train.npy").read_bytes()
  (tmp_path / "cut").mkdir()
  (tmp_path / "cut" / "train.npy").write_bytes(whole[:len(whole) // 2])
  missing = tmp_path / "missing.py"
  cases = {
      (f"--also={missing}",): f"--also='{missing}' is invalid: a config file that loads, e.g. "
                              f"configs/mae_fmnist.py[:ARG]. [Errno 2] No such file or "
                              f"directory: '{missing}'",
      (f"--also={tmp_path}",): f"--also='{tmp_path}' is invalid: a config file that loads",
      (f"--also={tmp_path}/raises.py",): f"--also={tmp_path}/raises.py does not load: "
                                         "config.method='nosuch' is invalid: one of [",
      (f"--also={tmp_path}/unknown.py",): f"--also={tmp_path}/unknown.py: config.method="
                                          "'nosuch' is invalid: one of [",
      ("--also=configs/mae_fmnist.py:nosucharg",): "--also=configs/mae_fmnist.py:nosucharg "
                                                   "does not load: ValueError: unknown config "
                                                   "argument(s) ['nosucharg']",
      ("--feed", f"--config.data.path={tmp_path}/none"): f"--feed: config.data.path='{tmp_path}"
                                                         "/none' is invalid: an existing folder",
      ("--feed", "--config.data.source=npy", f"--config.data.path={tmp_path}/cut"):
          f"--feed: config.data.split='train' is invalid: a split whose {tmp_path}/cut/train.npy "
          "is a .npy array (the file is truncated: its header describes float32 [16, 8, 8], "
          f"{len(whole)} bytes with the header, and it has {len(whole) // 2})",
  }
  for args, message in cases.items():
    said = _refusal(args, monkeypatch, capsys)
    assert message in " ".join(said.split()) and "Traceback" not in said, (args, said[-800:])
