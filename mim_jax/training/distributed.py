"""Multi-process start-up: one `jax.distributed.initialize` call when the run spans processes.

A run is one process per host (TPU, CPU) or one per GPU (SLURM with one task per GPU). Every
process runs the same program; `maybe_initialize` must run before anything touches JAX devices
and decides, in this order:

1. Explicit arguments (`--coordinator_address`, `--num_processes`, `--process_id`): with
   num_processes > 1 all three are required and passed to JAX as they are.
2. `MIM_JAX_DISTRIBUTED=1` in the environment: initialise and let JAX detect everything (for
   clusters that JAX detects from a metadata server rather than the environment, e.g. a
   multi-host Cloud TPU VM created by `gcloud compute tpus tpu-vm create`, where
   launch/tpu_vm.sh sets it). `MIM_JAX_DISTRIBUTED=0` turns all detection off.
3. Clusters JAX detects from the environment:
     * a SLURM step (`srun`) with more than one task (SLURM_STEP_NUM_TASKS, else
       SLURM_NTASKS, > 1);
     * Cloud TPU multi-host: TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES naming more than one
       host, or a multi-slice (Megascale) environment (MEGASCALE_COORDINATOR_ADDRESS or
       MEGASCALE_NUM_SLICES > 1);
   JAX's own detection then fills in the coordinator, the process count and this process's id.
4. Otherwise a single process: nothing is initialised.

Cross-process collectives on CPU use gloo (JAX's default), so a multi-process CPU run (tests,
debugging) needs nothing beyond the three flags.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping

import jax

from mim_jax.config.errors import config_error

log = logging.getLogger(__name__)

FORCE_ENV = "MIM_JAX_DISTRIBUTED"
# What JAX's SLURM detection reads: present inside an `srun` step, not in a bare `salloc` shell
# or a batch script that starts Python without srun (where SLURM_NTASKS alone may be > 1).
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")
# A host name or IPv4 address, or an IPv6 address in brackets (with an optional %zone): what
# JAX splits at the last ':' to bind its coordinator on the port.
_HOST = re.compile(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?\]")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _int_env(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env.get(name, "").strip() or 0)
  except ValueError:
    return 0


def _num_hosts(value: str) -> int:
  return len([h for h in value.split(",") if h.strip()])


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """The multi-process cluster the environment describes: "slurm", "tpu" or None.

  Only clusters with more than one process count: a single-task SLURM job or a single-host
  TPU VM is an ordinary one-process run.
  """
  env = os.environ if env is None else env
  slurm_tasks = _int_env(env, "SLURM_STEP_NUM_TASKS") or _int_env(env, "SLURM_NTASKS")
  if all(name in env for name in _SLURM_STEP_VARS) and slurm_tasks > 1:
    return "slurm"
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if _num_hosts(hosts) > 1:
    return "tpu"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS") or _int_env(env, "MEGASCALE_NUM_SLICES") > 1:
    return "tpu"
  return None


def check_coordinator_address(address: str) -> None:
  """ConfigError naming --coordinator_address unless `address` is HOST:PORT or [IPv6]:PORT
  with a port in 1..65535: JAX fails on anything else with a traceback, a crash, or a wait for
  a coordinator that never answers."""
  host, colon, port = address.rpartition(":")
  if "://" in address:
    problem = "Drop the scheme: a host and a port only."
  elif not colon:
    problem = "It has no port."
  elif not _HOST.fullmatch(host):
    problem = "An IPv6 address goes in brackets." if host.count(":") > 1 else ""
  elif not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
    problem = f"The port {port!r} is not a number in 1..65535."
  else:
    return
  raise config_error("--coordinator_address", address,
                     "HOST:PORT or [IPv6]:PORT, process 0's address and a free port in "
                     "1..65535 (e.g. localhost:12355, 10.0.0.1:12355, [::1]:12355)", problem)


def _is_initialized() -> bool:
  is_initialized = getattr(jax.distributed, "is_initialized", None)
  return bool(is_initialized()) if is_initialized is not None else False


def initialize_args(coordinator_address: str = "", num_processes: int = 0,
                    process_id: int = -1,
                    env: Mapping[str, str] | None = None) -> dict[str, object] | None:
  """The keyword arguments for `jax.distributed.initialize`, or None for a single process.

  Raises ValueError for an incomplete or inconsistent set of explicit arguments.
  """
  env = os.environ if env is None else env
  # 0 and -1 are the flags' "not given"; below them a value would count as not given too.
  if num_processes < 0:
    raise ValueError(f"--num_processes={num_processes} must be >= 1 (or left out)")
  if process_id < -1:
    raise ValueError(f"--process_id={process_id} must be >= 0 (or left out)")
  explicit = {"coordinator_address": bool(coordinator_address),
              "num_processes": num_processes > 0, "process_id": process_id >= 0}
  if any(explicit.values()):
    if num_processes == 1 and process_id in (-1, 0):
      cluster = detect_cluster(env)
      if cluster is not None and env.get(FORCE_ENV, "").strip().lower() not in _FALSE:
        raise ValueError(
            f"--num_processes=1 inside a {cluster} job of several processes: each of them "
            "would train alone, all into the same workdir. Leave --num_processes out (the "
            "job's processes then form one run), start a single process, or set "
            f"{FORCE_ENV}=0 if each process is meant to train alone (give each its own "
            "--workdir).")
      if coordinator_address:  # a launcher's template with N = 1: nothing to coordinate
        log.info("--num_processes=1: one process, --coordinator_address=%s is not used",
                 coordinator_address)
      return None  # an explicit single process
    missing = [f"--{name}" for name, given in explicit.items() if not given]
    if missing:
      raise ValueError(f"a multi-process run needs --coordinator_address, --num_processes and "
                       f"--process_id together; missing {', '.join(missing)}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}) for "
                       f"--num_processes={num_processes}")
    check_coordinator_address(coordinator_address)
    return {"coordinator_address": coordinator_address, "num_processes": num_processes,
            "process_id": process_id}
  force = env.get(FORCE_ENV, "").strip().lower()
  if force in _FALSE:
    return None
  if force in _TRUE:
    return {}
  if force:
    raise ValueError(f"{FORCE_ENV}={env[FORCE_ENV]!r}: expected 1 (always initialise) or 0 "
                     "(never), or leave it unset to detect the cluster")
  if detect_cluster(env) is not None:
    return {}  # JAX's cluster detection fills in every argument
  return None


def maybe_initialize(coordinator_address: str = "", num_processes: int = 0,
                     process_id: int = -1) -> None:
  """Calls `jax.distributed.initialize` once if this run spans several processes.

  Call before anything touches JAX devices. Explicit arguments win over the environment (see
  the module docstring); a single-process run initialises nothing. A second call, or a call
  after JAX's distributed system was started elsewhere, does nothing.
  """
  if _is_initialized():
    log.info("jax.distributed already initialised: process %d of %d", jax.process_index(),
             jax.process_count())
    return
  kwargs = initialize_args(coordinator_address, num_processes, process_id)
  if kwargs is None:
    return
  how = ("explicit flags" if kwargs else
         f"JAX cluster detection ({detect_cluster() or FORCE_ENV + '=1'})")
  log.info("initialising jax.distributed from %s", how)
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed: process %d of %d, %d local / %d global device(s) (%s)",
           jax.process_index(), jax.process_count(), jax.local_device_count(),
           jax.device_count(), jax.default_backend())
