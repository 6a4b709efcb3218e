"""The seam between the engine-neutral core and an engine adapter.

An adapter (``routereplay.adapters.hf``, ``routereplay.adapters.megatron``, ...) is a module that
knows one engine's MoE layers. It implements :class:`Adapter` and nothing else; the core never
imports an adapter, and an adapter never imports ``routereplay.runtime.session``. The data flows one way:

1. ``attach(model)`` asks each adapter, in the order of the ``routereplay.adapters`` entry points,
   whether it :meth:`Adapter.claims` the model;
2. the claiming adapter :meth:`Adapter.discover`\\ s the MoE layers: a :class:`Discovery` of
   :class:`MoELayer` records (global layer id, module path, ``RouterSpec``), in forward order;
3. the core builds the handle and passes its :class:`RouterCalls` to :meth:`Adapter.install`, which
   intercepts the module *instances* (hooks, instance attributes; never library classes) and
   returns the callables that undo each interception;
4. at run time every intercepted router call goes to :meth:`RouterCalls.on_router` with the live
   ``(logits, weights, ids)``; the adapter hands the experts whatever ``(weights, ids)`` it returns.

Activation recompute needs nothing from an adapter: ``on_router`` recognises a call made while a
checkpointed region is recomputed and answers with the ids of that region's own forward
(``routereplay.runtime.recompute``).

Legend: N rows a router sees in one call, E experts (logits width), K top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from routereplay.core.errors import UnsupportedModelError

__all__ = ["Adapter", "Discovery", "MoELayer", "RouterCalls"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MoELayer:
    """One replayable router of the model.

    Args:
        layer_id: global layer id: the decoder-layer index (dense layers count, so DeepSeek's first
            MoE layer after ``first_k_dense_replace=3`` has id 3). Adapters document any other id
            space they use (HF: attention routers ``num_hidden_layers + i``; Megatron: MTP).
        path: module path of the router (``model.layers.3.mlp.gate``).
        router_class: class name of the router module.
        num_experts: the range of expert ids the router can pick (its logits width: LongCat's
            zero-computation experts count).
        top_k: experts per token.
        spec: the ``routereplay.core.routing.RouterSpec`` that recomputes the gate weights.
    """

    layer_id: int
    path: str
    router_class: str
    num_experts: int
    top_k: int
    spec: Any


@dataclass(frozen=True, kw_only=True, slots=True)
class Discovery:
    """What an adapter found in a model.

    Args:
        layers: the replayable routers, in forward order; a trace's columns follow this order.
        skipped: ``(path, reason)`` of routers found but deliberately left out of traces (e.g.
            DeepSeek-V4 hash routers, whose experts are a function of the token id).
        verifiable: per layer, whether the adapter can see the ids the experts module receives
            (``replay(verify=True)`` needs it on every layer). Default: none.
    """

    layers: tuple[MoELayer, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    verifiable: tuple[bool, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.layers:
            raise UnsupportedModelError("no replayable MoE router found")
        if self.verifiable and len(self.verifiable) != len(self.layers):
            raise ValueError(f"verifiable has {len(self.verifiable)} entries for {len(self.layers)} layers")


@runtime_checkable
class RouterCalls(Protocol):
    """What the core offers the interception an adapter installs. ``index`` is the position of
    the layer in ``Discovery.layers``."""

    def on_router(
        self,
        index: int,
        logits_NE: torch.Tensor,
        weights_NK: torch.Tensor,
        ids_NK: torch.Tensor,
        **route_kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The live router output in, the ``(weights_NK, ids_NK)`` the experts must use out.

        Returns the live tensors themselves (``is``) when the router's own output stands, so an
        adapter can skip rebuilding its outputs. ``route_kw`` are the per-call inputs of
        ``routing.route`` besides the logits (``bias_E``, ``expert_scale_E``, ``out_dtype``), read
        by the adapter from the live call.
        """
        ...

    def routes_live(self, index: int) -> bool:
        """True when a call of layer ``index`` made now would keep the router's own output (no
        record/replay block active, nothing to recompute): an adapter whose live ids are costly
        to extract may then skip calling :meth:`on_router`. Advisory: calling it anyway is exact."""
        ...

    def on_block_input(
        self,
        index: int,
        shape: Sequence[int],
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        """The MoE block's input shape without the hidden dim (``[B, S]``), before its router runs.
        Adapters report it for the first MoE layer only; it names the batch a trace row belongs to.

        An adapter that sees the forward's own ``[B, S]`` attention mask passes it: the mask given
        to ``replay``/``prepare``/``trace`` is checked against it (padding on the other side puts
        the routes on the wrong tokens).

        For a padding-free packed batch (``[1, T]`` holding several sequences, no attention mask)
        the adapter also passes what names its sequences: ``position_ids`` ``[1, T]`` restarting
        at 0 at each sequence, or the varlen boundaries ``cu_seqlens`` ``[B+1]``."""
        ...

    def on_experts(self, index: int, ids_NK: torch.Tensor) -> None:
        """The ids the experts module of layer ``index`` received (for ``replay(verify=True)``)."""
        ...

    def watch_experts(self, index: int, start: Callable[[], Callable[[], None]]) -> None:
        """Offered at install by an adapter that can see what layer ``index``'s experts module
        receives: ``start()`` intercepts the experts (reporting to :meth:`on_experts`) and returns
        the undo. The core starts it only while something reads those ids (a verifying replay, a
        dispatch observer) and undoes it after, and at detach: the experts' forward carries no
        interception on the hot path otherwise."""
        ...


class Adapter(Protocol):
    """An engine adapter: a module (or object) with these members, registered as an entry point
    in the ``routereplay.adapters`` group (``hf = "routereplay.adapters.hf"``)."""

    NAME: str

    def claims(self, model: Any) -> bool:
        """Whether this adapter handles ``model``. Must not import the engine unless ``model``
        could be one of its models (check ``type(model).__module__`` first)."""
        ...

    def discover(self, model: Any, **options: Any) -> Discovery:
        """Find the MoE layers. Raises UnsupportedModelError / UnsupportedRouterError with the reason."""
        ...

    def install(self, model: Any, discovery: Discovery, calls: RouterCalls) -> list[Callable[[], None]]:
        """Intercept the routers of ``discovery.layers`` on their instances; return the undo
        callables (run in reverse order by ``detach``). On failure, undo what was installed and raise."""
        ...
