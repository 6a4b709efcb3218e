"""``handle.replay`` on a trace with rows that have no route: the message names the way out.

An engine trace in training rows lacks exactly each sample's last route (RouteStore replays it);
a route missing inside a sequence is a capture gap (only ``missing="live"`` routes it live).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="the replay runs on the built-in HF model (pip install 'routereplay[hf]')")

import routereplay
from routereplay.cli.check import TINY_SIZE, build_default_model
from routereplay.core.errors import MissingRoutesError
from routereplay.core.layout import engine_to_training
from routereplay.core.trace import RoutingTrace
from routereplay.rl.store import RouteStore


@pytest.fixture
def setup():
    model = build_default_model(TINY_SIZE)
    handle = routereplay.attach(model)
    ids = torch.randint(3, TINY_SIZE.vocab, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids, attention_mask=mask)
    yield model, handle, ids, mask, rec.trace(attention_mask=mask)
    handle.detach()


def _replay(model, handle, trace, ids, mask):
    with torch.no_grad(), handle.replay(trace, attention_mask=mask):
        model(input_ids=ids, attention_mask=mask)


def test_engine_trace_names_route_store(setup):
    model, handle, ids, mask, recorded = setup
    # Engine rows (n - 1 per sample) as an engine returns them, then training rows.
    engine = RoutingTrace(
        experts=torch.cat([recorded.experts[0:4], recorded.experts[5:9]]),
        cu_seqlens=torch.tensor([0, 4, 8]),
        layer_ids=recorded.layer_ids,
        num_experts=recorded.num_experts,
    )
    trace = engine_to_training(engine)
    with pytest.raises(MissingRoutesError) as e:
        _replay(model, handle, trace, ids, mask)
    assert str(e.value) == (
        "2 sequence(s) have no route for their last token, the first at row 4 (sequence 0): an inference engine "
        "never forwards a sample's last token, and routereplay.core.layout.engine_to_training leaves its row invalid; "
        "replay it with routereplay.rl.RouteStore(handle, trace).replay(sample_ids, attention_mask=...), which "
        "routes only those last tokens live and raises on any other gap"
    )
    # The way out the message names works.
    with torch.no_grad(), RouteStore(handle, trace).replay([0, 1], attention_mask=mask) as rep:
        model(input_ids=ids, attention_mask=mask)
    assert {s.replayed for s in rep.stats.values()} == {8}


def test_gap_inside_a_sequence_names_the_capture(setup):
    model, handle, ids, mask, recorded = setup
    valid = torch.ones(recorded.num_tokens, dtype=torch.bool)
    valid[[4, 7, 9]] = False  # sequence 0's last row, sequence 1's positions 2 and 4 (its last)
    with pytest.raises(MissingRoutesError) as e:
        _replay(model, handle, recorded.replace(check=False, valid=valid), ids, mask)
    assert str(e.value) == (
        "1 row(s) inside their sequence have no recorded route, the first at row 7 (sequence 1, position 2 of 5); "
        "capture the routes of every forward of the sequence (a conversation's turns or a resumed generation's "
        'attempts: routereplay.formats.RouteAccumulator joins them), or replay with missing="live" to route every '
        "row without a route live"
    )
