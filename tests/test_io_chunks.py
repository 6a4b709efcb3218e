"""Format 1.1: per-chunk checksums and partial reads (routereplay.core.io.load(sequences=...),
routereplay.parallel.load_for_rank), against docs/FORMAT.md.

The golden file tests/data/golden_v1_1_chunked.rrt is the chunked layout: a test fails if
``save`` writes other bytes. Regenerate after a deliberate format change (with a FORMAT.md
update) with ``.venv/bin/python tests/test_io_chunks.py --regen``.

Legend: T tokens, L MoE layers, K top-k slots, B sequences.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from helpers import not_known_checked
from hypothesis import given, settings
from hypothesis import strategies as st

import routereplay.core.io as rio
from routereplay import RoutingTrace
from routereplay.core.errors import LayerIdsError, TraceFormatError, TraceMismatchError
from routereplay.parallel.slicing import ParallelLayout, RankCoords, load_for_rank, slice_for_rank

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden_v1_1_chunked.rrt"
GOLDEN_CHUNK_BYTES = 8  # 2 rows of 2 layers x top-2 uint8 ids per chunk
FORMAT_MD = Path(__file__).parents[1] / "docs" / "FORMAT.md"


def golden_trace() -> RoutingTrace:
    """3 sequences (3, 2 and 2 tokens), layers 1 and 3, top-2 of 8 experts, each sequence's last
    token invalid: 7 rows in 4 chunks of 2 rows (the last of 1)."""
    experts_TLK = torch.tensor(
        [
            [[0, 1], [2, 3]],
            [[7, 6], [5, 4]],
            [[0, 0], [0, 0]],
            [[3, 5], [1, 7]],
            [[0, 0], [0, 0]],
            [[4, 2], [6, 0]],
            [[0, 0], [0, 0]],
        ]
    )
    return RoutingTrace(
        experts=experts_TLK,
        cu_seqlens=torch.tensor([0, 3, 5, 7]),
        layer_ids=(1, 3),
        num_experts=8,
        valid=torch.tensor([True, True, False, True, False, True, False]),
        meta={"source": "routereplay tests"},
    )


def regen() -> None:
    rio.save(not_known_checked(golden_trace()), GOLDEN, chunk_bytes=GOLDEN_CHUNK_BYTES)
    print(f"wrote {GOLDEN}")


def split(data: bytes) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), 8 + n


# --- the golden file ---------------------------------------------------------------------------
def test_save_matches_golden_bytes(tmp_path):
    out = tmp_path / "t.rrt"
    rio.save(not_known_checked(golden_trace()), out, chunk_bytes=GOLDEN_CHUNK_BYTES)
    assert out.read_bytes() == GOLDEN.read_bytes(), "save() no longer writes the chunked golden file"


@pytest.mark.parametrize("io_block", [3, 64])
def test_checksums_on_a_helper_thread_give_the_same_bytes(tmp_path, monkeypatch, io_block):
    """save checksums on a helper thread while it writes (large traces, 2+ torch threads): the
    golden files come out byte for byte, blocks splitting chunks and tensors anywhere."""
    goldens = {p.name: (rio.load(p, validate=False), p.read_bytes()) for p in sorted(DATA.glob("golden_v1*.rrt"))}
    monkeypatch.setattr(rio, "_CRC_THREAD_BYTES", 1)
    monkeypatch.setattr(rio, "_IO_BLOCK", io_block)
    threaded = []
    real = rio._checksummed
    monkeypatch.setattr(rio, "_checksummed", lambda e, b, w=None: threaded.append(w is None) or real(e, b, w))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rio.save(not_known_checked(golden_trace()), tmp_path / "c.rrt", chunk_bytes=GOLDEN_CHUNK_BYTES)
        assert (tmp_path / "c.rrt").read_bytes() == GOLDEN.read_bytes()
        for name, (trace, data) in goldens.items():  # their own traces, as written (1.0, 1.1, 1.2)
            if "chunked" in name:
                continue
            rio.save(trace, tmp_path / name)
            assert (tmp_path / name).read_bytes() == data, name
            assert rio.dumps(trace) == data, name
    finally:
        torch.set_num_threads(before)
    assert threaded and all(threaded)


def test_load_checksums_on_a_helper_thread(tmp_path, monkeypatch):
    """load folds the checksum on a helper thread behind the read (large files, 2+ torch threads,
    no repeat scan): the same traces, and a flipped byte or a short file still refused."""
    import threading

    goldens = {p: rio.load(p) for p in sorted(DATA.glob("golden_v1*.rrt"))}
    monkeypatch.setattr(rio, "_CRC_THREAD_BYTES", 1)
    monkeypatch.setattr(rio, "_IO_BLOCK", 3)
    folded_on = set()
    real_crc32 = rio.zlib.crc32

    class _Zlib:
        @staticmethod
        def crc32(data, value=0):
            folded_on.add(threading.current_thread().name.split("_")[0])
            return real_crc32(data, value)

    monkeypatch.setattr(rio, "zlib", _Zlib)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for path, trace in goldens.items():
            assert rio.load(path) == trace, path.name
        assert "routereplay-load-crc" in folded_on
        data = bytearray((DATA / "golden_v1_2.rrt").read_bytes())
        data[-3] ^= 1
        (tmp_path / "bad.rrt").write_bytes(bytes(data))
        with pytest.raises(TraceFormatError, match="checksum"):
            rio.load(tmp_path / "bad.rrt")
    finally:
        torch.set_num_threads(before)


def test_golden_file_reads_back_whole_and_in_parts():
    expected = golden_trace()
    assert rio.load(GOLDEN) == expected
    assert rio.load(GOLDEN, mmap=True) == expected
    for seqs in ([0], [2, 1], [1, 1, 0], []):
        assert rio.load(GOLDEN, sequences=seqs) == expected.select_sequences(seqs)
    assert rio.read_header(GOLDEN).version == "1.1"


def test_golden_checksums_follow_the_spec():
    """Recompute every checksum of the golden file as docs/FORMAT.md defines it."""
    data = GOLDEN.read_bytes()
    table, data_start = split(data)
    md = table["__metadata__"]
    rows, R = 7, int(md["chunk_rows"])
    assert R == 2 and len(md["chunk_checksums"]) == 8 * 4
    prefix = data[:data_start]

    def zeroed(fields):
        out = prefix
        for field in fields:
            key = f'"{field}":"{md[field]}"'.encode()
            assert out.count(key) == 1
            out = out.replace(key, f'"{field}":"00000000"'.encode())
        return out

    # whole file, its own digits read as "0"
    assert f"{zlib.crc32(zeroed(['checksum']) + data[data_start:]):08x}" == md["checksum"]
    # header_checksum: prefix with both digit fields "0", then cu_seqlens' bytes
    cu = table["cu_seqlens"]["data_offsets"]
    head = zeroed(["checksum", "header_checksum"]) + data[data_start + cu[0] : data_start + cu[1]]
    assert f"{zlib.crc32(head):08x}" == md["header_checksum"]
    # each chunk: its rows' bytes of every row tensor, in file order (experts, then valid)
    order = sorted((t for t in table if t in ("experts", "gates", "valid")), key=lambda t: table[t]["data_offsets"])
    for c in range(4):
        r0, r1 = c * R, min((c + 1) * R, rows)
        crc = 0
        for name in order:
            lo, hi = table[name]["data_offsets"]
            row_bytes = (hi - lo) // rows
            crc = zlib.crc32(data[data_start + lo + r0 * row_bytes : data_start + lo + r1 * row_bytes], crc)
        assert f"{crc:08x}" == md["chunk_checksums"][8 * c : 8 * c + 8], c


def test_format_md_quotes_the_chunked_golden_header():
    _, data_start = split(GOLDEN.read_bytes())
    header = GOLDEN.read_bytes()[8:data_start].rstrip(b" ").decode("ascii")
    text = FORMAT_MD.read_text()
    block = re.search(r"<!-- golden-header-v1\.1 -->\n```json\n(.*?)\n```", text, re.DOTALL)
    assert block is not None, "docs/FORMAT.md lost its chunked example header"
    assert block.group(1) == header


def test_a_1_0_reader_reads_a_chunked_file_whole(monkeypatch):
    """Minor versions only add: a reader that knows 1.0 ignores the chunk fields and verifies the
    whole-file checksum, which a chunked file still carries."""
    monkeypatch.setattr(rio, "_MINOR", 0)
    assert rio.load(GOLDEN) == golden_trace()


def test_one_chunk_traces_keep_version_1(tmp_path):
    rio.save(not_known_checked(golden_trace()), tmp_path / "t.rrt")  # default chunks of 4 MiB: one chunk
    header = rio.read_header(tmp_path / "t.rrt")
    assert header.version == "1" and "chunk_rows" not in header.metadata


@pytest.mark.parametrize("chunk_bytes", [GOLDEN_CHUNK_BYTES, rio.CHUNK_BYTES])
def test_checked_rows_are_version_1_2_chunked_or_not(tmp_path, chunk_bytes):
    """A trace whose rows passed the repeat check is written as 1.2 with rows_checked, beside the
    chunk fields when it has chunks; every read of it, whole or partial, validated or not, knows."""
    path = tmp_path / "t.rrt"
    rio.save(golden_trace(), path, chunk_bytes=chunk_bytes)
    header = rio.read_header(path)
    assert header.version == "1.2" and header.metadata["rows_checked"] == "1"
    assert ("chunk_rows" in header.metadata) == (chunk_bytes == GOLDEN_CHUNK_BYTES)
    for validate in (True, False):
        assert rio.load(path, validate=validate).rows_checked()
        part = rio.load(path, sequences=[2, 0], validate=validate)
        assert part == golden_trace().select_sequences([2, 0]) and part.rows_checked()


# --- partial reads -------------------------------------------------------------------------
def _random_trace(draw_seed: int, lens: list[int], L: int, K: int, E: int, gates: bool, valid: bool) -> RoutingTrace:
    g = torch.Generator().manual_seed(draw_seed)
    T = sum(lens)
    experts = torch.rand(T, L, E, generator=g).argsort(-1)[..., :K]
    valid_T = torch.rand(T, generator=g) > 0.2 if valid else None
    if valid_T is not None:
        experts[~valid_T] = 0
    cu = torch.tensor([0, *torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist()])
    return RoutingTrace(
        experts=experts, cu_seqlens=cu, layer_ids=list(range(0, 2 * L, 2)), num_experts=E, valid=valid_T,
        gates=torch.rand(T, L, K, generator=g, dtype=torch.float64) if gates else None,
    )


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    seed=st.integers(0, 1000),
    E=st.sampled_from([8, 300]),
    chunk_bytes=st.integers(1, 200),
    gates=st.booleans(),
    valid=st.booleans(),
    data=st.data(),
)
def test_partial_load_is_a_slice_of_the_full_load(tmp_path_factory, lens, seed, E, chunk_bytes, gates, valid, data):
    trace = _random_trace(seed, lens, L=2, K=3, E=E, gates=gates, valid=valid)
    path = tmp_path_factory.mktemp("p") / "t.rrt"
    rio.save(trace, path, chunk_bytes=chunk_bytes)
    assert rio.load(path) == trace
    B = trace.num_seqs
    seqs = data.draw(st.lists(st.integers(-B, B - 1), max_size=6))
    layers = data.draw(st.permutations(list(trace.layer_ids)))
    for validate in (True, False):
        got = rio.load(path, sequences=seqs, layers=layers, validate=validate)
        assert got == trace.select_sequences(seqs).select_layers(layers)


def test_partial_load_of_a_version_1_0_file_reads_it_whole():
    golden = DATA / "golden_v1.rrt"
    full = rio.load(golden)
    assert rio.load(golden, sequences=[1]) == full.select_sequences([1])
    assert rio.load(golden, layers=[3]) == full.select_layers([3])


def test_partial_load_argument_errors():
    with pytest.raises(IndexError, match=r"sequence indices \[3, -4\] out of range for a trace of 3 sequences"):
        rio.load(GOLDEN, sequences=[0, 3, -4])
    with pytest.raises(TraceMismatchError, match=r"layer\(s\) \[2\] are not in this trace, which has layers \(1, 3\)"):
        rio.load(GOLDEN, sequences=[0], layers=[2])


def _corrupt(tmp_path: Path, offset: int) -> Path:
    data = bytearray(GOLDEN.read_bytes())
    data[offset] ^= 0x01
    path = tmp_path / "bad.rrt"
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_chunk_is_refused_by_name_and_others_still_read(tmp_path):
    table, data_start = split(GOLDEN.read_bytes())
    lo, _ = table["experts"]["data_offsets"]
    path = _corrupt(tmp_path, data_start + lo + 4 * 4 + 1)  # experts row 4: chunk 2 (rows 4-5)
    msg = (
        r"bad.rrt: chunk 2 \(rows 4 to 5\) fails its checksum: the header records crc32 [0-9a-f]{8} but its "
        r"bytes give [0-9a-f]{8}; the file is corrupt there \(bit flip, partial overwrite\), write it again"
    )
    with pytest.raises(TraceFormatError, match=msg):
        rio.load(path, sequences=[1])  # rows 3-4: chunks 1 and 2
    assert rio.load(path, sequences=[0]) == golden_trace().select_sequences([0])  # rows 0-2: chunks 0, 1
    with pytest.raises(TraceFormatError, match="checksum mismatch"):
        rio.load(path)  # a whole load verifies the whole file


def test_damaged_boundaries_are_refused(tmp_path):
    table, data_start = split(GOLDEN.read_bytes())
    lo, _ = table["cu_seqlens"]["data_offsets"]
    path = _corrupt(tmp_path, data_start + lo + 8)  # cu_seqlens[1]
    msg = (
        r"bad.rrt: header checksum mismatch: the header records crc32 [0-9a-f]{8} but the header and "
        r"cu_seqlens give [0-9a-f]{8}; the file is corrupt, write it again with routereplay.save"
    )
    with pytest.raises(TraceFormatError, match=msg):
        rio.load(path, sequences=[0])


def _with_metadata(tmp_path: Path, **changes) -> Path:
    """The golden file with metadata fields changed (or dropped: None) and the whole-file checksum
    recomputed, so that only the chunk checks can catch the change."""
    data = GOLDEN.read_bytes()
    table, data_start = split(data)
    md = table["__metadata__"]
    for k, v in changes.items():
        if v is None:
            md.pop(k)
        else:
            md[k] = v
    md["checksum"] = "00000000"
    header = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    out = struct.pack("<Q", len(header)) + header + data[data_start:]
    out = out.replace(b'"checksum":"00000000"', f'"checksum":"{zlib.crc32(out):08x}"'.encode())
    path = tmp_path / "edited.rrt"
    path.write_bytes(out)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"chunk_checksums": "0" * 24},
            (
                r"field 'chunk_checksums' holds 24 characters, expected 32 lowercase hex digits \(8 per chunk of 2 "
                r"rows over 7 rows\)"
            ),
        ),
        ({"chunk_rows": "02"}, r"field 'chunk_rows' is '02', expected a positive decimal integer"),
        ({"header_checksum": "XYZ"}, r"field 'header_checksum' is 'XYZ', expected 8 lowercase hex digits"),
        (
            {"header_checksum": None},
            (
                r"has some chunk fields but not \['header_checksum'\]; a chunked trace has all of \['chunk_rows', "
                r"'chunk_checksums', 'header_checksum'\]"
            ),
        ),
        (
            {"version": "1"},
            r"unknown metadata field\(s\) \['chunk_checksums', 'chunk_rows', 'header_checksum'\] in a version-1 trace",
        ),
    ],
)
def test_malformed_chunk_fields(tmp_path, changes, message):
    with pytest.raises(TraceFormatError, match=message):
        rio.read_header(_with_metadata(tmp_path, **changes))


# --- per rank ------------------------------------------------------------------------------
class _CountReads:
    def __init__(self, monkeypatch):
        self.nbytes = 0
        pread, preadv = os.pread, os.preadv

        def counted_pread(fd, n, offset):
            out = pread(fd, n, offset)
            self.nbytes += len(out)
            return out

        def counted_preadv(fd, buffers, offset):
            got = preadv(fd, buffers, offset)
            self.nbytes += got
            return got

        monkeypatch.setattr(rio.os, "pread", counted_pread)
        monkeypatch.setattr(rio.os, "preadv", counted_preadv)


@pytest.mark.parametrize("dp", [2, 8])
def test_load_for_rank_reads_its_share(tmp_path, monkeypatch, dp):
    """Issue 23.6: each DP rank reads its sequences' chunks, not the file."""
    trace = _random_trace(3, [40] * 32, L=4, K=2, E=16, gates=False, valid=True)
    path = tmp_path / "t.rrt"
    rio.save(trace, path, chunk_bytes=64)  # 8 rows per chunk: 5 chunks per sequence
    layout = ParallelLayout(micro_batch_size=2, dp=dp)
    size = path.stat().st_size
    for rank in (0, dp - 1):
        coords = RankCoords(dp=rank)
        counter = _CountReads(monkeypatch)
        got = load_for_rank(path, layout, coords, layer_ids=[6, 2])
        want = slice_for_rank(trace, layout, coords, layer_ids=[6, 2])
        assert len(got) == len(want) and all(a == b for a, b in zip(got, want))
        share = trace.nbytes / dp
        assert counter.nbytes <= share + 64 + 8 * (trace.num_seqs + 1), (counter.nbytes, share, size)
        monkeypatch.undo()


@pytest.mark.parametrize("layers", [None, [6, 2]])
def test_load_for_rank_views_its_share_when_rows_are_in_router_order(tmp_path, layers):
    """A rank's micro-batches in router order over every layer are views of the share it read (one
    allocation, no copy each); a layer subset copies. slice_for_rank never views the caller's trace."""
    trace = _random_trace(4, [40] * 16, L=4, K=2, E=16, gates=True, valid=True)
    path = tmp_path / "t.rrt"
    rio.save(trace, path, chunk_bytes=64)
    layout = ParallelLayout(micro_batch_size=2, dp=2)
    ids = list(trace.layer_ids) if layers is None else layers
    coords = RankCoords(dp=1)
    got = load_for_rank(path, layout, coords, layer_ids=ids)
    want = slice_for_rank(trace, layout, coords, layer_ids=ids)
    assert len(got) == len(want) == 4 and all(a == b for a, b in zip(got, want))
    assert all(g.rows_checked() for g in got)
    storages = {g.experts.untyped_storage().data_ptr() for g in got}
    assert len(storages) == (1 if layers is None else len(got))
    mine = {t.untyped_storage().data_ptr() for t in (trace.experts, trace.gates, trace.valid)}
    for w in want:
        assert not mine & {t.untyped_storage().data_ptr() for t in (w.experts, w.gates, w.valid) if t is not None}


def test_rank_slices_refuse_a_repeated_layer(tmp_path):
    trace = _random_trace(5, [40] * 4, L=4, K=2, E=16, gates=False, valid=False)
    path = tmp_path / "t.rrt"
    rio.save(trace, path, chunk_bytes=64)
    layout, coords = ParallelLayout(micro_batch_size=2, dp=2), RankCoords(dp=0)
    for slice_it in (lambda ids: slice_for_rank(trace, layout, coords, layer_ids=ids),
                     lambda ids: load_for_rank(path, layout, coords, layer_ids=ids)):  # fmt: skip
        with pytest.raises(LayerIdsError, match="unique"):
            slice_it([2, 2])


if __name__ == "__main__":
    if sys.argv[1:] == ["--regen"]:
        regen()
    else:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} --regen   (rewrite {GOLDEN.name})")
