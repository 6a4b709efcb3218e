"""Routes at the scale of a real RL step (issue 23): every row beside its baseline, in one run.

    .venv/bin/python benchmarks/bench_scale.py               # DeepSeek-V3 size: 256 x 8192 tokens, ~1 GB
    .venv/bin/python benchmarks/bench_scale.py --scale 16    # 1/16 of the tokens (CI smoke)
    .venv/bin/python benchmarks/bench_scale.py --rows load,save --runs 3

DeepSeek-V3-sized routes: 58 MoE layers, 256 experts, top-8, B=256 sequences of 8192 tokens
(2,097,152 tokens, 0.973 GB as uint8); ``--scale s`` divides the sequence length by s. Each row
times an operation of routereplay and a baseline doing the least work that gives the same result
(a concatenation, a read, ``dd``), both in this process, alternating, ``--runs`` times; it prints
median (min-max) seconds of each, the ratio of the medians, and the peak resident memory each
adds above what it started from, as a multiple of the route bytes it produces (``VmHWM`` after a
reset through ``/proc/self/clear_refs``, Linux only).

Legend: T tokens, L MoE layers, K top-k, E experts, B sequences, S tokens per sequence.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch

import routereplay.core.io as rio
from routereplay import RoutingTrace
from routereplay.core import layout
from routereplay.formats import RouteAccumulator, from_sglang, from_verl, from_vllm
from routereplay.rl.store import RouteStore

# "vllm": from_vllm alone (its row of "convert", without the minutes of the verl and SGLang rows).
ROWS = ("store", "accumulate", "load", "save", "crc", "convert", "vllm", "select", "prepare", "rank", "bitpack")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=1, help="divide the sequence length by this (16: CI smoke)")
    p.add_argument("--seqs", type=int, default=256, help="sequences B")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per sequence before --scale")
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--runs", type=int, default=3, help="timed runs of each op and baseline (median, min-max)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: on a shared 2-core VM, OpenMP threads waiting for a busy "
        "core make every op's time swing by 10x; numpy and the baselines are single-threaded too)",
    )
    p.add_argument("--sweep", action="store_true", help="23.7: cost per id as tokens, layers, experts grow")
    p.add_argument("--tmp", default=os.environ.get("TMPDIR"), help="directory for the .rrt files")
    return p.parse_args(argv)


# --- measurement -----------------------------------------------------------------------------
def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@contextmanager
def peak_above_start(out: list[int]):
    """Appends the peak resident bytes reached inside, above the resident bytes at entry."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = _rss_kb("VmRSS")
    except OSError:
        start = None
    yield
    out.append(0 if start is None else max(0, _rss_kb("VmHWM") - start) * 1024)


def measure(fn: Callable[[], object], runs: int) -> tuple[list[float], list[int]]:
    """Seconds and peak bytes of ``runs`` calls; each call's result is dropped before the next."""
    times, peaks = [], []
    for _ in range(runs):
        with peak_above_start(peaks):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            del out
    return times, peaks


def fmt(ts: list[float]) -> str:
    return f"{statistics.median(ts):.3f} ({min(ts):.3f}-{max(ts):.3f})"


class Table:
    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.rows: list[str] = []

    def row(self, name: str, op: Callable, baseline_name: str, baseline: Callable, nbytes: int, target: str) -> None:
        """Alternate op and baseline ``runs`` times (so load drifts hit both alike)."""
        t_op, p_op, t_base, p_base = [], [], [], []
        for _ in range(self.runs):
            t, p = measure(baseline, 1)
            t_base += t
            p_base += p
            t, p = measure(op, 1)
            t_op += t
            p_op += p
        ratio = statistics.median(t_op) / statistics.median(t_base)
        # the ratio of the minima too: on a shared VM another job's load inflates single calls of
        # either side, and the fastest call of each is the one closest to the work itself
        ratio_min = min(t_op) / min(t_base)
        line = (
            f"| {name} | {fmt(t_op)} | {baseline_name} | {fmt(t_base)} | {ratio:.2f}x ({ratio_min:.2f}x) | "
            f"{max(p_op) / nbytes:.2f}x | {max(p_base) / nbytes:.2f}x | {target} |"
        )
        print(line, flush=True)
        self.rows.append(line)


# --- data --------------------------------------------------------------------------------
def routes(B: int, S: int, L: int, K: int, E: int, seed: int = 0) -> torch.Tensor:
    """uint8/int16 ``[B*S, L, K]`` distinct ids per row, without a sort: a fixed permutation of
    each layer shifted by a per-row offset mod E."""
    g = torch.Generator().manual_seed(seed)
    perm_LK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L)]).to(torch.int32)
    dtype = torch.uint8 if E <= 256 else torch.int16
    out = torch.empty(B * S, L, K, dtype=dtype)
    step = 1 << 16
    for lo in range(0, B * S, step):
        off = torch.randint(0, E, (min(step, B * S - lo), 1, 1), generator=g, dtype=torch.int32)
        out[lo : lo + step] = (perm_LK[None] + off) % E
    return out


class _Recording:
    num_forwards = 1

    def __init__(self, trace: RoutingTrace) -> None:
        self._trace = trace

    def trace(self, attention_mask=None) -> RoutingTrace:
        return self._trace

    def sequence_boundaries(self):
        return None


class _Handle:
    """What RouteStore.record uses of a handle, giving prepared traces: the store's own work only."""

    next: RoutingTrace | None = None

    @contextmanager
    def record(self):
        yield _Recording(self.next)


# --- rows ----------------------------------------------------------------------------------
def _fill(pieces: list[RoutingTrace], per: int) -> RouteStore:
    handle = _Handle()
    store = RouteStore(handle)
    for i, piece in enumerate(pieces):
        handle.next = piece
        with store.record(range(i * per, (i + 1) * per), cu_seqlens=piece.cu_seqlens):
            pass
    return store


def _fill_and_read(pieces: list[RoutingTrace], per: int) -> list[RoutingTrace]:
    store = _fill(pieces, per)
    return [store.trace(range(i * per, (i + 1) * per)) for i in range(len(pieces))]


def row_store(table: Table, trace: RoutingTrace) -> None:
    """23.1: R2 recording by micro-batches (RouteStore.record), then every micro-batch read once."""
    B = trace.num_seqs
    for n_mb in (64, 256):
        if B % n_mb:
            continue
        per = B // n_mb
        pieces = [trace.select_sequences(range(i * per, (i + 1) * per)) for i in range(n_mb)]
        concat = partial(RoutingTrace.concat, pieces)
        table.row(
            f"RouteStore: record {n_mb} micro-batches", partial(_fill, pieces, per), "one concat", concat,
            trace.nbytes, "<= 1.3x",
        )
        table.row(
            f"RouteStore: record {n_mb} micro-batches + read each", partial(_fill_and_read, pieces, per),
            "one concat", concat, trace.nbytes, "<= 1.3x, 1x peak",
        )


def _accumulate(payloads: list[np.ndarray], per: int, num_experts: int) -> RoutingTrace:
    acc = RouteAccumulator(num_experts=num_experts)
    for t, p in enumerate(payloads):
        acc.add(p, start=t * per, num_tokens=(t + 1) * per + 1)
    return acc.trace()


def row_accumulate(table: Table, trace: RoutingTrace) -> None:
    """23.1: one conversation grown turn by turn (RouteAccumulator.add), at 8 and 512 turns, against
    the same rows added as one payload (the converter's work done once)."""
    rows = trace.experts[: min(trace.num_tokens, 1 << 16)].numpy()
    R = rows.shape[0]
    once = partial(_accumulate, [rows], R, trace.num_experts)
    for turns in (8, 512):
        per = R // turns
        payloads = [rows[t * per : (t + 1) * per] for t in range(turns)]
        table.row(
            f"RouteAccumulator: {turns} turns of {per} rows", partial(_accumulate, payloads, per, trace.num_experts),
            "the rows as 1 payload", once, R * rows[0].nbytes, "linear: same ratio at 8 and 512 turns",
        )


def row_load(table: Table, trace: RoutingTrace, tmp: str) -> None:
    """23.3: validated load against validate=False and a plain read of the file: the file of a
    validated trace (format 1.2, rows_checked: the repeat check is skipped), then the file of the same
    routes not known checked (format 1.1, built unchecked: the load checks the rows)."""
    path = Path(tmp) / "bench.rrt"
    for kind, t in (("1.2 file", trace), ("1.1 file, rows checked on load", _not_known_checked(trace))):
        rio.save(t, path, fsync=False)
        size = path.stat().st_size

        def read(size: int = size) -> np.ndarray:
            buf = np.empty(size, dtype=np.uint8)
            with open(path, "rb", buffering=0) as f:
                f.readinto(memoryview(buf))
            return buf

        table.row(f"io.load(validate=False), {kind}", lambda: rio.load(path, validate=False), "read the file", read,
                  size, "")  # fmt: skip
        table.row(f"io.load (validate=True), {kind}", lambda: rio.load(path), "read the file", read, size, "")
        table.row(
            f"io.load (validate=True), {kind}", lambda: rio.load(path), "io.load(validate=False)",
            lambda: rio.load(path, validate=False), size, "<= 1.5x, peak <= 1.1x",
        )
        path.unlink()


def _not_known_checked(trace: RoutingTrace) -> RoutingTrace:
    """The same routes built with RoutingTrace.unchecked: not known to pass the repeat check."""
    fields = ("experts", "cu_seqlens", "layer_ids", "num_experts", "valid", "gates", "meta")
    return RoutingTrace.unchecked(**{name: getattr(trace, name) for name in fields})


def row_crc(table: Table, trace: RoutingTrace, tmp: str) -> None:
    """23.3/23.5: save (no fsync: no disk wait) and load with the checksum on a helper thread beside the
    I/O, against the same calls checksumming each block on the calling thread (io._CRC_THREAD_BYTES
    switches between them; the helper needs 2+ torch threads)."""
    path = Path(tmp) / "crc.rrt"

    def serial(fn):
        def run():
            keep, rio._CRC_THREAD_BYTES = rio._CRC_THREAD_BYTES, 1 << 62
            try:
                return fn()
            finally:
                rio._CRC_THREAD_BYTES = keep

        return run

    def save() -> None:  # the file goes at once: no earlier save's dirty pages in write-back meanwhile
        rio.save(trace, path, fsync=False)
        path.unlink()

    table.row("io.save(fsync=False), CRC on a helper thread", save, "CRC on the writing thread", serial(save),
              trace.nbytes, "")  # fmt: skip
    rio.save(trace, path, fsync=False)
    for validate in (False, True):
        load = lambda v=validate: rio.load(path, validate=v)
        table.row(f"io.load(validate={validate}) of a 1.2 file, CRC on a helper thread", load,
                  "CRC on the reading thread", serial(load), trace.nbytes, "")  # fmt: skip
    path.unlink()


def row_save(table: Table, trace: RoutingTrace, tmp: str) -> None:
    """23.5: save (CRC computed while writing, fsync) against dd conv=fsync of a file of the same size."""
    src, dst = Path(tmp) / "src.rrt", Path(tmp) / "out.rrt"
    rio.save(trace, src, fsync=False)
    size = src.stat().st_size

    def dd() -> None:
        subprocess.run(
            ["dd", f"if={src}", f"of={dst}.dd", "bs=4M", "conv=fsync", "status=none"], check=True
        )

    table.row("io.save (fsync)", lambda: rio.save(trace, dst), "dd bs=4M conv=fsync", dd, size, "<= 1.1x")
    for p in (src, dst, Path(f"{dst}.dd")):
        p.unlink(missing_ok=True)


def row_convert(table: Table, trace: RoutingTrace, vllm_only: bool = False) -> None:
    """23.2: the engine converters against the copy that any converter must make."""
    import base64

    B, E = trace.num_seqs, trace.num_experts
    cu = trace.cu_seqlens.tolist()
    payloads = [trace.experts[cu[b] : cu[b + 1] - 1].numpy() for b in range(B)]  # engine rows: T-1 per request
    nbytes = sum(p.nbytes for p in payloads)
    table.row(
        "from_vllm (uint8 arrays)", lambda: from_vllm(payloads, num_experts=E), "np.concatenate",
        lambda: np.concatenate(payloads), nbytes, "<= 2x, peak <= 2x",
    )
    if vllm_only:
        return
    # verl: int16 [B, S, L, K] right-padded after a random length in [S/2, S], attention mask [B, S].
    S = cu[1] - cu[0]
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(S // 2, S + 1, (B,), generator=g)
    mask_BS = torch.arange(S)[None, :] < lens[:, None]
    padded = trace.experts.view(B, S, *trace.experts.shape[1:]).to(torch.int16)
    padded[~mask_BS] = 0
    padded_np, mask_np = padded.numpy(), mask_BS.numpy()
    table.row(
        "from_verl (int16 padded + mask)", lambda: from_verl(padded, mask_BS, num_experts=E, last_token_routed=True),
        "numpy mask gather", lambda: padded_np[mask_np], int(lens.sum()) * trace.experts[0].numel(),
        "<= 2x, peak <= 2x",
    )
    # SGLang: base64 of little-endian int32 per request; the baseline decodes every payload.
    n = max(1, B // 4)  # the issue measures 512k tokens at full size: a quarter of the batch
    wire = [base64.b64encode(p.astype(np.int32).tobytes()).decode("ascii") for p in payloads[:n]]
    L, K = trace.num_layers, trace.top_k
    decode = lambda: [np.frombuffer(base64.b64decode(w), dtype=np.int32) for w in wire]
    table.row(
        f"from_sglang ({n} base64 int32 payloads)", lambda: from_sglang(wire, num_layers=L, top_k=K, num_experts=E),
        "base64 decode", decode, sum(p.nbytes for p in payloads[:n]), "<= 2x, peak <= 2x",
    )


def row_select(table: Table, trace: RoutingTrace) -> None:
    """23.4: replay preparation's layout steps against one index_select of the same rows."""
    B = trace.num_seqs
    idx = torch.randperm(B, generator=torch.Generator().manual_seed(2))[: B // 4]
    cu = trace.cu_seqlens
    rows = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in idx.tolist()])
    flat = trace.experts.view(trace.num_tokens, -1)
    nbytes = rows.numel() * flat.shape[1]
    table.row(
        "select_sequences (B/4 sequences)", lambda: trace.select_sequences(idx), "index_select of its rows",
        lambda: flat.index_select(0, rows), nbytes, "<= 1.5x",
    )
    S = int(trace.seq_lens.max())
    lens = trace.seq_lens
    mask_BS = torch.arange(S)[None, :] < lens[:, None]
    padded = torch.zeros(B, S, *trace.experts.shape[1:], dtype=trace.experts.dtype)
    padded[mask_BS] = trace.experts
    padded_flat = padded.view(B * S, -1)
    keep = mask_BS.reshape(-1).nonzero().squeeze(1)
    table.row(
        "layout.pack_padded (validate=True)",
        lambda: layout.pack_padded(padded, mask_BS, layer_ids=trace.layer_ids, num_experts=trace.num_experts),
        "index_select of the real rows", lambda: padded_flat.index_select(0, keep), trace.nbytes, "<= 1.5x",
    )


def row_prepare(table: Table, trace: RoutingTrace) -> None:
    """23.4: replay preparation on a CPU model (a Qwen3-MoE shell with the trace's layers, experts and
    top-k) for a padded micro-batch, against the layout step alone (one index_select of the rows)."""
    try:
        import transformers
    except ImportError:
        print("| handle.prepare | skipped: needs transformers |")
        return
    import routereplay

    L, K, E = trace.num_layers, trace.top_k, trace.num_experts
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=16, moe_intermediate_size=4, num_hidden_layers=L,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=E, num_experts_per_tok=K,
    )
    handle = routereplay.attach(transformers.Qwen3MoeForCausalLM(cfg))
    B = max(1, trace.num_seqs // 8)
    sub = trace.select_sequences(range(B))
    S = int(sub.seq_lens.max())
    mask_BS = torch.arange(S)[None, :] < sub.seq_lens[:, None]
    src_N, _, _ = layout.router_row_sources(sub.cu_seqlens, mask_BS, sub.num_tokens)
    for kind, t in (("rows checked", sub), ("rows not known checked", _not_known_checked(sub))):
        table.row(
            f"handle.prepare ({B} padded sequences, CPU model), {kind}",
            lambda: handle.prepare(t, attention_mask=mask_BS),  # noqa: B023 (timed inside the loop)
            "index_select of the router rows", lambda: sub.experts.index_select(0, src_N), sub.nbytes, "<= 1.5x",
        )
    handle.detach()


@contextmanager
def bytes_read(out: list[int]):
    """Appends the bytes read through os.read / pread / preadv / readinto inside (file reads)."""
    counted = [0]
    originals = {name: getattr(os, name) for name in ("pread", "preadv")}

    def pread(fd, n, offset):
        data = originals["pread"](fd, n, offset)
        counted[0] += len(data)
        return data

    def preadv(fd, buffers, offset):
        got = originals["preadv"](fd, buffers, offset)
        counted[0] += got
        return got

    os.pread, os.preadv = pread, preadv
    try:
        yield
    finally:
        os.pread, os.preadv = originals["pread"], originals["preadv"]
        out.append(counted[0])


def row_rank(table: Table, trace: RoutingTrace, tmp: str) -> None:
    """23.6: one DP rank's share of a chunked file (parallel.load_for_rank) against loading the file."""
    from routereplay.parallel.slicing import ParallelLayout, RankCoords, load_for_rank

    path = Path(tmp) / "rank.rrt"
    rio.save(trace, path, fsync=False)
    size = path.stat().st_size
    print(f"<!-- {path.name}: {size:,} bytes, version {rio.read_header(path).version}, "
          f"{rio.read_header(path).metadata.get('chunk_rows', '-')} rows per chunk -->")
    for dp in (8, 64):
        if trace.num_seqs % dp:
            continue
        layout = ParallelLayout(micro_batch_size=trace.num_seqs // dp, dp=dp)
        got: list[int] = []
        with bytes_read(got):
            load_for_rank(path, layout, RankCoords(dp=dp - 1), layer_ids=trace.layer_ids)
        print(f"<!-- DP {dp}, rank {dp - 1}: read {got[0]:,} bytes of {size:,} ({got[0] / size:.4f}) -->")
        table.row(
            f"load_for_rank, DP {dp} (rank {dp - 1}; reads {got[0] / size:.3f} of the file)",
            partial(load_for_rank, path, layout, RankCoords(dp=dp - 1), layer_ids=trace.layer_ids),
            "io.load of the file", partial(rio.load, path), size // dp, f"~1/{dp} of a whole load",
        )
    path.unlink()


_PACK_BLOCK = 1 << 20  # ids per block: bounds the uint64 temporaries to ~8 MB


def _pack_bits(ids: np.ndarray, bits: int = 9) -> np.ndarray:
    """9-bit ids packed 8 to 9 bytes (a bit-packing prototype: shifts on uint64 words, block by
    block). ``ids.size`` must be a multiple of 8."""
    assert bits == 9 and ids.size % 8 == 0
    out = np.empty((ids.size // 8, 9), dtype=np.uint8)
    for lo in range(0, ids.size, _PACK_BLOCK):
        u = ids[lo : lo + _PACK_BLOCK].reshape(-1, 8).astype(np.uint64)
        dst = out[lo // 8 : lo // 8 + u.shape[0]]
        low = u[:, 0].copy()
        for i in range(1, 7):
            low |= u[:, i] << np.uint64(9 * i)
        low |= (u[:, 7] & np.uint64(1)) << np.uint64(63)
        dst[:, :8] = low.view(np.uint8).reshape(-1, 8)
        dst[:, 8] = (u[:, 7] >> np.uint64(1)).astype(np.uint8)
    return out.reshape(-1)


def _unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    assert bits == 9
    p = packed.reshape(-1, 9)
    out = np.empty((p.shape[0], 8), dtype=np.int16)
    mask = np.uint64(0x1FF)
    for lo in range(0, p.shape[0], _PACK_BLOCK // 8):
        blk = p[lo : lo + _PACK_BLOCK // 8]
        low = np.ascontiguousarray(blk[:, :8]).view(np.uint64).reshape(-1)
        dst = out[lo : lo + blk.shape[0]]
        for i in range(7):
            dst[:, i] = (low >> np.uint64(9 * i)) & mask
        dst[:, 7] = (low >> np.uint64(63)).astype(np.int16) | (blk[:, 8].astype(np.int16) << 1)
    return out.reshape(-1)[:n]


def row_bitpack(table: Table, trace: RoutingTrace, tmp: str) -> None:
    """23.7: would bit-packing pay above 256 experts? 384 experts: 9-bit ids instead of int16 (44 %
    fewer bytes). Times a numpy pack / unpack of the ids against save / load of the int16 file."""
    E = 384
    ids = (trace.experts.to(torch.int16) + torch.randint(0, 2, trace.experts.shape, dtype=torch.int16) * 128)
    wide = RoutingTrace.unchecked(experts=ids, cu_seqlens=trace.cu_seqlens, layer_ids=trace.layer_ids, num_experts=E)
    path = Path(tmp) / "wide.rrt"
    flat = ids.numpy().reshape(-1)
    packed = _pack_bits(flat, 9)
    assert np.array_equal(_unpack_bits(packed, 9, flat.size), flat)
    print(f"<!-- 384 experts: int16 ids {flat.nbytes:,} bytes, 9-bit packed {packed.nbytes:,} bytes "
          f"({1 - packed.nbytes / flat.nbytes:.0%} fewer) -->")
    table.row(
        "9-bit pack of 384-expert ids (numpy)", partial(_pack_bits, flat, 9), "io.save (int16, fsync)",
        partial(rio.save, wide, path), flat.nbytes, "worth it if << save",
    )
    table.row(
        "9-bit unpack (numpy)", partial(_unpack_bits, packed, 9, flat.size), "io.load (int16, validate=False)",
        partial(rio.load, path, validate=False), flat.nbytes, "worth it if << load",
    )
    path.unlink()


def sweep(args: argparse.Namespace) -> None:
    """23.7: ns per id of save, validated load, from_vllm and RouteStore record+read as tokens,
    layers and experts grow (one configuration changed at a time from a 1/16-size base)."""
    base = {"seq_len": 512, "L": 58, "E": 256}
    configs = [("tokens", {"seq_len": n}) for n in (512, 2048, 8192)]
    configs += [("layers", {"L": n}) for n in (12, 48, 96)]
    configs += [("experts", {"E": n}) for n in (64, 256, 384, 1024)]
    print("| varied | tokens | L | E | id bytes | save ns/id | load ns/id | from_vllm ns/id | store ns/id |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for what, change in configs:
            cfg = {**base, **change}
            B, K = 64, args.top_k
            experts = routes(B, cfg["seq_len"], cfg["L"], K, cfg["E"])
            tr = RoutingTrace(experts=experts, cu_seqlens=torch.arange(B + 1) * cfg["seq_len"],
                              layer_ids=range(cfg["L"]), num_experts=cfg["E"])
            n = experts.numel()
            path = Path(tmp) / "s.rrt"
            cu = tr.cu_seqlens.tolist()
            payloads = [experts[cu[b] : cu[b + 1] - 1].numpy() for b in range(B)]
            pieces = [tr.select_sequences(range(i, i + 4)) for i in range(0, B, 4)]

            def med(fn, n: int = n) -> float:
                ts, _ = measure(fn, args.runs)
                return statistics.median(ts) / n * 1e9

            row = [
                med(partial(rio.save, tr, path)),
                med(partial(rio.load, path)),
                med(partial(from_vllm, payloads, num_experts=cfg["E"])),
                med(partial(_fill_and_read, pieces, 4)),
            ]
            print(f"| {what} | {B * cfg['seq_len']:,} | {cfg['L']} | {cfg['E']} | {experts.element_size()} | "
                  + " | ".join(f"{x:.2f}" for x in row) + " |", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    torch.set_num_threads(args.threads)
    B, S = args.seqs, args.seq_len // args.scale
    L, K, E = args.layers, args.top_k, args.experts
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, {platform.platform()}, python {platform.python_version()}"
    )
    print(f"nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()}, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}")
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
          f"commit {commit.stdout.strip() or '?'}")
    if args.sweep:
        sweep(args)
        return 0
    experts = routes(B, S, L, K, E)
    cu = torch.arange(B + 1, dtype=torch.int64) * S
    trace = RoutingTrace(experts=experts, cu_seqlens=cu, layer_ids=range(L), num_experts=E, meta={"source": "bench"})
    print(f"routes: B={B} x S={S} = {B * S:,} tokens, L={L}, K={K}, E={E}, {experts.dtype}: "
          f"{trace.nbytes / 1e9:.3f} GB; runs={args.runs}")
    print()
    print("| op | s, median (min-max) | baseline | s, median (min-max) | ratio of medians (of minima) | peak | "
          "baseline peak | target |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    table = Table(args.runs)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name in rows:
            if name == "store":
                row_store(table, trace)
            elif name == "accumulate":
                row_accumulate(table, trace)
            elif name == "load":
                row_load(table, trace, tmp)
            elif name == "save":
                row_save(table, trace, tmp)
            elif name == "crc":
                row_crc(table, trace, tmp)
            elif name in ("convert", "vllm"):
                row_convert(table, trace, vllm_only=name == "vllm")
            elif name == "select":
                row_select(table, trace)
            elif name == "prepare":
                row_prepare(table, trace)
            elif name == "rank":
                row_rank(table, trace, tmp)
            elif name == "bitpack":
                row_bitpack(table, trace, tmp)
    return 0


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc then maps every allocation above 64 KiB and returns it on free, so each measured
        # call's peak shows in VmHWM instead of hiding in memory an earlier call freed to the heap.
        # Every such allocation then costs fresh page faults, which slows ops that allocate many
        # mid-sized temporaries (prepare's layout: ~2x). For times as a user's process sees them run
        # with MALLOC_MMAP_THRESHOLD_=33554432 (the ceiling glibc's own threshold grows to); peaks are
        # then not comparable.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    raise SystemExit(main())
