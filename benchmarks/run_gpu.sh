#!/usr/bin/env bash
# The lent-GPU runs recorded in BENCHMARKS.md, in one go:
#   OUT=/some/dir SRC=src bash benchmarks/run_gpu.sh
# Needs transformers (and matplotlib for check's plots) importable; torch with CUDA.
set -uo pipefail
OUT=${OUT:-/tmp/routereplay-gpu}
SRC=${SRC:-src}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/$SRC:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
here=$(dirname "$0")

nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

# Bit-exact replay on CUDA, bf16, deterministic algorithms, every supported family.
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"

# Issue 3: record / replay overhead of the HF adapter, bf16 forward + backward.
python3 "$here/bench_hf_overhead.py" --device cuda --dtype bfloat16 --layers 8 --hidden 1024 \
    --moe-intermediate 512 --experts 64 --topk 8 --batch 4 --seq 2048 --vocab 32000 --reps 20 --warmup 3 \
    2>&1 | tee "$OUT/hf_overhead.txt"
python3 "$here/bench_hf_overhead.py" --device cuda --dtype bfloat16 --layers 8 --hidden 2048 \
    --moe-intermediate 768 --experts 128 --topk 8 --batch 4 --seq 4096 --vocab 32000 --reps 15 --warmup 3 \
    2>&1 | tee -a "$OUT/hf_overhead.txt"

# Issue 4: capture overhead inside generate, bf16.
python3 "$here/bench_capture.py" --device cuda --dtype bf16 --layers 8 --hidden 1024 --experts 64 --topk 8 \
    --batch 16 --prompt-len 256 --new-tokens 128 --reps 9 2>&1 | tee "$OUT/capture.txt"

# Issue 4: the main job on a larger random model (8 layers, 64 experts, top-8, bf16 rollout).
python3 "$here/../scripts/make_random_moe.py" /tmp/routereplay-moe --layers 8 --hidden 1024 --experts 64 --topk 8 \
    2>&1 | tee "$OUT/check.txt"
python3 -m routereplay.cli check --model /tmp/routereplay-moe --device cuda --samples 32 --max-new-tokens 128 --lr 1e-5 \
    --out "$OUT/check" 2>&1 | tee -a "$OUT/check.txt"
