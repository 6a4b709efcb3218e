"""Megatron-Core ``RouterReplay`` data <-> RoutingTrace.

Megatron-Core conventions (``megatron/core/transformer/moe/router_replay.py`` and ``router.py``,
core 0.16.1):

* ``RouterReplay.get_recorded_data()`` returns one entry per ``RouterReplay`` instance, in the order
  the instances were created (one per ``TopKRouter`` built with ``moe_enable_routing_replay=True``;
  MTP routers included). An entry is the ``[num_tokens, top_k]`` int64 ``top_indices`` of the last
  forward in ``RECORD`` mode, or ``None`` if that router recorded nothing.
* ``RouterReplay.set_replay_data(list)`` takes the same list shape and hands entry i to instance i
  (``REPLAY_FORWARD`` gathers the live scores at these ids; ``REPLAY_BACKWARD`` pops them FIFO).
* The instance list is process-global: a second model in the process appends its routers to it
  ("The number of replay tensors (4) does not match instances (8)").
* Rows: the router flattens its ``[seq, batch, E]`` logits, so row ``s * batch + b`` is token ``s``
  of sequence ``b`` (``order="sbhd"``); with packed THD input (batch 1) the rows are the packed
  tokens in order (``order="thd"``). Every token is routed, the last one of a sequence included
  (training rows). Sequence / context parallelism shard these rows per rank: build the rank's trace
  with :mod:`routereplay.core.layout` first.
* Router ``layer_number`` is the 1-based global decoder-layer number; this module's layer ids are
  0-based (``layer_number - 1``), matching the rest of routereplay.

Legend: N router rows, L layers (routers), K top-k, T trace rows, B sequences, S sequence length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from routereplay.core.errors import EngineFormatError, LayerMismatchError
from routereplay.core.trace import RoutingTrace
from routereplay.formats.common import Rows, _finish, _seq_ids, _to_rows

__all__ = ["from_megatron", "megatron_router_layer_ids", "to_megatron"]

Order = Literal["thd", "sbhd"]


def _router_ids(router_layer_ids: Sequence[int]) -> list[int]:
    ids = list(router_layer_ids.tolist() if isinstance(router_layer_ids, torch.Tensor) else router_layer_ids)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise EngineFormatError(f"router_layer_ids must be non-negative ints (0-based global layer ids), found {ids}")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise EngineFormatError(
            f"router_layer_ids names layer(s) {dup} more than once; each router instance must map to its own "
            "layer (MTP routers need ids beyond the decoder layers)"
        )
    return ids


def megatron_router_layer_ids(model: Any, instances: Sequence[Any] | None = None) -> list[int]:
    """The 0-based global layer id of every replay-enabled router, in ``RouterReplay`` instance order.

    Duck-typed (no Megatron import): a router is a submodule with a non-None ``router_replay``
    attribute and an int ``layer_number`` (1-based, as Megatron sets it).

    Args:
        model: the Megatron model (or a list of model chunks, e.g. virtual pipeline stages).
        instances: ``RouterReplay.global_router_replay_instances``. When given, the result follows
            its order and every instance must belong to a router of ``model``; when omitted, module
            order is used (the order Megatron builds them in a single model).

    Returns:
        One layer id per router, ready for :func:`to_megatron` / :func:`from_megatron`.

    Raises:
        EngineFormatError: no replay-enabled router, a router without ``layer_number``, an instance that
            belongs to another model (two models in one process share Megatron's global list).
    """
    chunks = model if isinstance(model, list | tuple) else [model]
    routers = [m for chunk in chunks for m in chunk.modules() if getattr(m, "router_replay", None) is not None]
    if not routers:
        raise EngineFormatError(
            "no router with a router_replay was found in the model; build it with "
            "TransformerConfig(moe_enable_routing_replay=True)"
        )
    for r in routers:
        if isinstance(getattr(r, "layer_number", None), bool) or not isinstance(getattr(r, "layer_number", None), int):
            raise EngineFormatError(
                f"router {type(r).__name__} has layer_number={getattr(r, 'layer_number', None)!r}; "
                "expected Megatron's 1-based int"
            )
    by_instance = {id(r.router_replay): r.layer_number - 1 for r in routers}
    if instances is None:
        return _router_ids([r.layer_number - 1 for r in routers])
    ids = []
    for k, inst in enumerate(instances):
        if id(inst) not in by_instance:
            raise EngineFormatError(
                f"RouterReplay instance {k} of {len(instances)} belongs to no router of this model: another model in "
                "this process registered its routers in Megatron's process-global list. Call "
                "RouterReplay.clear_global_router_replay_instances() before building the model you replay"
            )
        ids.append(by_instance[id(inst)])
    if len(ids) != len(routers):
        raise EngineFormatError(
            f"the model has {len(routers)} replay-enabled routers but the instance list has {len(instances)}"
        )
    return _router_ids(ids)


def to_megatron(
    trace: RoutingTrace,
    *,
    router_layer_ids: Sequence[int],
    rows: Rows = "training",
    order: Order = "thd",
    fill_invalid: bool = False,
    top_k: int | None = None,
    num_experts: int | None = None,
    device: torch.device | str | None = None,
) -> list[torch.Tensor]:
    """The list ``RouterReplay.set_replay_data()`` takes: one int64 ``[N, K]`` tensor per router instance.

    Rows without a route get the ids ``0..K-1`` (distinct, so Megatron's dispatch stays well formed).
    That is harmless on a sequence's last row, whose output feeds no later token of the sequence and
    no loss; anywhere else it would change the model's output, so it needs ``fill_invalid=True``.

    Args:
        trace: the rows this rank's routers see, in ``rows`` convention (engine rows get an empty last
            row per sequence first).
        router_layer_ids: 0-based global layer id of each router instance, in instance order
            (:func:`megatron_router_layer_ids`).
        order: ``"thd"`` (packed, rows in trace order) or ``"sbhd"`` (all sequences of equal length S;
            row ``s * B + b``).
        fill_invalid: also fill rows without a route that are not a sequence's last row.
        top_k, num_experts: the model's; when given they must match the trace.
        device: where the tensors go (default: the trace's device). Keep them on the GPU: indices on
            the CPU cost a blocking copy per layer per micro-batch in Megatron.

    Returns:
        ``[N, K]`` int64 contiguous tensors, one per router instance.

    Raises:
        LayerMismatchError: a router layer the trace lacks, or a different top-k / expert count.
        EngineFormatError: a row without a route in the middle of a sequence, unequal lengths for
            ``"sbhd"``, a bad ``order``.
    """
    ids = _router_ids(router_layer_ids)
    missing = [i for i in ids if i not in trace.layer_ids]
    if missing:
        raise LayerMismatchError(
            f"router layer(s) {missing} are not in the trace, which has layers {list(trace.layer_ids)}; "
            "the trace and the model's routers must cover the same MoE layers"
        )
    for name, want, have in (("top_k", top_k, trace.top_k), ("num_experts", num_experts, trace.num_experts)):
        if want is not None and want != have:
            raise LayerMismatchError(f"the model's routers have {name}={want}, the trace has {name}={have}")
    if order not in ("thd", "sbhd"):
        raise EngineFormatError(f'order must be "thd" or "sbhd", found {order!r}')
    trace = _to_rows(trace, "training", rows)
    experts_TLK = trace.experts.to(torch.int64)
    if trace.valid is not None and not bool(trace.valid.all()):
        hole_T = ~trace.valid
        inner_T = hole_T.clone()
        lens = trace.seq_lens
        inner_T[trace.cu_seqlens[1:][lens > 0] - 1] = False
        if not fill_invalid and bool(inner_T.any()):
            t = int(inner_T.nonzero()[0, 0])
            b = int(_seq_ids(trace.cu_seqlens)[t])
            raise EngineFormatError(
                f"sequence {b}, position {t - int(trace.cu_seqlens[b])} has no route, and Megatron replays every row; "
                "pass fill_invalid=True to route such rows to experts 0..k-1 (changing the model's output there)"
            )
        fill_K = torch.arange(trace.top_k, dtype=torch.int64, device=experts_TLK.device)
        experts_TLK = experts_TLK.clone()
        experts_TLK[hole_T] = fill_K.expand(trace.num_layers, -1)
    if order == "sbhd":
        lens = trace.seq_lens
        B = trace.num_seqs
        if B and bool((lens != lens[0]).any()):
            raise EngineFormatError(
                f'order="sbhd" needs sequences of equal length (pad them first), found lengths {lens.tolist()[:8]}...'
                if B > 8
                else f'order="sbhd" needs sequences of equal length (pad them first), found lengths {lens.tolist()}'
            )
        S = int(lens[0]) if B else 0
        experts_TLK = (
            experts_TLK.reshape(B, S, trace.num_layers, trace.top_k)
            .transpose(0, 1)
            .reshape(B * S, trace.num_layers, trace.top_k)
        )
    pos = [trace.layer_ids.index(i) for i in ids]
    dev = trace.device if device is None else torch.device(device)
    return [experts_TLK[:, p].to(dev).contiguous() for p in pos]


def from_megatron(
    recorded: Sequence[torch.Tensor | None],
    *,
    router_layer_ids: Sequence[int],
    cu_seqlens: Sequence[int] | torch.Tensor,
    num_experts: int,
    order: Order = "thd",
    valid: torch.Tensor | None = None,
    rows: Rows = "training",
    allow_zero_routes: bool = False,
    meta: Mapping[str, str] | None = None,
) -> RoutingTrace:
    """A trace from ``RouterReplay.get_recorded_data()``.

    Args:
        recorded: one ``[N, K]`` integer tensor per router instance (``None`` = recorded nothing).
        router_layer_ids: 0-based global layer id of each instance, in instance order. The trace's
            layers are sorted by id.
        cu_seqlens: ``[B+1]`` sequence boundaries of the micro-batch, in trace (sequence-major) order.
        num_experts: routed experts per layer.
        order: ``"thd"`` (rows are the packed tokens) or ``"sbhd"`` (row ``s * B + b``, equal lengths).
        valid: optional bool ``[N]`` in trace order (e.g. False on padding rows).
        rows: ``"training"`` (every token, as Megatron routes them) or ``"engine"`` (last row dropped).
        allow_zero_routes: see :mod:`routereplay.formats`.
        meta: extra trace meta; ``meta["source"]`` is ``"megatron"``.

    Returns:
        RoutingTrace.

    Raises:
        EngineFormatError: an entry count that differs from ``router_layer_ids`` (two models sharing
            Megatron's global list?), a ``None`` entry (router not in RECORD mode, or the fused router
            path that skips the replay hook), entries of different shapes, a row count that differs
            from ``cu_seqlens``; RoutingTrace validation errors.
    """
    ids = _router_ids(router_layer_ids)
    recorded = list(recorded)
    _check_recorded(recorded, ids)
    N = recorded[0].shape[0]
    cu = _recorded_cu_seqlens(cu_seqlens, N, recorded[0].device)
    perm = sorted(range(len(ids)), key=ids.__getitem__)
    experts_NLK = torch.stack([recorded[p] for p in perm], dim=1)
    if order == "sbhd":
        experts_NLK = _sbhd_to_thd(experts_NLK, cu)
    elif order != "thd":
        raise EngineFormatError(f'order must be "thd" or "sbhd", found {order!r}')
    if valid is not None:
        valid = torch.as_tensor(valid, dtype=torch.bool)
        if valid.shape != (N,):
            raise EngineFormatError(f"valid must be a bool tensor of shape ({N},), found {tuple(valid.shape)}")
    labels = [f"sequence {b}" for b in range(cu.numel() - 1)]
    return _finish(
        experts_NLK,
        cu,
        labels,
        num_experts=num_experts,
        moe_layer_ids=None,
        rows=rows,
        allow_zero_routes=allow_zero_routes,
        missing="error",
        source="megatron",
        meta=meta,
        valid_N=valid,
        have="training",
        layer_ids=tuple(ids[p] for p in perm),
        what="recorded indices",
    )


def _check_recorded(recorded: list, ids: list[int]) -> None:
    """One integer ``[N, K]`` tensor per router instance in ``ids``, all of the same shape, and at least one."""
    if len(recorded) != len(ids):
        raise EngineFormatError(
            f"get_recorded_data() returned {len(recorded)} entries but router_layer_ids names {len(ids)} routers; "
            "a second model in this process shares Megatron's global RouterReplay list, or the ids are incomplete"
        )
    for k, (r, i) in enumerate(zip(recorded, ids)):
        if r is None:
            raise EngineFormatError(
                f"router instance {k} (layer {i}) recorded nothing; run the forward under RouterReplayAction.RECORD, "
                "and without moe_router_fusion (the fused router path skips the replay hook)"
            )
        if not isinstance(r, torch.Tensor) or r.ndim != 2 or r.dtype.is_floating_point or r.dtype == torch.bool:
            found = (tuple(r.shape), r.dtype) if isinstance(r, torch.Tensor) else type(r).__name__
            raise EngineFormatError(
                f"router instance {k} (layer {i}): expected an integer [tokens, top_k] tensor, found {found}"
            )
        if r.shape != recorded[0].shape:
            raise EngineFormatError(
                f"router instance {k} (layer {i}) recorded {list(r.shape)} "
                f"but instance 0 recorded {list(recorded[0].shape)}; "
                "all routers of one micro-batch see the same rows"
            )
    if not recorded:
        raise EngineFormatError("get_recorded_data() returned no entries: the model has no replay-enabled router")


def _recorded_cu_seqlens(cu_seqlens: Sequence[int] | torch.Tensor, N: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` as an int64 tensor on ``device``, checked to run from 0 to ``N`` without decreasing."""
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).reshape(-1).to(device)
    if cu.numel() < 1 or int(cu[-1]) != N or int(cu[0]) != 0:
        raise EngineFormatError(f"cu_seqlens {cu.tolist()[:8]} must run from 0 to the {N} rows each router recorded")
    lens_B = cu.diff()
    if bool((lens_B < 0).any()):
        b = int((lens_B < 0).nonzero()[0, 0])
        raise EngineFormatError(
            f"cu_seqlens decreases at index {b + 1} "
            f"(cu_seqlens[{b}]={int(cu[b])}, cu_seqlens[{b + 1}]={int(cu[b + 1])}): "
            f"sequence {b} would have {int(lens_B[b])} rows; cu_seqlens must be non-decreasing, the cumulative sum "
            "of the sequence lengths with a leading 0 (e.g. [0, 5, 8, 12])"
        )
    return cu


def _sbhd_to_thd(experts_NLK: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """Rows in ``"sbhd"`` order (row ``s * B + b``; sequences of equal length) put in sequence-major order."""
    N, L, K = experts_NLK.shape
    lens = cu.diff()
    B = lens.numel()
    if B and bool((lens != lens[0]).any()):
        raise EngineFormatError(
            f'order="sbhd" needs sequences of equal length, cu_seqlens gives lengths {lens.tolist()}'
        )
    S = int(lens[0]) if B else 0
    return experts_NLK.reshape(S, B, L, K).transpose(0, 1).reshape(N, L, K)
