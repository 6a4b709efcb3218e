"""What the fused replay kernel covers (no Triton import): shared by ``routereplay.kernels`` and
its implementation, so neither imports the other for it."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import torch

from routereplay.core.errors import RouterSpecError
from routereplay.core.routing import RouterSpec

__all__ = [
    "INSTALL_HINT",
    "MAX_LOGITS",
    "MAX_TOP_K",
    "cuda_sum_halves_lanes",
    "interpreting",
    "supports",
    "ulp_bound",
    "unsupported_reason",
]

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


@functools.cache
def cuda_sum_halves_lanes() -> bool:
    """True when this torch build's CUDA ``sum`` over a short last dim combines a warp's lanes by
    halving offsets (``dim_x/2, ..., 2, 1``), False when by doubling ones (``1, 2, ..., dim_x/2``).

    ``ReduceOp::block_x_reduce`` (``ATen/native/cuda/Reduce.cuh``) used doubling offsets until
    pytorch/pytorch#164790 (torch 2.10) switched CUDA builds to halving ones, which is the order of
    a warp's xor-butterfly and of Triton's own reductions; ROCm builds kept doubling. The order
    decides the float32 sum of the top-k weights that a renormalisation divides by, so the kernel
    reproduces the one this build uses: read from the header the build ships, or, without it,
    from the version.
    """
    if torch.version.hip is not None:
        return False
    header = Path(torch.__file__).parent / "include" / "ATen" / "native" / "cuda" / "Reduce.cuh"
    try:
        text = header.read_text()
    except OSError:
        major, minor = (int(v) for v in torch.__version__.split(".")[:2])
        return (major, minor) >= (2, 10)
    return "offset = dim_x >> 1; offset > 0" in text


def ulp_bound(spec: RouterSpec, logits_dtype: torch.dtype) -> int:
    """What the fused kernel promises on CUDA: the largest distance, in ulp of the weights' dtype,
    between its forward weights and :func:`routereplay.core.routing.route`'s on the same device.

    0 for every spec the kernel covers: it performs the float operations ``route`` performs on
    CUDA, in the same order and with the same roundings (``routereplay.kernels.device`` says how),
    so the weights are bit for bit equal and the ids identical. The one order that depends on the
    torch build, the sum of the top-k weights, is read from the build
    (:func:`cuda_sum_halves_lanes`). Not promised: the backward (compared with ``route``'s
    autograd within a relative tolerance: 1e-6 float32, 2e-2 bfloat16), ``fp_fusion=True``, and
    Triton's CPU interpreter (NumPy's exp and torch's CPU reduction orders: the CPU tests hold it
    to 4 ulp of the logits dtype).

    Args:
        spec: the router's spec.
        logits_dtype: dtype of the logits the kernel will read.

    Returns:
        The bound in ulp (an int; 0 means bit-exact).

    Raises:
        RouterSpecError: the kernel does not cover ``spec`` / ``logits_dtype`` (the message gives
            :func:`unsupported_reason`).
    """
    reason = unsupported_reason(spec, logits_dtype=logits_dtype)
    if reason is not None:
        raise RouterSpecError(
            f"the fused replay kernel does not cover this {spec.family or 'router'} spec: {reason}; "
            "no bound applies, routing.route replays it"
        )
    return 0
