"""Layout conversions of routing traces, each with its exact inverse.

* padded ``[B, S, L, K]`` + mask <-> packed    :func:`pack_padded` / :func:`unpack_to_padded`
* ``[B*S]`` rows an HF router sees <-> packed    :func:`to_router_rows` / :func:`from_router_rows`
* micro-batches of whole sequences <-> one trace :func:`split_micro_batches` / :func:`join_micro_batches`
* sequence-parallel row slices     <-> one trace :func:`split_sp` / :func:`gather_sp`
* context-parallel shards (zigzag or contiguous) <-> one trace :func:`shard_cp` / :func:`unshard_cp`
* engine rows (``n - 1`` a sequence) <-> training rows :func:`engine_to_training` / :func:`training_to_engine`

Legend (shape suffixes used in this file):
    T  rows of a packed trace, sequences back to back
    L  MoE layers;  K  top-k slots
    B  sequences;   S  padded length (columns of an attention mask)
    N  rows of an output being assembled (padded rows, shard rows, ...)
    R  ranks of a parallel group;  P  parts of a sequence one CP rank holds (2 zigzag, 1 contiguous)
    C  chunks a sequence is cut into for CP (2*cp zigzag, cp contiguous)
    G  segments: runs of consecutive rows that move together

How the data moves: almost every conversion is a gather. It builds an int64 index of source rows
(O(T) integer work, no Python loop over tokens) and moves the routes with one ``index_select`` on
a ``[rows, L*K]`` view, which copies whole rows with memcpy: as fast as ``copy_`` into mapped
memory (on CPU, faulting in a fresh output costs extra; see benchmarks/bench_layout.py).
Boolean-mask indexing goes element by element and is about 10x slower on CPU, so it never touches
the route tensors. The one scatter, :func:`unshard_cp` of shards in separate buffers, uses
``index_copy_`` on rows viewed as int64 words, once per shard. Outputs are built with
``RoutingTrace.unchecked``: their parts come from a validated trace, so the O(T) validation is not
repeated.

``valid`` and ``gates`` follow the rows through every conversion. Rows a conversion adds
(padding, the missing last token of an engine capture) are invalid and all zero. An inverse that
drops such rows returns ``valid=None`` when every remaining row is valid (``RoutingTrace``
equality treats ``None`` and all-True alike).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, overload

import torch

from routereplay.core.errors import LayoutError
from routereplay.core.index import cu_seqlens_of, ranges
from routereplay.core.trace import RoutingTrace, expert_dtype

__all__ = [
    "PaddedRoutes",
    "cp_padded_seq_lens",
    "engine_to_training",
    "from_router_rows",
    "gather_sp",
    "join_micro_batches",
    "pack_padded",
    "router_row_sources",
    "shard_cp",
    "split_micro_batches",
    "split_sp",
    "to_router_rows",
    "training_to_engine",
    "unpack_to_padded",
    "unshard_cp",
]

CPMode = Literal["zigzag", "contiguous"]


# --- helpers ---------------------------------------------------------------------------------
def _take_rows(
    x: torch.Tensor | None,
    idx_N: torch.Tensor,
    fill_N: torch.Tensor | None = None,
    fill_value: float = 0,
) -> torch.Tensor | None:
    """``x[idx_N]`` along dim 0, with the rows at positions ``fill_N`` of the result set to ``fill_value``.

    Rows move as ``[rows, prod(rest)]`` blocks through ``index_select`` (memcpy per row). Indices
    at ``fill_N`` positions must still be in range (callers point them at row 0); when ``x`` has
    no rows at all, every output row must be a fill row.
    """
    if x is None:
        return None
    T, N = x.shape[0], idx_N.numel()
    flat_TX = x.reshape(T, math.prod(x.shape[1:]))
    if T == 0:
        out_NX = torch.full((N, flat_TX.shape[1]), fill_value, dtype=x.dtype, device=x.device)
    else:
        out_NX = flat_TX.index_select(0, idx_N)
        if fill_N is not None and fill_N.numel():
            out_NX.index_fill_(0, fill_N, fill_value)
    return out_NX.view(N, *x.shape[1:])


def _gather_valid(
    trace: RoutingTrace, idx_N: torch.Tensor, fill_N: torch.Tensor, *, always: bool = False
) -> torch.Tensor | None:
    """``valid`` of the rows ``idx_N`` with the rows ``fill_N`` invalid.

    None when the trace has no mask and nothing is filled, unless ``always``.
    """
    if trace.valid is not None:
        return _take_rows(trace.valid, idx_N, fill_N, False)
    if not fill_N.numel() and not always:
        return None
    # Without a mask only the filled rows are invalid: no need to gather T ones.
    return torch.ones(idx_N.numel(), dtype=torch.bool, device=idx_N.device).index_fill_(0, fill_N, False)


def _tidy_valid(valid_T: torch.Tensor | None) -> torch.Tensor | None:
    """``None`` when every row is valid: the same trace, without a mask that says nothing."""
    if valid_T is None or bool(valid_T.all()):
        return None
    return valid_T


def _first(mask: torch.Tensor) -> int:
    return int(mask.reshape(-1).nonzero()[0, 0])


def _check_trace(trace: object, what: str = "trace") -> RoutingTrace:
    if not isinstance(trace, RoutingTrace):
        raise LayoutError(f"{what} must be a RoutingTrace, found {type(trace).__name__}")
    return trace


def _check_int(value: object, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LayoutError(f"{name} must be an int >= {minimum}, found {value!r}")
    return value


def _as_mask(mask: object, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A 0/1 or bool ``[B, S]`` tensor as bool, on ``device``."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise LayoutError(f"{name} must be a [B, S] tensor, found {found}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise LayoutError(f"{name} must be bool or integer 0/1, found dtype {mask.dtype}")
        bad_BS = (mask != 0) & (mask != 1)
        if bool(bad_BS.any()):
            b, s = (int(i) for i in bad_BS.nonzero()[0])
            raise LayoutError(f"{name} must hold only 0 and 1, found {int(mask[b, s])} at [{b}, {s}]")
        mask = mask != 0
    return mask if device is None else mask.to(device)


def _check_counts(mask_BS: torch.Tensor, lens_B: torch.Tensor, name: str) -> None:
    if mask_BS.shape[0] != lens_B.numel():
        raise LayoutError(
            f"{name} has {mask_BS.shape[0]} rows but the trace has {lens_B.numel()} sequences; "
            "pass the mask of the batch the trace was recorded for"
        )
    counts_B = mask_BS.sum(1)
    bad_B = counts_B != lens_B
    if bool(bad_B.any()):
        b = _first(bad_B)
        raise LayoutError(
            f"sequence {b}: {name} has {int(counts_B[b])} True positions but the trace has {int(lens_B[b])} rows "
            "for it; the mask must mark exactly the tokens the trace holds routes for"
        )


def _rows_of(x: object, B: int, S: int, name: str) -> torch.Tensor:
    """``[B, S, ...]`` or ``[B*S, ...]`` routes as ``[B*S, ...]``."""
    if not isinstance(x, torch.Tensor):
        raise LayoutError(f"{name} must be a tensor, found {type(x).__name__}")
    if x.ndim == 4 and tuple(x.shape[:2]) == (B, S):
        return x.reshape(B * S, *x.shape[2:])
    if x.ndim == 3 and x.shape[0] == B * S:
        return x
    raise LayoutError(
        f"{name} has shape {tuple(x.shape)}; with an attention mask of shape ({B}, {S}) it must be "
        f"[{B}, {S}, L, K] (padded) or [{B * S}, L, K] (the flattened rows a router sees)"
    )


def _same_model(traces: Sequence[RoutingTrace], what: str) -> None:
    """All traces describe the same layers, top-k, expert count, dtype and gate presence."""
    first = traces[0]
    for r, t in enumerate(traces[1:], 1):
        _check_trace(t, f"{what} {r}")
        for name in ("layer_ids", "top_k", "num_experts"):
            if getattr(t, name) != getattr(first, name):
                raise LayoutError(f"{what} {r} has {name}={getattr(t, name)} but {what} 0 has {getattr(first, name)}")
        if t.experts.dtype != first.experts.dtype or t.device != first.device:
            raise LayoutError(
                f"{what} {r} holds {t.experts.dtype} on {t.device} but {what} 0 holds "
                f"{first.experts.dtype} on {first.device}"
            )
        if (t.gates is None) != (first.gates is None):
            raise LayoutError(
                f"{what} {r} {'has' if t.gates is not None else 'lacks'} gates and {what} 0 does not match"
            )


def _adjacent(xs: Sequence[torch.Tensor]) -> bool:
    """The tensors lie back to back in one storage (as ``split`` of one buffer leaves them)."""
    first = xs[0]
    return all(x.is_contiguous() and x.dtype == first.dtype and x.device == first.device for x in xs) and all(
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
        for a, b in itertools.pairwise(xs)
    )


def _wide_rows(x: torch.Tensor) -> torch.Tensor:
    """A contiguous ``[rows, ...]`` tensor as ``[rows, W]`` of the widest int type that tiles a row.

    ``index_copy_`` moves one element at a time, so a uint8 row of 384 bytes copies 8x faster as
    48 int64 words. The bits are untouched (float gates included).
    """
    bytes_RX = x.reshape(x.shape[0], math.prod(x.shape[1:])).view(torch.uint8)
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if bytes_RX.shape[1] % size == 0 and bytes_RX.data_ptr() % size == 0:
            return bytes_RX.view(dtype)
    return bytes_RX


def _merge_rows(xs: Sequence[torch.Tensor], src_N: torch.Tensor, pad_Q: torch.Tensor) -> torch.Tensor:
    """Rows ``src_N`` of the rows of ``xs`` laid end to end; rows ``pad_Q`` there are dropped.

    ``src_N`` and ``pad_Q`` index the concatenation and partition it. When ``xs`` already lie
    back to back the concatenation is a view and one ``index_select`` gathers the rows. Otherwise,
    rather than copying everything twice (``cat``, then gather), each part is scattered once to
    its rows with ``index_copy_``; the dropped rows land in scratch rows past the end of the output,
    which the result (a view) does not show.
    """
    first, N = xs[0], src_N.numel()
    if len(xs) == 1 or _adjacent(xs):
        rows = sum(x.shape[0] for x in xs)
        whole = first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
        return _take_rows(whole, src_N)
    out = torch.empty((N + pad_Q.numel(), *first.shape[1:]), dtype=first.dtype, device=first.device)
    dst_Q = torch.empty(N + pad_Q.numel(), dtype=torch.int64, device=first.device)
    dst_Q[src_N] = torch.arange(N, device=first.device)
    dst_Q[pad_Q] = torch.arange(N, N + pad_Q.numel(), device=first.device)
    out_wide, lo = _wide_rows(out), 0
    for x in xs:  # loop over parts (ranks): one scatter each
        out_wide.index_copy_(0, dst_Q[lo : lo + x.shape[0]], _wide_rows(x.contiguous()))
        lo += x.shape[0]
    return out[:N]


# --- padded <-> packed -------------------------------------------------------------------------
class PaddedRoutes(NamedTuple):
    """A trace laid out as a padded batch (what :func:`unpack_to_padded` returns).

    Attributes:
        experts_BSLK: expert ids ``[B, S, L, K]``, ``pad_value`` at padding.
        attention_mask_BS: bool ``[B, S]``, True where a trace row was placed.
        valid_BS: bool ``[B, S]`` (False at padding), or None when the trace has no ``valid``.
        gates_BSLK: ``[B, S, L, K]`` (0 at padding), or None when the trace has no gates.
    """

    experts_BSLK: torch.Tensor
    attention_mask_BS: torch.Tensor
    valid_BS: torch.Tensor | None
    gates_BSLK: torch.Tensor | None


def pack_padded(
    experts_BSLK: torch.Tensor,
    attention_mask_BS: torch.Tensor,
    *,
    layer_ids: Sequence[int],
    num_experts: int,
    gates_BSLK: torch.Tensor | None = None,
    valid_BS: torch.Tensor | None = None,
    meta: dict[str, str] | None = None,
    validate: bool = True,
) -> RoutingTrace:
    """Pack a padded batch of routes into a trace: row ``b`` of the mask becomes sequence ``b``.

    The True positions of each mask row are taken in order, so left padding, right padding and
    masks with holes all work.

    Args:
        experts_BSLK: integer ids ``[B, S, L, K]``, or ``[B*S, L, K]`` (the flattened rows an HF
            router sees, row ``b*S + s``). Values at padding positions are ignored.
        attention_mask_BS: bool or 0/1 ``[B, S]``; True marks real tokens.
        layer_ids: global layer index of each of the L layers.
        num_experts: routed experts per layer.
        gates_BSLK: optional float gates shaped like ``experts_BSLK``.
        valid_BS: optional bool ``[B, S]``: which real tokens have a known route.
        meta: optional ``str -> str`` metadata of the trace.
        validate: check every id (range, no repeat within a row) through the ``RoutingTrace``
            constructor. ``False`` skips these O(T*L*K) checks for data already known good (for
            example routes just recorded by this library); the cheap checks still run.

    Returns:
        A packed ``RoutingTrace`` with ``T = attention_mask_BS.sum()`` rows.

    Raises:
        LayoutError: mask not ``[B, S]`` 0/1, or tensors whose shapes do not match it.
        TraceError subclasses: bad ids, layer ids or gates (from the ``RoutingTrace`` checks).
    """
    if not isinstance(experts_BSLK, torch.Tensor):
        raise LayoutError(f"experts_BSLK must be a tensor, found {type(experts_BSLK).__name__}")
    mask_BS = _as_mask(attention_mask_BS, "attention_mask_BS", experts_BSLK.device)
    B, S = mask_BS.shape
    experts_NLK = _rows_of(experts_BSLK, B, S, "experts_BSLK")
    gates_NLK = None if gates_BSLK is None else _rows_of(gates_BSLK, B, S, "gates_BSLK")
    if gates_NLK is not None and gates_NLK.shape != experts_NLK.shape:
        raise LayoutError(
            f"gates_BSLK has shape {tuple(gates_BSLK.shape)} but experts_BSLK has {tuple(experts_BSLK.shape)}; "
            "they must match"
        )
    valid_N = None if valid_BS is None else _valid_rows(valid_BS, mask_BS, experts_BSLK.device)

    pos_T = mask_BS.reshape(-1).nonzero().squeeze(1)
    cu_B1 = cu_seqlens_of(mask_BS.sum(1))
    experts_TLK = _take_rows(experts_NLK, pos_T)
    gates_TLK = _take_rows(gates_NLK, pos_T)
    valid_T = _take_rows(valid_N, pos_T)
    if validate:
        return RoutingTrace(
            experts=experts_TLK,
            cu_seqlens=cu_B1,
            layer_ids=layer_ids,
            num_experts=num_experts,
            valid=valid_T,
            gates=gates_TLK,
            meta=meta or {},
        )
    return _trusted_trace(experts_TLK, cu_B1, layer_ids, num_experts, valid_T, gates_TLK, meta)


def _valid_rows(valid_BS: torch.Tensor, mask_BS: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``valid_BS`` as bool rows ``[B*S]`` on ``device``, checked to be shaped like the attention mask."""
    valid_N = _as_mask(valid_BS, "valid_BS", device)
    if valid_N.shape != mask_BS.shape:
        raise LayoutError(
            f"valid_BS has shape {tuple(valid_N.shape)}, expected {tuple(mask_BS.shape)} like attention_mask_BS"
        )
    return valid_N.reshape(-1)


def _trusted_trace(
    experts_TLK: torch.Tensor,
    cu_B1: torch.Tensor,
    layer_ids: Sequence[int],
    num_experts: int,
    valid_T: torch.Tensor | None,
    gates_TLK: torch.Tensor | None,
    meta: dict[str, str] | None,
) -> RoutingTrace:
    """A trace of routes known good (``validate=False``): only the checks that do not scale with T run."""
    # The constructor on zero rows checks everything that does not scale with T (layer ids,
    # num_experts, dtypes, meta) without reading the routes.
    head = RoutingTrace(
        experts=experts_TLK[:0],
        cu_seqlens=torch.zeros(1, dtype=torch.int64),
        layer_ids=layer_ids,
        num_experts=num_experts,
        gates=None if gates_TLK is None else gates_TLK[:0],
        meta=meta or {},
    )
    dtype = expert_dtype(num_experts)
    if experts_TLK.dtype != dtype:
        experts_TLK = experts_TLK.to(dtype)
    if valid_T is not None and not bool(valid_T.all()):
        # Invalid rows are stored as zeros (RoutingTrace's convention).
        experts_TLK.index_fill_(0, (~valid_T).nonzero().squeeze(1), 0)
    return RoutingTrace.unchecked(
        experts=experts_TLK,
        cu_seqlens=cu_B1,
        layer_ids=head.layer_ids,
        num_experts=num_experts,
        valid=valid_T,
        gates=gates_TLK,
        meta=head.meta,
    )


def _lengths_mask(lens_B: torch.Tensor, S: int, side: str) -> torch.Tensor:
    col_S = torch.arange(S, device=lens_B.device)
    if side == "right":
        return col_S[None, :] < lens_B[:, None]
    return col_S[None, :] >= (S - lens_B)[:, None]


def unpack_to_padded(
    trace: RoutingTrace,
    *,
    attention_mask_BS: torch.Tensor | None = None,
    padding_side: Literal["left", "right"] | None = None,
    max_len: int | None = None,
    pad_value: int = 0,
) -> PaddedRoutes:
    """Lay a packed trace out as a padded batch; the inverse of :func:`pack_padded`.

    Either give the mask of the batch (rows go to its True positions, in order), or let one be
    built from the sequence lengths with ``padding_side`` (default ``"right"``) and ``max_len``
    (default: the longest sequence).

    Args:
        trace: the packed trace, B sequences.
        attention_mask_BS: optional bool or 0/1 ``[B, S]``; row ``b`` must have exactly
            ``trace.seq_lens[b]`` True positions.
        padding_side: ``"right"`` or ``"left"``, when no mask is given.
        max_len: padded length S when no mask is given; at least the longest sequence.
        pad_value: expert id written at padding positions; must fit the trace's dtype.

    Returns:
        :class:`PaddedRoutes` ``(experts_BSLK, attention_mask_BS, valid_BS, gates_BSLK)``.

    Raises:
        LayoutError: mask rows or counts that do not match the trace (names the sequence), both a
            mask and ``padding_side``/``max_len``, ``max_len`` shorter than a sequence, an unknown
            ``padding_side``, or a ``pad_value`` the dtype cannot hold.
    """
    trace = _check_trace(trace)
    lens_B, B, T = trace.seq_lens, trace.num_seqs, trace.num_tokens
    if attention_mask_BS is not None:
        if padding_side is not None or max_len is not None:
            raise LayoutError(
                "give either attention_mask_BS, or padding_side/max_len to build one from the sequence lengths, "
                "not both"
            )
        mask_BS = _as_mask(attention_mask_BS, "attention_mask_BS", trace.device)
        _check_counts(mask_BS, lens_B, "attention_mask_BS")
    else:
        side = "right" if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise LayoutError(f"padding_side must be 'left' or 'right', found {padding_side!r}")
        longest = int(lens_B.max()) if B else 0
        if max_len is None:
            max_len = longest
        _check_int(max_len, "max_len", minimum=0)
        if max_len < longest:
            b = int(lens_B.argmax())
            raise LayoutError(
                f"max_len={max_len} is shorter than sequence {b} ({longest} tokens); pass max_len >= {longest} or None"
            )
        mask_BS = _lengths_mask(lens_B, max_len, side)
    S = mask_BS.shape[1]
    info = torch.iinfo(trace.experts.dtype)
    if isinstance(pad_value, bool) or not isinstance(pad_value, int) or not info.min <= pad_value <= info.max:
        raise LayoutError(
            f"pad_value={pad_value!r} does not fit the trace's {trace.experts.dtype} ids "
            f"[{info.min}, {info.max}]; pick a value in that range"
        )

    flat_N = mask_BS.reshape(-1)
    pos_T = flat_N.nonzero().squeeze(1)
    src_N = torch.zeros(B * S, dtype=torch.int64, device=trace.device)
    src_N[pos_T] = torch.arange(T, device=trace.device)
    fill_N = (~flat_N).nonzero().squeeze(1)
    L, K = trace.num_layers, trace.top_k
    return PaddedRoutes(
        experts_BSLK=_take_rows(trace.experts, src_N, fill_N, pad_value).view(B, S, L, K),
        attention_mask_BS=mask_BS,
        valid_BS=None if trace.valid is None else _take_rows(trace.valid, src_N, fill_N, False).view(B, S),
        gates_BSLK=None if trace.gates is None else _take_rows(trace.gates, src_N, fill_N, 0.0).view(B, S, L, K),
    )


def to_router_rows(trace: RoutingTrace, attention_mask_BS: torch.Tensor) -> RoutingTrace:
    """The trace in the row order an HF router sees: ``B*S`` rows, row ``b*S + s`` for ``[b, s]``.

    HF MoE blocks flatten ``hidden_states [B, S, H]`` to ``[B*S, H]`` before routing, so a
    padded batch reaches the router with its padding rows in place. The result holds one
    sequence of S rows per batch row; padding rows are invalid and zero.

    Args:
        trace: packed trace of the B sequences.
        attention_mask_BS: bool or 0/1 ``[B, S]`` of the batch; row ``b`` has ``seq_lens[b]`` True.

    Returns:
        A ``RoutingTrace`` with ``B*S`` rows and ``cu_seqlens = [0, S, 2S, ...]``.

    Raises:
        LayoutError: mask shape or counts that do not match the trace (names the sequence).
    """
    padded = unpack_to_padded(trace, attention_mask_BS=attention_mask_BS)
    B, S = padded.attention_mask_BS.shape
    if padded.valid_BS is not None:
        valid_N = padded.valid_BS.reshape(-1)
    else:
        valid_N = None if bool(padded.attention_mask_BS.all()) else padded.attention_mask_BS.reshape(-1)
    return trace.replace(
        check=False,
        rows_checked=trace.rows_checked(),
        experts=padded.experts_BSLK.view(B * S, trace.num_layers, trace.top_k),
        cu_seqlens=torch.arange(B + 1, dtype=torch.int64, device=trace.device) * S,
        valid=valid_N,
        gates=None if padded.gates_BSLK is None else padded.gates_BSLK.view(B * S, trace.num_layers, trace.top_k),
    )


def router_row_sources(
    cu_seqlens_B1: torch.Tensor, attention_mask_BS: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each of the ``B*S`` router rows of a padded batch comes from, with no host sync.

    The gather form of :func:`to_router_rows` for traces on an accelerator: row ``b*S + s`` of a
    real token (mask True) takes trace row ``cu_seqlens[b] + r``, ``r`` the number of real tokens
    before ``s`` in batch row ``b`` (left, right or interleaved padding alike).

    Args:
        cu_seqlens_B1: int64 ``[B+1]`` sequence boundaries of the trace.
        attention_mask_BS: bool or 0/1 ``[B, S]`` of the batch, on the same device.
        num_tokens: the trace's ``T`` (a host int, so no read of ``cu_seqlens[-1]``).

    Returns:
        ``src_N`` int64 ``[B*S]`` trace rows (clamped into ``[0, T)``: padding rows point at some
        row), ``real_N`` bool ``[B*S]`` rows of real tokens the trace covers, and a bool scalar
        tensor, True when a batch row's real-token count differs from its sequence's length (the
        caller reads it when a host sync is allowed).
    """
    mask_BS = attention_mask_BS.to(torch.bool)
    lens_B = cu_seqlens_B1.diff()
    rank_BS = mask_BS.cumsum(1) - 1
    real_BS = mask_BS & (rank_BS < lens_B[:, None])
    src_BS = (cu_seqlens_B1[:-1, None] + rank_BS).clamp_(0, max(num_tokens - 1, 0))
    differs = (mask_BS.sum(1) != lens_B).any()
    return src_BS.reshape(-1), real_BS.reshape(-1), differs


def from_router_rows(rows: RoutingTrace, attention_mask_BS: torch.Tensor) -> RoutingTrace:
    """Pack ``B*S`` router rows (see :func:`to_router_rows`) into a trace of B sequences.

    ``rows.cu_seqlens`` is not used: only the row order matters (row ``b*S + s`` is ``[b, s]``),
    so rows recorded as one long sequence work too. Padding rows are dropped.

    Args:
        rows: trace with exactly ``B*S`` rows.
        attention_mask_BS: bool or 0/1 ``[B, S]`` of the batch.

    Returns:
        A packed ``RoutingTrace`` with ``attention_mask_BS.sum()`` rows.

    Raises:
        LayoutError: the row count is not ``B*S`` or the mask is not ``[B, S]`` 0/1.
    """
    rows = _check_trace(rows, "rows")
    mask_BS = _as_mask(attention_mask_BS, "attention_mask_BS", rows.device)
    B, S = mask_BS.shape
    if rows.num_tokens != B * S:
        raise LayoutError(
            f"the trace has {rows.num_tokens} rows but attention_mask_BS of shape ({B}, {S}) covers {B * S}; "
            "router rows are the model's flattened [B*S] batch, padding included"
        )
    pos_T = mask_BS.reshape(-1).nonzero().squeeze(1)
    return rows.replace(
        check=False,
        rows_checked=rows.rows_checked(),
        experts=_take_rows(rows.experts, pos_T),
        cu_seqlens=cu_seqlens_of(mask_BS.sum(1)),
        valid=_tidy_valid(_take_rows(rows.valid, pos_T)),
        gates=_take_rows(rows.gates, pos_T),
    )


# --- micro-batches ---------------------------------------------------------------------------
def _slice_seqs(trace: RoutingTrace, cu: list[int], s: int, e: int) -> RoutingTrace:
    lo, hi = cu[s], cu[e]
    cut = lambda x: None if x is None else x[lo:hi]
    return trace.replace(
        check=False,
        rows_checked=trace.rows_checked(),
        experts=cut(trace.experts),
        cu_seqlens=trace.cu_seqlens[s : e + 1] - lo,
        valid=cut(trace.valid),
        gates=cut(trace.gates),
    )


def _balanced_bounds(cu_B1: torch.Tensor, n: int) -> list[int]:
    """``n + 1`` sequence boundaries, strictly increasing, cutting near equal token shares."""
    B, T = cu_B1.numel() - 1, int(cu_B1[-1])
    i_M = torch.arange(1, n, dtype=torch.int64, device=cu_B1.device)
    target_M = i_M.double() * T / n
    hi_M = torch.searchsorted(cu_B1.double(), target_M)  # first boundary at or past the target
    lo_M = (hi_M - 1).clamp(min=0)
    nearer_lo_M = (target_M - cu_B1[lo_M]) <= (cu_B1[hi_M.clamp(max=B)] - target_M)
    cut_M = torch.where(nearer_lo_M, lo_M, hi_M)
    # Each micro-batch keeps at least one sequence: cut_i - i non-decreasing and >= 0 makes the
    # cuts strictly increasing from 1; the min keeps room for one sequence after each cut.
    cut_M = (cut_M - i_M).clamp(min=0).cummax(0).values + i_M
    cut_M = torch.minimum(cut_M, B - n + i_M)
    return [0, *cut_M.tolist(), B]


def split_micro_batches(
    trace: RoutingTrace,
    num_micro_batches: int | None = None,
    *,
    max_tokens: int | None = None,
    balance: Literal["tokens", "sequences"] = "tokens",
) -> list[RoutingTrace]:
    """Cut a trace into consecutive micro-batches of whole sequences, in order.

    Give exactly one of ``num_micro_batches`` or ``max_tokens``. With a count, cuts fall at the
    sequence boundaries nearest to equal token shares (``balance="tokens"``) or give equal
    sequence counts, the first ones one larger (``balance="sequences"``, like ``numpy.array_split``);
    every micro-batch has at least one sequence. With ``max_tokens``, sequences are taken greedily
    while the micro-batch stays within the budget. :func:`join_micro_batches` is the exact inverse.

    The micro-batches are views of ``trace``'s tensors (no copy); note that ``torch.save`` or
    pickling a view writes its whole storage.

    Args:
        trace: the trace to cut.
        num_micro_batches: number of micro-batches, 1 to B.
        max_tokens: token budget of one micro-batch.
        balance: ``"tokens"`` or ``"sequences"``, with ``num_micro_batches``.

    Returns:
        The micro-batch traces, in order. A trace of zero sequences split by ``max_tokens`` gives
        one empty micro-batch.

    Raises:
        LayoutError: neither or both of count and budget, more micro-batches than sequences, or a
            sequence longer than ``max_tokens`` (names it).
    """
    trace = _check_trace(trace)
    if (num_micro_batches is None) == (max_tokens is None):
        raise LayoutError("pass exactly one of num_micro_batches or max_tokens")
    B = trace.num_seqs
    if num_micro_batches is not None:
        n = _check_int(num_micro_batches, "num_micro_batches")
        if n > B:
            raise LayoutError(
                f"cannot split {B} sequences into {n} micro-batches: each needs at least one sequence; "
                f"use num_micro_batches <= {B}"
            )
        if balance == "tokens":
            bounds = _balanced_bounds(trace.cu_seqlens, n)
        elif balance == "sequences":
            q, r = divmod(B, n)
            bounds = [i * q + min(i, r) for i in range(n + 1)]
        else:
            raise LayoutError(f"balance must be 'tokens' or 'sequences', found {balance!r}")
    else:
        budget = _check_int(max_tokens, "max_tokens")
        lens_B = trace.seq_lens
        too_long_B = lens_B > budget
        if bool(too_long_B.any()):
            b = _first(too_long_B)
            raise LayoutError(
                f"sequence {b} has {int(lens_B[b])} tokens, more than max_tokens={budget}; a sequence cannot be "
                f"split across micro-batches, so raise max_tokens to at least {int(lens_B.max())}"
            )
        cu = trace.cu_seqlens.tolist()
        bounds = [0]
        # One step per micro-batch: the last boundary within budget of the current start.
        while bounds[-1] < B or len(bounds) == 1:
            s = bounds[-1]
            bounds.append(min(bisect.bisect_right(cu, cu[s] + budget) - 1, B))
    cu = trace.cu_seqlens.tolist()
    return [_slice_seqs(trace, cu, s, e) for s, e in itertools.pairwise(bounds)]


def join_micro_batches(micro_batches: Sequence[RoutingTrace]) -> RoutingTrace:
    """The micro-batches' sequences one after another; the inverse of :func:`split_micro_batches`.

    Args:
        micro_batches: traces of the same layers, top-k and expert count.

    Returns:
        One trace (a copy).

    Raises:
        LayoutError: an empty list. TraceMismatchError: traces of different layers or top-k.
    """
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise LayoutError("join_micro_batches needs at least one micro-batch")
    for i, t in enumerate(micro_batches):
        _check_trace(t, f"micro-batch {i}")
    return RoutingTrace.concat(micro_batches)


# --- sequence parallel -------------------------------------------------------------------------
def _rank_rows(x: torch.Tensor | None, lo: int, real: int, n: int, fill=0) -> torch.Tensor | None:
    """Rows ``[lo, lo + n)`` of ``x`` in new memory; rows past ``lo + real`` are ``fill``."""
    if x is None:
        return None
    if real == n:
        return x[lo : lo + n].clone()
    out = torch.full((n, *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    out[:real].copy_(x[lo : lo + real])
    return out


def _check_rank(rank: object, world: int, name: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise LayoutError(f"rank must be an int in [0, {world}) for {name}={world}, found {rank!r}")
    return rank


@overload
def split_sp(trace: RoutingTrace, world: int, *, rank: None = None) -> list[RoutingTrace]: ...
@overload
def split_sp(trace: RoutingTrace, world: int, *, rank: int) -> RoutingTrace: ...
def split_sp(trace: RoutingTrace, world: int, *, rank: int | None = None) -> list[RoutingTrace] | RoutingTrace:
    """Split the packed rows over ``world`` sequence-parallel ranks, like Megatron's scatter.

    T is padded to ``world * ceil(T / world)``; rank ``r`` holds rows ``[r*n, (r+1)*n)``. The
    padding rows (fewer than ``world``, all zero, invalid) extend the last sequence. Each rank's
    ``cu_seqlens`` is the global one clipped to its rows, so every rank lists all B sequences,
    some with zero rows. Each shard owns its memory, so sending one to its rank does not ship the
    others. :func:`gather_sp` is the inverse.

    Args:
        trace: the packed trace.
        world: number of ranks.
        rank: build only this rank's shard (what each rank of a real group does).

    Returns:
        ``world`` traces of ``ceil(T / world)`` rows each, or the one of ``rank``. They carry
        ``valid`` when the trace does or any padding exists.

    Raises:
        LayoutError: ``world`` not a positive int, ``rank`` outside ``[0, world)``.
    """
    trace = _check_trace(trace)
    world = _check_int(world, "world")
    ranks = range(world) if rank is None else [_check_rank(rank, world, "world")]
    T = trace.num_tokens
    n = -(-T // world)
    pad = n * world - T
    cu_pad_B1 = trace.cu_seqlens.clone()
    cu_pad_B1[-1] += pad
    valid_T = trace.valid_mask if (trace.valid is not None or pad) else None
    shards = []
    for r in ranks:  # loop over ranks: each rank is one contiguous copy
        lo = r * n
        real = max(0, min(lo + n, T) - lo)
        shards.append(
            trace.replace(
                check=False,
                rows_checked=trace.rows_checked(),
                experts=_rank_rows(trace.experts, lo, real, n),
                cu_seqlens=cu_pad_B1.clamp(lo, lo + n) - lo,
                valid=_rank_rows(valid_T, lo, real, n, False),
                gates=_rank_rows(trace.gates, lo, real, n, 0.0),
            )
        )
    return shards if rank is None else shards[0]


def gather_sp(shards: Sequence[RoutingTrace], *, num_tokens: int) -> RoutingTrace:
    """Join sequence-parallel shards back into one trace and drop the padding; inverse of :func:`split_sp`.

    Args:
        shards: the ``world`` shards, in rank order.
        num_tokens: T of the trace that was split (the shards hold ``T`` rounded up to a multiple
            of ``world``).

    Returns:
        The trace of ``num_tokens`` rows.

    Raises:
        LayoutError: shards of different models, sizes or sequence counts; a shard whose
            ``cu_seqlens`` is not the clip of the joined one; ``num_tokens`` that does not give
            the shards' size; or a padding row marked valid (names rank and row).
    """
    shards = list(shards)
    if not shards:
        raise LayoutError("gather_sp needs at least one shard")
    for r, s in enumerate(shards):
        _check_trace(s, f"shard {r}")
    _same_model(shards, "shard")
    world, n, B = len(shards), shards[0].num_tokens, shards[0].num_seqs
    for r, s in enumerate(shards):
        if s.num_tokens != n or s.num_seqs != B:
            raise LayoutError(
                f"shard {r} has {s.num_tokens} rows and {s.num_seqs} sequences, shard 0 has {n} rows and {B}; "
                "sequence-parallel shards are equal slices of one trace"
            )
    T = _check_int(num_tokens, "num_tokens", minimum=0)
    if -(-T // world) != n:
        raise LayoutError(
            f"{world} shards of {n} rows do not come from a trace of num_tokens={T}: split_sp would give shards of "
            f"{-(-T // world)} rows; pass the num_tokens of the trace that was split"
        )
    pad = n * world - T
    lens_B = torch.stack([s.seq_lens for s in shards]).sum(0)
    cu_pad_B1 = cu_seqlens_of(lens_B)
    for r, s in enumerate(shards):
        expected_B1 = cu_pad_B1.clamp(r * n, (r + 1) * n) - r * n
        if not torch.equal(s.cu_seqlens, expected_B1):
            b = _first(s.cu_seqlens != expected_B1)
            raise LayoutError(
                f"shard {r}: cu_seqlens[{b}]={int(s.cu_seqlens[b])} but the joined sequences put it at "
                f"{int(expected_B1[b])}; the shards must be split_sp output in rank order"
            )
    if B and int(lens_B[-1]) < pad:
        raise LayoutError(f"the last sequence has {int(lens_B[-1])} rows, fewer than the {pad} padding rows")
    has_valid = any(s.valid is not None for s in shards)
    if pad:
        if not has_valid:
            raise LayoutError(
                f"the last {pad} rows are padding but no shard marks them invalid; pass the shards of split_sp"
            )
        valid_pad = torch.cat([s.valid_mask for s in shards])[T:]
        if bool(valid_pad.any()):
            q = T + _first(valid_pad)
            raise LayoutError(
                f"shard {q // n}, row {q % n} lies in the padding past num_tokens={T} but is marked valid; "
                "pass the num_tokens of the trace that was split"
            )
    keep = [max(0, min(n, T - r * n)) for r in range(world)]
    cat = lambda xs: torch.cat([x[:k] for x, k in zip(xs, keep)])
    lens_B[-1:] -= pad
    first = shards[0]
    return first.replace(
        check=False,
        rows_checked=all(s.rows_checked() for s in shards),
        experts=cat([s.experts for s in shards]),
        cu_seqlens=cu_seqlens_of(lens_B),
        valid=_tidy_valid(cat([s.valid_mask for s in shards])) if has_valid else None,
        gates=None if first.gates is None else cat([s.gates for s in shards]),
    )


# --- context parallel --------------------------------------------------------------------------
def cp_padded_seq_lens(
    seq_lens_B: torch.Tensor, cp: int, *, mode: CPMode = "zigzag", align: int | None = None
) -> torch.Tensor:
    """Sequence lengths after context-parallel padding (``cu_seqlens_padded`` is their cumsum).

    Args:
        seq_lens_B: int ``[B]`` token counts.
        cp: context-parallel size.
        mode: ``"zigzag"`` (each sequence in ``2*cp`` chunks) or ``"contiguous"`` (``cp`` chunks).
        align: pad each sequence to a multiple of this; default ``2*cp`` (zigzag) or ``cp``. Must
            be a multiple of the default. verl pads to ``tp * cp * 2``: pass that to match it.

    Returns:
        int64 ``[B]``, each length rounded up to a multiple of ``align`` (0 stays 0).

    Raises:
        LayoutError: bad ``cp``, ``mode`` or ``align``.
    """
    cp = _check_int(cp, "cp")
    if mode not in ("zigzag", "contiguous"):
        raise LayoutError(f"mode must be 'zigzag' or 'contiguous', found {mode!r}")
    base = 2 * cp if mode == "zigzag" else cp
    align = base if align is None else _check_int(align, "align")
    if align % base:
        raise LayoutError(
            f"align={align} must be a multiple of {base} "
            f"({'2*cp' if mode == 'zigzag' else 'cp'} for {mode} with cp={cp})"
        )
    lens_B = torch.as_tensor(seq_lens_B, dtype=torch.int64)
    return (lens_B + (align - 1)) // align * align


def _cp_chunks(cp: int, mode: str, device: torch.device) -> torch.Tensor:
    """int64 ``[R, P]``: the chunk of each sequence that rank r holds as its part p."""
    r_R = torch.arange(cp, device=device)
    if mode == "zigzag":
        # Megatron's get_batch_on_this_cp_rank and verl's preprocess_packed_seqs: rank r holds
        # chunks r and 2*cp-1-r, so every rank gets the same causal-attention work.
        return torch.stack([r_R, 2 * cp - 1 - r_R], 1)
    return r_R[:, None]


@overload
def shard_cp(
    trace: RoutingTrace, cp: int, *, mode: CPMode = "zigzag", align: int | None = None, rank: None = None
) -> list[RoutingTrace]: ...
@overload
def shard_cp(
    trace: RoutingTrace, cp: int, *, mode: CPMode = "zigzag", align: int | None = None, rank: int
) -> RoutingTrace: ...
def shard_cp(
    trace: RoutingTrace, cp: int, *, mode: CPMode = "zigzag", align: int | None = None, rank: int | None = None
) -> list[RoutingTrace] | RoutingTrace:
    """Cut every sequence into context-parallel chunks and give each rank its chunks.

    Each sequence is padded at its end to a multiple of ``align`` (default ``2*cp`` zigzag, ``cp``
    contiguous) and cut into ``C`` equal chunks (``2*cp`` zigzag, ``cp`` contiguous). Zigzag rank
    ``r`` holds chunks ``r`` and ``2*cp-1-r`` of every sequence, in that order (the Megatron / verl
    THD layout); contiguous rank ``r`` holds chunk ``r``. A rank's trace lists all B sequences
    with ``cu_seqlens = cumsum(padded_len / cp)``, the same on every rank. Padding rows are zero
    and invalid. Each shard owns its memory. :func:`unshard_cp` is the inverse.

    Args:
        trace: the packed trace.
        cp: context-parallel size.
        mode: ``"zigzag"`` or ``"contiguous"``.
        align: per-sequence padding multiple (see :func:`cp_padded_seq_lens`).
        rank: build only this rank's shard (what each rank of a real group does).

    Returns:
        ``cp`` traces in rank order, or the one of ``rank``. They carry ``valid`` when the trace
        does or any sequence needed padding.

    Raises:
        LayoutError: bad ``cp``, ``mode``, ``align`` or ``rank``.
    """
    trace = _check_trace(trace)
    lens_B = trace.seq_lens
    P_B = cp_padded_seq_lens(lens_B.cpu(), cp, mode=mode, align=align).to(trace.device)
    ranks = range(cp) if rank is None else [_check_rank(rank, cp, "cp")]
    chunk_RP = _cp_chunks(cp, mode, trace.device)
    c_B = P_B // (2 * cp if mode == "zigzag" else cp)  # rows per chunk
    cu_B1 = cu_seqlens_of(P_B // cp)
    n = int(cu_B1[-1])
    has_pad = bool((P_B != lens_B).any())  # padding on any rank: every rank gets a valid mask
    shards = []
    for r in ranks:  # loop over ranks: each rank gets its own storage
        off_BP = c_B[:, None] * chunk_RP[r][None, :]  # first row of each segment within its sequence
        len_BP = c_B[:, None].expand_as(off_BP)
        # A segment's real rows come first, then its padding (padding sits at each sequence's end).
        real_BP = (lens_B[:, None] - off_BP).clamp(min=0).minimum(len_BP)
        len_G, real_G = len_BP.reshape(-1), real_BP.reshape(-1)
        idx_N = ranges((trace.cu_seqlens[:-1, None] + off_BP).reshape(-1), len_G)
        fill_N = ranges(len_G.cumsum(0) - len_G + real_G, len_G - real_G)
        idx_N.index_fill_(0, fill_N, 0)  # padding must index a real row; it is overwritten afterwards
        shards.append(
            trace.replace(
                check=False,
                rows_checked=trace.rows_checked(),
                experts=_take_rows(trace.experts, idx_N, fill_N, 0),
                cu_seqlens=cu_B1.clone(),
                valid=_gather_valid(trace, idx_N, fill_N, always=has_pad),
                gates=_take_rows(trace.gates, idx_N, fill_N, 0.0),
            )
        )
    assert all(s.num_tokens == n for s in shards)
    return shards if rank is None else shards[0]


def unshard_cp(shards: Sequence[RoutingTrace], *, cu_seqlens: torch.Tensor, mode: CPMode = "zigzag") -> RoutingTrace:
    """Put context-parallel shards back into the original trace; the inverse of :func:`shard_cp`.

    When the shards' tensors lie back to back in one buffer (as after ``all_gather_into_tensor``
    and ``split``) the rows are gathered from it in place; otherwise each shard is scattered to
    its rows.

    Args:
        shards: the ``cp`` shards, in rank order.
        cu_seqlens: int ``[B+1]`` boundaries of the trace before sharding (unpadded).
        mode: ``"zigzag"`` or ``"contiguous"``, as given to :func:`shard_cp`.

    Returns:
        The trace with ``cu_seqlens`` as given and the padding dropped.

    Raises:
        LayoutError: shards of different models or layouts (names the rank), ``cu_seqlens`` that
            do not fit the shards (names the sequence), or a padding row marked valid.
    """
    shards = list(shards)
    _check_cp_shards(shards, mode)
    cp, first, device = len(shards), shards[0], shards[0].device
    cu_B1, lens_B = _unshard_cu_seqlens(cu_seqlens, first.num_seqs, device)
    per_B = first.seq_lens
    C = 2 * cp if mode == "zigzag" else cp
    if mode == "zigzag" and bool((per_B % 2 != 0).any()):
        b = _first(per_B % 2 != 0)
        raise LayoutError(
            f"sequence {b} has {int(per_B[b])} rows on each rank; zigzag shards hold two equal chunks of every "
            "sequence, so this must be even (were the shards made with mode='contiguous'?)"
        )
    P_B = per_B * cp
    short_B = P_B < lens_B
    if bool(short_B.any()):
        b = _first(short_B)
        raise LayoutError(
            f"sequence {b}: cu_seqlens gives it {int(lens_B[b])} tokens but the {cp} shards hold {int(P_B[b])} rows "
            "for it; pass the cu_seqlens of the trace that was sharded"
        )
    c_B = P_B // C
    chunk_RP = _cp_chunks(cp, mode, device)
    # Invert the chunk map: chunk j of a sequence is part part_C[j] of rank rank_C[j].
    rank_C = torch.empty(C, dtype=torch.int64, device=device)
    part_C = torch.empty(C, dtype=torch.int64, device=device)
    rank_C[chunk_RP.reshape(-1)] = torch.arange(cp, device=device).repeat_interleave(chunk_RP.shape[1])
    part_C[chunk_RP.reshape(-1)] = torch.arange(chunk_RP.shape[1], device=device).repeat(cp)
    n = first.num_tokens
    # Segment (b, j): where chunk j of sequence b starts in the ranks' rows laid end to end.
    start_BC = rank_C[None, :] * n + first.cu_seqlens[:-1, None] + part_C[None, :] * c_B[:, None]
    off_BC = torch.arange(C, device=device)[None, :] * c_B[:, None]
    real_BC = (lens_B[:, None] - off_BC).clamp(min=0).minimum(c_B[:, None].expand_as(off_BC))
    src_T = ranges(start_BC.reshape(-1), real_BC.reshape(-1))
    has_valid = any(s.valid is not None for s in shards)
    pad_Q = ranges((start_BC + real_BC).reshape(-1), (c_B[:, None] - real_BC).reshape(-1))
    if pad_Q.numel():
        _check_padding_invalid(shards, pad_Q, has_valid)
    return first.replace(
        check=False,
        rows_checked=all(s.rows_checked() for s in shards),
        experts=_merge_rows([s.experts for s in shards], src_T, pad_Q),
        cu_seqlens=cu_B1,
        valid=_tidy_valid(_take_rows(torch.cat([s.valid_mask for s in shards]), src_T)) if has_valid else None,
        gates=None if first.gates is None else _merge_rows([s.gates for s in shards], src_T, pad_Q),
    )


def _check_cp_shards(shards: list[RoutingTrace], mode: str) -> None:
    """At least one shard, each a trace, a known ``mode``, and every shard of the same model and with
    the same ``cu_seqlens``."""
    if not shards:
        raise LayoutError("unshard_cp needs at least one shard")
    for r, s in enumerate(shards):
        _check_trace(s, f"shard {r}")
    if mode not in ("zigzag", "contiguous"):
        raise LayoutError(f"mode must be 'zigzag' or 'contiguous', found {mode!r}")
    _same_model(shards, "shard")
    first = shards[0]
    for r, s in enumerate(shards[1:], 1):
        if s.cu_seqlens.shape != first.cu_seqlens.shape or not torch.equal(s.cu_seqlens, first.cu_seqlens):
            raise LayoutError(
                f"shard {r} has cu_seqlens {s.cu_seqlens.tolist()} but shard 0 has {first.cu_seqlens.tolist()}; "
                "context-parallel shards hold the same number of rows of every sequence"
            )


def _unshard_cu_seqlens(
    cu_seqlens: torch.Tensor, num_seqs: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsharded trace's ``cu_seqlens`` as int64 on ``device`` and its sequence lengths, checked
    (1-D int, from 0, never decreasing, ``num_seqs`` sequences)."""
    cu_B1 = torch.as_tensor(cu_seqlens)
    if cu_B1.ndim != 1 or cu_B1.numel() < 1 or cu_B1.dtype.is_floating_point or cu_B1.dtype == torch.bool:
        raise LayoutError(f"cu_seqlens must be a 1-D int tensor [B+1], found {tuple(cu_B1.shape)} {cu_B1.dtype}")
    cu_B1 = cu_B1.to(device=device, dtype=torch.int64)
    lens_B = cu_B1.diff()
    if int(cu_B1[0]) != 0 or bool((lens_B < 0).any()):
        raise LayoutError(f"cu_seqlens must start at 0 and never decrease, found {cu_B1.tolist()}")
    B = lens_B.numel()
    if B != num_seqs:
        raise LayoutError(f"cu_seqlens describes {B} sequences but the shards hold {num_seqs}")
    return cu_B1, lens_B


def _check_padding_invalid(shards: list[RoutingTrace], pad_Q: torch.Tensor, has_valid: bool) -> None:
    """No padding row (``pad_Q``: indices into the shards' rows laid end to end) is marked valid; a
    shard without ``valid`` marks every row valid."""
    first, device = shards[0], shards[0].device
    n = first.num_tokens
    valid_pad = (
        torch.cat([s.valid_mask for s in shards])[pad_Q] if has_valid else torch.ones_like(pad_Q, dtype=torch.bool)
    )
    if bool(valid_pad.any()):
        q = int(pad_Q[_first(valid_pad)])
        r, i = divmod(q, n) if n else (0, 0)
        b = int(torch.searchsorted(first.cu_seqlens, torch.tensor(i, device=device), right=True)) - 1
        raise LayoutError(
            f"shard {r}, row {i} (sequence {b}) is padding for the given cu_seqlens but is marked valid; "
            "pass the cu_seqlens of the trace that was sharded"
        )


# --- engine rows <-> training rows -------------------------------------------------------------
def engine_to_training(trace: RoutingTrace) -> RoutingTrace:
    """Add the missing last row of every sequence: engine captures -> trainer rows.

    Inference engines return ``n - 1`` rows for a sequence of ``n`` tokens (the last sampled
    token is never forwarded); the trainer forwards all ``n``. The new last row of each sequence
    is zero and invalid, with zero gates. :func:`training_to_engine` is the inverse.

    Args:
        trace: engine-convention trace; ``cu_seqlens`` counts rows.

    Returns:
        A trace with ``seq_lens + 1`` rows per sequence and ``valid`` set.
    """
    trace = _check_trace(trace)
    lens_B, B = trace.seq_lens, trace.num_seqs
    if B == 0:
        return trace.replace(check=False)
    cu_B1 = cu_seqlens_of(lens_B + 1)
    # Sequence b's rows come from its own rows; the new last row has no source (it would read
    # the next sequence's first row, or row T) and is filled.
    src_N = ranges(trace.cu_seqlens[:-1], lens_B + 1)
    fill_B = cu_B1[1:] - 1
    src_N.index_fill_(0, fill_B, 0)
    return trace.replace(
        check=False,
        rows_checked=trace.rows_checked(),
        experts=_take_rows(trace.experts, src_N, fill_B, 0),
        cu_seqlens=cu_B1,
        valid=_gather_valid(trace, src_N, fill_B),
        gates=_take_rows(trace.gates, src_N, fill_B, 0.0),
    )


def training_to_engine(trace: RoutingTrace, *, drop_valid_last: bool = False) -> RoutingTrace:
    """Drop the last row of every sequence: trainer rows -> the engine convention.

    Decision: a last row that holds a route (valid) is data this conversion would lose, so it is
    an error unless ``drop_valid_last=True``. Rows from :func:`engine_to_training` are invalid
    and drop silently; a trace recorded by a trainer (every row valid) needs the flag.

    Args:
        trace: training-convention trace, every sequence at least one row.
        drop_valid_last: drop last rows even when they are valid.

    Returns:
        A trace with ``seq_lens - 1`` rows per sequence.

    Raises:
        LayoutError: a sequence with no rows, or (without the flag) a valid last row; names the
            sequence.
    """
    trace = _check_trace(trace)
    lens_B, cu_B1 = trace.seq_lens, trace.cu_seqlens
    empty_B = lens_B == 0
    if bool(empty_B.any()):
        b = _first(empty_B)
        raise LayoutError(
            f"sequence {b} has no rows; a training trace has one row per token, so there is no last row to drop"
        )
    last_B = cu_B1[1:] - 1
    if not drop_valid_last:
        valid_last_B = trace.valid_mask[last_B]
        if bool(valid_last_B.any()):
            b = _first(valid_last_B)
            raise LayoutError(
                f"sequence {b}: its last row (row {int(last_B[b])}) has a recorded route, but the engine convention "
                "has no row for a sequence's last token, so dropping it would lose data; pass drop_valid_last=True "
                "to drop it anyway"
            )
    keep_N = ranges(cu_B1[:-1], lens_B - 1)
    return trace.replace(
        check=False,
        rows_checked=trace.rows_checked(),
        experts=_take_rows(trace.experts, keep_N),
        cu_seqlens=cu_seqlens_of(lens_B - 1),
        valid=_tidy_valid(_take_rows(trace.valid, keep_N)),
        gates=_take_rows(trace.gates, keep_N),
    )
