"""routereplay.parallel: per-rank slices of a global trace and their inverse (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routereplay import parallel as par
from routereplay.core import layout as lay
from routereplay.core.errors import LayerMismatchError, LayoutError
from routereplay.core.trace import RoutingTrace

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _trace(lens, layer_ids=(0, 1, 2, 3), E=40, K=3, seed=0, valid_p=None) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    lens = torch.as_tensor(lens, dtype=torch.int64)
    T, L = int(lens.sum()), len(layer_ids)
    experts = torch.rand(T * L, E, generator=g).argsort(-1)[:, :K].reshape(T, L, K)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    valid = None if valid_p is None else torch.rand(T, generator=g) > valid_p
    if valid is not None:
        experts[~valid] = 0
    return RoutingTrace(experts=experts, cu_seqlens=cu, layer_ids=list(layer_ids), num_experts=E, valid=valid)


def _all_ranks(layout: par.ParallelLayout):
    return [layout.coords(r) for r in range(layout.world_size)]


def _stage_layers(trace_ids, num_layers, layout, pp_rank, moe):
    return [i for i in par.pipeline_layer_ids(num_layers, layout, pp_rank) if i in moe and i in trace_ids]


def _round_trip(trace, layout, num_layers, moe):
    records = {}
    for c in _all_ranks(layout):
        ids = _stage_layers(trace.layer_ids, num_layers, layout, c.pp, moe)
        got = par.slice_for_rank(trace, layout, c, layer_ids=ids)
        if got is None:
            assert not ids  # a stage without MoE layers replays nothing
            continue
        for mb in got:
            assert mb.experts.dtype == trace.experts.dtype  # ids move in their compact dtype
            assert mb.layer_ids == tuple(ids)
        records[c] = got
    back = par.unslice(records, layout, seq_lens=trace.seq_lens)
    want = trace.select_layers(back.layer_ids)
    assert back.layer_ids == tuple(sorted(i for i in trace.layer_ids if i in moe))
    assert torch.equal(back.experts[want.valid_mask], want.experts[want.valid_mask])
    assert torch.equal(back.cu_seqlens, want.cu_seqlens)
    assert torch.equal(back.valid_mask, want.valid_mask)
    return records


# Issue 14's combinations (and each parallelism alone), 8 decoder layers, dense layers 0 and 6.
COMBOS = {
    "dp2": {"dp": 2},
    "tp2": {"tp": 2},
    "tp2_sp": {"tp": 2, "sequence_parallel": True},
    "ep2": {"dp": 2, "ep": 2},
    "cp2_zigzag": {"cp": 2},
    "tp2_pp2": {"tp": 2, "pp": 2},
    "ep2_pp2": {"dp": 2, "ep": 2, "pp": 2},
    "tp2_ep2_dp2_etp1": {"tp": 2, "dp": 2, "ep": 2, "etp": 1},
    "pp2_vpp2_ep2": {"pp": 2, "vpp": 2, "dp": 2, "ep": 2},
    "tp2_sp_cp2_pp2": {"tp": 2, "sequence_parallel": True, "cp": 2, "pp": 2},
}


@pytest.mark.parametrize("fmt", ["thd", "sbhd"])
@pytest.mark.parametrize("name", list(COMBOS))
def test_combinations_round_trip(name, fmt):
    kw = dict(COMBOS[name])
    lens = [5, 9, 1, 12, 7, 3, 8, 4]
    extra = {"seq_length": 16} if fmt == "sbhd" else {}
    layout = par.ParallelLayout(micro_batch_size=2, format=fmt, **kw, **extra)
    moe = {1, 2, 3, 4, 5, 7}
    trace = _trace(lens, layer_ids=sorted(moe), seed=len(name))
    _round_trip(trace, layout, 8, moe)


def test_a_stage_without_moe_layers_gets_none():
    layout = par.ParallelLayout(micro_batch_size=1, pp=2)
    trace = _trace([4, 6], layer_ids=[4, 5])  # layers 0-3 (stage 0) are dense
    ids0 = _stage_layers(trace.layer_ids, 6 + 2, layout, 0, {4, 5})
    assert ids0 == [] and par.slice_for_rank(trace, layout, layout.coords(0), layer_ids=ids0) is None
    records = _round_trip(trace, layout, 8, {4, 5})
    assert {c.pp for c in records} == {1}


@FAST
@given(
    lens=st.lists(st.integers(0, 13), min_size=1, max_size=4),
    cp=st.sampled_from([1, 2, 3]),
    tp=st.sampled_from([1, 2, 3]),
    mode=st.sampled_from(["zigzag", "contiguous"]),
    sp=st.booleans(),
    pad_mult=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
def test_thd_rows_are_the_existing_layouts(lens, cp, tp, mode, sp, pad_mult, seed):
    """THD: a rank's rows are layout.shard_cp's CP shard, then layout.split_sp's SP slice."""
    base = 2 * cp if mode == "zigzag" and cp > 1 else cp
    layout = par.ParallelLayout(
        micro_batch_size=len(lens), cp=cp, cp_mode=mode, tp=tp, sequence_parallel=sp, pad_to=base * pad_mult
    )
    trace = _trace(lens, seed=seed, valid_p=0.2)
    for c in _all_ranks(layout):
        (mb,) = par.slice_for_rank(trace, layout, c, layer_ids=trace.layer_ids)
        shard = lay.shard_cp(
            trace, cp, mode="zigzag" if base == 2 * cp else "contiguous", align=base * pad_mult, rank=c.cp
        )
        if sp and tp > 1:
            shard = lay.split_sp(shard, tp, rank=c.tp)
        assert torch.equal(mb.experts, shard.experts)
        assert torch.equal(mb.valid_mask, shard.valid_mask)


@FAST
@given(
    num_mb=st.integers(1, 3),
    mbs=st.integers(1, 3),
    dp=st.integers(1, 3),
    tp=st.sampled_from([1, 2]),
    sp=st.booleans(),
    cp=st.sampled_from([1, 2]),
    pp=st.sampled_from([1, 2]),
    vpp=st.sampled_from([1, 2]),
    fmt=st.sampled_from(["thd", "sbhd"]),
    split=st.sampled_from(["contiguous", "interleaved"]),
    dense=st.sets(st.integers(0, 7), max_size=5),
    data=st.data(),
)
def test_slice_then_unslice_is_identity(num_mb, mbs, dp, tp, sp, cp, pp, vpp, fmt, split, dense, data):
    S = 4 * cp * tp
    B = num_mb * mbs * dp
    lens = data.draw(st.lists(st.integers(0, S), min_size=B, max_size=B))
    moe = set(range(8)) - dense
    if not moe:
        moe = {7}
    extra = {"seq_length": S} if fmt == "sbhd" else {}
    layout = par.ParallelLayout(
        micro_batch_size=mbs,
        dp=dp,
        tp=tp,
        sequence_parallel=sp,
        cp=cp,
        pp=pp,
        vpp=vpp,
        format=fmt,
        dp_split=split,
        **extra,
    )
    trace = _trace(lens, layer_ids=sorted(moe), seed=B, valid_p=0.1)
    _round_trip(trace, layout, 8, moe)


@FAST
@given(
    B=st.integers(1, 12),
    mbs=st.integers(1, 3),
    dp=st.integers(1, 3),
    split=st.sampled_from(["contiguous", "interleaved"]),
)
def test_micro_batches_cover_every_sequence_once(B, mbs, dp, split):
    layout = par.ParallelLayout(micro_batch_size=mbs, dp=dp, dp_split=split)
    if B % (mbs * dp):
        with pytest.raises(LayoutError, match=f"do not split into dp={dp} ranks of micro-batches of {mbs}"):
            par.micro_batch_sequences(layout, B, 0)
        return
    seen = sorted(s for r in range(dp) for mb in par.micro_batch_sequences(layout, B, r) for s in mb)
    assert seen == list(range(B))


def test_megatron_rank_order():
    layout = par.ParallelLayout(micro_batch_size=1, tp=2, cp=2, dp=2, pp=2)
    assert layout.coords(0) == par.RankCoords(dp=0, tp=0, cp=0, pp=0)
    assert layout.coords(1) == par.RankCoords(dp=0, tp=1, cp=0, pp=0)
    assert layout.coords(2) == par.RankCoords(dp=0, tp=0, cp=1, pp=0)
    assert layout.coords(4) == par.RankCoords(dp=1, tp=0, cp=0, pp=0)
    assert layout.coords(8) == par.RankCoords(dp=0, tp=0, cp=0, pp=1)


def test_sbhd_rows_are_s_major():
    layout = par.ParallelLayout(micro_batch_size=2, format="sbhd", seq_length=3)
    rows = par.router_rows(layout, [3, 2], par.RankCoords())
    # row s*B + b: (s0,b0)=0 (s0,b1)=3 (s1,b0)=1 (s1,b1)=4 (s2,b0)=2 (s2,b1)=padding
    assert rows.tolist() == [0, 3, 1, 4, 2, -1]


def test_errors_name_the_problem():
    with pytest.raises(LayoutError, match=r"ep \* etp = 4 \* 1 must divide tp \* cp \* dp = 2"):
        par.ParallelLayout(micro_batch_size=1, dp=2, ep=4)
    with pytest.raises(LayoutError, match="seq_length=6 must be a multiple of 4"):
        par.ParallelLayout(micro_batch_size=1, cp=2, format="sbhd", seq_length=6)
    layout = par.ParallelLayout(micro_batch_size=1)
    with pytest.raises(LayerMismatchError, match=r"layer\(s\) \[9\] are not in the trace"):
        par.slice_for_rank(_trace([3]), layout, par.RankCoords(), layer_ids=[0, 9])
    with pytest.raises(LayoutError, match="sequence 0 has 5 tokens, more than seq_length=4"):
        par.router_rows(par.ParallelLayout(micro_batch_size=1, format="sbhd", seq_length=4), [5], par.RankCoords())


def test_unslice_refuses_disagreeing_tp_ranks_and_gaps():
    layout = par.ParallelLayout(micro_batch_size=1, tp=2)
    trace = _trace([4])
    recs = {c: par.slice_for_rank(trace, layout, c, layer_ids=trace.layer_ids) for c in _all_ranks(layout)}
    bad = recs[layout.coords(1)][0]
    e = bad.experts.clone()
    e[2, 1] = e[2, 1].roll(1)
    recs[layout.coords(1)] = [bad.replace(check=False, experts=e)]
    with pytest.raises(LayoutError, match=r"layer 1, global row 2: rank RankCoords\(dp=0, tp=0, cp=0, pp=0\) recorded"):
        par.unslice(recs, layout, seq_lens=[4])
    only_layer0 = {layout.coords(0): [recs[layout.coords(0)][0].select_layers([0])]}
    with pytest.raises(LayoutError, match=r"layer 1: global row 0 \(sequence 0, position 0\) was recorded by no rank"):
        par.unslice(only_layer0, layout, seq_lens=[4], layer_ids=[0, 1])
