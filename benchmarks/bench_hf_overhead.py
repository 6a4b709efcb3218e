"""Overhead of routereplay's HF adapter: forward + backward of a Qwen3-MoE-style model, plain vs
record vs replay (of a host trace, a device trace, a prepared trace).

    python benchmarks/bench_hf_overhead.py                      # CPU default (4 layers, hidden 512)
    python benchmarks/bench_hf_overhead.py --device cuda --dtype bfloat16 --layers 8 --hidden 2048 \
        --experts 128 --topk 8 --seq 4096

Repetitions are interleaved (plain, record, replay, plain, ...) so drift in machine load hits
all arms alike; the medians and each arm's ratio to plain are printed. "plain" is the same model
with the handle detached (no hook at all). ``gc.collect()`` runs before every timed step, outside
the timing (``--no-gc-collect`` to leave Python's collector alone: detaching and re-attaching for
the plain arm makes garbage whose collection then lands in whichever arm comes next).
Target (issue 11): ratios <= 1.01.

Legend: B batch rows, S sequence length.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch


def build(args):
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.moe_intermediate or max(args.hidden // 2, 8),
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 128, 1),
        head_dim=min(64, args.hidden),
        num_experts=args.experts,
        num_experts_per_tok=args.topk,
        norm_topk_prob=True,
        max_position_embeddings=max(args.seq, 128),
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.Qwen3MoeForCausalLM(config)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=0, help="expert FFN width (default hidden/2)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--replay-kernel", choices=("torch", "triton"), default="torch", help="attach(replay_kernel=...)")
    p.add_argument(
        "--no-gc-collect",
        dest="gc_collect",
        action="store_false",
        help="do not run gc.collect() before each timed step (then Python's collections land in random arms)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import routereplay

    model = build(args)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    handle = routereplay.attach(model, replay_kernel=args.replay_kernel)
    with handle.record() as rec, torch.no_grad():
        model(**batch)
    # R3 traces from an inference engine (and R2 traces recorded with offload=True) live on the
    # host: "replay" builds the replay from such a trace every step (checks on the host, pinned
    # copy on a side stream); "replay-dev" from a trace already on the GPU (device-side checks);
    # "replay-prep" replays a PreparedTrace made once (R2's epochs, R3's second pass).
    trace = rec.trace().to("cpu")
    dev_trace = trace.to(device)
    prepared = handle.prepare(trace)

    def step():
        for p_ in model.parameters():
            p_.grad = None
        out = model(**batch).logits
        out.float().square().mean().backward()

    def timed(kind: str) -> float:
        nonlocal handle, prepared
        if kind == "plain":
            handle.detach()
        if args.gc_collect:
            gc.collect()  # outside the timing: a collection of the whole process lands in no arm
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        if kind == "plain":
            step()
        elif kind == "record":
            with handle.record():
                step()
        else:
            source = {"replay": trace, "replay-dev": dev_trace, "replay-prep": prepared}[kind.removesuffix("-jit")]
            # "-jit": the fused kernel launched through Triton's JIT instead of the kept launcher
            kept = [p for f in handle.forced_weights for p in f.prepared.values() if p is not None and p._fast]
            jit = kept if kind.endswith("-jit") else []
            for p in jit:
                p._fast = False
            with handle.replay(source):
                step()
            for p in jit:
                p._fast = True
        cpu[kind].append(time.process_time() - c0)  # issuing the step, before waiting for the GPU
        sync()
        dt = time.perf_counter() - t0
        if kind == "plain":
            handle = routereplay.attach(model, replay_kernel=args.replay_kernel)
            prepared = handle.prepare(trace)
        return dt

    kinds = ("plain", "record", "replay", "replay-dev", "replay-prep")
    if args.replay_kernel == "triton":  # the direct launch against Triton's JIT launch, step level
        kinds += ("replay-prep-jit",)
    cpu: dict[str, list[float]] = {k: [] for k in kinds}  # process CPU time (every thread) per step
    for _ in range(args.warmup):
        for k in kinds:
            timed(k)
    times = {k: [] for k in kinds}
    for r in range(args.reps):
        shift = r % len(kinds)
        order = kinds[shift:] + kinds[:shift]  # rotate so no kind always runs first
        for k in order:
            times[k].append(timed(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"device={args.device} dtype={args.dtype} layers={args.layers} hidden={args.hidden} experts={args.experts} "
        f"topk={args.topk} batch={args.batch}x{args.seq} reps={args.reps} threads={torch.get_num_threads()} "
        f"replay_kernel={args.replay_kernel} gc_collect={args.gc_collect}"
    )
    for k in kinds:
        print(
            f"{k:>7}: median {med[k] * 1e3:9.2f} ms  (min {min(times[k]) * 1e3:9.2f}, max {max(times[k]) * 1e3:9.2f})"
        )
    for k in kinds[1:]:
        # paired: each round's step against the same round's plain step (run next to it), median over
        # rounds: a host's slow spell that spans a round lands on both sides of the ratio
        paired = statistics.median(a / b for a, b in zip(times[k], times["plain"]))
        print(
            f"{k}/plain = {med[k] / med['plain']:.4f}  (min/min {min(times[k]) / min(times['plain']):.4f}, "
            f"paired {paired:.4f})"
        )
    # CPU time spent issuing a step (all threads: autograd's device threads launch the backward),
    # less sensitive to other tenants than wall time; up to the GPU wait, which spins
    cpu_med = {k: statistics.median(v[args.warmup :]) for k, v in cpu.items()}
    print("host CPU per step, median ms: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in cpu_med.items()))
    for k in kinds[1:]:
        print(f"{k}/plain host CPU = {cpu_med[k] / cpu_med['plain']:.4f}")


if __name__ == "__main__":
    main()
