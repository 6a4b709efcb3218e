"""Where a replayed HF training step spends its time, next to a plain one (same model, same run).

    python benchmarks/profile_replay.py --device cuda --dtype bfloat16 --layers 8 --hidden 1024 \
        --experts 64 --topk 8 --batch 4 --seq 2048

Prints, per arm (plain, replay), the host time of the step's phases measured without a sync
(replay entry, forward dispatch, backward dispatch, block exit) and the synced step time, medians
of ``--reps`` interleaved repetitions; then what a replayed step runs that a plain one does not:
per kernel (per op on the CPU), launches and device time per step of each arm and the difference,
over ``--profiled`` steps of each; then torch.profiler's top host-side ops of one replayed step.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import statistics
import time

import torch
from bench_hf_overhead import build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("layers", 8), ("hidden", 1024), ("experts", 64), ("topk", 8), ("batch", 4), ("seq", 2048)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument(
        "--source", choices=("host", "prepared"), default="host", help="replay a host trace or a PreparedTrace"
    )
    p.add_argument("--replay-kernel", choices=("torch", "triton"), default="torch")
    p.add_argument("--profiled", type=int, default=5, help="steps per arm in the kernel-by-kernel comparison")
    args = p.parse_args()
    import routereplay

    model = build(args)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq)).to(dev)}
    handle = routereplay.attach(model, replay_kernel=args.replay_kernel)
    with torch.no_grad(), handle.record() as rec:
        model(**batch)
    trace = rec.trace().to("cpu")
    if args.source == "prepared":
        trace = handle.prepare(trace)

    def step(kind):
        for q in model.parameters():
            q.grad = None
        sync()
        t = [time.perf_counter()]
        ctx = handle.replay(trace) if kind == "replay" else None
        if ctx is not None:
            ctx.__enter__()
        t.append(time.perf_counter())
        loss = model(**batch).logits.float().square().mean()
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        if ctx is not None:
            ctx.__exit__(None, None, None)
        t.append(time.perf_counter())
        sync()
        t.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(t)] + [t[-1] - t[0]]

    names = ("entry", "forward", "backward", "exit", "wait", "step")
    for _ in range(3):
        step("plain"), step("replay")
    res = {"plain": [], "replay": []}
    for r in range(args.reps):
        for kind in (("plain", "replay") if r % 2 else ("replay", "plain")):
            res[kind].append(step(kind))
    for kind, rows in res.items():
        med = [statistics.median(col) * 1e3 for col in zip(*rows)]
        print(kind.ljust(7), "  ".join(f"{n} {v:8.2f} ms" for n, v in zip(names, med)))
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    print_kernel_diff({kind: kernels_per_step(lambda k=kind: step(k), acts, args.profiled) for kind in res})
    with profile(activities=acts) as prof:
        step("replay")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    prof = cProfile.Profile()
    prof.enable()
    step("replay")
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue()[out.getvalue().index("ncalls") :])
    if dev.type == "cuda":
        from bench_capture import count_syncs

        for kind in ("plain", "replay"):
            _, sites = count_syncs(lambda k=kind: step(k))
            print(f"host syncs of a {kind} step (with its two timing syncs): {dict(sites)}")


def kernels_per_step(step, activities, steps: int) -> dict[str, tuple[float, float]]:
    """{kernel: (launches, device µs)} per step over ``steps`` profiled steps; on the CPU, the aten
    ops by self CPU time instead."""
    from torch.profiler import ProfilerActivity, profile

    on_device = ProfilerActivity.CUDA in activities
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    out = {}
    for evt in prof.key_averages():
        if on_device:  # kernels: device time of their own, on the GPU
            us = evt.self_device_time_total
            kept = us > 0 and "CUDA" in str(getattr(evt, "device_type", "CUDA"))
        else:
            us = evt.self_cpu_time_total
            kept = evt.key.startswith("aten::")
        if kept:
            out[evt.key] = (evt.count / steps, us / steps)
    return out


def print_kernel_diff(arms: dict[str, dict[str, tuple[float, float]]]) -> None:
    """Per kernel: launches and µs per step in each arm, the replayed step's difference first."""
    plain, replay = arms["plain"], arms["replay"]
    total = {kind: sum(us for _, us in rows.values()) for kind, rows in arms.items()}
    launches = {kind: sum(n for n, _ in rows.values()) for kind, rows in arms.items()}
    print(f"per step: plain {launches['plain']:.0f} calls {total['plain']:.1f} us, replay {launches['replay']:.0f} "
          f"calls {total['replay']:.1f} us, difference {total['replay'] - total['plain']:+.1f} us")  # fmt: skip
    rows = []
    for key in set(plain) | set(replay):
        (n0, t0), (n1, t1) = plain.get(key, (0, 0.0)), replay.get(key, (0, 0.0))
        if abs(n1 - n0) > 0.01 or abs(t1 - t0) > 0.005 * max(total["plain"], 1.0):
            rows.append((t1 - t0, n1 - n0, n0, t0, n1, t1, key))
    print(f"{'diff us':>9} {'diff n':>7} {'plain n':>8} {'plain us':>9} {'replay n':>9} {'replay us':>10}  kernel")
    for dt, dn, n0, t0, n1, t1, key in sorted(rows, key=lambda r: -abs(r[0]))[:30]:
        print(f"{dt:+9.1f} {dn:+7.1f} {n0:8.1f} {t0:9.1f} {n1:9.1f} {t1:10.1f}  {key[:90]}")


if __name__ == "__main__":
    main()
