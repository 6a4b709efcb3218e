"""Per-rank slices of a global trace under DP, TP/SP, CP, EP/ETP and PP/VPP, and their inverse.

A trainer that shards its batch over ranks needs, on each rank, exactly the routes its routers see:
the rows of its own data, in its routers' row order, for its own MoE layers. :func:`slice_for_rank`
cuts that out of a global trace (R3: the engine's routes of the whole batch, converted with
``routereplay.formats``); :func:`unslice` puts per-rank records back into one trace in global
sample order (R2: what each rank recorded in its forward-only pass). Engine neutral: no engine is
imported; ``routereplay.adapters.megatron`` documents how Megatron-Core's ranks map onto this.

What decides the rows a rank's router sees, in the order this module applies it::

    DP   the rank's sequences: ``dp_split="contiguous"`` (rank r takes the r-th of dp equal chunks,
         then cuts them into micro-batches; verl) or ``"interleaved"`` (micro-batch m of rank r is
         sequences ``[(m*dp + r)*mbs, +mbs)``; Megatron's pretraining sampler)
    rows ``format="thd"``: the micro-batch's sequences packed back to back, each padded at its end
         to a multiple of ``pad_to``; ``"sbhd"``: each sequence padded to ``seq_length`` and the
         router rows s-major (row ``s*B + b``), as Megatron flattens ``[S, B, H]``
    CP   each sequence cut in ``2*cp`` chunks (zigzag: rank r holds chunks r and 2cp-1-r) or ``cp``
         chunks (contiguous), as :func:`routereplay.core.layout.shard_cp`
    SP   with ``sequence_parallel``, TP rank t holds the t-th of tp equal slices of those rows
         (:func:`routereplay.core.layout.split_sp`); without it every TP rank sees the same rows
    EP, ETP  change nothing: a router runs before the token dispatch, on its rank's own rows, and
         ids stay global (logical) expert ids
    PP, VPP  change the layers, not the rows: a stage (or virtual chunk) keeps the layer ids it
         owns (``layer_ids``; :func:`pipeline_layer_ids` gives Megatron's even split)

Every rank's rows come from one index map (:func:`router_rows`: the source row of each router
row, -1 for padding), so slicing is a gather and :func:`unslice` the matching scatter; both keep
the ids in the trace's compact dtype. Slicing selects the rank's sequences first, so building a
slice reads only that rank's share; run it where the global trace is and send each rank its own.

Legend (shape suffixes):
    T  rows of the global trace (sequences back to back)
    M  rows of one micro-batch, packed (its sequences back to back, unpadded)
    N  router rows of one rank in one micro-batch (padding included)
    L  MoE layers;  K  top-k;  B  sequences (of a micro-batch)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from routereplay.core import io
from routereplay.core.errors import LayerMismatchError, LayoutError
from routereplay.core.index import ranges, sequence_of
from routereplay.core.trace import RoutingTrace

__all__ = [
    "ParallelLayout",
    "RankCoords",
    "load_for_rank",
    "micro_batch_sequences",
    "pipeline_layer_ids",
    "router_rows",
    "slice_for_rank",
    "unslice",
]


def _pos_int(value: object, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LayoutError(f"{name} must be an int >= {minimum}, found {value!r}")
    return value


@dataclass(frozen=True, kw_only=True, slots=True)
class RankCoords:
    """A rank's place in the dense (attention) decomposition; ``pp`` is its pipeline stage."""

    dp: int = 0
    tp: int = 0
    cp: int = 0
    pp: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelLayout:
    """How a global batch is spread over ranks (see the module docstring for each field's effect).

    Args:
        micro_batch_size: sequences per micro-batch on one DP rank.
        dp, tp, cp, pp: group sizes of the dense part. ``world_size = tp * cp * dp * pp``.
        sequence_parallel: TP ranks split the rows (Megatron's sequence parallelism).
        cp_mode: ``"zigzag"`` or ``"contiguous"``.
        ep, etp: expert-parallel and expert-tensor-parallel sizes; ``ep * etp`` must divide
            ``tp * cp * dp`` (Megatron carves the expert groups out of those ranks). Rows and ids
            do not depend on them.
        vpp: virtual pipeline chunks per stage.
        dp_split: ``"contiguous"`` or ``"interleaved"``.
        format: ``"thd"`` (packed) or ``"sbhd"`` (padded to ``seq_length``, s-major rows).
        seq_length: the padded S of ``"sbhd"``.
        pad_to: ``"thd"``: pad each sequence to a multiple of this (default ``2*cp`` zigzag, ``cp``
            contiguous; must be a multiple of that). verl pads to ``tp * cp * 2`` under SP.

    Raises:
        LayoutError: a size that is not a positive int, groups that do not fit, a ``seq_length``
            the CP chunks or SP slices cannot divide.
    """

    micro_batch_size: int
    dp: int = 1
    tp: int = 1
    sequence_parallel: bool = False
    cp: int = 1
    cp_mode: Literal["zigzag", "contiguous"] = "zigzag"
    ep: int = 1
    etp: int = 1
    pp: int = 1
    vpp: int = 1
    dp_split: Literal["contiguous", "interleaved"] = "contiguous"
    format: Literal["thd", "sbhd"] = "thd"
    seq_length: int | None = None
    pad_to: int | None = None

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "dp", "tp", "cp", "ep", "etp", "pp", "vpp"):
            _pos_int(getattr(self, name), name)
        if self.cp_mode not in ("zigzag", "contiguous"):
            raise LayoutError(f"cp_mode must be 'zigzag' or 'contiguous', found {self.cp_mode!r}")
        if self.dp_split not in ("contiguous", "interleaved"):
            raise LayoutError(f"dp_split must be 'contiguous' or 'interleaved', found {self.dp_split!r}")
        if self.format not in ("thd", "sbhd"):
            raise LayoutError(f"format must be 'thd' or 'sbhd', found {self.format!r}")
        dense = self.tp * self.cp * self.dp
        if dense % (self.ep * self.etp):
            raise LayoutError(
                f"ep * etp = {self.ep} * {self.etp} must divide tp * cp * dp = {dense}: the expert groups are "
                "carved out of the dense ranks of one pipeline stage"
            )
        if self.format == "sbhd":
            S = _pos_int(self.seq_length, "seq_length (format='sbhd')")
            if S % self._chunks:
                raise LayoutError(
                    f"seq_length={S} must be a multiple of {self._chunks} ({self._chunks // self.cp} chunks per "
                    f"CP rank, cp={self.cp}, {self.cp_mode})"
                )
            if self.sequence_parallel and (S // self.cp) % self.tp:
                raise LayoutError(
                    f"seq_length / cp = {S // self.cp} rows per sequence must split over tp={self.tp} "
                    "sequence-parallel ranks"
                )
        elif self.seq_length is not None:
            raise LayoutError("seq_length is for format='sbhd'; format='thd' packs sequences without padding to S")
        if self.pad_to is not None:
            if self.format != "thd":
                raise LayoutError("pad_to is for format='thd'")
            if _pos_int(self.pad_to, "pad_to") % self._chunks:
                raise LayoutError(f"pad_to={self.pad_to} must be a multiple of {self._chunks} (the CP chunks)")

    @property
    def _chunks(self) -> int:
        return 2 * self.cp if self.cp_mode == "zigzag" and self.cp > 1 else self.cp

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    def coords(self, rank: int) -> RankCoords:
        """The coordinates of global ``rank`` in Megatron's default order (``tp-cp-ep-dp-pp``:
        TP fastest, then CP, then DP, then PP; EP is folded into the dense ranks)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise LayoutError(f"rank must be an int in [0, {self.world_size}), found {rank!r}")
        tp_rank, rest = rank % self.tp, rank // self.tp
        cp_rank, rest = rest % self.cp, rest // self.cp
        dp_rank, pp_rank = rest % self.dp, rest // self.dp
        return RankCoords(dp=dp_rank, tp=tp_rank, cp=cp_rank, pp=pp_rank)

    def check(self, coords: RankCoords) -> RankCoords:
        for name in ("dp", "tp", "cp", "pp"):
            value, size = getattr(coords, name), getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
                raise LayoutError(f"coords.{name}={value!r} is outside [0, {size}) ({name}={size})")
        return coords


def micro_batch_sequences(layout: ParallelLayout, num_seqs: int, dp_rank: int) -> list[list[int]]:
    """Global sequence indices of each micro-batch of DP rank ``dp_rank``, in schedule order.

    Raises:
        LayoutError: ``num_seqs`` that does not split into ``dp`` ranks of whole micro-batches.
    """
    B, mbs, dp = _pos_int(num_seqs, "num_seqs", 0), layout.micro_batch_size, layout.dp
    layout.check(RankCoords(dp=dp_rank))
    if B % (dp * mbs):
        raise LayoutError(
            f"{B} sequences do not split into dp={dp} ranks of micro-batches of {mbs}: need a multiple of {dp * mbs}"
        )
    num_mb = B // (dp * mbs)
    if layout.dp_split == "contiguous":
        first = dp_rank * num_mb * mbs
        return [list(range(first + m * mbs, first + (m + 1) * mbs)) for m in range(num_mb)]
    return [list(range((m * dp + dp_rank) * mbs, (m * dp + dp_rank + 1) * mbs)) for m in range(num_mb)]


def pipeline_layer_ids(num_layers: int, layout: ParallelLayout, pp_rank: int, vp_stage: int | None = None) -> list[int]:
    """Decoder layer ids (0-based) a pipeline stage, or one of its virtual chunks, builds.

    Megatron's even split: ``num_layers`` in ``pp * vpp`` equal chunks, chunk ``v * pp + p`` on
    stage ``p`` as its virtual chunk ``v``. (Uneven first/last stages or a custom pipeline layout:
    take the ids from the model instead, e.g. ``handle.layer_ids``.)

    Raises:
        LayoutError: ``num_layers`` not divisible by ``pp * vpp``, ranks out of range.
    """
    n = _pos_int(num_layers, "num_layers")
    layout.check(RankCoords(pp=pp_rank))
    chunks = layout.pp * layout.vpp
    if n % chunks:
        raise LayoutError(f"num_layers={n} does not split evenly into pp * vpp = {chunks} chunks")
    per = n // chunks
    stages = range(layout.vpp) if vp_stage is None else [vp_stage]
    out = []
    for v in stages:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < layout.vpp:
            raise LayoutError(f"vp_stage must be an int in [0, {layout.vpp}), found {v!r}")
        start = (v * layout.pp + pp_rank) * per
        out.extend(range(start, start + per))
    return out


def router_rows(layout: ParallelLayout, seq_lens_B: Sequence[int] | torch.Tensor, coords: RankCoords) -> torch.Tensor:
    """int64 ``[N]``: for each router row of the rank, its row in the micro-batch's packed rows
    (sequences back to back, unpadded), or -1 for a padding row.

    Args:
        layout: the parallel layout.
        seq_lens_B: token counts of the micro-batch's sequences, in order.
        coords: the rank (``dp`` and ``pp`` do not matter here).

    Raises:
        LayoutError: ``"sbhd"`` with a sequence longer than ``seq_length``; bad coordinates.
    """
    layout.check(coords)
    lens_B = torch.as_tensor(seq_lens_B, dtype=torch.int64).reshape(-1)
    if bool((lens_B < 0).any()):
        raise LayoutError(f"sequence lengths must be >= 0, found {lens_B.tolist()}")
    start_B = torch.cumsum(lens_B, 0) - lens_B
    cp, C = layout.cp, layout._chunks
    parts = [coords.cp, 2 * cp - 1 - coords.cp] if C == 2 * cp else [coords.cp]
    if layout.format == "sbhd":
        S = layout.seq_length
        if bool((lens_B > S).any()):
            b = int((lens_B > S).nonzero()[0, 0])
            raise LayoutError(f"sequence {b} has {int(lens_B[b])} tokens, more than seq_length={S}")
        c = S // C
        pos_S = torch.cat([torch.arange(j * c, (j + 1) * c) for j in parts])  # the rank's positions
        src_SB = start_B[None, :] + pos_S[:, None]
        src_N = torch.where(pos_S[:, None] < lens_B[None, :], src_SB, -1).reshape(-1)  # s-major
    else:
        align = layout.pad_to or C
        P_B = (lens_B + align - 1) // align * align
        rows = []
        for b in range(lens_B.numel()):
            c = int(P_B[b]) // C
            pos = (
                torch.cat([torch.arange(j * c, (j + 1) * c) for j in parts]) if c else torch.zeros(0, dtype=torch.int64)
            )
            rows.append(torch.where(pos < lens_B[b], start_B[b] + pos, -1))
        src_N = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    if layout.sequence_parallel and layout.tp > 1:
        n = -(-src_N.numel() // layout.tp)
        src_N = torch.cat([src_N, src_N.new_full((n * layout.tp - src_N.numel(),), -1)])
        src_N = src_N[coords.tp * n : (coords.tp + 1) * n]
    return src_N


def _take(x: torch.Tensor | None, src_N: torch.Tensor, fill: float | bool = 0) -> torch.Tensor | None:
    if x is None:
        return None
    pad_N = src_N < 0
    out = x.index_select(0, src_N.clamp(min=0)) if x.shape[0] else x.new_zeros((src_N.numel(), *x.shape[1:]))
    if bool(pad_N.any()):
        out[pad_N] = fill
    return out


def slice_for_rank(
    trace: RoutingTrace,
    layout: ParallelLayout,
    coords: RankCoords,
    *,
    layer_ids: Sequence[int],
) -> list[RoutingTrace] | None:
    """The routes a rank's routers see, one trace per micro-batch, in router row order.

    Args:
        trace: the global batch's trace in training rows (one row per token the trainer
            forwards; convert engine captures with ``routereplay.formats`` / ``layout`` first),
            sequences in global sample order.
        layout: how the batch is spread.
        coords: the rank.
        layer_ids: the MoE layer ids this rank's routers replay, in its handle's order
            (``handle.layer_ids``: every virtual chunk of its stage). Empty: a stage without MoE
            layers, which gets None.

    Returns:
        Per micro-batch (schedule order) a trace of one block of ``N`` router rows
        (``cu_seqlens = [0, N]``), the layers of ``layer_ids`` in that order, ids in the trace's
        dtype; padding rows are zero and invalid (replay them with ``missing="live"``). None when
        ``layer_ids`` is empty.

    Raises:
        LayerMismatchError: a layer the trace lacks. LayoutError: see :func:`micro_batch_sequences`
            and :func:`router_rows`.
    """
    layout.check(coords)
    ids = list(layer_ids)
    if not ids:
        return None
    missing = [i for i in ids if i not in trace.layer_ids]
    if missing:
        raise LayerMismatchError(
            f"rank {coords}: layer(s) {missing} are not in the trace, which has layers {list(trace.layer_ids)}"
        )
    return _micro_batches(trace, layout, coords, ids, micro_batch_sequences(layout, trace.num_seqs, coords.dp))


def load_for_rank(
    path: str | os.PathLike[str],
    layout: ParallelLayout,
    coords: RankCoords,
    *,
    layer_ids: Sequence[int],
    validate: bool = True,
) -> list[RoutingTrace] | None:
    """:func:`slice_for_rank` of the trace in a ``.rrt`` file, reading only this rank's sequences.

    From a chunked file (format 1.1, what ``routereplay.save`` writes for traces above one
    chunk, 4 MiB of ids) the rank reads the header, ``cu_seqlens`` and the chunks of rows that hold
    its sequences, each verified against its own checksum: about ``1/dp`` of the file. From an
    older file it reads and verifies the whole file.

    Args:
        path: the global batch's trace in training rows, sequences in global sample order.
        layout, coords, layer_ids: as for :func:`slice_for_rank`.
        validate: run the RoutingTrace checks on the rows read (``routereplay.core.io.load``).

    Returns:
        What :func:`slice_for_rank` returns for the whole trace.

    Raises:
        TraceFormatError: a damaged header, ``cu_seqlens`` or chunk (the message names it), and
            the errors of :func:`slice_for_rank`.
    """
    layout.check(coords)
    ids = list(layer_ids)
    if not ids:
        return None
    num_seqs = io.read_header(path).tensors["cu_seqlens"].shape[0] - 1
    mbs = micro_batch_sequences(layout, num_seqs, coords.dp)
    share = io.load(path, sequences=[s for mb in mbs for s in mb], validate=validate)
    missing = [i for i in ids if i not in share.layer_ids]
    if missing:
        raise LayerMismatchError(
            f"rank {coords}: layer(s) {missing} are not in the trace, which has layers {list(share.layer_ids)}"
        )
    local, at = [], 0
    for mb in mbs:
        local.append(list(range(at, at + len(mb))))
        at += len(mb)
    return _micro_batches(share, layout, coords, ids, local, private=True)


def _micro_batches(
    trace: RoutingTrace,
    layout: ParallelLayout,
    coords: RankCoords,
    ids: list[int],
    seq_lists: list[list[int]],
    *,
    private: bool = False,
) -> list[RoutingTrace]:
    """Per micro-batch (sequences ``seq_lists[m]`` of ``trace``) the router rows of rank ``coords``.

    Each micro-batch's rows are gathered from ``trace`` in one pass (sequences, router order and
    padding at once), then its layers (``select_layers``: no copy when ``ids`` are the trace's).
    With ``private`` (a trace nobody else holds: the share ``load_for_rank`` read) a micro-batch
    whose router rows are its sequences' rows as they lie, consecutive, is a view of them instead
    of a copy.
    """
    cu_B1, lens_B = trace.cu_seqlens, trace.seq_lens
    checked = trace.rows_checked()
    out = []
    for seqs in seq_lists:
        seq_S = torch.tensor(seqs, dtype=torch.int64, device=trace.device)
        lens_S = lens_B[seq_S]
        src_N = router_rows(layout, lens_S, coords).to(trace.device)  # rows of the micro-batch, -1: padding
        N = src_N.numel()
        rows_M = ranges(cu_B1[seq_S], lens_S)  # micro-batch row -> trace row
        if (
            private
            and seqs
            and N == rows_M.numel()
            and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            and bool((src_N == torch.arange(N, device=src_N.device)).all())
        ):
            first = int(cu_B1[seqs[0]])
            take = lambda x, fill, a=first, n=N: None if x is None else x[a : a + n]
        else:
            if rows_M.numel():
                src_N = torch.where(src_N >= 0, rows_M[src_N.clamp(min=0)], -1)
            take = lambda x, fill, src=src_N: _take(x, src, fill)
        valid_N = take(trace.valid_mask, False)
        mb = RoutingTrace.unchecked(
            experts=take(trace.experts, 0),
            cu_seqlens=torch.tensor([0, N], dtype=torch.int64, device=trace.device),
            layer_ids=trace.layer_ids,
            num_experts=trace.num_experts,
            valid=None if bool(valid_N.all()) else valid_N,
            gates=take(trace.gates, 0.0),
            meta=dict(trace.meta),
            rows_checked=checked,  # rows of trace; rows it lacks are invalid zeros
        )
        out.append(mb.select_layers(ids))  # copies only for a subset or reorder of the layers
    return out


def unslice(
    records: Mapping[RankCoords, Sequence[RoutingTrace]],
    layout: ParallelLayout,
    *,
    seq_lens: Sequence[int] | torch.Tensor,
    layer_ids: Sequence[int] | None = None,
) -> RoutingTrace:
    """One trace in global sample order from what the ranks' routers saw; inverse of :func:`slice_for_rank`.

    Args:
        records: per rank, one trace per micro-batch in schedule order, rows in router order (as
            :func:`slice_for_rank` gives them, or as a rank records them: ``Recording.calls``).
            Ranks may be left out where another rank saw the same rows (TP without SP).
        layout: the layout the records were made under.
        seq_lens: token counts of every sequence of the global batch, in global order.
        layer_ids: the layers of the result (default: every layer some record has, sorted).

    Returns:
        RoutingTrace: ``cu_seqlens`` from ``seq_lens``, padding rows dropped; a row is valid when
        every record that holds it marks it valid.

    Raises:
        LayoutError: a record with the wrong row count or micro-batch count, two ranks that saw
            the same rows but recorded different ids (names both), a row of a layer no rank
            recorded.
        LayerMismatchError: records of different top-k or expert counts.
    """
    lens_T = torch.as_tensor(seq_lens, dtype=torch.int64).reshape(-1)
    cu_B1 = torch.zeros(lens_T.numel() + 1, dtype=torch.int64)
    torch.cumsum(lens_T, 0, out=cu_B1[1:])
    T = int(cu_B1[-1])
    items = [(layout.check(c), list(mbs)) for c, mbs in records.items()]
    if not items or not any(mbs for _, mbs in items):
        raise LayoutError("unslice needs at least one rank's records")
    first = next(mb for _, mbs in items for mb in mbs)
    ids = sorted({i for _, mbs in items for mb in mbs for i in mb.layer_ids}) if layer_ids is None else list(layer_ids)
    col = {i: j for j, i in enumerate(ids)}
    K, E = first.top_k, first.num_experts
    experts_TLK = torch.zeros(T, len(ids), K, dtype=first.experts.dtype)
    owner_TL = torch.full((T, len(ids)), -1, dtype=torch.int64)  # which record wrote each route first
    valid_T = torch.ones(T, dtype=torch.bool)
    ranks = [c for c, _ in items]
    for k, (coords, mbs) in enumerate(items):
        plan = micro_batch_sequences(layout, lens_T.numel(), coords.dp)
        if len(mbs) != len(plan):
            raise LayoutError(f"rank {coords}: {len(mbs)} micro-batch records, the layout gives it {len(plan)}")
        for m, (seqs, rec) in enumerate(zip(plan, mbs)):
            src_N = _record_router_rows(layout, coords, m, rec, lens_T[seqs], top_k=K, num_experts=E)
            # the micro-batch's packed rows -> global rows
            glob_M = torch.cat([torch.arange(int(cu_B1[s]), int(cu_B1[s + 1])) for s in seqs])
            real_N = src_N >= 0
            rows = glob_M[src_N[real_N]]
            got = rec.experts.cpu()[real_N]
            valid_T[rows] &= rec.valid_mask.cpu()[real_N]
            _merge_routes(experts_TLK, owner_TL, rows, got, rec.layer_ids, col, record=k, ranks=ranks)
    _check_every_route_recorded(owner_TL, cu_B1, ids)
    experts_TLK[~valid_T] = 0
    return RoutingTrace(
        experts=experts_TLK,
        cu_seqlens=cu_B1,
        layer_ids=ids,
        num_experts=E,
        valid=None if bool(valid_T.all()) else valid_T,
        meta=dict(first.meta),
    )


def _merge_routes(
    experts_TLK: torch.Tensor,
    owner_TL: torch.Tensor,
    rows: torch.Tensor,
    got_NLK: torch.Tensor,
    rec_layer_ids: Sequence[int],
    col: Mapping[int, int],
    *,
    record: int,
    ranks: Sequence[RankCoords],
) -> None:
    """Write record ``record``'s routes ``got_NLK`` (its layers ``rec_layer_ids``) into the global
    ``experts_TLK`` at global ``rows``, for the layers of the result (``col``: layer id -> column).

    A route another record already wrote must be the same (``owner_TL`` names which record wrote
    each route first; ``ranks`` the rank of each record).
    """
    coords = ranks[record]
    for j_rec, lid in enumerate(rec_layer_ids):
        if lid not in col:
            continue
        j = col[lid]
        vals = got_NLK[:, j_rec].to(experts_TLK.dtype)
        dup = owner_TL[rows, j] >= 0
        clash = dup & (experts_TLK[rows, j] != vals).any(-1)
        if bool(clash.any()):
            i = int(clash.nonzero()[0, 0])
            t = int(rows[i])
            raise LayoutError(
                f"layer {lid}, global row {t}: rank {ranks[int(owner_TL[t, j])]} recorded "
                f"{experts_TLK[t, j].tolist()} but rank {coords} recorded {vals[i].tolist()} for the "
                "same token (TP ranks without sequence parallelism must route alike)"
            )
        experts_TLK[rows, j] = vals
        owner_TL[rows[~dup], j] = record


def _record_router_rows(
    layout: ParallelLayout,
    coords: RankCoords,
    m: int,
    rec: RoutingTrace,
    lens_S: torch.Tensor,
    *,
    top_k: int,
    num_experts: int,
) -> torch.Tensor:
    """The source rows (:func:`router_rows`) of micro-batch ``m`` of rank ``coords`` (sequences of
    lengths ``lens_S``), checked against its record: the first record's top-k and expert count, one
    recorded row per router row."""
    if rec.top_k != top_k or rec.num_experts != num_experts:
        raise LayerMismatchError(
            f"rank {coords}, micro-batch {m}: top_k={rec.top_k}, num_experts={rec.num_experts}; "
            f"the first record has top_k={top_k}, num_experts={num_experts}"
        )
    src_N = router_rows(layout, lens_S, coords)
    if rec.num_tokens != src_N.numel():
        raise LayoutError(
            f"rank {coords}, micro-batch {m}: {rec.num_tokens} router rows recorded, the layout gives "
            f"{src_N.numel()}; records must be in router row order, padding included"
        )
    return src_N


def _check_every_route_recorded(owner_TL: torch.Tensor, cu_B1: torch.Tensor, ids: list[int]) -> None:
    """Every (global row, layer) has a record (``owner_TL`` >= 0); else name the first that has none."""
    if bool((owner_TL < 0).any()):
        t, j = (owner_TL < 0).nonzero()[0].tolist()
        b = sequence_of(cu_B1, t)
        raise LayoutError(
            f"layer {ids[j]}: global row {t} (sequence {b}, position {t - int(cu_B1[b])}) was recorded by no rank; "
            "pass the records of every rank that owns that layer and those rows"
        )
