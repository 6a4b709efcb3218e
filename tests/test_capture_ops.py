"""What capture in ``generate`` adds to a generation, op by op (issue 21: capture's cost is per
decode step per layer, so it is pinned per step per layer). CPU: every op of the model's forward
passes through the counter; CUDA-only work (the compact device copy of each layer's ids) is not
seen here and is measured in benchmarks/bench_capture.py."""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import hf_zoo

import routereplay

NEW_TOKENS = 4


class _Ops(TorchDispatchMode):
    def __enter__(self):
        self.ops = Counter()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_zoo.build("qwen3_moe")[0]


def _generate(model, ctx) -> Counter:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 5), generator=g)
    with torch.no_grad(), _Ops() as seen, ctx:
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
        )
    return seen.ops


def test_capture_adds_no_op_on_the_cpu(model):
    plain = _generate(model, contextlib.nullcontext())
    with routereplay.attach(model) as handle:
        captured = _generate(model, handle.capture_generation())
        assert captured - plain == Counter()  # the ids are kept as the router made them
        assert plain - captured == Counter()


def test_capture_runs_few_routereplay_calls_per_router_call(model):
    """Capture's host cost in a decode step is Python: routereplay's own function calls are pinned
    per router call (hook, seam dispatch, the block's answer) and per forward (the batch shape, at
    the first MoE block). Idle, attached: fewer. No experts hook (installed only while read)."""
    import sys

    def routereplay_calls(ctx) -> Counter:
        seen = Counter()

        def profile(frame, event, arg):
            if event == "call" and "/routereplay/" in frame.f_code.co_filename:
                seen[frame.f_code.co_name] += 1

        sys.setprofile(profile)
        try:
            _generate(model, ctx)
        finally:
            sys.setprofile(None)
        return seen

    with routereplay.attach(model) as handle:
        idle = routereplay_calls(contextlib.nullcontext())
        captured = routereplay_calls(handle.capture_generation())
    forwards = NEW_TOKENS  # generate runs one forward per new token
    router_calls = len(handle.layers) * forwards
    assert captured["router_hook"] == idle["router_hook"] == router_calls
    assert "experts_pre_hook" not in captured and "on_experts" not in captured
    assert sum(captured.values()) <= 6 * router_calls + 9 * forwards + 25, captured  # 25: entering, leaving
    assert sum(idle.values()) <= 6 * router_calls + 4 * forwards, idle


def test_capture_with_logprobs_adds_one_log_softmax_per_step(model):
    plain = _generate(model, contextlib.nullcontext())
    with routereplay.attach(model) as handle:
        captured = _generate(model, handle.capture_generation(logprobs=True))
    added = captured - plain
    steps = NEW_TOKENS
    assert added["aten._log_softmax.default"] == steps  # one [B, V] log-softmax a step, never all logits
    assert added["aten.detach.default"] == steps  # the logits', once a step; no op per layer
    assert set(added) <= {
        "aten.detach.default",
        "aten._log_softmax.default",
        "aten.div.Tensor",  # the temperature
        "aten.select.int",
        "aten.gather.default",  # the sampled token's log-prob
        "aten.unsqueeze.default",
        "aten.clone.default",  # the hook's own copy of the fed tokens
    }, added


def test_capture_walks_no_stack(model, monkeypatch):
    """generate() runs without grad and is never checkpointed: a capture's router calls skip the
    search for checkpointed regions (a walk of the Python stack on every call), which a plain
    record() block without grad still makes (a reentrant checkpoint's forward runs without grad)."""
    from routereplay.runtime import recompute

    walks = []
    real = recompute.scopes
    monkeypatch.setattr(recompute, "scopes", lambda: walks.append(1) or real())
    with routereplay.attach(model) as handle:
        _generate(model, handle.capture_generation())
        assert walks == []
        _generate(model, handle.record())
        assert len(walks) == len(handle.layers) * NEW_TOKENS


def test_a_forward_with_grad_outside_checkpoints_walks_no_stack(model, monkeypatch):
    """With grad on and no saved-tensor hooks pushed, no checkpointed forward can enclose a router
    call (an autograd Function's forward runs without grad; a non-reentrant checkpoint pushes
    hooks): scopes() answers without reading a frame."""
    import sys

    from routereplay.runtime import recompute

    frames = []
    real = sys._getframe
    monkeypatch.setattr(recompute.sys, "_getframe", lambda depth=0: frames.append(depth) or real(depth + 1))
    with torch.enable_grad():
        assert recompute.scopes() == []
    assert frames == []
    with torch.no_grad():
        recompute.scopes()
    assert frames == [1]


@pytest.mark.parametrize(("every", "nbytes"), [(1, 1 << 20), (3, 1 << 20), (64, 1 << 20), (64, 1)])
def test_capture_narrows_kept_ids_once_per_block_of_forwards(model, monkeypatch, every, nbytes):
    """The router's ids are kept as they are and narrowed, per layer, into one compact block every
    ``_NARROW_EVERY`` forwards: one ``cat`` (into a new block) per layer per block, no op per router
    call, and the same rollout whatever the block size (views of the blocks, in order, then the
    forwards still kept). A layer's ids pending over ``_NARROW_BYTES`` are narrowed at once."""
    from routereplay.runtime import record

    plain = _generate(model, contextlib.nullcontext())
    with routereplay.attach(model) as handle:
        ref_cap = handle.capture_generation()
        _generate(model, ref_cap)
        monkeypatch.setattr(record, "_NARROW_EVERY", every)
        monkeypatch.setattr(record, "_NARROW_BYTES", nbytes)  # 1: every forward's ids are over it
        every = every if nbytes > 1 else 1
        cap = handle.capture_generation()
        added = _generate(model, cap) - plain
    forwards = NEW_TOKENS
    L = len(handle.layers)
    blocks = L * (forwards // every)
    assert added == Counter({"aten.empty.memory_format": blocks, "aten.cat.out": blocks}) - Counter()
    rec, ref = cap.recording, ref_cap.recording
    assert all(len(rec._ids[i]) == forwards % every for i in range(L))  # the rest kept as the routers made them
    assert rec.num_forwards == ref.num_forwards == forwards
    for a, b in zip(rec.calls, ref.calls, strict=True):
        assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b)
    assert torch.equal(rec.trace().experts, ref.trace().experts)
