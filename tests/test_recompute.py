"""Recompute identity: an activation-checkpoint recompute replays the ids of its own forward.

Every test runs a program twice, on two copies of one tiny Qwen3-MoE (CPU, fp32): once with
activation checkpointing, once without, and compares the gradients bit for bit. Without
checkpointing there is no recompute, so the plain program is the oracle.
"""

from __future__ import annotations

import functools
import os
import warnings

import pytest
import torch
from helpers import E, batch, random_trace, tiny_qwen3_moe
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import routereplay
from routereplay.core.errors import RecomputeMismatchError


class FunctionCheckpoint(torch.autograd.Function):
    """A checkpoint built on an autograd Function, as Megatron's ``tensor_parallel.checkpoint`` and
    DeepSpeed's are: forward under no_grad, recompute inside ``backward``."""

    @staticmethod
    def forward(ctx, run, *args):
        ctx.run = run
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return run(*args)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in ctx.saved_tensors]
        with torch.enable_grad():
            out = ctx.run(*inputs)
        torch.autograd.backward(out, grads)
        return (None, *[x.grad if x.requires_grad else None for x in inputs])


def _function_checkpoint(run, *args, **kwargs):
    return FunctionCheckpoint.apply(functools.partial(run, **kwargs), *args)


def _no_topk_saved(ctx, op, *args, **kwargs):
    # selective checkpointing: keep matmul outputs, recompute everything else (the router's top-k too)
    return CheckpointPolicy.MUST_SAVE if op is torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE


FLAVOURS = {
    "hf_reentrant": functools.partial(checkpoint, use_reentrant=True),
    "hf_non_reentrant": functools.partial(checkpoint, use_reentrant=False),
    "function": _function_checkpoint,
    "selective": functools.partial(
        checkpoint,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, _no_topk_saved),
    ),
    "no_early_stop": functools.partial(checkpoint, use_reentrant=False, early_stop=False),
}


def _set_checkpointing(model, fn) -> None:
    model.train()  # no dropout in this config: train mode only turns checkpointing on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fn is None:
            model.gradient_checkpointing_disable()
        else:
            model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=fn)


class World:
    """One copy of the model with its handle, and the losses whose backward is still owed."""

    def __init__(self, state, flavour, nested=False):
        self.model = tiny_qwen3_moe()
        self.model.load_state_dict(state)
        _set_checkpointing(self.model, None if flavour is None else FLAVOURS[flavour])
        self.nested = nested and flavour is not None
        self.handle = routereplay.attach(self.model)

    def loss(self, b):
        if not self.nested:
            return self.model(**b).logits.square().mean()
        # an outer non-reentrant checkpoint around the whole model, per-layer checkpoints inside;
        # nested="decorator": the outer one made by torch 2.14's checkpoint decorator
        emb = self.model.get_input_embeddings()(b["input_ids"])
        run = lambda e: self.model(inputs_embeds=e, attention_mask=b["attention_mask"]).logits
        if self.nested == "decorator":
            return checkpoint(use_reentrant=False, early_stop=False)(run)(emb).square().mean()
        return checkpoint(run, emb, use_reentrant=False, early_stop=False).square().mean()

    def grads(self):
        return {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}


def _same_grads(a: World, b: World) -> None:
    ga, gb = a.grads(), b.grads()
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.equal(ga[n], gb[n]), f"{n}: max |diff| {float((ga[n] - gb[n]).abs().max())}"


@pytest.fixture(scope="module")
def state():
    return tiny_qwen3_moe().state_dict()


def _traces(world, batches):
    """Per batch, a recorded trace and two random ones (routes the live router would not pick)."""
    out = []
    for i, b in enumerate(batches):
        with torch.no_grad(), world.handle.record() as rec:
            world.model(**b)
        t = rec.trace()
        out.append([t, random_trace(t, seed=10 + i), random_trace(t, seed=20 + i)])
    return out


# --- the three scenarios of the issue, in every flavour ------------------------------------------
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_replay_then_live_forward_then_backward(state, flavour):
    b = batch(seed=1)
    ck, plain = World(state, flavour), World(state, None)
    t = random_trace(_traces(plain, [b])[0][0])
    for w in (ck, plain):
        with w.handle.replay(t):
            loss = w.loss(b)
        w.model(**batch(seed=1)).logits.sum()  # a live forward with grad, its graph dropped
        with torch.no_grad():
            w.model(**b)  # a no_grad reference pass over the same batch
        loss.backward()
    _same_grads(ck, plain)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_two_blocks_then_one_backward(state, flavour):
    """Gradient accumulation: block 1's recompute uses block 1's ids, not block 2's."""
    b1, b2 = batch(seed=1), batch(B=3, S=4, seed=2)  # same row count: a row count cannot tell them apart
    ck, plain = World(state, flavour), World(state, None)
    (t1, *_), (t2, *_) = _traces(plain, [b1, b2])
    t1, t2 = random_trace(t1, seed=1), random_trace(t2, seed=2)
    for w in (ck, plain):
        with w.handle.replay(t1):
            l1 = w.loss(b1)
        with w.handle.replay(t2):
            l2 = w.loss(b2)
        (l1 + l2).backward()
    _same_grads(ck, plain)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_same_batch_two_traces_one_backward(state, flavour):
    """Two blocks over the same batch with different traces: identical logits, different ids."""
    b = batch(seed=3)
    ck, plain = World(state, flavour), World(state, None)
    ((_t, r1, r2),) = _traces(plain, [b])
    for w in (ck, plain):
        with w.handle.replay(r1):
            l1 = w.loss(b)
        with w.handle.replay(r2):
            l2 = w.loss(b)
        (l1 + 2 * l2).backward()
    _same_grads(ck, plain)


def _checkpoint_decorates() -> bool:
    """torch 2.14 and later: ``checkpoint()`` without a function returns a decorator."""
    try:
        checkpoint(use_reentrant=False)
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("outer", [True, "decorator"], ids=["call", "decorator"])
def test_nested_checkpoints(state, outer):
    if outer == "decorator" and not _checkpoint_decorates():
        pytest.skip(f"torch {torch.__version__}: checkpoint() needs a function")
    b1, b2 = batch(seed=1), batch(seed=2)
    ck, plain = World(state, "hf_non_reentrant", nested=outer), World(state, None)
    (_, r1, _), (_, r2, _) = _traces(plain, [b1, b2])
    for w in (ck, plain):
        with w.handle.replay([r1, r2]):
            loss = w.loss(b1) + w.loss(b2)
        loss.backward()
    _same_grads(ck, plain)


def test_retain_graph_backward_twice(state):
    b = batch(seed=4)
    for flavour in ("hf_reentrant", "hf_non_reentrant"):
        ck, plain = World(state, flavour), World(state, None)
        ((_, r, _),) = _traces(plain, [b])
        for w in (ck, plain):
            with w.handle.replay(r):
                loss = w.loss(b)
            w.model(**b).logits.mean().backward()  # a live step in between
            loss.backward(retain_graph=True)
            loss.backward()
        _same_grads(ck, plain)


def test_two_models_do_not_share_recompute(state):
    b = batch(seed=5)
    actor, ref = World(state, "hf_reentrant"), World(state, "hf_non_reentrant")
    plain = World(state, None)
    ((_, r1, r2),) = _traces(plain, [b])
    with actor.handle.replay(r1):
        la = actor.loss(b)
    with ref.handle.replay(r2):
        lr = ref.loss(b)
    with plain.handle.replay(r1):
        lp = plain.loss(b)
    lr.backward()
    la.backward()
    lp.backward()
    _same_grads(actor, plain)


# --- backward owed past detach ---------------------------------------------------------------------
def _hooks(model) -> list[tuple[str, int, int]]:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


@pytest.mark.parametrize("mode", ["replay", "record"])
@pytest.mark.parametrize(("flavour", "nested"), [*[(f, False) for f in FLAVOURS], ("hf_reentrant", True)])
def test_detach_before_backward_keeps_the_forward_routes(state, flavour, nested, mode):
    """``detach()`` between a forward and its backward: the model is restored at once, and the
    owed backward still recomputes with the forward's routes (gradients equal the plain program's)."""
    b = batch(seed=6)
    ck, plain = World(state, flavour, nested), World(state, None)
    ((_, r, _),) = _traces(plain, [b])
    pristine = _hooks(tiny_qwen3_moe())
    for w in (ck, plain):
        with w.handle.replay(r) if mode == "replay" else w.handle.record():
            loss = w.loss(b)
        w.handle.detach()
        assert _hooks(w.model) == pristine
        loss.backward()
        assert _hooks(w.model) == pristine
    _same_grads(ck, plain)


@pytest.mark.parametrize("flavour", ["hf_reentrant", "hf_non_reentrant", "function"])
def test_helper_that_attaches_replays_and_returns_the_loss(state, flavour):
    """Two steps of such a helper, summed into one backward, then one step whose backward runs
    while the model is attached again (another handle, replaying another trace)."""
    b1, b2 = batch(seed=7), batch(seed=8)
    ck, plain = World(state, flavour), World(state, None)
    (_, r1, _), (_, r2, r3) = _traces(plain, [b1, b2])

    def step(w, r, b):
        with routereplay.attach(w.model) as h, h.replay(r):
            return w.loss(b)

    for w in (ck, plain):
        w.handle.detach()
        (step(w, r1, b1) + 2 * step(w, r2, b2)).backward()
    _same_grads(ck, plain)
    for w in (ck, plain):
        for p in w.model.parameters():
            p.grad = None
        owed = step(w, r2, b2)
        with routereplay.attach(w.model) as h:
            with h.replay(r3):
                now = w.loss(b2)
            (owed + now).backward()
    _same_grads(ck, plain)


# --- refusals ------------------------------------------------------------------------------------
def test_recompute_of_a_forward_made_before_attach(state):
    w = World(state, "hf_reentrant")
    w.handle.detach()
    loss = w.loss(batch())
    w.handle = routereplay.attach(w.model)
    with pytest.raises(
        RecomputeMismatchError,
        match=r"^layer 3 \(model.layers.3.mlp.gate\): activation recompute of a checkpointed region "
        r"\(CheckpointFunctionBackward\) whose forward this handle never saw",
    ):
        loss.backward()


def test_recompute_that_calls_the_router_more_often_than_its_forward(state):
    w = World(state, None)
    b = batch()
    calls = []

    def run(e):
        calls.append(1)
        out = w.model(inputs_embeds=e, attention_mask=b["attention_mask"]).logits
        if len(calls) > 1:  # the recompute runs the model twice: not the forward it belongs to
            out = out + w.model(inputs_embeds=e, attention_mask=b["attention_mask"]).logits
        return out

    emb = w.model.get_input_embeddings()(b["input_ids"])
    ((_, r, _),) = _traces(w, [b])
    with w.handle.replay(r):
        loss = FunctionCheckpoint.apply(run, emb).sum()
    with pytest.raises(
        RecomputeMismatchError,
        match=r"^layer 1 \(model.layers.1.mlp.gate\): activation recompute of a checkpointed region "
        r"\(FunctionCheckpointBackward\) calls this router 2 time\(s\), but the region's forward \(replay block 2, "
        r"forward 1\) called it 1 time\(s\)",
    ):
        loss.backward()


def test_unrecognised_recompute_is_refused_while_a_replayed_forward_lives(state):
    """A router call in backward outside any recognised recompute (here: a forward run from a
    backward hook) is refused while a replayed forward outside a checkpoint may still be recomputed."""
    w = World(state, None)
    b = batch()
    ((_, r, _),) = _traces(w, [b])
    with w.handle.replay(r):
        loss = w.loss(b)
    emb = w.model.get_input_embeddings().weight
    emb.register_hook(lambda g: w.model(**b) and None)
    with pytest.raises(RecomputeMismatchError, match=r"a router call during backward outside any checkpoint recompute"):
        loss.backward()


# --- the state machine -----------------------------------------------------------------------------
BATCHES = [batch(seed=11), batch(B=3, S=4, seed=12), batch(seed=13, pad="left")]


class RecomputeMachine(RuleBasedStateMachine):
    """Interleaves replayed (from traces and from prepared traces), recorded and live forwards (with
    and without grad, on this model and on a second one) with backwards in any order, per loss or
    summed, with ``retain_graph``, and with detach / attach again in between; after every backward
    the checkpointed model's gradients equal the plain model's bit for bit."""

    state_dict = None
    traces = None

    @initialize(flavour=st.sampled_from(sorted(FLAVOURS)), nested=st.booleans())
    def setup(self, flavour, nested):
        self.worlds = (World(self.state_dict, flavour, nested), World(self.state_dict, None))
        # torch's selective checkpointing refuses a second backward through a region (its cached
        # activations are consumed): retain_graph is exercised with the other flavours
        self.may_retain = flavour != "selective"
        self.other = World(self.state_dict, "hf_reentrant")  # another model in the same process
        self.pending: list[list] = []  # per owed backward: the loss in each world
        self.other_pending: list = []
        self.prepared: dict = {}  # (world, batch, mode) -> its PreparedTrace

    def _forward(self, world, mode, b, grad):
        if mode == "record":
            ctx = world.handle.record()
        elif mode == "live":
            ctx = _Null()
        else:
            trace = self.traces[b][int(mode[6])]  # traces of every row, padding included
            if mode.endswith("p"):  # a PreparedTrace made once, replayed in every such forward
                key = (id(world), b, mode)
                if key not in self.prepared:
                    self.prepared[key] = world.handle.prepare(trace)
                trace = self.prepared[key]
            ctx = world.handle.replay(trace)
        with torch.set_grad_enabled(grad), ctx:
            return world.loss(BATCHES[b])

    @rule(
        mode=st.sampled_from(["replay0", "replay1", "replay2", "replay1p", "record", "live"]),
        b=st.integers(0, 2),
        grad=st.booleans(),
    )
    def forward(self, mode, b, grad):
        losses = [self._forward(w, mode, b, grad) for w in self.worlds]
        if grad:
            self.pending.append(losses)

    @rule(b=st.integers(0, 2))
    def other_model_forward(self, b):
        with self.other.handle.replay(self.traces[b][1]):
            self.other_pending.append(self.other.loss(BATCHES[b]))

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 7), retain=st.booleans())
    def backward_one(self, pick, retain):
        i = pick % len(self.pending)
        losses = self.pending[i]
        retain = retain and self.may_retain
        if not retain:
            # by position: list.remove would compare the losses' values, and replaying the recorded
            # routes gives a loss equal to the recorded forward's
            del self.pending[i]
        self._fresh_grads()
        for loss in losses:
            loss.backward(retain_graph=retain)
        _same_grads(*self.worlds)

    @precondition(lambda self: len(self.pending) >= 2)
    @rule()
    def backward_sum(self):
        self._fresh_grads()
        for i in range(2):
            sum(losses[i] * (n + 1) for n, losses in enumerate(self.pending)).backward()
        self.pending.clear()
        _same_grads(*self.worlds)

    def _fresh_grads(self):
        """Each backward's gradients are compared on their own: a reentrant (Function-based)
        checkpoint adds its contributions into ``.grad`` one region at a time, so on top of an
        earlier ``.grad`` G it rounds ``(G + g1) + g2`` where one graph rounds ``G + (g1 + g2)``,
        a property of reentrant checkpointing itself, not of replay."""
        for w in self.worlds:
            for p in w.model.parameters():
                p.grad = None

    @rule()
    def detach_and_attach_again(self):
        """Backwards owed by forwards of the detached handle still replay their forwards' routes,
        under the new handle's interception."""
        for w in self.worlds:
            w.handle.detach()
            w.handle = routereplay.attach(w.model)
        self.prepared.clear()

    @precondition(lambda self: self.other_pending)
    @rule()
    def other_backward(self):
        self.other_pending.pop().backward()

    @invariant()
    def no_block_left_open(self):
        if hasattr(self, "worlds"):
            assert all(w.handle.active is None for w in self.worlds)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


@pytest.fixture(scope="module")
def machine_inputs(state):
    w = World(state, None)
    return state, _traces(w, BATCHES)


def test_recompute_state_machine(machine_inputs):
    RecomputeMachine.state_dict, RecomputeMachine.traces = machine_inputs
    runner = RecomputeMachine.TestCase
    runner.settings = settings(
        max_examples=int(os.environ.get("RR_MACHINE_EXAMPLES", "200")),
        stateful_step_count=8,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.reuse, Phase.generate),  # a failure prints its steps; shrinking costs minutes
    )
    runner().runTest()


assert E == 8  # the traces above are built for test_session's tiny model


def test_scopes_see_a_checkpoint_under_saved_tensor_hooks_of_its_region():
    """A region may push saved-tensor hooks of its own (activation offloading): the checkpoint's
    hooks are then not the innermost, and scopes() must still find the region (it walks the stack
    whenever any hooks are pushed; only a grad-enabled call with none skips the walk)."""
    from routereplay.runtime import recompute

    seen = []

    def region(x):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            seen.append(recompute.scopes())
        return x * 2

    checkpoint(region, torch.ones(2, requires_grad=True), use_reentrant=False)
    assert [type(s.region).__name__ for s in seen[0]] == ["_CheckpointFrame"]
    assert not seen[0][0].recompute
    with torch.enable_grad():
        assert recompute.scopes() == []  # nothing pushed, grad on: no region can enclose this call

