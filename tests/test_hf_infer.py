"""Router specs inferred by probing (routereplay.adapters.hf_infer), held against the hand table.

Per family of the zoo (16 experts, top-4, so that sorted and unsorted top-k differ on the CPU):
inference alone finds the hand-written spec, or one the hand spec cannot be told apart from on the
whole battery; the families with their own seam are the only exceptions, and at least 90 % of the
hand table is reproduced. Then: ergo and minicpm5_moe need no family code; a router class no table
can know (a renamed class under a new model_type) attaches and replays bit for bit; routers outside
the spec space, or whose forward the probe cannot call, are refused with the closest spec and the
first difference; results are cached per class and config.

Legend: B batch rows, S sequence length, N rows, H hidden size, E experts.
"""

from __future__ import annotations

import functools
import types
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import hf_zoo

import routereplay
from routereplay.adapters import hf, hf_infer, hf_specs
from routereplay.core.errors import UnsupportedRouterError


@functools.cache
def _first_router(family: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = hf_zoo.build(family, num_experts=16, top_k=4)
    routers = [(p, r) for p, r in hf.find_routers(model) if type(r).__name__ not in hf._HASH_ROUTERS]
    path, router = routers[0]
    return model, path, router, hf._text_config(model.config, router)


def _hand_families() -> list[str]:
    out = []
    for family in hf_zoo.FAMILIES:
        if hf_zoo.reason_skipped(family):
            continue
        class_name = _router_class_name(family)
        if class_name in hf_specs._BUILDERS:
            out.append(family)
    return out


@functools.cache
def _router_class_name(family: str) -> str:
    return type(_first_router(family)[2]).__name__


@pytest.mark.parametrize("family", _hand_families())
def test_hand_spec_is_what_inference_finds(family):
    _model, _path, router, config = _first_router(family)
    verdict, detail = hf_specs.check_override(router, config)
    if type(router).__name__ in hf_specs.FAMILY_SEAMS:
        assert verdict == "seam"
    else:
        assert verdict in ("same", "equivalent"), f"{family}: {verdict}: {detail}"


def test_inference_reproduces_at_least_90_percent_of_the_hand_table():
    families = _hand_families()
    verdicts = {f: hf_specs.check_override(_first_router(f)[2], _first_router(f)[3])[0] for f in families}
    reproduced = [f for f, v in verdicts.items() if v in ("same", "equivalent")]
    assert len(reproduced) / len(families) >= 0.9, verdicts
    # the rest are exactly the families whose seam is their own
    assert {_router_class_name(f) for f in families if f not in reproduced} == set(hf_specs.FAMILY_SEAMS)


@pytest.mark.parametrize("family", ["ergo", "minicpm5_moe", "kolibri1_1"])
def test_new_families_need_no_family_code(family):
    _model, _path, router, config = _first_router(family)
    assert type(router).__name__ not in hf_specs._BUILDERS
    rmath = hf_specs.router_math(router, config)
    assert rmath.inferred is not None and rmath.inferred.bias_attr == "e_score_correction_bias"


def test_ergo_rounds_weights_to_the_input_dtype_and_returns_fp32():
    """ErgoTopkRouter: ``weights.to(hidden.dtype).float()``: inference sees it in the bf16 probes."""
    _model, _path, router, config = _first_router("ergo")
    inferred = hf_infer.infer(router, config)
    assert inferred.spec.weights_dtype == "input" and inferred.upcast_weights


def _renamed_minicpm5():
    """MiniCPM5-MoE with its router class copied under a new name (not a subclass, in a module no
    table knows) and a new model_type."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _config = hf_zoo.build("minicpm5_moe")
    original = type(model.model.layers[1].mlp.gate)
    namespace = {k: v for k, v in vars(original).items() if k not in ("__dict__", "__weakref__")}
    namespace["__module__"] = "brand_new.modeling_brand_new"
    renamed = type("BrandNewRouter", (torch.nn.Module,), namespace)
    for module in model.modules():
        if type(module) is original:
            module.__class__ = renamed
    model_cls = type(
        "BrandNewForCausalLM",
        (type(model),),
        {
            "_can_record_outputs": {
                "router_logits": transformers.utils.output_capturing.OutputRecorder(renamed, index=0)
            },
            "__module__": "brand_new.modeling_brand_new",
        },
    )
    model.__class__ = model_cls
    model.config.model_type = "brand_new_moe"
    return model


def test_renamed_router_class_attaches_and_replays_bit_exactly():
    model = _renamed_minicpm5()
    assert type(model.model.layers[1].mlp.gate).__name__ == "BrandNewRouter"
    g = torch.Generator().manual_seed(0)
    b1 = torch.randint(3, 120, (2, 6), generator=g)
    b2 = torch.randint(3, 120, (2, 6), generator=g)
    with routereplay.attach(model) as handle, torch.no_grad():
        assert handle.layers[0].spec.n_group == 4 and handle.layers[0].spec.uses_bias
        plain = model(b1).logits
        with handle.record() as rec:
            recorded = model(b1).logits
        with handle.record() as rec2:
            model(b2)
        with handle.replay(rec.trace()):
            replayed = model(b1).logits
        with handle.replay(rec2.trace()):
            other = model(b1).logits
    assert torch.equal(recorded, plain) and torch.equal(replayed, plain)
    assert not torch.equal(other, plain)


class _AbsTopkRouter(torch.nn.Module):
    """Top-k over |logits|: no RouterSpec expresses it."""

    def __init__(self, hidden: int = 32, num_experts: int = 16, top_k: int = 4):
        super().__init__()
        self.top_k = top_k
        self.weight = torch.nn.Parameter(torch.randn(num_experts, hidden))

    def forward(self, hidden_states):
        logits_NE = torch.nn.functional.linear(hidden_states.reshape(-1, self.weight.shape[1]), self.weight)
        ids_NK = logits_NE.abs().topk(self.top_k, dim=-1).indices
        return logits_NE, torch.softmax(logits_NE, dim=-1).gather(1, ids_NK), ids_NK


def test_router_outside_the_space_is_refused_with_the_closest_spec():
    with pytest.raises(
        UnsupportedRouterError,
        match=r"^_AbsTopkRouter \(.*\): no RouterSpec reproduces this router bit for bit on the probe battery "
        r"\(\d+ probes\); closest: RouterSpec\(num_experts=16, top_k=4.*\), first difference: probe '.*', "
        r"ids differ at row \d+: router ids \[.*\], spec ids \[.*\]\. Add an override",
    ):
        hf_infer.infer(_AbsTopkRouter(), types.SimpleNamespace(hidden_size=32))


class _NeedsMask(_AbsTopkRouter):
    def forward(self, hidden_states, token_mask):
        return super().forward(hidden_states)


def test_forward_with_arguments_the_probe_cannot_give_is_refused():
    with pytest.raises(
        UnsupportedRouterError,
        match=r"^_NeedsMask \(.*\): its forward needs \['token_mask'\] besides the hidden states, which a probe "
        r"cannot supply; add an override in routereplay.adapters.hf_specs$",
    ):
        hf_infer.infer(_NeedsMask(), None)


class _LogitsOnly(_AbsTopkRouter):
    def forward(self, hidden_states):
        return super().forward(hidden_states)[0]


def test_router_returning_something_else_is_refused():
    with pytest.raises(
        UnsupportedRouterError,
        match=r"^_LogitsOnly \(.*\): returned a tensor \(32, 16\) torch.float32; inference needs \(router_logits "
        r"\[N, E\], weights \[N, K\], ids \[N, K\]\)",
    ):
        hf_infer.infer(_LogitsOnly(), types.SimpleNamespace(hidden_size=32))


def test_inference_is_cached_per_class_and_config():
    _model, _path, router, config = _first_router("minicpm5_moe")
    hf_infer.cache_clear()
    first = hf_infer.infer(router, config)
    assert hf_infer.infer(router, config) is first  # the same class, attributes and shapes
    twin = type(router).__new__(type(router))
    twin.__dict__.update(router.__dict__)
    twin.__dict__["routed_scaling_factor"] = 2.0  # another config value: probed anew
    second = hf_infer.infer(twin, config)
    assert second is not first and second.spec.scaling_factor == 2.0
    assert first.seconds > 0 and first.probes >= 20


def test_inferred_refusal_is_cached_and_raised_again():
    router = _AbsTopkRouter()
    cfg = types.SimpleNamespace(hidden_size=32)
    with pytest.raises(UnsupportedRouterError) as first:
        hf_infer.infer(router, cfg)
    with pytest.raises(UnsupportedRouterError) as again:
        hf_infer.infer(router, cfg)
    assert str(again.value) == str(first.value)


def test_hand_table_off_refuses_unknown_classes():
    _model, _path, router, config = _first_router("ergo")
    with pytest.raises(
        UnsupportedRouterError,
        match=r"^ErgoTopkRouter \(ergo\): no hand-written RouterSpec for router class ErgoTopkRouter "
        r".* inference is off$",
    ):
        hf_specs.spec_for_router(router, config, infer=False)
