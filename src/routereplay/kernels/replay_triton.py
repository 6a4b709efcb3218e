"""Fused forced-id replay in Triton: one launch forward, one backward.

Importing this module imports triton (``pip install 'routereplay[triton]'``); use it through
:mod:`routereplay.kernels`, which says which specs it covers.

The forward kernel follows :func:`routereplay.routing.route`'s pipeline after the selection, in
the same order and with the same roundings (every dtype cast of the reference is a rounding here,
``_round``)::

    ids_TK     = forced_TK (compact dtype, read as is) | live ids where forced_mask_T is False
    x_TK       = logits_TE[ids_TK]                       rounded to compute_dtype
    scores_TK  = softmax over E at ids_TK                 (score_before_topk, softmax)
               | softmax over the K gathered logits       (softmax after the top-k)
               | sigmoid / sqrt(softplus) / identity      (elementwise: before = after the top-k)
    weights_TK = scores_TK / (sum_K + eps | clamp(sum_K, eps))
    weights_TK = weights_TK * expert_scale_E[ids_TK] * scaling_factor   (or / scaling_factor)
    weights_TK -> the spec's output dtype;  ids_TK -> int64

Why it can be bit for bit equal to ``route`` on CUDA: each reduction is written out in the order
PyTorch's CUDA kernels use for these shapes, so the float32 operations are the same ones:

* softmax over E (<= 1024, one warp a row, ``PersistentSoftmax.cuh``): lane ``l`` holds columns
  ``l, l + W, l + 2W, ...`` (``W = min(next_pow2(E), 32)``), sums its ``exp(x - max)`` in column
  order from 0, then the lanes combine by xor-butterfly (offsets W/2, ..., 1); ``_sum_halves``
  does exactly these additions. The output is ``exp(x - max) / sum`` (IEEE division).
* the sum over K of ``[T, K]`` weights (``Reduce.cuh``, K < 128 on the contiguous dim): lane ``l``
  of ``B = min(last_pow2(K), 32)`` lanes accumulates columns ``l, l + B`` (in that order), then
  the lanes combine by shuffle-down with offsets 1, 2, 4, ... (``_sum_torch_k``).
* exp, log1p are libdevice's (the CUDA math library's ``expf``/``log1pf``, which PyTorch's kernels
  call), divisions and square roots are IEEE round-to-nearest (``div_rn``, ``sqrt_rn``);
  ``w / scaling_factor`` is ``w * (1 / scaling_factor)`` on CUDA (PyTorch divides by a CPU scalar
  so) and a true division on the CPU.

Where this cannot hold, a bound is stated and tested (tests/test_kernels*.py): under Triton's CPU
interpreter exp and log1p are NumPy's and PyTorch's CPU kernels reduce in another order; the
backward (a few fused multiply-adds and sums whose order autograd does not fix) is compared with
``route``'s autograd within a relative tolerance, not bit for bit.

Legend: T tokens, E logits per token (``spec.num_logits``), K top-k slots, KP K padded to a power
of two, EW lanes of the E-softmax (``min(next_pow2(E), 32)``), EI columns per lane.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from routereplay import routing
from routereplay.errors import RouterSpecError
from routereplay.kernels.coverage import interpreting, unsupported_reason
from routereplay.routing import RouterSpec, check_route_args

__all__ = ["ReplayPlan", "plan_for", "route_forced_fused"]

# dtype codes the kernels round to
_F32, _BF16, _F16 = 0, 1, 2
_CODE = {torch.float32: _F32, torch.bfloat16: _BF16, torch.float16: _F16}
# score function codes
_SOFTMAX_E, _SOFTMAX_K, _SIGMOID, _SQRTSOFTPLUS, _IDENTITY = 0, 1, 2, 3, 4
# scaling codes
_NO_SCALE, _MUL, _MUL_RECIPROCAL, _DIV = 0, 1, 2, 3


# --- device helpers ---------------------------------------------------------------------------
@triton.jit
def _round(x, CODE: tl.constexpr):
    """float32 ``x`` rounded to the dtype ``CODE`` (and back): one dtype cast of the reference."""
    if CODE == 1:
        x = x.to(tl.bfloat16).to(tl.float32)
    elif CODE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    if PRECISE:
        y = libdevice.exp(x)
    else:  # the interpreter has no libdevice
        y = tl.exp(x)
    return y


@triton.jit
def _log1p(u, PRECISE: tl.constexpr):
    if PRECISE:
        y = libdevice.log1p(u)
    else:  # log(1 + u) * u / ((1 + u) - 1): accurate where 1 + u rounds (Goldberg)
        v = 1.0 + u
        y = tl.where(v == 1.0, u, tl.log(v) * u / (v - 1.0))
    return y


@triton.jit
def _halve(x, BLOCK_T: tl.constexpr, HALF: tl.constexpr):
    """``[BLOCK_T, 2 * HALF]`` -> ``[BLOCK_T, HALF]``: column i + column i + HALF."""
    lo, hi = tl.split(tl.permute(tl.reshape(x, [BLOCK_T, 2, HALF]), (0, 2, 1)))
    return lo + hi


@triton.jit
def _pair(x, BLOCK_T: tl.constexpr, HALF: tl.constexpr):
    """``[BLOCK_T, 2 * HALF]`` -> ``[BLOCK_T, HALF]``: column 2i + column 2i + 1."""
    even, odd = tl.split(tl.reshape(x, [BLOCK_T, HALF, 2]))
    return even + odd


@triton.jit
def _sum_halves(x, BLOCK_T: tl.constexpr, N: tl.constexpr):
    """``[BLOCK_T, N]`` -> ``[BLOCK_T]``: lane i += lane i + N/2, on the first half again, ...
    (a warp's xor-butterfly sum, as lane 0 computes it). N is a power of two, at most 32."""
    if N >= 32:
        x = _halve(x, BLOCK_T, 16)
    if N >= 16:
        x = _halve(x, BLOCK_T, 8)
    if N >= 8:
        x = _halve(x, BLOCK_T, 4)
    if N >= 4:
        x = _halve(x, BLOCK_T, 2)
    if N >= 2:
        x = _halve(x, BLOCK_T, 1)
    return tl.reshape(x, [BLOCK_T])


@triton.jit
def _sum_torch_k(x, BLOCK_T: tl.constexpr, KP: tl.constexpr, KB: tl.constexpr):
    """``[BLOCK_T, KP]`` -> ``[BLOCK_T]`` in the order of PyTorch's CUDA sum over a short last dim:
    lane l of KB adds column l + KB to column l, then lanes combine by shuffle-down 1, 2, 4, ..."""
    if KP > KB:
        x = _halve(x, BLOCK_T, KB)
    if KB >= 32:
        x = _pair(x, BLOCK_T, 16)
    if KB >= 16:
        x = _pair(x, BLOCK_T, 8)
    if KB >= 8:
        x = _pair(x, BLOCK_T, 4)
    if KB >= 4:
        x = _pair(x, BLOCK_T, 2)
    if KB >= 2:
        x = _pair(x, BLOCK_T, 1)
    return tl.reshape(x, [BLOCK_T])


@triton.jit
def _softmax_stats(
    logits_ptr, rows64, rmask, stride_lt, E,
    X_CODE: tl.constexpr, EW: tl.constexpr, EI: tl.constexpr, BLOCK_T: tl.constexpr, PRECISE: tl.constexpr,
):  # fmt: skip
    """Row max and ``sum(exp(x - max))`` over E, in PyTorch's one-warp softmax order."""
    lanes = tl.arange(0, EW)
    mx = tl.full([BLOCK_T], float("-inf"), tl.float32)
    for it in tl.static_range(EI):
        cols = it * EW + lanes
        ptrs = logits_ptr + rows64[:, None] * stride_lt + cols[None, :]
        xe = tl.load(ptrs, mask=rmask[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
        mx = tl.maximum(mx, tl.max(_round(xe, X_CODE), axis=1))
    acc = tl.zeros([BLOCK_T, EW], tl.float32)
    for it in tl.static_range(EI):
        cols = it * EW + lanes
        ptrs = logits_ptr + rows64[:, None] * stride_lt + cols[None, :]
        xe = tl.load(ptrs, mask=rmask[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
        acc = acc + _exp(_round(xe, X_CODE) - mx[:, None], PRECISE)
    return mx, _sum_halves(acc, BLOCK_T, EW)


@triton.jit
def _scores_at(
    x, kmask, mx, den,
    SCORE: tl.constexpr, S_CODE: tl.constexpr, W_CODE: tl.constexpr, KP: tl.constexpr,
    BLOCK_T: tl.constexpr, PRECISE: tl.constexpr,
):  # fmt: skip
    """Scores ``[BLOCK_T, KP]`` at the ids from the gathered (compute-dtype) logits ``x``."""
    if SCORE == 0:
        s = tl.div_rn(_exp(x - mx[:, None], PRECISE), den[:, None])
    elif SCORE == 1:
        xs = tl.where(kmask[None, :], x, float("-inf"))
        mk = tl.max(xs, axis=1)
        e = _exp(xs - mk[:, None], PRECISE)
        s = tl.div_rn(e, _sum_halves(e, BLOCK_T, KP)[:, None])
    elif SCORE == 2:
        s = tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + _exp(-x, PRECISE))
    elif SCORE == 3:
        sp = _round(tl.where(x > 20.0, x, _log1p(_exp(x, PRECISE), PRECISE)), S_CODE)
        s = tl.sqrt_rn(sp)
    else:
        s = x
    s = _round(_round(s, S_CODE), W_CODE)
    return tl.where(kmask[None, :], s, 0.0)


@triton.jit
def _normalise(
    s, eps, NORM: tl.constexpr, ADD_EPS: tl.constexpr, W_CODE: tl.constexpr,
    BLOCK_T: tl.constexpr, KP: tl.constexpr, KB: tl.constexpr,
):  # fmt: skip
    """(normalised weights, the raw sum, the divisor), each rounded as the reference rounds them."""
    total = _round(_sum_torch_k(s, BLOCK_T, KP, KB), W_CODE)
    if NORM == 2:
        div = _round(tl.maximum(total, eps), W_CODE)
    elif ADD_EPS:
        div = _round(total + eps, W_CODE)
    else:
        div = total
    return _round(tl.div_rn(s, div[:, None]), W_CODE), total, div


@triton.jit
def _replay_fwd(
    logits_ptr, stride_lt, forced_ptr, stride_ft, live_ptr, keep_ptr, scale_ptr,
    w_ptr, ids_ptr, rowmax_ptr, rowsum_ptr,
    T, E, factor, eps,
    K: tl.constexpr, KP: tl.constexpr, KB: tl.constexpr, EW: tl.constexpr, EI: tl.constexpr,
    SCORE: tl.constexpr, X_CODE: tl.constexpr, S_CODE: tl.constexpr, W_CODE: tl.constexpr,
    NORM: tl.constexpr, ADD_EPS: tl.constexpr, HAS_SCALE: tl.constexpr, P_CODE: tl.constexpr,
    SCALE_OP: tl.constexpr, HAS_MASK: tl.constexpr, SAVE_STATS: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    kk = tl.arange(0, KP)
    kmask = kk < K
    m2 = rmask[:, None] & kmask[None, :]
    ids = tl.load(forced_ptr + rows64[:, None] * stride_ft + kk[None, :], mask=m2, other=0).to(tl.int64)
    if HAS_MASK:
        live = tl.load(live_ptr + rows64[:, None] * K + kk[None, :], mask=m2, other=0)
        keep = tl.load(keep_ptr + rows, mask=rmask, other=1) != 0
        ids = tl.where(keep[:, None], ids, live)
    valid = (ids >= 0) & (ids < E)
    safe = tl.where(valid, ids, 0)
    x = _round(tl.load(logits_ptr + rows64[:, None] * stride_lt + safe, mask=m2, other=0.0).to(tl.float32), X_CODE)
    mx = tl.zeros([BLOCK_T], tl.float32)
    den = tl.zeros([BLOCK_T], tl.float32)
    if SCORE == 0:
        mx, den = _softmax_stats(logits_ptr, rows64, rmask, stride_lt, E, X_CODE, EW, EI, BLOCK_T, PRECISE)
        if SAVE_STATS:
            tl.store(rowmax_ptr + rows, mx, mask=rmask)
            tl.store(rowsum_ptr + rows, den, mask=rmask)
    w = _scores_at(x, kmask, mx, den, SCORE, S_CODE, W_CODE, KP, BLOCK_T, PRECISE)
    if NORM > 0:
        w, _total, _div = _normalise(w, eps, NORM, ADD_EPS, W_CODE, BLOCK_T, KP, KB)
    if HAS_SCALE:
        w = _round(w * tl.load(scale_ptr + safe, mask=m2, other=1.0).to(tl.float32), P_CODE)
    if SCALE_OP == 1 or SCALE_OP == 2:
        w = _round(w * factor, P_CODE)
    elif SCALE_OP == 3:
        w = _round(tl.div_rn(w, tl.full(w.shape, factor, tl.float32)), P_CODE)
    # an id out of range (possible only with validate=False) poisons its row instead of reading past E
    bad_row = tl.max((m2 & ~valid).to(tl.int32), axis=1) > 0
    w = tl.where(bad_row[:, None], float("nan"), w)
    out = rows64[:, None] * K + kk[None, :]
    tl.store(w_ptr + out, w.to(w_ptr.dtype.element_ty), mask=m2)
    tl.store(ids_ptr + out, ids, mask=m2)


@triton.jit
def _replay_bwd(
    logits_ptr, stride_lt, ids_ptr, gw_ptr, scale_ptr, rowmax_ptr, rowsum_ptr, gx_ptr, gc_ptr,
    T, E, factor, eps,
    K: tl.constexpr, KP: tl.constexpr, KB: tl.constexpr, EW: tl.constexpr, EI: tl.constexpr,
    SCORE: tl.constexpr, X_CODE: tl.constexpr, S_CODE: tl.constexpr, W_CODE: tl.constexpr,
    NORM: tl.constexpr, ADD_EPS: tl.constexpr, HAS_SCALE: tl.constexpr, P_CODE: tl.constexpr,
    SCALE_OP: tl.constexpr, NEED_GC: tl.constexpr, PRECISE: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    kk = tl.arange(0, KP)
    kmask = kk < K
    m2 = rmask[:, None] & kmask[None, :]
    ids = tl.load(ids_ptr + rows64[:, None] * K + kk[None, :], mask=m2, other=-1)
    valid = (ids >= 0) & (ids < E)
    safe = tl.where(valid, ids, 0)
    ids = tl.where(m2 & valid, ids, -1)  # padding slots hit no column below
    x = _round(tl.load(logits_ptr + rows64[:, None] * stride_lt + safe, mask=m2, other=0.0).to(tl.float32), X_CODE)
    mx = tl.zeros([BLOCK_T], tl.float32)
    den = tl.full([BLOCK_T], 1.0, tl.float32)
    if SCORE == 0:
        mx = tl.load(rowmax_ptr + rows, mask=rmask, other=0.0)
        den = tl.load(rowsum_ptr + rows, mask=rmask, other=1.0)
    s = _scores_at(x, kmask, mx, den, SCORE, S_CODE, W_CODE, KP, BLOCK_T, PRECISE)
    g = tl.load(gw_ptr + rows64[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32)
    if SCALE_OP == 1 or SCALE_OP == 2:
        g = g * factor
    elif SCALE_OP == 3:
        g = g / factor
    n = s
    if NORM > 0:
        n, total, div = _normalise(s, eps, NORM, ADD_EPS, W_CODE, BLOCK_T, KP, KB)
    if HAS_SCALE:
        if NEED_GC:
            tl.store(gc_ptr + rows64[:, None] * K + kk[None, :], g * n, mask=m2)
        g = g * tl.load(scale_ptr + safe, mask=m2, other=1.0).to(tl.float32)
    ds = g  # d loss / d score at each slot
    if NORM > 0:
        dot = tl.sum(g * n, axis=1)
        if NORM == 2:
            ds = tl.where((total < eps)[:, None], g / div[:, None], (g - dot[:, None]) / div[:, None])
        else:
            ds = (g - dot[:, None]) / div[:, None]
    ds = tl.where(m2, ds, 0.0)
    # d score / d logit at each slot (all but the softmax over E, which is dense)
    if SCORE == 1:
        dx = s * (ds - tl.sum(ds * s, axis=1)[:, None])
    elif SCORE == 2:
        dx = ds * s * (1.0 - s)
    elif SCORE == 3:
        z = _exp(x, PRECISE)
        dx = ds / (2.0 * s) * tl.where(x > 20.0, 1.0, z / (z + 1.0))
    else:
        dx = ds
    dot_p = tl.sum(ds * s, axis=1)
    lanes = tl.arange(0, EW)
    for it in tl.static_range(EI):
        cols = it * EW + lanes
        cmask = rmask[:, None] & (cols < E)[None, :]
        hit = ids[:, :, None] == cols[None, None, :]
        if SCORE == 0:
            dp = tl.sum(tl.where(hit, ds[:, :, None], 0.0), axis=1)
            ptrs = logits_ptr + rows64[:, None] * stride_lt + cols[None, :]
            xe = _round(tl.load(ptrs, mask=cmask, other=float("-inf")).to(tl.float32), X_CODE)
            p = _round(_round(tl.div_rn(_exp(xe - mx[:, None], PRECISE), den[:, None]), S_CODE), W_CODE)
            d = p * (dp - dot_p[:, None])
        else:
            d = tl.sum(tl.where(hit, dx[:, :, None], 0.0), axis=1)
        tl.store(gx_ptr + rows64[:, None] * E + cols[None, :], d.to(gx_ptr.dtype.element_ty), mask=cmask)


# --- host side --------------------------------------------------------------------------------
def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _last_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplayPlan:
    """Everything the kernels specialise on for one (spec, dtypes, device kind): their constexprs."""

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
    factor: float
    eps: float
    weights_dtype: torch.dtype


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
        score = _SOFTMAX_E if spec.score_before_topk else _SOFTMAX_K
    else:
        score = {"sigmoid": _SIGMOID, "sqrtsoftplus": _SQRTSOFTPLUS, "none": _IDENTITY}[spec.score_function]
    if spec.scaling_factor == 1.0:
        scale_op, factor = _NO_SCALE, 1.0
    elif spec.scaling_op == "mul":
        scale_op, factor = _MUL, spec.scaling_factor
    elif on_cuda:  # PyTorch's CUDA division by a CPU scalar multiplies by its float32 reciprocal
        scale_op, factor = _MUL_RECIPROCAL, float(np.float32(1.0) / np.float32(spec.scaling_factor))
    else:
        scale_op, factor = _DIV, spec.scaling_factor
    ew = min(_next_pow2(spec.num_logits), 32)
    return ReplayPlan(
        K=spec.top_k,
        KP=_next_pow2(spec.top_k),
        KB=min(_last_pow2(spec.top_k), 32),
        EW=ew,
        EI=_next_pow2(spec.num_logits) // ew,
        SCORE=score,
        X_CODE=_CODE[compute],
        S_CODE=_CODE[compute],
        W_CODE=_CODE[working],
        NORM=(2 if spec.norm_kind == "clamp" else 1) if spec.norm_topk_prob else 0,
        ADD_EPS=spec.norm_kind == "sum" and spec.norm_eps != 0.0,
        HAS_SCALE=scale_dtype is not None,
        P_CODE=_CODE[product],
        SCALE_OP=scale_op,
        PRECISE=on_cuda and not interpreting(),
        factor=factor,
        eps=spec.norm_eps,
        weights_dtype=final,
    )


def _constexprs(plan: ReplayPlan) -> dict:
    names = ("K", "KP", "KB", "EW", "EI", "SCORE", "X_CODE", "S_CODE", "W_CODE", "NORM", "ADD_EPS")
    out = {name: getattr(plan, name) for name in names}
    out.update(HAS_SCALE=plan.HAS_SCALE, P_CODE=plan.P_CODE, SCALE_OP=plan.SCALE_OP, PRECISE=plan.PRECISE)
    return out


def _compile_options(plan: ReplayPlan, fp_fusion: bool) -> dict:
    """No flush of denormals in libdevice (PyTorch's kernels keep them), and by default no
    contraction of a multiply and an add into one FMA (the reference's separate roundings)."""
    if not plan.PRECISE:
        return {}  # the interpreter takes no compiler options
    return {"enable_reflect_ftz": False, "enable_fp_fusion": fp_fusion}


def _block_rows(plan: ReplayPlan, backward: bool) -> int:
    # forward: the softmax over E holds [rows, 32] tiles; the other scores only [rows, KP]
    if backward:
        return 16 if plan.KP * plan.EW >= 128 else 32
    return 32 if plan.SCORE == _SOFTMAX_E else 128


class _FusedReplay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, scale_E, forced_TK, live_TK, keep_T, plan, save_stats, block_rows, fp_fusion):
        num_tokens, width = logits_TE.shape
        device = logits_TE.device
        weights_TK = torch.empty(num_tokens, plan.K, dtype=plan.weights_dtype, device=device)
        ids_TK = torch.empty(num_tokens, plan.K, dtype=torch.int64, device=device)
        stats = plan.SCORE == _SOFTMAX_E and save_stats
        rowmax_T = torch.empty(num_tokens if stats else 1, dtype=torch.float32, device=device)
        rowsum_T = torch.empty_like(rowmax_T)
        if num_tokens:
            block = block_rows or _block_rows(plan, backward=False)
            _replay_fwd[(triton.cdiv(num_tokens, block),)](
                logits_TE, logits_TE.stride(0), forced_TK, forced_TK.stride(0),
                live_TK if live_TK is not None else ids_TK,
                keep_T if keep_T is not None else ids_TK,
                scale_E if scale_E is not None else rowmax_T,
                weights_TK, ids_TK, rowmax_T, rowsum_T,
                num_tokens, width, plan.factor, plan.eps,
                HAS_MASK=keep_T is not None, SAVE_STATS=stats, BLOCK_T=block, **_constexprs(plan),
                **_compile_options(plan, fp_fusion),
            )  # fmt: skip
        ctx.plan = plan
        ctx.save_for_backward(logits_TE, ids_TK, scale_E, rowmax_T, rowsum_T)
        ctx.mark_non_differentiable(ids_TK)
        return weights_TK, ids_TK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weights_TK, grad_ids_TK):
        del grad_ids_TK
        plan: ReplayPlan = ctx.plan
        logits_TE, ids_TK, scale_E, rowmax_T, rowsum_T = ctx.saved_tensors
        num_tokens, width = logits_TE.shape
        need_gc = scale_E is not None and ctx.needs_input_grad[1]
        grad_TE = torch.empty(num_tokens, width, dtype=logits_TE.dtype, device=logits_TE.device)
        gc_TK = torch.empty(num_tokens if need_gc else 1, plan.K, dtype=torch.float32, device=logits_TE.device)
        if num_tokens:
            block = _block_rows(plan, backward=True)
            _replay_bwd[(triton.cdiv(num_tokens, block),)](
                logits_TE, logits_TE.stride(0), ids_TK, grad_weights_TK.contiguous(),
                scale_E if scale_E is not None else rowmax_T, rowmax_T, rowsum_T, grad_TE, gc_TK,
                num_tokens, width, plan.factor, plan.eps,
                NEED_GC=need_gc, BLOCK_T=block, **_constexprs(plan), **_compile_options(plan, True),
            )  # fmt: skip
        grad_scale_E = None
        if need_gc:
            # index_put_ with accumulate follows torch's deterministic-algorithms setting
            grad_scale_E = torch.zeros(scale_E.shape, dtype=torch.float32, device=scale_E.device)
            grad_scale_E.index_put_((ids_TK.reshape(-1),), gc_TK.reshape(-1), accumulate=True)
            grad_scale_E = grad_scale_E.to(scale_E.dtype)
        return grad_TE, grad_scale_E, None, None, None, None, None, None, None


def _check_inputs(logits_TE, spec, forced_TK, forced_mask_T, bias_E, expert_scale_E, out_dtype, where) -> None:
    """``routing.route``'s argument checks (with its messages), then what the kernel itself needs."""
    if forced_TK is None:
        raise RouterSpecError(f"{where}forced_TK must be an integer tensor, found NoneType")
    check_route_args(
        logits_TE,
        spec,
        forced_TK=forced_TK,
        forced_mask_T=forced_mask_T,
        bias_E=bias_E,
        expert_scale_E=expert_scale_E,
        out_dtype=out_dtype,
        where=where,
    )
    reason = unsupported_reason(spec, logits_dtype=logits_TE.dtype, device=logits_TE.device)
    if reason is not None:
        raise RouterSpecError(
            f"{where}the fused replay kernel does not cover this {spec.family or 'router'} spec: {reason}; "
            "check routereplay.kernels.supports(spec, ...) first and call routing.route for such specs"
        )
    if expert_scale_E is not None and expert_scale_E.dtype not in _CODE:
        raise RouterSpecError(
            f"{where}expert_scale_E must be float32/bfloat16/float16 [{spec.num_logits}], "
            f"found {tuple(expert_scale_E.shape)} {expert_scale_E.dtype}"
        )
    if spec.weights_dtype == "input" and out_dtype not in _CODE:
        raise RouterSpecError(f"{where}out_dtype must be float32, bfloat16 or float16, found {out_dtype}")


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
    block_rows: int | None = None,
    fp_fusion: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`routereplay.kernels.route_forced_fused`. For benchmarks and the GPU tests:
    ``block_rows`` overrides the forward's rows per program; ``fp_fusion=True`` lets the compiler
    contract multiply-adds in the forward (off by default: each reference op rounds once)."""
    _check_inputs(logits_TE, spec, forced_TK, forced_mask_T, bias_E, expert_scale_E, out_dtype, where)
    device = logits_TE.device
    if logits_TE.stride(1) != 1:
        logits_TE = logits_TE.contiguous()
    forced_TK = forced_TK.to(device=device, non_blocking=True)
    if forced_TK.stride(1) != 1:
        forced_TK = forced_TK.contiguous()
    if forced_mask_T is not None:
        forced_mask_T = forced_mask_T.to(device=device, non_blocking=True)
    if validate:
        routing._validate_forced(forced_TK.long(), forced_mask_T, spec, where)
    live_TK = keep_T = None
    if forced_mask_T is not None:
        # live ids for every row (no data-dependent shapes), as route() does; the kernel selects
        with torch.no_grad():
            scores_TE = None
            if spec.score_before_topk:
                scores_TE = routing._score(routing._to_compute(logits_TE, spec), spec)
                if spec.cast_scores:
                    scores_TE = scores_TE.to(logits_TE.dtype)
            live_TK = routing._select_live(logits_TE, scores_TE, spec, bias_E).contiguous()
        keep_T = forced_mask_T.view(torch.uint8)
    scale = expert_scale_E.contiguous() if expert_scale_E is not None else None
    plan = plan_for(spec, logits_TE.dtype, None if scale is None else scale.dtype, out_dtype, device.type == "cuda")
    save_stats = torch.is_grad_enabled() and (logits_TE.requires_grad or (scale is not None and scale.requires_grad))
    return _FusedReplay.apply(logits_TE, scale, forced_TK, live_TK, keep_T, plan, save_stats, block_rows, fp_fusion)
