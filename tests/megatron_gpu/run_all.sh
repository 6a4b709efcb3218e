#!/usr/bin/env bash
# Megatron-Core GPU tier: every configuration that fits, then one markdown table.
#   OUT=out bash tests/megatron_gpu/run_all.sh [config ...]
#   RR_TRANSPORT=gloo1gpu OUT=out bash tests/megatron_gpu/run_all.sh   # every configuration on one GPU
# nccl (default): the configurations with no more ranks than visible GPUs. gloo1gpu: all of them, every
# rank on one GPU over gloo (tests/megatron_gpu/gloo1gpu.py). RR_JOBS configurations run at once (default 1);
# each is killed after RR_TIMEOUT seconds (400), none runs past RR_DEADLINE (epoch seconds) if set.
# Needs megatron-core importable (the lent machine: pip install the .whl first, see docs/DISTRIBUTED.md).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export RR_TRANSPORT=${RR_TRANSPORT:-nccl}
export CUDA_DEVICE_MAX_CONNECTIONS=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$RR_TRANSPORT" = gloo1gpu ] && GPUS=1024
CONFIGS=("$@")
if [ ${#CONFIGS[@]} -eq 0 ]; then
  mapfile -t CONFIGS < <(python3 -c "
import sys; sys.path.insert(0, 'tests/megatron_gpu')
from run_megatron_gpu import CONFIGS
print('\n'.join(n for n, c in CONFIGS.items() if c['ranks'] <= $GPUS))")
fi
one() {
  local c=$1 n t=${RR_TIMEOUT:-400}
  if [ -n "${RR_DEADLINE:-}" ]; then  # epoch seconds by which every configuration must be done
    t=$(( RR_DEADLINE - $(date +%s) )); [ "$t" -gt "${RR_TIMEOUT:-400}" ] && t=${RR_TIMEOUT:-400}
    [ "$t" -lt 30 ] && { echo "--- $c not started: RR_DEADLINE reached"; return 1; }
  fi
  n=$(python3 -c "import sys; sys.path.insert(0, 'tests/megatron_gpu'); from run_megatron_gpu import CONFIGS; print(CONFIGS['$c']['ranks'])")
  echo "=== $c: $n rank(s), $RR_TRANSPORT, at most ${t}s"
  timeout "$t" torchrun --standalone --nproc_per_node="$n" tests/megatron_gpu/run_megatron_gpu.py \
    --config "$c" --out "$OUT" > "$OUT/megatron_$c.log" 2>&1 || { echo "--- $c failed"; tail -n 30 "$OUT/megatron_$c.log"; return 1; }
}
export -f one
export OUT
status=0
printf '%s\n' "${CONFIGS[@]}" | xargs -P "${RR_JOBS:-1}" -I{} bash -c 'one {}' || status=1
python3 tests/megatron_gpu/run_megatron_gpu.py --summarize "$OUT"
exit $status
