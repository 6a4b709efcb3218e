"""routereplay.integrations.trl: the real TRL GRPOTrainer with R3 / R2 replay on a tiny Qwen3-MoE (CPU, fp32).

Every run uses num_iterations=2 (TRL's old-policy pass runs and the second iteration updates with
changed weights), gradient accumulation 2 and activation checkpointing. The tokenizer is built
locally (a word-level vocabulary ``t3 .. t63``), no hub access.

Legend: B samples, P padded prompt length, C completion positions, S = P + C, L MoE layers, K top-k.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl", reason="TRL integration tests need trl (pip install 'routereplay[trl]')")
pytest.importorskip("datasets", reason="TRL integration tests need datasets (installed with trl)")

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import GRPOConfig

from routereplay import attach
from routereplay.check import TINY_SIZE, build_default_model
from routereplay.errors import IntegrationError
from routereplay.integrations.trl import GRPOTrainer
from routereplay.metrics import routing_agreement

TEMPERATURE = 0.9


def _tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, TINY_SIZE.vocab)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left"
    )


def _dataset(n=4):
    # Prompts of different lengths, so generation batches are really left-padded.
    return Dataset.from_dict({"prompt": [" ".join(f"t{3 + (7 * i + j) % 60}" for j in range(2 + i % 3)) for i in range(n)]})


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _config(tmp_path, **kw):
    base = {
        "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "num_generations": 4,
        "max_completion_length": 5, "max_steps": 2, "num_iterations": 2, "gradient_accumulation_steps": 2,
        "logging_steps": 1, "report_to": [], "use_cpu": True, "save_strategy": "no", "gradient_checkpointing": True,
        "learning_rate": 5e-2, "loss_type": "grpo", "temperature": TEMPERATURE, "seed": 0, "router_aux_loss_coef": 0.0,
    }
    return GRPOConfig(**{**base, **kw})


def _trainer(tmp_path, mode, *, cls=GRPOTrainer, model=None, config=None, **kw):
    return cls(
        model=model if model is not None else build_default_model(TINY_SIZE), reward_funcs=_reward,
        args=config if config is not None else _config(tmp_path), train_dataset=_dataset(),
        processing_class=_tokenizer(), router_replay=mode, **kw,
    )


def _replay_logs(trainer):
    return [h for h in trainer.state.log_history if "router_replay/disagreement" in h]


@pytest.mark.parametrize("mode", ["R3", "R2"])
def test_replay_is_exact_every_step_and_live_routing_is_not(tmp_path, mode):
    trainer = _trainer(tmp_path, mode)
    trainer.train()
    logs = _replay_logs(trainer)
    assert len(logs) == 2, trainer.state.log_history
    assert [h["router_replay/disagreement"] for h in logs] == [0.0, 0.0]
    # The second iteration updates a changed policy: live routing would differ from the replayed routes.
    assert logs[1]["router_replay/live_disagreement"] > 0.0
    if mode == "R2":
        assert [h["router_replay/coverage"] for h in logs] == [1.0, 1.0]
    else:  # each sample's last token has no rollout route
        assert all(0.5 < h["router_replay/coverage"] < 1.0 for h in logs)
        # Step 1: the trainer is the rollout policy (same weights, fp32, replayed routes): the log-probs
        # nearly agree (TRL's training forward passes no position_ids for left-padded prompts, generate
        # does); step 2 trains a changed policy.
        assert logs[0]["router_replay/k3"] < 1e-4 and logs[1]["router_replay/k3"] > 10 * logs[0]["router_replay/k3"]
    trainer.router_replay_handle.detach()


def test_r3_masked_truncated_completions_replay_prompt_routes_only(tmp_path):
    # Every completion hits max_completion_length here: TRL masks them all out of the attention,
    # so each sample's routes are cut to its prompt tokens (all of which have a rollout route).
    trainer = _trainer(tmp_path, "R3", config=_config(tmp_path, max_steps=1, mask_truncated_completions=True))
    trainer.train()
    (log,) = _replay_logs(trainer)
    assert log["completions/clipped_ratio"] == 1.0
    assert log["router_replay/disagreement"] == 0.0 and log["router_replay/coverage"] == 1.0
    trainer.router_replay_handle.detach()


class _Spy(GRPOTrainer):
    """Keeps each loss micro-batch's inputs, the weights it ran with, its loss and its gradients."""

    def _compute_loss(self, model, inputs):
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = super()._compute_loss(model, inputs)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        self.seen.append((inputs, weights, loss.detach(), grads))
        return loss


def test_r3_loss_and_gradients_equal_hand_written_reference(tmp_path):
    model = build_default_model(TINY_SIZE)
    initial = {n: p.detach().clone() for n, p in model.state_dict().items()}  # the weights that generated the batch
    _Spy.seen = []
    trainer = _trainer(tmp_path, "R3", cls=_Spy, model=model)
    trainer.train()
    assert len(_Spy.seen) == 4
    inputs, weights, loss, grads = _Spy.seen[-1]  # iteration 2: the policy changed since generation
    trainer.router_replay_handle.detach()
    # TRL's own model forward (its fused log-prob head) with the two sets of weights; everything
    # else below is written by hand: the routes, the replay, the GRPO loss.
    rollout_policy, policy = copy.deepcopy(trainer.model), copy.deepcopy(trainer.model)
    rollout_policy.load_state_dict(initial)
    policy.load_state_dict(weights)

    ids_BS = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask_BS = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    comp_BC, cmask_BC = inputs["completion_ids"], inputs["completion_mask"].float()
    C = comp_BC.shape[1]
    labels_BS = ids_BS.masked_fill(mask_BS == 0, -100)
    labels_BS[:, :-C] = -100

    def completion_logps(m):
        return m(input_ids=ids_BS, attention_mask=mask_BS, labels=labels_BS, fused_lm_head=True).log_probs[:, -C:]

    # The rollout's routes, independently: the generating weights' own routes on these tokens.
    h0 = attach(rollout_policy)
    with torch.no_grad(), h0.record() as rec:
        old_BC = completion_logps(rollout_policy)
    routes = rec.trace(attention_mask=mask_BS)
    h = attach(policy)
    with torch.no_grad(), h.record() as live:
        completion_logps(policy)
    assert routing_agreement(routes, live.trace(attention_mask=mask_BS)).disagreement > 0  # replay matters here
    with h.replay(routes, attention_mask=mask_BS):
        logp_BC = completion_logps(policy)
    # GRPO ("grpo" loss, beta 0): -min(r A, clip(r, 1 - eps, 1 + eps) A), mean per sequence, mean, / accumulation.
    ratio = torch.exp(logp_BC - old_BC)
    adv = inputs["advantages"][:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    ref_loss = ((per_token * cmask_BC).sum(-1) / cmask_BC.sum(-1).clamp(min=1.0)).mean() / 2
    ref_grads = torch.autograd.grad(ref_loss, [p for p in policy.parameters() if p.requires_grad], allow_unused=True)

    assert torch.allclose(loss, ref_loss.detach(), rtol=1e-5, atol=1e-7), (loss, ref_loss)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        if r is None:
            assert g is None or not bool(g.any()), name
            continue
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), (name, (g - r).abs().max())


def test_routes_passed_in_by_a_rollout_func(tmp_path):
    """A rollout_func (e.g. calling vLLM) hands routes in with its completions: vLLM's convention."""
    model = build_default_model(TINY_SIZE)
    engine = copy.deepcopy(model)  # the "inference engine": its own copy of the weights
    h_engine = attach(engine)
    tok = _tokenizer()

    def rollout_func(prompts, trainer):
        enc = tok(prompts, padding=True, return_tensors="pt")
        torch.manual_seed(0)
        with torch.no_grad(), h_engine.capture_generation(logprobs=True, temperature=TEMPERATURE) as cap:
            out = engine.generate(**enc, do_sample=True, temperature=TEMPERATURE, max_new_tokens=4, eos_token_id=1,
                                  pad_token_id=0)
        roll = cap.rollout(out, prompt_attention_mask=enc["attention_mask"], eos_token_id=1, pad_token_id=0)
        seqs = [roll.input_ids[a:b] for a, b in zip(roll.cu_seqlens[:-1], roll.cu_seqlens[1:], strict=True)]
        rows = roll.trace
        return {
            "prompt_ids": [s[:n].tolist() for s, n in zip(seqs, roll.prompt_lens, strict=True)],
            "completion_ids": [s[n:].tolist() for s, n in zip(seqs, roll.prompt_lens, strict=True)],
            "logprobs": [lp.tolist() for lp in roll.logprobs[roll.response_mask()].split(roll.completion_lens.tolist())],
            # vLLM's routed_experts: per request, [prompt + completion - 1, L, K] ids (numpy, uint8)
            "routed_experts": [rows.experts[a:b].numpy() for a, b in zip(rows.cu_seqlens[:-1], rows.cu_seqlens[1:],
                                                                         strict=True)],
        }

    trainer = _trainer(tmp_path, "R3", model=model, rollout_func=rollout_func)
    trainer.train()
    logs = _replay_logs(trainer)
    assert [h["router_replay/disagreement"] for h in logs] == [0.0, 0.0]
    assert logs[1]["router_replay/live_disagreement"] > 0.0
    assert logs[0]["router_replay/k3"] < 1e-4  # TRL's sampling_per_token_logps from the rollout_func
    trainer.router_replay_handle.detach()

    def without_routes(prompts, trainer):
        out = rollout_func(prompts, trainer)
        del out["routed_experts"]
        return out

    trainer = _trainer(tmp_path, "R3", rollout_func=without_routes)
    with pytest.raises(IntegrationError, match=r'R3" with a rollout_func: its output has no "routed_experts"'):
        trainer.train()


def test_refusals(tmp_path):
    with pytest.raises(IntegrationError, match=r'router_replay must be "R3", "R2" or None, found \'R1\''):
        _trainer(tmp_path, "R1")
    with pytest.raises(IntegrationError, match=r'router_replay="R3" with use_vllm=True: TRL\'s vLLM generation returns '
                       r'no routes.*Pass a rollout_func that returns "routed_experts"'):
        _trainer(tmp_path, "R3", config=_config(tmp_path, use_vllm=True))
    with pytest.raises(IntegrationError, match=r'router_replay="R2" replays the old-policy pass\'s routes, but with '
                       r"num_iterations=1, steps_per_generation=2 and gradient_accumulation_steps=2 TRL runs no "
                       r"old-policy pass"):
        _trainer(tmp_path, "R2", config=_config(tmp_path, num_iterations=1))
    with pytest.raises(IntegrationError, match=r'router_replay="R3" with tools or environment_factory'):
        _trainer(tmp_path, "R3", tools=[_reward])


def test_no_replay_is_plain_trl(tmp_path):
    trainer = _trainer(tmp_path, None, config=_config(tmp_path, max_steps=1))
    trainer.train()
    assert trainer.router_replay_handle is None and not _replay_logs(trainer)


def test_example_runs(capsys):
    """examples/trl_grpo_r3.py, at a test size."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo_r3.py"
    spec = importlib.util.spec_from_file_location("trl_grpo_r3", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    logs = example.main(["--tiny", "--steps", "2", "--max-completion-length", "4"])
    assert [h["router_replay/disagreement"] for h in logs] == [0.0, 0.0]
    assert "disagreement  live_disagreement" in capsys.readouterr().out
