#!/usr/bin/env bash
# Issue 12 on one GPU, in two calls (each well under 10 minutes), everything written under $OUT:
#
#   OUT=/some/dir bash scripts/run_evidence_gpu.sh train   # ~7.5 min: train the small MoE (TRAIN_SECONDS=360)
#       $OUT/small_moe/   config.json generation_config.json model.safetensors char_tokenizer.json train_log.json
#                         (copy these into src/routereplay/data/small_moe/ before the second call)
#       $OUT/train_stdout.txt    device, training progress, router statistics before/after
#       $OUT/check_trained.json  `routereplay check --model $OUT/small_moe --device cuda --samples 64`
#
#   OUT=/some/dir bash scripts/run_evidence_gpu.sh grpo    # ~8 min: GRPO arms in parallel (GRPO_SECONDS=330)
#       $OUT/evidence/grpo.json grpo_m1.png grpo_m4.png   every run's per-step log, summary, curves
#       $OUT/evidence/checks.txt, checks.json             `routereplay check` (--trained, --random), cuda
#       $OUT/evidence/runs_log.txt                        device and each run's output
#     Model: MODEL=dir, else the packaged src/routereplay/data/small_moe (check's default then proves the
#     packaging path too). Runs: R0/R2/R3 x 1 and 4 mini-steps, fp32 trainer, seed 0; R0/R3 with a bf16
#     trainer (1 mini-step); R0/R3 fp32 1 mini-step with seeds 1 and 2: 12 processes sharing the GPU.
set -uo pipefail
OUT=${OUT:-/tmp/routereplay-evidence}
mode=${1:-}
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$OUT"

device_info() {
    nvidia-smi -L
    python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '|', torch.cuda.get_device_name())"
    git log -1 --format='commit %H %s' 2>/dev/null || echo "commit: (no git)"
}

case "$mode" in
train)
    {
        device_info
        python3 scripts/train_small_moe.py --out "$OUT/small_moe" --device cuda --max-seconds "${TRAIN_SECONDS:-360}"
        python3 -m routereplay.cli check --model "$OUT/small_moe" --device cuda --samples 64 --out /tmp/check_trained
        cp /tmp/check_trained/report.json "$OUT/check_trained.json"
    } 2>&1 | tee "$OUT/train_stdout.txt"
    ;;
grpo)
    ev="$OUT/evidence"
    runs=/tmp/grpo_runs
    mkdir -p "$ev" "$runs"
    model_args=()
    if [ -n "${MODEL:-}" ]; then model_args=(--model "$MODEL"); fi
    secs=${GRPO_SECONDS:-330}
    device_info > "$ev/runs_log.txt" 2>&1
    launch() {  # name, then grpo_r3.py arguments
        local name=$1; shift
        python3 examples/grpo_r3.py "${model_args[@]}" --device cuda --max-seconds "$secs" --no-combine \
            --out "$runs" "$@" > "$runs/$name.log" 2>&1 &
    }
    for m in 1 4; do for arm in R0 R2 R3; do launch "${arm}_m${m}" --arms "$arm" --mini-steps "$m"; done; done
    for arm in R0 R3; do
        launch "${arm}_bf16" --arms "$arm" --mini-steps 1 --train-dtypes bf16
        for s in 1 2; do launch "${arm}_s$s" --arms "$arm" --mini-steps 1 --seeds "$s"; done
    done
    # routereplay check on the GPU while the runs go: the trained model (--trained) and the random one (the default),
    # 64 samples each.
    {
        python3 -m routereplay.cli check --trained --device cuda --samples 64 --out /tmp/check_default
        echo "exit status $?"
        python3 -m routereplay.cli check --random --device cuda --samples 64 --out /tmp/check_random
        echo "exit status $?"
    } > "$ev/checks.txt" 2>&1
    wait
    python3 - "$ev/checks.json" <<'EOF'
import json, sys
out = {}
for name in ("default", "random"):
    try:
        out[name] = json.load(open(f"/tmp/check_{name}/report.json"))
    except OSError as e:
        out[name] = {"error": str(e)}
json.dump(out, open(sys.argv[1], "w"), indent=1)
EOF
    for f in "$runs"/*.log; do echo "=== $f"; tail -n 30 "$f"; done >> "$ev/runs_log.txt"
    python3 examples/grpo_r3.py --combine "$runs" --out "$ev" >> "$ev/runs_log.txt" 2>&1
    python3 - "$ev/grpo.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
keys = ("steps", "reward_mean", "disagreement_mean", "update_disagreement_max", "k3_mean", "F(2)_mean",
        "max_abs_delta_mean", "clip_frac_mean", "grad_norm_mean")
print("arm m dtype seed " + " ".join(keys))
for r in d["summary"]:
    print(r["arm"], r["mini_steps"], r["train_dtype"], r["seed"],
          " ".join("-" if r[k] is None else f"{r[k]:.4g}" for k in keys))
print("k3 R0/R3:", d["k3_ratio_R0_over_R3"])
EOF
    ;;
*)
    echo "usage: OUT=dir bash scripts/run_evidence_gpu.sh train|grpo" >&2
    exit 2
    ;;
esac
