#!/usr/bin/env bash
# The CPU rows of docs/benchmarks.md's lever table, each lever beside its peer in one process:
#   gelu       docs/gelu_lever.py: the ViT MLP's fwd+bwd with mim_jax's GELU, JAX's, ReLU
#   step       the demo MAE step: base, optimizer.mu_dtype=bfloat16, augmentation on the
#              device; HF ViTMAE eager as the peer
#   pipeline   JPEG decode (simplejpeg vs PIL) and the whole host pipeline at 224 px
#   attention  the CPU attention default (heads-major core, blockwise qkv) against jax.nn's
#              XLA path with fused qkv slices, alternated in rounds: the demo MAE step (HF
#              eager as the peer), the fine-tuning step, MAE ViT-B/16 at batch 8
# JSON lines go to OUT/NAME.jsonl; a finished lever (its file exists) is skipped. The exit
# status counts the levers that failed (their stderr in OUT/NAME.log).
#   bash docs/cpu_levers.sh OUT
set -u
source "$(dirname "$0")/script_args.sh"
OUT=$(output_dir "bash docs/cpu_levers.sh [OUT]" workdirs/cpu_levers "$@") || exit 2
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
failed=0
lever() {  # NAME, then the command
  local name=$1; shift
  [ -s "$OUT/$name.jsonl" ] && return
  echo "$*" > "$OUT/$name.cmd"
  if "$@" > "$OUT/$name.tmp" 2> "$OUT/$name.log"; then
    mv "$OUT/$name.tmp" "$OUT/$name.jsonl"
  else
    echo "$name failed: see $OUT/$name.log" >&2
    failed=$((failed + 1))
  fi
}
lever gelu python docs/gelu_lever.py
lever step python -m mim_jax.bench --config=configs/mae_fmnist.py --steps=20 --peer=hf \
    --variant=optimizer.mu_dtype=bfloat16 --variant=data.augment_on=device
lever pipeline python -m mim_jax.bench --config=configs/mae_vitb.py --pipeline
lever attention_demo python -m mim_jax.bench --config=configs/mae_fmnist.py \
    --variant=model.attention_impl=xla --steps=30 --rounds=6 --peer=hf
lever attention_finetune python -m mim_jax.bench --config=configs/finetune_fmnist.py:scratch \
    --variant=model.attention_impl=xla --steps=16 --rounds=4 --peer=none
lever attention_vitb python -m mim_jax.bench --config=configs/mae_vitb.py \
    --variant=model.attention_impl=xla --batch=8 --steps=8 --warmup=2 --rounds=4 --peer=hf
exit $failed
