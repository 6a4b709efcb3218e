"""What the fused replay kernels specialise on, for one (spec, dtypes, device kind): the plan.

:func:`plan_for` turns a :class:`~routereplay.core.routing.RouterSpec` and the dtypes of a call into the
kernels' constexprs (:class:`ReplayPlan`): the dtype each step rounds to, the score function, the
renormalisation, the scaling, and the lane layout of the reductions (see
:mod:`routereplay.kernels.device` for why they are what they are). :func:`block_rows` picks the rows
per program. Pure Python: nothing here imports Triton.

Legend: E logits per token, K top-k slots, KP K padded to a power of two, EW lanes of the
E-softmax, EI columns per lane.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from routereplay.core.routing import RouterSpec
from routereplay.kernels.coverage import cuda_sum_halves_lanes, interpreting

__all__ = ["CODE", "SOFTMAX_E", "ReplayPlan", "block_rows", "compile_options", "plan_for"]

# dtype codes the kernels round to
_F32, _BF16, _F16 = 0, 1, 2
CODE = {torch.float32: _F32, torch.bfloat16: _BF16, torch.float16: _F16}
# score function codes
SOFTMAX_E, _SOFTMAX_K, _SIGMOID, _SQRTSOFTPLUS, _IDENTITY = 0, 1, 2, 3, 4
# scaling codes
_NO_SCALE, _MUL, _MUL_RECIPROCAL, _DIV = 0, 1, 2, 3



def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _last_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayPlan:
    """Everything the kernels specialise on for one (spec, dtypes, device kind): their constexprs."""

    E: int
    K: int
    KP: int
    KB: int
    EW: int
    EI: int
    SCORE: int
    X_CODE: int
    S_CODE: int
    W_CODE: int
    NORM: int
    ADD_EPS: bool
    HAS_SCALE: bool
    P_CODE: int
    SCALE_OP: int
    PRECISE: bool
    HALVES: bool
    factor: float
    eps: float
    weights_dtype: torch.dtype

    def constexprs(self) -> dict:
        """The constexprs both kernels take, in their parameter order."""
        names = ("E", "K", "KP", "KB", "EW", "EI", "SCORE", "X_CODE", "S_CODE", "W_CODE", "NORM", "ADD_EPS")
        out = {name: getattr(self, name) for name in names}
        out.update(HAS_SCALE=self.HAS_SCALE, P_CODE=self.P_CODE, SCALE_OP=self.SCALE_OP)
        return out


@functools.lru_cache(maxsize=256)
def plan_for(
    spec: RouterSpec,
    logits_dtype: torch.dtype,
    scale_dtype: torch.dtype | None,
    out_dtype: torch.dtype | None,
    on_cuda: bool,
) -> ReplayPlan:
    """The kernel constants that reproduce ``route``'s weights for this spec and these dtypes.

    The dtype chain is the reference's: ``x`` in ``compute_dtype`` (or the logits dtype), scores
    in that dtype, cast back to the logits dtype when ``cast_scores``, promoted with the expert
    scale's dtype, then cast to the output dtype the spec names.
    """
    compute = spec.compute_dtype or logits_dtype
    working = logits_dtype if spec.cast_scores else compute
    product = torch.promote_types(working, scale_dtype) if scale_dtype is not None else working
    if spec.weights_dtype == "logits":
        final = logits_dtype
    elif spec.weights_dtype == "input":
        final = out_dtype
    else:
        final = product
    if spec.score_function == "softmax":
        score = SOFTMAX_E if spec.score_before_topk else _SOFTMAX_K
    else:
        score = {"sigmoid": _SIGMOID, "sqrtsoftplus": _SQRTSOFTPLUS, "none": _IDENTITY}[spec.score_function]
    if spec.scaling_factor == 1.0:
        scale_op, factor = _NO_SCALE, 1.0
    elif spec.scaling_op == "mul":
        scale_op, factor = _MUL, float(spec.scaling_factor)
    elif on_cuda:  # PyTorch's CUDA division by a CPU scalar multiplies by its float32 reciprocal
        scale_op, factor = _MUL_RECIPROCAL, float(np.float32(1.0) / np.float32(spec.scaling_factor))
    else:
        scale_op, factor = _DIV, float(spec.scaling_factor)
    ew = min(_next_pow2(spec.num_logits), 32)
    return ReplayPlan(
        E=spec.num_logits,
        K=spec.top_k,
        KP=_next_pow2(spec.top_k),
        KB=min(_last_pow2(spec.top_k), 32),
        EW=ew,
        EI=_next_pow2(spec.num_logits) // ew,
        SCORE=score,
        X_CODE=CODE[compute],
        S_CODE=CODE[compute],
        W_CODE=CODE[working],
        NORM=(2 if spec.norm_kind == "clamp" else 1) if spec.norm_topk_prob else 0,
        ADD_EPS=spec.norm_kind == "sum" and spec.norm_eps != 0.0,
        HAS_SCALE=scale_dtype is not None,
        P_CODE=CODE[product],
        SCALE_OP=scale_op,
        PRECISE=on_cuda and not interpreting(),
        # on the CPU (the interpreter) route() sums in yet another order; pairs are nearer to it
        HALVES=cuda_sum_halves_lanes() if on_cuda else False,
        factor=factor,
        eps=float(spec.norm_eps),
        weights_dtype=final,
    )


def compile_options(plan: ReplayPlan, fp_fusion: bool) -> dict:
    """No flush of denormals in libdevice (PyTorch's kernels keep them), and by default no
    contraction of a multiply and an add into one FMA (the reference's separate roundings)."""
    if not plan.PRECISE:
        return {}  # the interpreter takes no compiler options
    return {"enable_reflect_ftz": False, "enable_fp_fusion": fp_fusion}


def block_rows(plan: ReplayPlan, backward: bool, num_tokens: int | None = None, num_sms: int = 0) -> int:
    """Rows per program. Forward: the softmax over E holds ``[rows, 32]`` tiles (at most 32 rows),
    the other scores only ``[rows, KP]`` (up to 128); with ``num_tokens`` and the device's SM count,
    fewer rows per program, down to 16, until there are about 4 programs per SM (a launch-bound
    16k-row call otherwise runs 128 programs on 132 SMs)."""
    if backward:
        return 16 if plan.KP * plan.EW >= 128 else 32
    cap = 32 if plan.SCORE == SOFTMAX_E else 128
    if num_tokens is None or num_sms <= 0:
        return cap
    want = -(-num_tokens // (4 * num_sms))
    return max(16, min(cap, _next_pow2(max(want, 1))))

