"""benchmarks/run_gpu.sh runs what it names (issue 21: `timeout` ran huggingface_hub's `hf` program
instead of the script's shell function of that name). DRY_RUN=1 checks every step on the CPU."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"


@pytest.mark.parametrize(
    ("part", "steps"),
    [
        ("tiers", ["gpu_tier", "kernels_gpu", "gpu_generate"]),
        ("bench", ["routing", "hf1024", "hf1024_triton", "hf2048", "capture"]),
        ("profile", ["profile_capture", "capture_pieces", "profile_routing", "profile_replay"]),
        ("step3", ["hf1024_triton_1", "hf1024_triton_2", "hf1024_triton_3"]),
        ("capture", ["capture2048", "capture"]),
        (
            "owed",
            ["capture", "gpu_generate", "capture_pieces"]
            + [f"hf1024_triton_{i}" for i in (1, 2, 3)]
            + ["capture2048"],
        ),
        (
            "verify",
            ["gpu_tier"] + [f"{s}_{i}" for i in (1, 2, 3) for s in ("capture", "hf1024_triton")],
        ),
        ("routing3", ["offload_ckpt"] + [f"routing_{i}" for i in (1, 2, 3)]),
        ("paired", ["routing_profile", "replay_kernels"] + [f"hf1024_paired_{i}" for i in (1, 2, 3)]),
        ("check", ["make_model", "check"]),
    ],
)
def test_every_step_names_a_program_and_existing_files(part, steps, tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path), "PART": part}
    run = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert re.findall(r"^(\w+) rc=(\d+)", summary, re.MULTILINE) == [(s, "0") for s in steps], summary
    for s in steps:
        assert (tmp_path / f"{s}.txt").read_text().startswith("would run: "), s
    if part == "bench":  # the HF step runs the script, with the shared arguments and the step's own
        hf = (tmp_path / "hf1024.txt").read_text()
        assert re.match(r"would run: python3 \S*/bench_hf_overhead\.py --device cuda .* --hidden 1024 ", hf), hf


def test_dry_check_refuses_a_shell_function():
    body = re.search(r"^dry_check\(\) \{.*?^\}", SCRIPT.read_text(), re.DOTALL | re.MULTILINE).group(0)
    script = f"{body}\nhf() {{ :; }}\ndry_check hf --hidden 1024"
    run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert run.returncode == 127
    assert run.stdout.strip() == "'hf' is not a program (type: function); timeout cannot run it"
