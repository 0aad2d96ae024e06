#!/usr/bin/env bash
# Submits a multi-node GPU run of mim_jax.main to SLURM: one task per GPU.
#
# Usage:
#   bash launch/slurm.sh --nodes=N --gpus-per-node=G --workdir=DIR --config=CONFIG \
#       [--partition=P] [--time=HH:MM:SS] [--account=A] [--job-name=NAME] [--python=BIN] \
#       [--cpus-per-task=C] [--requeue[=SECONDS]] [--dry-run] [-- extra mim_jax.main flags]
#
# Example:
#   bash launch/slurm.sh --nodes=2 --gpus-per-node=8 --workdir=/shared/ckpt/mae_vitl \
#       --config=configs/mae_vitl.py --partition=gpu --time=48:00:00 \
#       -- --config.data.tfds_data_dir=/shared/tfds --config.model.dtype=bfloat16
#
# Every task sees all GPUs of its node and drives GPU number SLURM_LOCALID: that is what JAX's
# SLURM detection (which starts jax.distributed in mim_jax.main, no flags needed) expects, so
# the job asks for --gpus-per-node rather than --gpus-per-task. DIR must be on a file system
# that every node shares; the sbatch script and the job's output go to DIR/logs/. The job runs
# in this checkout with the `python` (or --python) found at submission time: activate the
# environment first; before submitting, that interpreter parses the command line (a mistyped
# flag or config field is named before the queue). --config and --workdir are this script's
# (refused after --, as are the distributed flags SLURM's detection sets). --dry-run prints
# the sbatch script and the sbatch command, and submits nothing.
#
# --cpus-per-task=C: the cores each GPU's process gets (SLURM's default is one, which its JAX
# host threads and data.num_workers decoding processes then share on a node with CPU limits);
# srun is given the same (SRUN_CPUS_PER_TASK: since Slurm 22.05 it does not inherit sbatch's).
#
# --requeue[=SECONDS] (default 120) makes a run longer than --time, or one preempted, go on by
# itself: SLURM sends SIGTERM that many seconds before the time limit (--signal), every
# process saves a checkpoint at the same step and exits 75, and the job requeues itself
# (scontrol requeue); the requeued job resumes from that checkpoint. Any other exit ends it.
# With --requeue, srun runs with --kill-on-bad-exit=0: with 1, the first task's 75 would have
# srun kill the tasks still exiting, and srun reports a killed task's signal before an exit
# code, so the job would end without requeueing. Each task stops by itself instead (all at the
# same step after the notice; a process lost on the way stops the others, exit 5: at once on
# CPU, after JAX's heartbeat timeout (100 s) on GPU), and srun's status is their 75. Tested with stub srun / scontrol only; the checkpoint
# is written either way, and the same command resumes it.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

nodes="" gpus_per_node="" workdir="" config="" partition="" time_limit="" account=""
job_name="mim_jax" python_bin="python" dry_run=0 requeue="" cpus_per_task=""
extra=()
while (($#)); do
  refuse_empty_value "$1"
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus_per_node="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --job-name=*) job_name="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --cpus-per-task=*) cpus_per_task="${1#*=}" ;;
    --requeue) requeue=120 ;;
    --requeue=*) requeue="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage; die "unknown argument '$1' (flags for mim_jax.main go after --)" ;;
  esac
  shift
done

refuse_launcher_flags ${extra[@]+"${extra[@]}"}
[[ -n "$nodes" ]] || die "--nodes is required (number of nodes)"
[[ -n "$gpus_per_node" ]] || die "--gpus-per-node is required (GPUs on each node)"
[[ -n "$workdir" ]] || die "--workdir is required (a directory on a file system all nodes share)"
[[ -n "$config" ]] || die "--config is required (e.g. configs/mae_vitb.py)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes=$nodes must be a positive integer"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node=$gpus_per_node must be a positive integer"
[[ "$job_name" =~ ^[^[:space:]]+$ ]] || die "--job-name='$job_name' must be one word (no spaces)"
if [[ -n "$cpus_per_task" && ! "$cpus_per_task" =~ ^[1-9][0-9]*$ ]]; then
  die "--cpus-per-task=$cpus_per_task must be a positive integer (cores per GPU process)"
fi
if [[ -n "$requeue" && ! "$requeue" =~ ^[1-9][0-9]*$ ]]; then
  die "--requeue=$requeue must be a positive number of seconds (the warning before the time limit)"
fi
if [[ -n "$time_limit" && ! "$time_limit" =~ ^([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}$ ]]; then
  die "--time=$time_limit must look like HH:MM:SS or D-HH:MM:SS"
fi

[[ "$workdir" != *%* ]] || die "--workdir=$workdir: SLURM reads % in the output path as a \
filename pattern (%j, %x, ...): choose a path without %"
[[ "$workdir" != *://* ]] || die "--workdir=$workdir must be a path on a file system every node \
shares (the job's sbatch script and output go under it; gs:// workdirs are for launch/tpu_vm.sh)"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Absolute paths: the job runs from the repository root, wherever sbatch was called.
[[ "$workdir" = /* ]] || workdir="$PWD/$workdir"
config_file="${config%%:*}"
if [[ "$config_file" != /* && -e "$PWD/$config_file" ]]; then
  config="$PWD/$config"
elif [[ "$config_file" != /* && -f "$repo/$config_file" ]]; then
  : # relative to the repository root, where the job starts
elif [[ ! -f "$config_file" ]]; then
  die "--config=$config: no such file here or in $repo (checked before the job waits in the queue)"
fi

# The interpreter found now (e.g. the activated environment's) is the one the job runs, by an
# absolute path: the job starts in the repository root, not here.
found="$(command -v "$python_bin")" || die "--python=$python_bin: not found (activate the \
environment, or give the interpreter's path)"
[[ "$found" = /* ]] || found="$PWD/$found"
python_bin="$found"
logs="$workdir/logs"
script_path="$logs/submit-$(date +%Y%m%d-%H%M%S).sbatch"
quoted_extra=""
if ((${#extra[@]})); then
  quoted_extra=" $(printf '%q ' "${extra[@]}")"
  quoted_extra="${quoted_extra% }"
fi

requeue_tail="" kill_on_bad_exit=1
if [[ -n "$requeue" ]]; then
  kill_on_bad_exit=0  # each task stops by itself, and srun reports their 75 (header)
  # 75: every process saved the checkpoint of one step after SIGTERM (mim_jax run_errors).
  requeue_tail=' && status=0 || status=$?
if [[ $status -eq 75 ]]; then
  echo "stopped by SIGTERM with a checkpoint written: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit $status'
fi

sbatch_script() {
  cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=${job_name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${gpus_per_node}
#SBATCH --gpus-per-node=${gpus_per_node}
EOF
  [[ -z "$partition" ]] || echo "#SBATCH --partition=${partition}"
  [[ -z "$time_limit" ]] || echo "#SBATCH --time=${time_limit}"
  [[ -z "$account" ]] || echo "#SBATCH --account=${account}"
  [[ -z "$cpus_per_task" ]] || echo "#SBATCH --cpus-per-task=${cpus_per_task}"
  if [[ -n "$requeue" ]]; then
    echo "#SBATCH --requeue"
    echo "#SBATCH --signal=TERM@${requeue}"
  fi
  cat <<EOF
# ${nodes} node(s) x ${gpus_per_node} task(s) = $((nodes * gpus_per_node)) processes, one per GPU: every task sees its
# node's GPUs and JAX's SLURM detection gives it GPU number SLURM_LOCALID.
set -euo pipefail
cd $(printf '%q' "$repo")
export PYTHONUNBUFFERED=1${cpus_per_task:+
export SRUN_CPUS_PER_TASK=${cpus_per_task}}
srun --label --kill-on-bad-exit=${kill_on_bad_exit} $(printf '%q' "$python_bin") -m mim_jax.main \\
    --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")${quoted_extra}${requeue_tail}
EOF
}

if ((dry_run)); then
  echo "# sbatch script ($script_path):"
  sbatch_script
  echo "# command:"
  echo "sbatch --output=$(printf '%q' "$logs/%x-%j.out") $(printf '%q' "$script_path")"
  exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
# Found out now, not after the job's wait in the queue: the job's interpreter must run mim_jax
# from the repository, and its command line must parse (flags, config fields, their values).
(cd "$repo" && "$python_bin" -c "import mim_jax.main" >/dev/null 2>&1) || die "--python=\
$python_bin cannot import mim_jax.main in $repo (activate the environment mim_jax is installed \
in, or give its interpreter with --python): the job would fail after its wait in the queue"
(cd "$repo" && "$python_bin" - "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"} \
    <<'PY'
import sys
from absl import flags
from mim_jax import main
argv = ["mim_jax.main", *sys.argv[1:]]
flag_values = flags.FlagValues()
main.define_flags(flag_values, argv)
main.parse_flags(argv, flag_values)  # a bad flag: its `error:` line, exit 2
PY
) || exit 2
mkdir -p "$logs"
sbatch_script >"$script_path"
echo "wrote $script_path"
# On the command line, not as an #SBATCH line: sbatch splits those at spaces (a workdir with a
# space in its path would be refused after the script was written).
sbatch --output="$logs/%x-%j.out" "$script_path"
echo "output: $logs/${job_name}-<jobid>.out"
