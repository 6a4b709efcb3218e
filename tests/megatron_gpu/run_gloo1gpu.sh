#!/usr/bin/env bash
# Issue 19: the Megatron GPU tier (every configuration, 2 and 4 ranks) and the HF 2-rank suite with
# every rank on ONE GPU over gloo, for each megatron-core wheel in .whl/ (the versions side by side,
# RR_JOBS configurations of each at once, 4-rank ones first). Done within RR_BUDGET seconds (480).
#   OUT=out bash tests/megatron_gpu/run_gloo1gpu.sh
# .whl/ holds megatron_core-*.whl (each installed with --no-deps into /tmp/mcV) and, for the HF suite,
# any other wheels (transformers, accelerate and what they need beyond the machine's; into /tmp/hf).
# Writes four files or so: $OUT/summary.md (the tables, the HF verdicts), $OUT/megatron_mcV.tar.gz per
# version (every rank's JSON row, logs, console), $OUT/hf_gloo1gpu.tar.gz (per-case reports and logs).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export RR_TRANSPORT=gloo1gpu RR_JOBS=${RR_JOBS:-3} RR_TIMEOUT=${RR_TIMEOUT:-300} OMP_NUM_THREADS=1
export RR_DEADLINE=$(( $(date +%s) + ${RR_BUDGET:-480} ))
export RR_COMMIT=${RR_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export CUDA_DEVICE_MAX_CONNECTIONS=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
# transformers >= 5.2x loads hub kernels (e.g. kernels-community/rotary) when the kernels package is
# present; the lent machine reaches no hub: use the models' own torch code
export USE_HUB_KERNELS=NO
shopt -s nullglob
mapfile -t ORDER < <(python3 -c "
import sys; sys.path.insert(0, 'tests/megatron_gpu')
from run_megatron_gpu import CONFIGS
print('\n'.join(sorted(CONFIGS, key=lambda n: -CONFIGS[n]['ranks'])))")
if [ -n "${RR_CONFIGS:-}" ]; then read -r -a ORDER <<< "$RR_CONFIGS"; fi  # a subset, e.g. to re-run failures
wheels=(.whl/megatron_core-*.whl)
[ ${#wheels[@]} -gt 0 ] || echo "no .whl/megatron_core-*.whl: the Megatron tier is not run" | tee -a "$OUT/summary.md"
for whl in "${wheels[@]}"; do
  v=$(basename "$whl" | cut -d- -f2)
  python3 -m pip install -q --no-deps "$whl" --target "/tmp/mc$v" || { echo "pip install $whl failed"; continue; }
  (
    dir="$OUT/megatron_mc$v"
    PYTHONPATH="/tmp/mc$v" OUT="$dir" bash tests/megatron_gpu/run_all.sh "${ORDER[@]}" > "$OUT/console_mc$v.txt" 2>&1
    echo "run_all exit $?" >> "$OUT/console_mc$v.txt"
    mv "$OUT/console_mc$v.txt" "$dir/"
    tar -czf "$dir.tar.gz" -C "$OUT" "megatron_mc$v" && rm -rf "$dir"
  ) &
done
hf=()  # every carried wheel but megatron-core's: transformers with what it needs beyond the image's
for w in .whl/*.whl; do case "$w" in *megatron_core-*) ;; *) hf+=("$w") ;; esac; done
[ ${#hf[@]} -gt 0 ] && python3 -m pip install -q --no-deps "${hf[@]}" --target /tmp/hf
(
  mkdir -p "$OUT/hf_gloo1gpu"
  cases=$(PYTHONPATH="/tmp/hf:$PWD/src" python3 -c "import sys; sys.path.insert(0, 'tests'); import test_distributed_hf as c; print(' '.join(c.CASES))")
  for c in $cases; do  # one launch per case: a crash (faulthandler prints its stack) costs one case only
    t=$(( RR_DEADLINE - $(date +%s) )); [ "$t" -lt 30 ] && { echo "$c not started: budget spent"; continue; }
    PYTHONPATH="/tmp/hf:$PWD/src" OUT="$OUT/hf_gloo1gpu" RR_CASES=$c RR_REPORT="$c.json" RR_CKPT="/tmp/hf_ckpt_$c" \
      timeout "$t" torchrun --standalone --nproc-per-node 2 tests/gpu_distributed.py > "$OUT/hf_gloo1gpu/$c.log" 2>&1
    echo "$c exit $?: $(tail -n 1 "$OUT/hf_gloo1gpu/$c.log")"
  done > "$OUT/hf_gloo1gpu/verdicts.txt" 2>&1
) &
wait
{
  for v in "$OUT"/megatron_mc*.tar.gz; do
    d=$(mktemp -d); tar -xzf "$v" -C "$d"
    echo "## $(basename "$v" .tar.gz)"; python3 tests/megatron_gpu/run_megatron_gpu.py --summarize "$d"/megatron_mc* | tail -n +1
    tail -n 1 "$d"/megatron_mc*/console_mc*.txt
  done
  echo "## HF 2-rank suite, gloo1gpu"; cat "$OUT/hf_gloo1gpu/verdicts.txt"
} >> "$OUT/summary.md" 2>&1
tar -czf "$OUT/hf_gloo1gpu.tar.gz" -C "$OUT" hf_gloo1gpu && rm -rf "$OUT/hf_gloo1gpu"
cat "$OUT/summary.md"
