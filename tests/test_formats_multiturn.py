"""Engine payloads across requests: vLLM routed_experts_prompt_start, multi-turn, partial-rollout resume,
SGLang retraction, hostile .npy headers, and every payload container (writable / read-only / tensor).

Fixtures follow each engine's convention (tests/fixtures_formats.py). Legend: T tokens, L MoE layers,
Lp payload layers, K top-k, E experts.
"""

from __future__ import annotations

import base64
import io
import re
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from routereplay import RoutingTrace
from routereplay.core.errors import EngineFormatError, ExpertIdError, RetractedRoutesError, RouteContinuityError
from routereplay.formats import (
    RouteAccumulator,
    decode_sglang_payload,
    decode_vllm_payload,
    extend_sglang,
    from_megatron,
    from_sglang,
    from_verl,
    from_vllm,
    from_vllm_outputs,
)

try:
    from tests.fixtures_formats import (
        generated_with,
        npy_base64,
        partial_rollout,
        random_routes,
        sglang_meta_info,
        sglang_openai_response,
        verl_batch,
        vllm_capture,
        vllm_dtype,
    )
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from fixtures_formats import (
        generated_with,
        npy_base64,
        partial_rollout,
        random_routes,
        sglang_meta_info,
        sglang_openai_response,
        verl_batch,
        vllm_capture,
        vllm_dtype,
    )

E = 8
MOE = (1, 2, 4)  # MoE layers of a 5-layer model whose layers 0 and 3 are dense
HIDDEN = 5
K = 2


def one_seq(rows_NLK: np.ndarray, num_experts: int = E, source: str = "vllm") -> RoutingTrace:
    return RoutingTrace(
        experts=torch.from_numpy(np.ascontiguousarray(rows_NLK)),
        cu_seqlens=torch.tensor([0, rows_NLK.shape[0]]),
        layer_ids=MOE,
        num_experts=num_experts,
        meta={"source": source},
    )


def same_routes(a: RoutingTrace, b: RoutingTrace) -> bool:
    return a == b.replace(check=False, meta=dict(a.meta))


# --- vLLM routed_experts_prompt_start -------------------------------------------------------------
@pytest.mark.parametrize("encode", ["array", "npy_base64"])
def test_vllm_prompt_start_rows_begin_at_that_prompt_position(encode):
    P, C, s = 6, 4, 3
    truth = random_routes(P + C, len(MOE), K, E, seed=1)
    payload = vllm_capture(truth, moe_layer_ids=MOE, num_hidden_layers=HIDDEN, dtype=vllm_dtype(E), prompt_start=s)
    assert payload.shape == (P + C - 1 - s, HIDDEN, K) and payload.dtype == np.uint8
    if encode == "npy_base64":  # the HTTP form: read the dtype from the .npy itself (uint8 or int32)
        payload = npy_base64(payload.astype(np.int32))
    trace = from_vllm(
        [payload], num_experts=E, moe_layer_ids=MOE, prompt_lens=[P], completion_lens=[C], prompt_starts=[s]
    )
    assert same_routes(trace, one_seq(truth[s : P + C - 1]))
    # start == prompt length is valid (vLLM >= #56844): the payload holds the generated part only
    only_gen = vllm_capture(truth, dtype=np.uint8, prompt_start=P)
    assert (
        from_vllm([only_gen], num_experts=E, prompt_lens=[P], completion_lens=[C], prompt_starts=[P]).num_tokens
        == C - 1
    )


def test_vllm_prompt_start_ignored_by_an_older_server_is_cut_at_the_start():
    P, C, s = 5, 3, 2
    truth = random_routes(P + C, len(MOE), K, E, seed=2)
    full = vllm_capture(truth, dtype=np.int32)  # a server that predates the field returns every row
    trace = from_vllm([full], num_experts=E, prompt_lens=[P], completion_lens=[C], prompt_starts=[s])
    assert trace.num_tokens == P + C - 1 - s
    assert torch.equal(trace.experts.to(torch.int64), torch.from_numpy(truth[s : P + C - 1]))


def test_vllm_prompt_start_errors():
    P, C = 5, 3
    truth = random_routes(P + C, len(MOE), K, E, seed=3)
    cap = vllm_capture(truth, prompt_start=2)
    with pytest.raises(
        EngineFormatError,
        match=re.escape(
            "request 0: routed_experts has 5 rows, expected prompt+completion-1-prompt_start = 5+3-1-1 = 6 "
            "(or 7 from a server that ignores routed_experts_prompt_start)"
        ),
    ):
        from_vllm([cap], num_experts=E, prompt_lens=[P], completion_lens=[C], prompt_starts=[1])
    with pytest.raises(
        EngineFormatError,
        match=re.escape("request 0: routed_experts_prompt_start=6 is beyond the prompt's 5 tokens; vLLM accepts"),
    ):
        from_vllm([cap], num_experts=E, prompt_lens=[P], completion_lens=[C], prompt_starts=[6])
    with pytest.raises(
        EngineFormatError,
        match=re.escape("request 0: routed_experts_prompt_start=2 needs prompt_lens and completion_lens"),
    ):
        from_vllm([cap], num_experts=E, prompt_starts=[2])
    with pytest.raises(EngineFormatError, match=re.escape("request 0: prompt_starts[0]=2 with the split form")):
        from_vllm([cap[3:]], prompt_routed_experts=[cap[:3]], num_experts=E, completion_lens=[C], prompt_starts=[2])


def test_vllm_outputs_with_prompt_starts():
    P, C, s = 4, 3, 2
    truth = random_routes(P + C, len(MOE), K, E, seed=4)
    resp = {
        "choices": [{"index": 0, "routed_experts": npy_base64(vllm_capture(truth, dtype=np.uint8, prompt_start=s))}],
        "usage": {"prompt_tokens": P, "completion_tokens": C},
    }
    trace = from_vllm_outputs([resp], num_experts=E, moe_layer_ids=MOE, prompt_starts=[s])
    assert same_routes(trace, one_seq(truth[s : P + C - 1]))


# --- hostile / broken .npy payloads ---------------------------------------------------------------
def _npy_header_only(shape, descr="<i4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npy_header_declaring_a_huge_shape_is_refused_before_allocating():
    raw = _npy_header_only((10**12, 48, 8)) + b"\x00" * 64
    tracemalloc.start()
    try:
        with pytest.raises(
            EngineFormatError,
            match=re.escape(
                "request 0: routed_experts .npy header declares shape (1000000000000, 48, 8) of int32 = "
                "1536000000000000 bytes, but 64 bytes follow the header; the payload is truncated or its header is "
                "corrupt (refused before allocating anything)"
            ),
        ):
            from_vllm([base64.b64encode(raw).decode("ascii")], num_experts=E)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # the declared 1.5 PB were never asked for


def test_npy_header_errors():
    with pytest.raises(
        EngineFormatError,
        match=re.escape("payload: routed_experts .npy header declares dtype float32; expected an integer dtype"),
    ):
        decode_vllm_payload(_npy_header_only((1, 1, 1), "<f4") + b"\x00" * 4)
    raw = bytearray(_npy_header_only((2, 3, 2)))
    raw[6] = 9  # format version 9.0
    with pytest.raises(EngineFormatError, match="payload: routed_experts is a corrupt or truncated .npy payload"):
        decode_vllm_payload(bytes(raw) + b"\x00" * 48)
    # big-endian and Fortran-ordered payloads are read, not refused
    a = np.arange(12, dtype=">i4").reshape(2, 3, 2)
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(a))
    out = decode_vllm_payload(buf.getvalue())
    assert out.dtype == np.int32 and out.dtype.isnative and np.array_equal(out, a)


# --- Megatron: decreasing cu_seqlens --------------------------------------------------------------
def test_megatron_decreasing_cu_seqlens():
    recorded = [torch.zeros(4, K, dtype=torch.int64) + torch.arange(K) for _ in MOE]
    with pytest.raises(
        EngineFormatError,
        match=re.escape(
            "cu_seqlens decreases at index 2 (cu_seqlens[1]=3, cu_seqlens[2]=1): sequence 1 would have -2 rows; "
            "cu_seqlens must be non-decreasing"
        ),
    ):
        from_megatron(recorded, router_layer_ids=MOE, cu_seqlens=[0, 3, 1, 4], num_experts=E)


# --- multi-turn -----------------------------------------------------------------------------------
@pytest.fixture
def two_turns():
    """Turn 1: 5 prompt + 4 generated tokens. Turn 2: those 9, 3 tool tokens, 5 generated.

    The weights changed between the turns: ``w1`` / ``w2`` are the routes each turn's engine
    computes at every position of the conversation.
    """
    P1, C1, U, C2 = 5, 4, 3, 5
    n1, P2 = P1 + C1, P1 + C1 + U
    n2 = P2 + C2
    w1 = random_routes(n2, len(MOE), K, E, seed=11)
    w2 = random_routes(n2, len(MOE), K, E, seed=12)
    tokens = list(range(100, 100 + n2))
    return {"n1": n1, "n2": n2, "w1": w1, "w2": w2, "t1": tokens[:n1], "t2": tokens}


def _turn1(acc, t):
    acc.add(vllm_capture(t["w1"][: t["n1"]], dtype=np.uint8), token_ids=t["t1"])


def test_multiturn_keeps_the_boundary_row(two_turns):
    t = two_turns
    acc = RouteAccumulator(num_experts=E, moe_layer_ids=MOE, source="vllm")
    _turn1(acc, t)
    assert acc.num_rows == t["n1"] - 1 == 8
    start = acc.num_rows  # = len(previous prompt) + len(previous completion) - 1: the boundary token
    payload = vllm_capture(t["w2"], moe_layer_ids=MOE, num_hidden_layers=HIDDEN, dtype=np.uint8, prompt_start=start)
    assert acc.add(payload, start=start, token_ids=t["t2"]) == t["n2"] - t["n1"]
    expected = np.concatenate([t["w1"][: t["n1"] - 1], t["w2"][t["n1"] - 1 : t["n2"] - 1]])
    assert same_routes(acc.trace(), one_seq(expected))  # no row lost, none doubled
    assert acc.trace().rows_checked()  # every row from a validated payload
    training = acc.trace(rows="training")
    assert training.num_tokens == t["n2"] and training.valid.tolist() == [True] * (t["n2"] - 1) + [False]
    assert acc.num_overlap_mismatches == 0 and acc.token_ids == tuple(t["t2"])


def test_multiturn_whole_payload_again_keeps_the_rows_turn_one_generated_with(two_turns):
    t = two_turns
    acc = RouteAccumulator(num_experts=E, moe_layer_ids=MOE)
    _turn1(acc, t)
    acc.add(vllm_capture(t["w2"], dtype=np.uint8), token_ids=t["t2"])  # start=0: every row sent again
    expected = np.concatenate([t["w1"][: t["n1"] - 1], t["w2"][t["n1"] - 1 : t["n2"] - 1]])
    assert same_routes(acc.trace(), one_seq(expected, source="engine"))
    assert acc.num_overlap_mismatches == int((t["w1"][:8] != t["w2"][:8]).reshape(8, -1).any(1).sum()) > 0


def _edited(tokens, position, token):
    out = list(tokens)
    out[position] = token
    return out


# (acc, t): acc holds turn 1 of two_turns (t), overlap="check"; the last two use fresh accumulators.
CONTINUITY_ERRORS = [
    pytest.param(
        lambda acc, t: acc.add(vllm_capture(t["w2"], prompt_start=9), start=9, token_ids=t["t2"]),
        RouteContinuityError,
        re.escape(
            "request 1: the payload starts at row 9, but only rows 0..7 are held; rows 8..8 would be missing "
            "(row 8 is the boundary token"
        ),
        id="gap-before-start",
    ),
    pytest.param(
        lambda acc, t: acc.add(vllm_capture(t["w2"]), token_ids=t["t2"]),
        RouteContinuityError,
        re.escape("request 1: row 0 (layer 1) was"),
        id="overlap-route-changed",
    ),
    pytest.param(
        lambda acc, t: acc.add(vllm_capture(t["w2"], prompt_start=8), start=8, token_ids=_edited(t["t2"], 3, 7)),
        RouteContinuityError,
        re.escape("request 1: token 3 is 7, but the sequence held 103 there"),
        id="token-changed",
    ),
    pytest.param(
        lambda acc, t: acc.add(vllm_capture(t["w2"][:4]), num_tokens=4),
        RouteContinuityError,
        re.escape("request 1: the request has 4 tokens, fewer than the 9"),
        id="fewer-tokens-than-held",
    ),
    pytest.param(
        lambda acc, t: acc.add(vllm_capture(t["w2"], prompt_start=9), start=8, token_ids=t["t2"]),
        EngineFormatError,
        re.escape(
            "request 1: routed_experts has 7 rows, expected num_tokens-1-start = 17-1-8 = 8 (or 16 from an engine "
            "that ignores the start field)"
        ),
        id="row-count",
    ),
    pytest.param(
        lambda acc, t: acc.add(vllm_capture(t["w2"], prompt_start=8)[..., :1], start=8, token_ids=t["t2"]),
        RouteContinuityError,
        re.escape("request 1: the payload gives layers [1, 2, 4] x top-1, earlier payloads"),
        id="layers-x-top-k-changed",
    ),
    pytest.param(
        lambda acc, t: RouteAccumulator(num_experts=E).trace(),
        EngineFormatError,
        "the accumulator holds no routes yet",
        id="empty-trace",
    ),
    pytest.param(
        lambda acc, t: RouteAccumulator(num_experts=E).add(vllm_capture(t["w1"])),
        EngineFormatError,
        re.escape("request 0: pass token_ids (the request's prompt"),
        id="no-token-ids",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), CONTINUITY_ERRORS)
def test_multiturn_continuity_errors(two_turns, call, error, match):
    acc = RouteAccumulator(num_experts=E, moe_layer_ids=MOE, overlap="check")
    _turn1(acc, two_turns)
    with pytest.raises(error, match=match):
        call(acc, two_turns)
    assert acc.num_rows == 8 and acc.num_tokens == 9  # a refused payload changes nothing


def test_multiturn_fills_a_held_row_without_route(two_turns):
    t = two_turns
    acc = RouteAccumulator(num_experts=E, moe_layer_ids=MOE, missing="invalid")
    first = vllm_capture(t["w1"][: t["n1"]], dtype=np.int16)
    first[2] = -1  # a row vLLM never captured (prefix-cache hit it could not restore)
    acc.add(first, token_ids=t["t1"])
    assert acc.trace().valid[2].item() is False
    acc.add(vllm_capture(t["w2"], dtype=np.int16), token_ids=t["t2"])
    trace = acc.trace()
    assert trace.valid is None and torch.equal(trace.experts[2].to(torch.int64), torch.from_numpy(t["w2"][2]))


# --- partial-rollout resume (verl FullyAsyncLLMServerClient) --------------------------------------
@pytest.mark.parametrize("generated", [[3, 4, 2], [0, 5, 1], [6]])
def test_partial_rollout_keeps_the_rows_each_token_was_generated_with(generated):
    P = 5
    total = P + sum(generated)
    weights = [random_routes(total, len(MOE), K, E, seed=20 + k) for k in range(len(generated))]
    attempts, verl_rows = partial_rollout(P, generated, weights)
    acc = RouteAccumulator(num_experts=E, moe_layer_ids=MOE)
    appended = [acc.add(payload, token_ids=ids) for payload, ids in attempts if payload is not None]
    assert appended[1:] == [g for g in generated if g][1:]  # later attempts: only the new tokens' rows
    expected = generated_with(P, generated, weights)
    assert expected.shape[0] == total - 1
    assert np.array_equal(verl_rows, expected)  # the fixture does what verl's client does
    assert same_routes(acc.trace(), one_seq(expected, source="engine"))


def test_partial_rollout_attempt_without_routes_is_refused():
    acc = RouteAccumulator(num_experts=E)
    w = random_routes(8, len(MOE), K, E, seed=30)
    acc.add(vllm_capture(w[:6]), num_tokens=6)
    with pytest.raises(
        EngineFormatError,
        match=re.escape("request 1: routed_experts is None. An attempt aborted before its first token has no new rows"),
    ):
        acc.add(None, num_tokens=8)


# --- SGLang: start_len, retraction ----------------------------------------------------------------
def test_sglang_two_turns_through_add_sglang(two_turns):
    t = two_turns
    acc = RouteAccumulator(num_experts=E, moe_layer_ids=MOE, source="sglang")
    kw = {"num_layers": HIDDEN, "top_k": K}
    info1 = sglang_meta_info(t["w1"][: t["n1"]], 5, moe_layer_ids=MOE, num_hidden_layers=HIDDEN, num_retractions=0)
    acc.add_sglang(info1, **kw)
    info2 = sglang_meta_info(
        t["w2"], 12, start_len=acc.num_rows, moe_layer_ids=MOE, num_hidden_layers=HIDDEN, num_retractions=0
    )
    acc.add_sglang({"meta_info": info2}, start_len=acc.num_rows, **kw)
    expected = np.concatenate([t["w1"][: t["n1"] - 1], t["w2"][t["n1"] - 1 : t["n2"] - 1]])
    assert same_routes(acc.trace(), one_seq(expected, source="sglang"))


def test_sglang_retraction_is_detected():
    truth = random_routes(9, len(MOE), K, E, seed=40)
    info = sglang_meta_info(truth, 5, num_retractions=2)
    info["weight_version"] = "7"
    msg = re.escape(
        "request 0: SGLang retracted this request 2 time(s) (meta_info num_retractions); on resuming it re-prefilled"
    )
    with pytest.raises(RetractedRoutesError, match=msg):
        from_sglang([info], num_layers=len(MOE), top_k=K, num_experts=E)
    with pytest.raises(RetractedRoutesError, match=re.escape("(weight_version at the end: '7')")):
        RouteAccumulator(num_experts=E).add_sglang(info, num_layers=len(MOE), top_k=K)
    ok = from_sglang([info], num_layers=len(MOE), top_k=K, num_experts=E, on_retraction="accept")
    assert ok.num_tokens == 8
    base = from_sglang([sglang_meta_info(truth[:6], 3)], num_layers=len(MOE), top_k=K, num_experts=E)
    with pytest.raises(RetractedRoutesError, match="request for sequence 0: SGLang retracted"):
        extend_sglang(base, 0, info, num_layers=len(MOE), top_k=K)
    with pytest.raises(EngineFormatError, match="on_retraction must be \"error\" or \"accept\", found 'ignore'"):
        from_sglang([info], num_layers=len(MOE), top_k=K, num_experts=E, on_retraction="ignore")


def test_sglang_openai_server_response():
    """A one-choice response of SGLang's OpenAI server reads like its meta_info; whether the request was
    retracted is not in it, so it must be accepted explicitly unless the choice carries its meta_info."""
    truth = random_routes(9, len(MOE), K, E, seed=41)
    info = sglang_meta_info(truth, 5, moe_layer_ids=MOE, num_hidden_layers=HIDDEN, num_retractions=0)
    kw = {"num_layers": HIDDEN, "top_k": K, "num_experts": E, "moe_layer_ids": MOE}
    expected = from_sglang([info], **kw)
    response = sglang_openai_response(info)
    unseen = re.escape(
        "request 0: an OpenAI-server response does not say whether SGLang retracted the request"
    )
    with pytest.raises(EngineFormatError, match=unseen):
        from_sglang([response], **kw)
    assert from_sglang([response], on_retraction="accept", **kw) == expected
    # chat with return_meta_info=true: the choice's meta_info, retraction check included
    assert from_sglang([sglang_openai_response(info, with_meta_info=True)], **kw) == expected
    retracted = sglang_openai_response({**info, "num_retractions": 1}, with_meta_info=True)
    with pytest.raises(RetractedRoutesError, match="request 0: SGLang retracted this request 1 time"):
        from_sglang([retracted], **kw)
    # the same through the accumulator and extend_sglang
    acc = RouteAccumulator(num_experts=E, moe_layer_ids=MOE, source="sglang")
    with pytest.raises(EngineFormatError, match=unseen):
        acc.add_sglang(response, num_layers=HIDDEN, top_k=K)
    acc.add_sglang(response, num_layers=HIDDEN, top_k=K, on_retraction="accept")
    assert same_routes(acc.trace(), expected)
    base = from_sglang([sglang_meta_info(truth[:6], 3, moe_layer_ids=MOE, num_hidden_layers=HIDDEN)], **kw)
    grown = extend_sglang(base, 0, response, num_layers=HIDDEN, top_k=K, moe_layer_ids=MOE, on_retraction="accept")
    assert same_routes(grown, expected)
    # several choices: the response-level routes are the first choice's only
    with pytest.raises(EngineFormatError, match=re.escape("request 0: an OpenAI-server response with 2 choices")):
        from_sglang([sglang_openai_response(info, n=2)], on_retraction="accept", **kw)
    with pytest.raises(EngineFormatError, match=re.escape("[c['meta_info'] for c in response['choices']]")):
        from_sglang([sglang_openai_response(info, n=2, with_meta_info=True)], **kw)
    choices = sglang_openai_response(info, n=2, with_meta_info=True)["choices"]
    assert from_sglang([c["meta_info"] for c in choices], **kw).num_seqs == 2
    # no routes at all: the request did not ask for them
    bare = sglang_openai_response(info)
    del bare["sglext"]
    with pytest.raises(EngineFormatError, match="request 0: the OpenAI-server response holds no routes"):
        from_sglang([bare], on_retraction="accept", **kw)


# --- every payload container works, none warns, none is narrowed ----------------------------------
@pytest.fixture
def strict_from_numpy(monkeypatch):
    """Fail on any torch.from_numpy of a non-writable array (torch warns only once per process)."""
    real = torch.from_numpy

    def checked(a):
        assert a.flags.writeable, "torch.from_numpy of a read-only array"
        return real(a)

    monkeypatch.setattr(torch, "from_numpy", checked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


@pytest.mark.parametrize("num_experts", [E, 300])
def test_payload_containers(strict_from_numpy, num_experts):
    P, C = 4, 3
    truth = random_routes(P + C, len(MOE), K, num_experts, seed=50)
    want = truth[: P + C - 1]
    # vLLM in-process: a writable uint8 / uint16 array (uint16 above 256 experts)
    cap = vllm_capture(truth, dtype=vllm_dtype(num_experts))
    assert cap.flags.writeable and cap.dtype == (np.uint8 if num_experts <= 256 else np.uint16)
    trace = from_vllm([cap], num_experts=num_experts, prompt_lens=[P], completion_lens=[C])
    assert torch.equal(trace.experts.to(torch.int64), torch.from_numpy(want))
    assert trace.experts.dtype == (torch.uint8 if num_experts <= 256 else torch.int16)
    # vLLM's torch uint16 (a tensor of the slot manager's dtype)
    t16 = torch.from_numpy(cap.astype(np.int32)).to(torch.uint16)
    assert torch.equal(from_vllm([t16], num_experts=num_experts).experts, trace.experts)
    # SGLang: read-only int32 from np.frombuffer, and an int32 tensor (skip_tokenizer_init)
    info = sglang_meta_info(truth, P)
    ro = decode_sglang_payload(info["routed_experts"], num_layers=len(MOE), top_k=K)
    assert not ro.flags.writeable and ro.dtype == np.int32
    for payload in (info, ro, torch.from_numpy(ro.copy()).reshape(-1)):
        got = from_sglang([payload], num_layers=len(MOE), top_k=K, num_experts=num_experts, num_tokens=[P + C])
        assert torch.equal(got.experts, trace.experts)
    acc = RouteAccumulator(num_experts=num_experts)
    acc.add(ro, num_tokens=P + C)
    assert torch.equal(acc.trace().experts, trace.experts)
    # verl: a read-only padded batch and mask
    re_BSLK, mask = verl_batch([cap], [P], prompt_length=P, response_length=C, dtype=torch.int32)
    re_ro, mask_ro = re_BSLK.numpy().copy(), mask.numpy().copy()
    re_ro.flags.writeable = mask_ro.flags.writeable = False
    got = from_verl(re_ro, mask_ro, num_experts=num_experts, rows="engine")
    assert torch.equal(got.experts, trace.experts)


def test_uint16_ids_above_int16_are_not_wrapped():
    cap = np.zeros((2, 1, 2), dtype=np.uint16)
    cap[:, 0, 1] = [40000, 1]  # a corrupt id: an int16 cast would wrap it to -25536, a "missing" marker
    with pytest.raises(ExpertIdError, match="40000"):
        from_vllm([cap], num_experts=300)
