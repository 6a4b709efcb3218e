"""README.md and docs/CHECK.md show what a fresh default ``routereplay check`` prints (one run, ~20 s CPU).

The check runs in a process of its own, as a user's would: the test session's settings (one torch
thread per xdist worker, tests/conftest.py) change the float noise of its last digits (the noise
floor's k3 is ~1e-13)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

for name in ("transformers", "matplotlib", "tqdm"):
    pytest.importorskip(name, reason="routereplay check needs it (pip install 'routereplay[hf,plot,cli]')")
ROOT = Path(__file__).resolve().parents[1]


_FRESH_RUN = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("gen_check_docs", sys.argv[1])
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)
printed = gen.run_check()
print(json.dumps({"printed": printed, "stale": gen.stale(printed)}))
"""


@pytest.mark.slow
def test_check_output_in_the_docs_is_what_a_fresh_run_prints():
    run = subprocess.run(
        [sys.executable, "-c", _FRESH_RUN, str(ROOT / "scripts" / "gen_check_docs.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,  # the status is asserted below, with stderr
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    printed = result["printed"]
    assert result["stale"] == [], f"run `python scripts/gen_check_docs.py`; a fresh run prints:\n{printed}"
    # The gain is visible in both halves of the table: routes and log-probs.
    rows = {line[:26].strip(): line[26:].split() for line in printed.splitlines() if line[26:].strip()}
    without, replay = rows["without replay"], rows["with R3 replay"]
    assert float(without[0]) > 0 and float(replay[0]) == 0  # route disagreement
    assert float(replay[3]) < float(without[3]) / 5  # k3 down at least 5x
