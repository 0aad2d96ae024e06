"""launch/slurm.sh and launch/tpu_vm.sh: the commands they print or run (no cluster needed)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mim_jax.config import files

from conftest import REPO

SLURM = REPO / "launch" / "slurm.sh"
TPU = REPO / "launch" / "tpu_vm.sh"


def _bash(script: pathlib.Path, *args: str, env: dict | None = None,
          cwd: pathlib.Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                        timeout=timeout, cwd=cwd or REPO, env=env)


def _fake_bin(tmp_path: pathlib.Path, name: str, body: str) -> dict:
  """An environment whose PATH starts with a stub `name` that logs its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  stub = bin_dir / name
  stub.write_text(f"#!/usr/bin/env bash\nprintf '%s\\n' \"$*\" >> {tmp_path}/calls.log\n{body}\n")
  stub.chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))


# --- SLURM -------------------------------------------------------------------------------------

SLURM_ARGS = ("--nodes=2", "--gpus-per-node=8", "--workdir=/shared/run", "--config=configs/mae_vitb.py")


def test_slurm_dry_run_prints_one_task_per_gpu_and_the_srun_line():
  out = _bash(SLURM, *SLURM_ARGS, "--partition=gpu", "--time=12:00:00", "--dry-run",
              "--", "--config.model.dtype=bfloat16", "--config.data.path=/data/my images")
  assert out.returncode == 0, out.stderr
  text = out.stdout
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --time=12:00:00"):
    assert line in text.splitlines(), line
  assert "--gpus-per-task" not in text  # JAX's SLURM detection wants every GPU visible
  srun = re.search(r"^srun .*\\\n.*$", text, re.M).group(0)
  assert re.search(r"-m mim_jax\.main", srun)
  # A config path that exists from here is made absolute.
  assert f"--config={REPO}/configs/mae_vitb.py --workdir=/shared/run" in srun
  # Extra flags pass through to mim_jax.main, quoted for the shell.
  assert srun.endswith(r"--config.model.dtype=bfloat16 --config.data.path=/data/my\ images")
  assert f"cd {REPO}" in text
  command = text.strip().splitlines()[-1]
  assert re.fullmatch(r"sbatch --output=/shared/run/logs/%x-%j\.out "
                      r"/shared/run/logs/submit-\d{8}-\d{6}\.sbatch", command)
  assert not os.path.exists("/shared/run")  # a dry run writes nothing


def test_slurm_optional_settings_are_left_out_and_paths_made_absolute(tmp_path):
  out = _bash(SLURM, "--nodes=1", "--gpus-per-node=4", "--workdir=rel/run",
              "--config=configs/mae_vitb.py:runlocal", "--dry-run", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert "--partition" not in out.stdout and "--time" not in out.stdout
  assert "#SBATCH --ntasks-per-node=4" in out.stdout
  # A config path that does not exist here is resolved in the repository root by the job.
  assert f"--config=configs/mae_vitb.py:runlocal --workdir={tmp_path}/rel/run" in out.stdout
  # An interpreter given relative to here is made absolute (the job starts in the repository).
  (tmp_path / "py").write_text("#!/bin/sh\n")
  (tmp_path / "py").chmod(0o755)
  out = _bash(SLURM, "--nodes=1", "--gpus-per-node=4", "--workdir=rel/run", "--python=./py",
              "--config=configs/mae_vitb.py", "--dry-run", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert f"{tmp_path}/./py -m mim_jax.main" in out.stdout, out.stdout


def test_slurm_submits_the_written_script(tmp_path):
  """The job's output path goes on sbatch's command line (an #SBATCH line is split at spaces:
  a workdir with a space was refused by sbatch after the script was written)."""
  env = _fake_bin(tmp_path, "sbatch", 'printf "%s\\n" "$@"; echo "Submitted batch job 42"')
  workdir = tmp_path / "my run"
  out = _bash(SLURM, "--nodes=3", "--gpus-per-node=2", f"--workdir={workdir}",
              "--config=configs/mae_vitb.py", "--", "--config.total_steps=10", env=env)
  assert out.returncode == 0, out.stderr
  assert "Submitted batch job 42" in out.stdout
  scripts = list((workdir / "logs").glob("submit-*.sbatch"))
  assert len(scripts) == 1
  assert out.stdout.splitlines()[1:3] == [f"--output={workdir}/logs/%x-%j.out", str(scripts[0])]
  body = scripts[0].read_text()
  assert "#SBATCH --output" not in body
  assert "#SBATCH --nodes=3" in body and "#SBATCH --ntasks-per-node=2" in body
  assert body.rstrip().endswith("--workdir=" + str(workdir).replace(" ", "\\ ")
                                + " --config.total_steps=10")
  syntax = subprocess.run(["bash", "-n", str(scripts[0])], capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr


@pytest.mark.parametrize("status,requeued", [(75, True), (0, False), (3, False)])
def test_slurm_requeue_resubmits_only_a_run_stopped_by_sigterm(tmp_path, status, requeued):
  """--requeue: SIGTERM before the time limit; exit 75 (checkpoint written) requeues the job,
  a finished (0) or failed (3) run does not. The generated script runs against stub srun and
  scontrol."""
  env = _fake_bin(tmp_path, "srun", f"exit {status}")
  _fake_bin(tmp_path, "scontrol", "")
  out = _bash(SLURM, *SLURM_ARGS, "--requeue=300", "--dry-run")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert "#SBATCH --requeue" in lines and "#SBATCH --signal=TERM@300" in lines
  script = tmp_path / "job.sbatch"
  script.write_text("\n".join(lines[1:lines.index("# command:")]) + "\n")
  job = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                       env=dict(env, SLURM_JOB_ID="42"))
  assert job.returncode == status, job.stderr
  calls = (tmp_path / "calls.log").read_text().splitlines()
  # srun kills no task that exits first (with 1, the 75 of the first could be reported as the
  # others' kill signal): each stops by itself at the same step.
  assert calls[0].startswith("--label --kill-on-bad-exit=0 ") and "-m mim_jax.main" in calls[0]
  assert calls[1:] == (["requeue 42"] if requeued else [])


def test_slurm_without_requeue_has_no_signal_or_requeue():
  out = _bash(SLURM, *SLURM_ARGS, "--dry-run")
  assert out.returncode == 0 and "#SBATCH --nodes=2" in out.stdout and "srun " in out.stdout
  assert "--signal" not in out.stdout and "requeue" not in out.stdout
  assert "srun --label --kill-on-bad-exit=1 " in out.stdout
  assert "--cpus-per-task" not in out.stdout and "SRUN_CPUS_PER_TASK" not in out.stdout
  out = _bash(SLURM, *SLURM_ARGS, "--cpus-per-task=12", "--dry-run")
  lines = out.stdout.splitlines()
  assert "#SBATCH --cpus-per-task=12" in lines and "export SRUN_CPUS_PER_TASK=12" in lines
  out = _bash(SLURM, *SLURM_ARGS, "--cpus-per-task=0", "--dry-run")
  assert out.returncode != 0 and "--cpus-per-task=0 must be a positive integer" in out.stderr
  # % in the workdir: SLURM would read it as a pattern of the output path.
  args = [a for a in SLURM_ARGS if not a.startswith("--workdir=")]
  out = _bash(SLURM, *args, "--workdir=/tmp/run%j", "--dry-run")
  assert out.returncode != 0 and "SLURM reads % in the output path" in out.stderr


@pytest.mark.parametrize("missing", ["--nodes", "--gpus-per-node", "--workdir", "--config"])
def test_slurm_missing_argument_is_named(missing):
  args = [a for a in SLURM_ARGS if not a.startswith(missing + "=")]
  out = _bash(SLURM, *args, "--dry-run")
  assert out.returncode != 0
  assert f"{missing} is required" in out.stderr


@pytest.mark.parametrize("bad,match", [
    ("--nodes=0", "--nodes=0 must be a positive integer"),
    ("--gpus-per-node=two", "--gpus-per-node=two must be a positive integer"),
    ("--time=soon", "--time=soon must look like"),
    ("--requeue=0", "--requeue=0 must be a positive number of seconds"),
    ("--frobnicate", "unknown argument '--frobnicate'"),
    ("--config=configs/mae_vitz.py", "--config=configs/mae_vitz.py: no such file"),
    ("--python=no-such-python", "--python=no-such-python: not found"),
])
def test_slurm_bad_argument_is_named(bad, match):
  out = _bash(SLURM, *SLURM_ARGS, bad, "--dry-run")
  assert out.returncode != 0
  assert match in out.stderr


def test_slurm_checks_the_job_name_and_the_interpreter_before_submitting(tmp_path):
  """A job name with a space broke its #SBATCH line; an interpreter that cannot import mim_jax
  failed only once the job had waited in the queue: both refused before sbatch runs."""
  out = _bash(SLURM, *SLURM_ARGS, "--job-name=my run", "--dry-run")
  assert out.returncode == 2 and "--job-name='my run' must be one word" in out.stderr
  env = _fake_bin(tmp_path, "sbatch", "echo 'Submitted batch job 42'")
  broken = tmp_path / "py"
  broken.write_text("#!/bin/sh\nexit 1\n")
  broken.chmod(0o755)
  out = _bash(SLURM, *SLURM_ARGS[:2], f"--workdir={tmp_path / 'run'}", SLURM_ARGS[3],
              f"--python={broken}", env=env)
  assert out.returncode == 2 and "cannot import mim_jax.main" in out.stderr, out.stderr
  assert not (tmp_path / "calls.log").exists()  # sbatch never ran
  # A mistyped field after -- is named by the trainer's parser before the queue, too.
  out = _bash(SLURM, *SLURM_ARGS[:2], f"--workdir={tmp_path / 'run'}", SLURM_ARGS[3],
              f"--python={sys.executable}", "--", "--config.data.tfds_dta_dir=/x", env=env)
  assert out.returncode == 2 and "error: config.data.tfds_dta_dir does not exist" in out.stderr, (
      out.stderr)
  assert not (tmp_path / "calls.log").exists()
  # The environment's own interpreter passes and the job is submitted.
  out = _bash(SLURM, *SLURM_ARGS[:2], f"--workdir={tmp_path / 'run'}", SLURM_ARGS[3],
              f"--python={sys.executable}", env=env)
  assert out.returncode == 0 and "Submitted batch job 42" in out.stdout, out.stderr


# --- Cloud TPU VM ------------------------------------------------------------------------------

TPU_ARGS = ("--name=mae-test", "--zone=us-central2-b", "--accelerator=v4-32",
            "--workdir=gs://bucket/mae", "--config=configs/mae_vitb.py")


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def test_tpu_dry_run_prints_create_install_run_delete_in_order():
  out = _bash(TPU, *TPU_ARGS, "--dry-run", "--", "--config.total_steps=100",
              "--config.data.path=/data/my images")
  assert out.returncode == 0, out.stderr
  lines = _lines(out.stdout)
  create = [i for i, l in enumerate(lines) if l.startswith("gcloud compute tpus tpu-vm create ")]
  copy = [i for i, l in enumerate(lines) if l.startswith("gcloud compute tpus tpu-vm scp ")]
  ssh = [i for i, l in enumerate(lines) if l.startswith("gcloud compute tpus tpu-vm ssh ")]
  delete = [i for i, l in enumerate(lines) if l.startswith("gcloud compute tpus tpu-vm delete ")]
  assert len(create) == len(copy) == len(delete) == 1 and len(ssh) == 2
  install, train = ssh
  assert create[0] < copy[0] < install < train < delete[0] == len(lines) - 1

  c = lines[create[0]]
  assert "mae-test" in c and "--accelerator-type=v4-32" in c and "--zone=us-central2-b" in c
  assert "--version=tpu-ubuntu2204-base" in c and "--spot" not in c
  assert "--worker=all" in lines[copy[0]]
  assert "--worker=all" in lines[install]
  assert "pip install" in lines[install] and "jax[tpu]" in lines[install]
  assert "~/mim_jax" in lines[install]
  t = lines[train]
  assert "--worker=all" in t and "python3 -m mim_jax.main" in t
  assert "--config=configs/mae_vitb.py --workdir=gs://bucket/mae" in t
  assert "MIM_JAX_DISTRIBUTED=1" in t
  # Extra flags pass through to mim_jax.main (inside the remote command, shell-quoted): the
  # remote shell gets the path with its space as one word.
  remote = next(a for a in shlex.split(t) if a.startswith("--command="))[len("--command="):]
  words = shlex.split(remote)
  assert words[words.index("--config.total_steps=100") + 1] == "--config.data.path=/data/my images"
  assert re.search(r"2>&1 \| tee -a logs/tpu-mae-test-\d{8}-\d{6}\.log$", t)
  assert "--quiet" in lines[delete[0]] and "mae-test" in lines[delete[0]]


def test_tpu_queued_spot_keep():
  out = _bash(TPU, *TPU_ARGS, "--queued", "--spot", "--keep", "--project=my-proj",
              "--version=v2-alpha-tpuv5", "--dry-run")
  assert out.returncode == 0, out.stderr
  lines = _lines(out.stdout)
  assert lines[0].startswith("gcloud compute tpus queued-resources create mae-test ")
  for part in ("--node-id=mae-test", "--accelerator-type=v4-32", "--runtime-version=v2-alpha-tpuv5",
               "--spot", "--project=my-proj"):
    assert part in lines[0]
  assert any(l.startswith("gcloud compute tpus queued-resources describe mae-test") for l in lines)
  assert not any("tpu-vm create" in l for l in lines)
  assert not any(" delete " in l for l in lines if not l.startswith("#"))  # --keep
  assert all("--project=my-proj" in l for l in lines if l.startswith("gcloud"))


def test_tpu_queued_resource_is_deleted_with_force():
  out = _bash(TPU, *TPU_ARGS, "--queued", "--dry-run")
  assert out.returncode == 0, out.stderr
  last = _lines(out.stdout)[-1]
  assert last.startswith("gcloud compute tpus queued-resources delete mae-test")
  assert "--force" in last and "--quiet" in last


def test_tpu_runs_the_commands_and_deletes_even_after_a_failed_run(tmp_path):
  """With a stub gcloud: the real (not dry) path runs every step, logs, and cleans up."""
  fail_train = 'if [[ "$*" == *mim_jax.main* ]]; then echo "worker output"; exit 3; fi'
  env = _fake_bin(tmp_path, "gcloud", fail_train + "\n"
                  'if [[ "$*" == *"queued-resources describe"* ]]; then echo ACTIVE; fi')
  log = tmp_path / "train.log"
  out = _bash(TPU, *TPU_ARGS, "--queued", f"--log={log}", env=env)
  assert out.returncode == 3, out.stderr
  calls = (tmp_path / "calls.log").read_text().splitlines()
  kinds = [" ".join(c.split()[2:4]) for c in calls]
  assert kinds == ["queued-resources create", "queued-resources describe", "tpu-vm scp",
                   "tpu-vm ssh", "tpu-vm ssh", "queued-resources delete"]
  assert "worker output" in log.read_text()
  assert not list(tmp_path.glob("mim_jax-*.tar.gz"))  # the archive is removed


@pytest.mark.parametrize("accelerator, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_tpu_default_software_version_follows_the_accelerator(accelerator, version):
  """The v4 image was the default for every --accelerator: v5e, v5p and v6e slices need their
  own (creation fails with it); --version still wins."""
  args = [a for a in TPU_ARGS if not a.startswith("--accelerator=")]
  out = _bash(TPU, *args, f"--accelerator={accelerator}", "--dry-run")
  assert out.returncode == 0 and f"--version={version}" in out.stdout, out.stdout + out.stderr
  out = _bash(TPU, *args, f"--accelerator={accelerator}", "--version=custom", "--dry-run")
  assert "--version=custom" in out.stdout


def test_tpu_queued_resource_survives_a_failed_state_query(tmp_path):
  """A transient error of `queued-resources describe` is retried: it ended the script (set -e)
  and the cleanup deleted the queued resource, losing its place in the queue."""
  once = tmp_path / "failed_once"
  env = _fake_bin(tmp_path, "gcloud",
                  'if [[ "$*" == *"queued-resources describe"* ]]; then\n'
                  f'  if [[ ! -e {once} ]]; then touch {once}; echo 503 >&2; exit 1; fi\n'
                  '  echo ACTIVE\nfi')
  out = _bash(TPU, *TPU_ARGS, "--queued", f"--log={tmp_path}/train.log",
              env=dict(env, MIM_JAX_TPU_POLL_SECONDS="0"))
  assert out.returncode == 0, out.stderr
  assert "state query failed (1), retrying" in out.stderr
  kinds = [" ".join(c.split()[2:4]) for c in (tmp_path / "calls.log").read_text().splitlines()]
  assert kinds[:3] == ["queued-resources create", "queued-resources describe",
                       "queued-resources describe"]
  assert kinds[3] == "tpu-vm scp"  # it went on to the run


def test_tpu_copies_this_checkout(tmp_path):
  env = _fake_bin(tmp_path, "gcloud",
                  'if [[ "$1 $2 $3 $4" == "compute tpus tpu-vm scp" ]]; then cp "$5" '
                  f'{tmp_path}/copied.tar.gz; fi')
  out = _bash(TPU, *TPU_ARGS, "--keep", f"--log={tmp_path}/train.log", env=env)
  assert out.returncode == 0, out.stderr
  assert "kept mae-test" in out.stderr
  listing = subprocess.run(["tar", "tzf", str(tmp_path / "copied.tar.gz")], capture_output=True,
                           text=True, check=True).stdout.split()
  assert "setup.py" in listing and "mim_jax/main.py" in listing and "configs/mae_vitb.py" in listing
  assert not any(p.startswith(".venv/") for p in listing)


@pytest.mark.parametrize("missing", ["--name", "--zone", "--accelerator", "--workdir", "--config"])
def test_tpu_missing_argument_is_named(missing):
  args = [a for a in TPU_ARGS if not a.startswith(missing + "=")]
  out = _bash(TPU, *args, "--dry-run")
  assert out.returncode != 0
  assert f"{missing} is required" in out.stderr


@pytest.mark.parametrize("args,says", [
    (("--config=configs/no_such.py",), "--config=configs/no_such.py must be a config file of"),
    (("--workdir=runs/mae",), "--workdir=runs/mae must be gs://... or an absolute path"),
    (("--project=",), "--project= has no value"),
])
def test_tpu_settings_that_would_fail_after_the_vm_exists_are_refused_first(tmp_path, args,
                                                                             says):
  """A config the workers' copy lacks, a relative (per-worker, deleted) workdir or an empty
  value fail before anything is created: no gcloud call at all."""
  env = _fake_bin(tmp_path, "gcloud", "")
  out = _bash(TPU, *TPU_ARGS, *args, env=env)
  assert out.returncode == 2 and says in out.stderr, out.stderr
  assert not (tmp_path / "calls.log").exists()


def test_tpu_deletes_what_an_interrupted_creation_may_have_left_but_not_after_a_refusal(
    tmp_path):
  """The clean-up is armed before the creation: a Ctrl-C during its minutes (here the stand-in
  gcloud interrupts the script, or only exits as an interrupted gcloud does) ends with the
  delete; a creation that fails by itself (a name already taken by another run's VM) deletes
  nothing."""
  interrupted = 'if [[ "$*" == *" create "* ]]; then kill -INT $PPID; exit 130; fi'
  env = _fake_bin(tmp_path, "gcloud", interrupted)
  out = _bash(TPU, *TPU_ARGS, f"--log={tmp_path}/train.log", env=env)
  assert out.returncode == 130, out.stderr
  calls = (tmp_path / "calls.log").read_text().splitlines()
  assert [" ".join(c.split()[2:4]) for c in calls] == ["tpu-vm create", "tpu-vm delete"]
  (tmp_path / "calls.log").unlink()
  # The same when the script's own trap has not run by the time the creation returns (bash may
  # run it only commands later; the suite once saw no delete under load): a creation that ended
  # by SIGINT or SIGTERM is an interrupted one.
  for status in (130, 143):
    env = _fake_bin(tmp_path, "gcloud", f'if [[ "$*" == *" create "* ]]; then exit {status}; fi')
    out = _bash(TPU, *TPU_ARGS, f"--log={tmp_path}/train.log", env=env)
    assert out.returncode == status, out.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert [" ".join(c.split()[2:4]) for c in calls] == ["tpu-vm create", "tpu-vm delete"]
    (tmp_path / "calls.log").unlink()
  env = _fake_bin(tmp_path, "gcloud", 'if [[ "$*" == *" create "* ]]; then exit 4; fi')
  out = _bash(TPU, *TPU_ARGS, f"--log={tmp_path}/train.log", env=env)
  assert out.returncode == 4, out.stderr
  calls = (tmp_path / "calls.log").read_text().splitlines()
  assert [" ".join(c.split()[2:4]) for c in calls] == ["tpu-vm create"]


def _process_tree(pid: int) -> str:
  """`pid` and its descendants: state, kernel wait channel, blocked / ignored / caught signal
  masks and command line, for the message of a launcher that did not stop in time."""
  lines, todo = [], [pid]
  while todo:
    p = todo.pop()
    try:
      status = pathlib.Path(f"/proc/{p}/status").read_text()
      wchan = pathlib.Path(f"/proc/{p}/wchan").read_text()
      cmd = pathlib.Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
    except (FileNotFoundError, ProcessLookupError):
      continue
    try:
      kids = pathlib.Path(f"/proc/{p}/task/{p}/children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
      kids = []
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    lines.append(f"{p} {fields.get('State')} wchan={wchan} blk={fields.get('SigBlk')} "
                 f"ign={fields.get('SigIgn')} cgt={fields.get('SigCgt')} {cmd}")
    todo += [int(k) for k in kids]
  return "\n".join(lines)


def _running(pid: int) -> bool:
  """Whether process `pid` exists and has not exited (an exited orphan may wait as a zombie
  where PID 1 does not reap)."""
  try:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
  except FileNotFoundError:
    return False
  return "State:\tZ" not in status


# gcloud standing in for the workers: the training and stop commands run here, as the remote
# shell would run them, with HOME a folder of the test; every other call does nothing.
_WORKER_SHELL = """
for arg in "$@"; do
  case "$arg" in --command=*) cmd="${arg#--command=}" ;; esac
done
if [[ "${cmd:-}" == *mim_jax.pid* ]]; then
  HOME="$STUB_DIR/home" bash -c "$cmd"
  exit $?
fi
"""

# python3 on the "worker": a training run that, on SIGTERM, says it wrote its checkpoint and
# exits 75, as mim_jax.main does.
_FAKE_TRAINER = """#!/usr/bin/env bash
echo $$ > "$STUB_DIR/train.pid"
trap 'kill $!; echo "worker: checkpoint written after SIGTERM"; exit 75' TERM
sleep 120 & echo $! > "$STUB_DIR/sleep.pid"
wait
"""
# (The trap is set before sleep.pid, the test's signal to stop it, is written: a SIGTERM before
# it would kill the stand-in without its checkpoint line and leave `sleep` holding the log's
# pipe open for two minutes.)


# Starts a command with SIGINT at its default action, as a terminal starts the launcher. A test
# process may have it ignored (a suite started in the background with `nohup ... &`: ignored
# SIGHUP and SIGINT, which its children inherit), and a non-interactive bash that starts with a
# signal ignored cannot trap it: the launcher would be deaf to the Ctrl-C under test (seen:
# every process of the run with SigIgn 0x7, the launcher waiting on, no trap run).
_WITH_DEFAULT_SIGINT = [sys.executable, "-c", "import os, signal, sys; "
                        "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execvp(sys.argv[1], sys.argv[1:])"]


@pytest.mark.parametrize("signal_name, keep", [("SIGTERM", False), ("SIGINT", True)])
def test_tpu_interrupted_run_stops_the_training_before_deleting_or_keeping(tmp_path, signal_name,
                                                                           keep):
  """A Ctrl-C or SIGTERM to the launcher while the workers train sends SIGTERM to the training
  on every worker (the process id its command wrote) and waits for it to exit (the trainer
  checkpoints first) before the VM is deleted, or kept with nothing left training on it. The
  launcher's own training and stop commands run, in a shell standing in for a worker."""
  env = dict(_fake_bin(tmp_path, "gcloud", _WORKER_SHELL), STUB_DIR=str(tmp_path))
  trainer = tmp_path / "bin" / "python3"
  trainer.write_text(_FAKE_TRAINER)
  trainer.chmod(0o755)
  (tmp_path / "home" / "mim_jax").mkdir(parents=True)
  log = tmp_path / "train.log"
  args = [*TPU_ARGS, f"--log={log}"] + (["--keep"] if keep else [])
  proc = subprocess.Popen([*_WITH_DEFAULT_SIGINT, "bash", str(TPU), *args], cwd=REPO, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.monotonic() + 30
  while not (tmp_path / "sleep.pid").exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.1)
  before = _process_tree(proc.pid)
  proc.send_signal(getattr(signal, signal_name))
  try:
    _, stderr = proc.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    # Say what every process was doing (their signal masks included), then end them.
    after = _process_tree(proc.pid)
    for pid_file in ("train.pid", "sleep.pid"):
      with contextlib.suppress(OSError, ValueError):
        pid = int((tmp_path / pid_file).read_text())
        after += f"\n{pid_file}:\n{_process_tree(pid)}"
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    _, stderr = proc.communicate()
    pytest.fail(f"the launcher did not stop within 60 s of {signal_name}; stderr: {stderr!r}\n"
                f"before the signal:\n{before}\nafter 60 s:\n{after}")
  assert proc.returncode == 128 + getattr(signal, signal_name), stderr
  # The pid the training command wrote is the trainer's (exec keeps the process).
  assert (tmp_path / "home" / "mim_jax.pid").read_text() == (tmp_path / "train.pid").read_text()
  calls = (tmp_path / "calls.log").read_text().splitlines()
  kinds = [" ".join(c.split()[2:4]) for c in calls]
  assert kinds == (["tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh"]
                   + ([] if keep else ["tpu-vm delete"])), stderr
  assert "kill -TERM" in calls[4] and "stopping the training on every worker" in stderr
  assert "worker: checkpoint written after SIGTERM" in log.read_text()
  assert ("kept mae-test" in stderr) == keep
  for pid_file in ("train.pid", "sleep.pid"):  # nothing outlives the launcher
    assert not _running(int((tmp_path / pid_file).read_text())), pid_file


def test_tpu_bad_name_and_unknown_argument():
  out = _bash(TPU, *TPU_ARGS, "--name=Bad_Name", "--dry-run")
  assert out.returncode != 0 and "--name=Bad_Name" in out.stderr
  out = _bash(TPU, *TPU_ARGS, "--preemptible", "--dry-run")
  assert out.returncode != 0 and "unknown argument '--preemptible'" in out.stderr


@pytest.mark.parametrize("arg,says", [
    ("--workdir=gs://bucket/run", "must be a path on a file system every node shares"),
    ("--python=", "--python= has no value"),
    ("--requeue=", "--requeue= has no value"),
])
def test_slurm_refuses_a_bucket_workdir_and_empty_values(arg, says):
  """A gs:// workdir became $PWD/gs:/bucket/run (a local folder); `--python=` wrote `srun ''`
  into the job and `--requeue=` switched requeueing off without a word."""
  args = [a for a in SLURM_ARGS if not (arg.startswith("--workdir") and a.startswith("--workdir"))]
  out = _bash(SLURM, *args, arg, "--dry-run")
  assert out.returncode == 2 and says in out.stderr, out.stderr


@pytest.mark.parametrize("script, args", [(SLURM, SLURM_ARGS), (TPU, TPU_ARGS)])
@pytest.mark.parametrize("after, says", [
    ("--workdir=relative", "--workdir after --: give it to the launcher itself"),
    ("--config=configs/mae_vitl.py", "--config after --: give it to the launcher itself"),
    ("--num_processes=2", "--num_processes after --: the launcher's processes find each other"),
    ("--coordinator_address=h:1", "--coordinator_address after --"),
])
def test_launchers_refuse_their_own_flags_after_the_dashes(script, args, after, says):
  """absl keeps the last of a repeated flag: a --workdir after -- replaced the one the
  launcher checked (a relative one on a TPU VM lies in the checkout deleted with it)."""
  out = _bash(script, *args, "--dry-run", "--", "--config.model.dtype=bfloat16", after)
  assert out.returncode == 2 and f"error: {says}" in out.stderr, out.stderr
  assert not out.stdout


# --- docs/fmnist_results.sh and docs/fmnist_gpu.sh ---------------------------------------------

RESULTS = REPO / "docs" / "fmnist_results.sh"
GPU_RESULTS = REPO / "docs" / "fmnist_gpu.sh"

# Stands in for `python -m mim_jax.main`: logs its arguments (tab-separated, one call per line)
# and leaves what a finished run leaves (config.json with the held-out split, results.json, the
# pixel probe's with its chosen L2); also for scikit-learn's pixel baselines (logged with their
# arguments); every other python call is the real one.
_MAIN_STUB = """
if [ "$1 $2" = "docs/fmnist_tools.py sklearn_pixels" ]; then
  line=$(printf '%%s\\t' sklearn "${@:3}"); printf '%%s\\n' "$line" >> "$MAIN_CALLS"
  if [ -n "${5:-}" ]; then printf '{"l2": %%s}' "$5" > "$3"; else echo '{}' > "$3"; fi
  exit 0
fi
if [ "$1 $2" = "-m mim_jax.main" ]; then
  # One write per call: fmnist_gpu.sh runs several at once.
  line=$(printf '%%s\\t' "${@:3}"); printf '%%s\\n' "$line" >> "$MAIN_CALLS"
  [ "${MAIN_STATUS:-0}" = 0 ] || exit "$MAIN_STATUS"
  for a in "$@"; do
    case $a in --workdir=*) w=${a#--workdir=}; mkdir -p "$w"
      echo '{"data": {"eval_split": "holdout"}}' > "$w/config.json"
      echo '{"eval_accuracy": 0.5}' > "$w/results.json"
      case $w in */probe_pixels) echo '{"probe_l2_pixels": 0.001}' > "$w/results.json";; esac;;
    esac
  done
  exit 0
fi
exec %s "$@"
"""


def _results_calls(tmp_path, script, **env) -> list[list[str]]:
  """The argument lists of every `python -m mim_jax.main` the script runs, in order."""
  calls = tmp_path / "main_calls.log"
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  # Each results script starts Python a few times (grid points, choices): 180 s on a busy CPU.
  out = _bash(script, str(tmp_path / "root"),
              env=dict(stub_env, MAIN_CALLS=str(calls), **env), timeout=180)
  assert out.returncode == 0, out.stdout + out.stderr
  return [line.rstrip("\t").split("\t") for line in calls.read_text().splitlines()]


def _unread_settings(args: list[str]) -> None:
  """Loads the config a logged command line describes and applies the checks that refuse
  settings the run would not read (what the stand-in trainer cannot notice)."""
  from absl import flags

  from mim_jax import main, registry
  from mim_jax.config import validation
  flag_values = flags.FlagValues()
  argv = ["mim_jax.main", *args]
  main.define_flags(flag_values, argv)
  flag_values(argv)
  config = flag_values.config
  # As main.py checks: the file against the method's defaults, the overrides against the file.
  file_config = files.load_config_file(flag_values["config"].config_filename)
  registry.check_unread_fields(file_config)
  validation.check_unread(config, file_config,
                          registry.method_class(config.method).unread_rules())


def test_results_script_passes_train_flags_to_training_runs_only(tmp_path):
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="pretrain_mae probe_mae tune_mae",
                         TRAIN_FLAGS="--config.a=1 --config.b=2\n--config.c=3")
  pretrain, probe, *tunes = calls
  assert "--config.num_epochs=50" in pretrain
  assert "--config.optimizer.warmup_epochs=5.0" in pretrain
  assert probe[0] == "--config=configs/linprobe_fmnist.py"
  assert len(tunes) == 5  # docs/fmnist_tools.py's DEFAULT_POINTS (the recorded choice's)
  for call in (pretrain, *tunes):  # every flag its own argument, also those on a second line
    first = call.index("--config.a=1")
    assert call[first:first + 3] == ["--config.a=1", "--config.b=2", "--config.c=3"], call
  assert "--config.a=1" not in probe
  # A second run with the same settings skips what finished.
  assert _results_calls(tmp_path, RESULTS, SECTIONS="pretrain_mae probe_mae",
                        TRAIN_FLAGS="--config.a=1 --config.b=2\n--config.c=3") == calls


def test_results_script_holds_scikit_learn_to_the_pixel_probes_own_l2(tmp_path):
  """The baselines: scikit-learn's logistic regression with its defaults, then with the L2
  strength the pixel probe chose (its results.json), each once, the second again if the probe
  has chosen another strength since."""
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="baselines")
  names = [call[-1].rsplit("/", 1)[-1] for call in calls if call[0] != "sklearn"]
  assert names == ["probe_pixels", "probe_random", "knn_pixels_holdout"]
  root = tmp_path / "root"
  assert [call for call in calls if call[0] == "sklearn"] == [
      ["sklearn", f"{root}/sklearn_pixels.json"],  # (the log drops a last empty argument)
      ["sklearn", f"{root}/sklearn_pixels_matched.json", "", "0.001"]]
  assert _results_calls(tmp_path, RESULTS, SECTIONS="baselines") == calls  # all skipped
  # A pixel probe that chose another strength since: the matched fit runs again, with it.
  (root / "sklearn_pixels_matched.json").write_text('{"l2": 0.01}')
  again = _results_calls(tmp_path, RESULTS, SECTIONS="baselines")[len(calls):]
  assert again == [["sklearn", f"{root}/sklearn_pixels_matched.json", "", "0.001"]]
  # SKLEARN_MATCHED=0 (docs/fmnist_gpu.sh's default) leaves it out.
  (tmp_path / "off").mkdir()
  calls = _results_calls(tmp_path / "off", RESULTS, SECTIONS="baselines", SKLEARN_MATCHED="0")
  assert [call[0] for call in calls if call[0] == "sklearn"] == ["sklearn"]  # the defaults' only


def test_results_script_runs_sections_listed_across_lines(tmp_path):
  """A section next to a line break of SECTIONS (the default list spans two lines) runs."""
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="pretrain_mae\nfinetune_mae", SEEDS="0",
                         CHOSEN_tune_mae="lr4e-3_nomix")
  assert [c[-1] for c in calls] == [f"--workdir={tmp_path}/root/mae_e50",
                                    f"--workdir={tmp_path}/root/ft_mae_s0"], calls


def test_results_script_reads_fashion_mnist_from_fmnist_dir(tmp_path):
  """FMNIST_DIR (a machine without the Debian package) reaches every run, probes included."""
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="pretrain_mae probe_mae",
                         FMNIST_DIR="/data/fm")
  assert len(calls) == 2
  for call in calls:
    assert call[-2:-1] == ["--config.data.path=/data/fm"], call
  _unread_settings(calls[1][:-1])  # the probe reads the path (fashion_mnist's source)


def test_results_script_fine_tunes_with_a_recorded_choice_when_the_grid_runs_are_gone(tmp_path):
  """CHOSEN_tune_mae names a grid point (recorded in docs/results.md): fine-tuning takes its
  flags without the grid's runs; without it, the missing grid stops the script."""
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="finetune_mae", SEEDS="1",
                         CHOSEN_tune_mae="lr4e-3_nomix")
  (ft,) = calls
  assert ft[0] == "--config=configs/finetune_fmnist.py" and "--config.seed=1" in ft
  assert ft[-4:-1] == ["--config.optimizer.base_lr=0.004", "--config.classifier.mixup_alpha=0",
                     "--config.classifier.cutmix_alpha=0"], ft
  assert ft[-1].endswith("/ft_mae_s1")
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  out = _bash(RESULTS, str(tmp_path / "other"), env=dict(
      stub_env, MAIN_CALLS=str(tmp_path / "other.log"), SECTIONS="finetune_mae"))
  assert out.returncode == 1 and "tuning grid tune_mae_* is not finished" in out.stderr


def test_results_script_takes_a_fine_tuning_run_s_export_alone_for_unfinished(tmp_path):
  """Fine-tuning exports its classifier (encoder/model.json) just before its results.json:
  a run stopped between the two is run again (it resumes at its last step and scores), while
  a pre-training run's export is its end and it is skipped."""
  root = tmp_path / "root"
  for name, method in (("ft_mae_s0", "finetune"), ("mae_e50", "mae")):
    (root / name / "encoder").mkdir(parents=True)
    (root / name / "encoder" / "model.json").write_text("{}")
    (root / name / "config.json").write_text(json.dumps({"method": method}, indent=2))
  # A finished run without the settings it ran with (NAME.args: started by hand) is not taken
  # for the one asked: the script stops, saying how to keep it once it is checked.
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  out = _bash(RESULTS, str(root), env=dict(stub_env, MAIN_CALLS=str(tmp_path / "none.log"),
                                           SECTIONS="pretrain_mae"))
  assert out.returncode == 2 and "mae_e50.args (the settings it ran with) is missing" in (
      out.stderr), out.stdout + out.stderr
  assert not (tmp_path / "none.log").exists()
  keep = out.stderr.split("keep it with:\n", 1)[1].split("\nEOF\n", 1)[0] + "\nEOF\n"
  subprocess.run(["bash", "-c", keep], check=True)
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="pretrain_mae finetune_mae", SEEDS="0",
                         CHOSEN_tune_mae="lr4e-3_nomix")
  assert [call[-1].rsplit("/", 1)[1] for call in calls] == ["ft_mae_s0"]
  # A pre-training run with the k-NN monitor writes results.json after its export too.
  (root / "mae_e50" / "config.json").write_text(
      json.dumps({"method": "mae", "knn": {"every_epochs": 5.0}}, indent=2))
  (tmp_path / "main_calls.log").unlink()
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="pretrain_mae")
  assert [call[-1].rsplit("/", 1)[1] for call in calls] == ["mae_e50"]


def test_results_script_probes_a_fine_tuned_encoder(tmp_path):
  """probe_finetuned: the probe of a fine-tuning run's export (FINETUNED), the scale of the
  probe target."""
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  out = _bash(RESULTS, str(tmp_path / "root"), env=dict(
      stub_env, MAIN_CALLS=str(tmp_path / "none.log"), SECTIONS="probe_finetuned"))
  assert out.returncode == 0 and "ft_maskdistill_s0 has not finished" in out.stdout, out.stderr
  assert not (tmp_path / "none.log").exists()
  (tmp_path / "root" / "ft_x_s0").mkdir()
  (tmp_path / "root" / "ft_x_s0" / "results.json").write_text("{}")
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="probe_finetuned", FINETUNED="ft_x_s0")
  assert [call[:2] for call in calls] == [[
      "--config=configs/linprobe_fmnist.py", f"--config.init_from={tmp_path}/root/ft_x_s0"]]
  assert calls[0][-1] == f"--workdir={tmp_path}/root/probe_ft_x_s0"


def test_results_script_tunes_and_chooses_among_the_tune_points_only(tmp_path):
  """TUNE_POINTS: the grid points run (a recorded winner beside a point added since) and the
  only ones fine-tuning chooses from, so the rest of the grid need not run again."""
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="tune_mae finetune_mae", SEEDS="0",
                         TUNE_POINTS="lr4e-3_nomix lr4e-3_nomix_ra")
  *tunes, ft = calls
  assert [call[-1].rsplit("/", 1)[1] for call in tunes] == [
      "tune_mae_lr4e-3_nomix", "tune_mae_lr4e-3_nomix_ra"]
  assert "--config.data.rand_augment=rand-m9-mstd0.5-inc1" in tunes[1]
  assert "--config.data.random_erasing=0.25" in tunes[1]
  # Every stand-in run scores 0.5: the tie goes to the first point.
  assert "--config.optimizer.base_lr=0.004" in ft and not any("rand_augment" in a for a in ft)
  _unread_settings(tunes[1][:-1])


def test_results_script_refuses_a_finished_run_asked_for_with_other_settings(tmp_path):
  """A finished run is skipped only if asked for with the arguments it ran with (ROOT may
  move); with others (here TRAIN_FLAGS) the script stops before running anything, instead of
  taking the old run for the new one."""
  first = _results_calls(tmp_path, RESULTS, SECTIONS="pretrain_mae")
  assert len(first) == 1
  moved = tmp_path / "moved"
  shutil.move(tmp_path / "root", moved)
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  calls = tmp_path / "main_calls.log"
  out = _bash(RESULTS, str(moved), env=dict(stub_env, MAIN_CALLS=str(calls),
                                            SECTIONS="pretrain_mae"))
  assert out.returncode == 0 and len(calls.read_text().splitlines()) == 1  # skipped
  out = _bash(RESULTS, str(moved), env=dict(stub_env, MAIN_CALLS=str(calls),
                                            SECTIONS="pretrain_mae probe_mae",
                                            TRAIN_FLAGS="--config.model.dtype=bfloat16"))
  assert out.returncode == 2, out.stdout + out.stderr
  assert f"{moved}/mae_e50 finished with other settings" in out.stderr
  assert "> --config.model.dtype=bfloat16" in out.stderr
  assert len(calls.read_text().splitlines()) == 1  # nothing ran, the probe neither


def test_results_script_names_runs_of_other_lengths_apart(tmp_path):
  """FT_EPOCHS / TUNE_EPOCHS other than 15 / 3 join the run names, so a longer schedule runs
  beside the default one (and fine-tuning picks from the tuning runs of its own length)."""
  env = dict(SECTIONS="tune_mae finetune_mae", SEEDS="0", TUNE_POINTS="lr4e-3_nomix")
  default = _results_calls(tmp_path, RESULTS, **env)
  # The calls log is the same file: the second script's calls follow the first's.
  longer = _results_calls(tmp_path, RESULTS, FT_EPOCHS="30", TUNE_EPOCHS="6", **env)[2:]
  names = [c[-1].rsplit("/", 1)[-1] for c in (*default, *longer)]
  assert names == ["tune_mae_lr4e-3_nomix", "ft_mae_s0", "tune_mae_e6_lr4e-3_nomix",
                   "ft_mae_e30_s0"]
  assert "--config.optimizer.warmup_epochs=0.5" in default[0]  # the 3-epoch proxy's
  assert not any("warmup" in a for a in default[1])  # the config's 1.5 of 15 epochs
  assert "--config.num_epochs=6" in longer[0] and "--config.num_epochs=30" in longer[1]
  # Warmup a tenth of the run, as the 15-epoch config has.
  assert "--config.optimizer.warmup_epochs=0.6" in longer[0]
  assert "--config.optimizer.warmup_epochs=3.0" in longer[1]


@pytest.mark.parametrize("status,code,says", [(75, 75, "stopped by SIGTERM"),
                                               (3, 1, "failed (exit 3)")])
def test_results_script_stops_at_a_run_that_did_not_finish(tmp_path, status, code, says):
  """A preempted run (exit 75) or a failed one stops the script at that run, with its time so
  far kept for the resumed run, instead of going on as if it had finished."""
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  calls = tmp_path / "main_calls.log"
  out = _bash(RESULTS, str(tmp_path / "root"), env=dict(
      stub_env, MAIN_CALLS=str(calls), MAIN_STATUS=str(status), SECTIONS="pretrain_mae probe_mae"))
  assert out.returncode == code, out.stdout + out.stderr
  assert f"mae_e50 {says}" in out.stdout
  assert len(calls.read_text().splitlines()) == 1  # the probe did not start
  assert (tmp_path / "root" / "mae_e50.seconds").read_text().strip().isdigit()


@pytest.mark.parametrize("env,args,says", [
    ({"SECTIONS": "finetune_mached"}, (), "SECTIONS: unknown 'finetune_mached'"),
    ({"SEEDS": "0 one"}, (), "SEEDS: 'one' is not an integer seed"),
    ({"LOWLABEL": "10"}, (), "LOWLABEL: '10' is not PERCENT:EPOCHS"),
    ({"LOWLABEL": "1:held-out", "LOWLABEL_TUNE": "10:30,120"}, (),
     "LOWLABEL: '1:held-out' needs the lengths to choose from at 1% in LOWLABEL_TUNE"),
    ({"LOWLABEL_TUNE": "1:60;240"}, (), "LOWLABEL_TUNE: '1:60;240' is not PERCENT:EPOCHS,"),
    ({"STUDY_MASKINGS": "random"}, (), "STUDY_MASKINGS: unknown 'random'"),
    ({"TARGETS": "pixels hogg"}, (), "TARGETS: unknown 'hogg'"),
    ({"TUNE_POINTS": "lr4e-3_nomix lr4e-3_ra"}, (), "TUNE_POINTS: unknown 'lr4e-3_ra'"),
    ({"SEEDS": " "}, (), "SEEDS: empty"),
    ({"SKLEARN_MATCHED": "yes"}, (), "SKLEARN_MATCHED=yes: 1 (run) or 0"),
    ({"METHODS": "simmim mea"}, (), "METHODS: unknown 'mea'"),
    ({"METHOD_STEPS": "pretrain fit"}, (), "METHOD_STEPS: unknown 'fit'"),
    ({}, ("--help",), "usage: [SECTIONS=... SEEDS=... ...] bash docs/fmnist_results.sh [ROOT]"),
    ({}, ("a", "b"), "usage:"),
])
def test_results_script_refuses_settings_that_would_run_nothing(tmp_path, env, args, says):
  """A misspelt section, a seed or low-label entry that is not one, or an option / extra
  argument would run nothing (or something else) and end with success: refused, nothing run."""
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  calls = tmp_path / "main_calls.log"
  out = _bash(RESULTS, *(args or (str(tmp_path / "root"),)),
              env=dict(stub_env, MAIN_CALLS=str(calls), **env))
  assert out.returncode == 2 and says in out.stderr, out.stdout + out.stderr
  assert not calls.exists() and not (tmp_path / "root").exists()


@pytest.mark.parametrize("interpreter", ["python", "python3"])
def test_a_sigterm_to_the_results_script_reaches_its_run_and_nothing_outlives_it(tmp_path,
                                                                                 interpreter):
  """The run gets the script's SIGTERM (it writes a checkpoint and exits 75, here a stand-in
  that does the same), and the script stops with 75: before, the script died alone and the
  run went on unseen. Also where only python3 exists (a wrapper function run in the background
  would be a subshell that the signal stops alone)."""
  stub = """
if [ "$1 $2" = "-m mim_jax.main" ]; then
  trap 'echo stopped > "$STUB_PID.term"; exit 75' TERM
  echo $$ > "$STUB_PID.tmp" && mv "$STUB_PID.tmp" "$STUB_PID"
  while :; do sleep 0.1; done
fi
exec %s "$@"
""" % sys.executable
  env = dict(_fake_bin(tmp_path, interpreter, stub), STUB_PID=str(tmp_path / "pid"),
             SECTIONS="pretrain_mae")
  if interpreter == "python3":  # a machine whose Python answers only to python3
    env["PATH"] = f"{tmp_path / 'bin'}:/usr/bin:/bin"
  script = subprocess.Popen(["bash", str(RESULTS), str(tmp_path / "root")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 30
    while not (tmp_path / "pid").exists() and time.time() < deadline:
      time.sleep(0.1)
    run_pid = int((tmp_path / "pid").read_text())
    script.send_signal(signal.SIGTERM)
    out, _ = script.communicate(timeout=30)
    time.sleep(0.2)
    alive = _alive(run_pid)
  finally:
    script.kill()
    if (tmp_path / "pid").exists() and _alive(int((tmp_path / "pid").read_text())):
      os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)  # no stand-in left behind
  assert not alive, "the run outlived the script"
  assert script.returncode == 75 and "mae_e50 stopped by SIGTERM" in out, out
  assert (tmp_path / "pid.term").read_text().strip() == "stopped"


def test_results_script_keeps_a_killed_run_s_time_so_far(tmp_path):
  """A SIGKILL gives the script no chance to write NAME.seconds at the end: the time so far is
  written as it goes (every SECONDS_EVERY seconds), and the writer stops with the script."""
  stub = """
if [ "$1 $2" = "-m mim_jax.main" ]; then
  echo $$ > "$STUB_PID.tmp" && mv "$STUB_PID.tmp" "$STUB_PID"
  while :; do sleep 0.1; done
fi
exec %s "$@"
""" % sys.executable
  env = dict(_fake_bin(tmp_path, "python", stub), STUB_PID=str(tmp_path / "pid"),
             SECTIONS="pretrain_mae", SECONDS_EVERY="1")
  root = tmp_path / "root"
  command = ["bash", str(RESULTS), str(root)]
  script = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 30
    while not (root / "mae_e50.seconds").exists() and time.time() < deadline:
      time.sleep(0.1)
    time.sleep(1.5)
    script.kill()
    script.wait(timeout=10)
    seconds = int((root / "mae_e50.seconds").read_text())
    time.sleep(2)  # the writer notices within SECONDS_EVERY

    def same_command(pid: str) -> bool:
      try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1] == [
            c.encode() for c in command]
      except OSError:
        return False
    writers = [pid for pid in os.listdir("/proc") if pid.isdigit() and same_command(pid)]
  finally:
    if (tmp_path / "pid").exists() and _alive(int((tmp_path / "pid").read_text())):
      os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)  # no stand-in left behind
  assert seconds >= 2
  assert not writers, "the time writer outlived the script"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


def test_results_script_command_lines_are_valid_configs(tmp_path, monkeypatch):
  """The real pre-training and k-NN command lines load and pass the unread-field checks
  (monitor on and off)."""
  monkeypatch.chdir(REPO)
  for knn_every in ("5", "0"):
    root = tmp_path / f"knn{knn_every}"
    root.mkdir()
    calls = _results_calls(root, RESULTS, SECTIONS="pretrain_mae probe_mae",
                           KNN_EVERY=knn_every)
    assert ("--config.knn.every_epochs=5" in calls[0]) == (knn_every == "5")
    for call in calls:
      _unread_settings(call)


def test_gpu_results_script_sets_the_device_flags(tmp_path, monkeypatch):
  """Every run gets the device flags and the Ti/4 encoder, pre-training its own checkpoint and
  picture intervals, and the tuning grid leaves out its RandAugment points (host-only
  augmentation, refused beside data.augment_on='device') and runs at the full length."""
  from absl import flags

  from mim_jax import main, registry
  monkeypatch.chdir(REPO)
  calls = _results_calls(tmp_path, GPU_RESULTS, SECTIONS="pretrain_mae tune_scratch",
                         PARALLEL="0")
  assert len(calls) == 6  # MAE, then the grid's five points without RandAugment
  assert "--config.num_epochs=100" in calls[0]
  assert "--config.checkpoint_every=2000" in calls[0] and "--config.viz_every=2000" in calls[0]
  assert not any("checkpoint_every" in a for call in calls[1:] for a in call)
  for call in calls:
    for flag in ("--config.model.dtype=bfloat16", "--config.data.augment_on=device",
                 "--config.data.device_resident=True", "--config.model.variant=Ti/4",
                 "--config.model.width=0"):
      assert flag in call
    _unread_settings(call)
    flag_values = flags.FlagValues()
    argv = ["mim_jax.main", *call]
    main.define_flags(flag_values, argv)
    flag_values(argv)
    file_config = files.load_config_file(flag_values["config"].config_filename)
    registry.validate_config(flag_values.config, file_config)  # all static checks pass
  for call in calls[1:]:
    assert "--config.num_epochs=15" in call and call[-1].split("/")[-1].startswith(
        "tune_scratch_e15_")


def test_gpu_results_script_runs_its_waves_side_by_side_in_order(tmp_path):
  """SECTIONS=all, PARALLEL (default): the runs of a wave at once, waves in order: MAE; its
  probe alone; both grids; fine-tuning per seed from the held-out choices; the other methods'
  pre-training, then their fine-tuning; then, one at a time, the baselines' probes and the
  methods'. VARIANT="" keeps the demo ViT."""
  (tmp_path / "root").mkdir()
  (tmp_path / "root" / "sklearn_pixels.json").write_text("{}")  # the baselines' CPU minutes
  calls = _results_calls(tmp_path, GPU_RESULTS, SECTIONS="all", SEEDS="1", VARIANT="",
                         TUNE_POINTS="lr4e-3_nomix", METHODS="simmim beit")
  names = [call[-1].rsplit("/", 1)[1] for call in calls]
  waves = [{"mae_e100"}, {"probe_mae_e100"},
           {"tune_mae_e15_lr4e-3_nomix", "tune_scratch_e15_lr4e-3_nomix"},
           {"ft_mae_s1", "ft_scratch_s1"},
           {"simmim_e30", "beit_tokenizer", "beit_e30"}, {"ft_simmim_s0", "ft_beit_s0"},
           # the probes one at a time
           {"probe_pixels"}, {"probe_random"}, {"knn_pixels_holdout"}, {"probe_simmim_e30"},
           {"probe_beit_e30"}]
  start = 0
  for wave in waves:
    assert set(names[start:start + len(wave)]) == wave, names
    start += len(wave)
  assert start == len(names)
  assert names.index("beit_tokenizer") < names.index("beit_e30")  # in one job, in order
  assert not any("variant" in a for call in calls for a in call)
  # The random encoder of the baselines has the pre-trained one's size, here Ti/4.
  (tmp_path / "ti" / "root").mkdir(parents=True)
  (tmp_path / "ti" / "root" / "sklearn_pixels.json").write_text("{}")
  calls = _results_calls(tmp_path / "ti", GPU_RESULTS, SECTIONS="baselines")
  probe_random = [call for call in calls if call[-1].endswith("/probe_random")][0]
  assert "--config.model.variant=Ti/4" in probe_random
  _unread_settings(probe_random[:-1])
  # The raw-pixel k-NN on the held-out split, the line of docs/plot_knn_curve.py.
  (knn_pixels,) = [call for call in calls if call[-1].endswith("/knn_pixels_holdout")]
  assert "--config.data.eval_split=holdout" in knn_pixels
  _unread_settings(knn_pixels[:-1])


def test_gpu_results_script_default_is_the_eight_minute_run(tmp_path):
  """No SECTIONS: MAE pre-training, its probe, then fine-tuning per seed with the recorded
  held-out choice of the Ti/4 grid (lr 2e-3, no Mixup/CutMix); a grid that runs chooses
  instead; without a recorded choice (another VARIANT) it is refused before anything runs."""
  calls = _results_calls(tmp_path, GPU_RESULTS, SEEDS="0 1")
  names = [call[-1].rsplit("/", 1)[1] for call in calls]
  assert names[:2] == ["mae_e100", "probe_mae_e100"]
  assert sorted(names[2:]) == ["ft_mae_s0", "ft_mae_s1"]
  for call in calls[2:]:
    assert call[-4:-1] == ["--config.optimizer.base_lr=0.002",
                           "--config.classifier.mixup_alpha=0",
                           "--config.classifier.cutmix_alpha=0"], call
  (tmp_path / "grid").mkdir()
  calls = _results_calls(tmp_path / "grid", GPU_RESULTS, SEEDS="0", PARALLEL="0",
                         SECTIONS="tune_mae finetune_mae", TUNE_POINTS="lr4e-3_nomix")
  assert [call[-1].rsplit("/", 1)[1] for call in calls] == ["tune_mae_e15_lr4e-3_nomix",
                                                           "ft_mae_s0"]
  assert "--config.optimizer.base_lr=0.004" in calls[1]
  # A grid finished in ROOT (by an earlier call) chooses, not the recorded choice.
  calls = _results_calls(tmp_path / "grid", GPU_RESULTS, SEEDS="1", SECTIONS="finetune_mae",
                         TUNE_POINTS="lr4e-3_nomix")[2:]
  assert [call[-1].rsplit("/", 1)[1] for call in calls] == ["ft_mae_s1"]
  assert "--config.optimizer.base_lr=0.004" in calls[0]
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  # No grid here, in ROOT or recorded (another variant); a grid in ROOT that misses a point of
  # TUNE_POINTS (pick would refuse it after the waves before).
  for env, grid in (({"VARIANT": ""}, "tune_mae"),
                    ({"VARIANT": "S/4", "SECTIONS": "finetune_scratch"}, "tune_scratch"),
                    ({"VARIANT": "", "SECTIONS": "finetune_mae",
                      "TUNE_POINTS": "lr4e-3_nomix lr2e-3_nomix"}, "tune_mae")):
    root = tmp_path / "grid" / "root" if "TUNE_POINTS" in env else tmp_path / "none"
    out = _bash(GPU_RESULTS, str(root),
                env=dict(stub_env, MAIN_CALLS=str(tmp_path / "none.log"), **env))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"fine-tunes with the choice of {grid}, which neither runs" in out.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.log").exists()
  # The header's try-out on a CPU: its TUNE_EPOCHS does not matter without a grid.
  (tmp_path / "try").mkdir()
  calls = _results_calls(tmp_path / "try", GPU_RESULTS, PARALLEL="0", MAE_EPOCHS="1",
                         FT_EPOCHS="1", TUNE_EPOCHS="1", SEEDS="0")
  assert [call[-1].rsplit("/", 1)[1] for call in calls] == ["mae_e1", "probe_mae_e1",
                                                           "ft_mae_e1_s0"]


def test_gpu_results_script_methods_are_valid_device_command_lines(tmp_path, monkeypatch):
  """The methods' pre-training runs get the device flags and the Ti/4 encoder, and pass every
  static check of their method (BEiT's and MaskDistill's those that need no trained tokenizer
  or teacher); iBOT's multi-crop moves its augmentation back to the host."""
  from absl import flags

  from mim_jax import main, registry
  monkeypatch.chdir(REPO)
  (tmp_path / "root" / "mae_e100" / "encoder").mkdir(parents=True)  # MaskDistill's teacher
  (tmp_path / "root" / "mae_e100" / "encoder" / "model.json").write_text("{}")
  calls = _results_calls(tmp_path, GPU_RESULTS, SECTIONS="methods", PARALLEL="0")
  pretrain = {call[-1].rsplit("/", 1)[1]: call for call in calls
              if call[-1].endswith("_e30") and not call[-1].rsplit("/", 1)[1].startswith("probe")}
  assert sorted(pretrain) == sorted(f"{m}_e30" for m in (
      "maskfeat", "beit", "simmim", "data2vec", "ibot", "data2vec2", "maskdistill"))
  assert pretrain["ibot_e30"][-4:-1] == ["--config.data.augment_on=host",
                                         "--config.data.device_resident=False",
                                         "--config.data.num_workers=8"]
  for name, call in pretrain.items():
    assert "--config.model.variant=Ti/4" in call and "--config.num_epochs=30" in call, name
    assert "--config.data.device_resident=True" in call, name
    # Pictures every 2,000 steps where the method draws them (data2vec, iBOT, data2vec 2.0 don't).
    assert ("--config.viz_every=2000" in call) == (name not in (
        "data2vec_e30", "ibot_e30", "data2vec2_e30")), name
    _unread_settings(call)
    if name in ("beit_e30", "maskdistill_e30"):
      continue  # their full checks open the trained tokenizer / teacher, absent here
    flag_values = flags.FlagValues()
    argv = ["mim_jax.main", *call]
    main.define_flags(flag_values, argv)
    flag_values(argv)
    file_config = files.load_config_file(flag_values["config"].config_filename)
    registry.validate_config(flag_values.config, file_config)


def test_gpu_results_script_reports_a_failed_run(tmp_path):
  """A run that fails fails its wave and the script (exit 1, the wave named), while the later
  waves still run what they can."""
  stub_env = _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable)
  out = _bash(GPU_RESULTS, str(tmp_path / "root"), timeout=180, env=dict(
      stub_env, MAIN_CALLS=str(tmp_path / "calls.log"), MAIN_STATUS="1",
      SECTIONS="pretrain_mae tune_scratch", TUNE_POINTS="lr4e-3_nomix"))
  assert out.returncode == 1, out.stdout + out.stderr
  assert "wave pretrain: a job failed" in out.stdout and "wave tune: a job failed" in out.stdout
  assert "exit 1" in out.stdout


def test_gpu_results_script_passes_a_sigterm_to_every_run_of_a_wave(tmp_path):
  """A SIGTERM to the script reaches each run of the wave under way (each stops with its
  checkpoint, exit 75 here), the script exits 75, and no later wave starts."""
  stub = _fake_bin(tmp_path, "python", """
if [ "$1 $2" = "-m mim_jax.main" ]; then
  echo started >> "$STARTED"
  trap 'echo stopped >> "$STARTED"; exit 75' TERM
  sleep 60 & wait
  exit 0
fi
exec %s "$@"
""" % sys.executable)
  started = tmp_path / "started.log"
  proc = subprocess.Popen(
      ["bash", str(GPU_RESULTS), str(tmp_path / "root")], cwd=REPO, text=True,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      env=dict(stub, STARTED=str(started), SECTIONS="tune_mae tune_scratch finetune_scratch",
               TUNE_POINTS="lr4e-3_nomix", VARIANT=""))
  deadline = time.time() + 120
  while time.time() < deadline and (not started.exists()
                                    or started.read_text().count("started") < 2):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 75, out
  assert started.read_text().split() == ["started"] * 2 + ["stopped"] * 2, out
  assert "wave finetune" not in out


@pytest.mark.parametrize("env,says", [
    ({"SECTIONS": "pretrain_mae lowlabel"}, "SECTIONS: 'lowlabel' is not one of"),
    ({"SECTIONS": "methods", "METHODS": "simmim linprobe"}, "METHODS: unknown 'linprobe'"),
    ({"SECTIONS": "methods", "METHOD_STEPS": "pretrain fit"}, "METHOD_STEPS: unknown 'fit'"),
    ({"SECTIONS": "methods", "METHODS": " "}, "METHODS: empty"),
    ({"SECTIONS": "  "}, "SECTIONS: blank"),
    ({"SECTIONS": "methods", "METHODS": "simmim maskdistill"},
     "MaskDistill distils the MAE encoder"),
])
def test_gpu_results_script_refuses_what_it_would_not_run(tmp_path, env, says):
  """A section it does not run, a method or step that is none, MaskDistill without its MAE
  teacher (neither run first nor finished in ROOT): refused before anything ran."""
  out = _bash(GPU_RESULTS, str(tmp_path / "root"), env=dict(os.environ, **env))
  assert out.returncode == 2 and says in out.stderr, out.stderr
  assert not (tmp_path / "root").exists()


def test_gpu_results_script_runs_the_method_steps_asked_for(tmp_path):
  """METHOD_STEPS picks the methods' waves: here their probes alone (their encoders finished)."""
  calls = _results_calls(tmp_path, GPU_RESULTS, SECTIONS="methods", METHODS="simmim data2vec",
                         METHOD_STEPS="probe")
  assert [call[-1].rsplit("/", 1)[1] for call in calls] == ["probe_simmim_e30",
                                                           "probe_data2vec_e30"]
  # VIZ_EVERY="" leaves the configs' picture interval (no flag), SECTIONS with blanks around.
  (tmp_path / "viz").mkdir()
  calls = _results_calls(tmp_path / "viz", GPU_RESULTS, SECTIONS=" methods ", METHODS="simmim",
                         METHOD_STEPS="pretrain", VIZ_EVERY="")
  assert len(calls) == 1 and not any("viz_every" in a for a in calls[0])


def test_results_script_sets_the_picture_interval_of_the_methods_that_draw(tmp_path):
  """VIZ_EVERY alone: the script asks which methods' configs draw (SimMIM does, data2vec not);
  DRAWING_METHODS (docs/fmnist_gpu.sh sets it) answers instead."""
  for env, drawn in (({}, {"simmim_e30"}), ({"DRAWING_METHODS": "data2vec"}, {"data2vec_e30"})):
    (tmp_path / str(len(env))).mkdir()
    calls = _results_calls(tmp_path / str(len(env)), RESULTS, SECTIONS="methods",
                           METHODS="simmim data2vec", METHOD_STEPS="pretrain", VIZ_EVERY="7",
                           **env)
    assert {c[-1].rsplit("/", 1)[1] for c in calls if "--config.viz_every=7" in c} == drawn
  # The GPU script asks once for all its jobs, MAE's pre-training among them; a list left in
  # the caller's environment is not used.
  (tmp_path / "gpu").mkdir()
  calls = _results_calls(tmp_path / "gpu", GPU_RESULTS, SECTIONS="pretrain_mae methods",
                         METHODS="simmim data2vec", METHOD_STEPS="pretrain", VIZ_EVERY="7",
                         DRAWING_METHODS="data2vec")
  assert {c[-1].rsplit("/", 1)[1] for c in calls if "--config.viz_every=7" in c} == {
      "mae_e100", "simmim_e30"}


def test_results_script_runs_the_study_under_both_maskings(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="study")
  names = [c[-1].rsplit("/", 1)[-1] for c in calls]
  targets = ["pixels", "norm_pixels", "hog", "tokens", "teacher_features"]
  expected = ["knn_pixels"]  # the table's raw-pixel line
  for suffix in ("", "_random75"):
    for target in targets:
      if target == "tokens" and not suffix:
        expected.append("beit_tokenizer")  # trained once, before its first reader
      expected += [f"study_{target}{suffix}", f"knn_study_{target}{suffix}"]
  assert names == expected
  for call, name in zip(calls, names):
    if name.startswith("study_"):
      masking = "random75" if name.endswith("_random75") else "blockwise"
      assert call[0].endswith(f",masking={masking}"), call
    if name.startswith("study_teacher"):
      assert f"--config.target.teacher.path={tmp_path}/root/mae_e50" in call
    _unread_settings(call)  # every command line is a config the run reads in full


def test_results_script_fine_tunes_each_seed_with_the_held_out_choice(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="tune_mae finetune_mae", SEEDS="0 1")
  names = [c[-1].rsplit("/", 1)[-1] for c in calls]
  # The five points of the recorded choice, not the grid's later additions (which compare
  # with a chosen point when named in TUNE_POINTS): a rerun chooses as the record did.
  assert names == [f"tune_mae_{s}" for s in (
      "lr1e-3", "lr2e-3", "lr1e-3_nomix", "lr2e-3_nomix", "lr4e-3_nomix")] + [
          "ft_mae_s0", "ft_mae_s1"]
  for seed, call in enumerate(calls[5:]):
    # Every grid point scored 0.5 on the held-out split: the tie goes to the first.
    assert "--config.optimizer.base_lr=0.001" in call and "--config.num_epochs=15" in call
    assert "--config.classifier.mixup_alpha=0" not in call  # lr1e-3, not lr1e-3_nomix
    assert f"--config.seed={seed}" in call
    assert f"--config.init_from={tmp_path}/root/mae_e50" in call
    assert not any("holdout" in a for a in call)  # the final runs are scored on test
  for call in calls:
    _unread_settings(call)
  # A grid point that scores best on the held-out split is the choice (not the first point).
  (tmp_path / "root" / "tune_mae_lr4e-3_nomix" / "results.json").write_text(
      '{"eval_accuracy": 0.6}')
  later = _results_calls(tmp_path, RESULTS, SECTIONS="finetune_mae", SEEDS="2")[len(calls):]
  assert [c[-1].rsplit("/", 1)[-1] for c in later] == ["ft_mae_s2"]
  assert "--config.optimizer.base_lr=0.004" in later[0]
  assert "--config.classifier.mixup_alpha=0" in later[0]


def test_results_script_every_section_is_a_valid_command_line(tmp_path, monkeypatch):
  """Every run of the sections not covered above (scratch tuning and fine-tuning, low labels,
  the other methods at 30 epochs, the masking-ratio sweep, the 3-epoch distillation rows, the
  VQ-KD codebook comparison, BEiT beside BEiT v2's patch aggregation)
  loads and passes the unread-field checks; finetune_matched reads a real pre-training run
  (tests/test_results_tools.py)."""
  monkeypatch.chdir(REPO)
  calls = _results_calls(
      tmp_path, RESULTS, SEEDS="0",
      SECTIONS="tune_scratch tune_mae finetune_mae finetune_scratch lowlabel methods ratio "
               "distill codebook aggregation")
  names = [c[-1].rsplit("/", 1)[-1] for c in calls]
  for expected in ("ft_scratch_s0", "ft_mae_labels1_s0", "ft_scratch_labels10_s0",
                   "beit_tokenizer", "ibot_e30", "probe_ibot_e30", "ft_ibot_s0", "data2vec2_e30",
                   "ft_maskdistill_s0", "mae_e50_r0.9", "ft_mae_r0.5_s0", "knn_maskdistill_e3",
                   "vqkd_tokenizer", "knn_beit_vqkd_e3", "vqkd_tokenizer_norm_ema"):
    assert expected in names, names
  teacher = f"--config.teacher.path={tmp_path}/root/mae_e50"
  for name in ("maskdistill_e30", "maskdistill_e3", "vqkd_tokenizer", "vqkd_tokenizer_norm_ema"):
    assert teacher in calls[names.index(name)], name
  for name, fraction, epochs in (("ft_mae_labels1_s0", "0.01", "60"),
                                 ("ft_scratch_labels10_s0", "0.1", "30")):
    call = calls[names.index(name)]  # the subset's epochs, not the 15-epoch recipe's
    assert f"--config.data.label_fraction={fraction}" in call
    assert f"--config.num_epochs={epochs}" in call and "--config.num_epochs=15" not in call
  beit_vqkd = calls[names.index("beit_vqkd_e3")]
  assert f"--config.tokenizer.path={tmp_path}/root/vqkd_tokenizer" in beit_vqkd
  # BEiT v2: the same run with the aggregation and exact counts; BEiT's run is distill's row
  # (the aggregation section skips it, finished with the same settings).
  assert names.count("beit_vqkd_e3") == 1
  beit2 = calls[names.index("beit2_vqkd_e3")]
  assert beit2[:len(beit_vqkd) - 1] == beit_vqkd[:-1]
  assert beit2[len(beit_vqkd) - 1:-1] == ["--config.patch_aggregation.from_block=4",
                                          "--config.masking.exact_count=True"]
  for name in ("knn_beit2_vqkd_e3", "probe_beit2_vqkd_e3", "probe_beit_vqkd_e3"):
    assert name in names, names
  for call in calls:
    _unread_settings(call)


def test_results_script_attentive_probe_takes_each_init_its_held_out_lr(tmp_path, monkeypatch):
  """The attentive section: each init's lr grid on the held-out split, then that init's final
  run with its own choice, on every training image and scored on the test split."""
  monkeypatch.chdir(REPO)
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="attentive",
                         RANDOM_ENCODER_FLAGS="--config.model.variant=Ti/4")
  names = [c[-1].rsplit("/", 1)[-1] for c in calls]
  assert names == [f"tune_attentive_mae_lr{lr}" for lr in ("1e-3", "2e-3", "4e-3")] + [
      "attentive_mae"] + [f"tune_attentive_random_lr{lr}" for lr in ("1e-3", "2e-3", "4e-3")] + [
      "attentive_random"]
  for name, call in zip(names, calls):
    assert call[0] == "--config=configs/attentive_probe_fmnist.py"
    assert ("--config.data.eval_split=holdout" in call) == name.startswith("tune_"), call
    assert ("--config.model.variant=Ti/4" in call) == ("random" in name), call
    _unread_settings(call)
  assert f"--config.init_from={tmp_path}/root/mae_e50" in calls[3]
  assert "--config.init_from=random" in calls[7]
  # Ties (every stand-in run scores 0.5) go to the first lr; a better one is chosen per init.
  assert "--config.optimizer.base_lr=1e-3" in calls[3]
  (tmp_path / "root" / "tune_attentive_random_lr2e-3" / "results.json").write_text(
      '{"eval_accuracy": 0.6}')
  for name in ("attentive_mae", "attentive_random"):
    shutil.rmtree(tmp_path / "root" / name)
  later = _results_calls(tmp_path, RESULTS, SECTIONS="attentive",
                         RANDOM_ENCODER_FLAGS="--config.model.variant=Ti/4")[len(calls):]
  assert "--config.optimizer.base_lr=1e-3" in later[0]
  assert "--config.optimizer.base_lr=2e-3" in later[1]


def test_results_script_low_label_rows_of_one_init(tmp_path, monkeypatch):
  """LOWLABEL_INITS=scratch runs the scratch rows alone: they need no pre-trained encoder, so
  they can run while (or without) the MAE checkpoint that the MAE rows read."""
  monkeypatch.chdir(REPO)
  calls = _results_calls(tmp_path, RESULTS, SECTIONS="tune_scratch lowlabel", SEEDS="0 1",
                         LOWLABEL="10:30", LOWLABEL_INITS="scratch")
  names = [c[-1].rsplit("/", 1)[-1] for c in calls]
  assert [n for n in names if not n.startswith("tune_")] == [
      "ft_scratch_labels10_s0", "ft_scratch_labels10_s1"]
  assert not any("init_from" in a for call in calls for a in call)
  out = _bash(RESULTS, str(tmp_path / "root2"),
              env=dict(os.environ, SECTIONS="lowlabel", LOWLABEL_INITS="mae,scratch"))
  assert out.returncode == 2 and "LOWLABEL_INITS: unknown 'mae,scratch'" in out.stderr


def test_results_script_chooses_each_init_its_low_label_length_on_the_held_out_split(
    tmp_path, monkeypatch):
  """tune_lowlabel runs each init at each length of LOWLABEL_TUNE on the held-out split (with
  its own lr / Mixup choice), and 2x the longest while the longest wins (up to
  LOWLABEL_MAX_STEPS); LOWLABEL PERCENT:held-out then fine-tunes each init at the length that
  won for it (a tie to the shorter), the length in the run's name unless it is the
  fixed-length rows' own (1:60, 10:30), whose runs are the same."""
  monkeypatch.chdir(REPO)
  env = dict(SEEDS="0", LOWLABEL_TUNE="1:60,240", CHOSEN_tune_mae="lr4e-3_nomix",
             CHOSEN_tune_scratch="lr2e-3_nomix")
  tunes = _results_calls(tmp_path, RESULTS, SECTIONS="tune_lowlabel", **env)
  names = [c[-1].rsplit("/", 1)[-1] for c in tunes]
  assert names == ["tune_labels1_mae_e60", "tune_labels1_mae_e240", "tune_labels1_scratch_e60",
                   "tune_labels1_scratch_e240"]
  for call, epochs in zip(tunes, ("60", "240", "60", "240")):
    assert "--config.data.label_fraction=0.01" in call and "--config.data.holdout=5000" in call
    assert "--config.data.eval_split=holdout" in call
    assert f"--config.num_epochs={epochs}" in call
    assert f"--config.optimizer.warmup_epochs={int(epochs) / 10}" in call
  assert "--config.optimizer.base_lr=0.004" in tunes[0] and "--config.init_from" in tunes[0][1]
  assert "--config.optimizer.base_lr=0.002" in tunes[2] and not any(
      "init_from" in a for a in tunes[2])
  _unread_settings(tunes[1])
  _unread_settings(tunes[3])
  # Scratch gains from the longer run on the held-out split; MAE ties (the stand-in's 0.5).
  # Its best length is the grid's longest, so the choice waits for 2x it (480 epochs).
  (tmp_path / "root" / "tune_labels1_scratch_e240" / "results.json").write_text(
      '{"eval_accuracy": 0.6, "step": 480}')
  out = _bash(RESULTS, str(tmp_path / "root"), env=dict(
      _fake_bin(tmp_path, "python", _MAIN_STUB % sys.executable), SECTIONS="lowlabel",
      LOWLABEL="1:held-out", MAIN_CALLS=str(tmp_path / "refused.log"), **env), timeout=180)
  assert out.returncode == 1 and ("so 480 epochs run next (tune_labels1_scratch_e480, the "
                                  "tune_lowlabel section)") in out.stderr
  assert not (tmp_path / "refused.log").exists()  # nothing ran
  # Capped: 2x 480 steps is more than LOWLABEL_MAX_STEPS, so 240 stays the choice, at the edge.
  capped = _results_calls(tmp_path, RESULTS, SECTIONS="tune_lowlabel", LOWLABEL_MAX_STEPS="959",
                          **env)
  assert len(capped) == len(tunes)
  extended = _results_calls(tmp_path, RESULTS, SECTIONS="tune_lowlabel", **env)[len(tunes):]
  assert [c[-1].rsplit("/", 1)[-1] for c in extended] == ["tune_labels1_scratch_e480"]
  assert "--config.num_epochs=480" in extended[0] and "--config.data.holdout=5000" in extended[0]
  tunes += extended  # the stand-in scores 480 epochs 0.5: 240 is inside the grid, chosen
  finals = _results_calls(tmp_path, RESULTS, SECTIONS="lowlabel", LOWLABEL="1:held-out",
                          **env)[len(tunes):]
  assert [c[-1].rsplit("/", 1)[-1] for c in finals] == ["ft_mae_labels1_s0",
                                                        "ft_scratch_labels1_e240_s0"]
  assert "--config.num_epochs=60" in finals[0]
  # The fixed-length row of the same init and length is that run: it is not run again.
  again = _results_calls(tmp_path, RESULTS, SECTIONS="lowlabel", LOWLABEL="1:60",
                         LOWLABEL_INITS="mae", **env)
  assert len(again) == len(tunes) + len(finals)
  assert "--config.num_epochs=240" in finals[1] and "--config.seed=0" in finals[1]
  assert not any("holdout" in a for call in finals for a in call)  # scored on test
  _unread_settings(finals[1])


# --- docs/gpu_benchmarks.sh and docs/cpu_levers.sh ---------------------------------------------

@pytest.mark.parametrize("env,args,says", [
    ({"VITB": "configs/beit_vitb.py"}, ("OUT",), "VITB=configs/beit_vitb.py: an MAE config"),
    ({"LOOP_STEPS": "3"}, ("OUT",), "LOOP_STEPS=3: an integer >= 6"),
    ({}, ("--help",), "usage: [VITB=... BUDGET=... ...] bash docs/gpu_benchmarks.sh [OUT]"),
])
def test_gpu_benchmark_script_refuses_settings_it_would_misapply(tmp_path, env, args, says):
  """Row 3 times VITB's simmim_ / maskfeat_ siblings (another name timed the same config
  twice under their names), row 4 logs every LOOP_STEPS / 6 steps; an option is no OUT."""
  args = tuple(str(tmp_path / a) if a == "OUT" else a for a in args)
  out = _bash(REPO / "docs" / "gpu_benchmarks.sh", *args, env=dict(os.environ, **env))
  assert out.returncode == 2 and says in out.stderr, out.stderr
  assert not (tmp_path / "OUT").exists()


def test_cpu_lever_script_exits_with_the_number_of_failed_levers(tmp_path):
  """A lever that fails is named and counted in the exit status (it was only the last one's)."""
  env = _fake_bin(tmp_path, "python", "exit 3")
  out = _bash(REPO / "docs" / "cpu_levers.sh", str(tmp_path / "out"), env=env)
  assert out.returncode == 6 and out.stderr.count(" failed: see ") == 6, out.stderr
  assert not list((tmp_path / "out").glob("*.jsonl"))
