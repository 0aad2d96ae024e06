#!/usr/bin/env bash
# Reproduces the Fashion-MNIST table of docs/results.md: MAE pre-training, k-NN, linear probe
# and fine-tuning, the baselines, the masking-ratio sweep, and the rows of the other methods.
# Every run's log, wall time (ROOT/NAME.seconds) and results.json land under ROOT. Re-running
# skips finished runs. SECTIONS selects parts (default "mae methods"), METHODS the other
# pre-training methods (default "simmim maskfeat beit data2vec ibot"; BEiT first trains its
# tokenizer).
#
#   bash docs/fmnist_results.sh [ROOT=workdirs/fmnist_results]
#   SECTIONS=methods METHODS=simmim bash docs/fmnist_results.sh ROOT
#   python docs/plot_mask_ratio.py ROOT docs/mask_ratio_fmnist.png
set -u
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/fmnist_results}
mkdir -p "$ROOT"

run() {  # NAME, then the arguments of mim_jax.main
  local name=$1; shift
  if [ -f "$ROOT/$name/results.json" ] || [ -f "$ROOT/$name/encoder/model.json" ] \
      || [ -f "$ROOT/$name/tokenizer/tokenizer.json" ]; then
    return
  fi
  echo "python -m mim_jax.main $* --workdir=$ROOT/$name" | tee -a "$ROOT/commands.txt"
  /usr/bin/time -f "%e" -o "$ROOT/$name.seconds" \
      python -m mim_jax.main "$@" --workdir="$ROOT/$name" > "$ROOT/$name.log" 2>&1 \
      || { echo "$name failed: see $ROOT/$name.log"; exit 1; }
}

has_section() { [[ " ${SECTIONS:-mae methods} " == *" $1 "* ]]; }

has_section mae && for ratio in 0.75 0.5 0.6 0.9; do
  run "mae_r$ratio" --config=configs/mae_fmnist.py --config.masking.ratio=$ratio
  run "knn_mae_r$ratio" --config=configs/knn_fmnist.py --config.init_from="$ROOT/mae_r$ratio"
  run "lp_mae_r$ratio" --config=configs/linprobe_fmnist.py --config.init_from="$ROOT/mae_r$ratio"
  if [ "$ratio" = 0.75 ]; then
    run ft_mae_r0.75 --config=configs/finetune_fmnist.py --config.init_from="$ROOT/mae_r0.75"
    run knn_pixels --config=configs/knn_fmnist.py --config.classifier.features=pixels
    run knn_random --config=configs/knn_fmnist.py --config.init_from=random
    run lp_pixels --config=configs/linprobe_fmnist.py --config.classifier.features=pixels
    run lp_random --config=configs/linprobe_fmnist.py --config.init_from=random
    run ft_scratch --config=configs/finetune_fmnist.py
    run knn_mae_r0.75_gap --config=configs/knn_fmnist.py --config.init_from="$ROOT/mae_r0.75" \
        --config.classifier.pool=gap
    run lp_mae_r0.75_gap --config=configs/linprobe_fmnist.py --config.init_from="$ROOT/mae_r0.75" \
        --config.classifier.pool=gap
    nomix=(--config.classifier.mixup_alpha=0 --config.classifier.cutmix_alpha=0)
    run ft_mae_r0.75_nomix --config=configs/finetune_fmnist.py \
        --config.init_from="$ROOT/mae_r0.75" "${nomix[@]}"
    run ft_scratch_nomix --config=configs/finetune_fmnist.py "${nomix[@]}"
  fi
done

# The other pre-training methods on the same encoder and budget, through the same protocols.
has_section methods && for method in ${METHODS:-simmim maskfeat beit data2vec ibot}; do
  extra=()
  if [ "$method" = beit ]; then  # BEiT's stage 1: its tokenizer, trained on the same images
    run beit_tokenizer --config=configs/beit_tokenizer_fmnist.py
    extra=(--config.tokenizer.path="$ROOT/beit_tokenizer")
  fi
  run "$method" --config=configs/${method}_fmnist.py "${extra[@]}"
  for pool in cls gap; do
    run "knn_${method}_$pool" --config=configs/knn_fmnist.py --config.init_from="$ROOT/$method" \
        --config.classifier.pool=$pool
    run "lp_${method}_$pool" --config=configs/linprobe_fmnist.py \
        --config.init_from="$ROOT/$method" --config.classifier.pool=$pool
  done
  run "ft_$method" --config=configs/finetune_fmnist.py --config.init_from="$ROOT/$method"
  run "ft_${method}_nomix" --config=configs/finetune_fmnist.py --config.init_from="$ROOT/$method" \
      --config.classifier.mixup_alpha=0 --config.classifier.cutmix_alpha=0
done
