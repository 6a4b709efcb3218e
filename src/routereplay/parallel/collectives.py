"""Data-parallel helpers for R2 / R3 routing replay: routes split to ranks, gathered back, metrics reduced.

A data-parallel trainer gives every rank its own samples of the global batch. Routing replay
follows the samples, by **sample id** (the index of the sample in the global batch):

* **R3**, split: every rank builds the same global rollout trace (sequence ``i`` = sample ``i``)
  and keeps the routes of its own samples, addressed by their global ids::

      ids = distributed_sample_ids(len(batch), num_replicas=world, rank=rank, epoch=epoch)
      store = rank_store(handle, rollout_trace, sample_ids=ids)   # a RouteStore
      for mb in chunks(ids, micro_batch_size):                    # any micro-batch split
          with store.replay(mb, attention_mask=mask_of(mb)):
              loss_of(mb).backward()

  :func:`distributed_sample_ids` gives exactly the indices of
  ``torch.utils.data.DistributedSampler`` with the same arguments (it runs that sampler), so a
  data loader built on it and the store agree without communication. Any other split works the
  same way: pass its ids to :func:`rank_store`.
* **R2**, gather: each rank records the old-policy routes of its samples
  (``RouteStore.record``); :func:`gather_store` (or :func:`gather_routes` for a trace) gives every
  rank the routes of the whole batch in global sample order, e.g. to save them, to measure them,
  or to re-split them for an update pass that splits the batch differently. The routes travel as
  their compact bytes (uint8 / int16 ids, one byte per ``valid`` flag), never widened to int64:
  gloo cannot all-gather bool or int16 tensors, and bytes are what the trace holds anyway.
  :func:`merge_routes` is the transport-free inverse of a split (gather = all-gather + merge).
* **metrics**, reduced: :func:`global_routing_agreement` and :func:`global_logprob_mismatch` are
  ``routereplay.rl.metrics.routing_agreement`` / ``logprob_mismatch`` over the tokens of every rank
  together (each rank passes its own tokens; every rank gets the global values).

Samples that ``DistributedSampler`` repeats to even out the ranks (``drop_last=False``) are
recorded on two ranks; merging keeps the first rank's routes of such a sample (both must have the
same length, or the two ranks did not hold the same sample and :class:`LayoutError` is raised).

Collectives run on ``group`` (default: the world). With NCCL, set the CUDA device of each rank
first (``torch.cuda.set_device``): the small metadata travels through ``all_gather_object``.

Legend (shape suffixes used in this file):
    T  rows of a trace;  L  MoE layers;  K  top-k slots
    B  samples (sequences) of one rank's trace;  N  samples of the global batch
    R  ranks of the group;  U  bytes of one rank's payload
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from routereplay.core.errors import LayoutError, TraceMismatchError
from routereplay.core.trace import RoutingTrace
from routereplay.rl import metrics
from routereplay.rl.store import RouteStore

__all__ = [
    "distributed_sample_ids",
    "gather_routes",
    "gather_store",
    "global_logprob_mismatch",
    "global_routing_agreement",
    "merge_routes",
    "rank_store",
]


# --- split ---------------------------------------------------------------------------------------
def distributed_sample_ids(
    num_samples: int,
    *,
    num_replicas: int,
    rank: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> list[int]:
    """The global sample ids ``torch.utils.data.DistributedSampler`` gives ``rank``, in its order.

    Runs the sampler itself (over ``range(num_samples)``, after ``set_epoch(epoch)``), so the ids
    are those of a data loader built with the same arguments. Without ``drop_last`` the sampler
    repeats the first samples to give every rank ``ceil(num_samples / num_replicas)``; no rank
    gets a sample twice.

    Args:
        num_samples: samples in the global batch (the rollout trace's sequences).
        num_replicas: data-parallel ranks.
        rank: this rank, in ``[0, num_replicas)``.
        shuffle, seed, epoch, drop_last: as ``DistributedSampler`` (and its ``set_epoch``).

    Returns:
        The sample ids of ``rank``.

    Raises:
        LayoutError: a negative ``num_samples``, ``num_replicas`` < 1, ``rank`` out of range.
    """
    from torch.utils.data import DistributedSampler

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise LayoutError(f"num_samples must be an int >= 0, found {num_samples!r}")
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise LayoutError(f"num_replicas must be an int >= 1, found {num_replicas!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
        raise LayoutError(f"rank must be an int in [0, {num_replicas}) for num_replicas={num_replicas}, found {rank!r}")
    if num_samples == 0:
        return []
    sampler = DistributedSampler(
        range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    return [int(i) for i in sampler]


def rank_store(handle: Any, trace: RoutingTrace, *, sample_ids: Sequence[int] | torch.Tensor) -> RouteStore:
    """A :class:`~routereplay.rl.RouteStore` with the routes of this rank's samples (R3 split).

    Args:
        handle: the ``RouterHandle`` of this rank's training model.
        trace: the global rollout trace in training rows, sequence ``i`` = sample ``i`` (the same
            on every rank).
        sample_ids: this rank's global sample ids (e.g. :func:`distributed_sample_ids`).

    Returns:
        A store holding only those samples, under their global ids: ``store.replay(ids, ...)``
        takes the ids the rank's data loader yields. A sample of another rank raises
        ``MissingRoutesError`` there, never replays something else.

    Raises:
        LayoutError: an id outside the trace's ``[0, B)``, negative or repeated.
        MissingRoutesError: a selected sample lacks a route other than its last row.
    """
    ids_B = _ids(sample_ids, "sample_ids")
    if ids_B.numel() and int(ids_B.max()) >= trace.num_seqs:
        bad = ids_B[ids_B >= trace.num_seqs].tolist()
        raise LayoutError(
            f"sample id(s) {bad} are outside the global trace, which has {trace.num_seqs} samples "
            f"(sequence i = sample i); split the trace of the whole batch"
        )
    return RouteStore(handle, trace.select_sequences(ids_B), sample_ids=ids_B)


# --- gather --------------------------------------------------------------------------------------
def merge_routes(
    shards: Sequence[tuple[Sequence[int] | torch.Tensor, RoutingTrace]],
) -> tuple[list[int], RoutingTrace]:
    """Join per-rank routes into global sample order; the inverse of splitting by sample id.

    Args:
        shards: ``(sample_ids, trace)`` per rank, in rank order: ``trace`` has one sequence per id.

    Returns:
        ``(ids, trace)``: the distinct sample ids in increasing order, and the trace with one
        sequence per id in that order (sequence ``i`` = sample ``i`` when the ids are
        ``0 .. N-1``). A sample held by several ranks keeps the first rank's routes.

    Raises:
        LayoutError: no shards, ids not one per sequence, negative or repeated within a shard,
            or one sample id with different lengths on two ranks.
        TraceMismatchError: shards of different layers, top-k or expert counts.
    """
    shards = list(shards)
    if not shards:
        raise LayoutError("merge_routes needs at least one shard")
    ids_list, traces = [], []
    for r, (ids, trace) in enumerate(shards):
        if not isinstance(trace, RoutingTrace):
            raise LayoutError(f"shard {r}: expected (sample_ids, RoutingTrace), found a {type(trace).__name__}")
        ids_B = _ids(ids, f"shard {r} sample ids")
        if ids_B.numel() != trace.num_seqs:
            raise LayoutError(f"shard {r} has {ids_B.numel()} sample ids for a trace of {trace.num_seqs} sequences")
        ids_list.append(ids_B)
        traces.append(trace.to(shards[0][1].device))
    joined = RoutingTrace.concat(traces)  # raises TraceMismatchError on different layers / top-k / experts
    ids_M = torch.cat(ids_list)
    lens_M = joined.seq_lens.cpu()
    order_M = torch.sort(ids_M, stable=True).indices  # stable: the first rank of a repeated id comes first
    sorted_M = ids_M[order_M]
    first_M = torch.ones_like(sorted_M, dtype=torch.bool)
    first_M[1:] = sorted_M[1:] != sorted_M[:-1]
    # A repeated id must have the same length everywhere (the same sample); compare to its first copy.
    group_M = first_M.cumsum(0) - 1
    lens_sorted_M = lens_M[order_M]
    lead_lens_M = lens_sorted_M[first_M][group_M]
    if bool((lens_sorted_M != lead_lens_M).any()):
        m = int((lens_sorted_M != lead_lens_M).nonzero()[0, 0])
        ranks = torch.repeat_interleave(torch.arange(len(shards)), torch.tensor([i.numel() for i in ids_list]))
        sample = int(sorted_M[m])
        held = ranks[order_M][sorted_M == sample].tolist()
        lens = lens_sorted_M[sorted_M == sample].tolist()
        raise LayoutError(
            f"sample {sample} is held by ranks {held} with lengths {lens}; one sample id must name the same sample "
            "on every rank (check that the ranks split the same global batch)"
        )
    keep_M = order_M[first_M]
    return sorted_M[first_M].tolist(), joined.select_sequences(keep_M.to(joined.device))


def gather_routes(
    trace: RoutingTrace | None, *, sample_ids: Sequence[int] | torch.Tensor, group: Any = None
) -> tuple[list[int], RoutingTrace]:
    """All-gather every rank's routes into global sample order (R2: old-policy routes of the batch).

    Collective: every rank of ``group`` must call it. Two collectives: ``all_gather_object`` of
    the sizes and model identity (a few ints per rank), then ``all_gather`` of one uint8 buffer
    per rank holding the trace's bytes as stored (ids in their compact dtype, ``valid`` as one byte
    a row, gates in their dtype, ``cu_seqlens`` and the sample ids), padded to the largest rank.

    Args:
        trace: this rank's routes, one sequence per sample id; None when the rank holds no sample
            (then ``sample_ids`` is empty).
        sample_ids: the global sample id of each sequence of ``trace``.
        group: the process group (default: the world).

    Returns:
        ``(ids, trace)`` as :func:`merge_routes`, on every rank, on ``trace``'s device (the CPU
        for a rank that passed None).

    Raises:
        LayoutError: as :func:`merge_routes`, or no rank holds any route.
        TraceMismatchError: names the rank whose trace is of other layers, top-k, experts or gate dtype.
    """
    import torch.distributed as dist

    ids_B = _ids(sample_ids, "sample_ids")
    num_seqs = 0 if trace is None else trace.num_seqs
    if ids_B.numel() != num_seqs:
        raise LayoutError(f"{ids_B.numel()} sample ids for a trace of {num_seqs} sequences")
    header = (
        None
        if trace is None
        else {
            "layer_ids": tuple(trace.layer_ids),
            "top_k": trace.top_k,
            "num_experts": trace.num_experts,
            "experts": str(trace.experts.dtype),
            "gates": None if trace.gates is None else str(trace.gates.dtype),
            "num_seqs": trace.num_seqs,
            "num_tokens": trace.num_tokens,
            "valid": trace.valid is not None,
            "meta": dict(trace.meta),
            "checked": trace.rows_checked(),  # the receivers' copies are as checked as the sender's
        }
    )
    world = dist.get_world_size(group)
    headers: list[dict | None] = [None] * world
    dist.all_gather_object(headers, header, group=group)
    held = [r for r, h in enumerate(headers) if h is not None]
    if not held:
        raise LayoutError("gather_routes: no rank holds any route (every rank passed trace=None)")
    ref = headers[held[0]]
    for r in held:
        for key in ("layer_ids", "top_k", "num_experts", "gates"):
            if headers[r][key] != ref[key]:
                raise TraceMismatchError(
                    f"rank {r} has a trace with {key}={headers[r][key]} but rank {held[0]} has {key}={ref[key]}; "
                    "every rank must record the same model layers"
                )
    out_device = torch.device("cpu") if trace is None else trace.device
    device = _comm_device(group, out_device)
    sizes = [0 if h is None else _payload_size(h) for h in headers]
    width = max(sizes)
    padded_U = torch.zeros(width, dtype=torch.uint8, device=device)
    if trace is not None:
        payload_U = _pack(trace, ids_B)
        padded_U[: payload_U.numel()] = payload_U.to(device)
    received = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(received, padded_U, group=group)
    shards = [_unpack(received[r][: sizes[r]].to(out_device), headers[r]) for r in held]
    return merge_routes(shards)


def gather_store(store: RouteStore, *, group: Any = None) -> tuple[list[int], RoutingTrace]:
    """:func:`gather_routes` of every sample a :class:`~routereplay.rl.RouteStore` holds on each rank.

    Collective. Returns ``(ids, trace)``, the routes of every rank's samples in global sample order.
    """
    ids = store.sample_ids
    return gather_routes(store.trace(ids) if ids else None, sample_ids=ids, group=group)


def _padded8(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, zero-padded to a multiple of 8 so that every part of a payload starts
    aligned for any dtype (``Tensor.view(dtype)`` needs an aligned offset)."""
    raw_U = x.contiguous().reshape(-1).view(torch.uint8)
    pad = _padded8(raw_U.numel()) - raw_U.numel()
    return torch.cat([raw_U, raw_U.new_zeros(pad)]) if pad else raw_U


def _pack(trace: RoutingTrace, ids_B: torch.Tensor) -> torch.Tensor:
    parts = [_bytes(trace.experts), _bytes(trace.cu_seqlens.to(torch.int64)), _bytes(ids_B.to(trace.device))]
    if trace.valid is not None:
        parts.append(_bytes(trace.valid.to(torch.uint8)))
    if trace.gates is not None:
        parts.append(_bytes(trace.gates))
    return torch.cat(parts)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _payload_size(header: dict) -> int:
    T, B, L, K = header["num_tokens"], header["num_seqs"], len(header["layer_ids"]), header["top_k"]
    size = _padded8(T * L * K * _dtype(header["experts"]).itemsize) + (B + 1) * 8 + B * 8
    if header["valid"]:
        size += _padded8(T)
    if header["gates"] is not None:
        size += _padded8(T * L * K * _dtype(header["gates"]).itemsize)
    return size


def _unpack(buf_U: torch.Tensor, header: dict) -> tuple[torch.Tensor, RoutingTrace]:
    T, B, L, K = header["num_tokens"], header["num_seqs"], len(header["layer_ids"]), header["top_k"]
    pos = 0

    def take(n: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal pos
        nbytes = n * dtype.itemsize
        out = buf_U[pos : pos + nbytes].view(dtype).reshape(shape)
        pos += _padded8(nbytes)
        return out

    experts_TLK = take(T * L * K, _dtype(header["experts"]), (T, L, K))
    cu_B1 = take(B + 1, torch.int64, (B + 1,))
    ids_B = take(B, torch.int64, (B,))
    valid_T = take(T, torch.uint8, (T,)).bool() if header["valid"] else None
    gates_TLK = take(T * L * K, _dtype(header["gates"]), (T, L, K)) if header["gates"] is not None else None
    # The bytes are a validated trace's own, moved verbatim: skip the O(T) re-validation (and the
    # repeat check where the sender's trace had passed it, see RoutingTrace.rows_checked).
    trace = RoutingTrace.unchecked(
        experts=experts_TLK.clone(),
        cu_seqlens=cu_B1.clone(),
        layer_ids=header["layer_ids"],
        num_experts=header["num_experts"],
        valid=valid_T,
        gates=None if gates_TLK is None else gates_TLK.clone(),
        meta=header["meta"],
        rows_checked=header["checked"],
    )
    return ids_B.cpu(), trace


def _comm_device(group: Any, fallback: torch.device) -> torch.device:
    """Where the collective's tensors must live: the CPU for gloo, the current CUDA device for NCCL."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return fallback


def _ids(sample_ids: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    ids_B = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1).cpu()
    if ids_B.numel() and int(ids_B.min()) < 0:
        raise LayoutError(f"{what} must be non-negative, found {ids_B.tolist()}")
    if torch.unique(ids_B).numel() != ids_B.numel():
        raise LayoutError(f"{what} must be distinct, found {ids_B.tolist()}")
    return ids_B


# --- metrics -------------------------------------------------------------------------------------
def global_routing_agreement(
    a: RoutingTrace | torch.Tensor,
    b: RoutingTrace | torch.Tensor,
    mask: torch.Tensor | Sequence[bool] | None = None,
    *,
    group: Any = None,
) -> metrics.RoutingAgreement:
    """``routereplay.rl.metrics.routing_agreement`` over the tokens of every rank of ``group``.

    Collective. Each rank passes the two routings of its own tokens (and mask); every rank gets
    the values over all of them. Every field is a mean over the selected tokens, so the global
    value is the token-weighted mean of the ranks' values (computed in float64; a rank without
    tokens weighs nothing).

    Raises:
        MetricInputError, TraceMismatchError: as ``routing_agreement`` on any rank's inputs;
            TraceMismatchError also when ranks compare different layers or top-k.
    """
    import torch.distributed as dist

    local = metrics.routing_agreement(a, b, mask)
    world = dist.get_world_size(group)
    parts: list[metrics.RoutingAgreement] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(parts, local, group=group)
    for r, p in enumerate(parts):
        if (p.layer_ids, p.top_k) != (local.layer_ids, local.top_k):
            raise TraceMismatchError(
                f"rank {r} compares layers {list(p.layer_ids)} with top_k={p.top_k}, this rank layers "
                f"{list(local.layer_ids)} with top_k={local.top_k}; every rank must measure the same layers"
            )
    n = sum(p.num_tokens for p in parts)
    L = len(local.layer_ids)
    fields = ("exact_match", "overlap", "jaccard", "top1_agreement", "ordered_match", "token_disagreement")
    mean = {f: _weighted([(p.num_tokens, getattr(p, f)) for p in parts]) for f in fields}
    mdl = _weighted([(p.num_tokens, p.mean_disagreeing_layers) for p in parts])
    per_dis = tuple(_weighted([(p.num_tokens, p.per_layer_disagreement[i]) for p in parts]) for i in range(L))
    per_ov = tuple(_weighted([(p.num_tokens, p.per_layer_overlap[i]) for p in parts]) for i in range(L))
    return metrics.RoutingAgreement(
        num_tokens=n,
        layer_ids=local.layer_ids,
        top_k=local.top_k,
        disagreement=1.0 - mean["exact_match"],
        mean_disagreeing_layers=mdl,
        per_layer_disagreement=per_dis,
        per_layer_overlap=per_ov,
        **mean,
    )


def global_logprob_mismatch(
    logp_train: torch.Tensor,
    logp_infer: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    taus: Sequence[float] = metrics.DEFAULT_TAUS,
    group: Any = None,
) -> metrics.LogprobMismatch:
    """``routereplay.rl.metrics.logprob_mismatch`` over the sampled tokens of every rank of ``group``.

    Collective. ``delta = logp_train - logp_infer`` as there. Means (k1, k2, k3, mean ``|delta|``,
    probability difference, ``F(tau)``) are token-weighted means of the ranks' values, the maximum
    is the maximum, and the Pearson correlation is combined from each rank's means and centred
    co-moments (Chan et al.'s parallel update), so it equals the correlation over all tokens up to
    float64 rounding.

    Raises:
        MetricInputError: as ``logprob_mismatch`` on any rank's inputs.
    """
    import torch.distributed as dist

    local = metrics.logprob_mismatch(logp_train, logp_infer, mask, taus=taus)  # validates the inputs
    keep = torch.ones(logp_train.numel(), dtype=torch.bool, device=logp_train.device)
    if mask is not None:
        keep = torch.as_tensor(mask, device=logp_train.device).reshape(-1).bool()
    pt_N = logp_train.reshape(-1)[keep].to(torch.float64).exp()
    pi_N = logp_infer.reshape(-1).to(logp_train.device)[keep].to(torch.float64).exp()
    moments = (0.0, 0.0, 0.0, 0.0, 0.0)
    if pt_N.numel():
        mt, mi = float(pt_N.mean()), float(pi_N.mean())
        ct_N, ci_N = pt_N - mt, pi_N - mi
        moments = (mt, mi, float(ct_N.square().sum()), float(ci_N.square().sum()), float((ct_N * ci_N).sum()))
    world = dist.get_world_size(group)
    parts: list[tuple] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(parts, (local, moments), group=group)
    n = sum(p.num_tokens for p, _ in parts)
    if n == 0:
        return metrics.logprob_mismatch(logp_train[:0], logp_infer[:0], taus=taus)
    w = lambda f: _weighted([(p.num_tokens, getattr(p, f)) for p, _ in parts])
    return metrics.LogprobMismatch(
        num_tokens=n,
        k1=w("k1"),
        k2=w("k2"),
        k3=w("k3"),
        mean_abs_delta=w("mean_abs_delta"),
        max_abs_delta=max(p.max_abs_delta for p, _ in parts if p.num_tokens),
        prob_diff=w("prob_diff"),
        pearson=_pooled_pearson([(p.num_tokens, m) for p, m in parts]),
        extreme={k: _weighted([(p.num_tokens, p.extreme[k]) for p, _ in parts]) for k in local.extreme},
    )


def _weighted(pairs: Sequence[tuple[int, float]]) -> float:
    """Token-weighted mean of per-rank means; ranks without tokens (NaN values) weigh nothing."""
    n = sum(k for k, _ in pairs)
    if n == 0:
        return float("nan")
    return math.fsum(k * v for k, v in pairs if k) / n


def _pooled_pearson(parts: Sequence[tuple[int, tuple[float, ...]]]) -> float:
    """Pearson correlation of the union of the ranks' samples from their means and centred co-moments."""
    n = sum(k for k, _ in parts)
    mt = math.fsum(k * m[0] for k, m in parts) / n
    mi = math.fsum(k * m[1] for k, m in parts) / n
    stt = math.fsum(m[2] + k * (m[0] - mt) ** 2 for k, m in parts if k)
    sii = math.fsum(m[3] + k * (m[1] - mi) ** 2 for k, m in parts if k)
    sti = math.fsum(m[4] + k * (m[0] - mt) * (m[1] - mi) for k, m in parts if k)
    denom = math.sqrt(stt) * math.sqrt(sii)
    return float("nan") if denom == 0.0 else sti / denom
