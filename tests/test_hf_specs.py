"""RouterSpec of every HF MoE family against the router's own output, bit for bit.

For every family of the tiny-model zoo and every router class in it: random hidden states go
through the router; ``route`` (live) must give the router's ids and weights exactly, ``route``
with the router's ids forced must give the same weights exactly, and other random valid forced ids
must give weights equal to an independent float64 reference. Families that cannot be replayed
assert the precise UnsupportedRouterError.

Legend: T tokens, E logits per token, K top-k, D hidden size.
"""

from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch

if importlib.util.find_spec("transformers") is None:  # pragma: no cover - CI installs it
    pytest.skip("transformers is not installed: pip install 'routereplay[hf]'", allow_module_level=True)

import hf_zoo
from helpers import random_valid_ids, reference_weights

from routereplay.adapters import hf_specs
from routereplay.adapters.hf_specs import (
    is_supported_router,
    router_math,
    selection_bias,
    spec_for_router,
    unsupported_reason,
)
from routereplay.core.errors import RouterSpecError, UnsupportedRouterError
from routereplay.core.routing import mask_zero_experts, route

_NUM_TOKENS = 24

# Router classes that the zoo's families contain, and the routers refused (class -> reason match).
# the classes the one table refuses or leaves out of traces, with the reason it gives
_UNSUPPORTED_MATCH = {**hf_specs.REFUSED, **hf_specs.SKIPPED}


def _router_classes(model: torch.nn.Module) -> set[str]:
    """Router classes the model declares for ``output_router_logits`` (no name guessing)."""
    names = set()
    for module in model.modules():
        spec = getattr(module, "_can_record_outputs", None) or {}
        recorder = spec.get("router_logits")
        for item in recorder if isinstance(recorder, (list, tuple)) else [recorder]:
            target = getattr(item, "target_class", item)
            if isinstance(target, type):
                names.add(target.__name__)
    return names


def _routers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    classes = _router_classes(model) | set(_UNSUPPORTED_MATCH)
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in classes or is_supported_router(module):
            found.append((name, module))
    return found


def _parent(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _as_loaded_in(model, name: str, router: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``router`` as ``from_pretrained(dtype=...)`` would load it.

    Tensors named in the model's ``_keep_in_fp32_modules(_strict)`` stay fp32, the rest take
    ``dtype``. The MoE block (biases passed in as arguments) is left as built.
    """
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    )
    patterns = [re.compile(rf"(^|\.){re.escape(k)}($|\.)") for k in keep]
    router = copy.deepcopy(router)
    for local, tensor in [*router.named_parameters(), *router.named_buffers()]:
        if tensor.is_floating_point() and not any(p.search(f"{name}.{local}") for p in patterns):
            tensor.data = tensor.data.to(dtype)
    return router


def _hidden_size(config) -> int:
    return int(getattr(config, "hidden_size", None) or config.d_model)


def _call_router(model, name, router, config, hidden_TD):
    """Run the router as its MoE block does; return (args, kwargs, logits_TE, weights_TK, ids_TK)."""
    cls = type(router).__name__
    parent = _parent(model, name)
    args: tuple = (hidden_TD,)
    if cls == "AfmoeTokenChoiceRouter":
        args = (hidden_TD.unsqueeze(0), parent.expert_bias)
    elif cls in ("HYV3TopKRouter", "MiniMaxM2TopKRouter"):
        args = (hidden_TD, parent.e_score_correction_bias)
    elif cls == "Lfm2MoeTopKRouter":
        args = (hidden_TD, parent.expert_bias if router.use_expert_bias else None)
    elif cls == "ZayaRouter":
        args = (hidden_TD.unsqueeze(0), None)
    with torch.no_grad():
        out = router(*args)
    if cls == "DbrxRouter":
        logits_TE = out
        weights_TK, ids_TK = parent.route_tokens_to_experts(logits_TE)
    elif cls == "Llama4Router":
        scores_TE, logits_TE = out
        ids_TK = torch.topk(logits_TE, router.top_k, dim=1)[1]
        weights_TK = scores_TE.gather(1, ids_TK)
        # the dense scores must hold nothing outside the top-k
        rest_TE = scores_TE.scatter(1, ids_TK, 0.0)
        assert not rest_TE.any()
    elif cls == "JetMoeTopKGating":
        index_sorted, _batch_index, batch_gates, expert_size, logits_TE = out
        k = router.top_k
        weights_flat = torch.empty_like(batch_gates)
        weights_flat[index_sorted] = batch_gates
        ids_sorted = torch.repeat_interleave(torch.arange(len(expert_size)), torch.tensor(expert_size))
        ids_flat = torch.empty_like(ids_sorted)
        ids_flat[index_sorted] = ids_sorted
        weights_TK, ids_TK = weights_flat.view(-1, k), ids_flat.view(-1, k)
    else:
        logits_TE, weights_TK, ids_TK = out[0], out[1], out[2]
    return args, {}, logits_TE, weights_TK, ids_TK


def _cases():
    for family in hf_zoo.FAMILIES:
        reason = hf_zoo.reason_skipped(family)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(family, marks=marks, id=family)


@pytest.fixture(scope="module")
def zoo_cache():
    return {}


def _built(zoo_cache, family):
    if family not in zoo_cache:
        # 16 experts, top-4: enough for torch.topk(sorted=False) to reorder ids on the CPU, so a
        # wrong ``topk_sorted`` in a spec fails here (with top-2 of 8 both orders agree)
        zoo_cache[family] = hf_zoo.build(family, seed=0, num_experts=16, top_k=4)
    return zoo_cache[family]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(_cases()))
def test_router_spec_matches_router(family, dtype, zoo_cache):
    model, config = _built(zoo_cache, family)
    routers = _routers(model)
    assert routers, f"{family}: no router module found"
    gen = torch.Generator().manual_seed(1234)
    checked = 0
    for name, router in routers:
        if dtype != torch.float32:
            router = _as_loaded_in(model, name, router, dtype)
        cls = type(router).__name__
        if cls in _UNSUPPORTED_MATCH:
            with pytest.raises(UnsupportedRouterError, match=re.escape(_UNSUPPORTED_MATCH[cls])):
                spec_for_router(router, config)
            assert _UNSUPPORTED_MATCH[cls] in unsupported_reason(router)
            continue
        # the hand table's spec, or the inferred one for a class it does not name (ergo, minicpm5_moe, ...)
        rmath = router_math(router, config)
        spec = rmath.spec
        hidden_TD = torch.randn(_NUM_TOKENS, _hidden_size(config), generator=gen).to(dtype)
        args, kwargs, logits_TE, weights_TK, ids_TK = _call_router(model, name, router, config, hidden_TD)
        bias_E = rmath.bias(router, args, kwargs)
        scale_E = rmath.expert_scale(router)
        common = {"bias_E": bias_E, "expert_scale_E": scale_E, "out_dtype": hidden_TD.dtype, "where": f"{name}: "}

        live_w, live_ids = route(logits_TE, spec, **common)
        live_w, live_ids = mask_zero_experts(live_w, live_ids, spec)
        if rmath.upcast_weights:  # the router returns them wider (ergo: rounded to bf16, returned fp32)
            live_w = live_w.to(weights_TK.dtype)
        assert torch.equal(live_ids, ids_TK.long()), f"{family} {name}: live ids differ"
        assert live_w.dtype == weights_TK.dtype, f"{family} {name}: dtype {live_w.dtype} != {weights_TK.dtype}"
        assert torch.equal(live_w, weights_TK), f"{family} {name}: live weights differ"

        if spec.zero_expert_mode == "keep":
            forced_w, forced_ids = route(logits_TE, spec, forced_TK=ids_TK, **common)
            forced_w = forced_w.to(weights_TK.dtype) if rmath.upcast_weights else forced_w
            assert torch.equal(forced_ids, ids_TK.long())
            assert torch.equal(forced_w, weights_TK), f"{family} {name}: forced weights differ"
        # zero_expert_mode == "mask" (zaya): the router's output lost the skip id; the live test
        # above and the random-id test below cover the spec.

        other_TK = random_valid_ids(spec, _NUM_TOKENS, gen)
        got_w, _ = route(logits_TE, spec, forced_TK=other_TK, **common)
        want_w = reference_weights(logits_TE, other_TK, spec, bias_E=bias_E, expert_scale_E=scale_E)
        tol = {"rtol": 1e-5, "atol": 1e-6} if got_w.dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
        torch.testing.assert_close(got_w.double(), want_w, **tol)
        checked += 1
    # every family has at least one router exercised or refused; doge etc. have only refused ones
    assert checked or all(type(r).__name__ in _UNSUPPORTED_MATCH for _, r in routers)


def test_bias_argument_is_required_where_the_block_passes_it(zoo_cache):
    model, _ = _built(zoo_cache, "afmoe")
    router = next(m for _, m in _routers(model) if type(m).__name__ == "AfmoeTokenChoiceRouter")
    with pytest.raises(RouterSpecError, match=r"forward argument 'expert_bias' \(position 1\)"):
        selection_bias(router)


def test_unknown_router_class_goes_to_inference_which_refuses_what_it_cannot_probe():
    class MyRouter(torch.nn.Module):
        pass

    with pytest.raises(
        UnsupportedRouterError,
        match=r"^MyRouter \(.*\): cannot tell its input width \(no hidden_dim attribute, no config.hidden_size, no 2-D "
        r"weight\); a RouterSpec cannot be inferred, add an override in routereplay.adapters.hf_specs$",
    ):
        spec_for_router(MyRouter(), None)


def test_every_discovered_moe_type_is_a_family_or_explained():
    found = {hf_zoo.FAMILY_OF.get(t, t) for t in hf_zoo.discover_moe_model_types()}
    unexplained = found - set(hf_zoo.FAMILIES) - set(hf_zoo.NOT_FAMILIES)
    assert not unexplained, f"MoE model types not covered by the zoo: {sorted(unexplained)}"
    missing = set(hf_zoo.FAMILIES) - set(found) - set(hf_zoo.UNDISCOVERABLE)
    assert not missing, f"zoo families the registry scan does not find: {sorted(missing)}"


def test_family_seams_are_the_adapters_installer_table():
    """hf_specs.FAMILY_SEAMS (inference does not apply) names exactly the classes whose seam the HF
    adapter installs with a family-specific installer."""
    from routereplay.adapters import hf

    assert set(hf._SEAMS) == set(hf_specs.FAMILY_SEAMS)
