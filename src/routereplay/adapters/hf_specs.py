"""RouterSpec of every HuggingFace transformers (5.x) MoE router, read off the router module.

:func:`spec_for_router` maps a router module to the :class:`~routereplay.core.routing.RouterSpec` that
reproduces its ``(weights_TK, experts_TK)`` bit for bit; :func:`selection_bias` and
:func:`expert_scale` return the tensors :func:`~routereplay.core.routing.route` needs beside the
logits. Dispatch is on the router's exact class (each family defines its own class, and classes
with the same name share one implementation; a parametrized router, e.g. under PEFT's LoRA on its
weight, counts as its original class: :func:`router_class`), and every number is read from the
router instance or the config, never guessed.

This module imports neither transformers nor any model code: it only inspects the modules it is
given, so ``import routereplay.adapters.hf_specs`` is cheap and optional-dependency free.

Families whose router returns something other than ``(router_logits_TE, weights_TK, indices_TK)``
and what the caller must know:

* ``dbrx``: ``DbrxRouter`` returns the logits only; the spec reproduces
  ``DbrxFFN.route_tokens_to_experts`` (softmax, top-k, p-norm).
* ``llama4``: returns ``(scores_TE, logits_TE)``; the spec gives the K sigmoid scores of the
  top-k logits (the dense scores are these, scattered into a ``-inf``-filled row, then sigmoid).
* ``jetmoe``: returns flattened expert-sorted indices and gates plus the logits (last output).
* ``gemma4`` / ``diffusion_gemma``: the first output holds softmax probabilities, not logits
  (``score_function="none"``); weights are scaled by ``per_expert_scale`` (:func:`expert_scale`).
* ``longcat_flash``: logits are ``n_routed_experts + zero_expert_num`` wide; ids beyond the routed
  experts are zero-computation experts and keep their weight.
* ``zaya``: one extra logit, the skip class, and a fourth output (router state for the next
  layer). The router turns a pick of the skip class into id 0 with weight 0
  (``zero_expert_mode="mask"``, see :func:`routereplay.core.routing.mask_zero_experts`).
* ``afmoe``, ``hy_v3``, ``minimax_m2``, ``lfm2_moe``: the selection bias is a forward argument
  given by the MoE block, so :func:`selection_bias` needs the call's arguments.
* ``granitemoe*``, ``jetmoe``, ``jamba``, ``cohere2_moe``, ``laguna``, ``lara_mini``, ERNIE: the
  weights are cast to the router input's dtype (``weights_dtype="input"``): pass
  ``out_dtype=hidden_states.dtype`` to ``route``.

Refused with :class:`~routereplay.core.errors.UnsupportedRouterError` (the message says why):
DeepSeek-V4 hash-routed layers, DOGE, the ERNIE-VL modality-split MoE block (its two gates are
supported), Inkling v1, NLLB-MoE, SwitchTransformers, PhiMoE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from routereplay.adapters import hf_infer
from routereplay.core.errors import RouterSpecError, UnsupportedRouterError
from routereplay.core.routing import RouterSpec

__all__ = [
    "FAMILY_SEAMS",
    "REFUSED",
    "SKIPPED",
    "RouterMath",
    "check_override",
    "expert_scale",
    "is_supported_router",
    "router_class",
    "router_math",
    "selection_bias",
    "spec_for_router",
    "unsupported_reason",
]

_F32 = torch.float32


def router_class(router: nn.Module) -> type:
    """The router's own class, seen through a ``torch.nn.utils.parametrize`` parametrization.

    ``register_parametrization`` swaps the instance's class for a generated subclass
    (``Parametrized<Name>``, whose only base is the original class); PEFT's LoRA on a router's
    weight (``ParamWrapper``) does so for the length of every adapted forward. Specs, biases and
    scales belong to the original class, so every dispatch here goes through this function.

    Args:
        router: a router module, parametrized or not.

    Returns:
        ``type(router)``, or the class it was generated from while it is parametrized.
    """
    cls = type(router)
    if parametrize.is_parametrized(router):
        cls = cls.__mro__[1]
    return cls


def _family(router: nn.Module) -> str:
    """The transformers model family a router class comes from (``models.<family>.modeling_*``)."""
    parts = router_class(router).__module__.split(".")
    return parts[parts.index("models") + 1] if "models" in parts else router_class(router).__module__


def _attr(router: nn.Module, *names: str) -> Any:
    for name in names:
        if hasattr(router, name):
            return getattr(router, name)
    raise UnsupportedRouterError(
        f"{router_class(router).__name__} ({_family(router)}): expected an attribute {' or '.join(names)} on the "
        "router and found none; this transformers version changed the router, update routereplay"
    )


def _num_experts(router: nn.Module) -> int:
    return int(_attr(router, "num_experts", "n_routed_experts"))


def _sub_config(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


# --- builders, one per router implementation ------------------------------------------------------
def _deepseek_v3(
    router: nn.Module, config: Any, *, mask_value: float = float("-inf"), sorted_: bool = False
) -> RouterSpec:
    """sigmoid, ``e_score_correction_bias`` for selection, groups by top-2 sum, renorm + eps 1e-20, scale."""
    n_group = getattr(router, "num_group", None)
    groups = n_group is not None and int(n_group) > 1
    return RouterSpec(
        family=_family(router),
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function="sigmoid",
        uses_bias=True,
        n_group=int(n_group) if groups else None,
        topk_group=int(router.topk_group) if groups else None,
        group_score_topn=2,
        group_mask_value=mask_value,
        norm_topk_prob=bool(getattr(router, "norm_topk_prob", False)),
        norm_eps=1e-20,
        scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
        topk_sorted=sorted_,
    )


def _axk2(router: nn.Module, config: Any) -> RouterSpec:
    # groups are optional and masked experts get 0.0, not -inf
    return _deepseek_v3(router, config, mask_value=0.0)


def _beam(router: nn.Module, config: Any) -> RouterSpec:
    # sorted top-k and no routed scaling factor
    return _deepseek_v3(router, config, sorted_=True)


def _mistral4(router: nn.Module, config: Any, *, always_norm: bool = False) -> RouterSpec:
    """softmax in the logits dtype, groups by top-2 sum of scores filled with 0.0, renorm + eps."""
    n_group = int(router.num_group) if router.num_group is not None else 1
    groups = n_group > 1
    return RouterSpec(
        family=_family(router),
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function="softmax",
        n_group=n_group if groups else None,
        topk_group=int(router.topk_group) if groups else None,
        group_score_topn=2,
        group_mask_value=0.0,
        norm_topk_prob=always_norm or bool(router.norm_topk_prob),
        norm_eps=1e-20,
        scaling_factor=float(router.routed_scaling_factor),
        topk_sorted=False,
    )


def _mistral_large4(router: nn.Module, config: Any) -> RouterSpec:
    return _mistral4(router, config, always_norm=True)


def _deepseek_v2(router: nn.Module, config: Any) -> RouterSpec:
    """softmax in fp32; ``greedy`` or ``group_limited_greedy`` (group max, 0.0 fill); no renorm."""
    method = router.topk_method
    if method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedRouterError(
            f"{router_class(router).__name__} ({_family(router)}): topk_method={method!r}; only 'greedy' and "
            "'group_limited_greedy' are known"
        )
    groups = method == "group_limited_greedy"
    return RouterSpec(
        family=_family(router),
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function="softmax",
        compute_dtype=_F32,
        n_group=int(router.num_group) if groups else None,
        topk_group=int(router.topk_group) if groups else None,
        group_score_topn=1,
        group_mask_value=0.0,
        scaling_factor=float(router.routed_scaling_factor),
        topk_sorted=False,
    )


def _softmax_topk(
    router: nn.Module,
    config: Any,
    *,
    norm: bool | None = None,
    weights_dtype: str = "logits",
    compute_dtype: torch.dtype | None = _F32,
) -> RouterSpec:
    """softmax over all experts, top-k of the probabilities (sorted), optional plain renorm."""
    return RouterSpec(
        family=_family(router),
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function="softmax",
        compute_dtype=compute_dtype,
        norm_topk_prob=bool(router.norm_topk_prob) if norm is None else norm,
        weights_dtype=weights_dtype,  # type: ignore[arg-type]
    )


def _qwen(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_topk(router, config)


def _qwen_always_norm(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_topk(router, config, norm=True)


def _mixtral(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_topk(router, config, norm=True, weights_dtype="keep")


def _hunyuan(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_topk(router, config, norm=True)


def _jamba(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_topk(router, config, norm=False, weights_dtype="input")


def _lara_mini(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_topk(router, config, weights_dtype="input", compute_dtype=None)


def _dbrx(router: nn.Module, config: Any) -> RouterSpec:
    """``DbrxFFN.route_tokens_to_experts``: softmax in the logits dtype, top-k, p-norm."""
    ffn = _sub_config(config, "ffn_config")
    if ffn is None:
        raise UnsupportedRouterError("DbrxRouter (dbrx): the config has no ffn_config; pass the DbrxConfig")
    p = ffn.moe_normalize_expert_weights
    return RouterSpec(
        family="dbrx",
        num_experts=int(ffn.moe_num_experts),
        top_k=int(ffn.moe_top_k),
        score_function="softmax",
        norm_topk_prob=p is not None,
        norm_kind="p_norm",
        norm_p=float(p) if p is not None else 1.0,
    )


def _softmax_after_topk(
    router: nn.Module, config: Any, *, weights_dtype: str = "keep", compute_dtype: torch.dtype | None = None, **kw: Any
) -> RouterSpec:
    """top-k of the logits (sorted), softmax over the K picked logits."""
    return RouterSpec(
        family=_family(router),
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function="softmax",
        score_before_topk=False,
        compute_dtype=compute_dtype,
        weights_dtype=weights_dtype,  # type: ignore[arg-type]
        **kw,
    )


def _aria(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_after_topk(router, config)


def _granite(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_after_topk(router, config, weights_dtype="input")


def _privacy_filter(router: nn.Module, config: Any) -> RouterSpec:
    # the softmax of the K logits is divided by K
    return _softmax_after_topk(router, config, scaling_factor=float(router.top_k), scaling_op="div")


def _cohere2(router: nn.Module, config: Any) -> RouterSpec:
    fn = router.expert_selection_fn
    if fn == "softmax":
        return _softmax_after_topk(router, config, weights_dtype="input", compute_dtype=_F32)
    if fn == "sigmoid":
        return RouterSpec(
            family="cohere2_moe",
            num_experts=_num_experts(router),
            top_k=int(router.top_k),
            score_function="sigmoid",
            score_before_topk=False,
            norm_topk_prob=bool(router.norm_topk_prob),
            weights_dtype="input",
        )
    raise UnsupportedRouterError(
        f"Cohere2MoeTopKRouter (cohere2_moe): expert_selection_fn={fn!r} is not softmax/sigmoid"
    )


def _llama4(router: nn.Module, config: Any) -> RouterSpec:
    return RouterSpec(
        family="llama4",
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function="sigmoid",
        score_before_topk=False,
        compute_dtype=_F32,
        weights_dtype="logits",
    )


def _sigmoid_bias(
    router: nn.Module,
    config: Any,
    *,
    norm: bool = True,
    eps: float = 0.0,
    scale: float = 1.0,
    sorted_: bool = False,
    compute_dtype: torch.dtype | None = _F32,
    weights_dtype: str = "keep",
    score_function: str = "sigmoid",
    uses_bias: bool = True,
) -> RouterSpec:
    """sigmoid over all experts, selection on scores + bias, weights gathered from the scores."""
    return RouterSpec(
        family=_family(router),
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function=score_function,  # type: ignore[arg-type]
        compute_dtype=compute_dtype,
        uses_bias=uses_bias,
        norm_topk_prob=norm,
        norm_eps=eps,
        scaling_factor=scale,
        topk_sorted=sorted_,
        weights_dtype=weights_dtype,  # type: ignore[arg-type]
    )


def _afmoe(router: nn.Module, config: Any) -> RouterSpec:
    return _sigmoid_bias(router, config, eps=1e-20, scale=float(router.route_scale), sorted_=True)


def _hy_v3(router: nn.Module, config: Any) -> RouterSpec:
    return _sigmoid_bias(router, config, eps=1e-20, scale=float(router.router_scaling_factor))


def _minimax_m2(router: nn.Module, config: Any) -> RouterSpec:
    return _sigmoid_bias(router, config)


def _muse_spark(router: nn.Module, config: Any) -> RouterSpec:
    return _sigmoid_bias(
        router, config, eps=float(router.norm_topk_prob_eps), scale=float(router.routed_scaling_factor)
    )


def _laguna(router: nn.Module, config: Any) -> RouterSpec:
    return _sigmoid_bias(router, config, sorted_=True, weights_dtype="input")


def _flint(router: nn.Module, config: Any) -> RouterSpec:
    return _sigmoid_bias(router, config, norm=bool(router.norm_topk_prob), sorted_=True, uses_bias=False)


def _lfm2(router: nn.Module, config: Any) -> RouterSpec:
    return _sigmoid_bias(
        router,
        config,
        norm=bool(router.norm_topk_prob),
        eps=1e-6,
        scale=float(router.routed_scaling_factor),
        sorted_=True,
        compute_dtype=None,
        uses_bias=bool(router.use_expert_bias),
    )


def _score_fn_name(router: nn.Module, config: Any) -> str:
    """``sigmoid`` / ``sqrtsoftplus`` from the config's ``scoring_func`` (DeepSeek-V4, Inkling 2)."""
    name = getattr(config, "scoring_func", None)
    if name not in ("sigmoid", "sqrtsoftplus"):
        raise UnsupportedRouterError(
            f"{router_class(router).__name__} ({_family(router)}): scoring_func={name!r}; "
            "only sigmoid and sqrtsoftplus are known"
        )
    return name


def _deepseek_v4(router: nn.Module, config: Any) -> RouterSpec:
    """DeepSeek-V4 top-k layers and Inkling-2 (same formula): sigmoid-family scores, selection
    bias, eps 1e-20 in the normalisation, routed_scaling_factor."""
    return _sigmoid_bias(
        router,
        config,
        eps=1e-20,
        scale=float(router.routed_scaling_factor),
        compute_dtype=None,
        score_function=_score_fn_name(router, config),
    )


def _kolibri(router: nn.Module, config: Any) -> RouterSpec:
    """selection on logits + bias, weights = sigmoid of the picked logits."""
    return RouterSpec(
        family="kolibri1",
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function="sigmoid",
        score_before_topk=False,
        uses_bias=True,
        bias_on="logits",
        norm_topk_prob=bool(router.norm_topk_prob),
    )


def _ernie(router: nn.Module, config: Any) -> RouterSpec:
    """softmax in fp32, bias (``moe_statics``) for selection, ``w / clamp(sum, norm_min)``."""
    return RouterSpec(
        family=_family(router),
        num_experts=_num_experts(router),
        top_k=int(router.top_k),
        score_function="softmax",
        compute_dtype=_F32,
        uses_bias=True,
        norm_topk_prob=True,
        norm_kind="clamp",
        norm_eps=float(router.norm_min),
        weights_dtype="input",
    )


def _longcat(router: nn.Module, config: Any) -> RouterSpec:
    """softmax over routed + zero-computation experts, bias over all of them, scale, no renorm."""
    return RouterSpec(
        family="longcat_flash",
        num_experts=int(config.n_routed_experts),
        num_logits=int(router.n_routed_experts),
        top_k=int(router.top_k),
        score_function="softmax",
        uses_bias=True,
        scaling_factor=float(router.routed_scaling_factor),
        topk_sorted=False,
        weights_dtype="logits",
    )


def _zaya(router: nn.Module, config: Any) -> RouterSpec:
    """softmax over experts + skip class in the logits dtype, balancing biases for selection."""
    return RouterSpec(
        family="zaya",
        num_experts=int(router.num_experts),
        num_logits=int(router.num_router_classes),
        top_k=int(router.top_k),
        score_function="softmax",
        uses_bias=True,
        zero_expert_mode="mask",
    )


def _gemma4(router: nn.Module, config: Any) -> RouterSpec:
    """first output = softmax probabilities; top-k, renorm, times ``per_expert_scale``."""
    return RouterSpec(
        family=_family(router),
        num_experts=int(router.per_expert_scale.shape[0]),
        top_k=int(router.config.top_k_experts),
        score_function="none",
        norm_topk_prob=True,
        uses_expert_scale=True,
    )


def _jetmoe(router: nn.Module, config: Any) -> RouterSpec:
    return _softmax_after_topk(router, config, weights_dtype="input", compute_dtype=None)


_BUILDERS: dict[str, Callable[[nn.Module, Any], RouterSpec]] = {
    # DeepSeek-V3 style: sigmoid + bias + groups (top-2 sum, -inf), unsorted, renorm eps 1e-20
    **dict.fromkeys(
        (
            "AXK1TopkRouter",
            "BailingHybridTopkRouter",
            "DeepseekV3TopkRouter",
            "DeepseekV32TopkRouter",
            "Dots1TopkRouter",
            "Dots3NoteTextTopkRouter",
            "ExaoneMoeTopkRouter",
            "Glm4MoeTopkRouter",
            "Glm4MoeLiteTopkRouter",
            "Glm4vMoeTextTopkRouter",
            "Glm5NextTextTopkRouter",
            "GlmMoeDsaTopkRouter",
            "HYV4TopkRouter",
            "HYV4VLTopkRouter",
            "KimiLinearTopkRouter",
            "MiMoV2FlashTopkRouter",
            "NemotronHTopkRouter",
            "SolarOpenTopkRouter",
        ),
        _deepseek_v3,
    ),
    "AXK2TopkRouter": _axk2,
    "BeamTopKRouter": _beam,
    "Mistral4TopkRouter": _mistral4,
    "MistralLarge4TextTopkRouter": _mistral_large4,
    # DeepSeek-V2 style: softmax, greedy or group-limited greedy (max, 0.0), no renorm
    **dict.fromkeys(("DeepseekV2TopkRouter", "DeepseekOcr2TextTopkRouter", "UnlimitedOcrTextTopkRouter"), _deepseek_v2),
    # softmax over all experts, top-k, optional renorm, cast to the logits dtype
    **dict.fromkeys(
        (
            "FlexOlmoTopKRouter",
            "MellumTopKRouter",
            "OlmoeTopKRouter",
            "Qwen2MoeTopKRouter",
            "Qwen3MoeTopKRouter",
            "Qwen3NextTopKRouter",
            "Qwen3OmniMoeThinkerTextTopKRouter",
            "Qwen3OmniMoeTalkerTextTopKRouter",
            "Qwen4ExpTextTopKRouter",
        ),
        _qwen,
    ),
    **dict.fromkeys(
        ("Qwen3_5MoeTopKRouter", "Qwen3VLMoeTextTopKRouter", "Qwen3OmniMoeTextTopKRouter"), _qwen_always_norm
    ),
    **dict.fromkeys(("MixtralTopKRouter", "MiniMaxTopKRouter"), _mixtral),
    "HunYuanMoEV1Gate": _hunyuan,
    "JambaTopKRouter": _jamba,
    "LaraMiniTopKRouter": _lara_mini,
    "DbrxRouter": _dbrx,
    # top-k of logits, then softmax / sigmoid of the K
    "AriaTextTopKRouter": _aria,
    "GptOssTopKRouter": _aria,
    **dict.fromkeys(
        (
            "GraniteMoeTopKRouter",
            "GraniteMoeSWATopKRouter",
            "GraniteMoeHybridTopKRouter",
            "GraniteMoeSharedTopKRouter",
        ),
        _granite,
    ),
    "OpenAIPrivacyFilterTopKRouter": _privacy_filter,
    "Cohere2MoeTopKRouter": _cohere2,
    "Llama4Router": _llama4,
    "JetMoeTopKGating": _jetmoe,
    # sigmoid (or sqrt-softplus) + bias, no groups
    "AfmoeTokenChoiceRouter": _afmoe,
    "HYV3TopKRouter": _hy_v3,
    **dict.fromkeys(("MiniMaxM2TopKRouter", "MiniMaxM3VLTopKRouter", "Step3p7TopKRouter"), _minimax_m2),
    "MuseSparkTopkRouter": _muse_spark,
    "LagunaTopKRouter": _laguna,
    "FlintTopKRouter": _flint,
    "Lfm2MoeTopKRouter": _lfm2,
    "DeepseekV4TopKRouter": _deepseek_v4,
    **dict.fromkeys(("Inkling2TopKRouter", "Inkling2LoopTopKRouter"), _deepseek_v4),
    "Kolibri1TopKRouter": _kolibri,
    # the rest
    **dict.fromkeys(("Ernie4_5_MoeTopKRouter", "Ernie4_5_VLMoeMoeTopKRouter"), _ernie),
    "LongcatFlashTopkRouter": _longcat,
    "ZayaRouter": _zaya,
    **dict.fromkeys(("Gemma4TextRouter", "DiffusionGemmaTextRouter"), _gemma4),
}

# The one refusal table: router (or declared MoE-block) class -> why its routing cannot be replayed.
# adapters/hf.py refuses these at attach with the reason, docs/MODELS.md shows that message, and
# tests/test_hf_contract.py and tests/test_hf_specs.py expect it.
REFUSED: dict[str, str] = {
    "DogeCDMoE": (
        "Doge's cross-domain MoE picks experts by product-key retrieval inside the MoE block "
        "(DogeCDMoE.forward, experts are embedding rows); no router module returns top-k ids"
    ),
    "Ernie4_5_VLMoeMoeBlock": (
        "ERNIE-4.5-VL splits tokens between text and vision routers inside the MoE block by modality, "
        "so one trace row does not map to one router call"
    ),
    "InklingTopkRouter": (
        "Inkling's router returns shared-expert gammas normalised together with the selected experts' "
        "logits (a 4th output that depends on the selection); recomputing it is not implemented"
    ),
    "NllbMoeTop2Router": (
        "NLLB-MoE is an encoder-decoder whose router returns dense dispatch masks with expert capacity "
        "and second-expert sampling; a top-k trace cannot describe its dispatch"
    ),
    "SwitchTransformersTop1Router": (
        "Switch Transformers is an encoder-decoder whose router returns dense dispatch masks with expert "
        "capacity dropping; a top-k trace cannot describe its dispatch"
    ),
    "PhimoeTopKRouter": (
        "PhiMoE's sparsemixer routing: per-slot softmax over logits masked by a jitter threshold relative "
        "to the picked expert, Gumbel sampling and a custom Heun backward in training; not a top-k score router"
    ),
}

# Routers found but left out of traces (not refused): class -> why.
SKIPPED: dict[str, str] = {
    "DeepseekV4HashRouter": (
        "hash router: experts are a fixed function of the token id (a frozen token-id table), nothing to replay"
    ),
}


def unsupported_reason(router: nn.Module) -> str | None:
    """Why ``router`` gets no spec (:data:`REFUSED`, or left out of traces: :data:`SKIPPED`), or
    None (a hand-written spec, or inference decides)."""
    name = router_class(router).__name__
    return REFUSED.get(name) or SKIPPED.get(name)


def is_supported_router(router: nn.Module) -> bool:
    """True when the hand table has a spec for this router class (others go to inference)."""
    return router_class(router).__name__ in _BUILDERS


def spec_for_router(router: nn.Module, config: Any, *, infer: bool = True) -> RouterSpec:
    """The RouterSpec that reproduces ``router``'s weights and ids bit for bit.

    A hand-written entry of this module wins (an override); a class no entry names is probed
    (:func:`routereplay.adapters.hf_infer.infer`) and gets the spec proven on the probe battery.

    Args:
        router: a router module of a transformers MoE model (the ``router_logits`` recorder class,
            e.g. ``model.layers[i].mlp.gate``).
        config: the model's (text) config; read where the router does not hold a value itself
            (DBRX top-k, DeepSeek-V4 / Inkling-2 scoring function, LongCat expert counts).
        infer: probe classes the table does not name (False: refuse them).

    Returns:
        A validated :class:`RouterSpec`.

    Raises:
        UnsupportedRouterError: the router is known and cannot be replayed exactly, or inference
            found no spec; the message names the class, the family and the reason.
    """
    return router_math(router, config, infer=infer).spec


@dataclass(frozen=True, kw_only=True, slots=True)
class RouterMath:
    """What :func:`routereplay.core.routing.route` needs from one router: its spec, and where each call's
    selection bias and per-expert scale come from.

    Attributes:
        spec: the router's spec.
        inferred: the inference record when the spec was probed, None for a hand-written one.
    """

    spec: RouterSpec
    inferred: hf_infer.InferredRouter | None = None

    def bias(self, router: nn.Module, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None):
        if self.inferred is not None:
            return self.inferred.bias(router, args, kwargs)
        return selection_bias(router, args, kwargs)

    def expert_scale(self, router: nn.Module) -> torch.Tensor | None:
        return self.inferred.expert_scale(router) if self.inferred is not None else expert_scale(router)

    @property
    def upcast_weights(self) -> bool:
        """The router returns the weights wider than the spec computes them (an exact upcast)."""
        return self.inferred is not None and self.inferred.upcast_weights


def router_math(router: nn.Module, config: Any, *, infer: bool = True) -> RouterMath:
    """The spec and per-call inputs of ``router``: the hand table's, else inferred (see
    :func:`spec_for_router`, which returns ``.spec`` of this)."""
    name = router_class(router).__name__
    builder = _BUILDERS.get(name)
    if builder is not None:
        return RouterMath(spec=builder(router, config))
    reason = unsupported_reason(router)
    if reason is not None:
        raise UnsupportedRouterError(f"{name} ({_family(router)}): {reason}")
    if not infer:
        raise UnsupportedRouterError(
            f"{name} ({_family(router)}): no hand-written RouterSpec for router class {name} "
            f"(module {router_class(router).__module__}) and inference is off"
        )
    inferred = hf_infer.infer(router, config)
    return RouterMath(spec=inferred.spec, inferred=inferred)


# forward arguments that carry the selection bias, by router class: (position, keyword)
_BIAS_ARGUMENT: dict[str, tuple[int, str]] = {
    "AfmoeTokenChoiceRouter": (1, "expert_bias"),
    "HYV3TopKRouter": (1, "e_score_correction_bias"),
    "MiniMaxM2TopKRouter": (1, "e_score_correction_bias"),
    "Lfm2MoeTopKRouter": (1, "expert_bias"),
}


def selection_bias(
    router: nn.Module, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None
) -> torch.Tensor | None:
    """The per-expert bias the router adds for selection only, as a 1-D ``[num_logits]`` tensor.

    Args:
        router: the router module.
        args, kwargs: the positional / keyword arguments of the router call (hidden states
            first). Needed for routers whose MoE block passes the bias in (AFMoE, HY-V3,
            MiniMax-M2, LFM2-MoE); ignored otherwise.

    Returns:
        The bias tensor (a view of the module's own buffer or parameter, or the argument given),
        or None when the router has no selection bias.

    Raises:
        RouterSpecError: the bias is a forward argument and the call's arguments were not given.
        UnsupportedRouterError: unknown router class.
    """
    name = router_class(router).__name__
    if name not in _BUILDERS:
        raise UnsupportedRouterError(
            f"{name} ({_family(router)}): not in the hand table; use router_math(router, config).bias for an "
            "inferred spec"
        )
    if name in _BIAS_ARGUMENT:
        if name == "Lfm2MoeTopKRouter" and not router.use_expert_bias:
            return None
        position, keyword = _BIAS_ARGUMENT[name]
        value = hf_infer.forward_argument(args, kwargs, position, keyword)
        if value is not hf_infer.MISSING:
            return value
        raise RouterSpecError(
            f"{name} ({_family(router)}): the selection bias is the router's forward argument "
            f"{keyword!r} (position {position}); pass the call's args/kwargs to selection_bias"
        )
    if name == "ZayaRouter":
        return router.balancing_biases
    statics = getattr(router, "moe_statics", None)
    if statics is not None:
        # ERNIE keeps a [1, E] parameter and squeezes it when adding
        return statics.e_score_correction_bias.squeeze(0)
    # every supported router that holds this buffer uses it for selection (and none holds it unused)
    return getattr(router, "e_score_correction_bias", None)


def expert_scale(router: nn.Module) -> torch.Tensor | None:
    """The learned per-expert weight scale (Gemma 4 ``per_expert_scale``), or None."""
    if router_class(router).__name__ in ("Gemma4TextRouter", "DiffusionGemmaTextRouter"):
        return router.per_expert_scale
    return None


# Routers whose adapter seam is family-specific (adapters/hf.py): their output is not the
# (logits, weights, ids) triple, or the seam rewrites it after route(); inference does not apply.
FAMILY_SEAMS = frozenset({"DbrxRouter", "Llama4Router", "JetMoeTopKGating", "ZayaRouter"})


def check_override(router: nn.Module, config: Any) -> tuple[str, str]:
    """Hold a hand-written spec against inference (with the hand table out of the way).

    Returns:
        ``(verdict, detail)``: ``"same"`` (inference finds the hand spec field for field),
        ``"equivalent"`` (the specs differ only in fields the battery shows to be unobservable for
        this router: the hand spec passes every probe too; ``detail`` names them), ``"seam"``
        (a family-specific seam, inference does not apply), ``"refused"`` (inference finds no spec;
        ``detail`` is why), or ``"differs"`` (the hand spec fails the battery: a bug to fix).

    Raises:
        UnsupportedRouterError: the router class has no hand-written spec.
    """
    name = router_class(router).__name__
    if name not in _BUILDERS:
        raise UnsupportedRouterError(f"{name} ({_family(router)}): no hand-written spec to check")
    if name in FAMILY_SEAMS:
        return "seam", "family-specific seam in adapters/hf.py: the router does not return (logits, weights, ids)"
    hand = _BUILDERS[name](router, config)
    try:
        inferred = hf_infer.infer(router, config).spec
    except UnsupportedRouterError as e:
        return "refused", str(e).split(": ", 1)[-1]
    strip = {"family": ""}
    if dataclasses.replace(inferred, **strip) == dataclasses.replace(hand, **strip):
        return "same", ""
    diff = hf_infer.verify(
        router, config, hand, bias=lambda m, a, k: selection_bias(m, a, k), expert_scale=expert_scale
    )
    fields = [
        f"{f.name}={getattr(hand, f.name)!r} (inferred {getattr(inferred, f.name)!r})"
        for f in dataclasses.fields(RouterSpec)
        if f.name != "family" and getattr(hand, f.name) != getattr(inferred, f.name)
    ]
    if diff is None:
        return "equivalent", ", ".join(fields)
    return "differs", f"{', '.join(fields)}; hand spec fails: {diff}"
