"""Trainer helpers for a plain PyTorch RL loop: R3 and R2 routing replay across micro-batches.

* **R3** (rollout routing replay): the training forwards use the experts the inference engine
  chose while generating. ``RouteStore(handle, rollout.training_trace())``.
* **R2** (old-policy routing replay): the old-policy log-prob pass records its routes; every
  update step (several epochs, any micro-batch split) replays them, so the importance ratio
  compares two policies that route identically. ``RouteStore(handle)`` then ``store.record``.

A store holds one routed sequence per **sample id** (an int), so the update pass may cut and
shuffle micro-batches freely: ``store.replay(sample_ids, attention_mask=...)`` assembles the
trace of exactly those samples in that order. Padded (``[B, S]`` + attention mask) and packed
(``[1, T]`` with restarting ``position_ids``; pass no mask) layouts both work.

Rows without a route are allowed only where the engine convention leaves them: the last token
of each sample (its logits predict past the end and never enter the loss, so its live route
cannot affect any trained quantity). Any other missing row raises; nothing falls back to live
routing silently.

    store = RouteStore(handle)                           # R2
    with torch.no_grad():
        for ids in minibatches:
            with store.record(ids, attention_mask=mask):
                old_logp = token_logprobs(model(**batch).logits, batch["input_ids"])
    for step in range(num_steps):
        for ids in minibatches:
            with store.replay(ids, attention_mask=mask) as rep:
                loss = loss_fn(model(**batch).logits, old_logp)
            loss.backward()

Legend (shape suffixes used in this file):
    B  samples in a micro-batch;  S  padded length;  V  vocabulary
    T  tokens of the selected samples, packed;  N  samples held by the store
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from routereplay.core.errors import LayoutError, MissingRoutesError, ReplayError, TraceMismatchError
from routereplay.core.trace import RoutingTrace, host_empty
from routereplay.runtime.replay import PreparedTrace

__all__ = ["DispatchTap", "RouteStore", "token_logprobs"]


def token_logprobs(logits_BSV: torch.Tensor, input_ids_BS: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given the ones before it, in float32 or wider.

    Args:
        logits_BSV: a causal LM's logits ``[B, S, V]`` (position s predicts token s + 1).
        input_ids_BS: int ``[B, S]`` the tokens that were forwarded.

    Returns:
        float ``[B, S]``: ``out[b, s] = log p(input_ids[b, s] | input_ids[b, :s])`` for s >= 1;
        ``out[:, 0] = 0`` (the first token is not predicted).
    """
    dtype = torch.promote_types(logits_BSV.dtype, torch.float32)
    logp_BSV = torch.log_softmax(logits_BSV[:, :-1].to(dtype), dim=-1)
    picked_BS = logp_BSV.gather(-1, input_ids_BS[:, 1:, None].to(logits_BSV.device)).squeeze(-1)
    return torch.cat([picked_BS.new_zeros(picked_BS.shape[0], 1), picked_BS], dim=1)


def _ids_tensor(sample_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    ids_B = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1).cpu()
    if ids_B.numel() and int(ids_B.min()) < 0:
        raise LayoutError(f"sample ids must be non-negative, found {ids_B.tolist()}")
    if torch.unique(ids_B).numel() != ids_B.numel():
        raise LayoutError(f"sample ids of one micro-batch must be distinct, found {ids_B.tolist()}")
    return ids_B


class RouteStore:
    """Routes of a batch of samples, addressed by sample id, replayed into any micro-batch split.

    Args:
        handle: the ``RouterHandle`` of the training model.
        trace: optional initial routes (R3): one sequence per sample, sample ``i`` = sequence
            ``i``, in training rows (``Rollout.training_trace()`` or
            ``routereplay.core.layout.engine_to_training``).
        sample_ids: the sample id of each sequence of ``trace`` (default ``0 .. B-1``); a
            data-parallel rank holds only its samples under their global ids
            (``routereplay.parallel.collectives.rank_store``).

    Raises:
        MissingRoutesError: the initial trace lacks routes other than each sample's last row.
        LayoutError: ``sample_ids`` without a trace, not one per sequence, negative or repeated.
    """

    def __init__(
        self,
        handle: Any,
        trace: RoutingTrace | None = None,
        *,
        sample_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        self._handle = handle
        # The traces added, each kept as given (never concatenated: adding costs no copy, and the
        # store holds each route once), and sample id -> (piece, sequence in it). A dict, so memory
        # follows the number of samples held, not the largest id.
        self._pieces: list[RoutingTrace] = []
        self._cu: list[list[int]] = []  # each piece's cu_seqlens as ints
        self._where: dict[int, tuple[int, int]] = {}
        self._meta: dict[str, str] = {}  # the meta entries every piece agrees on
        if trace is None and sample_ids is not None:
            raise LayoutError("RouteStore got sample_ids without a trace; pass the trace whose sequences they name")
        if trace is not None:
            _check_only_last_rows_missing(trace, "the store's trace")
            ids_B = torch.arange(trace.num_seqs) if sample_ids is None else _ids_tensor(sample_ids)
            self._add(ids_B, trace.to("cpu"))

    @property
    def sample_ids(self) -> list[int]:
        """Ids of the samples that have routes."""
        return sorted(self._where)

    def trace(self, sample_ids: Sequence[int] | torch.Tensor) -> RoutingTrace:
        """The routes of ``sample_ids``, one sequence each, in that order.

        Raises:
            MissingRoutesError: a sample has no routes in the store.
        """
        ids = _ids_tensor(sample_ids).tolist()
        missing = [i for i in ids if i not in self._where]
        if missing:
            raise MissingRoutesError(
                f"sample(s) {missing} have no routes in this store (it holds {len(self._where)} samples); "
                "record them in the old-policy pass (store.record) or build the store from their rollout trace"
            )
        if not self._pieces:
            raise MissingRoutesError(
                "this store holds no routes yet; record them (store.record) or build it from a rollout trace"
            )
        at = [self._where[i] for i in ids]
        if len({p for p, _ in at}) <= 1:
            # All from one piece: its vectorized gather (one copy of the selected rows).
            piece = self._pieces[at[0][0] if at else 0]
            return piece.select_sequences([b for _, b in at]).replace(check=False, meta=self._meta)
        return self._gather(at)

    @contextmanager
    def record(
        self,
        sample_ids: Sequence[int] | torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    ) -> Iterator[Any]:
        """R2: record the routes of ONE forward over the samples ``sample_ids`` (old-policy pass).

        Args:
            sample_ids: the batch rows' sample ids (padded), or the packed sequences' ids.
            attention_mask: ``[B, S]`` for a padded batch (padding is dropped).
            cu_seqlens: int ``[B+1]`` for a packed ``[1, T]`` batch (no mask).

        Yields:
            The session's ``Recording``.

        Raises:
            LayoutError: neither or both layouts given, or sizes that do not fit the forward.
            ReplayError: not exactly one forward ran inside the block.
        """
        ids_B = _ids_tensor(sample_ids)
        if (attention_mask is None) == (cu_seqlens is None):
            raise LayoutError("record needs attention_mask (padded batch) or cu_seqlens (packed batch), exactly one")
        with self._handle.record() as rec:
            yield rec
        n = rec.num_forwards
        if n != 1:
            raise ReplayError(
                f"store.record saw {n} forwards; record one forward per block so its rows map onto samples "
                f"{ids_B.tolist()}"
            )
        if attention_mask is not None:
            if attention_mask.shape[0] != ids_B.numel():
                raise LayoutError(
                    f"attention_mask has {attention_mask.shape[0]} rows but {ids_B.numel()} sample ids were given"
                )
            trace = rec.trace(attention_mask=attention_mask)
        else:
            flat = rec.trace()
            cu = _checked_cu_seqlens(cu_seqlens, ids_B.numel(), flat, rec.sequence_boundaries())
            trace = flat.replace(check=False, cu_seqlens=cu.to(flat.device))
        self._add(ids_B, trace.to("cpu"))

    def prepare(self, sample_ids: Sequence[int] | torch.Tensor, *, attention_mask: torch.Tensor | None = None) -> Any:
        """The routes of ``sample_ids`` checked and laid out for the model once (``handle.prepare``):
        pass the result to :meth:`replay` in every pass over this micro-batch (R2's epochs, R3's
        old-policy and loss passes). Arguments as for :meth:`replay`.
        """
        trace = self.trace(sample_ids)
        _check_only_last_rows_missing(trace, f"samples {_ids_tensor(sample_ids).tolist()}")
        # Only each sample's last row may lack a route (checked above): route it live.
        return self._handle.prepare(trace, attention_mask=attention_mask, missing="live")

    def replay(
        self,
        sample_ids: Sequence[int] | torch.Tensor | PreparedTrace,
        *,
        attention_mask: torch.Tensor | None = None,
        verify: bool = False,
    ) -> Any:
        """Force the routes of ``sample_ids`` on the next forward (R2 update pass or R3 training).

        Args:
            sample_ids: the batch rows' (padded) or packed sequences' sample ids, in order; or
                what :meth:`prepare` returned for them (then no ``attention_mask``: it carries it).
            attention_mask: ``[B, S]`` for a padded batch; None for a packed ``[1, T]`` batch.
            verify: check that the experts receive the forced ids (see ``handle.replay``).

        Returns:
            The session's ``Replay`` context manager (``rep.stats`` after the block).

        Raises:
            MissingRoutesError: a sample has no routes, or a row other than a sample's last lacks one.
            TokenCountMismatchError, LayerMismatchError: from the session, at entry.
        """
        if isinstance(sample_ids, PreparedTrace):  # a mask here is an error: the prepared trace has one
            return self._handle.replay(sample_ids, attention_mask=attention_mask, verify=verify)
        return self._handle.replay(self.prepare(sample_ids, attention_mask=attention_mask), verify=verify)

    # --- internals -----------------------------------------------------------------------
    def _add(self, ids_B: torch.Tensor, trace: RoutingTrace) -> None:
        """Keep ``trace`` (one sequence per id of ``ids_B``) as it is: no copy, O(B) bookkeeping."""
        if trace.num_seqs != ids_B.numel():
            raise LayoutError(f"{ids_B.numel()} sample ids for a trace of {trace.num_seqs} sequences")
        ids = ids_B.tolist()
        again = [i for i in ids if i in self._where]
        if again:
            raise LayoutError(f"sample(s) {again} already have routes in this store; use a new store per batch")
        if self._pieces:
            first = self._pieces[0]
            for what in ("layer_ids", "top_k", "num_experts"):
                if getattr(trace, what) != getattr(first, what):
                    raise TraceMismatchError(
                        f"samples {ids} have routes with {what}={getattr(trace, what)} but the store holds "
                        f"{what}={getattr(first, what)}; one store holds the routes of one model"
                    )
            if (trace.gates is None) != (first.gates is None):
                has, holds = ("have", "lacks") if trace.gates is not None else ("lack", "has")
                raise TraceMismatchError(
                    f"samples {ids} {has} gates but the store {holds} them; give gates to all samples or none"
                )
            self._meta = {k: v for k, v in self._meta.items() if trace.meta.get(k) == v}
        else:
            self._meta = dict(trace.meta)
        p = len(self._pieces)
        self._pieces.append(trace)
        self._cu.append(trace.cu_seqlens.tolist())
        for b, i in enumerate(ids):
            self._where[i] = (p, b)

    def _gather(self, at: list[tuple[int, int]]) -> RoutingTrace:
        """The sequences ``at`` ((piece, sequence) pairs) from several pieces: one copy of their rows."""
        first = self._pieces[0]
        spans = [(p, self._cu[p][b], self._cu[p][b + 1]) for p, b in at]
        lens = [end - start for _, start, end in spans]
        cu = torch.zeros(len(spans) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0, out=cu[1:])
        T = int(cu[-1])
        used = {p for p, _, _ in spans}
        experts = host_empty((T, first.num_layers, first.top_k), first.experts.dtype)
        has_valid = any(self._pieces[p].valid is not None for p in used)
        valid = torch.empty(T, dtype=torch.bool) if has_valid else None
        gates = None if first.gates is None else host_empty((T, *first.gates.shape[1:]), first.gates.dtype)
        row = 0
        for p, start, end in spans:
            piece, n = self._pieces[p], end - start
            experts[row : row + n] = piece.experts[start:end]
            if valid is not None:
                valid[row : row + n] = True if piece.valid is None else piece.valid[start:end]
            if gates is not None:
                gates[row : row + n] = piece.gates[start:end]
            row += n
        checked = all(self._pieces[p].rows_checked() for p in used)
        return first.replace(
            check=False, rows_checked=checked, experts=experts, cu_seqlens=cu, valid=valid, gates=gates, meta=self._meta
        )


def _checked_cu_seqlens(
    cu_seqlens: torch.Tensor | Sequence[int], num_samples: int, flat: RoutingTrace, named: torch.Tensor | None
) -> torch.Tensor:
    """The packed forward's boundaries as int64 ``[B+1]``, checked against what the forward saw.

    Args:
        cu_seqlens: what the caller passed to ``record``.
        num_samples: B, the number of sample ids.
        flat: the forward's routes, every row in order.
        named: the boundaries the forward itself named (its ``position_ids`` restarting at 0, or
            flash-attention's ``cu_seq_lens_q``), or None when it named none.

    Raises:
        LayoutError: not 1-D ints, a count other than B+1, a start other than 0, an end other than
            the rows the routers saw, a decrease, or sequence starts other than the forward's.
    """
    cu = torch.as_tensor(cu_seqlens)
    if cu.ndim != 1 or cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
        raise LayoutError(
            f"cu_seqlens must be a 1-D sequence of ints [B+1], found shape {tuple(cu.shape)} of {cu.dtype}; "
            "pass the packed batch's sequence boundaries"
        )
    cu = cu.to("cpu", torch.int64)
    N = flat.num_tokens
    if cu.numel() != num_samples + 1 or int(cu[-1]) != N:
        raise LayoutError(
            f"cu_seqlens {cu.tolist()} must have {num_samples + 1} entries ending at the {N} rows the routers saw"
        )
    if int(cu[0]) != 0:
        raise LayoutError(
            f"cu_seqlens {cu.tolist()} starts at {int(cu[0])}; the boundaries of a packed batch start at row 0"
        )
    lens = cu.diff()
    if bool((lens < 0).any()):
        b = int((lens < 0).nonzero()[0, 0])
        raise LayoutError(
            f"cu_seqlens {cu.tolist()} decreases at entry {b + 1} ({int(cu[b])} -> {int(cu[b + 1])}); boundaries "
            "must not decrease (sample ids and sequences are matched in order)"
        )
    if named is not None:
        given, seen = torch.unique(cu), torch.unique(named.to("cpu", torch.int64))
        if not torch.equal(given, seen):
            raise LayoutError(
                f"cu_seqlens {cu.tolist()} contradicts the forward, whose inputs (position_ids restarting at 0, or "
                f"cu_seq_lens_q) start sequences at rows {seen[:-1].tolist()}, not {given[:-1].tolist()}; pass the "
                "boundaries of the packed batch that ran"
            )
    return cu


def _check_only_last_rows_missing(trace: RoutingTrace, what: str) -> None:
    """Raise unless every invalid row is the last row of its sequence."""
    if trace.valid is None:
        return
    last_T = torch.zeros(trace.num_tokens, dtype=torch.bool, device=trace.device)
    ends = trace.cu_seqlens[1:][trace.seq_lens > 0] - 1
    last_T[ends] = True
    bad_T = ~trace.valid & ~last_T
    if bool(bad_T.any()):
        t = int(bad_T.nonzero()[0, 0])
        b = int(torch.searchsorted(trace.cu_seqlens, torch.tensor(t, device=trace.device), right=True)) - 1
        raise MissingRoutesError(
            f"{what}: row {t} (sequence {b}, position {t - int(trace.cu_seqlens[b])}) has no route and is not the "
            f"sequence's last token ({int(bad_T.sum())} such rows); only the last token of each sample may route live"
        )


class DispatchTap:
    """The expert ids each MoE layer actually dispatched, as the handle's witness reports them.

    An independent witness of replay for your own trainer: it does not read the replay's
    bookkeeping (``rep.stats`` reports how far *live* routing would drift, not what ran). It
    registers with :meth:`RouterHandle.observe_dispatch`, which sees each layer at its experts'
    input where the adapter can (``handle.verifiable``), else at what the router call handed the
    experts; so it works on every engine (HF, Megatron). Forwards run while autograd executes a
    backward (activation-checkpoint recomputes) are not observed.

        with store.replay(ids, attention_mask=mask), DispatchTap(handle) as tap:
            logits = model(**batch).logits
        dispatched = tap.trace(attention_mask=mask)            # what the experts received
        assert routing_agreement(store.trace(ids), dispatched).disagreement == 0.0

    Args:
        handle: the ``RouterHandle`` of the model.

    Attributes:
        observed_at: per MoE layer, ``"experts input"`` or ``"router output"``.
    """

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._seen: list[list[torch.Tensor]] = [[] for _ in handle.layers]
        self._remove: Any = None
        self.observed_at: list[str] = [handle.observed_at(i) for i in range(len(handle.layers))]

    def __enter__(self) -> DispatchTap:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self._seen = [[] for _ in self._handle.layers]
        self._remove = self._handle.observe_dispatch(self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    def _note(self, index: int, ids_NK: torch.Tensor) -> None:
        self._seen[index].append(ids_NK.detach().reshape(-1, ids_NK.shape[-1]))

    @property
    def forwards(self) -> int:
        """Forwards observed (every layer must have seen the same number)."""
        counts = {len(s) for s in self._seen}
        if len(counts) != 1:
            seen = [len(s) for s in self._seen]
            raise ReplayError(f"DispatchTap: MoE layers saw different numbers of forwards {seen}")
        return counts.pop()

    def trace(self, attention_mask: torch.Tensor | None = None, *, forward: int = -1) -> RoutingTrace:
        """The dispatched routes of one observed forward (the last by default).

        Args:
            attention_mask: ``[B, S]`` of a padded forward: padding rows are dropped, one sequence
                per batch row. None: every row the routers saw, as one sequence.
            forward: which observed forward (Python index).

        Returns:
            RoutingTrace over ``handle.layer_ids`` (compare it with ``routing_agreement``).

        Raises:
            ReplayError: nothing observed, or the mask does not fit the forward's rows.
        """
        n = self.forwards
        if n == 0:
            raise ReplayError("DispatchTap: no forward was observed; run the forward inside the `with` block")
        ids_NLK = torch.stack([s[forward] for s in self._seen], 1).cpu()
        N = ids_NLK.shape[0]
        if attention_mask is None:
            cu = torch.tensor([0, N])
        else:
            mask_BS = attention_mask.to("cpu").bool()
            if mask_BS.numel() != N:
                raise ReplayError(
                    f"DispatchTap: attention_mask {tuple(mask_BS.shape)} has {mask_BS.numel()} positions but the "
                    f"forward dispatched {N} rows"
                )
            ids_NLK = ids_NLK[mask_BS.reshape(-1)]
            cu = torch.zeros(mask_BS.shape[0] + 1, dtype=torch.int64)
            torch.cumsum(mask_BS.sum(1), 0, out=cu[1:])
        h = self._handle
        return RoutingTrace(
            experts=ids_NLK,
            cu_seqlens=cu,
            layer_ids=h.layer_ids,
            num_experts=h.num_experts,
            meta={"source": "routereplay.rl.DispatchTap"},
        )
