"""routereplay.core.routing: live routing, replay with forced ids, validation, Megatron parity.

Legend: T tokens, E logits per token, K top-k, G expert groups.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch
from helpers import VARIANTS, random_valid_ids, reference_weights, routing_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routereplay.core.errors import RouterSpecError
from routereplay.core.routing import RouterSpec, mask_zero_experts, route

# --- fixed variants: every branch of the pipeline --------------------------------------------
E, K = 16, 4




@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forcing_live_ids_reproduces_live_weights_bitwise(variant, dtype):
    spec = VARIANTS[variant]
    logits_TE, kwargs, _ = routing_inputs(spec, dtype, seed=1)
    live_w, live_ids = route(logits_TE, spec, **kwargs)
    assert live_ids.dtype == torch.int64 and live_ids.shape == (64, spec.top_k)
    forced_w, forced_ids = route(logits_TE, spec, forced_TK=live_ids.to(torch.int16), **kwargs)
    assert torch.equal(forced_ids, live_ids)
    assert forced_w.dtype == live_w.dtype
    assert torch.equal(forced_w, live_w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forced_other_ids_match_float64_reference(variant, dtype):
    spec = VARIANTS[variant]
    logits_TE, kwargs, gen = routing_inputs(spec, dtype, seed=2)
    forced_TK = random_valid_ids(spec, logits_TE.shape[0], gen)
    got_w, got_ids = route(logits_TE, spec, forced_TK=forced_TK, **kwargs)
    assert torch.equal(got_ids, forced_TK)
    want_w = reference_weights(
        logits_TE, forced_TK, spec, bias_E=kwargs.get("bias_E"), expert_scale_E=kwargs.get("expert_scale_E")
    )
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 1e-2}
    torch.testing.assert_close(got_w.double(), want_w, **tol)


def test_live_selection_is_the_top_k_of_the_choice():
    # independent check of the live selection: plain top-k of softmax scores, in ranked order
    spec = VARIANTS["softmax_pre"]
    logits_TE, kwargs, _ = routing_inputs(spec, torch.float32, seed=3)
    _, ids_TK = route(logits_TE, spec, **kwargs)
    assert torch.equal(ids_TK, logits_TE.topk(spec.top_k, dim=1)[1])


def test_live_group_limited_selection_respects_the_groups():
    spec = VARIANTS["sigmoid_bias_groups"]
    logits_TE, kwargs, _ = routing_inputs(spec, torch.float32, seed=4)
    _, ids_TK = route(logits_TE, spec, **kwargs)
    groups_TK = ids_TK // spec.group_size
    distinct_T = torch.tensor([len(set(row)) for row in groups_TK.tolist()])
    assert int(distinct_T.max()) <= spec.topk_group
    # and the bias changes the selection (so a test that ignores it would fail)
    kwargs_big = dict(kwargs, bias_E=torch.linspace(-5, 5, spec.num_logits))
    _, biased_TK = route(logits_TE, spec, **kwargs_big)
    assert not torch.equal(biased_TK, ids_TK)


@pytest.mark.parametrize("variant", ["softmax_pre_norm", "softmax_post", "sigmoid_bias_groups", "expert_scale"])
def test_gradient_reaches_logits_through_forced_weights(variant):
    spec = VARIANTS[variant]
    logits_TE, kwargs, gen = routing_inputs(spec, torch.float32, seed=5, num_tokens=8)
    logits_TE.requires_grad_(True)
    forced_TK = random_valid_ids(spec, 8, gen)
    weights_TK, _ = route(logits_TE, spec, forced_TK=forced_TK, **kwargs)
    upstream_TK = torch.randn(weights_TK.shape, generator=gen)
    (weights_TK * upstream_TK).sum().backward()
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0
    # float64 check of the same derivative (softmax/sigmoid Jacobians, through the gather)
    x = logits_TE.detach().double().requires_grad_(True)
    want = reference_weights(x, forced_TK, spec, expert_scale_E=kwargs.get("expert_scale_E"))
    (want * upstream_TK.double()).sum().backward()
    torch.testing.assert_close(logits_TE.grad.double(), x.grad, rtol=1e-4, atol=1e-6)


def test_forced_mask_routes_unmasked_rows_live():
    spec = VARIANTS["sigmoid_bias_groups"]
    logits_TE, kwargs, gen = routing_inputs(spec, torch.float32, seed=6)
    live_w, live_ids = route(logits_TE, spec, **kwargs)
    forced_TK = random_valid_ids(spec, 64, gen)
    mask_T = torch.arange(64) % 3 != 0
    # rows routed live may hold anything (an engine capture stores zeros there): not validated
    forced_TK[~mask_T] = 0
    w, ids = route(logits_TE, spec, forced_TK=forced_TK, forced_mask_T=mask_T, **kwargs)
    assert torch.equal(ids[mask_T], forced_TK[mask_T])
    assert torch.equal(ids[~mask_T], live_ids[~mask_T])
    assert torch.equal(w[~mask_T], live_w[~mask_T])
    only_forced_w, _ = route(logits_TE, spec, forced_TK=forced_TK.where(mask_T[:, None], live_ids), **kwargs)
    assert torch.equal(w, only_forced_w)


def test_mask_zero_experts():
    spec = VARIANTS["zero_experts_mask"]
    weights_TK = torch.tensor([[0.75], [0.25]])
    experts_TK = torch.tensor([[spec.num_experts], [3]])
    w, ids = mask_zero_experts(weights_TK, experts_TK, spec)
    assert w.tolist() == [[0.0], [0.25]] and ids.tolist() == [[0], [3]]
    keep = VARIANTS["zero_experts_keep"]
    assert mask_zero_experts(weights_TK, experts_TK, keep) == (weights_TK, experts_TK)


# --- validation messages -------------------------------------------------------------------------
def _forced_inputs():
    """sigmoid_bias_groups (16 experts, top-4, 4 groups, topk_group=2): route bound to 6 tokens'
    logits and bias, and 6 rows of valid forced ids."""
    spec = VARIANTS["sigmoid_bias_groups"]
    logits_TE, kwargs, gen = routing_inputs(spec, torch.float32, seed=7, num_tokens=6)
    return functools.partial(route, logits_TE, spec, **kwargs), random_valid_ids(spec, 6, gen)


def _with_row(ids_TK, index, value):
    out = ids_TK.clone()
    out[index] = value
    return out


# (route, ok_TK) of _forced_inputs
FORCED_ERRORS = [
    pytest.param(
        lambda route_, ok: route_(forced_TK=_with_row(ok, (4, 1), 16), where="layer 3: "),
        RouterSpecError,
        r"layer 3: forced_TK row 4 holds expert ids \[.*16.*\]: expected ids in \[0, 16\)",
        id="id-out-of-range",
    ),
    pytest.param(
        lambda route_, ok: route_(forced_TK=_with_row(ok, (2, 1), ok[2, 0])),
        RouterSpecError,
        r"row 2 holds .*an expert repeats; each row needs top_k=4 distinct",
        id="repeated-expert",
    ),
    pytest.param(
        lambda route_, ok: route_(forced_TK=_with_row(ok, 5, torch.tensor([0, 4, 8, 12]))),
        RouterSpecError,
        r"row 5 .*span 4 expert groups, the router allows topk_group=2 of n_group=4",
        id="too-many-groups",
    ),
    pytest.param(
        lambda route_, ok: route_(forced_TK=ok[:, :3]),
        RouterSpecError,
        r"forced_TK must be \[6, 4\] .*found \(6, 3\)",
        id="forced-shape",
    ),
    pytest.param(
        lambda route_, ok: route_(forced_TK=ok.float()),
        RouterSpecError,
        "forced_TK must be an integer tensor, found torch.float32",
        id="forced-dtype",
    ),
    pytest.param(
        lambda route_, ok: route_(forced_TK=ok, forced_mask_T=torch.ones(6)),
        RouterSpecError,
        r"forced_mask_T must be bool \[6\]",
        id="mask-dtype",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), FORCED_ERRORS)
def test_forced_validation_messages(call, error, match):
    inputs = _forced_inputs()
    with pytest.raises(error, match=match):
        call(*inputs)


def test_forced_validation_is_skipped_with_validate_false():
    # validate=False skips the data checks (the trace was validated once, up front)
    route_, ok_TK = _forced_inputs()
    dup = _with_row(ok_TK, (2, 1), ok_TK[2, 0])
    _, ids = route_(forced_TK=dup, validate=False)
    assert torch.equal(ids, dup)


def _input_inputs():
    """(logits_TE, spec, kwargs): 4 tokens of sigmoid_bias_groups; kwargs holds its bias."""
    spec = VARIANTS["sigmoid_bias_groups"]
    logits_TE, kwargs, _ = routing_inputs(spec, torch.float32, seed=8, num_tokens=4)
    return logits_TE, spec, kwargs


# (logits_TE, spec, kwargs) of _input_inputs
INPUT_ERRORS = [
    pytest.param(lambda x, spec, kw: route(x, spec), RouterSpecError, "needs bias_E", id="no-bias"),
    pytest.param(
        lambda x, spec, kw: route(x[:, :12], spec, **kw),
        RouterSpecError,
        r"logits have 12 columns, the spec expects num_logits=16",
        id="logits-width",
    ),
    pytest.param(
        lambda x, spec, kw: route(x, spec, bias_E=torch.zeros(8)),
        RouterSpecError,
        r"bias_E must be \[16\], found \(8,\)",
        id="bias-shape",
    ),
    pytest.param(
        lambda x, spec, kw: route(x, VARIANTS["softmax_post_f32"]),
        RouterSpecError,
        "pass out_dtype=hidden_states.dtype",
        id="no-out-dtype",
    ),
    pytest.param(
        lambda x, spec, kw: route(x, spec, forced_mask_T=torch.ones(4, dtype=torch.bool), **kw),
        RouterSpecError,
        "forced_mask_T was given without forced_TK",
        id="mask-without-forced",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), INPUT_ERRORS)
def test_input_validation_messages(call, error, match):
    inputs = _input_inputs()
    with pytest.raises(error, match=match):
        call(*inputs)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"num_experts": 0, "top_k": 1}, "num_experts must be a positive int, found 0"),
        ({"num_experts": 8, "top_k": 9}, r"top_k must be at most num_logits \(8\)"),
        ({"num_experts": 8, "top_k": 2, "n_group": 4}, "n_group and topk_group go together"),
        (
            {"num_experts": 8, "top_k": 2, "n_group": 3, "topk_group": 1},
            r"n_group must be a divisor of num_experts \(8\)",
        ),
        (
            {"num_experts": 8, "top_k": 5, "n_group": 4, "topk_group": 2},
            r"top_k must be at most topk_group \* group size \(4\)",
        ),
        ({"num_experts": 8, "top_k": 2, "score_function": "relu"}, "score_function must be one of"),
        ({"num_experts": 8, "top_k": 2, "num_logits": 4}, "num_logits must be an int >= num_experts"),
        (
            {"num_experts": 8, "top_k": 2, "zero_expert_mode": "mask"},
            "zero_expert_mode='mask' needs num_logits > num_experts",
        ),
        ({"num_experts": 8, "top_k": 2, "score_before_topk": False, "uses_bias": True}, "set bias_on='logits'"),
        ({"num_experts": 8, "top_k": 2, "scaling_factor": math.inf}, "scaling_factor must be a finite float"),
        ({"num_experts": 8, "top_k": 2, "compute_dtype": torch.int32}, "compute_dtype must be a floating torch.dtype"),
    ],
)
def test_spec_validation(fields, match):
    with pytest.raises(RouterSpecError, match=match):
        RouterSpec(**fields)


def test_spec_is_frozen():
    spec = VARIANTS["softmax_pre"]
    with pytest.raises(AttributeError):
        spec.top_k = 3  # type: ignore[misc]
    assert spec.num_logits == spec.num_experts


# --- property-based: random specs ----------------------------------------------------------------
@st.composite
def specs(draw):
    num_experts = draw(st.sampled_from([4, 6, 8, 12, 16]))
    score_before = draw(st.booleans())
    score_function = draw(st.sampled_from(["softmax", "sigmoid"] + (["sqrtsoftplus"] if score_before else [])))
    groups = draw(st.booleans()) and num_experts % 2 == 0
    fields = {}
    if groups:
        n_group = draw(st.sampled_from([d for d in (2, 3, 4) if num_experts % d == 0]))
        topk_group = draw(st.integers(1, n_group))
        group_size = num_experts // n_group
        fields |= {
            "n_group": n_group,
            "topk_group": topk_group,
            "group_score_topn": draw(st.integers(1, group_size)),
            "group_mask_value": draw(st.sampled_from([float("-inf"), 0.0])),
        }
        max_k = topk_group * group_size
    else:
        max_k = num_experts
    uses_bias = draw(st.booleans())
    return RouterSpec(
        num_experts=num_experts,
        top_k=draw(st.integers(1, max_k)),
        score_function=score_function,
        score_before_topk=score_before,
        norm_topk_prob=draw(st.booleans()),
        norm_eps=draw(st.sampled_from([0.0, 1e-20, 1e-6])),
        scaling_factor=draw(st.sampled_from([1.0, 2.5, 0.5])),
        uses_bias=uses_bias,
        bias_on="scores" if score_before else "logits",
        compute_dtype=draw(st.sampled_from([None, torch.float32])),
        cast_scores=draw(st.booleans()),
        weights_dtype=draw(st.sampled_from(["keep", "logits"])),
        topk_sorted=draw(st.booleans()),
        **fields,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_property_replay_of_live_ids_is_exact_and_others_match_reference(spec, dtype, seed):
    logits_TE, kwargs, gen = routing_inputs(spec, dtype, seed=seed, num_tokens=16)
    live_w, live_ids = route(logits_TE, spec, **kwargs)
    # live ids obey the spec: distinct per row, in range, within topk_group groups
    sorted_TK = live_ids.sort(dim=1).values
    assert not (sorted_TK[:, 1:] == sorted_TK[:, :-1]).any()
    assert int(live_ids.max()) < spec.num_logits
    if spec.n_group is not None and spec.group_mask_value == float("-inf"):
        for row in (live_ids // spec.group_size).tolist():
            assert len(set(row)) <= spec.topk_group
    forced_w, _ = route(logits_TE, spec, forced_TK=live_ids, **kwargs)
    assert torch.equal(forced_w, live_w)

    other_TK = random_valid_ids(spec, 16, gen)
    got_w, _ = route(logits_TE, spec, forced_TK=other_TK, **kwargs)
    want_w = reference_weights(logits_TE, other_TK, spec)
    low = dtype == torch.bfloat16 and (spec.cast_scores or spec.compute_dtype is None or spec.weights_dtype == "logits")
    tol = {"rtol": 3e-2, "atol": 1e-2} if low else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got_w.double(), want_w, **tol)


# --- Megatron-Core parity --------------------------------------------------------------------------
def _megatron():
    if importlib.util.find_spec("megatron") is None:
        pytest.skip("megatron-core is not installed: pip install 'routereplay[megatron]'")
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    return moe_utils, RouterReplay, RouterReplayAction


def _megatron_spec(num_experts, top_k, score_function, pre, num_groups, group_topk, scaling, with_bias):
    """The RouterSpec with Megatron-Core 0.16's semantics (see routing's module docstring)."""
    sigmoid = score_function == "sigmoid"
    groups = {}
    if group_topk:
        groups = {"n_group": num_groups, "topk_group": group_topk, "group_score_topn": top_k // group_topk}
    return RouterSpec(
        num_experts=num_experts,
        top_k=top_k,
        score_function=score_function,
        score_before_topk=pre or sigmoid,
        compute_dtype=torch.float32,
        cast_scores=True,
        norm_topk_prob=sigmoid and top_k > 1,
        norm_eps=1e-20,
        scaling_factor=scaling or 1.0,
        uses_bias=with_bias,
        **groups,
    )


MEGATRON_CASES = {
    "softmax_topk_then_softmax": ("softmax", False, None, None, None, False),
    "softmax_first": ("softmax", True, None, None, None, False),
    "softmax_first_groups_scaled": ("softmax", True, 4, 2, 2.0, False),
    "sigmoid_bias": ("sigmoid", True, None, None, None, True),
    "sigmoid_bias_groups_scaled": ("sigmoid", True, 4, 2, 2.5, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(MEGATRON_CASES))
def test_megatron_parity_live_and_replay_forward(case, dtype):
    moe_utils, RouterReplay, RouterReplayAction = _megatron()
    score_function, pre, num_groups, group_topk, scaling, with_bias = MEGATRON_CASES[case]
    num_experts, top_k, num_tokens = 16, 4, 32
    spec = _megatron_spec(num_experts, top_k, score_function, pre, num_groups, group_topk, scaling, with_bias)
    gen = torch.Generator().manual_seed(11)
    logits_TE = torch.randn(num_tokens, num_experts, generator=gen).to(dtype)
    bias_E = 0.1 * torch.randn(num_experts, generator=gen) if with_bias else None
    common = {
        "topk": top_k,
        "use_pre_softmax": pre,
        "num_groups": num_groups,
        "group_topk": group_topk,
        "scaling_factor": scaling,
        "score_function": score_function,
        "expert_bias": bias_E,
    }

    # live: Megatron returns dense [T, E] probs and map; ours scattered into the same layout
    probs_TE, map_TE = moe_utils.topk_routing_with_score_function(logits_TE, **common)
    w_TK, ids_TK = route(logits_TE, spec, bias_E=bias_E)
    assert torch.equal(torch.zeros_like(map_TE).scatter(1, ids_TK, True), map_TE)
    assert torch.equal(torch.zeros_like(probs_TE).scatter(1, ids_TK, w_TK), probs_TE)

    # replay: REPLAY_FORWARD with other valid ids; compare the gathered values
    forced_TK = random_valid_ids(spec, num_tokens, gen)
    replay = RouterReplay()
    try:
        replay.set_target_indices(forced_TK)
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        probs_TE, map_TE = moe_utils.topk_routing_with_score_function(logits_TE, router_replay=replay, **common)
    finally:
        RouterReplay.global_router_replay_instances.remove(replay)
    w_TK, ids_TK = route(logits_TE, spec, forced_TK=forced_TK, bias_E=bias_E)
    assert torch.equal(map_TE.gather(1, forced_TK), torch.ones_like(forced_TK, dtype=torch.bool))
    assert torch.equal(probs_TE.gather(1, forced_TK), w_TK)


# --- forced_violations: the device-side check of forced ids ---------------------------------------------------
def _violations_reference(forced_TK: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The formula forced_violations replaced: int64 ids, every [K, K] slot pair at once."""
    from routereplay.core.routing import groups_spanned

    ids = forced_TK.long()
    bad = ((ids < 0) | (ids >= spec.num_logits)).any(-1)
    K = ids.shape[-1]
    offdiag = ~torch.eye(K, dtype=torch.bool)
    bad |= ((ids.unsqueeze(-1) == ids.unsqueeze(-2)) & offdiag).flatten(-2).any(-1)
    groups = groups_spanned(ids, spec)
    return bad if groups is None else bad | (groups > spec.topk_group)


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16]),
    num_experts=st.sampled_from([4, 8, 100, 128, 200, 256, 300]),
    top_k=st.integers(1, 4),
    grouped=st.booleans(),
    layers=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_forced_violations_match_the_int64_pairwise_formula(dtype, num_experts, top_k, grouped, layers, seed):
    """Same rows flagged as the int64 [K, K] formula, for every id dtype (a bound the dtype cannot exceed
    is not compared), ``[L, T, K]`` ids included; with ``distinct`` the same on rows that repeat no id."""
    from routereplay.core.routing import forced_violations

    info = torch.iinfo(dtype)
    grouped = grouped and num_experts % 4 == 0 and num_experts >= 8 and top_k <= num_experts // 2
    groups = {"n_group": 4, "topk_group": 2} if grouped else {}
    spec = RouterSpec(num_experts=num_experts, top_k=top_k, **groups)
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(info.min, -3), min(info.max, num_experts + 3)
    ids = torch.randint(lo, hi + 1, (layers, 12, top_k), generator=g).to(dtype)
    got, want = forced_violations(ids, spec), _violations_reference(ids, spec)
    assert got.dtype == torch.bool and torch.equal(got, want)
    pool = min(num_experts, info.max + 1)  # ids the dtype holds: uint8 with 300 experts would wrap into repeats
    distinct = torch.stack([torch.randperm(pool, generator=g)[:top_k] for _ in range(layers * 12)])
    distinct = distinct.reshape(layers, 12, top_k).to(dtype)
    assert torch.equal(forced_violations(distinct, spec, distinct=True), _violations_reference(distinct, spec))
