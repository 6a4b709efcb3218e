"""R2 routing replay on an HF MoE model sharded with FSDP2, on 2 processes.

    python examples/fsdp2_r2.py                        # 2 CPU processes on gloo (spawned here)
    torchrun --nproc-per-node 2 examples/fsdp2_r2.py   # one GPU per process, NCCL

Each step: the old-policy pass records every micro-batch's routes into a RouteStore (R2) with the
log-probs; the update pass replays them, so the importance ratio compares two policies that route
the same tokens to the same experts. Every rank trains its DistributedSampler share of the batch.
After the step, the batch's old-policy routes are all-gathered in sample order (rank 0 could save
them), and the routing drift of the updated policy is measured over all ranks.

Legend: B samples of a micro-batch, S padded length, V vocabulary.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

import routereplay
from routereplay.parallel import collectives as rd
from routereplay.rl import RouteStore, token_logprobs


def tiny_moe() -> transformers.PreTrainedModel:
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)  # the same initial weights on every rank
    return transformers.Qwen3MoeForCausalLM(config)


def batch(data: list[torch.Tensor], ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids [B, S]`` and ``attention_mask [B, S]`` of the samples ``ids``."""
    S = max(data[i].numel() for i in ids)
    input_ids_BS = torch.zeros(len(ids), S, dtype=torch.long, device=device)
    mask_BS = torch.zeros_like(input_ids_BS)
    for b, i in enumerate(ids):
        input_ids_BS[b, S - data[i].numel() :] = data[i]
        mask_BS[b, S - data[i].numel() :] = 1
    return input_ids_BS, mask_BS


def train(steps: int = 2, micro_batch: int = 2) -> dict:
    """Run ``steps`` R2 steps on the process group already initialised; returns what it measured."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = tiny_moe().to(device)
    handle = routereplay.attach(model)  # before or after fully_shard: the hooks live on module instances
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(1)  # the same global batch on every rank
    data = [torch.randint(3, 64, (int(n),), generator=g) for n in torch.randint(4, 10, (8,), generator=g)]
    advantages = torch.randn(len(data), generator=g)
    out = {"max_abs_log_ratio_first_pass": 0.0}
    for step in range(steps):
        ids = rd.distributed_sample_ids(len(data), num_replicas=world, rank=rank, epoch=step)
        micro = [ids[i : i + micro_batch] for i in range(0, len(ids), micro_batch)]
        optim.zero_grad(set_to_none=True)  # before the no_grad old-policy pass (see docs/DISTRIBUTED.md)
        store, old_logp = RouteStore(handle), {}
        with torch.no_grad():  # old policy: routes and log-probs of the sampled tokens
            for mb in micro:
                input_ids, mask = batch(data, mb, device)
                with store.record(mb, attention_mask=mask):
                    old_logp[tuple(mb)] = token_logprobs(
                        model(input_ids=input_ids, attention_mask=mask).logits, input_ids
                    )
        num_tokens = sum(data[i].numel() - 1 for i in range(len(data)))
        for mb in micro:  # update: the same routes, whatever the new weights would pick
            input_ids, mask = batch(data, mb, device)
            with store.replay(mb, attention_mask=mask):
                logp_BS = token_logprobs(model(input_ids=input_ids, attention_mask=mask).logits, input_ids)
            predicted_BS = mask * torch.nn.functional.pad(mask[:, :-1], (1, 0))  # token and its context real
            log_ratio_BS = (logp_BS - old_logp[tuple(mb)]) * predicted_BS
            if step == 0:  # same weights, same routes: the ratio is exactly 1
                first = float(log_ratio_BS.detach().abs().max())
                out["max_abs_log_ratio_first_pass"] = max(out["max_abs_log_ratio_first_pass"], first)
            adv_B1 = advantages[mb].to(device)[:, None]
            # token sum over the global token count, times world: FSDP averages gradients over ranks
            loss = -(log_ratio_BS.exp() * adv_B1 * predicted_BS).sum() * world / num_tokens
            loss.backward()
        optim.step()

        sample_ids, old_routes = rd.gather_store(store)  # the batch's old-policy routes, every rank
        with torch.no_grad(), handle.record() as rec:  # the updated policy's own routes of this rank's samples
            input_ids, mask = batch(data, sorted(ids), device)
            model(input_ids=input_ids, attention_mask=mask)
        drift = rd.global_routing_agreement(store.trace(sorted(ids)), rec.trace(attention_mask=mask))
        out[f"step{step}"] = {"gathered_samples": sample_ids, "disagreement_after_update": drift.disagreement}
        if rank == 0:
            print(f"step {step}: {old_routes.num_seqs} samples' routes gathered; after the update "
                  f"{drift.disagreement:.1%} of (token, layer) routes changed "
                  f"over {drift.num_tokens} tokens")  # fmt: skip
    handle.detach()
    return out


def _spawned(rank: int, world: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = train()
        if rank == 0:
            print(out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
        try:
            train()
        finally:
            dist.destroy_process_group()
    else:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(2, port), nprocs=2, join=True)
