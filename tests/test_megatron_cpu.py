"""Megatron-Core adapter, everything that runs without CUDA (megatron-core 0.16.1 in CI).

Megatron's MoE layer needs CUDA (its router moves its weight there on the first forward), so these
tests build real ``GPTModel``s on the CPU (construction only) and call each ``TopKRouter``'s own
``routing`` on CPU logits: the adapter's seam is exercised inside Megatron's code, and Megatron's
own ``RouterReplay`` and ``topk_routing_with_score_function`` are the oracles. Model forwards,
parallel groups and recompute run in tests/megatron_gpu/ on the lent GPU.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'routereplay[megatron]')")

from routereplay import parallel
from routereplay.adapters import megatron as mga
from routereplay.core.errors import NoMoELayersError, UnsupportedModelError, UnsupportedRouterError
from routereplay.core.routing import route

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def mcore():
    """A one-rank gloo group and Megatron's model-parallel state (needed to build models)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    owns = not dist.is_initialized()
    if owns:
        fd, path = tempfile.mkstemp()
        os.close(fd)
        os.unlink(path)
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    ps.initialize_model_parallel(1, 1)
    yield ps
    ps.destroy_model_parallel()
    if owns:
        dist.destroy_process_group()


def _config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = {
        "num_layers": 4,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_moe_experts": 8,
        "moe_router_topk": 2,
        "use_cpu_initialization": True,
        "moe_token_dispatcher_type": "allgather",
        "add_bias_linear": False,
        "moe_router_load_balancing_type": "none",
    }
    base.update(kw)
    return TransformerConfig(**base)


class _FakePP:
    """A pipeline group seen from one rank: only rank() and size() are asked at build time."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _gpt(cfg, *, pp_rank=0, vp_stage=None, mtp=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection

    pg = ProcessGroupCollection.use_mpu_process_groups()
    pp = cfg.pipeline_model_parallel_size
    if pp > 1:
        pg.pp = _FakePP(pp_rank, pp)
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, vp_stage=vp_stage, pp_rank=pp_rank)
    kw = {}
    if mtp:
        kw["mtp_block_spec"] = get_gpt_mtp_block_spec(cfg, spec.layer_specs[-1], use_transformer_engine=False)
    vpp = cfg.virtual_pipeline_model_parallel_size or 1
    first = pp_rank == 0 and (vp_stage or 0) == 0
    last = pp_rank == pp - 1 and (vp_stage or 0) == vpp - 1
    return GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=64,
        max_sequence_length=64,
        pg_collection=pg,
        vp_stage=vp_stage,
        pre_process=first,
        post_process=last,
        **kw,
    )


class _Calls:
    """A stand-in for the core's RouterCalls: record keeps the live ids, replay forces given ids."""

    def __init__(self, num_layers: int):
        self.mode = None
        self.recorded = [[] for _ in range(num_layers)]
        self.forced = None
        self.shapes = []

    def routes_live(self, index):
        return self.mode is None

    def on_block_input(self, index, shape):
        self.shapes.append(tuple(shape))

    def on_experts(self, index, ids):
        pass

    def on_router(self, index, logits_NE, weights_NK, ids_NK, **kw):
        if self.mode == "record":
            self.recorded[index].append(ids_NK.clone())
            return weights_NK, ids_NK
        return weights_NK, self.forced[index]


def _routers(model):
    return [(p, m) for p, m in model.named_modules() if type(m).__name__ == "TopKRouter"]


def _logits(S, B, E, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(S, B, E, generator=g).to(dtype)


def _valid_ids(N, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, E, generator=g).argsort(-1)[:, :K]


# --- spec derivation and routing parity ----------------------------------------------------
ROUTER_CONFIGS = {
    "softmax_after_topk": {},
    "softmax_first": {"moe_router_pre_softmax": True},
    "softmax_scaled": {"moe_router_pre_softmax": True, "moe_router_topk_scaling_factor": 2.5},
    "sigmoid": {"moe_router_score_function": "sigmoid"},
    "sigmoid_top1": {"moe_router_score_function": "sigmoid", "moe_router_topk": 1},
    "sigmoid_bias_groups": {
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "num_moe_experts": 16,
        "moe_router_topk": 4,
        "moe_router_num_groups": 4,
        "moe_router_group_topk": 2,
        "moe_router_topk_scaling_factor": 2.5,
    },
    "softmax_groups": {
        "num_moe_experts": 16,
        "moe_router_topk": 4,
        "moe_router_num_groups": 4,
        "moe_router_group_topk": 2,
    },
}


def _megatron_routing(cfg, logits_NE, bias_E=None, forced_NK=None):
    """Megatron 0.16.1's own routing function; ``forced_NK`` through its own RouterReplay."""
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    replay = None
    if forced_NK is not None:
        replay = RouterReplay()
        RouterReplay.global_router_replay_instances.remove(replay)  # keep the global list as found
        replay.set_target_indices(forced_NK)
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    return moe_utils.topk_routing_with_score_function(
        logits_NE,
        cfg.moe_router_topk,
        use_pre_softmax=cfg.moe_router_pre_softmax,
        num_groups=cfg.moe_router_num_groups,
        group_topk=cfg.moe_router_group_topk,
        scaling_factor=cfg.moe_router_topk_scaling_factor,
        score_function=cfg.moe_router_score_function,
        expert_bias=bias_E,
        router_replay=replay,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(ROUTER_CONFIGS))
def test_spec_reproduces_megatron_routing(name, dtype):
    """Live and forced: the spec's weights at the ids equal Megatron's dense probs there, bit for bit."""
    cfg = _config(**ROUTER_CONFIGS[name])
    spec = mga.router_spec(cfg)
    E, K = cfg.num_moe_experts, cfg.moe_router_topk
    logits_NE = _logits(24, 1, E, 1, dtype)[:, 0]
    bias_E = torch.randn(E, generator=torch.Generator().manual_seed(2)) * 0.1 if spec.uses_bias else None
    kw = {"bias_E": bias_E} if bias_E is not None else {}

    probs_NE, map_NE = _megatron_routing(cfg, logits_NE, bias_E)
    weights_NK, ids_NK = route(logits_NE, spec, **kw)
    assert torch.equal(torch.zeros_like(map_NE).scatter(1, ids_NK, True), map_NE)
    assert torch.equal(probs_NE.gather(1, ids_NK), weights_NK)
    assert weights_NK.dtype == probs_NE.dtype

    forced_NK = _valid_ids(24, E, K, 3)
    if spec.n_group is not None:  # rows within one group: route checks the group limit, Megatron does not
        size = spec.group_size
        g = torch.Generator().manual_seed(4)
        forced_NK = torch.stack([torch.randperm(size, generator=g)[:K] + size * (n % spec.n_group) for n in range(24)])
    probs_NE, map_NE = _megatron_routing(cfg, logits_NE, bias_E, forced_NK)
    weights_NK, ids_NK = route(logits_NE, spec, forced_TK=forced_NK, **kw)
    assert torch.equal(probs_NE.gather(1, forced_NK), weights_NK)


def test_spec_fields_by_version():
    cfg = _config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_topk=2)
    old, new = mga.router_spec(cfg, version=(0, 16, 1)), mga.router_spec(cfg, version=(0, 19, 2))
    assert (old.cast_scores, old.weights_dtype) == (True, "keep")
    assert (new.cast_scores, new.weights_dtype) == (False, "logits")
    assert old.uses_bias and old.norm_topk_prob and old.norm_eps == 1e-20
    with pytest.raises(UnsupportedRouterError, match="'sqrtsoftplus' is not one megatron-core 0.16.1 routes with"):
        mga.router_spec(_config(moe_router_score_function="sqrtsoftplus"), version=(0, 16, 1))
    assert mga.router_spec(_config(moe_router_score_function="sqrtsoftplus"), version=(0, 19, 2)).norm_topk_prob


# --- discovery and layer maps ---------------------------------------------------------------
def test_discover_skips_dense_layers_and_keeps_numbers(mcore):
    model = _gpt(_config(num_layers=6, moe_layer_freq=[0, 1, 0, 1, 1, 0]))
    d = mga.discover(model)
    assert [m.layer_id for m in d.layers] == [1, 3, 4]
    assert [m.path for m in d.layers] == [f"decoder.layers.{i}.mlp.router" for i in (1, 3, 4)]
    assert {(m.top_k, m.num_experts) for m in d.layers} == {(2, 8)}
    assert mga.claims(model) and mga.claims([model]) and not mga.claims(torch.nn.Linear(2, 2)) and not mga.claims([])


@pytest.mark.parametrize("pp_rank", [0, 1])
def test_pipeline_and_virtual_chunks_global_ids(mcore, pp_rank):
    """PP 2 x VPP 2 over 8 layers, dense layers 0 and 6: each stage's chunk list gets the global ids
    of its own layers, which are exactly parallel.pipeline_layer_ids minus the dense ones."""
    freq = [0, 1, 1, 1, 1, 1, 0, 1]
    cfg = _config(
        num_layers=8,
        moe_layer_freq=freq,
        pipeline_model_parallel_size=2,
        virtual_pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
    )
    chunks = [_gpt(cfg, pp_rank=pp_rank, vp_stage=v) for v in (0, 1)]
    layout = parallel.ParallelLayout(micro_batch_size=1, pp=2, vpp=2)
    expected = [i for i in parallel.pipeline_layer_ids(8, layout, pp_rank) if freq[i]]
    d = mga.discover(chunks)
    assert [m.layer_id for m in d.layers] == expected
    assert all(m.path.startswith(("0.decoder.", "1.decoder.")) for m in d.layers)
    for v, chunk in enumerate(chunks):
        assert [m.layer_id for m in mga.discover(chunk).layers] == [
            i for i in parallel.pipeline_layer_ids(8, layout, pp_rank, v) if freq[i]
        ]


def test_pipeline_layer_ids_match_megatron_offsets():
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    for num_layers, pp, vpp in [(8, 2, 2), (12, 2, 3), (8, 4, 1), (16, 4, 2)]:
        cfg = _config(
            num_layers=num_layers,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            pipeline_dtype=torch.float32,
        )
        layout = parallel.ParallelLayout(micro_batch_size=1, pp=pp, vpp=vpp)
        for p in range(pp):
            for v in range(vpp):
                ids = parallel.pipeline_layer_ids(num_layers, layout, p, v)
                offset = get_transformer_layer_offset(cfg, v if vpp > 1 else None, p)
                assert ids[0] == offset and len(ids) == num_layers // (pp * vpp)


def test_mtp_routers_get_ids_after_the_decoder(mcore):
    model = _gpt(_config(num_layers=4, mtp_num_layers=1), mtp=True)
    d = mga.discover(model)
    assert [m.layer_id for m in d.layers] == [0, 1, 2, 3, 4]
    assert d.layers[-1].path.startswith("mtp.layers.0.")


REFUSALS = {
    "fusion": ({"moe_router_fusion": True}, "moe_router_fusion=True: the fused top-k"),
    "capacity": ({"moe_expert_capacity_factor": 1.0}, "moe_expert_capacity_factor=1.0: token dropping"),
    "sinkhorn": (
        {"moe_router_load_balancing_type": "sinkhorn", "moe_router_topk": 1},
        "'sinkhorn': sinkhorn routing picks its experts outside the top-k hook",
    ),
    "random_logits": ({"moe_router_force_load_balancing": True}, "replaces the router's logits with random"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_routers_name_the_reason(mcore, name):
    kw, message = REFUSALS[name]
    cfg = _config(**kw)
    if name == "fusion":  # megatron refuses to build a fused router without TE: flip it after the build
        model = _gpt(_config())
        for _, r in _routers(model):
            r.config = cfg
    else:
        model = _gpt(cfg)
    with pytest.raises(UnsupportedRouterError, match="router decoder.layers.0.mlp.router") as e:
        mga.discover(model)
    assert message in str(e.value)


@pytest.mark.parametrize("vpp", [1, 2])
def test_a_pipeline_stage_without_moe_layers_says_so(mcore, vpp):
    """PP 2 over 4 (8) layers with the first stage dense: that stage is refused with its own error
    (the runner and users skip routereplay there), the other stage attaches its MoE layers."""
    num_layers = 4 * vpp
    freq = [0] * (num_layers // 2) + [1] * (num_layers // 2)
    extra = {"virtual_pipeline_model_parallel_size": vpp} if vpp > 1 else {}
    cfg = _config(
        num_layers=num_layers,
        moe_layer_freq=freq,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
        **extra,
    )
    stage = lambda rank: [_gpt(cfg, pp_rank=rank, vp_stage=v if vpp > 1 else None) for v in range(vpp)]
    dense, moe = stage(0), stage(1)
    if vpp == 1:  # without VPP the stages split the layers in halves: stage 0 is all dense
        with pytest.raises(
            NoMoELayersError, match=r"GPTModel: this pipeline stage holds no MoE layer .* 8 experts elsewhere"
        ):
            mga.discover(dense[0])
        assert [m.layer_id for m in mga.discover(moe[0]).layers] == [2, 3]
    else:  # VPP interleaves: chunk 0 of stage 0 holds layers 0-1, dense
        with pytest.raises(NoMoELayersError, match=r"GPTModel: this pipeline stage holds no MoE layer"):
            mga.discover(dense[0])
        assert [m.layer_id for m in mga.discover(dense).layers] == [4, 5]


def test_no_router_is_refused(mcore):
    model = _gpt(_config(num_moe_experts=None, moe_router_topk=2, moe_router_load_balancing_type="aux_loss"))
    with pytest.raises(UnsupportedModelError, match="GPTModel: no MoE router found"):
        mga.discover(model)


# --- the seam inside Megatron's own routing ---------------------------------------------------
def _two_models(mcore, **kw):
    """The same weights built twice: one attached, one with Megatron's own RouterReplay."""
    from megatron.core.transformer.moe.router_replay import RouterReplay

    before = list(RouterReplay.global_router_replay_instances)
    ours = _gpt(_config(**kw))
    megatrons = _gpt(_config(moe_enable_routing_replay=True, **kw))
    theirs = [r.router_replay for _, r in _routers(megatrons)]
    return ours, megatrons, theirs, before


@pytest.mark.parametrize("name", ["softmax_after_topk", "softmax_first", "sigmoid"])
def test_record_replay_through_megatron_routing(mcore, name):
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    kw = ROUTER_CONFIGS[name]
    ours, megatrons, theirs, before = _two_models(mcore, **kw)
    d = mga.discover(ours)
    calls = _Calls(len(d.layers))
    undo = mga.install(ours, d, calls)
    routers = [r for _, r in _routers(ours)]
    ref_routers = [r for _, r in _routers(megatrons)]
    S, B, E, K = 6, 2, 8, kw.get("moe_router_topk", 2)
    logits = [_logits(S, B, E, 10 + i) for i in range(len(routers))]

    live = [r.routing(x) for r, x in zip(routers, logits)]  # no block: the router's own output
    calls.mode = "record"
    rec = [r.routing(x) for r, x in zip(routers, logits)]
    for (p0, m0), (p1, m1) in zip(live, rec):
        assert torch.equal(p0, p1) and torch.equal(m0, m1)
    assert calls.shapes == [(1, S * B)] * 2  # router rows, reported per forward by the first layer only

    # Replay other valid ids: Megatron's own RouterReplay forced with the same ids gives the same.
    forced = [_valid_ids(S * B, E, K, 20 + i) for i in range(len(routers))]
    calls.mode, calls.forced = "replay", forced
    got = [r.routing(x) for r, x in zip(routers, logits)]
    for inst, ids in zip(theirs, forced):
        inst.set_target_indices(ids)
        inst.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    want = [r.routing(x) for r, x in zip(ref_routers, logits)]
    for (pg, mg), (pw, mw), ids in zip(got, want, forced):
        assert torch.equal(mg, torch.zeros_like(mg).scatter(1, ids, True))
        assert torch.equal(pg, pw) and torch.equal(mg, mw)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(got, live))

    for u in reversed(undo):
        u()
    for r in routers:
        assert "routing" not in r.__dict__ and r.router_replay is None
    assert RouterReplay.global_router_replay_instances[: len(before)] == before
    for inst in theirs:
        RouterReplay.global_router_replay_instances.remove(inst)


def test_megatron_replay_keeps_working_beside_a_handle(mcore):
    """Megatron's own RECORD still records with routereplay installed; its global list is untouched."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    _, model, theirs, before = _two_models(mcore)
    d = mga.discover(model)
    calls = _Calls(len(d.layers))
    listed = list(RouterReplay.global_router_replay_instances)
    undo = mga.install(model, d, calls)
    assert RouterReplay.global_router_replay_instances == listed
    routers = [r for _, r in _routers(model)]
    for inst in theirs:
        inst.set_router_replay_action(RouterReplayAction.RECORD)
    calls.mode = "record"
    logits = [_logits(4, 2, 8, 30 + i) for i in range(len(routers))]
    for r, x in zip(routers, logits):
        r.routing(x)
    for inst, mine in zip(theirs, calls.recorded):
        assert torch.equal(inst.get_recorded_indices(), mine[0])
    for u in reversed(undo):
        u()
    assert [r.router_replay for r in routers] == theirs
    for inst in theirs:
        RouterReplay.global_router_replay_instances.remove(inst)
    assert RouterReplay.global_router_replay_instances == before


def test_routing_that_skips_the_hook_raises(mcore):
    model = _gpt(_config(moe_router_topk=1, moe_router_pre_softmax=True))
    d = mga.discover(model)
    calls = _Calls(len(d.layers))
    undo = mga.install(model, d, calls)
    router = _routers(model)[0][1]
    router.routing_type = "sinkhorn"  # changed after attach: its top-k no longer reaches the hook
    calls.mode = "replay"
    with pytest.raises(UnsupportedRouterError, match=r"layer 0 \(decoder.layers.0.mlp.router\): TopKRouter.routing"):
        router.routing(_logits(4, 1, 8, 0))
    calls.mode = None
    router.routing(_logits(4, 1, 8, 0))  # live: nothing to replay, Megatron's own routing stands
    for u in reversed(undo):
        u()


def test_public_attach_records_and_replays_through_megatron_routing(mcore):
    """routereplay.attach with this adapter: the trace holds Megatron's own recorded ids (router rows,
    s-major), and a replay of other ids gives what Megatron's RouterReplay gives for them."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    import routereplay

    _, model, theirs, _ = _two_models(mcore)
    routers = [r for _, r in _routers(model)]
    h = routereplay.attach(model, adapter=mga)
    assert h.layer_ids == (0, 1, 2, 3)
    logits = [_logits(6, 2, 8, 40 + i) for i in range(len(routers))]
    for inst in theirs:
        inst.set_router_replay_action(RouterReplayAction.RECORD)
    with h.record() as rec:
        for r, x in zip(routers, logits):
            r.routing(x)
    trace = rec.trace()
    assert trace.num_tokens == 12 and trace.num_seqs == 1
    for i, inst in enumerate(theirs):
        assert torch.equal(trace.experts[:, i].long(), inst.get_recorded_indices())
    forced = trace.replace(check=False, experts=_valid_ids(12 * 4, 8, 2, 41).reshape(12, 4, 2).to(trace.experts.dtype))
    with h.replay(forced):
        ours = [r.routing(x) for r, x in zip(routers, logits)]
    h.detach()
    for i, inst in enumerate(theirs):
        inst.set_target_indices(forced.experts[:, i].long())
        inst.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    want = [r.routing(x) for r, x in zip(routers, logits)]
    for (po, mo), (pw, mw) in zip(ours, want):
        assert torch.equal(po, pw) and torch.equal(mo, mw)
    for inst in theirs:
        RouterReplay.global_router_replay_instances.remove(inst)


def test_dispatch_tap_and_disagreement_work_on_a_megatron_model(mcore):
    """The one dispatch witness (handle.observe_dispatch) on Megatron: DispatchTap reports what each
    router handed its experts, so TRL's / verl's disagreement metric reads 0 under replay and sees
    live routing's drift, on Megatron as on HF."""
    import routereplay
    from routereplay.rl.metrics import routing_agreement
    from routereplay.rl.store import DispatchTap

    model = _gpt(_config())
    routers = [r for _, r in _routers(model)]
    h = routereplay.attach(model, adapter=mga)
    assert DispatchTap(h).observed_at == ["router output"] * 4
    logits = [_logits(6, 2, 8, 60 + i) for i in range(len(routers))]
    with h.record() as rec:
        for r, x in zip(routers, logits):
            r.routing(x)
    live = rec.trace()
    forced = live.replace(check=False, experts=_valid_ids(12 * 4, 8, 2, 61).reshape(12, 4, 2).to(live.experts.dtype))
    with h.replay(forced), DispatchTap(h) as tap:
        maps = [r.routing(x)[1] for r, x in zip(routers, logits)]
    dispatched = tap.trace()
    assert routing_agreement(forced, dispatched).disagreement == 0.0
    assert routing_agreement(live, dispatched).disagreement > 0.0
    for i, routing_map_NE in enumerate(maps):  # and it is what Megatron's routing map sends to the experts
        assert torch.equal(
            routing_map_NE, torch.zeros_like(routing_map_NE).scatter(1, dispatched.experts[:, i].long(), True)
        )
    with torch.no_grad(), DispatchTap(h) as tap:  # no block: live forwards are witnessed too
        for r, x in zip(routers, logits):
            r.routing(x)
    assert routing_agreement(live, tap.trace()).disagreement == 0.0
    h.detach()
