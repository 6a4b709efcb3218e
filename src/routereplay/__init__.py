"""routereplay: record the experts an MoE model chose, and replay them exactly.

    handle = routereplay.attach(model)
    with handle.record() as rec: model(**batch)
    with handle.replay(rec.trace()): model(**batch).loss.backward()

The layers, bottom up: ``core`` (trace, file, layouts, routing math, errors), ``kernels``,
``formats`` (engine payloads), ``runtime`` (attach, the handle, record / replay, recompute),
``adapters`` (HF transformers, Megatron-Core), ``rl`` (RouteStore, capture in generate,
metrics), ``parallel`` (rank slicing, collectives), ``cli``, and ``integrations`` (TRL, verl).
Integrations (transformers, megatron-core, ...) are imported only when a model of theirs is attached.
"""

from routereplay import _compat
from routereplay.core import errors
from routereplay.core.io import load, save
from routereplay.core.routing import RouterSpec, route
from routereplay.core.trace import RoutingTrace
from routereplay.core.version import __version__
from routereplay.runtime.attach import attach
from routereplay.runtime.replay import PreparedTrace
from routereplay.runtime.seam import MoELayer
from routereplay.runtime.session import RouterHandle

_compat.install()

__all__ = [
    "MoELayer",
    "PreparedTrace",
    "RouterHandle",
    "RouterSpec",
    "RoutingTrace",
    "__version__",
    "attach",
    "errors",
    "load",
    "route",
    "save",
]
