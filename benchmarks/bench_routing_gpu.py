"""Forced-replay routing on one GPU: routereplay's route(), the fused Triton kernel, Megatron-Core, the bytes floor.

    python3 benchmarks/bench_routing_gpu.py                   # the four shapes of issue 11, fp32 logits
    OUT=/dir python3 benchmarks/bench_routing_gpu.py          # also writes /dir/bench_routing_gpu.json
    TRITON_INTERPRET=1 python3 benchmarks/bench_routing_gpu.py --smoke   # tiny shapes on the CPU (logic only)
    python3 benchmarks/bench_routing_gpu.py --host-cost       # no GPU: host µs of a call, the launch stubbed
    python3 benchmarks/bench_routing_gpu.py --host-cost --smoke   # the same, two repetitions (logic only)

Per shape, same card, same run, median of per-call CUDA-event timings after warm-up, inputs rotated
over several copies so that the logits do not sit in L2:

* Megatron-Core ``moe_utils.topk_routing_with_score_function``: live, and ``RouterReplay`` in
  ``REPLAY_FORWARD`` with int64 ids on the GPU and in pinned host memory (its training path:
  dense ``[T, E]`` probs and routing map);
* ``routing.route(..., forced_TK=ids, validate=False)`` with uint8 ids (GPU, pinned host) and int64;
* ``kernels.route_forced_fused`` (the checked wrapper) with uint8 ids (GPU, pinned host) and int64,
  its forward rows-per-program swept;
* ``kernels.prepare_fused``'s call (what replay calls per layer): uint8 / int64 ids on the GPU and
  in pinned host memory;
* forward + backward of each (Megatron: grad of its dense probs; ours: grad of the ``[T, K]`` weights);
* forward + backward per layer of ``--layers`` calls through one ``torch.autograd.grad`` (Megatron's
  replay, route(), the prepared call): as a training step runs them, autograd's hand-off to its
  device thread paid once per backward, not once per call;
* the bytes floor: reading the logits and the uint8 ids and writing ``[T, K]`` weights and int64
  ids, at the device-to-device copy bandwidth measured in this run (a 1 GiB copy).

Correctness is checked in the same run: the fused and prepared weights against route()'s (ulp
distance, fp fusion on and off, next to ``kernels.ulp_bound``), route()'s against Megatron's replay
probs at the same ids.

``--host-cost`` needs no GPU: it times, on the CPU, everything a call does except the kernel launch
(checks, allocations, autograd, the launcher's Python side; the launcher itself is a no-op), for the
prepared call and for the checked wrapper, forward and forward + backward, next to the floor any
path pays: ``torch.autograd.grad`` over one C++ node, and over a custom Function that does nothing.
With megatron-core installed it also runs Megatron's replay and ``route()`` on the same small CPU
tensors, and prints each path's host time and its ratio to Megatron's, per call and per layer of
``--layers`` calls in one backward: the host side of the GPU table's ratios, no launch on any path.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch

from routereplay.core import routing
from routereplay.core.routing import RouterSpec
from routereplay.kernels import ulp_bound

# name, tokens, experts, top-k, Megatron arguments, our spec
CASES = [
    ("16384x128 top-k then softmax", 16384, 128, 8, {"score_function": "softmax", "use_pre_softmax": False}),
    ("16384x128 softmax then top-k", 16384, 128, 8, {"score_function": "softmax", "use_pre_softmax": True}),
    (
        "65536x256 sigmoid+bias, 8 groups keep 4",
        65536,
        256,
        8,
        {"score_function": "sigmoid", "num_groups": 8, "group_topk": 4, "scaling_factor": 2.5, "bias": True},
    ),
    ("4096x64 top-4", 4096, 64, 4, {"score_function": "softmax", "use_pre_softmax": False}),
]


def spec_for(num_experts: int, top_k: int, mc: dict) -> RouterSpec:
    """The RouterSpec that computes what Megatron's topk_routing_with_score_function computes."""
    if mc["score_function"] == "softmax":
        return RouterSpec(
            num_experts=num_experts,
            top_k=top_k,
            score_function="softmax",
            score_before_topk=mc["use_pre_softmax"],
            compute_dtype=torch.float32,
            weights_dtype="logits",
            family="megatron",
        )
    return RouterSpec(
        num_experts=num_experts,
        top_k=top_k,
        score_function="sigmoid",
        compute_dtype=torch.float32,
        uses_bias=mc.get("bias", False),
        n_group=mc.get("num_groups"),
        topk_group=mc.get("group_topk"),
        group_score_topn=top_k // mc["group_topk"] if mc.get("group_topk") else 2,
        norm_topk_prob=top_k > 1,
        norm_eps=1e-20,
        scaling_factor=mc.get("scaling_factor") or 1.0,
        weights_dtype="logits",
        family="megatron",
    )


class Timer:
    """Median per-call time in µs: CUDA events on the GPU, the host clock (after a sync) elsewhere."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def __call__(self, fn, copies: int) -> float:
        for i in range(self.warmup):
            fn(i % copies)
        cuda = self.device.type == "cuda"
        times = []
        for i in range(self.reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(i % copies)
                end.record()
                times.append((start, end))
            else:
                t0 = time.perf_counter()
                fn(i % copies)
                times.append(time.perf_counter() - t0)
        if cuda:
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) * 1e3 for s, e in times)
        return statistics.median(times) * 1e6

    def wall(self, fn, copies: int) -> float:
        """µs per call of ``reps`` calls back to back between two syncs (host clock): what a stream of
        calls costs, host or device bound, with no event between calls (profile_routing's "wall")."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        for i in range(self.warmup):
            fn(i % copies)
        sync()
        t0 = time.perf_counter()
        for i in range(self.reps):
            fn(i % copies)
        sync()
        return (time.perf_counter() - t0) / self.reps * 1e6


class AllocatorCounts:
    """Runs a timing and notes in ``into[key]`` what the CUDA caching allocator did meanwhile
    (zeros on the CPU)."""

    KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")

    def __init__(self, device: torch.device, timer: Timer, copies: int, into: dict):
        self.cuda = device.type == "cuda"
        self.timer, self.copies, self.into = timer, copies, into

    def _now(self) -> dict:
        stats = torch.cuda.memory_stats() if self.cuda else {}
        return {k: stats.get(k, 0) for k in self.KEYS} | {"reserved_bytes": stats.get("reserved_bytes.all.current", 0)}

    def __call__(self, fn, key: str) -> float:
        before = self._now()
        us = self.timer(fn, self.copies)
        after = self._now()
        self.into[key] = {k: after[k] - before[k] for k in self.KEYS} | {"reserved_bytes": after["reserved_bytes"]}
        return us


def ulp(a: torch.Tensor, b: torch.Tensor) -> int:
    ia, ib = a.float().view(torch.int32).long(), b.float().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (64 MiB on the CPU)."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    us = timer(lambda i: dst.copy_(src), 1)
    return 2 * n / (us * 1e-6)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_case(name, num_tokens, num_experts, top_k, mc, *, device, dtype, timer, bandwidth, args, mu, RouterReplay):
    from routereplay.kernels import replay_triton as kernels  # the entry point plus its tuning knobs
    from routereplay.kernels.plan import block_rows as default_block_rows

    gen = torch.Generator(device="cpu").manual_seed(0)
    spec = spec_for(num_experts, top_k, mc)
    logits_bytes = num_tokens * num_experts * torch.finfo(dtype).bits // 8
    copies = max(2, math.ceil(args.rotate_bytes / logits_bytes))
    logits = [(2 * torch.randn(num_tokens, num_experts, generator=gen)).to(device, dtype) for _ in range(copies)]
    bias = (0.1 * torch.randn(num_experts, generator=gen)).to(device) if mc.get("bias") else None
    # ids a router of this spec could pick: live routing of other logits
    ids64 = [
        routing.route((2 * torch.randn(num_tokens, num_experts, generator=gen)).to(device, dtype), spec, bias_E=bias)[1]
        for _ in range(copies)
    ]
    ids8 = [i.to(torch.uint8) for i in ids64]
    pin = device.type == "cuda"
    ids8_host = [i.cpu().pin_memory() if pin else i.cpu() for i in ids8]
    ids64_host = [i.cpu().pin_memory() if pin else i.cpu() for i in ids64]
    kw = {"bias_E": bias} if bias is not None else {}
    megatron_route = megatron_router(mu, RouterReplay, top_k, mc, bias)

    def megatron(i, ids=None):
        return megatron_route(logits[i], None if ids is None else ids[i])

    def ours(i, ids, fused=False, block_rows=None):
        if fused:
            return kernels.route_forced_fused(
                logits[i], spec, forced_TK=ids[i], validate=False, block_rows=block_rows, **kw
            )
        return routing.route(logits[i], spec, forced_TK=ids[i], validate=False, **kw)

    res: dict = {"name": name, "tokens": num_tokens, "experts": num_experts, "top_k": top_k, "copies": copies}
    fwd = res["forward_us"] = {}
    fwd["megatron_live"] = timer(lambda i: megatron(i), copies)
    fwd["megatron_replay_gpu_ids"] = timer(lambda i: megatron(i, ids64), copies)
    fwd["megatron_replay_host_ids"] = timer(lambda i: megatron(i, ids64_host), copies)
    fwd["route_uint8_gpu_ids"] = timer(lambda i: ours(i, ids8), copies)
    fwd["route_int64_gpu_ids"] = timer(lambda i: ours(i, ids64), copies)
    fwd["route_uint8_host_ids"] = timer(lambda i: ours(i, ids8_host), copies)
    sweep = {}
    for rows in args.block_rows:
        sweep[rows] = timer(lambda i, r=rows: ours(i, ids8, True, r), copies)
    best = min(sweep, key=sweep.get)
    res["fused_block_rows_us"] = {str(k): v for k, v in sweep.items()}
    res["fused_block_rows_default"] = default_block_rows(
        kernels.plan_for(spec, dtype, None, None, device.type == "cuda"), False, num_tokens, _num_sms(device)
    )
    fwd["fused_uint8_gpu_ids"] = timer(lambda i: ours(i, ids8, True), copies)
    fwd["fused_uint8_gpu_ids_best_rows"] = sweep[best]
    res["fused_best_block_rows"] = best
    fwd["fused_int64_gpu_ids"] = timer(lambda i: ours(i, ids64, True), copies)
    fwd["fused_uint8_host_ids"] = timer(lambda i: ours(i, ids8_host, True), copies)
    prepared = kernels.PreparedReplay(spec, logits_dtype=dtype, device=device)
    bias_arg = kw.get("bias_E")

    def prep(i, ids):
        return prepared(logits[i], ids[i], None, bias_arg)

    fwd["prepared_uint8_gpu_ids"] = timer(lambda i: prep(i, ids8), copies)
    fwd["prepared_int64_gpu_ids"] = timer(lambda i: prep(i, ids64), copies)
    fwd["prepared_uint8_host_ids"] = timer(lambda i: prep(i, ids8_host), copies)
    fwd["prepared_int64_host_ids"] = timer(lambda i: prep(i, ids64_host), copies)
    res["prepared_block_rows"] = default_block_rows(prepared.plan, False, num_tokens, prepared._num_sms)

    # forward + backward: gradients of the router output w.r.t. the logits
    leaves = [x.clone().requires_grad_(True) for x in logits]
    grad_dense = torch.randn(num_tokens, num_experts, generator=gen).to(device, dtype)
    grad_k = torch.randn(num_tokens, top_k, generator=gen).to(device, dtype)

    def fb_megatron(i):
        probs, _ = megatron_route(leaves[i], ids64[i])
        return torch.autograd.grad(probs, leaves[i], grad_dense)

    def fb_prepared(i, ids):
        w, _ = prepared(leaves[i], ids[i], None, bias_arg)
        return torch.autograd.grad(w, leaves[i], grad_k)

    def fb_ours(i, ids, fused):
        if fused:
            w, _ = kernels.route_forced_fused(leaves[i], spec, forced_TK=ids[i], validate=False, **kw)
        else:
            w, _ = routing.route(leaves[i], spec, forced_TK=ids[i], validate=False, **kw)
        return torch.autograd.grad(w, leaves[i], grad_k)

    if args.profile:  # what one forward + backward runs: kernels by device time, host calls by self time
        for label, fn in (("megatron replay", fb_megatron), ("route u8", lambda i: fb_ours(i, ids8, False)),
                          ("prepared u8", lambda i: fb_prepared(i, ids8))):  # fmt: skip
            print_profile(f"{name} | {label} fwd+bwd", fn, copies)
    fb = res["forward_backward_us"] = {}
    # the caching allocator's calls into CUDA during each timing below (cudaMalloc / cudaFree, failed
    # mallocs that free the cache, syncs of all streams): a path that keeps the allocator busy pays
    # for it in its time, and the next path may too
    churn = res["allocator_during_forward_backward"] = {}
    counted = AllocatorCounts(device, timer, copies, churn)
    fb["megatron_replay_gpu_ids"] = counted(fb_megatron, "megatron_replay_gpu_ids")
    fb["route_uint8_gpu_ids"] = counted(lambda i: fb_ours(i, ids8, False), "route_uint8_gpu_ids")
    fb["fused_uint8_gpu_ids"] = timer(lambda i: fb_ours(i, ids8, True), copies)
    fb["fused_uint8_host_ids"] = timer(lambda i: fb_ours(i, ids8_host, True), copies)
    fb["prepared_uint8_gpu_ids"] = counted(lambda i: fb_prepared(i, ids8), "prepared_uint8_gpu_ids")
    fb["prepared_uint8_host_ids"] = timer(lambda i: fb_prepared(i, ids8_host), copies)
    # the same calls back to back between two syncs: where the per-call events above and this wall
    # disagree, the events measured the device waiting on the host between them
    res["forward_backward_wall_us"] = {
        "megatron_replay_gpu_ids": timer.wall(fb_megatron, copies),
        "prepared_uint8_gpu_ids": timer.wall(lambda i: fb_prepared(i, ids8), copies),
    }

    # forward + backward of --layers routing calls through one torch.autograd.grad, per layer: a
    # training step's backward runs every layer's routing backward in one pass of autograd's engine,
    # which hands a CUDA backward to its device thread and waits for it once per call (~110 µs of
    # host on the lent machine, see BENCHMARKS.md), not once per layer as the single calls above do
    L = args.layers
    stack = leaves + [
        (2 * torch.randn(num_tokens, num_experts, generator=gen)).to(device, dtype).requires_grad_(True)
        for _ in range(max(0, L - copies))
    ]

    def fb_layers(i, layer, grad):
        xs = [stack[(i * L + j) % len(stack)] for j in range(L)]
        outs = [layer(x, (i * L + j) % copies) for j, x in enumerate(xs)]
        return torch.autograd.grad(outs, xs, [grad] * L)

    def megatron_layer(x, k):
        return megatron_route(x, ids64[k])[0]

    def route_layer(x, k):
        return routing.route(x, spec, forced_TK=ids8[k], validate=False, **kw)[0]

    layers = res["forward_backward_per_layer_us"] = {"layers": L}
    layers_wall = res["forward_backward_per_layer_wall_us"] = {}  # back to back between two syncs
    for key, layer, grad in (
        ("megatron_replay_gpu_ids", megatron_layer, grad_dense),
        ("route_uint8_gpu_ids", route_layer, grad_k),
        ("prepared_uint8_gpu_ids", lambda x, k: prepared(x, ids8[k], None, bias_arg)[0], grad_k),
    ):
        layers[key] = counted(lambda i, f=layer, g=grad: fb_layers(i, f, g), f"per_layer_{key}") / L
        layers_wall[key] = timer.wall(lambda i, f=layer, g=grad: fb_layers(i, f, g), copies) / L

    # the bytes floor: logits + uint8 ids read, [T, K] weights (logits dtype) + int64 ids written
    esize = torch.finfo(dtype).bits // 8
    floor_bytes = logits_bytes + num_tokens * top_k * (1 + esize + 8)
    res["floor_bytes"] = floor_bytes
    res["floor_us"] = floor_bytes / bandwidth * 1e6
    # forward + backward floor: also read dW [T, K] and write dlogits [T, E]
    res["floor_fb_us"] = (floor_bytes + num_tokens * top_k * esize + logits_bytes) / bandwidth * 1e6

    # correctness in the same run
    ref_w, ref_i = routing.route(logits[0], spec, forced_TK=ids8[0], validate=False, **kw)
    check = res["check"] = {}
    for fusion in (False, True):
        w, i = kernels.route_forced_fused(logits[0], spec, forced_TK=ids8[0], validate=False, fp_fusion=fusion, **kw)
        check[f"fused_vs_route_ulp_fp_fusion_{fusion}"] = ulp(w, ref_w)
        check["ids_equal"] = bool(torch.equal(i, ref_i))
    w, i = prepared(logits[0], ids8[0], None, bias_arg)
    check["prepared_vs_route_ulp"] = ulp(w, ref_w)
    check["prepared_ids_equal"] = bool(torch.equal(i, ref_i))
    check["ulp_bound"] = ulp_bound(spec, dtype)
    probs, _ = megatron(0, ids64)
    check["route_vs_megatron_ulp"] = ulp(probs.gather(1, ids64[0]), ref_w)
    w_leaf = leaves[0]
    g_ref = torch.autograd.grad(
        routing.route(w_leaf, spec, forced_TK=ids8[0], validate=False, **kw)[0], w_leaf, grad_k
    )[0]
    g_fused = torch.autograd.grad(
        kernels.route_forced_fused(w_leaf, spec, forced_TK=ids8[0], validate=False, **kw)[0], w_leaf, grad_k
    )[0]
    check["grad_rel_err"] = float((g_fused.float() - g_ref.float()).norm() / g_ref.float().norm())
    return res


def print_profile(title: str, fn, copies: int, calls: int = 10) -> None:
    """torch.profiler over ``calls`` calls after a warm-up: per call, the kernels by device time and
    the host calls by self CPU time (the CUDA runtime's: cudaMalloc, cudaLaunchKernel, ...)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else lambda: None
    for i in range(3):
        fn(i % copies)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(calls):
            fn(i % copies)
        sync()
    events = prof.key_averages()
    dev = sorted((e for e in events if getattr(e, "self_device_time_total", 0) > 0),
                 key=lambda e: -e.self_device_time_total)  # fmt: skip
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)
    print(f"-- {title}: device {sum(e.self_device_time_total for e in dev) / calls:.1f} us per call")
    for e in dev[:6]:
        print(f"   device {e.self_device_time_total / calls:8.1f} us  x{e.count / calls:<4.1f} {e.key[:80]}")
    for e in host[:8]:
        print(f"   host   {e.self_cpu_time_total / calls:8.1f} us  x{e.count / calls:<4.1f} {e.key[:80]}")


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def host_cost(args) -> dict:
    """Host µs per call on the CPU with the kernel launch replaced by a no-op launcher: the
    prepared call (direct-launch path) and the checked wrapper, forward and forward + backward,
    on every shape's spec (the tensors are small CPU ones, ``--host-tokens`` rows: only the host path
    is timed, and CPU allocations stand in for the CUDA caching allocator's). Also forward + backward
    with every backward through ``once_differentiable``'s wrapper, as before it was kept for
    ``create_graph=True`` only.

    With megatron-core importable, Megatron's replay (``RouterReplay``, int64 ids) and ``route()``
    run on the same CPU tensors, forward, forward + backward, and per layer of ``--layers`` calls in
    one ``torch.autograd.grad``: the host side of item 4's ratios without any kernel launch (on the
    GPU each path adds its launches: two for the prepared call, one per op for the others)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets a PreparedReplay live on the CPU
    from routereplay.kernels import launch
    from routereplay.kernels import replay_triton as rt

    class _NoLaunch:  # what a compiled kernel gives the direct launch path, launching nothing
        function, packed_metadata = 0, (4, 1, 0)

        @staticmethod
        def run(*launch_args):
            return None

    class _StubJIT:  # stands in for the JIT functions: the first launch "compiles" _NoLaunch
        def __init__(self, fn):
            self.arg_names = fn.arg_names

        def __getitem__(self, grid):
            return lambda *a, **k: _NoLaunch()

    rt._replay_fwd, rt._replay_bwd = _StubJIT(rt._replay_fwd), _StubJIT(rt._replay_bwd)
    launch.raw_stream = lambda index: 0
    try:
        mu, RouterReplay = _megatron()
    except ImportError:
        mu = RouterReplay = None
    torch.set_num_threads(1)  # a step's host work is one thread; CPU ops at these sizes are serial anyway
    timer = Timer(torch.device("cpu"), args.warmup, args.reps)
    out = {}
    for name, _, num_experts, top_k, mc in CASES:
        out[name] = _host_cost_case(rt, timer, spec_for(num_experts, top_k, mc), mc, args, mu, RouterReplay)
        print(json.dumps({name: out[name]}))
    if mu is not None:
        print(f"host µs on the CPU, no launches, {args.host_tokens} rows: forward / forward + backward / per layer "
              f"of {args.layers} in one backward (ratio to Megatron's replay)")  # fmt: skip
        kinds = ("forward_us", "forward_backward_us", "per_layer_us")
        for name, r in out.items():
            cells = "".join(
                f"  {path} " + " / ".join(f"{r[path][k]:.1f} ({r[path][k] / r['megatron'][k]:.2f})" for k in kinds)
                for path in ("route", "prepared")
            )  # fmt: skip
            print(f"{name:42s}Megatron " + " / ".join(f"{r['megatron'][k]:.1f}" for k in kinds) + cells)
    return out


def _host_cost_case(rt, timer: Timer, spec: RouterSpec, mc: dict, args, mu, RouterReplay) -> dict:
    T, L = args.host_tokens, args.layers
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(T, spec.num_logits, generator=gen)
    leaf = logits.clone().requires_grad_(True)
    bias = 0.1 * torch.randn(spec.num_logits, generator=gen) if spec.uses_bias else None
    ids64 = routing.route(torch.randn(T, spec.num_logits, generator=gen), spec, bias_E=bias)[1]
    ids8 = ids64.to(torch.uint8)
    grad = torch.ones(T, spec.top_k)
    prepared = rt.PreparedReplay(spec, logits_dtype=torch.float32, device="cpu")
    prepared._fast = True  # take the direct-launch path, with the stubbed launcher
    prepared._direct = lambda num_tokens: True
    kw = {"bias_E": bias} if bias is not None else {}

    def fb(call):
        w, _ = call(leaf)
        return torch.autograd.grad(w, leaf, grad)

    def checked(x):
        return rt.route_forced_fused(x, spec, forced_TK=ids8, validate=False, **kw)

    def wrapped_backward(ctx, grad_weights_TK, grad_ids_TK):  # every backward through once_differentiable
        return rt._fused_backward_once(ctx, grad_weights_TK)

    own_backward = rt._FusedReplay.backward
    rt._FusedReplay.backward = staticmethod(wrapped_backward)
    try:
        wrapped = timer(lambda i: fb(lambda x: prepared(x, ids8, None, bias)), 1)
    finally:
        rt._FusedReplay.backward = staticmethod(own_backward)
    out = {
        "prepared_forward_us": timer(lambda i: prepared(leaf, ids8, None, bias), 1),
        "prepared_forward_backward_us": timer(lambda i: fb(lambda x: prepared(x, ids8, None, bias)), 1),
        # the backward as it was before it skipped once_differentiable's wrapper without create_graph
        "prepared_forward_backward_wrapped_us": wrapped,
        "prepared_forward_no_grad_us": timer(lambda i: prepared(logits, ids8, None, bias), 1),
        "checked_wrapper_forward_us": timer(lambda i: checked(leaf), 1),
        "checked_wrapper_forward_backward_us": timer(lambda i: fb(checked), 1),
    }
    # the floor every path pays: torch.autograd.grad over one C++ node (x * 1), and over a Python
    # Function that only allocates its output and the gradient
    out["autograd_grad_one_node_us"] = timer(lambda i: torch.autograd.grad(leaf * 1.0, leaf, logits), 1)
    out["empty_function_forward_backward_us"] = timer(
        lambda i: torch.autograd.grad(_EmptyFunction.apply(leaf, spec.top_k), leaf, grad), 1
    )
    out["kept_launchers"] = [len(prepared._fwd_kept), len(prepared._bwd_kept)]
    if mu is None:
        return out

    megatron_route = megatron_router(mu, RouterReplay, spec.top_k, mc, bias)

    def megatron(x):
        return megatron_route(x, ids64)[0]

    leaves = [torch.randn(T, spec.num_logits, generator=gen).requires_grad_(True) for _ in range(L)]
    grad_dense = torch.ones(T, spec.num_logits)
    paths = {
        "megatron": (megatron, grad_dense),
        "route": (lambda x: routing.route(x, spec, forced_TK=ids8, validate=False, **kw)[0], grad),
        "prepared": (lambda x: prepared(x, ids8, None, bias)[0], grad),
    }
    for path, (call, g) in paths.items():
        out[path] = {
            "forward_us": timer(lambda i, f=call: f(leaf), 1),
            "forward_backward_us": timer(lambda i, f=call, g=g: torch.autograd.grad(f(leaf), leaf, g), 1),
            "per_layer_us": timer(
                lambda i, f=call, g=g: torch.autograd.grad([f(x) for x in leaves], leaves, [g] * L), 1
            ) / L,
        }  # fmt: skip
    RouterReplay.clear_global_router_replay_instances()
    return out


class _EmptyFunction(torch.autograd.Function):
    """A custom Function with no work: ``[T, K]`` out, an uninitialised ``[T, E]`` gradient back."""

    @staticmethod
    def forward(ctx, x, k):
        ctx.save_for_backward(x)
        return x.new_empty(x.shape[0], k)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.empty_like(x), None


def _megatron():
    """megatron-core's routing module and ``RouterReplay`` (ImportError without megatron-core)."""
    from megatron.core.transformer.moe import moe_utils as mu
    from megatron.core.transformer.moe.router_replay import RouterReplay

    if not hasattr(mu, "te_general_gemm"):  # megatron-core 0.16.1 names it without Transformer Engine
        mu.te_general_gemm = None
    return mu, RouterReplay


def megatron_router(mu, RouterReplay, top_k: int, mc: dict, bias):
    """Megatron-Core's routing of ``[T, E]`` logits for one of the CASES: ``route(x)`` live,
    ``route(x, ids)`` replaying int64 ``ids`` through its own ``RouterReplay`` (REPLAY_FORWARD), as its
    training path runs it. Returns Megatron's ``(probs, routing_map)``, dense ``[T, E]``."""
    replay = RouterReplay()
    replay.set_router_replay_action(mu_action(mu, "REPLAY_FORWARD"))
    kw = {
        "use_pre_softmax": mc.get("use_pre_softmax", False),
        "num_groups": mc.get("num_groups"),
        "group_topk": mc.get("group_topk"),
        "scaling_factor": mc.get("scaling_factor"),
        "score_function": mc["score_function"],
        "expert_bias": bias,
    }

    def route(x, ids=None):
        if ids is None:
            return mu.topk_routing_with_score_function(x, top_k, **kw)
        replay.clear_indices()
        replay.set_target_indices(ids)
        return mu.topk_routing_with_score_function(x, top_k, router_replay=replay, **kw)

    return route


def mu_action(mu, name):
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    return getattr(RouterReplayAction, name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="logits dtype")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--rotate-bytes", type=int, default=256 << 20, help="logits bytes rotated over (> L2)")
    p.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    p.add_argument("--profile", action="store_true", help="also profile one forward + backward of each path")
    p.add_argument("--layers", type=int, default=8, help="routing calls per backward in the per-layer rows")
    p.add_argument("--block-rows", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): logic only")
    p.add_argument("--host-cost", action="store_true", help="no GPU: host µs of a call with the launch stubbed")
    p.add_argument("--host-tokens", type=int, default=64, help="rows of the CPU tensors of --host-cost")
    args = p.parse_args(argv)
    if args.host_cost:
        args.warmup, args.reps = (1, 2) if args.smoke else (max(args.warmup, 50), max(args.reps, 2000))
        result = host_cost(args)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
            Path(os.environ["OUT"], "bench_routing_host_cost.json").write_text(json.dumps(result, indent=1))
        return 0

    mu, RouterReplay = _megatron()
    import megatron.core
    import triton

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = getattr(torch, args.dtype)
    cases = CASES if args.cases is None else [CASES[int(c)] for c in args.cases.split(",")]
    if args.smoke:
        cases = [(n, 64, e, k, mc) for n, _, e, k, mc in cases]
        args.warmup, args.reps, args.rotate_bytes, args.block_rows = 1, 2, 0, [16]
    timer = Timer(device, args.warmup, args.reps)
    bandwidth = copy_bandwidth(device, timer)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("COMMIT") or git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "megatron_core": getattr(megatron.core, "__version__", "?"),
        "python": platform.python_version(),
        "logits_dtype": args.dtype,
        "copy_bandwidth_TBps": bandwidth / 1e12,
        "warmup": args.warmup,
        "reps": args.reps,
    }
    print(json.dumps(meta))
    results = []
    for name, t, e, k, mc in cases:
        results.append(
            run_case(
                name, t, e, k, mc, device=device, dtype=dtype, timer=timer, bandwidth=bandwidth, args=args, mu=mu,
                RouterReplay=RouterReplay,
            )
        )  # fmt: skip
        print(json.dumps(results[-1]), flush=True)
    RouterReplay.clear_global_router_replay_instances()

    # the table: µs, and ratios to Megatron's replay with ids on the GPU / to the bytes floor
    cols = [
        ("Mcore live", "forward_us", "megatron_live"),
        ("Mcore replay", "forward_us", "megatron_replay_gpu_ids"),
        ("Mcore host ids", "forward_us", "megatron_replay_host_ids"),
        ("route u8", "forward_us", "route_uint8_gpu_ids"),
        ("route i64", "forward_us", "route_int64_gpu_ids"),
        ("route host u8", "forward_us", "route_uint8_host_ids"),
        ("fused u8", "forward_us", "fused_uint8_gpu_ids"),
        ("fused i64", "forward_us", "fused_int64_gpu_ids"),
        ("fused host u8", "forward_us", "fused_uint8_host_ids"),
        ("prep u8", "forward_us", "prepared_uint8_gpu_ids"),
        ("prep i64", "forward_us", "prepared_int64_gpu_ids"),
        ("prep host u8", "forward_us", "prepared_uint8_host_ids"),
        ("prep host i64", "forward_us", "prepared_int64_host_ids"),
    ]
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | megatron-core "
          f"{meta['megatron_core']} | {args.dtype} logits | copy {bandwidth / 1e12:.2f} TB/s | "
          f"commit {meta['commit']}")  # fmt: skip
    print("forward, median µs (ratio to Megatron replay with GPU ids):")
    print(f"{'case':42s}" + "".join(f"{c[0]:>16s}" for c in cols) + f"{'floor':>9s}{'fused/floor':>12s}")
    for r in results:
        base = r["forward_us"]["megatron_replay_gpu_ids"]
        cells = "".join(f"{r[s][k]:9.1f} ({r[s][k] / base:4.2f})" for _, s, k in cols)
        print(
            f"{r['name']:42s}{cells}{r['floor_us']:9.1f}{r['forward_us']['fused_uint8_gpu_ids'] / r['floor_us']:12.1f}"
        )
    print("forward + backward, median µs (ratio to Megatron replay):")
    for r in results:
        fb = r["forward_backward_us"]
        base = fb["megatron_replay_gpu_ids"]
        cells = "  ".join(f"{k} {v:.1f} ({v / base:.2f})" for k, v in fb.items())
        print(f"{r['name']:42s}{cells}  floor {r['floor_fb_us']:.1f}")
    print("forward + backward, µs per call of calls back to back between two syncs (ratio to Megatron replay):")
    for r in results:
        wall = r["forward_backward_wall_us"]
        base = wall["megatron_replay_gpu_ids"]
        print(f"{r['name']:42s}" + "  ".join(f"{k} {v:.1f} ({v / base:.2f})" for k, v in wall.items()))
    print(f"forward + backward of {args.layers} layers in one backward, median µs per layer (ratio to Megatron):")
    for r in results:
        per = dict(r["forward_backward_per_layer_us"])
        per.pop("layers")
        base = per["megatron_replay_gpu_ids"]
        print(f"{r['name']:42s}" + "  ".join(f"{k} {v:.1f} ({v / base:.2f})" for k, v in per.items()))
        wall = r["forward_backward_per_layer_wall_us"]
        base = wall["megatron_replay_gpu_ids"]
        print(f"{'  the same back to back, two syncs':42s}"
              + "  ".join(f"{k} {v:.1f} ({v / base:.2f})" for k, v in wall.items()))  # fmt: skip
    print("CUDA allocator calls during each forward + backward timing (mallocs / frees / failed mallocs / "
          "syncs of all streams; reserved GiB after):")  # fmt: skip
    for r in results:
        cells = "  ".join(
            f"{k} {v['num_device_alloc']}/{v['num_device_free']}/{v['num_alloc_retries']}/{v['num_sync_all_streams']}"
            f" {v['reserved_bytes'] / 2**30:.1f}"
            for k, v in r["allocator_during_forward_backward"].items()
        )  # fmt: skip
        print(f"{r['name']:42s}{cells}")
    print("checks and fused rows-per-program sweep:")
    for r in results:
        print(
            f"{r['name']:42s}{json.dumps(r['check'])} rows {json.dumps(r['fused_block_rows_us'])} "
            f"prepared rows {r['prepared_block_rows']}"
        )
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, "bench_routing_gpu.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
