"""Host CPU the router seam adds per MoE layer, with compute out of the way (issue 21, item 2).

    python benchmarks/bench_host_seam.py [--reps 40]

A tiny Qwen3-MoE (3 MoE layers, hidden 32, batch 2 x 8) trains on the CPU with one thread, so a
step's process time is mostly Python and op dispatch: plain, inside ``record()``, and inside
``replay()`` of a prepared trace, interleaved. Prints the medians, what record and replay add per MoE
layer per step (forward and backward), and cProfile's routereplay functions over 50 replayed steps
(where the seam's own Python time goes).
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


def _in(ctx, fn):
    with ctx:
        return fn()


if __name__ == "__main__":
    main()
