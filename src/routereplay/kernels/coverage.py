"""What the fused replay kernel covers (no Triton import): shared by ``routereplay.kernels`` and
its implementation, so neither imports the other for it."""

from __future__ import annotations

import importlib.util
import os

import torch

from routereplay.routing import RouterSpec

__all__ = ["INSTALL_HINT", "MAX_LOGITS", "MAX_TOP_K", "interpreting", "supports", "unsupported_reason"]

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
