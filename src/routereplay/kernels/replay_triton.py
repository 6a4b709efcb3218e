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
  the lanes combine by shuffle-down with offsets B/2, ..., 2, 1 since torch 2.10 (1, 2, ..., B/2
  before, and on ROCm); ``_sum_torch_k`` takes the order of the installed build
  (``coverage.cuda_sum_halves_lanes``). Assuming the old order on torch 2.11 cost up to 4 ulp in
  float32 wherever a renormalisation divides by this sum.
* exp, log1p are libdevice's (the CUDA math library's ``expf``/``log1pf``, which PyTorch's kernels
  call), divisions and square roots are IEEE round-to-nearest (``div_rn``, ``sqrt_rn``);
  ``w / scaling_factor`` is ``w * (1 / scaling_factor)`` on CUDA (PyTorch divides by a CPU scalar
  so) and a true division on the CPU.

So the promise (``kernels.ulp_bound``) is 0 ulp on CUDA for every covered spec. Where it cannot
hold, a bound is stated and tested (tests/test_kernels*.py): under Triton's CPU interpreter exp and
log1p are NumPy's and PyTorch's CPU kernels reduce in another order (4 ulp of the logits dtype);
the backward (a few fused multiply-adds and sums whose order autograd does not fix) is compared
with ``route``'s autograd within a relative tolerance, not bit for bit.

The host side: :class:`PreparedReplay` (``kernels.prepare_fused``) plans once per (spec, dtypes,
device) and keeps, per kernel variant, the compiled kernel's launcher, so a call costs checks, two
allocations, autograd's apply and one direct launcher call instead of Triton's binder, cache lookup
and launch-metadata work.

Legend: T tokens, E logits per token (``spec.num_logits``), K top-k slots, KP K padded to a power
of two, EW lanes of the E-softmax (``min(next_pow2(E), 32)``), EI columns per lane.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from routereplay import routing
from routereplay.errors import RouterSpecError
from routereplay.kernels.coverage import cuda_sum_halves_lanes, interpreting, unsupported_reason
from routereplay.routing import RouterSpec, check_route_args

__all__ = ["PreparedReplay", "ReplayPlan", "plan_for", "route_forced_fused"]

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
def _sum_torch_k(x, BLOCK_T: tl.constexpr, KP: tl.constexpr, KB: tl.constexpr, HALVES: tl.constexpr):
    """``[BLOCK_T, KP]`` -> ``[BLOCK_T]`` in the order of PyTorch's CUDA sum over a short last dim:
    lane l of KB adds column l + KB to column l, then the lanes combine by shuffle-down with offsets
    KB/2, ..., 2, 1 (``HALVES``, torch >= 2.10) or 1, 2, ..., KB/2 (older builds, ROCm)."""
    if KP > KB:
        x = _halve(x, BLOCK_T, KB)
    if HALVES:
        y = _sum_halves(x, BLOCK_T, KB)
    else:
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
        y = tl.reshape(x, [BLOCK_T])
    return y


@triton.jit
def _softmax_stats(
    logits_ptr, rows64, rmask, E: tl.constexpr,
    X_CODE: tl.constexpr, EW: tl.constexpr, EI: tl.constexpr, BLOCK_T: tl.constexpr, PRECISE: tl.constexpr,
):  # fmt: skip
    """Row max and ``sum(exp(x - max))`` over E, in PyTorch's one-warp softmax order."""
    lanes = tl.arange(0, EW)
    mx = tl.full([BLOCK_T], float("-inf"), tl.float32)
    for it in tl.static_range(EI):
        cols = it * EW + lanes
        ptrs = logits_ptr + rows64[:, None] * E + cols[None, :]
        xe = tl.load(ptrs, mask=rmask[:, None] & (cols < E)[None, :], other=float("-inf")).to(tl.float32)
        mx = tl.maximum(mx, tl.max(_round(xe, X_CODE), axis=1))
    acc = tl.zeros([BLOCK_T, EW], tl.float32)
    for it in tl.static_range(EI):
        cols = it * EW + lanes
        ptrs = logits_ptr + rows64[:, None] * E + cols[None, :]
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
    BLOCK_T: tl.constexpr, KP: tl.constexpr, KB: tl.constexpr, HALVES: tl.constexpr,
):  # fmt: skip
    """(normalised weights, the raw sum, the divisor), each rounded as the reference rounds them."""
    total = _round(_sum_torch_k(s, BLOCK_T, KP, KB, HALVES), W_CODE)
    if NORM == 2:
        div = _round(tl.maximum(total, eps), W_CODE)
    elif ADD_EPS:
        div = _round(total + eps, W_CODE)
    else:
        div = total
    return _round(tl.div_rn(s, div[:, None]), W_CODE), total, div


# Specialised on the alignment of the logits, the ids and the outputs only (the prepared launch
# keys its cache of compiled kernels on exactly that); T is never specialised.
@triton.jit(
    do_not_specialize=["T"],
    do_not_specialize_on_alignment=["live_ptr", "keep_ptr", "scale_ptr", "rowmax_ptr", "rowsum_ptr"],
)
def _replay_fwd(
    logits_ptr, forced_ptr, live_ptr, keep_ptr, scale_ptr,
    w_ptr, ids_ptr, rowmax_ptr, rowsum_ptr,
    T, factor, eps,
    E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, KB: tl.constexpr, EW: tl.constexpr, EI: tl.constexpr,
    SCORE: tl.constexpr, X_CODE: tl.constexpr, S_CODE: tl.constexpr, W_CODE: tl.constexpr,
    NORM: tl.constexpr, ADD_EPS: tl.constexpr, HAS_SCALE: tl.constexpr, P_CODE: tl.constexpr,
    SCALE_OP: tl.constexpr, HAS_MASK: tl.constexpr, SAVE_STATS: tl.constexpr, PRECISE: tl.constexpr,
    HALVES: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < T
    rows64 = rows.to(tl.int64)
    kk = tl.arange(0, KP)
    kmask = kk < K
    m2 = rmask[:, None] & kmask[None, :]
    ids = tl.load(forced_ptr + rows64[:, None] * K + kk[None, :], mask=m2, other=0).to(tl.int64)
    if HAS_MASK:
        live = tl.load(live_ptr + rows64[:, None] * K + kk[None, :], mask=m2, other=0)
        keep = tl.load(keep_ptr + rows, mask=rmask, other=1) != 0
        ids = tl.where(keep[:, None], ids, live)
    valid = (ids >= 0) & (ids < E)
    safe = tl.where(valid, ids, 0)
    x = _round(tl.load(logits_ptr + rows64[:, None] * E + safe, mask=m2, other=0.0).to(tl.float32), X_CODE)
    mx = tl.zeros([BLOCK_T], tl.float32)
    den = tl.zeros([BLOCK_T], tl.float32)
    if SCORE == 0:
        mx, den = _softmax_stats(logits_ptr, rows64, rmask, E, X_CODE, EW, EI, BLOCK_T, PRECISE)
        if SAVE_STATS:
            tl.store(rowmax_ptr + rows, mx, mask=rmask)
            tl.store(rowsum_ptr + rows, den, mask=rmask)
    w = _scores_at(x, kmask, mx, den, SCORE, S_CODE, W_CODE, KP, BLOCK_T, PRECISE)
    if NORM > 0:
        w, _total, _div = _normalise(w, eps, NORM, ADD_EPS, W_CODE, BLOCK_T, KP, KB, HALVES)
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


@triton.jit(
    do_not_specialize=["T"],
    do_not_specialize_on_alignment=["scale_ptr", "rowmax_ptr", "rowsum_ptr", "gc_ptr"],
)
def _replay_bwd(
    logits_ptr, ids_ptr, gw_ptr, scale_ptr, rowmax_ptr, rowsum_ptr, gx_ptr, gc_ptr,
    T, factor, eps,
    E: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, KB: tl.constexpr, EW: tl.constexpr, EI: tl.constexpr,
    SCORE: tl.constexpr, X_CODE: tl.constexpr, S_CODE: tl.constexpr, W_CODE: tl.constexpr,
    NORM: tl.constexpr, ADD_EPS: tl.constexpr, HAS_SCALE: tl.constexpr, P_CODE: tl.constexpr,
    SCALE_OP: tl.constexpr, NEED_GC: tl.constexpr, PRECISE: tl.constexpr, HALVES: tl.constexpr,
    BLOCK_T: tl.constexpr,
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
    x = _round(tl.load(logits_ptr + rows64[:, None] * E + safe, mask=m2, other=0.0).to(tl.float32), X_CODE)
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
        n, total, div = _normalise(s, eps, NORM, ADD_EPS, W_CODE, BLOCK_T, KP, KB, HALVES)
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
            ptrs = logits_ptr + rows64[:, None] * E + cols[None, :]
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
        score = _SOFTMAX_E if spec.score_before_topk else _SOFTMAX_K
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
        X_CODE=_CODE[compute],
        S_CODE=_CODE[compute],
        W_CODE=_CODE[working],
        NORM=(2 if spec.norm_kind == "clamp" else 1) if spec.norm_topk_prob else 0,
        ADD_EPS=spec.norm_kind == "sum" and spec.norm_eps != 0.0,
        HAS_SCALE=scale_dtype is not None,
        P_CODE=_CODE[product],
        SCALE_OP=scale_op,
        PRECISE=on_cuda and not interpreting(),
        # on the CPU (the interpreter) route() sums in yet another order; pairs are nearer to it
        HALVES=cuda_sum_halves_lanes() if on_cuda else False,
        factor=factor,
        eps=float(spec.norm_eps),
        weights_dtype=final,
    )


def _compile_options(plan: ReplayPlan, fp_fusion: bool) -> dict:
    """No flush of denormals in libdevice (PyTorch's kernels keep them), and by default no
    contraction of a multiply and an add into one FMA (the reference's separate roundings)."""
    if not plan.PRECISE:
        return {}  # the interpreter takes no compiler options
    return {"enable_reflect_ftz": False, "enable_fp_fusion": fp_fusion}


def _block_rows(plan: ReplayPlan, backward: bool, num_tokens: int | None = None, num_sms: int = 0) -> int:
    """Rows per program. Forward: the softmax over E holds ``[rows, 32]`` tiles (at most 32 rows),
    the other scores only ``[rows, KP]`` (up to 128); with ``num_tokens`` and the device's SM count,
    fewer rows per program, down to 16, until there are about 4 programs per SM (a launch-bound
    16k-row call otherwise runs 128 programs on 132 SMs)."""
    if backward:
        return 16 if plan.KP * plan.EW >= 128 else 32
    cap = 32 if plan.SCORE == _SOFTMAX_E else 128
    if num_tokens is None or num_sms <= 0:
        return cap
    want = -(-num_tokens // (4 * num_sms))
    return max(16, min(cap, _next_pow2(max(want, 1))))


_INT_DTYPES = frozenset(
    (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64)
)
_I32_MAX = 2**31 - 1


class PreparedReplay:
    """Fused forced-id replay for one (spec, dtypes, device): all spec and dtype work done once.

    Build it with :func:`routereplay.kernels.prepare_fused`; call it once per layer per forward::

        weights_TK, ids_TK = fused(logits_TE, forced_TK, forced_mask_T=None, bias_E=None, expert_scale_E=None)

    Same semantics as ``route_forced_fused(..., validate=False)``. A call checks only what keeps the
    launch memory-safe (dtypes, shapes, device), makes the logits and ids contiguous, allocates the
    outputs and launches. On CUDA the first launch of each kernel variant goes through Triton's
    JIT (compiling it if needed); later ones call the compiled kernel's launcher directly with the
    runtime arguments, keyed on what Triton specialises the kernels on (the ids' dtype, live rows or
    not, the block, the alignment of the logits / ids / incoming gradient). Under Triton's
    interpreter every launch goes through the JIT. A profiler hook registered with Triton
    (``knobs.runtime.launch_enter_hook``) sends launches through the JIT too, so it sees them.
    """

    def __init__(
        self,
        spec: RouterSpec,
        *,
        logits_dtype: torch.dtype,
        device: torch.device | str,
        scale_dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
        block_rows: int | None = None,
        fp_fusion: bool = False,
        sum_halves: bool | None = None,
        where: str = "",
    ):
        """See :func:`routereplay.kernels.prepare_fused`. For benchmarks and tests: ``block_rows``
        fixes the forward's rows per program, ``fp_fusion=True`` lets the compiler contract
        multiply-adds in the forward, ``sum_halves`` overrides the order of the top-k sum."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        reason = unsupported_reason(spec, logits_dtype=logits_dtype, device=device)
        if reason is not None:
            raise RouterSpecError(
                f"{where}the fused replay kernel does not cover this {spec.family or 'router'} spec: {reason}; "
                "check routereplay.kernels.supports(spec, ...) first and call routing.route for such specs"
            )
        if spec.uses_expert_scale and scale_dtype not in _CODE:
            raise RouterSpecError(
                f"{where}the {spec.family or 'router'} spec scales weights per expert: pass "
                f"scale_dtype=expert_scale.dtype (float32, bfloat16 or float16), found {scale_dtype}"
            )
        if spec.weights_dtype == "input" and out_dtype not in _CODE:
            raise RouterSpecError(
                f"{where}the {spec.family or 'router'} spec casts weights to the router input's dtype: pass "
                f"out_dtype=hidden_states.dtype (float32, bfloat16 or float16), found {out_dtype}"
            )
        self.spec = spec
        self.device = device
        self.logits_dtype = logits_dtype
        self.scale_dtype = scale_dtype if spec.uses_expert_scale else None
        self.out_dtype = out_dtype
        self.where = where
        on_cuda = device.type == "cuda"
        self.plan = plan_for(spec, logits_dtype, self.scale_dtype, out_dtype if spec.weights_dtype == "input" else None,
                             on_cuda)  # fmt: skip
        if sum_halves is not None:
            self.plan = dataclasses.replace(self.plan, HALVES=sum_halves)
        self.block_rows = block_rows
        # the direct launch calls Triton's compiled-kernel launcher, an internal interface: only on
        # the Triton minor version it was written and tested against (the JIT launches elsewhere)
        self._fast = on_cuda and not interpreting() and triton.__version__.startswith(_DIRECT_LAUNCH_TRITON)
        self._index = device.index if on_cuda else -1
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if self._fast else 0
        constexprs = self.plan.constexprs()
        self._fwd_const = {**constexprs, "PRECISE": self.plan.PRECISE, "HALVES": self.plan.HALVES}
        self._fwd_options = _compile_options(self.plan, fp_fusion)
        self._bwd_options = _compile_options(self.plan, True)
        # every launcher argument after the runtime ones: the constexprs in parameter order
        self._fwd_tail = {}  # (HAS_MASK, SAVE_STATS, BLOCK_T) -> tuple
        self._bwd_tail = {}  # (NEED_GC, BLOCK_T) -> tuple
        self._fwd_kernels = {}  # specialisation key -> (launcher, function, packed metadata)
        self._bwd_kernels = {}
        self._dummy = torch.empty(1, dtype=torch.float32, device=device)  # for pointers a variant never reads
        self._uses_bias = spec.uses_bias
        self._uses_scale = spec.uses_expert_scale

    def __repr__(self) -> str:
        return (
            f"PreparedReplay({self.spec.family or 'router'}, E={self.plan.E}, K={self.plan.K}, "
            f"logits {self.logits_dtype}, weights {self.plan.weights_dtype}, {self.device})"
        )

    # --- the call -----------------------------------------------------------------------------
    def __call__(
        self,
        logits_TE: torch.Tensor,
        forced_TK: torch.Tensor,
        forced_mask_T: torch.Tensor | None = None,
        bias_E: torch.Tensor | None = None,
        expert_scale_E: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay ``forced_TK`` (ids already validated): ``(weights_TK, int64 ids_TK)``.

        Args:
            logits_TE: ``[T, E]`` in the prepared dtype, on the prepared device.
            forced_TK: integer ``[T, K]`` ids (uint8 / int16 / int32 / int64 read as they are), on
                the device or in (pinned) host memory.
            forced_mask_T: bool ``[T]``; rows marked False route live.
            bias_E: the selection bias, required iff ``spec.uses_bias`` (read only for live rows).
            expert_scale_E: ``[E]`` per-expert scale in the prepared ``scale_dtype``, required iff
                ``spec.uses_expert_scale``.

        Returns:
            ``(weights_TK, ids_TK)``: weights differentiable w.r.t. the logits (and the expert
            scale); an id outside ``[0, E)`` gives NaN weights in its row.

        Raises:
            RouterSpecError: an input that does not fit the prepared spec, dtypes or device.
        """
        plan = self.plan
        num_tokens = logits_TE.shape[0]
        if (
            logits_TE.dtype != self.logits_dtype
            or logits_TE.dim() != 2
            or logits_TE.shape[1] != plan.E
            or logits_TE.get_device() != self._index
            or forced_TK.dtype not in _INT_DTYPES
            or forced_TK.shape != (num_tokens, plan.K)
            or (bias_E is not None) != self._uses_bias
            or (expert_scale_E is not None) != self._uses_scale
        ):
            self._refuse(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
        if not logits_TE.is_contiguous():
            logits_TE = logits_TE.contiguous()
        if forced_TK.get_device() != self._index:
            forced_TK = forced_TK.to(self.device, non_blocking=True)
        if not forced_TK.is_contiguous():
            forced_TK = forced_TK.contiguous()
        scale_E = None
        if expert_scale_E is not None:
            if (
                expert_scale_E.dtype != self.scale_dtype
                or expert_scale_E.shape != (plan.E,)
                or expert_scale_E.get_device() != self._index
            ):
                self._refuse(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
            scale_E = expert_scale_E if expert_scale_E.is_contiguous() else expert_scale_E.contiguous()
        live_TK = keep_T = None
        if forced_mask_T is not None:
            if forced_mask_T.dtype != torch.bool or forced_mask_T.shape != (num_tokens,):
                self._refuse(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
            if bias_E is not None and bias_E.shape != (plan.E,):
                self._refuse(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
            live_TK = self._live_ids(logits_TE, bias_E)
            keep_T = forced_mask_T.to(self.device, non_blocking=True).contiguous().view(torch.uint8)
        needs_grad = torch.is_grad_enabled() and (
            logits_TE.requires_grad or (scale_E is not None and scale_E.requires_grad)
        )
        if needs_grad:
            if torch._C._are_functorch_transforms_active():
                return _FusedReplay.apply(logits_TE, scale_E, (forced_TK, live_TK, keep_T), self)
            # Function.apply minus its Python preamble (binding defaults for setup_context, which
            # this Function has none of, and unwrapping tensors leaked from dead torch.func levels)
            return _apply_fused(logits_TE, scale_E, (forced_TK, live_TK, keep_T), self)
        weights_TK, ids_TK, _ = self._forward(logits_TE, scale_E, forced_TK, live_TK, keep_T, False)
        return weights_TK, ids_TK

    def _refuse(self, logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E):
        """Raise for an input the fast checks rejected: route()'s message where route() rejects it."""
        where = self.where
        check_route_args(
            logits_TE,
            self.spec,
            forced_TK=forced_TK,
            forced_mask_T=forced_mask_T,
            bias_E=bias_E,
            expert_scale_E=expert_scale_E,
            out_dtype=self.out_dtype if self.spec.weights_dtype == "input" else None,
            where=where,
        )
        if logits_TE.dtype != self.logits_dtype:
            raise RouterSpecError(
                f"{where}logits are {logits_TE.dtype}, the fused replay was prepared for {self.logits_dtype}: "
                "prepare one per logits dtype"
            )
        if logits_TE.get_device() != self._index:
            raise RouterSpecError(
                f"{where}logits are on {logits_TE.device}, the fused replay was prepared for {self.device}: "
                "prepare one per device"
            )
        if expert_scale_E is not None:
            if expert_scale_E.dtype != self.scale_dtype:
                raise RouterSpecError(
                    f"{where}expert_scale_E is {expert_scale_E.dtype}, the fused replay was prepared with "
                    f"scale_dtype={self.scale_dtype}"
                )
            raise RouterSpecError(
                f"{where}expert_scale_E is on {expert_scale_E.device}, the logits on {logits_TE.device}: "
                "move it to the logits' device"
            )
        raise AssertionError("the fast checks rejected inputs that route() accepts")  # pragma: no cover

    def _live_ids(self, logits_TE: torch.Tensor, bias_E: torch.Tensor | None) -> torch.Tensor:
        """Live ids for every row (no data-dependent shapes), as route() does; the kernel selects."""
        spec = self.spec
        with torch.no_grad():
            scores_TE = None
            if spec.score_before_topk:
                scores_TE = routing._score(routing._to_compute(logits_TE, spec), spec)
                if spec.cast_scores:
                    scores_TE = scores_TE.to(logits_TE.dtype)
            return routing._select_live(logits_TE, scores_TE, spec, bias_E).contiguous()

    # --- the launches -------------------------------------------------------------------------
    def _forward(self, logits_TE, scale_E, forced_TK, live_TK, keep_T, save_stats):
        plan = self.plan
        num_tokens = logits_TE.shape[0]
        device = self.device
        weights_TK = torch.empty((num_tokens, plan.K), dtype=plan.weights_dtype, device=device)
        ids_TK = torch.empty((num_tokens, plan.K), dtype=torch.int64, device=device)
        stats = save_stats and plan.SCORE == _SOFTMAX_E
        stats_2T = torch.empty((2, num_tokens), dtype=torch.float32, device=device) if stats else self._dummy
        if num_tokens == 0:
            return weights_TK, ids_TK, stats_2T
        has_mask = keep_T is not None
        block = self.block_rows or _block_rows(plan, False, num_tokens, self._num_sms)
        grid = -(-num_tokens // block)
        dummy = self._dummy
        if self._direct(num_tokens):
            logits_ptr, forced_ptr = logits_TE.data_ptr(), forced_TK.data_ptr()
            key = (forced_TK.dtype, has_mask, stats, block, (logits_ptr | forced_ptr) & 15 == 0)
            kernel = self._fwd_kernels.get(key)
            if kernel is not None:
                stats_ptr = stats_2T.data_ptr()
                kernel[0](
                    grid, 1, 1, _raw_stream(self._index), kernel[1], kernel[2], None, None, None,
                    logits_ptr, forced_ptr,
                    live_TK.data_ptr() if has_mask else stats_ptr,
                    keep_T.data_ptr() if has_mask else stats_ptr,
                    scale_E.data_ptr() if scale_E is not None else stats_ptr,
                    weights_TK.data_ptr(), ids_TK.data_ptr(), stats_ptr, stats_ptr + 4 * num_tokens if stats else stats_ptr,
                    num_tokens, plan.factor, plan.eps,
                    *self._fwd_tail[key[1:4]],
                )  # fmt: skip
                return weights_TK, ids_TK, stats_2T
        else:
            key = None
        with _on(device):
            compiled = _replay_fwd[(grid,)](
                logits_TE, forced_TK,
                live_TK if has_mask else dummy,
                keep_T if has_mask else dummy,
                scale_E if scale_E is not None else dummy,
                weights_TK, ids_TK,
                stats_2T[0] if stats else dummy, stats_2T[1] if stats else dummy,
                num_tokens, plan.factor, plan.eps,
                **self._fwd_const, HAS_MASK=has_mask, SAVE_STATS=stats, BLOCK_T=block, **self._fwd_options,
            )  # fmt: skip
        if key is not None:
            self._remember(self._fwd_kernels, self._fwd_tail, key, key[1:4], compiled, _replay_fwd,
                           {**self._fwd_const, "HAS_MASK": has_mask, "SAVE_STATS": stats, "BLOCK_T": block})  # fmt: skip
        return weights_TK, ids_TK, stats_2T

    def _backward(self, logits_TE, ids_TK, scale_E, stats_2T, grad_weights_TK, need_gc):
        plan = self.plan
        num_tokens = logits_TE.shape[0]
        device = self.device
        grad_TE = torch.empty((num_tokens, plan.E), dtype=logits_TE.dtype, device=device)
        gc_TK = torch.empty((num_tokens, plan.K), dtype=torch.float32, device=device) if need_gc else self._dummy
        if num_tokens == 0:
            return grad_TE, gc_TK
        if not grad_weights_TK.is_contiguous():
            grad_weights_TK = grad_weights_TK.contiguous()
        block = _block_rows(plan, True)
        grid = -(-num_tokens // block)
        stats = plan.SCORE == _SOFTMAX_E
        dummy = self._dummy
        if self._direct(num_tokens):
            logits_ptr, gw_ptr = logits_TE.data_ptr(), grad_weights_TK.data_ptr()
            key = (need_gc, grad_weights_TK.dtype, block, (logits_ptr | gw_ptr) & 15 == 0)
            kernel = self._bwd_kernels.get(key)
            if kernel is not None:
                stats_ptr = stats_2T.data_ptr()
                kernel[0](
                    grid, 1, 1, _raw_stream(self._index), kernel[1], kernel[2], None, None, None,
                    logits_ptr, ids_TK.data_ptr(), gw_ptr,
                    scale_E.data_ptr() if scale_E is not None else stats_ptr,
                    stats_ptr, stats_ptr + 4 * num_tokens if stats else stats_ptr,
                    grad_TE.data_ptr(), gc_TK.data_ptr(),
                    num_tokens, plan.factor, plan.eps,
                    *self._bwd_tail[(need_gc, block)],
                )  # fmt: skip
                return grad_TE, gc_TK
        else:
            key = None
        const = {**self._fwd_const, "NEED_GC": need_gc, "BLOCK_T": block}
        with _on(device):
            compiled = _replay_bwd[(grid,)](
                logits_TE, ids_TK, grad_weights_TK,
                scale_E if scale_E is not None else dummy,
                stats_2T[0] if stats else dummy, stats_2T[1] if stats else dummy,
                grad_TE, gc_TK,
                num_tokens, plan.factor, plan.eps,
                **const, **self._bwd_options,
            )  # fmt: skip
        if key is not None:
            self._remember(self._bwd_kernels, self._bwd_tail, key, (need_gc, block), compiled, _replay_bwd, const)
        return grad_TE, gc_TK

    def _direct(self, num_tokens: int) -> bool:
        """Launch through a kept launcher: on CUDA, outside the interpreter, with the prepared device
        current (the kept function handle belongs to its context) and no profiler hook."""
        return self._fast and num_tokens <= _I32_MAX and torch.cuda.current_device() == self._index and not _hooked()

    @staticmethod
    def _remember(kernels: dict, tails: dict, key: tuple, tail_key: tuple, compiled, jit_fn, const: dict) -> None:
        """Keep what a direct launch of ``compiled`` needs: its launcher, function handle and packed
        metadata, and the constexpr arguments (the launcher takes every parameter, in order)."""
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return
        names = jit_fn.arg_names
        first = names.index("E")  # the runtime parameters come first, the constexprs after them
        if any(name not in const for name in names[first:]):
            return
        tails[tail_key] = tuple(const[name] for name in names[first:])
        kernels[key] = (compiled.run, compiled.function, compiled.packed_metadata)


_DIRECT_LAUNCH_TRITON = "3.6."


def _hooked() -> bool:
    """A launch hook is registered with Triton (a profiler): launch through the JIT so it sees it."""
    runtime = triton.knobs.runtime
    return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


def _raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def _on(device: torch.device):
    """The device guard for a launch through Triton's JIT, which compiles for and launches on the
    current device (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _FusedReplay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, scale_E, ids, prepared: PreparedReplay):
        forced_TK, live_TK, keep_T = ids
        weights_TK, ids_TK, stats_2T = prepared._forward(logits_TE, scale_E, forced_TK, live_TK, keep_T, True)
        ctx.prepared = prepared
        ctx.save_for_backward(logits_TE, ids_TK, scale_E, stats_2T)
        ctx.mark_non_differentiable(ids_TK)
        return weights_TK, ids_TK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_weights_TK, grad_ids_TK):
        del grad_ids_TK
        prepared: PreparedReplay = ctx.prepared
        logits_TE, ids_TK, scale_E, stats_2T = ctx.saved_tensors
        need_gc = scale_E is not None and ctx.needs_input_grad[1]
        grad_TE, gc_TK = prepared._backward(logits_TE, ids_TK, scale_E, stats_2T, grad_weights_TK, need_gc)
        grad_scale_E = None
        if need_gc:
            # index_put_ with accumulate follows torch's deterministic-algorithms setting
            grad_scale_E = torch.zeros(scale_E.shape, dtype=torch.float32, device=scale_E.device)
            grad_scale_E.index_put_((ids_TK.reshape(-1),), gc_TK.reshape(-1), accumulate=True)
            grad_scale_E = grad_scale_E.to(scale_E.dtype)
        return grad_TE, grad_scale_E, None, None


_apply_fused = super(torch.autograd.Function, _FusedReplay).apply  # the C++ apply


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


@functools.lru_cache(maxsize=64)
def _prepared(spec, logits_dtype, device, scale_dtype, out_dtype, block_rows, fp_fusion) -> PreparedReplay:
    return PreparedReplay(
        spec,
        logits_dtype=logits_dtype,
        device=device,
        scale_dtype=scale_dtype,
        out_dtype=out_dtype,
        block_rows=block_rows,
        fp_fusion=fp_fusion,
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
    block_rows: int | None = None,
    fp_fusion: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`routereplay.kernels.route_forced_fused`. For benchmarks and the GPU tests:
    ``block_rows`` overrides the forward's rows per program; ``fp_fusion=True`` lets the compiler
    contract multiply-adds in the forward (off by default: each reference op rounds once)."""
    _check_inputs(logits_TE, spec, forced_TK, forced_mask_T, bias_E, expert_scale_E, out_dtype, where)
    device = logits_TE.device
    if validate:
        mask_T = None if forced_mask_T is None else forced_mask_T.to(device=device, non_blocking=True)
        routing._validate_forced(forced_TK.to(device=device, dtype=torch.int64, non_blocking=True), mask_T, spec, where)
    prepared = _prepared(
        spec,
        logits_TE.dtype,
        device,
        None if expert_scale_E is None else expert_scale_E.dtype,
        out_dtype if spec.weights_dtype == "input" else None,
        block_rows,
        fp_fusion,
    )
    return prepared(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
