"""The ``routereplay`` command: ``check``, ``inspect`` and ``compare``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when chosen, so ``routereplay inspect`` never imports transformers.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routereplay", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)
    argv = sys.argv[1:] if argv is None else list(argv)
    # Parse the command name first, then let the chosen module define its own arguments.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(COMMANDS[known.command][0])
    cmd_parser = argparse.ArgumentParser(prog=f"routereplay {known.command}", description=COMMANDS[known.command][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
