"""Prepared traces (``handle.prepare``): checked and laid out once, replayed many times.

CPU, tiny Qwen3-MoE of test_session. The device-side half (side-stream copy, checks read at the
block's exit, no host sync) is in tests/test_gpu.py.

Legend: B batch rows, S sequence length, T packed tokens, N router rows (B*S), L MoE layers, K top-k.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

from helpers import batch, random_trace, record, tiny_qwen3_moe

import routereplay
from routereplay.core import layout
from routereplay.core.errors import LayoutError, MissingRoutesError, ReplayError, RouterSpecError
from routereplay.core.trace import RoutingTrace
from routereplay.rl.store import RouteStore
from routereplay.runtime.replay import PreparedTrace


@pytest.fixture
def model():
    return tiny_qwen3_moe()


@pytest.fixture
def handle(model):
    h = routereplay.attach(model)
    yield h
    if h.attached and h.active is None:
        h.detach()


@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_a_prepared_trace_replays_like_the_trace_every_time(handle, model, pad):
    b = batch(pad=pad)
    mask = b["attention_mask"] if pad else None
    rec, out = record(handle, model, b)
    trace = random_trace(rec.trace(attention_mask=mask))
    with handle.replay(trace, attention_mask=mask) as rep:
        want = model(**b).logits
    prepared = handle.prepare(trace, attention_mask=mask)
    assert isinstance(prepared, PreparedTrace) and prepared.forced_LNK.dtype == torch.uint8
    for _ in range(3):  # epochs / passes over one micro-batch
        with handle.replay(prepared) as again:
            got = model(**b).logits
        assert torch.equal(got, want)
        assert again.stats == rep.stats
    assert not torch.equal(want, out)  # the trace was not the live routing: the replay forced it


def test_prepared_traces_mix_with_traces_in_a_micro_batch_list(handle, model):
    b1, b2 = batch(seed=1), batch(seed=2)
    t1 = record(handle, model, b1)[0].trace()
    t2 = record(handle, model, b2)[0].trace()
    with handle.replay([handle.prepare(t1), t2]) as rep:
        model(**b1)
        model(**b2)
    assert rep.forwards == 2 and all(s.disagreement == 0 for s in rep.stats.values())


class _Holed:
    """A right-padded batch ``b``, its recorded ``trace``, the trace with row 4 unrouted (``holes``)
    and ``holes`` prepared with missing="live" (``live``)."""

    def __init__(self, handle, model):
        self.b = batch(pad="right")
        rec, _ = record(handle, model, self.b)
        self.trace = rec.trace(attention_mask=self.b["attention_mask"])
        self.holes = self.trace.replace(check=False, valid=torch.arange(self.trace.num_tokens) != 4)
        self.live = handle.prepare(self.holes, attention_mask=self.b["attention_mask"], missing="live")


def _expert_twice_in_a_row(h: _Holed):
    bad = h.trace.replace(check=False, experts=h.trace.experts.clone())
    bad.experts[3, 1] = bad.experts[3, 1, 0]
    return bad


# (handle, h): the fixture's handle and a _Holed built on it
PREPARE_REFUSALS = [
    pytest.param(
        lambda handle, h: handle.prepare(_expert_twice_in_a_row(h), attention_mask=h.b["attention_mask"]),
        RouterSpecError,
        r"layer 2 \(model.layers.2.mlp.gate\): ",
        id="prepare-expert-twice",
    ),
    pytest.param(
        lambda handle, h: handle.prepare(h.holes, attention_mask=h.b["attention_mask"]),
        MissingRoutesError,
        r"1 row\(s\) inside their sequence have no recorded route, the first at row 4",
        id="prepare-hole",
    ),
    pytest.param(
        lambda handle, h: handle.replay(h.live, attention_mask=h.b["attention_mask"]),
        LayoutError,
        r"a PreparedTrace carries its attention mask; pass attention_mask to prepare",
        id="replay-prepared-with-mask",
    ),
    pytest.param(
        lambda handle, h: handle.replay(h.live, missing="error"),
        ReplayError,
        r'the trace was prepared with missing="live", replay asks "error"',
        id="replay-missing-differs",
    ),
    pytest.param(
        lambda handle, h: routereplay.attach(tiny_qwen3_moe()).replay(h.live),
        ReplayError,
        r"this PreparedTrace was prepared by another handle",
        id="replay-on-another-handle",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), PREPARE_REFUSALS)
def test_prepare_checks_at_once_and_replay_refuses_what_does_not_belong(handle, model, call, error, match):
    h = _Holed(handle, model)
    with pytest.raises(error, match=match):
        call(handle, h)
    with handle.replay(h.live) as rep:  # after the refusal, the hole routes live
        model(**h.b)
    assert rep.stats[2].live == 2 + 1


def test_prepare_skips_the_repeat_check_only_for_a_checked_trace(handle, model, monkeypatch):
    """A trace that passed the constructor's repeat check is not checked again (rows_checked); a
    trace built unchecked, or a checked one written in place since, is."""
    import routereplay.runtime.replay as replay_mod

    calls = []
    real = replay_mod.first_duplicate_row
    monkeypatch.setattr(replay_mod, "first_duplicate_row", lambda *a, **k: calls.append(1) or real(*a, **k))
    b = batch()
    rec, _ = record(handle, model, b)
    checked = random_trace(rec.trace())
    assert checked.rows_checked()
    handle.prepare(checked)
    assert calls == []
    handle.prepare(checked.replace(check=False, experts=checked.experts.clone()))
    assert calls == [1]
    checked.experts[3, 1] = checked.experts[3, 1, 0]  # in place, through torch: the mark is gone
    with pytest.raises(RouterSpecError, match=r"^layer 2 \(model.layers.2.mlp.gate\): forced_TK row 3 "):
        handle.prepare(checked)


def test_route_store_prepares_each_micro_batch_once(handle, model):
    b = batch(B=4, pad="left")
    store = RouteStore(handle)
    halves = [range(2), range(2, 4)]
    outs = []
    for ids in halves:  # the old-policy pass, one micro-batch per record block
        with store.record(ids, attention_mask=b["attention_mask"][ids]):
            outs.append(model(input_ids=b["input_ids"][ids], attention_mask=b["attention_mask"][ids]).logits)
    prepared = [store.prepare(ids, attention_mask=b["attention_mask"][ids]) for ids in halves]
    assert store.trace([3, 0, 2]).rows_checked()  # recorded rows, gathered across record blocks
    for _ in range(2):  # two epochs over the same micro-batches
        for ids, p, out in zip(halves, prepared, outs):
            with store.replay(p) as rep:
                got = model(input_ids=b["input_ids"][ids], attention_mask=b["attention_mask"][ids]).logits
            assert torch.equal(got, out)
            assert {s.replayed for s in rep.stats.values()} == {int(b["attention_mask"][ids].sum())}
    with pytest.raises(LayoutError, match=r"a PreparedTrace carries its attention mask"):
        store.replay(prepared[0], attention_mask=b["attention_mask"][:2])


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    extra=st.integers(0, 3),
    left=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_router_row_sources_is_to_router_rows_as_a_gather(lens, extra, left, seed):
    """The sync-free gather puts every real token's route where to_router_rows scatters it."""
    S = max(lens) + extra
    mask_BS = torch.zeros(len(lens), S, dtype=torch.bool)
    for b, n in enumerate(lens):
        if left:
            mask_BS[b, S - n :] = True
        else:
            mask_BS[b, :n] = True
    T = sum(lens)
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(T, 2, 8, generator=g).argsort(-1)[..., :3]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    trace = RoutingTrace(experts=experts, cu_seqlens=cu, layer_ids=(0, 1), num_experts=8)
    rows = layout.to_router_rows(trace, mask_BS)
    src_N, real_N, differs = layout.router_row_sources(trace.cu_seqlens, mask_BS, T)
    assert not bool(differs)
    assert torch.equal(real_N, mask_BS.reshape(-1))
    if T:
        assert torch.equal(experts.index_select(0, src_N)[real_N], rows.experts[real_N])
    short = mask_BS.clone()
    b = next((i for i, n in enumerate(lens) if n), None)
    if b is not None:
        short[b, short[b].nonzero()[0, 0]] = False  # one real token fewer than the trace's sequence
        assert bool(layout.router_row_sources(trace.cu_seqlens, short, T)[2])


def test_replay_kernel_is_checked_at_attach_and_the_cpu_replays_with_route(model, monkeypatch):
    with pytest.raises(ReplayError, match=r'replay_kernel must be "torch" or "triton", found \'cuda\''):
        routereplay.attach(model, replay_kernel="cuda")
    with monkeypatch.context() as m:
        find_spec = importlib.util.find_spec
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
        with pytest.raises(
            ReplayError,
            match=r'^replay_kernel="triton" needs triton, which is not installed: pip install '
            r'\'routereplay\[triton\]\' \(or replay_kernel="torch"\)$',
        ):
            routereplay.attach(model, replay_kernel="triton")
    b = batch()
    h = routereplay.attach(model)
    trace = record(h, model, b)[0].trace()
    with h.replay(trace):
        want = model(**b).logits
    h.detach()
    h = routereplay.attach(model, replay_kernel="triton" if importlib.util.find_spec("triton") else "torch")
    with h.replay(trace):
        assert torch.equal(model(**b).logits, want)
    assert not any(f.prepared for f in h.forced_weights)  # the fused kernel is CUDA's: CPU logits take routing.route
    h.detach()


class _Ops(TorchDispatchMode):
    """The aten ops dispatched inside, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_the_hot_path_adds_few_ops_to_a_training_step(model):
    """What record and a prepared replay add to a forward + backward, op by op (the GPU step at
    hidden 1024 is launch-bound: every op is a kernel launch). Record: nothing (on the CPU).
    Replay: per layer the forced weights (softmax, gather, renormalisation) and the backward's
    scatter_add in place of top-k's scatter; plus one widening of the ids per forward (a bf16
    model adds the casts to and from the router's compute dtype)."""
    b = batch()

    def step(ctx):
        model.zero_grad(set_to_none=True)
        with _Ops() as seen, ctx:
            model(**b).logits.sum().backward()
        return seen.ops

    plain = step(contextlib.nullcontext())
    h = routereplay.attach(model)
    trace = record(h, model, b)[0].trace()
    prepared = h.prepare(trace)
    L = len(h.layers)
    assert step(h.record()) - plain == Counter()
    replayed = step(h.replay(prepared))
    assert plain - replayed == Counter({"aten.scatter.src": L})  # top-k's backward, not run
    added = replayed - plain
    assert added == Counter(
        {
            "aten._to_copy.default": 1,  # the ids widened to int64, once per forward
            "aten.detach.default": 2 * L,  # views: no kernel
            "aten._softmax.default": L,
            "aten.gather.default": L,
            "aten.sum.dim_IntList": L,
            "aten.div.Tensor": L,
            "aten.scatter_add.default": L,
            "aten.select.int": L,  # the layer's [N, K] rows of the widened ids
        }
    ), added
    h.detach()
