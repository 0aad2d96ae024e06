"""On the CPU, one JAX device per core: the batch split across the cores (data parallel).

XLA:CPU runs a program on one device and parallelises each operation over the cores; the small
operations of a small ViT (attention over 13-50 tokens, norms, element-wise fusions) leave cores
idle that way. Several CPU devices, one per core, each run the whole step on their share of the
batch: the demo MAE step ran 1.20x and the Fashion-MNIST fine-tuning step 1.18x faster on 2
cores (docs/benchmarks.md). Large models keep one device: the matmuls of ViT-B/16 already fill
every core, and each device would hold a replica of its state, whose update and gradient
all-reduce then run twice (its step at batch 8 took 2.0x longer on 2 devices). The count is a
property of the process: JAX reads `jax_num_cpu_devices` once, when its backends start, so
`configure` runs before anything else touches JAX (mim_jax.main and mim_jax.bench call it
first). GPU and TPU runs are unaffected: their devices are the accelerators, the CPU backend
only grows devices nobody uses.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections

from mim_jax.convert import our_weights
from mim_jax.models import vit
from mim_jax.weights import pretrained

log = logging.getLogger(__name__)

AUTO = "auto"
# Widest encoder "auto" splits over the cores: width 128 (the Fashion-MNIST ViT) ran 1.20x
# faster on 2 devices, width 768 (ViT-B/16) 2.0x slower; between them unmeasured, so the
# small end.
MAX_AUTO_WIDTH = 256
# At most this many devices for "auto": each holds a replica of the training state and joins
# the gradient all-reduce, and only 2 were measured.
MAX_AUTO_DEVICES = 8


def cgroup_cpu_quota(proc_cgroup: str = "/proc/self/cgroup",
                     root: str = "/sys/fs/cgroup") -> float | None:
  """The CPUs a container's cgroup lets this process use (quota / period, e.g. 1.5 for
  `docker run --cpus=1.5`), the smallest over its cgroup and the ones above it; None when
  unlimited or not readable. cgroup v2 (`cpu.max`: "<quota> <period>" or "max <period>") and
  v1 (`cpu.cfs_quota_us`, -1 when unlimited, and `cpu.cfs_period_us`)."""
  try:
    with open(proc_cgroup) as f:
      lines = f.read().splitlines()
  except OSError:
    return None
  limits = []
  for line in lines:
    hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
    if hierarchy == "0" and not controllers:  # v2: one unified hierarchy
      names, base = ("cpu.max",), root
    elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
      names, base = ("cpu.cfs_quota_us", "cpu.cfs_period_us"), os.path.join(root, controllers)
      if not os.path.isdir(base):  # mounted as "cpu" (or "cpu,cpuacct") under another name
        base = os.path.join(root, "cpu")
    else:
      continue
    parts = [part for part in path.split("/") if part]
    for depth in range(len(parts), -1, -1):  # this cgroup, then each one above it
      directory = os.path.join(base, *parts[:depth])
      limit = _read_quota(directory, names)
      if limit is not None:
        limits.append(limit)
  return min(limits) if limits else None


def _read_quota(directory: str, names: tuple[str, ...]) -> float | None:
  try:
    values = []
    for name in names:
      with open(os.path.join(directory, name)) as f:
        values.extend(f.read().split())
  except OSError:
    return None
  quota, period = values[0], values[-1]  # "max" / "-1": unlimited
  if not (quota.isdigit() and period.isdigit()) or int(quota) == 0 or int(period) == 0:
    return None
  return int(quota) / int(period)


def usable_cores() -> int:
  """The cores this process may run on: its CPU affinity (taskset, cpuset), capped by its
  cgroup's CPU quota rounded down (2 devices on a 1.5-CPU quota would be throttled)."""
  if hasattr(os, "sched_getaffinity"):
    cores = len(os.sched_getaffinity(0))
  else:
    cores = os.cpu_count() or 1
  quota = cgroup_cpu_quota()
  if quota is not None:
    cores = min(cores, int(quota))
  return max(1, cores)


def encoder_width(config) -> int:
  """The width of the encoder the run trains: the one `init_from` names when it holds one
  (an export's or a workdir's model info decides an evaluation's encoder, and a continued
  pre-training must match it), else the config's."""
  init_from = str(config.get("init_from", "") or "")
  if pretrained.is_pretrained(init_from):
    try:
      model = our_weights.read_info(init_from)["config"]["model"]
      return vit.size_from_config(ml_collections.ConfigDict(model))[0].width
    except Exception:  # pylint: disable=broad-except
      pass  # not readable here (a missing file, gs:// credentials): the run's checks say so
  return vit.size_from_config(config.model)[0].width


def trains(config) -> bool:
  """Whether `config` runs a training loop, whose batch several CPU devices can split (the
  frozen-feature jobs have no global batch and compute on one device)."""
  return "global_batch_size" in config and "model" in config


def count_for(config, cores: int) -> int:
  """The largest device count <= `cores` that splits every batch the run shards over its
  devices evenly: the micro-batch (global_batch_size / grad_accum_steps) and the evaluation
  batch. 1 for a mesh with fixed axis sizes (the config chose its devices), for jobs
  without a training loop and for encoders wider than MAX_AUTO_WIDTH; at most
  MAX_AUTO_DEVICES. A split held on the device (data.device_resident) is copied to each CPU
  device, in the host's memory: data/device_resident.py refuses copies beyond its memory
  bound, naming --cpu_devices. The encoder is the one `init_from` brings, when it names one
  (`encoder_width`)."""
  mesh = tuple(tuple(axis) for axis in config.get("mesh", ()))
  if not trains(config) or len(mesh) != 1 or mesh[0][1] != -1:
    return 1
  if encoder_width(config) > MAX_AUTO_WIDTH:
    return 1
  micro = config.global_batch_size // max(1, config.get("grad_accum_steps", 1))
  eval_batch = config.eval.batch_size if "eval" in config else micro
  for n in range(max(1, min(cores, MAX_AUTO_DEVICES)), 0, -1):
    if micro % n == 0 and eval_batch % n == 0 and config.global_batch_size % n == 0:
      return n
  return 1


# XLA:CPU aborts the process (SIGABRT, "Termination timeout ... exceeded") when the devices
# of a collective arrive more than 60 s apart (a warning after 20 s, the abort 40 s later). A
# run's device threads starved by other work on a shared machine (a niced run beside a test
# suite) arrived that late on 2 cores (2026-12-05, docs/reliability.md); a late device is
# waited for instead. A stuck collective (a bug) then shows as the 20 s warning, and the abort
# comes this long after it.
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"
COLLECTIVE_TIMEOUT_S = 3600
# The flag came with XLA of October 2025 (openxla/xla#32115); jaxlib 0.10.2 and the GPU
# image's 0.11 read it (tests/test_reliability.py). Older jaxlibs are left alone: XLA stops
# at start-up on a flag it does not know.
FIRST_JAXLIB_WITH_TIMEOUT_FLAG = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
  import jaxlib  # pylint: disable=import-outside-toplevel
  return tuple(int(p) for p in jaxlib.__version__.split(".")[:2] if p.isdigit())


def wait_for_late_devices() -> None:
  """Adds COLLECTIVE_TIMEOUT_FLAG to XLA_FLAGS unless it is there (or the jaxlib predates
  it); read when JAX starts its backends (so, like the device count, before anything touches
  JAX)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if (COLLECTIVE_TIMEOUT_FLAG not in flags
      and _jaxlib_version() >= FIRST_JAXLIB_WITH_TIMEOUT_FLAG):
    os.environ["XLA_FLAGS"] = f"{flags} {COLLECTIVE_TIMEOUT_FLAG}={COLLECTIVE_TIMEOUT_S}".strip()


def check_request(requested: str, configs) -> None:
  """ValueError for a --cpu_devices value `configure` would refuse for `configs`."""
  requested = str(requested).strip().lower()
  if requested == AUTO:
    return
  if not (requested.isdigit() and int(requested) >= 1):
    raise ValueError(f"--cpu_devices={requested!r}: expected 'auto' or a count >= 1")
  if int(requested) > 1 and configs and not any(trains(c) for c in configs):
    raise ValueError(
        f"--cpu_devices={requested}: method {configs[0].get('method', '?')!r} runs no training "
        "loop and computes on one device (the k-NN and probe jobs): leave --cpu_devices "
        "out")


def configure(requested: str, configs, multi_process: bool) -> int | None:
  """Sets JAX's CPU device count for this process from `requested` ("auto": the smallest
  `count_for` the usable cores over `configs`, the runs this process will run; or a number) and
  returns it; None when it is left as it is: XLA_FLAGS or
  JAX_NUM_CPU_DEVICES already choose it, the run spans several processes ("auto" only), or
  JAX's backends have already started (a notebook or test that ran JAX before)."""
  requested = str(requested).strip().lower()
  explicit = requested != AUTO
  check_request(requested, configs)
  wait_for_late_devices()  # whatever sets the count below: XLA_FLAGS, JAX_NUM_CPU_DEVICES, us
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or (
      os.environ.get("JAX_NUM_CPU_DEVICES")):
    if explicit:
      log.warning("--cpu_devices=%s is not used: XLA_FLAGS' "
                  "--xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES sets the CPU "
                  "device count of this process", requested)
    return None
  if multi_process and not explicit:
    log.info("--cpu_devices=auto keeps JAX's CPU device count in a run of several processes "
             "(each process its own share of the cores); give a count to change it")
    return None
  count = int(requested) if explicit else min(count_for(c, usable_cores()) for c in configs)
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # the backends are running: the count they started with stays
    # A count asked for and not given is worth a warning (auto: the choice was ours).
    log.log(logging.WARNING if explicit else logging.INFO,
            "JAX's backends were started before --cpu_devices%s could act: the CPU device "
            "count stays as it is", f"={requested}" if explicit else "")
    return None
  return count


def report(count: int | None, requested: str, backend: str) -> tuple[int, str] | None:
  """(logging level, message) about the CPU device count `configure` set (`count`, None when
  it set none), once JAX's default `backend` is known; None when there is nothing to say.
  On a GPU or TPU the CPU devices train nothing: an explicit count is then a setting with no
  effect (a warning), "auto" says nothing."""
  if count is None:
    return None
  if backend != "cpu":
    if str(requested).strip().lower() == AUTO:
      return None
    return (logging.WARNING, f"--cpu_devices={requested} is not used: the run trains on "
            f"{backend}, and the CPU devices only on the CPU")
  if count > 1:
    return (logging.INFO, f"{count} JAX CPU devices (--cpu_devices={requested}): the batch is "
            "split across the cores")
  return None

