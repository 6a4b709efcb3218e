"""vLLM routed-experts payloads <-> RoutingTrace.

vLLM conventions (``--enable-return-routed-experts``; read from vLLM's
``model_executor/layers/fused_moe/routed_experts_capturer.py``, ``v1/core/sched/scheduler.py``,
``sampling_params.py``, ``outputs.py`` and ``entrypoints/openai/*/protocol.py``, and its pull
requests #28284, #51906 and #56844; checked again against the vLLM 0.34.0 wheel on 2026-12-08):

* Rows: one per *forwarded* token. A request of ``prompt + completion`` tokens has
  ``prompt + completion - 1`` rows: the last sampled token is never forwarded, so it has no route.
* Combined form: ``CompletionOutput.routed_experts`` numpy ``[prompt + completion - 1, L, K]``
  covering prompt then generated tokens. This is the only form current vLLM ships.
* ``routed_experts_prompt_start`` (per request: ``SamplingParams`` and the OpenAI chat / completion
  request field; non-streaming responses only; added by #51906, Aug 2026): the scheduler gathers the
  prompt's rows from that position on, so the payload is rows ``[start, prompt + completion - 1)``
  and its first row is the route of token ``start``. ``0 <= start <= prompt`` (``start == prompt``,
  the generated part only, is valid since #56844; before it the engine asserted ``start < prompt``).
  The response does not echo the start: pass ``prompt_starts=``. A server that predates the field
  ignores it and returns every row; with token counts that is told apart and cut here. Multi-turn:
  send ``start = rows held = tokens so far - 1`` so the previous turn's last token (never forwarded
  by that turn) gets its row from this one; :class:`routereplay.formats.RouteAccumulator` does the
  bookkeeping.
* Split form: ``RequestOutput.prompt_routed_experts`` ``[prompt, L, K]`` (shared by the ``n``
  completions of a request; at the top level of OpenAI responses) plus ``CompletionOutput.
  routed_experts`` for the generated part, ``[completion - 1, L, K]``, clipped to ``completion`` rows
  when speculative decoding (MTP) captured more, the last row then being a draft token's (dropped
  here). Either part is ``None`` when empty. From what we read, the field is in the OpenAI responses
  of vLLM 0.20-0.21 (``"prompt_routed_experts": null`` unless captured) and in forks built on them
  (Prime-RL's); vLLM's ``outputs.py`` on main has no such field and #51906 replaced the use case
  with ``routed_experts_prompt_start``. It is read (and written by :func:`to_vllm` with
  ``prompt_lens``) for those releases only; it cannot be combined with a prompt start.
* Dtype: read from the payload itself, never assumed. In process: int32 (first release, #28284),
  int16 (host cache), uint8 when experts <= 256 else uint16 (slot manager). Over HTTP the ``.npy``
  carries its own dtype (documented as int32 by #51906; servers that pass the slot manager's array
  through send uint8 / uint16). Ids are widened, never narrowed (a uint16 id above 32767 stays
  itself). Rows vLLM never captured (prefix-cache hits that could not be restored) hold -1 in the
  releases with a signed buffer; 0.34.0 restores prefix rows from a block store and raises when a block
  was evicted.
* Layer axis: every decoder layer (``get_total_num_hidden_layers()``), dense layers left 0, in the
  first releases and in 0.34.0; MoE layers only in some builds in between (``_count_moe_layers``).
  ``moe_layer_ids=`` handles both.
* HTTP (OpenAI server): ``choices[i].routed_experts`` is nested lists in older servers, base64 of
  ``.npy`` bytes in newer ones. The ``.npy`` header is checked against the bytes present before
  anything is allocated (``np.load`` would trust a header declaring terabytes).

A batch of requests becomes one trace with one sequence per request (per completion for ``n > 1``),
in engine rows by default (``rows="training"`` appends an invalid row for each last token).

Legend: N payload rows, Lp payload layers, L MoE layers, K top-k, T trace rows, B sequences.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from routereplay.core.errors import EngineFormatError
from routereplay.core.trace import RoutingTrace
from routereplay.formats.common import (
    Rows,
    _assemble,
    _b64decode,
    _check_lengths,
    _check_rows,
    _expand_layers,
    _finish,
    _int_array,
    _to_rows,
)

__all__ = ["decode_vllm_payload", "from_vllm", "from_vllm_outputs", "to_vllm"]

_NPY_MAGIC = b"\x93NUMPY"


def decode_vllm_payload(payload: Any, *, where: str = "payload") -> np.ndarray:
    """One request's ``routed_experts`` as a numpy integer array, whatever form vLLM gave it in.

    Args:
        payload: a numpy array or torch tensor ``[rows, layers, top_k]``; nested lists (HTTP, older
            servers); a base64 ``str`` of ``.npy`` bytes (HTTP, newer servers); raw ``.npy`` bytes.
        where: how error messages name this payload (e.g. ``"request 3"``).

    Returns:
        The integer array (its own dtype kept; no copy for arrays).

    Raises:
        EngineFormatError: None, undecodable base64 / ``.npy``, ragged lists or a non-integer dtype.
    """
    if isinstance(payload, str | bytes | bytearray | memoryview):
        raw = bytes(payload) if not isinstance(payload, str) else None
        if raw is None or not raw.startswith(_NPY_MAGIC):
            try:
                raw = _b64decode(payload)
            except (binascii.Error, ValueError) as e:
                raise EngineFormatError(f"{where}: routed_experts is a string but not valid base64 ({e})") from None
        if not raw.startswith(_NPY_MAGIC):
            raise EngineFormatError(
                f"{where}: routed_experts decodes to {len(raw)} bytes that are not a .npy file (no \\x93NUMPY magic); "
                "vLLM's HTTP payload is base64 of np.save bytes (SGLang's raw int32 payload: use formats.sglang)"
            )
        return _int_array(_npy_array(raw, where), where)
    return _int_array(payload, where)


def _npy_array(raw: bytes, where: str) -> np.ndarray:
    """The array in ``.npy`` bytes, its header checked against the bytes present before anything is allocated.

    ``np.load`` trusts the header: a payload declaring shape ``(10**12, 48, 8)`` makes it try to
    allocate terabytes. Here the declared shape and dtype must account for exactly the bytes after
    the header; the result is a read-only view of ``raw`` (no copy; byte-swapped if not native).
    """
    fp = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} (np.save writes 1.0 or 2.0)")
    except (ValueError, OSError, EOFError, SyntaxError) as e:
        raise EngineFormatError(f"{where}: routed_experts is a corrupt or truncated .npy payload ({e})") from None
    if dtype.hasobject or dtype.kind not in "iu":
        raise EngineFormatError(
            f"{where}: routed_experts .npy header declares dtype {dtype}; expected an integer dtype "
            "(uint8, uint16, int16, int32, ...)"
        )
    count = math.prod(shape)  # Python ints: no overflow however large the declared shape
    declared, present = count * dtype.itemsize, len(raw) - fp.tell()
    if declared != present:
        raise EngineFormatError(
            f"{where}: routed_experts .npy header declares shape {tuple(shape)} of {dtype} = {declared} bytes, "
            f"but {present} bytes follow the header; the payload is truncated or its header is corrupt "
            "(refused before allocating anything)"
        )
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=fp.tell()).reshape(
        shape, order="F" if fortran_order else "C"
    )
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def from_vllm(
    routed_experts: Sequence[Any],
    *,
    num_experts: int,
    prompt_routed_experts: Sequence[Any] | None = None,
    prompt_lens: Sequence[int] | None = None,
    completion_lens: Sequence[int] | None = None,
    prompt_starts: Sequence[int] | None = None,
    moe_layer_ids: Sequence[int] | None = None,
    rows: Rows = "engine",
    allow_zero_routes: bool = False,
    missing: str = "error",
    meta: Mapping[str, str] | None = None,
) -> RoutingTrace:
    """Routes of a batch of vLLM requests as one trace, one sequence per request.

    Args:
        routed_experts: per request, the combined ``[prompt + completion - 1, Lp, K]`` routes, or with
            ``prompt_routed_experts`` the generated part ``[completion - 1, Lp, K]`` (``None`` when
            empty). Any form :func:`decode_vllm_payload` takes.
        num_experts: routed experts per MoE layer (ids must be below it).
        prompt_routed_experts: per request, the prompt part ``[prompt, Lp, K]`` of the split form.
        prompt_lens, completion_lens: tokens per request. With the combined form they are optional
            and, when given, the row count must be ``prompt + completion - 1``. The split form needs
            ``completion_lens`` (its generated part may hold ``completion - 1`` or, clipped by
            speculative decoding, ``completion`` rows).
        prompt_starts: per request, the ``routed_experts_prompt_start`` it was sent with (combined
            form only; default 0). Sequence i then holds rows ``[prompt_starts[i], prompt + completion
            - 1)`` of its request: the payload's first row is the route of token ``prompt_starts[i]``.
            A nonzero start needs ``prompt_lens`` and ``completion_lens``: a server that predates the
            field ignores it and returns every row, which is accepted and cut at the start.
        moe_layer_ids: global ids of the MoE layers; dense layers in the payload are dropped.
        rows: ``"engine"`` (T-1 rows per sequence, as vLLM gives them) or ``"training"`` (T rows,
            last invalid).
        allow_zero_routes, missing: see :mod:`routereplay.formats`.
        meta: extra trace meta; ``meta["source"]`` is ``"vllm"``.

    Returns:
        RoutingTrace with B = number of requests.

    Raises:
        EngineFormatError: a payload of the wrong shape, dtype or row count (the message names the
            request and the expected count), ZeroRoutesError, or a RoutingTrace validation error.
    """
    labels = [f"request {i}" for i in range(len(routed_experts))]
    return _from_vllm(
        routed_experts,
        labels,
        num_experts=num_experts,
        prompt_routed_experts=prompt_routed_experts,
        prompt_lens=prompt_lens,
        completion_lens=completion_lens,
        prompt_starts=prompt_starts,
        moe_layer_ids=moe_layer_ids,
        rows=rows,
        allow_zero_routes=allow_zero_routes,
        missing=missing,
        meta=meta,
    )


def _from_vllm(
    routed_experts,
    labels,
    *,
    num_experts,
    prompt_routed_experts,
    prompt_lens,
    completion_lens,
    prompt_starts,
    moe_layer_ids,
    rows,
    allow_zero_routes,
    missing,
    meta,
) -> RoutingTrace:
    _check_rows(rows)
    routed_experts = list(routed_experts)
    B = len(routed_experts)
    P = _check_lengths(prompt_lens, B, "prompt_lens")
    C = _check_lengths(completion_lens, B, "completion_lens")
    S = _check_lengths(prompt_starts, B, "prompt_starts") or [0] * B
    if prompt_routed_experts is None:
        experts_NLK, cu = _combined_form(routed_experts, labels, P, C, S, num_experts=num_experts)
    elif any(S):
        i = next(i for i, s in enumerate(S) if s)
        raise EngineFormatError(
            f"{labels[i]}: prompt_starts[{i}]={S[i]} with the split form (prompt_routed_experts); vLLM returns "
            "routed_experts_prompt_start slices in the combined routed_experts only. Pass the combined payload"
        )
    else:
        experts_NLK, cu = _split_form(routed_experts, prompt_routed_experts, labels, P, C, num_experts=num_experts)
    return _finish(
        experts_NLK,
        cu,
        labels,
        num_experts=num_experts,
        moe_layer_ids=moe_layer_ids,
        rows=rows,
        allow_zero_routes=allow_zero_routes,
        missing=missing,
        source="vllm",
        meta=meta,
    )


def _combined_form(routed_experts: list, labels: list[str], P, C, S: list[int], *, num_experts: int):
    """Routes ``[N, Lp, K]`` and ``cu_seqlens`` of combined payloads (prompt and completion in one),
    each cut at its prompt start and checked against the token counts when ``P`` and ``C`` are given."""
    if (P is None) != (C is None):
        raise EngineFormatError("give both prompt_lens and completion_lens (to check the row counts) or neither")
    parts = [decode_vllm_payload(x, where=label) for x, label in zip(routed_experts, labels)]
    for i, (a, label) in enumerate(zip(parts, labels)):
        if P is None:
            if S[i]:
                raise EngineFormatError(
                    f"{label}: routed_experts_prompt_start={S[i]} needs prompt_lens and completion_lens, to check "
                    "the rows and to tell whether the server honoured the start (older servers ignore it)"
                )
            continue
        parts[i] = _combined_rows(a, label, P[i], C[i], S[i])
    return _assemble(parts, labels, num_experts=num_experts)


def _split_form(routed_experts: list, prompt_routed_experts, labels: list[str], P, C, *, num_experts: int):
    """Routes ``[N, Lp, K]`` and ``cu_seqlens`` of split payloads (a prompt part and a generated part per
    request), each request's two parts checked against its token counts and joined into one sequence."""
    B = len(routed_experts)
    prompt_routed_experts = list(prompt_routed_experts)
    if len(prompt_routed_experts) != B:
        raise EngineFormatError(
            f"prompt_routed_experts has {len(prompt_routed_experts)} entries but routed_experts has {B}; "
            "give one per request"
        )
    if C is None:
        raise EngineFormatError(
            "the split form (prompt_routed_experts) needs completion_lens: the generated part holds "
            "completion-1 rows, or completion rows when vLLM's speculative decoding captured one more"
        )
    pieces, piece_labels = [], []
    for i, label in enumerate(labels):
        prompt = decode_vllm_payload(prompt_routed_experts[i], where=label)
        n_p = prompt.shape[0] if prompt.ndim else 0
        if P is not None and n_p != P[i]:
            raise EngineFormatError(
                f"{label}: prompt_routed_experts has {n_p} rows, expected prompt = {P[i]} (one per prompt token)"
            )
        if C[i] == 0:
            raise EngineFormatError(
                f"{label}: completion_lens is 0; a request without generated tokens has no routes to replay"
            )
        pieces += [prompt, _generated_rows(routed_experts[i], label, C[i])]
        piece_labels += [label, label]
    experts_NLK, cu2 = _assemble(pieces, piece_labels, num_experts=num_experts)
    return experts_NLK, cu2[0::2].contiguous()  # prompt and generated part of a request are adjacent: one sequence


def _generated_rows(gen_x: Any, label: str, completion: int) -> np.ndarray:
    """The ``completion - 1`` rows of a split payload's generated part (``None``: empty); a part of
    ``completion`` rows, clipped by speculative decoding, loses its last row."""
    gen = np.zeros((0,), dtype=np.int32) if gen_x is None else decode_vllm_payload(gen_x, where=label)
    n_g = gen.shape[0] if gen.ndim else 0
    if n_g == completion:
        return gen[: completion - 1]  # clipped by speculative decoding: the extra row may be a rejected draft's
    if n_g != completion - 1:
        raise EngineFormatError(
            f"{label}: routed_experts (generated part) has {n_g} rows, expected completion-1 = {completion - 1} "
            f"(or completion = {completion} when clipped by speculative decoding)"
        )
    return gen


def _combined_rows(a: np.ndarray, label: str, prompt: int, completion: int, start: int) -> np.ndarray:
    """Rows ``[start, prompt + completion - 1)`` of a combined payload, checked against the token counts."""
    if start > prompt:
        raise EngineFormatError(
            f"{label}: routed_experts_prompt_start={start} is beyond the prompt's {prompt} tokens; vLLM accepts "
            "0 <= start <= prompt length"
        )
    n = a.shape[0] if a.ndim else 0
    full = prompt + completion - 1
    if n == full - start:
        return a
    if start and n == full:
        return a[start:]  # a server that predates routed_experts_prompt_start returned every row
    expected = (
        f"prompt+completion-1 = {prompt}+{completion}-1 = {full}"
        if not start
        else f"prompt+completion-1-prompt_start = {prompt}+{completion}-1-{start} = {full - start} (or {full} "
        "from a server that ignores routed_experts_prompt_start)"
    )
    raise EngineFormatError(
        f"{label}: routed_experts has {n} rows, expected {expected} (the last sampled token has no route); "
        "the routes do not belong to these tokens (truncated or re-tokenized response?)"
    )


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def from_vllm_outputs(
    outputs: Sequence[Any],
    *,
    num_experts: int,
    prompt_starts: Sequence[int] | None = None,
    moe_layer_ids: Sequence[int] | None = None,
    rows: Rows = "engine",
    allow_zero_routes: bool = False,
    missing: str = "error",
    meta: Mapping[str, str] | None = None,
) -> RoutingTrace:
    """Routes of vLLM ``RequestOutput`` objects or OpenAI-server JSON responses, one sequence per completion.

    Read by attribute or key, without importing vLLM: ``prompt_token_ids``, ``prompt_routed_experts``
    and ``outputs`` (``RequestOutput``) or ``choices`` (JSON), and per completion ``token_ids`` and
    ``routed_experts``. Token counts come from the token ids, or for a JSON response with one choice
    from ``usage``; they are used to check every row count.

    Args:
        outputs: the engine's outputs, one per request.
        prompt_starts: per request (not per completion), the ``routed_experts_prompt_start`` sent
            (``SamplingParams`` or the OpenAI request field); the outputs do not echo it.
        num_experts, moe_layer_ids, rows, allow_zero_routes, missing, meta: as in :func:`from_vllm`.

    Returns:
        RoutingTrace with one sequence per completion, request by request.

    Raises:
        EngineFormatError: a request without completions, a split payload without token counts, or
            any error of :func:`from_vllm` (messages name ``request i`` / ``request i, completion j``).
    """
    outputs = list(outputs)
    starts = _check_lengths(prompt_starts, len(outputs), "prompt_starts") or [0] * len(outputs)
    gens, prompts, P, C, S, labels, split = _completions(outputs, starts)
    known = [p is not None and c is not None for p, c in zip(P, C)]
    _check_token_counts(known, gens, labels, split=split)
    have_lens = all(known)
    return _from_vllm(
        gens,
        labels,
        num_experts=num_experts,
        prompt_routed_experts=prompts if split else None,
        prompt_lens=P if have_lens else None,
        completion_lens=C if have_lens else None,
        prompt_starts=S,
        moe_layer_ids=moe_layer_ids,
        rows=rows,
        allow_zero_routes=allow_zero_routes,
        missing=missing,
        meta=meta,
    )


def _completions(outputs: list, starts: list[int]) -> tuple[list, list, list, list, list, list[str], bool | None]:
    """One entry per completion of the engine's outputs: its generated routes, its request's prompt
    routes (split form), prompt and completion token counts (``None`` where unknown), prompt start and
    label; and whether the outputs use the split form (``None`` for no outputs)."""
    gens, prompts, P, C, S, labels = [], [], [], [], [], []
    split = None
    for i, out in enumerate(outputs):
        completions = _get(out, "outputs")
        if completions is None:
            completions = _get(out, "choices")
        if not completions:
            raise EngineFormatError(f"request {i}: no completions (neither .outputs nor ['choices'])")
        prompt_ids = _get(out, "prompt_token_ids")
        usage = _get(out, "usage")
        n_prompt = (
            len(prompt_ids) if prompt_ids is not None else _get(usage, "prompt_tokens") if usage is not None else None
        )
        prompt_routes = _get(out, "prompt_routed_experts")
        if split is None:
            split = prompt_routes is not None
        elif split != (prompt_routes is not None):
            raise EngineFormatError(
                f"request {i}: mixes the split form (prompt_routed_experts) with the combined form of request 0"
            )
        for j, comp in enumerate(completions):
            label = f"request {i}" if len(completions) == 1 else f"request {i}, completion {_get(comp, 'index', j)}"
            token_ids = _get(comp, "token_ids")
            n_comp = len(token_ids) if token_ids is not None else None
            if n_comp is None and usage is not None and len(completions) == 1:
                n_comp = _get(usage, "completion_tokens")
            gens.append(_get(comp, "routed_experts"))
            prompts.append(prompt_routes)
            P.append(n_prompt)
            C.append(n_comp)
            S.append(starts[i])
            labels.append(label)
    return gens, prompts, P, C, S, labels, split


def _check_token_counts(known: list[bool], gens: list, labels: list[str], *, split: bool | None) -> None:
    """Token counts (``known``: per completion) for every completion or none, and for all of them in
    the split form; generated routes for every completion of the combined form."""
    if split and not all(known):
        i = known.index(False)
        raise EngineFormatError(
            f"{labels[i]}: the split form needs token counts; return token ids (return_token_ids / "
            "prompt_token_ids) so the generated part's row count can be checked"
        )
    if any(known) and not all(known):
        i = known.index(False)
        raise EngineFormatError(
            f"{labels[i]}: token counts are missing while other requests have them; "
            "return token ids for every request"
        )
    if not split and any(g is None for g in gens):
        i = [g is None for g in gens].index(True)
        raise EngineFormatError(
            f"{labels[i]}: routed_experts is None; start vLLM with --enable-return-routed-experts "
            "(and, over HTTP, ask for return_routed_experts)"
        )


def to_vllm(
    trace: RoutingTrace,
    *,
    rows: Rows = "engine",
    prompt_lens: Sequence[int] | None = None,
    encoding: Literal["array", "list", "npy_base64"] = "array",
    dtype: np.dtype | str = "int32",
    num_hidden_layers: int | None = None,
) -> list[Any]:
    """Per-sequence payloads in vLLM's convention (the inverse of :func:`from_vllm`).

    Args:
        trace: the routes; ``rows`` says whether it holds engine rows (T-1 per sequence) or training
            rows (T per sequence; each sequence's last row is dropped, vLLM has no row for it).
        prompt_lens: when given, return the split form ``(prompt_part [prompt, L, K], generated part
            [completion - 1, L, K])`` per sequence, with ``None`` for an empty part as vLLM does.
        encoding: ``"array"`` (numpy, ``[rows, L, K]``), ``"list"`` (nested lists, older HTTP) or
            ``"npy_base64"`` (base64 of ``np.save`` bytes, newer HTTP).
        dtype: the integer dtype of the payload (vLLM uses int32, int16, uint8 or uint16).
        num_hidden_layers: when given, the layer axis covers every decoder layer and dense layers are
            zeros (older vLLM); else it holds the trace's MoE layers only.

    Returns:
        One payload (or ``(prompt, generated)`` pair) per sequence. Rows without a route are -1.

    Raises:
        EngineFormatError: a dtype too narrow for the ids or unable to mark missing rows (-1), a
            prompt longer than its sequence, an empty sequence in training rows.
    """
    if encoding not in ("array", "list", "npy_base64"):
        raise EngineFormatError(f'encoding must be "array", "list" or "npy_base64", found {encoding!r}')
    trace = _to_rows(trace, "engine", rows)
    arr_NLK = _payload_array(trace, dtype, num_hidden_layers)
    cu = trace.cu_seqlens.tolist()
    seqs = [arr_NLK[cu[b] : cu[b + 1]] for b in range(trace.num_seqs)]
    encode = {"array": lambda a: a, "list": lambda a: a.tolist(), "npy_base64": _npy_base64}[encoding]
    if prompt_lens is None:
        return [encode(a) for a in seqs]
    P = _check_lengths(prompt_lens, trace.num_seqs, "prompt_lens")
    out = []
    for b, (a, p) in enumerate(zip(seqs, P)):
        if p > a.shape[0] or p == 0:
            raise EngineFormatError(
                f"sequence {b} has {a.shape[0]} engine rows, which cannot hold a prompt of {p} tokens plus at least "
                "one generated token (prompt rows = prompt tokens)"
            )
        prompt, gen = a[:p], a[p:]
        out.append((encode(prompt), encode(gen) if gen.shape[0] else None))
    return out


def _payload_array(trace: RoutingTrace, dtype, num_hidden_layers: int | None) -> np.ndarray:
    """``[T, Lp, K]`` numpy ids in ``dtype``; invalid rows -1, dense layers 0."""
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as e:
        raise EngineFormatError(f"dtype {dtype!r} is not a numpy dtype ({e})") from None
    if np_dtype.kind not in "iu":
        raise EngineFormatError(f"dtype must be an integer dtype, found {np_dtype}")
    if trace.num_experts - 1 > np.iinfo(np_dtype).max:
        raise EngineFormatError(
            f"dtype {np_dtype} cannot hold expert ids up to {trace.num_experts - 1}; use a wider dtype"
        )
    # int32 holds every id (num_experts is at most int32's range in a trace) and -1
    experts_TLK = trace.experts.detach().cpu().to(torch.int32)
    if trace.valid is not None and not bool(trace.valid.all()):
        if np_dtype.kind == "u":
            raise EngineFormatError(
                f"the trace has rows without a route, which vLLM marks -1; unsigned dtype {np_dtype} cannot hold -1, "
                "use int16 or int32"
            )
        experts_TLK = experts_TLK.masked_fill(~trace.valid.cpu()[:, None, None], -1)
    full = _expand_layers(experts_TLK, trace.layer_ids, num_hidden_layers)
    return full.numpy().astype(np_dtype, copy=False)


def _npy_base64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")
