"""A Megatron-Core training step (forward + backward), live vs routereplay's replay vs Megatron's
own RouterReplay replay: same model, same batch, same run.

    CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc_per_node=1 benchmarks/bench_megatron_step.py \\
        --layers 8 --hidden 1024 --experts 64 --topk 8 --batch 4 --seq 2048 --reps 12 --out $OUT

(``--nproc_per_node=2 --ep 2`` or ``--tp 2`` for two GPUs.) One ``GPTModel`` from the local spec
(no Transformer Engine), built with ``moe_enable_routing_replay=True`` so Megatron's replay is
there; routereplay's handle is attached only for its own variant, so "live" has no hook at all.
Both replays use the ids of one recorded live forward, kept on the GPU. Repetitions are
interleaved (live, routereplay, megatron, live, ...); medians and ratios to live are printed and
written to ``$OUT/bench_megatron_step.json``. Target: routereplay <= megatron and <= 1.02 x live.

Legend: S sequence length, B batch, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()

    import megatron.core
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
    from megatron.core.transformer.transformer_config import TransformerConfig

    import routereplay
    from routereplay.adapters import megatron as mga
    from routereplay.core.trace import RoutingTrace

    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tp, expert_model_parallel_size=args.ep, expert_tensor_parallel_size=1
    )
    model_parallel_cuda_manual_seed(0)
    if "te_general_gemm" not in vars(moe_utils):
        moe_utils.te_general_gemm = None
    bf16 = args.dtype == "bf16"
    config = TransformerConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        ffn_hidden_size=args.hidden * 2,
        moe_ffn_hidden_size=args.hidden // 2,
        num_attention_heads=max(args.hidden // 128, 1),
        num_moe_experts=args.experts,
        moe_router_topk=args.topk,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-3,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=args.tp,
        expert_model_parallel_size=args.ep,
        expert_tensor_parallel_size=1,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        moe_router_dtype="fp32",
        moe_enable_routing_replay=True,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=args.experts, moe_grouped_gemm=False),
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
    ).cuda()
    if bf16:
        model = Float16Module(config, model)
    model.train()
    S, B = args.seq, args.batch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (B, S), generator=g).cuda()
    pos = torch.arange(S).expand(B, S).contiguous().cuda()
    mask = torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), 1).cuda()

    def step() -> None:
        out = model(ids, pos, mask)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    # One live forward recorded by Megatron, kept on the GPU: the ids both replays use.
    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
    with torch.no_grad():
        model(ids, pos, mask)
    recorded = [t.clone() for t in RouterReplay.get_recorded_data()]
    RouterReplay.clear_global_router_replay_action()
    handle = routereplay.attach(model, adapter=mga)
    layer_ids = handle.layer_ids
    handle.detach()
    trace = RoutingTrace(
        experts=torch.stack(recorded, dim=1),
        cu_seqlens=torch.tensor([0, S * B], device="cuda"),
        layer_ids=layer_ids,
        num_experts=args.experts,
    )

    def timed(kind: str) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if kind == "live":
            step()
        elif kind == "routereplay":
            h = routereplay.attach(model, adapter=mga)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with h.replay(trace):
                step()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            h.detach()
            return dt
        else:
            RouterReplay.set_replay_data(recorded)
            RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            step()
            RouterReplay.clear_global_router_replay_action()
            RouterReplay.clear_global_indices()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    kinds = ("live", "routereplay", "megatron")
    for _ in range(args.warmup):
        for k in kinds:
            timed(k)
    times = {k: [] for k in kinds}
    for _ in range(args.reps):
        for k in kinds:
            times[k].append(timed(k))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = {
        "args": vars(args),
        "gpu": torch.cuda.get_device_name(),
        "world": dist.get_world_size(),
        "megatron_core": megatron.core.__version__,
        "median_ms": med,
        "ratio_to_live": {k: med[k] / med["live"] for k in kinds},
        "routereplay_over_megatron": med["routereplay"] / med["megatron"],
    }
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_megatron_step.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
