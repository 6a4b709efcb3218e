#!/usr/bin/env bash
# Megatron-Core GPU tier: every configuration that fits the visible GPUs, then one markdown table.
#   OUT=out bash tests/megatron_gpu/run_all.sh [config ...]
# Needs megatron-core importable (the lent machine: pip install the .whl first, see docs/DISTRIBUTED.md).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export CUDA_DEVICE_MAX_CONNECTIONS=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
CONFIGS=("$@")
if [ ${#CONFIGS[@]} -eq 0 ]; then
  mapfile -t CONFIGS < <(python3 -c "
import sys; sys.path.insert(0, 'tests/megatron_gpu')
from run_megatron_gpu import CONFIGS
print('\n'.join(n for n, c in CONFIGS.items() if c['gpus'] <= $GPUS))")
fi
status=0
for c in "${CONFIGS[@]}"; do
  n=$(python3 -c "import sys; sys.path.insert(0, 'tests/megatron_gpu'); from run_megatron_gpu import CONFIGS; print(CONFIGS['$c']['gpus'])")
  echo "=== $c on $n GPU(s)"
  timeout 400 torchrun --standalone --nproc_per_node="$n" tests/megatron_gpu/run_megatron_gpu.py --config "$c" --out "$OUT" \
    > "$OUT/megatron_$c.log" 2>&1 || { status=1; tail -n 30 "$OUT/megatron_$c.log"; }
done
python3 tests/megatron_gpu/run_megatron_gpu.py --summarize "$OUT"
exit $status
