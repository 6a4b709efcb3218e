"""Deprecated module paths of routereplay 0.1 (before the package was cut into layers).

``import routereplay.layout`` still works and gives ``routereplay.core.layout`` itself (the same
module object, so a patch through either name is seen by both), with a ``DeprecationWarning``
that names the new path. ``routereplay.errors`` stays a stable name, without a warning. The module
path ``routereplay.attach`` is gone: the name is the ``attach`` function.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module path -> where it lives now
MOVED = {
    "routereplay.errors": "routereplay.core.errors",
    "routereplay.trace": "routereplay.core.trace",
    "routereplay.io": "routereplay.core.io",
    "routereplay.layout": "routereplay.core.layout",
    "routereplay.routing": "routereplay.core.routing",
    "routereplay.seam": "routereplay.runtime.seam",
    "routereplay.session": "routereplay.runtime.session",
    "routereplay.record": "routereplay.runtime.record",
    "routereplay.replay": "routereplay.runtime.replay",
    "routereplay.recompute": "routereplay.runtime.recompute",
    "routereplay.rollout": "routereplay.runtime.rollout",
    "routereplay.metrics": "routereplay.rl.metrics",
    "routereplay.aux_loss": "routereplay.rl.aux_loss",
    "routereplay.distributed": "routereplay.parallel.collectives",
    "routereplay.check": "routereplay.cli.check",
    "routereplay.cli_inspect": "routereplay.cli.inspect",
    "routereplay.cli_compare": "routereplay.cli.compare",
    "routereplay.plots": "routereplay.cli.plots",
}
_STABLE = {"routereplay.errors"}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and loads it as the module that now holds it."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        if spec.name not in _STABLE:
            warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        """The module is the new one, already executed."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` once per process (idempotent)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
