"""SGLang routed-experts payloads <-> RoutingTrace.

SGLang conventions (``--enable-return-routed-experts`` and per request ``return_routed_experts``;
read from SGLang's ``layers/moe/routed_experts_capturer.py`` (``srt/state_capturer/`` in 0.5.23),
``managers/tokenizer_manager.py`` and ``managers/io_struct.py``):

* ``meta_info["routed_experts"]``: base64 (str) of the raw bytes of a C-order little-endian int32
  array, flattened from ``[rows, num_layers, top_k]``. The shape is not in the payload: decoding
  needs the model's ``num_layers`` (``num_hidden_layers``: the capture buffer has a row for every
  decoder layer, dense layers left 0; SGLang-JAX uses -1 placeholders) and ``top_k``.
* Rows: one per forwarded token. A request whose sequence has ``seqlen = prompt_tokens +
  completion_tokens`` tokens returns rows ``[routed_experts_start_len, seqlen - 1)``: the last
  sampled token has no route.
* ``routed_experts_start_len`` (request field, absolute token index in ``[0, prompt_tokens]``, default
  0) asks for the new rows only, for multi-turn conversations whose earlier turns are already known.
  Some builds ignore it and return all ``seqlen - 1`` rows; the payload length tells which happened
  (:func:`from_sglang` and :func:`extend_sglang` accept both and raise if it fits neither).
* ``meta_info["prompt_tokens"]`` and ``["completion_tokens"]`` give ``seqlen``.
* OpenAI server (``/v1/completions``, ``/v1/chat/completions``; read from SGLang 0.5.23's
  ``entrypoints/openai/``): the request takes ``return_routed_experts`` and ``routed_experts_start_len``;
  the response carries the same base64 string once, at response level, in ``sglext.routed_experts``,
  and for the **first choice only** when ``n > 1``; the token counts are in ``usage``, and whether the
  request was retracted is not in it. With ``return_meta_info=true`` (chat) each choice carries its
  whole ``meta_info`` instead (routes and ``num_retractions`` included). A one-choice response is read
  as a payload here; a response of several choices is refused (pass each choice's ``meta_info``).
* Retraction: under KV-cache pressure, or when generation is paused in ``retract`` mode for a weight
  update, the scheduler retracts a running request and later re-prefills its prompt plus the tokens
  generated so far. The capture buffer is indexed by KV slot, so that re-prefill overwrites the rows
  of every token it recomputes: the returned rows of tokens generated before the retraction are the
  re-prefill's (under the new weights, if they changed), not those the tokens were generated with.
  The payload does not say which rows were rewritten; ``meta_info["num_retractions"]`` says that it
  happened. Every decoder here raises RetractedRoutesError for such a request unless
  ``on_retraction="accept"`` (right when no weight update happened in between).

A batch of requests becomes one trace with one sequence per request, in engine rows by default.
Multi-turn: :func:`extend_sglang` appends a later turn's new rows to a sequence of such a trace, and
:class:`routereplay.formats.RouteAccumulator` (``add_sglang``) builds one conversation or one
resumed generation from its requests.

Legend: N payload rows, Lp payload layers, L MoE layers, K top-k, T trace rows, B sequences.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from routereplay.core.errors import EngineFormatError, RetractedRoutesError, TraceMismatchError
from routereplay.core.trace import RoutingTrace
from routereplay.formats.common import (
    Rows,
    _assemble,
    _b64decode,
    _check_lengths,
    _compact,
    _finish,
    _int_array,
    _to_rows,
)
from routereplay.formats.vllm import _payload_array

__all__ = ["decode_sglang_payload", "extend_sglang", "from_sglang", "to_sglang"]

_WIRE_DTYPE = np.dtype("<i4")


def decode_sglang_payload(payload: Any, *, num_layers: int, top_k: int, where: str = "payload") -> np.ndarray:
    """One request's ``meta_info["routed_experts"]`` as an int32 array ``[rows, num_layers, top_k]``.

    Args:
        payload: base64 ``str`` (or its ASCII bytes) of little-endian int32 values, as SGLang returns
            it; or an already decoded array / tensor, flat or ``[rows, num_layers, top_k]``.
        num_layers: size of the payload's layer axis (the model's ``num_hidden_layers``).
        top_k: experts per token.
        where: how error messages name this payload.

    Returns:
        int32 array (a read-only view of the decoded bytes).

    Raises:
        EngineFormatError: invalid base64, or a length that is not a whole number of rows.
    """
    for name, v in (("num_layers", num_layers), ("top_k", top_k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EngineFormatError(f"{name} must be a positive int, found {v!r}")
    if isinstance(payload, str | bytes | bytearray | memoryview):
        try:
            raw = _b64decode(payload)
        except (binascii.Error, ValueError) as e:
            raise EngineFormatError(f"{where}: routed_experts is not valid base64 ({e})") from None
        row_bytes = _WIRE_DTYPE.itemsize * num_layers * top_k
        if len(raw) % row_bytes:
            raise EngineFormatError(
                f"{where}: routed_experts holds {len(raw)} bytes, not a whole number of rows of "
                f"int32 x num_layers x top_k = 4 x {num_layers} x {top_k} = {row_bytes} bytes; "
                "check num_layers (all decoder layers, dense ones included) and top_k"
            )
        return np.frombuffer(raw, dtype=_WIRE_DTYPE).reshape(-1, num_layers, top_k)
    arr = _int_array(payload, where)
    if arr.ndim == 1:
        if arr.shape[0] % (num_layers * top_k):
            raise EngineFormatError(
                f"{where}: routed_experts has {arr.shape[0]} values, "
                f"not a multiple of num_layers x top_k = {num_layers * top_k}"
            )
        return arr.reshape(-1, num_layers, top_k)
    if arr.ndim != 3 or arr.shape[1:] != (num_layers, top_k):
        raise EngineFormatError(
            f"{where}: routed_experts has shape {tuple(arr.shape)}, expected [rows, {num_layers}, {top_k}]"
        )
    return arr


# Set on a meta_info read from an OpenAI-server response without one: whether SGLang retracted the
# request is not in such a response.
_RETRACTIONS_UNSEEN = "routereplay: num_retractions not in the response"


def _meta_info(payload: Any, label: str = "payload") -> Mapping | None:
    """A request's ``meta_info``: the dict itself, the one a ``/generate`` response holds, or the one
    read from an OpenAI-server response (:func:`_openai_meta_info`); None for a bare payload."""
    if not isinstance(payload, Mapping):
        return None
    if "choices" in payload:
        return _openai_meta_info(payload, label)
    inner = payload.get("meta_info")
    return inner if isinstance(inner, Mapping) else payload


def _openai_meta_info(response: Mapping, label: str) -> Mapping:
    """The ``meta_info`` of a one-choice OpenAI-server response (``/v1/completions``,
    ``/v1/chat/completions``): its choice's ``meta_info`` (chat with ``return_meta_info=true``), else
    one made of the response-level ``sglext.routed_experts`` and the ``usage`` token counts."""
    choices = response["choices"]
    n = len(choices) if isinstance(choices, Sequence) else None
    if n != 1:
        raise EngineFormatError(
            f"{label}: an OpenAI-server response with {n} choices; SGLang puts the routes of the first choice "
            "only in its response-level sglext.routed_experts. Send n=1 per request, or send return_meta_info=true "
            "(chat) and pass each choice's meta_info as its own payload: [c['meta_info'] for c in response['choices']]"
        )
    info = choices[0].get("meta_info") if isinstance(choices[0], Mapping) else None
    if isinstance(info, Mapping):
        return info
    ext = response.get("sglext")
    routes = ext.get("routed_experts") if isinstance(ext, Mapping) else None
    if routes is None:
        raise EngineFormatError(
            f"{label}: the OpenAI-server response holds no routes (no sglext.routed_experts, no "
            "choices[0].meta_info); launch SGLang with --enable-return-routed-experts and send "
            "return_routed_experts=true with the request"
        )
    usage = response.get("usage")
    counts = {k: usage[k] for k in ("prompt_tokens", "completion_tokens") if isinstance(usage, Mapping) and k in usage}
    return {"routed_experts": routes, **counts, _RETRACTIONS_UNSEEN: True}


def _check_retraction(info: Mapping, label: str, on_retraction: str) -> None:
    """RetractedRoutesError when ``meta_info["num_retractions"]`` says SGLang rewrote the request's routes."""
    if on_retraction not in ("error", "accept"):
        raise EngineFormatError(f'on_retraction must be "error" or "accept", found {on_retraction!r}')
    if on_retraction == "accept":
        return
    if info.get(_RETRACTIONS_UNSEEN):
        raise EngineFormatError(
            f"{label}: an OpenAI-server response does not say whether SGLang retracted the request (a retracted "
            "request's rows are rewritten by its re-prefill; meta_info num_retractions says so). Send "
            "return_meta_info=true (chat) so the choice carries its meta_info, use /generate, or pass "
            'on_retraction="accept" if no weight update can have happened during the rollout'
        )
    count = info.get("num_retractions")
    if not count:
        return
    version = info.get("weight_version")
    raise RetractedRoutesError(
        f"{label}: SGLang retracted this request {count} time(s) (meta_info num_retractions); on resuming it "
        "re-prefilled the prompt and the tokens generated so far and overwrote their routes, so the rows before "
        "the last retraction come from that re-prefill, not from the forwards that generated the tokens"
        + (f" (weight_version at the end: {version!r})" if version is not None else "")
        + ". If no weight update happened while it was retracted, pass on_retraction=\"accept\"; otherwise "
        "drop the sample, or abort and resume it as a partial rollout (RouteAccumulator) "
        "so each attempt's rows are kept"
    )


def _new_rows(
    payload: Any,
    label: str,
    *,
    num_layers: int,
    top_k: int,
    num_tokens: int | None,
    start_len: int | None,
    on_retraction: str = "error",
) -> tuple[np.ndarray, int]:
    """Decode one request; return its rows ``[start_len, seqlen - 1)`` and ``start_len``."""
    info = _meta_info(payload, label)
    if info is not None:
        data, start_len, num_tokens = _read_meta_info(info, label, start_len, num_tokens, on_retraction)
    else:
        data = payload
    start = 0 if start_len is None else int(start_len)
    arr = decode_sglang_payload(data, num_layers=num_layers, top_k=top_k, where=label)
    return _rows_from_start(arr, label, start, num_tokens)


def _read_meta_info(
    info: Mapping[str, Any], label: str, start_len: int | None, num_tokens: int | None, on_retraction: str
) -> tuple[Any, int | None, int | None]:
    """A request's ``meta_info``: its ``routed_experts`` payload, and the start length and token count
    (the given ones, else ``meta_info``'s), after its retraction check."""
    _check_retraction(info, label, on_retraction)
    if "routed_experts" not in info or info["routed_experts"] is None:
        raise EngineFormatError(
            f"{label}: meta_info has no routed_experts; launch SGLang with --enable-return-routed-experts "
            "and send return_routed_experts=True"
        )
    echoed = info.get("routed_experts_start_len")
    if echoed is not None and start_len is not None and int(echoed) != start_len:
        raise EngineFormatError(
            f"{label}: start_len={start_len} but meta_info says routed_experts_start_len={echoed}"
        )
    if start_len is None and echoed is not None:
        start_len = int(echoed)
    if num_tokens is None:
        if "prompt_tokens" not in info or "completion_tokens" not in info:
            raise EngineFormatError(f"{label}: meta_info lacks prompt_tokens / completion_tokens; pass num_tokens")
        num_tokens = int(info["prompt_tokens"]) + int(info["completion_tokens"])
    return info["routed_experts"], start_len, num_tokens


def _rows_from_start(arr: np.ndarray, label: str, start: int, num_tokens: int | None) -> tuple[np.ndarray, int]:
    """Rows ``[start, seqlen - 1)`` of a decoded payload and ``start``, whether or not the engine honoured
    the start; without a token count, the rows as they are (and a start of 0)."""
    n = arr.shape[0]
    if num_tokens is None:
        if start:
            raise EngineFormatError(
                f"{label}: with routed_experts_start_len={start} the token count is needed to tell whether the "
                "engine honoured it; pass num_tokens (or the whole meta_info)"
            )
        return arr, 0
    if num_tokens < 1 or not 0 <= start <= num_tokens - 1:
        raise EngineFormatError(
            f"{label}: routed_experts_start_len={start} is outside [0, seqlen-1 = {num_tokens - 1}]"
        )
    honoured, full = num_tokens - 1 - start, num_tokens - 1
    if n == honoured:
        return arr, start
    if n == full:
        return arr[start:], start  # a build that ignores routed_experts_start_len returned every row
    expected = (
        f"seqlen-1 = {num_tokens}-1 = {full}"
        if start == 0
        else (
            f"seqlen-1-start_len = {num_tokens}-1-{start} = {honoured} (start_len honoured) or seqlen-1 = {full} "
            "(a build that ignores routed_experts_start_len)"
        )
    )
    raise EngineFormatError(
        f"{label}: routed_experts has {n} rows, expected {expected}; the routes do not belong to these tokens "
        "(wrong num_layers / top_k, or a truncated sequence?)"
    )


def from_sglang(
    payloads: Sequence[Any],
    *,
    num_layers: int,
    top_k: int,
    num_experts: int,
    num_tokens: Sequence[int] | None = None,
    start_lens: Sequence[int] | None = None,
    moe_layer_ids: Sequence[int] | None = None,
    rows: Rows = "engine",
    allow_zero_routes: bool = False,
    missing: str = "error",
    on_retraction: str = "error",
    meta: Mapping[str, str] | None = None,
) -> RoutingTrace:
    """Routes of a batch of SGLang requests as one trace, one sequence per request.

    Args:
        payloads: per request, its ``meta_info`` dict (or the whole ``/generate`` response holding
            ``"meta_info"``), a one-choice OpenAI-server response (its ``sglext.routed_experts`` and
            ``usage``, or its choice's ``meta_info``), or the bare ``routed_experts`` value (base64 str /
            array).
        num_layers, top_k: the payload's layer axis (``num_hidden_layers``) and top-k, needed to decode.
        num_experts: routed experts per MoE layer.
        num_tokens: per request ``seqlen = prompt_tokens + completion_tokens``; read from ``meta_info``
            when not given. Without it (bare payloads) the rows are taken as they are.
        start_lens: per request the ``routed_experts_start_len`` sent (default: ``meta_info``'s, else 0).
            Sequence i then holds rows ``[start_len_i, seqlen_i - 1)`` only, whether or not the engine
            honoured it.
        moe_layer_ids: global ids of the MoE layers; dense layers in the payload are dropped.
        rows: ``"engine"`` (as SGLang gives them) or ``"training"`` (one more, invalid, row per sequence).
        allow_zero_routes, missing: see :mod:`routereplay.formats`.
        on_retraction: ``"error"`` (default) raises RetractedRoutesError for a request whose
            ``meta_info["num_retractions"]`` is nonzero, and EngineFormatError for an OpenAI-server
            response that cannot say; ``"accept"`` takes its rows as returned.
        meta: extra trace meta; ``meta["source"]`` is ``"sglang"``.

    Returns:
        RoutingTrace with B = number of requests.

    Raises:
        EngineFormatError: undecodable payload, or a row count that fits neither ``seqlen-1-start_len``
            nor ``seqlen-1`` (message names the request); RetractedRoutesError; ZeroRoutesError;
            RoutingTrace validation errors.
    """
    payloads = list(payloads)
    B = len(payloads)
    S = _check_lengths(num_tokens, B, "num_tokens")
    starts = _check_lengths(start_lens, B, "start_lens")
    labels = [f"request {i}" for i in range(B)]
    # Each payload is narrowed to the trace's id dtype as soon as it is decoded: its int32 copy (4x the
    # trace's bytes at 256 experts) goes before the next is decoded, instead of all of them at once.
    parts = [
        _compact(
            _new_rows(
                p,
                labels[i],
                num_layers=num_layers,
                top_k=top_k,
                num_tokens=None if S is None else S[i],
                start_len=None if starts is None else starts[i],
                on_retraction=on_retraction,
            )[0],
            num_experts,
        )
        for i, p in enumerate(payloads)
    ]
    experts_NLK, cu = _assemble(parts, labels, num_experts=num_experts, consume=True)
    return _finish(
        experts_NLK,
        cu,
        labels,
        num_experts=num_experts,
        moe_layer_ids=moe_layer_ids,
        rows=rows,
        allow_zero_routes=allow_zero_routes,
        missing=missing,
        source="sglang",
        meta=meta,
    )


def extend_sglang(
    trace: RoutingTrace,
    sequence: int,
    payload: Any,
    *,
    num_layers: int,
    top_k: int,
    num_tokens: int | None = None,
    start_len: int | None = None,
    moe_layer_ids: Sequence[int] | None = None,
    allow_zero_routes: bool = False,
    missing: str = "error",
    on_retraction: str = "error",
) -> RoutingTrace:
    """Add a later turn of a multi-turn conversation to sequence ``sequence`` of an engine-rows trace.

    The later request's prompt is the whole conversation so far; it returns rows
    ``[start_len, seqlen - 1)`` (or all ``seqlen - 1`` rows on builds that ignore ``start_len``).
    Sequence ``sequence`` already holds rows ``[0, n)``. Rows at positions ``>= n`` are appended.
    Rows at positions ``< n`` (``start_len < n``, or a build that ignored it) overlap: an existing
    valid row is kept, because it is the route that produced that turn's tokens; an existing invalid
    row is filled from the new payload (e.g. the previous turn's last token, forwarded only now).

    Args:
        trace: a trace in engine rows (as :func:`from_sglang` returns by default).
        sequence: index of the conversation's sequence in ``trace``.
        payload: the later turn's ``meta_info`` (or bare ``routed_experts``, then give ``num_tokens``).
        num_layers, top_k, moe_layer_ids, allow_zero_routes, missing, on_retraction: as in :func:`from_sglang`
            (``moe_layer_ids`` must select the trace's layers).
        num_tokens: the later turn's ``seqlen`` (default: from ``meta_info``).
        start_len: the ``routed_experts_start_len`` sent (default: ``meta_info``'s, else 0). Usually
            the number of rows the sequence already has.

    Returns:
        A new trace; other sequences are unchanged.

    Raises:
        EngineFormatError: the new rows would leave a gap after the existing ones, or any decoding error.
        TraceMismatchError: the payload's layers differ from the trace's.
    """
    B = trace.num_seqs
    if not -B <= sequence < B:
        raise IndexError(f"sequence {sequence} out of range for a trace of {B} sequences")
    sequence %= B
    label = f"request for sequence {sequence}"
    arr, start = _new_rows(
        payload,
        label,
        num_layers=num_layers,
        top_k=top_k,
        num_tokens=num_tokens,
        start_len=start_len,
        on_retraction=on_retraction,
    )
    have = int(trace.seq_lens[sequence])
    if start > have:
        raise EngineFormatError(
            f"{label}: the new rows start at token {start}, but sequence {sequence} holds only {have} rows "
            f"(tokens 0..{have - 1}); rows {have}..{start - 1} would be missing. "
            f"Send routed_experts_start_len <= {have}"
        )
    piece = _turn_rows(
        trace, arr, label, moe_layer_ids=moe_layer_ids, allow_zero_routes=allow_zero_routes, missing=missing
    )
    piece = piece.to(trace.device)
    overlap = min(have - start, piece.num_tokens)
    if overlap > 0 and trace.valid is not None:
        trace = _fill_invalid_rows(trace, piece, int(trace.cu_seqlens[sequence]) + start, overlap)
    rest = piece.experts[overlap:]
    if rest.shape[0] == 0:
        return trace
    rest_valid = None if piece.valid is None else piece.valid[overlap:]
    return trace.extend_sequence(sequence, rest, valid=rest_valid)


def _turn_rows(
    trace: RoutingTrace,
    arr: np.ndarray,
    label: str,
    *,
    moe_layer_ids: Sequence[int] | None,
    allow_zero_routes: bool,
    missing: str,
) -> RoutingTrace:
    """A later turn's new rows ``arr`` as a one-sequence engine-rows trace, checked to have the trace's
    layers and top-k."""
    experts_NLK, cu = _assemble([arr], [label])
    piece = _finish(
        experts_NLK,
        cu,
        [label],
        num_experts=trace.num_experts,
        moe_layer_ids=moe_layer_ids,
        rows="engine",
        allow_zero_routes=allow_zero_routes,
        missing=missing,
        source="sglang",
        meta=None,
    )
    if piece.layer_ids != trace.layer_ids or piece.top_k != trace.top_k:
        raise TraceMismatchError(
            f"{label}: the payload gives layers {list(piece.layer_ids)} x top-{piece.top_k}, the trace has "
            f"layers {list(trace.layer_ids)} x top-{trace.top_k}; pass the trace's moe_layer_ids"
        )
    return piece


def _fill_invalid_rows(trace: RoutingTrace, piece: RoutingTrace, s0: int, overlap: int) -> RoutingTrace:
    """Fill the trace's rows ``[s0, s0 + overlap)`` that have no route from the first ``overlap`` rows of
    ``piece``; keep every existing route."""
    old_valid = trace.valid[s0 : s0 + overlap]
    new_valid = piece.valid_mask[:overlap]
    fill = ~old_valid & new_valid
    if not bool(fill.any()):
        return trace
    experts = trace.experts.clone()
    experts[s0 : s0 + overlap][fill] = piece.experts[:overlap][fill]
    valid = trace.valid.clone()
    valid[s0 : s0 + overlap] |= fill
    return trace.replace(check=False, experts=experts, valid=None if bool(valid.all()) else valid)


def to_sglang(
    trace: RoutingTrace,
    *,
    rows: Rows = "engine",
    start_lens: Sequence[int] | None = None,
    num_hidden_layers: int | None = None,
) -> list[str]:
    """Per-sequence ``meta_info["routed_experts"]`` strings (the inverse of :func:`from_sglang`).

    Args:
        trace: the routes, in ``rows`` convention (training rows lose each sequence's last row).
        start_lens: per sequence, return only rows ``[start_len, ...)`` as SGLang does for
            ``routed_experts_start_len``.
        num_hidden_layers: the payload's layer axis size (dense layers written as 0); default: the
            trace's MoE layers only.

    Returns:
        base64 strings of little-endian int32 ``[rows, layers, top_k]``; rows without a route are -1.

    Raises:
        EngineFormatError: a start_len beyond its sequence's rows, or a bad ``num_hidden_layers``.
    """
    trace = _to_rows(trace, "engine", rows)
    arr_NLK = _payload_array(trace, _WIRE_DTYPE, num_hidden_layers)
    starts = _check_lengths(start_lens, trace.num_seqs, "start_lens") or [0] * trace.num_seqs
    cu = trace.cu_seqlens.tolist()
    out = []
    for b in range(trace.num_seqs):
        n = cu[b + 1] - cu[b]
        if starts[b] > n:
            raise EngineFormatError(f"start_lens[{b}]={starts[b]} is beyond sequence {b}'s {n} rows")
        out.append(
            base64.b64encode(np.ascontiguousarray(arr_NLK[cu[b] + starts[b] : cu[b + 1]]).tobytes()).decode("ascii")
        )
    return out
