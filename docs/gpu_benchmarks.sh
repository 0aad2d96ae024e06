#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one run on one GPU, within BUDGET seconds (480), most
# important first. Each row is one process; each measurement appends one JSON line to
# OUT/bench.jsonl as it finishes (commands, timings and the end of each stderr beside it), so a
# run cut short keeps what it measured. A row that would not fit in the time left is skipped
# and says so.
#
#   bash docs/gpu_benchmarks.sh [OUT=workdirs/gpu_bench]
#
# Rows: (1) MAE ViT-L/16 bf16 with a profile by kernel category, and its levers in the same
# process (XLA's attention instead of cuDNN's, bfloat16 AdamW moments, the non-finite guard
# as lax.cond instead of selects); (2) HF ViTMAE eager
# (bf16 autocast) on ViT-L/16, its own process; (3) ViT-B/16: MAE, MAE with mask tokens in the
# encoder, SimMIM, MaskFeat; (4) the training loop on Fashion-MNIST with the split held on the
# device, with grain workers feeding device or host augmentation, beside the bare step; (5) HF
# ViTMAE under torch.compile with fused AdamW on ViT-L/16; (6) XLA flags, one per process, on
# ViT-B/16; (7) the input pipeline on JPEGs (CPU cores); (8) ViT-L/16 mim_jax again, after the
# peers (order effects); (9) the converged probe's L-BFGS fits, one feature set after another
# against all sets in one loop (probe.fit_sets), on a random Ti/4.
#
# VITB / VITL / BATCH / STEPS / LOOP_STEPS override the configs, the global batch of the bench
# rows (the loop rows of (4) train the Fashion-MNIST recipe's batch), the timed steps and the
# loop rows' steps (e.g. VITB=configs/mae_fmnist.py VITL=configs/mae_fmnist.py
# BATCH=16 STEPS=3 LOOP_STEPS=24 BUDGET=1200 to try it on a CPU). Without internet:
# docs/offline_bundle.sh.
set -u -o pipefail
source "$(dirname "$0")/script_args.sh"
OUT=$(output_dir "[VITB=... BUDGET=... ...] bash docs/gpu_benchmarks.sh [OUT]" \
      workdirs/gpu_bench "$@") || exit 2
cd "$(dirname "$0")/.."
VITB=${VITB:-configs/mae_vitb.py}
VITL=${VITL:-configs/mae_vitl.py}
BATCH=${BATCH:-256}
STEPS=${STEPS:-20}
BUDGET=${BUDGET:-480}
LOOP_STEPS=${LOOP_STEPS:-600}
PY=${PYTHON:-python3}
# Row 3 times VITB's SimMIM and MaskFeat siblings (mae_ -> simmim_, maskfeat_); row 4 logs a
# sixth of LOOP_STEPS apart.
[[ $(basename "$VITB") == mae_* ]] \
    || { echo "VITB=$VITB: an MAE config named mae_*.py (row 3 times its simmim_ and maskfeat_" \
              "siblings)" >&2; exit 2; }
[[ $LOOP_STEPS =~ ^[0-9]+$ ]] && [ "$LOOP_STEPS" -ge 6 ] \
    || { echo "LOOP_STEPS=$LOOP_STEPS: an integer >= 6" >&2; exit 2; }
mkdir -p "$OUT"

bench() {  # NAME SECONDS_NEEDED, then the arguments of mim_jax.bench (XLA_FLAGS from the env)
  local name=$1 need=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt "$need" ]; then
    echo "== $name: skipped, $left s left of $BUDGET (needs about $need)" | tee -a "$OUT/commands.txt"
    return
  fi
  echo "== $name: XLA_FLAGS='${XLA_FLAGS:-}' python -m mim_jax.bench $*" | tee -a "$OUT/commands.txt"
  local start=$SECONDS steps=(--steps="$STEPS")
  case " $* " in *" --pipeline "*|*" --feed "*) steps=() ;; esac  # they time no steps
  # --foreground: the benchmark stays in this process group, so a Ctrl-C reaches it too
  # (--kill-after: one that ignores the SIGTERM at the time limit is killed 30 s later).
  timeout --foreground --kill-after=30 "$left" "$PY" -m mim_jax.bench "${steps[@]}" "$@" 2> "$OUT/$name.err" \
      | tee -a "$OUT/bench.jsonl" \
      || echo "== $name: failed or cut short, see errors.log" | tee -a "$OUT/commands.txt"
  echo "== $name: $((SECONDS - start)) s" | tee -a "$OUT/commands.txt"
  { echo "== $name"; tail -n 40 "$OUT/$name.err"; } >> "$OUT/errors.log" && rm "$OUT/$name.err"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import jax, flax, optax
print({m.__name__: m.__version__ for m in (jax, flax, optax)}, jax.devices())
try:
  import torch, transformers; print(torch.__version__, transformers.__version__)
except ImportError as e: print('no PyTorch peer:', e)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

common=(--batch="$BATCH" --dtype=bfloat16)
# 1. ViT-L/16: the default step (cuDNN attention, odd lengths padded), profiled, and levers.
bench vitl 90 "--config=$VITL" "${common[@]}" --peer=none --profile="$OUT/profile_vitl" \
    --variant=model.attention_impl=xla --variant=optimizer.mu_dtype=bfloat16 \
    --variant=nonfinite_guard=cond
# 2. The eager PyTorch peer in its own process.
bench vitl_hf 60 "--config=$VITL" "${common[@]}" --peer=hf --peers_only
# 3. ViT-B/16: MAE, with mask tokens through the encoder, SimMIM and MaskFeat.
vitb_dir=$(dirname "$VITB") vitb_file=$(basename "$VITB")
bench vitb 90 "--config=$VITB" "${common[@]}" --asymmetry --peer=none \
    --also="$vitb_dir/simmim_${vitb_file#mae_}" --also="$vitb_dir/maskfeat_${vitb_file#mae_}"
# 4. The whole loop on Fashion-MNIST (the docs/fmnist_gpu.sh recipe) against its bare step;
#    FMNIST_DIR: the data's folder when not the Debian package's.
FMNIST=()
[ -n "${FMNIST_DIR:-}" ] && FMNIST=(--config.data.path="$FMNIST_DIR")
main_run() {  # NAME, then mim_jax.main's arguments: a training or evaluation run in
  # OUT/NAME (log OUT/NAME.log) within the time left; returns 1 when skipped or failed (a
  # cut-short run's last logged rate would include its start).
  local name=$1; shift
  local left=$((BUDGET - SECONDS))
  [ "$left" -lt 60 ] && { echo "== $name: skipped, $left s left" | tee -a "$OUT/commands.txt"; return 1; }
  local cmd=(-m mim_jax.main "$@" --workdir="$OUT/$name")
  echo "== $name: python ${cmd[*]}" | tee -a "$OUT/commands.txt"
  rm -rf "${OUT:?}/$name"
  timeout --foreground --kill-after=30 "$left" "$PY" "${cmd[@]}" > "$OUT/$name.log" 2>&1 \
      || { echo "== $name: failed or cut short, see $name.log" | tee -a "$OUT/commands.txt"
           return 1; }
}
loop() {  # NAME, then overrides
  local name=$1; shift
  main_run "$name" --config=configs/mae_fmnist.py --config.model.dtype=bfloat16 \
      --config.total_steps="$LOOP_STEPS" --config.log_every=$((LOOP_STEPS / 6)) \
      --config.checkpoint_every=100000 --config.viz_every=0 "${FMNIST[@]}" "$@" || return
  # The last logged rate (the last sixth of the steps), after compilation and the start.
  "$PY" - "$OUT/$name" "$name" <<'EOF' | tee -a "$OUT/bench.jsonl"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if "images_per_sec" in l]
print(json.dumps({"impl": "mim_jax_loop", "row": sys.argv[2], "step": rows[-1]["step"],
                  "images_per_s": round(rows[-1]["images_per_sec"], 1)}))
EOF
}
loop loop_fmnist_resident --config.data.augment_on=device --config.data.device_resident=True
bench loop_fmnist_bare 40 --config=configs/mae_fmnist.py --dtype=bfloat16 --peer=none \
    --variant=data.augment_on=device
loop loop_fmnist_device --config.data.augment_on=device --config.data.num_workers=4
loop loop_fmnist_host --config.data.augment_on=host --config.data.num_workers=4
# 5. The compiled PyTorch peer (slow to compile) with fused AdamW.
bench vitl_hf_compile 150 "--config=$VITL" "${common[@]}" --peer=hf_compile --peers_only
# 6. XLA options on ViT-B/16 MAE, in one process: the default step, then each option as a
#    per-run compiler option (config.compiler_options; the same effect as XLA_FLAGS, which a
#    process reads once).
xla=()
for flag in --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_command_buffer= \
    --xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true; do
  xla+=(--variant="compiler_options=$flag")
done
bench vitb_xla 150 "--config=$VITB" "${common[@]}" --peer=none "${xla[@]}"
# 7. The host input pipeline on 500x375 JPEGs: images/s per core (decode alone and in all).
bench pipeline 40 "--config=$VITB" --pipeline
# 8. Our ViT-L/16 row again, after the peers.
bench vitl_again 60 "--config=$VITL" "${common[@]}" --peer=none
# 9. The probe's fits: XLA:GPU reads each L-BFGS loop condition on the host. A random Ti/4's
#    26 feature sets (13 blocks x 2 pools) on 10% of the labels and one L2 strength, fitted one
#    after another, then in one loop; PROBE_FLAGS replaces the size and data flags.
PROBE_FLAGS=${PROBE_FLAGS:-"--config.model.variant=Ti/4 --config.model.width=0
--config.model.depth=0 --config.model.num_heads=0 --config.model.mlp_dim=0
--config.data.label_fraction=0.1"}
for mode in one_by_one together; do
  # shellcheck disable=SC2086
  main_run "probe_$mode" --config=configs/linprobe_fmnist.py --config.init_from=random \
      "${FMNIST[@]}" $PROBE_FLAGS "--config.probe.l2_grid=(1e-3,)" \
      --config.probe.fit_sets=$mode || continue
  "$PY" - "$OUT/probe_$mode" "$mode" <<'EOF' | tee -a "$OUT/bench.jsonl"
import json, sys
r = json.load(open(sys.argv[1] + "/results.json"))
print(json.dumps({"impl": "mim_jax_probe", "fit_sets": sys.argv[2], "seconds": r["seconds"],
                  **{k: v for k, v in r.items() if k.startswith("probe_top1")}}))
EOF
done
echo "== total: $SECONDS s of $BUDGET" | tee -a "$OUT/commands.txt"
