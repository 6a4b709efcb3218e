"""verl 0.9.1's FSDP engine (FSDP2 on gloo, CPU) with routereplay's R3 / R2, driven in-process.

Batches are laid out as verl's agent loop builds them (left-padded prompts, right-padded responses,
engine routes one row short of the tokens) and pass through verl's own ``left_right_2_no_padding``,
micro-batching (fixed and dynamic sizes), packing, bucket padding and Ulysses slicing.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from verl.utils import tensordict_utils as tu
from verl_cpu import (
    NUM_EXPERTS,
    TOP_K,
    agent_loop_batch,
    make_engine,
    make_model_dir,
    response_logprob_loss,
    to_engine_batch,
)

import routereplay
from routereplay.core.errors import (
    EngineFormatError,
    IntegrationError,
    MissingRoutesError,
    TokenCountMismatchError,
)
from routereplay.integrations.verl import RouteReplayFSDPEngine, routes_to_trace
from routereplay.rl.store import DispatchTap

PROMPTS, RESPONSES = [3, 5, 6, 2], [4, 7, 2, 5]


def _flat(metrics, key):
    return [float(v) for v in metrics[key]]


def _real_coverage(td) -> float:
    lens = td["input_ids"].offsets().diff()
    return float((lens - 1).sum() / lens.sum())


# --- registration ------------------------------------------------------------------------------
def test_importing_registers_the_engine_for_nvidia_and_cpu_leaving_verls_entry(monkeypatch):
    from verl.workers.engine import EngineRegistry, FSDPEngineWithLMHead

    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is RouteReplayFSDPEngine  # device "cpu"
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "nvidia")
    assert EngineRegistry.get_engine_cls("language_model", "fsdp") is RouteReplayFSDPEngine
    assert EngineRegistry._engines["language_model"]["fsdp"]["cuda"] is FSDPEngineWithLMHead  # verl's entry untouched
    assert EngineRegistry.get_engine_cls("value_model", "fsdp") is not RouteReplayFSDPEngine


@pytest.fixture
def registry(monkeypatch):
    """verl's engine table as this module left it, restored after the test."""
    from verl.workers.engine import EngineRegistry

    monkeypatch.setattr(EngineRegistry, "_engines", copy.deepcopy(EngineRegistry._engines))
    return EngineRegistry


@pytest.mark.parametrize(("device", "vendor"), [("cuda", "amd"), ("cuda", "metax"), ("npu", "huawei")])
def test_every_vendor_verl_builds_its_fsdp_engine_for_gets_this_engine(registry, monkeypatch, device, vendor):
    """A worker on another vendor registers its own key at import: router_replay.mode is never ignored."""
    from verl.workers.engine import FSDPEngineWithLMHead

    from routereplay.integrations import verl as rr_verl

    monkeypatch.setenv("VERL_ENGINE_DEVICE", device)
    monkeypatch.setenv("VERL_ENGINE_VENDOR", vendor)
    assert registry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead  # before: verl's, replay ignored
    rr_verl._register()  # what importing the module does in that worker
    assert registry.get_engine_cls("language_model", "fsdp2") is RouteReplayFSDPEngine
    assert registry.get_engine_cls("language_model", "fsdp") is RouteReplayFSDPEngine
    assert registry._engines["language_model"]["fsdp2"][device] is FSDPEngineWithLMHead
    rr_verl._register()  # imported twice: nothing changes, nothing raises
    assert registry.get_engine_cls("language_model", "fsdp2") is RouteReplayFSDPEngine


def test_a_vendor_engine_that_would_ignore_the_mode_is_refused_at_import(registry, monkeypatch):
    from verl.workers.engine import FSDPEngineWithLMHead

    from routereplay.integrations import verl as rr_verl

    class VendorEngine(FSDPEngineWithLMHead):
        pass

    register = registry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cuda", vendor="acme")
    register(VendorEngine)
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")
    monkeypatch.setenv("VERL_ENGINE_VENDOR", "acme")
    with pytest.raises(
        IntegrationError,
        match=r"^routereplay.integrations.verl: on device='cuda', vendor='acme' verl builds "
        r"test_verl_engine.*VendorEngine for strategy 'fsdp', not RouteReplayFSDPEngine .*router_replay.mode would be "
        r"ignored and the actor would route live",
    ):
        rr_verl._register()


# --- R3 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layout", "remove_padding", "dynamic_bsz", "pad_to_length"),
    [
        ("legacy", True, True, False),
        ("per_sample", True, False, True),
        ("legacy", False, False, False),
        ("per_sample", False, True, False),
    ],
)
def test_r3_replays_every_forward_and_live_routing_disagrees(model_dir, layout, remove_padding, dynamic_bsz,
                                                            pad_to_length):
    eng = make_engine(model_dir, mode="R3", remove_padding=remove_padding, pad_to_length=pad_to_length)
    batch, aligned = agent_loop_batch(PROMPTS, RESPONSES, layout=layout)
    td = to_engine_batch(batch, aligned, layout=layout, dynamic_bsz=dynamic_bsz, remove_padding=remove_padding)
    with eng.eval_mode():
        infer = eng.infer_batch(td)["metrics"]
    with eng.train_mode():
        train = eng.train_batch(copy.copy(td), response_logprob_loss)["metrics"]
    for m in (infer, train):
        assert len(m["router_replay/disagreement"]) == 2  # two micro-batches, each replayed
        assert _flat(m, "router_replay/disagreement") == [0.0, 0.0]
        assert min(_flat(m, "router_replay/live_disagreement")) > 0.0  # random rollout routes
        cov = _flat(m, "router_replay/coverage")
        assert all(0.8 < c < 1.0 for c in cov)  # each sample's last token has no route
    lens = td["input_ids"].offsets().diff()
    assert sum(cov) / 2 == pytest.approx(_real_coverage(td), abs=0.05)
    assert lens.numel() == len(PROMPTS)


def test_r3_experts_receive_exactly_the_rollout_routes(model_dir):
    """An independent witness: the experts' input ids equal the agent loop's routes (all but last rows)."""
    eng = make_engine(model_dir, mode="R3")
    batch, aligned = agent_loop_batch(PROMPTS, RESPONSES, layout="legacy")
    td = to_engine_batch(batch, aligned, micro_batch_size=4)  # one packed micro-batch, sample order kept
    with eng.eval_mode(), DispatchTap(eng.router_handle) as tap:
        eng.infer_batch(td)
    got_TLK = tap.trace().experts.to(torch.int64)
    want = torch.cat([a.to(torch.int64) for a in aligned])
    last = torch.cumsum(torch.tensor([a.shape[0] for a in aligned]), 0) - 1
    keep = torch.ones(want.shape[0], dtype=torch.bool)
    keep[last] = False
    assert torch.equal(got_TLK[keep].sort(-1).values, want[keep].sort(-1).values)
    assert torch.equal(got_TLK[keep], want[keep])  # the recorded order within top-k too


def test_without_replay_the_live_routes_differ_from_the_rollout(model_dir):
    eng = make_engine(model_dir, mode="disabled")
    assert eng.router_handle is None
    batch, aligned = agent_loop_batch(PROMPTS, RESPONSES, layout="legacy")
    td = to_engine_batch(batch, aligned, micro_batch_size=4)
    h = routereplay.attach(eng.module)
    try:
        with eng.eval_mode(), DispatchTap(h) as tap:
            out = eng.infer_batch(td)
    finally:
        h.detach()
    assert "router_replay/disagreement" not in out["metrics"]
    live = tap.trace().experts.to(torch.int64).sort(-1).values
    want = torch.cat([a.to(torch.int64) for a in aligned]).sort(-1).values
    routed = torch.cat([torch.arange(a.shape[0]) < a.shape[0] - 1 for a in aligned])  # engine rows
    differ = (live != want).any(-1)[routed]
    assert float(differ.float().mean()) > 0.3


def _hand_replay_reference(model_dir, td, aligned, micro_batches):
    """One update's gradients by hand: HF model, packed micro-batches, gate outputs overwritten."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.train()
    gates = [layer.mlp.gate for layer in model.model.layers]
    forced = {}

    def hook(i):
        def fn(module, args, out):
            logits_NE, _, ids_NK = out
            f_NK, valid_N = forced["ids"][:, i], forced["valid"]
            ids = torch.where(valid_N[:, None], f_NK, ids_NK)
            probs = torch.softmax(logits_NE, dim=-1, dtype=torch.float).gather(1, ids)
            probs = probs / probs.sum(-1, keepdim=True)
            return logits_NE, probs.to(logits_NE.dtype), ids

        return fn

    handles = [g.register_forward_hook(hook(i)) for i, g in enumerate(gates)]
    ids_all = td["input_ids"]
    lens = ids_all.offsets().diff().tolist()
    P_pad = td["prompts"].shape[1]
    prompt_lens = td["attention_mask"][:, :P_pad].sum(1).tolist()
    for mb in micro_batches:
        toks = torch.cat([ids_all[b] for b in mb])[None]
        pos = torch.cat([torch.arange(lens[b]) for b in mb])[None]
        forced["ids"] = torch.cat([aligned[b].to(torch.int64) for b in mb])
        forced["valid"] = torch.cat([torch.arange(lens[b]) < lens[b] - 1 for b in mb])
        logits = model(input_ids=toks, position_ids=pos, use_cache=False).logits[0]  # no cache: packed-aware mask
        logp = torch.log_softmax(logits.float(), -1)
        loss, off = 0.0, 0
        for b in mb:
            p, n = prompt_lens[b], lens[b]
            for j in range(n - p):  # response token j at position p + j, predicted at p + j - 1
                tok = int(ids_all[b][p + j])
                loss = loss - logp[off + p + j - 1, tok] * td["advantages"][b, j] * td["response_mask"][b, j]
            off += n
        loss.backward()
    for h in handles:
        h.remove()
    return {n: p.grad for n, p in model.named_parameters()}


def test_one_update_has_the_gradients_of_a_hand_written_replay(model_dir):
    eng = make_engine(model_dir, mode="R3", grad_ckpt=True)  # the recompute in backward must replay too
    batch, aligned = agent_loop_batch(PROMPTS, RESPONSES, layout="per_sample")
    td = to_engine_batch(batch, aligned, layout="per_sample", micro_batch_size=2)
    with eng.train_mode(zero_grad_on_exit=False):
        eng.optimizer_zero_grad()
        eng.forward_backward_batch(copy.copy(td), response_logprob_loss, forward_only=False)
        got = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
               for n, p in eng.module.named_parameters()}
    want = _hand_replay_reference(model_dir, td, aligned, [[0, 1], [2, 3]])
    assert got.keys() == want.keys()
    gate = [n for n in got if n.endswith("mlp.gate.weight")]
    assert gate and all(float(want[n].abs().max()) > 0 for n in gate)  # the router still learns
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=1e-4, atol=1e-6, msg=n)


# --- R2 ------------------------------------------------------------------------------------------
def test_r2_records_in_compute_log_prob_and_replays_across_epochs_and_mini_batches(model_dir):
    eng = make_engine(model_dir, mode="R2", lr=0.5)
    batch, _aligned = agent_loop_batch(PROMPTS, RESPONSES, layout="per_sample")
    td = to_engine_batch(batch, layout="legacy", dynamic_bsz=True)  # no rollout routes
    with eng.eval_mode():
        out = eng.infer_batch(copy.copy(td))
    routes = out["model_output"]["routed_experts"]
    assert routes.is_nested and routes.dtype == torch.int16
    assert torch.equal(routes.offsets(), td["input_ids"].offsets())  # verl's sample order restored
    assert "router_replay/disagreement" not in out["metrics"]  # recording is not replay
    td["routed_experts"] = routes
    live = []
    with eng.train_mode():
        for epoch in range(2):  # the first update moves the policy; the second still replays the old routes
            for mini in tu.chunk_tensordict(td, 2):  # verl's own split (what train_mini_batch's iterator yields)
                m = eng.train_batch(copy.copy(mini), response_logprob_loss)["metrics"]
                assert set(_flat(m, "router_replay/disagreement")) == {0.0}
                assert set(_flat(m, "router_replay/coverage")) == {1.0}  # R2 recorded every token
                live += _flat(m, "router_replay/live_disagreement")
    assert live[0] == 0.0  # before any step the old policy is the policy
    assert max(live[2:]) > 0.0  # after steps live routing drifts; replay keeps the old routes


def test_r2_refuses_a_batch_that_already_carries_rollout_routes(model_dir):
    eng = make_engine(model_dir, mode="R2")
    batch, _aligned = agent_loop_batch(PROMPTS, RESPONSES, layout="legacy")
    with eng.eval_mode(), pytest.raises(IntegrationError, match="already carries 'routed_experts'"):
        eng.infer_batch(to_engine_batch(batch))


# --- the reference policy --------------------------------------------------------------------------
def test_a_reference_engine_refuses_a_replay_mode(model_dir):
    with pytest.raises(IntegrationError, match="reference is never replayed"):
        make_engine(model_dir, mode="R3", forward_only=True)


def test_the_reference_pass_inside_the_actor_runs_live(model_dir):
    eng = make_engine(model_dir, mode="R3")
    eng.module.disable_adapter = contextlib.nullcontext  # this test's stand-in for PEFT's adapter switch
    batch, _ = agent_loop_batch(PROMPTS, RESPONSES, layout="per_sample")
    td = to_engine_batch(batch)  # no routes at all: a replayed pass would raise MissingRoutesError
    with eng.eval_mode(), eng.disable_adapter():
        out = eng.infer_batch(td)
    assert "router_replay/disagreement" not in out["metrics"]
    with eng.eval_mode(), pytest.raises(MissingRoutesError, match="carries no 'routed_experts'"):
        eng.infer_batch(to_engine_batch(batch))


# --- wrong routes raise, never a live fallback -----------------------------------------------------
def test_truncated_routes_raise(model_dir):
    eng = make_engine(model_dir, mode="R3")
    lens = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    batch, _ = agent_loop_batch(PROMPTS, RESPONSES, engine_rows=[n - 1 for n in lens[:3]] + [lens[3] - 3])
    with eng.eval_mode(), pytest.raises(MissingRoutesError, match="sample 3: routes stop at position 4 of 7 tokens"):
        eng.infer_batch(to_engine_batch(batch, micro_batch_size=4))


def test_routes_longer_than_the_tokens_raise(model_dir):
    eng = make_engine(model_dir, mode="R3")
    batch, aligned = agent_loop_batch(PROMPTS, RESPONSES, layout="per_sample")
    aligned[1] = torch.cat([aligned[1], aligned[1][:3]])
    with eng.eval_mode(), pytest.raises(TokenCountMismatchError, match="sample 1: routed_experts has 15 rows but"):
        eng.infer_batch(to_engine_batch(batch, aligned, layout="per_sample", micro_batch_size=4))


def test_routes_on_a_dense_layer_raise(tmp_path):
    d = make_model_dir(str(tmp_path), mlp_only_layers=[0])  # layer 0 dense, MoE layers 1 and 2
    eng = make_engine(d, mode="R3")
    assert eng.router_handle.layer_ids == (1, 2)
    batch, aligned = agent_loop_batch(PROMPTS, RESPONSES, num_layers=3, layout="per_sample")
    with eng.eval_mode(), pytest.raises(EngineFormatError, match="routes on decoder layer 0, which is not an MoE"):
        eng.infer_batch(to_engine_batch(batch, aligned, layout="per_sample", micro_batch_size=4))
    for a in aligned:
        a[:, 0] = 0  # what vLLM sends: dense layers as empty rows
    with eng.eval_mode():
        m = eng.infer_batch(to_engine_batch(batch, aligned, layout="per_sample", micro_batch_size=4))["metrics"]
    assert _flat(m, "router_replay/disagreement") == [0.0]


def test_trailing_rows_after_the_last_loss_token_may_lack_routes_but_not_before():
    gen = torch.Generator().manual_seed(0)
    routes = torch.rand(9, 2, NUM_EXPERTS, generator=gen).topk(TOP_K, -1).indices
    routes[6:] = 0  # multi-turn: the engine stopped at the last generation, a tool reply follows
    t = routes_to_trace([routes], [9], num_experts=NUM_EXPERTS, moe_layer_ids=[0, 1], last_loss_rows=[6])
    assert t.valid.tolist() == [True] * 6 + [False] * 3
    with pytest.raises(MissingRoutesError, match="routes stop at position 6 of 9 tokens, but its last loss token"):
        routes_to_trace([routes], [9], num_experts=NUM_EXPERTS, moe_layer_ids=[0, 1], last_loss_rows=[7])
    routes[3] = 0
    routes[6:] = routes[:3]
    with pytest.raises(MissingRoutesError, match="position 3 has no route but position 4 after it has one"):
        routes_to_trace([routes], [9], num_experts=NUM_EXPERTS, moe_layer_ids=[0, 1])
