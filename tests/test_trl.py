"""routereplay.integrations.trl: the real TRL GRPOTrainer with R3 / R2 replay on a tiny Qwen3-MoE (CPU, fp32).

Every run uses num_iterations=2 (TRL's old-policy pass runs and the second iteration updates with
changed weights), gradient accumulation 2 and activation checkpointing. The tokenizer is built
locally (a word-level vocabulary ``t3 .. t63``), no hub access.

Legend: B samples, P padded prompt length, C completion positions, S = P + C, L MoE layers, K top-k.
"""

from __future__ import annotations

import contextlib
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
from routereplay.cli.check import TINY_SIZE, build_default_model
from routereplay.core.errors import IntegrationError
from routereplay.integrations.trl import GRPOTrainer
from routereplay.rl.metrics import routing_agreement

TEMPERATURE = 0.9


def _tokenizer(vocab_size=TINY_SIZE.vocab):
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left"
    )


def _dataset(n=4):
    # Prompts of different lengths, so generation batches are really left-padded.
    return Dataset.from_dict(
        {"prompt": [" ".join(f"t{3 + (7 * i + j) % 60}" for j in range(2 + i % 3)) for i in range(n)]}
    )


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
        processing_class=kw.pop("processing_class", None) or _tokenizer(), router_replay=mode, **kw,
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
    # k3 against the old-policy pass: 0 on the first iteration (same weights, its routes replayed),
    # then it includes the policy update.
    assert logs[0]["router_replay/k3_old"] == 0.0 and logs[1]["router_replay/k3_old"] > 0.0
    if mode == "R2":
        assert [h["router_replay/coverage"] for h in logs] == [1.0, 1.0]
        assert "router_replay/k3" not in logs[0]  # local generation: no rollout log-probs
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
            "logprobs": [
                lp.tolist() for lp in roll.logprobs[roll.response_mask()].split(roll.completion_lens.tolist())
            ],
            # vLLM's routed_experts: per request, [prompt + completion - 1, L, K] ids (numpy, uint8)
            "routed_experts": [
                rows.experts[a:b].numpy() for a, b in zip(rows.cu_seqlens[:-1], rows.cu_seqlens[1:], strict=True)
            ],
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


REFUSALS = [
    pytest.param(
        lambda tmp: _trainer(tmp, "R1"),
        IntegrationError,
        r'router_replay must be "R3", "R2", "measure" or None, found \'R1\'',
        id="unknown-mode",
    ),
    pytest.param(
        lambda tmp: _trainer(tmp, "R3", config=_config(tmp, use_vllm=True)),
        IntegrationError,
        r'router_replay="R3" with use_vllm=True: TRL\'s vLLM generation returns '
        r'no routes.*Pass a rollout_func that returns "routed_experts"',
        id="r3-vllm",
    ),
    pytest.param(
        lambda tmp: _trainer(tmp, "R2", config=_config(tmp, num_iterations=1)),
        IntegrationError,
        r'router_replay="R2" replays the old-policy pass\'s routes, but with '
        r"num_iterations=1, steps_per_generation=2 and gradient_accumulation_steps=2 TRL runs no "
        r"old-policy pass",
        id="r2-without-old-policy-pass",
    ),
    pytest.param(
        lambda tmp: _trainer(tmp, "R3", tools=[_reward]),
        IntegrationError,
        r'router_replay="R3" with tools or environment_factory',
        id="r3-tools",
    ),
    pytest.param(
        lambda tmp: _trainer(tmp, "measure", config=_config(tmp, use_vllm=True)),
        IntegrationError,
        r'router_replay="measure" with use_vllm=True: TRL\'s vLLM generation',
        id="measure-vllm",
    ),
    pytest.param(
        lambda tmp: _trainer(tmp, None, router_replay_export_dir=tmp / "routes"),
        IntegrationError,
        r"^router_replay_export_dir='.*routes' with router_replay=None: nothing captures routes to export; "
        r'set router_replay="measure"',
        id="export-without-capture",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), REFUSALS)
def test_refusals(tmp_path, call, error, match):
    with pytest.raises(error, match=match):
        call(tmp_path)


def _router_logs(trainer):
    return [h for h in trainer.state.log_history if "router_replay/live_disagreement" in h]


def test_measure_logs_the_mismatch_r3_removes_and_trains_as_plain_trl(tmp_path):
    """router_replay="measure": the same training as plain TRL (nothing replayed), and the live-vs-rollout
    route mismatch R3 would remove, step by step, with k3 against the rollout and the old policy."""
    config = _config(tmp_path, logging_steps=1)
    measured = _trainer(tmp_path, "measure", config=config)
    measured.train()
    plain = _trainer(tmp_path, None, config=config)
    plain.train()
    replayed = _trainer(tmp_path, "R3", config=config)
    replayed.train()
    logs = _router_logs(measured)
    plain_logs = [h for h in plain.state.log_history if "loss" in h]
    r3_logs = _replay_logs(replayed)
    assert len(logs) == len(plain_logs) == len(r3_logs) == 2
    for h, p in zip(logs, plain_logs, strict=True):
        assert (h["loss"], h["grad_norm"]) == (p["loss"], p["grad_norm"])  # live routing: plain TRL's numbers
    assert "router_replay/disagreement" not in logs[0] and "router_replay/coverage" not in logs[0]
    # R3's live disagreement is the share of its replayed routes live routing would change: the same number.
    assert [h["router_replay/live_disagreement"] for h in logs] == [
        h["router_replay/live_disagreement"] for h in r3_logs
    ]
    assert logs[1]["router_replay/live_disagreement"] > 0.0
    assert logs[0]["router_replay/k3_old"] == 0.0 and logs[1]["router_replay/k3"] > 0.0
    measured.router_replay_handle.detach()
    replayed.router_replay_handle.detach()


@pytest.mark.parametrize("mode", ["R3", "R2"])
def test_captured_routes_are_exported_as_rrt(tmp_path, mode):
    from routereplay.core import io

    trainer = _trainer(tmp_path, mode, router_replay_export_dir=tmp_path / "routes")
    trainer.train()
    files = sorted((tmp_path / "routes").iterdir())
    assert [f.name for f in files] == ["routes_gen000000_rank000.rrt"]  # num_iterations=2: one generation
    saved = io.load(files[0])
    batch = trainer._rr_batches["train"]
    held = batch.store.trace(torch.arange(len(batch.tokens)))
    assert torch.equal(saved.experts, held.experts) and torch.equal(saved.cu_seqlens, held.cu_seqlens)
    assert saved.layer_ids == trainer.router_replay_handle.layer_ids
    assert saved.seq_lens.tolist() == [t.numel() for t in batch.tokens]  # one sequence per sample, all its tokens
    assert {k: saved.meta[k] for k in ("source", "router_replay", "generation", "rows")} == {
        "source": "trl", "router_replay": mode, "generation": "0", "rows": "training",
    }
    trainer.router_replay_handle.detach()


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


# --- PEFT: the reference is the policy itself with adapters disabled (or TRL's "ref" adapter) -----


class _ScoreSpy(GRPOTrainer):
    """Keeps each scored generation batch and the policy's weights it was scored with."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        weights = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.scored.append(({k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}, weights))
        return out


@contextlib.contextmanager
def _reference(peft_model):
    """TRL's reference for a PEFT policy, by hand: its "ref" adapter if it made one, else adapters disabled."""
    if "ref" not in peft_model.peft_config:
        with peft_model.disable_adapter():
            yield
        return
    peft_model.set_adapter("ref")
    try:
        yield
    finally:
        peft_model.set_adapter("default")


def _completion_logps(model, ids_BS, mask_BS, C, chunk):
    """TRL's log-prob forward (its fused head), chunk by chunk as TRL runs it: same rows, so the same floats."""
    out = []
    for s in range(0, ids_BS.shape[0], chunk):
        ids, mask = ids_BS[s : s + chunk], mask_BS[s : s + chunk]
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :-C] = -100
        out.append(model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs[:, -C:])
    return torch.cat(out)


@pytest.mark.parametrize(("mode", "adapter"), [("R3", "new"), ("R2", "new"), ("R3", "retrained")])
def test_peft_reference_forward_runs_live(tmp_path, mode, adapter):
    """beta > 0 with LoRA: TRL's reference log-probs come from the same module with adapters disabled (a new
    adapter) or with its "ref" copy active (a re-trained adapter); they must be the live forward, never replayed."""
    peft = pytest.importorskip("peft", reason="the PEFT reference path needs peft (pip install 'routereplay[dev]')")
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    # One generation per two updates (num_iterations=2: TRL's old-policy pass runs, so R2 can record),
    # three updates: the second generation is scored with trained adapters.
    config = _config(tmp_path, beta=0.1, max_steps=3, gradient_accumulation_steps=1, steps_per_generation=1)
    if adapter == "new":
        kw = {"peft_config": peft.LoraConfig(**lora)}
    else:  # a PeftModel with a non-zero adapter: TRL keeps its initial copy as the "ref" adapter
        kw = {
            "model": peft.get_peft_model(
                build_default_model(TINY_SIZE), peft.LoraConfig(**lora, init_lora_weights=False)
            )
        }
    trainer = _trainer(tmp_path, mode, cls=_ScoreSpy, config=config, **kw)
    trainer.scored = []
    trainer.train()
    model = trainer.model
    assert trainer.ref_model is None and isinstance(model, peft.PeftModel)
    assert ("ref" in model.peft_config) == (adapter == "retrained")
    logs = _replay_logs(trainer)
    assert len(logs) == 3, trainer.state.log_history
    assert [h["router_replay/disagreement"] for h in logs] == [0.0, 0.0, 0.0]
    assert all(h["router_replay/coverage"] > 0.5 for h in logs) and any(h["kl"] > 0 for h in logs)
    assert len(trainer.scored) == 2
    trainer.router_replay_handle.detach()

    # By hand, with no routereplay in the forward: the reference log-probs TRL stored are the live
    # reference forward, bit for bit. And replaying the policy's routes there would have changed them.
    routes_differ = []
    for out, weights in trainer.scored:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(weights[name])
        ids_BS = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        mask_BS = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        cmask_BC = out["completion_mask"].bool()
        B, C = out["completion_ids"].shape
        with torch.no_grad():
            with _reference(model):
                ref_BC = _completion_logps(model, ids_BS, mask_BS, C, chunk=config.per_device_train_batch_size)
            assert torch.equal(ref_BC, out["ref_per_token_logps"])
            h = attach(model.get_base_model())
            with h.record() as rec:  # the policy's own routes (adapters enabled): what replay would impose
                _completion_logps(model, ids_BS, mask_BS, C, chunk=B)
            policy_routes = rec.trace(attention_mask=mask_BS)
            with _reference(model), h.record() as rec:
                _completion_logps(model, ids_BS, mask_BS, C, chunk=B)
            differ = routing_agreement(policy_routes, rec.trace(attention_mask=mask_BS)).disagreement
            with _reference(model), h.replay(policy_routes, attention_mask=mask_BS):
                replayed_BC = _completion_logps(model, ids_BS, mask_BS, C, chunk=B)
            h.detach()
        routes_differ.append(differ > 0)
        if differ > 0:  # the check above has teeth: a replayed reference forward would not be equal
            assert (replayed_BC - out["ref_per_token_logps"])[cmask_BC].abs().max() > 1e-4
    assert routes_differ[-1], routes_differ  # trained adapters route differently from the reference


def test_peft_refusals(tmp_path):
    peft = pytest.importorskip("peft", reason="the PEFT reference path needs peft (pip install 'routereplay[dev]')")
    config = _config(tmp_path, beta=0.1, max_steps=1)
    # Prompt learning: disabling it swaps the model's forward, which the reference cannot be recognised by.
    with pytest.raises(IntegrationError, match=r"router_replay with a PEFT model: adapter\(s\) \['default'\] have a "
                       r"prompt-learning method, so TRL's reference forward \(adapters disabled\) cannot be told from"):
        _trainer(tmp_path, "R3", config=config, peft_config=peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                    num_virtual_tokens=2))
    # Adapters disabled on one layer only: neither the policy nor the reference.
    trainer = _trainer(tmp_path, "R2", config=config, peft_config=peft.LoraConfig(r=4, target_modules=["q_proj"]))
    trainer.model.get_base_model().model.layers[0].self_attn.q_proj.enable_adapters(False)
    with pytest.raises(IntegrationError, match=r"router_replay with a PEFT model: 1 of 2 adapter layers are disabled"):
        trainer.train()


# --- PEFT LoRA on the routers themselves ("all-linear": PEFT's ParamWrapper on each router's weight) -----


@pytest.mark.parametrize("mode", ["R3", "R2"])
@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v3"])
def test_lora_on_the_routers(tmp_path, family, mode):
    """target_modules="all-linear" wraps every router in a ParamWrapper (LoRA on its weight): the routes
    are still captured per sequence (generate's prefill is [B, P], not [1, B * P]) and replayed exactly,
    and the routers' LoRA weights train."""
    peft = pytest.importorskip("peft", reason="LoRA on the routers needs peft (pip install 'routereplay[dev]')")
    import hf_zoo
    from peft.tuners.lora.layer import ParamWrapper

    model, _ = hf_zoo.build(family)
    for cfg in (model.config, model.generation_config):  # the test tokenizer's special ids
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, 2
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    trainer = _trainer(
        tmp_path, mode, model=model, peft_config=lora, processing_class=_tokenizer(model.config.vocab_size)
    )
    policy = trainer.model
    handle = trainer.router_replay_handle
    wrappers = [policy.get_base_model().get_submodule(layer.path) for layer in handle.layers]
    assert wrappers and all(isinstance(w, ParamWrapper) for w in wrappers)  # the case under test
    before = [
        (w.lora_A["default"].weight.detach().clone(), w.lora_B["default"].weight.detach().clone()) for w in wrappers
    ]
    trainer.train()
    logs = _replay_logs(trainer)
    assert len(logs) == 2, trainer.state.log_history
    assert [h["router_replay/disagreement"] for h in logs] == [0.0, 0.0]
    assert all(h["router_replay/coverage"] > 0.5 for h in logs)
    assert logs[1]["router_replay/live_disagreement"] > 0.0  # step 2's policy routes differently: replay matters
    for w, (a, b) in zip(wrappers, before, strict=True):  # the routers' adapters were trained
        assert not torch.equal(w.lora_A["default"].weight, a) and not torch.equal(w.lora_B["default"].weight, b)
    handle.detach()
