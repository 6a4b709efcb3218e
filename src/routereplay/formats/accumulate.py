"""One sequence's routes assembled from several engine requests: multi-turn and resumed generations.

Two workflows send one growing token sequence to an engine several times:

* **Multi-turn agents.** Turn k's prompt is the whole conversation so far (earlier prompts,
  earlier completions, tool output). Turn k-1 returned rows ``[.., P + C - 1)``: its last sampled
  token was never forwarded, so its row (the *boundary* row) first exists in turn k's prefill. Ask
  turn k for rows from ``start = rows held = tokens so far - 1`` (vLLM
  ``routed_experts_prompt_start``, SGLang ``routed_experts_start_len``): its first row is the
  boundary token's. ``start = tokens so far`` loses that row; ``start = 0`` sends every row again.
* **Partial-rollout resume** (fully asynchronous RL, as verl's ``FullyAsyncLLMServerClient`` does
  it): a generation aborted for a weight update is resumed with ``prompt + tokens generated so
  far`` as the new prompt; each attempt's payload covers that whole prompt plus its new tokens,
  minus one row. Only the rows of the newly generated tokens are appended, so every token keeps the
  route of the forward that actually generated it, even when the weights changed in between.

The rule behind both: a payload covers the absolute rows ``[start, num_tokens - 1)`` of the request
it came from (``num_tokens`` = that request's prompt + completion). Rows already held are kept (an
overlap may differ after a weight update: the held row is the one the token was generated with);
a held row without a route is filled from the payload; rows beyond those held are appended. A
payload that would leave a gap, a request that is not a continuation of the held tokens, or (with
``overlap="check"``) an overlap that differs raises RouteContinuityError.

Invariant: after each :meth:`RouteAccumulator.add` the accumulator holds ``num_tokens - 1`` rows
(engine rows), one per token but the last.

Memory: the rows held are kept as chunks, one per payload, joined into one tensor by ``trace()``,
which releases each chunk's memory once it is copied, so the join peaks at the rows plus one
allocation, not twice the rows. A payload's new rows smaller than ``_BLOCK_BYTES`` are copied into
an append-only block (their chunk is a view of it) instead of keeping an allocation of their own:
glibc serves allocations below its mmap threshold from its heap, whose freed pages stay resident, so
hundreds of small chunks released one by one would all still count at the join's peak. Blocks grow
with the rows held up to ``_BLOCK_BYTES`` (a short conversation gets small ones, a long one mostly
full ones, each a mapping of its own, returned to the system once its last chunk is copied); larger
payloads keep their own tensor (a mapping of its own already: copying it would buy no memory).

Legend: N payload rows, Lp payload layers, L MoE layers, K top-k, R rows held.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from routereplay.core.errors import EngineFormatError, RouteContinuityError
from routereplay.core.trace import RoutingTrace, expert_dtype, owns_storage
from routereplay.formats.common import Rows, _assemble, _check_rows, _finish, _to_rows
from routereplay.formats.sglang import _meta_info, _new_rows
from routereplay.formats.vllm import decode_vllm_payload

__all__ = ["RouteAccumulator"]

Overlap = Literal["keep", "check"]

# A payload's new rows below this many bytes are appended to blocks of at most this size (a whole
# number of rows); larger ones keep their own tensor. The join peaks at the rows plus one block (or
# one larger payload's rows): 1 MiB is about 1/30 of a 65k-token DeepSeek-V3 conversation, and 8x
# glibc's default mmap threshold (128 KiB; 64 KiB in bench_scale.py). glibc raises that threshold
# up to the size of each mapping a process frees, at most 32 MiB; past that point blocks come from
# the heap too, and no block small enough to keep the peak near 1x is safe from it.
_BLOCK_BYTES = 1 << 20


def _token_list(token_ids: Any, label: str) -> list[int]:
    if isinstance(token_ids, torch.Tensor | np.ndarray):
        token_ids = token_ids.tolist()
    ids = list(token_ids)
    if any(isinstance(t, bool) or not isinstance(t, int | np.integer) for t in ids):
        raise EngineFormatError(f"{label}: token_ids must be a flat list of ints")
    return [int(t) for t in ids]


class RouteAccumulator:
    """The routes of one growing token sequence, assembled from successive engine payloads.

    See the module docstring for the two workflows (multi-turn, partial-rollout resume) and the
    rule. One accumulator per conversation / generation; ``RoutingTrace.concat`` joins their traces.

    Args:
        num_experts: routed experts per MoE layer.
        moe_layer_ids: global ids of the MoE layers; dense layers on the payload's layer axis are
            dropped (see :mod:`routereplay.formats`).
        overlap: what to do with payload rows at positions already held. ``"keep"`` (default) keeps
            the held row and counts differing rows in :attr:`num_overlap_mismatches` (expected after
            a weight update between attempts); ``"check"`` raises RouteContinuityError on the first
            differing row (for runs where the weights cannot have changed).
        allow_zero_routes, missing: see :mod:`routereplay.formats`; applied to each payload.
        source: ``meta["source"]`` of the trace.

    Example (vLLM, two turns)::

        acc = RouteAccumulator(num_experts=128, moe_layer_ids=moe_ids)
        acc.add(out1.outputs[0].routed_experts, token_ids=prompt1 + list(out1.outputs[0].token_ids))
        params = SamplingParams(..., routed_experts_prompt_start=acc.num_rows)
        out2 = llm.generate(TokensPrompt(prompt_token_ids=prompt2), params)[0]  # prompt2 extends turn 1
        acc.add(out2.outputs[0].routed_experts, start=acc.num_rows, token_ids=prompt2 + list(out2.outputs[0].token_ids))
        trace = acc.trace(rows="training")  # one sequence, one row per token, the last one invalid
    """

    __slots__ = (
        "_block",
        "_block_used",
        "_chunks",
        "_layer_ids",
        "_num_rows",
        "_num_tokens",
        "_token_ids",
        "_top_k",
        "allow_zero_routes",
        "missing",
        "moe_layer_ids",
        "num_experts",
        "num_overlap_mismatches",
        "num_payloads",
        "overlap",
        "source",
    )

    def __init__(
        self,
        *,
        num_experts: int,
        moe_layer_ids: Sequence[int] | None = None,
        overlap: Overlap = "keep",
        allow_zero_routes: bool = False,
        missing: str = "error",
        source: str = "engine",
    ) -> None:
        if overlap not in ("keep", "check"):
            raise EngineFormatError(f'overlap must be "keep" or "check", found {overlap!r}')
        self.num_experts = num_experts
        self.moe_layer_ids = None if moe_layer_ids is None else tuple(moe_layer_ids)
        self.overlap = overlap
        self.allow_zero_routes = allow_zero_routes
        self.missing = missing
        self.source = source
        self.num_overlap_mismatches = 0
        self.num_payloads = 0
        # The rows held, as the chunks each payload appended ([n, L, K] ids and their valid mask,
        # None when every row has a route). Appending never copies the rows held before: a
        # conversation of many turns costs one copy of its rows when trace() joins the chunks (two
        # for small payloads: their rows are first copied into a block), not one per turn.
        self._chunks: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        # The block small payloads' rows are appended to ([cap, L, K]; rows [0, _block_used) are
        # written, and never written again: chunks and traces may view them), or None.
        self._block: torch.Tensor | None = None
        self._block_used = 0
        self._num_rows = 0
        self._top_k = 0
        self._layer_ids: tuple[int, ...] | None = None
        self._num_tokens = 0
        self._token_ids: list[int] | None = []

    # --- state ---------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        """Rows held: ``num_tokens - 1`` once anything was added (the start to ask the next request for)."""
        return self._num_rows

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence so far (the last request's prompt + completion)."""
        return self._num_tokens

    @property
    def token_ids(self) -> tuple[int, ...] | None:
        """The sequence's tokens, when every request gave ``token_ids``; else None."""
        return None if self._token_ids is None else tuple(self._token_ids)

    # --- adding payloads -----------------------------------------------------------------
    def add(
        self,
        routed_experts: Any,
        *,
        start: int = 0,
        token_ids: Sequence[int] | None = None,
        num_tokens: int | None = None,
        label: str | None = None,
    ) -> int:
        """Add one request's payload; return how many rows were appended.

        Args:
            routed_experts: the request's routes ``[N, Lp, K]`` in any form
                :func:`routereplay.formats.decode_vllm_payload` takes (arrays of any integer dtype,
                read-only ones included, tensors, nested lists, base64 ``.npy``). For SGLang's raw
                base64 use :meth:`add_sglang`. An attempt aborted before its first token has nothing
                to add: skip it, as verl does (``None`` raises, since it also means capture was off).
            start: the absolute row the payload starts at (the ``routed_experts_prompt_start`` /
                ``routed_experts_start_len`` the request was sent with; 0 for a whole payload, as
                each partial-rollout attempt returns). A payload of ``num_tokens - 1`` rows sent with
                ``start > 0`` (a server that ignores the field) is accepted and cut at ``start``.
            token_ids: the request's prompt + completion tokens; checked to extend the tokens held.
            num_tokens: their count, when the ids are not at hand (then nothing checks the ids).
            label: how messages name this request (default ``"request <n>"``).

        Returns:
            The number of rows appended (``num_tokens - 1 - rows held before``).

        Raises:
            RouteContinuityError: a gap before ``start``, a request shorter than the tokens held or
                whose tokens differ from them, a differing overlap with ``overlap="check"``, other
                layers or top-k than earlier payloads.
            EngineFormatError: a row count other than ``num_tokens - 1 - start``, undecodable
                payloads, and the checks of :mod:`routereplay.formats` (ZeroRoutesError, ...).
        """
        label = f"request {self.num_payloads}" if label is None else label
        n, ids = self._request_tokens(token_ids, num_tokens, label)
        if isinstance(start, bool) or not isinstance(start, int | np.integer) or not 0 <= start <= max(n - 1, 0):
            raise EngineFormatError(f"{label}: start={start!r} must be an int in [0, num_tokens-1 = {n - 1}]")
        start = int(start)
        if routed_experts is None:
            raise EngineFormatError(
                f"{label}: routed_experts is None. An attempt aborted before its first token has no new rows: skip "
                "it. Otherwise the engine captured nothing: start vLLM with --enable-return-routed-experts"
            )
        arr = decode_vllm_payload(routed_experts, where=label)
        m = arr.shape[0] if arr.ndim else 0
        if m == n - 1 - start:
            pass
        elif start and m == n - 1:
            arr = arr[start:]  # the engine ignored the start field and returned every row
        else:
            raise EngineFormatError(
                f"{label}: routed_experts has {m} rows, expected num_tokens-1-start = {n}-1-{start} = {n - 1 - start}"
                + (f" (or {n - 1} from an engine that ignores the start field)" if start else "")
                + "; the routes do not belong to these tokens"
            )
        return self._add_rows(arr, start, n, ids, label)

    def add_sglang(
        self,
        payload: Any,
        *,
        num_layers: int,
        top_k: int,
        start_len: int | None = None,
        token_ids: Sequence[int] | None = None,
        num_tokens: int | None = None,
        on_retraction: Literal["error", "accept"] = "error",
        label: str | None = None,
    ) -> int:
        """Add one SGLang request: its ``meta_info`` (or response holding it), or a bare payload.

        ``routed_experts_start_len`` and ``prompt_tokens + completion_tokens`` are read from
        ``meta_info`` when not given; ``on_retraction`` is as in
        :func:`routereplay.formats.from_sglang` (a retracted request's rows were rewritten by its
        re-prefill: RetractedRoutesError by default). Returns the number of rows appended.
        """
        label = f"request {self.num_payloads}" if label is None else label
        if token_ids is not None:
            ids = _token_list(token_ids, label)
            if num_tokens is not None and num_tokens != len(ids):
                raise EngineFormatError(f"{label}: num_tokens={num_tokens} but token_ids has {len(ids)} tokens")
            num_tokens = len(ids)
        rows, start = _new_rows(
            payload,
            label,
            num_layers=num_layers,
            top_k=top_k,
            num_tokens=num_tokens,
            start_len=start_len,
            on_retraction=on_retraction,
        )
        if num_tokens is None:
            info = _meta_info(payload)
            if info is None:
                raise EngineFormatError(f"{label}: a bare SGLang payload needs num_tokens or token_ids")
            num_tokens = int(info["prompt_tokens"]) + int(info["completion_tokens"])
        n, ids = self._request_tokens(token_ids, num_tokens, label)
        return self._add_rows(rows, start, n, ids, label)

    # --- internals -----------------------------------------------------------------------
    def _request_tokens(self, token_ids, num_tokens, label) -> tuple[int, list[int] | None]:
        ids = None if token_ids is None else _token_list(token_ids, label)
        if ids is None and num_tokens is None:
            raise EngineFormatError(
                f"{label}: pass token_ids (the request's prompt + completion) or num_tokens; the row count is "
                "checked against them"
            )
        if ids is not None and num_tokens is not None and num_tokens != len(ids):
            raise EngineFormatError(f"{label}: num_tokens={num_tokens} but token_ids has {len(ids)} tokens")
        n = len(ids) if ids is not None else num_tokens
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise EngineFormatError(f"{label}: num_tokens must be a positive int, found {n!r}")
        n = int(n)
        if n < self._num_tokens:
            raise RouteContinuityError(
                f"{label}: the request has {n} tokens, fewer than the {self._num_tokens} already held; it does not "
                "continue this sequence (a new conversation needs a new RouteAccumulator)"
            )
        if ids is not None and self._token_ids:
            held = self._token_ids
            if ids[: len(held)] != held:
                pos = next(i for i, (a, b) in enumerate(zip(held, ids)) if a != b)
                raise RouteContinuityError(
                    f"{label}: token {pos} is {ids[pos]}, but the sequence held {held[pos]} there; the request's "
                    "prompt does not extend the tokens held (re-tokenized conversation or edited history?), so the "
                    "held routes would be replayed on other tokens. Send the held token ids as the prompt prefix"
                )
        return n, ids

    def _add_rows(self, arr_NLpK: np.ndarray, start: int, n: int, ids: list[int] | None, label: str) -> int:
        held = self.num_rows
        if start > held:
            raise RouteContinuityError(
                f"{label}: the payload starts at row {start}, but only rows 0..{held - 1} are held; rows "
                f"{held}..{start - 1} would be missing (row {held} is the boundary token: the previous request's "
                f"last token, first forwarded by this one). Ask for rows from {held} "
                f"(vLLM routed_experts_prompt_start={held}, SGLang routed_experts_start_len={held})"
            )
        experts_NLK, cu = _assemble([arr_NLpK], [label], num_experts=self.num_experts)
        piece = _finish(
            experts_NLK,
            cu,
            [label],
            num_experts=self.num_experts,
            moe_layer_ids=self.moe_layer_ids,
            rows="engine",
            allow_zero_routes=self.allow_zero_routes,
            missing=self.missing,
            source=self.source,
            meta=None,
        )
        if self._layer_ids is not None and (piece.layer_ids, piece.top_k) != (self._layer_ids, self.top_k):
            raise RouteContinuityError(
                f"{label}: the payload gives layers {list(piece.layer_ids)} x top-{piece.top_k}, earlier payloads "
                f"layers {list(self._layer_ids)} x top-{self.top_k}; one sequence comes from one model"
            )
        ov = held - start  # n - 1 >= held: the request has at least the tokens held
        if ov:
            self._merge_overlap(piece, start, ov, label)
        tail_NLK = piece.experts[ov:]
        if tail_NLK.shape[0]:
            tail_valid = None if piece.valid is None else piece.valid[ov:]
            if tail_valid is not None and bool(tail_valid.all()):
                tail_valid = None
            self._append(tail_NLK, tail_valid)
        self._layer_ids = piece.layer_ids
        self._top_k = piece.top_k
        self._commit_tokens(n, ids)
        return int(tail_NLK.shape[0])

    def _append(self, rows_NLK: torch.Tensor, valid_N: torch.Tensor | None) -> None:
        """Append rows as a chunk: their own tensor when large, else a copy in the current block.

        A large tensor that is a view of a larger one (the new rows of a payload that sent the held
        rows again, as resumed attempts do) is copied, so the rows sent again are not kept alive.
        """
        n = int(rows_NLK.shape[0])
        if rows_NLK.numel() * rows_NLK.element_size() >= _BLOCK_BYTES:
            self._block = None  # later rows start a new block: a block's chunks stay consecutive
            chunk = rows_NLK if owns_storage(rows_NLK) else rows_NLK.clone()
        else:
            chunk = self._reserve(rows_NLK)
            chunk.copy_(rows_NLK)
        self._chunks.append((chunk, valid_N))
        self._num_rows += n

    def _reserve(self, rows_NLK: torch.Tensor) -> torch.Tensor:
        """The next ``len(rows_NLK)`` unwritten rows of the current block, in a new block if they do not fit.

        A new block holds as many rows as are held (at least these, at most ``_BLOCK_BYTES``), so
        the blocks of a conversation add up to about its rows whatever its length.
        """
        n = int(rows_NLK.shape[0])
        block = self._block
        if block is None or block.shape[0] - self._block_used < n:
            row_bytes = rows_NLK[:1].numel() * rows_NLK.element_size()
            cap = max(_BLOCK_BYTES // max(row_bytes, 1), 1)
            block = torch.empty((max(n, min(cap, self._num_rows)), *rows_NLK.shape[1:]), dtype=rows_NLK.dtype)
            self._block, self._block_used = block, 0
        lo = self._block_used
        self._block_used += n
        return block[lo : lo + n]

    def _rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held rows ``[start, stop)``: ids ``[n, L, K]`` and valid ``[n]`` (a copy when they span chunks)."""
        experts, valid, pos = [], [], 0
        for chunk, chunk_valid in self._chunks:
            lo, hi = max(start - pos, 0), min(stop - pos, chunk.shape[0])
            if lo < hi:
                experts.append(chunk[lo:hi])
                valid.append(torch.ones(hi - lo, dtype=torch.bool) if chunk_valid is None else chunk_valid[lo:hi])
            pos += chunk.shape[0]
        if len(experts) == 1:
            return experts[0], valid[0]
        return torch.cat(experts), torch.cat(valid)

    def _merge_overlap(self, piece: RoutingTrace, start: int, ov: int, label: str) -> None:
        """Apply the overlap to the held rows ``[start, start + ov)``, the last ``ov`` held: held routes
        kept, held rows without one filled from the payload (the chunks are replaced, never written)."""
        held_RLK, held_valid = self._rows(start, start + ov)
        new_RLK = piece.experts[:ov]
        both = held_valid & piece.valid_mask[:ov]
        differ = both & (held_RLK != new_RLK.to(held_RLK.dtype)).flatten(1).any(-1)
        if bool(differ.any()):
            if self.overlap == "check":
                r = int(differ.nonzero()[0, 0])
                old, new = held_RLK[r].to(torch.int64), new_RLK[r].to(torch.int64)
                layer = int((old != new).any(-1).nonzero()[0, 0])
                raise RouteContinuityError(
                    f"{label}: row {start + r} (layer {self._layer_ids[layer]}) was {old[layer].tolist()} and the "
                    f"payload gives {new[layer].tolist()}; the engine recomputed a row it had returned before "
                    "(weights updated, or an SGLang retraction). Pass overlap=\"keep\" to keep the routes the "
                    "tokens were generated with"
                )
            self.num_overlap_mismatches += int(differ.sum())
        fill = ~held_valid & piece.valid_mask[:ov]
        if not bool(fill.any()):
            return
        experts = held_RLK.clone()
        experts[fill] = new_RLK[fill].to(experts.dtype)
        valid = held_valid | fill
        self._truncate(start)
        self._append(experts, None if bool(valid.all()) else valid)

    def _truncate(self, rows: int) -> None:
        """Keep only the first ``rows`` held rows (views of the chunks; nothing is copied)."""
        kept, pos = [], 0
        for chunk, chunk_valid in self._chunks:
            n = min(chunk.shape[0], rows - pos)
            if n <= 0:
                break
            kept.append((chunk[:n], None if chunk_valid is None else chunk_valid[:n]))
            pos += n
        self._chunks, self._num_rows = kept, pos

    def _commit_tokens(self, n: int, ids: list[int] | None) -> None:
        self._num_tokens = max(self._num_tokens, n)
        self._token_ids = ids if (ids is not None and self._token_ids is not None) else None
        self.num_payloads += 1

    @property
    def top_k(self) -> int:
        """Experts per token (0 before the first payload)."""
        return self._top_k

    # --- result --------------------------------------------------------------------------
    def trace(self, *, rows: Rows = "engine", meta: Mapping[str, str] | None = None) -> RoutingTrace:
        """The sequence as a one-sequence RoutingTrace.

        Args:
            rows: ``"engine"`` (``num_tokens - 1`` rows) or ``"training"`` (``num_tokens`` rows, the
                last one invalid: the sequence's last token was never forwarded by the engine).
            meta: extra trace meta; ``meta["source"]`` is the accumulator's ``source``.

        Raises:
            EngineFormatError: nothing was added yet.
        """
        _check_rows(rows)
        if self._layer_ids is None:
            raise EngineFormatError("the accumulator holds no routes yet; add a payload first")
        R = self.num_rows
        if len(self._chunks) != 1 or not owns_storage(self._chunks[0][0]):
            self._join()  # once: later calls and payloads start from the joined rows
        experts_RLK, valid_R = self._chunks[0]
        # Every row comes from a payload's validated trace (ids checked, invalid rows zero): the
        # joined rows need no second O(R) validation. The constructor on zero rows checks the rest
        # (meta, layer ids) without reading the routes.
        head = RoutingTrace(
            experts=experts_RLK[:0],
            cu_seqlens=torch.zeros(1, dtype=torch.int64),
            layer_ids=self._layer_ids,
            num_experts=self.num_experts,
            meta={"source": self.source, **dict(meta or {})},
        )
        trace = head.replace(
            check=False,
            rows_checked=True,  # the payloads' validated rows
            experts=experts_RLK,
            cu_seqlens=torch.tensor([0, R], dtype=torch.int64),
            valid=valid_R,
        )
        return _to_rows(trace, rows, "engine")

    def _join(self) -> None:
        """Join the held chunks into one, in place, at about 1x the rows: each chunk is copied into
        the joined tensor and then replaced by its view there, so its own memory goes as soon as it
        is copied, a block's once its last chunk is (the join holds the joined rows plus one block
        or one large chunk at its highest, not twice the rows)."""
        self._block = None  # the chunks hold the blocks: each goes with its last chunk
        R = self.num_rows
        experts_RLK = torch.empty((R, len(self._layer_ids), self._top_k), dtype=expert_dtype(self.num_experts))
        holes = any(v is not None for _, v in self._chunks)
        valid_R = torch.ones(R, dtype=torch.bool) if holes else None
        pos = 0
        for i in range(len(self._chunks)):
            chunk, chunk_valid = self._chunks[i]
            n = chunk.shape[0]
            experts_RLK[pos : pos + n] = chunk
            if chunk_valid is not None:
                valid_R[pos : pos + n] = chunk_valid
            self._chunks[i] = (experts_RLK[pos : pos + n], None if valid_R is None else valid_R[pos : pos + n])
            pos += n
        if valid_R is not None and bool(valid_R.all()):
            valid_R = None
        self._chunks = [(experts_RLK, valid_R)]

    def __repr__(self) -> str:
        return (
            f"RouteAccumulator(num_tokens={self._num_tokens}, num_rows={self.num_rows}, "
            f"num_payloads={self.num_payloads}, num_overlap_mismatches={self.num_overlap_mismatches})"
        )
