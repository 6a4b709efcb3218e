"""Helpers shared by the engine converters (see ``routereplay.formats`` for the conventions)."""

from __future__ import annotations

import base64
import binascii
import itertools
import sys
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from routereplay.core.errors import EngineFormatError, ZeroRoutesError
from routereplay.core.index import sequence_of
from routereplay.core.layout import engine_to_training, training_to_engine
from routereplay.core.trace import MAX_NUM_EXPERTS, RoutingTrace, expert_dtype, host_empty

Rows = Literal["engine", "training"]

# Below this many routed rows a top-1 layer can route everything to expert 0 by chance
# (probability about (1/E)^n), so the zero-route check would raise false alarms.
_K1_MIN_ROWS = 16


def _b64decode(data: str | bytes) -> bytes:
    """Strict base64 decoding (binascii.Error on any character outside the alphabet or bad padding)."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(data, strict_mode=True)  # validates while decoding: one pass
    return base64.b64decode(data, validate=True)


# --- small argument checks -------------------------------------------------------------------
def _check_rows(rows: str) -> None:
    if rows not in ("engine", "training"):
        raise EngineFormatError(f'rows must be "engine" (T-1 rows per sequence) or "training" (T rows), found {rows!r}')


def _check_lengths(values, n: int, name: str) -> list[int] | None:
    """``values`` as a list of n non-negative ints (or None)."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor | np.ndarray):
        values = values.tolist()
    values = list(values)
    if len(values) != n:
        raise EngineFormatError(f"{name} has {len(values)} entries but there are {n} requests; give one per request")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise EngineFormatError(f"{name}[{i}] must be a non-negative int, found {v!r}")
    return [int(v) for v in values]


def _int_array(x, where: str, what: str = "routed_experts") -> np.ndarray:
    """A numpy integer array from an ndarray, a CPU/GPU tensor or nested lists (no copy when possible)."""
    if x is None:
        raise EngineFormatError(
            f"{where}: {what} is None; the engine returned no routes (enable route capture for this request)"
        )
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise EngineFormatError(f"{where}: {what} has dtype {x.dtype}; expected integer expert ids")
        x = x.detach().cpu()
        arr = x.numpy() if x.dtype != torch.uint16 else x.to(torch.int32).numpy()
    else:
        try:
            arr = np.asarray(x)
        except ValueError as e:  # ragged nested lists
            raise EngineFormatError(f"{where}: {what} is not a rectangular [rows, layers, top_k] array ({e})") from None
    if arr.dtype == object:
        raise EngineFormatError(
            f"{where}: {what} is not a rectangular [rows, layers, top_k] array (ragged nested lists)"
        )
    if arr.size == 0 and arr.dtype.kind == "f":  # np.asarray([]) is float64: an empty list of rows
        arr = arr.astype(np.int32)
    if arr.dtype.kind not in "iu":
        raise EngineFormatError(
            f"{where}: {what} has dtype {arr.dtype}; expected an integer dtype (uint8, int16, uint16, int32, ...)"
        )
    return arr


def _as_tensor(arr: np.ndarray, where: str, what: str = "routed_experts") -> torch.Tensor:
    """A CPU tensor of an integer array: shared when possible, copied when it must be.

    A read-only array (``np.frombuffer`` over SGLang's base64 bytes, a ``.npy`` payload) is copied in
    its own dtype rather than shared: torch cannot protect a non-writable buffer. Unsigned dtypes
    wider than uint8 are widened to the next signed dtype that holds them (uint16 -> int32,
    uint32 -> int64), never narrowed: vLLM stores ids of models above 256 experts as uint16.
    """
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        if arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise EngineFormatError(
                f"{where}: {what} holds an id above 2**63-1 ({int(arr.max())}); the payload is corrupt"
            )
        arr = arr.astype(np.int32 if arr.dtype.itemsize == 2 else np.int64)
    elif not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, order="C")
    return torch.from_numpy(arr)


def _common_int_dtype(arrays: Sequence[np.ndarray]) -> np.dtype:
    """int32 when every source fits in it without wrapping, else int64 (never wrap a corrupt id into range)."""
    for a in arrays:
        if a.dtype.itemsize > 4 or (a.dtype.kind == "u" and a.dtype.itemsize >= 4):
            return np.dtype(np.int64)
    return np.dtype(np.int32)


def _assemble(
    parts: Sequence[np.ndarray],
    labels: Sequence[str],
    what: str = "routed_experts",
    *,
    num_experts: int | None = None,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-request ``[n_i, Lp, K]`` arrays into one ``[N, Lp, K]`` tensor plus ``cu_seqlens [B+1]``.

    With ``consume`` (``parts`` a list the caller owns and no longer needs) each part is dropped from
    it as soon as it is copied, so the parts and the result are not all held at once.

    An empty request may come as ``[]`` (shape ``(0,)``); it takes the layer and top-k of the others.
    With ``num_experts``, when every id of every part is in ``[0, num_experts)`` (a read-only
    min / max per part) the rows are copied straight into the trace's compact dtype (uint8 up to
    256 experts): one narrowing copy, and no wide intermediate for the checks and the trace to
    convert again. Otherwise (missing-route markers, corrupt ids) they are copied into int32 /
    int64, never narrowed, and the checks report the offending row.
    """
    shapes = [a.shape[1:] for a in parts if a.ndim == 3]
    for a, label in zip(parts, labels):
        if a.ndim != 3 and not (a.ndim == 1 and a.shape[0] == 0):
            raise EngineFormatError(f"{label}: {what} must be [rows, layers, top_k], found shape {tuple(a.shape)}")
    if not shapes:
        if not parts:
            raise EngineFormatError(f"no requests given: {what} is an empty list")
        raise EngineFormatError(f"cannot tell the number of layers and top-k: every request's {what} is empty")
    Lp, K = shapes[0]
    for a, label in zip(parts, labels):
        if a.ndim == 3 and a.shape[1:] != (Lp, K):
            raise EngineFormatError(
                f"{label}: {what} has {a.shape[1]} layers x top-{a.shape[2]}, "
                f"but {labels[0]} has {Lp} layers x top-{K}; "
                "every request of one model must have the same layer axis and top-k"
            )
    dtype = _common_int_dtype(parts)
    if _is_count(num_experts) and _all_in_range(parts, num_experts):
        dtype = _compact_dtype(num_experts)
    lens = [a.shape[0] for a in parts]
    out_NLK = np.empty((sum(lens), Lp, K), dtype=dtype)
    off = 0
    for i, n in enumerate(lens):
        if n:
            out_NLK[off : off + n] = parts[i]
        if consume:
            parts[i] = None
        off += n
    cu = torch.zeros(len(parts) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0, out=cu[1:])
    return torch.from_numpy(out_NLK), cu


def _is_count(num_experts: object) -> bool:
    """A valid expert count (anything else is left for RoutingTrace to refuse with its message)."""
    return isinstance(num_experts, int) and not isinstance(num_experts, bool) and 1 <= num_experts <= MAX_NUM_EXPERTS


def _compact(part: np.ndarray, num_experts: int) -> np.ndarray:
    """``part`` in the trace's compact id dtype when every id is in ``[0, num_experts)``, else as it
    is (missing-route markers, corrupt ids: the checks report them in the wide dtype). For a converter
    that decodes its payloads itself: narrowing each as it is decoded lets its wide copy go at once."""
    if not _is_count(num_experts) or not _all_in_range([part], num_experts):
        return part
    dtype = _compact_dtype(num_experts)
    return part if part.dtype == dtype else part.astype(dtype)


def _compact_dtype(num_experts: int) -> np.dtype:
    """The numpy dtype of a trace's ids (``core.trace.expert_dtype``)."""
    return np.dtype(torch.empty(0, dtype=expert_dtype(num_experts)).numpy().dtype)


def _all_in_range(parts: Sequence[np.ndarray], num_experts: int) -> bool:
    """Whether every id of every part lies in ``[0, num_experts)`` (reads each part, writes nothing)."""
    for a in parts:
        if a.size == 0 or (a.dtype == np.uint8 and num_experts >= 256):
            continue
        if int(a.min()) < 0 or int(a.max()) >= num_experts:
            return False
    return True


def _seq_ids(cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """int64 ``[T]``: the sequence of every row."""
    B = cu_seqlens_B1.numel() - 1
    return torch.repeat_interleave(torch.arange(B, device=cu_seqlens_B1.device), cu_seqlens_B1.diff())


def _label_of_row(cu_seqlens_B1: torch.Tensor, labels: Sequence[str], n: int) -> tuple[str, int]:
    b = sequence_of(cu_seqlens_B1, n)
    return labels[b], n - int(cu_seqlens_B1[b])


# --- layer axis --------------------------------------------------------------------------------
def _layer_ids_arg(moe_layer_ids) -> tuple[int, ...] | None:
    if moe_layer_ids is None:
        return None
    if isinstance(moe_layer_ids, torch.Tensor | np.ndarray):
        moe_layer_ids = moe_layer_ids.tolist()
    ids = tuple(moe_layer_ids)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int | np.integer) or i < 0 for i in ids):
        raise EngineFormatError(f"moe_layer_ids must be a non-empty list of non-negative ints, found {moe_layer_ids!r}")
    ids = tuple(int(i) for i in ids)
    if any(b <= a for a, b in itertools.pairwise(ids)):
        raise EngineFormatError(
            f"moe_layer_ids must be strictly increasing (a payload's layer axis is in model order), found {list(ids)}"
        )
    return ids


def _select_layers(
    experts_NLpK: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    labels: Sequence[str],
    moe_layer_ids,
    what: str = "routed_experts",
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Keep the MoE layers of a payload; check that every dropped (dense) layer is empty."""
    Lp = experts_NLpK.shape[1]
    ids = _layer_ids_arg(moe_layer_ids)
    if ids is None:
        return experts_NLpK, tuple(range(Lp))
    if Lp == len(ids):
        return experts_NLpK, ids  # an MoE-only layer axis (or ids == range(Lp): the same thing)
    if Lp <= ids[-1]:
        raise EngineFormatError(
            f"{what} has {Lp} layers, which fits neither an MoE-only layer axis ({len(ids)} layers for moe_layer_ids "
            f"{list(ids)}) nor a full decoder-layer axis (more than {ids[-1]} layers); "
            "check moe_layer_ids and the model"
        )
    keep = torch.tensor(ids, dtype=torch.int64, device=experts_NLpK.device)
    dense = torch.ones(Lp, dtype=torch.bool, device=experts_NLpK.device)
    dense[keep] = False
    dropped_NDK = experts_NLpK[:, dense]
    # Dense layers are left as the capture buffer's fill: zeros (vLLM, SGLang, verl) or -1 (placeholders).
    busy_ND = ((dropped_NDK != 0) & (dropped_NDK != -1)).any(-1)
    if bool(busy_ND.any()):
        n, d = (int(i) for i in busy_ND.nonzero()[0])
        layer = int(dense.nonzero()[d, 0])
        label, pos = _label_of_row(cu_seqlens_B1, labels, n)
        raise EngineFormatError(
            f"{label}: layer {layer} is not in moe_layer_ids {list(ids)} but holds expert ids "
            f"{dropped_NDK[n, d].tolist()} at row {pos}; a dense layer's rows are empty, so moe_layer_ids is "
            "probably wrong (a shifted layer map replays every later layer with another layer's routes)"
        )
    return experts_NLpK.index_select(1, keep), ids


def _expand_layers(
    experts_TLK: torch.Tensor, layer_ids: Sequence[int], num_hidden_layers: int | None, fill: int = 0
) -> torch.Tensor:
    """The inverse of :func:`_select_layers`: MoE layers placed on a full decoder-layer axis, dense layers ``fill``."""
    if num_hidden_layers is None:
        return experts_TLK
    if (
        isinstance(num_hidden_layers, bool)
        or not isinstance(num_hidden_layers, int)
        or num_hidden_layers <= max(layer_ids, default=-1)
    ):
        raise EngineFormatError(
            f"num_hidden_layers={num_hidden_layers!r} cannot hold the trace's layers {list(layer_ids)}; "
            "give the model's number of decoder layers (or None for an MoE-only layer axis)"
        )
    T, _, K = experts_TLK.shape
    out = torch.full((T, num_hidden_layers, K), fill, dtype=experts_TLK.dtype, device=experts_TLK.device)
    out[:, list(layer_ids)] = experts_TLK
    return out


# --- building and checking a trace -------------------------------------------------------------
def _finish(
    experts_NLpK: torch.Tensor,
    cu_seqlens_B1: torch.Tensor,
    labels: Sequence[str],
    *,
    num_experts: int,
    moe_layer_ids,
    rows: Rows,
    allow_zero_routes: bool,
    missing: str,
    source: str,
    meta: Mapping[str, str] | None,
    valid_N: torch.Tensor | None = None,
    have: Rows = "engine",
    layer_ids: tuple[int, ...] | None = None,
    what: str = "routed_experts",
) -> RoutingTrace:
    """Layer selection, missing-route and zero-route checks, then a validated RoutingTrace.

    ``experts_NLpK`` holds rows in the ``have`` convention (``valid_N`` marks rows without a route);
    the trace is returned in the ``rows`` convention. ``layer_ids`` (instead of ``moe_layer_ids``)
    names the payload's layers as they are, without selection.
    """
    _check_rows(rows)
    cu_seqlens_B1 = cu_seqlens_B1.to(experts_NLpK.device)
    if valid_N is not None:
        valid_N = valid_N.to(experts_NLpK.device)
    if layer_ids is None:
        experts_NLK, layer_ids = _select_layers(experts_NLpK, cu_seqlens_B1, labels, moe_layer_ids, what)
    else:
        experts_NLK = experts_NLpK
    missing_N = (experts_NLK < 0).flatten(1).any(-1) if experts_NLK.dtype.is_signed else None
    if missing_N is not None and valid_N is not None:
        missing_N &= valid_N
    if missing not in ("error", "invalid"):
        raise EngineFormatError(f'missing must be "error" or "invalid", found {missing!r}')
    if missing_N is not None and bool(missing_N.any()):
        if missing == "error":
            n = int(missing_N.nonzero()[0, 0])
            label, pos = _label_of_row(cu_seqlens_B1, labels, n)
            l = int((experts_NLK[n] < 0).any(-1).nonzero()[0, 0])
            raise EngineFormatError(
                f"{label}: row {pos} has no route on layer {layer_ids[l]} ({what} holds {experts_NLK[n, l].tolist()}); "
                "the engine did not capture that token (prefix-cache hit, preemption?). Disable prefix caching for "
                'routed requests, or pass missing="invalid" to mark such rows invalid'
            )
        valid_N = ~missing_N if valid_N is None else valid_N & ~missing_N

    valid_N = _zero_route_check(experts_NLK, cu_seqlens_B1, labels, layer_ids, valid_N, allow_zero_routes, what)

    # Invalid rows are stored as zeros: RoutingTrace checks only the valid rows (so -1 fills never
    # reach the id checks) and re-zeros the invalid ones, copying the ids only if one is not zero.
    trace = RoutingTrace(
        experts=experts_NLK,
        cu_seqlens=cu_seqlens_B1,
        layer_ids=layer_ids,
        num_experts=num_experts,
        valid=valid_N,
        meta={"source": source, **dict(meta or {})},
    )
    return _to_rows(trace, rows, have)


def _zero_route_check(
    experts_NLK, cu_seqlens_B1, labels, layer_ids, valid_N, allow_zero_routes, what
) -> torch.Tensor | None:
    """ZeroRoutesError for a (sequence, layer) whose every valid row is expert 0 in every slot."""
    N, L, K = experts_NLK.shape
    B = cu_seqlens_B1.numel() - 1
    if N == 0 or B == 0:
        return valid_N
    dev = experts_NLK.device
    seq_N = None
    if dev.type == "cpu" and K > 1 and B * _LOOP_MIN_ROWS <= N:
        # With top-k > 1 a valid route is never all zero (its slots are distinct), so one valid row
        # per sequence settles most (sequence, layer) pairs: look at each sequence's first row, and
        # read the whole sequence only where that row does not settle it (a zero or invalid row).
        cu = cu_seqlens_B1.tolist()
        first_B = cu_seqlens_B1[:-1].clamp(max=max(N - 1, 0))
        settled_BL = _nonzero_slots(experts_NLK[first_B])
        if valid_N is not None:
            settled_BL &= valid_N[first_B][:, None]
        if bool(settled_BL.all()):
            return valid_N  # every (sequence, layer) has a routed row: nothing can be all zero
        routed_BL = settled_BL.to(torch.int64)
        for b in (~settled_BL).any(1).nonzero().reshape(-1).tolist():
            rows_NL = _nonzero_slots(experts_NLK[cu[b] : cu[b + 1]])
            if valid_N is not None:
                rows_NL &= valid_N[cu[b] : cu[b + 1], None]
            routed_BL[b] = rows_NL.any(0)
    else:
        routed_NL = _nonzero_slots(experts_NLK)  # a row that is not all-zero on that layer
        if valid_N is not None:
            routed_NL &= valid_N[:, None]
        seq_N = _seq_ids(cu_seqlens_B1)
        routed_BL = torch.zeros(B, L, dtype=torch.int64, device=dev).index_add_(0, seq_N, routed_NL.to(torch.int64))
    if valid_N is None:
        rows_B = cu_seqlens_B1.diff()
    else:
        seen_N1 = torch.zeros(N + 1, dtype=torch.int64, device=dev)  # valid rows before each row
        torch.cumsum(valid_N, 0, out=seen_N1[1:])
        rows_B = seen_N1[cu_seqlens_B1[1:]] - seen_N1[cu_seqlens_B1[:-1]]
    min_rows = 1 if K > 1 else _K1_MIN_ROWS
    zero_BL = (routed_BL == 0) & (rows_B >= min_rows)[:, None]
    if not bool(zero_BL.any()):
        return valid_N
    if not allow_zero_routes:
        b, l = (int(i) for i in zero_BL.nonzero()[0])
        layers = [layer_ids[int(j)] for j in zero_BL[b].nonzero()[:, 0]]
        raise ZeroRoutesError(
            f"{labels[b]}: every one of its {int(rows_B[b])} routes on layer {layer_ids[l]} is expert 0 in all "
            f"{K} slots (layers with this pattern: {layers}); this is a known silent capture failure of inference "
            "engines (or a dense layer: pass moe_layer_ids to drop dense layers). Fix the capture, or pass "
            "allow_zero_routes=True to load it with this sequence's rows marked invalid"
        )
    bad_N = zero_BL.any(1)[_seq_ids(cu_seqlens_B1) if seq_N is None else seq_N]
    return ~bad_N if valid_N is None else valid_N & ~bad_N


# _zero_route_check reduces sequence by sequence (a Python loop) when they average this many rows.
_LOOP_MIN_ROWS = 64


def _nonzero_rows(x_NX: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: row n of ``x`` (any trailing shape) holds a non-zero value; read 8 bytes at a time
    when a row's bytes allow it."""
    N = x_NX.shape[0]
    row_bytes = x_NX[:1].numel() * x_NX.element_size()
    if x_NX.is_contiguous() and N and row_bytes and row_bytes % 8 == 0:
        return (x_NX.reshape(N, -1).view(torch.int64) != 0).any(-1)
    return (x_NX != 0).reshape(N, -1).any(-1)


def _long_runs(keep_N: torch.Tensor) -> tuple[list[int], list[int], int] | None:
    """The runs of True in bool ``keep_N`` (their first rows, the rows just past them, the rows in
    all), when they average 16 rows or more; else None: over many short runs one gather (or one
    per-row pass) beats a Python loop."""
    zero = torch.zeros(1, dtype=torch.int8)
    d = torch.diff(keep_N.to(torch.int8), prepend=zero, append=zero)
    starts, ends = (d == 1).nonzero().reshape(-1).tolist(), (d == -1).nonzero().reshape(-1).tolist()
    total = sum(e - s for s, e in zip(starts, ends))
    return (starts, ends, total) if len(starts) * 16 <= max(total, 1) else None


def _first_nonzero_row(x_NX: torch.Tensor, select_N: torch.Tensor) -> int:
    """The first row n with ``select_N[n]`` holding a non-zero value, or -1. On the host, selected
    rows in long runs (right or left padding) are read alone: each run is counted whole
    (``count_nonzero`` over its bytes, no per-row temporary), and only a run holding a value is
    read row by row. Otherwise one per-row test of every row."""
    runs = _long_runs(select_N) if x_NX.device.type == "cpu" and x_NX.is_contiguous() else None
    if runs is None:
        busy_N = _nonzero_rows(x_NX) & select_N
        return int(busy_N.nonzero()[0, 0]) if bool(busy_N.any()) else -1
    starts, ends, _ = runs
    for s, e in zip(starts, ends):
        run = x_NX[s:e].reshape(-1).view(torch.uint8)
        if run.numel() % 8 == 0 and run.data_ptr() % 8 == 0:
            run = run.view(torch.int64)
        if int(torch.count_nonzero(run)):
            return s + int(_nonzero_rows(x_NX[s:e]).nonzero()[0, 0])
    return -1


def _gather_rows(x_NLK: torch.Tensor, keep_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x[keep_N].to(dtype)`` in one pass: on the host, each long run of kept rows is copied (and
    converted) straight into the output, with no row index and no intermediate in the source dtype."""
    runs = _long_runs(keep_N) if x_NLK.device.type == "cpu" else None
    if runs is None:
        return x_NLK[keep_N].to(dtype)  # a device, or many short runs: one gather
    starts, ends, total = runs
    out = host_empty((total, *x_NLK.shape[1:]), dtype)
    row = 0
    for s, e in zip(starts, ends):
        out[row : row + e - s] = x_NLK[s:e]
        row += e - s
    return out


def _nonzero_slots(experts_NLK: torch.Tensor) -> torch.Tensor:
    """bool ``[N, L]``: some slot of the row's layer holds a non-zero id.

    When a layer's K ids fill 2, 4 or 8 bytes (top-8 uint8: one int64) they are read as one word:
    one compare per (row, layer) and no ``[N, L, K]`` temporary.
    """
    N, L, K = experts_NLK.shape
    width = K * experts_NLK.element_size()
    word = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(width)
    if word is not None and experts_NLK.is_contiguous() and N * L:
        return experts_NLK.view(word).reshape(N, L) != 0
    return (experts_NLK != 0).any(-1)


# --- row conventions (engine: T-1 rows per sequence; training: T rows, last invalid) -----------
def _to_rows(trace: RoutingTrace, rows: Rows, have: Rows) -> RoutingTrace:
    """Convert a trace holding ``have`` rows to ``rows`` (routereplay.core.layout does the work).

    Training -> engine drops each sequence's last row even when it holds a route: the caller asked
    for the engine convention, which has no row for a sequence's last token.
    """
    _check_rows(rows)
    _check_rows(have)
    if rows == have:
        return trace
    if rows == "training":
        return engine_to_training(trace)
    return training_to_engine(trace, drop_valid_last=True)
