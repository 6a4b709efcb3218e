"""The README's first snippet runs as written."""

import re
import runpy
from pathlib import Path

import pytest

pytest.importorskip("transformers")
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_first_snippet_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    assert len(code.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    snippet = tmp_path / "readme_snippet.py"
    snippet.write_text(code)
    runpy.run_path(str(snippet), run_name="__main__")
    assert (tmp_path / "step0.rrt").exists()
