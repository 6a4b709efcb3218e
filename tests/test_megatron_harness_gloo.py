"""CPU smoke of the Megatron GPU tier's gloo-on-one-GPU harness (tests/megatron_gpu/gloo1gpu.py), in CI.

The GPU tier runs only on the lent machine; these tests keep its transport pieces from rotting in
between, on gloo with CPU tensors and two real processes, with Megatron's own code as the oracle:

- the host-staged pipeline p2p, driven through Megatron's real ``P2PCommunicator`` (both its batched
  and its unbatched path, and the two-stage case where prev == next, where a mixed-up tag would put
  an activation into a gradient buffer);
- ``SequenceParallelNorm`` swapped into Megatron's local GPT spec: under TP 2 with SP, each rank's
  norm on its sequence slice plus Megatron's own TP all-reduce of ``sequence_parallel`` grads
  (``finalize_model_grads``) equal the unsharded norm;
- the rows check (f) hands Megatron's RouterReplay under SP (``megatron_rows``) equal what
  Megatron's ``scatter_to_sequence_parallel_region`` gives the rank, and what
  ``routereplay.parallel`` slices for it;
- the harness's own ``build`` and ``attach`` for ``tp2``, ``tp2_ep2_etp1`` (SP norms marked, no
  ``WrappedTorchNorm`` assertion) and ``pp2_mtp1`` (the MTP router's id ``num_layers`` on the last
  stage), construction only.
Megatron's MoE layer needs CUDA, so no model forward runs here (see tests/test_megatron_cpu.py).
"""

from __future__ import annotations

import os
import sys
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'routereplay[megatron]')")

HARNESS = os.path.join(os.path.dirname(__file__), "megatron_gpu")
sys.path.insert(0, HARNESS)
import gloo1gpu  # tests/megatron_gpu is not a package

pytestmark = pytest.mark.filterwarnings("ignore")
WORLD = 2


def test_transport_from_env():
    assert gloo1gpu.transport({}) == "nccl"
    assert gloo1gpu.transport({"RR_TRANSPORT": "gloo1gpu"}) == "gloo1gpu"
    with pytest.raises(ValueError, match=r"RR_TRANSPORT='gloo': expected one of \('nccl', 'gloo1gpu'\)"):
        gloo1gpu.transport({"RR_TRANSPORT": "gloo"})


def test_device_for_rank():
    assert [gloo1gpu.device_for_rank(r, 1, 4, "gloo1gpu") for r in range(4)] == [0, 0, 0, 0]
    assert [gloo1gpu.device_for_rank(r, 2, 4, "gloo1gpu") for r in range(4)] == [0, 1, 0, 1]
    assert gloo1gpu.device_for_rank(1, 2, 2, "nccl") == 1
    with pytest.raises(RuntimeError, match=r"RR_TRANSPORT=nccl: 4 ranks need 4 GPUs, found 1 .*RR_TRANSPORT=gloo1gpu"):
        gloo1gpu.device_for_rank(0, 1, 4, "nccl")
    with pytest.raises(RuntimeError, match="rank 0: no CUDA device visible"):
        gloo1gpu.device_for_rank(0, 0, 2, "gloo1gpu")


def test_host_staged_p2p_restores_megatron():
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    before = p2p._batched_p2p_ops, p2p._p2p_ops
    with pytest.raises(KeyError), gloo1gpu.host_staged_p2p():
        assert p2p._p2p_ops is gloo1gpu.staged_p2p_ops
        raise KeyError("inside")
    assert (p2p._batched_p2p_ops, p2p._p2p_ops) == before


def test_with_sequence_parallel_norm_needs_a_torch_norm():
    with pytest.raises(ValueError, match="the spec has no WrappedTorchNorm"):
        gloo1gpu.with_sequence_parallel_norm({"layer_norm": torch.nn.LayerNorm})


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = {
        "num_layers": 2,
        "hidden_size": 16,
        "num_attention_heads": 4,
        "num_moe_experts": 4,
        "moe_router_topk": 2,
        "use_cpu_initialization": True,
        "add_bias_linear": False,
        "tensor_model_parallel_size": WORLD,
        "sequence_parallel": True,
        "pipeline_dtype": torch.float32,
    }
    return TransformerConfig(**{**base, **kw})


def _p2p(rank: int) -> None:
    """Megatron's P2PCommunicator over two stages, through the host-staged ops."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    shape = (3, 2, 4)
    act = torch.full(shape, 10.0 + rank)  # what this stage sends next-ward
    grad = torch.full(shape, -20.0 - rank)  # what it sends prev-ward
    group = dist.new_group([0, 1])
    for batched in (True, False):
        config = ModelParallelConfig(pipeline_dtype=torch.float32, batch_p2p_comm=batched, batch_p2p_sync=False)
        comm = p2p.P2PCommunicator(pp_group=group, config=config)
        # Megatron allocates its receive buffers on torch.cuda.current_device(): here, the CPU.
        with gloo1gpu.host_staged_p2p(), mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
            # 1F1B: stage 0 sends its activation, gets stage 1's gradient back
            if rank == 0:
                got = comm.send_forward_recv_backward(act, shape, is_last_stage=False)
                assert torch.equal(got, torch.full(shape, -21.0)), (batched, got.flatten()[:3])
            else:
                got = comm.send_backward_recv_forward(grad, shape, is_first_stage=False)
                assert torch.equal(got, torch.full(shape, 10.0)), (batched, got.flatten()[:3])
            assert got.requires_grad  # Megatron's receive buffer, filled in place
            # interleaved (VPP): both directions at once, prev == next with two stages
            recv_prev, recv_next = comm.send_forward_backward_recv_forward_backward(
                act, grad, recv_prev=True, recv_next=True, tensor_shape=shape
            )
            other = 1 - rank
            assert torch.equal(recv_prev, torch.full(shape, 10.0 + other)), (batched, "activation slot")
            assert torch.equal(recv_next, torch.full(shape, -20.0 - other)), (batched, "gradient slot")


def _sp_norm(rank: int) -> None:
    """SequenceParallelNorm in Megatron's local spec, against the unsharded norm."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import _allreduce_non_tensor_model_parallel_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = _config()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    with pytest.raises(AssertionError, match="sequence parallel not supported by torch LayerNorm"):
        build_module(spec.layer_norm, config=config, hidden_size=16, eps=1e-5)
    swapped = gloo1gpu.with_sequence_parallel_norm(spec)
    assert spec.layer_norm is WrappedTorchNorm  # the original is left as it was
    assert swapped.layer_norm is gloo1gpu.SequenceParallelNorm
    for layer in swapped.layer_specs:
        assert layer.submodules.input_layernorm is gloo1gpu.SequenceParallelNorm
        assert layer.submodules.pre_mlp_layernorm is gloo1gpu.SequenceParallelNorm
    norm = build_module(swapped.layer_norm, config=config, hidden_size=16, eps=1e-5)
    assert type(norm) is torch.nn.LayerNorm and sorted(norm.state_dict()) == ["bias", "weight"]
    assert all(p.sequence_parallel is True for p in norm.parameters())
    torch.manual_seed(0)  # same weights and input on both ranks
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    ref = torch.nn.LayerNorm(16)
    ref.load_state_dict(norm.state_dict())
    x_SBH = torch.randn(8, 2, 16)
    w_SBH = torch.randn(8, 2, 16)
    x_local = scatter_to_sequence_parallel_region(x_SBH)  # Megatron's own split of S over TP
    n = 8 // WORLD
    (norm(x_local) * w_SBH[rank * n : (rank + 1) * n]).sum().backward()
    out_ref = ref(x_SBH)
    (out_ref * w_SBH).sum().backward()
    assert torch.equal(norm(x_local).detach(), out_ref[rank * n : (rank + 1) * n].detach())
    chunk = torch.nn.Module()
    chunk.norm, chunk.ddp_config = norm, DistributedDataParallelConfig()
    _allreduce_non_tensor_model_parallel_grads([chunk], config)  # what finalize_model_grads does
    for p, q in zip(norm.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6)
    unmarked = torch.nn.LayerNorm(16)  # a norm without the mark is left unreduced: the check above can fail
    unmarked.load_state_dict(norm.state_dict())
    (unmarked(x_local) * w_SBH[rank * n : (rank + 1) * n]).sum().backward()
    bare = torch.nn.Module()
    bare.norm, bare.ddp_config = unmarked, DistributedDataParallelConfig()
    _allreduce_non_tensor_model_parallel_grads([bare], config)
    assert not torch.allclose(unmarked.weight.grad, ref.weight.grad)


def _sp_rows(rank: int) -> None:
    """Check (f)'s Megatron-side rows and routereplay.parallel's slice, against Megatron's scatter."""
    import run_megatron_gpu as harness
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region

    from routereplay import parallel

    S, B = harness.S, harness.B
    cfg = harness.CONFIGS["tp2"]
    assert cfg["sp"] and cfg["tp"] == WORLD
    row_SB1 = torch.arange(S * B, dtype=torch.float32).reshape(B, S).T.contiguous()[..., None]  # row = b*S + s
    seen_N = scatter_to_sequence_parallel_region(row_SB1).reshape(-1).long()  # rows this rank's router sees
    ids_BSLK = torch.arange(B * S).reshape(B, S, 1, 1)  # each row's id is its packed row index
    assert torch.equal(harness.megatron_rows(ids_BSLK, cfg).reshape(-1), seen_N)
    layout = parallel.ParallelLayout(micro_batch_size=B, format="sbhd", seq_length=S, tp=WORLD, sequence_parallel=True)
    src_N = parallel.router_rows(layout, [S] * B, parallel.RankCoords(tp=rank))
    assert torch.equal(src_N, seen_N)


def _harness_models(rank: int) -> None:
    """The harness's own ``build`` and ``attach`` for the TP+SP and MTP configurations, construction
    only (on the CPU): every norm is marked for SP, and the MTP router's id follows the decoder's."""
    import run_megatron_gpu as harness
    from megatron.core import parallel_state as ps

    # Construction only: Megatron's all-to-all dispatcher makes a CUDA stream in __init__, and the
    # last stage moves the tied embedding to CUDA before its all-reduce.
    no_cuda = (
        mock.patch.object(torch.cuda, "Stream", lambda *a, **k: None),
        mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self),
    )
    want = {"tp2": [[0, 1, 2, 3]] * 2, "tp2_ep2_etp1": [[0, 1, 2, 3]] * 2, "pp2_mtp1": [[0, 1], [2, 3, 4]]}
    for name, layer_ids in want.items():
        cfg = harness.CONFIGS[name]
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.get("tp", 1),
            pipeline_model_parallel_size=cfg.get("pp", 1),
            expert_model_parallel_size=cfg.get("ep", 1),
            expert_tensor_parallel_size=cfg.get("etp", cfg.get("tp", 1)),
        )
        try:
            with no_cuda[0], no_cuda[1]:
                chunks = harness.build(cfg, device="cpu")
            handle = harness.attach(chunks)
            assert list(handle.layer_ids) == layer_ids[rank], (name, handle.layer_ids)
            handle.detach()
            norms = [m for c in chunks for m in c.modules() if isinstance(m, torch.nn.LayerNorm)]
            assert norms, name
            marked = {p.sequence_parallel for m in norms for p in m.parameters() if hasattr(p, "sequence_parallel")}
            params = sum(1 for m in norms for _ in m.parameters())
            assert marked == ({True} if cfg.get("sp") else set()), (name, marked)
            assert sum(1 for m in norms for p in m.parameters() if getattr(p, "sequence_parallel", False)) == (
                params if cfg.get("sp") else 0
            )
        finally:
            ps.destroy_model_parallel()


def _worker(rank: int, path: str) -> None:
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=WORLD)
        _p2p(rank)
        _sp_norm(rank)
        _sp_rows(rank)
        ps.destroy_model_parallel()
        _harness_models(rank)
    finally:
        dist.destroy_process_group()


def test_harness_on_two_gloo_ranks(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):  # raises with the rank's traceback when one fails
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks still run after 240 s: a pipeline p2p that never matched (deadlock)")
