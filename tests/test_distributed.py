"""Multi-process torch.distributed (gloo) tests: traces sharded over real ranks and gathered back.

Each rank loads the trace rank 0 saved, keeps only its own sequence- or context-parallel shard
(as a trainer rank would), and the shards travel through real collectives before the inverse
layout puts them back together. Every rank checks the result equals the original, bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from routereplay.core import io, layout
from routereplay.core.trace import RoutingTrace


def _trace(seed: int = 0) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 40, (5,), generator=g)
    T, L, K, E = int(lens.sum()), 3, 4, 300  # 300 experts: int16 ids
    experts = torch.rand(T * L, E, generator=g).argsort(-1)[:, :K].reshape(T, L, K)
    valid = torch.rand(T, generator=g) > 0.1
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    return RoutingTrace(experts=experts, cu_seqlens=cu, layer_ids=[1, 4, 7], num_experts=E, valid=valid)


def _all_gather_shard(shard: RoutingTrace, world: int) -> list[RoutingTrace]:
    """Gather every rank's shard (same shapes on every rank by construction of the layouts)."""
    # gloo reduces no bool or int16 tensors: ship the raw bytes and view them back.
    raw = shard.experts.view(torch.uint8)
    experts = [torch.empty_like(raw) for _ in range(world)]
    valid = [torch.empty(shard.num_tokens, dtype=torch.uint8) for _ in range(world)]  # gloo has no bool
    cus = [torch.empty_like(shard.cu_seqlens) for _ in range(world)]
    dist.all_gather(experts, raw)
    dist.all_gather(valid, shard.valid_mask.to(torch.uint8))
    dist.all_gather(cus, shard.cu_seqlens)
    return [
        RoutingTrace(
            experts=e.view(shard.experts.dtype),
            cu_seqlens=c,
            layer_ids=shard.layer_ids,
            num_experts=shard.num_experts,
            valid=v.bool(),
        )
        for e, c, v in zip(experts, cus, valid)
    ]


def _worker(rank: int, world: int, init_file: str, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if rank == 0:
            io.save(_trace(), path)
        dist.barrier()
        trace = io.load(path)
        assert trace == _trace()

        for mode in ("zigzag", "contiguous"):
            mine = layout.shard_cp(trace, world, mode=mode, rank=rank)
            back = layout.unshard_cp(_all_gather_shard(mine, world), cu_seqlens=trace.cu_seqlens, mode=mode)
            assert back == trace, f"rank {rank}: CP {mode} round trip over gloo differs"

        mine = layout.split_sp(trace, world, rank=rank)
        back = layout.gather_sp(_all_gather_shard(mine, world), num_tokens=trace.num_tokens)
        assert back == trace, f"rank {rank}: SP round trip over gloo differs"

        # Micro-batches scattered by sequence: rank r takes every world-th micro-batch.
        mbs = layout.split_micro_batches(trace, world)
        objs = [None] * world
        dist.all_gather_object(objs, _parts(mbs[rank]))
        joined = layout.join_micro_batches([RoutingTrace(**parts) for parts in objs])
        assert joined == trace, f"rank {rank}: micro-batch scatter/gather over gloo differs"
    finally:
        dist.destroy_process_group()


def _parts(trace: RoutingTrace) -> dict:
    names = ("experts", "cu_seqlens", "layer_ids", "num_experts", "valid")
    return {name: getattr(trace, name) for name in names}


@pytest.mark.parametrize("world", [2, 4])
def test_shards_round_trip_over_gloo(tmp_path, world):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "t.rrt")), nprocs=world, join=True)
