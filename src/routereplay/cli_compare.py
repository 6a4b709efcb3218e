"""``routereplay compare A.rrt B.rrt [--json]``: routing agreement between two trace files.

A is the reference (e.g. the rollout's routes), B the side under test (e.g. the trainer's). Both
files must hold the same tokens (same sequence lengths) and layers; rows either file marks
invalid are left out. Exit status: 0 on success, 2 when a file cannot be read or the traces do
not fit together (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys

from routereplay.errors import RouteReplayError

_ROWS = (
    ("disagreement", "router-level disagreement  mean_{t,l} 1[A != B as sets]"),
    ("token_disagreement", "tokens with any layer different"),
    ("mean_disagreeing_layers", "mean disagreeing layers per token"),
    ("overlap", "overlap@k  mean |A & B| / k"),
    ("jaccard", "jaccard  mean |A & B| / |A | B|"),
    ("top1_agreement", "top-1 agreement"),
    ("ordered_match", "ordered match (same ranked list)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A.rrt", help="reference trace file (e.g. rollout routes)")
    parser.add_argument("b", metavar="B.rrt", help="trace file to compare against A (e.g. trainer routes)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def format_table(result: dict, *, a: str, b: str) -> str:
    """Plain-text table of an agreement dict (``RoutingAgreement.to_dict()`` plus file names)."""
    lines = [f"A: {a}", f"B: {b}", f"tokens compared: {result['num_tokens']}   top-k: {result['top_k']}", ""]
    lines.append(f"{'layer':>7}  {'disagreement':>12}  {'overlap@k':>9}")
    for lid, dis, ov in zip(result["layer_ids"], result["per_layer_disagreement"], result["per_layer_overlap"]):
        lines.append(f"{lid:>7}  {_fmt(dis):>12}  {_fmt(ov):>9}")
    lines.append("")
    width = max(len(desc) for _, desc in _ROWS)
    for key, desc in _ROWS:
        lines.append(f"{desc:<{width}}  {_fmt(result[key])}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def run(args: argparse.Namespace) -> int:
    from routereplay import io
    from routereplay.metrics import routing_agreement

    try:
        a = io.load(args.a)
        b = io.load(args.b)
        result = routing_agreement(a, b).to_dict()
    except (RouteReplayError, OSError) as e:
        print(f"routereplay compare: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **result}, indent=2))
    else:
        print(format_table(result, a=args.a, b=args.b))
    return 0
