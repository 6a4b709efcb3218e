"""routereplay.formats: engine / trainer payloads <-> RoutingTrace.

Fixtures follow each source's conventions exactly (tests/fixtures_formats.py builds them the way
the engine does). Legend: T tokens, L MoE layers, Lp payload layers, K top-k, B sequences.
"""

from __future__ import annotations

import base64
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import traces as shared_traces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routereplay import RoutingTrace
from routereplay.core.errors import EngineFormatError, LayerMismatchError, TraceMismatchError, ZeroRoutesError
from routereplay.core.layout import engine_to_training, training_to_engine
from routereplay.formats import (
    decode_sglang_payload,
    decode_vllm_payload,
    extend_sglang,
    from_megatron,
    from_sglang,
    from_verl,
    from_verl_unpadded,
    from_vllm,
    from_vllm_outputs,
    megatron_router_layer_ids,
    to_megatron,
    to_sglang,
    to_verl,
    to_verl_unpadded,
    to_vllm,
)

try:
    from tests.fixtures_formats import (
        full_layer_axis,
        load_megatron_router_replay,
        npy_base64,
        random_routes,
        sglang_meta_info,
        verl_batch,
        vllm_capture,
        vllm_split,
    )
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from fixtures_formats import (
        full_layer_axis,
        load_megatron_router_replay,
        npy_base64,
        random_routes,
        sglang_meta_info,
        verl_batch,
        vllm_capture,
        vllm_split,
    )

E = 8  # experts
MOE = (1, 2, 4)  # MoE layer ids of a 5-layer model whose layers 0 and 3 are dense
HIDDEN = 5
K = 2
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def engine_trace(truths, layer_ids=MOE, num_experts=E, source="vllm") -> RoutingTrace:
    """Expected trace: each request's first T-1 routes (engine rows)."""
    rows = [t[: t.shape[0] - 1] for t in truths]
    cu = np.cumsum([0] + [r.shape[0] for r in rows])
    return RoutingTrace(
        experts=torch.from_numpy(np.concatenate(rows)),
        cu_seqlens=torch.from_numpy(cu),
        layer_ids=layer_ids,
        num_experts=num_experts,
        meta={"source": source},
    )


def same_routes(a: RoutingTrace, b: RoutingTrace) -> bool:
    """Equal routes, boundaries, validity and layers (meta ignored)."""
    return a == b.replace(check=False, meta=dict(a.meta))


@pytest.fixture
def requests_():
    """Three requests (prompt, completion) with the route of every token on the MoE layers."""
    lens = [(3, 4), (5, 1), (2, 6)]
    truths = [random_routes(p + c, len(MOE), K, E, seed=i) for i, (p, c) in enumerate(lens)]
    return lens, truths


# --- vLLM -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint8, np.uint16])
def test_vllm_combined_full_layer_axis(requests_, dtype):
    lens, truths = requests_
    payloads = [vllm_capture(t, moe_layer_ids=MOE, num_hidden_layers=HIDDEN, dtype=dtype) for t in truths]
    trace = from_vllm(
        payloads,
        num_experts=E,
        moe_layer_ids=MOE,
        prompt_lens=[p for p, _ in lens],
        completion_lens=[c for _, c in lens],
    )
    assert trace == engine_trace(truths)
    assert trace.seq_lens.tolist() == [p + c - 1 for p, c in lens]


def test_vllm_moe_only_axis_and_tensor_input(requests_):
    _, truths = requests_
    payloads = [torch.from_numpy(vllm_capture(t)) for t in truths]  # newer vLLM: MoE layers only
    assert from_vllm(payloads, num_experts=E, moe_layer_ids=MOE) == engine_trace(truths)
    assert from_vllm(payloads, num_experts=E).layer_ids == (0, 1, 2)


def test_vllm_split_form_equals_combined(requests_):
    lens, truths = requests_
    prompts, gens = [], []
    for (p, c), t in zip(lens, truths):
        pr, gen = vllm_split(vllm_capture(t), p, c)
        prompts.append(pr)
        gens.append(gen)
    assert gens[1] is None  # a one-token completion has no generated rows: vLLM gives None
    trace = from_vllm(
        gens,
        prompt_routed_experts=prompts,
        num_experts=E,
        moe_layer_ids=MOE,
        prompt_lens=[p for p, _ in lens],
        completion_lens=[c for _, c in lens],
    )
    assert trace == engine_trace(truths)


def test_vllm_split_form_drops_speculative_extra_row(requests_):
    lens, truths = requests_
    prompts, gens = [], []
    for (p, c), t in zip(lens, truths):
        # MTP captured a draft token's route at the last position; vLLM keeps it after clipping
        pr, gen = vllm_split(vllm_capture(t), p, c, extra_row=np.array([[7, 6]] * len(MOE)))
        prompts.append(pr)
        gens.append(gen)
    assert gens[0].shape[0] == lens[0][1]
    trace = from_vllm(
        gens, prompt_routed_experts=prompts, num_experts=E, moe_layer_ids=MOE, completion_lens=[c for _, c in lens]
    )
    assert trace == engine_trace(truths)


def test_vllm_http_encodings(requests_):
    _, truths = requests_
    caps = [vllm_capture(t, moe_layer_ids=MOE, num_hidden_layers=HIDDEN, dtype=np.int32) for t in truths]
    expected = engine_trace(truths)
    for enc in (npy_base64, lambda a: a.tolist(), lambda a: base64.b64decode(npy_base64(a))):
        assert from_vllm([enc(a) for a in caps], num_experts=E, moe_layer_ids=MOE) == expected
    assert decode_vllm_payload(npy_base64(caps[0])).dtype == np.int32


def test_vllm_outputs_objects_and_http_json(requests_):
    lens, truths = requests_
    (p0, c0), (_, c1) = lens[0], lens[2]
    # a RequestOutput with n=2 completions sharing the prompt (split form)
    shared = random_routes(p0, len(MOE), K, E, seed=10)
    comps = [np.concatenate([shared, random_routes(c, len(MOE), K, E, seed=11 + j)]) for j, c in enumerate((c0, c1))]
    outs = []
    for j, (c, t) in enumerate(zip((c0, c1), comps)):
        _, gen = vllm_split(vllm_capture(t), p0, c)
        outs.append(SimpleNamespace(index=j, token_ids=list(range(c)), routed_experts=gen))
    prompt_part = vllm_capture(comps[0])[:p0]
    ro = SimpleNamespace(prompt_token_ids=list(range(p0)), prompt_routed_experts=prompt_part, outputs=outs)
    trace = from_vllm_outputs([ro], num_experts=E, moe_layer_ids=MOE)
    assert trace == engine_trace(comps)

    # OpenAI-server JSON, combined form, base64 .npy, counts from usage
    resp = {
        "choices": [{"index": 0, "routed_experts": npy_base64(vllm_capture(truths[1]))}],
        "usage": {"prompt_tokens": lens[1][0], "completion_tokens": lens[1][1]},
    }
    assert from_vllm_outputs([resp], num_experts=E, moe_layer_ids=MOE) == engine_trace([truths[1]])
    # vLLM 0.34's token-in-token-out endpoint (/inference/v1/generate): the token ids in the response
    # (prompt at top level, completion per choice), the routes as uint8 .npy
    generate = {
        "request_id": "r0",
        "prompt_token_ids": list(range(lens[1][0])),
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "token_ids": list(range(lens[1][1])),
                "routed_experts": npy_base64(vllm_capture(truths[1]).astype(np.uint8)),
            }
        ],
    }
    assert from_vllm_outputs([generate], num_experts=E, moe_layer_ids=MOE) == engine_trace([truths[1]])
    resp["usage"]["completion_tokens"] += 1
    with pytest.raises(
        EngineFormatError,
        match=re.escape("request 0: routed_experts has 5 rows, expected prompt+completion-1 = 5+2-1 = 6"),
    ):
        from_vllm_outputs([resp], num_experts=E, moe_layer_ids=MOE)
    with pytest.raises(
        EngineFormatError, match="request 0: routed_experts is None; start vLLM with --enable-return-routed-experts"
    ):
        from_vllm_outputs([{"choices": [{"routed_experts": None}]}], num_experts=E)


def test_vllm_training_rows(requests_):
    lens, truths = requests_
    payloads = [vllm_capture(t) for t in truths]
    trace = from_vllm(payloads, num_experts=E, moe_layer_ids=MOE, rows="training")
    assert trace.seq_lens.tolist() == [p + c for p, c in lens]
    last = (trace.cu_seqlens[1:] - 1).tolist()
    assert trace.valid.nonzero()[:, 0].tolist() == [i for i in range(trace.num_tokens) if i not in last]
    assert not trace.experts[last].any()
    assert [a.tolist() for a in to_vllm(trace, rows="training")] == [p.tolist() for p in payloads]


def _vllm_counts(requests_):
    """The requests' combined payloads, their prompt lengths P and completion lengths C (C[1] one
    too many), and the split form (prompt part, generated part) with the true counts."""
    lens, truths = requests_
    payloads = [vllm_capture(t) for t in truths]
    P, C = [p for p, _ in lens], [c for _, c in lens]
    prompts = [vllm_split(p, pl, c)[0] for p, pl, c in zip(payloads, P, C)]
    gens = [vllm_split(p, pl, c)[1] for p, pl, c in zip(payloads, P, C)]
    C[1] += 1
    return SimpleNamespace(payloads=payloads, P=P, C=C, prompts=prompts, gens=gens)


# (v): _vllm_counts(requests_)
VLLM_ROW_COUNT_ERRORS = [
    pytest.param(
        lambda v: from_vllm(v.payloads, num_experts=E, prompt_lens=v.P, completion_lens=v.C),
        EngineFormatError,
        re.escape("request 1: routed_experts has 5 rows, expected prompt+completion-1 = 5+2-1 = 6"),
        id="combined-rows",
    ),
    pytest.param(
        lambda v: from_vllm(v.payloads, num_experts=E, prompt_lens=v.P),
        EngineFormatError,
        "give both prompt_lens and completion_lens",
        id="prompt-lens-alone",
    ),
    pytest.param(
        lambda v: from_vllm(v.payloads, num_experts=E, prompt_lens=v.P, completion_lens=v.C[:2]),
        EngineFormatError,
        re.escape("completion_lens has 2 entries but there are 3 requests"),
        id="completion-lens-count",
    ),
    pytest.param(
        lambda v: from_vllm(v.gens, prompt_routed_experts=v.prompts, num_experts=E),
        EngineFormatError,
        "the split form .* needs completion_lens",
        id="split-without-counts",
    ),
    pytest.param(
        lambda v: from_vllm(v.gens, prompt_routed_experts=v.prompts, num_experts=E, completion_lens=[5, 1, 6]),
        EngineFormatError,
        re.escape(
            "request 0: routed_experts (generated part) has 3 rows, expected completion-1 = 4 (or completion = 5"
        ),
        id="split-generated-rows",
    ),
    pytest.param(
        lambda v: from_vllm(
            v.gens, prompt_routed_experts=v.prompts, num_experts=E, prompt_lens=[3, 5, 3], completion_lens=[4, 1, 6]
        ),
        EngineFormatError,
        re.escape("request 2: prompt_routed_experts has 2 rows, expected prompt = 3"),
        id="split-prompt-rows",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), VLLM_ROW_COUNT_ERRORS)
def test_vllm_row_count_errors(requests_, call, error, match):
    v = _vllm_counts(requests_)
    with pytest.raises(error, match=match):
        call(v)


# (cap): the first request's combined payload, vllm_capture(truths[0]): 6 rows x 3 layers x top-2, int16
VLLM_PAYLOAD_ERRORS = [
    pytest.param(
        lambda cap: from_vllm([None], num_experts=E),
        EngineFormatError,
        "request 0: routed_experts is None",
        id="none",
    ),
    pytest.param(
        lambda cap: from_vllm(["not base64!"], num_experts=E),
        EngineFormatError,
        "request 0: routed_experts is a string but not valid base64",
        id="not-base64",
    ),
    pytest.param(
        lambda cap: from_vllm([base64.b64encode(b"\x00" * 12).decode()], num_experts=E),
        EngineFormatError,
        "request 0: routed_experts decodes to 12 bytes that are not a .npy file",
        id="not-npy",
    ),
    pytest.param(
        lambda cap: from_vllm([npy_base64(cap)[:-24]], num_experts=E),
        EngineFormatError,
        re.escape(
            "request 0: routed_experts .npy header declares shape (6, 3, 2) of int16 = 72 bytes, but 55 bytes "
            "follow the header; the payload is truncated or its header is corrupt"
        ),
        id="npy-truncated",
    ),
    pytest.param(
        lambda cap: from_vllm([base64.b64decode(npy_base64(cap))[:20]], num_experts=E),
        EngineFormatError,
        "request 0: routed_experts is a corrupt or truncated .npy payload",
        id="npy-bytes-truncated",
    ),
    pytest.param(
        lambda cap: from_vllm([[[[1, 2]], [[1]]]], num_experts=E),
        EngineFormatError,
        r"request 0: routed_experts is not a rectangular \[rows, layers, top_k\] array",
        id="ragged-list",
    ),
    pytest.param(
        lambda cap: from_vllm([cap.astype(np.float32)], num_experts=E),
        EngineFormatError,
        "request 0: routed_experts has dtype float32; expected an integer dtype",
        id="float-dtype",
    ),
    pytest.param(
        lambda cap: from_vllm([cap[0]], num_experts=E),
        EngineFormatError,
        r"request 0: routed_experts must be \[rows, layers, top_k\], found shape \(3, 2\)",
        id="two-dims",
    ),
    pytest.param(
        lambda cap: from_vllm([cap, cap[..., :1]], num_experts=E),
        EngineFormatError,
        "request 1: routed_experts has 3 layers x top-1, but request 0 has 3 layers x top-2",
        id="layers-x-top-k-differ",
    ),
    pytest.param(
        lambda cap: from_vllm([[], []], num_experts=E),
        EngineFormatError,
        "cannot tell the number of layers and top-k: every request's routed_experts is empty",
        id="all-empty",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), VLLM_PAYLOAD_ERRORS)
def test_vllm_payload_errors(requests_, call, error, match):
    _, truths = requests_
    cap = vllm_capture(truths[0])
    with pytest.raises(error, match=match):
        call(cap)


def test_dense_layers_dropped_and_checked(requests_):
    _, truths = requests_
    caps = [vllm_capture(t, moe_layer_ids=MOE, num_hidden_layers=HIDDEN) for t in truths]
    # SGLang-JAX style -1 placeholders on dense layers are empty too
    caps_neg = [full_layer_axis(vllm_capture(t), MOE, HIDDEN, fill=-1) for t in truths]
    assert from_vllm(caps_neg, num_experts=E, moe_layer_ids=MOE) == from_vllm(caps, num_experts=E, moe_layer_ids=MOE)
    with pytest.raises(
        EngineFormatError, match=re.escape("request 0: layer 1 is not in moe_layer_ids [0, 2, 4] but holds expert ids")
    ):
        from_vllm(caps, num_experts=E, moe_layer_ids=[0, 2, 4])  # shifted layer map
    with pytest.raises(
        EngineFormatError,
        match=re.escape("routed_experts has 5 layers, which fits neither an MoE-only layer axis (2 layers"),
    ):
        from_vllm(caps, num_experts=E, moe_layer_ids=[1, 6])
    with pytest.raises(EngineFormatError, match=re.escape("moe_layer_ids must be strictly increasing")):
        from_vllm(caps, num_experts=E, moe_layer_ids=[2, 1, 4])
    # without moe_layer_ids the dense layers are kept, and their all-zero rows are caught
    with pytest.raises(
        ZeroRoutesError,
        match=re.escape(
            "request 0: every one of its 6 routes on layer 0 is expert 0 in all 2 slots (layers with this pattern: "
            "[0, 3])"
        ),
    ):
        from_vllm(caps, num_experts=E)


def test_zero_routes(requests_):
    _, truths = requests_
    caps = [vllm_capture(t) for t in truths]
    caps[2] = caps[2].copy()
    caps[2][:, 1] = 0  # the silent capture failure: one layer of one request all zeros
    with pytest.raises(
        ZeroRoutesError, match=re.escape("request 2: every one of its 7 routes on layer 2 is expert 0 in all 2 slots")
    ):
        from_vllm(caps, num_experts=E, moe_layer_ids=MOE)
    trace = from_vllm(caps, num_experts=E, moe_layer_ids=MOE, allow_zero_routes=True)
    assert trace.valid.tolist() == [True] * 6 + [True] * 5 + [False] * 7
    # top-1: a short sequence may route to expert 0 by chance; a long one may not
    short = np.zeros((3, 2, 1), dtype=np.int16)
    assert from_vllm([short], num_experts=E).num_tokens == 3
    with pytest.raises(ZeroRoutesError, match="request 0: every one of its 20 routes on layer 0"):
        from_vllm([np.zeros((20, 2, 1), dtype=np.int16)], num_experts=E)



@pytest.mark.parametrize("missing_first", [False, True])
def test_zero_routes_of_long_sequences(missing_first):
    """Sequences of 64+ rows on average: each (sequence, layer) is settled by its first row where it can
    be, and read whole only where that row is zero or has no route; the answer is the whole read's."""
    g = torch.Generator().manual_seed(3)
    caps = [torch.rand(100, 3, E, generator=g).argsort(-1)[..., :2].numpy().astype(np.int16) for _ in range(3)]
    if missing_first:
        caps[1][0] = -1  # a first row without a route (missing="invalid"): settled by the rows after it
    assert from_vllm(caps, num_experts=E, missing="invalid").num_tokens == 300
    caps[2][:, 2] = 0  # every row of request 2 on layer 2: the silent capture failure
    with pytest.raises(ZeroRoutesError, match=re.escape("request 2: every one of its 100 routes on layer 2")):
        from_vllm(caps, num_experts=E, missing="invalid")
    trace = from_vllm(caps, num_experts=E, missing="invalid", allow_zero_routes=True)
    assert trace.valid.tolist() == [True] * 100 + [not missing_first] + [True] * 99 + [False] * 100

def test_missing_rows(requests_):
    _, truths = requests_
    caps = [vllm_capture(t).astype(np.int16) for t in truths]
    caps[1][2] = -1  # a prefix-cache row vLLM could not restore
    with pytest.raises(
        EngineFormatError, match=re.escape("request 1: row 2 has no route on layer 1 (routed_experts holds [-1, -1])")
    ):
        from_vllm(caps, num_experts=E, moe_layer_ids=MOE)
    trace = from_vllm(caps, num_experts=E, moe_layer_ids=MOE, missing="invalid")
    assert trace.valid.nonzero().numel() == trace.num_tokens - 1 and not bool(trace.valid[6 + 2])
    back = to_vllm(trace, dtype="int16")
    assert (back[1][2] == -1).all()
    assert same_routes(from_vllm(back, num_experts=E, moe_layer_ids=MOE, missing="invalid"), trace)
    with pytest.raises(EngineFormatError, match="unsigned dtype uint8 cannot hold -1"):
        to_vllm(trace, dtype="uint8")
    with pytest.raises(EngineFormatError, match=r'^missing must be "error" or "invalid", found True$'):
        from_vllm(caps, num_experts=E, moe_layer_ids=MOE, missing=True)


# (trace): the three requests' engine trace with num_experts=300
TO_VLLM_ERRORS = [
    pytest.param(
        lambda trace: to_vllm(trace, dtype="uint8"),
        EngineFormatError,
        "dtype uint8 cannot hold expert ids up to 299",
        id="dtype-too-narrow",
    ),
    pytest.param(
        lambda trace: to_vllm(trace, encoding="json"),
        EngineFormatError,
        "encoding must be",
        id="encoding",
    ),
    pytest.param(
        lambda trace: to_vllm(trace, prompt_lens=[3, 6, 2]),
        EngineFormatError,
        re.escape("sequence 1 has 5 engine rows, which cannot hold a prompt of 6 tokens"),
        id="prompt-longer-than-rows",
    ),
    pytest.param(
        lambda trace: to_vllm(trace, num_hidden_layers=2),
        EngineFormatError,
        re.escape("num_hidden_layers=2 cannot hold the trace's layers [0, 1, 2]"),
        id="num-hidden-layers",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), TO_VLLM_ERRORS)
def test_to_vllm_errors(requests_, call, error, match):
    _, truths = requests_
    trace = from_vllm([vllm_capture(t) for t in truths], num_experts=300)
    with pytest.raises(error, match=match):
        call(trace)


def traces(*, with_invalid=False, min_len=0):
    """Random engine- or training-row traces (tests/helpers.traces): 1 to 4 sequences of up to 6
    rows, E in 4, 16, 300, K <= 3, sorted layer ids in [0, 7], no gates; ``with_invalid``: each
    row's valid flag drawn (no mask on an empty trace)."""
    return shared_traces(
        min_seqs=1,
        max_seqs=4,
        min_len=min_len,
        max_len=6,
        num_experts=st.sampled_from([4, 16, 300]),  # (was max(K, 4), 16, 300 with K <= 3)
        max_layer_id=7,
        valid=("drawn",) if with_invalid else (None,),
        gates=(None,),
    )


@FAST
@given(
    trace=traces(with_invalid=True),
    encoding=st.sampled_from(["array", "list", "npy_base64"]),
    dtype=st.sampled_from(["int16", "int32"]),
    full=st.booleans(),
    data=st.data(),
)
def test_vllm_round_trip(trace, encoding, dtype, full, data):
    if encoding == "list" and not trace.num_tokens:
        return  # an all-empty nested list carries no shape; covered by the error test
    hidden = 8 if full else None
    payloads = to_vllm(trace, encoding=encoding, dtype=dtype, num_hidden_layers=hidden)
    back = from_vllm(payloads, num_experts=trace.num_experts, moe_layer_ids=trace.layer_ids, missing="invalid")
    assert same_routes(back, trace)
    # split form: prompt part + generated part, with counts
    lens = trace.seq_lens.tolist()
    if all(n >= 1 for n in lens):
        P = [data.draw(st.integers(1, n)) for n in lens]
        split = to_vllm(trace, prompt_lens=P, encoding=encoding, dtype=dtype, num_hidden_layers=hidden)
        back = from_vllm(
            [g for _, g in split],
            prompt_routed_experts=[p for p, _ in split],
            num_experts=trace.num_experts,
            moe_layer_ids=trace.layer_ids,
            prompt_lens=P,
            completion_lens=[n - p + 1 for n, p in zip(lens, P)],
            missing="invalid",
        )
        assert same_routes(back, trace)


# --- SGLang -----------------------------------------------------------------------------------------
def test_sglang_decode():
    rows = random_routes(4, HIDDEN, K, E)
    payload = base64.b64encode(rows.astype("<i4").tobytes()).decode()
    assert np.array_equal(decode_sglang_payload(payload, num_layers=HIDDEN, top_k=K), rows)
    assert np.array_equal(decode_sglang_payload(torch.from_numpy(rows).reshape(-1), num_layers=HIDDEN, top_k=K), rows)
    with pytest.raises(
        EngineFormatError,
        match=re.escape(
            "payload: routed_experts holds 160 bytes, not a whole number of rows of int32 x num_layers x top_k = 4 x "
            "6 x 2 = 48 bytes"
        ),
    ):
        decode_sglang_payload(payload, num_layers=6, top_k=K)
    with pytest.raises(EngineFormatError, match="payload: routed_experts is not valid base64"):
        decode_sglang_payload("@@@", num_layers=HIDDEN, top_k=K)
    with pytest.raises(
        EngineFormatError, match=re.escape("payload: routed_experts has shape (4, 5, 2), expected [rows, 5, 3]")
    ):
        decode_sglang_payload(rows, num_layers=HIDDEN, top_k=3)


def test_sglang_holds_one_decoded_payload_at_a_time(requests_, monkeypatch):
    """from_sglang narrows each payload to the trace's id dtype as it is decoded: the int32 copy of
    a payload is gone before the next is decoded, and the narrowed parts go as they are joined."""
    import gc
    import weakref

    import routereplay.formats.sglang as sglang_mod

    lens, truths = requests_
    infos = [sglang_meta_info(t, p, moe_layer_ids=MOE, num_hidden_layers=HIDDEN) for (p, _), t in zip(lens, truths)]
    decoded, alive_at_decode = [], []
    real = sglang_mod.decode_sglang_payload

    def decode(*a, **k):
        gc.collect()
        alive_at_decode.append(sum(r() is not None for r in decoded))
        arr = real(*a, **k)
        decoded.append(weakref.ref(arr))
        return arr

    monkeypatch.setattr(sglang_mod, "decode_sglang_payload", decode)
    trace = from_sglang(infos, num_layers=HIDDEN, top_k=K, num_experts=E, moe_layer_ids=MOE)
    assert trace == engine_trace(truths, source="sglang")
    assert len(decoded) == len(infos) > 1 and alive_at_decode == [0] * len(infos)
    from routereplay.formats.common import _assemble

    parts = [np.full((2, 3, K), i, dtype=np.uint8) + np.arange(K, dtype=np.uint8) for i in range(3)]
    joined, cu = _assemble(parts, ["a", "b", "c"], num_experts=E, consume=True)
    assert parts == [None] * 3 and joined.shape == (6, 3, K) and cu.tolist() == [0, 2, 4, 6]


def test_sglang_single_turn(requests_):
    lens, truths = requests_
    infos = [sglang_meta_info(t, p, moe_layer_ids=MOE, num_hidden_layers=HIDDEN) for (p, _), t in zip(lens, truths)]
    trace = from_sglang(infos, num_layers=HIDDEN, top_k=K, num_experts=E, moe_layer_ids=MOE)
    assert trace == engine_trace(truths, source="sglang")
    # a whole response dict works as well as its meta_info
    assert (
        from_sglang(
            [{"text": "", "meta_info": i} for i in infos], num_layers=HIDDEN, top_k=K, num_experts=E, moe_layer_ids=MOE
        )
        == trace
    )
    # bare payloads with explicit counts
    assert (
        from_sglang(
            [i["routed_experts"] for i in infos],
            num_layers=HIDDEN,
            top_k=K,
            num_experts=E,
            moe_layer_ids=MOE,
            num_tokens=[p + c for p, c in lens],
        )
        == trace
    )


@pytest.mark.parametrize("honour", [True, False])
def test_sglang_start_len(requests_, honour):
    lens, truths = requests_
    infos = [sglang_meta_info(t, p, start_len=2, honour_start_len=honour) for (p, _), t in zip(lens, truths)]
    trace = from_sglang(infos, num_layers=len(MOE), top_k=K, num_experts=E, start_lens=[2, 2, 2], moe_layer_ids=MOE)
    assert trace == engine_trace([t[2:] for t in truths], source="sglang")


def _sglang_counts(requests_):
    """The first request's meta_info: ``late`` with start_len=2 and one completion token too many,
    ``short`` (no start_len) with one prompt token too few."""
    lens, truths = requests_
    late = sglang_meta_info(truths[0], lens[0][0], start_len=2)
    late["completion_tokens"] += 1
    short = sglang_meta_info(truths[0], lens[0][0])
    short["prompt_tokens"] -= 1
    return SimpleNamespace(late=late, short=short)


# (s): _sglang_counts(requests_)
SGLANG_ROW_COUNT_ERRORS = [
    pytest.param(
        lambda s: from_sglang([s.late], num_layers=len(MOE), top_k=K, num_experts=E, start_lens=[2]),
        EngineFormatError,
        re.escape(
            "request 0: routed_experts has 4 rows, expected seqlen-1-start_len = 8-1-2 = 5 (start_len honoured) or "
            "seqlen-1 = 7"
        ),
        id="rows-with-start-len",
    ),
    pytest.param(
        lambda s: from_sglang([s.short], num_layers=len(MOE), top_k=K, num_experts=E),
        EngineFormatError,
        re.escape("request 0: routed_experts has 6 rows, expected seqlen-1 = 6-1 = 5;"),
        id="rows",
    ),
    pytest.param(
        lambda s: from_sglang(
            [{**s.short, "routed_experts_start_len": 2}], num_layers=len(MOE), top_k=K, num_experts=E, start_lens=[1]
        ),
        EngineFormatError,
        re.escape("request 0: start_len=1 but meta_info says routed_experts_start_len=2"),
        id="start-len-differs",
    ),
    pytest.param(
        lambda s: from_sglang([s.short["routed_experts"]], num_layers=len(MOE), top_k=K, num_experts=E, start_lens=[2]),
        EngineFormatError,
        "request 0: with routed_experts_start_len=2 the token count is needed",
        id="start-len-without-count",
    ),
    pytest.param(
        lambda s: from_sglang([{"prompt_tokens": 3}], num_layers=len(MOE), top_k=K, num_experts=E),
        EngineFormatError,
        "request 0: meta_info has no routed_experts",
        id="no-routed-experts",
    ),
    pytest.param(
        lambda s: from_sglang(
            [{"routed_experts": s.short["routed_experts"]}], num_layers=len(MOE), top_k=K, num_experts=E
        ),
        EngineFormatError,
        "request 0: meta_info lacks prompt_tokens / completion_tokens",
        id="no-token-counts",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), SGLANG_ROW_COUNT_ERRORS)
def test_sglang_row_count_errors(requests_, call, error, match):
    s = _sglang_counts(requests_)
    with pytest.raises(error, match=match):
        call(s)


@pytest.mark.parametrize("honour", [True, False])
def test_sglang_multi_turn(honour):
    # turn 1: prompt 4 + completion 3; turn 2: the whole conversation + 2 observation tokens as prompt, 5 generated
    P1, C1, OBS, C2 = 4, 3, 2, 5
    S1, P2 = P1 + C1, P1 + C1 + OBS
    truth = random_routes(P2 + C2, len(MOE), K, E, seed=3)
    turn1 = sglang_meta_info(truth[:S1], P1, moe_layer_ids=MOE, num_hidden_layers=HIDDEN)
    trace = from_sglang([turn1], num_layers=HIDDEN, top_k=K, num_experts=E, moe_layer_ids=MOE)
    assert trace.num_tokens == S1 - 1
    # turn 2 re-forwards the earlier tokens; its routes there may differ (batch-dependent numerics)
    other = np.array([[5, 6]] * len(MOE))
    turn2 = sglang_meta_info(
        truth,
        P2,
        start_len=S1 - 1,
        honour_start_len=honour,
        moe_layer_ids=MOE,
        num_hidden_layers=HIDDEN,
        override_rows={0: other},
    )
    merged = extend_sglang(trace, 0, turn2, num_layers=HIDDEN, top_k=K, start_len=S1 - 1, moe_layer_ids=MOE)
    assert merged == engine_trace([truth], source="sglang")  # earlier turn's routes kept, rows appended


def test_sglang_multi_turn_fill_and_errors():
    P1, C1, C2 = 3, 2, 4
    truth = random_routes(P1 + C1 + C2, len(MOE), K, E, seed=4)
    turn1 = sglang_meta_info(truth[: P1 + C1], P1)
    two = from_sglang([turn1, turn1], num_layers=len(MOE), top_k=K, num_experts=E, moe_layer_ids=MOE)
    # in training rows the last token of turn 1 is an invalid row; turn 2 (start_len ignored) fills it
    training = from_sglang([turn1], num_layers=len(MOE), top_k=K, num_experts=E, moe_layer_ids=MOE, rows="training")
    turn2 = sglang_meta_info(truth, P1 + C1, start_len=P1 + C1 - 1, honour_start_len=False)
    filled = extend_sglang(training, 0, turn2, num_layers=len(MOE), top_k=K, start_len=P1 + C1 - 1, moe_layer_ids=MOE)
    assert same_routes(filled, engine_trace([truth]))
    # the other sequence of a batch is left alone
    grown = extend_sglang(two, 1, turn2, num_layers=len(MOE), top_k=K, start_len=P1 + C1 - 1, moe_layer_ids=MOE)
    assert grown.seq_lens.tolist() == [P1 + C1 - 1, P1 + C1 + C2 - 1]
    assert same_routes(grown.sequence(1), engine_trace([truth])) and grown.sequence(0) == two.sequence(0)
    late = sglang_meta_info(truth, P1 + C1, start_len=P1 + C1)
    with pytest.raises(
        EngineFormatError,
        match=re.escape(
            "request for sequence 0: the new rows start at token 5, but sequence 0 holds only 4 rows (tokens 0..3); "
            "rows 4..4 would be missing"
        ),
    ):
        extend_sglang(two, 0, late, num_layers=len(MOE), top_k=K, start_len=P1 + C1, moe_layer_ids=MOE)
    with pytest.raises(
        TraceMismatchError,
        match=re.escape("the payload gives layers [0, 1, 2] x top-2, the trace has layers [1, 2, 4]"),
    ):
        extend_sglang(two, 0, turn2, num_layers=len(MOE), top_k=K, start_len=P1 + C1 - 1)


@FAST
@given(trace=traces(with_invalid=True), full=st.booleans(), data=st.data())
def test_sglang_round_trip(trace, full, data):
    lens = trace.seq_lens.tolist()
    starts = [data.draw(st.integers(0, n)) for n in lens]
    payloads = to_sglang(trace, start_lens=starts, num_hidden_layers=8 if full else None)
    back = from_sglang(
        payloads,
        num_layers=8 if full else trace.num_layers,
        top_k=trace.top_k,
        num_experts=trace.num_experts,
        num_tokens=[n + 1 for n in lens],
        start_lens=starts,
        moe_layer_ids=trace.layer_ids,
        missing="invalid",
    )
    keep = torch.cat(
        [torch.arange(int(trace.cu_seqlens[b]) + s, int(trace.cu_seqlens[b + 1])) for b, s in enumerate(starts)]
    )
    expected = RoutingTrace(
        experts=trace.experts[keep],
        valid=trace.valid_mask[keep],
        cu_seqlens=torch.tensor([0, *np.cumsum([n - s for n, s in zip(lens, starts)]).tolist()]),
        layer_ids=trace.layer_ids,
        num_experts=trace.num_experts,
    )
    assert same_routes(back, expected)


# --- verl -------------------------------------------------------------------------------------------
def _verl_fixture(requests_, dtype=torch.int16):
    lens, truths = requests_
    caps = [vllm_capture(t, moe_layer_ids=MOE, num_hidden_layers=HIDDEN) for t in truths]
    re_BSLK, mask = verl_batch(caps, [p for p, _ in lens], prompt_length=6, response_length=7, dtype=dtype)
    return lens, truths, re_BSLK, mask


def training_trace(truths, last_valid=False, source="verl") -> RoutingTrace:
    cu = np.cumsum([0] + [t.shape[0] for t in truths])
    valid = torch.ones(int(cu[-1]), dtype=torch.bool)
    experts = torch.from_numpy(np.concatenate(truths)).clone()
    if not last_valid:
        valid[torch.from_numpy(cu[1:] - 1)] = False
        experts[~valid] = 0
    return RoutingTrace(
        experts=experts,
        cu_seqlens=torch.from_numpy(cu),
        layer_ids=MOE,
        num_experts=E,
        valid=None if last_valid else valid,
        meta={"source": source},
    )


def test_verl_padded_engine_routes(requests_):
    lens, truths, re_BSLK, mask = _verl_fixture(requests_)
    assert re_BSLK.shape == (3, 13, HIDDEN, K) and mask[1].tolist() == [0] + [1] * 6 + [0] * 6
    trace = from_verl(re_BSLK, mask, num_experts=E, moe_layer_ids=MOE)
    assert trace == training_trace(truths)
    engine = from_verl(re_BSLK, mask.bool(), num_experts=E, moe_layer_ids=MOE, rows="engine")
    assert same_routes(engine, engine_trace(truths))
    # and back to verl's own layout
    out, out_mask = to_verl(
        trace, prompt_lens=[p for p, _ in lens], prompt_length=6, response_length=7, num_hidden_layers=HIDDEN
    )
    assert torch.equal(out, re_BSLK) and torch.equal(out_mask, mask)


def test_verl_trainer_recorded_and_unpadded(requests_):
    lens, truths = requests_
    re_BSLK, mask = verl_batch(
        [full_layer_axis(t, MOE, HIDDEN) for t in truths],
        [p for p, _ in lens],
        prompt_length=5,
        response_length=6,
        num_tokens=[p + c for p, c in lens],
    )
    # R2: the trainer recorded a route for every token, the last one included
    trace = from_verl(re_BSLK, mask, num_experts=E, moe_layer_ids=MOE, last_token_routed=True)
    assert trace == training_trace(truths, last_valid=True)
    samples = to_verl_unpadded(training_trace(truths), num_hidden_layers=HIDDEN)
    assert [s.shape[0] for s in samples] == [p + c for p, c in lens] and samples[0].dtype == torch.int16
    back = from_verl_unpadded(samples, num_experts=E, moe_layer_ids=MOE, num_tokens=[p + c for p, c in lens])
    assert back == training_trace(truths)
    with pytest.raises(
        EngineFormatError, match=re.escape("sample 2: routed_experts has 8 rows, expected one per token = 9")
    ):
        from_verl_unpadded(samples, num_experts=E, moe_layer_ids=MOE, num_tokens=[7, 6, 9])



@pytest.mark.parametrize("K, dtype", [(2, torch.int16), (3, torch.int16), (8, torch.uint8), (4, torch.int32)])
@pytest.mark.parametrize("pad", ["right", "left+right", "scattered"])
def test_first_nonzero_padding_row_reads_runs_or_rows_alike(K, dtype, pad):
    """from_verl's padding check: few long runs of padding are counted run by run, many short ones
    row by row; both give the first padding row holding a value, as a per-row test of every row does."""
    from routereplay.formats.common import _first_nonzero_row, _nonzero_rows

    g = torch.Generator().manual_seed(K)
    B, S = 4, 96
    lens = torch.tensor([96, 40, 70, 1])
    pos = torch.arange(S)[None, :]
    if pad == "right":
        real_BS = pos < lens[:, None]
    elif pad == "left+right":
        real_BS = (pos >= 10) & (pos < 10 + lens[:, None] // 2)
    else:
        real_BS = torch.rand(B, S, generator=g) < 0.5
    x_NLK = torch.randint(1, 100, (B * S, 3, K), generator=g).to(dtype)
    pad_N = ~real_BS.reshape(-1)
    x_NLK[pad_N] = 0
    assert _first_nonzero_row(x_NLK, pad_N) == -1
    for n in pad_N.nonzero().reshape(-1)[[0, -1, 7]].tolist():  # a busy row first, last, inside a run
        busy = x_NLK.clone()
        busy[n, 1, K - 1] = 5
        busy[pad_N.nonzero().reshape(-1)[-1], 2, 0] = 3  # and a later one, which is not the answer
        expected = int((_nonzero_rows(busy) & pad_N).nonzero()[0, 0])
        assert _first_nonzero_row(busy, pad_N) == expected == n

def _truncated_response(mask):
    """Response truncated after generation: sample 2's mask ends at 8, its routes spill into padding."""
    cut = mask.clone()
    cut[2, 8:] = 0
    return cut


# (re_BSLK, mask): _verl_fixture(requests_)'s padded routes [3, 13, 5, 2] and attention mask [3, 13]
VERL_MISALIGNMENT_ERRORS = [
    pytest.param(
        lambda re_BSLK, mask: from_verl(re_BSLK, _truncated_response(mask), num_experts=E, moe_layer_ids=MOE),
        EngineFormatError,
        re.escape("sample 2: routed_experts holds a route at position 8, where attention_mask is 0 (padding)"),
        id="route-on-padding",
    ),
    pytest.param(
        lambda re_BSLK, mask: from_verl(torch.roll(re_BSLK, 1, dims=1), mask, num_experts=E, moe_layer_ids=MOE),
        EngineFormatError,
        re.escape("sample 0: the last token (row 6) has a route, but an engine capture stops one token short"),
        id="last-token-routed",
    ),
    pytest.param(
        lambda re_BSLK, mask: from_verl(re_BSLK, mask[:, :12], num_experts=E),
        EngineFormatError,
        re.escape("verl batch: routed_experts is [3, 13, 5, 2] but attention_mask is [3, 12]"),
        id="shapes",
    ),
    pytest.param(
        lambda re_BSLK, mask: from_verl(re_BSLK, mask * 2, num_experts=E),
        EngineFormatError,
        "verl batch: attention_mask must hold only 0 and 1",
        id="mask-values",
    ),
    pytest.param(
        lambda re_BSLK, mask: from_verl(re_BSLK[0], mask[0], num_experts=E),
        EngineFormatError,
        re.escape("verl batch: routed_experts must be [bs, seq, layers, top_k], found shape (13, 5, 2)"),
        id="routes-dims",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), VERL_MISALIGNMENT_ERRORS)
def test_verl_misalignment_errors(requests_, call, error, match):
    _, _, re_BSLK, mask = _verl_fixture(requests_)
    with pytest.raises(error, match=match):
        call(re_BSLK, mask)


def test_to_verl_errors(requests_):
    lens, truths = requests_
    trace = training_trace(truths)
    with pytest.raises(EngineFormatError, match=re.escape("sequence 1: prompt_lens[1]=7 is longer than its 6 tokens")):
        to_verl(trace, prompt_lens=[3, 7, 2])
    with pytest.raises(
        EngineFormatError, match=re.escape("prompt_length=4 / response_length=7 cannot hold the longest prompt (5)")
    ):
        to_verl(trace, prompt_lens=[p for p, _ in lens], prompt_length=4, response_length=7)
    holed = trace.replace(check=False, valid=trace.valid.clone().index_fill_(0, torch.tensor([2]), False))
    with pytest.raises(
        EngineFormatError,
        match=re.escape(
            "sequence 0, position 2 has no route; verl's routed_experts can leave only a sequence's last token"
        ),
    ):
        to_verl(holed, prompt_lens=[p for p, _ in lens])
    with pytest.raises(EngineFormatError, match="dtype torch.uint8 cannot hold expert ids up to 299"):
        to_verl(trace.replace(check=False, num_experts=300), prompt_lens=[p for p, _ in lens], dtype=torch.uint8)


@FAST
@given(trace=traces(min_len=1), last_routed=st.booleans(), data=st.data())
def test_verl_round_trip(trace, last_routed, data):
    if not last_routed:  # an engine capture: each sequence's last token has no route
        trace = engine_to_training(training_to_engine(trace, drop_valid_last=True))
    P = [data.draw(st.integers(0, n)) for n in trace.seq_lens.tolist()]
    re_BSLK, mask = to_verl(trace, prompt_lens=P, num_hidden_layers=8, dtype=torch.int32)
    kw = {"num_experts": trace.num_experts, "moe_layer_ids": trace.layer_ids, "last_token_routed": last_routed}
    assert same_routes(from_verl(re_BSLK, mask, **kw), trace)
    assert same_routes(
        from_verl_unpadded(to_verl_unpadded(trace), **{**kw, "moe_layer_ids": None}).replace(
            check=False, layer_ids=trace.layer_ids
        ),
        trace,
    )


# --- Megatron-Core ----------------------------------------------------------------------------------
@pytest.fixture
def megatron_rr():
    module, reason = load_megatron_router_replay()
    if module is None:
        pytest.skip(reason)
    module.RouterReplay.clear_global_router_replay_instances()
    yield module
    module.RouterReplay.clear_global_router_replay_instances()


def test_megatron_record_and_replay_with_real_router_replay(megatron_rr):
    RouterReplay = megatron_rr.RouterReplay
    instances = [RouterReplay() for _ in MOE]  # one per TopKRouter, in build order
    lens = [5, 3, 4]
    truth = random_routes(sum(lens), len(MOE), K, E, seed=5)
    for layer, inst in enumerate(instances):  # what RECORD stores: the router's top_indices [T, K] int64
        inst.record_indices(torch.from_numpy(truth[:, layer]).to(torch.int64))
    trace = from_megatron(
        RouterReplay.get_recorded_data(), router_layer_ids=MOE, cu_seqlens=[0, 5, 8, 12], num_experts=E
    )
    assert trace == training_trace([truth[:5], truth[5:8], truth[8:]], last_valid=True, source="megatron")
    RouterReplay.set_replay_data(to_megatron(trace, router_layer_ids=MOE))
    for layer, inst in enumerate(instances):
        assert inst.target_topk_idx.dtype == torch.int64
        assert torch.equal(inst.target_topk_idx, torch.from_numpy(truth[:, layer]))
    # a second model in the process appends its routers to the same global list
    [RouterReplay() for _ in MOE]
    with pytest.raises(
        EngineFormatError,
        match=re.escape("get_recorded_data() returned 6 entries but router_layer_ids names 3 routers"),
    ):
        from_megatron(RouterReplay.get_recorded_data(), router_layer_ids=MOE, cu_seqlens=[0, 12], num_experts=E)
    with pytest.raises(EngineFormatError, match=re.escape("router instance 3 (layer 5) recorded nothing")):
        from_megatron(
            RouterReplay.get_recorded_data(), router_layer_ids=[1, 2, 4, 5, 6, 7], cu_seqlens=[0, 12], num_experts=E
        )


class _Router(torch.nn.Module):
    def __init__(self, replay, layer_number):
        super().__init__()
        self.router_replay, self.layer_number = replay, layer_number


def test_megatron_router_layer_ids():
    replays = [object() for _ in range(3)]
    model = torch.nn.ModuleList(
        [torch.nn.Linear(1, 1), _Router(replays[0], 2), _Router(replays[1], 3), _Router(replays[2], 5)]
    )
    assert megatron_router_layer_ids(model) == [1, 2, 4]
    assert megatron_router_layer_ids(model, instances=[replays[2], replays[0], replays[1]]) == [4, 1, 2]
    with pytest.raises(EngineFormatError, match="RouterReplay instance 3 of 4 belongs to no router of this model"):
        megatron_router_layer_ids(model, instances=[*replays, object()])
    with pytest.raises(EngineFormatError, match="no router with a router_replay was found"):
        megatron_router_layer_ids(torch.nn.Linear(1, 1))
    with pytest.raises(EngineFormatError, match=re.escape("router_layer_ids names layer(s) [1] more than once")):
        megatron_router_layer_ids(torch.nn.ModuleList([_Router(object(), 2), _Router(object(), 2)]))


def _megatron_sbhd():
    """2 sequences of 3 tokens: ``truth``, the training ``trace`` (every row routed), its sbhd
    replay list, the ``engine`` trace (each last row unrouted) and ``holed`` (row 1 unrouted too)."""
    truth = random_routes(6, len(MOE), K, E, seed=6)
    trace = training_trace([truth[:3], truth[3:]], last_valid=True, source="megatron")
    engine = training_trace([truth[:3], truth[3:]])
    holed = engine.replace(check=False, valid=engine.valid.clone().index_fill_(0, torch.tensor([1]), False))
    sbhd = to_megatron(trace, router_layer_ids=MOE, order="sbhd")
    return SimpleNamespace(truth=truth, trace=trace, sbhd=sbhd, engine=engine, holed=holed)


def test_megatron_sbhd_and_fill():
    m = _megatron_sbhd()
    assert torch.equal(m.sbhd[0][1], torch.from_numpy(m.truth[3, 0]))  # row s*B + b: token 0 of sequence 1
    assert from_megatron(m.sbhd, router_layer_ids=MOE, cu_seqlens=[0, 3, 6], num_experts=E, order="sbhd") == m.trace
    # engine captures leave each last token without a route: harmless there, filled with 0..k-1
    filled = to_megatron(m.engine, router_layer_ids=MOE)
    assert filled[0][2].tolist() == [0, 1] and filled[0][5].tolist() == [0, 1]
    # a hole inside a sequence is refused (test_megatron_errors) unless fill_invalid=True
    assert to_megatron(m.holed, router_layer_ids=MOE, fill_invalid=True)[1][1].tolist() == [0, 1]


# (m): _megatron_sbhd()
MEGATRON_ERRORS = [
    pytest.param(
        lambda m: to_megatron(m.holed, router_layer_ids=MOE),
        EngineFormatError,
        re.escape("sequence 0, position 1 has no route, and Megatron replays every row"),
        id="hole-inside-sequence",
    ),
    pytest.param(
        lambda m: to_megatron(m.trace, router_layer_ids=[1, 3]),
        LayerMismatchError,
        re.escape("router layer(s) [3] are not in the trace, which has layers [1, 2, 4]"),
        id="router-layer-not-in-trace",
    ),
    pytest.param(
        lambda m: to_megatron(m.trace, router_layer_ids=MOE, top_k=4),
        LayerMismatchError,
        "the model's routers have top_k=4, the trace has top_k=2",
        id="top-k",
    ),
    pytest.param(
        lambda m: to_megatron(
            training_trace([m.truth[:2], m.truth[2:]], last_valid=True), router_layer_ids=MOE, order="sbhd"
        ),
        EngineFormatError,
        re.escape('order="sbhd" needs sequences of equal length (pad them first), found lengths [2, 4]'),
        id="sbhd-unequal-lengths",
    ),
    pytest.param(
        lambda m: from_megatron(m.sbhd, router_layer_ids=MOE, cu_seqlens=[0, 5], num_experts=E),
        EngineFormatError,
        re.escape("cu_seqlens [0, 5] must run from 0 to the 6 rows each router recorded"),
        id="cu-seqlens-rows",
    ),
    pytest.param(
        lambda m: from_megatron(
            [m.sbhd[0], m.sbhd[1][:5], m.sbhd[2]], router_layer_ids=MOE, cu_seqlens=[0, 6], num_experts=E
        ),
        EngineFormatError,
        re.escape("router instance 1 (layer 2) recorded [5, 2] but instance 0 recorded [6, 2]"),
        id="instances-differ",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), MEGATRON_ERRORS)
def test_megatron_errors(call, error, match):
    m = _megatron_sbhd()
    with pytest.raises(error, match=match):
        call(m)


@FAST
@given(trace=traces(), order=st.sampled_from(["thd", "sbhd"]), data=st.data())
def test_megatron_round_trip(trace, order, data):
    if order == "sbhd":
        n = trace.seq_lens.tolist()[0]
        trace = trace.select_sequences([0] * trace.num_seqs) if n else trace  # equal lengths
        if n == 0:
            order = "thd"
    perm = data.draw(st.permutations(list(trace.layer_ids)))  # router instances in any build order
    replay = to_megatron(trace, router_layer_ids=perm, order=order)
    assert all(r.dtype == torch.int64 and r.is_contiguous() for r in replay)
    back = from_megatron(
        replay, router_layer_ids=perm, cu_seqlens=trace.cu_seqlens, num_experts=trace.num_experts, order=order
    )
    assert same_routes(back, trace)


# --- argument errors not covered above --------------------------------------------------------------
def _argument_inputs(requests_):
    """The requests' combined payloads (caps), the first one's SGLang meta_info (info) and their engine trace."""
    lens, truths = requests_
    caps = [vllm_capture(t) for t in truths]
    info = sglang_meta_info(truths[0], lens[0][0])
    return SimpleNamespace(caps=caps, info=info, trace=from_vllm(caps, num_experts=E, moe_layer_ids=MOE))


# (a): _argument_inputs(requests_)
ARGUMENT_ERRORS = [
    pytest.param(
        lambda a: from_vllm(a.caps, num_experts=E, rows="packed"),
        EngineFormatError,
        'rows must be "engine" .* or "training" .*, found \'packed\'',
        id="rows",
    ),
    pytest.param(
        lambda a: from_vllm(a.caps, num_experts=E, prompt_lens=[3, 5, -1], completion_lens=[4, 1, 6]),
        EngineFormatError,
        re.escape("prompt_lens[2] must be a non-negative int, found -1"),
        id="negative-prompt-len",
    ),
    pytest.param(
        lambda a: from_vllm(a.caps, num_experts=E, moe_layer_ids=[1, "2", 4]),
        EngineFormatError,
        "moe_layer_ids must be a non-empty list of non-negative ints",
        id="layer-id-type",
    ),
    pytest.param(
        lambda a: from_vllm([a.caps[0][:0]], prompt_routed_experts=[a.caps[0]], num_experts=E, completion_lens=[0]),
        EngineFormatError,
        "request 0: completion_lens is 0; a request without generated tokens has no routes to replay",
        id="zero-completion",
    ),
    pytest.param(
        lambda a: from_vllm(a.caps, prompt_routed_experts=a.caps[:2], num_experts=E, completion_lens=[1, 1, 1]),
        EngineFormatError,
        "prompt_routed_experts has 2 entries but routed_experts has 3",
        id="prompt-payload-count",
    ),
    pytest.param(
        lambda a: from_vllm_outputs([{"choices": []}], num_experts=E),
        EngineFormatError,
        r"request 0: no completions \(neither .outputs nor \['choices'\]\)",
        id="outputs-no-completions",
    ),
    pytest.param(
        lambda a: from_vllm_outputs(
            [{"prompt_routed_experts": a.caps[0][:3], "choices": [{"routed_experts": a.caps[0][3:]}]}], num_experts=E
        ),
        EngineFormatError,
        "request 0: the split form needs token counts",
        id="outputs-split-without-counts",
    ),
    pytest.param(
        lambda a: from_vllm_outputs(
            [
                {"choices": [{"routed_experts": a.caps[0], "token_ids": [1]}], "prompt_token_ids": [1]},
                {"choices": [{"routed_experts": a.caps[1]}]},
            ],
            num_experts=E,
        ),
        EngineFormatError,
        "request 1: token counts are missing while other requests have them",
        id="outputs-counts-missing",
    ),
    pytest.param(
        lambda a: from_vllm_outputs(
            [
                {"prompt_routed_experts": a.caps[0][:3], "choices": [{"routed_experts": a.caps[0][3:]}]},
                {"choices": [{"routed_experts": a.caps[1]}]},
            ],
            num_experts=E,
        ),
        EngineFormatError,
        "request 1: mixes the split form",
        id="outputs-split-mixed",
    ),
    pytest.param(
        lambda a: decode_sglang_payload(a.info["routed_experts"], num_layers=0, top_k=K),
        EngineFormatError,
        "num_layers must be a positive int, found 0",
        id="sglang-num-layers",
    ),
    pytest.param(
        lambda a: decode_sglang_payload(np.zeros(7, dtype=np.int32), num_layers=len(MOE), top_k=K),
        EngineFormatError,
        "payload: routed_experts has 7 values, not a multiple of num_layers x top_k = 6",
        id="sglang-values-count",
    ),
    pytest.param(
        lambda a: from_sglang([a.info], num_layers=len(MOE), top_k=K, num_experts=E, start_lens=[7]),
        EngineFormatError,
        re.escape("request 0: routed_experts_start_len=7 is outside [0, seqlen-1 = 6]"),
        id="sglang-start-len",
    ),
    pytest.param(
        lambda a: to_sglang(a.trace, start_lens=[0, 6, 0]),
        EngineFormatError,
        re.escape("start_lens[1]=6 is beyond sequence 1's 5 rows"),
        id="to-sglang-start-len",
    ),
    pytest.param(
        lambda a: to_vllm(a.trace, dtype="float32"),
        EngineFormatError,
        "dtype must be an integer dtype, found float32",
        id="to-vllm-float-dtype",
    ),
    pytest.param(
        lambda a: from_megatron([torch.zeros(4, 2)], router_layer_ids=[0], cu_seqlens=[0, 4], num_experts=E),
        EngineFormatError,
        re.escape(
            "router instance 0 (layer 0): expected an integer [tokens, top_k] tensor, found ((4, 2), torch.float32)"
        ),
        id="megatron-float-ids",
    ),
    pytest.param(
        lambda a: from_megatron([], router_layer_ids=[], cu_seqlens=[0], num_experts=E),
        EngineFormatError,
        "get_recorded_data.. returned no entries",
        id="megatron-no-entries",
    ),
    pytest.param(
        lambda a: from_megatron(
            [torch.zeros(4, 2, dtype=torch.int64)],
            router_layer_ids=[0],
            cu_seqlens=[0, 4],
            num_experts=E,
            valid=torch.ones(3, dtype=torch.bool),
        ),
        EngineFormatError,
        re.escape("valid must be a bool tensor of shape (4,), found (3,)"),
        id="megatron-valid-shape",
    ),
    pytest.param(
        lambda a: to_megatron(a.trace, router_layer_ids=MOE, order="bshd"),
        EngineFormatError,
        'order must be "thd" or "sbhd", found \'bshd\'',
        id="to-megatron-order",
    ),
    pytest.param(
        lambda a: megatron_router_layer_ids(torch.nn.ModuleList([_Router(object(), None)])),
        EngineFormatError,
        "router _Router has layer_number=None; expected Megatron's 1-based int",
        id="megatron-layer-number",
    ),
    pytest.param(
        lambda a: megatron_router_layer_ids(
            torch.nn.ModuleList([_Router(r, 1) for r in (object(), object())]), instances=[]
        ),
        EngineFormatError,
        "the model has 2 replay-enabled routers but the instance list has 0",
        id="megatron-instance-count",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), ARGUMENT_ERRORS)
def test_argument_errors(requests_, call, error, match):
    a = _argument_inputs(requests_)
    with pytest.raises(error, match=match):
        call(a)
