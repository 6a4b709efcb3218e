"""HuggingFace transformers adapter: hooks at the router -> experts seam of MoE models.

Importing this module is the opt-in to transformers (``pip install 'routereplay[hf]'``).

How routers are found: every transformers model class declares the class whose output is its
``router_logits`` in ``_can_record_outputs`` (an ``OutputRecorder`` target). Every instance of a
declared class is a router; its global decoder-layer id is the ``layers.{i}`` / ``blocks.{i}``
index in its module path, so dense layers keep their numbers (DeepSeek's first MoE layer after
three dense ones is layer 3). The weights are recomputed by ``routereplay.core.routing.route`` with the
``RouterSpec`` that ``adapters.hf_specs`` builds for the router.

Seams (all on module *instances*, removed by ``handle.detach()``):
    * common pattern: the router returns ``(logits_NE, weights_NK, ids_NK)``; a wrapper of the
      router instance's ``forward`` (not a module hook: see ``_Seam.hook``) replaces
      ``weights``/``ids`` with the handle's answer.
    * ``dbrx``: the router returns logits only and the top-k is the MoE block's
      ``route_tokens_to_experts`` method; an instance attribute wraps that method.
    * ``llama4``: the router returns ``(scores_NE, logits_NE)``, scores dense (sigmoid of the
      top-k logits, zero elsewhere); the hook rebuilds the dense scores at the forced ids with
      the router's own ops (bit-identical to a live forward that picked those ids).
    * ``zaya``: the router masks its skip class to (id 0, weight 0); the hook records and replays
      the unmasked ids (skip = ``num_experts``) and applies the mask after.
    * ``deepseek_v4``: hash-routed layers (experts a fixed function of the token id) are not
      part of a trace: they replay themselves. They are listed in ``handle.skipped``.
    * ``jetmoe``: the gating returns ``(index_sorted_experts, batch_index, batch_gates,
      expert_size, logits_NE)`` (flattened, expert-sorted); the hook takes the top-k ids from the
      logits, and under record/replay rebuilds all four routing outputs from the ``(weights, ids)``
      the handle answers with the gating's own ops (bit-identical to a live call that picked them).
      JetMoE has two routers per decoder layer, both replayed: the MLP's (``mlp.router``) and the
      mixture of attention heads' (``self_attention.experts.router``, see layer ids below).
    * A pre-hook on each MoE block records its input shape ``[B, S]``; with ``verify=True`` a
      pre-hook on the experts module checks the ids it receives.
PEFT (LoRA) on a router: LoRA on a Linear inside the router (``router.layer``) leaves the router
module as it is. LoRA on the router's own weight (``target_parameters``, or ``target_modules=
"all-linear"`` on transformers-5 routers) puts a ``ParamWrapper`` where the MoE block calls the router
(``mlp.gate``, the router becomes ``mlp.gate.base_layer``) that parametrizes the weight for the length
of each forward and returns the router's output unchanged. ``MoELayer.path`` is then the wrapper's
path (the one the MoE block calls, as in the unwrapped model); hooks sit on the router instance (the
innermost ``base_layer``), the shape pre-hook on the real MoE block, and the spec of a parametrized
router is its original class's (``hf_specs.router_class``). Any other PEFT layer around a router
(e.g. ``lora.Linear`` around Llama-4's router, an ``nn.Linear`` subclass, which adds its delta to the
router's output) is refused at attach with UnsupportedRouterError. The experts module is unwrapped
the same way for ``verify=True``.
Layer ids of attention routers: a router inside attention (JetMoE's mixture of attention heads,
``model.layers.{i}.self_attention.experts.router``) gets id ``num_hidden_layers + i``, so the MLP
router of decoder layer ``i`` keeps id ``i``, every id is unique, and an id ``>= num_hidden_layers``
always means "attention router of layer ``id - num_hidden_layers``". ``handle.layers`` stays in
forward order (layer ``i``'s attention router before its MLP router); each ``MoELayer.path`` says
which router a trace column belongs to.
Families whose routing cannot be replayed exactly through such a seam are refused at attach with
UnsupportedRouterError naming the family and the reason (see ``REFUSED`` and docs/MODELS.md).

Legend: N rows a router sees, E experts (logits width), K top-k, B batch rows, S sequence length.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from routereplay.adapters import hf_specs
from routereplay.core import routing
from routereplay.core.errors import UnsupportedModelError, UnsupportedRouterError
from routereplay.runtime.seam import Discovery, MoELayer, RouterCalls

__all__ = ["NAME", "REFUSED", "base_module", "claims", "discover", "find_routers", "install", "layer_id_of"]

NAME = "hf"

# Refused router classes and their reasons: the one table, hf_specs.REFUSED (re-exported here).
REFUSED = hf_specs.REFUSED

# Routers whose experts are a fixed function of the token id: nothing to record or replay.
_HASH_ROUTERS = frozenset(hf_specs.SKIPPED)

# Parameter names under which experts modules receive the top-k ids (for verify=True).
_EXPERTS_ID_ARGS = ("top_k_index", "topk_indices", "top_k_indices", "selected_experts", "router_indices", "topk_ids")

# MoE blocks inside attention (called through their own methods, never through forward): their
# routers get layer id num_hidden_layers + i and their [B, S] comes from the attention module.
_ATTENTION_MOE_BLOCKS = {"JetMoeMoA"}

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks|block|h)\.(\d+)(?:\.|$)")


def _require_transformers():
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("routereplay.adapters.hf needs transformers: pip install 'routereplay[hf]'")
    return importlib.import_module("transformers")


def layer_id_of(path: str) -> int:
    """Global decoder-layer index in a module path (``model.layers.7.mlp.gate`` -> 7).

    Raises:
        UnsupportedModelError: the path has no ``layers.{i}`` / ``blocks.{i}`` component.
    """
    m = _LAYER_RE.search(path)
    if m is None:
        raise UnsupportedModelError(
            f"router {path}: cannot find its decoder-layer index (no 'layers.<i>' or 'blocks.<i>' in the path)"
        )
    return int(m.group(1))


def _declared_router_classes(model: torch.nn.Module) -> tuple[list[type], list[str]]:
    """Classes (and class-name suffixes) declared as ``router_logits`` sources by every sub-model."""
    tf = _require_transformers()
    classes: list[type] = []
    names: list[str] = []
    for module in model.modules():
        if not isinstance(module, tf.PreTrainedModel):
            continue
        declared = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if declared is None:
            continue
        for spec in declared if isinstance(declared, (list, tuple)) else [declared]:
            target = getattr(spec, "target_class", spec)
            class_name = getattr(spec, "class_name", None)
            if isinstance(target, type) and target not in classes:
                classes.append(target)
            elif isinstance(spec, str) or class_name:
                names.append(spec if isinstance(spec, str) else class_name)
    return classes, names


def find_routers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of every router instance, in module order (= forward order).

    A router is an instance of a class the model declares in ``_can_record_outputs["router_logits"]``,
    or a known hash router (listed so that ``attach`` can report it in ``handle.skipped``). A router
    inside PEFT layers is listed at its own path (``mlp.gate.base_layer``); ``discover`` names it by
    the path its MoE block calls (``mlp.gate``).
    """
    classes, names = _declared_router_classes(model)
    found = []
    for path, module in model.named_modules():
        declared = (classes and isinstance(module, tuple(classes))) or any(path.endswith(n) for n in names)
        if declared or _class_name(module) in _HASH_ROUTERS:
            found.append((path, module))
    return found


def _class_name(module: torch.nn.Module) -> str:
    """The module's class name, through a parametrization's generated subclass (see ``hf_specs.router_class``)."""
    return hf_specs.router_class(module).__name__


def _peft_classes() -> tuple[type, type] | None:
    """PEFT's ``BaseTunerLayer`` and LoRA's ``ParamWrapper``, or None when peft is not loaded.

    A model can only hold PEFT layers once peft is imported, so nothing is imported here otherwise.
    """
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer, ParamWrapper


def _is_peft_model(model: Any) -> bool:
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module a chain of PEFT tuner layers wraps (``base_layer`` of each), or ``module`` itself.

    Args:
        module: a module of the model, e.g. ``model.get_submodule(layer.path)`` or an MoE block's
            ``experts``.

    Returns:
        The innermost ``base_layer`` when ``module`` is a PEFT tuner layer, else ``module``.
    """
    peft = _peft_classes()
    while peft is not None and isinstance(module, peft[0]):
        module = module.base_layer
    return module


def _block_facing_path(model: torch.nn.Module, path: str, router: torch.nn.Module, family: str) -> str:
    """Path of the module the MoE block calls for ``router``: the outermost PEFT layer around it, or ``path``.

    Raises:
        UnsupportedRouterError: a PEFT layer around the router other than LoRA's ``ParamWrapper``
            (which returns the router's output unchanged): its output is not the router's, so
            neither recorded nor replayed ids would be the ones the experts get.
    """
    peft = _peft_classes()
    child = router
    while peft is not None and "." in path:
        parent_path, parent, _ = _parent(model, path)
        if not (isinstance(parent, peft[0]) and getattr(parent, "base_layer", None) is child):
            break
        if not isinstance(parent, peft[1]):
            wrapper = type(parent)
            raise UnsupportedRouterError(
                f"{family}: router {path} ({_class_name(router)}) is wrapped by the PEFT layer {parent_path} "
                f"({wrapper.__module__}.{wrapper.__qualname__}), whose output is the router's output changed by "
                "its adapter, so the ids the experts get could not be recorded or replayed; "
                "leave the router out of target_modules (LoraConfig(exclude_modules=...)), or put LoRA on its "
                f"weight instead (LoraConfig(target_parameters=['{parent_path.rpartition('.')[2]}.weight']))"
            )
        path, child = parent_path, parent
    return path


def _family(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _parent(model: torch.nn.Module, path: str) -> tuple[str, torch.nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return parent_path, model.get_submodule(parent_path) if parent_path else model, attr


def _arg_index(module: torch.nn.Module, names: tuple[str, ...]) -> tuple[int, str] | None:
    """Position (after ``self``) and name of the first forward parameter named in ``names``."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    for i, name in enumerate(params):
        if name in names:
            return i, name
    return None


def experts_ids_argument(experts: torch.nn.Module) -> tuple[int, str] | None:
    """Position and name of the ids argument of an experts module's forward (for verify=True).

    A PEFT-wrapped experts module (LoRA on its weights: ``ParamWrapper``) answers for the module it
    wraps: the wrapper passes its arguments through to it unchanged, so a pre-hook on either sees
    the ids at the same position.
    """
    return _arg_index(base_module(experts), _EXPERTS_ID_ARGS)


def _iter_outputs_hint(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor {tuple(output.shape)}"
    if isinstance(output, tuple):
        return (
            "("
            + ", ".join(
                _iter_outputs_hint(o) if isinstance(o, (torch.Tensor, tuple)) else type(o).__name__ for o in output
            )
            + ")"
        )
    return type(output).__name__


def claims(model: Any) -> bool:
    """A transformers ``PreTrainedModel`` (imports nothing when transformers is not loaded).

    A PEFT ``PeftModel`` is claimed too, so that :func:`discover` can say which module to attach.
    """
    if (type(model).__module__ or "").startswith("transformers.") or _is_peft_model(model):
        return True
    tf = sys.modules.get("transformers")
    pretrained = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    return pretrained is not None and isinstance(model, pretrained)


def discover(model: torch.nn.Module) -> Discovery:
    """Find the MoE routers of a transformers model, in forward order.

    Args:
        model: a ``transformers.PreTrainedModel`` with MoE layers.

    Returns:
        The replayable routers (global layer ids, specs), the skipped hash routers, and per layer
        whether ``verify=True`` can see what its experts receive.

    Raises:
        UnsupportedModelError: no router declared / found; a PEFT ``PeftModel`` (attach its
            ``get_base_model()``).
        UnsupportedRouterError: a router of a family listed in ``REFUSED``, or one whose routing
            math ``hf_specs`` cannot reproduce; the message names the family and the reason.
    """
    _refuse_peft(model)
    family = _family(model)
    routers = _supported_routers(model, family)
    config = getattr(model, "config", None)
    layers, skipped = [], []
    for path, router in routers:
        cls_name = _class_name(router)
        if cls_name in _HASH_ROUTERS:
            skipped.append((path, hf_specs.SKIPPED[cls_name]))
            continue
        layers.append(_moe_layer(model, config, path, router, family))

    if not layers:
        raise UnsupportedModelError(
            f"{family}: every router is a hash router ({[p for p, _ in skipped]}); nothing to replay"
        )
    if any(_in_attention(model, m.path) for m in layers):
        # Module order lists decoder layer i's MLP router before its attention router (JetMoE
        # registers ``mlp`` first); the forward calls attention first. Keep the layers in forward order.
        layers.sort(key=lambda m: (layer_id_of(m.path), not _in_attention(model, m.path)))
    verifiable = tuple(_verifiable(model, m) for m in layers)
    return Discovery(layers=tuple(layers), skipped=tuple(skipped), verifiable=verifiable)


def _refuse_peft(model: torch.nn.Module) -> None:
    """Refuse a PEFT ``PeftModel``: the model to attach is the transformers model it wraps."""
    if _is_peft_model(model):
        raise UnsupportedModelError(
            f"{type(model).__module__}.{type(model).__qualname__} is a PEFT wrapper, not the transformers model; "
            "attach the model it wraps: routereplay.attach(peft_model.get_base_model()) (LoRA layers, routers' "
            "included, are seen through there)"
        )


def _supported_routers(model: torch.nn.Module, family: str) -> list[tuple[str, torch.nn.Module]]:
    """The model's router instances (path, module), none of them of a ``REFUSED`` class.

    A declared router class listed in ``REFUSED`` is refused whether or not this config
    instantiated MoE layers; then every instance found is checked too. No router found at all is
    an ``UnsupportedModelError`` naming the classes looked for.
    """
    classes, _ = _declared_router_classes(model)
    for cls in classes:  # refused whether or not this config instantiated MoE layers
        reason = REFUSED.get(cls.__name__)
        if reason is not None:
            paths = [p for p, m in model.named_modules() if isinstance(m, cls)]
            where = f"router {paths[0]}" if paths else "router class"
            raise UnsupportedRouterError(f"{family}: {where} ({cls.__name__}) is not supported: {reason}")
    routers = find_routers(model)
    if not routers:
        classes, names = _declared_router_classes(model)
        declared = [c.__name__ for c in classes] + names or "none declared"
        raise UnsupportedModelError(
            f"{family} ({type(model).__name__}): no MoE router found; looked for instances of the classes "
            f"declared in _can_record_outputs['router_logits'] ({declared})"
        )
    for path, router in routers:
        reason = REFUSED.get(_class_name(router))
        if reason is not None:
            raise UnsupportedRouterError(f"{family}: router {path} ({_class_name(router)}) is not supported: {reason}")
    return routers


def _moe_layer(model: torch.nn.Module, config: Any, path: str, router: torch.nn.Module, family: str) -> MoELayer:
    """The replayable layer of the (non-hash) router at ``path``: its spec, global layer id and sizes.

    The path is the block-facing one; a router of an attention MoE block takes layer id
    ``num_hidden_layers + i``.
    """
    cls_name = _class_name(router)
    try:
        spec = hf_specs.router_math(router, _text_config(config, router)).spec
    except UnsupportedRouterError as e:
        raise UnsupportedRouterError(f"{family}: router {path} ({cls_name}) is not supported: {e}") from e
    path = _block_facing_path(model, path, router, family)
    layer_id = layer_id_of(path)
    if _in_attention(model, path):
        layer_id += _num_hidden_layers(config, router, path, family)
    top_k, num_experts = _sizes(spec, router, path, family)
    return MoELayer(
        layer_id=layer_id, path=path, router_class=cls_name, num_experts=num_experts, top_k=top_k, spec=spec
    )


def _verifiable(model: torch.nn.Module, layer: MoELayer) -> bool:
    """Whether ``verify=True`` can see the ids the layer's experts receive (a known ids argument)."""
    experts = getattr(_parent(model, layer.path)[1], "experts", None)
    experts = base_module(experts) if isinstance(experts, torch.nn.Module) else experts
    return isinstance(experts, torch.nn.Module) and experts_ids_argument(experts) is not None


def install(model: torch.nn.Module, discovery: Discovery, calls: RouterCalls) -> list:
    """Hook the routers of ``discovery.layers`` on their instances; return the undo callables."""
    family = _family(model)
    removers: list = []
    try:
        for index, layer in enumerate(discovery.layers):
            router = base_module(model.get_submodule(layer.path))
            rmath = hf_specs.router_math(router, _text_config(getattr(model, "config", None), router))
            _install(calls, removers, model, index, layer, router, rmath, family)
    except BaseException:
        for remove in reversed(removers):
            remove()
        raise
    return removers


def _in_attention(model: torch.nn.Module, path: str) -> bool:
    """Whether the router at ``path`` routes attention heads (its MoE block is an attention MoE)."""
    return type(_parent(model, path)[1]).__name__ in _ATTENTION_MOE_BLOCKS


def _num_hidden_layers(config: Any, router: torch.nn.Module, path: str, family: str) -> int:
    n = getattr(_text_config(config, router), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise UnsupportedModelError(
            f"{family}: router {path} routes attention heads, whose layer id is num_hidden_layers + i, "
            f"but the config has no int num_hidden_layers (found {n!r})"
        )
    return n


def _text_config(config: Any, router: torch.nn.Module) -> Any:
    """The config the router was built from (multimodal models nest a text config)."""
    router_config = getattr(router, "config", None)
    if router_config is not None:
        return router_config
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _sizes(spec: Any, router: torch.nn.Module, path: str, family: str) -> tuple[int, int]:
    top_k = getattr(spec, "top_k", None)
    # the id range: LongCat's zero-computation experts are ids too
    num_experts = getattr(spec, "num_logits", None) or getattr(spec, "num_experts", None)
    if top_k is None:
        top_k = getattr(router, "top_k", None)
    if num_experts is None:
        num_experts = getattr(router, "num_experts", None)
    if not isinstance(top_k, int) or not isinstance(num_experts, int):
        raise UnsupportedRouterError(
            f"{family}: router {path} ({_class_name(router)}): cannot read top_k / num_experts "
            f"(found top_k={top_k!r}, num_experts={num_experts!r})"
        )
    return top_k, num_experts


def _route_kw(spec, rmath, router, args, kwargs, input_dtype) -> dict[str, Any]:
    """Per-call inputs of ``routing.route``, read from the live call (buffers may have moved)."""
    kw: dict[str, Any] = {}
    if spec.uses_bias:
        kw["bias_E"] = rmath.bias(router, args, kwargs)
    if spec.uses_expert_scale:
        kw["expert_scale_E"] = rmath.expert_scale(router)
    if spec.weights_dtype == "input":
        kw["out_dtype"] = input_dtype
    return kw


def _input_dtype(args, kwargs, fallback: torch.Tensor) -> torch.dtype:
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden.dtype if isinstance(hidden, torch.Tensor) else fallback.dtype


def _install(calls: RouterCalls, removers: list, model, index: int, layer: MoELayer, router, rmath, family) -> None:
    """Hook one MoE layer: its batch shape (first layer only), its experts' ids, then its router seam."""
    parent_path, block, _ = _parent(model, layer.path)
    _hook_batch_shape(calls, removers, model, index, parent_path, block)
    _hook_experts(calls, index, block)
    seam = _Seam(calls=calls, removers=removers, index=index, layer=layer, router=router, rmath=rmath,
                 family=family, block=block)  # fmt: skip
    _SEAMS.get(layer.router_class, _seam_generic)(seam)


def _hook_batch_shape(calls: RouterCalls, removers: list, model, index: int, parent_path: str, block) -> None:
    """Report the batch shape [B, S] of every forward (and its packing) from the first MoE block's input.

    Every MoE layer of a forward sees the same shape, so only the first one (in forward order)
    carries the hook: one hook fewer per layer on the decode hot path.
    A padding-free packed batch ([1, T], several sequences, no attention mask) names its
    sequences in the model's inputs: position_ids restarting at 0, or flash-attention's varlen
    cu_seq_lens_q. The model's pre-hook keeps them for the first MoE block's report.
    The forward's own attention mask goes to the report too: the mask given to replay / trace
    is checked against it. Kept for one report only (a forward of a submodule does not pass
    through the model's pre-hook).
    """
    packing: dict[str, Any] = {}
    mask_arg = _arg_index(model, ("attention_mask",))

    def model_pre_hook(module, args, kwargs):
        if module is not model:
            return
        packing.clear()
        mask = kwargs.get("attention_mask")
        if mask is None and mask_arg is not None and len(args) > mask_arg[0]:
            mask = args[mask_arg[0]]
        packing["attention_mask"] = mask
        if mask is None:
            packing["position_ids"] = kwargs.get("position_ids")
            packing["cu_seqlens"] = kwargs.get("cu_seq_lens_q")

    def block_pre_hook(module, args, kwargs):
        if module is not shape_module:
            return  # a deepcopy of the attached model carries this hook: not ours to report
        hidden = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor) and hidden.ndim >= 2:
            calls.on_block_input(index, hidden.shape[:-1], **packing)
        packing.clear()

    # An attention MoE block is never called through forward: its input shape is the attention's.
    shape_module = _parent(model, parent_path)[1] if type(block).__name__ in _ATTENTION_MOE_BLOCKS else block
    if index == 0 and shape_module is not model:
        h = shape_module.register_forward_pre_hook(block_pre_hook, with_kwargs=True)
        removers.append(h.remove)
        h = model.register_forward_pre_hook(model_pre_hook, with_kwargs=True)
        removers.append(h.remove)


def _hook_experts(calls: RouterCalls, index: int, block) -> None:
    """Offer the core a hook that reports the ids the block's experts receive (for verify=True and
    dispatch observers), where their forward names them; the core installs it only while it is read."""
    experts = getattr(block, "experts", None)
    experts = base_module(experts) if isinstance(experts, torch.nn.Module) else experts
    pos = experts_ids_argument(experts) if isinstance(experts, torch.nn.Module) else None
    if pos is None:
        return
    arg_index, arg_name = pos

    def experts_pre_hook(module, args, kwargs):
        if module is not experts:
            return  # a deepcopy's experts
        ids = args[arg_index] if len(args) > arg_index else kwargs.get(arg_name)
        if isinstance(ids, torch.Tensor):
            calls.on_experts(index, ids)

    def start() -> Callable[[], None]:
        return experts.register_forward_pre_hook(experts_pre_hook, with_kwargs=True).remove

    calls.watch_experts(index, start)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Seam:
    """What an installer needs to intercept one router: the handle's calls, where to put the undo
    callables, the layer (index in the discovery, spec), the router instance and its MoE block."""

    calls: RouterCalls
    removers: list
    index: int
    layer: MoELayer
    router: torch.nn.Module
    rmath: Any
    family: str
    block: torch.nn.Module

    def route_kw(self, args, kwargs, logits_NE: torch.Tensor) -> dict[str, Any]:
        return _route_kw(self.layer.spec, self.rmath, self.router, args, kwargs, _input_dtype(args, kwargs, logits_NE))

    def has_route_kw(self) -> bool:
        """Whether ``routing.route`` needs per-call inputs besides the logits for this router (a
        bias, an expert scale, the input's dtype); when not, :meth:`route_kw` is always empty."""
        spec = self.layer.spec
        return spec.uses_bias or spec.uses_expert_scale or spec.weights_dtype == "input"

    def answer_from_logits(self, args, kwargs, logits_NE: torch.Tensor, live_weights_NK: torch.Tensor | None = None):
        """For a router whose output does not hold the ids the trace needs: live ids from
        ``routing.route``, then the handle's answer. Returns ``(weights_NK, ids_NK, live_ids_NK)``;
        ``ids_NK is live_ids_NK`` when the router's own output stands. ``live_weights_NK`` (default:
        route's) is what the handle sees as the live weights."""
        kw = self.route_kw(args, kwargs, logits_NE)
        with torch.no_grad():
            live_w, live_ids = routing.route(logits_NE.detach(), self.layer.spec, validate=False, **kw)
        live_w = live_w if live_weights_NK is None else live_weights_NK
        weights_NK, ids_NK = self.calls.on_router(self.index, logits_NE, live_w, live_ids, **kw)
        return weights_NK, ids_NK, live_ids

    def hook(self, fn) -> None:
        """Run ``fn(module, args, kwargs, output)`` on every output of the router, as a forward hook
        (with kwargs) would, its result replacing the output unless None; detach undoes it.

        It wraps the instance's ``forward`` instead of registering a module hook: a module with any
        hook takes ``nn.Module``'s slow call path for every MoE layer of every decode step; the
        wrapper (with two frames inlined in the handle) cut an attached, idle handle's cost per
        router call from +10.6-13.8 to +7.1-7.9 us on the 2-core CI CPU (``capture_block`` in
        ``benchmarks/bench_host_seam.py``, BENCHMARKS.md), several times that on the lent GPU hosts.
        Hooks others register on the router still run after the wrapped forward, on the answered
        output. An instance
        ``forward`` set over it after attach (a monkeypatch, a kernel library) bypasses it unless it
        calls it: that layer's record/replay then sees no forward, which the block refuses at exit.
        """
        router = self.router
        previous = router.__dict__.get("forward")  # an instance forward already there (accelerate's)

        def forward(module, *args, **kwargs):
            if module is not router:  # a deepcopy rebinds this method to the copy: the copy routes live
                return type(module).forward(module, *args, **kwargs)
            # the class's forward looked up per call, as nn.Module would: patched after attach, it runs
            output = type(module).forward(module, *args, **kwargs) if previous is None else previous(*args, **kwargs)
            answered = fn(module, args, kwargs, output)
            return output if answered is None else answered

        # a bound method, so that deepcopy rebinds it to the copy instead of calling into this router
        wrapped = types.MethodType(forward, router)
        router.forward = wrapped

        def remove() -> None:
            if router.__dict__.get("forward") is not wrapped:
                return  # wrapped again by someone else since: theirs stays (ours answers live once detached)
            if previous is None:
                del router.__dict__["forward"]
            else:
                router.forward = previous

        self.removers.append(remove)


def _seam_dbrx(seam: _Seam) -> None:
    """The router returns logits only; the top-k is the MoE block's ``route_tokens_to_experts``."""
    _install_method_seam(
        seam.calls, seam.removers, seam.block, "route_tokens_to_experts", seam.index, seam.layer.spec, seam.rmath,
        seam.router,
    )  # fmt: skip


def _seam_llama4(seam: _Seam) -> None:
    """The router returns ``(scores_NE, logits_NE)``: dense scores rebuilt at the answered ids."""
    calls, index, top_k = seam.calls, seam.index, seam.layer.top_k

    def llama4_hook(module, args, kwargs, output):
        scores_NE, logits_NE = output
        with torch.no_grad():
            ids_NK = torch.topk(logits_NE, top_k, dim=1).indices
        live_NK = scores_NE.gather(1, ids_NK)
        kw = seam.route_kw(args, kwargs, logits_NE)
        weights_NK, ids_NK = calls.on_router(index, logits_NE, live_NK, ids_NK, **kw)
        if weights_NK is live_NK:
            return output
        # Rebuild the dense scores with Llama4Router's own ops (sigmoid over the full [N, E]
        # row with -inf off the selection): sigmoid over the gathered [N, K] alone can differ
        # in the last bit on CPU (vectorised vs scalar tail). Same weights formula, same ids.
        top_NK = logits_NE.gather(1, ids_NK)
        masked_NE = torch.full_like(logits_NE, float("-inf")).scatter(1, ids_NK, top_NK)
        dense_NE = torch.nn.functional.sigmoid(masked_NE.float()).to(masked_NE.dtype)
        return dense_NE, logits_NE

    seam.hook(llama4_hook)


def _seam_zaya(seam: _Seam) -> None:
    """ZAYA's top-k may pick a skip class (id == num_experts); the router returns it as id 0 with
    weight 0, which a trace could not tell from expert 0. The hook therefore records and replays
    the unmasked ids from routing.route and applies the mask itself after."""
    calls, index, spec = seam.calls, seam.index, seam.layer.spec

    def zaya_hook(module, args, kwargs, output):
        if calls.routes_live(index):
            return None  # live and nothing to recompute: the router's own output stands
        logits_NE = output[0]
        weights_NK, ids_NK, live_ids = seam.answer_from_logits(args, kwargs, logits_NE, output[1])
        if ids_NK is live_ids:
            return None
        weights_NK, ids_NK = routing.mask_zero_experts(weights_NK, ids_NK, spec)
        return (logits_NE, weights_NK.to(output[1].dtype), ids_NK, *output[3:])

    seam.hook(zaya_hook)


def _seam_jetmoe(seam: _Seam) -> None:
    """The gating returns flattened, expert-sorted routing plus the logits (last): the top-k ids come
    from the logits, and under record / replay all four routing outputs are rebuilt from the
    answered ``(weights, ids)`` with the gating's own ops."""
    calls, index = seam.calls, seam.index
    top_k, num_experts = seam.layer.top_k, seam.layer.num_experts

    def jetmoe_hook(module, args, kwargs, output):
        if calls.routes_live(index):
            return None  # live and nothing to recompute: the gating's own output stands
        logits_NE = output[4]
        weights_NK, ids_NK, live_ids = seam.answer_from_logits(args, kwargs, logits_NE)
        if ids_NK is live_ids:
            return None
        # JetMoeTopKGating.forward's own ops after its top-k, on the answered (weights, ids).
        hits_NE = torch.zeros([ids_NK.shape[0], num_experts], dtype=weights_NK.dtype, device=weights_NK.device)
        expert_size = hits_NE.scatter(1, ids_NK, 1).long().sum(0).tolist()
        _, index_sorted_experts = ids_NK.flatten().sort(0)
        batch_index = index_sorted_experts.div(top_k, rounding_mode="trunc")
        batch_gates = weights_NK.flatten()[index_sorted_experts]
        return index_sorted_experts, batch_index, batch_gates, expert_size, logits_NE

    seam.hook(jetmoe_hook)


def _seam_generic(seam: _Seam) -> None:
    """The common pattern: the router returns ``(logits_NE, weights_NK, ids_NK, ...)``; the hook
    replaces ``weights`` and ``ids`` with the handle's answer."""
    calls, index, layer = seam.calls, seam.index, seam.layer
    upcast = seam.rmath.upcast_weights
    per_call_kw = seam.has_route_kw()  # else route_kw is always empty: no call per router call for it

    def router_hook(module, args, kwargs, output):
        if not isinstance(output, tuple) or len(output) < 3:
            raise UnsupportedRouterError(
                f"{seam.family}: router {layer.path} ({layer.router_class}) returned {_iter_outputs_hint(output)}; "
                "expected (router_logits, weights, ids)"
            )
        logits_NE, weights_NK, ids_NK = output[:3]
        kw = seam.route_kw(args, kwargs, logits_NE) if per_call_kw else {}
        new_w, new_ids = calls.on_router(index, logits_NE, weights_NK, ids_NK, **kw)
        if new_w is weights_NK and new_ids is ids_NK:
            return None
        if upcast and new_w.dtype != weights_NK.dtype:
            new_w = new_w.to(weights_NK.dtype)  # proven exact by inference (e.g. rounded to bf16, returned fp32)
        return (logits_NE, new_w, new_ids, *output[3:])

    seam.hook(router_hook)


# Router class -> its installer, where the router does not return (logits, weights, ids) or the
# answer must be rebuilt into the router's own outputs; every other class takes _seam_generic.
# hf_specs.FAMILY_SEAMS names the same classes (a test holds them equal).
_SEAMS: dict[str, Any] = {
    "DbrxRouter": _seam_dbrx,
    "Llama4Router": _seam_llama4,
    "ZayaRouter": _seam_zaya,
    "JetMoeTopKGating": _seam_jetmoe,
}


def _install_method_seam(
    calls: RouterCalls, removers: list, block: torch.nn.Module, name: str, index: int, spec, rmath, router
) -> None:
    """Wrap ``block.<name>(logits) -> (weights, ids)`` on the instance only."""
    original = getattr(block, name)
    had_instance_attr = name in block.__dict__

    def wrapped(self, router_logits_NE, *args, **kwargs):
        if self is not block:  # a deepcopy rebinds this method to the copy: the copy routes live
            return getattr(type(self), name)(self, router_logits_NE, *args, **kwargs)
        weights_NK, ids_NK = original(router_logits_NE, *args, **kwargs)
        kw = _route_kw(spec, rmath, router, (router_logits_NE,), {}, router_logits_NE.dtype)
        return calls.on_router(index, router_logits_NE, weights_NK, ids_NK, **kw)

    # a bound method, so that deepcopy rebinds it to the copy instead of calling into this block
    setattr(block, name, types.MethodType(wrapped, block))

    def remove() -> None:
        if had_instance_attr:
            setattr(block, name, original)
        else:
            block.__dict__.pop(name, None)

    removers.append(remove)


def iter_families() -> Iterator[str]:
    """Model types of the installed transformers whose models declare a ``router_logits`` source."""
    tf = _require_transformers()
    root = importlib.util.find_spec("transformers.models").submodule_search_locations[0]
    import pathlib

    for d in sorted(pathlib.Path(root).iterdir()):
        for f in d.glob("modeling_*.py"):
            if '"router_logits"' in f.read_text(errors="ignore"):
                yield d.name
                break
    del tf
