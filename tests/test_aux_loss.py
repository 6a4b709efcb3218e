"""The load-balancing (aux) loss under replay: HF and Megatron count the same routes (live top-k),
and ``routereplay.rl.aux_loss.load_balancing_loss`` counts live or replayed routes on request.

Oracles: transformers' own ``load_balancing_loss_func`` (Qwen3-MoE's) and the aux-loss gradient
Megatron-Core's own ``TopKRouter.routing`` puts on the logits while routereplay replays other ids.

Legend: N router rows, E experts, K top-k, L MoE layers, B sequences, S sequence length.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

import routereplay
from routereplay.core.errors import MetricInputError, TraceMismatchError
from routereplay.core.trace import RoutingTrace
from routereplay.rl.aux_loss import load_balancing_loss

E, K = 8, 2


def _logits(L, N, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, E, generator=g).requires_grad_(requires_grad) for _ in range(L)]


def _ids(T, L, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, L, E, generator=g).argsort(-1)[..., :K]


def _trace(experts_TLK, seq_lens, valid=None):
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(seq_lens).cumsum(0)
    return RoutingTrace(
        experts=experts_TLK, cu_seqlens=cu, layer_ids=tuple(range(experts_TLK.shape[1])), num_experts=E, valid=valid
    )


def _mask(B=2, S=5):
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[0, :2] = 0  # left padding on the first sequence
    return mask


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_live_equals_transformers_load_balancing_loss(masked):
    mask = _mask() if masked else None
    ours_in, theirs_in = _logits(3, 10, 0, True), _logits(3, 10, 0, True)
    ours = load_balancing_loss(ours_in, top_k=K, attention_mask=mask)
    theirs = load_balancing_loss_func(tuple(theirs_in), E, K, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    ours.backward()
    theirs.backward()
    for a, b in zip(ours_in, theirs_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_replayed_routes_are_counted_on_their_rows():
    """Routes equal to the live top-k give the live value; other routes change the counts only."""
    mask = _mask()
    logits = _logits(3, 10, 1)
    real_N = mask.reshape(-1).bool()
    live_TLK = torch.stack([torch.softmax(x, -1).topk(K, -1).indices[real_N] for x in logits], 1)
    seq_lens = mask.sum(1).tolist()
    live = load_balancing_loss(logits, top_k=K, attention_mask=mask)
    assert torch.equal(
        load_balancing_loss(logits, top_k=K, routes=_trace(live_TLK, seq_lens), attention_mask=mask), live
    )

    other_TLK = _ids(live_TLK.shape[0], 3, 2)
    got = load_balancing_loss(logits, top_k=K, routes=_trace(other_TLK, seq_lens), attention_mask=mask)
    # The oracle written out: counts from the given routes, probabilities from the logits.
    counts_E = torch.bincount(other_TLK.reshape(-1), minlength=E).float()
    probs_E = sum((torch.softmax(x, -1) * real_N[:, None]).sum(0) for x in logits)
    rows = real_N.sum() * len(logits)
    torch.testing.assert_close(got, E * ((counts_E / rows) * (probs_E / rows)).sum())
    assert not torch.equal(got, live)

    # Rows a replay left live (valid False) count their live top-k.
    valid_T = torch.ones(live_TLK.shape[0], dtype=torch.bool)
    valid_T[[0, 4]] = False
    mixed_TLK = torch.where(valid_T[:, None, None], other_TLK, live_TLK)
    mixed = load_balancing_loss(logits, top_k=K, routes=_trace(mixed_TLK, seq_lens), attention_mask=mask)
    marked = load_balancing_loss(logits, top_k=K, routes=_trace(other_TLK, seq_lens, valid_T), attention_mask=mask)
    torch.testing.assert_close(marked, mixed, rtol=0, atol=0)


def test_refusals_name_what_to_pass():
    logits = _logits(2, 10, 3)
    with pytest.raises(
        MetricInputError, match=r"^load_balancing_loss: router_logits has no layers; call the model with"
    ):
        load_balancing_loss([], top_k=K)
    with pytest.raises(MetricInputError, match=r"router_logits\[1\] is \(9, 8\), layer 0 is \(10, 8\)"):
        load_balancing_loss([logits[0], logits[1][:9]], top_k=K)
    with pytest.raises(
        MetricInputError, match=r"attention_mask \(2, 4\) has 8 positions but each layer's router_logits"
    ):
        load_balancing_loss(logits, top_k=K, attention_mask=torch.ones(2, 4))
    wrong_rows = _trace(_ids(9, 2, 4), [9])
    with pytest.raises(
        TraceMismatchError,
        match=r"routes has \(layers, top_k, num_experts, rows\) = \(2, 2, 8, 9\) but router_logits and attention_mask "
        r"give \(2, 2, 8, 8\); pass the trace replayed",
    ):
        load_balancing_loss(logits, top_k=K, routes=wrong_rows, attention_mask=_mask())


# --- HF: the model's own aux_loss under replay counts live top-k ---------------------------------
def _tiny_qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=E, num_experts_per_tok=K,
        norm_topk_prob=True, max_position_embeddings=64, pad_token_id=0, router_aux_loss_coef=0.5,
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.Qwen3MoeForCausalLM(config).float()


def test_hf_model_aux_loss_under_replay_counts_live_routes():
    model = _tiny_qwen3_moe()
    h = routereplay.attach(model)
    mask = _mask(2, 6)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    forced = _trace(_ids(int(mask.sum()), len(h.layer_ids), 7), mask.sum(1).tolist())
    with h.replay(forced, attention_mask=mask):
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    h.detach()
    live = load_balancing_loss(out.router_logits, top_k=K, attention_mask=mask)
    replayed = load_balancing_loss(out.router_logits, top_k=K, routes=forced, attention_mask=mask)
    torch.testing.assert_close(out.aux_loss, live, rtol=1e-6, atol=0)
    assert not torch.allclose(replayed, live)


# --- Megatron: its aux loss under a routereplay replay counts live top-k too ----------------------
@pytest.fixture(scope="module")
def mcore():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'routereplay[megatron]')")
    import os
    import tempfile

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


@pytest.mark.filterwarnings("ignore")
def test_megatron_and_hf_aux_loss_agree_under_replay(mcore):
    """Same logits, same replayed routes: Megatron's aux-loss gradient on the logits is HF's (live
    counts) scaled by coeff / K, layer by layer, and not the gradient of the replayed-routes loss."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from routereplay.adapters import megatron as mga

    coeff = 0.25
    cfg = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
        use_cpu_initialization=True, moe_token_dispatcher_type="allgather", add_bias_linear=False,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=coeff,
    )
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=64,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    ).train()
    routers = [m for m in model.modules() if type(m).__name__ == "TopKRouter"]
    h = routereplay.attach(model, adapter=mga)
    S, B = 6, 2
    logits = [x.reshape(S, B, E).detach().requires_grad_(True) for x in _logits(len(routers), S * B, 11)]
    forced = _trace(_ids(S * B, len(routers), 12), [S * B])
    with h.replay(forced):
        outs = [r.routing(x) for r, x in zip(routers, logits)]
    h.detach()
    assert all(
        torch.equal(m, torch.zeros_like(m).scatter(1, forced.experts[:, i].long(), True))
        for i, (_, m) in enumerate(outs)
    )
    # probs * 0: only the aux loss Megatron attached to the probs sends a gradient to the logits.
    sum(p.sum() * 0 for p, _ in outs).backward()
    for i, x in enumerate(logits):
        x_NE = x.detach().reshape(S * B, E)
        live_in, replayed_in = x_NE.clone().requires_grad_(True), x_NE.clone().requires_grad_(True)
        (load_balancing_loss([live_in], top_k=K) * coeff / K).backward()
        (load_balancing_loss([replayed_in], top_k=K, routes=forced.select_layers((i,))) * coeff / K).backward()
        torch.testing.assert_close(x.grad.reshape(S * B, E), live_in.grad, rtol=1e-5, atol=1e-8)
        assert not torch.allclose(x.grad.reshape(S * B, E), replayed_in.grad, rtol=1e-5, atol=1e-8)
