"""The load-balancing (aux) loss under replay: which routes it counts, and a function to choose.

The Switch-Transformer balancing loss has two factors per expert ``e``: ``f_e``, the share of
routes that go to ``e`` (counted from a top-k, not differentiable), and ``P_e``, the mean router
probability of ``e`` (the gradient flows through it). Under replay the experts a token is
dispatched to are the replayed ones, so ``f_e`` can be counted from two top-k's:

* **live** (the default, what both engines do): the top-k the router's *current* logits give.
  transformers' ``load_balancing_loss_func`` re-runs top-k on ``outputs.router_logits``, and
  Megatron-Core (0.16.1, ``TopKRouter.routing``) also re-runs it for the aux loss
  (``compute_routing_scores_for_aux_loss(logits, topk, ...)``), not from the replayed routing map.
  So with routereplay attached, HF and Megatron give the same aux-loss gradient for the same
  logits and routes (``tests/test_aux_loss.py`` pins both), and a replayed run's balancing
  gradient is the one the run would get without replay: the regulariser keeps acting on the
  router's own preferences, which is what it is for (replay fixes the *dispatch*, not the router).
* **replayed**: :func:`load_balancing_loss` with ``routes=`` counts the experts the forward was
  dispatched to (replayed rows; rows replay left live count their live top-k). Use it in place of
  ``outputs.aux_loss`` (call the model with ``output_router_logits=True`` and without ``labels``,
  or subtract the model's own term) when the balance of the actual dispatch is what you want to
  penalise.

Nothing is patched: the default is the engines' own code, the alternative an explicit call.

Legend: N router rows of one layer (``B * S``, HF's flattened batch), E experts, K top-k,
B sequences, S padded length, T real tokens (rows of the trace), L MoE layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from routereplay.core.errors import MetricInputError, TraceMismatchError
from routereplay.core.trace import RoutingTrace

__all__ = ["load_balancing_loss"]


def _selected(probs_NE: torch.Tensor, top_k: int, routes_TK: torch.Tensor | None, rows_T: torch.Tensor) -> torch.Tensor:
    """Per router row, the K experts counted: live top-k, overwritten on replayed rows."""
    ids_NK = torch.topk(probs_NE, top_k, dim=-1).indices
    if routes_TK is not None:
        ids_NK = ids_NK.index_copy(0, rows_T.to(ids_NK.device), routes_TK.to(ids_NK.device, torch.int64))
    return ids_NK


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    *,
    top_k: int,
    routes: RoutingTrace | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' Switch balancing loss, counting live or replayed routes.

    With ``routes=None`` it equals transformers' ``load_balancing_loss_func(router_logits,
    num_experts, top_k, attention_mask)`` (the value a model returns as ``aux_loss``; the model
    multiplies it by ``router_aux_loss_coef``): ``E * sum_e f_e * P_e`` with ``f_e`` the top-k
    assignments to ``e`` per real row and ``P_e`` the mean softmax probability, both pooled over
    the layers as transformers pools them. A layer's Megatron aux loss with coefficient 1 is this
    value (of that layer alone) divided by K.

    Args:
        router_logits: per MoE layer, ``[N, E]`` logits (``outputs.router_logits`` of a forward
            with ``output_router_logits=True``), in the handle's layer order.
        top_k: experts per token.
        routes: the trace replayed in that forward (training rows, the one given to
            ``handle.replay(routes, attention_mask=...)``); its experts replace the live top-k on
            its rows, except rows with ``valid`` False (those were routed live). None: live top-k.
        attention_mask: ``[B, S]`` with ``B * S == N``; its real positions (row-major) are the
            rows counted and, with ``routes``, the trace's rows in order. None: every row is real.

    Returns:
        A 0-dim float32 tensor, differentiable with respect to ``router_logits``.

    Raises:
        MetricInputError: no layers, layers of different shapes, or an ``attention_mask`` that
            does not cover the ``N`` rows.
        TraceMismatchError: ``routes`` with another layer count, top-k, expert count, or a number
            of rows other than the real rows of ``attention_mask``.
    """
    logits = list(router_logits)
    if not logits:
        raise MetricInputError(
            "load_balancing_loss: router_logits has no layers; call the model with output_router_logits=True"
        )
    N, E = logits[0].shape
    for i, x in enumerate(logits):
        if tuple(x.shape) != (N, E):
            raise MetricInputError(
                f"load_balancing_loss: router_logits[{i}] is {tuple(x.shape)}, layer 0 is {(N, E)}; every layer must "
                "see the same [rows, experts]"
            )
    device = logits[0].device
    if attention_mask is None:
        real_N = torch.ones(N, dtype=torch.bool, device=device)
    else:
        if attention_mask.numel() != N:
            raise MetricInputError(
                f"load_balancing_loss: attention_mask {tuple(attention_mask.shape)} has {attention_mask.numel()} "
                f"positions but each layer's router_logits has {N} rows; pass the [B, S] mask of that forward"
            )
        real_N = attention_mask.reshape(-1).to(device).bool()
    rows_T = real_N.nonzero().squeeze(1)
    experts_TLK = None
    if routes is not None:
        found = (routes.num_layers, routes.top_k, routes.num_experts, routes.num_tokens)
        want = (len(logits), top_k, E, rows_T.numel())
        if found != want:
            raise TraceMismatchError(
                "load_balancing_loss: routes has (layers, top_k, num_experts, rows) = "
                f"{found} but router_logits and attention_mask give {want}; pass the trace replayed in the forward "
                "that returned these router_logits, with its attention_mask"
            )
        valid_T = routes.valid_mask.to(device)
        rows_T = rows_T[valid_T]
        experts_TLK = routes.experts.to(device)[valid_T]
    weights_N = real_N.float()
    counts_E = torch.zeros(E, dtype=torch.float32, device=device)
    prob_sum_E = torch.zeros(E, dtype=torch.float32, device=device)
    for layer, logits_NE in enumerate(logits):
        probs_NE = torch.softmax(logits_NE, dim=-1)
        ids_NK = _selected(probs_NE, top_k, None if experts_TLK is None else experts_TLK[:, layer], rows_T)
        counts_E = counts_E.index_add(0, ids_NK.reshape(-1), weights_N.repeat_interleave(top_k))
        prob_sum_E = prob_sum_E + (probs_NE.float() * weights_N[:, None]).sum(0)
    rows = weights_N.sum() * len(logits)
    return E * torch.sum((counts_E / rows) * (prob_sum_E / rows))
