#!/usr/bin/env bash
# The Fashion-MNIST results of docs/results.md on one GPU, in minutes instead of CPU hours: the
# same runs, protocols and hyper-parameter selection as docs/fmnist_results.sh (which this
# calls), with MAE pre-trained MAE_EPOCHS (200) epochs instead of 50, bf16 compute, and the
# training split held on the device with the augmentation there (a grain pipeline feeds about
# 9,000 Fashion-MNIST images/s per process, less than a GPU trains this ViT on). Most important
# first (MAE, its probe and k-NN, the baselines, then tuning and fine-tuning per seed), each
# run writing its results.json as it finishes, so a run cut short keeps what it finished and a
# rerun skips it.
#
#   bash docs/fmnist_gpu.sh [ROOT=workdirs/fmnist_gpu]
#
# On a CPU it runs too (slowly): e.g. MAE_EPOCHS=1 FT_EPOCHS=1 TUNE_EPOCHS=1 SEEDS=0 to try it.
# Its TRAIN_FLAGS suit the default SECTIONS; for `methods` with iBOT drop
# --config.data.augment_on=device and --config.data.device_resident=True from them (iBOT's
# multi-crop views are cut on the host). On a machine without internet or without the Debian
# package, docs/offline_bundle.sh prepares the missing wheels and the Fashion-MNIST files
# (FMNIST_DIR). A SIGTERM or Ctrl-C stops the current run with its checkpoint written (exit 75);
# the same command resumes.
set -u
source "$(dirname "$0")/script_args.sh"
ROOT=$(output_dir "[SECTIONS=... MAE_EPOCHS=... ...] bash docs/fmnist_gpu.sh [ROOT]" \
       workdirs/fmnist_gpu "$@") || exit 2
cd "$(dirname "$0")/.."
# Machines whose Python answers only to python3.
command -v python > /dev/null || python() { python3 "$@"; }
mkdir -p "$ROOT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import jax; print(jax.__version__, jax.devices())"; } > "$ROOT/machine.txt" 2>&1
cat "$ROOT/machine.txt"
start=$SECONDS
export MAE_EPOCHS=${MAE_EPOCHS:-200}
export KNN_EVERY=${KNN_EVERY:-25}
export SEEDS=${SEEDS:-"0 1 2"}
export TRAIN_FLAGS=${TRAIN_FLAGS:-"--config.model.dtype=bfloat16 --config.data.augment_on=device
--config.data.device_resident=True"}
# The grid without its RandAugment points: those run in the host pipeline, which cannot keep up.
export TUNE_POINTS=${TUNE_POINTS:-"lr1e-3 lr2e-3 lr1e-3_nomix lr2e-3_nomix lr4e-3_nomix"}
export SECTIONS=${SECTIONS:-"pretrain_mae probe_mae baselines tune_mae finetune_mae tune_scratch
finetune_scratch"}
# A SIGTERM or Ctrl-C here reaches the script and through it the run (a checkpoint, exit 75).
status=0
run_passing_signals bash docs/fmnist_results.sh "$ROOT" || status=$?
echo "fmnist_gpu: $((SECONDS - start)) s, exit $status" | tee -a "$ROOT/machine.txt"
exit $status
