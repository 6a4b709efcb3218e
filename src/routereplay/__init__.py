"""routereplay: record the experts an MoE model chose, and replay them exactly.

    handle = routereplay.attach(model)
    with handle.record() as rec: model(**batch)
    with handle.replay(rec.trace()): model(**batch).loss.backward()

Integrations (transformers, megatron-core, ...) are imported only when a model of theirs is attached.
"""

from routereplay import errors
from routereplay.attach import attach
from routereplay.io import load, save
from routereplay.replay import PreparedTrace
from routereplay.routing import RouterSpec, route
from routereplay.seam import MoELayer
from routereplay.session import RouterHandle
from routereplay.trace import RoutingTrace

__all__ = [
    "MoELayer",
    "PreparedTrace",
    "RouterHandle",
    "RouterSpec",
    "RoutingTrace",
    "attach",
    "errors",
    "load",
    "route",
    "save",
]
__version__ = "0.1.0"
