"""routereplay: record the experts an MoE model chose, and replay them exactly."""

from routereplay import errors
from routereplay.trace import RoutingTrace

__all__ = ["RoutingTrace", "errors"]
__version__ = "0.1.0"
