"""Tiny random MoE models of every HuggingFace transformers family, for tests (CPU, fp32).

Every builder makes the model from its config class (no hub, no weights): a few decoder layers,
hidden size 64, 8 routed experts, top-2, vocabulary 128, fixed seed, eval mode. Several families
keep dense layers before their MoE layers (``first_k_dense_replace``, ``mlp_layer_types``,
``decoder_sparse_step``, ``mlp_only_layers``), so layer-id mapping is exercised.

API:
    FAMILIES: every MoE ``model_type`` of the installed transformers, sorted.
    build(family, seed=0, *, num_experts=8, top_k=2) -> (model, config): the CausalLM, or the
        text model where the family has no text-only CausalLM. Selection biases are random (not
        HF's zeros) so a replay that ignored them would be caught.
    reason_skipped(family) -> str | None: why a family cannot be built tiny here (None: it can).
    discover_moe_model_types() -> dict[str, str]: model types whose config declares routed
        experts, found by scanning the transformers config registry (cross-check for FAMILIES;
        NOT_FAMILIES and UNDISCOVERABLE explain every difference).

Legend: none (no tensors are named here).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "FAMILIES",
    "FAMILY_OF",
    "NOT_FAMILIES",
    "UNDISCOVERABLE",
    "build",
    "discover_moe_model_types",
    "model_class_name",
    "reason_skipped",
]

# Sizes every family gets when its config has the field. Expert counts and top-k go under every
# name the families use; only real dataclass fields of the config class are passed, so aliases
# (``attribute_map``) never collide.
_TINY: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    # experts and top-k
    "num_experts": 8,
    "n_routed_experts": 8,
    "num_local_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k": 2,
    # MLA attention (DeepSeek-style): head_dim must equal the rope part there
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    # sparse-attention indexers, linear-attention and hyper-connection extras
    "index_topk": 8,
    "index_head_dim": 16,
    "index_n_heads": 2,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    "per_layer_config": {},
    # family-specific widths that default to production sizes
    "swa_head_dim": 16,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "unpadded_vocab_size": 128,
    "vocab_size_per_layer_input": 128,
    "hidden_size_per_layer_input": 8,
    "ssm_state_size": 16,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "moe_shared_expert_intermediate_size": 32,
    "moe_hidden_size": 32,
    "dense_intermediate_size": 64,
    "shared_intermediate_size": 32,
    "o_lora_rank": 16,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "kv_channels": 16,
    # group-limited top-k wherever the family has it: 4 groups of 2 experts, keep 2 groups
    "n_group": 4,
    "num_expert_group": 4,
    "topk_group": 2,
}

# family -> (model class name, extra config overrides). The model class is the text CausalLM,
# or the text model named in /work/shared/notes/hf-routers.md where no CausalLM exists.
_FAMILY: dict[str, tuple[str, dict[str, Any]]] = {
    "afmoe": ("AfmoeForCausalLM", {"num_dense_layers": 1, "num_hidden_layers": 3}),
    "aria": ("AriaTextForCausalLM", {}),
    "axk1": ("AXK1ForCausalLM", {"num_hidden_layers": 3}),
    "axk2": ("AXK2ForCausalLM", {"num_hidden_layers": 3}),
    "bailing_hybrid": (
        "BailingHybridForCausalLM",
        {
            "num_hidden_layers": 3,
            "first_k_dense_replace": 1,
            "layer_group_size": 2,
            "num_expert_group": 4,
            "topk_group": 2,
        },
    ),
    "beam": ("BeamForCausalLM", {"num_hidden_layers": 3, "mlp_layer_types": ["dense", "sparse", "sparse"]}),
    "cohere2_moe": ("Cohere2MoeForCausalLM", {}),
    "dbrx": (
        "DbrxForCausalLM",
        {
            "d_model": 64,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 128,
            "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
        },
    ),
    "deepseek_ocr2": (
        "DeepseekOcr2TextModel",
        {"mlp_layer_types": ["dense", "sparse", "sparse"], "num_hidden_layers": 3},
    ),
    "deepseek_v2": ("DeepseekV2ForCausalLM", {"n_group": 4, "topk_group": 2}),
    "deepseek_v3": (
        "DeepseekV3ForCausalLM",
        {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2},
    ),
    "deepseek_v32": ("DeepseekV32ForCausalLM", {"num_hidden_layers": 3, "first_k_dense_replace": 1}),
    "deepseek_v4": ("DeepseekV4ForCausalLM", {"num_hidden_layers": 3, "mlp_layer_types": ["hash_moe", "moe", "moe"]}),
    "diffusion_gemma": (
        "DiffusionGemmaEncoderTextModel",
        {"top_k_experts": 2, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4},
    ),
    "doge": ("DogeForCausalLM", {"is_moe": True, "num_experts": 16}),  # product keys: a square count
    "dots1": ("Dots1ForCausalLM", {"num_hidden_layers": 3, "first_k_dense_replace": 1, "n_shared_experts": 1}),
    "dots3_note": (
        "Dots3NoteForCausalLM",
        {
            "num_hidden_layers": 3,
            "swa_num_attention_heads": 4,
            "swa_num_key_value_heads": 4,
            "swa_q_lora_rank": 16,
            "swa_kv_lora_rank": 16,
            "swa_head_dim": 32,
            "swa_qk_nope_head_dim": 16,
            "swa_v_head_dim": 16,
        },
    ),
    "ergo": ("ErgoForCausalLM", {"num_hidden_layers": 3, "num_dense_blocks": 1}),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", {"num_hidden_layers": 3}),
    "ernie4_5_vl_moe": (
        "Ernie4_5_VLMoeTextModel",
        {
            "moe_intermediate_size": [32, 32],
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default", "mrope_section": [3, 3, 2]},
        },
    ),
    "exaone_moe": ("ExaoneMoeForCausalLM", {"num_hidden_layers": 3}),
    "flex_olmo": ("FlexOlmoForCausalLM", {}),
    "flint": ("FlintForCausalLM", {"num_hidden_layers": 3, "mlp_only_layers": [0]}),
    "gemma4": ("Gemma4ForCausalLM", {"enable_moe_block": True, "top_k_experts": 2}),
    "glm4_moe": ("Glm4MoeForCausalLM", {"num_hidden_layers": 3, "first_k_dense_replace": 1}),
    "glm4_moe_lite": ("Glm4MoeLiteForCausalLM", {"num_hidden_layers": 3}),
    "glm4v_moe": (
        "Glm4vMoeTextModel",
        {
            "num_hidden_layers": 3,
            "rope_parameters": {
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "rope_type": "default",
                "mrope_section": [2, 1, 1],
            },
        },
    ),
    "glm5_next": (
        "Glm5NextTextModel",
        {
            "index_kpool": 4,
            "qk_rope_head_dim": 0,
            "head_dim": 0,
            "num_hidden_layers": 3,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "layer_types": ["linear_attention", "full_attention", "linear_attention"],
        },
    ),
    "glm_moe_dsa": ("GlmMoeDsaForCausalLM", {"num_hidden_layers": 3, "first_k_dense_replace": 1}),
    "gpt_oss": ("GptOssForCausalLM", {}),
    "granitemoe": ("GraniteMoeForCausalLM", {}),
    "granitemoe_swa": ("GraniteMoeSWAForCausalLM", {}),
    "granitemoehybrid": (
        "GraniteMoeHybridForCausalLM",
        {
            "layer_types": ["linear_attention", "full_attention"],
            "shared_intermediate_size": 32,
            "mamba_n_heads": 8,
            "mamba_d_state": 16,
            "mamba_d_head": 16,
            "mamba_chunk_size": 8,
        },
    ),
    "granitemoeshared": ("GraniteMoeSharedForCausalLM", {}),
    "hunyuan_v1_moe": ("HunYuanMoEV1ForCausalLM", {}),
    "hy_v3": ("HYV3ForCausalLM", {"num_hidden_layers": 3}),
    "hy_v4": ("HYV4ForCausalLM", {"num_hidden_layers": 3}),
    "hy_v4_vl": (
        "HYV4VLTextModel",
        {
            "num_hidden_layers": 3,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default", "mrope_section": [4, 2, 2]},
        },
    ),
    "inkling": ("InklingForCausalLM", {}),
    "inkling2": ("Inkling2ForCausalLM", {}),
    "inkling2_loop": ("Inkling2LoopForCausalLM", {}),
    "jamba": (
        "JambaForCausalLM",
        {
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "expert_layer_period": 1,
            "expert_layer_offset": 0,
            "mamba_dt_rank": 8,
            "use_mamba_kernels": False,
        },
    ),
    "jetmoe": ("JetMoeForCausalLM", {}),
    "kimi_k25": ("DeepseekV3ForCausalLM", {"num_hidden_layers": 3, "first_k_dense_replace": 1}),
    "kimi_linear": (
        "KimiLinearForCausalLM",
        {
            "num_hidden_layers": 3,
            "layer_types": ["linear_attention", "full_attention", "linear_attention"],
            "mlp_layer_types": ["dense", "sparse", "sparse"],
        },
    ),
    "kolibri1": ("Kolibri1ForCausalLM", {}),
    "kolibri1_1": (
        "Kolibri1_1ForCausalLM",
        {
            "num_hidden_layers": 3,
            "mlp_only_layers": [0],
            "index_num_heads": 2,
            "index_pool_size": 32,
            "index_compression": 4,
            "index_num_local_tokens": 4,
            "index_num_sink_tokens": 1,
            "sliding_window": 8,
        },
    ),
    "laguna": ("LagunaForCausalLM", {"num_hidden_layers": 3}),
    "lara_mini": ("LaraMiniForCausalLM", {}),
    "lfm2_moe": (
        "Lfm2MoeForCausalLM",
        {"num_hidden_layers": 3, "num_dense_layers": 1, "layer_types": ["conv", "full_attention", "conv"]},
    ),
    "llama4": ("Llama4ForCausalLM", {}),
    "longcat_flash": (
        "LongcatFlashForCausalLM",
        {"num_layers": 2, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 32, "zero_expert_num": 2},
    ),
    "mellum": ("MellumForCausalLM", {}),
    "mimo_v2_flash": ("MiMoV2FlashForCausalLM", {"num_hidden_layers": 3}),
    "minicpm5_moe": ("MiniCPM5MoeForCausalLM", {"num_hidden_layers": 3, "first_k_dense_replace": 1}),
    "minimax": ("MiniMaxForCausalLM", {}),
    "minimax_m2": ("MiniMaxM2ForCausalLM", {}),
    "minimax_m3_vl": ("MiniMaxM3VLForCausalLM", {}),
    "mistral4": ("Mistral4ForCausalLM", {}),
    "mistral_large4": ("MistralLarge4TextModel", {"num_hidden_layers": 3}),
    "mixtral": ("MixtralForCausalLM", {}),
    "muse_spark": ("MuseSparkTextModel", {}),
    "nemotron_h": ("NemotronHForCausalLM", {}),
    "nllb_moe": (
        "NllbMoeForConditionalGeneration",
        {
            "d_model": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_sparse_step": 2,
            "decoder_sparse_step": 2,
            "expert_capacity": 64,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "decoder_start_token_id": 2,
        },
    ),
    "olmoe": ("OlmoeForCausalLM", {}),
    "openai_privacy_filter": ("OpenAIPrivacyFilterModel", {}),
    "param2moe": ("Glm4MoeForCausalLM", {"num_hidden_layers": 3, "first_k_dense_replace": 1}),
    "phimoe": ("PhimoeForCausalLM", {}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", {"num_hidden_layers": 3, "mlp_only_layers": [0]}),
    "qwen3_5_moe": ("Qwen3_5MoeForCausalLM", {"layer_types": ["linear_attention", "full_attention"]}),
    "qwen3_moe": ("Qwen3MoeForCausalLM", {"num_hidden_layers": 4, "decoder_sparse_step": 2}),
    "qwen3_next": ("Qwen3NextForCausalLM", {"layer_types": ["linear_attention", "full_attention"]}),
    "qwen3_omni_moe": ("Qwen3OmniMoeThinkerTextModel", {}),
    "qwen3_vl_moe": ("Qwen3VLMoeTextModel", {}),
    "qwen4_exp": (
        "Qwen4ExpForCausalLM",
        {
            "layer_types": ["linear_attention", "indexed_attention"],
            "indexer_n_heads": 2,
            "indexer_kv_heads": 1,
            "indexer_head_dim": 16,
            "indexer_budget": 8,
            "indexer_compress_ratio": 4,
        },
    ),
    "sarvam_mla": ("DeepseekV3ForCausalLM", {"num_hidden_layers": 3}),
    "sarvam_moe": ("Glm4MoeForCausalLM", {"num_hidden_layers": 3}),
    "solar_open": ("SolarOpenForCausalLM", {}),
    "step3p7": (
        "Step3p7TextModel",
        {
            "mlp_layer_types": ["dense", "sparse", "sparse"],
            "num_hidden_layers": 3,
            "share_expert_dim": 32,
            "sliding_window": 4,
            "num_sliding_attention_heads": 4,
            "query_pre_attn_scalar": 16,
        },
    ),
    "switch_transformers": (
        "SwitchTransformersForConditionalGeneration",
        {
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 64,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "num_sparse_encoder_layers": 1,
            "num_sparse_decoder_layers": 1,
            "expert_capacity": 64,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": None,
            "router_jitter_noise": 0.0,
        },
    ),
    "unlimited_ocr": ("UnlimitedOcrTextModel", {"num_hidden_layers": 3}),
    "zaya": ("ZayaForCausalLM", {"num_experts_per_tok": 1}),
}

# Families whose config class differs from the model class's own ``config_class`` (the model
# is shared with another family, the config carries the family's defaults).
_TEXT_CONFIG_CLASS: dict[str, str] = {"kimi_k25": "DeepseekV3Config"}
_CONFIG_CLASS: dict[str, str] = {
    "kimi_k25": "Kimi_K25Config",
    "sarvam_mla": "SarvamMLAConfig",
    "param2moe": "Param2MoeConfig",
    "sarvam_moe": "SarvamMoEConfig",
}

# Model types that ``discover_moe_model_types`` finds but that are not entries of FAMILIES: the
# family they belong to, or why they have no learned router. The cross-check test prints these.
NOT_FAMILIES: dict[str, str] = {
    "vitpose_backbone": "no learned router: ViTPose++ picks its expert by the dataset index given as input",
}
# Model types that ``discover_moe_model_types`` finds under another name than the family's.
FAMILY_OF: dict[str, str] = {
    "inkling_mm_model": "inkling",  # the multimodal wrapper of InklingTextConfig
    "qwen3_omni_moe_thinker": "qwen3_omni_moe",  # the thinker's text model is the one built
    "qwen3_omni_moe_talker_text": "qwen3_omni_moe",  # the talker's MoE: the same top-k router math
}
# Families that the static scan cannot see, and why (the cross-check test accepts these).
UNDISCOVERABLE: dict[str, str] = {
    "kimi_k25": "its text config class is resolved through AutoConfig at run time (deepseek_v3)",
}

_SKIPPED: dict[str, str] = {}

FAMILIES: list[str] = sorted(_FAMILY)


def model_class_name(family: str) -> str:
    """The transformers class ``build`` instantiates for ``family``."""
    return _FAMILY[family][0]


def reason_skipped(family: str) -> str | None:
    """Why ``family`` cannot be built tiny on this machine, or None when ``build`` works."""
    if family not in _FAMILY:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return _SKIPPED.get(family)


def _config_fields(config_cls: type) -> set[str]:
    if dataclasses.is_dataclass(config_cls):
        return {f.name for f in dataclasses.fields(config_cls)}
    return set(config_cls().to_dict())


_EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k", "top_k_experts")


def _sized(overrides: Mapping[str, Any], num_experts: int, top_k: int) -> dict[str, Any]:
    """``overrides`` with the default expert count / top-k (8 / 2) replaced, nested dicts too."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            out[key] = _sized(value, num_experts, top_k)
        elif key in _EXPERT_COUNT_KEYS and value == 8:
            out[key] = num_experts
        elif (key in _TOP_K_KEYS or key == "moe_top_k") and value == 2:
            out[key] = top_k
        else:
            out[key] = value
    return out


def _tiny_config(
    config_cls: type, overrides: Mapping[str, Any], text_cls: type | None = None, base: Mapping[str, Any] = _TINY
) -> Any:
    fields = _config_fields(config_cls)
    kwargs = {k: v for k, v in base.items() if k in fields}
    if "kv_lora_rank" in fields:
        # multi-head latent attention has as many key/value heads as query heads
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    kwargs.update(overrides)
    sub_configs = getattr(config_cls, "sub_configs", None) or {}
    text_cls = text_cls or sub_configs.get("text_config")
    if text_cls is not None and "text_config" in fields and "text_config" not in kwargs:
        # composite config (e.g. kimi_k25 wraps a deepseek_v3 text config): shrink the text part
        kwargs["text_config"] = _tiny_config(text_cls, overrides, base=base).to_dict()
    return config_cls(**kwargs)


def build(family: str, seed: int = 0, *, num_experts: int = 8, top_k: int = 2) -> tuple[torch.nn.Module, Any]:
    """Build the tiny random model of ``family`` on the CPU, fp32, eval mode.

    Args:
        family: a ``model_type`` from ``FAMILIES``.
        seed: torch seed for the random weights.
        num_experts, top_k: routed experts and experts per token (families that fix them, such
            as ZAYA's top-1 or DOGE's square expert count, keep their own).

    Returns:
        ``(model, config)``.

    Raises:
        KeyError: unknown family. RuntimeError: the family is skipped (see ``reason_skipped``).
    """
    reason = reason_skipped(family)
    if reason is not None:
        raise RuntimeError(f"{family} cannot be built here: {reason}")
    import transformers

    class_name, overrides = _FAMILY[family]
    model_cls = getattr(transformers, class_name)
    config_cls = getattr(transformers, _CONFIG_CLASS[family]) if family in _CONFIG_CLASS else model_cls.config_class
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text_cls = getattr(transformers, _TEXT_CONFIG_CLASS[family]) if family in _TEXT_CONFIG_CLASS else None
        base = _sized(_TINY, num_experts, top_k)
        config = _tiny_config(config_cls, _sized(overrides, num_experts, top_k), text_cls, base)
        if hasattr(config, "text_config") and not isinstance(config, model_cls.config_class):
            config = config.text_config
        torch.manual_seed(seed)
        model = model_cls(config)
    model = model.float().eval()
    _perturb_routing(model, seed)
    return model, config


@torch.no_grad()
def _perturb_routing(model: torch.nn.Module, seed: int) -> None:
    """Make the routing non-degenerate: random selection biases, no all-zero router weights.

    HF initialises selection biases (``e_score_correction_bias``, ``expert_bias``) to zero, which
    would let a test pass with the bias ignored, and AFMoE's router weight to zero, which makes
    every expert tie. Both get small seeded random values here.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        is_bias = name.endswith(("e_score_correction_bias", "expert_bias"))
        zero_router = tensor.ndim == 2 and ("router" in name or ".gate." in name) and not tensor.any()
        if is_bias or zero_router:
            tensor.copy_(0.05 * torch.randn(tensor.shape, generator=gen))


_EXPERT_KEYS = frozenset({"num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"})


def _has_expert_fields(config_cls: type) -> bool:
    return dataclasses.is_dataclass(config_cls) and bool(_config_fields(config_cls) & _EXPERT_KEYS)


def discover_moe_model_types() -> dict[str, str]:
    """Model types of the installed transformers whose config, or a sub-config, declares experts.

    Scans the config registry's classes without building models. A model type whose config is
    only the sub-config of another hit (``gemma4_text`` inside ``gemma4``) is folded into it.

    Returns:
        ``{model_type: config class name}``, with ``-`` in model types spelled ``_``.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    hits: dict[str, type] = {}
    for model_type in CONFIG_MAPPING_NAMES:
        # A config module that fails to import (a missing optional dependency) is reported by
        # the cross-check test as a FAMILIES entry that was not discovered, never hidden here.
        try:
            config_cls = CONFIG_MAPPING[model_type]
        except (ImportError, KeyError, ValueError):
            continue
        subs = [c for c in (getattr(config_cls, "sub_configs", None) or {}).values() if isinstance(c, type)]
        if _has_expert_fields(config_cls) or any(_has_expert_fields(c) for c in subs):
            hits[model_type] = config_cls
    nested = {
        getattr(c, "model_type", None)
        for cls in hits.values()
        for c in (getattr(cls, "sub_configs", None) or {}).values()
        if isinstance(c, type) and c is not cls
    }
    return {t.replace("-", "_"): cls.__name__ for t, cls in hits.items() if t not in nested}
