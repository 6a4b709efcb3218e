"""routereplay.rl.metrics: hand-computed examples, a brute-force reference, and pinned errors.

Legend: T tokens, L layers, K top-k slots.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from routereplay.core.errors import MetricInputError, TraceMismatchError
from routereplay.core.trace import RoutingTrace
from routereplay.rl.metrics import logprob_mismatch, routing_agreement

# --- routing agreement ----------------------------------------------------------------------
# Three tokens, two layers, k=2. Per (t, l) comment: exact-set m, |A∩B|, top-1, ordered.
A_TLK = torch.tensor(
    [
        [[0, 1], [2, 3]],
        [[4, 5], [6, 7]],
        [[1, 2], [3, 0]],
    ]
)
B_TLK = torch.tensor(
    [
        [[0, 1], [3, 2]],  # l0: m=1, 2, top1 yes, ordered yes | l1: m=1, 2, top1 no, ordered no
        [[4, 6], [6, 7]],  # l0: m=0, 1, top1 yes, ordered no  | l1: m=1, 2, top1 yes, ordered yes
        [[5, 7], [0, 3]],  # l0: m=0, 0, top1 no,  ordered no  | l1: m=1, 2, top1 no, ordered no
    ]
)


def test_routing_agreement_hand_computed():
    r = routing_agreement(A_TLK, B_TLK)
    assert r.num_tokens == 3 and r.top_k == 2 and r.layer_ids == (0, 1)
    assert r.disagreement == pytest.approx(2 / 6)
    assert r.exact_match == pytest.approx(4 / 6)
    assert r.overlap == pytest.approx((1 + 1 + 0.5 + 1 + 0 + 1) / 6)
    assert r.jaccard == pytest.approx((1 + 1 + 1 / 3 + 1 + 0 + 1) / 6)
    assert r.top1_agreement == pytest.approx(3 / 6)
    assert r.ordered_match == pytest.approx(2 / 6)
    assert r.token_disagreement == pytest.approx(2 / 3)  # t1 and t2 disagree in layer 0
    assert r.mean_disagreeing_layers == pytest.approx(2 / 3)  # (0 + 1 + 1) / 3
    assert r.per_layer_disagreement == pytest.approx((2 / 3, 0.0))
    assert r.per_layer_overlap == pytest.approx((0.5, 1.0))


def test_routing_agreement_mask_and_valid_rows():
    masked = routing_agreement(A_TLK, B_TLK, mask=torch.tensor([True, True, False]))
    assert masked.num_tokens == 2
    assert masked.disagreement == pytest.approx(1 / 4)
    assert masked.overlap == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert masked.token_disagreement == pytest.approx(1 / 2)
    # The same selection expressed as an invalid last row of an engine-style trace.
    a = RoutingTrace(experts=A_TLK, cu_seqlens=torch.tensor([0, 3]), layer_ids=(3, 5), num_experts=8,
                     valid=torch.tensor([True, True, False]))
    b = RoutingTrace(experts=B_TLK, cu_seqlens=torch.tensor([0, 3]), layer_ids=(3, 5), num_experts=8)
    via_valid = routing_agreement(a, b)
    assert via_valid.layer_ids == (3, 5)
    assert via_valid.to_dict() | {"layer_ids": [0, 1]} == masked.to_dict()
    # 0/1 integer masks are accepted as booleans.
    assert routing_agreement(A_TLK, B_TLK, mask=[1, 1, 0]).to_dict() == masked.to_dict()


def test_routing_agreement_empty_selection_is_nan_and_json_null():
    r = routing_agreement(A_TLK, B_TLK, mask=torch.zeros(3, dtype=torch.bool))
    assert r.num_tokens == 0 and math.isnan(r.disagreement)
    d = r.to_dict()
    assert d["disagreement"] is None and d["per_layer_disagreement"] == [None, None]


def _brute_force(a_TLK, b_TLK):
    """Per-(t, l) metrics with Python sets: an independent reference."""
    T, L, K = a_TLK.shape
    m = np.zeros((T, L))
    ov = np.zeros((T, L))
    jac = np.zeros((T, L))
    top1 = np.zeros((T, L))
    ordered = np.zeros((T, L))
    for t in range(T):
        for l in range(L):
            A, B = a_TLK[t, l].tolist(), b_TLK[t, l].tolist()
            m[t, l] = set(A) == set(B)
            ov[t, l] = len(set(A) & set(B)) / K
            jac[t, l] = len(set(A) & set(B)) / len(set(A) | set(B))
            top1[t, l] = A[0] == B[0]
            ordered[t, l] = A == B
    return {
        "disagreement": 1 - m.mean(),
        "overlap": ov.mean(),
        "jaccard": jac.mean(),
        "top1_agreement": top1.mean(),
        "ordered_match": ordered.mean(),
        "token_disagreement": (m == 0).any(1).mean(),
        "mean_disagreeing_layers": (1 - m).sum(1).mean(),
        "per_layer_disagreement": tuple(1 - m.mean(0)),
        "per_layer_overlap": tuple(ov.mean(0)),
    }


@st.composite
def _route_pair(draw):
    T, L = draw(st.integers(1, 12)), draw(st.integers(1, 4))
    E = draw(st.integers(2, 8))
    K = draw(st.integers(1, E))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(T, L, E, generator=g).argsort(-1)[..., :K]
    # b: a copy of a with random rows re-drawn and random slot orders, so all cases occur.
    b = torch.rand(T, L, E, generator=g).argsort(-1)[..., :K]
    same = torch.rand(T, L, 1, generator=g) < 0.5
    b = torch.where(same, a[..., torch.randperm(K, generator=g)], b)
    return a, b


@settings(max_examples=60, deadline=None)
@given(_route_pair())
def test_routing_agreement_matches_brute_force(pair):
    a, b = pair
    r = routing_agreement(a, b)
    for name, expected in _brute_force(a, b).items():
        assert getattr(r, name) == pytest.approx(expected, abs=1e-12), name
    # Symmetric in its inputs, and a routing always fully agrees with itself.
    assert routing_agreement(b, a) == r
    self_r = routing_agreement(a, a)
    assert self_r.disagreement == 0 and self_r.token_disagreement == 0 and self_r.ordered_match == 1


def test_routing_agreement_chunks_large_inputs(monkeypatch):
    from routereplay.rl import metrics

    a, b = A_TLK.repeat(5, 1, 1), B_TLK.repeat(5, 1, 1)
    whole = routing_agreement(a, b).to_dict()
    monkeypatch.setattr(metrics, "_CHUNK_ROWS", 4)  # 15 rows -> chunks of 4, 4, 4, 3
    chunked = routing_agreement(a, b).to_dict()
    for key, value in whole.items():
        assert chunked[key] == pytest.approx(value), key


def test_routing_agreement_errors():
    with pytest.raises(TraceMismatchError, match=r"a has \[T, L, K\] = \[3, 2, 2\] but b has \[2, 2, 2\]"):
        routing_agreement(A_TLK, B_TLK[:2])
    with pytest.raises(
        MetricInputError,
        match=r"b must be a RoutingTrace or an integer \[T, L, K\] tensor, found \(3, 2, 2\) torch.float32",
    ):
        routing_agreement(A_TLK, B_TLK.float())
    with pytest.raises(MetricInputError, match=r"mask must have shape \(3,\), one entry per token, found \(2,\)"):
        routing_agreement(A_TLK, B_TLK, mask=torch.tensor([True, False]))
    with pytest.raises(MetricInputError, match=r"mask must be bool \(or 0/1 integers\), found dtype torch.float32"):
        routing_agreement(A_TLK, B_TLK, mask=torch.ones(3))
    a = RoutingTrace(experts=A_TLK, cu_seqlens=torch.tensor([0, 3]), layer_ids=(0, 1), num_experts=8)
    with pytest.raises(TraceMismatchError, match=r"a has layer_ids=\(0, 1\) but b has layer_ids=\(1, 2\)"):
        routing_agreement(
            a, RoutingTrace(experts=B_TLK, cu_seqlens=torch.tensor([0, 3]), layer_ids=(1, 2), num_experts=8)
        )
    with pytest.raises(
        TraceMismatchError,
        match=r"a has sequence lengths \[3\], b has \[1, 2\]; the rows would be compared on the wrong tokens",
    ):
        routing_agreement(
            a, RoutingTrace(experts=B_TLK, cu_seqlens=torch.tensor([0, 1, 3]), layer_ids=(0, 1), num_experts=8)
        )


# --- log-prob mismatch ----------------------------------------------------------------------
P_TRAIN = [0.5, 0.2, 0.6, 0.35, 0.6]
P_INFER = [0.5, 0.5, 0.2, 0.2, 0.1]
# delta = ln(p_train / p_infer) = [0, ln 0.4, ln 3, ln 1.75, ln 6]; r = [1, 0.4, 3, 1.75, 6]
# sum(delta) = ln(0.4 * 3 * 1.75 * 6) = ln 12.6; sum(r - 1) = 7.15; sum|delta| = ln(2.5 * 3 * 1.75 * 6) = ln 78.75


def test_logprob_mismatch_hand_computed():
    lt, li = torch.tensor(P_TRAIN).log(), torch.tensor(P_INFER).log()
    m = logprob_mismatch(lt.double(), li.double())
    deltas = [0.0, math.log(0.4), math.log(3), math.log(1.75), math.log(6)]
    assert m.num_tokens == 5
    assert m.k1 == pytest.approx(-math.log(12.6) / 5)
    assert m.k2 == pytest.approx(sum(d * d for d in deltas) / 10)
    assert m.k3 == pytest.approx((7.15 - math.log(12.6)) / 5)
    assert m.mean_abs_delta == pytest.approx(math.log(78.75) / 5)
    assert m.max_abs_delta == pytest.approx(math.log(6))
    assert m.prob_diff == pytest.approx((0 + 0.3 + 0.4 + 0.15 + 0.5) / 5)
    assert m.pearson == pytest.approx(float(np.corrcoef(P_TRAIN, P_INFER)[0, 1]))
    # |delta| = [0, .92, 1.10, .56, 1.79] against ln 1.5 = .41, ln 2 = .69, ln 5 = 1.61
    assert m.extreme == pytest.approx({"F(1.5)": 4 / 5, "F(2)": 3 / 5, "F(5)": 1 / 5})
    d = m.to_dict()
    assert d["delta"] == "logp_train - logp_infer" and d["extreme"]["F(2)"] == pytest.approx(0.6)


def test_logprob_mismatch_mask_2d_and_direction():
    lt = torch.tensor([P_TRAIN, P_TRAIN]).log()
    li = torch.tensor([P_INFER, P_TRAIN]).log()
    mask = torch.tensor([[False, True, True, False, False], [True] * 5])
    m = logprob_mismatch(lt, li, mask)
    # Selected deltas: ln 0.4, ln 3, then five zeros.
    assert m.num_tokens == 7
    assert m.k1 == pytest.approx(-(math.log(0.4) + math.log(3)) / 7, rel=1e-6)
    # Swapping the sides flips the sign of k1: the direction is train minus infer.
    assert logprob_mismatch(li, lt, mask).k1 == pytest.approx(-m.k1)


def test_logprob_mismatch_identical_and_constant():
    lp = torch.tensor(P_TRAIN).log()
    m = logprob_mismatch(lp, lp)
    assert (m.k1, m.k2, m.k3, m.max_abs_delta, m.prob_diff) == (0, 0, 0, 0, 0)
    assert m.pearson == pytest.approx(1.0) and m.extreme == {"F(1.5)": 0, "F(2)": 0, "F(5)": 0}
    const = logprob_mismatch(torch.full((3,), -1.0), torch.full((3,), -2.0))
    assert math.isnan(const.pearson) and const.to_dict()["pearson"] is None
    empty = logprob_mismatch(lp, lp, torch.zeros(5, dtype=torch.bool))
    assert empty.num_tokens == 0 and empty.to_dict()["k3"] is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(-20, 0), st.floats(-20, 0)), min_size=1, max_size=40))
def test_logprob_mismatch_matches_numpy(pairs):
    lt = np.array([p[0] for p in pairs])
    li = np.array([p[1] for p in pairs])
    m = logprob_mismatch(torch.tensor(lt), torch.tensor(li))
    d = lt - li
    assert m.k1 == pytest.approx(np.mean(-d), abs=1e-12)
    assert m.k3 == pytest.approx(np.mean(np.exp(d) - 1 - d), rel=1e-9, abs=1e-12)
    assert m.k3 >= 0 and m.k2 >= 0
    assert m.max_abs_delta == pytest.approx(np.abs(d).max())
    assert m.extreme["F(2)"] == pytest.approx(np.mean(np.abs(d) > math.log(2)))


def test_logprob_mismatch_errors():
    lp = torch.zeros(2, 3)
    with pytest.raises(MetricInputError, match=r"logp_train has shape \(2, 3\) but logp_infer has \(3,\)"):
        logprob_mismatch(lp, torch.zeros(3))
    with pytest.raises(MetricInputError, match=r"mask has shape \(3,\), expected the log-probs' shape \(2, 3\)"):
        logprob_mismatch(lp, lp, torch.ones(3, dtype=torch.bool))
    with pytest.raises(
        MetricInputError, match=r"logp_infer must be a float tensor of log-probabilities, found torch.int64"
    ):
        logprob_mismatch(lp, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(MetricInputError, match=r"every tau must be > 1"):
        logprob_mismatch(lp, lp, taus=(1.0, 2.0))
    bad = lp.clone()
    bad[1, 2] = -math.inf
    with pytest.raises(
        MetricInputError, match=r"logp_train at position \(1, 2\) is -inf; every selected log-prob must be finite"
    ):
        logprob_mismatch(bad, lp)
    # The same non-finite entry is fine when masked out.
    assert logprob_mismatch(bad, lp, torch.tensor([[True] * 3, [True, True, False]])).num_tokens == 5


# --- one mask convention: packed [T], or padded [B, S] with its attention mask ----------------
# The three tokens of A_TLK / B_TLK as a left-padded batch of two sequences (1 and 2 tokens).
ATTN_BS = torch.tensor([[0, 1], [1, 1]])
RESP_BS = torch.tensor([[False, True], [False, True]])  # packed: tokens 0 and 2
RESP_T = torch.tensor([True, False, True])


def test_padded_mask_with_attention_mask_equals_packed_mask():
    packed = routing_agreement(A_TLK, B_TLK, RESP_T)
    padded = routing_agreement(A_TLK, B_TLK, RESP_BS, attention_mask=ATTN_BS)
    assert padded == packed and packed.num_tokens == 2
    lt_T, li_T = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -0.25])
    m_packed = logprob_mismatch(lt_T, li_T, RESP_T)
    assert logprob_mismatch(lt_T, li_T, RESP_BS, attention_mask=ATTN_BS) == m_packed
    # Padded log-probs take their own-shaped mask alone.
    lt_BS = torch.zeros(2, 2).masked_scatter(ATTN_BS.bool(), lt_T)
    li_BS = torch.zeros(2, 2).masked_scatter(ATTN_BS.bool(), li_T)
    assert logprob_mismatch(lt_BS, li_BS, RESP_BS) == m_packed


def test_mask_convention_errors():
    with pytest.raises(MetricInputError, match=r"routing_agreement: mask must have shape \(3,\), one entry per token, "
                       r"found \(2, 2\); for a padded \[B, S\] mask pass attention_mask=\[B, S\] as well"):
        routing_agreement(A_TLK, B_TLK, RESP_BS)
    with pytest.raises(
        MetricInputError, match=r"routing_agreement: attention_mask has 4 real tokens but the data has 3"
    ):
        routing_agreement(A_TLK, B_TLK, RESP_BS, attention_mask=torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(MetricInputError, match=r"attention_mask is given without a mask"):
        routing_agreement(A_TLK, B_TLK, attention_mask=ATTN_BS)
    lt_T = torch.zeros(3)
    with pytest.raises(
        MetricInputError,
        match=r"logprob_mismatch: mask has shape \(2, 2\), expected the log-probs' shape "
        r"\(3,\); for packed log-probs and a padded \[B, S\] mask pass attention_mask as well",
    ):
        logprob_mismatch(lt_T, lt_T, RESP_BS)
    with pytest.raises(
        MetricInputError,
        match=r"attention_mask goes with packed \[T\] log-probs, found log-probs of shape "
        r"\(2, 2\)",
    ):
        logprob_mismatch(torch.zeros(2, 2), torch.zeros(2, 2), RESP_BS, attention_mask=ATTN_BS)
