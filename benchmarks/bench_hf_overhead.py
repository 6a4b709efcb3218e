"""Overhead of routereplay's HF adapter: forward + backward of a Qwen3-MoE-style model, plain vs
record vs replay.

    python benchmarks/bench_hf_overhead.py                      # CPU default (4 layers, hidden 512)
    python benchmarks/bench_hf_overhead.py --device cuda --dtype bfloat16 --layers 8 --hidden 2048 \
        --experts 128 --topk 8 --seq 4096

Repetitions are interleaved (plain, record, replay, plain, ...) so drift in machine load hits
all three alike; the medians and the ratios record/plain and replay/plain are printed. "plain" is
the same model with the handle detached (no hook at all). Target: ratios <= 1.03.

Legend: B batch rows, S sequence length.
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import routereplay

    model = build(args)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    handle = routereplay.attach(model)
    with handle.record() as rec, torch.no_grad():
        model(**batch)
    # Replayed traces live on the host, as R3 traces from an inference engine (and R2 traces
    # recorded with offload=True) do: replay stages them through pinned memory without a sync.
    trace = rec.trace().to("cpu")

    def step():
        for p_ in model.parameters():
            p_.grad = None
        out = model(**batch).logits
        out.float().square().mean().backward()

    def timed(kind: str) -> float:
        nonlocal handle
        if kind == "plain":
            handle.detach()
        sync()
        t0 = time.perf_counter()
        if kind == "plain":
            step()
        elif kind == "record":
            with handle.record():
                step()
        else:
            with handle.replay(trace):
                step()
        sync()
        dt = time.perf_counter() - t0
        if kind == "plain":
            handle = routereplay.attach(model)
        return dt

    kinds = ("plain", "record", "replay")
    for _ in range(args.warmup):
        for k in kinds:
            timed(k)
    times = {k: [] for k in kinds}
    for r in range(args.reps):
        order = kinds[r % 3 :] + kinds[: r % 3]  # rotate so no kind always runs first
        for k in order:
            times[k].append(timed(k))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"device={args.device} dtype={args.dtype} layers={args.layers} hidden={args.hidden} experts={args.experts} "
        f"topk={args.topk} batch={args.batch}x{args.seq} reps={args.reps} threads={torch.get_num_threads()}"
    )
    for k in kinds:
        print(
            f"{k:>7}: median {med[k] * 1e3:9.2f} ms  (min {min(times[k]) * 1e3:9.2f}, max {max(times[k]) * 1e3:9.2f})"
        )
    print(f"record/plain = {med['record'] / med['plain']:.4f}")
    print(f"replay/plain = {med['replay'] / med['plain']:.4f}")


if __name__ == "__main__":
    main()
