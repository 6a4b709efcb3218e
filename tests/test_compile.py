"""Record and replay on a ``torch.compile``d model (default mode, CPU).

Each call into the handle is a documented graph break (``torch.compiler.disable`` on the seam's
``RouterCalls``): the dispatch reads Python state (the active mode, checkpoint scopes) per forward.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from helpers import batch, random_trace, tiny_qwen3_moe

import routereplay


def test_record_and_replay_on_a_compiled_model():
    model = tiny_qwen3_moe()
    handle = routereplay.attach(model)
    b = batch()
    with torch.no_grad():
        with handle.record() as rec:
            live = model(**b).logits
        forced = random_trace(rec.trace(), seed=3)
        with handle.replay(forced):
            want = model(**b).logits
        compiled = torch.compile(model)
        with handle.record() as rec_c:
            out = compiled(**b).logits
        with handle.replay(forced) as rep:
            got = compiled(**b).logits
    assert torch.equal(rec_c.trace().experts, rec.trace().experts)  # compiled routing, same routes
    torch.testing.assert_close(out, live, rtol=1e-5, atol=1e-6)
    assert rep.forwards == 1 and all(s.coverage == 1.0 for s in rep.stats.values())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the forced routes, compiled
    assert not torch.allclose(got, live, rtol=1e-3, atol=1e-3)
    with pytest.raises(routereplay.core.errors.TokenCountMismatchError), handle.replay(forced):
        compiled(**batch(B=1, S=5))  # the checks run in the compiled model too
    handle.detach()
