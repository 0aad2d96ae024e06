#!/usr/bin/env bash
# Reproduces the Fashion-MNIST results of docs/results.md. Every run's log, wall time
# (ROOT/NAME.seconds), arguments (ROOT/NAME.args) and results.json land under ROOT; re-running
# skips finished runs (a finished run asked for with other arguments stops the script instead),
# and an interrupted run resumes from its last checkpoint. SECTIONS picks what runs, in order:
#
#   pretrain_mae  MAE, MAE_EPOCHS (50) epochs, k-NN on the held-out split every 5 epochs
#   baselines     probe + k-NN of raw pixels and of a random encoder; scikit-learn's logistic
#                 regression on the same pixels (the reference the probe is held to), with its
#                 defaults and with the pixel probe's L2 strength (SKLEARN_MATCHED, 1; 0 skips
#                 this one); the k-NN of raw pixels on the held-out split (the line beside the
#                 k-NN curves)
#   probe_mae     probe + k-NN of the MAE encoder (cls and mean-pooled tokens; every probe of an
#                 encoder reads the block chosen per pool on the held-out split)
#   tune_scratch  fine-tuning lr x Mixup/CutMix on the held-out split (TUNE_EPOCHS (3) epochs,
#   tune_mae      a proxy for the full length): from scratch, and from the MAE encoder
#   finetune_mae  for each of SEEDS: FT_EPOCHS (15) of fine-tuning with the chosen settings:
#   finetune_scratch  from MAE, from scratch, and from scratch for as many more epochs as MAE
#   finetune_matched  pre-training cost in model FLOPs (docs/fmnist_tools.py matched_epochs;
#                 MATCHED_EPOCHS, a number of epochs, instead)
#   tune_lowlabel for each init of LOWLABEL_INITS, the length of its low-label fine-tuning
#                 chosen on the held-out split (LOWLABEL_TUNE, percent:epochs,epochs,...,
#                 default "1:60,240,960 10:30,120"; each init keeps its lr / Mixup choice).
#                 While the longest length wins, LOWLABEL_EXTEND (2) x it runs too, if that
#                 run takes at most LOWLABEL_MAX_STEPS (10240) steps: the grid extends until
#                 the best length is inside it (so a grid of one length always grows;
#                 LOWLABEL_EXTEND=1: never). lowlabel picks with the same two settings
#   lowlabel      for each of SEEDS: 1% and 10% of the labels, MAE vs scratch (LOWLABEL,
#                 percent:epochs, "1:60 10:30", the same length for both inits; or
#                 percent:held-out, each init at the length tune_lowlabel chose for it, the
#                 length in the run's name; LOWLABEL_INITS, "mae scratch", which inits)
#   methods       METHODS (maskfeat beit simmim data2vec ibot data2vec2 maskdistill) for
#                 PRE_EPOCHS (30) epochs with the same monitoring, then probe + k-NN and one
#                 fine-tuning run; MaskDistill distils the MAE encoder of pretrain_mae.
#                 METHOD_STEPS (pretrain probe finetune) picks which of the three run (the
#                 GPU script runs the pre-training of every method side by side, then the rest)
#   probe_finetuned  probe + k-NN of the encoder of the fine-tuning run FINETUNED
#                 (ft_maskdistill_s0, of methods; skipped if it has not finished): features
#                 trained with every label, which put the probe target (random encoder + 10)
#                 in scale
#   distill       the 3-epoch rows of the feature-distillation methods beside the other
#                 3-epoch rows: MaskDistill (teacher: the MAE encoder), BEiT v2's VQ-KD
#                 tokenizer (same teacher), BEiT reading it; k-NN on the test split of each
#   aggregation   BEiT reading distill's VQ-KD tokenizer (3 epochs, as there) beside BEiT v2's
#                 stage 2 (the same run with patch aggregation: the last block's [CLS] beside
#                 block 4's patches through 2 blocks; masks topped up to exactly 19 patches):
#                 k-NN and probe of each, cls and mean-pooled; one pair per seed of SEEDS
#   codebook      the VQ-KD tokenizer of distill (VQ-VAE's codebook EMA, restarts) beside the
#                 same run with BEiT v2's release codebook (codebook_update=norm_ema, 10 k-means
#                 iterations on the first batch, no restarts): loss, cosine and code usage
#   attentive     the attentive probe (configs/attentive_probe_fmnist.py, ATTENTIVE_EPOCHS (10)
#                 epochs) of the MAE encoder of pretrain_mae and of a random encoder, each with
#                 its lr of ATTENTIVE_LRS (1e-3 2e-3 4e-3) chosen on the held-out split, then
#                 trained on every training image and scored once on the test split
#   ratio         MAE at masking ratios 0.5 / 0.6 / 0.9: probe + k-NN + fine-tuning
#   study         the target-level study: configs/mim_fmnist.py with each of TARGETS (pixels
#                 norm_pixels hog tokens teacher_features) for STUDY_EPOCHS (5) epochs, the
#                 same encoder and budget, under each of STUDY_MASKINGS (blockwise: 0.4 of the
#                 grid in blocks; random75: 75% of the patches at random); the teacher is the MAE encoder
#                 of pretrain_mae, the tokenizer BEiT's (as in methods); held-out k-NN at the
#                 end of each run, then k-NN on the test split (table + plot:
#                 python docs/plot_study.py ROOT docs/study_fmnist.png)
#
#   SECTIONS="pretrain_mae probe_mae" bash docs/fmnist_results.sh ROOT
# ROOT (default workdirs/fmnist_results in the repository) is relative to where the command
# runs. A SIGTERM or Ctrl-C is passed on to the current run, which stops with its checkpoint
# written; the script exits 75 and the same command resumes. Unknown SECTIONS, seeds, LOWLABEL
# entries, LOWLABEL_INITS, STUDY_MASKINGS, TARGETS, METHODS or METHOD_STEPS are refused before
# anything runs.
# TRAIN_FLAGS (space-separated --config.x=y) are added to every training run (pre-training,
# tuning, fine-tuning; not the frozen-feature probes), e.g. for a GPU (docs/fmnist_gpu.sh);
# KNN_EVERY (5) sets the epochs between k-NN scores of a pre-training run. PRETRAIN_FLAGS are
# added to the pre-training runs alone (e.g. their checkpoint interval, which fine-tuning
# configs set apart); VIZ_EVERY sets the picture interval of the pre-training runs whose
# method draws pictures (the others have no such field), after PRETRAIN_FLAGS (it wins). RANDOM_ENCODER_FLAGS: the random
# encoder's size when the pre-trained one is not the configs' demo ViT (e.g.
# --config.model.variant=Ti/4 and the explicit sizes at 0), so that the random-encoder probe
# has the same architecture.
# FMNIST_DIR: the Fashion-MNIST files' folder, when not the Debian package's
# /usr/share/datasets/fashion-mnist (e.g. copied to a machine without the package); given to
# every run as --config.data.path, and to the scikit-learn baseline.
# FLAGS_<method> (e.g. FLAGS_ibot) are added last to that method's pre-training in the methods
# section, after TRAIN_FLAGS (the last of a repeated flag wins): e.g. the host augmentation that
# iBOT's multi-crop needs where TRAIN_FLAGS move it to the device.
# TUNE_POINTS (default: DEFAULT_POINTS of docs/fmnist_tools.py, the five points of the recorded
# choice; the grid's later points only when named): the grid points tune_* runs and
# fine-tuning chooses from, e.g. a point recorded earlier beside one added to the grid since.
# CHOSEN_tune_mae / CHOSEN_tune_scratch (e.g. lr4e-3_nomix): a grid point chosen earlier on the
# held-out split and recorded in docs/results.md, used instead of ROOT's tune_* runs (when
# those are gone, not to skip a grid that never ran).
# `python docs/fmnist_tools.py summary ROOT` tabulates every finished run (scores, split, wall
# time) and the seed means +- std.
# Hyper-parameters are chosen on 5,000 held-out training images (data.holdout,
# eval_split=holdout), never on the test set; test numbers come from the final runs only.
set -u
ALL_SECTIONS="pretrain_mae baselines probe_mae tune_scratch tune_mae finetune_mae
finetune_scratch finetune_matched tune_lowlabel lowlabel methods probe_finetuned attentive ratio
distill aggregation codebook study"
source "$(dirname "$0")/script_args.sh"
ROOT=$(output_dir "[SECTIONS=... SEEDS=... ...] bash docs/fmnist_results.sh [ROOT] (settings \
are environment variables, listed at the top of this script)" workdirs/fmnist_results "$@") \
    || exit 2
cd "$(dirname "$0")/.."
# Machines whose Python answers only to python3. The runs start the interpreter itself (PY):
# a background function would be a subshell, and a signal to it would not reach the run.
PY=python
command -v python > /dev/null || { PY=python3; python() { python3 "$@"; }; }
SECTIONS=${SECTIONS:-$ALL_SECTIONS}
ALL_METHODS=$FMNIST_METHODS
METHODS=${METHODS:-$ALL_METHODS}
METHOD_STEPS=${METHOD_STEPS:-"pretrain probe finetune"}
TARGETS=${TARGETS:-"pixels norm_pixels hog tokens teacher_features"}
STUDY_EPOCHS=${STUDY_EPOCHS:-5}
STUDY_MASKINGS=${STUDY_MASKINGS:-"blockwise random75"}
SEEDS=${SEEDS:-"0 1 2"}
MAE_EPOCHS=${MAE_EPOCHS:-50}
PRE_EPOCHS=${PRE_EPOCHS:-30}
FT_EPOCHS=${FT_EPOCHS:-15}
TUNE_EPOCHS=${TUNE_EPOCHS:-3}
KNN_EVERY=${KNN_EVERY:-5}
LOWLABEL=${LOWLABEL:-"1:60 10:30"}
LOWLABEL_TUNE=${LOWLABEL_TUNE:-"1:60,240,960 10:30,120"}
LOWLABEL_INITS=${LOWLABEL_INITS:-"mae scratch"}
LOWLABEL_EXTEND=${LOWLABEL_EXTEND:-2}
LOWLABEL_MAX_STEPS=${LOWLABEL_MAX_STEPS:-10240}
TUNE_POINTS=${TUNE_POINTS:-}
SKLEARN_MATCHED=${SKLEARN_MATCHED:-1}
[[ $SKLEARN_MATCHED =~ ^[01]$ ]] || { echo "SKLEARN_MATCHED=$SKLEARN_MATCHED: 1 (run) or 0" >&2
  exit 2; }
# A length other than the default joins the run names, so that a longer schedule runs beside the
# default one instead of being taken for it (e.g. FT_EPOCHS=30: ft_mae_e30_s0).
FT_TAG="" TUNE_TAG=""
[ "$FT_EPOCHS" = 15 ] || FT_TAG="_e$FT_EPOCHS"
[ "$TUNE_EPOCHS" = 3 ] || TUNE_TAG="_e$TUNE_EPOCHS"
# Split on spaces and newlines alike (fmnist_gpu.sh spreads its flags over lines).
read -r -d '' -a TRAIN <<< "${TRAIN_FLAGS:-}" || true
read -r -d '' -a PRETRAIN <<< "${PRETRAIN_FLAGS:-}" || true
# A misspelt section or seed would run nothing and end with success.
# shellcheck disable=SC2086
each_one_of SECTIONS "$ALL_SECTIONS" $SECTIONS
[ -n "${SEEDS//[[:space:]]/}" ] || { echo "SEEDS: empty (e.g. SEEDS=\"0 1 2\")" >&2; exit 2; }
for seed in $SEEDS; do
  [[ $seed =~ ^[0-9]+$ ]] || { echo "SEEDS: '$seed' is not an integer seed" >&2; exit 2; }
done
for spec in $LOWLABEL_TUNE; do
  [[ $spec =~ ^[0-9]+(\.[0-9]+)?:[0-9]+(,[0-9]+)*$ ]] || { echo "LOWLABEL_TUNE: '$spec' is" \
      "not PERCENT:EPOCHS,EPOCHS,... (e.g. 1:60,240,960)" >&2; exit 2; }
done
for var in LOWLABEL_EXTEND LOWLABEL_MAX_STEPS; do
  [[ ${!var} =~ ^[1-9][0-9]*$ ]] || { echo "$var=${!var}: a positive integer" >&2; exit 2; }
done
tune_lengths() {  # PERCENT: the lengths LOWLABEL_TUNE tries at that fraction, space-separated
  local spec
  for spec in $LOWLABEL_TUNE; do
    [ "${spec%%:*}" = "$1" ] && { echo "${spec#*:}" | tr , ' '; return; }
  done
}
for spec in $LOWLABEL; do
  [[ $spec =~ ^[0-9]+(\.[0-9]+)?:([0-9]+|held-out)$ ]] || { echo "LOWLABEL: '$spec' is not" \
      "PERCENT:EPOCHS (e.g. 1:60) or PERCENT:held-out" >&2; exit 2; }
  [ "${spec#*:}" != held-out ] || [ -n "$(tune_lengths "${spec%%:*}")" ] || { echo "LOWLABEL:" \
      "'$spec' needs the lengths to choose from at ${spec%%:*}% in LOWLABEL_TUNE" \
      "('$LOWLABEL_TUNE')" >&2; exit 2; }
done
# shellcheck disable=SC2086
{ each_one_of LOWLABEL_INITS "mae scratch" $LOWLABEL_INITS
  each_one_of METHODS "$ALL_METHODS" $METHODS
  each_one_of METHOD_STEPS "pretrain probe finetune" $METHOD_STEPS
  each_one_of STUDY_MASKINGS "blockwise random75" $STUDY_MASKINGS
  each_one_of TARGETS "pixels norm_pixels hog tokens teacher_features" $TARGETS; }
# shellcheck disable=SC2086
check=$(python docs/fmnist_tools.py grid --check $TUNE_POINTS 2>&1) \
    || { echo "TUNE_POINTS: $check" >&2; exit 2; }
DATA=()
[ -n "${FMNIST_DIR:-}" ] && DATA=(--config.data.path="$FMNIST_DIR")
mkdir -p "$ROOT"

settings() {  # a run's arguments, one per line, ROOT written as ROOT (a moved ROOT still matches)
  local arg
  for arg in "$@"; do echo "${arg//"$ROOT"/ROOT}"; done
}

finished() {  # NAME: the run's end product is there (docs/fmnist_tools.py finished: its
  # results.json, else its export if it scores nothing); Python only for an export alone.
  local dir=$ROOT/$1
  [ -f "$dir/results.json" ] && return 0
  [ -f "$dir/encoder/model.json" ] || [ -f "$dir/tokenizer/tokenizer.json" ] || return 1
  "$PY" docs/fmnist_tools.py finished "$dir"
}

run() {  # NAME, then the arguments of mim_jax.main
  local name=$1; shift
  local asked
  asked=$(settings "$@")
  if finished "$name"; then
    # A finished run is skipped only if it ran with the settings asked now: else a changed
    # setting (TRAIN_FLAGS, a length, a choice) would be taken as done and never run.
    if [ ! -f "$ROOT/$name.args" ]; then
      # Started by hand, or by this script before it recorded settings: nothing says it ran
      # with the settings asked now, and a skip would take it as their result.
      { echo "$ROOT/$name finished, but $ROOT/$name.args (the settings it ran with) is missing."
        echo "Compare its config.json with the settings asked now; if they agree, keep it with:"
        printf "cat > %q <<'EOF'\n%s\nEOF\n" "$ROOT/$name.args" "$asked"
        echo "Else move it away or use another ROOT."; } >&2
      exit 2
    fi
    if [ "$(cat "$ROOT/$name.args")" != "$asked" ]; then
      { echo "$ROOT/$name finished with other settings than asked now (< then, > now):"
        diff "$ROOT/$name.args" <(echo "$asked")
        echo "Move it away or use another ROOT to run it with the new settings."; } >&2
      exit 2
    fi
    return
  fi
  local args=("$@" "${DATA[@]}" --workdir="$ROOT/$name")
  echo "python -m mim_jax.main ${args[*]}" | tee -a "$ROOT/commands.txt"
  # An interrupted run resumes: its time so far is kept and added to.
  local before=0
  [ -f "$ROOT/$name.seconds" ] && before=$(cat "$ROOT/$name.seconds")
  local start=$SECONDS status=0 ticker
  # The time so far is also written every minute, so a script killed without a chance to write
  # it (SIGKILL) loses at most a minute of it; the writer stops with this script.
  ( trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
      sleep "${SECONDS_EVERY:-60}" & nap=$!
      wait "$nap"; kill -0 $$ 2>/dev/null || exit 0
      echo $((before + SECONDS - start)) > "$ROOT/$name.seconds.tmp" &&
        mv "$ROOT/$name.seconds.tmp" "$ROOT/$name.seconds"
    done ) &
  ticker=$!
  # A SIGTERM or Ctrl-C to this script reaches the run, which writes a checkpoint and exits 75.
  run_passing_signals "$PY" -m mim_jax.main "${args[@]}" >> "$ROOT/$name.log" 2>&1 || status=$?
  kill "$ticker" 2>/dev/null; wait "$ticker" 2>/dev/null
  echo $((before + SECONDS - start)) > "$ROOT/$name.seconds"
  # Stopped on request: a training run exits 75 with its checkpoint written; one stopped before
  # its first step, or an evaluation job (no checkpoint: it starts again), dies of the signal.
  ((STOPPED)) && [ "$status" -gt 128 ] && status=75
  case $status in
    0) echo "$asked" > "$ROOT/$name.args" ;;
    75) echo "$name stopped by SIGTERM (a training run with its checkpoint written): rerun" \
             "to resume"; exit 75 ;;
    *) echo "$name failed (exit $status): see $ROOT/$name.log"; exit 1 ;;
  esac
}

has() { listed "$SECTIONS" "$1"; }
holdout=(--config.data.holdout=5000 --config.data.eval_split=holdout)
pretrain() {  # NAME METHOD EPOCHS [overrides]: pre-training with k-NN on the held-out split
  local name=$1 method=$2 epochs=$3; shift 3
  local monitor=("${holdout[@]}" --config.knn.every_epochs="$KNN_EVERY")
  # KNN_EVERY=0: no monitor, so no split to score (the same 55,000 training images).
  [ "$KNN_EVERY" = 0 ] && monitor=(--config.data.holdout=5000)
  # VIZ_EVERY: the picture interval of the methods that draw (their config has viz_every;
  # DRAWING_METHODS, when set, lists them: docs/fmnist_gpu.sh asks once for all its jobs).
  local pictures=()
  if [ -n "${VIZ_EVERY:-}" ]; then
    local drawing
    drawing=${DRAWING_METHODS-$(drawing_methods "$method")} || exit 1
    listed "$drawing" "$method" && pictures=(--config.viz_every="$VIZ_EVERY")
  fi
  run "$name" --config=configs/${method}_fmnist.py --config.num_epochs="$epochs" \
      --config.optimizer.warmup_epochs="$(python -c "print($epochs / 10)")" \
      "${monitor[@]}" "${TRAIN[@]}" "${PRETRAIN[@]}" "${pictures[@]}" "$@"
}
probe() { run "$1" --config=configs/linprobe_fmnist.py "${@:2}"; }
knn() { run "knn_$1" --config=configs/knn_fmnist.py --config.init_from="$ROOT/$1"; }  # on test
ft() {
  # The config's warmup (1.5 epochs) is a tenth of its 15; other lengths keep that proportion.
  local warmup=()
  [ -n "$FT_TAG" ] \
      && warmup=(--config.optimizer.warmup_epochs="$(python -c "print($FT_EPOCHS / 10)")")
  run "$1" --config=configs/finetune_fmnist.py"${2}" --config.num_epochs="$FT_EPOCHS" \
      "${warmup[@]}" "${TRAIN[@]}" "${@:3}"
}
MAE="$ROOT/mae_e$MAE_EPOCHS"

has pretrain_mae && pretrain "mae_e$MAE_EPOCHS" mae "$MAE_EPOCHS"
if has baselines; then
  probe probe_pixels --config.classifier.features=pixels
  # shellcheck disable=SC2086
  probe probe_random --config.init_from=random ${RANDOM_ENCODER_FLAGS:-}
  # The raw-pixel line beside the pre-training runs' k-NN curves (docs/plot_knn_curve.py).
  run knn_pixels_holdout --config=configs/knn_fmnist.py --config.classifier.features=pixels \
      "${holdout[@]}"
  [ -f "$ROOT/sklearn_pixels.json" ] || python docs/fmnist_tools.py sklearn_pixels \
      "$ROOT/sklearn_pixels.json" "${FMNIST_DIR:-}" || exit 1
  # And on the probe's own problem: the L2 strength it chose on the pixels as scikit-learn's C,
  # run to convergence (about 20 minutes on one core, no resume; SKLEARN_MATCHED=0 skips it),
  # again whenever the probe has chosen another strength since.
  if [ "$SKLEARN_MATCHED" = 1 ]; then
    read_l2='import json, sys; print(json.load(open(sys.argv[1]))["probe_l2_pixels"])'
    pixels_l2=$(python -c "$read_l2" "$ROOT/probe_pixels/results.json") || exit 1
    same_l2='import json, sys; sys.exit(json.load(open(sys.argv[1]))["l2"] != float(sys.argv[2]))'
    python -c "$same_l2" "$ROOT/sklearn_pixels_matched.json" "$pixels_l2" 2> /dev/null \
        || python docs/fmnist_tools.py sklearn_pixels "$ROOT/sklearn_pixels_matched.json" \
            "${FMNIST_DIR:-}" "$pixels_l2" || exit 1
  fi
fi
has probe_mae && probe "probe_mae_e$MAE_EPOCHS" --config.init_from="$MAE"

tune() {  # INIT (scratch | mae): the tuning grid of docs/fmnist_tools.py on the holdout
  local init=$1 suffix flags cfg points tune_warmup
  cfg=(--config=configs/finetune_fmnist.py:scratch)
  [ "$init" = mae ] && cfg=(--config=configs/finetune_fmnist.py --config.init_from="$MAE")
  points=${TUNE_POINTS:-$(python docs/fmnist_tools.py grid)} && [ -n "$points" ] || exit 1
  # Half an epoch for the 3-epoch proxy; a tenth of longer ones, as the fine-tuning runs have.
  tune_warmup=$(python -c "print(max(0.5, $TUNE_EPOCHS / 10))")
  for suffix in $points; do
    flags=$(python docs/fmnist_tools.py grid "$suffix") || exit 1
    # shellcheck disable=SC2086
    run "tune_${init}${TUNE_TAG}_$suffix" "${cfg[@]}" --config.num_epochs="$TUNE_EPOCHS" \
        --config.optimizer.warmup_epochs="$tune_warmup" "${holdout[@]}" "${TRAIN[@]}" $flags
  done
}
has tune_scratch && tune scratch
has tune_mae && tune mae

pick() {  # GRID (tune_mae | tune_scratch): the flags of its best held-out point
  local recorded="CHOSEN_$1"
  if [ -n "${!recorded:-}" ]; then  # a choice docs/results.md records, its grid runs gone
    echo "$1: the recorded choice ${!recorded}" >&2
    python docs/fmnist_tools.py grid "${!recorded}"
    return
  fi
  # shellcheck disable=SC2086
  python docs/fmnist_tools.py pick "$ROOT" "$1$TUNE_TAG" $TUNE_POINTS
}
for seed in $SEEDS; do
  if has finetune_mae; then
    flags=$(pick tune_mae) || exit 1
    # shellcheck disable=SC2086
    ft "ft_mae${FT_TAG}_s$seed" "" --config.init_from="$MAE" --config.seed="$seed" $flags
  fi
  if has finetune_scratch; then
    flags=$(pick tune_scratch) || exit 1
    # shellcheck disable=SC2086
    ft "ft_scratch${FT_TAG}_s$seed" ":scratch" --config.seed="$seed" $flags
  fi
  if has finetune_matched; then
    flags=$(pick tune_scratch) || exit 1
    # From the MAE run's config (its record in docs/curves when the run is not in ROOT);
    # MATCHED_EPOCHS: a count given instead (docs/results.md records 31 and 46).
    matched=${MATCHED_EPOCHS:-}
    [ -n "$matched" ] \
        || matched=$(python docs/fmnist_tools.py matched_epochs "$MAE" "$FT_EPOCHS") || exit 1
    # shellcheck disable=SC2086
    run "ft_scratch_matched${FT_TAG}_s$seed" --config=configs/finetune_fmnist.py:scratch \
        --config.num_epochs="$matched" --config.optimizer.warmup_epochs=3 \
        --config.seed="$seed" "${TRAIN[@]}" $flags
  fi
done

# Epochs over the labelled subset, as in SimCLR's semi-supervised fine-tuning (60 on 1% of
# ImageNet, 30 on 10%): 15 epochs of 600 images would be 35 steps. Each init keeps its lr /
# Mixup chosen on the held-out split with all the labels; warmup is a tenth of the run, as in
# the 15-epoch recipe. The length is either the same for both inits (LOWLABEL PERCENT:EPOCHS)
# or each init's own, chosen on the held-out split (tune_lowlabel, LOWLABEL PERCENT:held-out):
# a randomly initialised ViT may need more steps on 600 images than a pre-trained one.
if has tune_lowlabel || has lowlabel; then
  listed "$LOWLABEL_INITS" mae && { mae_flags=$(pick tune_mae) || exit 1; }
  listed "$LOWLABEL_INITS" scratch && { scratch_flags=$(pick tune_scratch) || exit 1; }
fi
lowlabel_run() {  # NAME INIT PERCENT EPOCHS [ARG...]: fine-tuning on PERCENT% of the labels
  local name=$1 init=$2 pct=$3 epochs=$4
  shift 4
  local low=(--config.data.label_fraction="$(python -c "print($pct / 100)")"
             --config.num_epochs="$epochs"
             --config.optimizer.warmup_epochs="$(python -c "print($epochs / 10)")")
  if [ "$init" = mae ]; then
    # shellcheck disable=SC2086
    run "$name" --config=configs/finetune_fmnist.py --config.init_from="$MAE" "${low[@]}" "$@" \
        "${TRAIN[@]}" $mae_flags
  else
    # shellcheck disable=SC2086
    run "$name" --config=configs/finetune_fmnist.py:scratch "${low[@]}" "$@" "${TRAIN[@]}" \
        $scratch_flags
  fi
}
if has tune_lowlabel; then
  for spec in $LOWLABEL_TUNE; do
    pct=${spec%%:*}
    for init in $LOWLABEL_INITS; do
      for epochs in $(tune_lengths "$pct"); do
        lowlabel_run "tune_labels${pct}_${init}_e$epochs" "$init" "$pct" "$epochs" "${holdout[@]}"
      done
      # The longest length won: LOWLABEL_EXTEND x it next, until the best is inside the grid.
      last=""
      while :; do
        # shellcheck disable=SC2046
        epochs=$(python docs/fmnist_tools.py next_epochs "$ROOT" "tune_labels${pct}_$init" \
            "$LOWLABEL_EXTEND" "$LOWLABEL_MAX_STEPS" $(tune_lengths "$pct")) || exit 1
        [ -n "$epochs" ] || break
        [ "$epochs" != "$last" ] || { echo "tune_labels${pct}_${init}_e$epochs ran but has no" \
            "results.json: see $ROOT/tune_labels${pct}_${init}_e$epochs.log" >&2; exit 1; }
        last=$epochs
        lowlabel_run "tune_labels${pct}_${init}_e$epochs" "$init" "$pct" "$epochs" "${holdout[@]}"
      done
    done
  done
fi
if has lowlabel; then
  for spec in $LOWLABEL; do
    pct=${spec%%:*} epochs=${spec#*:}
    for init in mae scratch; do  # length_<init>, name_<init>: chosen once for every seed
      chosen=$epochs name="ft_${init}_labels${pct}"
      if listed "$LOWLABEL_INITS" "$init" && [ "$epochs" = held-out ]; then
        # shellcheck disable=SC2046
        chosen=$(python docs/fmnist_tools.py pick_length "$ROOT" "tune_labels${pct}_$init" \
            "$LOWLABEL_EXTEND" "$LOWLABEL_MAX_STEPS" $(tune_lengths "$pct")) || exit 1
        # The length in the name, unless it is the fixed length of the default rows (1:60,
        # 10:30): those runs are the same, and finished ones are not run again.
        [ "$pct:$chosen" = 1:60 ] || [ "$pct:$chosen" = 10:30 ] || name="${name}_e$chosen"
      fi
      printf -v "length_$init" %s "$chosen"
      printf -v "name_$init" %s "$name"
    done
    for seed in $SEEDS; do
      for init in mae scratch; do
        listed "$LOWLABEL_INITS" "$init" || continue
        length="length_$init" name="name_$init"
        lowlabel_run "${!name}_s$seed" "$init" "$pct" "${!length}" --config.seed="$seed"
      done
    done
  done
fi

tokenizer() {
  # The same training images (holdout left out); a tokenizer scores no evaluation split and
  # takes no TRAIN_FLAGS (its convolutional model has no dtype or attention settings).
  run beit_tokenizer --config=configs/beit_tokenizer_fmnist.py --config.data.holdout=5000 \
      --config.num_epochs=10 --config.optimizer.warmup_epochs=1
}

method_flags() {  # METHOD: FLAGS_<METHOD> (e.g. FLAGS_ibot), added to its pre-training last
  local var="FLAGS_$1"
  echo "${!var:-}"
}
if has methods; then
  for method in $METHODS; do
    extra=()
    [ "$method" = beit ] && extra=(--config.tokenizer.path="$ROOT/beit_tokenizer")
    [ "$method" = maskdistill ] && extra=(--config.teacher.path="$MAE")
    encoder="$ROOT/${method}_e$PRE_EPOCHS"
    if listed "$METHOD_STEPS" pretrain; then
      # BEiT's stage 1: its tokenizer, trained on the same images.
      [ "$method" = beit ] && tokenizer
      # shellcheck disable=SC2046
      pretrain "${method}_e$PRE_EPOCHS" "$method" "$PRE_EPOCHS" "${extra[@]}" \
          $(method_flags "$method")
    fi
    listed "$METHOD_STEPS" probe && probe "probe_${method}_e$PRE_EPOCHS" \
        --config.init_from="$encoder"
    if listed "$METHOD_STEPS" finetune; then
      flags=$(pick tune_mae) || exit 1
      # shellcheck disable=SC2086
      ft "ft_${method}${FT_TAG}_s0" "" --config.init_from="$encoder" $flags
    fi
  done
fi

# A fine-tuning run exports its classifier (encoder/): its features, probed as any encoder's.
FINETUNED=${FINETUNED:-ft_maskdistill${FT_TAG}_s0}
if has probe_finetuned; then
  if finished "$FINETUNED"; then
    probe "probe_$FINETUNED" --config.init_from="$ROOT/$FINETUNED"
  else
    echo "probe_finetuned: $ROOT/$FINETUNED has not finished (the methods section's" \
         "MaskDistill fine-tuning, or FINETUNED=another fine-tuning run): skipped"
  fi
fi

ATTENTIVE_EPOCHS=${ATTENTIVE_EPOCHS:-10}
ATTENTIVE_LRS=${ATTENTIVE_LRS:-"1e-3 2e-3 4e-3"}
if has attentive; then
  for init in mae random; do
    from=$MAE encoder_flags=()
    # shellcheck disable=SC2206
    [ "$init" = random ] && from=random encoder_flags=(${RANDOM_ENCODER_FLAGS:-})
    attentive=(--config=configs/attentive_probe_fmnist.py --config.init_from="$from"
               --config.num_epochs="$ATTENTIVE_EPOCHS" "${TRAIN[@]}" "${encoder_flags[@]}")
    tuned=()
    for lr in $ATTENTIVE_LRS; do
      run "tune_attentive_${init}_lr$lr" "${attentive[@]}" --config.optimizer.base_lr="$lr" \
          "${holdout[@]}"
      tuned+=("lr$lr")
    done
    best=$(python docs/fmnist_tools.py pick_suffix "$ROOT" "tune_attentive_$init" \
        "${tuned[@]}") || exit 1
    run "attentive_$init" "${attentive[@]}" --config.optimizer.base_lr="${best#lr}"
  done
fi

if has ratio; then
  for ratio in 0.5 0.6 0.9; do
    pretrain "mae_e${MAE_EPOCHS}_r$ratio" mae "$MAE_EPOCHS" --config.masking.ratio="$ratio"
    probe "probe_mae_e${MAE_EPOCHS}_r$ratio" --config.init_from="$ROOT/mae_e${MAE_EPOCHS}_r$ratio"
    flags=$(pick tune_mae) || exit 1
    # shellcheck disable=SC2086
    ft "ft_mae_r${ratio}${FT_TAG}_s0" "" --config.init_from="$ROOT/mae_e${MAE_EPOCHS}_r$ratio" $flags
  done
fi

if has distill; then
  # The settings of the other 3-epoch rows (configs/*_fmnist.py as they are: all 60,000
  # training images, no monitor), so these rows sit in the same table.
  run maskdistill_e3 --config=configs/maskdistill_fmnist.py --config.teacher.path="$MAE" \
      "${TRAIN[@]}"
  knn maskdistill_e3
  run vqkd_tokenizer --config=configs/vqkd_tokenizer_fmnist.py --config.teacher.path="$MAE"
  run beit_vqkd_e3 --config=configs/beit_fmnist.py --config.tokenizer.path="$ROOT/vqkd_tokenizer" \
      "${TRAIN[@]}"
  knn beit_vqkd_e3
fi

if has aggregation; then
  run vqkd_tokenizer --config=configs/vqkd_tokenizer_fmnist.py --config.teacher.path="$MAE"
  beit_vqkd=(--config=configs/beit_fmnist.py --config.tokenizer.path="$ROOT/vqkd_tokenizer"
             "${TRAIN[@]}")
  for seed in $SEEDS; do
    # Seed 0 is distill's BEiT row as it ran (the configs' own seed); the others name theirs.
    tag="" seeded=()
    [ "$seed" = 0 ] || { tag="_s$seed"; seeded=(--config.seed="$seed"); }
    run "beit_vqkd_e3$tag" "${beit_vqkd[@]}" "${seeded[@]}"
    run "beit2_vqkd_e3$tag" "${beit_vqkd[@]}" --config.patch_aggregation.from_block=4 \
        --config.masking.exact_count=True "${seeded[@]}"
    for name in "beit_vqkd_e3$tag" "beit2_vqkd_e3$tag"; do
      knn "$name"
      probe "probe_$name" --config.init_from="$ROOT/$name"
    done
  done
fi

if has codebook; then
  run vqkd_tokenizer --config=configs/vqkd_tokenizer_fmnist.py --config.teacher.path="$MAE"
  run vqkd_tokenizer_norm_ema --config=configs/vqkd_tokenizer_fmnist.py \
      --config.teacher.path="$MAE" --config.tokenizer.codebook_update=norm_ema \
      --config.tokenizer.kmeans_init=10 --config.tokenizer.restart_after=0
fi

if has study; then
  # The raw-pixel line of the table and plot (the baselines' probe_pixels holds it too).
  run knn_pixels --config=configs/knn_fmnist.py --config.classifier.features=pixels
  for masking in $STUDY_MASKINGS; do
    case $masking in  # blockwise 0.4 is configs/mim_fmnist.py's own
      blockwise) suffix="" ;;
      random75) suffix="_random75" ;;
      *) echo "STUDY_MASKINGS: unknown '$masking' (blockwise, random75)"; exit 1 ;;
    esac
    for target in $TARGETS; do
      extra=()
      case $target in
        tokens) tokenizer; extra=(--config.target.tokenizer.path="$ROOT/beit_tokenizer") ;;
        teacher_features) extra=(--config.target.teacher.path="$MAE") ;;
      esac
      name="study_$target$suffix"
      run "$name" --config=configs/mim_fmnist.py:target="$target",masking="$masking" \
          --config.num_epochs="$STUDY_EPOCHS" \
          --config.optimizer.warmup_epochs="$(python -c "print($STUDY_EPOCHS / 10)")" \
          "${holdout[@]}" --config.knn.every_epochs="$STUDY_EPOCHS" "${TRAIN[@]}" "${extra[@]}"
      knn "$name"
    done
  done
fi
