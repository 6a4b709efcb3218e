"""README.md and docs/CHECK.md show what a fresh default ``routereplay check`` prints (one run, ~20 s CPU)."""

import importlib.util
from pathlib import Path

import pytest

for name in ("transformers", "matplotlib", "tqdm"):
    pytest.importorskip(name, reason="routereplay check needs it (pip install 'routereplay[hf,plot,cli]')")
ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_check_docs", ROOT / "scripts" / "gen_check_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_check_output_in_the_docs_is_what_a_fresh_run_prints():
    gen = _generator()
    printed = gen.run_check()
    assert gen.stale(printed) == [], f"run `python scripts/gen_check_docs.py`; a fresh run prints:\n{printed}"
    # The gain is visible in both halves of the table: routes and log-probs.
    rows = {line[:26].strip(): line[26:].split() for line in printed.splitlines() if line[26:].strip()}
    without, replay = rows["without replay"], rows["with R3 replay"]
    assert float(without[0]) > 0 and float(replay[0]) == 0  # route disagreement
    assert float(replay[3]) < float(without[3]) / 5  # k3 down at least 5x
