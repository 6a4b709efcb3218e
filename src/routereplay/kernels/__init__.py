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
import os

import torch

from routereplay.routing import RouterSpec

__all__ = ["INSTALL_HINT", "route_forced_fused", "supports", "unsupported_reason"]

INSTALL_HINT = "pip install 'routereplay[triton]'"

# dtypes the kernel loads and rounds to (fp64 would need a float64 pipeline in the kernel)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MAX_TOP_K = 32  # the K-sum emulates CUDA's reduction order for blocks of at most 32 lanes
MAX_LOGITS = 1024  # torch's one-warp softmax (the order the kernel reproduces) covers E <= 1024


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(
    spec: RouterSpec,
    *,
    logits_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> str | None:
    """Why :func:`route_forced_fused` cannot replay ``spec``, or None when it can.

    Args:
        spec: the router's spec.
        logits_dtype: dtype of the logits the call will pass (checked when given).
        device: device of the logits (checked when given): CUDA, or the CPU under Triton's
            interpreter (``TRITON_INTERPRET=1`` set before triton is imported).

    Returns:
        None, or one sentence naming the field and value the kernel does not cover.
    """
    if importlib.util.find_spec("triton") is None:
        return f"triton is not installed: {INSTALL_HINT}"
    if spec.norm_topk_prob and spec.norm_kind == "p_norm":
        return "norm_kind='p_norm' (DBRX) is not fused: torch.norm's reduction order is not reproduced"
    if spec.top_k > MAX_TOP_K:
        return f"top_k={spec.top_k} > {MAX_TOP_K}"
    if spec.score_before_topk and spec.score_function == "softmax" and spec.num_logits > MAX_LOGITS:
        return f"softmax over num_logits={spec.num_logits} > {MAX_LOGITS} experts"
    if spec.compute_dtype is not None and spec.compute_dtype not in _FLOATS:
        return f"compute_dtype={spec.compute_dtype} (the kernel computes in float32, bfloat16 or float16)"
    if logits_dtype is not None and logits_dtype not in _FLOATS:
        return f"logits dtype {logits_dtype} (the kernel reads float32, bfloat16 or float16)"
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda" and not interpreting():
            return f"logits on {device}: the kernel runs on CUDA (or on the CPU with TRITON_INTERPRET=1)"
    return None


def supports(
    spec: RouterSpec, *, logits_dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> bool:
    """True when :func:`route_forced_fused` covers ``spec`` (see :func:`unsupported_reason`)."""
    return unsupported_reason(spec, logits_dtype=logits_dtype, device=device) is None


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
