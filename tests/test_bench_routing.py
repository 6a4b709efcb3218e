"""benchmarks/bench_routing_gpu.py runs on the CPU as it will on the lent GPU (issue 21 item 4):
``--smoke`` (tiny shapes, the kernels under Triton's interpreter) and ``--host-cost --smoke`` (the
launch stubbed), each in a subprocess so that ``TRITON_INTERPRET`` does not leak. Logic only: the
numbers of two repetitions mean nothing, the checks and the keys the GPU tables read do."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_routing_gpu.py"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("megatron") is None,
    reason="needs triton and megatron-core: pip install 'routereplay[triton,megatron]'",
)


def _run(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OUT": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(SCRIPT), *args]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_smoke_checks_the_kernels_and_counts_the_allocator(tmp_path):
    run = _run(tmp_path, "--smoke", "--cases", "2,3")
    (big, small) = json.loads((tmp_path / "bench_routing_gpu.json").read_text())["results"]
    for case in (big, small):
        check = case["check"]
        assert check["ids_equal"] and check["prepared_ids_equal"], check
        assert check["grad_rel_err"] < 1e-5, check
        per_layer = case["forward_backward_per_layer_us"]
        assert set(per_layer) == {"layers", "megatron_replay_gpu_ids", "route_uint8_gpu_ids", "prepared_uint8_gpu_ids"}
        assert set(case["forward_backward_per_layer_wall_us"]) == set(per_layer) - {"layers"}
        churn = case["allocator_during_forward_backward"]
        assert {f"per_layer_{k}" for k in per_layer if k != "layers"} <= set(churn), churn
        assert all(v["num_device_alloc"] == 0 for v in churn.values()), churn  # the CPU has no CUDA allocator
    assert "CUDA allocator calls during each forward + backward timing" in run.stdout


def test_host_cost_compares_every_path_with_megatron(tmp_path):
    run = _run(tmp_path, "--host-cost", "--smoke")
    result = json.loads((tmp_path / "bench_routing_host_cost.json").read_text())
    assert len(result) == 4
    for case in result.values():
        assert min(case["kept_launchers"]) >= 1  # the stubbed direct launch path was taken
        for path in ("megatron", "route", "prepared"):
            assert set(case[path]) == {"forward_us", "forward_backward_us", "per_layer_us"}
    assert "ratio to Megatron's replay" in run.stdout
