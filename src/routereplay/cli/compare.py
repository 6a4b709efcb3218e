"""``routereplay compare A.rrt B.rrt [--json] [--prompt-lens N,...]``: routing agreement of two trace files.

A is the reference (e.g. the rollout's routes), B the side under test (e.g. the trainer's). Both
files must hold the same tokens (same sequence lengths) and layers; rows either file marks
invalid are left out. ``--prompt-lens`` restricts the comparison to response tokens: the first
``N`` rows of each sequence are its prompt (a trace file does not record where a prompt ends).

Exit status: 0 when every compared (token, layer) has the same expert set in both files (the
order within a row may differ: replay forces the set), 1 when some route differs, 2 when a file
cannot be read, is not a ``.rrt`` file, or the traces do not fit together (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from routereplay.core.errors import RouteReplayError, SeqlensError

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
    parser.add_argument(
        "--prompt-lens", metavar="N[,N...]", type=_lengths,
        help="compare response tokens only: the first N rows of each sequence are its prompt "
        "(one N for every sequence, or one per sequence)",
    )


def _lengths(text: str) -> list[int]:
    try:
        lens = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,N,... (non-negative integers), found {text!r}") from None
    if any(n < 0 for n in lens):
        raise argparse.ArgumentTypeError(f"prompt lengths must be >= 0, found {text!r}")
    return lens


def response_mask(seq_lens: list[int], prompt_lens: list[int]) -> torch.Tensor:
    """bool ``[T]``: the rows after each sequence's first ``prompt_lens[b]``.

    Raises:
        SeqlensError: the number of lengths is neither 1 nor the number of sequences, or a prompt is
            longer than its sequence.
    """
    if len(prompt_lens) == 1:
        prompt_lens = prompt_lens * len(seq_lens)
    if len(prompt_lens) != len(seq_lens):
        raise SeqlensError(
            f"--prompt-lens: {len(prompt_lens)} lengths for {len(seq_lens)} sequences; pass one N for all "
            "or one per sequence"
        )
    for b, (p, n) in enumerate(zip(prompt_lens, seq_lens)):
        if p > n:
            raise SeqlensError(f"--prompt-lens: sequence {b} has {n} rows, fewer than its prompt length {p}")
    return torch.cat([torch.arange(n) >= p for p, n in zip(prompt_lens, seq_lens)]) if seq_lens else torch.zeros(
        0, dtype=torch.bool
    )


def format_table(result: dict, *, a: str, b: str) -> str:
    """Plain-text table of an agreement dict (``RoutingAgreement.to_dict()`` plus file names)."""
    which = " (response only)" if result.get("tokens") == "response" else ""
    lines = [f"A: {a}", f"B: {b}", f"tokens compared: {result['num_tokens']}{which}   top-k: {result['top_k']}", ""]
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
    from routereplay.cli.inspect import check_trace_file
    from routereplay.core import io
    from routereplay.rl.metrics import routing_agreement

    try:
        check_trace_file(args.a)
        check_trace_file(args.b)
        a = io.load(args.a)
        b = io.load(args.b)
        mask = None if args.prompt_lens is None else response_mask(a.seq_lens.tolist(), args.prompt_lens)
        result = routing_agreement(a, b, mask=mask).to_dict()
    except (RouteReplayError, OSError) as e:
        print(f"routereplay compare: error: {e}", file=sys.stderr)
        return 2
    result["tokens"] = "all" if args.prompt_lens is None else "response"
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **result}, indent=2))
    else:
        print(format_table(result, a=args.a, b=args.b))
    return 1 if (result["disagreement"] or 0.0) > 0.0 else 0
