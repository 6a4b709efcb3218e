"""Ulysses sequence parallel 2 on two gloo processes: each rank replays exactly its slice.

verl's Ulysses attention all-to-all lives in its flash-attention patch and gloo has no all_to_all,
so on the CPU each rank's attention sees only its slice; everything routing replay depends on is
verl's own code: the pad-and-slice of the packed rows (``ulysses_pad_and_slice_inputs``), the
rows each rank's routers see, and the all-gather of the outputs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import traceback

import pytest
import torch

HERE = os.path.dirname(__file__)
PROMPTS, RESPONSES = [3, 5, 6, 2], [4, 7, 2, 6]  # 35 tokens: odd, so Ulysses pads one row


def _worker(rank: int, port: int, model_dir: str, errors) -> None:
    try:
        sys.path.insert(0, HERE)
        import verl_cpu

        verl_cpu.use_cpu_platform()
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        _check_rank(rank, model_dir, verl_cpu)
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def _check_rank(rank: int, model_dir: str, V) -> None:
    import copy

    from verl.utils.ulysses import ulysses_pad_and_slice_inputs

    from routereplay.core.layout import split_sp
    from routereplay.core.trace import RoutingTrace
    from routereplay.rl.store import DispatchTap

    # R3: the rank's routers receive verl's slice of the rollout routes
    eng = V.make_engine(model_dir, mode="R3", sp=2, grad_ckpt=True)
    batch, aligned = V.agent_loop_batch(PROMPTS, RESPONSES, layout="legacy")
    td = V.to_engine_batch(batch, aligned, micro_batch_size=4)  # one packed micro-batch
    with eng.eval_mode():
        with DispatchTap(eng.router_handle) as tap:
            out = eng.infer_batch(copy.copy(td))
        T = int(td["input_ids"].offsets()[-1])
        idx_1N, _, pad = ulysses_pad_and_slice_inputs(torch.arange(T)[None], sp_size=2)  # verl's own slicing
    idx_N = idx_1N[0]
    assert pad == 1 and idx_N.numel() == (T + 1) // 2
    assert torch.equal(idx_N[: T - rank * idx_N.numel()], torch.arange(rank * idx_N.numel(), T)[: idx_N.numel()])
    rows_TLK = torch.cat(aligned).to(torch.int64)
    lens = [a.shape[0] for a in aligned]
    valid_T = torch.cat([torch.arange(n) < n - 1 for n in lens])
    real_N = rank * idx_N.numel() + torch.arange(idx_N.numel()) < T  # verl pads with row 0's index
    keep_N = real_N & valid_T[idx_N]
    seen_NLK = tap.trace().experts.to(torch.int64)
    assert torch.equal(seen_NLK[keep_N], rows_TLK[idx_N][keep_N])
    full = RoutingTrace(
        experts=rows_TLK, cu_seqlens=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()]), layer_ids=(0, 1),
        num_experts=V.NUM_EXPERTS, valid=valid_T,
    )
    shard = split_sp(full, 2, rank=rank)  # routereplay's slice == verl's slice, padding included
    assert torch.equal(shard.valid_mask, keep_N)
    assert torch.equal(shard.experts.to(torch.int64)[keep_N], rows_TLK[idx_N][keep_N])
    assert [float(v) for v in out["metrics"]["router_replay/disagreement"]] == [0.0]
    assert float(out["metrics"]["router_replay/coverage"][0]) == pytest.approx((T - 4) / T)  # summed over ranks
    with eng.train_mode():
        m = eng.train_batch(copy.copy(td), V.response_logprob_loss)["metrics"]
    assert [float(v) for v in m["router_replay/disagreement"]] == [0.0]

    # R2: each rank records its slice; the gathered routes replay with no drift before any step
    eng2 = V.make_engine(model_dir, mode="R2", sp=2)
    td2 = V.to_engine_batch(batch, micro_batch_size=2)
    del td2["routed_experts"]
    with eng2.eval_mode():
        routes = eng2.infer_batch(copy.copy(td2))["model_output"]["routed_experts"]
    assert torch.equal(routes.offsets(), td2["input_ids"].offsets())
    td2["routed_experts"] = routes
    with eng2.train_mode():  # both micro-batches replay before the optimizer step: the old policy's weights
        m2 = eng2.train_batch(copy.copy(td2), V.response_logprob_loss)["metrics"]
    assert [float(v) for v in m2["router_replay/disagreement"]] == [0.0, 0.0]
    assert [float(v) for v in m2["router_replay/live_disagreement"]] == [0.0, 0.0]
    assert [float(v) for v in m2["router_replay/coverage"]] == [1.0, 1.0]


def test_ulysses_sp2_each_rank_replays_its_slice(model_dir):
    from conftest import free_port

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, model_dir, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not msgs, "\n".join(msgs)
    assert [p.exitcode for p in procs] == [0, 0]
