"""The fused forced-id replay kernels, device code only (Triton): one launch forward, one backward.

The constants they specialise on come from :mod:`routereplay.kernels.plan`; the host side that
checks, allocates and launches is :mod:`routereplay.kernels.replay_triton`.

The forward kernel follows :func:`routereplay.core.routing.route`'s pipeline after the selection, in
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

Legend: T tokens, E logits per token (``spec.num_logits``), K top-k slots, KP K padded to a power
of two, EW lanes of the E-softmax (``min(next_pow2(E), 32)``), EI columns per lane.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Codes the kernels branch on (constexprs): see routereplay.kernels.plan for their meaning.

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

