"""Write the output of a fresh ``routereplay check`` (the default run) into README.md and docs/CHECK.md.

    .venv/bin/python scripts/gen_check_docs.py            # runs the check, rewrites both blocks
    .venv/bin/python scripts/gen_check_docs.py --check    # exit 1 if either block is stale

Each file holds the output between ``<!-- routereplay-check-output -->`` and
``<!-- /routereplay-check-output -->``: README.md the table alone, docs/CHECK.md everything the
check prints but its last line (which names the output directory). The check runs on the CPU,
so the numbers are this torch build's on a CPU; they are what a user who runs ``make check`` on a
CPU sees.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- routereplay-check-output -->", "<!-- /routereplay-check-output -->"
DOCS = ("README.md", "docs/CHECK.md")
_BLOCK = re.compile(re.escape(BEGIN) + r"\n```text\n.*?```\n" + re.escape(END), re.DOTALL)


def run_check() -> str:
    """What ``routereplay check`` prints to stdout with its defaults (exit status 0 required)."""
    from routereplay.cli.main import main

    out = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(out):
        code = main(["check", "--out", tmp])
    if code != 0:
        raise SystemExit(f"routereplay check exited with {code}:\n{out.getvalue()}")
    return out.getvalue()


def blocks(printed: str) -> dict[str, str]:
    """The text each doc shows, from the check's stdout."""
    lines = printed.rstrip("\n").splitlines()
    if not lines[-1].startswith("wrote "):
        raise SystemExit(f"unexpected check output, its last line is {lines[-1]!r}")
    table_start = next(i for i, line in enumerate(lines) if "route disagr." in line)
    table_end = lines.index("", table_start)
    return {"README.md": "\n".join(lines[table_start:table_end]), "docs/CHECK.md": "\n".join(lines[:-1])}


def render(text: str, block: str, name: str) -> str:
    """``text`` with its marked block replaced by ``block``."""
    if len(_BLOCK.findall(text)) != 1:
        raise SystemExit(f"{name}: expected one {BEGIN} ... {END} block around a ```text fence")
    return _BLOCK.sub(lambda _: f"{BEGIN}\n```text\n{block}\n```\n{END}", text)


def stale(printed: str) -> list[str]:
    """The docs whose block differs from ``printed``."""
    new = blocks(printed)
    return [name for name in DOCS if render((ROOT / name).read_text(), new[name], name) != (ROOT / name).read_text()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a doc is stale instead of writing it")
    args = parser.parse_args()
    printed = run_check()
    if args.check:
        names = stale(printed)
        if names:
            print(f"stale: {', '.join(names)}; run python scripts/gen_check_docs.py\n{printed}", file=sys.stderr)
        return 1 if names else 0
    for name, block in blocks(printed).items():
        path = ROOT / name
        path.write_text(render(path.read_text(), block, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
