"""Cost of route capture during ``model.generate``: plain generate vs generate inside
``handle.capture_generation()`` (plus building the rollout and its engine-convention trace), same
process, interleaved repetitions, medians and their ratio; on CUDA also the host syncs of each arm.

    python benchmarks/bench_capture.py                       # small CPU run
    python benchmarks/bench_capture.py --device cuda --dtype bf16 --layers 8 --experts 64 --topk 8 \\
        --hidden 1024 --batch 16 --prompt-len 256 --new-tokens 128 --reps 9
    OUT=/some/dir python benchmarks/bench_capture.py ...    # also writes $OUT/bench_capture.json

The model is the Qwen3-MoE-style model of ``routereplay check`` at the requested size, random
weights. Decoding is greedy with a fixed number of new tokens and no EOS at all
(``eos_token_id=None`` for ``generate`` and for ``rollout``): the random model samples its EOS id
like any other token, so with an EOS both arms would stop at data-dependent lengths (and a rollout
told about the EOS would cut the completions there). Both arms run the same forwards; the output
length is checked.

Sync audit (CUDA only): one more plain and one more captured generate run under
``torch.cuda.set_sync_debug_mode("warn")``; every "synchronizing CUDA operation" warning is
counted, by phase: ``generate`` (plain), ``capture_generate`` (entering the capture block, the
generate call, leaving the block) and ``capture_build`` (``cap.rollout(...)`` afterwards, which
copies the rollout's tokens to the host by design). ``generate`` itself syncs every step (its stop
check); capture's own syncs inside generate are ``capture_generate - generate``. Each phase's
sync sites (file:line of the Python caller) are printed and written to the JSON.

Prints the torch version, machine and date with the numbers.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from routereplay import attach
from routereplay.cli.check import DTYPES, ModelSize, build_default_model

SYNC_WARNING = "synchronizing CUDA operation"  # torch's set_sync_debug_mode("warn") message


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_syncs(fn: Callable[[], Any]) -> tuple[Any, collections.Counter]:
    """Run ``fn`` under ``torch.cuda.set_sync_debug_mode("warn")``; return its result and a Counter
    of the host syncs it made, keyed by the Python call site (``file:line``)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    sites = collections.Counter(
        f"{os.path.relpath(w.filename) if not w.filename.startswith('<') else w.filename}:{w.lineno}"
        for w in caught
        if SYNC_WARNING in str(w.message)
    )
    return result, sites


def model_and_prompts(args: argparse.Namespace) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """The random model of ``args``' size on its device and dtype, ``[batch, prompt_len]`` prompts
    without padding, and ``generate``'s arguments for a fixed-length greedy run (no EOS)."""
    heads = max(1, args.hidden // 64)
    size = ModelSize(
        layers=args.layers, hidden=args.hidden, experts=args.experts, top_k=args.topk, vocab=args.vocab,
        heads=heads, kv_heads=max(1, heads // 2), head_dim=64, moe_intermediate=max(16, args.hidden // 2),
    )
    with torch.device(args.device):  # initialised where it runs: the larger sizes take minutes on the host
        model = build_default_model(size, seed=0).to(dtype=DTYPES[args.dtype])
    g = torch.Generator().manual_seed(0)
    ids_BP = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g).to(args.device)
    gen_kw = {
        "attention_mask": torch.ones_like(ids_BP),
        "do_sample": False,
        "max_new_tokens": args.new_tokens,
        "eos_token_id": None,  # no stop: every sequence runs max_new_tokens
        "pad_token_id": 0,
    }
    return model, ids_BP, gen_kw


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
    cuda = args.device.startswith("cuda")

    model, ids_BP, gen_kw = model_and_prompts(args)
    mask_BP = gen_kw["attention_mask"]
    width = args.prompt_len + args.new_tokens

    def generate() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(ids_BP, **gen_kw)
        assert out.shape == (args.batch, width), (tuple(out.shape), "EOS stopped generate early?")
        return out

    def build(cap: Any, out: torch.Tensor) -> Any:
        # eos None: no completion is cut (the random model emits its EOS id as an ordinary token);
        # pad None: nothing to check after an EOS that never stopped generate.
        rollout = cap.rollout(out, prompt_attention_mask=mask_BP, eos_token_id=None, pad_token_id=None)
        assert rollout.input_ids.numel() == args.batch * width
        assert rollout.trace.num_tokens == args.batch * (width - 1), (rollout.trace.num_tokens, args.batch)
        return rollout

    def plain() -> float:
        _sync(args.device)
        t = time.perf_counter()
        generate()
        _sync(args.device)
        return time.perf_counter() - t

    def captured() -> tuple[float, float]:
        handle = attach(model)
        try:
            _sync(args.device)
            t = time.perf_counter()
            with handle.capture_generation() as cap:
                out = generate()
            _sync(args.device)
            t_gen = time.perf_counter() - t
            build(cap, out)
            _sync(args.device)
            elapsed = time.perf_counter() - t
        finally:
            handle.detach()
        return elapsed, t_gen

    for _ in range(args.warmup):
        plain()
        captured()
    times: dict[str, list[float]] = {"plain": [], "capture": [], "capture_generate": []}
    for _ in range(args.reps):  # interleaved so drift in machine load hits both arms alike
        times["plain"].append(plain())
        total, gen = captured()
        times["capture"].append(total)
        times["capture_generate"].append(gen)
    med = {k: statistics.median(v) for k, v in times.items()}

    syncs: dict[str, collections.Counter] | None = None
    if cuda:
        _, plain_sites = count_syncs(generate)
        handle = attach(model)
        try:
            def capture_block() -> tuple[Any, torch.Tensor]:
                with handle.capture_generation() as cap:
                    out = generate()
                return cap, out

            (cap, out), gen_sites = count_syncs(capture_block)
            _, build_sites = count_syncs(lambda: build(cap, out))
        finally:
            handle.detach()
        syncs = {"generate": plain_sites, "capture_generate": gen_sites, "capture_build": build_sites}

    print(f"torch {torch.__version__}, {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"nproc {os.cpu_count()}, {datetime.datetime.now().isoformat(timespec='seconds')}")
    if cuda:
        print(f"device {torch.cuda.get_device_name()}")
    print(
        f"model: {args.layers} MoE layers, hidden {args.hidden}, {args.experts} experts, top-{args.topk}, "
        f"{args.dtype}, {args.device}; batch {args.batch} x prompt {args.prompt_len} + {args.new_tokens} new tokens "
        f"(no EOS), {args.reps} reps"
    )
    for k, label in (("plain", "plain"), ("capture", "capture"), ("capture_generate", "  of which generate")):
        print(f"{label:>20}: median {med[k] * 1e3:9.1f} ms   (all: {', '.join(f'{t * 1e3:.1f}' for t in times[k])})")
    ratio = med["capture"] / med["plain"]
    ratio_gen = med["capture_generate"] / med["plain"]
    # paired: each rep's capture against the plain run just before it, median over reps
    paired = statistics.median(c / p for c, p in zip(times["capture"], times["plain"]))
    print(f"   ratio capture / plain: {ratio:.3f}   (generate only: {ratio_gen:.3f}, paired {paired:.3f})")
    if syncs is not None:
        n = {k: sum(v.values()) for k, v in syncs.items()}
        print(f"host syncs (set_sync_debug_mode('warn')): plain generate {n['generate']}, capture block around "
              f"generate {n['capture_generate']} (difference {n['capture_generate'] - n['generate']:+d}), "
              f"building the rollout afterwards {n['capture_build']}")
        extra = syncs["capture_generate"] - syncs["generate"]
        fewer = syncs["generate"] - syncs["capture_generate"]
        for k, sites in syncs.items():
            print(f"  {k} sync sites: " + (", ".join(f"{s} x{c}" for s, c in sites.most_common()) or "none"))
        if extra or fewer:
            print(
                f"  sites capture adds inside generate: {dict(extra) or 'none'}; "
                f"fewer than plain: {dict(fewer) or 'none'}"
            )

    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        result = {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "args": vars(args),
            "times_s": times,
            "median_s": med,
            "ratio_capture_over_plain": ratio,
            "ratio_capture_generate_over_plain": ratio_gen,
            "ratio_paired": paired,
            "syncs": None if syncs is None else {
                "counts": {k: sum(v.values()) for k, v in syncs.items()},
                "capture_minus_plain_in_generate": sum(syncs["capture_generate"].values())
                - sum(syncs["generate"].values()),
                "sites": {k: dict(v) for k, v in syncs.items()},
            },
        }
        path = os.path.join(out_dir, "bench_capture.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
