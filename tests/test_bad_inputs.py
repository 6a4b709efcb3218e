"""Refusals of calls that used to run with wrong routes and no error (issue 20): a second handle
through a submodule or a parent, masks that contradict the forward, batch shapes that do not hold
the trace's sequences, prepared traces that follow later edits of the caller's tensors, and
another thread's forwards during a block."""

from __future__ import annotations

import pytest
from test_session import batch, record, tiny_qwen3_moe

import routereplay
from routereplay.errors import AlreadyAttachedError


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
