#!/usr/bin/env bash
# The lent-GPU runs recorded in BENCHMARKS.md and docs/DISTRIBUTED.md, by part (each part fits one
# 10-minute device call; results and logs under $OUT, summary in $OUT/summary.txt):
#   OUT=/some/dir PART=tiers   bash benchmarks/run_gpu.sh   # GPU test tiers (~6 min)
#   OUT=/some/dir PART=bench   bash benchmarks/run_gpu.sh   # routing, HF step, capture (~6 min)
#   OUT=/some/dir PART=step3   bash benchmarks/run_gpu.sh   # the HF step with prepared replay, 3 runs
#   OUT=/some/dir PART=capture bash benchmarks/run_gpu.sh   # capture in generate, larger and usual sizes
#   OUT=/some/dir PART=check   bash benchmarks/run_gpu.sh   # routereplay check on a larger model
#   OUT=/some/dir PART=profile bash benchmarks/run_gpu.sh   # where capture, replay and routing spend time
#   OUT=/some/dir PART=owed    bash benchmarks/run_gpu.sh   # issue 21's owed numbers, in one call (~9 min)
#   OUT=/some/dir PART=verify  bash benchmarks/run_gpu.sh   # GPU tier, then capture and the step x3 (~9 min)
#   OUT=/some/dir PART=routing3 bash benchmarks/run_gpu.sh  # offloaded-checkpoint test, forced routing x3
#   OUT=/some/dir PART=paired  bash benchmarks/run_gpu.sh   # routing profiled, the HF step x3 with 40 rounds
# BUNDLE=1 packs everything under $OUT into $OUT/results.tgz at the end (the lent-GPU runner brings
# back a few files only). Carry `.whl` (megatron-core and transformers wheels, see docs/DISTRIBUTED.md): they are installed
# into /tmp/site when present. Needs torch with CUDA and triton.
# DRY_RUN=1 runs nothing: each step checks that what it names is a program (not a shell function,
# which `timeout` cannot run) and that the script or test file it names exists; tests/test_run_gpu.py
# runs every part so on the CPU in CI.
set -uo pipefail
OUT=${OUT:-/tmp/routereplay-gpu}
SRC=${SRC:-src}
DRY_RUN=${DRY_RUN:-}
mkdir -p "$OUT"
if [ -z "$DRY_RUN" ] && ls .whl/*.whl >/dev/null 2>&1; then
    # megatron-core wheels of two versions are carried (tests/megatron_gpu picks one per run):
    # pip refuses both at once; the newest goes to its own folder, on the path of the steps that
    # compare with Megatron's routing only (MCORE below)
    python3 -m pip install -q --no-deps $(ls .whl/*.whl | grep -v megatron_core) --target /tmp/site 2>&1 | tail -1
    newest=$(ls .whl/megatron_core-*.whl 2>/dev/null | sort -V | tail -1)
    [ -n "$newest" ] && python3 -m pip install -q --no-deps "$newest" --target /tmp/mcore 2>&1 | tail -1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/$SRC:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 OUT
MCORE=(env "PYTHONPATH=/tmp/mcore:${PYTHONPATH:-}")  # a step's prefix: megatron-core on its path
here=$(dirname "$0")

if [ -z "$DRY_RUN" ]; then
    nvidia-smi -L | tee "$OUT/device.txt"
    python3 -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
fi

dry_check() {  # what step would run: a program, and the file it names exists
    if [ "$(type -t "$1")" != file ]; then
        echo "'$1' is not a program (type: $(type -t "$1" || echo none)); timeout cannot run it"
        return 127
    fi
    local arg
    for arg in "${@:2}"; do
        case "$arg" in
        *.py | *.sh) [ -f "$arg" ] || [ -f "${arg%%::*}" ] || { echo "no such file: $arg"; return 2; } ;;
        esac
    done
    echo "would run: $*"
}

step() {  # step NAME TIMEOUT CMD...: run, log to $OUT/NAME.txt, note rc and seconds
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    if [ -n "$DRY_RUN" ]; then
        dry_check "$@" >"$OUT/$name.txt" 2>&1
    else
        timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    fi
    rc=$?
    echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$OUT/summary.txt"
}
# the HF step benchmark: an array, not a shell function (step runs it through timeout)
HF=(python3 "$here/bench_hf_overhead.py" --device cuda --dtype bfloat16 --layers 8 --vocab 32000 --topk 8)

case "${PART:-tiers}" in
tiers)
    # every family, both replay kernels, bit-exact replay and checkpointed gradients; syncs; exit checks
    step gpu_tier 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
    # the fused kernel against route(), ulp bound, prepared call, no host sync
    step kernels_gpu 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py
    # capture in generate under CUDA graphs, manual graph capture refused, capture's sync count
    step gpu_generate 150 python3 -m pytest -q -s -rA -p no:cacheprovider tests/test_gpu_generate.py
    ;;
bench)
    step routing 200 "${MCORE[@]}" python3 "$here/bench_routing_gpu.py"
    step hf1024 90 "${HF[@]}" --hidden 1024 --moe-intermediate 512 --experts 64 --batch 4 --seq 2048 --reps 20 --warmup 2
    step hf1024_triton 90 "${HF[@]}" --hidden 1024 --moe-intermediate 512 --experts 64 --batch 4 --seq 2048 --reps 20 \
        --warmup 2 --replay-kernel triton
    step hf2048 100 "${HF[@]}" --hidden 2048 --moe-intermediate 768 --experts 128 --batch 4 --seq 4096 --reps 8 --warmup 2
    step capture 100 python3 "$here/bench_capture.py" --device cuda --dtype bf16 --layers 8 --hidden 1024 \
        --experts 64 --topk 8 --batch 16 --prompt-len 256 --new-tokens 128 --reps 9
    ;;
step3)
    # issue 21 item 3: the prepared replay's step wall time, three runs on one machine (<= 1.005 is the target)
    for run in 1 2 3; do
        step "hf1024_triton_$run" 100 "${HF[@]}" --hidden 1024 --moe-intermediate 512 --experts 64 --batch 4 \
            --seq 2048 --reps 20 --warmup 2 --replay-kernel triton
    done
    ;;
profile)
    # issue 21: host time of capture in generate and of a prepared replay step, cProfile, host syncs
    step profile_capture 150 python3 "$here/profile_capture.py" --device cuda --dtype bf16 --layers 8 --hidden 1024 \
        --experts 64 --topk 8 --batch 16 --prompt-len 256 --new-tokens 128 --reps 5
    step capture_pieces 150 python3 "$here/profile_capture.py" --pieces --device cuda --dtype bf16 --layers 8 \
        --hidden 1024 --experts 64 --topk 8 --batch 16 --prompt-len 256 --new-tokens 128 --reps 3
    step profile_routing 120 "${MCORE[@]}" python3 "$here/profile_routing.py"
    step profile_replay 120 python3 "$here/profile_replay.py" --device cuda --dtype bfloat16 --layers 8 --hidden 1024 \
        --experts 64 --topk 8 --batch 4 --seq 2048 --source prepared --replay-kernel triton
    ;;
capture)
    # issue 21's larger capture configuration (6.4B parameters, initialised on the GPU), then the usual one
    step capture2048 300 python3 "$here/bench_capture.py" --device cuda --dtype bf16 --layers 8 --hidden 2048 \
        --experts 128 --topk 8 --batch 64 --prompt-len 256 --new-tokens 128 --reps 5
    step capture 100 python3 "$here/bench_capture.py" --device cuda --dtype bf16 --layers 8 --hidden 1024 \
        --experts 64 --topk 8 --batch 16 --prompt-len 256 --new-tokens 128 --reps 9
    ;;
owed)
    # issue 21's owed numbers in one 10-minute call, most wanted first (machines are scarce): capture
    # on today's code (and its CUDA-graph correctness) and where its GPU host time goes, the prepared
    # step's three runs, the larger capture
    step capture 100 python3 "$here/bench_capture.py" --device cuda --dtype bf16 --layers 8 --hidden 1024 \
        --experts 64 --topk 8 --batch 16 --prompt-len 256 --new-tokens 128 --reps 7
    # capture keeps eager ids as the routers made them, copies a compiled region's: CUDA graphs still exact
    step gpu_generate 90 python3 -m pytest -q -s -rA -p no:cacheprovider tests/test_gpu_generate.py
    step capture_pieces 90 python3 "$here/profile_capture.py" --pieces --device cuda --dtype bf16 --layers 8 \
        --hidden 1024 --experts 64 --topk 8 --batch 16 --prompt-len 256 --new-tokens 128 --reps 3
    for run in 1 2 3; do
        step "hf1024_triton_$run" 60 "${HF[@]}" --hidden 1024 --moe-intermediate 512 --experts 64 --batch 4 \
            --seq 2048 --reps 12 --warmup 2 --replay-kernel triton
    done
    step capture2048 150 python3 "$here/bench_capture.py" --device cuda --dtype bf16 --layers 8 --hidden 2048 \
        --experts 128 --topk 8 --batch 64 --prompt-len 256 --new-tokens 128 --reps 3
    ;;
verify)
    # the GPU tier on today's code, then issue 21 items 1 and 3 three times, capture and the prepared
    # step interleaved so that a host's slow spell lands on both
    step gpu_tier 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
    for run in 1 2 3; do
        step "capture_$run" 80 python3 "$here/bench_capture.py" --device cuda --dtype bf16 --layers 8 --hidden 1024 \
            --experts 64 --topk 8 --batch 16 --prompt-len 256 --new-tokens 128 --reps 7
        step "hf1024_triton_$run" 60 "${HF[@]}" --hidden 1024 --moe-intermediate 512 --experts 64 --batch 4 \
            --seq 2048 --reps 12 --warmup 2 --replay-kernel triton
    done
    ;;
routing3)
    # first, the GPU-tier test not yet run on a GPU: replay under transformers 5.25's offloaded
    # activation checkpointing (pinned host memory), both kernels
    step offload_ckpt 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k offloaded
    # issue 21 item 4: forced routing forward, forward + backward, and per layer in one backward, 3 runs
    for run in 1 2 3; do
        step "routing_$run" 180 "${MCORE[@]}" python3 "$here/bench_routing_gpu.py"
    done
    ;;
paired)
    # where a forward + backward's device time goes on the large and the 4k shape (profiler), and a
    # replayed HF step's kernels against a plain one's, then issue 21 item 3's step three times, 40
    # rounds each, with the paired ratio
    step routing_profile 150 "${MCORE[@]}" python3 "$here/bench_routing_gpu.py" --cases 2,3 --profile
    # item 3: what a prepared replayed step runs on the device that a plain one does not, kernel by kernel
    step replay_kernels 120 python3 "$here/profile_replay.py" --device cuda --dtype bfloat16 --layers 8 --hidden 1024 \
        --experts 64 --topk 8 --batch 4 --seq 2048 --source prepared --replay-kernel triton
    for run in 1 2 3; do
        step "hf1024_paired_$run" 110 "${HF[@]}" --hidden 1024 --moe-intermediate 512 --experts 64 --batch 4 \
            --seq 2048 --reps 40 --warmup 2 --replay-kernel triton
    done
    ;;
check)
    # the main job on a larger random model (8 layers, 64 experts, top-8, bf16 rollout)
    step make_model 120 python3 "$here/../scripts/make_random_moe.py" /tmp/routereplay-moe --layers 8 --hidden 1024 \
        --experts 64 --topk 8
    step check 300 python3 -m routereplay.cli check --model /tmp/routereplay-moe --device cuda --samples 32 \
        --max-new-tokens 128 --lr 1e-5 --out "$OUT/check"
    ;;
*) echo "PART must be tiers, bench, step3, profile, capture, owed, verify, routing3, paired or check" >&2; exit 2 ;;
esac
cat "$OUT/summary.txt"
if [ -n "${BUNDLE:-}" ] && [ -z "$DRY_RUN" ]; then
    # the device runner brings back a few files only: every log and JSON in one archive
    (cd "$OUT" && tar czf "$OUT.tgz" . && find . -mindepth 1 -delete && mv "$OUT.tgz" results.tgz)
fi
