"""Where forced-replay routing's forward + backward spends its time on one GPU: host or device, and which kernels.

    python benchmarks/profile_routing.py              # the four shapes of bench_routing_gpu, fp32 logits
    python benchmarks/profile_routing.py --cases 2    # one shape (index into bench_routing_gpu.CASES)

For each shape and each path (Megatron-Core's ``RouterReplay`` with int64 GPU ids, ``route()`` with
uint8 ids, the prepared kernel with uint8 ids), forward alone and forward + backward
(``torch.autograd.grad`` of the output, as bench_routing_gpu times it), prints per call:

* host: the call's own host time (perf_counter around it, no sync), median;
* wall: ``--reps`` calls back to back between two syncs, divided by ``--reps`` (the larger of host
  and device time, as a training step sees it);
* device: the summed kernel time of one call (torch.profiler, CUDA activity), with its kernels
  by name and count.

Needs megatron-core (``pip install --no-deps`` its wheel) for the Megatron rows; without it they are
skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_routing_gpu import CASES, megatron_router, spec_for

from routereplay.core import routing
from routereplay.kernels import replay_triton


def host_and_wall(fn, copies: int, reps: int) -> tuple[float, float]:
    """(median host µs of one call, µs per call of ``reps`` calls between two syncs)."""
    for i in range(5):
        fn(i % copies)
    torch.cuda.synchronize()
    host = []
    t0 = time.perf_counter()
    for i in range(reps):
        t = time.perf_counter()
        fn(i % copies)
        host.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(host) * 1e6, (time.perf_counter() - t0) / reps * 1e6


def kernels_of(fn, copies: int, calls: int = 10) -> tuple[float, list[tuple[str, int, float]]]:
    """(device µs per call, [(kernel, launches per call, µs per call)]) over ``calls`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fn(i % copies)
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = evt.self_cuda_time_total
        if us > 0 and evt.count:
            rows.append((evt.key[:70], round(evt.count / calls), us / calls))
    rows.sort(key=lambda r: -r[2])
    return sum(r[2] for r in rows), rows


def profile_case(case, args, mu, RouterReplay) -> None:
    name, num_tokens, num_experts, top_k, mc = case
    device, dtype = torch.device("cuda"), torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    spec = spec_for(num_experts, top_k, mc)
    copies = max(2, -(-(256 << 20) // (num_tokens * num_experts * 4)))
    leaves = [(2 * torch.randn(num_tokens, num_experts, generator=gen)).to(device).requires_grad_(True)
              for _ in range(copies)]  # fmt: skip
    bias = (0.1 * torch.randn(num_experts, generator=gen)).to(device) if mc.get("bias") else None
    ids64 = [routing.route(x.detach(), spec, bias_E=bias)[1] for x in leaves]
    ids8 = [i.to(torch.uint8) for i in ids64]
    grad_k = torch.randn(num_tokens, top_k, generator=gen).to(device)
    grad_dense = torch.randn(num_tokens, num_experts, generator=gen).to(device)
    kw = {"bias_E": bias} if bias is not None else {}
    prepared = replay_triton.PreparedReplay(spec, logits_dtype=dtype, device=device)
    paths = {
        "route u8": lambda i: routing.route(leaves[i], spec, forced_TK=ids8[i], validate=False, **kw)[0],
        "prepared u8": lambda i: prepared(leaves[i], ids8[i], None, bias)[0],
    }
    if mu is not None:
        megatron_route = megatron_router(mu, RouterReplay, top_k, mc, bias)

        def megatron(i):
            return megatron_route(leaves[i], ids64[i])[0]

        paths = {"megatron replay": megatron, **paths}
    print(f"\n== {name}  (T={num_tokens}, E={num_experts}, K={top_k})")
    for label, fwd in paths.items():
        grad = grad_dense if label.startswith("megatron") else grad_k

        def fb(i, fwd=fwd, grad=grad):
            return torch.autograd.grad(fwd(i), leaves[i], grad)

        for kind, fn in (("fwd", fwd), ("fwd+bwd", fb)):
            host, wall = host_and_wall(fn, copies, args.reps)
            dev, rows = kernels_of(fn, copies)
            print(f"{label:16s} {kind:8s} host {host:7.1f} us  wall {wall:7.1f} us  device {dev:7.1f} us  "
                  f"({sum(r[1] for r in rows)} kernels)")  # fmt: skip
            for k, n, us in rows[:8]:
                print(f"      {us:7.1f} us  x{n:<2d} {k}")
    if args.bwd_rows:  # the prepared backward's rows per program, swept: device µs of forward + backward
        default = replay_triton.block_rows
        cells = []
        for rows in args.bwd_rows:
            replay_triton.block_rows = lambda plan, backward, *a, r=rows: r if backward else default(plan, False, *a)
            try:
                fb = lambda i: torch.autograd.grad(prepared(leaves[i], ids8[i], None, bias)[0], leaves[i], grad_k)
                cells.append(f"{rows}: {kernels_of(fb, copies)[0]:.1f}")
            finally:
                replay_triton.block_rows = default
        print(f"prepared u8 fwd+bwd device us by backward rows per program (default {default(prepared.plan, True)}):",
              ", ".join(cells))  # fmt: skip
    if mu is not None:
        RouterReplay.clear_global_router_replay_instances()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))))
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--bwd-rows", type=int, nargs="*", default=[16, 32, 64], help="backward rows per program swept")
    args = p.parse_args()
    try:
        from megatron.core.transformer.moe import moe_utils as mu
        from megatron.core.transformer.moe.router_replay import RouterReplay
    except ImportError:
        mu = RouterReplay = None
    if mu is not None and not hasattr(mu, "te_general_gemm"):  # megatron-core 0.16.1 without Transformer Engine
        mu.te_general_gemm = None
    print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| megatron-core", "yes" if mu else "no")
    for c in args.cases.split(","):
        profile_case(CASES[int(c)], args, mu, RouterReplay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
