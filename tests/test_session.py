"""Record / replay sessions on a tiny Qwen3-MoE (CPU, fp32).

Legend: B batch rows, S sequence length, T packed tokens, L MoE layers, K top-k, E experts.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from helpers import VOCAB, E, K, batch, random_trace, record, tiny_qwen3_moe

import routereplay
from routereplay.core.errors import (
    AlreadyAttachedError,
    BatchShapeMismatchError,
    LayerMismatchError,
    LayoutError,
    MissingRoutesError,
    ReplayError,
    ReplayVerificationError,
    RouterSpecError,
    TokenCountMismatchError,
    TraceExhaustedError,
    UnconsumedTraceError,
    UnsupportedModelError,
)
from routereplay.core.trace import RoutingTrace

MOE_LAYERS = (1, 2, 3)  # layer 0 is dense (mlp_only_layers)


@pytest.fixture(scope="module")
def base_state():
    return tiny_qwen3_moe().state_dict()


@pytest.fixture
def model(base_state):
    m = tiny_qwen3_moe()
    m.load_state_dict(base_state)
    return m


@pytest.fixture
def handle(model):
    h = routereplay.attach(model)
    yield h
    if h.attached and h.active is None:
        h.detach()








def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def zero_grads(model):
    for p in model.parameters():
        p.grad = None


# --- discovery --------------------------------------------------------------------------------
def test_attach_finds_only_moe_layers_with_global_ids(handle):
    assert handle.layer_ids == MOE_LAYERS
    assert [m.path for m in handle.layers] == [f"model.layers.{i}.mlp.gate" for i in MOE_LAYERS]
    assert {(m.top_k, m.num_experts, m.router_class) for m in handle.layers} == {(K, E, "Qwen3MoeTopKRouter")}
    assert "layers=[1, 2, 3]" in repr(handle)


def test_attach_refuses_non_moe_models():
    with pytest.raises(
        UnsupportedModelError,
        match=(r"no routereplay adapter claims torch.nn.modules.linear.Linear; registered adapters: "
            r"\['hf'.*routereplay\[hf\]"),
    ):
        routereplay.attach(torch.nn.Linear(2, 2))


def test_attach_twice_names_the_existing_handle(model):
    h1 = routereplay.attach(model)
    with pytest.raises(
        AlreadyAttachedError,
        match=r"^Qwen3MoeForCausalLM is already attached to RouterHandle\(Qwen3MoeForCausalLM, adapter=hf, "
        r"layers=\[1, 2, 3\].*call detach\(\) on that handle first",
    ):
        routereplay.attach(model)
    h1.detach()
    with routereplay.attach(model) as h2:  # detached on exit: attach works again afterwards
        rec, _ = record(h2, model, batch())
        assert rec.num_forwards == 1 and h2.active is None
    assert not h2.attached
    h3 = routereplay.attach(model)
    copy = deepcopy(model)  # the copy carries the mark but none of the hooks: it is not attached
    routereplay.attach(copy).detach()
    h3.detach()


# --- record -----------------------------------------------------------------------------------
def test_record_calls_shapes_and_trace(handle, model):
    b = batch(B=2, S=6)
    with handle.record() as rec:
        model(**b)
        model(**batch(B=1, S=4, seed=3))
    calls = rec.calls
    assert [tuple(c.shape) for c in calls] == [(12, 3, K), (4, 3, K)]
    assert calls[0].dtype == torch.uint8
    assert rec.batch_shapes == [(2, 6), (1, 4)]
    tr = rec.trace()
    assert tr.layer_ids == MOE_LAYERS and tr.num_tokens == 16 and tr.seq_lens.tolist() == [6, 6, 4]
    # the routers' own ids, in the order they saw the rows: compare with output_router_logits
    assert torch.equal(tr.experts[:12], calls[0])


def test_record_matches_router_topk(handle, model):
    b = batch()
    with handle.record() as rec:
        out = model(**b, output_router_logits=True)
    for layer, logits_NE in enumerate(out.router_logits):
        top_NK = torch.softmax(logits_NE, -1).topk(K, -1).indices
        assert torch.equal(rec.calls[0][:, layer].long(), top_NK)


def test_replay_checks_the_ids_at_entry(handle, model):
    """A trace edited in place (or loaded with validate=False) is refused before any forward."""
    b = batch()
    t = record(handle, model, b)[0].trace()
    bad = t.replace(check=False, experts=t.experts.clone())
    bad.experts[7, 1] = torch.tensor([3, 3], dtype=bad.experts.dtype)  # an expert twice
    with pytest.raises(
        RouterSpecError,
        match=r"^layer 2 \(model.layers.2.mlp.gate\): forced_TK row 7 holds expert ids \[3, 3\]: an expert repeats",
    ):
        handle.replay(bad)
    bad.experts[7, 1] = torch.tensor([1, E], dtype=bad.experts.dtype)  # out of range
    with pytest.raises(
        RouterSpecError, match=r"^trace 1: layer 2 .*row 7 holds expert ids \[1, 8\]: expected ids in \[0, 8\)"
    ):
        handle.replay([t, bad])


def test_replay_without_mask_checks_the_batch_shape(handle, model):
    rec, _ = record(handle, model, batch(B=2, S=8))
    t = rec.trace()
    with (
        pytest.raises(
            BatchShapeMismatchError,
            match=r"^layer 1 \(model.layers.1.mlp.gate\): the forward's batch is \[4, 4\] but the trace holds 2 "
            r"sequences of 8 tokens, a batch of \[2, 8\]",
        ),
        handle.replay(t),
    ):
        model(**batch(B=4, S=4))
    with handle.replay(t):  # the same 16 rows packed into one row: a packed batch holds any sequences
        model(input_ids=batch(B=2, S=8)["input_ids"].reshape(1, 16))


def test_trace_mask_count_must_match_forwards(handle, model):
    b = batch(pad="left")
    rec, _ = record(handle, model, b)
    with pytest.raises(LayoutError, match=r"2 attention mask\(s\) for 1 recorded forward\(s\)"):
        rec.trace([b["attention_mask"], b["attention_mask"]])
    with pytest.raises(
        LayoutError, match=r"forward 0: attention_mask has shape \(2, 5\) \(10 positions\) but the routers saw 12 rows"
    ):
        rec.trace(b["attention_mask"][:, :5])


# --- replay -----------------------------------------------------------------------------------
def test_record_then_replay_is_bit_identical(handle, model):
    b = batch()
    rec, out = record(handle, model, b)
    with handle.replay(rec.trace(), verify=True) as rep:
        out2 = model(**b).logits
    assert torch.equal(out, out2)
    s = rep.stats
    assert list(s) == list(MOE_LAYERS)
    assert all(v.rows == 12 and v.replayed == 12 and v.live == 0 and v.coverage == 1.0 for v in s.values())
    assert all(v.disagreement == 0 for v in s.values())


def test_the_experts_are_hooked_only_while_their_ids_are_read(handle, model):
    """The experts' pre-hook (what replay(verify=True) and dispatch observers read) is installed for
    those only: idle, recording and plain replay leave the experts' forward without a hook."""
    experts = [layer.mlp.experts for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    hooked = lambda: [len(e._forward_pre_hooks) for e in experts]
    assert experts and hooked() == [0] * len(experts)
    b = batch()
    rec, _ = record(handle, model, b)
    assert hooked() == [0] * len(experts)
    with handle.replay(rec.trace()):
        assert hooked() == [0] * len(experts)
        model(**b)
    with handle.replay(rec.trace(), verify=True):
        assert hooked() == [1] * len(experts)
        model(**b)
    assert hooked() == [0] * len(experts)
    seen = []
    stop = handle.observe_dispatch(lambda i, ids: seen.append(i))
    stop_too = handle.observe_dispatch(lambda i, ids: None)
    assert hooked() == [1] * len(experts)
    with handle.replay(rec.trace(), verify=True):  # a verifying block while observed: one hook each
        assert hooked() == [1] * len(experts)
        model(**b)
    assert seen == list(range(len(handle.layers)))  # the replayed forward, each layer at its experts' input
    stop()
    assert hooked() == [1] * len(experts)  # the other observer still reads them
    with torch.no_grad():
        model(**b)
    assert len(seen) == len(handle.layers)
    handle.detach()  # an observer still registered: detach removes its hooks too
    assert hooked() == [0] * len(experts)
    stop_too()


def test_replay_of_other_routing_changes_output_and_reports_disagreement(handle, model):
    b = batch()
    rec, out = record(handle, model, b)
    other = random_trace(rec.trace())
    with handle.replay(other, verify=True) as rep:
        out2 = model(**b).logits
    assert not torch.allclose(out, out2)
    with handle.record() as rec2:  # a replay does not leak into the next forward
        out3 = model(**b).logits
    assert torch.equal(out, out3) and rec2.trace() == rec.trace()
    assert sum(v.disagreement for v in rep.stats.values()) > 0
    assert 0 < rep.stats[1].disagreement_rate <= 1


def test_replayed_gate_weights_come_from_live_logits(handle, model):
    """The MoE block receives exactly the forced ids, weights = renormalised softmax at them."""
    b = batch()
    rec, _ = record(handle, model, b)
    other = random_trace(rec.trace())
    seen = {}
    experts = model.model.layers[2].mlp.experts
    hook = experts.register_forward_pre_hook(lambda m, args: seen.update(ids=args[1], w=args[2]))
    router = model.model.layers[2].mlp.gate
    logits_hook = router.register_forward_hook(lambda m, a, o: seen.update(logits=o[0]))
    with handle.replay(other):
        model(**b)
    hook.remove()
    logits_hook.remove()
    forced_NK = other.experts[:, 1].long()
    assert torch.equal(seen["ids"], forced_NK)
    p = torch.softmax(seen["logits"], -1, dtype=torch.float).gather(1, forced_NK)
    torch.testing.assert_close(seen["w"], p / p.sum(-1, keepdim=True), rtol=0, atol=1e-7)


def test_router_weight_gets_gradient_under_replay(handle, model):
    b = batch()
    rec, _ = record(handle, model, b)
    with handle.replay(random_trace(rec.trace())):
        model(**b).logits.square().mean().backward()
    for i in MOE_LAYERS:
        g = model.model.layers[i].mlp.gate.weight.grad
        assert g is not None and g.abs().sum() > 0


# --- activation checkpointing ----------------------------------------------------------------
def _loss_hf(model, b):
    return model(**b).logits.square().mean()


def _loss_torch_ckpt(reentrant):
    def loss(model, b):
        emb = model.get_input_embeddings()(b["input_ids"])

        def run(e):
            return model(inputs_embeds=e, attention_mask=b["attention_mask"]).logits

        return torch.utils.checkpoint.checkpoint(run, emb, use_reentrant=reentrant).square().mean()

    return loss


def _plain_loss_embeds(model, b):
    emb = model.get_input_embeddings()(b["input_ids"])
    return model(inputs_embeds=emb, attention_mask=b["attention_mask"]).logits.square().mean()


CKPT = {
    "hf_reentrant": ({"use_reentrant": True}, _loss_hf, _loss_hf),
    "hf_non_reentrant": ({"use_reentrant": False}, _loss_hf, _loss_hf),
    # transformers 5.25: every n-th decoder layer only, and the saved activations held in host memory
    # (torch's save_on_cpu hooks around each checkpoint)
    "hf_every_2nd_layer": ({"every_n_layers": 2}, _loss_hf, _loss_hf),
    "hf_offload": ({"offload": True}, _loss_hf, _loss_hf),  # on the CPU: see _enable
    "torch_reentrant": (None, _loss_torch_ckpt(True), _plain_loss_embeds),
    "torch_non_reentrant": (None, _loss_torch_ckpt(False), _plain_loss_embeds),
}


def _enable(model, kwargs):
    """HF activation checkpointing: ``use_reentrant`` goes to torch's checkpoint, ``every_n_layers`` and
    ``offload`` to ``activation_checkpointing_enable``."""
    model.train()  # no dropout in this config: train mode only turns checkpointing on
    if kwargs is None:
        return
    own = {k: v for k, v in kwargs.items() if k in ("every_n_layers", "offload")}
    torch_kwargs = {k: v for k, v in kwargs.items() if k not in own} or None
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=torch_kwargs, **own)
    if own.get("offload") and not torch.cuda.is_available():
        # transformers' offload pins host memory, which needs an accelerator: the same wrapping with
        # unpinned host memory (save_on_cpu's hooks around each layer's checkpoint)
        def offloaded(function, *args, **kw):
            with torch.autograd.graph.save_on_cpu(pin_memory=False):
                return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kw)

        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded)


def _disable(model):
    model.activation_checkpointing_disable()


@pytest.mark.parametrize("mode", list(CKPT))
def test_checkpointed_replay_gradients_equal_plain_replay(handle, model, mode):
    kwargs, ckpt_loss, plain_loss = CKPT[mode]
    b = batch(pad="left")
    rec, _ = record(handle, model, b)
    other = random_trace(rec.trace())
    model.train()
    with handle.replay(other):
        plain_loss(model, b).backward()
    want = grads(model)
    zero_grads(model)
    with handle.record():  # live gradients differ: the test can fail
        plain_loss(model, b).backward()
    live = grads(model)
    assert any(not torch.equal(want[n], live[n]) for n in want)
    zero_grads(model)
    _enable(model, kwargs)
    recomputed = []  # the MoE layers whose router ran again in the backward: checkpointing happened
    hooks = [
        model.model.layers[i].mlp.gate.register_forward_hook(lambda *a, i=i: recomputed.append(i)) for i in MOE_LAYERS
    ]
    with handle.replay(other):
        loss = ckpt_loss(model, b)
        recomputed.clear()
        loss.backward()
    for h in hooks:
        h.remove()
    got = grads(model)
    _disable(model)
    assert sorted(recomputed) == ([2] if mode == "hf_every_2nd_layer" else list(MOE_LAYERS))
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(want[n], got[n]), n


def test_checkpointed_backward_after_the_block_uses_the_block_routes(handle, model):
    b = batch()
    rec, _ = record(handle, model, b)
    other = random_trace(rec.trace())
    model.train()
    with handle.replay(other):
        _loss_hf(model, b).backward()
    want = grads(model)
    zero_grads(model)
    _enable(model, {"use_reentrant": False})
    with handle.replay(other):
        loss = _loss_hf(model, b)
    loss.backward()  # recompute runs outside the block
    _disable(model)
    got = grads(model)
    assert all(torch.equal(want[n], got[n]) for n in want)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_microbatches_backward_together(handle, model, reentrant):
    """Two forwards, then one backward of the summed losses: recompute order is reversed."""
    b1, b2 = batch(seed=1), batch(seed=2)
    r1, _ = record(handle, model, b1)
    r2, _ = record(handle, model, b2)
    t1, t2 = random_trace(r1.trace(), seed=7), random_trace(r2.trace(), seed=8)
    model.train()
    with handle.replay([t1, t2]):
        (_loss_hf(model, b1) + _loss_hf(model, b2)).backward()
    want = grads(model)
    zero_grads(model)
    _enable(model, {"use_reentrant": reentrant})
    with handle.replay([t1, t2]):
        (_loss_hf(model, b1) + _loss_hf(model, b2)).backward()
    _disable(model)
    got = grads(model)
    assert all(torch.equal(want[n], got[n]) for n in want)


@pytest.mark.parametrize("reentrant", [True, False])
def test_recording_under_checkpointing_records_each_forward_once(handle, model, reentrant):
    b = batch(pad="right")
    model.train()
    with handle.record() as rec_plain:
        _loss_hf(model, b).backward()
    want = grads(model)
    zero_grads(model)
    _enable(model, {"use_reentrant": reentrant})
    with handle.record() as rec:
        _loss_hf(model, b).backward()
    _disable(model)
    assert rec.num_forwards == 1
    assert rec.trace() == rec_plain.trace()
    got = grads(model)
    assert all(torch.equal(want[n], got[n]) for n in want)


# --- micro-batches --------------------------------------------------------------------------------
def test_microbatch_list_consumed_in_order(handle, model):
    b1, b2 = batch(seed=1), batch(B=1, S=5, seed=2)
    with handle.record() as rec:
        o1 = model(**b1).logits
        o2 = model(**b2).logits
    t1 = RoutingTrace(experts=rec.calls[0], cu_seqlens=[0, 6, 12], layer_ids=MOE_LAYERS, num_experts=E)
    t2 = RoutingTrace(experts=rec.calls[1], cu_seqlens=[0, 5], layer_ids=MOE_LAYERS, num_experts=E)
    with handle.replay([t1, t2]) as rep:
        assert torch.equal(model(**b1).logits, o1)
        assert rep.forwards == 1
        assert torch.equal(model(**b2).logits, o2)
    with (
        pytest.raises(
            TraceExhaustedError,
            match=r"forward 3 reached layer 1 \(model.layers.1.mlp.gate\) but only 2 trace\(s\) were given",
        ),
        handle.replay([t1, t2]),
    ):
        model(**b1)
        model(**b2)
        model(**b1)
    assert handle.active is None
    with (
        pytest.raises(UnconsumedTraceError, match=r"ended after 1 forward\(s\) but 2 trace\(s\) were given"),
        handle.replay([t1, t2]),
    ):
        model(**b1)
    assert handle.active is None


def test_microbatch_row_mismatch_names_the_trace(handle, model):
    b1 = batch(seed=1)
    rec, _ = record(handle, model, b1)
    t = rec.trace()
    with (
        pytest.raises(
            TokenCountMismatchError,
            match=r"layer 1 \(model.layers.1.mlp.gate\): the router saw 5 rows but trace 1 of 2 has 12 tokens",
        ),
        handle.replay([t, t]),
    ):
        model(**b1)
        model(**batch(B=1, S=5))


# --- padding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", ["left", "right"])
def test_padded_batch_record_replay(handle, model, pad):
    b = batch(pad=pad)
    rec, out = record(handle, model, b)
    packed = rec.trace(attention_mask=b["attention_mask"])
    assert packed.num_tokens == int(b["attention_mask"].sum()) and packed.seq_lens.tolist() == [4, 6]
    full = rec.trace()
    keep = b["attention_mask"].reshape(-1).bool()
    assert torch.equal(packed.experts, full.experts[keep])
    with handle.replay(packed, attention_mask=b["attention_mask"]) as rep:
        out2 = model(**b).logits
    assert torch.equal(out, out2)
    assert rep.stats[1].replayed == 10 and rep.stats[1].live == 2
    other = random_trace(packed)
    with handle.replay(other, attention_mask=b["attention_mask"], verify=True):
        out3 = model(**b).logits
    real = b["attention_mask"].bool()
    assert not torch.allclose(out[real], out3[real])
    with (
        pytest.raises(
            TokenCountMismatchError,
            match=r"the router saw 12 rows but the trace has 10 tokens; if the batch is padded, pass attention_mask",
        ),
        handle.replay(packed),
    ):
        model(**b)


def test_mask_that_does_not_fit_the_trace(handle, model):
    b = batch(pad="left")
    rec, _ = record(handle, model, b)
    packed = rec.trace(attention_mask=b["attention_mask"])
    wrong = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(
        TokenCountMismatchError,
        match=r"attention_mask has 2 rows with \[6, 6\] real tokens but the trace has 2 sequences of \[4, 6\] tokens",
    ):
        handle.replay(packed, attention_mask=wrong)
    with pytest.raises(LayoutError, match=r"one attention_mask for 2 traces"):
        handle.replay([packed, packed], attention_mask=wrong)


def test_engine_capture_row_count_hint(handle, model):
    b = batch()
    rec, _ = record(handle, model, b)
    full = rec.trace()
    engine = RoutingTrace(  # one row fewer per sequence: the engine never forwards the last token
        experts=torch.cat([full.experts[:5], full.experts[6:11]]),
        cu_seqlens=[0, 5, 10],
        layer_ids=MOE_LAYERS,
        num_experts=E,
    )
    with (
        pytest.raises(
            TokenCountMismatchError,
            match=(r"router saw 12 rows but the trace has 10 tokens; if the batch is padded, pass attention_mask.*; "
                r"or the trace has exactly one row fewer per sequence \(2 sequences\).*routereplay.core.layout"),
        ),
        handle.replay(engine),
    ):
        model(**b)
    with pytest.raises(TokenCountMismatchError, match=r"one row fewer per sequence.*engine -> training"):
        handle.replay(engine, attention_mask=b["attention_mask"])


# --- missing rows -------------------------------------------------------------------------------------
def test_missing_routes(handle, model):
    b = batch()
    rec, out = record(handle, model, b)
    full = rec.trace()
    valid = torch.ones(12, dtype=torch.bool)
    valid[[5, 11]] = False
    other = random_trace(full)
    holed = RoutingTrace(
        experts=full.experts, cu_seqlens=full.cu_seqlens, layer_ids=MOE_LAYERS, num_experts=E, valid=valid
    )
    with pytest.raises(
        MissingRoutesError,
        match=r"2 sequence\(s\) have no route for their last token, the first at row 5 \(sequence 0\).*RouteStore",
    ):
        handle.replay(holed)
    with handle.replay(holed, missing="live") as rep:
        out2 = model(**b).logits
    assert torch.equal(out, out2)  # the holes route live: the same as recorded
    assert rep.stats[2].replayed == 10 and rep.stats[2].live == 2
    # the live rows really are live: forcing other routes elsewhere keeps them live
    holed_other = RoutingTrace(
        experts=other.experts, cu_seqlens=full.cu_seqlens, layer_ids=MOE_LAYERS, num_experts=E, valid=valid
    )
    seen = {}
    h = model.model.layers[1].mlp.experts.register_forward_pre_hook(lambda m, a: seen.update(ids=a[1]))
    with handle.replay(holed_other, missing="live"):
        model(**b)
    h.remove()
    assert torch.equal(seen["ids"][[5, 11]], rec.calls[0][[5, 11], 0].long())
    assert torch.equal(seen["ids"][valid], other.experts[valid, 0].long())
    with pytest.raises(ReplayError, match=r'missing must be "error" or "live", found \'skip\''):
        handle.replay(holed, missing="skip")


# --- layer / k mismatches ---------------------------------------------------------------------------
def _with_layer_zero(t: RoutingTrace) -> RoutingTrace:
    """``t`` plus a layer 0 the model does not route (its first layer is dense)."""
    return RoutingTrace(
        experts=torch.cat([t.experts, t.experts[:, :1]], 1),
        cu_seqlens=t.cu_seqlens,
        layer_ids=(0, 1, 2, 3),
        num_experts=E,
    )


# (handle, t): the fixture's handle and the trace it recorded of batch()
MISMATCHES = [
    pytest.param(
        lambda handle, t: handle.replay(_with_layer_zero(t)),
        LayerMismatchError,
        r"trace has layers \[0, 1, 2, 3\] but the model's MoE layers are \[1, 2, "
        r"3\].*trace.select_layers\(handle.layer_ids\)",
        id="extra-layer",
    ),
    pytest.param(
        lambda handle, t: handle.replay(
            RoutingTrace(
                experts=torch.rand(12, 3, E).argsort(-1)[..., :3],
                cu_seqlens=t.cu_seqlens,
                layer_ids=MOE_LAYERS,
                num_experts=E,
            )
        ),
        LayerMismatchError,
        r"^layer 1 \(model.layers.1.mlp.gate\): trace has top_k=3, router has top_k=2$",
        id="top-k",
    ),
    pytest.param(
        lambda handle, t: handle.replay(
            RoutingTrace(experts=t.experts, cu_seqlens=t.cu_seqlens, layer_ids=MOE_LAYERS, num_experts=16)
        ),
        LayerMismatchError,
        r"layer 1 \(model.layers.1.mlp.gate\): trace has num_experts=16, router has num_experts=8",
        id="num-experts",
    ),
    pytest.param(
        lambda handle, t: handle.replay([t, _with_layer_zero(t)]),
        LayerMismatchError,
        r"^trace 1: trace has layers \[0, 1, 2, 3\]",
        id="second-trace-of-a-list",
    ),
    pytest.param(
        lambda handle, t: handle.replay([]),
        ReplayError,
        r"replay needs a RoutingTrace, a PreparedTrace or a non-empty list of them, found list",
        id="empty-list",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), MISMATCHES)
def test_layer_and_shape_mismatches(handle, model, call, error, match):
    b = batch()
    rec, _ = record(handle, model, b)
    t = rec.trace()
    with pytest.raises(error, match=match):
        call(handle, t)
    # after the refusal the handle replays; the extra layer's remedy (select_layers) replays
    with handle.replay(_with_layer_zero(t).select_layers(handle.layer_ids)):
        model(**b)


# --- scoping -------------------------------------------------------------------------------------------
def test_modes_cannot_nest(handle, model):
    b = batch()
    rec, _ = record(handle, model, b)
    with (
        handle.record(),
        pytest.raises(
            ReplayError,
            match=(r"a recording block of this handle is already active; record/replay blocks of one model cannot be "
                r"nested"),
        ),
        handle.replay(rec.trace()),
    ):
        pass
    r = handle.record()
    with r:
        pass
    with pytest.raises(ReplayError, match=r"a Recording can be entered once"), r:
        pass


def test_exception_inside_a_block_leaves_no_state(handle, model):
    b = batch()
    rec, out = record(handle, model, b)
    other = random_trace(rec.trace())
    with (
        pytest.raises(RuntimeError, match="boom"),
        handle.replay([other, other]),
    ):  # unconsumed, but the user's error wins
        model(**b)
        raise RuntimeError("boom")
    assert handle.active is None
    assert torch.equal(model(**b).logits, out)
    with pytest.raises(TokenCountMismatchError), handle.replay(other):
        model(**batch(B=1, S=3))
    assert handle.active is None
    with handle.record() as rec2:
        assert torch.equal(model(**b).logits, out)
    assert rec2.trace() == rec.trace()


def test_two_models_are_independent(base_state):
    actor, ref = tiny_qwen3_moe(), tiny_qwen3_moe(seed=1)
    actor.load_state_dict(base_state)
    ha, hr = routereplay.attach(actor), routereplay.attach(ref)
    b = batch()
    rec_a, out_a = record(ha, actor, b)
    rec_r, out_r = record(hr, ref, b)
    other = random_trace(rec_a.trace())
    with ha.replay(other):
        with hr.record() as rec_r2:  # the reference records live while the actor replays
            assert torch.equal(ref(**b).logits, out_r)
        replayed = actor(**b).logits
    assert rec_r2.trace() == rec_r.trace()
    assert not torch.allclose(replayed, out_a)
    assert torch.equal(ref(**b).logits, out_r)
    ha.detach()
    with hr.record() as rec_r3:
        ref(**b)
    assert rec_r3.num_forwards == 1
    hr.detach()


def test_detach_restores_the_model(base_state):
    pristine = tiny_qwen3_moe()
    pristine.load_state_dict(base_state)
    model = tiny_qwen3_moe()
    model.load_state_dict(base_state)
    b = batch(pad="left")
    want = pristine(**b).logits
    h = routereplay.attach(model)
    rec, _ = record(h, model, b)
    with h.replay(random_trace(rec.trace())):
        model(**b)
    h.detach()
    h.detach()  # idempotent
    sd_a, sd_b = model.state_dict(), pristine.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(model(**b).logits, want)
    for (name, m), (_, p) in zip(model.named_modules(), pristine.named_modules()):
        assert len(m._forward_hooks) == len(p._forward_hooks), name
        assert len(m._forward_pre_hooks) == len(p._forward_pre_hooks), name
        assert set(m.__dict__) == set(p.__dict__), name
    with pytest.raises(ReplayError, match=r"this handle was detached; call routereplay.attach\(model\) again"):
        h.record()


def test_detach_inside_a_block_is_refused(handle, model):
    with handle.record(), pytest.raises(ReplayError, match=r"detach\(\) inside a record/replay block"):
        handle.detach()


# --- verify ---------------------------------------------------------------------------------------------
def test_verify_catches_ids_rewritten_before_the_experts(handle, model):
    b = batch()
    rec, _ = record(handle, model, b)
    router = model.model.layers[2].mlp.gate
    # Something after the adapter's hook rewrites the ids: replay would silently be wrong.
    bad = router.register_forward_hook(lambda m, a, o: (o[0], o[1], (o[2] + 1) % E))
    try:
        with (
            pytest.raises(
                ReplayVerificationError,
                match=(r"layer 2 \(model.layers.2.mlp.gate\): the experts received ids of shape \(12, 2\) that differ "
                    r"from the forced ids"),
            ),
            handle.replay(rec.trace(), verify=True),
        ):
            model(**b)
        assert handle.active is None
        with handle.replay(rec.trace()):  # without verify it goes unnoticed
            model(**b)
    finally:
        bad.remove()


def test_verify_catches_experts_never_called(handle, model):
    b = batch()
    rec, _ = record(handle, model, b)
    mlp = model.model.layers[3].mlp

    def bypass(hidden_BSD):  # a block that routes but never calls its experts module
        mlp.gate(hidden_BSD.reshape(-1, hidden_BSD.shape[-1]))
        return torch.zeros_like(hidden_BSD)

    mlp.forward = bypass
    try:
        with (
            pytest.raises(
                ReplayVerificationError,
                match=r"layer 3 \(model.layers.3.mlp.gate\): the router's forced ids never reached the experts module",
            ),
            handle.replay(rec.trace(), verify=True),
        ):
            model(**b)
    finally:
        del mlp.forward


# --- properties ---------------------------------------------------------------------------------------
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lens=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    left=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_record_trace_replay_roundtrip(handle, model, lens, left, seed):
    """record -> trace(mask) -> replay(mask) reproduces the logits, and the experts receive
    exactly the trace's ids on real tokens, for any left or right padding."""
    B, S = len(lens), max(lens)
    g = torch.Generator().manual_seed(seed)
    pos_S = torch.arange(S)
    len_B1 = torch.tensor(lens)[:, None]
    mask_BS = (pos_S >= S - len_B1) if left else (pos_S < len_B1)
    mask_BS = mask_BS.long()
    b = {"input_ids": torch.randint(3, VOCAB, (B, S), generator=g) * mask_BS, "attention_mask": mask_BS}
    rec, out = record(handle, model, b)
    packed = rec.trace(attention_mask=mask_BS)
    assert packed.seq_lens.tolist() == lens
    with handle.replay(packed, attention_mask=mask_BS):
        assert torch.equal(model(**b).logits, out)
    other = random_trace(packed, seed=seed)
    seen = []
    hooks = [
        model.model.layers[i].mlp.experts.register_forward_pre_hook(lambda m, a: seen.append(a[1])) for i in MOE_LAYERS
    ]
    try:
        with handle.replay(other, attention_mask=mask_BS):
            model(**b)
    finally:
        for h in hooks:
            h.remove()
    keep_N = mask_BS.reshape(-1).bool()
    assert torch.equal(torch.stack([s[keep_N] for s in seen], 1), other.experts.long())


def test_checkpointed_backward_of_two_blocks_together(handle, model):
    """Two replay blocks, then one backward of both losses: each recompute finds its block's routes."""
    b1, b2 = batch(seed=1), batch(seed=2)
    t1 = random_trace(record(handle, model, b1)[0].trace(), seed=7)
    t2 = random_trace(record(handle, model, b2)[0].trace(), seed=8)
    model.train()
    with handle.replay([t1, t2]):
        (_loss_hf(model, b1) + _loss_hf(model, b2)).backward()
    want = grads(model)
    zero_grads(model)
    _enable(model, {"use_reentrant": False})
    with handle.replay(t1):
        l1 = _loss_hf(model, b1)
    with handle.replay(t2):
        l2 = _loss_hf(model, b2)
    (l1 + l2).backward()
    _disable(model)
    got = grads(model)
    assert all(torch.equal(want[n], got[n]) for n in want)
    del l1, l2
    assert len(handle._bindings) == 0  # released with their graphs


# --- padding-free packed batches ----------------------------------------------------------------------
def _packed(lens, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    return ids, pos


def test_packed_batch_records_one_sequence_per_sample(handle, model):
    """[1, T] without an attention mask, position_ids restarting at 0: one trace sequence per sample
    (the rows are the routers' rows; how the model keeps the samples apart is its own business)."""
    ids, pos = _packed([4, 6])
    with handle.record() as rec:
        model(input_ids=ids, position_ids=pos)
    t = rec.trace()
    assert t.seq_lens.tolist() == [4, 6] and t.num_tokens == 10
    assert torch.equal(t.experts, rec.calls[0])
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with handle.record() as rec_cu:
        model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu)
    assert rec_cu.trace().seq_lens.tolist() == [4, 6]
    with handle.record() as sliced:  # a sequence-parallel slice: positions continue, one sequence
        model(input_ids=ids, position_ids=pos + 1)
    assert sliced.trace().seq_lens.tolist() == [10]
    skip = pos.clone()
    skip[0, 6] = 5  # not counting up by one
    with handle.record() as bad:
        model(input_ids=ids, position_ids=skip)
    with pytest.raises(LayoutError, match=r"^forward 0: position_ids\[6\] is 5, expected 2: the positions of a packed"):
        bad.trace()


def test_packed_replay_checks_the_boundaries(handle, model):
    ids, pos = _packed([4, 6])
    with handle.record() as rec:
        out = model(input_ids=ids, position_ids=pos).logits
    t = rec.trace()
    with handle.replay(t):
        assert torch.equal(model(input_ids=ids, position_ids=pos).logits, out)
    _, other = _packed([6, 4])
    with (
        pytest.raises(
            BatchShapeMismatchError,
            match=r"^layer 1 \(model.layers.1.mlp.gate\): the packed batch of forward 1 has sequence boundaries "
            r"\(from its position_ids\) other than the trace's",
        ),
        handle.replay(t),
    ):
        model(input_ids=ids, position_ids=other)
    with handle.record() as sliced:  # a sequence-parallel slice: positions do not restart at 0
        model(input_ids=ids, position_ids=pos + 3)
    with handle.replay(sliced.trace()):
        model(input_ids=ids, position_ids=pos + 3)
    with (
        pytest.raises(BatchShapeMismatchError, match=r"holds 3 sequences \(cu_seq_lens_q\) but the trace has 2"),
        handle.replay(t),
    ):
        model(input_ids=ids, position_ids=pos, cu_seq_lens_q=torch.tensor([0, 2, 4, 10]))


def test_trace_meta_names_the_model_through_an_fsdp2_wrapper_class(handle, model):
    """FSDP2's fully_shard swaps the instance's class for a generated subclass ``FSDP<Model>``."""
    cls = type(model)
    model.__class__ = type(f"FSDP{cls.__name__}", (cls,), {})
    try:
        rec, _ = record(handle, model, batch())
        assert rec.trace().meta["model"] == "Qwen3MoeForCausalLM"
    finally:
        model.__class__ = cls


def test_packed_boundary_errors(handle, model):
    ids, pos = _packed([4, 6])
    with handle.record() as rec:
        model(input_ids=ids, position_ids=pos)
    t = rec.trace()
    with handle.record() as bad:
        model(input_ids=ids, position_ids=pos, cu_seq_lens_q=torch.tensor([0, 4, 9]))
    with pytest.raises(
        LayoutError, match=r"^forward 0: cu_seq_lens_q \[0, 4, 9\] does not run from 0 to the 10 packed rows"
    ):
        bad.trace()
    with (
        pytest.raises(
            BatchShapeMismatchError,
            match=(r"the packed batch of forward 1 has sequence boundaries \(from its cu_seq_lens_q\) other than the "
                r"trace's"),
        ),
        handle.replay(t),
    ):
        model(input_ids=ids, position_ids=pos, cu_seq_lens_q=torch.tensor([0, 6, 10]))


def test_attach_by_adapter_name(model):
    with pytest.raises(UnsupportedModelError, match=r"^no routereplay adapter named 'vllm'; registered: \['hf'"):
        routereplay.attach(model, adapter="vllm")
    with routereplay.attach(model, adapter="hf") as h:
        assert h.adapter == "hf"


# --- the router's forward after attach ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["one", "all"])
def test_a_router_forward_replaced_after_attach_is_named_by_the_block(handle, model, which):
    """The HF seam wraps each router instance's forward; an instance forward set over it after attach
    bypasses it: record and replay refuse at exit (never a silently live layer) and say why."""
    b = batch()
    rec, _ = record(handle, model, b)
    gates = [model.model.layers[i].mlp.gate for i in MOE_LAYERS]
    gates = gates[:1] if which == "one" else gates
    ours = [g.__dict__["forward"] for g in gates]
    for g in gates:
        g.forward = type(g).forward.__get__(g)  # e.g. a kernel library's forward, set after attach
    try:
        with pytest.raises(UnconsumedTraceError, match="replaced after attach"), handle.replay(rec.trace()):
            model(**b)
        with handle.record() as again:
            model(**b)
        with pytest.raises(ReplayError, match="replaced after attach"):
            again.trace()
    finally:
        for g, f in zip(gates, ours, strict=True):
            g.forward = f


def test_a_router_class_forward_patched_after_attach_runs_under_the_seam(handle, model, monkeypatch):
    """The wrapper looks the class's forward up per call, as nn.Module does: a class-level patch made
    after attach runs, and the seam still answers it."""
    b = batch()
    gate = model.model.layers[2].mlp.gate
    original, calls = type(gate).forward, []

    def patched(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(gate), "forward", patched)
    rec, _ = record(handle, model, b)
    assert calls.count(gate) == 1
    other = random_trace(rec.trace())
    seen = {}
    hook = model.model.layers[2].mlp.experts.register_forward_pre_hook(lambda m, args: seen.update(ids=args[1]))
    try:
        with handle.replay(other):
            model(**b)
    finally:
        hook.remove()
    assert calls.count(gate) == 2
    assert torch.equal(seen["ids"], other.experts[:, 1].long())  # the patched forward's output was forced
