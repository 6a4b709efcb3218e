"""README's "install into an existing environment", run: an editable install with extras into a
trainer's environment reinstalls nothing it already has, and needs no package index at all.

The "trainer's environment" is a fresh venv that sees this interpreter's packages (torch,
transformers, trl, ...) through a ``.pth`` line. ``venv --system-site-packages`` would not do:
made from a venv's python it exposes the *base* interpreter's site-packages, without torch.
The install runs with ``--no-index``: had pip wanted to download or reinstall anything (torch
above all), it would fail. ``--no-build-isolation`` builds with the setuptools already there
(an isolated build would fetch one from the index); pip itself is the environment's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

for _name in ("transformers", "trl", "matplotlib", "tqdm"):
    pytest.importorskip(_name, reason="the extras installed here must already be in the environment")
pytest.importorskip(
    "setuptools", minversion="77", reason="the editable build uses the environment's setuptools (pyproject: >= 77)"
)
ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _run(*cmd, **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_readme_documents_the_checkout_install():
    assert "pip install -e '.[trl]'" in README and "No package index has routereplay" in README
    assert "pip install --no-index --no-build-isolation -e '.[trl]'" in README  # what the test below runs


@pytest.mark.slow
def test_editable_install_with_extras_into_an_existing_environment(tmp_path):
    # A copy of the checkout, so that the build's egg-info does not land in the tree under test.
    checkout = tmp_path / "routereplay"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    shutil.copytree(ROOT / "src", checkout / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    venv = tmp_path / "trainer-env"
    # Without pip: ensurepip would put an old setuptools in front of the environment's own.
    _run(sys._base_executable, "-m", "venv", "--without-pip", str(venv))
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "trainer_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    out = _run(
        str(py), "-m", "pip", "install", "--no-index", "--no-build-isolation", "-e", f"{checkout}[trl,cli,plot]",
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""},
    )
    installed = re.search(r"^Successfully installed (.*)$", out, re.MULTILINE)
    assert installed is not None and installed.group(1).split() == ["routereplay-0.1.0"], out

    where = _run(
        str(py), "-c",
        "import routereplay, torch, trl; from routereplay.integrations import trl as rt; "
        "print(routereplay.__file__); print(torch.__file__)",
        env={**os.environ, "PYTHONPATH": ""},
    ).splitlines()
    assert where[0] == str(checkout / "src" / "routereplay" / "__init__.py")
    assert where[1].startswith(sysconfig.get_paths()["purelib"])  # the environment's own torch, not a new one
    version = _run(str(venv / "bin" / "routereplay"), "--version", env={**os.environ, "PYTHONPATH": ""})
    assert version == "routereplay 0.1.0\n"
