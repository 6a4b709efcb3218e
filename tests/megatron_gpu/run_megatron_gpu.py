"""Megatron-Core GPU tier: routereplay on GPTModel, against Megatron's own RouterReplay (issue 8, 5(a)-(e)).

Run one configuration per torchrun launch (``run_all.sh`` runs every one that fits the GPUs):

    CUDA_DEVICE_MAX_CONNECTIONS=1 torchrun --nproc_per_node=N tests/megatron_gpu/run_megatron_gpu.py \\
        --config NAME --out $OUT

Checks, each on every rank (results: ``$OUT/megatron_<config>.json``, one line per check):
    (a) record_replay_bitexact   record a forward, replay its trace: the logits are bit-identical
    (b) forced_equals_megatron   force other valid ids: the output changes, and equals what Megatron's
                                 own RouterReplay (REPLAY_FORWARD) gives forced with the same ids
    (c) recompute_grads_equal    forward+backward under forced ids, with full (uniform) and selective
                                 ("moe") recompute: gradients equal those without recompute
    (d) two_models_independent   an actor and a reference GPTModel in one process record and replay
                                 independently (Megatron's global list cannot do this)
    (e) r3_vllm_trace            a global trace as vLLM returns it (engine rows, dense layers as zero
                                 rows) -> routereplay.formats -> routereplay.parallel slice per rank ->
                                 replay on every rank: the logits equal the recorded ones
    (f) slice_equals_megatron    forced ids for a whole batch, cut per rank by routereplay.parallel
                                 (SP slices included) and replayed by routereplay, equal Megatron's own
                                 RouterReplay given the same ids placed from Megatron's data path
    (g) mtp_*                    (MTP configurations, instead of (e) and (f)) MTP routes under PP:
                                 record -> replay, forced ids equal Megatron's RouterReplay
    (h) dispatch_disagreement    DispatchTap (the handle's dispatch witness) over Megatron's schedule:
                                 replaying other valid ids, it sees them row for row (routing_agreement
                                 disagreement 0 against them, > 0 against the live routes); a live
                                 forward with no block reads disagreement 0 against the recorded routes
Transport (``RR_TRANSPORT``, recorded in every result row with the rank and GPU counts): ``nccl``,
one GPU per rank (default); ``gloo1gpu``, every rank on one GPU over gloo, the pipeline send/recv
staged through host memory (gloo1gpu.py). TP configurations run with sequence parallelism (Megatron's
MoE refuses TP without it in training) and the harness's SequenceParallelNorm.
Pipeline configurations run Megatron's schedules (1F1B, or interleaved with VPP 2) with several
micro-batches, forward and backward; every micro-batch replays its own ids. fp32,
``deterministic_mode`` and ``torch.use_deterministic_algorithms`` (outputs compared bit for bit).

Legend: S sequence length, B micro-batch size, V vocabulary, N = S * B router rows, K top-k.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import traceback
import types

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gloo1gpu  # the harness's transport pieces, next to this file

# name -> parallel sizes (tp, ep, etp, pp, vpp), sequence parallelism, dense layers. Megatron's
# MoELayer refuses TP without SP in training, so every TP configuration runs with SP; its norms are
# the harness's SequenceParallelNorm (gloo1gpu.py), the local spec's torch norm asserting SP off.
CONFIGS = {
    "single": {"ranks": 1},
    "dp2": {"ranks": 2},
    "tp2": {"ranks": 2, "tp": 2, "sp": True},
    "ep2": {"ranks": 2, "ep": 2},
    "tp2_ep2_etp1": {"ranks": 2, "tp": 2, "ep": 2, "etp": 1, "sp": True},
    "pp2": {"ranks": 2, "pp": 2},
    "pp2_vpp2": {"ranks": 2, "pp": 2, "vpp": 2},
    # issue 14 (4 GPUs)
    "tp2_pp2": {"ranks": 4, "tp": 2, "pp": 2, "sp": True},
    "ep2_pp2": {"ranks": 4, "ep": 2, "pp": 2},
    "tp2_ep2_dp2_etp1": {"ranks": 4, "tp": 2, "ep": 2, "etp": 1, "sp": True},
    "pp2_vpp2_ep2": {"ranks": 4, "pp": 2, "vpp": 2, "ep": 2},
    "pp2_dense_stage": {"ranks": 2, "pp": 2, "dense": (0, 1)},  # stage 0 has no MoE layer
    # issue 19: one MTP depth (an MoE layer, ids num_layers + d) on the last pipeline stage
    "pp2_mtp1": {"ranks": 2, "pp": 2, "mtp": 1},
}
S, B, V, HIDDEN, EXPERTS, TOPK, LAYERS = 32, 2, 128, 64, 8, 2, 4


def log(msg: str) -> None:
    print(f"[rank {dist.get_rank()}] {msg}", flush=True)


def setup(cfg: dict, mode: str) -> None:
    """Process group and Megatron's parallel state. ``mode`` (``RR_TRANSPORT``): ``nccl``, one GPU
    per rank; ``gloo1gpu``, every rank on one GPU over gloo (gloo1gpu.py)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_utils

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = gloo1gpu.device_for_rank(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count(), world, mode)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl" if mode == "nccl" else "gloo")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.get("tp", 1),
        pipeline_model_parallel_size=cfg.get("pp", 1),
        virtual_pipeline_model_parallel_size=cfg.get("vpp") if cfg.get("vpp", 1) > 1 else None,
        expert_model_parallel_size=cfg.get("ep", 1),
        expert_tensor_parallel_size=cfg.get("etp", cfg.get("tp", 1)),
    )
    model_parallel_cuda_manual_seed(1234)
    if "te_general_gemm" not in vars(moe_utils):  # 0.16.1 names it even without Transformer Engine
        moe_utils.te_general_gemm = None
    torch.use_deterministic_algorithms(True)


def transformer_config(cfg: dict, *, replay: bool = False, recompute: str | None = None, cpu: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dense = set(cfg.get("dense", ()))
    kw = {
        "num_layers": LAYERS,
        "hidden_size": HIDDEN,
        "num_attention_heads": 4,
        "num_moe_experts": EXPERTS,
        "moe_router_topk": TOPK,
        "moe_layer_freq": [0 if i in dense else 1 for i in range(LAYERS)],
        "moe_token_dispatcher_type": "alltoall",
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": 1e-2,
        "moe_router_pre_softmax": False,
        "add_bias_linear": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tensor_model_parallel_size": cfg.get("tp", 1),
        "pipeline_model_parallel_size": cfg.get("pp", 1),
        "virtual_pipeline_model_parallel_size": cfg.get("vpp") if cfg.get("vpp", 1) > 1 else None,
        "expert_model_parallel_size": cfg.get("ep", 1),
        "expert_tensor_parallel_size": cfg.get("etp", cfg.get("tp", 1)),
        "sequence_parallel": cfg.get("sp", False),
        "pipeline_dtype": torch.float32,
        "deterministic_mode": True,
        "moe_enable_routing_replay": replay,
        "use_cpu_initialization": cpu,  # the CI smoke builds the models on the CPU (no forward)
    }
    if cfg.get("mtp"):
        kw["mtp_num_layers"] = cfg["mtp"]
    if recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["moe"])
    return TransformerConfig(**kw)


def build(cfg: dict, seed: int = 7, device: str = "cuda", **tkw) -> list:
    """The model chunks of this rank (one without VPP), same weights for the same seed. ``device="cpu"``:
    built on the CPU (tests/test_megatron_harness_gloo.py; Megatron's MoE forward needs CUDA)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    config = transformer_config(cfg, cpu=device == "cpu", **tkw)
    vpp = cfg.get("vpp", 1)
    chunks = []
    torch.manual_seed(seed)
    if device == "cuda":
        model_parallel_cuda_manual_seed(seed)
    for v in range(vpp):
        vp = v if vpp > 1 else None
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp)
        if config.sequence_parallel:
            spec = gloo1gpu.with_sequence_parallel_norm(spec)
        extra = {}
        if cfg.get("mtp"):  # None on every stage but the last
            extra["mtp_block_spec"] = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=vp)
        m = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=V,
            max_sequence_length=S,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp,
            **extra,
        ).to(device)
        m.train()  # dropout is 0; Megatron recomputes only in training mode
        chunks.append(m)
    return chunks


def copy_weights(dst: list, src: list) -> None:
    for d, s in zip(dst, src):
        d.load_state_dict(s.state_dict())


def batches(num_mb: int, seed: int) -> list[dict]:
    """Micro-batches of this DP rank (every TP/PP rank of a DP rank gets the same)."""
    from megatron.core import parallel_state as ps

    g = torch.Generator().manual_seed(seed * 1000 + ps.get_data_parallel_rank())
    out = []
    for _ in range(num_mb):
        ids = torch.randint(0, V, (B, S), generator=g)
        out.append(
            {
                "input_ids": ids.cuda(),
                "position_ids": torch.arange(S).expand(B, S).contiguous().cuda(),
                "attention_mask": torch.triu(torch.ones(1, 1, S, S, dtype=torch.bool), 1).cuda(),
                "labels": ids.roll(-1, dims=1).cuda(),  # MTP needs labels (its loss is in the forward)
            }
        )
    return out


def run_schedule(chunks: list, mbs: list[dict], *, backward: bool) -> list[torch.Tensor]:
    """Megatron's schedule over the micro-batches; returns the last stage's logits per micro-batch
    (empty on other stages). Loss: mean of squared logits (every logit gets a gradient)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    outputs: list[torch.Tensor] = []
    mtp = chunks[0].config.mtp_num_layers is not None

    def loss_func(output_tensor):
        outputs.append(output_tensor.detach().clone())
        loss = output_tensor.float().pow(2).mean()
        return loss, {"loss": loss.detach()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        # With MTP, GPTModel needs labels and returns the per-token main loss [B, S]; the MTP loss
        # only reaches the gradients (MTPLossAutoScaler), so MTP checks compare gradients.
        labels = {"labels": batch["labels"]} if mtp else {}
        return model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], **labels), loss_func

    iters = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(mbs),
        seq_length=S,
        micro_batch_size=B,
        forward_only=not backward,
    )
    return outputs


def grads(chunks: list) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else None for c in chunks for p in c.parameters()]


def zero_grads(chunks: list) -> None:
    for c in chunks:
        for p in c.parameters():
            p.grad = None


class DenseStage:
    """What this harness uses on a pipeline stage without MoE layers, where ``attach`` raises
    NoMoELayersError (as a user's code would branch): record and replay blocks that do nothing, so
    the stage still runs every schedule the MoE stages run."""

    layer_ids: tuple[int, ...] = ()

    def record(self):
        return contextlib.nullcontext(types.SimpleNamespace(calls=[]))

    def replay(self, *args, **kwargs):
        return contextlib.nullcontext()

    def detach(self) -> None:
        pass


def attach(chunks: list):
    """``routereplay.runtime.attach`` on this rank's model (the chunk list under VPP). Without an installed
    routereplay (PYTHONPATH=src on the lent machine) the entry points are absent: name the adapter.
    A stage without MoE layers gets a :class:`DenseStage`."""
    import routereplay
    from routereplay.adapters import megatron as mga
    from routereplay.core.errors import NoMoELayersError

    model = chunks if len(chunks) > 1 else chunks[0]
    registered = [n for n, _ in importlib.import_module("routereplay.runtime.attach").adapters()]
    try:
        return routereplay.attach(model) if "megatron" in registered else routereplay.attach(model, adapter=mga)
    except NoMoELayersError as e:
        log(f"no MoE layer on this stage, routereplay skipped here: {e}")
        return DenseStage()


def traces_of(rec, handle) -> list:
    """One RoutingTrace (router rows) per recorded forward."""
    from routereplay.core.trace import RoutingTrace

    out = []
    for ids_NLK in rec.calls:
        N = ids_NLK.shape[0]
        out.append(
            RoutingTrace(
                experts=ids_NLK.cpu(),
                cu_seqlens=torch.tensor([0, N]),
                layer_ids=handle.layer_ids,
                num_experts=handle.num_experts,
            )
        )
    return out


def other_routes(trace, seed: int):
    """Valid routes that differ from ``trace``'s: a random K of E per row and layer."""
    g = torch.Generator().manual_seed(seed)
    T, L, K = trace.experts.shape
    ids = torch.rand(T * L, trace.num_experts, generator=g).argsort(-1)[:, :K].reshape(T, L, K)
    return trace.replace(check=False, experts=ids.to(trace.experts.dtype))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b)
    )


# --- checks ----------------------------------------------------------------------------------
def check_a_b(cfg, num_mb: int) -> dict:
    """(a) and (b) on one model built with Megatron's replay enabled (its list holds only this model)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    RouterReplay.clear_global_router_replay_instances()
    chunks = build(cfg, replay=True)
    routers = [m for c in chunks for m in c.modules() if type(m).__name__ == "TopKRouter"]
    instances = [r.router_replay for r in routers]
    assert instances == RouterReplay.global_router_replay_instances
    mbs = batches(num_mb, seed=1)
    handle = attach(chunks)
    res = {"layers": list(handle.layer_ids)}
    live = run_schedule(chunks, mbs, backward=False)
    with handle.record() as rec:
        recorded = run_schedule(chunks, mbs, backward=False)
    traces = traces_of(rec, handle)
    with handle.replay(traces):
        replayed = run_schedule(chunks, mbs, backward=False)
    res["a_record_replay_bitexact"] = same(live, recorded) and same(recorded, replayed)
    res["rows_per_router"] = traces[0].num_tokens if traces else 0
    # (b) forced other routes, then the same ids through Megatron's own RouterReplay. It keeps one
    # REPLAY_FORWARD target per router, so the micro-batches go through its FIFO instead
    # (REPLAY_BACKWARD pops one per forward, in order; the same gather as REPLAY_FORWARD).
    forced = [other_routes(t, 100 + i) for i, t in enumerate(traces)]
    with handle.replay(forced):
        ours = run_schedule(chunks, mbs, backward=False)
    handle.detach()
    by_router = {id(r): i for i, r in enumerate(routers)}
    col = [handle.layer_ids.index(lid) for lid in _router_layer_ids(chunks, by_router)]
    for tr in forced:
        ids = tr.experts.to(torch.int64).cuda()
        RouterReplay.set_replay_data([ids[:, c].contiguous() for c in col])
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
    theirs = run_schedule(chunks, mbs, backward=False)
    RouterReplay.clear_global_indices()
    RouterReplay.clear_global_router_replay_action()
    res["b_forced_changes_output"] = (not same(ours, live)) if ours else None
    res["b_forced_equals_megatron"] = same(ours, theirs)
    RouterReplay.clear_global_router_replay_instances()
    return res


def _router_layer_ids(chunks, by_router) -> list[int]:
    """The layer id of every TopKRouter of this rank, in module order (none on a dense stage)."""
    from routereplay.adapters import megatron as mga

    if not any(type(m).__name__ == "TopKRouter" for c in chunks for m in c.modules()):
        return []  # discover raises NoMoELayersError on a stage without MoE layers
    d = mga.discover(chunks if len(chunks) > 1 else chunks[0])
    by_path = {m.path: m.layer_id for m in d.layers}
    out = []
    for c, chunk in enumerate(chunks):
        for path, m in chunk.named_modules():
            if type(m).__name__ == "TopKRouter":
                out.append(by_path[f"{c}.{path}" if len(chunks) > 1 else path])
    return out


def check_c(cfg, num_mb: int) -> dict:
    """(c) gradients under forced routes: full (uniform) and selective ("moe") recompute vs none."""

    res = {}
    base = build(cfg)
    mbs = batches(num_mb, seed=2)
    h = attach(base)
    with h.record() as rec:
        run_schedule(base, mbs, backward=False)
    forced = [other_routes(t, 200 + i) for i, t in enumerate(traces_of(rec, h))]
    zero_grads(base)
    with h.replay(forced):
        out0 = run_schedule(base, mbs, backward=True)
    g0 = grads(base)
    h.detach()
    for mode in ("full", "selective"):
        model = build(cfg, recompute=mode)
        copy_weights(model, base)
        hm = attach(model)
        zero_grads(model)
        with hm.replay(forced):
            out = run_schedule(model, mbs, backward=True)
        res[f"c_recompute_{mode}_grads_equal"] = same(grads(model), g0) and same(out, out0)
        hm.detach()
    return res


def check_d(cfg) -> dict:
    """(d) actor and reference in one process: independent record and replay."""

    actor, ref = build(cfg, seed=7), build(cfg, seed=8)
    # the interleaved (virtual pipeline) schedule needs at least as many micro-batches as stages
    mbs = batches(cfg.get("pp", 1) if cfg.get("vpp", 1) > 1 else 1, seed=3)
    ha = attach(actor)
    hr = attach(ref)
    with ha.record() as ra:
        la = run_schedule(actor, mbs, backward=False)
    with hr.record() as rr:
        lr = run_schedule(ref, mbs, backward=False)
    ta, tr = traces_of(ra, ha), traces_of(rr, hr)
    with ha.replay(ta), hr.replay(tr):  # both active at once, interleaved forwards
        la2 = run_schedule(actor, mbs, backward=False)
        lr2 = run_schedule(ref, mbs, backward=False)
    differ = not all(torch.equal(a.experts, b.experts) for a, b in zip(ta, tr)) if ta else None  # None: dense stage
    ha.detach()
    hr.detach()
    return {"d_two_models_independent": same(la, la2) and same(lr, lr2), "d_models_route_differently": differ}


def check_e(cfg, num_mb: int) -> dict:
    """(e) an R3 trace in vLLM's format, sliced per rank through routereplay.parallel."""
    from megatron.core import parallel_state as ps

    from routereplay import parallel
    from routereplay.core.trace import RoutingTrace
    from routereplay.formats import vllm

    chunks = build(cfg)
    mbs = batches(num_mb, seed=4)
    h = attach(chunks)
    with h.record() as rec:
        live = run_schedule(chunks, mbs, backward=False)
    # The "engine": this DP rank's sequences, gathered over PP so every MoE layer is there, as
    # vLLM returns them (tokens - 1 rows, every decoder layer on the layer axis, dense = zeros).
    # Under SP, TP rank t's routers saw positions [t*S/tp, (t+1)*S/tp) of every sequence (Megatron
    # scatters [S, B, H] along S); the gather puts each rank's rows at its own positions.
    mine = traces_of(rec, h)  # router rows [S_local*B] s-major per micro-batch
    dense = set(cfg.get("dense", ()))
    moe_ids = [i for i in range(LAYERS) if i not in dense]
    sp_tp = cfg.get("tp", 1) if cfg.get("sp") else 1
    S_local = S // sp_tp
    s0 = ps.get_tensor_model_parallel_rank() * S_local if sp_tp > 1 else 0
    full = torch.zeros(num_mb * B, S, LAYERS, TOPK, dtype=torch.int64, device="cuda")  # gloo sums no uint8
    if mine:  # a dense stage adds nothing to the gathered trace
        seqs_LK = []
        for t in mine:
            e = t.experts.reshape(S_local, B, len(h.layer_ids), TOPK).transpose(0, 1)  # [B, S_local, L_local, K]
            seqs_LK += list(e)
        mine_BSLK = torch.stack(seqs_LK).cuda().to(full.dtype)  # [num_mb*B, S_local, L_local, K]
        full[:, s0 : s0 + S_local, list(h.layer_ids)] = mine_BSLK
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(full, group=ps.get_pipeline_model_parallel_group())
    if sp_tp > 1:
        dist.all_reduce(full, group=ps.get_tensor_model_parallel_group())
    full = full.to(torch.uint8)
    payloads = [full[b, :-1].cpu().numpy() for b in range(full.shape[0])]  # vLLM: tokens - 1 rows
    # training rows: each sequence's last token (never forwarded by an engine) has no route
    trace = vllm.from_vllm(payloads, num_experts=EXPERTS, moe_layer_ids=moe_ids, rows="training")
    # The trace is this DP rank's own sequences (dp=1 here): every DP rank plays its own engine.
    # EP is left out: it changes neither rows nor ids (see routereplay.parallel).
    layout = parallel.ParallelLayout(
        micro_batch_size=B,
        format="sbhd",
        seq_length=S,
        tp=cfg.get("tp", 1),
        sequence_parallel=bool(cfg.get("sp")),
        pp=cfg.get("pp", 1),
        vpp=cfg.get("vpp", 1),
    )
    coords = parallel.RankCoords(tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank())
    rank_traces = parallel.slice_for_rank(trace, layout, coords, layer_ids=h.layer_ids) if h.layer_ids else []
    assert all(isinstance(t, RoutingTrace) for t in rank_traces)
    with h.replay(rank_traces, missing="live"):
        replayed = run_schedule(chunks, mbs, backward=False)
    h.detach()
    rows = rank_traces[0].num_tokens if rank_traces else 0
    return {"e_r3_vllm_trace": same(live, replayed), "e_rows_per_rank": rows}


def megatron_rows(global_BSLK: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The rows one rank's routers see, built from Megatron's own data path rather than from
    routereplay.parallel: the hidden states are ``[S, B, H]`` flattened s-major, and under SP
    ``scatter_to_sequence_parallel_region`` gives TP rank t the t-th contiguous slice of S."""
    from megatron.core import parallel_state as ps

    e_SBLK = global_BSLK.transpose(0, 1)
    tp = cfg.get("tp", 1)
    if cfg.get("sp") and tp > 1:
        n = S // tp
        t = ps.get_tensor_model_parallel_rank()
        e_SBLK = e_SBLK[t * n : (t + 1) * n]
    return e_SBLK.reshape(-1, *e_SBLK.shape[2:])  # [N, L, K]


def check_f(cfg, num_mb: int) -> dict:
    """(f) routereplay.parallel places a global trace on every rank where Megatron's routers see it:
    forced ids for every (sequence, position, MoE layer) of this DP rank's batch, cut per rank by
    ``slice_for_rank`` (SP slices included) and replayed by routereplay, give the logits Megatron's
    own RouterReplay gives with the same ids placed by :func:`megatron_rows`."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from routereplay import parallel
    from routereplay.core.trace import RoutingTrace

    RouterReplay.clear_global_router_replay_instances()
    chunks = build(cfg, replay=True)
    routers = [m for c in chunks for m in c.modules() if type(m).__name__ == "TopKRouter"]
    assert [r.router_replay for r in routers] == RouterReplay.global_router_replay_instances
    mbs = batches(num_mb, seed=5)
    dense = set(cfg.get("dense", ()))
    moe_ids = [i for i in range(LAYERS) if i not in dense]
    g = torch.Generator().manual_seed(500 + ps.get_data_parallel_rank())  # same on every TP/PP rank
    n_seq, L = num_mb * B, len(moe_ids)
    ids_TLK = torch.rand(n_seq * S * L, EXPERTS, generator=g).argsort(-1)[:, :TOPK].reshape(n_seq * S, L, TOPK)
    trace = RoutingTrace(
        experts=ids_TLK, cu_seqlens=torch.arange(0, (n_seq + 1) * S, S), layer_ids=moe_ids, num_experts=EXPERTS
    )
    h = attach(chunks)
    live = run_schedule(chunks, mbs, backward=False)
    layout = parallel.ParallelLayout(
        micro_batch_size=B,
        format="sbhd",
        seq_length=S,
        tp=cfg.get("tp", 1),
        sequence_parallel=bool(cfg.get("sp")),
        pp=cfg.get("pp", 1),
        vpp=cfg.get("vpp", 1),
    )
    coords = parallel.RankCoords(tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank())
    rank_traces = parallel.slice_for_rank(trace, layout, coords, layer_ids=h.layer_ids) if h.layer_ids else []
    with h.replay(rank_traces):
        ours = run_schedule(chunks, mbs, backward=False)
    h.detach()
    by_router = {id(r): i for i, r in enumerate(routers)}
    cols = [moe_ids.index(lid) for lid in _router_layer_ids(chunks, by_router)]
    ids_BSLK = ids_TLK.reshape(n_seq, S, L, TOPK)
    for m in range(num_mb):
        rows_NLK = megatron_rows(ids_BSLK[m * B : (m + 1) * B], cfg).to(torch.int64).cuda()
        RouterReplay.set_replay_data([rows_NLK[:, c].contiguous() for c in cols])
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
    theirs = run_schedule(chunks, mbs, backward=False)
    RouterReplay.clear_global_indices()
    RouterReplay.clear_global_router_replay_action()
    RouterReplay.clear_global_router_replay_instances()
    rows = rank_traces[0].num_tokens if rank_traces else 0
    return {
        "f_slice_equals_megatron": same(ours, theirs),
        "f_forced_changes_output": (not same(ours, live)) if ours else None,
        "f_rows_per_rank": rows,
    }


def check_g_mtp(cfg, num_mb: int) -> dict:
    """(g) MTP routes, in their own id space (``num_layers + d``), under PP, forward and backward:
    record -> replay gives the same losses and gradients; forcing other ids on the MTP layer only
    changes the gradients (the MTP loss reaches only them) and gives what Megatron's own
    RouterReplay gives forced with the same ids (its global list holds the MTP router too)."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    RouterReplay.clear_global_router_replay_instances()
    chunks = build(cfg, replay=True)
    routers = [m for c in chunks for m in c.modules() if type(m).__name__ == "TopKRouter"]
    assert [r.router_replay for r in routers] == RouterReplay.global_router_replay_instances
    mbs = batches(num_mb, seed=6)
    h = attach(chunks)
    mtp_ids = [i for i in h.layer_ids if i >= LAYERS]
    zero_grads(chunks)
    with h.record() as rec:
        out_live = run_schedule(chunks, mbs, backward=True)
    g_live = grads(chunks)
    traces = traces_of(rec, h)
    zero_grads(chunks)
    with h.replay(traces):
        out_rep = run_schedule(chunks, mbs, backward=True)
    g_rep = grads(chunks)
    cols = [h.layer_ids.index(i) for i in mtp_ids]
    forced = []
    for i, t in enumerate(traces):  # the decoder layers keep their recorded ids
        e = t.experts.clone()
        e[:, cols] = other_routes(t, 300 + i).experts[:, cols]
        forced.append(t.replace(check=False, experts=e))
    zero_grads(chunks)
    with h.replay(forced):
        out_f = run_schedule(chunks, mbs, backward=True)
    g_f = grads(chunks)
    h.detach()
    by_router = {id(r): i for i, r in enumerate(routers)}
    col = [h.layer_ids.index(lid) for lid in _router_layer_ids(chunks, by_router)]
    for tr in forced:
        ids = tr.experts.to(torch.int64).cuda()
        RouterReplay.set_replay_data([ids[:, c].contiguous() for c in col])
    RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
    zero_grads(chunks)
    out_m = run_schedule(chunks, mbs, backward=True)
    g_m = grads(chunks)
    RouterReplay.clear_global_indices()
    RouterReplay.clear_global_router_replay_action()
    RouterReplay.clear_global_router_replay_instances()
    return {
        "g_mtp_layer_ids": mtp_ids,
        "g_mtp_record_replay_equal": same(out_live, out_rep) and same(g_live, g_rep),
        "g_mtp_forced_changes_grads": (not same(g_f, g_live)) if mtp_ids else None,
        "g_mtp_forced_equals_megatron": same(out_f, out_m) and same(g_f, g_m),
    }


def check_h(cfg, num_mb: int) -> dict:
    """(h) the disagreement metrics on the whole model: ``DispatchTap`` (``handle.observe_dispatch``, what
    each router handed its experts) over Megatron's schedule, one observed forward per micro-batch, this
    rank's MoE layers only (a dense stage runs the schedules and reports n/a). Replaying other valid
    ids, the tap sees them row for row: ``routing_agreement`` disagreement 0 against them and > 0
    against the live routes; a live forward with no block reads 0 against the recorded routes."""
    from routereplay.rl.metrics import routing_agreement
    from routereplay.rl.store import DispatchTap

    chunks = build(cfg)
    mbs = batches(num_mb, seed=8)
    h = attach(chunks)
    moe = bool(h.layer_ids)  # False on a DenseStage, which still runs every schedule (pipeline p2p)
    with h.record() as rec:
        run_schedule(chunks, mbs, backward=False)
    live = traces_of(rec, h)
    forced = [other_routes(t, 800 + i) for i, t in enumerate(live)]
    tap_f = DispatchTap(h) if moe else contextlib.nullcontext()
    with h.replay(forced), tap_f:
        run_schedule(chunks, mbs, backward=False)
    tap_l = DispatchTap(h) if moe else contextlib.nullcontext()
    with tap_l:  # no block: live routing, witnessed too
        run_schedule(chunks, mbs, backward=False)
    h.detach()
    if not moe:
        return {"h_dispatch_disagreement": None}
    seen_f = [tap_f.trace(forward=i) for i in range(tap_f.forwards)]
    seen_l = [tap_l.trace(forward=i) for i in range(tap_l.forwards)]
    d = {  # routing_agreement(reference, what the tap saw).disagreement per micro-batch
        "forced": [routing_agreement(f, t).disagreement for f, t in zip(forced, seen_f)],
        "live_vs_forced": [routing_agreement(r, t).disagreement for r, t in zip(live, seen_f)],
        "live": [routing_agreement(r, t).disagreement for r, t in zip(live, seen_l)],
    }
    same_rows = [torch.equal(t.experts.long(), f.experts.long()) for f, t in zip(forced, seen_f)]
    n = len(forced) == len(seen_f) == len(seen_l) == num_mb
    res = {
        "h_forced_disagreement_zero": n and max(d["forced"]) == 0,
        "h_live_vs_forced_disagrees": n and min(d["live_vs_forced"]) > 0,
        "h_live_disagreement_zero": n and max(d["live"]) == 0,
        "h_dispatched_equals_forced": n and all(same_rows),
    }
    res["h_dispatch_disagreement"] = all(res.values())
    res["h_disagreement"] = d
    res["h_observed_at"] = sorted(set(tap_f.observed_at))
    return res


COLUMNS = (
    ("a_record_replay_bitexact", "(a) record→replay"),
    ("b_forced_equals_megatron", "(b) forced = Megatron"),
    ("b_forced_changes_output", "(b) output changed"),
    ("c_recompute_full_grads_equal", "(c) full recompute"),
    ("c_recompute_selective_grads_equal", "(c) selective recompute"),
    ("d_two_models_independent", "(d) two models"),
    ("e_r3_vllm_trace", "(e) R3 vLLM trace"),
    ("f_slice_equals_megatron", "(f) sliced = Megatron"),
    ("g_mtp_forced_equals_megatron", "(g) MTP forced = Megatron"),
    ("h_dispatch_disagreement", "(h) DispatchTap disagreement"),
)


def summarize(folder: str) -> str:
    """A markdown table (one row per configuration, every rank must pass) from the JSON files."""
    import glob
    import subprocess

    rows: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "megatron_*.rank*.json"))):
        with open(path) as f:
            r = json.load(f)
        rows.setdefault(r["config"], []).append(r)
    commit = (
        os.environ.get("RR_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
        ).stdout.strip()
    )
    head = (
        "| config | transport | ranks | GPUs | SP | megatron-core | "
        + " | ".join(c for _, c in COLUMNS)
        + " | every check | date | GPU | commit |"
    )
    lines = [head, "|" + "---|" * (len(COLUMNS) + 10)]
    for name, ranks in rows.items():
        cells = []
        for key, _ in COLUMNS:
            vals = [r.get(key) for r in ranks]
            errs = [v for r in ranks for k, v in r.items() if k.endswith("_error") and k[0] == key[0]]
            if errs:
                cells.append("error: " + errs[0][:60].replace("|", "/"))
            elif all(v is None for v in vals):
                cells.append("n/a")
            else:
                cells.append("pass" if all(v in (True, None) for v in vals) else "FAIL")
        r0 = ranks[0]
        lines.append(
            f"| {name} | {r0.get('transport', 'nccl')} | {r0['world']} | {r0.get('gpus', r0['world'])} | "
            f"{'yes' if r0.get('sequence_parallel') else 'no'} | {r0['megatron_core']} | "
            + " | ".join(cells)
            + f" | {'pass' if all(r.get('passed') for r in ranks) else 'FAIL'}"
            + f" | {r0['date']} | {r0['gpu']} | {commit} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--summarize", metavar="DIR", help="write DIR/megatron_gpu.md from the JSON files and exit")
    if "--summarize" in sys.argv:
        folder = ap.parse_args().summarize
        table = summarize(folder)
        with open(os.path.join(folder, "megatron_gpu.md"), "w") as f:
            f.write(table)
        print(table)
        return 0
    ap.add_argument("--config", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--microbatches", type=int, default=4)
    args = ap.parse_args()
    cfg = CONFIGS[args.config]
    mode = gloo1gpu.transport()
    setup(cfg, mode)
    import megatron.core

    world = dist.get_world_size()
    if world != cfg["ranks"]:
        raise SystemExit(f"config {args.config} needs {cfg['ranks']} processes, torchrun started {world}")
    num_mb = args.microbatches if cfg.get("pp", 1) > 1 else 2
    result = {
        "config": args.config,
        "rank": dist.get_rank(),
        "world": world,
        "transport": mode,
        "ranks": world,
        "gpus": world if mode == "nccl" else min(world, torch.cuda.device_count()),
        "sequence_parallel": bool(cfg.get("sp")),
        "gpu": torch.cuda.get_device_name(),
        "megatron_core": megatron.core.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "microbatches": num_mb,
    }
    ok = True
    staging = gloo1gpu.host_staged_p2p() if mode == "gloo1gpu" else contextlib.nullcontext()
    with staging:
        to_run = [
            ("ab", lambda: check_a_b(cfg, num_mb)),
            ("c", lambda: check_c(cfg, num_mb)),
            ("d", lambda: check_d(cfg)),
        ]
        if cfg.get("mtp"):  # (e) and (f) build traces of the decoder layers only
            to_run.append(("g", lambda: check_g_mtp(cfg, num_mb)))
        else:
            to_run += [("e", lambda: check_e(cfg, num_mb)), ("f", lambda: check_f(cfg, num_mb))]
        to_run.append(("h", lambda: check_h(cfg, num_mb)))
        for name, fn in to_run:
            try:
                result.update(fn())
            except Exception as e:  # noqa: BLE001 (a failed check is a result: record it, run the others)
                ok = False
                result[f"{name}_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
    checks = {
        k: v
        for k, v in result.items()
        if k[:2] in ("a_", "b_", "c_", "d_", "e_", "f_", "g_", "h_") and isinstance(v, bool)
    }
    ok = ok and all(checks.values())
    result["passed"] = ok
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"megatron_{args.config}.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result, f, indent=1)
    log(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
