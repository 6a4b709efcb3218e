"""Tests of routereplay.core.layout: every conversion against its inverse, plus hand-checked layouts.

Legend: T tokens (rows), L MoE layers, K top-k slots, B sequences, S padded length, E experts.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import traces as shared_traces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routereplay import RoutingTrace
from routereplay.core import layout as lo
from routereplay.core.errors import ExpertIdError, LayoutError

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# 8 and 64 experts store as uint8, 300 as int16, 40000 as int32.
NUM_EXPERTS = [8, 64, 300, 40000]


def make_trace(lens, L=2, K=2, E=8, *, valid=False, gates=False, seed=0) -> RoutingTrace:
    """A random valid trace: distinct ids per row, ~20 % invalid rows when ``valid``."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    step = E // 8
    # K distinct slots out of 8, each mapped into its own band of E // 8 ids: distinct and < E.
    slot_TLK = torch.rand(T, L, 8, generator=g).argsort(-1)[..., :K]
    experts_TLK = slot_TLK * step + torch.randint(0, step, (T, L, 1), generator=g)
    return RoutingTrace(
        experts=experts_TLK,
        cu_seqlens=torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()]),
        layer_ids=tuple(range(1, 2 * L, 2)),
        num_experts=E,
        valid=(torch.rand(T, generator=g) < 0.8) if valid else None,
        gates=torch.rand(T, L, K, generator=g) if gates else None,
        meta={"source": "test"},
    )


def traces(*, min_seqs=0, max_seqs=5, min_len=0, max_len=12):
    """This file's random traces (tests/helpers.traces): E in NUM_EXPERTS, ~20 % unknown rows or
    no mask, float32 gates or none, layer ids 1, 3, 5."""
    return shared_traces(
        min_seqs=min_seqs,
        max_seqs=max_seqs,
        min_len=min_len,
        max_len=max_len,
        num_experts=st.sampled_from(NUM_EXPERTS),
        valid=(None, 0.8),
        gates=(None, torch.float32),
    )


def assert_same(a: RoutingTrace, b: RoutingTrace) -> None:
    assert a == b, f"{a} != {b}"
    assert a.experts.dtype == b.experts.dtype
    assert (a.gates is None) == (b.gates is None)
    assert dict(a.meta) == dict(b.meta)


def random_mask(lens, S, seed) -> torch.Tensor:
    """bool [B, S] with exactly lens[b] True positions at random places in row b."""
    g = torch.Generator().manual_seed(seed)
    rank_BS = torch.rand(len(lens), S, generator=g).argsort(1).argsort(1)
    return rank_BS < torch.tensor(lens, dtype=torch.int64)[:, None]


def owns_memory(x: torch.Tensor | None) -> bool:
    return x is None or x.untyped_storage().nbytes() == x.numel() * x.element_size()


@SETTINGS
@given(runs=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 6)), max_size=8))
def test_index_ranges_and_boundaries(runs):
    from routereplay.core.index import cu_seqlens_of, ranges

    starts_G = torch.tensor([s for s, _ in runs], dtype=torch.int64)
    lens_G = torch.tensor([n for _, n in runs], dtype=torch.int64)
    want = [i for s, n in runs for i in range(s, s + n)]
    assert ranges(starts_G, lens_G).tolist() == want
    assert cu_seqlens_of(lens_G).tolist() == [sum(n for _, n in runs[:i]) for i in range(len(runs) + 1)]


# --- padded <-> packed -------------------------------------------------------------------------
@SETTINGS
@given(trace=traces(), side=st.sampled_from(["left", "right"]), extra=st.integers(0, 3), pad_value=st.integers(0, 7))
def test_padded_round_trip(trace, side, extra, pad_value):
    longest = int(trace.seq_lens.max()) if trace.num_seqs else 0
    padded = lo.unpack_to_padded(trace, padding_side=side, max_len=longest + extra, pad_value=pad_value)
    B, S = padded.attention_mask_BS.shape
    assert (B, S) == (trace.num_seqs, longest + extra)
    assert padded.attention_mask_BS.sum(1).tolist() == trace.seq_lens.tolist()
    assert bool((padded.experts_BSLK[~padded.attention_mask_BS] == pad_value).all())
    assert (padded.valid_BS is None) == (trace.valid is None)
    args = {
        "layer_ids": trace.layer_ids,
        "num_experts": trace.num_experts,
        "gates_BSLK": padded.gates_BSLK,
        "valid_BS": padded.valid_BS,
        "meta": dict(trace.meta),
    }
    assert_same(lo.pack_padded(padded.experts_BSLK, padded.attention_mask_BS, **args), trace)
    assert_same(lo.pack_padded(padded.experts_BSLK, padded.attention_mask_BS, validate=False, **args), trace)


@SETTINGS
@given(B=st.integers(0, 4), S=st.integers(0, 9), E=st.sampled_from(NUM_EXPERTS), seed=st.integers(0, 2**31 - 1))
def test_pack_mask_with_holes_round_trip(B, S, E, seed):
    g = torch.Generator().manual_seed(seed)
    mask_BS = torch.rand(B, S, generator=g) < 0.6
    dense = make_trace([S] * B, L=2, K=2, E=E, seed=seed)  # B*S distinct-id rows
    experts_BSLK = dense.experts.view(B, S, 2, 2)
    trace = lo.pack_padded(experts_BSLK, mask_BS.int(), layer_ids=(1, 3), num_experts=E)
    assert trace.seq_lens.tolist() == mask_BS.sum(1).tolist()
    # The flattened [B*S] rows an HF router sees pack to the same trace.
    assert_same(lo.pack_padded(experts_BSLK.reshape(B * S, 2, 2), mask_BS, layer_ids=(1, 3), num_experts=E), trace)
    padded = lo.unpack_to_padded(trace, attention_mask_BS=mask_BS, pad_value=5)
    assert torch.equal(padded.experts_BSLK[mask_BS], experts_BSLK[mask_BS])
    assert bool((padded.experts_BSLK[~mask_BS] == 5).all())
    assert_same(lo.pack_padded(padded.experts_BSLK, mask_BS, layer_ids=(1, 3), num_experts=E), trace)


@SETTINGS
@given(trace=traces(), extra=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_router_rows_round_trip(trace, extra, seed):
    lens = trace.seq_lens.tolist()
    S = max(lens, default=0) + extra
    mask_BS = random_mask(lens, S, seed)
    rows = lo.to_router_rows(trace, mask_BS)
    assert rows.num_tokens == trace.num_seqs * S
    assert rows.cu_seqlens.tolist() == [b * S for b in range(trace.num_seqs + 1)]
    assert not bool(rows.valid_mask[~mask_BS.reshape(-1)].any())  # padding rows are invalid
    assert torch.equal(rows.experts.view(trace.num_seqs, S, trace.num_layers, trace.top_k)[mask_BS], trace.experts)
    assert_same(lo.from_router_rows(rows, mask_BS), trace)


def test_pack_padded_validates_ids_unless_told_not_to():
    experts_BSLK = torch.tensor([[[[1, 2]], [[3, 9]]]])  # id 9 with 8 experts, at [0, 1]
    mask_BS = torch.tensor([[True, True]])
    with pytest.raises(ExpertIdError, match=r"expert id 9 at row 1 \(sequence 0, position 1\), layer 4, slot 1"):
        lo.pack_padded(experts_BSLK, mask_BS, layer_ids=[4], num_experts=8)
    # validate=False skips the id scan, but invalid rows are still stored as zeros.
    t = lo.pack_padded(
        experts_BSLK, mask_BS, layer_ids=[4], num_experts=8, valid_BS=torch.tensor([[1, 0]]), validate=False
    )
    assert t.experts.dtype == torch.uint8 and t.experts.flatten().tolist() == [1, 2, 0, 0]


# --- micro-batches -----------------------------------------------------------------------------
@SETTINGS
@given(trace=traces(min_seqs=1, max_seqs=8), data=st.data(), balance=st.sampled_from(["tokens", "sequences"]))
def test_micro_batches_by_count_round_trip(trace, data, balance):
    n = data.draw(st.integers(1, trace.num_seqs))
    parts = lo.split_micro_batches(trace, n, balance=balance)
    assert len(parts) == n and all(p.num_seqs >= 1 for p in parts)
    if balance == "sequences":
        sizes = [p.num_seqs for p in parts]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert_same(lo.join_micro_batches(parts), trace)


@SETTINGS
@given(trace=traces(max_seqs=8), slack=st.integers(0, 20))
def test_micro_batches_by_budget_round_trip(trace, slack):
    budget = max(int(trace.seq_lens.max()) if trace.num_seqs else 0, 1) + slack
    parts = lo.split_micro_batches(trace, max_tokens=budget)
    assert all(p.num_tokens <= budget for p in parts)
    # Greedy: the next micro-batch's first sequence would not have fitted.
    for a, b in itertools.pairwise(parts):
        assert a.num_tokens + int(b.seq_lens[0]) > budget
    assert_same(lo.join_micro_batches(parts), trace)


def test_micro_batches_by_tokens_balance():
    trace = make_trace([10, 1, 1, 10, 1, 1])
    assert [p.seq_lens.tolist() for p in lo.split_micro_batches(trace, 2)] == [[10, 1, 1], [10, 1, 1]]
    # A dominant sequence still leaves one sequence to every micro-batch.
    trace = make_trace([100, 1, 1])
    assert [p.seq_lens.tolist() for p in lo.split_micro_batches(trace, 3)] == [[100], [1], [1]]


# --- sequence parallel -------------------------------------------------------------------------
@SETTINGS
@given(trace=traces(), world=st.integers(1, 4))
def test_sp_round_trip(trace, world):
    shards = lo.split_sp(trace, world)
    n = math.ceil(trace.num_tokens / world)
    assert len(shards) == world and all(s.num_tokens == n and s.num_seqs == trace.num_seqs for s in shards)
    assert all(owns_memory(s.experts) for s in shards)
    rows = torch.cat([s.experts for s in shards])
    assert torch.equal(rows[: trace.num_tokens], trace.experts)
    pad_valid = torch.cat([s.valid_mask for s in shards])[trace.num_tokens :]
    assert not bool(pad_valid.any()) and not bool(rows[trace.num_tokens :].any())
    assert_same(lo.gather_sp(shards, num_tokens=trace.num_tokens), trace)
    for r in range(world):  # one rank's shard alone is the same shard
        assert_same(lo.split_sp(trace, world, rank=r), shards[r])


# --- context parallel --------------------------------------------------------------------------
def reference_cp(trace: RoutingTrace, cp: int, mode: str, align: int) -> list[dict]:
    """Per-sequence loop written straight from the Megatron / verl description."""
    C = 2 * cp if mode == "zigzag" else cp
    out = [{"experts": [], "valid": [], "gates": [], "lens": []} for _ in range(cp)]
    cu = trace.cu_seqlens.tolist()
    for b in range(trace.num_seqs):
        n = cu[b + 1] - cu[b]
        P = -(-n // align) * align
        c = P // C
        pad = P - n
        e = torch.cat([trace.experts[cu[b] : cu[b + 1]], trace.experts.new_zeros(pad, *trace.experts.shape[1:])])
        v = torch.cat([trace.valid_mask[cu[b] : cu[b + 1]], torch.zeros(pad, dtype=torch.bool)])
        gt = (
            None
            if trace.gates is None
            else torch.cat([trace.gates[cu[b] : cu[b + 1]], trace.gates.new_zeros(pad, *trace.gates.shape[1:])])
        )
        for r in range(cp):
            held = [r, 2 * cp - 1 - r] if mode == "zigzag" else [r]
            out[r]["experts"] += [e[j * c : (j + 1) * c] for j in held]
            out[r]["valid"] += [v[j * c : (j + 1) * c] for j in held]
            if gt is not None:
                out[r]["gates"] += [gt[j * c : (j + 1) * c] for j in held]
            out[r]["lens"].append(P // cp)
    return out


@SETTINGS
@given(trace=traces(), cp=st.integers(1, 4), mode=st.sampled_from(["zigzag", "contiguous"]), mult=st.integers(1, 3))
def test_cp_round_trip_and_reference(trace, cp, mode, mult):
    align = (2 * cp if mode == "zigzag" else cp) * mult
    shards = lo.shard_cp(trace, cp, mode=mode, align=align)
    assert len(shards) == cp
    for r, (s, ref) in enumerate(zip(shards, reference_cp(trace, cp, mode, align))):
        L, K = trace.num_layers, trace.top_k
        assert torch.equal(s.experts, torch.cat([trace.experts.new_zeros(0, L, K), *ref["experts"]])), f"rank {r}"
        assert torch.equal(s.valid_mask, torch.cat([torch.zeros(0, dtype=torch.bool), *ref["valid"]]))
        assert s.seq_lens.tolist() == ref["lens"]
        if trace.gates is not None:
            assert torch.equal(s.gates, torch.cat([trace.gates.new_zeros(0, L, K), *ref["gates"]]))
        assert owns_memory(s.experts) and owns_memory(s.gates)
    assert_same(lo.unshard_cp(shards, cu_seqlens=trace.cu_seqlens, mode=mode), trace)
    for r in range(cp):  # one rank's shard alone is the same shard
        assert_same(lo.shard_cp(trace, cp, mode=mode, align=align, rank=r), shards[r])
    # Shards gathered into one buffer (all_gather_into_tensor + split) are read in place.
    buf = torch.cat([s.experts for s in shards])
    views = (
        [s.replace(check=False, experts=x) for s, x in zip(shards, buf.split(shards[0].num_tokens))]
        if buf.numel()
        else shards
    )
    assert_same(lo.unshard_cp(views, cu_seqlens=trace.cu_seqlens, mode=mode), trace)


def token_trace(lens) -> RoutingTrace:
    """One layer, top-1, expert id = token index: shards can be read off by eye."""
    T = sum(lens)
    return RoutingTrace(
        experts=torch.arange(T).view(T, 1, 1),
        cu_seqlens=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]),
        layer_ids=[0],
        num_experts=64,
    )


def rank_rows(shards):
    return [s.experts.flatten().tolist() for s in shards]


def test_zigzag_hand_checked():
    # 8 tokens, cp=2: 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
    shards = lo.shard_cp(token_trace([8]), 2)
    assert rank_rows(shards) == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert [s.cu_seqlens.tolist() for s in shards] == [[0, 4], [0, 4]]
    assert all(s.valid is None for s in shards)  # no padding, no mask
    # cp=4: 8 chunks of 1; rank r holds r and 7-r.
    assert rank_rows(lo.shard_cp(token_trace([8]), 4)) == [[0, 7], [1, 6], [2, 5], [3, 4]]
    # 8 + 3 tokens, cp=2: the second sequence pads to 4 (chunks of 1): rank 0 gets 8 and padding.
    shards = lo.shard_cp(token_trace([8, 3]), 2)
    assert rank_rows(shards) == [[0, 1, 6, 7, 8, 0], [2, 3, 4, 5, 9, 10]]
    assert [s.cu_seqlens.tolist() for s in shards] == [[0, 4, 6], [0, 4, 6]]
    assert [s.valid_mask.tolist() for s in shards] == [[True] * 5 + [False], [True] * 6]
    # verl-style alignment tp*cp*2 with tp=2: 7 tokens pad to 8, chunks of 2.
    shards = lo.shard_cp(token_trace([7]), 2, align=8)
    assert rank_rows(shards) == [[0, 1, 6, 0], [2, 3, 4, 5]]


def test_contiguous_hand_checked():
    assert rank_rows(lo.shard_cp(token_trace([8]), 2, mode="contiguous")) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    shards = lo.shard_cp(token_trace([5, 0, 2]), 2, mode="contiguous")
    assert rank_rows(shards) == [[0, 1, 2, 5], [3, 4, 0, 6]]
    assert [s.cu_seqlens.tolist() for s in shards] == [[0, 3, 3, 4], [0, 3, 3, 4]]
    assert lo.cp_padded_seq_lens(torch.tensor([5, 0, 2]), 2, mode="contiguous").tolist() == [6, 0, 2]


# --- engine rows <-> training rows -------------------------------------------------------------
@SETTINGS
@given(trace=traces())
def test_engine_training_round_trip(trace):
    train = lo.engine_to_training(trace)
    assert train.seq_lens.tolist() == [n + 1 for n in trace.seq_lens.tolist()]
    last = train.cu_seqlens[1:] - 1
    assert not bool(train.valid_mask[last].any()) and not bool(train.experts[last].any())
    assert_same(lo.training_to_engine(train), trace)


@SETTINGS
@given(trace=traces(min_len=1))
def test_training_to_engine_drop_valid_last(trace):
    engine = lo.training_to_engine(trace, drop_valid_last=True)
    assert engine.seq_lens.tolist() == [n - 1 for n in trace.seq_lens.tolist()]
    # Back to training rows: the same trace with each sequence's last row now unknown.
    last = trace.cu_seqlens[1:] - 1
    valid = trace.valid_mask.clone()
    valid[last] = False
    experts = trace.experts.clone()
    experts[last] = 0
    gates = None if trace.gates is None else trace.gates.clone()
    if gates is not None:
        gates[last] = 0
    assert_same(lo.engine_to_training(engine), trace.replace(check=False, experts=experts, valid=valid, gates=gates))


# --- bad inputs --------------------------------------------------------------------------------
def test_unpack_mask_count_mismatch_names_sequence():
    trace = token_trace([2, 3])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    with pytest.raises(
        LayoutError, match=r"sequence 1: attention_mask_BS has 2 True positions but the trace has 3 rows"
    ):
        lo.unpack_to_padded(trace, attention_mask_BS=mask)
    with pytest.raises(LayoutError, match=r"attention_mask_BS has 1 rows but the trace has 2 sequences"):
        lo.to_router_rows(trace, mask[:1])
    with pytest.raises(LayoutError, match=r"must hold only 0 and 1, found 2 at \[0, 1\]"):
        lo.unpack_to_padded(trace, attention_mask_BS=torch.tensor([[1, 2, 0], [1, 1, 1]]))
    with pytest.raises(LayoutError, match=r"give either attention_mask_BS, or padding_side/max_len"):
        lo.unpack_to_padded(trace, attention_mask_BS=mask, padding_side="left")


def test_unpack_bad_arguments():
    trace = token_trace([2, 5])
    with pytest.raises(LayoutError, match=r"max_len=4 is shorter than sequence 1 \(5 tokens\); pass max_len >= 5"):
        lo.unpack_to_padded(trace, max_len=4)
    with pytest.raises(LayoutError, match=r"padding_side must be 'left' or 'right', found 'middle'"):
        lo.unpack_to_padded(trace, padding_side="middle")
    with pytest.raises(LayoutError, match=r"pad_value=-1 does not fit the trace's torch.uint8 ids \[0, 255\]"):
        lo.unpack_to_padded(trace, pad_value=-1)


def test_pack_padded_shape_mismatch():
    with pytest.raises(
        LayoutError, match=r"experts_BSLK has shape \(2, 3, 1, 1\); with an attention mask of shape \(2, 4\)"
    ):
        lo.pack_padded(
            torch.zeros(2, 3, 1, 1, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), layer_ids=[0], num_experts=8
        )
    with pytest.raises(LayoutError, match=r"attention_mask_BS must be bool or integer 0/1, found dtype torch.float32"):
        lo.pack_padded(torch.zeros(2, 4, 1, 1, dtype=torch.long), torch.ones(2, 4), layer_ids=[0], num_experts=8)
    with pytest.raises(LayoutError, match=r"the trace has 5 rows but attention_mask_BS of shape \(2, 3\) covers 6"):
        lo.from_router_rows(token_trace([5]), torch.ones(2, 3, dtype=torch.bool))


def test_micro_batch_errors_name_the_sequence():
    trace = token_trace([3, 4, 9, 1])
    with pytest.raises(LayoutError, match=r"sequence 2 has 9 tokens, more than max_tokens=5; .* at least 9"):
        lo.split_micro_batches(trace, max_tokens=5)
    with pytest.raises(LayoutError, match=r"cannot split 4 sequences into 5 micro-batches"):
        lo.split_micro_batches(trace, 5)
    with pytest.raises(LayoutError, match=r"pass exactly one of num_micro_batches or max_tokens"):
        lo.split_micro_batches(trace, 2, max_tokens=10)


def test_gather_sp_errors():
    trace = token_trace([3, 4])
    shards = lo.split_sp(trace, 4)  # 7 tokens: 4 shards of 2 rows, the last row padding
    with pytest.raises(LayoutError, match=r"4 shards of 2 rows do not come from a trace of num_tokens=4"):
        lo.gather_sp(shards, num_tokens=4)
    with pytest.raises(LayoutError, match=r"shard 3, row 0 lies in the padding past num_tokens=6 but is marked valid"):
        lo.gather_sp(shards, num_tokens=6)  # row 6 is a real token: 7 tokens were split
    with pytest.raises(LayoutError, match=r"world must be an int >= 1, found 0"):
        lo.split_sp(trace, 0)


# (trace, shards): token_trace([8, 3]) and its zigzag shards for cp=2
CP_ERRORS = [
    pytest.param(
        lambda trace, shards: lo.unshard_cp(shards, cu_seqlens=torch.tensor([0, 9, 11])),
        LayoutError,
        r"sequence 0: cu_seqlens gives it 9 tokens but the 2 shards hold 8 rows",
        id="tokens-beyond-shards",
    ),
    pytest.param(
        lambda trace, shards: lo.unshard_cp(shards, cu_seqlens=torch.tensor([0, 7, 10])),
        LayoutError,
        r"shard 0, row 3 \(sequence 0\) is padding for the given cu_seqlens but is marked valid",
        id="valid-row-as-padding",
    ),
    pytest.param(
        lambda trace, shards: lo.unshard_cp(shards, cu_seqlens=torch.tensor([0, 11])),
        LayoutError,
        r"cu_seqlens describes 1 sequences but the shards hold 2",
        id="sequence-count",
    ),
    pytest.param(
        lambda trace, shards: lo.unshard_cp(
            lo.shard_cp(token_trace([3]), 3, mode="contiguous"), cu_seqlens=torch.tensor([0, 3])
        ),
        LayoutError,
        r"sequence 0 has 1 rows on each rank; zigzag shards hold two equal chunks",
        id="contiguous-as-zigzag",
    ),
    pytest.param(
        lambda trace, shards: lo.shard_cp(trace, 2, align=6),
        LayoutError,
        r"align=6 must be a multiple of 4 \(2\*cp for zigzag with cp=2\)",
        id="align",
    ),
    pytest.param(
        lambda trace, shards: lo.shard_cp(trace, 2, rank=2),
        LayoutError,
        r"rank must be an int in \[0, 2\) for cp=2, found 2",
        id="rank",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), CP_ERRORS)
def test_unshard_cp_errors(call, error, match):
    trace = token_trace([8, 3])
    shards = lo.shard_cp(trace, 2)
    with pytest.raises(error, match=match):
        call(trace, shards)


def test_training_to_engine_refuses_to_drop_routes():
    trace = token_trace([4, 2])
    with pytest.raises(
        LayoutError, match=r"sequence 0: its last row \(row 3\) has a recorded route.*drop_valid_last=True"
    ):
        lo.training_to_engine(trace)
    with pytest.raises(LayoutError, match=r"sequence 1 has no rows; a training trace has one row per token"):
        lo.training_to_engine(token_trace([2, 0]), drop_valid_last=True)
