"""GPU tier of routereplay.kernels: the fused replay kernel on CUDA against routing.route on CUDA.

The claim under test is ``kernels.ulp_bound``'s: the forward is within that many ulp of
``route()``'s (0: bit for bit; the kernel reproduces PyTorch's CUDA reduction orders, the top-k
sum's lane order of the installed torch included, libdevice's exp / log1p, IEEE division and
square root; see ``routereplay.kernels.device``'s docstring), for every covered variant of test_routing, dtypes
fp32 / bf16 and ids uint8 / int16 / int32 / int64, on the GPU or in pinned host memory, with live
rows mixed in. The backward is compared with route()'s autograd within a relative tolerance. The
prepared call (``prepare_fused``) is held to the same claim across token counts, id dtypes,
misaligned logits and host ids, and must take its direct launch path and make no host sync.
Skipped, with the reason, without CUDA or triton. Run on the lent GPU:
``python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py``.

Legend: T tokens, E logits per token, K top-k.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed: pip install 'routereplay[triton]'", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device: run on the lent GPU", allow_module_level=True)

from helpers import VARIANTS, random_valid_ids, routing_inputs, ulp_distance

from routereplay.core import routing
from routereplay.core.routing import RouterSpec
from routereplay.kernels import prepare_fused, route_forced_fused, ulp_bound, unsupported_reason

# realistic widths beside test_routing's E=16 variants: one per family shape the kernel covers
WIDE = {
    "qwen3_E128_K8": RouterSpec(
        num_experts=128, top_k=8, norm_topk_prob=True, compute_dtype=torch.float32, weights_dtype="logits"
    ),
    "gpt_oss_E32_K4": RouterSpec(num_experts=32, top_k=4, score_before_topk=False),
    "deepseek_v3_E256_K8": RouterSpec(
        num_experts=256,
        top_k=8,
        score_function="sigmoid",
        uses_bias=True,
        n_group=8,
        topk_group=4,
        norm_topk_prob=True,
        norm_eps=1e-20,
        scaling_factor=2.5,
        topk_sorted=False,
    ),
    "mixtral_E8_K2": RouterSpec(num_experts=8, top_k=2, norm_topk_prob=True, compute_dtype=torch.float32),
    "longcat_E768_K12": RouterSpec(num_experts=512, num_logits=768, top_k=12, uses_bias=True, scaling_factor=6.0),
    "granite_E40_K6": RouterSpec(num_experts=40, top_k=6, score_before_topk=False, weights_dtype="input"),
}
CASES = {**VARIANTS, **WIDE}
COVERED = sorted(name for name, spec in CASES.items() if unsupported_reason(spec) is None)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _cuda_inputs(spec, dtype, seed, num_tokens=513):
    logits_TE, kwargs, gen = routing_inputs(spec, dtype, seed, num_tokens=num_tokens)
    ids_TK = random_valid_ids(spec, num_tokens, gen)
    kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return logits_TE.cuda(), ids_TK.cuda(), kwargs, gen


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", COVERED)
def test_fused_forward_is_within_ulp_bound_of_route_on_cuda(name, dtype):
    spec = CASES[name]
    logits_TE, ids_TK, kwargs, gen = _cuda_inputs(spec, DTYPES[dtype], 0)
    mask_T = (torch.rand(ids_TK.shape[0], generator=gen) > 0.2).cuda()
    for mask in (None, mask_T):
        ref_w, ref_i = routing.route(logits_TE, spec, forced_TK=ids_TK, forced_mask_T=mask, **kwargs)
        for id_dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
            if id_dtype == torch.uint8 and spec.num_logits > 256:
                continue
            w, i = route_forced_fused(logits_TE, spec, forced_TK=ids_TK.to(id_dtype), forced_mask_T=mask, **kwargs)
            assert torch.equal(i, ref_i), f"{name} {dtype} {id_dtype}: ids differ from route()'s"
            assert w.dtype == ref_w.dtype
            found = ulp_distance(w, ref_w)
            where = "with live rows" if mask is not None else "all forced"
            bound = ulp_bound(spec, DTYPES[dtype])
            assert found <= bound, f"{name} {dtype} ids {id_dtype} {where}: {found} ulp from route() on CUDA > {bound}"


@pytest.mark.parametrize("name", ["qwen3_E128_K8", "deepseek_v3_E256_K8", "softmax_post"])
def test_fused_reads_pinned_host_ids(name):
    spec = CASES[name]
    logits_TE, ids_TK, kwargs, _ = _cuda_inputs(spec, torch.float32, 1)
    host_TK = ids_TK.to(torch.uint8).cpu().pin_memory()
    ref_w, ref_i = routing.route(logits_TE, spec, forced_TK=ids_TK, **kwargs)
    w, i = route_forced_fused(logits_TE, spec, forced_TK=host_TK, validate=False, **kwargs)
    assert torch.equal(i, ref_i) and ulp_distance(w, ref_w) <= ulp_bound(spec, torch.float32)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", COVERED)
def test_fused_backward_matches_route_autograd_on_cuda(name, dtype):
    spec = CASES[name]
    logits_TE, ids_TK, kwargs, gen = _cuda_inputs(spec, DTYPES[dtype], 2)
    mask_T = (torch.rand(ids_TK.shape[0], generator=gen) > 0.2).cuda()
    grad_TK = torch.randn(ids_TK.shape, generator=gen).cuda()
    grads = []
    for fn in (routing.route, route_forced_fused):
        leaf = logits_TE.clone().requires_grad_(True)
        if "expert_scale_E" in kwargs:
            kwargs["expert_scale_E"] = kwargs["expert_scale_E"].detach().clone().requires_grad_(True)
        w, _ = fn(leaf, spec, forced_TK=ids_TK, forced_mask_T=mask_T, **kwargs)
        (w.float() * grad_TK).sum().backward()
        grads.append(
            [leaf.grad.float()] + ([kwargs["expert_scale_E"].grad.float()] if "expert_scale_E" in kwargs else [])
        )
    bound = 1e-6 if dtype == "fp32" else 2e-2
    for got, ref in zip(grads[1], grads[0], strict=True):
        rel = float((got - ref).norm() / ref.norm())
        assert rel <= bound, f"{name} {dtype}: gradient relative error {rel:.2e} > {bound}"


def test_fused_out_of_range_id_poisons_its_row_on_cuda():
    spec = WIDE["qwen3_E128_K8"]
    logits_TE, ids_TK, kwargs, _ = _cuda_inputs(spec, torch.float32, 3, num_tokens=64)
    ids_TK[9, 3] = 200
    w, _ = route_forced_fused(logits_TE, spec, forced_TK=ids_TK.to(torch.uint8), validate=False, **kwargs)
    assert w[9].isnan().all() and not w[torch.arange(64, device="cuda") != 9].isnan().any()


def _prepared_for(spec, dtype, kwargs):
    scale = kwargs.get("expert_scale_E")
    return prepare_fused(
        spec, logits_dtype=dtype, device="cuda", scale_dtype=None if scale is None else scale.dtype, out_dtype=dtype
    )


@pytest.mark.parametrize("name", ["qwen3_E128_K8", "deepseek_v3_E256_K8", "softmax_post", "expert_scale"])
def test_prepared_call_across_shapes_alignment_and_id_dtypes(name):
    """One prepared object, many calls: every token-count bucket (rows per program), id dtype,
    aligned and misaligned logits, device and host ids, live rows or not; each against route().
    The kept launchers are keyed on what Triton specialises on, so a wrong key would launch a
    kernel compiled for aligned data on misaligned data (a fault or wrong weights here)."""
    spec = CASES[name]
    dtype = torch.float32
    fused = None
    gen = torch.Generator().manual_seed(5)
    for num_tokens in (1, 7, 16, 513, 4096, 20000, 513):
        logits_TE, ids_TK, kwargs, _ = _cuda_inputs(spec, dtype, num_tokens % 97, num_tokens=num_tokens)
        fused = fused or _prepared_for(spec, dtype, kwargs)
        # the same values one float32 element off 16-byte alignment
        flat = torch.empty(logits_TE.numel() + 1, dtype=dtype, device="cuda")
        misaligned_TE = flat[1:].view_as(logits_TE).copy_(logits_TE)
        mask_T = (torch.rand(num_tokens, generator=gen) > 0.2).cuda()
        for mask in (None, mask_T):
            ref_w, ref_i = routing.route(logits_TE, spec, forced_TK=ids_TK, forced_mask_T=mask, **kwargs)
            id_dtypes = (torch.int64,) if spec.num_logits > 256 else (torch.uint8, torch.int64)
            for logits in (logits_TE, misaligned_TE):
                for ids in [ids_TK.to(d) for d in id_dtypes] + [ids_TK.to(torch.uint8).cpu().pin_memory()]:
                    w, i = fused(logits, ids, mask, kwargs.get("bias_E"), kwargs.get("expert_scale_E"))
                    found = ulp_distance(w, ref_w)
                    label = f"{name} T={num_tokens} ids {ids.dtype} on {ids.device} mask {mask is not None}"
                    assert torch.equal(i, ref_i), f"{label}: ids differ"
                    assert found <= ulp_bound(spec, dtype), f"{label}: {found} ulp from route()"
    assert len(fused._fwd_kept), "the prepared call never took its direct launch path"
    # gradients through the direct backward launch, twice (the second one reuses the kept launcher)
    logits_TE, ids_TK, kwargs, gen = _cuda_inputs(spec, dtype, 3, num_tokens=777)
    grad_TK = torch.randn(ids_TK.shape, generator=gen).cuda()
    for _ in range(2):
        grads = []
        for fn in ("route", "fused"):
            leaf = logits_TE.clone().requires_grad_(True)
            if fn == "route":
                w, _ = routing.route(leaf, spec, forced_TK=ids_TK, **kwargs)
            else:
                w, _ = fused(leaf, ids_TK.to(torch.uint8), None, kwargs.get("bias_E"), kwargs.get("expert_scale_E"))
            (w.float() * grad_TK).sum().backward()
            grads.append(leaf.grad.float())
        rel = float((grads[1] - grads[0]).norm() / grads[0].norm())
        assert rel <= 1e-6, f"{name}: gradient relative error {rel:.2e}"
    assert len(fused._bwd_kept), "the backward never took its direct launch path"


@pytest.mark.parametrize("name", ["qwen3_E128_K8", "deepseek_v3_E256_K8"])
def test_prepared_call_makes_no_host_sync(name):
    spec = CASES[name]
    logits_TE, ids_TK, kwargs, gen = _cuda_inputs(spec, torch.bfloat16, 4, num_tokens=2048)
    fused = _prepared_for(spec, torch.bfloat16, kwargs)
    mask_T = (torch.rand(2048, generator=gen) > 0.2).cuda()
    host_TK = ids_TK.to(torch.uint8).cpu().pin_memory()
    leaf = logits_TE.clone().requires_grad_(True)
    fused(leaf, ids_TK, mask_T, kwargs.get("bias_E"))  # compile and keep the launchers first
    fused(leaf, host_TK, None, kwargs.get("bias_E"))[0].float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for ids, mask in ((ids_TK, None), (ids_TK, mask_T), (host_TK, None)):
            w, _ = fused(leaf, ids, mask, kwargs.get("bias_E"))
            w.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
