"""Work that must stay linear at the scale of a real RL step (issue 23), pinned by counting bytes
written, not by timing: RouteStore and RouteAccumulator never copy the rows they already hold,
and a validated load makes no copy of the ids beyond reading the file once.

Every count comes from a TorchDispatchMode that sums the bytes each aten op writes: the whole
output of an op that allocates, the written tensor of an in-place or ``out=`` op; views write
nothing.

Legend: T tokens, L MoE layers, K top-k slots, B sequences.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import routereplay.core.io as rio
from routereplay.core.errors import LayoutError, MissingRoutesError, TraceMismatchError
from routereplay.core.trace import RoutingTrace
from routereplay.formats import RouteAccumulator, accumulate
from routereplay.rl.store import RouteStore

L, K, E = 4, 2, 16


class BytesWritten(TorchDispatchMode):
    """Sums the bytes every aten op dispatched inside writes."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        results = out if isinstance(out, tuple | list) else (out,)
        for ret, res in zip(func._schema.returns, results):
            alias = ret.alias_info
            if alias is not None and not alias.is_write:
                continue  # a view
            for t in tree_leaves(res):
                if isinstance(t, torch.Tensor):
                    self.nbytes += t.numel() * t.element_size()
        return out


def test_bytes_written_counts_copies_not_views():
    """The counter itself: a clone writes its bytes, a view none, an in-place copy its target."""
    x = torch.zeros(1000, dtype=torch.uint8)
    with BytesWritten() as w:
        x[10:20].view(torch.uint8)
    assert w.nbytes == 0
    with BytesWritten() as w:
        x.clone()
    assert w.nbytes == 1000
    with BytesWritten() as w:
        x[:100].copy_(torch.ones(100, dtype=torch.uint8))  # ones writes 100 too
    assert w.nbytes == 200


def _trace(lens, seed=0, *, valid=False):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    experts = torch.rand(T, L, E, generator=g).argsort(-1)[..., :K]
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int64)
    valid_T = None
    if valid:
        valid_T = torch.ones(T, dtype=torch.bool)
        valid_T[cu[1:][torch.tensor(lens) > 0] - 1] = False
    return RoutingTrace(experts=experts, cu_seqlens=cu, layer_ids=range(L), num_experts=E, valid=valid_T,
                        meta={"source": "test", "piece": str(seed)})


class _Recording:
    num_forwards = 1

    def __init__(self, trace):
        self._trace = trace

    def trace(self, attention_mask=None):
        return self._trace

    def sequence_boundaries(self):
        return None


class _Handle:
    """What RouteStore.record uses of a RouterHandle: a record() block whose recording gives the
    forward's trace (here a prepared one, so that only the store's own work is counted)."""

    def __init__(self):
        self.next = None

    @contextmanager
    def record(self):
        yield _Recording(self.next)


def _fill(store, handle, pieces, ids):
    for piece, ids_B in zip(pieces, ids):
        handle.next = piece
        with store.record(ids_B, cu_seqlens=piece.cu_seqlens):
            pass


# --- RouteStore ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_micro_batches", [8, 64])
def test_route_store_recording_copies_nothing(num_micro_batches):
    """Issue 23.1: recording micro-batch k used to copy the k-1 held before it (quadratic)."""
    handle = _Handle()
    pieces = [_trace([5, 3], seed=i, valid=True) for i in range(num_micro_batches)]
    ids = [[2 * i, 2 * i + 1] for i in range(num_micro_batches)]
    store = RouteStore(handle)
    with BytesWritten() as w:
        _fill(store, handle, pieces, ids)
    held = sum(p.nbytes for p in pieces)
    # Only the small per-call tensors (sample ids, boundaries): 16-ish bytes per sample, no routes.
    assert w.nbytes <= 64 * 2 * num_micro_batches, (w.nbytes, held)
    order = [i for pair in reversed(ids) for i in pair]
    with BytesWritten() as w:
        got = store.trace(order)
    assert w.nbytes <= 1.05 * held + 64 * len(order)  # one copy of the selected rows, from several pieces
    full = RoutingTrace.concat(pieces)
    want = full.select_sequences(order)
    assert got == want.replace(check=False, meta={"source": "test"})


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    gates=st.booleans(),
)
def test_route_store_selection_equals_a_slice_of_the_concatenation(lens, seed, gates):
    """Whatever the split into micro-batches and the order asked for: the rows of concat(pieces)."""
    handle = _Handle()
    pieces = [_trace(ls, seed=seed + i, valid=bool(i % 2)) for i, ls in enumerate(lens)]
    if gates:
        pieces = [p.replace(check=False, gates=torch.rand(p.experts.shape)) for p in pieces]
    n = sum(p.num_seqs for p in pieces)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    ids, at = [], 0
    for p in pieces:
        ids.append([10**12 + 7 * i for i in perm[at : at + p.num_seqs]])
        at += p.num_seqs
    store = RouteStore(handle)
    _fill(store, handle, pieces, ids)
    assert store.sample_ids == sorted(i for ids_B in ids for i in ids_B)
    flat_ids = [i for ids_B in ids for i in ids_B]
    ask = [flat_ids[i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()]
    ask = ask[: max(1, n // 2)]
    want = RoutingTrace.concat(pieces).select_sequences([flat_ids.index(i) for i in ask])
    assert store.trace(ask) == want  # meta: the entries every piece agrees on, as concat keeps


def test_route_store_memory_follows_samples_not_ids():
    """Issue 20.10: ids up to 2**62 cost what two samples cost (a dense table would need 2**65 bytes)."""
    trace = _trace([300, 200])
    big = [5 * 10**7, 2**62]
    store = RouteStore(None, trace, sample_ids=big)
    assert store.sample_ids == big
    assert store.trace([2**62]) == trace.select_sequences([1])
    with BytesWritten() as w:
        store.trace([2**62, 5 * 10**7])
    # The selected rows once, plus row indices (int64 per row), nothing per id value.
    assert w.nbytes <= trace.nbytes + 40 * trace.num_tokens


def test_route_store_refuses_pieces_of_another_model():
    handle = _Handle()
    store = RouteStore(handle)
    _fill(store, handle, [_trace([2])], [[0]])
    other = RoutingTrace(experts=torch.zeros(2, L, K + 1, dtype=torch.long) + torch.arange(K + 1),
                         cu_seqlens=[0, 2], layer_ids=range(L), num_experts=E)
    msg = r"samples \[1\] have routes with top_k=3 but the store holds top_k=2; one store holds the routes of one model"
    with pytest.raises(TraceMismatchError, match=msg):
        _fill(store, handle, [other], [[1]])
    gated = _trace([2], seed=3).replace(check=False, gates=torch.rand(2, L, K))
    msg = r"samples \[2\] have gates but the store lacks them; give gates to all samples or none"
    with pytest.raises(TraceMismatchError, match=msg):
        _fill(store, handle, [gated], [[2]])
    assert store.sample_ids == [0]
    with pytest.raises(LayoutError, match=r"sample\(s\) \[0\] already have routes in this store"):
        _fill(store, handle, [_trace([2])], [[0]])
    msg = r"this store holds no routes yet; record them \(store.record\) or build it from a rollout trace"
    with pytest.raises(MissingRoutesError, match=msg):
        RouteStore(handle).trace([])


# --- RouteAccumulator ----------------------------------------------------------------------
def _conversation(turns, rows_per_turn=6, seed=0):
    """Payloads of a multi-turn conversation: each turn asks for rows from the rows held."""
    g = torch.Generator().manual_seed(seed)
    R = turns * rows_per_turn
    rows = torch.rand(R, L, E, generator=g).argsort(-1)[..., :K].to(torch.int32)
    return rows, [(rows[t * rows_per_turn : (t + 1) * rows_per_turn].numpy(), t * rows_per_turn) for t in range(turns)]


def test_accumulator_cost_per_row_does_not_grow_with_turns():
    """Issue 23.1: turn k used to copy the rows of turns 1..k-1 again (quadratic: 6.3x the cost per
    row from 8 to 512 turns). Now the bytes written per row are the same at 8 and 64 turns."""
    per_row = {}
    for turns in (8, 64):
        rows, payloads = _conversation(turns)
        acc = RouteAccumulator(num_experts=E)
        with BytesWritten() as w:
            for arr, start in payloads:
                acc.add(arr, start=start, num_tokens=start + arr.shape[0] + 1)
            trace = acc.trace()
        assert torch.equal(trace.experts, rows.to(torch.uint8))
        per_row[turns] = w.nbytes / rows.shape[0]
    assert per_row[64] <= 1.05 * per_row[8], per_row


def test_accumulator_join_frees_each_chunk_once_copied():
    """Issue 23.1 (peak): trace() joins the turns' chunks into one tensor and lets each chunk go
    as soon as it is copied, so the join holds the rows plus one chunk, not twice the rows."""
    import weakref

    rows, payloads = _conversation(8)
    acc = RouteAccumulator(num_experts=E)
    for arr, start in payloads:
        acc.add(arr, start=start, num_tokens=start + arr.shape[0] + 1)
    chunks = [weakref.ref(c) for c, _ in acc._chunks]
    assert len(chunks) == 8 and all(c() is not None for c in chunks)
    alive = []

    class Watch(TorchDispatchMode):  # at each copy into the joined tensor: the chunks still alive
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                alive.append(sum(c() is not None for c in chunks))
            return func(*args, **(kwargs or {}))

    with Watch():
        trace = acc.trace()
    assert torch.equal(trace.experts, rows.to(torch.uint8))
    assert alive == list(range(8, 0, -1)), alive  # chunk i is gone before chunk i + 1 is copied
    assert all(c() is None for c in chunks)


def test_accumulator_overlap_fill_does_not_touch_earlier_traces():
    """A held row without a route is filled from a later payload; traces returned before keep theirs."""
    rows, _ = _conversation(2)
    acc = RouteAccumulator(num_experts=E, missing="invalid")
    first = rows[:6].clone()
    first[2] = -1  # no route for row 2 in the first payload
    acc.add(first.numpy(), num_tokens=7)
    before = acc.trace()
    acc.add(rows.numpy(), num_tokens=13)  # a resumed attempt sends every row again
    after = acc.trace()
    assert before.valid.tolist() == [True, True, False, True, True, True]
    assert after.valid is None and torch.equal(after.experts, rows.to(torch.uint8))
    assert before.experts[2].tolist() == [[0, 0]] * L


@contextmanager
def _block_bytes(nbytes):
    """RouteAccumulator's block size set to ``nbytes`` inside (0: every payload keeps its own tensor)."""
    old = accumulate._BLOCK_BYTES
    accumulate._BLOCK_BYTES = nbytes
    try:
        yield
    finally:
        accumulate._BLOCK_BYTES = old


def _accumulate(payloads):
    acc = RouteAccumulator(num_experts=E)
    for arr, start in payloads:
        acc.add(arr, start=start, num_tokens=start + arr.shape[0] + 1)
    return acc


def _allocations(acc):
    """The distinct allocations the accumulator's chunks view: ``{address: bytes}``."""
    return {c.untyped_storage().data_ptr(): c.untyped_storage().nbytes() for c, _ in acc._chunks}


def test_accumulator_packs_small_payloads_into_few_blocks():
    """Issue 23.1 (peak): 512 turns of 6 rows held as 512 allocations of 48 bytes would sit on the
    malloc heap, whose freed pages stay resident, so the join still peaked at 2x the rows. Their rows
    are copied into blocks that grow with the rows held up to _BLOCK_BYTES: a few allocations, each
    returned whole once the join has copied it."""
    block, per, turns = 1024, 6, 512
    row_bytes = L * K  # uint8 ids
    with _block_bytes(block):
        rows, payloads = _conversation(turns, per)
        acc = _accumulate(payloads)
        sizes = _allocations(acc).values()
        R_bytes = rows.shape[0] * row_bytes
        # blocks of the full size, each left short by less than one payload; blocks growing to it
        full = -(-R_bytes // (block - per * row_bytes))
        growing = math.ceil(math.log2(block / (per * row_bytes))) + 1
        assert len(acc._chunks) == turns and len(sizes) <= full + growing, (len(sizes), full, growing)
        assert max(sizes) <= block and sum(sizes) <= 1.1 * R_bytes, (max(sizes), sum(sizes), R_bytes)
        assert torch.equal(acc.trace().experts, rows.to(torch.uint8))


def test_accumulator_join_releases_each_block_once_copied():
    """The join holds no block whose rows it has copied: a block goes as soon as its last chunk is
    copied (the accumulator's own reference to the block it appends to goes first), so it holds the
    joined rows plus the one block it is copying."""
    import weakref

    with _block_bytes(256):
        rows, payloads = _conversation(96)
        acc = _accumulate(payloads)
        assert all(c._base is not None for c, _ in acc._chunks)  # every chunk views a block
        block_of = [id(c._base) for c, _ in acc._chunks]
        blocks = {id(c._base): weakref.ref(c._base) for c, _ in acc._chunks}
        assert len(blocks) > 4
        seen = []

        class Watch(TorchDispatchMode):  # at each copy into the joined tensor: the blocks still alive
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten.copy_.default:
                    alive = {i for i, b in blocks.items() if b() is not None}
                    seen.append(alive == set(block_of[len(seen) :]))  # those of the chunks left to copy
                return func(*args, **(kwargs or {}))

        with Watch():
            trace = acc.trace()
    assert torch.equal(trace.experts, rows.to(torch.uint8))
    assert len(seen) == len(block_of) and all(seen), seen
    assert all(b() is None for b in blocks.values())


@pytest.mark.parametrize(("block", "copies"), [(1 << 20, 2), (8, 1)])
def test_accumulator_copies_each_id_at_most_twice(block, copies):
    """A small payload's ids are copied twice (into a block, then into the joined tensor); a payload
    of a block or more keeps its own tensor and is copied once, by the join."""

    class Copied(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.copy_.default:
                Copied.nbytes += args[0].numel() * args[0].element_size()
            return func(*args, **(kwargs or {}))

    with _block_bytes(block):
        rows, payloads = _conversation(64)
        with Copied():
            acc = _accumulate(payloads)
            trace = acc.trace()
    assert torch.equal(trace.experts, rows.to(torch.uint8))
    assert Copied.nbytes == copies * trace.experts.numel(), (Copied.nbytes, trace.experts.numel())


@pytest.mark.parametrize(("block", "at_most"), [(8, 1), (1 << 20, 2)])
def test_accumulator_keeps_no_resent_rows(block, at_most):
    """Partial-rollout resume: each attempt sends every row again (105 rows sent for 30 here). Only
    the new rows are held: copied out of a large payload (exactly the rows held), or into blocks
    (which grow with the rows held: at most twice them), never as a view keeping the payload alive."""
    rows, _ = _conversation(6, rows_per_turn=5)
    acc = RouteAccumulator(num_experts=E)
    with _block_bytes(block):
        for end in range(5, rows.shape[0] + 1, 5):
            acc.add(rows[:end].numpy(), num_tokens=end + 1)
        held = sum(_allocations(acc).values())
        assert torch.equal(acc.trace().experts, rows.to(torch.uint8))
    assert held <= at_most * rows.shape[0] * L * K, held  # uint8 ids


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 9), st.booleans(), st.integers(-1, 12), st.booleans()), min_size=1, max_size=8
    ),
    seed=st.integers(0, 2**16),
)
def test_accumulator_blocks_hold_what_chunks_hold(steps, seed):
    """Blocks change where the rows live, not which: turns and resumed attempts (whose resent rows
    differ, as after a weight update), rows without a route filled by later payloads and traces taken
    between payloads give the same traces whether every payload keeps its own tensor (block 0),
    some do (24 bytes: 3 rows) or none does."""
    g = torch.Generator().manual_seed(seed)
    src = torch.rand(80, L, E, generator=g).argsort(-1)[..., :K].to(torch.int32)
    alt = torch.rand(80, L, E, generator=g).argsort(-1)[..., :K].to(torch.int32)  # the routes recomputed
    runs = {}
    for block in (0, 24, 1 << 20):
        acc = RouteAccumulator(num_experts=E, missing="invalid")
        out = []
        with _block_bytes(block):
            for new, resend, hole, take in steps:
                held = acc.num_rows
                new = max(new, 1) if held == 0 else new
                start = 0 if resend else held
                payload = torch.cat([alt[start:held], src[held : held + new]])
                if 0 <= hole < payload.shape[0]:
                    payload[hole] = -1  # no route for this row in this payload
                acc.add(payload.numpy(), start=start, num_tokens=held + new + 1)
                if take:
                    out.append(acc.trace())
            out.append(acc.trace())
        runs[block] = [(t.experts, t.valid_mask) for t in out], acc.num_overlap_mismatches
    (a, mis_a), (b, mis_b), (c, mis_c) = runs.values()
    assert mis_a == mis_b == mis_c
    for (ea, va), (eb, vb), (ec, vc) in zip(a, b, c, strict=True):
        assert torch.equal(ea, eb) and torch.equal(ea, ec)
        assert torch.equal(va, vb) and torch.equal(va, vc)


# --- validated load ------------------------------------------------------------------------
@pytest.mark.parametrize("valid", [False, True])
def test_validated_load_writes_the_trace_once(tmp_path, valid):
    """Issue 23.3: load(validate=True) used to make two mask-gathered copies of the ids."""
    trace = _trace([40] * 50, valid=valid)
    rio.save(trace, tmp_path / "t.rrt")
    with BytesWritten() as w:
        got = rio.load(tmp_path / "t.rrt", validate=True)
    assert got == trace
    # The buffer the file is read into (allocated once: the trace), then validation's per-row
    # flags (one bool per row and layer, 1/K of the ids) and small per-sequence tensors. No copy of
    # the ids: the old load gathered the valid rows and scattered them into new zeros (2x).
    ids_bytes = trace.experts.numel()
    assert w.nbytes <= trace.nbytes + ids_bytes / K + 4096, (w.nbytes, trace.nbytes)


# --- converters and selection --------------------------------------------------------------
def test_from_vllm_copies_the_payload_once_in_the_trace_dtype():
    """Issue 23.2: payloads used to be widened to int32 (4 bytes per id) and converted again; ids in
    range are now copied once, narrowing, into the trace's uint8."""
    from routereplay.formats import from_vllm

    trace = _trace([300] * 8)
    payloads = [
        trace.experts[int(a) : int(b) - 1].numpy().astype(np.int32)
        for a, b in zip(trace.cu_seqlens[:-1], trace.cu_seqlens[1:])
    ]
    with BytesWritten() as w:
        got = from_vllm(payloads, num_experts=E)
    assert got.experts.dtype == torch.uint8
    assert torch.equal(got.experts, torch.from_numpy(np.concatenate(payloads)).to(torch.uint8))
    # the stacking copy is numpy's (not counted); what torch writes is per-row bookkeeping only
    assert w.nbytes <= 0.3 * got.experts.numel(), w.nbytes / got.experts.numel()


def test_from_verl_gathers_and_narrows_in_one_pass():
    from routereplay.formats import from_verl

    trace = _trace([300] * 8)
    B, S = 8, 300
    lens = torch.tensor([300, 150, 299, 1, 200, 300, 77, 250])
    mask = torch.arange(S)[None] < lens[:, None]
    padded = trace.experts.view(B, S, L, K).to(torch.int16)
    padded[~mask] = 0
    with BytesWritten() as w:
        got = from_verl(padded, mask, num_experts=E, last_token_routed=True)
    assert got.experts.dtype == torch.uint8
    assert torch.equal(got.experts, padded[mask].to(torch.uint8))
    T = int(lens.sum())
    # The packed rows once (uint8), plus a flag per row and per 8 bytes of the padded rows.
    assert w.nbytes <= T * L * K + padded.numel() * 2 // 8 + 16 * B * S, (w.nbytes, T * L * K)


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    pick=st.lists(st.integers(0, 7), max_size=10),
    valid=st.booleans(),
    gates=st.booleans(),
)
def test_select_sequences_paths_agree(lens, pick, valid, gates):
    """select_sequences copies slices for long sequences and gathers rows for short ones: same result."""
    import routereplay.core.trace as rt

    trace = _trace(lens, valid=valid)
    if gates:
        trace = trace.replace(check=False, gates=torch.rand(trace.experts.shape))
    idx = [i % len(lens) for i in pick]
    old = rt._MIN_RUN_ROWS
    try:
        rt._MIN_RUN_ROWS = 0  # always slices
        by_slices = trace.select_sequences(idx)
        rt._MIN_RUN_ROWS = 10**9  # always one gather
        by_rows = trace.select_sequences(idx)
    finally:
        rt._MIN_RUN_ROWS = old
    assert by_slices == by_rows
    cu = trace.cu_seqlens.tolist()
    rows = [t for i in idx for t in range(cu[i], cu[i + 1])]
    assert torch.equal(by_rows.experts, trace.experts[rows])


def test_host_prepare_checks_ids_without_wide_copies():
    """Issue 23.4: a CPU prepare widened the ids to int64 and compared every slot pair in a
    ``[L, N, K, K]`` tensor (~34 bytes per id); now the checks read the ids in place."""
    pytest.importorskip("transformers", reason="needs transformers for the tiny model")
    from helpers import random_trace, tiny_qwen3_moe

    import routereplay

    model = tiny_qwen3_moe()
    handle = routereplay.attach(model)
    try:
        S = 512
        layers = handle.layer_ids
        like = RoutingTrace(
            experts=torch.zeros(4 * S, len(layers), handle.top_k, dtype=torch.long) + torch.arange(handle.top_k),
            cu_seqlens=torch.arange(5) * S, layer_ids=layers, num_experts=handle.num_experts,
        )
        trace = random_trace(like)
        with BytesWritten() as w:
            prepared = handle.prepare(trace)
        ids = trace.experts.numel()
        # the prepared trace's own copy of the ids (issue 20.6: later edits must not reach it), then
        # per-row flags only
        assert w.nbytes <= ids * trace.experts.element_size() + 0.5 * ids, w.nbytes / ids
        # a repeated id is still found, and named, by the full check
        bad = trace.experts.clone()
        bad[700, 1, 1] = bad[700, 1, 0]
        from routereplay.core.errors import RouterSpecError

        msg = (
            r"layer 2 \(model.layers.2.mlp.gate\): forced_TK row 700 holds expert ids \[(\d+), \1\]: an expert "
            r"repeats; each row needs top_k=2 distinct experts"
        )
        with pytest.raises(RouterSpecError, match=msg):
            handle.prepare(trace.replace(check=False, experts=bad))
        del prepared
    finally:
        handle.detach()
