"""Throughput of routereplay.core.layout conversions against a plain memcpy, measured in one run.

    .venv/bin/python benchmarks/bench_layout.py                  # 1 M tokens x 48 layers x top-8 uint8
    .venv/bin/python benchmarks/bench_layout.py --tokens 100000  # a quick run
    .venv/bin/python benchmarks/bench_layout.py --thp            # PyTorch's THP_MEM_ALLOC_ENABLE=1

Every op reports GB/s with bytes moved = bytes of the trace read + bytes written (2 x the
trace's route bytes for all ops here; save counts reading the trace and writing the file, load
reading the file and building the trace), and its ratio to ``dst.copy_(src)`` of the same
bytes. Each op allocates its output, as real use does; "clone" (a copy into fresh memory) is
printed too, because on CPU the page faults of a fresh 400 MB buffer cost as much as the copy.
``--thp`` lets PyTorch back large CPU allocations with transparent huge pages, which removes
most of that cost.

Legend: T tokens, L MoE layers, K top-k slots, B sequences, S padded length.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000, help="total tokens T (default 1,000,000)")
    p.add_argument("--layers", type=int, default=48, help="MoE layers L")
    p.add_argument("--top-k", type=int, default=8, help="top-k K")
    p.add_argument("--experts", type=int, default=128, help="experts per layer (<= 256 keeps uint8)")
    p.add_argument("--mean-len", type=int, default=1000, help="mean sequence length")
    p.add_argument("--cp", type=int, default=4, help="context-parallel size for the zigzag shards")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per op (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thp", action="store_true", help="set THP_MEM_ALLOC_ENABLE=1 before importing torch")
    p.add_argument("--skip-validate", action="store_true", help="skip the single validating pack_padded")
    return p.parse_args(argv)


def median_seconds(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls, after one warm-up call.

    The result of each call is dropped before the next, so every call allocates afresh.
    """
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.thp:
        # Read by c10's CPU allocator: 2 MB-aligned allocations with madvise(MADV_HUGEPAGE).
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    import torch

    from routereplay import RoutingTrace
    from routereplay.core import layout as lo

    try:
        import routereplay.core.io as rio
    except ImportError as e:  # written by another part of the project; skip that row without it
        rio = None
        io_note = f"routereplay.core.io not importable ({e}); save/load skipped"
    else:
        io_note = ""

    print(f"torch {torch.__version__}, {platform.platform()}, python {platform.python_version()}")
    print(
        f"machine: {platform.machine()}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}"
    )
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")

    # --- data: random lengths (uniform 1 .. 2*mean-1), right-padded ----------------------------
    g = torch.Generator().manual_seed(args.seed)
    T, L, K, E = args.tokens, args.layers, args.top_k, args.experts
    lens = []
    while sum(lens) < T:
        lens.append(int(torch.randint(1, 2 * args.mean_len, (1,), generator=g)))
    lens[-1] -= sum(lens) - T
    lens_B = torch.tensor(lens, dtype=torch.int64)
    B, S = len(lens), int(lens_B.max())
    mask_BS = torch.arange(S)[None, :] < lens_B[:, None]
    # Distinct ids per row without a sort: a fixed permutation shifted by a per-row offset mod E.
    perm_LK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L)]).to(torch.int16)
    experts_BSLK = torch.empty(B, S, L, K, dtype=torch.uint8)
    rows_NLK = experts_BSLK.view(B * S, L, K)
    step = 1 << 18  # rows per block: bounds the int16 temporary to ~200 MB
    for lo_row in range(0, B * S, step):  # loop over blocks of rows, only to build the input
        off_N = torch.randint(0, E, (min(step, B * S - lo_row), 1, 1), generator=g, dtype=torch.int16)
        rows_NLK[lo_row : lo_row + step] = (perm_LK[None] + off_N) % E
    row_bytes = L * K
    trace_bytes = T * row_bytes
    print(
        f"trace: T={T:,} tokens, B={B} sequences (mean {T / B:.0f}, max S={S}), L={L}, K={K}, E={E}, "
        f"uint8: {trace_bytes / 1e6:.0f} MB packed, {B * S * row_bytes / 1e6:.0f} MB padded; reps={args.reps}"
    )

    results: list[tuple[str, float, int]] = []

    def run(name: str, fn, nbytes: int, reps: int = args.reps) -> None:
        results.append((name, median_seconds(fn, reps), nbytes))

    def baseline() -> None:
        src = torch.empty(T, row_bytes, dtype=torch.uint8).random_(0, E, generator=g)
        dst = torch.empty_like(src)
        dst.fill_(0)  # fault the pages in: the baseline copies into memory that is already mapped
        run("memcpy  dst.copy_(src)", lambda: dst.copy_(src), 2 * trace_bytes)
        run("clone   src.clone() (fresh memory)", lambda: src.clone(), 2 * trace_bytes)

    def padded_to_packed(experts_BSLK: torch.Tensor) -> RoutingTrace:
        layer_ids = tuple(range(L))

        def pack(validate: bool = False) -> RoutingTrace:
            return lo.pack_padded(experts_BSLK, mask_BS, layer_ids=layer_ids, num_experts=E, validate=validate)

        run("padded -> packed (pack_padded)", pack, 2 * trace_bytes)
        if not args.skip_validate:
            run("padded -> packed, validate=True (1 rep)", lambda: pack(True), 2 * trace_bytes, reps=1)
        return pack()

    def context_parallel(trace: RoutingTrace) -> None:
        cp = args.cp
        shards = lo.shard_cp(trace, cp)
        shard_bytes = sum(s.experts.nbytes for s in shards)
        run(f"packed -> zigzag shards (shard_cp, cp={cp})", lambda: lo.shard_cp(trace, cp), trace_bytes + shard_bytes)
        run(
            "shards -> packed (unshard_cp, separate shards)",
            lambda: lo.unshard_cp(shards, cu_seqlens=trace.cu_seqlens),
            shard_bytes + trace_bytes,
        )
        # What a CP group holds after all_gather_into_tensor: every shard in one buffer.
        buf = torch.cat([s.experts for s in shards])
        views = [s.replace(check=False, experts=x) for s, x in zip(shards, buf.split(shards[0].num_tokens))]
        run(
            "shards -> packed (unshard_cp, one gathered buffer)",
            lambda: lo.unshard_cp(views, cu_seqlens=trace.cu_seqlens),
            shard_bytes + trace_bytes,
        )
        assert lo.unshard_cp(shards, cu_seqlens=trace.cu_seqlens) == trace, "unshard_cp(shard_cp(t)) != t"

    def save_load(trace: RoutingTrace) -> None:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            path = Path(tmp) / "bench.rrt"
            run("save (routereplay.core.io.save, fsync)", lambda: rio.save(trace, path), 2 * trace_bytes)
            run(
                "load (routereplay.core.io.load, validate=False)",
                lambda: rio.load(path, validate=False),
                2 * trace_bytes,
            )
            assert rio.load(path, validate=False) == trace, "load(save(t)) != t"

    baseline()
    trace = padded_to_packed(experts_BSLK)
    del experts_BSLK  # the padded copy is the largest tensor of the run
    context_parallel(trace)
    run("engine -> training rows (engine_to_training)", lambda: lo.engine_to_training(trace), 2 * trace_bytes)
    if rio is not None:
        save_load(trace)

    # --- table ------------------------------------------------------------------------------
    memcpy_gbs, clone_gbs = (nbytes / sec / 1e9 for _, sec, nbytes in results[:2])
    print()
    print("| op | median ms | GB/s | vs memcpy | vs clone |")
    print("|---|---:|---:|---:|---:|")
    for name, sec, nbytes in results:
        gbs = nbytes / sec / 1e9
        print(f"| {name} | {sec * 1e3:.1f} | {gbs:.2f} | {gbs / memcpy_gbs:.0%} | {gbs / clone_gbs:.0%} |")
    if io_note:
        print(f"\nnote: {io_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
