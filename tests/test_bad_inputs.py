"""Refusals of calls that used to run with wrong routes and no error (issue 20): a second handle
through a submodule or a parent, masks that contradict the forward, batch shapes that do not hold
the trace's sequences, prepared traces that follow later edits of the caller's tensors, and
another thread's forwards during a block."""

from __future__ import annotations

import re
import threading

import pytest
import torch
from helpers import batch, random_trace, record, tiny_qwen3_moe

import routereplay
from routereplay.core.errors import (
    AlreadyAttachedError,
    AttentionMaskMismatchError,
    BatchShapeMismatchError,
    ReplayError,
)
from routereplay.core.trace import RoutingTrace


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


# --- item 4: the mask given to routereplay must be the forward's own --------------------------------
def _flipped(mask_BS):
    """The same real-token counts, padding on the other side: same shape, other positions."""
    return mask_BS.flip(1)


def test_replay_mask_that_contradicts_the_forwards_mask(model):
    b = batch(pad="right")
    with routereplay.attach(model) as h:
        rec, _ = record(h, model, b)
        t = random_trace(rec.trace(attention_mask=b["attention_mask"]))
        left = _flipped(b["attention_mask"])
        message = (
            r"^layer 1 \(model.layers.1.mlp.gate\): the attention_mask forward 1 runs with differs from the one the "
            r"trace was laid out with, first at \[0, 0\] \(forward: 1, replay: 0\); pass replay/prepare the "
            r"attention_mask of the batch this forward runs on$"
        )
        with pytest.raises(AttentionMaskMismatchError, match=message), h.replay(t, attention_mask=left):
            model(**b)
        prepared = h.prepare(t, attention_mask=left)
        with pytest.raises(AttentionMaskMismatchError, match=message), h.replay(prepared):
            model(**b)
        with h.replay(t, attention_mask=b["attention_mask"]):  # the forward's own mask: replays
            model(**b)
        with h.replay(t, attention_mask=b["attention_mask"]):  # passed positionally: seen as well
            model(b["input_ids"], b["attention_mask"])
        with pytest.raises(AttentionMaskMismatchError), h.replay(t, attention_mask=left):
            model(b["input_ids"], b["attention_mask"])


def test_trace_mask_that_contradicts_the_forwards_mask(model):
    b = batch(pad="right")
    with routereplay.attach(model) as h:
        rec, _ = record(h, model, b)
        with pytest.raises(
            AttentionMaskMismatchError,
            match=r"^forward 0: attention_mask differs from the one the forward ran with, first at \[0, 0\] "
            r"\(given: 0, forward: 1\); pass the attention_mask of that forward's batch$",
        ):
            rec.trace(attention_mask=_flipped(b["attention_mask"]))
        with pytest.raises(
            AttentionMaskMismatchError,
            match=r"^forward 0: attention_mask has shape \(1, 12\) but the forward ran with one of shape \(2, 6\); "
            r"pass the attention_mask of that forward's batch$",
        ):
            rec.trace(attention_mask=torch.ones(1, 12, dtype=torch.long))
        assert rec.trace(attention_mask=b["attention_mask"]).seq_lens.tolist() == [4, 6]


# --- item 5: a batch without padding holds the trace's sequences, one per row -------------------------
def test_trace_of_unequal_sequences_onto_a_batch_without_padding(model):
    """Sequences of 4 and 8 tokens (12 rows) cannot be the rows of a [2, 6] batch without padding."""
    b = batch(B=2, S=6)
    with routereplay.attach(model) as h:
        rec, _ = record(h, model, b)
        t = rec.trace()
        t48 = RoutingTrace(experts=t.experts, cu_seqlens=torch.tensor([0, 4, 12]), layer_ids=t.layer_ids, num_experts=8)
        message = (
            r"^layer 1 \(model.layers.1.mlp.gate\): the forward's batch is \[2, 6\] but the trace holds 2 sequences "
            r"of \[4, 8\] tokens, which no batch without padding holds; replay each trace on the batch it was "
            r"recorded on \(or pass its attention_mask\)$"
        )
        for kwargs in ({"input_ids": b["input_ids"]}, b):  # without the forward's mask, and with it
            with pytest.raises(BatchShapeMismatchError, match=message), h.replay(t48):
                model(**kwargs)


def test_trace_of_two_sequences_onto_one_masked_row(model):
    """A [1, 12] forward with its own attention mask is one sequence of 12 tokens, not two of 6;
    without a mask a [1, T] forward is a packed batch and holds any sequences."""
    b = batch(B=2, S=6)
    one = {"input_ids": b["input_ids"].reshape(1, 12), "attention_mask": torch.ones(1, 12, dtype=torch.long)}
    with routereplay.attach(model) as h:
        rec, _ = record(h, model, b)
        t = rec.trace()
        with (
            pytest.raises(
                BatchShapeMismatchError,
                match=r"^layer 1 \(model.layers.1.mlp.gate\): the forward's batch is \[1, 12\] \(one sequence, by its "
                r"attention mask\) but the trace holds 2 sequences of 6 tokens, a batch of \[2, 6\]; replay each trace "
                r"on the batch it was recorded on \(or pass its attention_mask\)$",
            ),
            h.replay(t),
        ):
            model(**one)
        with h.replay(t):
            model(input_ids=one["input_ids"])


# --- item 9: a block belongs to the thread that entered it --------------------------------------------
def _on_thread(fn, name):
    """Run ``fn`` on a new thread named ``name``; its result or its exception."""
    out = {}

    def run():
        try:
            out["result"] = fn()
        except ReplayError as e:  # handed back to the test's thread
            out["error"] = e

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()
    return out


def test_another_threads_forward_during_a_block_is_refused(model):
    b = batch()
    with routereplay.attach(model) as h:
        rec, live = record(h, model, b)
        t = random_trace(rec.trace())
        with h.replay(t):
            want = model(**b).logits
        with h.replay(t) as rep:
            with torch.no_grad():
                out = _on_thread(lambda: model(**b).logits, "reference")
            got = model(**b).logits  # the block's own forward, on its own thread, still replays
        assert torch.equal(got, want) and rep.forwards == 1
        assert isinstance(out.get("error"), ReplayError)
        assert re.fullmatch(
            r"layer 1 \(model.layers.1.mlp.gate\): a forward on thread 'reference' while a replay block of this "
            r"handle is active on thread 'MainThread'; a block's routes belong to the thread that entered it: run "
            r"this forward after the block, or on that thread, or attach a separate copy of the model for this thread",
            str(out["error"]),
        ), out["error"]
        with torch.no_grad():  # after the block: the other thread's forward routes live
            assert torch.equal(_on_thread(lambda: model(**b).logits, "reference")["result"], live)


def test_a_block_on_another_thread_while_one_is_active_is_refused(model):
    with routereplay.attach(model) as h, h.record():
        out = _on_thread(lambda: h.record().__enter__(), "worker")
        assert isinstance(out.get("error"), ReplayError)
        assert str(out["error"]) == (
            "a recording block of this handle is active on thread 'MainThread'; a block on thread 'worker' would "
            "share its routes: wait for that block to end, or attach a separate copy of the model for this thread"
        )
