"""GPU tier: route capture inside ``model.generate`` with CUDA graphs, and its host syncs (issue 11).

One command on the lent GPU (``-s`` prints which branch each test took; with ``OUT`` set each test
also writes ``$OUT/gpu_generate_<test>.json``):

    OUT=$OUT python -m pytest -q -s -rA -p no:cacheprovider tests/test_gpu_generate.py

How transformers (5.17 and 5.24) compiles ``generate``: with a compilable cache
(``cache_implementation="static"``) on CUDA, the decode loop calls
``model.get_compiled_call(compile_config)``, that is ``torch.compile(model.__call__,
**CompileConfig().to_dict())``; ``CompileConfig``'s default mode is ``"reduce-overhead"`` (CUDA
graph trees) with ``fullgraph=False``. The prefill runs eagerly (``self(**inputs)``), every decode
forward through the compiled ``__call__``: Dynamo traces ``Module._call_impl``, so the model's own
hooks and every submodule's hooks (the routers') are inside the compiled region. The handle's
seam calls are ``torch.compiler.disable``d, so each is a graph break: they run eagerly on every
decode step, between CUDA-graphed partitions, and receive the partitions' outputs (the router
ids), which live in the CUDA-graph pool and are overwritten by the next replay.

Either outcome is accepted for capture under CUDA graphs (issue 11 item 3): the captured trace
equals the eager one exactly (ids and layout), or a routereplay error names "CUDA graph". A
forward captured by hand with ``torch.cuda.graph`` inside ``handle.record()`` must be refused:
the hooks run once at capture and never at graph replay, so the recording would be silently
short. Without CUDA every test here is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from helpers import count_syncs

pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip(
        "needs a CUDA device: run on the lent GPU (tests/test_gpu_generate.py docstring)", allow_module_level=True
    )

import routereplay
from routereplay.cli.check import ModelSize, build_default_model
from routereplay.core.errors import RouteReplayError

SIZE = ModelSize(
    layers=2, hidden=64, experts=8, top_k=2, vocab=128, heads=2, kv_heads=1, head_dim=32, moe_intermediate=32
)
B, P, G = 2, 8, 8  # sequences, prompt tokens, new tokens (7 decode forwards: CUDA-graph warmup, record, replays)


def _model():
    return build_default_model(SIZE, seed=0).to("cuda")  # fp32: eager and compiled routes agree


def _prompt():
    g = torch.Generator().manual_seed(0)
    ids_BP = torch.randint(3, SIZE.vocab, (B, P), generator=g).cuda()
    return ids_BP, torch.ones_like(ids_BP)


def _gen_kw(mask_BP):
    # Fixed length, greedy, no EOS (the random model emits its EOS id as an ordinary token).
    return {"attention_mask": mask_BP, "do_sample": False, "max_new_tokens": G, "eos_token_id": None, "pad_token_id": 0}


def _capture(model, handle, ids_BP, mask_BP, *, logprobs=False, **extra):
    with torch.no_grad(), handle.capture_generation(logprobs=logprobs) as cap:
        out_BX = model.generate(ids_BP, **_gen_kw(mask_BP), **extra)
    rollout = cap.rollout(out_BX, prompt_attention_mask=mask_BP, eos_token_id=None, pad_token_id=None)
    return out_BX, rollout


def _report(name: str, **result) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in result.items()))
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"gpu_generate_{name}.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)


def _cudagraphs_recorded() -> bool | None:
    """Whether CUDA graph trees recorded at least one graph on this device (None: unknown)."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        return manager is not None and any(manager.roots.values())
    except (ImportError, AttributeError, TypeError):  # private API: report, do not guess
        return None


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


@pytest.fixture
def fresh_compile():
    import torch._dynamo

    torch._dynamo.reset()  # also resets CUDA graph trees
    yield
    torch._dynamo.reset()


# --- b) generate's static cache compiled with CUDA graphs ------------------------------------
# Not here: the user compiling ``model.forward`` itself (``torch.compile(model.forward,
# mode="reduce-overhead")``) with generate's compile off. On the H200 (torch 2.11, transformers
# 5.17) that generate crashed the process (segfault) with no routereplay attached at all, and with a
# capture it stopped in Dynamo on torch's "accessing tensor output of CUDAGraphs that has been
# overwritten" (the reused forward is not marked as a new step). transformers' own compile path
# (``compile_config``) is the supported way to get CUDA graphs in generate, and captures exactly.
@pytest.mark.parametrize("how", ["generate_compile_config", "generate_compile_config_logprobs"])
def test_capture_with_static_cache_and_cuda_graphs_equals_eager_or_refuses(how, fresh_compile):
    """``generate_compile_config``: transformers compiles ``model.__call__`` itself (mode
    "reduce-overhead"); ``_logprobs``: the same with ``capture_generation(logprobs=True)``, whose
    forward hook on the model is then traced inside the compiled ``__call__`` too (its log-probs
    are compared with a tolerance: the compiled log-softmax is not bit-equal to eager)."""
    from transformers import CompileConfig

    model = _model()
    ids_BP, mask_BP = _prompt()
    handle = routereplay.attach(model)
    logprobs = how.endswith("_logprobs")
    ref_BX, ref_rollout = _capture(
        model, handle, ids_BP, mask_BP, logprobs=logprobs, cache_implementation="static", disable_compile=True
    )
    ref = ref_rollout.trace
    extra = {"cache_implementation": "static", "compile_config": CompileConfig(mode="reduce-overhead")}
    skips0 = _cudagraph_skips()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out_BX, rollout = _capture(model, handle, ids_BP, mask_BP, logprobs=logprobs, **extra)
    except RouteReplayError as e:
        _report(f"cuda_graphs_{how}", branch="refused", error=f"{type(e).__name__}: {e}")
        assert "CUDA graph" in str(e), f"a refusal must name CUDA graphs, found {type(e).__name__}: {e}"
        return
    except RuntimeError as e:  # torch's own error, e.g. reading an overwritten CUDA-graph output
        _report(f"cuda_graphs_{how}", branch="neither", error=f"{type(e).__name__}: {e}")
        pytest.fail(
            f"{how}: capture under CUDA graphs neither matched eager nor raised a routereplay error; torch raised "
            f"{type(e).__name__}: {str(e)[:600]}"
        )
    trace = rollout.trace
    recorded, skips = _cudagraphs_recorded(), _cudagraph_skips() - skips0
    logprob_err = float((rollout.logprobs - ref_rollout.logprobs).abs().max()) if logprobs else None
    same_tokens = torch.equal(out_BX, ref_BX)
    same_ids = trace.experts.shape == ref.experts.shape and torch.equal(trace.experts, ref.experts)
    same_layout = torch.equal(trace.cu_seqlens.cpu(), ref.cu_seqlens.cpu()) and trace.layer_ids == ref.layer_ids
    differing_rows = (
        int((trace.experts != ref.experts).flatten(1).any(1).sum())
        if trace.experts.shape == ref.experts.shape
        else None
    )
    _report(
        f"cuda_graphs_{how}", branch="captured", cudagraphs_recorded=recorded, cudagraph_skips=skips,
        same_tokens=same_tokens, same_ids=same_ids, same_layout=same_layout, differing_rows=differing_rows,
        rows=ref.num_tokens, logprobs_max_abs_diff=logprob_err,
    )
    handle.detach()
    assert recorded is not False, (
        f"{how}: CUDA graph trees recorded no graph ({skips} partitions skipped): this run does not test CUDA graphs"
    )
    assert same_tokens, f"{how}: the compiled generate produced other tokens than eager; the traces are not comparable"
    assert same_layout, f"{how}: trace layout differs: {trace.cu_seqlens.tolist()} vs eager {ref.cu_seqlens.tolist()}"
    assert same_ids, (
        f"{how}: the trace captured under CUDA graphs differs from eager in {differing_rows} of {ref.num_tokens} rows "
        "with the same tokens generated: silently wrong routes"
    )
    if logprobs:
        assert logprob_err <= 1e-4, f"{how}: log-probs differ from eager by up to {logprob_err}"


def test_record_inside_a_manual_cuda_graph_capture_raises():
    """The router hooks run while ``torch.cuda.graph`` captures and never when the graph replays:
    a recording would hold the capture-time forward only. Captures one MoE block (router + experts)."""
    model = _model()
    block = model.model.layers[0].mlp
    x_BSH = torch.randn(B, P, SIZE.hidden, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    handle = routereplay.attach(model)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # warm up outside any mode, on a side stream, as torch.cuda.graph requires
            block(x_BSH)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    raised: BaseException | None = None
    try:
        with torch.no_grad(), handle.record() as rec, torch.cuda.graph(graph):
            block(x_BSH)
    except Exception as e:  # noqa: BLE001 (reported and checked below)
        raised = e
    forwards = None
    if raised is None:
        graph.replay()
        graph.replay()
        forwards = rec.num_forwards
    handle.detach()
    _report(
        "manual_cuda_graph_record",
        branch="refused" if isinstance(raised, RouteReplayError) else "raised other" if raised else "accepted",
        error=None if raised is None else f"{type(raised).__name__}: {raised}",
        recorded_forwards_after_capture_and_2_replays=forwards,
    )
    assert raised is not None, (
        f"record accepted a forward under torch.cuda.graph capture: after the capture and 2 graph replays it holds "
        f"{forwards} forward(s) (3 ran): silently wrong"
    )
    assert isinstance(raised, RouteReplayError) and "CUDA graph" in str(raised), (
        f"expected a routereplay error naming CUDA graphs, found {type(raised).__name__}: {str(raised)[:600]}"
    )




def test_capture_adds_no_host_sync_to_generate():
    """``generate`` syncs every step (its stop check); entering the capture block, every forward
    under it and leaving it must add none. Building the rollout afterwards is not audited here
    (it copies tokens to the host by design; ``benchmarks/bench_capture.py`` counts it)."""
    model = _model()
    ids_BP, mask_BP = _prompt()
    kw = _gen_kw(mask_BP)
    handle = routereplay.attach(model)
    with torch.no_grad():
        model.generate(ids_BP, **kw)  # warm up: lazy CUDA / cuBLAS initialisation syncs once
        _capture(model, handle, ids_BP, mask_BP)

        def plain():
            return model.generate(ids_BP, **kw)

        def captured():
            with handle.capture_generation() as cap:
                out_BX = model.generate(ids_BP, **kw)
            return cap, out_BX

        ref_BX, plain_sites = count_syncs(plain)
        (cap, out_BX), capture_sites = count_syncs(captured)
    trace = cap.trace(out_BX, prompt_attention_mask=mask_BP, eos_token_id=None, pad_token_id=None)
    handle.detach()
    n_plain, n_capture = sum(plain_sites.values()), sum(capture_sites.values())
    extra = capture_sites - plain_sites
    _report(
        "sync_count", plain_generate=n_plain, capture_generate=n_capture, difference=n_capture - n_plain,
        extra_sites=dict(extra), plain_sites=dict(plain_sites),
    )
    assert torch.equal(out_BX, ref_BX) and trace.num_tokens == B * (P + G - 1)
    assert n_plain > 0, "generate made no host sync under set_sync_debug_mode('warn'): the audit is not counting"
    assert n_capture == n_plain, (
        f"capture inside generate made {n_capture} host syncs, plain generate {n_plain}; capture's own: {dict(extra)}"
    )
