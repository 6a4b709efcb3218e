"""The README's first snippet runs as written."""

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_first_snippet_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 15
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "step0.rrt").exists()
