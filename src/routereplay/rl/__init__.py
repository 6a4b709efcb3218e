"""RL on top of the runtime: ``store`` (``RouteStore`` for R2 / R3 in a plain loop, ``DispatchTap``),
``metrics`` (routing agreement, log-prob mismatch), ``aux_loss`` (the load-balancing loss under
replay). ``from routereplay.rl import RouteStore``. Capture in ``generate`` is a runtime mode
(``routereplay.runtime.rollout``, ``handle.capture_generation()``).
"""

from routereplay.rl.store import DispatchTap, RouteStore, token_logprobs

__all__ = ["DispatchTap", "RouteStore", "token_logprobs"]
