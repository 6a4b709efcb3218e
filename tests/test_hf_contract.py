"""The replay contract, for every MoE family of the installed transformers (tests/hf_zoo.py).

Per family: (a) record then replay the same batch is bit-identical (to the record and to a plain
forward); (b) replaying another valid routing changes the output, and the output equals an
independent reference: the family's own modeling code run with ``torch.topk`` answering the forced
ids inside each MoE block (so the gate weights come from the family's formula, not from
routereplay.core.routing); (c) every router gets a non-zero gradient under replay; (d) checkpointed
replay gradients equal plain replay gradients exactly; (e) left- and right-padded batches replay
bit-identically; (f) only MoE layers are in the trace, under their global decoder-layer ids
(attention routers, JetMoE's, under num_hidden_layers + i).
Refused families must be refused at attach with their documented reason.

Legend: B batch rows, S sequence length, N rows a router sees, E logits width, K top-k.
"""

from __future__ import annotations

import functools
import re
import warnings
from copy import deepcopy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_zoo
from helpers import REFUSED_FAMILIES, SUPPORTED, forced_topk, model_logits

import routereplay
from routereplay.adapters import hf
from routereplay.core.errors import UnsupportedModelError, UnsupportedRouterError

B, S = 2, 6
FAMILIES = hf_zoo.FAMILIES


def _params(families):
    out = []
    for f in families:
        reason = hf_zoo.reason_skipped(f)
        marks = [pytest.mark.skip(reason=f"hf_zoo cannot build {f}: {reason}")] if reason else []
        out.append(pytest.param(f, marks=marks, id=f))
    return out




@functools.cache
def _built(family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, config = hf_zoo.build(family)
    return model, config, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def zoo(request):
    """(model, handle) for the family, weights reset, eval mode, grads cleared; detached after."""
    family = request.node.callspec.params["family"]
    model, _config, state = _built(family)
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.grad = None
    handle = routereplay.attach(model)
    yield model, handle
    if handle.attached:
        handle.detach()


def _batch(seed, pad=None):
    g = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(3, 120, (B, S), generator=g)
    mask_BS = torch.ones(B, S, dtype=torch.long)
    if pad == "left":
        mask_BS[0, :2] = 0
    elif pad == "right":
        mask_BS[0, -2:] = 0
    return {"input_ids": ids_BS, "attention_mask": mask_BS}




def _record(handle, model, b):
    with handle.record() as rec:
        out = model_logits(model, b)
    return rec, out




def _decoder_layers(model):
    for name, module in model.named_modules():
        is_layers = isinstance(module, torch.nn.ModuleList) and re.search(r"(^|\.)(layers|blocks|h)$", name)
        if is_layers and len(module) and any("experts" in n for n, _ in module.named_modules()):
            return module
    raise AssertionError("no decoder layer list found")


# --- refused families ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", _params(sorted(set(REFUSED_FAMILIES) & set(FAMILIES))))
def test_refused_at_attach_with_reason(family):
    model, _, _ = _built(family)
    hooks = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m.__dict__)) for m in model.modules()]
    before = hooks()
    with pytest.raises((UnsupportedRouterError, UnsupportedModelError), match=REFUSED_FAMILIES[family]):
        routereplay.attach(model)
    assert hooks() == before  # a refusal leaves nothing behind


# --- supported families ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", _params(SUPPORTED))
def test_record_replay_identity_and_layer_ids(family, zoo):
    model, handle = zoo
    b = _batch(1)
    with torch.no_grad():
        plain = model_logits(model, b)
        rec, out = _record(handle, model, b)
        trace = rec.trace()
        with handle.replay(trace) as rep:
            out2 = model_logits(model, b)
    assert torch.equal(out, plain)  # (a) recording is transparent
    assert torch.equal(out2, plain)  # (a) replaying the same routes is bit-identical
    assert all(s.disagreement == 0 and s.coverage == 1.0 for s in rep.stats.values())
    # (f) only MoE layers, global ids: decoder layers that own experts, minus hash-routed ones;
    # an attention router (JetMoE's self_attention.experts) of layer i has id len(layers) + i and
    # runs before the layer's MLP router
    layers = _decoder_layers(model)
    skipped = {hf.layer_id_of(p) for p, _ in handle.skipped}
    moe = []
    for i, layer in enumerate(layers):
        names = [n for n, _ in layer.named_modules()]
        in_attention = any(n.endswith("attention.experts") for n in names)
        in_mlp = any(n.endswith("experts") and "attention" not in n for n in names) or "mlp.router" in names
        moe += ([len(layers) + i] if in_attention else []) + ([i] if in_mlp and i not in skipped else [])
    assert list(handle.layer_ids) == moe
    attention = [m.path for m in handle.layers if m.layer_id >= len(layers)]
    assert all(p.endswith("self_attention.experts.router") for p in attention), attention
    assert trace.layer_ids == handle.layer_ids and trace.num_tokens == B * S


@pytest.mark.parametrize("family", _params(SUPPORTED))
def test_other_routing_matches_family_reference(family, zoo):
    model, handle = zoo
    b, b_other = _batch(1), _batch(2)
    with torch.no_grad():
        rec, out = _record(handle, model, b)
        rec_o, _ = _record(handle, model, b_other)
        other = rec_o.trace()  # live routes of other tokens: valid for this router by construction
        assert not torch.equal(other.experts, rec.trace().experts)
        with handle.replay(other, verify=all(handle.verifiable)):
            replayed = model_logits(model, b)
        assert not torch.allclose(replayed, out)  # (b) the forced routes are used
        handle.detach()
        with forced_topk(model, handle, [other.experts[:, l].long() for l in range(len(handle.layers))]):
            reference = model_logits(model, b)
    torch.testing.assert_close(replayed, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", _params(SUPPORTED))
def test_deepcopy_of_an_attached_model_routes_live_and_leaves_the_handle_alone(family, zoo):
    """A deepcopy (a TRL reference model, say) carries the interception but is not attached: it
    routes live, and its forwards never reach the original's handle."""
    model, handle = zoo
    b, b_other = _batch(1), _batch(2)
    with torch.no_grad():
        plain = model_logits(model, b)
        copy = deepcopy(model)
        other = _record(handle, model, b_other)[0].trace()
        with handle.replay(other) as rep:
            replayed = model_logits(model, b)
            from_copy = model_logits(copy, b)  # inside the block: must neither replay nor count
        assert rep.forwards == 1
        assert torch.equal(from_copy, plain)
        assert not torch.allclose(replayed, plain)
        routereplay.attach(copy).detach()  # the copy is not attached


def _loss(model, b):
    return model_logits(model, b).square().mean()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", _params(SUPPORTED))
def test_replay_gradients_and_checkpointing(family, zoo):
    model, handle = zoo
    b, b_other = _batch(1), _batch(2)
    with torch.no_grad():
        other = _record(handle, model, b_other)[0].trace()
    model.train()
    torch.manual_seed(0)
    with handle.replay(other):
        _loss(model, b).backward()
    want = _grads(model)
    # (c) every router learns under replay
    for layer in handle.layers:
        router = model.get_submodule(layer.path)
        g = [p.grad for p in router.parameters() if p.grad is not None]
        assert g and any(x.abs().sum() > 0 for x in g), layer.path
    # (d) checkpointed replay: the recompute uses the forward's routes
    for p in model.parameters():
        p.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_ckpt = model.supports_gradient_checkpointing
        if hf_ckpt:
            try:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            except ValueError:  # declared but not wired (DiffusionGemma encoder): checkpoint by hand
                hf_ckpt = False
        if hf_ckpt:
            loss_fn = _loss
        else:

            def loss_fn(m, batch):
                emb = m.get_input_embeddings()(batch["input_ids"])
                run = lambda e: model_logits(m, {"inputs_embeds": e, "attention_mask": batch["attention_mask"]})
                return torch.utils.checkpoint.checkpoint(run, emb, use_reentrant=False).square().mean()

        torch.manual_seed(0)
        with handle.replay(other):
            loss_fn(model, b).backward()
        if hf_ckpt:
            model.gradient_checkpointing_disable()
    got = _grads(model)
    model.eval()
    assert want.keys() == got.keys()
    bad = [n for n in want if not torch.equal(want[n], got[n])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("family", _params(SUPPORTED))
def test_padded_batches(family, zoo):
    model, handle = zoo
    for pad in ("left", "right"):
        b = _batch(3, pad=pad)
        with torch.no_grad():
            rec, out = _record(handle, model, b)
            packed = rec.trace(attention_mask=b["attention_mask"])
            assert packed.seq_lens.tolist() == [S - 2, S]
            with handle.replay(packed, attention_mask=b["attention_mask"]) as rep:
                out2 = model_logits(model, b)
        assert torch.equal(out, out2), pad
        assert all(s.live == 2 and s.replayed == B * S - 2 for s in rep.stats.values())


def test_every_installed_family_is_in_the_zoo():
    installed = set(hf.iter_families())
    missing = installed - set(FAMILIES) - set(getattr(hf_zoo, "NOT_FAMILIES", {}))
    assert not missing, (
        f"MoE families of transformers {transformers.__version__} missing from tests/hf_zoo.py: {sorted(missing)}"
    )


def test_group_limit_checked_at_replay_entry():
    """Group-limited routers (DeepSeek-V3) pick experts from at most topk_group of n_group groups:
    a trace that breaks the limit is refused at replay entry, naming the layer, row and groups."""
    import dataclasses

    from routereplay.core.errors import RouterSpecError
    from routereplay.core.trace import RoutingTrace

    model, _, state = _built("deepseek_v3")
    model.load_state_dict(state)
    handle = routereplay.attach(model)
    spec = handle.layers[1].spec
    try:
        assert (spec.n_group, spec.topk_group, handle.num_experts, handle.top_k) == (4, 2, 8, 2)
        experts = torch.zeros(B * S, 2, 2, dtype=torch.long)
        experts[:] = torch.tensor([0, 1])  # one group (groups of 2 experts)
        experts[3, 1] = torch.tensor([0, 2])  # groups 0 and 1
        trace = RoutingTrace(experts=experts, cu_seqlens=[0, S, 2 * S], layer_ids=handle.layer_ids, num_experts=8)
        handle.replay(trace)  # two groups are allowed by topk_group=2
        # A router allowing one group only (a tighter config of the same family) must refuse row 3.
        object.__setattr__(handle.layers[1], "spec", dataclasses.replace(spec, topk_group=1))
        with pytest.raises(
            RouterSpecError,
            match=r"^layer 2 \(model.layers.2.mlp.gate\): forced_TK row 3 holds expert ids \[0, 2\]: "
            r"they span 2 expert groups, the router allows "
            r"topk_group=1 of n_group=4 \(groups of 2\); the trace comes from a router with another group limit$",
        ):
            handle.replay(trace)
        # With a finite fill for dropped groups (DeepSeek-V2, Mistral-4) the router itself can pick
        # outside the kept groups, so the same trace is accepted (as routing.route accepts it).
        object.__setattr__(
            handle.layers[1], "spec", dataclasses.replace(spec, topk_group=1, group_mask_value=0.0)
        )
        handle.replay(trace)
    finally:
        object.__setattr__(handle.layers[1], "spec", spec)
        handle.detach()
