"""PEFT LoRA on the MoE routers themselves (tiny Qwen3-MoE, OLMoE, DeepSeek-V3; CPU).

``LoraConfig(target_modules="all-linear")`` on transformers-5 MoE models puts a ``ParamWrapper``
where the MoE block calls its router (``mlp.gate``; the router becomes ``mlp.gate.base_layer``):
on every adapted forward it parametrizes the router's weight (the router's class is then torch's
generated ``Parametrized<Name>``) and returns the router's output unchanged. Contract here, with
the PEFT model's own forward as the oracle: attach finds the same layers as on the bare model;
record and replay of the same routes are bit-identical to the live PEFT forward, with ``[B, S]``
batch shapes; replaying other routes equals the family's own code forced to them; the routers'
LoRA A/B weights get non-zero gradients, checkpointed equal to plain; ``detach`` restores the PEFT
model exactly; ``generate`` capture gives per-sequence routes equal to a training forward's. LoRA
on a Linear inside the router (DBRX, JetMoE ``router.layer``) records, replays and trains too. A PEFT
layer that changes a router's output (``lora.Linear`` around Llama-4's ``nn.Linear`` router) is
refused at attach.

Legend: B batch rows, S sequence length, P padded prompt length, L MoE layers, K top-k.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="LoRA on the routers needs peft (pip install 'routereplay[dev]')")

import hf_zoo
from helpers import forced_topk
from peft.tuners.lora.layer import ParamWrapper
from torch.nn.utils import parametrize

import routereplay
from routereplay.adapters import hf, hf_specs
from routereplay.core.errors import UnsupportedModelError, UnsupportedRouterError
from routereplay.rl.store import DispatchTap

FAMILIES = ["qwen3_moe", "olmoe", "deepseek_v3"]
B, S = 2, 6


def _peft_model(family, *, dtype=torch.float32):
    """The zoo model with random (non-zero) LoRA adapters on every linear, routers included; eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = hf_zoo.build(family)
        torch.manual_seed(1)
        config = peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
        )
        pm = peft.get_peft_model(model, config).to(dtype).eval()
    return pm


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    mask_BS = torch.ones(B, S, dtype=torch.long)
    mask_BS[0, :2] = 0  # left padding
    return {"input_ids": torch.randint(3, 120, (B, S), generator=g), "attention_mask": mask_BS}


def _wrappers(pm, handle):
    """Each MoE layer's ParamWrapper (the module its MoE block calls): the case under test."""
    wrappers = [pm.get_base_model().get_submodule(layer.path) for layer in handle.layers]
    assert wrappers and all(isinstance(w, ParamWrapper) for w in wrappers), [type(w) for w in wrappers]
    return wrappers


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_sees_through_the_wrapper(family):
    pm = _peft_model(family)
    handle = routereplay.attach(pm.get_base_model())
    bare, _ = hf_zoo.build(family)
    want = routereplay.attach(bare)
    described = lambda h: [(m.layer_id, m.path, m.router_class, m.num_experts, m.top_k, m.spec) for m in h.layers]
    assert described(handle) == described(want)  # the paths the MoE blocks call, as on the bare model
    for layer, wrapper in zip(handle.layers, _wrappers(pm, handle), strict=True):
        assert type(hf.base_module(wrapper)).__name__ == layer.router_class
    assert all(handle.verifiable)  # the experts (PEFT-wrapped too) are seen through their wrappers
    handle.detach()
    with pytest.raises(
        UnsupportedModelError,
        match=r"^peft\.peft_model\.PeftModelForCausalLM is a PEFT wrapper, not the transformers model; attach the "
        r"model it wraps: routereplay\.attach\(peft_model\.get_base_model\(\)\)",
    ):
        routereplay.attach(pm)


@pytest.mark.parametrize("family", FAMILIES)
def test_record_replay_exact_against_the_live_peft_forward(family):
    pm = _peft_model(family)
    b, b_other = _batch(1), _batch(2)
    with torch.no_grad():
        live = pm(**b).logits  # not attached: the PEFT model's own forward
        handle = routereplay.attach(pm.get_base_model())
        _wrappers(pm, handle)
        with handle.record() as rec:
            recorded = pm(**b).logits
        # The shape hook sits on the MoE block (input [B, S, H]), not on the router's wrapper ([B * S, H]).
        assert rec.batch_shapes == [(B, S)]
        trace = rec.trace(attention_mask=b["attention_mask"])
        assert torch.equal(trace.seq_lens, b["attention_mask"].sum(1))
        with handle.replay(trace, attention_mask=b["attention_mask"], verify=True) as rep:
            replayed = pm(**b).logits
        real = int(b["attention_mask"].sum())  # padding rows route live
        assert [(s.disagreement, s.replayed) for s in rep.stats.values()] == [(0, real)] * len(handle.layers)
        # Other routes (another batch's live routes, valid by construction), forced on this batch.
        with handle.record() as rec_o:
            pm(input_ids=b_other["input_ids"])
        other = rec_o.trace()
        tap = DispatchTap(handle)  # what the (PEFT-wrapped) experts modules receive
        assert tap.observed_at == ["experts input"] * len(handle.layers)
        with tap, handle.replay(other, verify=True):
            forced = pm(input_ids=b["input_ids"]).logits
        assert torch.equal(tap.trace().experts, other.experts)
        handle.detach()
        with forced_topk(pm.get_base_model(), handle, [other.experts[:, l].long() for l in range(len(handle.layers))]):
            reference = pm(input_ids=b["input_ids"]).logits  # the family's own routing code, LoRA applied
        unforced = pm(input_ids=b["input_ids"]).logits
    assert torch.equal(recorded, live) and torch.equal(replayed, live)
    assert not torch.allclose(forced, unforced)  # the forced routes were used
    torch.testing.assert_close(forced, reference, rtol=1e-5, atol=1e-6)


def _router_lora_grads(wrappers):
    return [(w.lora_A["default"].weight.grad, w.lora_B["default"].weight.grad) for w in wrappers]


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_gradients_reach_the_router_lora_and_checkpointing_is_exact(family):
    pm = _peft_model(family)
    base = pm.get_base_model()
    b, b_other = _batch(1), _batch(2)
    handle = routereplay.attach(base)
    wrappers = _wrappers(pm, handle)
    with torch.no_grad(), handle.record() as rec:
        pm(**b_other)
    other = rec.trace()  # every row, padding too: the forced reference below needs all B * S
    pm.train()

    def grads(checkpointed):
        pm.zero_grad(set_to_none=True)
        if checkpointed:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with handle.replay(other):
            pm(**b).logits.square().mean().backward()
        if checkpointed:
            base.gradient_checkpointing_disable()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}, _router_lora_grads(wrappers)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, router_grads = grads(False)
        checkpointed, _ = grads(True)
    for a_grad, b_grad in router_grads:
        assert a_grad is not None and b_grad is not None
        assert a_grad.abs().sum() > 0 and b_grad.abs().sum() > 0
    assert plain.keys() == checkpointed.keys()
    assert [n for n in plain if not torch.equal(plain[n], checkpointed[n])] == []
    # The same gradients as the family's own code forced to these routes (an independent graph).
    handle.detach()
    pm.zero_grad(set_to_none=True)
    with forced_topk(base, handle, [other.experts[:, l].long() for l in range(len(handle.layers))]):
        pm(**b).logits.square().mean().backward()
    for (a_want, b_want), (a_got, b_got) in zip(router_grads, _router_lora_grads(wrappers), strict=True):
        torch.testing.assert_close(a_got, a_want, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(b_got, b_want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_detach_restores_the_peft_model(family):
    pm = _peft_model(family)
    b = _batch(1)
    hooks = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m.__dict__), type(m)) for m in pm.modules()]
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    before = hooks()
    with torch.no_grad():
        live = pm(**b).logits
        handle = routereplay.attach(pm.get_base_model())
        with handle.record() as rec:
            pm(**_batch(2))
        with handle.replay(rec.trace()):
            pm(**b)
        handle.detach()
        after = pm(**b).logits
    assert hooks() == before
    assert state.keys() == pm.state_dict().keys()
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in state.items())
    assert torch.equal(after, live)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_capture_has_per_sequence_shapes(family):
    # float64: the prefill + decode steps and the full training forward then pick the same experts.
    pm = _peft_model(family, dtype=torch.float64)
    pm.get_base_model().set_experts_implementation("eager")  # grouped_mm has no float64 CPU path
    handle = routereplay.attach(pm.get_base_model())
    _wrappers(pm, handle)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    P, G = max(map(len, prompts)), 4
    ids_BP = torch.zeros(len(prompts), P, dtype=torch.long)
    mask_BP = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_BP[i, P - len(p) :], mask_BP[i, P - len(p) :] = torch.tensor(p), 1
    with torch.no_grad(), handle.capture_generation() as cap:
        out = pm.generate(
            input_ids=ids_BP,
            attention_mask=mask_BP,
            do_sample=False,
            max_new_tokens=G,
            min_new_tokens=G,
            pad_token_id=0,
        )
    assert cap.recording.batch_shapes == [(len(prompts), P)] + [(len(prompts), 1)] * (G - 1)
    rollout = cap.rollout(out, prompt_attention_mask=mask_BP, eos_token_id=None, pad_token_id=None)
    assert rollout.trace.seq_lens.tolist() == [len(p) + G - 1 for p in prompts]
    batch = rollout.padded(padding_side="right")
    with torch.no_grad(), handle.record() as rec:
        pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
    train = rec.trace(attention_mask=batch["attention_mask"])
    rows = rollout.training_trace()
    assert torch.equal(rows.seq_lens, train.seq_lens)
    assert torch.equal(rows.experts[rows.valid_mask], train.experts[rows.valid_mask])


class _Scale(torch.nn.Module):
    def forward(self, weight):
        return 1.5 * weight


def test_parametrized_router_without_peft():
    """A router parametrized for good (torch.nn.utils.parametrize, no PEFT): its spec is its original class's."""
    model, _ = hf_zoo.build("deepseek_v3")
    router = model.model.layers[1].mlp.gate
    cls = type(router)
    want = hf_specs.spec_for_router(router, model.config)
    parametrize.register_parametrization(router, "weight", _Scale())
    assert type(router) is not cls and hf_specs.router_class(router) is cls
    assert hf_specs.spec_for_router(router, model.config) == want
    assert torch.equal(hf_specs.selection_bias(router), router.e_score_correction_bias)
    b = _batch(1)
    with torch.no_grad():
        live = model(**b).logits
        handle = routereplay.attach(model)
        assert handle.layers[0].router_class == cls.__name__
        with handle.record() as rec:
            pm_out = model(**b).logits
        with handle.replay(rec.trace(), verify=True):
            replayed = model(**b).logits
    assert torch.equal(pm_out, live) and torch.equal(replayed, live)
    handle.detach()


def test_peft_layer_that_changes_the_router_output_is_refused():
    """Llama-4's router is an nn.Linear: "all-linear" wraps it in lora.Linear, which adds its delta to the
    router's (scores, logits) output; neither the recorded nor the replayed ids would reach the experts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = hf_zoo.build("llama4")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    base = pm.get_base_model()
    hooks = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m.__dict__)) for m in pm.modules()]
    before = hooks()
    with pytest.raises(
        UnsupportedRouterError,
        match=r"^llama4_text: router model\.layers\.0\.feed_forward\.router\.base_layer \(Llama4Router\) is wrapped by "
        r"the PEFT layer model\.layers\.0\.feed_forward\.router \(peft\.tuners\.lora\.layer\.Linear\), whose output is "
        r"the router's output changed by its adapter, so the ids the experts get could not be recorded or replayed; "
        r"leave the router out of target_modules "
        r"\(LoraConfig\(exclude_modules=\.\.\.\)\), or put LoRA on its weight instead "
        r"\(LoraConfig\(target_parameters=\['router\.weight'\]\)\)$",
    ):
        routereplay.attach(base)
    assert hooks() == before
    # The fix the message names: the router left out of target_modules, LoRA on its weight instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = hf_zoo.build("llama4")
        config = peft.LoraConfig(
            r=4,
            target_modules="all-linear",
            exclude_modules=["router"],
            target_parameters=["router.weight"],
            init_lora_weights=False,
        )
        pm = peft.get_peft_model(model, config).eval()
    b = _batch(1)
    with torch.no_grad():
        live = pm(**b).logits
        handle = routereplay.attach(pm.get_base_model())
        _wrappers(pm, handle)
        with handle.record() as rec:
            recorded = pm(**b).logits
        with handle.replay(rec.trace()):
            replayed = pm(**b).logits
    assert torch.equal(recorded, live) and torch.equal(replayed, live)
    handle.detach()


@pytest.mark.parametrize(("family", "linear"), [("dbrx", "layer"), ("jetmoe", "layer")])
def test_lora_on_a_linear_inside_the_router(family, linear):
    """Routers that compute their logits with an nn.Linear child: "all-linear" wraps that child in a
    lora.Linear and leaves the router module itself as it is."""
    pm = _peft_model(family)
    base = pm.get_base_model()
    b, b_other = _batch(1), _batch(2)
    with torch.no_grad():
        live = pm(**b).logits
        handle = routereplay.attach(base)
        routers = [base.get_submodule(layer.path) for layer in handle.layers]
        inner = [getattr(r, linear) for r in routers]
        assert all(type(r).__name__ == m.router_class for r, m in zip(routers, handle.layers, strict=True))
        assert all(isinstance(x, peft.tuners.lora.Linear) for x in inner)  # the case under test
        with handle.record() as rec:
            recorded = pm(**b).logits
        with handle.replay(rec.trace()):
            replayed = pm(**b).logits
        with handle.record() as rec_o:
            pm(**b_other)
    assert torch.equal(recorded, live) and torch.equal(replayed, live)
    pm.train()
    with handle.replay(rec_o.trace()):
        pm(**b).logits.square().mean().backward()
    for x in inner:
        assert x.lora_A["default"].weight.grad.abs().sum() > 0 and x.lora_B["default"].weight.grad.abs().sum() > 0
    handle.detach()
