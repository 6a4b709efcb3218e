"""routereplay.kernels on the CPU: the fused replay kernel through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, and must not leak into the rest of
the suite, so the kernel runs in one subprocess (this file run as a script, ``--interp-report``)
that measures every case against ``routing.route`` and prints JSON; the tests here read that
report. Under the interpreter exp / log1p are NumPy's and torch's CPU kernels reduce in another
order than the CUDA ones the kernel reproduces, so the forward is held to a measured ulp bound
(bit-exactness is the GPU tier's claim, tests/test_kernels_gpu.py).

Legend: T tokens, E logits per token, K top-k.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ulp_distance

from routereplay.core.routing import RouterSpec

HERE = Path(__file__).resolve().parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
NEEDS_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install 'routereplay[triton]'")

# measured under the interpreter (numpy exp vs torch's CPU exp and reduction order), 64 tokens x
# 3 seeds per case: at most 4 ulp in float32 and 4 ulp in bfloat16 (a one-ulp difference in a score
# grows through the bf16-rounded sum, division and scaling); ulps counted in the logits' dtype
ULP_BOUND = {"float32": 4, "bfloat16": 4}
ID_DTYPES = ("uint8", "int16", "int32", "int64")


# --- the interpreter subprocess -----------------------------------------------------------
def _report() -> dict:
    """Run every case through the kernel and route(); return what the tests assert on."""
    import warnings

    import numpy as np

    warnings.simplefilter("ignore")  # padded lanes divide 0/0 under the interpreter; never stored
    np.seterr(all="ignore")
    sys.path.insert(0, str(HERE))
    from helpers import VARIANTS, random_valid_ids, routing_inputs

    from routereplay.core import routing
    from routereplay.core.errors import RouterSpecError
    from routereplay.kernels import prepare_fused, route_forced_fused, unsupported_reason
    from routereplay.kernels.replay_triton import PreparedReplay

    out: dict = {"cases": {}, "errors": {}}
    for name, spec in sorted(VARIANTS.items()):
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{name}-{str(dtype).split('.')[-1]}"
            reason = unsupported_reason(spec, logits_dtype=dtype, device="cpu")
            if reason is not None:
                out["cases"][key] = {"unsupported": reason}
                continue
            case = {
                "ulp": 0,
                "ids_equal": True,
                "dtype_equal": True,
                "id_dtypes_agree": True,
                "prepared_equal": True,
                "grad_rel": 0.0,
            }
            for seed in range(3):
                logits_TE, kwargs, gen = routing_inputs(spec, dtype, seed)
                ids_TK = random_valid_ids(spec, logits_TE.shape[0], gen)
                mask_T = torch.rand(logits_TE.shape[0], generator=gen) > 0.25 if seed == 2 else None
                ref_w, ref_i = routing.route(logits_TE, spec, forced_TK=ids_TK, forced_mask_T=mask_T, **kwargs)
                results = [
                    route_forced_fused(
                        logits_TE, spec, forced_TK=ids_TK.to(getattr(torch, d)), forced_mask_T=mask_T, **kwargs
                    )
                    for d in (ID_DTYPES if seed == 0 else ("uint8",))
                ]
                w, i = results[0]
                if seed != 1:  # the prepared call is the same kernel: bit for bit the wrapper's
                    scale = kwargs.get("expert_scale_E")
                    fused = prepare_fused(
                        spec,
                        logits_dtype=dtype,
                        device="cpu",
                        scale_dtype=None if scale is None else scale.dtype,
                        out_dtype=dtype,
                    )
                    w3, i3 = fused(
                        logits_TE, ids_TK.to(torch.uint8), mask_T, kwargs.get("bias_E"), kwargs.get("expert_scale_E")
                    )
                    case["prepared_equal"] &= torch.equal(w3, w) and torch.equal(i3, i)
                case["ids_equal"] &= torch.equal(i, ref_i) and i.dtype == torch.int64
                case["dtype_equal"] &= w.dtype == ref_w.dtype
                case["id_dtypes_agree"] &= all(torch.equal(w, w2) and torch.equal(i, i2) for w2, i2 in results)
                if w.dtype == ref_w.dtype:  # fp32 weights of bf16 logits (an fp32 expert scale): bf16 ulps
                    ulp = (
                        ulp_distance(w.to(dtype), ref_w.to(dtype)) if dtype != torch.float32 else ulp_distance(w, ref_w)
                    )
                    case["ulp"] = max(case["ulp"], ulp)
            # backward against route()'s autograd, with live rows in the batch
            logits_TE, kwargs, gen = routing_inputs(spec, dtype, 7, num_tokens=37)
            ids_TK = random_valid_ids(spec, 37, gen)
            mask_T = torch.rand(37, generator=gen) > 0.25
            grad_TK = torch.randn(37, spec.top_k, generator=gen)
            grads = []
            for fn in (routing.route, route_forced_fused):
                leaf = logits_TE.clone().requires_grad_(True)
                scale = kwargs.get("expert_scale_E")
                if scale is not None:
                    kwargs["expert_scale_E"] = scale.detach().clone().requires_grad_(True)
                w, _ = fn(leaf, spec, forced_TK=ids_TK, forced_mask_T=mask_T, **kwargs)
                (w.float() * grad_TK).sum().backward()
                grads.append(
                    [leaf.grad.float()] + ([kwargs["expert_scale_E"].grad.float()] if scale is not None else [])
                )
            case["grad_rel"] = max(float((a - b).norm() / b.norm()) for a, b in zip(grads[1], grads[0], strict=True))
            out["cases"][key] = case

    spec = VARIANTS["softmax_pre_norm"]
    logits_TE, kwargs, gen = routing_inputs(spec, torch.float32, 0, num_tokens=8)
    ids_TK = random_valid_ids(spec, 8, gen)
    # validation: route()'s own checks and messages
    dup_TK = ids_TK.clone()
    dup_TK[3, 1] = dup_TK[3, 0]
    for label, call in {
        "duplicate": lambda fn: fn(logits_TE, spec, forced_TK=dup_TK.to(torch.uint8), **kwargs),
        "shape": lambda fn: fn(logits_TE, spec, forced_TK=ids_TK[:, :2], **kwargs),
        "float_ids": lambda fn: fn(logits_TE, spec, forced_TK=ids_TK.float(), **kwargs),
    }.items():
        messages = []
        for fn in (routing.route, route_forced_fused):
            try:
                call(fn)
                messages.append(None)
            except RouterSpecError as e:
                messages.append(str(e))
        out["errors"][label] = messages
    try:
        route_forced_fused(logits_TE, VARIANTS["p_norm"], forced_TK=ids_TK, where="layer 3: ")
        out["errors"]["unsupported"] = None
    except RouterSpecError as e:
        out["errors"]["unsupported"] = str(e)
    # an id out of range with validate=False: its row is NaN, the others are untouched
    bad_TK = ids_TK.clone()
    bad_TK[5, 2] = spec.num_logits + 3
    w, _ = route_forced_fused(logits_TE, spec, forced_TK=bad_TK, validate=False, **kwargs)
    ref_w, _ = routing.route(logits_TE, spec, forced_TK=ids_TK, **kwargs)
    others = torch.arange(8) != 5
    out["nan_row"] = bool(w[5].isnan().all()) and not bool(w[others].isnan().any())
    out["nan_row_others_ulp"] = ulp_distance(w[others], ref_w[others])
    # an expert named twice in a row with validate=False: its logit's gradient sums both slots (as
    # route()'s gather does), for a dense (softmax over E) and a sparse score
    out["repeat_grad_rel"] = {}
    for name in ("softmax_pre_norm", "sigmoid_bias_groups"):
        rspec = VARIANTS[name]
        r_logits_TE, r_kwargs, r_gen = routing_inputs(rspec, torch.float32, 3, num_tokens=8)
        rep_TK = random_valid_ids(rspec, 8, r_gen)
        rep_TK[3, 1] = rep_TK[3, 0]
        grad_TK = torch.randn(8, rspec.top_k, generator=r_gen)
        grads = []
        for fn in (routing.route, route_forced_fused):
            leaf = r_logits_TE.clone().requires_grad_(True)
            w, _ = fn(leaf, rspec, forced_TK=rep_TK, validate=False, **r_kwargs)
            grads.append(torch.autograd.grad(w, leaf, grad_TK)[0])
        out["repeat_grad_rel"][name] = float((grads[1] - grads[0]).norm() / grads[0].norm())
    # strided logits, and no rows at all
    wide_TE = torch.randn(8, 2 * spec.num_logits, generator=gen)
    w, _ = route_forced_fused(wide_TE[:, ::2], spec, forced_TK=ids_TK, **kwargs)
    ref_w, _ = routing.route(wide_TE[:, ::2], spec, forced_TK=ids_TK, **kwargs)
    out["strided_ulp"] = ulp_distance(w, ref_w)
    w, i = route_forced_fused(logits_TE[:0], spec, forced_TK=ids_TK[:0], **kwargs)
    out["empty"] = [list(w.shape), list(i.shape)]
    out["sum_order"], out["sum_orders_differ"] = _sum_order_report(PreparedReplay)
    out["prepared_errors"] = _prepared_errors(prepare_fused, RouterSpecError)
    out["backward_ops"] = _backward_ops(PreparedReplay)
    out["create_graph"] = _create_graph_report(PreparedReplay)
    out["direct_launch"] = _direct_launch_report()  # last: it stubs the kernels out
    return out


def _direct_launch_report() -> dict:
    """What the kept launcher is handed against what the JIT launch was handed for the same inputs.

    The kernels are stubbed: a JIT launch records its arguments and "compiles" a kernel whose
    launcher records its own; the prepared replay takes the direct path as on CUDA. Per variant (ids
    from the trace or live rows, softmax over E with its saved statistics, an expert scale and its
    gradient), the forward and the backward run twice on the same inputs, first through the JIT,
    then through the kept launcher: the second must pass the first's runtime arguments as pointers
    (its own outputs in place of the first's), in the same order, then the constexprs in the
    kernel's parameter order, on the same grid.
    """
    from helpers import VARIANTS, random_valid_ids, routing_inputs

    from routereplay.core import routing
    from routereplay.kernels import launch
    from routereplay.kernels import replay_triton as rt

    class Compiled:  # a compiled kernel: its launcher records the call
        function, packed_metadata = "function", ("metadata",)

        def __init__(self, calls):
            self.calls = calls

        def run(self, *args):
            self.calls.append(args)

    class Jit:  # a JIT function: records the launch, returns the "compiled" kernel
        def __init__(self, fn):
            self.arg_names, self.calls = fn.arg_names, []

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                self.calls.append((grid, args, kwargs))
                return Compiled(self.calls)

            return call

    def compare(jit_fn, first_outputs, second_outputs) -> list[str]:
        """Differences between the second (direct) launch and the first (JIT) one."""
        (grid, args, kwargs), direct = jit_fn.calls[-2:]
        if not isinstance(direct, tuple) or not isinstance(grid, tuple):
            return [f"launches were {[type(c).__name__ for c in jit_fn.calls]}: a JIT launch, then a direct one"]
        moved = {}  # the first call's outputs -> the second's
        for a, b in zip(first_outputs, second_outputs, strict=True):
            if a.numel() > 1:  # not the shared dummy
                moved[a.data_ptr()] = b.data_ptr()
                if a.dim() == 2 and a.shape[0] == 2:  # [2, T] statistics, passed by row
                    moved[a[1].data_ptr()] = b[1].data_ptr()
        names = jit_fn.arg_names
        first = names.index("E")
        want = [moved.get(a.data_ptr(), a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args]
        want = (grid[0], 1, 1, "stream", "function", ("metadata",), None, None, None, *want)
        want += tuple(kwargs[n] for n in names[first:])
        problems = [] if len(args) == first else [f"{len(args)} runtime arguments, the kernel has {first}"]
        if direct != want:
            problems.append(f"direct {direct} != JIT {want}")
        return problems

    fwd, bwd = rt._replay_fwd, rt._replay_bwd
    raw_stream = launch.raw_stream
    out = {}
    try:
        launch.raw_stream = lambda index: "stream"
        for name, masked in (("softmax_pre_norm", False), ("softmax_pre_norm", True), ("sigmoid_bias_groups", True),
                             ("expert_scale", False), ("softmax_post", False)):  # fmt: skip
            spec = VARIANTS[name]
            rt._replay_fwd, rt._replay_bwd = jit_fwd, jit_bwd = Jit(fwd), Jit(bwd)
            logits_TE, kwargs, gen = routing_inputs(spec, torch.float32, 0, num_tokens=8)
            forced_TK = random_valid_ids(spec, 8, gen).to(torch.uint8)
            scale_E = kwargs.get("expert_scale_E")
            live_TK = keep_T = None
            if masked:
                live_TK = routing.select_live(logits_TE, spec, kwargs.get("bias_E")).contiguous()
                keep_T = (torch.arange(8) % 3 != 0).view(torch.uint8)
            prepared = rt.PreparedReplay(spec, logits_dtype=torch.float32, device="cpu",
                                         scale_dtype=None if scale_E is None else scale_E.dtype)  # fmt: skip
            prepared._fast = True  # the direct path, as on CUDA
            prepared._direct = lambda num_tokens: True
            ins = (logits_TE, scale_E, forced_TK, live_TK, keep_T, True)
            first, second = prepared._forward(*ins), prepared._forward(*ins)
            problems = compare(jit_fwd, first, second)
            _, ids_TK, stats_2T = second
            ins = (logits_TE, ids_TK, scale_E, stats_2T, torch.ones(8, spec.top_k), scale_E is not None)
            problems += compare(jit_bwd, prepared._backward(*ins), prepared._backward(*ins))
            out[f"{name}{'-masked' if masked else ''}"] = {
                "launches": [len(jit_fwd.calls), len(jit_bwd.calls)],
                "kept": [len(prepared._fwd_kept), len(prepared._bwd_kept)],
                "problems": problems,
            }
    finally:
        rt._replay_fwd, rt._replay_bwd = fwd, bwd
        launch.raw_stream = raw_stream
    return out


def _create_graph_report(PreparedReplay) -> dict:
    """A backward with create_graph=True: its gradient (as without), and what differentiating it says."""
    from helpers import VARIANTS

    spec = VARIANTS["softmax_pre_norm"]
    fused = PreparedReplay(spec, logits_dtype=torch.float32, device="cpu")
    leaf = torch.randn(8, spec.num_logits).requires_grad_(True)
    ids_TK = torch.arange(spec.top_k).repeat(8, 1)
    grad_TK = torch.randn(8, spec.top_k).requires_grad_(True)
    (plain,) = torch.autograd.grad(fused(leaf, ids_TK)[0], leaf, grad_TK)
    (graphed,) = torch.autograd.grad(fused(leaf, ids_TK)[0], leaf, grad_TK, create_graph=True)
    try:
        graphed.sum().backward()
        error = None
    except RuntimeError as e:
        error = str(e)
    return {"equal": torch.equal(plain, graphed), "error": error}


def _backward_ops(PreparedReplay) -> dict[str, int]:
    """The aten ops a prepared call's backward dispatches (the kernel itself runs in the interpreter)."""
    from collections import Counter

    from helpers import VARIANTS
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[str(func)] += 1
            return func(*args, **(kwargs or {}))

    spec = VARIANTS["softmax_pre_norm"]
    fused = PreparedReplay(spec, logits_dtype=torch.float32, device="cpu")
    leaf = torch.randn(8, spec.num_logits).requires_grad_(True)
    weights_TK, _ = fused(leaf, torch.arange(spec.top_k).repeat(8, 1))
    grad_TK = torch.ones_like(weights_TK)
    seen: Counter = Counter()
    with Ops():
        torch.autograd.grad(weights_TK, leaf, grad_TK)
    return dict(seen)


def _emulated_sum(x_TK, halves: bool):
    """float32 sum over K in the lane order of torch's CUDA reduction (see ``_sum_torch_k``)."""
    import numpy as np

    num_k = x_TK.shape[1]
    lanes = 1 << (num_k.bit_length() - 1)
    padded = np.zeros((x_TK.shape[0], 2 * lanes), np.float32)
    padded[:, :num_k] = x_TK
    v = padded[:, :lanes] + padded[:, lanes:]  # lane l: column l, then column l + lanes
    while v.shape[1] > 1:
        half = v.shape[1] // 2
        v = v[:, :half] + v[:, half:] if halves else v[:, 0::2] + v[:, 1::2]
    return v[:, 0]


def _sum_order_report(PreparedReplay) -> tuple[dict, bool]:
    """Identity scores, renormalised: the weights are x / sum(x), so the kernel's sum order is all
    that can differ from a float32 emulation of each lane order; held to 0 ulp, both orders."""
    gen = torch.Generator().manual_seed(11)
    ulps, differ = {}, False
    for top_k in (4, 6, 8, 12):
        spec = RouterSpec(num_experts=32, top_k=top_k, score_function="none", norm_topk_prob=True)
        logits_TE = torch.rand(96, 32, generator=gen) * torch.rand(96, 1, generator=gen)
        ids_TK = torch.rand(96, 32, generator=gen).argsort(dim=1)[:, :top_k]
        x_TK = logits_TE.gather(1, ids_TK).numpy()
        results = []
        for halves in (True, False):
            fused = PreparedReplay(spec, logits_dtype=torch.float32, device="cpu", sum_halves=halves)
            w, _ = fused(logits_TE, ids_TK)
            want = torch.from_numpy(x_TK / _emulated_sum(x_TK, halves)[:, None])
            ulps[f"K{top_k}-{'halves' if halves else 'pairs'}"] = ulp_distance(w, want)
            results.append(w)
        differ |= not torch.equal(results[0], results[1])
    return ulps, differ


def _prepared_errors(prepare_fused, RouterSpecError) -> dict:
    """The messages of a prepared call's refusals (and of prepare_fused's)."""
    from helpers import VARIANTS

    spec = VARIANTS["softmax_pre_norm"]
    fused = prepare_fused(spec, logits_dtype=torch.float32, device="cpu", where="layer 2: ")
    logits_TE = torch.randn(8, spec.num_logits)
    ids_TK = torch.arange(spec.top_k).repeat(8, 1)
    calls = {
        "logits_dtype": lambda: fused(logits_TE.bfloat16(), ids_TK),
        "ids_shape": lambda: fused(logits_TE, ids_TK[:, :2]),
        "float_ids": lambda: fused(logits_TE, ids_TK.float()),
        "mask_dtype": lambda: fused(logits_TE, ids_TK, torch.ones(8)),
        "unsupported": lambda: prepare_fused(VARIANTS["p_norm"], logits_dtype=torch.float32, device="cpu"),
        "no_scale_dtype": lambda: prepare_fused(VARIANTS["expert_scale"], logits_dtype=torch.float32, device="cpu"),
        "scale_dtype": lambda: prepare_fused(
            VARIANTS["expert_scale"], logits_dtype=torch.float32, device="cpu", scale_dtype=torch.bfloat16
        )(logits_TE, ids_TK, expert_scale_E=torch.ones(spec.num_logits)),
    }
    out = {}
    for label, call in calls.items():
        try:
            call()
            out[label] = None
        except RouterSpecError as e:
            out[label] = str(e)
    return out


@pytest.fixture(scope="module")
def report() -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed: pip install 'routereplay[triton]'")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interp-report"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _case_keys() -> list[str]:
    sys.path.insert(0, str(HERE))
    from helpers import VARIANTS

    return [f"{name}-{d}" for name in sorted(VARIANTS) for d in ("float32", "bfloat16")]


@NEEDS_TRITON
@pytest.mark.parametrize("key", _case_keys())
def test_interpreted_kernel_matches_route(report, key):
    case = report["cases"][key]
    if "unsupported" in case:
        assert key.startswith("p_norm-"), f"{key}: only DBRX's p-norm is left to route(), found {case}"
        return
    dtype = key.rsplit("-", 1)[1]
    assert case["ids_equal"], f"{key}: ids differ from route()'s (or are not int64)"
    assert case["dtype_equal"], f"{key}: weights dtype differs from route()'s"
    assert case["id_dtypes_agree"], f"{key}: uint8 / int16 / int32 / int64 ids give different results"
    assert case["prepared_equal"], f"{key}: prepare_fused's call differs from route_forced_fused"
    assert case["ulp"] <= ULP_BOUND[dtype], f"{key}: {case['ulp']} ulp from route(), bound {ULP_BOUND[dtype]}"
    bound = 1e-6 if dtype == "float32" else 2e-2
    assert case["grad_rel"] <= bound, f"{key}: gradient relative error {case['grad_rel']:.2e} > {bound}"


@NEEDS_TRITON
def test_interpreted_kernel_validates_like_route(report):
    errors = report["errors"]
    for label in ("duplicate", "shape", "float_ids"):
        ref, fused = errors[label]
        assert ref is not None and ref == fused, f"{label}: route() says {ref!r}, the kernel says {fused!r}"
    assert "expert repeats" in errors["duplicate"][1]
    assert errors["unsupported"] == (
        "layer 3: the fused replay kernel does not cover this router spec: norm_kind='p_norm' (DBRX) is not "
        "fused: torch.norm's reduction order is not reproduced; check routereplay.kernels.supports(spec, ...) "
        "first and call routing.route for such specs"
    )


@NEEDS_TRITON
def test_interpreted_top_k_sum_follows_each_lane_order_exactly(report):
    assert report["sum_order"] == {f"K{k}-{order}": 0 for k in (4, 6, 8, 12) for order in ("halves", "pairs")}, report[
        "sum_order"
    ]
    assert report["sum_orders_differ"], "the two lane orders gave the same weights: the test cannot tell them apart"


@NEEDS_TRITON
def test_interpreted_prepared_call_refusals(report):
    errors = report["prepared_errors"]
    assert errors["logits_dtype"] == (
        "layer 2: logits are torch.bfloat16, the fused replay was prepared for torch.float32: "
        "prepare one per logits dtype"
    )
    assert errors["ids_shape"] == (
        "layer 2: forced_TK must be [8, 4] (rows of the router input, top_k=4), found (8, 2)"
    )
    assert errors["float_ids"] == "layer 2: forced_TK must be an integer tensor, found torch.float32"
    assert errors["mask_dtype"] == "layer 2: forced_mask_T must be bool [8], found (8,) torch.float32"
    assert errors["unsupported"].startswith(
        "the fused replay kernel does not cover this router spec: norm_kind='p_norm' (DBRX) is not fused"
    )
    assert errors["no_scale_dtype"] == (
        "the router spec scales weights per expert: pass scale_dtype=expert_scale.dtype "
        "(float32, bfloat16 or float16), found None"
    )
    assert errors["scale_dtype"] == (
        "expert_scale_E is torch.float32, the fused replay was prepared with scale_dtype=torch.bfloat16"
    )


@NEEDS_TRITON
def test_interpreted_kernel_edge_cases(report):
    assert report["nan_row"], "an out-of-range id with validate=False must poison exactly its row"
    assert report["nan_row_others_ulp"] <= ULP_BOUND["float32"]
    assert report["strided_ulp"] <= ULP_BOUND["float32"]
    assert report["empty"] == [[0, 4], [0, 4]]
    # create_graph=True: the same gradient, which cannot be differentiated again (the kernel's)
    assert report["create_graph"]["equal"]
    assert "differentiate twice" in (report["create_graph"]["error"] or ""), report["create_graph"]
    # autograd makes no zeros for the ids' gradient (the interpreter's own tensors are seen too)
    made = {op for op in report["backward_ops"] if "zero" in op or "fill" in op}
    assert not made, report["backward_ops"]
    for name, rel in report["repeat_grad_rel"].items():
        assert rel <= 1e-6, f"{name}: gradient of a repeated id {rel:.2e} from route()'s"


@NEEDS_TRITON
def test_interpreted_direct_launch_passes_what_the_jit_launch_passed(report):
    """The kept launcher gets the JIT launch's runtime arguments as pointers, in order, then the
    constexprs in the kernel's order (a wrong order would launch on the wrong memory, on CUDA only)."""
    assert len(report["direct_launch"]) == 5
    for variant, seen in report["direct_launch"].items():
        assert seen["launches"] == [2, 2] and seen["kept"] == [1, 1], (variant, seen)
        assert not seen["problems"], (variant, seen["problems"])


def test_import_routereplay_does_not_import_triton():
    code = (
        "import sys, routereplay, routereplay.kernels; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "from routereplay.core.routing import RouterSpec; "
        "print(routereplay.kernels.supports(RouterSpec(num_experts=8, top_k=2)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unsupported_reasons():
    from routereplay.kernels import unsupported_reason

    if not HAS_TRITON:
        assert unsupported_reason(RouterSpec(num_experts=8, top_k=2)) == (
            "triton is not installed: pip install 'routereplay[triton]'"
        )
        return
    assert unsupported_reason(RouterSpec(num_experts=8, top_k=2)) is None
    dbrx = RouterSpec(num_experts=16, top_k=4, norm_topk_prob=True, norm_kind="p_norm", norm_p=1.0)
    assert "p_norm" in unsupported_reason(dbrx)
    assert unsupported_reason(RouterSpec(num_experts=64, top_k=33)) == "top_k=33 > 32"
    assert unsupported_reason(RouterSpec(num_experts=2048, top_k=8)) == ("softmax over num_logits=2048 > 1024 experts")
    assert unsupported_reason(RouterSpec(num_experts=2048, top_k=8, score_function="sigmoid")) is None
    assert "float64" in unsupported_reason(RouterSpec(num_experts=8, top_k=2), logits_dtype=torch.float64)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        assert unsupported_reason(RouterSpec(num_experts=8, top_k=2), device="cpu") == (
            "logits on cpu: the kernel runs on CUDA (or on the CPU with TRITON_INTERPRET=1)"
        )


@NEEDS_TRITON
def test_ulp_bound_is_what_the_gpu_tier_asserts():
    from routereplay.core.errors import RouterSpecError
    from routereplay.kernels import ulp_bound

    sys.path.insert(0, str(HERE))
    from helpers import VARIANTS

    for name, spec in VARIANTS.items():
        if name == "p_norm":
            continue
        assert ulp_bound(spec, torch.float32) == 0 and ulp_bound(spec, torch.bfloat16) == 0, name
    with pytest.raises(RouterSpecError) as err:
        ulp_bound(VARIANTS["p_norm"], torch.float32)
    assert str(err.value) == (
        "the fused replay kernel does not cover this router spec: norm_kind='p_norm' (DBRX) is not fused: "
        "torch.norm's reduction order is not reproduced; no bound applies, routing.route replays it"
    )


def test_cuda_sum_lane_order_is_read_from_this_torch():
    from routereplay.kernels.coverage import cuda_sum_halves_lanes

    # pytorch/pytorch#164790 (torch 2.10) made CUDA's block_x_reduce halve its shuffle offsets
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert cuda_sum_halves_lanes() == ((major, minor) >= (2, 10) and torch.version.hip is None)


@NEEDS_TRITON
def test_prepare_fused_refuses_the_cpu_outside_the_interpreter():
    from routereplay.core.errors import RouterSpecError
    from routereplay.kernels import prepare_fused

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: the CPU is a supported device here")
    with pytest.raises(RouterSpecError) as err:
        prepare_fused(RouterSpec(num_experts=8, top_k=2), logits_dtype=torch.float32, device="cpu", where="layer 0: ")
    assert str(err.value) == (
        "layer 0: the fused replay kernel does not cover this router spec: logits on cpu: the kernel runs on "
        "CUDA (or on the CPU with TRITON_INTERPRET=1); check routereplay.kernels.supports(spec, ...) first "
        "and call routing.route for such specs"
    )


if __name__ == "__main__" and sys.argv[1:] == ["--interp-report"]:
    torch.set_num_threads(1)
    print(json.dumps(_report()))
