r"""Training-step throughput of pre-training configs, beside HF PyTorch ViTMAE, with FLOPs and MFU.

  python -m mim_jax.bench --config=configs/mae_vitb.py [--batch=B] [--dtype=bfloat16] \
      [--steps=20] [--peer=hf,hf_compile] [--asymmetry] [--also=configs/simmim_vitb.py]
  python -m mim_jax.bench --config=configs/mae_vitb.py --pipeline [--pipeline_images=512]
  python -m mim_jax.bench --config=configs/mae_fmnist.py --feed [--pipeline_batches=8]

Every measurement runs on one synthetic batch (`--batch`, default config.global_batch_size)
after warm-up steps, each step timed to completion (block_until_ready; the loss's .item() for
PyTorch), and prints one JSON line: method, model, image size, masking, batch, dtype, device
kind and count, step time (median, min, max, interquartile range), images/s, model FLOPs per
image (analytic, `mim_jax.models.flops`; XLA's cost analysis of the compiled step beside it),
achieved TFLOP/s and MFU against the device's dense bf16 peak (`flops.PEAK_TFLOPS`; none on
CPU).

  --also       further configs (PATH[:ARG]) timed in the same run, e.g. SimMIM on the same encoder
               (the --config.FIELD overrides act on them too)
  --asymmetry  also the first (MAE) config with all patches and mask tokens through the encoder
               (the paper's "w/ [M]"), to measure what the visible-only encoder saves
  --peer       hf: HF ViTMAEForPreTraining, same architecture, AdamW, eager PyTorch;
               hf_compile: the same under torch.compile; on a GPU both use bf16 autocast when
               the config's dtype is bfloat16; none; auto (default): hf beside an MAE config
               HF's model and optimizer match, else none (with a line saying why)
  --peers_only only the peers (the first config sets their architecture and batch)
  --variant    the first config with FIELD=VALUE overrides, a lever against the base row
  --rounds=N   the mim_jax rows timed in turn, N rounds of steps/N steps each (an A/B of levers a
               few per cent apart on a shared machine), e.g.
               --variant=model.attention_impl=xla --steps=30 --rounds=6 --peer=none
  --pipeline   instead of steps: images/s per CPU core of the input pipeline (JPEG decode +
               RandomResizedCrop + flip + normalise, or the method's own augmentation: iBOT's
               multi-crop views) on generated JPEGs, i.e. how many CPU cores feed one
               accelerator at a given step rate
  --feed       instead of steps: images/s of the training iterators over the config's own data,
               one process, alternated: grain with the host's augmentation, grain feeding
               augmentation on the device, and the split held on the device
               (data.device_resident); the rate a step must stay under to be fed. A method
               with its own augmentation (iBOT) has one feed: grain with it
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from typing import Any, Callable, NamedTuple, Sequence

from absl import app, flags
from ml_collections import config_flags

from mim_jax.config import checks, files
from mim_jax.config.errors import ConfigError, refuse_extra_arguments

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS,
                 argv: Sequence[str] | None = None) -> None:
  """The command line of `python -m mim_jax.bench`; defined only when bench runs as the program, so
  that importing bench beside mim_jax.main (tests, notebooks) defines no flag twice."""
  config_flags.DEFINE_config_file("config", None, "Path to a pre-training config file.",
                                  lock_config=True, flag_values=flag_values,
                                  sys_argv=None if argv is None else list(argv))
  flags.DEFINE_multi_string("also", [], "Further config files (PATH[:ARG]) timed in the same "
                            "run, with --batch, --dtype and the --config.FIELD overrides (each "
                            "field must exist in every --also config).", flag_values=flag_values)
  # Bounds checked by absl when the flags are parsed: one line, before anything runs.
  flags.DEFINE_integer("batch", 0, "Global batch for every measurement (0: each config's own).",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_string("dtype", "", "Computation dtype for every measurement ('': each config's).",
                      flag_values=flag_values)
  flags.DEFINE_string("cpu_devices", "auto", "JAX CPU devices (CPU runs): 'auto' as "
                      "mim_jax.main trains (small encoders: one per core, as many as split "
                      "every row's batch evenly; else 1), or a count (1: one device "
                      "parallelising each operation).", flag_values=flag_values)
  flags.DEFINE_integer("steps", 20, "Timed steps per measurement.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).", lower_bound=0,
                       flag_values=flag_values)
  flags.DEFINE_integer("rounds", 1, "Time the mim_jax rows (configs, variants) in turn, this "
                       "many rounds of steps/rounds steps each, instead of one after the other: "
                       "an A/B of levers a few % apart on a noisy machine. Every row's state "
                       "is held at once.", lower_bound=1, flag_values=flag_values)
  flags.DEFINE_list("peer", ["auto"], "Peers timed in the same run: hf, hf_compile, none, or "
                    "auto: hf when the first config is an MAE config that HF's model and "
                    "optimizer match, else none.", flag_values=flag_values)
  flags.DEFINE_bool("peers_only", False, "Time only the --peer implementations (e.g. a slow "
                    "torch.compile in a process of its own).", flag_values=flag_values)
  flags.DEFINE_multi_string("variant", [], "The first config with FIELD=VALUE[,FIELD=VALUE...] "
                            "overrides, timed in the same run (a lever against the base row), "
                            "e.g. --variant=model.attention_impl=xla.", flag_values=flag_values)
  flags.DEFINE_bool("asymmetry", False, "Also time MAE with mask tokens through the encoder.",
                    flag_values=flag_values)
  flags.DEFINE_bool("pipeline", False, "Benchmark the input pipeline instead of train steps.",
                    flag_values=flag_values)
  flags.DEFINE_integer("pipeline_images", 512, "Generated JPEGs for --pipeline.", lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_integer("pipeline_batches", 8, "Timed batches for --pipeline and --feed.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_bool("feed", False, "Benchmark the training iterators on the config's data "
                    "instead of train steps.", flag_values=flag_values)
  flags.DEFINE_string("profile", "", "Also trace a few steps of each row into this folder "
                      "(<i>_<method>/ for mim_jax's rows, peer_<name>/trace.json for the "
                      "PyTorch peers, from torch.profiler) and report kernel time by category "
                      "and the top kernels (mim_jax/profiling.py)", flag_values=flag_values)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


PEERS = ("hf", "hf_compile", "none", "auto")
# What HF's ViTMAEForPreTraining and torch AdamW run, as the first config's fields (a tuple:
# any of its values); bench_hf mirrors the rest.
PEER_RUNS = {"masking.kind": "random", "masking.ratio_range": ((), []),
             "data.augment_on": "host",  # else our step also crops and flips; HF's does not
             "optimizer.name": "adamw", "optimizer.mu_dtype": ("", "float32"),
             "optimizer.clip_grad_norm": 0.0, "grad_accum_steps": 1,
             "model.dtype": ("float32", "bfloat16"), "model.remat": "none",
             "model.drop_path_rate": 0.0, "model.encoder_mask_tokens": False,
             "model.layer_scale": 0.0, "model.rel_pos_bias": "", "model.pre_norm": False,
             "model.abs_posemb": True, "model.mlp_act": "gelu"}


def _sig(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")


def _summary(name: str, times: list[float], config, device_kind: str, device_count: int = 1,
             **extra) -> dict:
  """The JSON row of `times` (seconds per step of `config`'s global batch on `device_count`
  devices of `device_kind`): MFU divides the achieved FLOP/s by the peak of them all."""
  from mim_jax import registry
  from mim_jax.models import flops
  from mim_jax.models.vit import describe_size
  median = statistics.median(times)
  q = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
  images_per_s = config.global_batch_size / median
  train_flops = flops.train_flops(registry.forward_flops(config))
  achieved = train_flops * images_per_s / 1e12
  peak = flops.peak_tflops(device_kind)
  peak = peak * device_count if peak else None
  return {"impl": name, "method": config.method, "model": describe_size(config.model),
          "image_size": list(config.image_size),
          "masking": config.masking.kind if "masking" in config else None,
          "mask_ratio": config.masking.ratio if "masking" in config else None,
          "encoder_mask_tokens": bool(config.model.get("encoder_mask_tokens", False)),
          "global_batch": config.global_batch_size, "device": device_kind,
          "steps": len(times), "step_s_median": round(median, 5),
          "step_s_min": round(min(times), 5), "step_s_max": round(max(times), 5),
          "step_s_iqr": round(q[2] - q[0], 5), "images_per_s": round(images_per_s, 1),
          "train_gflops_per_image": _sig(train_flops / 1e9),
          "achieved_tflops": _sig(achieved), "peak_tflops_bf16": peak,
          "device_count": device_count, "mfu": _sig(achieved / peak) if peak else None,
          **extra}


def timed(step, warmup: int, steps: int) -> list[float]:
  """Wall seconds of each of `steps` calls of `step()` after `warmup` untimed ones; `step`
  must block until its work is done (jax.block_until_ready)."""
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    step()
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times


def bench_mim_jax(config, steps: int, warmup: int, profile_dir: str = "",
                  profile_steps: int = 5, variant: str = "") -> dict:
  """The row of one config: `steps` timed steps after `warmup`, then the optional profile."""
  prepared = prepare_mim_jax(config)
  times = timed(prepared.one_step, warmup, steps)
  return summarise_mim_jax(prepared, times, config, profile_dir, profile_steps, variant)


def bench_alternated(configs, steps: int, warmup: int, rounds: int,
                     variants: list[str]) -> list[dict]:
  """The rows of `configs` timed in turn: every step compiled and warmed up first, then
  `rounds` rounds of steps / rounds steps each, so that a slow spell of a shared machine
  falls on every row alike (levers a few % apart). Holds every row's train state at once."""
  prepared = [prepare_mim_jax(c) for c in configs]
  for p in prepared:
    timed(p.one_step, warmup, 0)
  times = [[] for _ in configs]
  per_round = steps // rounds
  for _ in range(rounds):
    for p, row_times in zip(prepared, times):
      row_times += timed(p.one_step, 0, per_round)
  return [summarise_mim_jax(p, t, c, variant=v, rounds=rounds)
          for p, t, c, v in zip(prepared, times, configs, variants)]


class _Prepared(NamedTuple):
  one_step: Callable[[], None]  # one train step, blocking until done
  compiled: Any
  holder: dict                  # {"state": the train state the steps advance}
  batch_size: int
  xla_flops: float


def prepare_mim_jax(config) -> _Prepared:
  """A config's compiled train step on a synthetic batch, ready to time."""
  import jax
  import numpy as np

  from mim_jax.data.transforms import CROP_BOX_KEY
  from mim_jax.training import setup

  # The run's own set-up (the step, optimizer and shardings a training run uses); the
  # schedule's length does not change a step's cost.
  try:
    config = setup.on_synthetic_data(config, "the benchmark")
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  r = setup.setup_run(setup.prepare(config), num_examples=1000 * config.global_batch_size)
  state = r.init_state(r.keys()[0])
  step = r.jit_step()
  rng_np = np.random.default_rng(0)
  batch = {}
  for key, spec in setup.abstract_batch(r, config.global_batch_size).items():
    if key == CROP_BOX_KEY:  # augmentation on the device: crop boxes in the source images
      h, w = config.image_size
      batch[key] = np.tile(np.array([0.1 * h, 0.1 * w, 0.8 * h, 0.8 * w], spec.dtype),
                           (spec.shape[0], 1))
    elif spec.dtype == np.uint8:  # images shipped as decoded
      batch[key] = rng_np.integers(0, 256, spec.shape, np.uint8)
    elif key == "image" or np.issubdtype(spec.dtype, np.floating):
      batch[key] = jax.random.normal(jax.random.key(1), spec.shape, spec.dtype)
    else:  # labels, flips, view masks (no masking: the cost is the same)
      batch[key] = np.zeros(spec.shape, spec.dtype)
  batch.update(r.method.example_extras(config.global_batch_size, rng_np))
  batch = jax.device_put(batch, r.batch_sharding)
  shape = batch["image"].shape if "image" in batch else (config.global_batch_size,)
  rng = jax.random.key(2)
  compiled = step.lower(state, batch, rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The cost of the partitioned program, one device's share: times the devices for the step's
  # whole work (replicated parts, the optimizer's, counted on every device as they run there).
  xla_flops = float(cost.get("flops", 0.0)) * jax.device_count() if cost else 0.0
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    jax.block_until_ready(metrics["loss"])

  return _Prepared(one_step, compiled, holder, shape[0], xla_flops)


def summarise_mim_jax(prepared: _Prepared, times: list[float], config, profile_dir: str = "",
                      profile_steps: int = 5, variant: str = "", rounds: int = 1) -> dict:
  """The JSON row of a prepared step's timed `times` (and its profile, when asked)."""
  import jax
  extra = {"rounds": rounds} if rounds > 1 else {}
  if profile_dir:  # after the timing, so the trace costs the measurement nothing
    from mim_jax import profiling
    extra["profile"] = profiling.profile(prepared.one_step, prepared.compiled.as_text(),
                                         profile_steps, profile_dir)
  params = sum(int(x.size) for x in jax.tree.leaves(prepared.holder["state"].params))
  return _summary("mim_jax", times, config, jax.devices()[0].device_kind, params=params,
                  device_count=jax.device_count(), dtype=config.model.dtype,
                  attention_impl=_attention_impl(config),
                  remat=config.model.get("remat", "none"),
                  xla_gflops_per_image=_sig(prepared.xla_flops / prepared.batch_size / 1e9),
                  variant=variant,
                  augment_on=config.data.get("augment_on", "host"),
                  xla_flags=os.environ.get("XLA_FLAGS", ""),
                  versions={"jax": jax.__version__}, **extra)


def _attention_impl(config) -> str:
  """The attention implementation the row ran: the config's, or the backend's default
  resolved ("heads_major" on a CPU, "cudnn" on a GPU; "jax_default" where jax.nn chooses)."""
  from mim_jax.models import attention
  return (attention.default_attention_impl(config.model.get("attention_impl") or None)
          or "jax_default")


def bench_hf(config, steps: int, warmup: int, compile_model: bool = False,
             profile_dir: str = "", profile_steps: int = 5) -> dict:
  """The HF ViTMAEForPreTraining peer's row (`compile_model`: under torch.compile, with fused
  AdamW on a GPU); `profile_dir`: also profile a few steps, the trace written there."""
  import torch
  import transformers

  from mim_jax.models.vit import size_from_config

  size, patch = size_from_config(config.model)
  if config.image_size[0] != config.image_size[1]:
    raise ValueError("HF ViTMAE needs square images")
  hf_config = transformers.ViTMAEConfig(
      image_size=config.image_size[0], patch_size=patch, num_channels=config.channels,
      hidden_size=size.width, num_hidden_layers=size.depth, num_attention_heads=size.num_heads,
      intermediate_size=size.mlp_dim, decoder_hidden_size=config.decoder.width,
      decoder_num_hidden_layers=config.decoder.depth,
      decoder_num_attention_heads=config.decoder.num_heads,
      decoder_intermediate_size=4 * config.decoder.width, mask_ratio=config.masking.ratio,
      norm_pix_loss=bool(config.target.norm_pix), layer_norm_eps=1e-6)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = transformers.ViTMAEForPreTraining(hf_config).to(device).train()
  # The compiled peer gets PyTorch's fastest AdamW too (one fused kernel over all tensors).
  fused = compile_model and device == "cuda"
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(config.optimizer.b1,
                                                             config.optimizer.b2),
                          eps=config.optimizer.eps, weight_decay=config.optimizer.weight_decay,
                          fused=fused or None)
  images = torch.randn(config.global_batch_size, config.channels, *config.image_size,
                       device=device)
  bf16 = device == "cuda" and config.model.dtype == "bfloat16"
  forward = torch.compile(model) if compile_model else model

  def one_step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      loss = forward(pixel_values=images).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss.item()

  times = timed(one_step, warmup, steps)
  extra = {}
  if profile_dir:  # after the timing, as for mim_jax's rows
    from mim_jax import profiling
    extra["profile"] = profiling.profile_torch(
        one_step, profile_steps, trace_path=os.path.join(profile_dir, "trace.json"))
  kind = torch.cuda.get_device_name() if device == "cuda" else "cpu"
  # Trainable only: HF keeps the fixed sin-cos tables as frozen parameters.
  params = sum(p.numel() for p in model.parameters() if p.requires_grad)
  return _summary("hf_transformers_pytorch" + ("_compile" if compile_model else ""), times,
                  config, kind, params=params, threads=torch.get_num_threads(),
                  dtype="bfloat16 autocast" if bf16 else "float32", fused_adamw=fused,
                  versions={"torch": torch.__version__, "transformers": transformers.__version__},
                  **extra)


def _method_augment(config):
  """The grain RandomMap of the config's method's own augmentation (iBOT's multi-crop views),
  or None for the default RandomResizedCrop + flip (`Method.train_augment`)."""
  from mim_jax import registry
  from mim_jax.methods.base import Method, TrainLength

  if registry.method_class(config.method).train_augment is Method.train_augment:
    return None  # without building the method: BEiT's reads its tokenizer, MaskDistill its teacher
  # The augmentation does not depend on the schedule's length.
  method = registry.build_method(config, TrainLength(steps_per_epoch=1, schedule_steps=1))
  return method.train_augment(config.data, tuple(config.image_size), config.channels)


def bench_pipeline(config, num_images: int, num_batches: int) -> dict:
  """Images/s of the training input pipeline in one process, in total and per core used
  (the method's own augmentation where it has one: iBOT's multi-crop views)."""
  import os
  import tempfile

  import numpy as np
  from PIL import Image

  from mim_jax import data

  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as root:
    # Smooth images with edges (gradients + rectangles) at a typical ImageNet size and JPEG
    # quality: noise would make decoding unrealistically slow.
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(num_images):
      img = np.stack([(xx * rng.uniform(0.2, 0.5) + yy * rng.uniform(0.1, 0.4)) % 256] * 3, -1)
      for _ in range(4):
        y, x = rng.integers(0, 300), rng.integers(0, 400)
        img[y:y + 70, x:x + 90] = rng.integers(0, 256, 3)
      Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, f"{i:05d}.jpg"), quality=90)
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.update(source="image_folder", path=root, num_workers=0)
    batch = min(config.global_batch_size, num_images // 2)
    augment = _method_augment(config)
    it = data.make_train_iterator(data_cfg, image_size=tuple(config.image_size),
                                  channels=config.channels, global_batch_size=batch, seed=0,
                                  process_index=0, process_count=1, augment=augment)
    next(it)  # warm-up: opening files, first decode
    start = time.perf_counter()
    for _ in range(num_batches):
      next(it)
    elapsed = time.perf_counter() - start
    it.close()  # its reader threads stop before the folder goes
    decode = _decode_rates(root, config.channels)
  # In one process (num_workers=0) the pipeline runs its map chain on this many threads.
  from mim_jax.data import pipeline
  threads = pipeline._read_options(0, 1).num_threads  # pylint: disable=protected-access
  cores = min(threads, os.cpu_count() or 1)
  images_per_s = batch * num_batches / elapsed
  return {"impl": "mim_jax_input_pipeline", "image_size": list(config.image_size),
          "source_images": "JPEG 500x375 quality 90", "batch": batch,
          # the config's batch, capped at half the generated images (--pipeline_images)
          "config_batch": config.global_batch_size,
          "batches": num_batches, "threads": threads, "cores_used": cores,
          "images_per_s": round(images_per_s, 1),
          "images_per_s_per_core": round(images_per_s / cores, 1),
          "augment": "the method's own" if augment is not None else "RandomResizedCrop + flip",
          "crop_scale": list(config.data.crop_scale) if "crop_scale" in config.data else None,
          "rand_augment": config.data.get("rand_augment", ""),
          "random_erasing": config.data.get("random_erasing", 0.0), **decode}


FEEDS = {  # name -> data overrides
    "grain_host_augment": {"augment_on": "host", "device_resident": False},
    "grain_device_augment": {"augment_on": "device", "device_resident": False},
    "device_resident": {"augment_on": "device", "device_resident": True, "num_workers": 0},
}


# A method with its own augmentation (iBOT's multi-crop views) has one feed: grain with it.
METHOD_AUGMENT_FEED = "grain_method_augment"


def bench_feed(config, num_batches: int, rounds: int = 3) -> list[dict]:
  """Images/s of each training iterator of FEEDS on `config`'s data (its batch, workers and
  seed), rounds alternated, each batch's arrays ready on the device before the next; the
  median round per iterator. The step is not run: this is what the input side can deliver
  (images, labels, boxes and flips; a method's host-drawn masks on neither side). A method
  with its own augmentation (`Method.train_augment`: iBOT's multi-crop views), which only the
  grain pipeline runs, gets that one feed (METHOD_AUGMENT_FEED): images/s, each image with
  all its views."""
  import jax
  import numpy as np

  from mim_jax import data
  from mim_jax.training import parallel

  mesh = parallel.make_mesh(config.mesh)
  sharding = parallel.batch_sharding(mesh)
  size, channels, batch = tuple(config.image_size), config.channels, config.global_batch_size
  augment = _method_augment(config)
  feeds = ({METHOD_AUGMENT_FEED: {"augment_on": "host", "device_resident": False}}
           if augment is not None else FEEDS)

  def make(name):
    data_cfg = config.data.copy_and_resolve_references()
    data_cfg.update(feeds[name])
    # The same work on every side: the device feeds have no RandAugment or random erasing.
    data_cfg.update({k: v for k, v in (("rand_augment", ""), ("random_erasing", 0.0))
                     if k in data_cfg})
    return data.make_train_iterator(data_cfg, image_size=size, channels=channels,
                                    global_batch_size=batch, seed=config.seed,
                                    batch_sharding=sharding, augment=augment)

  rates = {name: [] for name in feeds}
  iterators = {name: make(name) for name in feeds}
  try:
    for _ in range(rounds):
      for name, it in iterators.items():
        for _ in range(2):  # warm-up: worker start, first gather's compilation
          next(it)
        start = time.perf_counter()
        for _ in range(num_batches):
          jax.block_until_ready(parallel.host_batch_to_global(next(it), sharding))
        rates[name].append(batch * num_batches / (time.perf_counter() - start))
  finally:
    for it in iterators.values():
      it.close()
  return [{"impl": "mim_jax_feed", "iterator": name, "data": config.data.source,
           "batch": batch, "batches": num_batches, "rounds": rounds,
           "num_workers": 0 if feeds[name].get("device_resident") else config.data.num_workers,
           "images_per_s": round(float(np.median(r)), 1),
           "images_per_s_range": [round(min(r), 1), round(max(r), 1)], "cpu_count": os.cpu_count(),
           "device_kind": jax.devices()[0].device_kind} for name, r in rates.items()]


def _decode_rates(root: str, channels: int) -> dict:
  """Decode-only images/s on one core: mim_jax's decoder (simplejpeg for JPEG) and PIL's."""
  import io

  import numpy as np
  from PIL import Image

  from mim_jax.data import transforms
  blobs = []
  for name in sorted(os.listdir(root))[:128]:
    with open(os.path.join(root, name), "rb") as f:
      blobs.append(f.read())

  def pil(b):
    with Image.open(io.BytesIO(b)) as img:
      return np.asarray(img.convert("RGB" if channels == 3 else "L"))
  rates = {"decode_images_per_s_per_core": 0.0, "decode_pil_images_per_s_per_core": 0.0}
  for _ in range(3):  # alternated, best of three: the first pass also warms caches
    for name, fn in (("decode_images_per_s_per_core",
                      lambda b: transforms.decode_image(b, channels)),
                     ("decode_pil_images_per_s_per_core", pil)):
      start = time.perf_counter()
      for b in blobs:
        fn(b)
      rates[name] = max(rates[name], round(len(blobs) / (time.perf_counter() - start), 1))
  return rates


def with_overrides(config, spec: str):
  """An --also config with the command line's --config.FIELD overrides, so that every row is
  timed under the same settings (they acted on --config alone); UsageError for a field the
  --also config does not have."""
  overrides = config_flags.get_override_values(FLAGS["config"])
  locked = config.copy_and_resolve_references()
  locked.lock()  # a field it lacks is an error, not a new field nobody reads
  try:
    return _variant(locked, **overrides) if overrides else config
  except (AttributeError, KeyError, TypeError) as e:
    raise app.UsageError(f"--also={spec}: the --config overrides act on every row, and this "
                         f"config cannot take one of {sorted(overrides)} ({e})") from None


def _variant(config, **changes):
  from mim_jax.config.defaults import override
  return override(config.copy_and_resolve_references(), **changes)


def parse_variant(config, spec: str):
  """`config` with the overrides "FIELD=VALUE[,FIELD=VALUE...]" (values as Python literals,
  else strings); UsageError for a field the config does not have."""
  changes = variant_changes(spec)
  for field in changes:
    try:
      checks.get(config, field)
    except (KeyError, AttributeError, TypeError):
      raise app.UsageError(f"--variant={spec}: the config has no field {field!r}") from None
  return _variant(config, **changes)


def variant_changes(spec: str) -> dict[str, Any]:
  """"FIELD=VALUE[,FIELD=VALUE...]" -> {FIELD: VALUE} (Python literals, else strings)."""
  import ast
  changes = {}
  for item in spec.split(","):
    field, sep, value = item.partition("=")
    if not sep or not field.strip():
      raise app.UsageError(f"--variant={spec!r}: expected FIELD=VALUE[,FIELD=VALUE...]")
    try:
      changes[field.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      changes[field.strip()] = value
  return changes


# The flags --feed and --pipeline read (they time the input, not train steps); any other one
# given with them would be dropped, so it is refused.
# (--pipeline runs grain on the host, in this process: no JAX device, so no --cpu_devices.)
_MODE_FLAGS = {
    "feed": {"config", "batch", "cpu_devices", "pipeline_batches", "feed"},
    "pipeline": {"config", "batch", "pipeline_batches", "pipeline_images", "pipeline"},
}
# The flags only the input-timing modes read: refused when train steps are timed.
_INPUT_FLAGS = ("pipeline_images", "pipeline_batches")


# The config fields each mode sets itself: a --config override of one would do nothing.
_MODE_FIELDS = {
    "feed": ("data.augment_on", "data.device_resident", "data.rand_augment",
             "data.random_erasing"),
    "pipeline": ("data.source", "data.path", "data.num_workers", "seed"),
}
_MODE_WHY = {"feed": "each feed its own", "pipeline": "a generated JPEG folder read by one "
             "process, seed 0"}
# What the input-timing modes read of a config: no model, optimizer or loss is built, so a
# --config override outside these (and the method's `weight_fields`: tokenizer or teacher
# paths its validation requires) would do nothing.
# (The feed places its batches on the config's mesh; the pipeline builds no mesh. Masks drawn
# on the host are a method's data_transforms, which neither mode runs; a method's own
# augmentation, iBOT's multi-crop, draws its masks and reads the model's patch grid.)
_INPUT_FIELDS = {
    "feed": ("method", "data.", "image_size", "channels", "global_batch_size", "seed", "mesh",
             "multicrop."),
    "pipeline": ("method", "data.", "image_size", "channels", "global_batch_size", "seed",
                 "multicrop."),
}
# What the HF peer reads of the first config (bench_hf, PEER_RUNS): with --peers_only any other
# --config override would do nothing.
_PEER_FIELDS = ("method", "model.variant", "model.width", "model.depth", "model.num_heads",
                "model.mlp_dim", "model.dtype", "decoder.width", "decoder.depth",
                "decoder.num_heads", "masking.ratio", "target.norm_pix", "optimizer.weight_decay",
                "global_batch_size", "image_size", "channels")  # AdamW's betas and eps: values


def _peer_mismatch(config) -> str:
  """Why HF's MAE would do other work than `config`'s step ("" if it would not): the peer is
  HF's MAE as it is (bench_hf mirrors the size, decoder, mask ratio, norm_pix, AdamW's betas,
  eps and weight decay, and bf16), so a config that masks, optimises or builds its ViT
  otherwise would be timed against a peer doing other work."""
  for field, theirs in PEER_RUNS.items():
    allowed = theirs if isinstance(theirs, tuple) else (theirs,)
    value = checks.get(config, field)
    if value not in allowed:
      uses = " or ".join(f"{field}={a!r}" for a in allowed)
      return f"--peer times HF's MAE, which uses {uses}: the first config has {value!r}"
  return ""


def _check_mode_flags(config) -> None:
  """UsageError for a flag or --config field the run's mode would not read: with --feed or
  --pipeline, a flag they do not read, a field they set themselves, a pipeline row that would
  not time what it reports (a batch over half the generated images, augmentation on the
  device); when train steps are timed, the input modes' flags, --config and --variant fields
  of the input pipeline or the training loop, and with --peers_only what the HF peer does not
  read."""
  overrides = config_flags.get_override_values(FLAGS["config"])
  for mode, read in _MODE_FLAGS.items():
    if not FLAGS[mode].value:
      continue
    replaced = sorted(f for f in _MODE_FIELDS[mode] if f in overrides)
    if replaced:
      raise app.UsageError(f"--{mode} sets {', '.join(_MODE_FIELDS[mode])} itself "
                           f"({_MODE_WHY[mode]}): "
                           f"{', '.join('--config.' + f for f in replaced)} would have no "
                           "effect")
    from mim_jax import registry
    from mim_jax.methods import base
    method = registry.method_class(config.method)
    read_fields = _INPUT_FIELDS[mode] + tuple(method.weight_fields)
    if method.train_augment is not base.Method.train_augment:
      # A method's own augmentation is built from the method: iBOT's masks follow the
      # encoder's patch grid.
      read_fields += ("model.", "masking.")
    inert = sorted(f for f in overrides
                   if not any(f == p or (p.endswith(".") and f.startswith(p))
                              for p in read_fields))
    if inert:
      raise app.UsageError(f"--{mode} times the input pipeline and builds no model, optimizer "
                           f"or loss: {', '.join('--config.' + f for f in inert)} would have no "
                           "effect")
    own = FLAGS.flags_by_module_dict()[FLAGS.find_module_defining_flag(mode)]
    ignored = sorted(f.name for f in own if f.name not in read and f.present)
    if ignored:
      raise app.UsageError(f"--{mode} times the input pipeline and reads only "
                           f"{', '.join('--' + n for n in sorted(read - {mode}))}: "
                           f"{', '.join('--' + n for n in ignored)} would have no effect")
  if not (FLAGS.feed or FLAGS.pipeline):
    given = sorted(f"--{name}" for name in _INPUT_FLAGS if FLAGS[name].present)
    if given:
      raise app.UsageError(f"{', '.join(given)} would have no effect: "
                           f"{'they size' if len(given) > 1 else 'it sizes'} the input "
                           "timings of --feed and --pipeline, and this run times train steps")
    if FLAGS.peers_only:
      # (PEER_RUNS' fields are read too: checked against what HF runs.)
      _refuse_unread([f for f in overrides if f not in _PEER_FIELDS and f not in PEER_RUNS],
                     "--config.", "--peers_only times only HF's MAE, which reads the size, "
                     "dtype, decoder size, mask ratio, norm_pix, weight decay, batch and image "
                     "fields")
      if FLAGS["cpu_devices"].present:
        raise app.UsageError("--peers_only times only the PyTorch peers: --cpu_devices (JAX's "
                             "CPU devices) would have no effect")
    _refuse_off_step(config, overrides, "--config.")
    for spec in FLAGS.variant:
      _refuse_off_step(config, variant_changes(spec), "", where=f"--variant={spec}: ")
  if FLAGS.pipeline:
    if FLAGS.batch > FLAGS.pipeline_images // 2:
      raise app.UsageError(f"--pipeline: --batch={FLAGS.batch} needs --pipeline_images >= "
                           f"{2 * FLAGS.batch} (batches are drawn from the generated images)")
    if config.data.get("augment_on", "host") != "host":
      raise app.UsageError("--pipeline times the host's decode and augmentation: pass "
                           "--config.data.augment_on=host (--feed times augmentation on the "
                           "device)")


def _refuse_unread(inert, prefix: str, why: str) -> None:
  """UsageError naming the dotted fields `inert` (overrides that would go unread), if any."""
  if inert:
    raise app.UsageError(f"{why}: {', '.join(prefix + f for f in sorted(inert))} would have "
                         "no effect")


def _refuse_off_step(config, fields, prefix: str, where: str = "") -> None:
  """UsageError for overrides (`fields`: --config.* or a --variant's) that a timed train step
  does not read (config.step_fields): the input's settings other than the in-step ones (the
  steps run on a generated batch, `setup.on_synthetic_data`; a device-resident split changes the
  feed, which --feed times), the loop's."""
  from mim_jax.config import step_fields
  data, loop = step_fields.unread_by_step(config, fields)
  _refuse_unread(data, prefix, f"{where}the train step is timed on a generated batch (--feed "
                 "and --pipeline time the input)")
  _refuse_unread(loop, prefix, f"{where}the benchmark times train steps, not the training "
                 "loop around them (time a run of python -m mim_jax.main for the loop)")
  _refuse_unread(step_fields.values_only(fields), prefix, f"{where}a step with other values "
                 "of the lr schedule, Adam's constants or the seed runs the same computation")


def _emit(row: dict) -> None:
  """Prints one result row as a JSON line, with the process's malloc settings (rows measured
  under other GLIBC_TUNABLES do not compare; training/malloc_tunables.py)."""
  from mim_jax.training import malloc_tunables
  print(json.dumps({**row, "glibc_tunables": malloc_tunables.active()}), flush=True)


class Command(NamedTuple):
  """A checked bench command line: what `measure` times."""
  configs: list       # the rows: the first config, its variants (and --asymmetry), --also
  labels: dict        # id(config) -> the --variant spec of that row
  peers: list[str]    # the PyTorch peers to time ("hf", "hf_compile")
  rows: list          # every config the run builds, for the CPU device count


def checked_command() -> Command:
  """Every check of the parsed command line (FLAGS), before JAX starts a backend: a refused
  command starts nothing. app.UsageError names what is wrong."""
  from mim_jax import registry
  from mim_jax.training import setup
  try:
    files.require_loaded(FLAGS)
    # An --also file that does not load (missing, its code failing) is named in one line, as a
    # bad --config is.
    file_configs = [files.load_config_file(FLAGS["config"].config_filename),
                    *(files.load_flag_config(s, "--also") for s in FLAGS.also)]
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  configs = [FLAGS.config, *(with_overrides(c, spec)
                             for c, spec in zip(file_configs[1:], FLAGS.also))]
  overrides = config_flags.get_override_values(FLAGS["config"])
  # Which row an error is about: an --also config's own (an unknown method) is named.
  where = ""
  try:  # overrides the rows would not act on (e.g. a variant the files' size fields override)
    files.refuse_flags_beside_fields(FLAGS, overrides,
                                     {"batch": "global_batch_size", "dtype": "model.dtype"})
    for config, file_config, where in zip(configs, file_configs,
                                          ["", *(f"--also={s}: " for s in FLAGS.also)]):
      setup.refuse_inert_overrides(config, file_config, overrides, loads_weights=False)
    where = ""
    for spec in FLAGS.variant:
      setup.refuse_inert_overrides(parse_variant(configs[0], spec), file_configs[0],
                                   {**overrides, **variant_changes(spec)}, loads_weights=False)
  except ConfigError as e:
    raise app.UsageError(where + str(e)) from None
  _check_mode_flags(configs[0])
  if FLAGS.batch:
    configs = [_variant(c, global_batch_size=FLAGS.batch) for c in configs]
  if FLAGS.dtype:
    configs = [_variant(c, **{"model.dtype": FLAGS.dtype}) for c in configs]
  # Every row the run will time (the --asymmetry and --variant ones too): the CPU device count
  # is fixed when the backends start.
  rows = list(configs) + [parse_variant(configs[0], spec) for spec in FLAGS.variant]
  if FLAGS.asymmetry:
    rows.append(_variant(configs[0], **{"model.encoder_mask_tokens": True}))
  if FLAGS.rounds > 1 and FLAGS.peers_only:  # (--feed and --pipeline refuse it already)
    raise app.UsageError("--rounds alternates the mim_jax train-step rows; --peers_only times "
                         "none")
  if FLAGS.rounds > 1 and FLAGS.profile:
    raise app.UsageError("--rounds and --profile: profile the rows in a run of their own")
  if FLAGS.steps % FLAGS.rounds:
    raise app.UsageError(f"--steps={FLAGS.steps} over --rounds={FLAGS.rounds}: a multiple of "
                         "the rounds, so that every round times as many steps")
  if FLAGS.feed or FLAGS.pipeline:  # the input modes time configs[0]'s input alone
    if FLAGS.feed:
      _check_feed_data(configs[0])
    _check_cpu_devices(rows)
    return Command(configs, {}, [], rows)
  unknown = sorted(set(FLAGS.peer) - set(PEERS))
  if unknown:
    raise app.UsageError(f"--peer: unknown {unknown}; allowed: {', '.join(PEERS)}")
  if "auto" in FLAGS.peer and len(FLAGS.peer) > 1:
    raise app.UsageError(f"--peer={','.join(FLAGS.peer)}: auto picks the peer itself; name "
                         "the peers instead")
  # The peer is HF's MAE: the default times it beside an MAE config that HF's model and
  # optimizer match, and no peer otherwise (saying why beside an MAE config); a peer asked for
  # by name beside a config it does not match is refused below.
  if FLAGS.peer == ["auto"]:
    mismatch = _peer_mismatch(configs[0]) if configs[0].method == "mae" else "not MAE"
    peers = [] if mismatch else ["hf"]
    if mismatch and configs[0].method == "mae":
      if FLAGS.peers_only:
        raise app.UsageError(mismatch)
      logging.info("--peer=auto times no peer: %s", mismatch)
  else:
    peers = [p for p in FLAGS.peer if p != "none"]
  for c in configs:
    if registry.method_class(c.method).kind == "job":
      raise app.UsageError(f"config.method={c.method!r} trains nothing: the benchmark times "
                           "train steps")
  if (peers or FLAGS.asymmetry) and configs[0].method != "mae":
    raise app.UsageError("--peer and --asymmetry compare against MAE: the first config must be "
                         "an MAE config")
  mismatch = _peer_mismatch(configs[0]) if peers else ""
  if mismatch:
    raise app.UsageError(f"{mismatch}. Time the peer with an MAE config that matches it, or "
                         "--peer=none (a --variant row may differ)")
  if FLAGS.peers_only and not peers:
    raise app.UsageError("--peers_only needs --peer=hf and/or hf_compile")
  if FLAGS.peers_only and (FLAGS.also or FLAGS.variant or FLAGS.asymmetry):
    raise app.UsageError("--peers_only times only the peers: --also, --variant and "
                         "--asymmetry add mim_jax rows it would not run")
  if FLAGS.asymmetry:
    configs.insert(1, _variant(configs[0], **{"model.encoder_mask_tokens": True}))
  labels = {}
  for spec in reversed(FLAGS.variant):
    configs.insert(1, parse_variant(configs[0], spec))
    labels[id(configs[1])] = spec
  try:  # each row's static checks as its run makes them (prepare_mim_jax makes them again)
    for c in [] if FLAGS.peers_only else configs:
      setup.prepare(setup.on_synthetic_data(c, "the benchmark"))
  except ConfigError as e:
    raise app.UsageError(str(e)) from None
  _check_cpu_devices(rows)
  return Command(configs, labels, peers, rows)


def _check_feed_data(config) -> None:
  """--feed reads the config's own training split: the checks training makes of it first (a
  missing folder or file, a truncated .npy, non-finite float pixels: one line, not a
  traceback from inside the iterators). The split alone: --feed scores no evaluation split."""
  from mim_jax import data
  try:
    data.validate_data_config(config.data, image_size=tuple(config.image_size),
                              channels=config.channels, scores_eval_split=False)
  except ConfigError as e:
    raise app.UsageError(f"--feed: {e}") from None


def _check_cpu_devices(rows) -> None:
  from mim_jax.training import cpu_devices
  try:
    cpu_devices.check_request(FLAGS.cpu_devices, rows)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def main(argv):
  refuse_extra_arguments(argv)
  # JAX probes for a TPU at start-up and logs the failure ("Failed to open libtpu.so") at INFO
  # through absl: expected on CPU and GPU machines (main.py quiets it the same way).
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  command = checked_command()
  from mim_jax.training import cpu_devices
  try:
    count = cpu_devices.configure(FLAGS.cpu_devices, command.rows, multi_process=False)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if count is not None and not (FLAGS.peers_only or FLAGS.pipeline):
    # As mim_jax.main: an explicit count on a GPU or TPU is said unused. (Not beside the
    # PyTorch peers alone: asking for the backend would start JAX on their GPU; nor for
    # --pipeline, which runs grain on the host and splits no batch across devices.)
    import jax
    said = cpu_devices.report(count, FLAGS.cpu_devices, jax.default_backend())
    if said is not None:
      logging.log(*said)
  if FLAGS.profile and not FLAGS.peers_only:
    import jax
    if jax.default_backend() == "cpu" and jax.device_count() > 1:
      # Measured: iBOT's teacher softmax-product fusion read 665 ms per step on 2 CPU devices,
      # 27 ms on one (docs/benchmarks.md): the devices' kernels share one thread pool, and a
      # kernel's time includes its wait for threads the other device's kernels hold.
      logging.warning("--profile on %d CPU devices: a kernel's time includes waiting for the "
                      "thread pool the devices share; --cpu_devices=1 attributes the time "
                      "kernel by kernel", jax.device_count())
  measure(command)


def measure(command: Command) -> None:
  """Times what a checked command asks for, one JSON line per row."""
  configs, labels, peers = command.configs, command.labels, command.peers
  if FLAGS.feed:
    for row in bench_feed(configs[0], FLAGS.pipeline_batches):
      _emit(row)
    return
  if FLAGS.pipeline:
    _emit(bench_pipeline(configs[0], FLAGS.pipeline_images, FLAGS.pipeline_batches))
    return
  if FLAGS.rounds > 1:
    for row in bench_alternated(configs, FLAGS.steps, FLAGS.warmup, FLAGS.rounds,
                                [labels.get(id(c), "") for c in configs]):
      _emit(row)
  for i, c in enumerate([] if FLAGS.peers_only or FLAGS.rounds > 1 else configs):
    profile_dir = os.path.join(FLAGS.profile, f"{i}_{c.method}") if FLAGS.profile else ""
    _emit(bench_mim_jax(c, FLAGS.steps, FLAGS.warmup, profile_dir,
                        variant=labels.get(id(c), "")))
  if peers and not FLAGS.peers_only:
    import jax
    if jax.default_backend() != "cpu" and jax.device_count() > 1:
      logging.warning("the PyTorch peer runs on one %s, mim_jax's rows data-parallel on %d: "
                      "compare images/s per device (or MFU, which counts every device's peak)",
                      jax.default_backend().upper(), jax.device_count())
  for peer in peers:
    _emit(bench_hf(configs[0], FLAGS.steps, FLAGS.warmup, compile_model=peer == "hf_compile",
                   profile_dir=os.path.join(FLAGS.profile, f"peer_{peer}") if FLAGS.profile
                   else ""))


if __name__ == "__main__":
  from mim_jax.training import malloc_tunables  # first: glibc reads its settings at start-up
  malloc_tunables.reexec_with_tunables("mim_jax.bench")
  # The PyTorch peer runs on the same GPU in this process: JAX must not reserve most of its
  # memory up front (its allocator still keeps what it has grown to, so step times are
  # unaffected). Here, not at import: a program importing this module keeps its own setting.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  define_flags()
  from mim_jax import main as trainer  # its parser: unknown --config fields named, no traceback

  def run(argv):
    try:
      main(argv)
    except app.UsageError as e:  # one line and exit 2, as a bad flag value (parse_flags)
      trainer._fail(str(e))  # pylint: disable=protected-access

  app.run(run, flags_parser=trainer.parse_flags)
