"""The duplicate-expert check: the first row naming an expert twice, whatever the chunking and threads.

``first_duplicate_row`` shares chunks of rows among threads on large inputs; these tests force
small chunks and several workers on small inputs, so the parallel path runs here on a few rows,
against a per-row oracle (Python sets). RoutingTrace must report exactly the row and error it
reported when every block was range-checked, then duplicate-checked, in turn.

Legend: N rows, T tokens, L MoE layers, K top-k slots.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import routereplay.core.trace as trace_mod
from routereplay import RoutingTrace
from routereplay.core.errors import DuplicateExpertError, ExpertIdError
from routereplay.core.trace import first_duplicate_row

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _distinct_rows(N: int, K: int, E: int, seed: int, dtype=torch.uint8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, E, generator=g).argsort(-1)[:, :K].to(dtype)


def _oracle(ids_NLK: torch.Tensor, keep_N: torch.Tensor | None) -> int:
    N, L, K = ids_NLK.shape
    for n in range(N):
        if keep_N is not None and not bool(keep_N[n]):
            continue
        for l in range(L):
            if len(set(ids_NLK[n, l].tolist())) < K:
                return n * L + l
    return -1


@SETTINGS
@given(
    N=st.integers(0, 60),
    L=st.integers(1, 3),
    K=st.integers(1, 9),
    bad=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.integers(0, 8), st.integers(0, 8)), max_size=6),
    chunk=st.integers(1, 20),
    workers=st.integers(1, 4),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_first_duplicate_row_is_the_lowest_bad_row(N, L, K, bad, chunk, workers, masked, seed):
    ids_NLK = _distinct_rows(N * L, K, 40, seed).view(N, L, K)
    for n, l, i, j in bad:  # slot j repeats slot i
        if N and K > 1 and i % K != j % K:
            ids_NLK[n % N, l % L, j % K] = ids_NLK[n % N, l % L, i % K]
    keep_N = torch.rand(N, generator=torch.Generator().manual_seed(seed)) < 0.6 if masked else None
    want = _oracle(ids_NLK, keep_N)
    assert first_duplicate_row(ids_NLK, keep_N, chunk=chunk, workers=workers) == want
    # [N * L, K] rows with a per-row mask: the same row
    keep_rows = None if keep_N is None else keep_N.repeat_interleave(L)
    assert first_duplicate_row(ids_NLK.reshape(N * L, K), keep_rows, chunk=chunk, workers=workers) == want


def test_parallel_check_reports_the_first_of_several_bad_chunks():
    """Duplicates in many chunks, each worker's chunks among them: the lowest row wins, also
    when a later worker finds its duplicate first."""
    ids_NK = _distinct_rows(4000, 8, 64, seed=1)
    for n in (3999, 2500, 1703, 1702, 911):
        ids_NK[n, 7] = ids_NK[n, 0]
    for workers in (1, 2, 3, 5, 8):
        for chunk in (1, 7, 100, 1000, 4000):
            assert first_duplicate_row(ids_NK, chunk=chunk, workers=workers) == 911
    keep_N = torch.ones(4000, dtype=torch.bool)
    keep_N[[911, 1702]] = False
    assert first_duplicate_row(ids_NK, keep_N, chunk=100, workers=4) == 1703
    keep_N[:] = False
    assert first_duplicate_row(ids_NK, keep_N, chunk=100, workers=4) == -1


def test_small_inputs_stay_on_the_calling_thread(monkeypatch):
    started = []
    monkeypatch.setattr(trace_mod, "ThreadPoolExecutor", lambda *a, **k: started.append(a) or pytest.fail("thread"))
    ids_NK = _distinct_rows(1000, 8, 64, seed=2)
    ids_NK[999, 1] = ids_NK[999, 2]
    assert first_duplicate_row(ids_NK) == 999
    assert first_duplicate_row(ids_NK[:0]) == -1
    assert first_duplicate_row(ids_NK[:, :1]) == -1  # top-1: nothing to repeat
    assert not started
    assert trace_mod._duplicate_workers(trace_mod._DUP_PARALLEL_ROWS - 1) == 1


def test_worker_count_follows_torch_threads():
    before = torch.get_num_threads()
    try:
        for n in (1, 3, 64):
            torch.set_num_threads(n)
            assert trace_mod._duplicate_workers(trace_mod._DUP_PARALLEL_ROWS) == min(n, trace_mod._DUP_MAX_WORKERS)
    finally:
        torch.set_num_threads(before)


def test_parallel_check_uses_threads_and_finds_the_same_row(monkeypatch):
    threads, firsts = set(), []
    scan = trace_mod._scan_duplicates

    def spy(*args, **kwargs):
        threads.add(threading.get_ident())
        firsts.append(args[2])
        return scan(*args, **kwargs)

    monkeypatch.setattr(trace_mod, "_scan_duplicates", spy)
    ids_NK = _distinct_rows(3000, 4, 32, seed=3, dtype=torch.int16)
    ids_NK[2222, 3] = ids_NK[2222, 1]
    assert first_duplicate_row(ids_NK, chunk=64, workers=3) == 2222
    # three interleaved shares of the chunks; the pool may run its two on one thread
    assert sorted(firsts) == [0, 1, 2] and threading.get_ident() in threads and len(threads) >= 2


# --- RoutingTrace: the same error, row and message as a block-by-block check -----------------
def _trace_ids(T=40, L=3, K=4, E=50, seed=4) -> torch.Tensor:
    return _distinct_rows(T * L, K, E, seed).view(T, L, K)


@pytest.fixture
def small_blocks(monkeypatch):
    """Validation blocks of 4 tokens (L=3, K=4) and the parallel check from 1 row on, 3 threads."""
    monkeypatch.setattr(trace_mod, "_BLOCK_ELEMENTS", 4 * 3 * 4)
    monkeypatch.setattr(trace_mod, "_DUP_PARALLEL_ROWS", 1)
    monkeypatch.setattr(trace_mod, "_DUP_CHUNK_BYTES", 6 * 4)  # chunks of 6 rows: 2 tokens
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def _build(ids_TLK, E=50, valid=None):
    T = ids_TLK.shape[0]
    return RoutingTrace(experts=ids_TLK, cu_seqlens=[0, 10, T], layer_ids=(1, 3, 5), num_experts=E, valid=valid)


@pytest.mark.usefixtures("small_blocks")
def test_duplicate_in_an_earlier_block_than_a_bad_id_is_reported():
    ids = _trace_ids().to(torch.int16)
    ids[13, 2, 3] = ids[13, 2, 0]  # block 3 (tokens 12-15)
    ids[30, 0, 1] = 77  # block 7: out of range
    ids[31, 1, 1] = ids[31, 1, 2]
    with pytest.raises(DuplicateExpertError) as e:
        _build(ids)
    row = ids[13, 2].tolist()
    assert str(e.value) == (
        f"row 13 (sequence 1, position 3), layer 5 selects an expert twice: {row}; "
        "each of the top-4 slots must name a different expert"
    )


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dup_token", [14, 15, 25])  # the same block as the bad id (range first), or later
def test_bad_id_in_an_earlier_or_the_same_block_is_reported(dup_token):
    ids = _trace_ids().to(torch.int16)
    ids[dup_token, 0, 3] = ids[dup_token, 0, 2]
    ids[14, 1, 2] = 50
    with pytest.raises(ExpertIdError) as e:
        _build(ids)
    assert str(e.value) == "expert id 50 at row 14 (sequence 1, position 4), layer 3, slot 2 is outside [0, 50)"


@pytest.mark.usefixtures("small_blocks")
def test_invalid_rows_are_skipped_by_the_parallel_check():
    ids = _trace_ids()
    valid = torch.ones(40, dtype=torch.bool)
    valid[[5, 21, 22]] = False
    ids[5] = 0  # zeroed invalid row: its slots repeat 0
    ids[21, 0] = torch.tensor([7, 7, 7, 7], dtype=ids.dtype)  # an invalid row holding ids
    trace = _build(ids, valid=valid)
    assert trace.experts[21].eq(0).all() and trace.experts[5].eq(0).all()
    ids[33, 2, 1] = ids[33, 2, 0]
    with pytest.raises(DuplicateExpertError, match=r"^row 33 \(sequence 1, position 23\), layer 5 "):
        _build(ids, valid=valid)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_duplicates_print_their_values(dtype):
    ids = _trace_ids().to(torch.int64)
    ids[17, 1] = torch.tensor([4, 9, 4, 2])
    numpy_dtype = {torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}[dtype]
    with pytest.raises(DuplicateExpertError, match=r"^row 17 .* layer 3 selects an expert twice: \[4, 9, 4, 2\];"):
        _build(torch.from_numpy(ids.numpy().astype(numpy_dtype)))


def test_non_contiguous_ids_are_checked_in_place():
    """A [T, L, K] view (layers-major storage) is checked chunk by chunk, not copied whole."""
    ids_LTK = _trace_ids(T=40, L=3).permute(1, 0, 2).contiguous()
    ids_TLK = ids_LTK.permute(1, 0, 2)
    assert not ids_TLK.is_contiguous()
    assert first_duplicate_row(ids_TLK, chunk=5, workers=2) == -1
    ids_LTK[2, 19, 3] = ids_LTK[2, 19, 1]
    assert first_duplicate_row(ids_TLK, chunk=5, workers=2) == 19 * 3 + 2


# --- io.load: the repeat check beside the read --------------------------------------------------
@pytest.fixture
def scan_beside_read(monkeypatch):
    """io.load checks repeats beside the read from 1 row on, in spans of 2 rows' bytes, 2 threads;
    counts the scans that answered "distinct"."""
    import routereplay.core.io as rio

    monkeypatch.setattr(trace_mod, "_DUP_PARALLEL_ROWS", 1)
    monkeypatch.setattr(rio, "_IO_BLOCK", 64)
    monkeypatch.setattr(rio._RepeatScan, "SPAN_BYTES", 2 * 3 * 4)
    answers = []
    distinct = rio._RepeatScan.distinct
    monkeypatch.setattr(rio._RepeatScan, "distinct", lambda self: answers.append(distinct(self)) or answers[-1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield rio, answers
    torch.set_num_threads(before)


def _save(rio, tmp_path, ids_TLK, valid=None):
    path = tmp_path / "t.rrt"
    T = ids_TLK.shape[0]
    trace = RoutingTrace.unchecked(
        experts=ids_TLK, cu_seqlens=torch.tensor([0, 10, T]), layer_ids=(1, 3, 5), num_experts=50, valid=valid
    )
    rio.save(trace, path, fsync=False)
    return path, trace


def test_load_with_the_scan_returns_the_trace(scan_beside_read, tmp_path):
    rio, answers = scan_beside_read
    path, trace = _save(rio, tmp_path, _trace_ids().to(torch.uint8))
    assert rio.load(path) == trace
    assert answers == [True]  # the scan ran and vouched for the rows


@pytest.mark.parametrize("token", [0, 17, 39])
def test_load_with_the_scan_reports_the_repeat_as_validation_does(scan_beside_read, tmp_path, token):
    rio, answers = scan_beside_read
    ids = _trace_ids().to(torch.uint8)
    ids[token, 1, 0] = ids[token, 1, 3]
    ids[min(token + 1, 39), 2, 0] = ids[min(token + 1, 39), 2, 1]
    path, _ = _save(rio, tmp_path, ids)
    with pytest.raises(DuplicateExpertError) as e:
        rio.load(path)
    assert answers == [False]
    seq, pos = (0, token) if token < 10 else (1, token - 10)
    assert str(e.value).startswith(f"row {token} (sequence {seq}, position {pos}), layer 3 selects an expert twice")


def test_load_with_the_scan_reports_a_bad_id_after_clean_rows(scan_beside_read, tmp_path):
    """Rows without repeats, an id out of range: the range check still runs on every row."""
    rio, answers = scan_beside_read
    ids = _trace_ids().to(torch.uint8)
    ids[33, 0, 2] = 60
    path, _ = _save(rio, tmp_path, ids)
    with pytest.raises(ExpertIdError, match=r"^expert id 60 at row 33 "):
        rio.load(path)
    assert answers == [True]


def test_load_with_the_scan_reports_corruption_before_a_repeat(scan_beside_read, tmp_path):
    from routereplay.core.errors import TraceFormatError

    rio, answers = scan_beside_read
    ids = _trace_ids().to(torch.uint8)
    ids[2, 0, 1] = ids[2, 0, 0]
    path, _ = _save(rio, tmp_path, ids)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped id byte: the checksum fails first
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="checksum"):
        rio.load(path)
    assert answers == []


def test_load_without_the_scan_for_masked_or_single_thread_files(scan_beside_read, tmp_path):
    rio, answers = scan_beside_read
    ids = _trace_ids().to(torch.uint8)
    valid = torch.ones(40, dtype=torch.bool)
    valid[9] = False
    ids[9] = 0
    path, trace = _save(rio, tmp_path, ids, valid=valid)
    assert rio.load(path) == trace  # a masked file: zeroed rows repeat expert 0, no scan
    torch.set_num_threads(1)
    path, trace = _save(rio, tmp_path, _trace_ids().to(torch.uint8))
    assert rio.load(path) == trace
    assert answers == []


# --- rows_checked: a trace that passed the repeat check remembers it -------------------------
def _checked_trace(seed: int = 0, valid: bool = True) -> RoutingTrace:
    ids = _distinct_rows(12 * 2, 3, 16, seed).reshape(12, 2, 3)
    v = torch.arange(12) % 4 != 3 if valid else None
    if v is not None:
        ids[~v] = 0
    return RoutingTrace(experts=ids, cu_seqlens=torch.tensor([0, 4, 12]), layer_ids=(1, 3), num_experts=16, valid=v)


def test_rows_checked_follows_the_trace_through_its_methods():
    t = _checked_trace()
    assert t.rows_checked()
    fields = ("experts", "cu_seqlens", "layer_ids", "num_experts", "valid")
    assert not RoutingTrace.unchecked(**{k: getattr(t, k) for k in fields}).rows_checked()
    kept = [
        t.replace(check=False, meta={"a": "b"}),
        t.replace(check=False, gates=torch.zeros(t.experts.shape)),
        t.select_sequences([1, 0, 1]),
        t.sequence(0),
        t.select_layers([3]),
        t.to("cpu"),
        RoutingTrace.concat([t, _checked_trace(1)]),
        t.extend_sequence(0, _distinct_rows(4, 3, 16, 2).reshape(2, 2, 3)),
        t.replace(experts=t.experts.clone()),  # check=True: validated again
    ]
    assert all(x.rows_checked() for x in kept)
    unknown = RoutingTrace.unchecked(experts=t.experts.clone(), cu_seqlens=t.cu_seqlens, layer_ids=t.layer_ids,
                                     num_experts=16, valid=t.valid)  # fmt: skip
    dropped = [
        t.replace(check=False, experts=t.experts.clone()),
        t.replace(check=False, valid=None),  # the zeroed rows become valid: they repeat expert 0
        RoutingTrace.concat([t, unknown]),
        unknown.select_sequences([0]),
        unknown.to("cpu"),
    ]
    assert not any(x.rows_checked() for x in dropped)


def test_layout_conversions_keep_the_mark():
    """Row rearrangements of a checked trace (padding and missing rows added invalid, as zeros) stay
    checked; of an unchecked one, unchecked."""
    from routereplay.core import layout

    t = _checked_trace()
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :4], mask[1, 1:] = True, True  # right and left padding
    for keep in (t, t.replace(check=False, experts=t.experts.clone())):
        rows = layout.to_router_rows(keep, mask)
        out = [
            layout.engine_to_training(keep),
            layout.training_to_engine(keep),
            rows,
            layout.from_router_rows(rows, mask),
        ]
        assert [x.rows_checked() for x in out] == [keep.rows_checked()] * len(out)
    assert layout.from_router_rows(layout.to_router_rows(t, mask), mask) == t


def test_callers_that_know_say_so():
    """unchecked(rows_checked=True) and replace(check=False, rows_checked=...): the caller vouches."""
    t = _checked_trace()
    fields = {k: getattr(t, k) for k in ("experts", "cu_seqlens", "layer_ids", "num_experts", "valid")}
    assert RoutingTrace.unchecked(**fields, rows_checked=True).rows_checked()
    assert not t.replace(check=False, rows_checked=False).rows_checked()
    assert t.replace(check=False, rows_checked=True, experts=t.experts.clone()).rows_checked()
    assert t.replace(check=True, rows_checked=False).rows_checked()  # validated: it passed


def test_an_in_place_torch_write_drops_the_mark():
    t = _checked_trace()
    view = t.replace(check=False, meta={"x": "y"})  # shares experts and valid
    t.experts[1, 0, 0] = t.experts[1, 0, 1]  # an expert twice, written through torch
    assert not t.rows_checked() and not view.rows_checked()
    u = _checked_trace()
    u.valid[3] = True  # a zeroed row declared valid
    assert not u.rows_checked()
    with pytest.raises(DuplicateExpertError, match=r"^row 1 "):
        t.replace(check=True)


def test_pickling_keeps_what_the_sender_knew():
    import pickle

    t = _checked_trace()
    assert pickle.loads(pickle.dumps(t)).rows_checked()
    bare = t.replace(check=False, experts=t.experts.clone())
    assert not pickle.loads(pickle.dumps(bare)).rows_checked()


def test_an_inference_mode_trace_is_marked_too():
    with torch.inference_mode():
        t = _checked_trace()
    assert t.rows_checked()


def test_repeat_check_benchmark_compares_formulations_that_agree(capsys):
    """benchmarks/bench_repeat_check.py times other formulations of the check beside the library's:
    each must give the pairwise answer (the script asserts it before timing) on rows with repeats."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_repeat_check.py"
    spec = importlib.util.spec_from_file_location("bench_repeat_check", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--rows", "8192", "--rounds", "1", "--calls", "1"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script times on one thread
    out = capsys.readouterr().out
    assert "| first_duplicate_row (the library) |" in out and "| slot quads as uint32 planes |" in out
    x = bench.rows_with_repeats(8192, seed=1)
    ref = bench.pairwise(x)
    assert ref.any() and first_duplicate_row(torch.from_numpy(x)) == int(ref.argmax())
