"""Cost of route capture during ``model.generate``: plain generate vs generate inside
``handle.capture_generation()`` (plus building the engine-convention trace), same process,
interleaved repetitions, medians and their ratio.

    python benchmarks/bench_capture.py                       # small CPU run
    python benchmarks/bench_capture.py --device cuda --dtype bf16 --layers 8 --experts 64 --topk 8 \\
        --hidden 1024 --batch 16 --prompt-len 256 --new-tokens 256

The model is the Qwen3-MoE-style model of ``routereplay check`` at the requested size, random
weights. Decoding is greedy with a fixed number of new tokens (no EOS), so both arms run the
same forwards. Prints the torch version, machine and date with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from routereplay import attach
from routereplay.check import DTYPES, ModelSize, build_default_model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()

    heads = max(1, args.hidden // 64)
    size = ModelSize(
        layers=args.layers, hidden=args.hidden, experts=args.experts, top_k=args.topk, vocab=args.vocab,
        heads=heads, kv_heads=max(1, heads // 2), head_dim=64, moe_intermediate=max(16, args.hidden // 2),
    )
    model = build_default_model(size, seed=0).to(device=args.device, dtype=DTYPES[args.dtype])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    gen_kw = {
        "attention_mask": mask,
        "do_sample": False,
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "eos_token_id": None,
        "pad_token_id": 0,
    }

    def plain() -> float:
        _sync(args.device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, **gen_kw)
        _sync(args.device)
        return time.perf_counter() - t

    def captured() -> float:
        handle = attach(model)
        try:
            _sync(args.device)
            t = time.perf_counter()
            with torch.no_grad(), handle.capture_generation() as cap:
                out = model.generate(ids, **gen_kw)
            trace = cap.trace(out)
            _sync(args.device)
            elapsed = time.perf_counter() - t
        finally:
            handle.detach()
        expected = args.batch * (args.prompt_len + args.new_tokens - 1)
        assert trace.num_tokens == expected, (trace.num_tokens, expected)
        return elapsed

    for _ in range(args.warmup):
        plain()
        captured()
    times = {"plain": [], "capture": []}
    for _ in range(args.reps):  # interleaved so drift in machine load hits both arms alike
        times["plain"].append(plain())
        times["capture"].append(captured())
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"torch {torch.__version__}, {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"nproc {os.cpu_count()}, {datetime.datetime.now().isoformat(timespec='seconds')}")
    if args.device.startswith("cuda"):
        print(f"device {torch.cuda.get_device_name()}")
    print(f"model: {args.layers} MoE layers, hidden {args.hidden}, {args.experts} experts, top-{args.topk}, {args.dtype}, "
          f"{args.device}; batch {args.batch} x prompt {args.prompt_len} + {args.new_tokens} new tokens, {args.reps} reps")
    for k in ("plain", "capture"):
        print(f"{k:>8}: median {med[k] * 1e3:9.1f} ms   (all: {', '.join(f'{t * 1e3:.1f}' for t in times[k])})")
    print(f"   ratio capture / plain: {med['capture'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
