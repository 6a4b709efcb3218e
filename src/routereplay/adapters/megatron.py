"""Megatron-Core adapter: replay at the top-k of every ``TopKRouter`` instance.

Importing this module is the opt-in to megatron-core (``pip install 'routereplay[megatron]'``);
it is written for megatron-core 0.16.1 to 0.19.x and implements :class:`routereplay.runtime.seam.Adapter`.

The seam. ``TopKRouter.routing`` hands its ``router_replay`` attribute to
``topk_routing_with_score_function``, which asks ``router_replay.get_replay_topk(scores, ...)`` for
the top-k and then runs the rest of Megatron's math on the answer (gather, softmax / sigmoid
renormalisation, scaling, the dense ``[N, E]`` probs and routing map, aux losses, expert-bias
counts). :func:`install` puts, on each router *instance*, a per-handle :class:`_TopKSeam` in that
attribute and wraps the instance's ``routing`` method to see its logits:

    routing(logits_SBE)                 the wrapper keeps logits_NE (a view in the graph)
      topk_routing_with_score_function(logits_NE, router_replay=_TopKSeam)
        _TopKSeam.get_replay_topk(scores_NE)
          live = Megatron's own RouterReplay (if the config built one) or the plain top-k
          (weights, ids) = calls.on_router(index, logits_NE, *live)
          return scores_NE.gather(1, ids), ids     # exactly what Megatron's REPLAY_FORWARD does

So a replayed router gives what Megatron's own ``RouterReplay`` gives when forced with the same
ids, bit for bit: everything after the top-k is Megatron's code on Megatron's tensors. The weights
``on_router`` returns are not used (they equal Megatron's, ``tests/test_megatron_cpu.py`` proves it
per score function and version); the ``RouterSpec`` still describes the router exactly, for the
rows a replay routes live and for anyone computing weights offline.

Megatron's own replay keeps working beside a handle: its ``RouterReplay`` instance stays in its
process-global list and is still asked for the live top-k (so its RECORD / REPLAY_* actions and
FIFO advance exactly as without routereplay); routereplay then records or overrides that answer.
Nothing reads or writes the global list. ``detach`` restores both instance attributes.

Layer ids. Decoder routers: the global decoder-layer number, 0-based (``layer_number - 1``; the
pipeline and virtual-pipeline offsets are in ``layer_number``, dense layers keep their numbers and
have no router). MTP routers (multi-token prediction, DeepSeek-V3): ``num_layers + d`` for MTP
depth ``d`` (0-based), i.e. the ids right after the decoder's, which never collide with a decoder
layer. This is what megatron-core 0.16 numbers them itself; 0.19 restarts MTP layers at 1 and the
adapter maps them back. A trace of an engine that serves the MTP head has ``num_layers + d`` too.

Refused at attach, with the reason (never replayed silently live): the fused router
(``moe_router_fusion``: its top-k never reaches the hook), sinkhorn and quantile-balancing
routing (their top-k bypasses the hook), token dropping (``moe_expert_capacity_factor``: the drop
decision is taken after the top-k from live capacities and is not part of a top-k trace, so a
replay could not reproduce the recorded dispatch), the benchmark options that replace the logits
with random values, MTP with ``mtp_use_repeated_layer`` (one router called once per depth, so one
router would need several trace layers), and ``InferenceTopKRouter`` (a ``torch.compile``'d
inference path). At run time, a routing call whose top-k did not pass through the hook raises.

Row order. Megatron's router sees its input as ``[S, B, H]`` and flattens it, so router row
``s * B + b`` is token ``s`` of sequence ``b`` (THD packing: ``B = 1``, rows = packed tokens). The
adapter reports every forward as one block of ``S * B`` rows (``on_block_input(0, (1, S * B))``):
a recorded trace holds router rows in router order, and :mod:`routereplay.parallel` converts
between them and sequences (it also cuts a global trace into what each rank's routers see).

Legend: N router rows of one call (S * B), E experts, K top-k, S sequence length, B batch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from routereplay.core.errors import NoMoELayersError, UnsupportedModelError, UnsupportedRouterError
from routereplay.core.routing import RouterSpec
from routereplay.runtime.seam import Discovery, MoELayer, RouterCalls

__all__ = ["NAME", "claims", "discover", "install", "megatron_version", "router_layer_id", "router_spec"]

NAME = "megatron"

# Load-balancing types whose top-k goes through ``router_replay.get_replay_topk``.
_HOOKED_ROUTING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
_REFUSED_CLASSES = {
    "InferenceTopKRouter": "its torch.compile'd inference path returns [N, K] tensors without the replay hook",
}
_INSTALL_HINT = "pip install 'routereplay[megatron]'"


def _require_megatron():
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise ImportError(f"routereplay.adapters.megatron needs megatron-core: {_INSTALL_HINT}")
    return importlib.import_module("megatron.core")


def megatron_version() -> tuple[int, int, int]:
    """``(major, minor, patch)`` of the installed megatron-core."""
    _require_megatron()
    info = importlib.import_module("megatron.core.package_info")
    return tuple(int(v) for v in (info.MAJOR, info.MINOR, info.PATCH))  # type: ignore[return-value]


def _chunks(model: Any) -> list[Any]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def claims(model: Any) -> bool:
    """A megatron-core module (``GPTModel``, a wrapper such as ``Float16Module`` / DDP), or a
    non-empty list of them (virtual-pipeline model chunks)."""
    chunks = _chunks(model)
    return bool(chunks) and all(
        isinstance(c, torch.nn.Module) and (type(c).__module__ or "").startswith("megatron.") for c in chunks
    )


def router_spec(config: Any, *, version: tuple[int, int, int] | None = None) -> RouterSpec:
    """The :class:`RouterSpec` of a ``TopKRouter`` built from ``config`` (a ``TransformerConfig``).

    Mirrors ``moe_utils.topk_routing_with_score_function`` field by field: softmax before or after
    the top-k (``moe_router_pre_softmax``); sigmoid / sqrt-softplus scores renormalised with eps
    1e-20 when ``topk > 1``; the expert bias added to the scores for the selection only;
    group-limited top-k (``moe_router_num_groups`` / ``moe_router_group_topk``, group score = sum of
    the top ``topk // group_topk`` scores, dropped groups at -inf); ``moe_router_topk_scaling_factor``.
    Precision by version: up to 0.17 the scores are cast back to the logits dtype right after the
    score function; from 0.18 everything runs in fp32 and only the final weights are cast.

    Args:
        config: the router's ``TransformerConfig`` (``router.config``).
        version: megatron-core version the router runs under (default: the installed one).

    Returns:
        The spec (``family="megatron"``).

    Raises:
        UnsupportedRouterError: a score function or group setting the spec cannot express.
    """
    version = megatron_version() if version is None else tuple(version)
    num_experts, top_k = config.num_moe_experts, config.moe_router_topk
    score = config.moe_router_score_function
    known = ("softmax", "sigmoid") if version < (0, 18) else ("softmax", "sigmoid", "sqrtsoftplus")
    if score not in known:
        raise UnsupportedRouterError(
            f"moe_router_score_function={score!r} is not one megatron-core {'.'.join(map(str, version))} "
            f"routes with (expected one of {known})"
        )
    group: dict[str, Any] = {}
    if config.moe_router_group_topk:
        if not config.moe_router_num_groups:
            raise UnsupportedRouterError(
                f"moe_router_group_topk={config.moe_router_group_topk} needs moe_router_num_groups, found "
                f"{config.moe_router_num_groups!r}"
            )
        group = {
            "n_group": config.moe_router_num_groups,
            "topk_group": config.moe_router_group_topk,
            "group_score_topn": top_k // config.moe_router_group_topk,
            "group_mask_value": float("-inf"),
        }
    fp32_era = version >= (0, 18)
    precision: dict[str, Any] = {
        "compute_dtype": torch.float32,
        "cast_scores": not fp32_era,
        "weights_dtype": "logits" if fp32_era else "keep",
    }
    if score == "softmax":
        behaviour: dict[str, Any] = {"score_before_topk": bool(config.moe_router_pre_softmax)}
    else:
        behaviour = {
            "score_before_topk": True,
            "norm_topk_prob": top_k > 1,
            "norm_eps": 1e-20,
            "uses_bias": bool(config.moe_router_enable_expert_bias),
            "bias_on": "scores",
        }
    try:
        return RouterSpec(
            num_experts=num_experts,
            top_k=top_k,
            score_function=score,
            scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0),
            topk_sorted=True,
            family="megatron",
            **behaviour,
            **group,
            **precision,
        )
    except ValueError as e:
        raise UnsupportedRouterError(f"megatron router config cannot be replayed: {e}") from e


def _refusal(router: Any, config: Any, version: tuple[int, int, int], in_mtp: bool) -> str | None:
    """Why this router's routing cannot be replayed exactly through the top-k hook, or None."""
    cls = type(router).__name__
    if cls in _REFUSED_CLASSES:
        return f"{cls}: {_REFUSED_CLASSES[cls]}"
    if getattr(config, "moe_router_fusion", False):
        return (
            "moe_router_fusion=True: the fused top-k (Transformer Engine) returns before Megatron's replay hook, "
            "so its experts cannot be replaced; build the model with moe_router_fusion=False"
        )
    routing_type = getattr(router, "routing_type", config.moe_router_load_balancing_type)
    types = routing_type if isinstance(routing_type, (list, tuple)) else [routing_type]
    bad = [t for t in types if t not in _HOOKED_ROUTING]
    if bad:
        return (
            f"moe_router_load_balancing_type={routing_type!r}: {bad[0]} routing picks its experts outside "
            f"the top-k hook; use one of {_HOOKED_ROUTING}"
        )
    if config.moe_expert_capacity_factor is not None:
        return (
            f"moe_expert_capacity_factor={config.moe_expert_capacity_factor}: token dropping decides after the "
            "top-k, from live expert capacities, which tokens an expert drops; a top-k trace does not hold that "
            "decision, so the recorded dispatch cannot be replayed; train dropless (capacity factor None)"
        )
    if getattr(config, "moe_router_force_load_balancing", False):
        return "moe_router_force_load_balancing=True replaces the router's logits with random values (benchmarking)"
    if getattr(config, "moe_router_force_biased", None) is not None:
        return "moe_router_force_biased adds a random bias to the router's logits (benchmarking)"
    if in_mtp and getattr(config, "mtp_use_repeated_layer", False):
        return (
            "mtp_use_repeated_layer=True calls one MTP layer once per depth, so one router would need "
            f"{config.mtp_num_layers} trace layers per forward"
        )
    return None


def _find_routers(model: Any) -> list[tuple[str, Any, Any | None]]:
    """``(path, router, mtp_layer)`` of every ``Router`` in module order; ``mtp_layer`` is the
    enclosing ``MultiTokenPredictionLayer`` (None for decoder routers). Paths of a chunk list
    start with the chunk index (``"1.decoder.layers.0.mlp.router"``)."""
    router_mod = importlib.import_module("megatron.core.transformer.moe.router")
    chunks = _chunks(model)
    found = []
    for c, chunk in enumerate(chunks):
        prefix = f"{c}." if isinstance(model, (list, tuple)) else ""
        mtp_at: list[tuple[str, Any]] = []
        for path, module in chunk.named_modules():
            if type(module).__name__ == "MultiTokenPredictionLayer":
                mtp_at.append((path + ".", module))
            if isinstance(module, router_mod.Router):
                mtp = next((m for p, m in mtp_at if path.startswith(p)), None)
                found.append((prefix + path, module, mtp))
    return found


def router_layer_id(router: Any, mtp_layer: Any | None, num_layers: int, path: str = "") -> int:
    """The routereplay layer id of a router (see the module docstring).

    Raises:
        UnsupportedModelError: no int ``layer_number``, or one outside the decoder's range.
    """
    where = f"router {path}" if path else f"router {type(router).__name__}"
    if mtp_layer is not None:
        depth = getattr(mtp_layer, "layer_number", None)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise UnsupportedModelError(
                f"{where}: its MultiTokenPredictionLayer has layer_number={depth!r}, expected Megatron's 1-based int"
            )
        return num_layers + depth - 1
    number = getattr(router, "layer_number", None)
    if isinstance(number, bool) or not isinstance(number, int):
        raise UnsupportedModelError(
            f"{where}: layer_number={number!r}; Megatron sets it (1-based) when the router's TransformerLayer is "
            "built. A router built outside a TransformerLayer has no decoder layer"
        )
    if not 1 <= number <= num_layers:
        raise UnsupportedModelError(
            f"{where}: layer_number={number} is outside the decoder's 1..{num_layers} (config.num_layers)"
        )
    return number - 1


def discover(model: Any, **options: Any) -> Discovery:
    """Find every ``TopKRouter`` of a megatron-core model (or list of virtual-pipeline chunks).

    Raises:
        NoMoELayersError: a pipeline stage (or chunk list) of an MoE model without any MoE layer.
        UnsupportedModelError: no router, a router without a layer number, two routers with one id.
        UnsupportedRouterError: a router whose routing cannot be replayed (the reason, see above).
        TypeError: an unknown option.
    """
    if options:
        raise TypeError(f"the megatron adapter takes no options, found {sorted(options)}")
    _require_megatron()
    version = megatron_version()
    router_mod = importlib.import_module("megatron.core.transformer.moe.router")
    what = type(model).__name__ if not isinstance(model, (list, tuple)) else f"{len(model)} model chunks"
    routers = _find_routers(model)
    if not routers:
        experts = [getattr(getattr(c, "config", None), "num_moe_experts", None) for c in _chunks(model)]
        if any(experts):
            raise NoMoELayersError(
                f"{what}: this pipeline stage holds no MoE layer (its layers are dense; the model has "
                f"{max(e for e in experts if e)} experts elsewhere): routereplay has nothing to record or replay on "
                "this rank; skip attach here (catch routereplay.core.errors.NoMoELayersError) and run this stage's "
                "forwards as they are, the MoE stages replay their own slice (routereplay.parallel.slice_for_rank)"
            )
        raise UnsupportedModelError(
            f"{what}: no MoE router found (no megatron.core.transformer.moe.router.Router instance); "
            "build the model with num_moe_experts set"
        )
    layers = []
    for path, router, mtp in routers:
        if not isinstance(router, router_mod.TopKRouter):
            raise UnsupportedRouterError(
                f"{what}: router {path} ({type(router).__name__}) is not a TopKRouter; only TopKRouter has the "
                "top-k hook the adapter replays through"
            )
        config = router.config
        reason = _refusal(router, config, version, mtp is not None)
        if reason is not None:
            raise UnsupportedRouterError(f"{what}: router {path} ({type(router).__name__}) is not supported: {reason}")
        try:
            spec = router_spec(config, version=version)
        except UnsupportedRouterError as e:
            raise UnsupportedRouterError(f"{what}: router {path}: {e}") from e
        layer_id = router_layer_id(router, mtp, config.num_layers, path)
        layers.append(
            MoELayer(
                layer_id=layer_id,
                path=path,
                router_class=type(router).__name__,
                num_experts=spec.num_experts,
                top_k=spec.top_k,
                spec=spec,
            )
        )
    seen: dict[int, str] = {}
    for m in layers:
        if m.layer_id in seen:
            raise UnsupportedModelError(
                f"{what}: routers {seen[m.layer_id]} and {m.path} both map to layer id {m.layer_id}; was one model "
                "chunk passed twice?"
            )
        seen[m.layer_id] = m.path
    # Forward order: decoder layers by number (virtual-pipeline chunks hold interleaved ranges),
    # then the MTP depths (ids num_layers + d).
    return Discovery(layers=tuple(sorted(layers, key=lambda m: m.layer_id)))


def _resolve(model: Any, path: str) -> Any:
    if isinstance(model, (list, tuple)):
        c, _, rest = path.partition(".")
        return model[int(c)].get_submodule(rest)
    return model.get_submodule(path)


class _TopKSeam:
    """Stands in a router's ``router_replay`` attribute while a handle is attached."""

    __slots__ = (
        "_calls",
        "_index",
        "_router",
        "_uses_bias",
        "_where",
        "asked",
        "layer_number",
        "logits_NE",
        "original",
    )

    def __init__(self, calls: RouterCalls, index: int, router: Any, original: Any, where: str, uses_bias: bool):
        self._calls = calls
        self._index = index
        self._router = router
        self._where = where
        self._uses_bias = uses_bias
        self.original = original  # Megatron's own RouterReplay of this router, or None
        self.logits_NE: torch.Tensor | None = None
        self.asked = False
        self.layer_number = getattr(original, "layer_number", None)  # 0.19's set_layer_number writes it

    def get_replay_topk(self, scores_NE, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        self.asked = True
        original = self.original
        if original is not None:
            live = original.get_replay_topk(scores_NE, topk, num_groups, group_topk, default_compute_topk)
        else:
            live = default_compute_topk(scores_NE, topk, num_groups, group_topk)
        if self._calls.routes_live(self._index):
            return live
        logits_NE = self.logits_NE
        if logits_NE is None:
            raise UnsupportedRouterError(
                f"{self._where}: the top-k hook was called outside TopKRouter.routing, so the router's logits are "
                "unknown; this megatron-core code path is not supported"
            )
        live_NK, live_ids_NK = live
        kw = {"bias_E": self._router.expert_bias} if self._uses_bias else {}
        _weights, ids_NK = self._calls.on_router(self._index, logits_NE, live_NK, live_ids_NK, **kw)
        if ids_NK is live_ids_NK:
            return live
        # Megatron's REPLAY_FORWARD, on the answered ids: everything after the top-k is Megatron's.
        return scores_NE.gather(1, ids_NK), ids_NK


def install(model: Any, discovery: Discovery, calls: RouterCalls) -> list[Callable[[], None]]:
    """Put a :class:`_TopKSeam` in each router's ``router_replay`` and wrap its ``routing``.

    Returns:
        The undo callables (run in reverse order): each restores one instance attribute exactly.
    """
    undo: list[Callable[[], None]] = []
    try:
        for index, layer in enumerate(discovery.layers):
            router = _resolve(model, layer.path)
            where = f"layer {layer.layer_id} ({layer.path})"
            seam = _TopKSeam(calls, index, router, router.__dict__.get("router_replay"), where, layer.spec.uses_bias)
            undo.append(_set_instance_attr(router, "router_replay", seam))
            undo.append(_set_instance_attr(router, "routing", _wrap_routing(router, seam, calls, index, where)))
    except BaseException:
        for u in reversed(undo):
            u()
        raise
    return undo


def _set_instance_attr(obj: Any, name: str, value: Any) -> Callable[[], None]:
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    obj.__dict__[name] = value

    def restore() -> None:
        if had:
            obj.__dict__[name] = old
        else:
            obj.__dict__.pop(name, None)

    return restore


def _wrap_routing(router: Any, seam: _TopKSeam, calls: RouterCalls, index: int, where: str) -> Callable[..., Any]:
    original = router.routing  # the bound method (or an earlier instance attribute)

    def routing(logits, *args, **kwargs):
        num_experts = logits.shape[-1]
        # A view the graph keeps (the call below goes through it), so the core can tie what it
        # keeps for this forward to the forward's autograd graph; no data moves.
        logits_NE = logits.reshape(-1, num_experts)
        if index == 0:
            calls.on_block_input(0, (1, logits_NE.shape[0]))
        live = calls.routes_live(index)
        seam.logits_NE, seam.asked = logits_NE, False
        try:
            out = original(logits_NE.view(logits.shape), *args, **kwargs)
        finally:
            seam.logits_NE = None
        if not seam.asked and not live:
            raise UnsupportedRouterError(
                f"{where}: TopKRouter.routing chose its experts without Megatron's top-k hook "
                "(router_replay.get_replay_topk), so nothing could be recorded or replayed; this megatron-core "
                "routing path is not supported"
            )
        return out

    return routing
