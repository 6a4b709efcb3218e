"""RL on top of the runtime: ``store`` (``RouteStore`` for R2 / R3 in a plain loop, ``DispatchTap``),
``rollout`` (capture in ``generate``), ``metrics`` (routing agreement, log-prob mismatch),
``aux_loss`` (the load-balancing loss under replay). ``from routereplay.rl import RouteStore``.
"""

from routereplay.rl.store import DispatchTap, RouteStore, token_logprobs

__all__ = ["DispatchTap", "RouteStore", "token_logprobs"]
