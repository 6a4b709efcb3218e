"""Fused GPU kernels for replay. Importing this package is cheap; Triton is imported on first use.

:func:`route_forced_fused` replays forced expert ids in one Triton launch forward and one backward:
it reads compact ids (uint8 / int16 / int32 / int64) directly, gathers the logits at them, applies
the spec's score function, renormalisation, expert scale and scaling factor, and writes the
``[T, K]`` weights and the int64 ids. Same contract as
``routing.route(logits_TE, spec, forced_TK=...)``.

Inside a replay, prepare once per layer and call per forward: :func:`prepare_fused` does the spec
and dtype work up front, and its call checks only what keeps the launch memory-safe, then launches
the already-compiled kernel directly (the host cost of a call is most of its cost at 16k tokens)::

    fused = kernels.prepare_fused(spec, logits_dtype=torch.bfloat16, device=logits_TE.device)
    weights_TK, experts_TK = fused(logits_TE, ids_TK)   # ids validated by the caller

What it promises (:func:`ulp_bound`): on CUDA the forward weights are bit for bit ``route()``'s,
and the ids identical, for every spec it covers (0 ulp); the backward matches ``route()``'s
autograd within a relative 1e-6 (float32) / 2e-2 (bfloat16). Under Triton's CPU interpreter (CI)
the forward is within 4 ulp of the logits dtype (NumPy's exp, torch's CPU reduction orders).

Only some :class:`~routereplay.core.routing.RouterSpec` variants are covered. Callers ask first and use
:func:`routereplay.core.routing.route` (the reference path) for the rest; the kernel never falls back on
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

from routereplay.core.routing import RouterSpec
from routereplay.kernels.coverage import INSTALL_HINT, interpreting, supports, ulp_bound, unsupported_reason

__all__ = [
    "INSTALL_HINT",
    "interpreting",
    "prepare_fused",
    "route_forced_fused",
    "supports",
    "ulp_bound",
    "unsupported_reason",
]


def prepare_fused(
    spec: RouterSpec,
    *,
    logits_dtype: torch.dtype,
    device: torch.device | str,
    scale_dtype: torch.dtype | None = None,
    out_dtype: torch.dtype | None = None,
    where: str = "",
):
    """A prepared fused replay for one router: ``fused(logits_TE, forced_TK, forced_mask_T=None,
    bias_E=None, expert_scale_E=None) -> (weights_TK, ids_TK)``.

    The call has ``route_forced_fused(..., validate=False)``'s semantics (ids validated by the
    caller; any integer id dtype, on the device or in pinned host memory; rows whose
    ``forced_mask_T`` is False route live) at a fraction of its host cost: the spec, dtype and
    coverage work happens here, once.

    Args:
        spec: the router's spec (see :func:`unsupported_reason`).
        logits_dtype: dtype of the logits every call passes.
        device: their device (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
        scale_dtype: the per-expert scale's dtype; required iff ``spec.uses_expert_scale``.
        out_dtype: the router input's dtype; required iff ``spec.weights_dtype == "input"``.
        where: prefix for error messages (e.g. ``"layer 7 (model.layers.7.mlp.gate): "``).

    Returns:
        A ``routereplay.kernels.replay_triton.PreparedReplay``; its call raises RouterSpecError for
        inputs that do not fit the prepared spec, dtypes or device.

    Raises:
        RouterSpecError: the kernel does not cover the spec, dtype or device (the message gives
            :func:`unsupported_reason`), or a dtype the spec needs is missing.
        ImportError: triton is not installed (the message gives the install command).
    """
    if importlib.util.find_spec("triton") is None:
        raise ImportError(f"routereplay.kernels needs triton: {INSTALL_HINT}")
    from routereplay.kernels.replay_triton import PreparedReplay

    return PreparedReplay(
        spec, logits_dtype=logits_dtype, device=device, scale_dtype=scale_dtype, out_dtype=out_dtype, where=where
    )


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
        ``(weights_TK, experts_TK)`` as :func:`routereplay.core.routing.route` returns them: weights
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
