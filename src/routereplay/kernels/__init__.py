"""Fused GPU kernels for replay. Importing this package is cheap; Triton is imported on first use.

:func:`route_forced_fused` replays forced expert ids in one Triton launch forward and one backward:
it reads compact ids (uint8 / int16 / int32 / int64) directly, gathers the logits at them, applies
the spec's score function, renormalisation, expert scale and scaling factor, and writes the
``[T, K]`` weights and the int64 ids. Same contract as
``routing.route(logits_TE, spec, forced_TK=...)``.

Only some :class:`~routereplay.routing.RouterSpec` variants are covered. Callers ask first and use
:func:`routereplay.routing.route` (the reference path) for the rest; the kernel never falls back on
its own::

    if kernels.unsupported_reason(spec, logits_dtype=logits_TE.dtype, device=logits_TE.device) is None:
        weights_TK, experts_TK = kernels.route_forced_fused(logits_TE, spec, forced_TK=ids_TK)
    else:
        weights_TK, experts_TK = routing.route(logits_TE, spec, forced_TK=ids_TK)

Legend: T tokens, E logits per token (``spec.num_logits``), K top-k slots.
"""

from __future__ import annotations

import importlib.util

import torch

from routereplay.kernels.coverage import INSTALL_HINT, interpreting, supports, unsupported_reason
from routereplay.routing import RouterSpec

__all__ = ["INSTALL_HINT", "interpreting", "route_forced_fused", "supports", "unsupported_reason"]

def route_forced_fused(
    logits_TE: torch.Tensor,
    spec: RouterSpec,
    *,
    forced_TK: torch.Tensor,
    forced_mask_T: torch.Tensor | None = None,
    bias_E: torch.Tensor | None = None,
    expert_scale_E: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    validate: bool = True,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay ``forced_TK`` with one fused Triton kernel: ``routing.route(..., forced_TK=...)``'s contract.

    Args:
        logits_TE: router output ``[T, num_logits]``, float32 / bfloat16 / float16, on CUDA (or the
            CPU under ``TRITON_INTERPRET=1``).
        spec: a spec :func:`unsupported_reason` accepts.
        forced_TK: integer ``[T, top_k]`` ids, any integer dtype (uint8 / int16 / int32 are read as
            they are, no widening copy); moved to the logits' device if elsewhere.
        forced_mask_T: bool ``[T]``; rows marked False route live (their ids come from
            ``routing``'s live selection, then the same kernel computes every row's weights).
        bias_E: selection bias, required iff ``spec.uses_bias``; used only for live rows.
        expert_scale_E: ``[num_logits]`` per-expert scale, required iff ``spec.uses_expert_scale``.
        out_dtype: the router input's dtype; required iff ``spec.weights_dtype == "input"``.
        validate: check the forced ids (range, duplicates, group limit) as ``route`` does, which
            syncs with the host. With False, an id outside ``[0, num_logits)`` gives NaN weights
            in its row (never a read out of bounds).
        where: prefix for error messages.

    Returns:
        ``(weights_TK, experts_TK)`` as :func:`routereplay.routing.route` returns them: weights
        differentiable w.r.t. ``logits_TE`` (and ``expert_scale_E``), int64 ids.

    Raises:
        RouterSpecError: the spec is not covered (the message gives :func:`unsupported_reason`),
            or the inputs do not fit the spec, as in ``route``.
        ImportError: triton is not installed (the message gives the install command).
    """
    if importlib.util.find_spec("triton") is None:
        raise ImportError(f"routereplay.kernels needs triton: {INSTALL_HINT}")
    from routereplay.kernels.replay_triton import route_forced_fused as impl

    return impl(
        logits_TE,
        spec,
        forced_TK=forced_TK,
        forced_mask_T=forced_mask_T,
        bias_E=bias_E,
        expert_scale_E=expert_scale_E,
        out_dtype=out_dtype,
        validate=validate,
        where=where,
    )
