"""Save and load a RoutingTrace as a ``.rrt`` file (spec: docs/FORMAT.md).

A ``.rrt`` file is a safetensors container: 8-byte little-endian header length, a JSON header
(tensor table plus ``__metadata__``), then the tensor bytes. Any safetensors reader can open
it; this module adds what a trace needs on top: fixed header fields, a format version that
readers check, and a CRC-32 over every byte of the file, so that truncation and bit flips in
the header or the payload are caught before a replay uses the routes. Files of more than one
chunk of rows (format 1.1) also carry a CRC-32 per chunk and one over the header and
``cu_seqlens``, so that a reader of some sequences reads and verifies only their chunks.

Legend (shape suffixes used in this file):
    T  tokens, all sequences packed back to back
    L  MoE layers
    K  top-k slots
    B  sequences
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import json
import math
import os
import re
import secrets
import struct
import sys
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from routereplay.core.errors import ExpertIdError, GatesError, TraceFormatError
from routereplay.core.trace import (
    MAX_NUM_EXPERTS,
    RoutingTrace,
    _duplicate_workers,
    expert_dtype,
    first_duplicate_row,
    host_empty,
)

__all__ = [
    "CHECKED_FORMAT_VERSION",
    "CHECKSUM_ALGORITHM",
    "CHUNKED_FORMAT_VERSION",
    "CHUNK_BYTES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TensorEntry",
    "TraceFileHeader",
    "dumps",
    "load",
    "loads",
    "read_header",
    "save",
]

FORMAT_NAME = "routereplay.trace"
FORMAT_VERSION = "1"
# Files whose rows span more than one chunk carry per-chunk checksums (minor version 1).
CHUNKED_FORMAT_VERSION = "1.1"
# Files of traces whose rows passed the repeat check say so (minor version 2), chunked or not.
CHECKED_FORMAT_VERSION = "1.2"
CHECKSUM_ALGORITHM = "crc32"
# The major version this module reads, and the newest minor it knows every field of.
_MAJOR, _MINOR = 1, 2
# Rows per chunk are chosen so that a chunk holds about this many bytes of expert ids.
CHUNK_BYTES = 4 * 2**20
# A trace's header is a few hundred bytes plus its layer ids and meta (a few KB in practice).
# Parsing JSON can take ~20x its size in Python objects, so the reader refuses headers above
# 16 MiB (safetensors' own limit is 100 MB) and save refuses to write one.
_MAX_HEADER_BYTES = 16 * 2**20
# JSON nesting of a valid header: the top-level object > a tensor entry > its shape list.
# Metadata values are strings; the structured ones (layer_ids, meta) nest one level inside.
# Checked before json.loads, whose recursion a hostile header would otherwise exhaust.
_MAX_HEADER_DEPTH = 3
_MAX_FIELD_DEPTH = 1
_PLACEHOLDER = "00000000"
# Bytes read or written and checksummed at a time: the CRC runs on bytes still in cache, so
# checksumming costs no extra pass over memory.
_IO_BLOCK = 1 << 20
# From this many bytes of data on, save / load checksum on a helper thread while they write / read
# (see _stream, _read_data).
_CRC_THREAD_BYTES = 64 << 20

# safetensors dtype names <-> torch dtypes this format stores.
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_GATE_DTYPES = ("F16", "BF16", "F32", "F64")
_EXPERT_DTYPES = ("U8", "I16", "I32")
_REQUIRED_FIELDS = ("format", "version", "layer_ids", "num_experts", "top_k", "meta", "checksum_algorithm", "checksum")
# Version 1.1: per-chunk checksums, all three present or none.
_CHUNK_FIELDS = ("chunk_rows", "chunk_checksums", "header_checksum")
# Version 1.2: "1" when the writer knew that every valid row names top_k distinct experts.
_ROWS_CHECKED = "rows_checked"
_ROW_TENSORS = ("experts", "gates", "valid")  # tensors with one entry per row, split into chunks
_REQUIRED_TENSORS = ("experts", "cu_seqlens")
_OPTIONAL_TENSORS = ("valid", "gates")
_VERSION_RE = re.compile(r"(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*))?")
_COUNT_RE = re.compile(r"[1-9][0-9]*")
_CHECKSUM_RE = re.compile(r"[0-9a-f]{8}")
_HEX_RE = re.compile(r"[0-9a-f]*")


@dataclass(frozen=True, kw_only=True, slots=True)
class TensorEntry:
    """One row of the safetensors tensor table.

    Args:
        dtype: safetensors dtype name (``"U8"``, ``"I64"``, ``"BF16"``, ...).
        shape: tensor shape.
        start, end: byte range inside the data section (after the header).
    """

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True, kw_only=True, slots=True)
class TraceFileHeader:
    """What a ``.rrt`` header says, read without touching the tensor bytes.

    Args:
        path: the file as given to :func:`read_header`.
        file_size: bytes on disk.
        header_size: bytes of the JSON header, padding included (the container's first 8 bytes).
        version: the format version string (``"1"``; ``"1.1"`` for a file with per-chunk checksums;
            ``"1.2"`` for a file whose writer checked its rows for repeated experts).
        checksum_algorithm, checksum: as stored; the checksum is not verified by ``read_header``.
        metadata: the whole ``__metadata__`` mapping (every value a string).
        tensors: name -> :class:`TensorEntry`, in file order.
    """

    path: str
    file_size: int
    header_size: int
    version: str
    checksum_algorithm: str
    checksum: str
    metadata: Mapping[str, str]
    tensors: Mapping[str, TensorEntry]

    @property
    def data_size(self) -> int:
        """Bytes of tensor data the header describes."""
        return max((e.end for e in self.tensors.values()), default=0)


# --- writing -------------------------------------------------------------------------------
def save(
    trace: RoutingTrace, path: str | os.PathLike[str], *, fsync: bool = True, chunk_bytes: int = CHUNK_BYTES
) -> None:
    """Write ``trace`` to ``path`` as a ``.rrt`` file, atomically.

    The bytes go to a temporary file in the same directory, which is flushed (and fsynced when
    ``fsync``) and then renamed over ``path``: readers see the old file or the new one, never a
    partial one, and a process that still maps the old file keeps reading the old bytes. The
    output is a deterministic function of the trace: the same trace gives the same bytes.

    Args:
        trace: the routes to store. Tensors on another device are copied to the host first.
        path: destination file; its directory must exist. ``.rrt`` is the usual suffix.
        fsync: force the bytes to disk before the rename (crash safety). Turn off only for
            scratch files.
        chunk_bytes: about how many bytes of expert ids each checksummed chunk of rows holds.
            A trace of more than one chunk is written as format version 1.1, with a checksum
            per chunk, so that :func:`load` with ``sequences=`` reads and verifies only the
            chunks it needs; a trace of one chunk as version 1, as before. A trace whose rows
            passed the repeat check (``trace.rows_checked()``) is written as version 1.2, which
            says so, so that a validating :func:`load` skips that check.

    Raises:
        TypeError: ``trace`` is not a RoutingTrace.
        GatesError: gates have a float dtype safetensors cannot store.
        ExpertIdError: ids held in a wider dtype than ``num_experts`` needs fall outside
            ``[0, num_experts)`` (only an unvalidated trace can hold them).
        FileNotFoundError: the directory of ``path`` does not exist.
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"save expects a RoutingTrace, found {type(trace).__name__}")
    _check_host_byte_order()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: directory {directory} does not exist; create it before saving the trace")

    _atomic_write(path, _encode(trace, chunk_bytes), fsync=fsync)


def dumps(trace: RoutingTrace) -> bytes:
    """The bytes :func:`save` would write for ``trace``: a whole ``.rrt`` file in memory.

    For handing a trace to another process or host as bytes (a message queue, an object store):
    checksummed and versioned like a file. Costs one copy of the tensors into the result.

    Raises:
        the errors of :func:`save` other than the file-system ones.
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"dumps expects a RoutingTrace, found {type(trace).__name__}")
    _check_host_byte_order()
    encoded = _encode(trace, CHUNK_BYTES)
    out = bytearray(encoded.size)
    dst = memoryview(out)
    pos = 0

    def write(block: memoryview | bytes) -> None:
        nonlocal pos
        n = len(block) if isinstance(block, bytes) else block.nbytes
        dst[pos : pos + n] = block
        pos += n

    prefix = _stream(encoded, write)
    dst[: len(prefix)] = prefix
    return bytes(out)


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A trace as the file's pieces: the prefix (length + header) with the checksum digits set to
    "0", each tensor's bytes in file order, and where the digits sit in the prefix. The writer
    computes the CRC while it writes the payloads, then writes the digits over the placeholder."""

    prefix: bytes
    payloads: list
    digits_at: int
    names: tuple[str, ...] = ()  # tensor names, file order (chunked files only)
    chunk_rows: int = 0  # rows per chunk; 0: a version-1.0 file without chunks
    num_rows: int = 0

    @property
    def size(self) -> int:
        return len(self.prefix) + sum(p.nbytes for p in self.payloads)


def _stream(encoded: _Encoded, write) -> bytes:
    """Write the file's bytes through ``write`` in file order and checksum them; return the final
    prefix, to be written over the placeholder prefix at offset 0.

    Writing and checksumming both release the GIL (``zlib.crc32`` and ``write`` on large buffers): from
    :data:`_CRC_THREAD_BYTES` on, with more than one torch thread, the checksums run on a helper thread
    over the same memory while this one writes, so a save costs about the larger of the two rather
    than their sum. Otherwise each block is checksummed right before it is written (in cache)."""
    write(encoded.prefix)
    blocks = _blocks(encoded)
    if torch.get_num_threads() < 2 or encoded.size < _CRC_THREAD_BYTES:
        return _checksummed(encoded, blocks, write)
    with ThreadPoolExecutor(1, thread_name_prefix="routereplay-save-crc") as pool:
        prefix = pool.submit(_checksummed, encoded, blocks)
        for block, _, _, _ in blocks:
            write(block)
        return prefix.result()


def _blocks(encoded: _Encoded) -> list[tuple[memoryview, int, str, int]]:
    """The data section in file order as ``(block, part, tensor name, part bytes)``: blocks of at most
    :data:`_IO_BLOCK` bytes, each in one part: a whole tensor, or (chunked files) one chunk of a row tensor."""
    out = []
    R, T = encoded.chunk_rows, encoded.num_rows
    for name, payload in zip(encoded.names or [""] * len(encoded.payloads), encoded.payloads):
        if R and name in _ROW_TENSORS:
            row_bytes = payload.nbytes // T
            bounds = [(c * R * row_bytes, min((c + 1) * R, T) * row_bytes) for c in range(-(-T // R))]
        else:
            bounds = [(0, payload.nbytes)]
        for c, (lo, hi) in enumerate(bounds):
            for begin in range(lo, hi, _IO_BLOCK):
                out.append((payload[begin : min(begin + _IO_BLOCK, hi)], c, name, hi - lo))
    return out


def _checksummed(encoded: _Encoded, blocks, write=None) -> bytes:
    """The final prefix: the checksums of ``blocks`` (from :func:`_blocks`) filled in; each block also
    goes through ``write``, when given, right after it is checksummed."""
    prefix = encoded.prefix
    if not encoded.chunk_rows:
        crc = zlib.crc32(prefix)
        for block, _, _, _ in blocks:
            crc = zlib.crc32(block, crc)
            if write is not None:
                write(block)
        return _with_digits(prefix, encoded.digits_at, crc)
    # Chunked (1.1): each tensor's bytes are checksummed once, part by part; a part's CRC is
    # folded into its chunk's checksum and into the data's (zlib's crc32_combine).
    chunk_crc = [0] * -(-encoded.num_rows // encoded.chunk_rows)
    data_crc, data_len, cu_crc, cu_len = 0, 0, 0, 0
    part, done = 0, 0
    for block, c, name, part_bytes in blocks:
        part = zlib.crc32(block, part)
        done += block.nbytes
        if write is not None:
            write(block)
        if done < part_bytes:
            continue
        if name in _ROW_TENSORS:
            chunk_crc[c] = _crc32_combine(chunk_crc[c], part, part_bytes)
        elif name == "cu_seqlens":
            cu_crc, cu_len = part, part_bytes
        data_crc, data_len = _crc32_combine(data_crc, part, part_bytes), data_len + part_bytes
        part, done = 0, 0
    digits = "".join(f"{c:08x}" for c in chunk_crc).encode("ascii")
    at = prefix.index(b'"chunk_checksums":"') + len(b'"chunk_checksums":"')
    prefix = prefix[:at] + digits + prefix[at + len(digits) :]
    # header_checksum: the prefix with both checksums' digits read as "0", then cu_seqlens' bytes.
    head_crc = _crc32_combine(zlib.crc32(prefix), cu_crc, cu_len)
    at = prefix.index(b'"header_checksum":"') + len(b'"header_checksum":"')
    prefix = prefix[:at] + f"{head_crc:08x}".encode("ascii") + prefix[at + 8 :]
    crc = _crc32_combine(zlib.crc32(prefix), data_crc, data_len)
    return _with_digits(prefix, encoded.digits_at, crc)


def _with_digits(prefix: bytes, at: int, crc: int) -> bytes:
    return prefix[:at] + f"{crc:08x}".encode("ascii") + prefix[at + 8 :]


def _gf2_times(mat: tuple[int, ...], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


@functools.lru_cache(maxsize=64)
def _zeros_operator(nbytes: int) -> tuple[int, ...]:
    """The GF(2) matrix (32 columns) that advances a CRC-32 over ``nbytes`` zero bytes."""
    op = (0xEDB88320, *(1 << i for i in range(31)))  # one zero bit
    for _ in range(3):  # one zero byte
        op = tuple(_gf2_times(op, col) for col in op)
    result = None
    while nbytes:
        if nbytes & 1:
            result = op if result is None else tuple(_gf2_times(op, col) for col in result)
        nbytes >>= 1
        if nbytes:
            op = tuple(_gf2_times(op, col) for col in op)
    return result if result is not None else tuple(1 << i for i in range(32))


def _crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len(B)`` (zlib's
    crc32_combine, which Python's zlib module does not expose)."""
    if not len2:
        return crc1
    return _gf2_times(_zeros_operator(len2), crc1) ^ crc2


def _encode(trace: RoutingTrace, chunk_bytes: int = CHUNK_BYTES) -> _Encoded:
    """The file as pieces: the placeholder prefix, then each tensor's bytes, in file order."""
    tensors = _tensors_of(trace)
    # File order: larger elements first, then by name. Every tensor then starts at a multiple
    # of its element size, so readers can view the bytes in place (safetensors does the same).
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    entries: dict[str, TensorEntry] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        entries[name] = TensorEntry(
            dtype=_DTYPE_NAMES[t.dtype], shape=tuple(t.shape), start=offset, end=offset + nbytes
        )
        offset += nbytes
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, found {chunk_bytes!r}")
    T = trace.num_tokens
    row_bytes = max(1, tensors["experts"][:1].numel() * tensors["experts"].element_size())
    chunk_rows = max(1, chunk_bytes // row_bytes)
    chunked = T > chunk_rows
    checked = trace.rows_checked()
    metadata = {
        "format": FORMAT_NAME,
        "version": CHECKED_FORMAT_VERSION if checked else CHUNKED_FORMAT_VERSION if chunked else FORMAT_VERSION,
        "layer_ids": json.dumps(list(trace.layer_ids), separators=(",", ":")),
        "num_experts": str(trace.num_experts),
        "top_k": str(trace.top_k),
        "meta": _canonical_json(dict(trace.meta)),
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "checksum": _PLACEHOLDER,
    }
    if chunked:
        metadata["chunk_rows"] = str(chunk_rows)
        metadata["chunk_checksums"] = _PLACEHOLDER * -(-T // chunk_rows)
        metadata["header_checksum"] = _PLACEHOLDER
    if checked:
        metadata[_ROWS_CHECKED] = "1"
    # The checksum covers the file as written with the checksum digits set to "0". The digits
    # have a fixed width, so filling them in later moves no byte.
    prefix = _encode_prefix(metadata, entries)
    if len(prefix) - 8 > _MAX_HEADER_BYTES:
        raise TraceFormatError(
            f"the .rrt header of this trace would be {len(prefix) - 8} bytes, above the "
            f"{_MAX_HEADER_BYTES}-byte limit readers accept (its meta holds {len(metadata['meta'])} bytes "
            f"of JSON and layer_ids {len(trace.layer_ids)} entries); keep meta to short provenance strings"
        )
    # JSON strings escape their quotes, so the unquoted field occurs once, as the reader requires.
    field = b'"checksum":"' + _PLACEHOLDER.encode("ascii") + b'"'
    digits_at = prefix.index(field) + len(field) - 9
    payloads = [_bytes_view(tensors[name]) for name in order]
    if not chunked:
        return _Encoded(prefix, payloads, digits_at)
    return _Encoded(prefix, payloads, digits_at, names=tuple(order), chunk_rows=chunk_rows, num_rows=T)


def _tensors_of(trace: RoutingTrace) -> dict[str, torch.Tensor]:
    def host(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu").contiguous()

    experts_TLK = host(trace.experts)
    dtype = expert_dtype(trace.num_experts)
    if experts_TLK.dtype != dtype:
        # Traces built by RoutingTrace.unchecked may carry a wider dtype; the file always uses the compact one.
        # Narrowing would wrap out-of-range ids silently, so check the range first.
        if experts_TLK.numel():
            lo, hi = (int(x) for x in torch.aminmax(experts_TLK))
            if lo < 0 or hi >= trace.num_experts:
                raise ExpertIdError(
                    f"experts hold ids in [{lo}, {hi}], outside [0, {trace.num_experts}); build the trace "
                    "with RoutingTrace(...) to find the row, then save it"
                )
        experts_TLK = experts_TLK.to(dtype)
    out = {"experts": experts_TLK, "cu_seqlens": host(trace.cu_seqlens).to(torch.int64)}
    if trace.valid is not None:
        out["valid"] = host(trace.valid).to(torch.bool)
    if trace.gates is not None:
        gates_TLK = host(trace.gates)
        if gates_TLK.dtype not in (_DTYPES[n] for n in _GATE_DTYPES):
            raise GatesError(
                f"gates have dtype {gates_TLK.dtype}, which a .rrt file cannot store; "
                "cast them to float32, bfloat16, float16 or float64 before saving"
            )
        out["gates"] = gates_TLK
    return out


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in host (little-endian) order, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _canonical_json(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _encode_prefix(metadata: Mapping[str, str], entries: Mapping[str, TensorEntry]) -> bytes:
    """8-byte length + canonical JSON header, space-padded so the data starts 8-byte aligned."""
    table: dict[str, object] = {"__metadata__": dict(metadata)}
    for name, e in entries.items():
        table[name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
    header = _canonical_json(table).encode("ascii")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def _atomic_write(path: str, encoded: _Encoded, *, fsync: bool) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never clobber someone else's temp file; mode 0o666 lets the umask decide, as open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            # One pass over the payload: each block is checksummed right before it is written,
            # while it is in cache; then the final header goes over the placeholder (same length).
            prefix = _stream(encoded, f.write)
            f.seek(0)
            f.write(prefix)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync and os.name == "posix":
        # Make the rename itself durable.
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- reading -------------------------------------------------------------------------------
def read_header(path: str | os.PathLike[str]) -> TraceFileHeader:
    """Parse and check the header of a ``.rrt`` file, without reading the tensor data.

    Checks the container (length, JSON, tensor table, file size), the format name and the
    version. Does not verify the checksum; :func:`load` does.

    Raises:
        TraceFormatError: the message names the path and the problem.
        FileNotFoundError, PermissionError: the file cannot be opened.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _read_prefix(f, path)[0]


def load(
    path: str | os.PathLike[str],
    *,
    mmap: bool = False,
    validate: bool = True,
    device: torch.device | str = "cpu",
    sequences: Sequence[int] | torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
) -> RoutingTrace:
    """Read a ``.rrt`` file written by :func:`save`.

    The header is checked (format, version, fields), then the CRC-32 over the whole file is
    verified against the bytes that become the trace's tensors, then the trace is built.

    By default the data section is read once into memory the trace owns, and the checksum is
    computed block by block as the bytes arrive (one pass over the file, no second copy; from 64 MiB
    with more than one torch thread, on a helper thread behind the read): the trace is then
    independent of the file, whatever happens to it afterwards.

    Args:
        path: the file.
        mmap: opt-in: map the file instead of reading it. The tensors view the page cache (no
            copy; copy-on-write, so writing to them never changes the file) and the mapping lives
            as long as they do. Only for files nobody modifies in place while the trace is alive:
            bytes another writer changes in place show through a trace whose checksum was
            verified, and truncating the file kills the reading process with SIGBUS when it
            touches a page past the new end. :func:`save` never does either (it writes a new
            file and renames it over the old one), so mapping files only ever written by
            :func:`save` is safe.
        validate: re-run every RoutingTrace check (id range, duplicate ids, monotone
            ``cu_seqlens``, finite gates); O(T), over cache-sized blocks without copies of the
            ids. The duplicate check, the costly one, is skipped for a file whose writer checked
            the rows (format 1.2, ``rows_checked``; the checksums vouch that they are the rows
            it checked); otherwise it runs on torch's intra-op threads
            (``torch.get_num_threads()``), with more than one of them beside the read: rows
            already read are checked while the next are read. The trace returned knows that its
            rows passed (``rows_checked()``). With ``False`` only the O(1) structural checks run
            and the checksum vouches for the content. To check a file's rows again whatever it
            says, load with ``validate=False`` and build ``trace.replace(check=True)``.
        device: where the returned tensors live. The checksum is verified on the host first.
        sequences: only these sequences, in this order (as ``trace.select_sequences``). From a
            chunked file (format 1.1, see docs/FORMAT.md) only the chunks of rows that hold them
            are read, each verified against its own checksum, after the header and
            ``cu_seqlens`` are verified against theirs; the whole-file checksum is not computed.
            From a file without chunks (version 1.0, or one chunk) the whole file is read and
            verified, then the sequences selected.
        layers: only these global layer ids, in this order (as ``trace.select_layers``). The
            rows' bytes of every layer are still read: a row holds its layers side by side.

    Returns:
        The RoutingTrace, with ``experts [T, L, K]`` in the compact dtype for ``num_experts``.

    Raises:
        TraceFormatError: truncated or corrupt file (including one that shrinks while it is
            read), not a routereplay trace, unknown format version, checksum mismatch, missing or
            malformed field or tensor. The message names the path and the problem.
        TraceError subclasses (ExpertIdError, ...): ``validate=True`` and the stored routes are
            not a valid trace; TraceMismatchError for a layer the trace lacks.
        IndexError: a sequence index out of range.
        FileNotFoundError, PermissionError: the file cannot be opened.
    """
    _check_host_byte_order()
    path = os.fspath(path)
    if sequences is not None or layers is not None:
        trace = _load_part(path, sequences, validate=validate, mmap=mmap)
        if layers is not None:
            trace = trace.select_layers(layers)
        return trace if torch.device(device).type == "cpu" else trace.to(device)
    # Unbuffered: the data section is read straight into the trace's memory, block by block.
    distinct = False
    with open(path, "rb", buffering=0) as f:
        header, prefix = _read_prefix(f, path)
        if not mmap:
            _require_tensors(path, header)
            buffer = host_empty((header.data_size,), torch.uint8)
            with _RepeatScan.beside_read(buffer, header, validate and not _rows_checked(header)) as scan:
                _read_data(f, path, header, prefix, buffer, scan)
                distinct = scan is not None and scan.distinct()
    if mmap:
        tensors = _read_tensors(path, header)
        _verify_checksum(path, header, prefix, tensors)
    else:
        tensors = _views(buffer, header)
    return _build(path, header, tensors, validate=validate, device=device, distinct_rows=distinct)


def _read_data(f, path: str, header: TraceFileHeader, prefix: bytes, buffer: torch.Tensor, scan=None) -> None:
    """The data section read from ``f`` (positioned after the header) into ``buffer`` (uint8, of
    the data's size), checksummed block by block as it is read; ``scan`` is told how far it got."""
    n = header.data_size
    view = memoryview(buffer.numpy()) if n else memoryview(b"")
    crc = [_prefix_crc(path, header, prefix)]

    def fold(lo: int, hi: int) -> None:
        crc[0] = zlib.crc32(view[lo:hi], crc[0])

    # With no repeat scan on the other threads, the checksum runs on a helper thread behind the read
    # (both release the GIL; one worker folds the blocks in order), as save does beside its writes.
    threaded = scan is None and n >= _CRC_THREAD_BYTES and torch.get_num_threads() > 1
    helper = ThreadPoolExecutor(1, thread_name_prefix="routereplay-load-crc") if threaded else contextlib.nullcontext()
    with helper as pool:
        folds, pos = [], 0
        while pos < n:
            got = f.readinto(view[pos : pos + _IO_BLOCK])
            if not got:
                raise _fail(
                    path,
                    f"file shrank while being read: the header describes {n} bytes of tensor data but only {pos} "
                    "could be read; load it again once the writer is done",
                )
            if pool is None:
                fold(pos, pos + got)
            else:
                folds.append(pool.submit(fold, pos, pos + got))
            pos += got
            if scan is not None:
                scan.read_to(pos)
        for done in folds:
            done.result()
    _check_crc(path, header, crc[0])


class _RepeatScan:
    """The repeat check of a file's expert ids (:func:`first_duplicate_row`), on threads beside the
    read: while ``load`` reads and checksums the next blocks (both release the GIL), rows already
    read are checked. Its only answer is :meth:`distinct`, "no row, valid or not, names an expert
    twice", which lets validation skip that check; any repeat (or a corrupt file) leaves every check
    to validation, so errors, rows and messages are those of a load without it.

    Runs where the check would use threads anyway (``_duplicate_workers``: torch's thread count,
    on a million rows or more), the reader being one of them, and only on files without a ``valid``
    mask: the zeroed rows of a mask repeat expert 0, so such a file would always fall back.
    """

    SPAN_BYTES = 32 << 20  # ids per task (~20 ms of checks): few buffer allocations, 8-128 MB measured alike

    def __init__(self, experts_NLK: torch.Tensor, start: int, workers: int) -> None:
        self._experts, self._start = experts_NLK, start  # the ids, and their first byte in the data section
        self._row_bytes = experts_NLK[:1].numel() * experts_NLK.element_size()
        self._span_rows = max(1, self.SPAN_BYTES // self._row_bytes)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="routereplay-load-check")
        self._sent = 0  # rows sent to the pool
        self._tasks: list = []  # (first row, end row, future)

    @classmethod
    @contextlib.contextmanager
    def beside_read(cls, buffer: torch.Tensor, header: TraceFileHeader, validate: bool):
        """A scan of ``header``'s experts in ``buffer`` when it is worth threads, else None."""
        e = header.tensors["experts"]
        dtype = _DTYPES.get(e.dtype)
        ok = (
            validate and "valid" not in header.tensors and e.dtype in _EXPERT_DTYPES and len(e.shape) == 3
            and e.shape[2] > 1 and 0 <= e.start <= e.end == e.start + math.prod(e.shape) * dtype.itemsize
            and e.end <= buffer.numel()
        )
        workers = _duplicate_workers(e.shape[0] * e.shape[1]) - 1 if ok else 0  # the reader is one more
        if workers < 1:
            yield None
            return
        scan = cls(buffer[e.start : e.end].view(dtype).view(e.shape), e.start, workers)
        try:
            yield scan
        finally:
            for _, _, task in scan._tasks:
                task.cancel()
            scan._pool.shutdown(wait=True)

    def read_to(self, pos: int) -> None:
        """The data section is read up to byte ``pos``: send the rows completed since, by spans."""
        T = self._experts.shape[0]
        ready = min(T, max(0, pos - self._start) // self._row_bytes)
        while ready - self._sent >= self._span_rows or (ready == T and self._sent < T):
            end = min(ready, self._sent + self._span_rows)
            task = self._pool.submit(first_duplicate_row, self._experts[self._sent : end], workers=1)
            self._tasks.append((self._sent, end, task))
            self._sent = end

    def distinct(self) -> bool:
        """After the read: True when no row names an expert twice. Spans the pool has not started
        are taken back and checked here, on torch's threads, beside the pool's last ones."""
        left = [(lo, hi) for lo, hi, task in self._tasks if task.cancel()]
        if left and first_duplicate_row(self._experts[left[0][0] : left[-1][1]]) >= 0:
            return False  # the spans taken back are the last ones sent: one run of rows
        return all(task.result() < 0 for _, _, task in self._tasks if not task.cancelled())


def _views(buffer: torch.Tensor, header: TraceFileHeader) -> dict[str, torch.Tensor]:
    """Each tensor of the header as a view of the data section ``buffer``."""
    return {name: buffer[e.start : e.end].view(_DTYPES[e.dtype]).view(e.shape) for name, e in header.tensors.items()}


def _load_part(path: str, sequences, *, validate: bool, mmap: bool) -> RoutingTrace:
    """:func:`load` with ``sequences``: the chunks holding them, read and verified one by one."""
    with open(path, "rb", buffering=0) as f:
        header, prefix = _read_prefix(f, path)
        _require_tensors(path, header)
        if "chunk_rows" not in header.metadata:
            f.close()
            full = load(path, mmap=mmap, validate=validate)
            return full if sequences is None else full.select_sequences(_as_index(sequences, full.num_seqs))
        fields = _parse_fields(path, header)
        data_start = 8 + header.header_size
        cu_entry = header.tensors["cu_seqlens"]
        cu_raw = _pread(f, path, data_start + cu_entry.start, cu_entry.end - cu_entry.start)
        _check_header_crc(path, header, prefix, cu_raw)
        cu = np.frombuffer(cu_raw, dtype=np.int64)
        T = header.tensors["experts"].shape[0]
        if cu[0] != 0 or cu[-1] != T or (np.diff(cu) < 0).any():
            raise _fail(
                path,
                f"cu_seqlens runs from {int(cu[0])} to {int(cu[-1])} or decreases, expected 0 .. T={T}; {_CORRUPT}",
            )
        B = cu.size - 1
        idx = list(range(B)) if sequences is None else _as_index(sequences, B)
        spans = [(int(cu[b]), int(cu[b + 1]) - int(cu[b])) for b in idx]
        R = int(header.metadata["chunk_rows"])
        needed, runs = _chunk_runs(spans, R)
        row_names = [name for name in header.tensors if name in _ROW_TENSORS]
        parts, chunk_crc = _read_runs(f, path, header, row_names, runs, R, T)
    _check_chunk_crcs(path, header, needed, chunk_crc, R, T)
    out = _gather_spans(header, row_names, parts, runs, spans, R, T)
    del parts
    cu_B1 = torch.zeros(len(spans) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor([n for _, n in spans], dtype=torch.int64), 0, out=cu_B1[1:])
    built = {
        "experts": out["experts"],
        "cu_seqlens": cu_B1,
        "layer_ids": fields["layer_ids"],
        "num_experts": fields["num_experts"],
        "valid": out.get("valid"),
        "gates": out.get("gates"),
        "meta": fields["meta"],
    }
    return _trace(built, header, validate=validate)


def _rows_checked(header: TraceFileHeader) -> bool:
    """The file's writer knew that every valid row names top_k distinct experts (format 1.2): its
    checksums vouch that the rows are the ones it checked, so validation skips the repeat check."""
    return header.metadata.get(_ROWS_CHECKED) == "1"


def _trace(parts: dict, header: TraceFileHeader, *, validate: bool, distinct_rows: bool = False) -> RoutingTrace:
    """The trace of a file's checksummed ``parts``: validated (less the repeat check when the rows were
    checked beside the read, ``distinct_rows``, or by the file's writer), or built unchecked, knowing
    what the writer said of its rows (its word, sealed by the checksums, holds without validation too)."""
    if not validate:
        return RoutingTrace.unchecked(**parts, rows_checked=_rows_checked(header))
    if distinct_rows or _rows_checked(header):
        return RoutingTrace._with_distinct_rows(**parts)
    return RoutingTrace(**parts)


def _chunk_runs(spans: list[tuple[int, int]], R: int) -> tuple[list[int], list[list[int]]]:
    """The chunks of ``R`` rows that the row ``spans`` (start, length) touch, sorted, and the same
    chunks merged into runs ``[first chunk, last chunk + 1]`` of consecutive chunks."""
    needed = sorted({c for start, n in spans if n for c in range(start // R, (start + n - 1) // R + 1)})
    runs: list[list[int]] = []  # [first chunk, last chunk + 1], consecutive chunks merged
    for c in needed:
        if runs and runs[-1][1] == c:
            runs[-1][1] = c + 1
        else:
            runs.append([c, c + 1])
    return needed, runs


def _read_runs(
    f, path: str, header: TraceFileHeader, row_names: list[str], runs: list[list[int]], R: int, T: int
) -> tuple[dict[str, list[torch.Tensor]], dict[int, int]]:
    """Read each row tensor's rows of each run; return them (per tensor, one tensor per run) and the
    crc32 of each chunk read.

    Tensors are read in file order, so that each chunk's checksum chains over its parts in file
    order, as the writer computed it.
    """
    data_start = 8 + header.header_size
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in row_names}
    chunk_crc: dict[int, int] = {}
    for name in row_names:
        e = header.tensors[name]
        row_bytes = (e.end - e.start) // T if T else 0
        for c0, c1 in runs:
            r0, r1 = c0 * R, min(c1 * R, T)
            buf = host_empty(((r1 - r0) * row_bytes,), torch.uint8)
            _pread_into(f, path, data_start + e.start + r0 * row_bytes, buf.numpy())
            view = memoryview(buf.numpy())
            for c in range(c0, c1):
                lo, hi = (c * R - r0) * row_bytes, (min((c + 1) * R, T) - r0) * row_bytes
                chunk_crc[c] = zlib.crc32(view[lo:hi], chunk_crc.get(c, 0))
            parts[name].append(buf.view(_DTYPES[e.dtype]).view(r1 - r0, *e.shape[1:]))
    return parts, chunk_crc


def _check_chunk_crcs(
    path: str, header: TraceFileHeader, needed: list[int], chunk_crc: dict[int, int], R: int, T: int
) -> None:
    """Each chunk read has the crc32 the header's ``chunk_checksums`` records for it."""
    digits = header.metadata["chunk_checksums"]
    for c in needed:
        want, found = digits[8 * c : 8 * c + 8], f"{chunk_crc[c]:08x}"
        if found != want:
            raise _fail(
                path,
                f"chunk {c} (rows {c * R} to {min((c + 1) * R, T) - 1}) fails its checksum: the header records "
                f"crc32 {want} but its bytes give {found}; the file is corrupt there (bit flip, partial "
                "overwrite), write it again with routereplay.save",
            )


def _gather_spans(
    header: TraceFileHeader,
    row_names: list[str],
    parts: dict[str, list[torch.Tensor]],
    runs: list[list[int]],
    spans: list[tuple[int, int]],
    R: int,
    T: int,
) -> dict[str, torch.Tensor]:
    """The selected sequences' rows (``spans``, in order) of each row tensor, copied from the runs read."""
    run_rows = [(c0 * R, min(c1 * R, T)) for c0, c1 in runs]
    run_at = [r0 for r0, _ in run_rows]
    total = sum(n for _, n in spans)
    out: dict[str, torch.Tensor] = {}
    for name in row_names:
        e = header.tensors[name]
        dst = host_empty((total, *e.shape[1:]), _DTYPES[e.dtype])
        row = 0
        for start, n in spans:
            if n:
                k = bisect.bisect_right(run_at, start) - 1
                dst[row : row + n] = parts[name][k][start - run_rows[k][0] : start - run_rows[k][0] + n]
                row += n
        out[name] = dst
    return out


def _as_index(sequences, B: int) -> list[int]:
    idx = torch.as_tensor(sequences, dtype=torch.int64).reshape(-1).tolist()
    bad = [i for i in idx if not -B <= i < B]
    if bad:
        raise IndexError(f"sequence indices {bad} out of range for a trace of {B} sequences")
    return [i % B for i in idx]


def _pread(f, path: str, offset: int, n: int) -> bytes:
    raw = os.pread(f.fileno(), n, offset)
    if len(raw) != n:
        raise _fail(path, f"file shrank while being read: expected {n} bytes at offset {offset}, got {len(raw)}")
    return raw


def _pread_into(f, path: str, offset: int, dst: np.ndarray) -> None:
    view, pos = memoryview(dst), 0
    while pos < dst.nbytes:
        got = os.preadv(f.fileno(), [view[pos : pos + _IO_BLOCK * 16]], offset + pos)
        if not got:
            raise _fail(
                path, f"file shrank while being read: expected {dst.nbytes} bytes at offset {offset}, got {pos}"
            )
        pos += got


def _check_header_crc(path: str, header: TraceFileHeader, prefix: bytes, cu_raw: bytes) -> None:
    """``header_checksum``: the prefix with the digits of ``checksum`` and ``header_checksum`` read
    as "0", then the bytes of ``cu_seqlens``."""
    zeroed = prefix
    for field in ("checksum", "header_checksum"):
        key = b'"' + field.encode("ascii") + b'":"'
        at = zeroed.find(key + header.metadata[field].encode("ascii") + b'"')
        if at < 0:
            raise _fail(
                path, f"the {field} field is not written in the canonical form this reader verifies; {_CORRUPT}"
            )
        at += len(key)
        zeroed = zeroed[:at] + _PLACEHOLDER.encode("ascii") + zeroed[at + 8 :]
    found = f"{zlib.crc32(cu_raw, zlib.crc32(zeroed)):08x}"
    want = header.metadata["header_checksum"]
    if found != want:
        raise _fail(
            path,
            f"header checksum mismatch: the header records crc32 {want} but the header and cu_seqlens give "
            f"{found}; the file is corrupt, write it again with routereplay.save",
        )


def loads(
    data: bytes | bytearray | memoryview, *, validate: bool = True, device: torch.device | str = "cpu"
) -> RoutingTrace:
    """Read a trace from the bytes of a ``.rrt`` file (what :func:`dumps` returns).

    Checks exactly what :func:`load` checks, in the same order. The tensors own their memory:
    the data section is copied once (``data`` may be reused or freed afterwards).

    Args:
        data: the whole file's bytes.
        validate, device: as for :func:`load`.

    Raises:
        TraceFormatError: as for :func:`load`; the message starts with ``<bytes>`` where
            :func:`load` names the path.
        TraceError subclasses: ``validate=True`` and the stored routes are not a valid trace.
    """
    _check_host_byte_order()
    label = "<bytes>"
    view = memoryview(data).cast("B")
    header, prefix = _read_prefix(_BytesReader(view), label, file_size=view.nbytes)
    _require_tensors(label, header)
    data_start = 8 + header.header_size
    # One copy of the data section into memory torch owns, checksummed block by block as it is
    # copied, then a view per tensor.
    buffer = host_empty((header.data_size,), torch.uint8)
    dst = buffer.numpy()
    src = np.frombuffer(view, dtype=np.uint8, count=header.data_size, offset=data_start)
    crc = _prefix_crc(label, header, prefix)
    for pos in range(0, header.data_size, _IO_BLOCK):
        dst[pos : pos + _IO_BLOCK] = src[pos : pos + _IO_BLOCK]
        crc = zlib.crc32(dst[pos : pos + _IO_BLOCK], crc)
    _check_crc(label, header, crc)
    return _build(label, header, _views(buffer, header), validate=validate, device=device)


class _BytesReader:
    """``read(n)`` over a memoryview without copying the rest of it (io.BytesIO would)."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def read(self, n: int) -> bytes:
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += len(out)
        return out


def _build(
    path: str,
    header: TraceFileHeader,
    tensors: dict[str, torch.Tensor],
    *,
    validate: bool,
    device,
    distinct_rows: bool = False,
) -> RoutingTrace:
    """The trace from checksummed host tensors: parse the fields, move, then validate or run the O(1)
    checks. ``distinct_rows``: the ids were checked for repeats beside the read (see _RepeatScan);
    a file whose writer checked them (``rows_checked``) skips that check too."""
    fields = _parse_fields(path, header)
    if torch.device(device).type != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    parts = {
        "experts": tensors["experts"],
        "cu_seqlens": tensors["cu_seqlens"],
        "layer_ids": fields["layer_ids"],
        "num_experts": fields["num_experts"],
        "valid": tensors.get("valid"),
        "gates": tensors.get("gates"),
        "meta": fields["meta"],
    }
    if validate:
        trace = _trace(parts, header, validate=True, distinct_rows=distinct_rows)
        if trace.experts is not parts["experts"] and torch.device(device).type == "cpu":
            # Validation built new ids (invalid rows held non-zero bytes): copy the small tensors so
            # they do not keep the whole data section alive next to the new ids.
            own = lambda t: None if t is None else t.clone()
            trace = trace.replace(
                check=False,
                rows_checked=trace.rows_checked(),
                cu_seqlens=own(trace.cu_seqlens),
                valid=own(trace.valid),
                gates=own(trace.gates),
            )
        return trace
    # Without validation, still refuse what would break indexing downstream (O(1) checks).
    cu_seqlens_B1, T = parts["cu_seqlens"], parts["experts"].shape[0]
    if int(cu_seqlens_B1[0]) != 0 or int(cu_seqlens_B1[-1]) != T:
        raise _fail(
            path,
            f"cu_seqlens runs from {int(cu_seqlens_B1[0])} to {int(cu_seqlens_B1[-1])}, "
            f"expected 0 to T={T}; {_CORRUPT}",
        )
    return _trace(parts, header, validate=False)


def _fail(path: str, problem: str) -> TraceFormatError:
    return TraceFormatError(f"{path}: {problem}")


_CORRUPT = "the file is corrupt; write it again with routereplay.save"


def _read_prefix(f, path: str, file_size: int | None = None) -> tuple[TraceFileHeader, bytes]:
    """Read and check the 8-byte length and the JSON header; return them with the raw bytes.

    Nothing is allocated from a declared size before it is checked against ``file_size`` (the
    bytes actually present) and the header limit.
    """
    if file_size is None:
        file_size = os.fstat(f.fileno()).st_size
    head, header_size, raw, table = _read_header_json(f, path, file_size)
    metadata, version, minor = _trace_metadata(path, table)
    tensors = _parse_table(path, table)
    _check_data_size(path, tensors, have=file_size - 8 - header_size)
    _check_metadata_fields(path, metadata, tensors, version, minor)
    header = TraceFileHeader(
        path=path,
        file_size=file_size,
        header_size=header_size,
        version=version,
        checksum_algorithm=metadata["checksum_algorithm"],
        checksum=metadata["checksum"],
        metadata=MappingProxyType(dict(metadata)),
        tensors=MappingProxyType(tensors),
    )
    return header, head + raw


def _read_header_json(f, path: str, file_size: int) -> tuple[bytes, int, bytes, dict]:
    """Read the 8-byte header length and the header; return the length bytes, the length, the header
    bytes and the header parsed as a JSON object.

    The declared length is checked against the bytes present and the header limit before it is
    read, and the JSON's nesting depth before it is parsed.
    """
    head = f.read(8)
    if len(head) < 8:
        raise _fail(
            path,
            f"file is truncated: it has {file_size} bytes, fewer than the 8-byte header length that "
            "starts a safetensors container; it was cut short or is not a trace file",
        )
    (header_size,) = struct.unpack("<Q", head)
    if header_size > file_size - 8:
        raise _fail(
            path,
            f"file is truncated or its header length is corrupt: the first 8 bytes declare a "
            f"{header_size}-byte header but only {file_size - 8} bytes follow",
        )
    if header_size > _MAX_HEADER_BYTES:
        raise _fail(
            path,
            f"declares a {header_size}-byte header, above the {_MAX_HEADER_BYTES}-byte limit for a trace "
            f"header (a real one is a few KB); {_CORRUPT}",
        )
    raw = f.read(header_size)
    if len(raw) < header_size:
        raise _fail(path, f"file shrank while being read: expected {header_size} header bytes, got {len(raw)}")
    depth = _json_depth(raw, stop_above=_MAX_HEADER_DEPTH)
    if depth > _MAX_HEADER_DEPTH:
        raise _fail(
            path,
            f"header nests JSON at least {depth} levels deep, expected at most {_MAX_HEADER_DEPTH} "
            f"(object > tensor entry > shape list); {_CORRUPT}, or it is not a safetensors file",
        )
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"header is not valid JSON ({e}); {_CORRUPT}, or it is not a safetensors file") from None
    if not isinstance(table, dict):
        raise _fail(path, f"header must be a JSON object, found {type(table).__name__}; {_CORRUPT}")
    return head, header_size, raw, table


def _trace_metadata(path: str, table: dict) -> tuple[dict, str, int]:
    """Pop the ``__metadata__`` of a header's table and check that it names a routereplay trace of a
    format version this reader reads; return the metadata, the version string and its minor number."""
    metadata = table.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(
            path,
            "is a safetensors file without string __metadata__, so not a routereplay trace "
            "(write traces with routereplay.save)",
        )
    fmt = metadata.get("format")
    if fmt != FORMAT_NAME:
        found = "no 'format' field" if fmt is None else f"format {fmt!r}"
        raise _fail(
            path,
            f"not a routereplay trace: its safetensors metadata has {found}, expected format "
            f"{FORMAT_NAME!r} (write traces with routereplay.save)",
        )
    version = metadata.get("version")
    match = _VERSION_RE.fullmatch(version) if version is not None else None
    if match is None:
        raise _fail(
            path, f"format version field is {version!r}, expected 'MAJOR' or 'MAJOR.MINOR' such as '1'; {_CORRUPT}"
        )
    major = int(match.group(1))
    if major != _MAJOR:
        from routereplay.core.version import __version__

        if major > _MAJOR:
            raise _fail(
                path,
                f"trace format version {version} is newer than routereplay {__version__} reads (format "
                f"version {_MAJOR}.x); upgrade routereplay (pip install -U routereplay) to read it",
            )
        raise _fail(
            path,
            f"trace format version {version} was never written by routereplay, which reads "
            f"format version {_MAJOR}.x; {_CORRUPT}",
        )
    return metadata, version, int(match.group(2) or 0)


def _check_data_size(path: str, tensors: dict[str, TensorEntry], have: int) -> None:
    """The ``have`` bytes after the header are exactly the tensor data the table describes."""
    data_size = max((e.end for e in tensors.values()), default=0)
    if have < data_size:
        raise _fail(
            path,
            f"file is truncated: the header describes {data_size} bytes of tensor data but only {have} "
            "follow it; the write or copy was cut short, write the file again",
        )
    if have > data_size:
        raise _fail(
            path, f"has {have - data_size} unexpected bytes after the {data_size} bytes of tensor data; {_CORRUPT}"
        )


def _check_metadata_fields(
    path: str, metadata: dict, tensors: dict[str, TensorEntry], version: str, minor: int
) -> None:
    """Check the metadata fields and tensor names of a version-``version`` trace: no unknown ones in a
    version this reader knows fully, the required fields present, the checksum's algorithm and
    form, and the chunk fields (version 1.1 and later) all present and well formed if any is."""
    if minor <= _MINOR:
        # A newer minor version may add fields and tensors that this reader ignores; in a
        # version this reader knows fully, an unknown name means a damaged header.
        known = _REQUIRED_FIELDS + (_CHUNK_FIELDS if minor >= 1 else ()) + ((_ROWS_CHECKED,) if minor >= 2 else ())
        unknown = sorted(set(metadata) - set(known))
        if unknown:
            raise _fail(path, f"unknown metadata field(s) {unknown} in a version-{version} trace; {_CORRUPT}")
        unknown = sorted(set(tensors) - set(_REQUIRED_TENSORS) - set(_OPTIONAL_TENSORS))
        if unknown:
            raise _fail(path, f"unknown tensor(s) {unknown} in a version-{version} trace; {_CORRUPT}")
    for name in _REQUIRED_FIELDS:
        if name not in metadata:
            raise _fail(
                path, f"missing metadata field {name!r}; a version-{version} trace needs {list(_REQUIRED_FIELDS)}"
            )
    algorithm = metadata["checksum_algorithm"]
    if algorithm != CHECKSUM_ALGORITHM:
        raise _fail(
            path, f"checksum algorithm {algorithm!r} is unknown; this routereplay verifies {CHECKSUM_ALGORITHM!r}"
        )
    checksum = metadata["checksum"]
    if not _CHECKSUM_RE.fullmatch(checksum):
        raise _fail(path, f"checksum field is {checksum!r}, expected 8 lowercase hex digits; {_CORRUPT}")
    if minor >= 1 and any(name in metadata for name in _CHUNK_FIELDS):
        _check_chunk_fields(path, metadata, tensors)
    if minor >= 2 and metadata.get(_ROWS_CHECKED, "1") != "1":
        raise _fail(path, f"field {_ROWS_CHECKED!r} is {_short(metadata[_ROWS_CHECKED])}, expected '1'; {_CORRUPT}")


def _check_chunk_fields(path: str, metadata: dict, tensors: dict[str, TensorEntry]) -> None:
    """A chunked trace has all of ``_CHUNK_FIELDS``: a positive row count per chunk, the header's
    checksum, and 8 hex digits of checksum per chunk of the ``experts`` rows."""
    absent = [name for name in _CHUNK_FIELDS if name not in metadata]
    if absent:
        raise _fail(
            path,
            f"has some chunk fields but not {absent}; a chunked trace has all of {list(_CHUNK_FIELDS)}; {_CORRUPT}",
        )
    if not _COUNT_RE.fullmatch(metadata["chunk_rows"]) or len(metadata["chunk_rows"]) > 19:
        raise _fail(
            path,
            f"field 'chunk_rows' is {_short(metadata['chunk_rows'])}, expected a positive decimal integer; {_CORRUPT}",
        )
    if not _CHECKSUM_RE.fullmatch(metadata["header_checksum"]):
        raise _fail(
            path,
            f"field 'header_checksum' is {_short(metadata['header_checksum'])}, "
            f"expected 8 lowercase hex digits; {_CORRUPT}",
        )
    experts = tensors.get("experts")
    rows = experts.shape[0] if experts is not None and experts.shape else 0
    want = 8 * -(-rows // int(metadata["chunk_rows"]))
    digits = metadata["chunk_checksums"]
    if len(digits) != want or not _HEX_RE.fullmatch(digits):
        raise _fail(
            path,
            f"field 'chunk_checksums' holds {len(digits)} characters, expected {want} lowercase hex digits "
            f"(8 per chunk of {metadata['chunk_rows']} rows over {rows} rows); {_CORRUPT}",
        )


def _parse_table(path: str, table: dict) -> dict[str, TensorEntry]:
    """Check the tensor table: known dtypes, sizes that match shapes, contiguous offsets."""
    entries = []
    for name, info in table.items():
        ok = (
            isinstance(info, dict)
            and set(info) == {"dtype", "shape", "data_offsets"}
            and isinstance(info["shape"], list)
            and all(type(d) is int and d >= 0 for d in info["shape"])
            and isinstance(info["data_offsets"], list)
            and len(info["data_offsets"]) == 2
            and all(type(o) is int and o >= 0 for o in info["data_offsets"])
        )
        if not ok:
            raise _fail(path, f"tensor {name!r} has a malformed header entry {info!r}; {_CORRUPT}")
        if info["dtype"] not in _DTYPES:
            raise _fail(
                path, f"tensor {name!r} has dtype {info['dtype']!r}, expected one of {sorted(_DTYPES)}; {_CORRUPT}"
            )
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        nbytes = math.prod(shape) * _DTYPES[info["dtype"]].itemsize
        if end - start != nbytes:
            raise _fail(
                path,
                f"tensor {name!r} of dtype {info['dtype']} and shape {list(shape)} needs {nbytes} bytes "
                f"but its data_offsets [{start}, {end}] span {end - start}; {_CORRUPT}",
            )
        entries.append((start, end, name, TensorEntry(dtype=info["dtype"], shape=shape, start=start, end=end)))
    entries.sort()
    position = 0
    for start, end, name, entry in entries:
        if start != position:
            raise _fail(
                path,
                f"tensor {name!r} starts at data byte {start}, expected {position} "
                f"(tensors must tile the data); {_CORRUPT}",
            )
        itemsize = _DTYPES[entry.dtype].itemsize
        if start % itemsize:
            raise _fail(
                path,
                f"tensor {name!r} starts at data byte {start}, not a multiple of its "
                f"{itemsize}-byte elements; {_CORRUPT}",
            )
        position = end
    return {name: entry for _, _, name, entry in entries}


def _require_tensors(path: str, header: TraceFileHeader) -> None:
    for name in _REQUIRED_TENSORS:
        if name not in header.tensors:
            raise _fail(
                path,
                f"missing tensor {name!r}; a trace file holds {list(_REQUIRED_TENSORS)} "
                f"and optionally {list(_OPTIONAL_TENSORS)}",
            )


def _read_tensors(path: str, header: TraceFileHeader) -> dict[str, torch.Tensor]:
    """Memory-map the tensors with safetensors (zero copy on the host) and check their layout."""
    _require_tensors(path, header)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata()
            tensors = {name: f.get_tensor(name) for name in header.tensors}
    except (SafetensorError, OSError) as e:
        raise _fail(path, f"safetensors could not read the file ({e}); {_CORRUPT}") from None
    # Between our header read and safetensors' own, the file may have been replaced; the
    # checksum then fails unless both reads saw the same bytes. Compare the tables first for
    # a clearer message.
    if dict(metadata or {}) != dict(header.metadata) or any(
        (t.dtype, tuple(t.shape)) != (_DTYPES[header.tensors[n].dtype], header.tensors[n].shape)
        for n, t in tensors.items()
    ):
        raise _fail(path, "the file changed while it was being read; load it again once the writer is done")
    return tensors


def _verify_checksum(path: str, header: TraceFileHeader, prefix: bytes, tensors: Mapping[str, torch.Tensor]) -> None:
    """CRC-32 of the whole file with the checksum digits read as '0', in file order."""
    crc = _prefix_crc(path, header, prefix)
    for name in header.tensors:  # already in file order
        crc = zlib.crc32(_bytes_view(tensors[name]), crc)
    _check_crc(path, header, crc)


def _prefix_crc(path: str, header: TraceFileHeader, prefix: bytes) -> int:
    """CRC-32 of the length and header with the checksum digits read as '0' (the file's start)."""
    field = b'"checksum":"' + header.checksum.encode("ascii") + b'"'
    at = prefix.find(field)
    if at < 0 or prefix.find(field, at + 1) >= 0:
        raise _fail(path, "the checksum field is not written in the canonical form this reader verifies; " + _CORRUPT)
    digits = at + len(field) - 9
    return zlib.crc32(prefix[:digits] + _PLACEHOLDER.encode("ascii") + prefix[digits + 8 :])


def _check_crc(path: str, header: TraceFileHeader, crc: int) -> None:
    found = f"{crc:08x}"
    if found != header.checksum:
        raise _fail(
            path,
            f"checksum mismatch: the header records crc32 {header.checksum} but the file's bytes give "
            f"{found}; the file is corrupt (bit flip, partial overwrite), write it again with routereplay.save",
        )


def _parse_fields(path: str, header: TraceFileHeader) -> dict:
    """Decode the metadata fields and check they agree with the tensor shapes (all O(1) or O(L))."""
    md, entries = header.metadata, header.tensors

    def count(name: str, bound: int) -> int:
        value = md[name]
        if not _COUNT_RE.fullmatch(value):
            raise _fail(path, f"field {name!r} is {_short(value)}, expected a positive decimal integer; {_CORRUPT}")
        # Compare the digits before int(): Python refuses to convert more than 4300 of them.
        if len(value) > len(str(bound)) or int(value) > bound:
            raise _fail(path, f"field {name!r} is {_short(value)}, expected at most {bound}; {_CORRUPT}")
        return int(value)

    num_experts = count("num_experts", MAX_NUM_EXPERTS)
    top_k = count("top_k", min(num_experts, MAX_NUM_EXPERTS))
    layer_ids = _field_json(md["layer_ids"])
    if not isinstance(layer_ids, list) or any(type(i) is not int or i < 0 for i in layer_ids):
        found = _short(md["layer_ids"])
        raise _fail(path, f"field 'layer_ids' is {found}, expected a JSON list of non-negative ints; {_CORRUPT}")
    if len(set(layer_ids)) != len(layer_ids):
        raise _fail(path, f"field 'layer_ids' {layer_ids} repeats a layer; {_CORRUPT}")
    meta = _field_json(md["meta"])
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, f"field 'meta' is {_short(md['meta'])}, expected a JSON object of strings; {_CORRUPT}")

    experts, cu = entries["experts"], entries["cu_seqlens"]
    want = _DTYPE_NAMES[expert_dtype(num_experts)]
    if experts.dtype != want or len(experts.shape) != 3:
        raise _fail(
            path,
            f"tensor 'experts' is {experts.dtype} {list(experts.shape)}, expected {want} [T, L, K] "
            f"for num_experts={num_experts}; {_CORRUPT}",
        )
    T, L, K = experts.shape
    if K != top_k or L != len(layer_ids):
        raise _fail(
            path,
            f"tensor 'experts' has shape {list(experts.shape)} but the header says top_k={top_k} and "
            f"{len(layer_ids)} layers {layer_ids}; {_CORRUPT}",
        )
    if cu.dtype != "I64" or len(cu.shape) != 1 or cu.shape[0] < 1:
        raise _fail(path, f"tensor 'cu_seqlens' is {cu.dtype} {list(cu.shape)}, expected I64 [B+1]; {_CORRUPT}")
    valid = entries.get("valid")
    if valid is not None and (valid.dtype != "BOOL" or valid.shape != (T,)):
        raise _fail(path, f"tensor 'valid' is {valid.dtype} {list(valid.shape)}, expected BOOL [{T}]; {_CORRUPT}")
    gates = entries.get("gates")
    if gates is not None and (gates.dtype not in _GATE_DTYPES or gates.shape != (T, L, K)):
        raise _fail(
            path,
            f"tensor 'gates' is {gates.dtype} {list(gates.shape)}, expected a float dtype {list(_GATE_DTYPES)} "
            f"shaped like experts {[T, L, K]}; {_CORRUPT}",
        )
    return {"num_experts": num_experts, "layer_ids": tuple(layer_ids), "meta": meta}


def _short(value: str, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for messages about corrupt fields."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} characters)"


def _field_json(value: str) -> object:
    """A structured metadata field decoded, or None when it is not flat JSON (depth-checked first)."""
    if _json_depth(value.encode("utf-8"), stop_above=_MAX_FIELD_DEPTH) > _MAX_FIELD_DEPTH:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return None


def _json_depth(raw: bytes, *, stop_above: int, chunk: int = 1 << 20) -> int:
    """Deepest nesting of ``[`` / ``{`` outside string literals in the JSON text ``raw``.

    Vectorized over chunks of ``chunk`` bytes (a Python loop per byte would take seconds on a
    16 MiB header), carrying the string / escape / depth state from chunk to chunk. Returns as
    soon as the depth exceeds ``stop_above``. Exact for valid JSON; on invalid JSON it may be
    off after the first syntax error, where ``json.loads`` stops anyway.
    """
    in_string, backslashes, depth, deepest = False, 0, 0, 0
    for begin in range(0, len(raw), chunk):
        a = np.frombuffer(raw, dtype=np.uint8, count=min(chunk, len(raw) - begin), offset=begin)
        n = a.size
        idx = np.arange(n, dtype=np.int64)
        is_bs = a == 0x5C
        # Backslashes right before each byte: a quote after an odd run is escaped.
        last_other = np.maximum.accumulate(np.where(is_bs, -1, idx))
        run_before = np.empty(n, dtype=np.int64)
        run_before[0] = backslashes
        run_before[1:] = idx[:-1] - last_other[:-1]
        run_before[1:] += np.where(last_other[:-1] < 0, backslashes, 0)
        quote = (a == 0x22) & (run_before % 2 == 0)
        quotes = np.cumsum(quote, dtype=np.int64) + int(in_string)
        outside = quotes % 2 == 0
        step = ((a == 0x5B) | (a == 0x7B)).astype(np.int64) - ((a == 0x5D) | (a == 0x7D)).astype(np.int64)
        level = depth + np.cumsum(np.where(outside, step, 0))
        deepest = max(deepest, int(level.max()))
        if deepest > stop_above:
            return deepest
        in_string, depth = bool(quotes[-1] % 2), int(level[-1])
        backslashes = (n - 1 - int(last_other[-1])) + (backslashes if last_other[-1] < 0 else 0)
    return deepest


def _check_host_byte_order() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError(
            ".rrt files are little-endian and routereplay reads and writes them on little-endian hosts only"
        )
