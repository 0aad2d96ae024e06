#!/usr/bin/env bash
# Runs mim_jax.main on a Cloud TPU VM (one or many hosts): create, install, run, delete.
#
# Usage:
#   bash launch/tpu_vm.sh --name=NAME --zone=ZONE --accelerator=TYPE --workdir=DIR \
#       --config=CONFIG [--version=RUNTIME] [--project=P] [--queued] [--spot] \
#       [--log=FILE] [--keep] [--dry-run] [-- extra mim_jax.main flags]
#
# Example:
#   bash launch/tpu_vm.sh --name=mae-vitl --zone=us-central2-b --accelerator=v4-32 \
#       --workdir=gs://BUCKET/mae_vitl --config=configs/mae_vitl.py --queued --spot \
#       -- --config.data.tfds_data_dir=/mnt/shared/tfds --config.model.dtype=bfloat16
#
# --version: the TPU software (runtime) version; by default the one Google gives for JAX on the
# accelerator's generation: v2-alpha-tpuv6e (v6e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite
# (v5e: v5litepod-N), tpu-ubuntu2204-base (v4 and older).
#
# Steps, each a gcloud command:
#   1. create the TPU VM (`tpu-vm create`), or with --queued a queued resource
#      (`queued-resources create`) and wait until it is ACTIVE;
#   2. copy this checkout (tracked and untracked, not ignored, files) to ~/mim_jax on every
#      worker and install `jax[tpu]` and the package there (`--worker=all`);
#   3. run `python3 -m mim_jax.main --config=CONFIG --workdir=DIR [extra flags]` on every
#      worker at once (`--worker=all`), streaming the output to FILE (default
#      logs/tpu-NAME-<time>.log); MIM_JAX_DISTRIBUTED=1 makes every worker start
#      jax.distributed, which finds the other workers through the TPU metadata;
#   4. delete the TPU VM (or the queued resource), also after a failure or Ctrl-C, unless --keep.
#      A Ctrl-C or SIGTERM while training first sends SIGTERM to the training on every worker
#      (its process id is in ~/mim_jax.pid there) and waits for it to exit (the trainer writes
#      a checkpoint at the next step boundary and exits 75), so neither the delete nor --keep
#      leaves a run without its latest checkpoint or a run still training on a kept VM.
# DIR must be reachable from every worker (one checkpoint directory for all of them); CONFIG
# is a path relative to the repository root. --dry-run prints the commands in order and runs
# nothing.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

name="" zone="" accelerator="" version="" workdir="" config="" project=""
log_file="" queued=0 spot=0 keep=0 dry_run=0
extra=()
while (($#)); do
  refuse_empty_value "$1"
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --log=*) log_file="${1#*=}" ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage; die "unknown argument '$1' (flags for mim_jax.main go after --)" ;;
  esac
  shift
done

refuse_launcher_flags ${extra[@]+"${extra[@]}"}
[[ -n "$name" ]] || die "--name is required (the TPU VM's name)"
[[ -n "$zone" ]] || die "--zone is required (e.g. us-central2-b)"
[[ -n "$accelerator" ]] || die "--accelerator is required (e.g. v4-32)"
if [[ -z "$version" ]]; then
  # The software version Google documents for JAX on each TPU generation (cloud.google.com/tpu/
  # docs/runtimes): the v4 image does not create v5e, v5p or v6e slices.
  case "$accelerator" in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
[[ -n "$workdir" ]] || die "--workdir is required (a directory every worker reaches, e.g. gs://...)"
[[ -n "$config" ]] || die "--config is required (e.g. configs/mae_vitb.py)"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || \
  die "--name=$name must be lower-case letters, digits and dashes, starting with a letter"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Checked here, not after minutes of creating and installing: the workers run CONFIG from their
# copy of this checkout, and a relative DIR would be a folder of each worker's own copy,
# deleted with the VM.
[[ "$config" != /* && -f "$repo/${config%%:*}" ]] || \
  die "--config=$config must be a config file of this checkout, relative to its root" \
      "(e.g. configs/mae_vitb.py)"
[[ "$workdir" == gs://* || "$workdir" == /* ]] || \
  die "--workdir=$workdir must be gs://... or an absolute path every worker shares (a relative" \
      "one would lie in each worker's copy of the checkout, deleted with the VM)"
log_file="${log_file:-logs/tpu-${name}-$(date +%Y%m%d-%H%M%S).log}"
common=(--zone="$zone")
[[ -z "$project" ]] || common+=(--project="$project")
remote_dir="mim_jax"  # under the remote user's home
archive="${TMPDIR:-/tmp}/mim_jax-${name}-$$.tar.gz"

# Prints its arguments as one shell line: words with shell-special characters single-quoted.
show() {
  local out="" word prefix sq="'" escaped="'\\''"
  for word in "$@"; do
    if [[ -z "$word" || ! "$word" =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
      prefix=""
      if [[ "$word" =~ ^(--[-A-Za-z0-9_.]+=)(.*)$ ]]; then  # --flag='value'
        prefix="${BASH_REMATCH[1]}" word="${BASH_REMATCH[2]}"
      fi
      word="$prefix'${word//$sq/$escaped}'"
    fi
    out+="${out:+ }$word"
  done
  echo "$out"
}

# Runs a command, or only prints it with --dry-run.
run() {
  if ((dry_run)); then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

if ((queued)); then
  create=(gcloud compute tpus queued-resources create "$name" --node-id="$name"
          --accelerator-type="$accelerator" --runtime-version="$version" "${common[@]}")
  delete=(gcloud compute tpus queued-resources delete "$name" --force --quiet "${common[@]}")
else
  create=(gcloud compute tpus tpu-vm create "$name" --accelerator-type="$accelerator"
          --version="$version" "${common[@]}")
  delete=(gcloud compute tpus tpu-vm delete "$name" --quiet "${common[@]}")
fi
if ((spot)); then
  create+=(--spot)
fi
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" --worker=all "${common[@]}")

install_cmd="set -e; rm -rf ~/${remote_dir} && mkdir -p ~/${remote_dir}"
install_cmd+=" && tar xzf ~/${remote_dir}.tar.gz -C ~/${remote_dir}"
install_cmd+=" && python3 -m pip install -q --upgrade pip"
# The gcs extra: gs:// workdirs (checkpoints, logs and exports written straight to a bucket).
install_cmd+=" && python3 -m pip install -q 'jax[tpu]' ~/${remote_dir}'[gcs]'"

# The training's process id on each worker, written by the training command (the process
# keeps it: `exec`, and mim_jax.main's own re-execution with malloc tunables, replace the
# program, not the process).
pid_file="~/${remote_dir}.pid"
# Stops the training on a worker the way a preemption notice would: SIGTERM, then wait for the
# process to exit (bounded: a checkpoint written to a bucket takes seconds to minutes).
stop_wait_s=600
# A stop sent while the connection is still being made waits a little for the pid to appear.
stop_cmd="[ -e ${pid_file} ] || sleep 15;"
stop_cmd+=" pid=\$(cat ${pid_file} 2>/dev/null) && kill -TERM \"\$pid\" 2>/dev/null || exit 0;"
stop_cmd+=" for _ in \$(seq ${stop_wait_s}); do kill -0 \"\$pid\" 2>/dev/null || exit 0; sleep 1;"
stop_cmd+=" done; echo \"mim_jax.main still running on \$(hostname) after ${stop_wait_s} s\" >&2;"
stop_cmd+=" exit 1"

train_cmd="cd ~/${remote_dir} && echo \$\$ > ${pid_file} && exec env MIM_JAX_DISTRIBUTED=1"
train_cmd+=" PYTHONUNBUFFERED=1 python3 -m mim_jax.main"
train_cmd+=" $(show "--config=$config" "--workdir=$workdir")"
if ((${#extra[@]})); then
  train_cmd+=" $(show "${extra[@]}")"
fi

training_pid=""  # the local end of the training command while it runs
cleanup() {
  local status=$?
  # A second Ctrl-C while the workers stop must not end the script before the delete.
  trap '' INT TERM
  if [[ -n "$training_pid" ]]; then
    echo "stopping the training on every worker (SIGTERM: checkpoint, then exit)" >&2
    run "${ssh_all[@]}" --command="$stop_cmd" ||
      echo "warning: the training on some worker did not confirm its stop" >&2
    # The local stream ends with the workers' processes; give it a minute, then end it.
    for _ in $(seq 60); do
      kill -0 "$training_pid" 2>/dev/null || break
      sleep 1
    done
    pkill -TERM -P "$training_pid" 2>/dev/null || kill -TERM "$training_pid" 2>/dev/null || true
    wait "$training_pid" 2>/dev/null || true
  fi
  if ((keep)); then
    echo "kept $name (delete it with: $(show "${delete[@]}"))" >&2
  else
    run "${delete[@]}" || echo "warning: deleting $name failed; if it was created, delete it" \
                              "by hand" >&2
  fi
  rm -f "$archive"
  exit "$status"
}

# 1. Create. The clean-up is armed first: a Ctrl-C during the minutes a creation takes would
# otherwise leave the VM (or the queued resource) being created, and never deleted. A creation
# that fails by itself (e.g. the name is taken by a VM of another run) deletes nothing.
if ((!dry_run)); then
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi
create_status=0
run "${create[@]}" || create_status=$?
# A creation that ended by SIGINT or SIGTERM (130, 143: a Ctrl-C reaches gcloud too) was
# interrupted, not refused: its VM may exist. Bash may run this script's own trap for the
# signal only after the next commands, so the status decides: exit through the clean-up.
if ((create_status == 130 || create_status == 143)); then
  exit "$create_status"
fi
if ((create_status)); then
  trap - EXIT
  rm -f "$archive"
  exit "$create_status"
fi
if ((queued)); then
  state_cmd=(gcloud compute tpus queued-resources describe "$name" "${common[@]}"
             --format='value(state.state)')
  if ((dry_run)); then
    echo "# repeated until the state is ACTIVE:"
    show "${state_cmd[@]}"
  else
    # A failed status query (a transient API error) is retried: under set -e it ended the
    # script, and the cleanup deleted the queued resource with its place in the queue. Ten
    # failures in a row (about 5 minutes) mean something lasting (credentials, project).
    failures=0 poll=${MIM_JAX_TPU_POLL_SECONDS:-30}
    while :; do
      if ! state="$("${state_cmd[@]}")"; then
        failures=$((failures + 1))
        ((failures < 10)) || die "queued resource $name: its state could not be read 10 times" \
                                 "in a row ($(show "${state_cmd[@]}"))"
        echo "queued resource $name: state query failed ($failures), retrying" >&2
        sleep "$poll"
        continue
      fi
      failures=0
      echo "queued resource $name: $state" >&2
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) die "queued resource $name is $state" ;;
      esac
      sleep "$poll"
    done
  fi
fi

# 2. Copy this checkout and install it on every worker.
if ((dry_run)); then
  echo "$(show git -C "$repo" ls-files -z --cached --others --exclude-standard)" \
       "| $(show tar --null -czf "$archive" -C "$repo" -T -)"
elif git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$repo" ls-files -z --cached --others --exclude-standard |
    tar --null -czf "$archive" -C "$repo" -T -
else
  tar -czf "$archive" -C "$repo" --exclude=.venv --exclude=__pycache__ --exclude=workdirs \
    setup.py README.md mim_jax configs
fi
run gcloud compute tpus tpu-vm scp "$archive" "$name:${remote_dir}.tar.gz" --worker=all \
  "${common[@]}"
run "${ssh_all[@]}" --command="$install_cmd"

# 3. Train on every worker; the output of all workers goes to the console and the local log.
if ((dry_run)); then
  echo "$(show "${ssh_all[@]}" --command="$train_cmd") 2>&1 | tee -a $(show "$log_file")"
  echo "# on Ctrl-C or SIGTERM while it runs: $(show "${ssh_all[@]}" --command="$stop_cmd")"
else
  mkdir -p "$(dirname "$log_file")"
  echo "+ $(show "${ssh_all[@]}" --command="$train_cmd")" >&2
  # In the background and waited for: a signal to this script runs its trap at once (bash
  # defers traps until a foreground command returns). A Ctrl-C in the terminal may end the
  # stream too (gcloud handles SIGINT itself); the trap's stop reaches the workers either way.
  ( "${ssh_all[@]}" --command="$train_cmd" 2>&1 | tee -a "$log_file" ) &
  training_pid=$!
  train_status=0
  wait "$training_pid" || train_status=$?
  training_pid=""
  echo "log: $log_file" >&2
  ((train_status == 0)) || exit "$train_status"
fi

# 4. Delete (on exit, see cleanup), unless --keep.
if ((dry_run)); then
  if ((keep)); then
    echo "# --keep: $name is not deleted"
  else
    show "${delete[@]}"
  fi
fi
