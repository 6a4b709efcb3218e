"""docs/MODELS.md is generated: it must match what the adapter does with the installed transformers."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]


def test_models_md_is_up_to_date():
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_models_md.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,  # the status is asserted below, with the generator's stderr
    )
    assert run.returncode == 0, f"docs/MODELS.md is stale: run `python scripts/gen_models_md.py`\n{run.stderr[-2000:]}"
