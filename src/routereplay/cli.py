"""The ``routereplay`` command: ``check``, ``inspect`` and ``compare``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when chosen, so ``routereplay inspect`` never imports transformers.

Exit status 2 means a usage error, reported in one line on stderr; each subcommand documents
what 0 and 1 mean (for ``check``, 1 is "replay did not reproduce the routes" and nothing else).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS = {
    "check": ("routereplay.check", "measure rollout-vs-trainer routing mismatch and show that replay closes it"),
    "inspect": ("routereplay.cli_inspect", "summarise a .rrt trace file"),
    "compare": ("routereplay.cli_compare", "routing agreement between two .rrt trace files"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (argparse prints the usage first) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="routereplay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)
    argv = sys.argv[1:] if argv is None else list(argv)
    # Parse the command name first, then let the chosen module define its own arguments.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(COMMANDS[known.command][0])
    cmd_parser = _Parser(prog=f"routereplay {known.command}", description=COMMANDS[known.command][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
