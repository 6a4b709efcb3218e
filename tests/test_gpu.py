"""GPU tier: bit-exact replay on CUDA, bf16, under torch.use_deterministic_algorithms.

Runs on the lent GPU (``benchmarks/run_gpu.sh``, results in BENCHMARKS.md); on a machine without
CUDA every test is skipped with that reason. Per supported family: record then replay the same
batch gives the recorded ids exactly and bit-identical logits, and checkpointed replay gradients
equal plain replay gradients.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device: run on the lent GPU (benchmarks/run_gpu.sh)", allow_module_level=True)

import hf_zoo
from test_hf_contract import SUPPORTED, _logits

import routereplay

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def _model(family):
    """The tiny model on CUDA as ``from_pretrained(dtype=torch.bfloat16)`` would load it: tensors
    under the model's ``_keep_in_fp32_modules(_strict)`` stay fp32 (Inkling-2's router does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = hf_zoo.build(family)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ()
    )
    patterns = [re.compile(rf"(^|\.){re.escape(k)}($|\.)") for k in keep]
    model.to("cuda")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(p.search(name) for p in patterns):
            tensor.data = tensor.data.to(torch.bfloat16)
    try:
        with torch.no_grad():
            _logits(model, {"input_ids": _ids(model)})
    except RuntimeError:  # DeepSeek-V4 in transformers 5.24 mixes dtypes when loaded so: all bf16
        model.to(torch.bfloat16)
    return model


def _ids(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.get_text_config().vocab_size, (2, 16), generator=g).cuda()


def _loss(model, ids):
    return _logits(model, {"input_ids": ids}).float().square().mean()


@pytest.mark.parametrize("family", SUPPORTED)
def test_replay_is_bit_exact_on_cuda_bf16(family):
    model = _model(family)
    ids = _ids(model)
    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record() as rec:
        ref = _logits(model, {"input_ids": ids})
    with torch.no_grad(), handle.replay(rec.trace()) as rep:
        out = _logits(model, {"input_ids": ids})
    handle.detach()
    assert torch.equal(out, ref), f"{family}: replayed logits differ from the recorded forward on CUDA"
    assert all(s.coverage == 1.0 for s in rep.stats.values())


@pytest.mark.parametrize("family", SUPPORTED)
def test_checkpointed_replay_gradients_on_cuda_bf16(family):
    model = _model(family).train()
    ids = _ids(model)
    try:  # the family itself must train in bf16 as loaded (DeepSeek-V4 in transformers 5.24 does not)
        _loss(model, ids).backward()
    except RuntimeError as e:
        pytest.skip(f"{family}: transformers' model cannot train in bf16 as loaded, without routereplay: {e}")
    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids)
    trace = rec.trace()
    for p in model.parameters():
        p.grad = None
    with handle.replay(trace):
        _loss(model, ids).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:  # e.g. DiffusionGemma (the CPU contract suite checkpoints it by hand)
        pytest.skip(f"{family}: no HF gradient checkpointing: {e}")
    with handle.replay(trace):
        _loss(model, ids).backward()
    handle.detach()
    for n, p in model.named_parameters():
        if n in plain:
            assert torch.equal(p.grad, plain[n]), f"{family}: checkpointed replay gradient of {n} differs"


# --- the session on CUDA: offload, host syncs, device-side id checks ----------------------------
def _qwen3():
    return _model("qwen3_moe")


def test_record_offload_copies_ids_to_pinned_host_memory():
    model = _qwen3()
    ids = _ids(model)
    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record(offload=True) as off:
        model(input_ids=ids)
    with torch.no_grad(), handle.record() as plain:
        model(input_ids=ids)
    handle.detach()
    kept = off._ids[0][0]
    assert kept.device.type == "cpu" and kept.is_pinned()
    assert off.trace().to("cpu") == plain.trace().to("cpu")


@pytest.mark.parametrize("where", ["host", "device"])
def test_record_and_replay_make_no_host_sync_in_the_forward(where):
    """Under set_sync_debug_mode("error") any host sync raises: entering the replay block and the
    forwards of record and replay make none. Building the replay (``handle.replay(trace)``: checks
    and layout of the trace) runs before that scope and is not audited here; the id-check flag is
    read once, at exit, outside it too."""
    model = _qwen3()
    ids = _ids(model)
    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids)
    trace = rec.trace().to("cpu").pin_memory() if where == "host" else rec.trace()
    torch.cuda.synchronize()
    with torch.no_grad():
        rep = handle.replay(trace)
        torch.cuda.set_sync_debug_mode("error")
        try:
            rep.__enter__()
            model(input_ids=ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rep.__exit__(None, None, None)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with handle.record():
                model(input_ids=ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    handle.detach()


def test_device_trace_with_bad_ids_raises_at_exit():
    model = _qwen3()
    ids = _ids(model)
    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids)
    t = rec.trace()
    bad = t._replace(experts=t.experts.clone())
    bad.experts[3, 0, 0] = handle.num_experts + 1  # edited in place: out of range
    with (
        pytest.raises(routereplay.errors.ReplayError, match=r"^trace 0, layer .*: the trace has ids this router cannot pick"),
        torch.no_grad(),
        handle.replay(bad),
    ):
        model(input_ids=ids)  # runs on clamped ids, no device assert
    handle.detach()
