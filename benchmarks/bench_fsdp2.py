"""Step time of routing replay vs plain training under FSDP2 (torchrun; 1 or more GPUs, bf16).

    torchrun --standalone --nproc-per-node 1 benchmarks/bench_fsdp2.py            # one H200
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_fsdp2.py            # two GPUs
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_fsdp2.py --device cpu --layers 2 \
        --hidden 64 --experts 8 --topk 2 --moe-intermediate 32 --seq 64 --vocab 128 --reps 2   # CPU smoke run

A Qwen3-MoE-style model (default: 16 layers, hidden 2048, 64 experts, top-8, expert width 768,
~5B parameters; about 10 GB of bf16 weights plus as much gradient, sharded over the ranks) built
from its config with random weights, each decoder layer and the root ``fully_shard``-ed. Per
repetition, interleaved so that drift in load hits all modes alike:

* ``train plain``: forward + backward with the handle detached (no hook at all);
* ``train replay``: the same under ``handle.replay`` of the routes recorded once up front;
* ``forward plain`` / ``forward record``: a no_grad forward without / with ``handle.record``.

Reports medians (ms) and the ratios replay/plain and record/plain; rank 0 writes
``$OUT/bench_fsdp2.json`` with the configuration, device, versions and every repetition.

Legend: B batch rows per rank, S sequence length, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist


def build(args, device: torch.device, dtype: torch.dtype):
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.moe_intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 512, 1),
        head_dim=min(64, args.hidden),
        num_experts=args.experts,
        num_experts_per_tok=args.topk,
        norm_topk_prob=True,
        max_position_embeddings=max(args.seq, 128),
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly on the device: no fp32 copy of 5B params
    try:
        with warnings.catch_warnings(), device:
            warnings.simplefilter("ignore")
            model = transformers.Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--moe-intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4, help="rows per rank")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", choices=["none", "reentrant", "non-reentrant"], default="none")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    args = p.parse_args()

    from torch.distributed.fsdp import fully_shard

    import routereplay

    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl", device_id=device, timeout=timedelta(minutes=20))
    else:
        dist.init_process_group("gloo", timeout=timedelta(minutes=20))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
    dtype = getattr(torch, args.dtype)

    model = build(args, device, dtype)
    num_params = sum(p.numel() for p in model.parameters())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if args.checkpointing != "none":
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.checkpointing == "reentrant"}
        )
    g = torch.Generator().manual_seed(rank)
    input_ids_BS = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    mask_BS = torch.ones_like(input_ids_BS)

    handle = routereplay.attach(model)
    with torch.no_grad(), handle.record() as rec:
        model(input_ids=input_ids_BS, attention_mask=mask_BS)
    trace = rec.trace(attention_mask=mask_BS).to("cpu")  # a host trace, as an RL trainer holds one
    handle.detach()

    def train_step(mode: str) -> None:
        model.zero_grad(set_to_none=True)
        ctx = handle.replay(trace, attention_mask=mask_BS) if mode == "replay" else _null()
        with ctx:
            logits_BSV = model(input_ids=input_ids_BS, attention_mask=mask_BS).logits
        loss = torch.nn.functional.cross_entropy(
            logits_BSV[:, :-1].flatten(0, 1).float(), input_ids_BS[:, 1:].flatten()
        )
        loss.backward()

    def forward(mode: str) -> None:
        with torch.no_grad(), handle.record() if mode == "record" else _null():
            model(input_ids=input_ids_BS, attention_mask=mask_BS)

    runs = {"train plain": [], "train replay": [], "forward plain": [], "forward record": []}
    for rep in range(args.warmup + args.reps):
        for name, times in runs.items():
            kind, mode = name.split()
            if mode != "plain":
                handle = routereplay.attach(model)
            _sync(device)
            t0 = time.perf_counter()
            (train_step if kind == "train" else forward)(mode)
            _sync(device)
            if rep >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
            if mode != "plain":
                handle.detach()
    med = {k: statistics.median(v) for k, v in runs.items()}
    report = {
        "config": vars(args),
        "world_size": world,
        "num_params": num_params,
        "tokens_per_rank": args.batch * args.seq,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "commit": _commit(),
        "median_ms": med,
        "replay_over_plain": med["train replay"] / med["train plain"],
        "record_over_plain": med["forward record"] / med["forward plain"],
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "runs_ms": runs,
    }
    if rank == 0:
        print(
            f"{num_params / 1e9:.2f}B params, world {world}, {args.batch}x{args.seq} tokens per rank, "
            f"{report['device']}"
        )
        for k, v in med.items():
            print(f"  {k:15s} {v:9.1f} ms (median of {args.reps})")
        print(f"  replay/plain {report['replay_over_plain']:.3f}   record/plain {report['record_over_plain']:.3f}")
        out = os.environ.get("OUT", "/tmp/routereplay-gpu")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_fsdp2.json"), "w") as f:
            json.dump(report, f, indent=1)
    dist.destroy_process_group()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
