"""The host repeat check (does a top-k row name an expert twice?) against other numpy formulations.

    .venv/bin/python benchmarks/bench_repeat_check.py            # 65,536 rows of top-8 uint8, 5 rounds
    .venv/bin/python benchmarks/bench_repeat_check.py --rows 1000000

Every row of issue 23 that validates ids pays this check (``core.trace.first_duplicate_row``); this
script times, on one thread and on cache-sized blocks, ns per row of:

* ``first_duplicate_row``, as the library runs it (workers=1);
* its three stages, as it runs them: the transpose into K slot planes, the K(K-1)/2 plane compares
  (in K/2 + (K/2 - 1) numpy calls), the OR over the pair masks;
* three other formulations, each checked against the pairwise answer first: each row as one uint64
  compared bytewise with its 4 byte rotations; pairs of slots as uint16 planes (half the transpose,
  byte-swapped copies for the cross pairs); quads as uint32 planes (a quarter of the transpose,
  rotations by shifts);
* with ``--inductor``, the 28 pair compares written as torch ops and compiled by ``torch.compile``
  (Inductor's C++ code for the CPU; needs a C++ compiler, and compiles for seconds first).

Legend: R rows, K top-k (8 here).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import numpy as np
import torch

from routereplay.core.trace import first_duplicate_row

K = 8


def rows_with_repeats(R: int, seed: int = 0) -> np.ndarray:
    """uint8 ``[R, 8]`` distinct ids per row, with a repeat in about 1 row in 1000 (at several slot pairs)."""
    rng = np.random.default_rng(seed)
    x = ((rng.integers(0, 256, size=(R, 1)) + np.arange(K) * 31) % 256).astype(np.uint8)
    for i, j in ((2, 5), (6, 7), (1, 0)):
        bad = rng.random(R) < 0.0003
        x[bad, i] = x[bad, j]
    return x


def pairwise(x: np.ndarray) -> np.ndarray:
    """bool ``[R]``: the reference answer, one compare per slot pair."""
    bad = np.zeros(x.shape[0], dtype=bool)
    for i in range(K):
        for j in range(i + 1, K):
            bad |= x[:, i] == x[:, j]
    return bad


class Planes:
    """The library's formulation, stage by stage, on preallocated buffers."""

    def __init__(self, x: np.ndarray):
        R = x.shape[0]
        self.x, self.cols = x, np.empty((K, R), np.uint8)
        self.eq, self.bad = np.empty((K * (K - 1) // 2, R), bool), np.empty(R, bool)

    def transpose(self) -> None:
        np.copyto(self.cols, self.x.T)

    def compares(self) -> None:
        cols, eq, p = self.cols, self.eq, 0
        for s in range(1, K // 2 + 1):
            np.equal(cols[: K - s], cols[s:], out=eq[p : p + K - s])
            p += K - s
            if 2 * s < K:
                np.equal(cols[K - s :], cols[:s], out=eq[p : p + s])
                p += s

    def reduce(self) -> None:
        np.logical_or.reduce(self.eq, axis=0, out=self.bad)

    def __call__(self) -> np.ndarray:
        self.transpose()
        self.compares()
        self.reduce()
        return self.bad


def rotations_u64(x: np.ndarray) -> Callable[[], np.ndarray]:
    """Each row one uint64; equal bytes against its rotations by 1-4 bytes."""
    R = x.shape[0]
    x64, xb = x.view(np.uint64).reshape(R), x.reshape(-1)
    a, b = np.empty(R, np.uint64), np.empty(R, np.uint64)
    eq, acc = np.empty((4, R * K), bool), np.empty(R * K, bool)

    def run() -> np.ndarray:
        for k, s in enumerate(range(1, 5)):
            np.right_shift(x64, np.uint64(8 * s), out=a)
            np.left_shift(x64, np.uint64(64 - 8 * s), out=b)
            np.bitwise_or(a, b, out=a)
            np.equal(xb, a.view(np.uint8), out=eq[k])
        np.logical_or.reduce(eq, axis=0, out=acc)
        return acc.view(np.uint64) != 0

    return run


def pair_planes_u16(x: np.ndarray) -> Callable[[], np.ndarray]:
    """Slots (2a, 2a+1) as uint16 planes; cross pairs against byte-swapped copies."""
    R = x.shape[0]
    x16 = x.view(np.uint16).reshape(R, K // 2)
    P, S = np.empty((K // 2, R), np.uint16), np.empty((K // 2, R), np.uint16)
    eq, acc = np.empty((16, 2 * R), bool), np.empty(2 * R, bool)

    def run() -> np.ndarray:
        np.copyto(P, x16.T)
        np.copyto(S, P)
        S.byteswap(inplace=True)
        Pb, Sb = P.view(np.uint8).reshape(K // 2, 2 * R), S.view(np.uint8).reshape(K // 2, 2 * R)
        k = 0
        for a in range(K // 2 - 1):
            n = K // 2 - 1 - a
            np.equal(Pb[a], Pb[a + 1 :], out=eq[k : k + n])
            np.equal(Pb[a], Sb[a + 1 :], out=eq[k + n : k + 2 * n])
            k += 2 * n
        np.equal(Pb, Sb, out=eq[k : k + K // 2])
        np.logical_or.reduce(eq, axis=0, out=acc)
        return acc.view(np.uint16) != 0

    return run


def quad_planes_u32(x: np.ndarray) -> Callable[[], np.ndarray]:
    """Slots 0-3 and 4-7 as two uint32 planes; pairs against byte rotations made by shifts."""
    R = x.shape[0]
    x32 = x.view(np.uint32).reshape(R, 2)
    Q, rot, tmp = np.empty((2, R), np.uint32), np.empty((5, R), np.uint32), np.empty(R, np.uint32)
    eq, acc = np.empty((8, 4 * R), bool), np.empty(4 * R, bool)

    def rotate(src: np.ndarray, k: int, out: np.ndarray) -> None:
        np.right_shift(src, np.uint32(8 * k), out=out)
        np.left_shift(src, np.uint32(32 - 8 * k), out=tmp)
        np.bitwise_or(out, tmp, out=out)

    def run() -> np.ndarray:
        np.copyto(Q, x32.T)
        q0, q1 = Q
        for i, (src, k) in enumerate(((q1, 1), (q1, 2), (q1, 3), (q0, 1), (q0, 2))):
            rotate(src, k, rot[i])
        b0, b1 = q0.view(np.uint8), q1.view(np.uint8)
        pairs = [(b0, b1)] + [(b0, rot[i].view(np.uint8)) for i in range(3)]  # the 16 cross pairs
        pairs += [(b1, rot[0].view(np.uint8)), (b1, rot[1].view(np.uint8))]  # the 6 pairs within q1
        pairs += [(b0, rot[3].view(np.uint8)), (b0, rot[4].view(np.uint8))]  # the 6 pairs within q0
        for i, (u, v) in enumerate(pairs):
            np.equal(u, v, out=eq[i])
        np.logical_or.reduce(eq, axis=0, out=acc)
        return acc.view(np.uint32) != 0

    return run


def inductor_pairs(x: np.ndarray) -> Callable[[], np.ndarray]:
    """The pairwise formula as torch ops, one fused loop compiled by Inductor."""

    def pairs(ids: torch.Tensor) -> torch.Tensor:
        bad = ids[:, 0] == ids[:, 1]
        for i in range(K):
            for j in range(i + 1, K):
                if (i, j) != (0, 1):
                    bad = bad | (ids[:, i] == ids[:, j])
        return bad

    compiled, ids = torch.compile(pairs, dynamic=False), torch.from_numpy(x)
    return lambda: compiled(ids).numpy()


def ns_per_row(fn: Callable[[], object], R: int, rounds: int, calls: int) -> tuple[float, float, float]:
    """(median, min, max) over ``rounds`` of ns per row of ``calls`` back-to-back calls."""
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls / R * 1e9)
    return statistics.median(out), min(out), max(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1 << 16, help="rows per call (a cache-sized block)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=50, help="calls per round")
    p.add_argument("--inductor", action="store_true", help="also the pairwise formula compiled by torch.compile")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    R = args.rows
    x = rows_with_repeats(R)
    ref = pairwise(x)
    planes = Planes(x)
    ids = torch.from_numpy(x)
    others = {
        "rows as uint64, 4 byte rotations": rotations_u64(x),
        "slot pairs as uint16 planes": pair_planes_u16(x),
        "slot quads as uint32 planes": quad_planes_u32(x),
    }
    if args.inductor:
        others["the 28 pair compares compiled by torch.compile (Inductor, C++)"] = inductor_pairs(x)
    assert np.array_equal(planes(), ref)
    assert first_duplicate_row(ids, workers=1) == int(ref.argmax())
    for name, fn in others.items():
        assert np.array_equal(fn(), ref), name
    try:
        git = ["git", "rev-parse", "--short", "HEAD"]
        commit = subprocess.run(git, check=False, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    print(f"numpy {np.__version__}, torch {torch.__version__}, {platform.platform()}, "
          f"python {platform.python_version()}")  # fmt: skip
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, commit {commit}")
    print(f"{R:,} rows of top-{K} uint8 ids ({ref.sum()} with a repeat), one thread, {args.rounds} rounds of "
          f"{args.calls} calls: ns per row, median (min-max)\n")  # fmt: skip
    print("| formulation | ns per row | ratio to first_duplicate_row |")
    print("|---|---:|---:|")
    base = ns_per_row(lambda: first_duplicate_row(ids, workers=1), R, args.rounds, args.calls)
    rows = [("first_duplicate_row (the library)", base)]
    stages = (("  its transpose into slot planes", planes.transpose), ("  its 28 plane compares", planes.compares),
              ("  its OR over the pair masks", planes.reduce))  # fmt: skip
    for name, fn in stages:
        rows.append((name, ns_per_row(fn, R, args.rounds, args.calls)))
    for name, fn in others.items():
        rows.append((name, ns_per_row(fn, R, args.rounds, args.calls)))
    for name, (med, lo, hi) in rows:
        print(f"| {name} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {med / base[0]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
