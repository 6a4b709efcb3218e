"""``routereplay inspect FILE [--json]``: summarise a ``.rrt`` trace file.

Prints the shape of the trace (sequences, tokens, layers, top-k, experts, dtypes, size, meta) and,
per MoE layer, how evenly the recorded routes spread over the experts. A corrupt file prints
the reason on stderr and exits with status 2.

Memory stays proportional to the file's real size: nothing is sized by the header's
``num_experts`` alone (a 360-byte file may declare 2**31 experts). Per-layer counts are dense
``[L, E]`` only when that is small next to the ids themselves, and sparse (the experts that
occur) otherwise.

Legend (shape suffixes used in this file):
    T  tokens        L  MoE layers        K  top-k slots        E  experts        N  rows of a chunk
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from routereplay.core import io
from routereplay.core.errors import ExpertIdError, RouteReplayError, TraceFormatError
from routereplay.core.trace import RoutingTrace

__all__ = ["add_arguments", "expert_counts", "format_text", "run", "summarize"]

# Rows per bincount: bounds the int64 copy of the ids to about 2**16 * L * K * 8 bytes.
_CHUNK_ROWS = 1 << 16
# Dense [L, E] counts are used while L * E is at most this or at most the number of ids.
_DENSE_COUNTS = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .rrt trace file written by routereplay.save")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument(
        "--no-validate",
        action="store_true",
        help="skip the O(tokens) trace checks (id range, duplicates); the checksum is still verified",
    )


def run(args: argparse.Namespace) -> int:
    """Print the summary of ``args.file``; return 0, or 2 (message on stderr) if it cannot be read."""

    try:
        check_trace_file(args.file)
        header = io.read_header(args.file)
        trace = io.load(args.file, validate=not args.no_validate)
        summary = summarize(trace, header)
    except (RouteReplayError, OSError) as e:
        print(f"routereplay inspect: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_text(summary))
    return 0


def expert_counts(trace: RoutingTrace) -> torch.Tensor:
    """int64 ``[L, E]``: how often each expert was chosen in each layer, over valid rows and all slots.

    Works through the rows in chunks so that memory stays bounded for large traces.

    Raises:
        ExpertIdError: an id on a valid row is outside ``[0, num_experts)`` (possible only in a
            trace built or loaded without validation).
    """
    L, E = trace.num_layers, trace.num_experts
    counts_LE = torch.zeros(L * E, dtype=torch.int64, device=trace.device)
    for keys_M in _layer_keys(trace):
        counts_LE += torch.bincount(keys_M, minlength=L * E)
    return counts_LE.view(L, E)


def _layer_keys(trace: RoutingTrace):
    """Per chunk of rows, int64 ``l * E + id`` for every valid (row, layer, slot), range-checked.

    One bincount / unique then covers all layers: layer l's ids land in ``[l*E, (l+1)*E)``.
    """
    L, E = trace.num_layers, trace.num_experts
    offsets_L1 = torch.arange(L, device=trace.device).unsqueeze(1) * E
    for start in range(0, trace.num_tokens, _CHUNK_ROWS):
        ids_NLK = trace.experts[start : start + _CHUNK_ROWS]
        if trace.valid is not None:
            ids_NLK = ids_NLK[trace.valid[start : start + _CHUNK_ROWS]]
        if not ids_NLK.numel():
            continue
        # A trace loaded without validation may hold ids out of range; they would be
        # counted against the wrong layer.
        lo, hi = torch.aminmax(ids_NLK)
        if int(lo) < 0 or int(hi) >= E:
            raise ExpertIdError(
                f"rows {start} to {start + ids_NLK.shape[0] - 1} hold expert ids in [{int(lo)}, {int(hi)}], "
                f"outside [0, {E}); load the trace with validation to find the row"
            )
        yield (ids_NLK.long() + offsets_L1).reshape(-1)


def _used_counts(trace: RoutingTrace) -> list[torch.Tensor]:
    """Per layer, int64 counts of the experts chosen at least once (in no particular order).

    Memory is bounded by the ids present, not by ``num_experts``: dense counts when ``L * E`` is
    small, otherwise a running ``unique`` over the chunks (at most one key per distinct
    (layer, expert) pair that occurs).
    """
    L, E = trace.num_layers, trace.num_experts
    if L * E <= max(_DENSE_COUNTS, trace.experts.numel()):
        counts_LE = expert_counts(trace)
        return [row[row > 0] for row in counts_LE]
    keys_U = torch.zeros(0, dtype=torch.int64, device=trace.device)
    counts_U = torch.zeros(0, dtype=torch.int64, device=trace.device)
    for keys_M in _layer_keys(trace):
        new_keys, new_counts = torch.unique(keys_M, return_counts=True)
        keys_U, inverse = torch.unique(torch.cat([keys_U, new_keys]), return_inverse=True)
        counts_U = torch.zeros_like(keys_U).index_add_(0, inverse, torch.cat([counts_U, new_counts]))
    layer_U = torch.div(keys_U, E, rounding_mode="floor")
    return [counts_U[layer_U == l] for l in range(L)]


def summarize(trace: RoutingTrace, header: io.TraceFileHeader | None = None) -> dict:
    """The summary ``inspect`` prints, as a JSON-ready dict.

    Per layer: ``assignments`` (valid rows x top-k), ``min_share`` / ``max_share`` (fraction of
    the assignments that went to the least / most used expert; uniform is ``1 / num_experts``)
    and ``entropy`` (Shannon entropy of the expert shares over ``log(num_experts)``: 1 is a
    uniform spread, 0 a single expert; 1 by convention when there is one expert). All three are
    ``None`` for a layer without valid rows.

    Args:
        trace: the loaded trace.
        header: its file header, for the file-level entries (path, sizes, version, checksum).
    """
    L, K, E = trace.num_layers, trace.top_k, trace.num_experts
    layers = []
    for layer_id, used_U in zip(trace.layer_ids, _used_counts(trace)):
        # Only the experts that occur: an unused expert adds nothing to the entropy sum and
        # makes the minimum share 0.
        used_U = used_U.cpu().to(torch.float64)
        n = int(used_U.sum())
        share_U = used_U / max(n, 1)
        entropy = float(-(share_U * share_U.log()).sum()) / math.log(E) if E > 1 else 1.0
        layers.append(
            {
                "layer_id": layer_id,
                "assignments": n,
                "min_share": (float(share_U.min()) if used_U.numel() == E else 0.0) if n else None,
                "max_share": float(share_U.max()) if n else None,
                "entropy": entropy if n else None,
            }
        )
    seq_lens_B = trace.seq_lens.cpu()
    gates_size = 0 if trace.gates is None else trace.gates.element_size()
    bytes_per_token = {
        "ids": L * K * trace.experts.element_size(),
        "valid": 0 if trace.valid is None else 1,
        "gates": L * K * gates_size,
    }
    out: dict = {}
    if header is not None:
        out |= {
            "path": header.path,
            "file_size": header.file_size,
            "header_size": header.header_size,
            "data_size": header.data_size,
            "format": header.metadata["format"],
            "version": header.version,
            "checksum_algorithm": header.checksum_algorithm,
            "checksum": header.checksum,
            # format 1.2: the writer knew every valid row names distinct experts (load skips that check)
            "rows_checked": header.metadata.get("rows_checked") == "1",
        }
    out |= {
        "num_seqs": trace.num_seqs,
        "seq_len_min": int(seq_lens_B.min()) if trace.num_seqs else None,
        "seq_len_mean": float(seq_lens_B.double().mean()) if trace.num_seqs else None,
        "seq_len_max": int(seq_lens_B.max()) if trace.num_seqs else None,
        "num_tokens": trace.num_tokens,
        "num_valid_tokens": int(trace.valid_mask.sum()),
        "layer_ids": list(trace.layer_ids),
        "top_k": K,
        "num_experts": E,
        "dtype": _dtype_name(trace.experts.dtype),
        "gates_dtype": None if trace.gates is None else _dtype_name(trace.gates.dtype),
        "bytes_per_token": sum(bytes_per_token.values()),
        "bytes_per_token_parts": bytes_per_token,
        "meta": dict(trace.meta),
        "layers": layers,
    }
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g}%"


def format_text(s: dict) -> str:
    """The plain-text table ``inspect`` prints for a :func:`summarize` dict."""
    rows: list[tuple[str, str]] = []
    if "path" in s:
        rows += [
            ("file", s["path"]),
            ("size", f"{s['file_size']:,} bytes (8 + header {s['header_size']:,} + data {s['data_size']:,})"),
            (
                "format",
                f"{s['format']} version {s['version']}, {s['checksum_algorithm']} {s['checksum']} verified"
                + (", rows checked by its writer" if s["rows_checked"] else ""),
            ),
        ]
    lens = (
        ""
        if not s["num_seqs"]
        else (f" (length min {s['seq_len_min']}, mean {s['seq_len_mean']:.1f}, max {s['seq_len_max']})")
    )
    parts = s["bytes_per_token_parts"]
    rows += [
        ("sequences", f"{s['num_seqs']}{lens}"),
        ("tokens", f"{s['num_valid_tokens']:,} valid / {s['num_tokens']:,} total"),
        ("layers", f"{len(s['layer_ids'])}: {s['layer_ids']}"),
        ("top-k", str(s["top_k"])),
        ("experts", str(s["num_experts"])),
        ("dtype", s["dtype"]),
        ("gates", s["gates_dtype"] or "none"),
        (
            "bytes/token",
            f"{s['bytes_per_token']} (ids {parts['ids']}, valid mask {parts['valid']}, gates {parts['gates']})",
        ),
    ]
    meta = sorted(s["meta"].items())
    rows += [("meta", f"{k}={v}") for k, v in meta[:1]] or [("meta", "(none)")]
    rows += [("", f"{k}={v}") for k, v in meta[1:]]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]

    lines += ["", f"expert load per layer (share of assignments; uniform = {_pct(1 / s['num_experts'])})"]
    table = [("layer", "assignments", "min share", "max share", "entropy")]
    for layer in s["layers"]:
        entropy = "-" if layer["entropy"] is None else f"{layer['entropy']:.3f}"
        table.append(
            (
                str(layer["layer_id"]),
                f"{layer['assignments']:,}",
                _pct(layer["min_share"]),
                _pct(layer["max_share"]),
                entropy,
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    return "\n".join(lines)


# The first bytes of a .rrt file: an 8-byte little-endian header length, then the JSON header.
_HEADER_LEN_BYTES = 8


def check_trace_file(path: str) -> None:
    """Raise unless ``path`` starts like a ``.rrt`` file (a safetensors container), before it is parsed.

    ``routereplay.core.io`` reports a damaged trace file (truncated, bad checksum); this catches a file
    that was never one (a text file, a checkpoint in another format), whose first bytes read as an
    absurd header length.

    Raises:
        TraceFormatError: the file is empty, or its first bytes are not a header length followed by
            a JSON header.
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as f:
        head = f.read(_HEADER_LEN_BYTES + 1)
        size = os.fstat(f.fileno()).st_size
    n = int.from_bytes(head[:_HEADER_LEN_BYTES], "little") if len(head) >= _HEADER_LEN_BYTES else None
    # A truncated .rrt still starts with '{' after its length: io reports it as truncated.
    if len(head) > _HEADER_LEN_BYTES and head[_HEADER_LEN_BYTES:] == b"{" and n is not None and n > 1:
        return
    found = "is empty" if size == 0 else f"starts with {head!r}"
    raise TraceFormatError(
        f"{path}: not a .rrt file: a trace file starts with an 8-byte header length and a JSON header, this file "
        f"{found}; pass a file written by routereplay.save"
    )
