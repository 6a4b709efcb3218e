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
from helpers import SUPPORTED, count_syncs, model_logits

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
            model_logits(model, {"input_ids": _ids(model)})
    except RuntimeError:  # DeepSeek-V4 in transformers 5.24 mixes dtypes when loaded so: all bf16
        model.to(torch.bfloat16)
    return model


def _ids(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, model.config.get_text_config().vocab_size, (2, 16), generator=g).cuda()


def _loss(model, ids):
    return model_logits(model, {"input_ids": ids}).float().square().mean()


def _replayed_grads(model, handle, trace, ids):
    """The parameter gradients of ``_loss`` under replay of ``trace``; every ``.grad`` is cleared
    before and after."""
    for p in model.parameters():
        p.grad = None
    with handle.replay(trace):
        _loss(model, ids).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return grads


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_replay_is_bit_exact_on_cuda_bf16(family, kernel):
    """With either replay kernel: ``"triton"`` runs the fused kernel for the specs it covers."""
    model = _model(family)
    ids = _ids(model)
    handle = routereplay.attach(model, replay_kernel=kernel)
    with torch.no_grad(), handle.record() as rec:
        ref = model_logits(model, {"input_ids": ids})
    with torch.no_grad(), handle.replay(rec.trace()) as rep:
        out = model_logits(model, {"input_ids": ids})
    handle.detach()
    assert kernel == "torch" or any(f.prepared for f in handle.forced_weights), (
        f"{family}: replay_kernel='triton' never reached the kernel dispatch"
    )
    assert torch.equal(out, ref), f"{family}: replayed logits differ from the recorded forward on CUDA"
    assert all(s.coverage == 1.0 for s in rep.stats.values())


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("family", SUPPORTED)
def test_checkpointed_replay_gradients_on_cuda_bf16(family, kernel):
    model = _model(family).train()
    ids = _ids(model)
    try:  # the family itself must train in bf16 as loaded (DeepSeek-V4 in transformers 5.24 does not)
        _loss(model, ids).backward()
    except RuntimeError as e:
        pytest.skip(f"{family}: transformers' model cannot train in bf16 as loaded, without routereplay: {e}")
    handle = routereplay.attach(model, replay_kernel=kernel)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids)
    trace = rec.trace()
    plain = _replayed_grads(model, handle, trace, ids)
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:  # e.g. DiffusionGemma (the CPU contract suite checkpoints it by hand)
        pytest.skip(f"{family}: no HF gradient checkpointing: {e}")
    got = _replayed_grads(model, handle, trace, ids)
    handle.detach()
    for n in plain:
        assert torch.equal(got[n], plain[n]), f"{family}: checkpointed replay gradient of {n} differs"


# --- the session on CUDA: offload, host syncs, device-side id checks ----------------------------
def _qwen3():
    return _model("qwen3_moe")


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_replay_under_offloaded_activation_checkpointing(kernel):
    """transformers 5.25's ``activation_checkpointing_enable(offload=True)``: the activations a
    checkpoint saves go to pinned host memory (save_on_cpu); the recompute still replays its routes."""
    model = _qwen3().train()
    if not hasattr(model, "activation_checkpointing_enable"):
        pytest.skip("transformers < 5.25: no activation_checkpointing_enable(offload=...)")
    ids = _ids(model)
    handle = routereplay.attach(model, replay_kernel=kernel)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids)
    trace = rec.trace()
    plain = _replayed_grads(model, handle, trace, ids)
    model.activation_checkpointing_enable(every_n_layers=1, offload=True)
    got = _replayed_grads(model, handle, trace, ids)
    handle.detach()
    assert plain.keys() == got.keys()
    for n in plain:
        assert torch.equal(got[n], plain[n]), f"offloaded checkpointed replay gradient of {n} differs"


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


def _syncs(fn) -> int:
    """Host syncs ``fn()`` makes (``set_sync_debug_mode("warn")`` warnings)."""
    return sum(count_syncs(fn)[1].values())


def _padded(ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    return mask


@pytest.mark.parametrize("where", ["host", "device"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("prepared", [False, True])
def test_record_and_replay_add_no_host_sync(where, padded, prepared):
    """Building the replay (checks and layout of the trace, the copy of a host trace), entering
    it, the forward and the backward add no host sync to what the model's own forward and
    backward make (HF's mask handling syncs on a padded batch; a replay can make fewer, it skips
    the live top-k), nor does record's forward; the
    device-side checks are read once, at the block's exit (outside the count)."""
    model = _qwen3()
    ids = _ids(model)
    mask = _padded(ids) if padded else None
    handle = routereplay.attach(model)

    def step():
        model(input_ids=ids, attention_mask=mask).logits.float().square().mean().backward()

    def forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids, attention_mask=mask)
    trace = rec.trace(attention_mask=mask)
    trace = trace.to("cpu") if where == "host" else trace
    step()  # first-use work (cuBLAS, autograd's device threads) is not what is counted
    plain, plain_fwd = _syncs(step), _syncs(forward)

    def recorded():
        with handle.record():
            forward()

    found = _syncs(recorded)
    assert found <= plain_fwd, f"record made {found} host syncs, the plain forward {plain_fwd}"
    source = trace
    if prepared:
        made = []
        assert _syncs(lambda: made.append(handle.prepare(trace, attention_mask=mask))) == 0, "prepare made a host sync"
        source = made[0]
    for _ in range(2 if prepared else 1):
        box = []

        def build(box=box):
            box.append(handle.replay(source, attention_mask=None if prepared else mask))

        assert _syncs(build) == 0, "building the replay (checks, layout, copy of the trace) made a host sync"

        def replayed(box=box):
            box[0].__enter__()
            step()

        found = _syncs(replayed)
        assert found <= plain, f"replay made {found} host syncs, the plain step {plain}"
        box[0].__exit__(None, None, None)
        assert all(s.disagreement == 0 and s.live == (3 if padded else 0) for s in box[0].stats.values())
    handle.detach()


def test_host_trace_copy_on_the_side_stream_waits_for_nothing_and_is_waited_for():
    """A host trace is copied on a side stream while the compute stream is busy; the forward waits
    for it on the device: the replay equals the replay of the same trace already on the GPU."""
    model = _qwen3()
    ids = _ids(model)
    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids)
    g = torch.Generator().manual_seed(3)
    trace = rec.trace()
    T, L, K = trace.experts.shape
    other = trace.replace(
        check=False,
        experts=torch.rand(T, L, handle.num_experts, generator=g).argsort(-1)[..., :K].to(trace.experts.dtype)
    )
    with torch.no_grad(), handle.replay(other.to("cuda")):
        want = model_logits(model, {"input_ids": ids})
    host = handle.prepare(other)
    assert host.ready is not None and host.forced_LNK.device.type == "cuda"
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(3):
        for _ in range(20):  # queue ~tens of ms of work ahead of the replay on the compute stream
            busy = busy @ busy / 64
        with torch.no_grad(), handle.replay(handle.prepare(other)) as rep:
            got = model_logits(model, {"input_ids": ids})
        assert torch.equal(got, want)
        with torch.no_grad(), handle.replay(host):
            assert torch.equal(model_logits(model, {"input_ids": ids}), want)
    assert all(s.replayed == T for s in rep.stats.values())
    handle.detach()


def test_device_trace_checks_are_read_at_exit():
    model = _qwen3()
    ids = _ids(model)
    mask = _padded(ids)
    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids, attention_mask=mask)
    t = rec.trace(attention_mask=mask)
    holes = t.replace(check=False, valid=torch.arange(t.num_tokens, device="cuda") != 5)
    errors = routereplay.core.errors
    with (
        pytest.raises(
            errors.MissingRoutesError,
            match=r"1 row\(s\) inside their sequence have no recorded route, the first at row 5",
        ),
        torch.no_grad(),
        handle.replay(holes, attention_mask=mask),
    ):
        model(input_ids=ids, attention_mask=mask)
    short = mask.clone()
    short[1, 0] = 0
    with (
        pytest.raises(errors.TokenCountMismatchError, match=r"attention_mask has 2 rows with \[13, 15\] real tokens"),
        torch.no_grad(),
        handle.replay(t, attention_mask=short),
    ):
        model(input_ids=ids, attention_mask=short)
    flat = rec.trace()  # 2 sequences of 16 rows
    with (
        pytest.raises(
            errors.BatchShapeMismatchError,
            match=r"the forward's batch is \[4, 8\] but the trace holds 2 sequences of 16",
        ),
        torch.no_grad(),
        handle.replay(flat),
    ):
        model(input_ids=ids.reshape(4, 8))
    handle.detach()


@pytest.mark.parametrize("fault", ["out of range", "repeated"])
def test_device_trace_with_bad_ids_raises_at_exit(fault):
    model = _qwen3()
    ids = _ids(model)
    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=ids)
    t = rec.trace()
    assert t.rows_checked()
    with torch.no_grad(), handle.replay(t):  # checked rows: prepared without the repeat compares
        model(input_ids=ids)
    bad = t.replace(check=False, experts=t.experts.clone())
    assert not bad.rows_checked()
    if fault == "out of range":
        bad.experts[3, 0, 0] = handle.num_experts + 1  # edited in place
    else:
        bad.experts[3, 0, 1] = bad.experts[3, 0, 0]
    kept = bad.experts.clone()
    with (
        pytest.raises(
            routereplay.core.errors.ReplayError, match=r"^layer .*: the trace has ids this router cannot pick"
        ),
        torch.no_grad(),
        handle.replay(bad),
    ):
        model(input_ids=ids)  # runs on clamped ids, no device assert
    assert torch.equal(bad.experts, kept)  # clamped in the replay's own copy, not in the trace
    handle.detach()
