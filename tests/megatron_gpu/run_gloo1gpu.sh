#!/usr/bin/env bash
# Every Megatron GPU-tier configuration (2 and 4 ranks) with all ranks on ONE GPU over gloo, on each
# megatron-core wheel in .whl/ (issue 19). The two versions run side by side, RR_JOBS configurations
# of each at once (4-rank ones first); about 9 minutes at most (RR_BUDGET seconds per version).
#   OUT=out bash tests/megatron_gpu/run_gloo1gpu.sh
# Writes, per version V: $OUT/megatron_gloo1gpu_mcV.md (the table), $OUT/megatron_gloo1gpu_mcV.tar.gz
# (every rank's JSON row and log) and $OUT/megatron_gloo1gpu_mcV.txt (the run's console).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export RR_TRANSPORT=gloo1gpu RR_JOBS=${RR_JOBS:-3} RR_TIMEOUT=${RR_TIMEOUT:-300} OMP_NUM_THREADS=1
export RR_COMMIT=${RR_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mapfile -t ORDER < <(python3 -c "
import sys; sys.path.insert(0, 'tests/megatron_gpu')
from run_megatron_gpu import CONFIGS
print('\n'.join(sorted(CONFIGS, key=lambda n: -CONFIGS[n]['ranks'])))")
shopt -s nullglob
wheels=(.whl/megatron_core-*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "no .whl/megatron_core-*.whl: carry the wheels (docs/DISTRIBUTED.md)"; exit 2; }
for whl in "${wheels[@]}"; do
  v=$(basename "$whl" | cut -d- -f2)
  python3 -m pip install -q --no-deps "$whl" --target "/tmp/mc$v" || { echo "pip install $whl failed"; exit 2; }
  (
    dir="$OUT/mc$v"
    PYTHONPATH="/tmp/mc$v" OUT="$dir" timeout "${RR_BUDGET:-500}" bash tests/megatron_gpu/run_all.sh "${ORDER[@]}"
    echo "run_all exit $?"
    PYTHONPATH="/tmp/mc$v" python3 tests/megatron_gpu/run_megatron_gpu.py --summarize "$dir" > /dev/null
    cp "$dir/megatron_gpu.md" "$OUT/megatron_gloo1gpu_mc$v.md"
    tar -czf "$OUT/megatron_gloo1gpu_mc$v.tar.gz" -C "$OUT" "mc$v" && rm -rf "$dir"
  ) > "$OUT/megatron_gloo1gpu_mc$v.txt" 2>&1 &
done
wait
cat "$OUT"/megatron_gloo1gpu_mc*.md
