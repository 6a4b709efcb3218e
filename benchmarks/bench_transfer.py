"""What it costs to hand a RoutingTrace to another process: pickle vs ``.rrt`` bytes, in MB/s.

    .venv/bin/python benchmarks/bench_transfer.py             # a 64 MB trace (48 layers x top-8, uint8)
    .venv/bin/python benchmarks/bench_transfer.py --mb 8      # a quick run

Each way is timed as the sender's half (to bytes), the receiver's half (from bytes) and both,
on the same trace; MB/s is the trace's bytes (``trace.nbytes``) over the time. A plain
``clone()`` of the same bytes is the baseline measured in the same run. The ways:

* ``pickle``: ``pickle.dumps`` / ``pickle.loads`` (protocol 5), what ``multiprocessing``
  queues and Ray's object store do with a Python object. No checksum, no validation on load.
* ``torch.multiprocessing``: ``ForkingPickler`` with torch's reductions, as a
  ``torch.multiprocessing`` queue does: the tensors move to shared memory and only a handle is
  pickled (same host only). The receiver's half maps the shared memory.
* ``.rrt bytes``: ``routereplay.core.io.dumps`` / ``io.loads``: the file format in memory, with its
  CRC-32 over every byte, version check and (``validate=True``) the trace's O(T) checks.

Legend: T tokens, L MoE layers, K top-k slots.
"""

from __future__ import annotations

import argparse
import datetime
import io as stdio
import os
import pickle
import platform
import statistics
import subprocess
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=64, help="size of the trace's ids in MiB (default 64)")
    # MB/s in the output counts 10**6 bytes.
    p.add_argument("--layers", type=int, default=48, help="MoE layers L")
    p.add_argument("--top-k", type=int, default=8, help="top-k K")
    p.add_argument("--experts", type=int, default=128, help="experts per layer (<= 256 keeps uint8)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per op (median reported)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def time_ways(prepare, send, recv, reps: int) -> tuple[float, float]:
    """Median seconds of ``send(prepare())`` and of ``recv(bytes)`` over ``reps`` rounds, after a warm-up.

    ``prepare`` (untimed) gives each round its own object, ``recv`` gets that round's bytes.
    """
    sends, recvs = [], []
    for rep in range(reps + 1):
        obj = prepare()
        t0 = time.perf_counter()
        data = send(obj)
        t1 = time.perf_counter()
        out = recv(data)
        t2 = time.perf_counter()
        del out, data, obj
        if rep:  # the first round warms up
            sends.append(t1 - t0)
            recvs.append(t2 - t1)
    return statistics.median(sends), statistics.median(recvs)


def make_trace(args: argparse.Namespace):
    import torch

    from routereplay import RoutingTrace

    L, K, E = args.layers, args.top_k, args.experts
    T = int(args.mb * 2**20) // (L * K)
    g = torch.Generator().manual_seed(args.seed)
    # Distinct ids per row: a random base plus K distinct offsets, modulo E.
    offsets_K = torch.randperm(E, generator=g)[:K]
    experts_TLK = ((torch.randint(0, E, (T, L, 1), generator=g) + offsets_K) % E).to(torch.uint8)
    cu = list(range(0, T, args.seq_len)) + [T]
    valid_T = torch.ones(T, dtype=torch.bool)
    valid_T[torch.tensor(cu[1:]) - 1] = False  # each sequence's last token has no route (engine capture)
    return RoutingTrace(
        experts=experts_TLK,
        cu_seqlens=torch.tensor(cu),
        layer_ids=tuple(range(1, 2 * L, 2)),
        num_experts=E,
        valid=valid_T,
        meta={"source": "bench_transfer"},
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from multiprocessing.reduction import ForkingPickler

    import torch
    import torch.multiprocessing  # registers torch's shared-memory reductions with ForkingPickler

    from routereplay.core import io as rio

    torch.set_num_threads(1)
    trace = make_trace(args)
    mb = trace.nbytes / 1e6
    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(
        ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"torch {torch.__version__}, {platform.platform()}, python {platform.python_version()}")
    print(f"machine: {platform.machine()}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, commit {commit}")
    print(f"load average: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load average: n/a")
    print(
        f"trace: {trace.num_tokens:,} tokens x {trace.num_layers} layers x top-{trace.top_k} {trace.experts.dtype}, "
        f"{trace.num_seqs} sequences, valid mask; {trace.nbytes:,} bytes ({mb:.1f} MB); median of {args.reps}\n"
    )

    def fork_dumps(t) -> bytes:
        buf = stdio.BytesIO()
        ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(t)
        return buf.getvalue()

    def own_copy():
        # A trace whose tensors are not shared yet: share_memory_() moves a storage once, after
        # which pickling it is only a handle, so each round starts from unshared tensors.
        return trace.replace(
            check=False,
            experts=trace.experts.clone(), cu_seqlens=trace.cu_seqlens.clone(), valid=trace.valid.clone()
        )

    def same():
        return trace

    protocol = pickle.HIGHEST_PROTOCOL
    ways = [
        ("clone() of the tensors (baseline)", same, lambda t: own_copy(), lambda t: None),
        ("pickle (protocol 5)", same, lambda t: pickle.dumps(t, protocol=protocol), pickle.loads),
        ("torch.multiprocessing (shared memory)", own_copy, fork_dumps, pickle.loads),
        (".rrt bytes (io.dumps / io.loads)", same, rio.dumps, rio.loads),
        (".rrt bytes, loads(validate=False)", same, rio.dumps, lambda b: rio.loads(b, validate=False)),
    ]
    assert pickle.loads(pickle.dumps(trace, protocol=protocol)) == trace and rio.loads(rio.dumps(trace)) == trace
    assert pickle.loads(fork_dumps(own_copy())) == trace
    sizes = {
        "pickle": len(pickle.dumps(trace, protocol=protocol)),
        ".rrt": len(rio.dumps(trace)),
        "shared-memory handle": len(fork_dumps(own_copy())),
    }
    rows = []
    for name, prepare, send, recv in ways:
        send_s, recv_s = time_ways(prepare, send, recv, args.reps)
        rows.append((name, send_s, recv_s, send_s + recv_s))

    def cell(seconds: float) -> str:
        if seconds < 1e-5:  # the baseline's receiver does nothing
            return "-"
        return f"{seconds * 1e3:8.1f} ms {mb / seconds:8.0f} MB/s"

    print(f"{'way':<40}{'to bytes':>26}{'from bytes':>26}{'both':>26}")
    for name, send_s, recv_s, both_s in rows:
        print(f"{name:<40}{cell(send_s):>26}{cell(recv_s):>26}{cell(both_s):>26}")
    print("\nbytes to send: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
