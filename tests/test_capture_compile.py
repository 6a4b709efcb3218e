"""Capture inside ``generate`` with the static cache and a compiled decode forward (CPU, no CUDA graphs).

transformers compiles the decode forward itself when the cache is compilable
(``cache_implementation="static"``): ``torch.compile(model.__call__, **compile_config.to_dict())``,
so the routers' hooks are traced inside the compiled region and the handle's seam calls are graph
breaks that run on every decode step. On CPU it compiles only when told to
(``CompileConfig._compile_all_devices``); the Dynamo "eager" backend keeps this test fast (the
hooks' tracing and the graph breaks are Dynamo's; inductor's code generation does not change
which Python runs). The CUDA-graph case is in tests/test_gpu_generate.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import routereplay
from routereplay.cli.check import ModelSize, build_default_model

SIZE = ModelSize(
    layers=2, hidden=64, experts=8, top_k=2, vocab=128, heads=2, kv_heads=1, head_dim=32, moe_intermediate=32
)
B, P, G = 2, 8, 6


def _capture(model, handle, ids_BP, mask_BP, **extra):
    with torch.no_grad(), handle.capture_generation() as cap:
        out_BX = model.generate(
            ids_BP, attention_mask=mask_BP, do_sample=False, max_new_tokens=G, eos_token_id=None, pad_token_id=0,
            cache_implementation="static", **extra,
        )
    kept = [t for layer in cap.recording._ids for t in layer]
    return out_BX, cap.trace(out_BX, prompt_attention_mask=mask_BP, eos_token_id=None, pad_token_id=None), kept


@pytest.mark.parametrize("how", ["generate_compile_config", "compiled_forward"])
def test_capture_with_static_cache_and_compiled_decode_equals_eager(how):
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = build_default_model(SIZE, seed=0)
    ids_BP = torch.randint(3, SIZE.vocab, (B, P), generator=torch.Generator().manual_seed(0))
    mask_BP = torch.ones_like(ids_BP)
    mask_BP[1, :3] = 0  # left padding in one prompt
    handle = routereplay.attach(model)
    ref_BX, ref, ref_kept = _capture(model, handle, ids_BP, mask_BP, disable_compile=True)
    torch._dynamo.reset()
    counters.clear()
    if how == "generate_compile_config":
        config = CompileConfig(mode="default", backend="eager")
        config._compile_all_devices = True  # transformers compiles on CPU only when told to
        extra = {"compile_config": config}
    else:
        model.forward = torch.compile(model.forward, backend="eager")
        extra = {"disable_compile": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out_BX, trace, kept = _capture(model, handle, ids_BP, mask_BP, **extra)
    finally:
        if how == "compiled_forward":
            del model.forward
        torch._dynamo.reset()
    handle.detach()
    if how == "generate_compile_config":
        assert hasattr(model, "_compiled_call"), "generate did not compile its decode forward"
    # the seam calls are graph breaks inside the compiled region: the hooks were traced, not skipped
    breaks = sum(n for reason, n in counters["graph_break"].items() if "on_router" in reason)
    assert breaks > 0, dict(counters["graph_break"])
    # eager ids are kept as the routers made them; a compiled region's are copied, compact (under
    # CUDA graphs they live in the graph's pool, which the next decode step overwrites)
    assert {t.dtype for t in ref_kept} == {torch.int64}
    compiled = [t for t in kept if t.dtype == torch.uint8]
    assert len(compiled) >= SIZE.layers * (G - 1), [t.dtype for t in kept]  # every decode step's
    assert torch.equal(out_BX, ref_BX)
    assert trace.num_tokens == ref.num_tokens == 2 * (P + G - 1) - 3
    assert torch.equal(trace.cu_seqlens, ref.cu_seqlens) and trace.layer_ids == ref.layer_ids
    assert torch.equal(trace.experts, ref.experts)
