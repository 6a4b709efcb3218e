"""Tests of routereplay.parallel.collectives: split by sample id, gather back, metrics reduced over ranks.

Pure parts (the DistributedSampler split, merge) run in-process with hypothesis; the collectives
run on real gloo ranks (2 processes: a sample repeated on both, a rank holding no sample) and are
checked against the single-process answer.

Legend: T rows, L MoE layers, K top-k, B sequences, N samples of the global batch, R ranks.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import traces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from routereplay import RoutingTrace
from routereplay.core import io
from routereplay.core.errors import LayoutError, MissingRoutesError, TraceMismatchError
from routereplay.parallel import collectives as rd
from routereplay.rl import metrics

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_trace(lens, L=2, K=2, E=8, *, valid: bool | str = False, gates=False, seed=0) -> RoutingTrace:
    """A random valid trace: K distinct ids per row (one per band of E // 8 ids).

    ``valid``: False (every row known), True (~20 % unknown rows) or ``"last"`` (each sequence's
    last row unknown, as an engine capture has it; the only kind a RouteStore accepts).
    """
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    step = E // 8
    slot_TLK = torch.rand(T, L, 8, generator=g).argsort(-1)[..., :K]
    experts_TLK = slot_TLK * step + torch.randint(0, step, (T, L, 1), generator=g)
    cu_B1 = torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()])
    valid_T = None
    if valid == "last":
        valid_T = torch.ones(T, dtype=torch.bool)
        valid_T[cu_B1[1:][cu_B1.diff() > 0] - 1] = False
    elif valid:
        valid_T = torch.rand(T, generator=g) < 0.8
    return RoutingTrace(
        experts=experts_TLK,
        cu_seqlens=cu_B1,
        layer_ids=tuple(range(1, 2 * L, 2)),
        num_experts=E,
        valid=valid_T,
        gates=torch.rand(T, L, K, generator=g) if gates else None,
        meta={"source": "test"},
    )


# --- split --------------------------------------------------------------------------------------
@given(
    n=st.integers(0, 30),
    world=st.integers(1, 5),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 100),
    epoch=st.integers(0, 3),
)
@SETTINGS
def test_sample_ids_are_distributed_samplers(n, world, shuffle, drop_last, seed, epoch):
    for rank in range(world):
        ids = rd.distributed_sample_ids(
            n, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last
        )
        if n:
            sampler = DistributedSampler(
                list(range(n)), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
            )
            sampler.set_epoch(epoch)
            assert ids == list(sampler)
        assert len(set(ids)) == len(ids), "a rank never gets a sample twice"


@given(
    trace=traces(max_seqs=9, max_len=7, valid=(None, "last")),
    world=st.integers(1, 4),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 9),
)
@SETTINGS
def test_split_then_merge_round_trip(trace, world, shuffle, drop_last, seed):
    """Every rank's samples via RouteStore, merged back: the global trace (its kept samples)."""
    N = trace.num_seqs
    shards = []
    for rank in range(world):
        ids = rd.distributed_sample_ids(
            N, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        store = rd.rank_store(None, trace, sample_ids=ids)
        assert store.sample_ids == sorted(ids)
        shards.append((ids, store.trace(ids) if ids else trace.select_sequences([])))
    ids, merged = rd.merge_routes(shards)
    if drop_last:
        assert ids == sorted({i for s, _ in shards for i in s})
    else:
        assert ids == list(range(N)), "without drop_last every sample is on some rank"
    assert merged == trace.select_sequences(ids)


@given(trace=traces(max_seqs=6, max_len=7, valid=(None, 0.8, "last")), data=st.data())
@SETTINGS
def test_merge_inverts_any_split_with_repeats(trace, data):
    """Any partition (ranks in any order, samples repeated on a second rank) merges to sample order."""
    N = trace.num_seqs
    world = data.draw(st.integers(1, 4))
    owner = data.draw(st.lists(st.integers(0, world - 1), min_size=N, max_size=N))
    extra = data.draw(st.lists(st.tuples(st.integers(0, max(N - 1, 0)), st.integers(0, world - 1)), max_size=3))
    shards = []
    for r in range(world):
        ids = [i for i in range(N) if owner[i] == r] + [i for i, o in extra if N and o == r and owner[i] != r]
        ids = list(dict.fromkeys(data.draw(st.permutations(ids))))
        shards.append((ids, trace.select_sequences(ids)))
    ids, merged = rd.merge_routes(shards)
    assert ids == list(range(N))
    assert merged == trace


def test_rank_store_holds_only_its_samples():
    trace = make_trace([3, 1, 4, 2, 5])
    store = rd.rank_store(None, trace, sample_ids=[4, 1])
    assert store.sample_ids == [1, 4]
    assert store.trace([4, 1]) == trace.select_sequences([4, 1])
    with pytest.raises(
        MissingRoutesError, match=r"^sample\(s\) \[2\] have no routes in this store \(it holds 2 samples\)"
    ):
        store.trace([1, 2])
    with pytest.raises(LayoutError, match=r"^sample id\(s\) \[5\] are outside the global trace, which has 5 samples"):
        rd.rank_store(None, trace, sample_ids=[0, 5])
    with pytest.raises(LayoutError, match=r"^sample_ids must be distinct, found \[1, 1\]"):
        rd.rank_store(None, trace, sample_ids=[1, 1])


# (trace): make_trace([3, 1, 4])
MERGE_REFUSALS = [
    pytest.param(
        lambda trace: rd.merge_routes([([0, 1], trace.select_sequences([0, 1])), ([1], trace.select_sequences([2]))]),
        LayoutError,
        r"^sample 1 is held by ranks \[0, 1\] with lengths \[1, 4\]; one sample id",
        id="sample-lengths-differ",
    ),
    pytest.param(
        lambda trace: rd.merge_routes([([0], trace.sequence(0)), ([1, 2], trace.sequence(1))]),
        LayoutError,
        r"^shard 1 has 2 sample ids for a trace of 1 sequences",
        id="ids-vs-sequences",
    ),
    pytest.param(
        lambda trace: rd.merge_routes([([0], trace.sequence(0)), ([1], make_trace([2], L=3))]),
        TraceMismatchError,
        r"^trace 1 has layer_ids=\(1, 3, 5\) but trace 0 has layer_ids=\(1, 3\)",
        id="layer-ids",
    ),
    pytest.param(
        lambda trace: rd.merge_routes([]),
        LayoutError,
        r"^merge_routes needs at least one shard",
        id="no-shard",
    ),
    pytest.param(
        lambda trace: rd.distributed_sample_ids(4, num_replicas=2, rank=2),
        LayoutError,
        r"^rank must be an int in \[0, 2\) for num_replicas=2, found 2",
        id="rank",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), MERGE_REFUSALS)
def test_merge_refusals(call, error, match):
    trace = make_trace([3, 1, 4])
    with pytest.raises(error, match=match):
        call(trace)


# --- collectives on gloo --------------------------------------------------------------------------
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch() -> tuple[RoutingTrace, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global trace (300 experts: int16 ids, gates, invalid rows), a second routing, log-probs."""
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(1, 9, (7,), generator=g).tolist()
    a = make_trace(lens, L=3, K=2, E=300, valid="last", gates=True, seed=1)
    # b: a with ~30 % of the rows re-routed (same valid rows)
    other = make_trace(lens, L=3, K=2, E=300, valid="last", gates=True, seed=2)
    flip_T = torch.rand(a.num_tokens, generator=g) < 0.3
    b = a.replace(check=False, experts=torch.where(flip_T[:, None, None], other.experts, a.experts))
    logp_infer_T = -torch.rand(a.num_tokens, generator=g, dtype=torch.float64) * 3
    logp_train_T = logp_infer_T + 0.2 * torch.randn(a.num_tokens, generator=g, dtype=torch.float64)
    return a, b, logp_train_T, logp_infer_T


def _rows(trace: RoutingTrace, ids: list[int]) -> torch.Tensor:
    cu = trace.cu_seqlens
    return (
        torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in ids]) if ids else torch.zeros(0, dtype=torch.int64)
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        a, b, lt, li = _global_batch()
        # 7 samples over 2 ranks: DistributedSampler repeats one sample on the second rank.
        ids = rd.distributed_sample_ids(a.num_seqs, num_replicas=world, rank=rank, seed=3)
        gathered_ids, gathered = rd.gather_routes(a.select_sequences(ids), sample_ids=ids)
        # A rank without samples (here the last one) takes part with an empty store.
        held = ids if rank == 0 else []
        store_ids, from_store = rd.gather_store(rd.rank_store(None, b, sample_ids=held))
        # Metrics: a partition without repeats (a repeated sample would count twice), uneven sizes.
        mine = [i for i in range(a.num_seqs) if i % world == rank]
        rows = _rows(a, mine)
        mask_T = torch.arange(a.num_tokens) % 3 != 0
        agree = rd.global_routing_agreement(a.select_sequences(mine), b.select_sequences(mine), mask_T[rows])
        mism = rd.global_logprob_mismatch(lt[rows], li[rows], mask_T[rows])
        io.save(gathered, os.path.join(out, f"rank{rank}.rrt"))
        io.save(from_store, os.path.join(out, f"rank{rank}_store.rrt"))
        result = {"ids": gathered_ids, "store_ids": store_ids, "agree": agree.to_dict(), "mism": mism.to_dict()}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    mp.spawn(_worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=True)
    results = []
    for r in range(WORLD):
        res = torch.load(out / f"rank{r}.pt")
        res["trace"], res["store_trace"] = io.load(out / f"rank{r}.rrt"), io.load(out / f"rank{r}_store.rrt")
        results.append(res)
    return results


def test_gather_routes_gives_global_order_on_every_rank(gloo_results):
    a, b, _, _ = _global_batch()
    for r, res in enumerate(gloo_results):
        assert res["ids"] == list(range(a.num_seqs)), f"rank {r}"
        assert res["trace"] == a, f"rank {r}: gathered trace differs from the global one"
        assert res["trace"].experts.dtype == torch.int16
        rank0 = rd.distributed_sample_ids(b.num_seqs, num_replicas=WORLD, rank=0, seed=3)
        assert res["store_ids"] == sorted(rank0)
        assert res["store_trace"] == b.select_sequences(sorted(rank0)), f"rank {r}: gathered store differs"


def _close(x, y, what):
    if isinstance(x, dict):
        for k in x:
            _close(x[k], y[k], f"{what}.{k}")
    elif isinstance(x, list):
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _close(u, v, f"{what}[{i}]")
    elif isinstance(x, float):
        # float64 throughout; the pooled values differ from the direct ones only by rounding
        assert math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-14), f"{what}: {x} != {y}"
    else:
        assert x == y, f"{what}: {x} != {y}"


def test_global_metrics_equal_one_process(gloo_results):
    a, b, lt, li = _global_batch()
    mask_T = torch.arange(a.num_tokens) % 3 != 0
    want_agree = metrics.routing_agreement(a, b, mask_T).to_dict()
    want_mism = metrics.logprob_mismatch(lt, li, mask_T).to_dict()
    assert 0 < want_agree["disagreement"] < 1, "the fixture must disagree somewhere"
    for r, res in enumerate(gloo_results):
        _close(res["agree"], want_agree, f"rank {r} agreement")
        _close(res["mism"], want_mism, f"rank {r} mismatch")
