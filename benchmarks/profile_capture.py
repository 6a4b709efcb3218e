"""Where capture inside ``generate`` spends its host time, next to a plain ``generate`` (same run).

    python benchmarks/profile_capture.py --device cuda --dtype bf16 --layers 8 --hidden 1024 \
        --experts 64 --topk 8 --batch 16 --prompt-len 256 --new-tokens 128

Prints, per arm (plain, capture), the medians of wall time and host CPU time (process time, every
thread) of ``--reps`` interleaved ``generate`` calls, the handle attached once (no attach, no
rollout build in the timing); then cProfile's top functions (own time) of one captured
``generate``, routereplay's functions by cumulative time, the torch ops capture adds per router
call, on CUDA the host syncs of each arm, and the Python calls capture and an idle handle add per
router call (``sys.setprofile``). ``--pieces`` instead times capture with each of its
pieces switched off in turn (see :func:`pieces`).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections import Counter

import torch
from bench_capture import count_syncs, model_and_prompts
from torch.utils._python_dispatch import TorchDispatchMode

from routereplay import attach
from routereplay.cli.check import DTYPES


def ops_of(fn) -> Counter:
    """The aten ops one call of ``fn`` dispatches, by name."""
    seen: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    for name, default in (("layers", 4), ("hidden", 256), ("experts", 32), ("topk", 4), ("vocab", 4096),
                          ("batch", 8), ("prompt-len", 64), ("new-tokens", 32), ("reps", 7)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--pieces", action="store_true", help="only: what each piece of capture costs, switched off in turn")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, ids_BP, gen_kw = model_and_prompts(args)
    if args.pieces:
        pieces(args, model, ids_BP, gen_kw, sync)
        return
    handle = attach(model)

    def plain():
        with torch.no_grad():
            model.generate(ids_BP, **gen_kw)

    def capture():
        with handle.capture_generation(), torch.no_grad():
            model.generate(ids_BP, **gen_kw)

    arms = {"plain": plain, "capture": capture}
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in arms}
    for r in range(args.reps + 2):
        for k in (("plain", "capture") if r % 2 else ("capture", "plain")):
            sync()
            t, c = time.perf_counter(), time.process_time()
            arms[k]()
            sync()
            if r >= 2:
                res[k].append((time.perf_counter() - t, time.process_time() - c))
    med = {k: [statistics.median(col) * 1e3 for col in zip(*v)] for k, v in res.items()}
    for k, (wall, cpu) in med.items():
        print(f"{k:8s} wall {wall:9.1f} ms  host CPU {cpu:9.1f} ms")
    calls = args.layers * args.new_tokens
    wall_us = (med["capture"][0] - med["plain"][0]) * 1e3 / calls
    host_us = (med["capture"][1] - med["plain"][1]) * 1e3 / calls
    print(f"capture/plain wall {med['capture'][0] / med['plain'][0]:.4f}, host CPU "
          f"{med['capture'][1] / med['plain'][1]:.4f}; capture adds {wall_us:.1f} "
          f"us wall, {host_us:.1f} us host CPU per router call")  # fmt: skip
    prof = cProfile.Profile()
    prof.enable()
    capture()
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue()[out.getvalue().index("ncalls") :])
    out = io.StringIO()  # routereplay's own functions, by cumulative time: what a router call costs where
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats("routereplay", 25)
    print(out.getvalue()[out.getvalue().index("ncalls") :])
    added = Counter(ops_of(capture))
    added.subtract(ops_of(plain))
    calls = args.layers * (args.new_tokens + 1)
    print("torch ops capture adds per router call:",
          {k: round(v / calls, 2) for k, v in added.most_common() if v})  # fmt: skip
    if cuda:
        n = {k: sum(count_syncs(fn)[1].values()) for k, fn in arms.items()}
        print(f"host syncs: {n}")
    # Python function calls (sys.setprofile): every function, and routereplay's own, per router call
    counted = {"capture": python_calls(capture), "attached, idle": python_calls(plain)}
    handle.detach()
    counted["detached"] = python_calls(plain)
    base = counted["detached"]
    print("Python calls added over detached, per router call (all functions / routereplay's):",
          {k: (round((sum(v.values()) - sum(base.values())) / calls, 2),
               round(sum(n for f, n in v.items() if "/routereplay/" in f[0]) / calls, 2))
           for k, v in counted.items() if k != "detached"})  # fmt: skip


def python_calls(fn) -> Counter:
    """(file, function) -> calls made while ``fn`` runs (``sys.setprofile``; C functions not counted)."""
    seen: Counter = Counter()

    def profile(frame, event, arg):
        if event == "call":
            seen[(frame.f_code.co_filename, frame.f_code.co_name)] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def pieces(args, model, ids_BP, gen_kw, sync) -> None:
    """Wall time of ``generate`` detached, attached and idle, capturing, and capturing with the
    per-call compact copy of the ids that capture made before it kept eager ids as the routers
    made them (a diagnostic of what that copy cost: one kernel launch per layer per decode step).
    Interleaved, medians. (The experts' pre-hook, measured here before, is installed only for
    verifying replays and dispatch observers now.)"""
    from routereplay.runtime import record

    keep_answer = record.Recording.answer

    def answer_with_copy(self, index, logits_NE, weights_NK, ids_NK, route_kw, *, scoped):
        # the recording keeps a compact copy; the experts still get the router's own ids
        weights, _, binding = keep_answer(self, index, logits_NE, weights_NK, ids_NK.to(self._dtype), route_kw,
                                          scoped=scoped)  # fmt: skip
        return weights, ids_NK, binding

    def run(answer=keep_answer, capture=True, attached=True) -> float:
        record.Recording.answer = answer
        try:
            handle = attach(model) if attached else None
            sync()
            t = time.perf_counter()
            with torch.no_grad(), (handle.capture_generation() if capture else contextlib.nullcontext()):
                model.generate(ids_BP, **gen_kw)
            sync()
            if handle is not None:
                handle.detach()
            return time.perf_counter() - t
        finally:
            record.Recording.answer = keep_answer

    arms = {
        "detached": lambda: run(capture=False, attached=False),
        "attached, idle": lambda: run(capture=False),
        "capture": run,
        "capture, copy per call": lambda: run(answer=answer_with_copy),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    for r in range(args.reps + 1):
        for k, fn in arms.items():
            t = fn()
            if r:
                times[k].append(t)
    calls = args.layers * (args.new_tokens + 1)
    base = statistics.median(times["detached"])
    for k, v in times.items():
        m = statistics.median(v)
        print(f"{k:26s} {m * 1e3:9.1f} ms ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})  x{m / base:.4f}  "
              f"+{(m - base) * 1e6 / calls:6.1f} us per router call")  # fmt: skip


if __name__ == "__main__":
    main()
