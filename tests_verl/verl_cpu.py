"""Run verl 0.9.1's real FSDP2 engine on the CPU: a CPU platform, a tiny Qwen3-MoE, agent-loop batches.

verl registers only accelerator platforms (nvidia, huawei, amd) and falls back to "nvidia" without a
GPU. ``use_cpu_platform`` installs a platform whose device is "cpu" and whose collective backend is
gloo, before anything asks verl for its platform; the engine then builds its device mesh, FSDP2
wrap and optimizer exactly as on a GPU.

What does not run on the CPU: flash-attention (attention is eager; transformers still keeps packed
samples apart, building a block-diagonal mask from the restarting position_ids when there is no KV
cache, as in verl's forward) and Ulysses' attention all-to-all (gloo has no all_to_all, and verl
applies it only inside its flash-attention patch): under SP each rank's attention sees only its own
slice, while the input slicing, the routers' rows and the output all-gather are verl's.

Legend: B samples; P_pad / R_pad padded prompt / response widths; L MoE layers; K top-k.
"""

from __future__ import annotations

import os
import warnings

import torch

warnings.filterwarnings("ignore")
os.environ.setdefault("VERL_LOGGING_LEVEL", "ERROR")

NUM_LAYERS, NUM_EXPERTS, TOP_K, VOCAB = 2, 8, 2, 64


def use_cpu_platform() -> None:
    from verl.plugin.platform.platform_cuda import PlatformCUDA
    from verl.plugin.platform.platform_manager import set_platform

    class CPUPlatform(PlatformCUDA):
        device_name = property(lambda self: "cpu")
        vendor_name = property(lambda self: "cpu")
        device_module = property(lambda self: torch.cpu)

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, i):
            pass

        def synchronize(self, i=None):
            pass

        def empty_cache(self):
            pass

        def communication_backend_name(self):
            return "gloo"

        def manual_seed(self, s):
            torch.manual_seed(s)

        def manual_seed_all(self, s):
            torch.manual_seed(s)

        def set_allocator_settings(self, s):
            pass

    set_platform(CPUPlatform())


def make_model_dir(path: str, *, mlp_only_layers=(), seed: int = 0) -> str:
    """A tiny random Qwen3-MoE checkpoint and a word-level tokenizer (no hub)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=NUM_LAYERS + len(mlp_only_layers), num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, decoder_sparse_step=1,
        mlp_only_layers=list(mlp_only_layers), max_position_embeddings=256, architectures=["Qwen3MoeForCausalLM"],
        tie_word_embeddings=False, norm_topk_prob=True,
    )
    torch.manual_seed(seed)
    Qwen3MoeForCausalLM(cfg).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1",
        bos_token="t2",
    )
    tok.save_pretrained(path)
    return path


def make_engine(model_dir: str, *, mode: str, remove_padding: bool = True, sp: int = 1, grad_ckpt: bool = False,
                pad_to_length: bool = False, forward_only: bool = False, lr: float = 1e-2):
    """verl's engine config objects -> RouteReplayFSDPEngine, initialized (FSDP2 on gloo)."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.config.engine import EngineRouterReplayConfig

    from routereplay.integrations.verl import RouteReplayFSDPEngine

    mc = HFModelConfig(
        path=model_dir, use_remove_padding=remove_padding, override_config={"attn_implementation": "eager"},
        enable_gradient_checkpointing=grad_ckpt,
    )
    ec = FSDPEngineConfig(
        strategy="fsdp2", model_dtype="fp32", use_torch_compile=False, ulysses_sequence_parallel_size=sp,
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        pad_to_length=pad_to_length, pad_to_length_bucket=16, forward_only=forward_only,
        router_replay=EngineRouterReplayConfig(mode=mode),
    )
    ec.use_remove_padding = remove_padding
    oc = FSDPOptimizerConfig(lr=lr, clip_grad=1e9)
    eng = RouteReplayFSDPEngine(model_config=mc, engine_config=ec, optimizer_config=oc,
                                checkpoint_config=CheckpointConfig())
    eng.initialize()
    return eng


def random_routes(n: int, num_layers: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, L, K]`` int16 distinct experts per row (what an engine with other numerics might pick)."""
    scores = torch.rand(n, num_layers, NUM_EXPERTS, generator=gen)
    return scores.topk(TOP_K, dim=-1).indices.to(torch.int16)


def agent_loop_batch(prompt_lens, response_lens, *, P_pad=6, R_pad=7, layout="legacy", num_layers=NUM_LAYERS,
                     seed=0, engine_rows=None):
    """A DataProto-like TensorDict as verl's agent loop builds it, with R3 routes.

    ``layout="legacy"``: ``routed_experts [B, P_pad + R_pad, Lp, K]``, each sample's engine rows
    copied from its left-pad offset (``_InternalAgentLoopOutput``); ``"per_sample"``: one
    ``[prompt + response, Lp, K]`` tensor per sample with trailing zero rows (``AgentLoopOutput.as_dict``),
    as a nested tensor. The engine captured ``tokens - 1`` rows (``engine_rows`` overrides per sample).

    Returns:
        (TensorDict batch, list of each sample's token-aligned ``[n, Lp, K]`` routes)
    """
    from tensordict import TensorDict

    gen = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    S = P_pad + R_pad
    input_ids = torch.zeros(B, S, dtype=torch.int64)
    attention_mask = torch.zeros(B, S, dtype=torch.int64)
    response_mask = torch.zeros(B, R_pad, dtype=torch.int64)
    position_ids = torch.zeros(B, S, dtype=torch.int64)
    legacy = torch.zeros(B, S, num_layers, TOP_K, dtype=torch.int16)
    aligned = []
    for b, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        n = p + r
        toks = torch.randint(3, VOCAB, (n,), generator=gen)
        start = P_pad - p
        input_ids[b, start : P_pad + r] = toks
        attention_mask[b, start : P_pad + r] = 1
        response_mask[b, :r] = 1
        position_ids[b, start : P_pad + r] = torch.arange(n)
        rows = (n - 1) if engine_rows is None else engine_rows[b]
        routes = random_routes(rows, num_layers, gen)
        legacy[b, start : start + rows] = routes
        full = torch.zeros(n, num_layers, TOP_K, dtype=torch.int16)
        full[:rows] = routes[: min(rows, n)]
        aligned.append(full)
    batch = TensorDict(
        {
            "prompts": input_ids[:, :P_pad], "responses": input_ids[:, P_pad:], "response_mask": response_mask,
            "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "old_log_probs": torch.zeros(B, R_pad), "advantages": torch.randn(B, R_pad, generator=gen),
        },
        batch_size=B,
    )
    if layout == "legacy":
        batch["routed_experts"] = legacy
    return batch, aligned


def to_engine_batch(batch, aligned=None, *, layout="legacy", dynamic_bsz=False, micro_batch_size=2,
                    max_token_len=24, remove_padding=True):
    """The trainer's step before the worker: verl's own left_right_2_no_padding, then the engine keys."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(batch.clone())
    if layout == "per_sample":
        td["routed_experts"] = torch.nested.as_nested_tensor(aligned, layout=torch.jagged)
    tu.assign_non_tensor(
        td, use_remove_padding=remove_padding, use_dynamic_bsz=dynamic_bsz, max_token_len_per_gpu=max_token_len,
        micro_batch_size_per_gpu=micro_batch_size, use_fused_kernels=False, temperature=1.0,
        calculate_entropy=False, global_batch_size=len(td),
    )
    return td


def response_logprob_loss(model_output, data, dp_group=None):
    """A simple policy-gradient loss over response tokens (verl's loss_function signature)."""
    from verl.workers.utils.padding import no_padding_2_padding

    logp_BR = no_padding_2_padding(model_output["log_probs"], data)
    mask_BR = data["response_mask"].to(logp_BR.dtype)
    adv_BR = data["advantages"][:, : logp_BR.shape[1]]
    loss = -(logp_BR * adv_BR * mask_BR).sum()
    return loss, {}
