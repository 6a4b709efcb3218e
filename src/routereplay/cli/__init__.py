"""The ``routereplay`` command (``main``): ``check``, ``inspect``, ``compare``, and their ``plots``."""

from routereplay.cli.main import main

__all__ = ["main"]
