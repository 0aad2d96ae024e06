#!/usr/bin/env bash
# The Fashion-MNIST results of docs/results.md on one GPU, in minutes instead of CPU hours: the
# same runs, protocols and hyper-parameter selection as docs/fmnist_results.sh (which this
# calls), with a ViT-Ti/4 encoder (VARIANT; "" for the CPU tables' 6-block demo ViT) pre-trained
# by MAE for MAE_EPOCHS (100) epochs instead of 50, bf16 compute, and the training split held on
# the device with the augmentation there (a grain pipeline feeds about 9,000 Fashion-MNIST
# images/s per process, less than a GPU trains this ViT on). The tuning grid runs at the full
# fine-tuning length (TUNE_EPOCHS 15, not the CPU's 3-epoch proxy).
#
# What runs (SECTIONS; a section of docs/fmnist_results.sh each):
#   default   the 8-minute run: MAE pre-training, its probe + k-NN, fine-tuning per seed with
#             the settings the held-out grid chose on 2026-12-04 (CHOSEN_tune_mae, lr2e-3
#             without Mixup/CutMix; docs/results.md), for VARIANT Ti/4. Other variants have
#             no recorded choice: give CHOSEN_tune_mae or run tune_mae. (The recorded
#             choices, MAE's lr2e-3_nomix and scratch's lr1e-3_nomix, are used only where the
#             grid neither runs in this call nor finished in ROOT.)
#   all       every section below: both tuning grids, scratch fine-tuning, the baselines'
#             probes and the other methods (more than one 10-minute call: cut it with
#             SECTIONS, e.g. SECTIONS="tune_mae tune_scratch finetune_scratch")
# A ViT this small leaves one GPU mostly idle, so the training runs go in waves of processes
# side by side (PARALLEL=0: one at a time, as on a CPU), most important first:
#   1. MAE pre-training, alone (k-NN on the held-out split every KNN_EVERY (20) epochs);
#   2. the MAE probe, alone (below: why);
#   3. the tuning grids of MAE and of scratch fine-tuning (one process per point);
#   4. fine-tuning per seed, from MAE and from scratch, with the held-out choices;
#   5. methods: the pre-training of every one of METHODS (PRE_EPOCHS, 30) side by side (BEiT's
#      after its tokenizer; MaskDistill's teacher is the MAE encoder of step 1), then their
#      fine-tuning runs side by side (MAE's held-out choice, as on the CPU);
#   6. one at a time: the baselines (raw-pixel probe, scikit-learn with its defaults, the probe
#      of a random encoder of the same size, the raw-pixel k-NN on the held-out split), then the
#      probes of METHODS.
# The probes run alone: their L-BFGS fits loop on the device, and XLA:GPU reads each loop
# condition on the host: beside other processes each of those round trips waits for the GPU's
# turn (on one H200: fits of 1-6 s while the grid's runs compiled, 18-89 s once they trained).
# On a GPU the probe fits its 26 feature sets (2 pools x 13 blocks of a Ti/4) together, one
# loop per L2 strength instead of 26 (probe.fit_sets, "auto"); not yet timed on a GPU.
# Each run writes its results.json as it finishes, so a run cut short keeps what it finished and
# a rerun skips it. Wall times of runs that shared the GPU are not comparable with the CPU's.
# On one H200 (docs/results.md) pre-training took 263 s and a wave of six fine-tuning runs 205 s
# each: the default run (pre-training, one probe, three fine-tuning runs) fits 8 minutes if the
# probe (never timed alone on a GPU) and the smaller wave take under 217 s together; about 8-9.
#
#   bash docs/fmnist_gpu.sh [ROOT=workdirs/fmnist_gpu]
#
# On a CPU it runs too (slowly): e.g. PARALLEL=0 MAE_EPOCHS=1 FT_EPOCHS=1 SEEDS=0
# to try it. TRAIN_FLAGS replaces the device flags (bf16, the split and augmentation on the
# device); VARIANT's size flags are added to it either way. On a machine without internet or
# without the Debian package, docs/offline_bundle.sh prepares the missing wheels and the
# Fashion-MNIST files (FMNIST_DIR). A SIGTERM or Ctrl-C stops the current runs with their
# checkpoints written (exit 75); the same command resumes.
set -u
source "$(dirname "$0")/script_args.sh"
ROOT=$(output_dir "[SECTIONS=... MAE_EPOCHS=... PARALLEL=0 ...] bash docs/fmnist_gpu.sh [ROOT]" \
       workdirs/fmnist_gpu "$@") || exit 2
cd "$(dirname "$0")/.."
# Machines whose Python answers only to python3.
command -v python > /dev/null || python() { python3 "$@"; }
start=$SECONDS
export MAE_EPOCHS=${MAE_EPOCHS:-100}
export KNN_EVERY=${KNN_EVERY:-20}
export TUNE_EPOCHS=${TUNE_EPOCHS:-15}
SEEDS=${SEEDS:-"0 1 2"}
PARALLEL=${PARALLEL:-1}
VARIANT=${VARIANT-Ti/4}
# The published size replaces the demo ViT's explicit width/depth/heads/MLP (0: the variant's).
size=""
[ -n "$VARIANT" ] && size="--config.model.variant=$VARIANT --config.model.width=0
--config.model.depth=0 --config.model.num_heads=0 --config.model.mlp_dim=0"
export TRAIN_FLAGS="${TRAIN_FLAGS-"--config.model.dtype=bfloat16 --config.data.augment_on=device
--config.data.device_resident=True"} $size"
export RANDOM_ENCODER_FLAGS=${RANDOM_ENCODER_FLAGS-$size}
# A checkpoint and a picture every 200 steps (the CPU recipe's) would stall a GPU step of a few
# milliseconds: every 2,000 instead.
export PRETRAIN_FLAGS=${PRETRAIN_FLAGS:-"--config.checkpoint_every=2000"}
# The grid without its RandAugment points: those run in the host pipeline, which cannot keep up.
export TUNE_POINTS=${TUNE_POINTS:-"lr1e-3 lr2e-3 lr1e-3_nomix lr2e-3_nomix lr4e-3_nomix"}
GPU_SECTIONS="pretrain_mae probe_mae tune_mae tune_scratch finetune_mae finetune_scratch baselines
methods"
SECTIONS=$(echo ${SECTIONS:-default})  # one line, single spaces
[ "$SECTIONS" = default ] && SECTIONS="pretrain_mae probe_mae finetune_mae"
[ "$SECTIONS" = all ] && SECTIONS=$(echo $GPU_SECTIONS)
[ -n "$SECTIONS" ] || { echo "SECTIONS: blank (unset for the default run, or all, or some of:" \
    $GPU_SECTIONS")" >&2; exit 2; }
GPU_SECTIONS=$(echo $GPU_SECTIONS)
export VIZ_EVERY=${VIZ_EVERY-2000}  # "": the configs' own picture interval
# iBOT's multi-crop views are cut in the host pipeline (data.augment_on='host'), about 1,200
# images/s per grain worker (`python -m mim_jax.bench --config=configs/ibot_fmnist.py --feed` on
# the 2-core CPU VM): 8 workers of the host's cores, the other runs of the wave holding their
# split on the device.
export FLAGS_ibot=${FLAGS_ibot-"--config.data.augment_on=host --config.data.device_resident=False
--config.data.num_workers=8"}
export PRE_EPOCHS=${PRE_EPOCHS:-30}
# scikit-learn's fit of the probe's own problem (baselines) takes about 20 CPU minutes and
# cannot resume: it stays out of a device call (run it on a CPU with docs/fmnist_results.sh).
export SKLEARN_MATCHED=${SKLEARN_MATCHED:-0}
ALL_METHODS=$FMNIST_METHODS
METHODS=${METHODS:-$ALL_METHODS}
METHOD_STEPS=${METHOD_STEPS:-"pretrain probe finetune"}
# Side by side, each process takes the GPU memory it uses, not JAX's default 75% of it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
[[ $PARALLEL =~ ^[01]$ ]] || { echo "PARALLEL=$PARALLEL: 1 (side by side) or 0" >&2; exit 2; }
for seed in $SEEDS; do
  [[ $seed =~ ^[0-9]+$ ]] || { echo "SEEDS: '$seed' is not an integer seed" >&2; exit 2; }
done
for section in $SECTIONS; do  # a section this script does not run would be skipped unsaid
  listed "$GPU_SECTIONS" "$section" || { echo "SECTIONS: '$section' is not one of this" \
      "script's (default, all, or of: $GPU_SECTIONS); run docs/fmnist_results.sh with" \
      "TRAIN_FLAGS for the others" >&2
      exit 2; }
done
# A job's settings are words: each method and step one of the known.
# shellcheck disable=SC2086
{ each_one_of METHODS "$ALL_METHODS" $METHODS
  each_one_of METHOD_STEPS "pretrain probe finetune" $METHOD_STEPS; }

# Fine-tuning reads its grid's choice: the grid in SECTIONS, its finished runs in ROOT (every
# point of TUNE_POINTS), or a recorded choice: for VARIANT Ti/4 those of the 2026-12-04 grids
# (docs/results.md: MAE lr2e-3_nomix, scratch lr1e-3_nomix), used only where neither of the
# others is there. Else the fine-tuning wave would fail after the minutes of those before it.
has_section() { listed "$SECTIONS" "$1"; }
tune_tag="_e$TUNE_EPOCHS"  # as docs/fmnist_results.sh names the grid's runs
[ "$TUNE_EPOCHS" = 3 ] && tune_tag=""
grid_in_root() {  # GRID: every point of TUNE_POINTS finished in ROOT
  local point
  for point in $TUNE_POINTS; do
    [ -f "$ROOT/$1${tune_tag}_$point/results.json" ] || return 1
  done
}
for grid in tune_mae tune_scratch; do
  chosen="CHOSEN_$grid"
  case $grid in
    tune_mae) readers="finetune_mae methods" recorded=lr2e-3_nomix ;;
    tune_scratch) readers="finetune_scratch" recorded=lr1e-3_nomix ;;
  esac
  has_section "$grid" || grid_in_root "$grid" || [ -n "${!chosen:-}" ] && continue
  if [ "$VARIANT" = Ti/4 ]; then
    export "$chosen=$recorded"
    continue
  fi
  for reader in $readers; do
    # methods fine-tunes only with METHOD_STEPS' finetune
    [ "$reader" = methods ] && ! listed "$METHOD_STEPS" finetune && continue
    if has_section "$reader"; then
      echo "SECTIONS: $reader fine-tunes with the choice of $grid, which neither runs (add" \
           "$grid to SECTIONS) nor finished in ROOT, and VARIANT '$VARIANT' has no recorded" \
           "choice (set $chosen, e.g. $recorded)" >&2
      exit 2
    fi
  done
done
# MaskDistill distils the MAE encoder of pretrain_mae: it runs first or has finished in ROOT.
MAE_DIR="$ROOT/mae_e$MAE_EPOCHS"
if has_section methods && listed "$METHODS" maskdistill \
    && listed "$METHOD_STEPS" pretrain && ! has_section pretrain_mae \
    && [ ! -f "$MAE_DIR/encoder/model.json" ]; then
  echo "SECTIONS: methods' MaskDistill distils the MAE encoder $MAE_DIR, which neither runs" \
       "(add pretrain_mae to SECTIONS) nor finished" >&2
  exit 2
fi

# Which pre-trained methods draw pictures (VIZ_EVERY applies to them), asked once for every
# job; MAE's pre-training asks it too.
unset DRAWING_METHODS
if [ -n "$VIZ_EVERY" ] && { has_section pretrain_mae \
    || { has_section methods && listed "$METHOD_STEPS" pretrain; }; }; then
  DRAWING_METHODS=$(drawing_methods mae $METHODS) || exit 1
  export DRAWING_METHODS
fi
mkdir -p "$ROOT/jobs"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python -c "import jax; print(jax.__version__, jax.devices())"; } > "$ROOT/machine.txt" 2>&1
cat "$ROOT/machine.txt"

# wave LABEL JOB...: each JOB ("SECTIONS=<section> VAR=value ...", settings of
# docs/fmnist_results.sh) runs as its own docs/fmnist_results.sh, all at once (PARALLEL=1) or
# one after another; its output goes to ROOT/jobs/LABEL.N.out. A SIGTERM or Ctrl-C reaches
# every job (each stops its run with a checkpoint). Returns 75 if stopped, 1 if a job failed.
STOPPED=0
wave() {
  local label=$1 job first pids=() status=0 n=0 pid
  shift
  trap 'STOPPED=1; for pid in "${pids[@]}"; do kill -TERM "$pid" 2> /dev/null; done' TERM INT
  for job in "$@"; do
    ((STOPPED)) && break
    first=${job%% *}
    listed "$SECTIONS" "${first#SECTIONS=}" || continue
    n=$((n + 1))
    echo "wave $label.$n: $job"
    # shellcheck disable=SC2086
    env $job bash docs/fmnist_results.sh "$ROOT" < /dev/null > "$ROOT/jobs/$label.$n.out" 2>&1 &
    pids+=($!)
    ((STOPPED)) && kill -TERM "$!" 2> /dev/null  # a signal between the start and the line above
    if [ "$PARALLEL" = 0 ]; then
      wait_for_exit "$!" || status=$?
    fi
  done
  if [ "$PARALLEL" = 1 ]; then
    for pid in "${pids[@]}"; do wait_for_exit "$pid" || status=$?; done
  fi
  trap - TERM INT
  ((STOPPED)) && return 75
  [ "$status" = 0 ] || { echo "wave $label: a job failed (ROOT/jobs/$label.*.out)"; return 1; }
}

tune_jobs=() ft_jobs=() method_jobs=() method_ft_jobs=() probe_jobs=("SECTIONS=baselines")
for point in $TUNE_POINTS; do
  tune_jobs+=("SECTIONS=tune_mae TUNE_POINTS=$point" "SECTIONS=tune_scratch TUNE_POINTS=$point")
done
for seed in $SEEDS; do
  ft_jobs+=("SECTIONS=finetune_mae SEEDS=$seed" "SECTIONS=finetune_scratch SEEDS=$seed")
done
for method in $METHODS; do
  listed "$METHOD_STEPS" pretrain \
      && method_jobs+=("SECTIONS=methods METHODS=$method METHOD_STEPS=pretrain")
  listed "$METHOD_STEPS" finetune \
      && method_ft_jobs+=("SECTIONS=methods METHODS=$method METHOD_STEPS=finetune")
  listed "$METHOD_STEPS" probe \
      && probe_jobs+=("SECTIONS=methods METHODS=$method METHOD_STEPS=probe")
done
status=0
for step in 1 2 3 4 5 6 7; do
  case $step in
    1) wave pretrain "SECTIONS=pretrain_mae" ;;
    2) wave probe_mae "SECTIONS=probe_mae" ;;
    3) wave tune "${tune_jobs[@]}" ;;
    4) wave finetune "${ft_jobs[@]}" ;;
    5) wave methods "${method_jobs[@]}" ;;
    6) wave methods_finetune "${method_ft_jobs[@]}" ;;
    7) PARALLEL=0 wave probes "${probe_jobs[@]}" ;;
  esac
  code=$?
  [ "$code" = 0 ] || status=$code
  [ "$code" = 75 ] && break  # stopped: what is left resumes with the same command
done
python docs/fmnist_tools.py summary "$ROOT" > "$ROOT/summary.txt" 2>&1 && cat "$ROOT/summary.txt"
echo "fmnist_gpu: $((SECONDS - start)) s, exit $status" | tee -a "$ROOT/machine.txt"
exit $status
