#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one run on one GPU, most important first: each
# measurement appends one JSON line per implementation to OUT/bench.jsonl (commands, timings and
# the end of each stderr beside it), so a run cut short keeps what it finished.
#
#   bash docs/gpu_benchmarks.sh [OUT=workdirs/gpu_bench]
#
# VITB / VITL / BATCH / LIMIT override the configs, the global batch and the seconds allowed per
# measurement (e.g. VITB=configs/mae_fmnist.py VITL=configs/mae_fmnist.py BATCH=16 to try the
# script on a CPU).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${1:-workdirs/gpu_bench}
VITB=${VITB:-configs/mae_vitb.py}
VITL=${VITL:-configs/mae_vitl.py}
BATCH=${BATCH:-256}
LIMIT=${LIMIT:-240}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

bench() {  # NAME, then the arguments of mim_jax.bench
  local name=$1; shift
  echo "== $name: python -m mim_jax.bench $*" | tee -a "$OUT/commands.txt"
  local start=$SECONDS
  timeout "$LIMIT" "$PY" -m mim_jax.bench "$@" 2> "$OUT/$name.err" | tee -a "$OUT/bench.jsonl" \
      || echo "== $name: failed or cut short, see $name.err" | tee -a "$OUT/commands.txt"
  echo "== $name: $((SECONDS - start)) s" | tee -a "$OUT/commands.txt"
  { echo "== $name"; tail -n 40 "$OUT/$name.err"; } >> "$OUT/errors.log" && rm "$OUT/$name.err"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import jax, flax, optax, torch, transformers
print({m.__name__: m.__version__ for m in (jax, flax, optax, torch, transformers)})
print(jax.devices())"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

common=(--batch="$BATCH" --dtype=bfloat16)
# 1. ViT-L/16 MAE beside HF ViTMAE eager.
bench vitl "--config=$VITL" "${common[@]}" --peer=hf
# 2. ViT-B/16: MAE, MAE with mask tokens in the encoder, SimMIM and MaskFeat; HF ViTMAE eager.
bench vitb "--config=$VITB" "${common[@]}" --asymmetry --peer=hf \
    --also="${VITB/mae_/simmim_}" --also="${VITB/mae_/maskfeat_}"
# 3. ViT-L/16 with mask tokens in its encoder, at half the batch: at the full batch it needs
#    about 95 GiB of temporaries, more than is left beside the first measurement in one process.
bench vitl_asymmetry "--config=$VITL" --batch=$((BATCH / 2)) --dtype=bfloat16 --asymmetry \
    --peer=none
# 4. Levers on MAE ViT-B/16, one at a time against row 2.
bench vitb_fp32 "--config=$VITB" --batch="$BATCH" --dtype=float32 --peer=none
bench vitb_batch2x "--config=$VITB" --batch=$((2 * BATCH)) --dtype=bfloat16 --peer=none
bench vitb_remat "--config=$VITB" "${common[@]}" --config.model.remat=full --peer=none
# 5. The compiled PyTorch peer, each in a process of its own (slow to compile).
LIMIT=$((2 * LIMIT)) bench vitl_hf_compile "--config=$VITL" "${common[@]}" --peer=hf_compile \
    --peers_only
LIMIT=$((2 * LIMIT)) bench vitb_hf_compile "--config=$VITB" "${common[@]}" --peer=hf_compile \
    --peers_only
