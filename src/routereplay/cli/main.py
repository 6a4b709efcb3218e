"""The ``routereplay`` command: ``check``, ``inspect`` and ``compare``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
it is imported only when chosen, so ``routereplay inspect`` never imports transformers.

Exit status 2 means a usage error, reported in one line on stderr; each subcommand documents
what 0 and 1 mean (for ``check``, 1 is "replay did not reproduce the routes" and nothing else;
for ``compare``, 1 is "the traces route some token differently"). Output piped into a reader that
stops early (``routereplay compare --json A B | head``) ends quietly with status 141, as a shell
reports a process stopped by SIGPIPE.
"""

from __future__ import annotations

import argparse
import os
import sys

from routereplay.core.version import __version__

DESCRIPTION = "The routereplay command: check, inspect and compare."
# 128 + SIGPIPE: what a shell shows for a process that wrote into a closed pipe.
EXIT_BROKEN_PIPE = 141

def _check():
    from routereplay.cli import check

    return check


def _inspect():
    from routereplay.cli import inspect as cli_inspect

    return cli_inspect


def _compare():
    from routereplay.cli import compare as cli_compare

    return cli_compare


# subcommand -> (its module, imported when chosen; one-line help)
COMMANDS = {
    "check": (_check, "measure rollout-vs-trainer routing mismatch and show that replay closes it"),
    "inspect": (_inspect, "summarise a .rrt trace file"),
    "compare": (_compare, "routing agreement between two .rrt trace files"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (argparse prints the usage first) and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Run ``routereplay ARGV``; returns the exit status (see the module docstring)."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader closed the pipe: nothing more can be shown. Point stdout at devnull so that
        # the interpreter's own flush at exit does not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return code


def _main(argv: list[str] | None) -> int:
    parser = _Parser(prog="routereplay", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"routereplay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, description=help_)
    argv = sys.argv[1:] if argv is None else list(argv)
    # Parse the command name first, then let the chosen module define its own arguments.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = COMMANDS[known.command][0]()
    cmd_parser = _Parser(prog=f"routereplay {known.command}", description=COMMANDS[known.command][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
