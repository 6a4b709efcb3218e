"""Refusals of calls that used to run with wrong routes and no error (issue 20): a second handle
through a submodule or a parent, masks that contradict the forward, batch shapes that do not hold
the trace's sequences, prepared traces that follow later edits of the caller's tensors, and
another thread's forwards during a block."""

from __future__ import annotations

import pytest
import torch
from test_session import batch, random_trace, record, tiny_qwen3_moe

import routereplay
from routereplay.errors import AlreadyAttachedError
from routereplay.trace import RoutingTrace


@pytest.fixture(scope="module")
def base_state():
    return tiny_qwen3_moe().state_dict()


@pytest.fixture
def model(base_state):
    m = tiny_qwen3_moe()
    m.load_state_dict(base_state)
    return m


# --- item 3: one handle per router, whichever module it was attached through ------------------------
def test_attach_through_a_submodule_of_an_attached_model_is_refused(model):
    with routereplay.attach(model) as h:
        with pytest.raises(
            AlreadyAttachedError,
            match=r"^Qwen3MoeModel is the submodule 'model' of Qwen3MoeForCausalLM, which is already attached to "
            r"RouterHandle\(Qwen3MoeForCausalLM, adapter=hf, layers=\[1, 2, 3\].*; call detach\(\) on that handle "
            r"first, or keep using it \(two handles would both intercept its routers\)$",
        ):
            routereplay.attach(model.model)
        assert h.attached
    with routereplay.attach(model.model):  # detached: attach through the submodule works again
        pass


def test_attach_of_a_parent_of_an_attached_submodule_is_refused(model):
    with routereplay.attach(model.model) as inner:
        with pytest.raises(
            AlreadyAttachedError,
            match=r"^Qwen3MoeForCausalLM: its submodule 'model' \(Qwen3MoeModel\) is already attached to "
            r"RouterHandle\(Qwen3MoeModel, adapter=hf, layers=\[1, 2, 3\].*; call detach\(\) on that handle first",
        ):
            routereplay.attach(model)
        b = batch()
        rec, _ = record(inner, model, b)  # the inner handle still records every forward alone
        assert rec.num_forwards == 1
    with routereplay.attach(model):
        pass
    for m in model.modules():
        assert "_routereplay_handle" not in m.__dict__


# --- item 6: a prepared trace owns its routes --------------------------------------------------------
@pytest.mark.parametrize("pad", [None, "right"])
def test_prepared_trace_does_not_follow_later_edits_of_the_callers_tensors(model, pad):
    """Edits after ``prepare`` (ids, valid rows, boundaries) and a route buffer reused for the next
    batch leave the prepared replay as it was prepared: bit for bit the replay of an untouched copy."""
    b = batch(pad=pad)
    mask = b["attention_mask"] if pad else None
    with routereplay.attach(model) as h:
        rec, _ = record(h, model, b)
        want_t = random_trace(rec.trace(attention_mask=mask))
        with h.replay(want_t, attention_mask=mask):
            want = model(**b).logits
        buffer_TLK = want_t.experts.clone()
        valid_T = torch.ones(want_t.num_tokens, dtype=torch.bool)
        cu_B1 = want_t.cu_seqlens.clone()
        t = RoutingTrace(experts=buffer_TLK, cu_seqlens=cu_B1, layer_ids=want_t.layer_ids, num_experts=8, valid=valid_T)
        prepared = h.prepare(t, attention_mask=mask)
        buffer_TLK.copy_(random_trace(want_t, seed=9).experts)  # the buffer reused for other routes
        buffer_TLK[0, 0] = 0  # and an id repeated in a row: prepare's checks would refuse it
        valid_T[1] = False  # a hole prepare never saw
        cu_B1[1] -= 1  # other boundaries
        with h.replay(prepared):
            got = model(**b).logits
        assert torch.equal(got, want)
