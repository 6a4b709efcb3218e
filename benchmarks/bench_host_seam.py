"""Host CPU the router seam adds per MoE layer, with compute out of the way (issue 21, item 2).

    python benchmarks/bench_host_seam.py [--reps 40]

A tiny Qwen3-MoE (3 MoE layers, hidden 32, batch 2 x 8) trains on the CPU with one thread, so a
step's process time is mostly Python and op dispatch: plain, inside ``record()``, and inside
``replay()`` of a prepared trace, interleaved. Prints the medians, what record and replay add per MoE
layer per step (forward and backward), and cProfile's routereplay functions over 50 replayed steps
(where the seam's own Python time goes); then what capture in ``generate`` adds to one MoE block.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(1)
    from helpers import batch, tiny_qwen3_moe

    import routereplay

    model = tiny_qwen3_moe().train()
    b = batch(B=2, S=8)

    def step():
        for param in model.parameters():
            param.grad = None
        model(**b).logits.sum().backward()

    handle = routereplay.attach(model)
    with handle.record() as rec, torch.no_grad():
        model(**b)
    prepared = handle.prepare(rec.trace(attention_mask=b["attention_mask"]), attention_mask=b["attention_mask"])
    arms = {
        "plain": step,
        "record": lambda: _in(handle.record(), step),
        "replay": lambda: _in(handle.replay(prepared), step),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(3):
        for fn in arms.values():
            fn()
    for _ in range(args.reps):
        for k, fn in arms.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    L = len(handle.layers)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"torch {torch.__version__}, 1 thread, {L} MoE layers; host CPU per step, median of {args.reps} (ms):")
    for k, v in med.items():
        lo, hi = min(times[k]) * 1e3, max(times[k]) * 1e3
        print(f"  {k:7s} {v:7.3f}  ({lo:.3f}-{hi:.3f})")
    for k in ("record", "replay"):
        print(f"  {k} adds {(med[k] - med['plain']) / L * 1e3:.0f} us per MoE layer per step")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        arms["replay"]()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats("routereplay", 12)
    print(out.getvalue()[out.getvalue().index("ncalls") :])
    capture_block()


def capture_block(rounds: int = 30, calls: int = 300) -> None:
    """What capture in ``generate`` adds to one decode-step MoE block (not the first, which also
    reports the batch shape), without grad: the block alone with the handle detached, attached and
    idle, and inside ``record(generation=True)`` (capture's mode). Minimum over ``rounds`` of the
    mean thread time of ``calls`` calls, the three interleaved."""
    from helpers import tiny_qwen3_moe

    import routereplay

    model = tiny_qwen3_moe().eval()
    block = model.model.layers[2].mlp
    x = torch.randn(1, 16, model.config.hidden_size)

    def per_call() -> float:
        t = time.thread_time_ns()
        for _ in range(calls):
            block(x)
        return (time.thread_time_ns() - t) / calls / 1e3

    res: dict[str, list[float]] = {"plain": [], "idle": [], "capture": []}
    with torch.no_grad():
        for _ in range(rounds):
            res["plain"].append(per_call())
            handle = routereplay.attach(model)
            res["idle"].append(per_call())
            with handle.record(generation=True):
                res["capture"].append(per_call())
            handle.detach()
    best = {k: min(v) for k, v in res.items()}
    print(f"one MoE block, batch 16 rows, no grad (us per call, min of {rounds} x {calls}): plain "
          f"{best['plain']:.1f}, attached and idle +{best['idle'] - best['plain']:.1f}, capturing "
          f"+{best['capture'] - best['plain']:.1f}")  # fmt: skip


def _in(ctx, fn):
    with ctx:
        return fn()


if __name__ == "__main__":
    main()
