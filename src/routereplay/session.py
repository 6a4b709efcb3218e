"""Scoped record / replay sessions over the MoE routers of one model.

An adapter (``routereplay.adapters.hf``, ...) finds the routers of a model and installs hooks on
the module *instances* at the router -> experts seam. Every hook calls into one
:class:`RouterHandle`, which owns all state (no globals, no registries): two models attached in
one process never see each other's routes.

    handle = routereplay.attach(model)
    with handle.record() as rec:          # live routing, ids kept on device
        model(**batch)
    trace = rec.trace(attention_mask=batch["attention_mask"])
    with handle.replay(trace, attention_mask=batch["attention_mask"]) as rep:
        loss = model(**batch).loss        # the routers use the recorded experts,
        loss.backward()                   # gate weights recomputed from live logits
    handle.detach()                       # the model is exactly as before

Activation checkpointing needs no user action. A router call made while autograd runs a backward
pass (``torch._C._current_graph_task_id() != -1``) is an activation recompute: it is neither
recorded nor counted as a forward, and it is forced to the ids its own forward used. The handle
keeps, per layer, the ids of every forward run under a mode for as long as that forward's autograd
graph lives (a token in ``grad_fn.metadata``), so ``loss.backward()`` may run after the ``with``
block, or after several blocks. Forwards without a graph (the no_grad forward of reentrant
checkpointing) are kept until the next block starts; a live forward (no mode) through a layer
drops that layer's kept forwards, so run a block's backward before the next live forward. A recompute picks among the forwards of its layer with the same row count the
one whose router logits have the nearest checksum (``logits.sum()``, compared on the device, no
host sync), so the forward/backward order of micro-batches does not matter (FIFO, LIFO, 1F1B).
Assumption: the recompute reproduces the forward's router logits (the premise of activation
checkpointing itself); two live graphs of forwards with bit-identical router logits but different
ids are indistinguishable and the latest forward wins.

Legend (shape suffixes used in this file):
    T  tokens of a trace (packed, real tokens only)
    N  rows a router sees in one forward (B * S, padding included)
    L  MoE layers of the model, in ``handle.layers`` order
    K  top-k slots
    E  routed experts (router logits width)
    B  sequences (batch rows), S  padded sequence length
    C  candidate forwards of one layer (recompute matching)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from routereplay.errors import (
    LayerMismatchError,
    LayoutError,
    MissingRoutesError,
    ReplayError,
    ReplayVerificationError,
    RouterSpecError,
    TokenCountMismatchError,
    TraceExhaustedError,
    UnconsumedTraceError,
    UnsupportedModelError,
)
from routereplay.routing import groups_spanned
from routereplay.trace import RoutingTrace, expert_dtype

__all__ = [
    "LayerStats",
    "MoELayer",
    "Recording",
    "Replay",
    "RouterHandle",
    "attach",
]


def _in_backward() -> bool:
    """True while autograd executes a backward pass (an activation-checkpoint recompute)."""
    return torch._C._current_graph_task_id() != -1


@dataclass(frozen=True, kw_only=True, slots=True)
class MoELayer:
    """One replayable router of the model.

    Args:
        layer_id: global decoder-layer index (dense layers count, so DeepSeek's first MoE
            layer after ``first_k_dense_replace=3`` has id 3); a router inside attention (JetMoE)
            of decoder layer ``i`` has id ``num_hidden_layers + i`` (see ``adapters.hf``).
        path: module path of the router (``model.layers.3.mlp.gate``).
        router_class: class name of the router module.
        num_experts: the range of expert ids the router can pick (its logits width: LongCat's
            zero-computation experts count).
        top_k: experts per token.
        spec: the ``routereplay.routing.RouterSpec`` that recomputes the gate weights.
    """

    layer_id: int
    path: str
    router_class: str
    num_experts: int
    top_k: int
    spec: Any


@dataclass(frozen=True, kw_only=True, slots=True)
class LayerStats:
    """Replay statistics of one MoE layer, summed over the forwards of a replay block.

    ``disagreement`` counts replayed rows whose live top-k *set* differs from the forced set
    (how far the live policy drifted from the recorded one).
    """

    layer_id: int
    rows: int
    replayed: int
    live: int
    disagreement: int

    @property
    def coverage(self) -> float:
        """Fraction of rows that used recorded routes."""
        return self.replayed / self.rows if self.rows else 0.0

    @property
    def disagreement_rate(self) -> float:
        """``disagreement / replayed``: share of replayed rows the live router would route elsewhere."""
        return self.disagreement / self.replayed if self.replayed else 0.0


class _GraphToken:
    """Lives in the autograd graph of a forward (``grad_fn.metadata``): dies with the graph."""

    __slots__ = ("__weakref__",)


@dataclass(slots=True)
class _Forward:
    """What one forward of one layer used: kept so an activation recompute can use it again."""

    ids_NK: torch.Tensor  # int64, on the router's device
    mask_N: torch.Tensor | None  # rows forced (None: all)
    checksum: torch.Tensor  # 0-d float64 logits.sum(), on the router's device
    graph: weakref.ref | None  # None: built without a graph (reentrant checkpoint forward)

    def alive(self) -> bool:
        return self.graph is None or self.graph() is not None


@dataclass(slots=True)
class _MicroBatch:
    """One replay trace, validated and laid out in the router's row order."""

    rows: int  # N the routers must see
    forced_LNK: torch.Tensor  # int64
    mask_N: torch.Tensor | None  # rows that use the trace (None: every row)
    num_forced: int
    trace_tokens: int
    num_seqs: int
    padded: bool


# --- the handle ----------------------------------------------------------------------------
class RouterHandle:
    """Record / replay control over the MoE routers of one attached model.

    Built by an adapter's ``attach``; not constructed by users. All state lives here.

    Attributes:
        model: the attached model.
        layers: one :class:`MoELayer` per replayable router, in forward order.
        layer_ids: ``tuple(layer.layer_id for layer in layers)``: the layer ids a trace needs.
        skipped: ``(path, reason)`` for routers found but deliberately left out of traces
            (e.g. DeepSeek-V4 hash-routed layers, whose experts are a function of the token id).
    """

    def __init__(
        self,
        model: Any,
        layers: Sequence[MoELayer],
        *,
        adapter: str,
        skipped: Sequence[tuple[str, str]] = (),
        has_experts_hook: Sequence[bool] | None = None,
    ) -> None:
        if not layers:
            raise UnsupportedModelError(f"{type(model).__name__}: no replayable MoE router found")
        ks = {(m.top_k, m.num_experts) for m in layers}
        if len(ks) != 1:
            desc = ", ".join(f"layer {m.layer_id}: top_k={m.top_k}, num_experts={m.num_experts}" for m in layers)
            raise UnsupportedModelError(
                f"{type(model).__name__}: MoE layers differ in top_k / num_experts ({desc}); "
                "a RoutingTrace needs the same [K] and expert count on every layer"
            )
        ids = [m.layer_id for m in layers]
        if len(set(ids)) != len(ids):
            raise UnsupportedModelError(f"{type(model).__name__}: two routers map to the same layer id: {ids}")
        self.model = model
        self.layers: tuple[MoELayer, ...] = tuple(layers)
        self.layer_ids: tuple[int, ...] = tuple(ids)
        self.skipped: tuple[tuple[str, str], ...] = tuple(skipped)
        self.adapter = adapter
        self.top_k = layers[0].top_k
        self.num_experts = layers[0].num_experts
        self._has_experts_hook = tuple(has_experts_hook) if has_experts_hook is not None else (False,) * len(layers)
        self._removers: list[Callable[[], None]] = []
        self._mode: Recording | Replay | None = None
        # per layer: the forwards whose ids an activation recompute may need
        self._forwards: list[list[_Forward]] = [[] for _ in layers]
        self._detached = False
        self._route = importlib.import_module("routereplay.routing").route

    # --- public API ----------------------------------------------------------------------
    def record(self, offload: bool = False) -> Recording:
        """A context manager that records the live routes of every forward inside it.

        Args:
            offload: copy each layer's ids to pinned CPU memory asynchronously (CUDA only;
                on the CPU the ids already live on the host).

        Returns:
            The :class:`Recording`; use it as ``with handle.record() as rec:``.
        """
        self._check_attached()
        return Recording(self, offload=offload)

    def replay(
        self,
        traces: RoutingTrace | Sequence[RoutingTrace],
        attention_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        missing: str = "error",
        verify: bool = False,
    ) -> Replay:
        """A context manager that forces the routers to the experts of ``traces``.

        Args:
            traces: one trace, or one per forward (micro-batches, consumed in order).
            attention_mask: ``[B, S]`` (one per trace for a list) when the batch is padded:
                the trace's real tokens are scattered to the mask's True positions, padding rows
                route live. Without it the routers must see exactly ``trace.num_tokens`` rows.
            missing: ``"error"`` (rows with ``trace.valid`` False raise MissingRoutesError) or
                ``"live"`` (such rows route live).
            verify: also check that each experts module received the forced ids.

        Returns:
            The :class:`Replay`; ``rep.stats`` after the block.

        Raises:
            LayerMismatchError, TokenCountMismatchError, MissingRoutesError, LayoutError: at entry.
        """
        self._check_attached()
        return Replay(self, traces, attention_mask=attention_mask, missing=missing, verify=verify)

    def capture_generation(self, **kwargs: Any) -> Any:
        """Generate and record routes in one go: ``routereplay.rollout.capture_generation(self, **kwargs)``."""
        rollout = importlib.import_module("routereplay.rollout")
        return rollout.capture_generation(self, **kwargs)

    def detach(self) -> None:
        """Remove every hook; the model is exactly as if never attached. Idempotent."""
        if self._mode is not None:
            raise ReplayError("detach() inside a record/replay block; leave the block first")
        for remove in reversed(self._removers):
            remove()
        self._removers.clear()
        self._forwards = [[] for _ in self.layers]
        self._detached = True

    @property
    def attached(self) -> bool:
        return not self._detached

    def __repr__(self) -> str:
        return (
            f"RouterHandle({type(self.model).__name__}, adapter={self.adapter}, layers={list(self.layer_ids)}, "
            f"top_k={self.top_k}, num_experts={self.num_experts}"
            + (f", skipped={len(self.skipped)}" if self.skipped else "")
            + (", detached" if self._detached else "")
            + ")"
        )

    # --- adapter-facing ------------------------------------------------------------------
    def _add_remover(self, remove: Callable[[], None]) -> None:
        self._removers.append(remove)

    def _check_attached(self) -> None:
        if self._detached:
            raise ReplayError("this handle was detached; call routereplay.attach(model) again")

    def where(self, index: int) -> str:
        """How errors name the ``index``-th MoE layer: ``layer 7 (model.layers.7.mlp.gate)``."""
        m = self.layers[index]
        return f"layer {m.layer_id} ({m.path})"

    def _on_block_input(self, index: int, shape: Sequence[int]) -> None:
        """Pre-hook of the first MoE block: ``shape`` is its hidden-states shape without the last dim."""
        if self._mode is None or _in_backward():
            return
        self._mode._note_shape(index, tuple(shape))

    def _on_router(
        self,
        index: int,
        logits_NE: torch.Tensor,
        weights_NK: torch.Tensor,
        ids_NK: torch.Tensor,
        **route_kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Router seam: the live ``(weights, ids)`` in, the ``(weights, ids)`` the experts must use out.

        ``route_kw`` are the per-call inputs of ``routing.route`` besides the logits (``bias_E``,
        ``expert_scale_E``, ``out_dtype``), read by the adapter from the live call.
        """
        if _in_backward():
            return self._on_recompute(index, logits_NE, weights_NK, ids_NK, route_kw)
        if self._mode is None:
            # A live forward: forwards of an earlier block can no longer be this layer's recompute.
            if self._forwards[index]:
                self._forwards[index] = []
            return weights_NK, ids_NK
        return self._mode._route(index, logits_NE, weights_NK, ids_NK, route_kw)

    def _on_experts(self, index: int, ids_NK: torch.Tensor) -> None:
        """Pre-hook of the experts module (installed by adapters that can find it)."""
        if isinstance(self._mode, Replay) and not _in_backward():
            self._mode._check_experts(index, ids_NK)

    # --- recompute -----------------------------------------------------------------------
    def _may_recompute(self) -> bool:
        """Whether the current forward may be recomputed in a backward pass: a graph is being built,
        or the model is training (reentrant checkpointing runs its forward under no_grad)."""
        return torch.is_grad_enabled() or bool(getattr(self.model, "training", False))

    def _remember(self, index, logits_NE, ids_NK, mask_N, weights_NK) -> None:
        if not self._may_recompute():
            return
        graph = None
        # The logits' node: it is in the graph whatever the adapter builds from the routes (the
        # Llama-4 seam, e.g., does not use the returned weights tensor itself).
        grad_fn = logits_NE.grad_fn if logits_NE.grad_fn is not None else weights_NK.grad_fn
        if grad_fn is not None:
            # Kept while the forward's graph is: a backward after the block still finds it, and
            # it is dropped once the user lets go of the graph (no unbounded growth).
            token = _GraphToken()
            grad_fn.metadata.setdefault("routereplay", []).append(token)
            graph = weakref.ref(token)
        checksum = logits_NE.detach().sum(dtype=torch.float64)
        kept = [f for f in self._forwards[index] if f.alive()]
        kept.append(_Forward(ids_NK=ids_NK.detach(), mask_N=mask_N, checksum=checksum, graph=graph))
        self._forwards[index] = kept

    def _on_recompute(self, index, logits_NE, weights_NK, ids_NK, route_kw):
        N = logits_NE.shape[0]
        # Newest first: on a checksum tie (the same batch forwarded twice while both graphs live)
        # the latest forward wins, which is the one a recompute follows in the usual
        # forward-then-backward loop.
        cands = [f for f in reversed(self._forwards[index]) if f.ids_NK.shape[0] == N and f.alive()]
        if not cands:
            # The forward ran live (no mode): its recompute is live too.
            return weights_NK, ids_NK
        if len(cands) == 1:
            chosen = cands[0]
            ids, mask = chosen.ids_NK, chosen.mask_N
        else:
            # Pick the forward whose logits match, on the device (no host sync).
            checksum = logits_NE.detach().sum(dtype=torch.float64)
            dist_C = (torch.stack([c.checksum for c in cands]) - checksum).abs()
            pick_1 = dist_C.argmin().reshape(1)
            ids = torch.stack([c.ids_NK for c in cands]).index_select(0, pick_1)[0]
            if any(c.mask_N is not None for c in cands):
                masks = [
                    c.mask_N if c.mask_N is not None else torch.ones(N, dtype=torch.bool, device=ids.device)
                    for c in cands
                ]
                mask = torch.stack(masks).index_select(0, pick_1)[0]
            else:
                mask = None
        spec = self.layers[index].spec
        return self._route(logits_NE, spec, forced_TK=ids, forced_mask_T=mask, check=False, **route_kw)

    # --- modes ---------------------------------------------------------------------------
    def _enter(self, mode: Recording | Replay) -> None:
        self._check_attached()
        if self._mode is not None:
            raise ReplayError(
                f"a {type(self._mode).__name__.lower()} block of this handle is already active; "
                "record/replay blocks of one model cannot be nested"
            )
        # Forwards built without a graph (reentrant checkpointing) cannot be tied to one: they
        # last until the next block. Forwards with a graph last as long as their graph.
        self._forwards = [[f for f in fs if f.graph is not None and f.alive()] for fs in self._forwards]
        self._mode = mode

    def _exit(self, mode: Recording | Replay) -> None:
        assert self._mode is mode
        self._mode = None


# --- record --------------------------------------------------------------------------------
class Recording:
    """Live routes of the forwards run inside ``with handle.record() as rec:``.

    Recomputes of activation checkpointing are not recorded again: each layer records once per
    forward.
    """

    def __init__(self, handle: RouterHandle, *, offload: bool) -> None:
        self._handle = handle
        self._offload = offload
        L = len(handle.layers)
        self._ids: list[list[torch.Tensor]] = [[] for _ in range(L)]  # per layer, per forward: [N, K]
        self._shapes: list[tuple[int, ...]] = []  # per forward, from the first MoE block's input
        self._dtype = expert_dtype(handle.num_experts)
        self._entered = False
        self._pending_copy = False

    def __enter__(self) -> Recording:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if self._entered:
            raise ReplayError("a Recording can be entered once; call handle.record() again")
        self._handle._enter(self)
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle._exit(self)

    def _note_shape(self, index: int, shape: tuple[int, ...]) -> None:
        self._shapes.append(shape)

    def _route(self, index, logits_NE, weights_NK, ids_NK, route_kw):
        ids = ids_NK.detach()
        kept = ids  # narrowed to the compact dtype when read (`calls`): no extra kernel per layer here
        if self._offload and ids.is_cuda:
            kept = torch.empty(ids.shape, dtype=self._dtype, pin_memory=True)
            kept.copy_(ids.to(self._dtype), non_blocking=True)
            self._pending_copy = True
        self._ids[index].append(kept)
        h = self._handle
        if not h._may_recompute():
            return weights_NK, ids_NK
        # This forward may be recomputed by activation checkpointing, and the recompute will be
        # forced to these ids. Non-reentrant checkpointing requires the recompute to run the same
        # ops as the forward, so the forward routes through the same forced computation (the
        # spec's weight math reproduces the router's own weights bit for bit).
        weights, ids = h._route(
            logits_NE, h.layers[index].spec, forced_TK=ids, forced_mask_T=None, check=False, **route_kw
        )
        h._remember(index, logits_NE, ids, None, weights)
        return weights, ids

    # --- results -------------------------------------------------------------------------
    def _sync(self) -> None:
        if self._pending_copy:
            torch.cuda.synchronize()
            self._pending_copy = False

    @property
    def num_forwards(self) -> int:
        """Forwards recorded (each layer must have seen the same number)."""
        counts = [len(x) for x in self._ids]
        if len(set(counts)) > 1:
            h = self._handle
            desc = ", ".join(f"{h.where(i)}: {c}" for i, c in enumerate(counts))
            raise ReplayError(
                f"MoE layers saw different numbers of forwards ({desc}); every forward must run "
                "every MoE layer for a trace to be built"
            )
        return counts[0]

    @property
    def calls(self) -> list[torch.Tensor]:
        """Per forward, in call order: ``[N, L, K]`` ids (compact dtype) of the rows the routers saw."""
        n = self.num_forwards
        self._sync()
        return [torch.stack([layer[i] for layer in self._ids], dim=1).to(self._dtype) for i in range(n)]

    @property
    def batch_shapes(self) -> list[tuple[int, int]]:
        """Per forward, ``(B, S)`` of the MoE block input (``(1, N)`` for 2-D block inputs)."""
        n = self.num_forwards
        shapes = self._shapes
        if len(shapes) != n:
            raise ReplayError(
                f"{self._handle.where(0)}: the adapter saw {len(shapes)} block inputs for {n} forwards; "
                "batch shapes are unknown for this model, pass attention_mask to trace()"
            )
        return [(s[0], s[1]) if len(s) == 2 else (1, s[0]) if len(s) == 1 else (s[0], s[-1]) for s in shapes]

    def trace(self, attention_mask: torch.Tensor | Sequence[torch.Tensor] | None = None) -> RoutingTrace:
        """The recorded routes as a RoutingTrace.

        Args:
            attention_mask: None: every row the routers saw, each forward's ``B`` rows of ``S``
                tokens becoming ``B`` sequences. A ``[B, S]`` mask (or a list, one per forward):
                padding dropped, one sequence per batch row, real tokens in order.

        Returns:
            RoutingTrace over ``handle.layer_ids``, forwards concatenated in call order.

        Raises:
            LayoutError: the mask count or shape does not fit the forwards.
        """
        calls = self.calls
        h = self._handle
        if attention_mask is None:
            masks = [None] * len(calls)
        elif isinstance(attention_mask, torch.Tensor):
            masks = [attention_mask]
        else:
            masks = list(attention_mask)
        if len(masks) != len(calls):
            raise LayoutError(
                f"{len(masks)} attention mask(s) for {len(calls)} recorded forward(s); pass one [B, S] mask per forward"
            )
        shapes = self.batch_shapes if attention_mask is None else [None] * len(calls)
        parts_NLK, lens = [], []
        for n, (ids_NLK, mask) in enumerate(zip(calls, masks)):
            N = ids_NLK.shape[0]
            if mask is None:
                B, S = shapes[n]
                if B * S != N:
                    B, S = 1, N
                parts_NLK.append(ids_NLK)
                lens.append(torch.full((B,), S, dtype=torch.int64))
                continue
            mask_BS = mask.to("cpu", torch.bool)
            if mask_BS.ndim != 2 or mask_BS.numel() != N:
                raise LayoutError(
                    f"forward {n}: attention_mask has shape {tuple(mask_BS.shape)} ({mask_BS.numel()} positions) "
                    f"but the routers saw {N} rows; pass the [B, S] mask of that forward's input_ids"
                )
            keep_N = mask_BS.reshape(-1).to(ids_NLK.device)
            parts_NLK.append(ids_NLK[keep_N])
            lens.append(mask_BS.sum(1))
        experts_TLK = torch.cat(parts_NLK) if parts_NLK else torch.zeros(0, len(h.layers), h.top_k, dtype=self._dtype)
        lens_B = torch.cat(lens) if lens else torch.zeros(0, dtype=torch.int64)
        cu = torch.zeros(lens_B.numel() + 1, dtype=torch.int64)
        torch.cumsum(lens_B, 0, out=cu[1:])
        # Ids come straight from the routers (in range, distinct): no O(T) validation needed.
        return RoutingTrace._trusted(
            experts=experts_TLK,
            cu_seqlens=cu.to(experts_TLK.device),
            layer_ids=h.layer_ids,
            num_experts=h.num_experts,
            meta={"source": "routereplay.record", "model": type(h.model).__name__},
        )


# --- replay --------------------------------------------------------------------------------
class Replay:
    """Forced routing for the forwards run inside ``with handle.replay(...) as rep:``."""

    def __init__(self, handle, traces, *, attention_mask, missing, verify) -> None:
        if missing not in ("error", "live"):
            raise ReplayError(f'missing must be "error" or "live", found {missing!r}')
        self._handle = handle
        self._missing = missing
        self._verify = verify
        if verify:
            lacking = [handle.where(i) for i, has in enumerate(handle._has_experts_hook) if not has]
            if lacking:
                raise ReplayError(
                    f"verify=True needs the experts module of every MoE layer, the adapter found none for "
                    f"{', '.join(lacking)}; replay without verify"
                )
        single = isinstance(traces, RoutingTrace)
        trace_list = [traces] if single else list(traces)
        if not trace_list or not all(isinstance(t, RoutingTrace) for t in trace_list):
            raise ReplayError(f"replay needs a RoutingTrace or a non-empty list of them, found {type(traces).__name__}")
        if attention_mask is None:
            masks = [None] * len(trace_list)
        elif isinstance(attention_mask, torch.Tensor):
            if not single and len(trace_list) != 1:
                raise LayoutError(
                    f"one attention_mask for {len(trace_list)} traces; pass a list with one [B, S] mask per trace"
                )
            masks = [attention_mask]
        else:
            masks = list(attention_mask)
            if len(masks) != len(trace_list):
                raise LayoutError(f"{len(masks)} attention masks for {len(trace_list)} traces; pass one per trace")
        device = _model_device(handle.model)
        self._mbs = [self._prepare(n, len(trace_list), t, m, device) for n, (t, m) in enumerate(zip(trace_list, masks))]
        L = len(handle.layers)
        self._count = [0] * L
        self._rows = [0] * L
        self._replayed = [0] * L
        # Per layer, (live ids, forced ids, forced mask) of each forward: disagreement is computed
        # only when `stats` is read, keeping its kernels off the forward's hot path.
        self._compared: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = [[] for _ in range(L)]
        self._issued: list[torch.Tensor | None] = [None] * L
        self._entered = False

    def _prepare(self, n: int, total: int, trace: RoutingTrace, mask, device) -> _MicroBatch:
        """Validate one trace against the model (once, on the CPU) and lay it out in router rows."""
        h = self._handle
        where_mb = f"trace {n}: " if total > 1 else ""
        if trace.layer_ids != h.layer_ids:
            raise LayerMismatchError(
                f"{where_mb}trace has layers {list(trace.layer_ids)} but the model's MoE layers are "
                f"{list(h.layer_ids)}; if the trace covers more layers use trace.select_layers(handle.layer_ids)"
            )
        for i, m in enumerate(h.layers):
            if trace.top_k != m.top_k:
                raise LayerMismatchError(
                    f"{where_mb}{h.where(i)}: trace has top_k={trace.top_k}, router has top_k={m.top_k}"
                )
            if trace.num_experts != m.num_experts:
                raise LayerMismatchError(
                    f"{where_mb}{h.where(i)}: trace has num_experts={trace.num_experts}, router has num_experts={m.num_experts}"
                )
        cpu = trace.to("cpu")
        valid_T = cpu.valid
        if valid_T is not None and bool(valid_T.all()):
            valid_T = None
        if valid_T is not None and self._missing == "error":
            t = int((~valid_T).nonzero()[0, 0])
            b = int(torch.searchsorted(cpu.cu_seqlens, torch.tensor(t), right=True)) - 1
            raise MissingRoutesError(
                f"{where_mb}{int((~valid_T).sum())} row(s) have no recorded route, the first at row {t} "
                f"(sequence {b}, position {t - int(cpu.cu_seqlens[b])}); fill them (routereplay.layout) or "
                'replay with missing="live" to route them live'
            )
        ids_LTK = cpu.experts.permute(1, 0, 2)  # compact dtype: 8x fewer bytes to stage and copy
        self._check_groups(where_mb, ids_LTK, valid_T)
        if mask is None:
            rows, mask_N, forced_LNK, padded = cpu.num_tokens, valid_T, ids_LTK.contiguous(), False
        else:
            mask_BS = mask.to("cpu", torch.bool)
            if mask_BS.ndim != 2:
                raise LayoutError(f"{where_mb}attention_mask must be [B, S], found shape {tuple(mask_BS.shape)}")
            B, S = mask_BS.shape
            real_B = mask_BS.sum(1)
            if B != cpu.num_seqs or not torch.equal(real_B, cpu.seq_lens):
                raise TokenCountMismatchError(
                    f"{where_mb}attention_mask has {B} rows with {real_B.tolist()} real tokens but the trace has "
                    f"{cpu.num_seqs} sequences of {cpu.seq_lens.tolist()} tokens"
                    + _engine_hint(int(real_B.sum()), cpu.num_tokens, cpu.num_seqs)
                )
            rows = B * S
            keep_N = mask_BS.reshape(-1)
            forced_LNK = torch.zeros(len(h.layers), rows, trace.top_k, dtype=cpu.experts.dtype)
            forced_LNK[:, keep_N] = ids_LTK
            if valid_T is not None:
                keep_N = keep_N.clone()
                keep_N[keep_N.clone()] = valid_T
            mask_N = None if bool(keep_N.all()) else keep_N
            padded = True
        num_forced = rows if mask_N is None else int(mask_N.sum())
        return _MicroBatch(
            rows=rows,
            forced_LNK=_to_device(forced_LNK, device).to(torch.int64),
            mask_N=None if mask_N is None else _to_device(mask_N, device),
            num_forced=num_forced,
            trace_tokens=cpu.num_tokens,
            num_seqs=cpu.num_seqs,
            padded=padded,
        )

    def _check_groups(self, where_mb: str, ids_LTK: torch.Tensor, valid_T: torch.Tensor | None) -> None:
        """Group-limited routers (DeepSeek-V3 style) accept at most ``topk_group`` groups per row."""
        h = self._handle
        for i, m in enumerate(h.layers):
            spans_T = groups_spanned(ids_LTK[i], m.spec)
            if spans_T is None:
                continue
            over_T = spans_T > m.spec.topk_group
            if valid_T is not None:
                over_T &= valid_T
            if bool(over_T.any()):
                t = int(over_T.nonzero()[0, 0])
                raise RouterSpecError(
                    f"{where_mb}{h.where(i)}: row {t} selects experts {ids_LTK[i, t].tolist()} from "
                    f"{int(spans_T[t])} groups, the router allows topk_group={m.spec.topk_group} of "
                    f"n_group={m.spec.n_group} (groups of {m.spec.group_size}); "
                    "the trace comes from a router with another group limit"
                )

    def __enter__(self) -> Replay:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if self._entered:
            raise ReplayError("a Replay can be entered once; call handle.replay(...) again")
        self._handle._enter(self)
        self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        h = self._handle
        h._exit(self)
        if exc_type is not None:
            return
        if self._verify:
            for i, issued in enumerate(self._issued):
                if issued is not None:
                    raise ReplayVerificationError(
                        f"{h.where(i)}: the router's forced ids never reached the experts module; "
                        "this MoE block does not route through the seam the adapter hooks"
                    )
        used = min(self._count)
        if used < len(self._mbs) or max(self._count) != used:
            desc = ", ".join(f"{h.where(i)}: {c}" for i, c in enumerate(self._count))
            raise UnconsumedTraceError(
                f"the replay block ended after {used} forward(s) but {len(self._mbs)} trace(s) were given "
                f"(forwards per layer: {desc}); run one forward per trace or pass fewer traces"
            )

    def _note_shape(self, index: int, shape: tuple[int, ...]) -> None:
        pass

    def _route(self, index, logits_NE, weights_NK, ids_NK, route_kw):
        h = self._handle
        n = self._count[index]
        if n >= len(self._mbs):
            raise TraceExhaustedError(
                f"forward {n + 1} reached {h.where(index)} but only {len(self._mbs)} trace(s) were given; "
                "pass one trace per forward (micro-batch) or leave the replay block before this forward"
            )
        mb = self._mbs[n]
        N = logits_NE.shape[0]
        if N != mb.rows:
            raise TokenCountMismatchError(_rows_message(h.where(index), n, len(self._mbs), N, mb))
        if self._verify and self._issued[index] is not None:
            raise ReplayVerificationError(
                f"{h.where(index)}: the previous forward's forced ids never reached the experts module"
            )
        forced_NK = mb.forced_LNK[index]
        mask_N = mb.mask_N
        if forced_NK.device != logits_NE.device:
            forced_NK = forced_NK.to(logits_NE.device, non_blocking=True)
            mask_N = None if mask_N is None else mask_N.to(logits_NE.device, non_blocking=True)
        weights, ids = h._route(
            logits_NE, h.layers[index].spec, forced_TK=forced_NK, forced_mask_T=mask_N, check=False, **route_kw
        )
        self._compared[index].append((ids_NK.detach(), forced_NK, mask_N))
        self._rows[index] += N
        self._replayed[index] += mb.num_forced
        self._count[index] = n + 1
        if self._verify:
            self._issued[index] = ids
        h._remember(index, logits_NE, forced_NK, mask_N, weights)
        return weights, ids

    def _check_experts(self, index: int, received_NK: torch.Tensor) -> None:
        if not self._verify:
            return
        issued = self._issued[index]
        h = self._handle
        if issued is None:
            raise ReplayVerificationError(
                f"{h.where(index)}: the experts ran without a routed call of the router first"
            )
        self._issued[index] = None
        if received_NK is issued:
            return
        if received_NK.shape != issued.shape or not torch.equal(received_NK.to(issued.dtype), issued):
            raise ReplayVerificationError(
                f"{h.where(index)}: the experts received ids of shape {tuple(received_NK.shape)} that differ from "
                f"the forced ids {tuple(issued.shape)}; something between the router and the experts rewrote them"
            )

    @property
    def forwards(self) -> int:
        """Forwards replayed so far (micro-batch traces consumed)."""
        return min(self._count)

    @property
    def stats(self) -> dict[int, LayerStats]:
        """Per layer id: rows, replayed rows, live rows and live-vs-forced disagreement (computed and
        synced here, not during the forwards)."""
        h = self._handle
        out = {}
        for i, m in enumerate(h.layers):
            d = sum(int(_set_differs(*c).sum()) for c in self._compared[i])
            out[m.layer_id] = LayerStats(
                layer_id=m.layer_id,
                rows=self._rows[i],
                replayed=self._replayed[i],
                live=self._rows[i] - self._replayed[i],
                disagreement=d,
            )
        return out


def _set_differs(live_NK: torch.Tensor, forced_NK: torch.Tensor, mask_N: torch.Tensor | None) -> torch.Tensor:
    """bool ``[N]``: forced rows whose live top-k set differs from the forced set."""
    with torch.no_grad():
        differ_N = (live_NK.sort(-1).values != forced_NK.sort(-1).values).any(-1)
        return differ_N if mask_N is None else differ_N & mask_N


def _engine_hint(rows: int, tokens: int, seqs: int) -> str:
    if rows - tokens == seqs:
        return (
            f"; the trace has exactly one row fewer per sequence ({seqs} sequences): it looks like an engine "
            "capture (no route for the last token), convert it with routereplay.layout (engine -> training)"
        )
    if tokens - rows == seqs:
        return f"; the trace has one row more per sequence ({seqs} sequences) than the batch: were the last tokens dropped?"
    return ""


def _rows_message(where: str, n: int, num_mbs: int, N: int, mb: _MicroBatch) -> str:
    mb_txt = f"trace {n} of {num_mbs}" if num_mbs > 1 else "the trace"
    if mb.padded:
        return (
            f"{where}: the router saw {N} rows but the attention mask of {mb_txt} has {mb.rows} positions; "
            "pass the mask of the batch this forward runs on"
        )
    msg = f"{where}: the router saw {N} rows but {mb_txt} has {mb.trace_tokens} tokens"
    hints = []
    if N > mb.trace_tokens:
        hints.append(
            "if the batch is padded, pass attention_mask=batch['attention_mask'] so the trace's real tokens "
            "are placed at the mask's positions"
        )
    engine = _engine_hint(N, mb.trace_tokens, mb.num_seqs)
    if engine:
        hints.append(engine.removeprefix("; "))
    if not hints:
        hints.append("the trace belongs to another batch")
    return msg + "; " + "; or ".join(hints)


def _to_device(t_cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> accelerator without stalling: a pageable copy would wait for every queued kernel
    (the previous step's backward), so stage through pinned memory and copy asynchronously."""
    if device.type == "cpu":
        return t_cpu
    return t_cpu.pin_memory().to(device, non_blocking=True)


def _model_device(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


# --- attach --------------------------------------------------------------------------------
def attach(model: Any, **kwargs: Any) -> RouterHandle:
    """Attach routereplay to an MoE model: find its routers and hook them.

    Picks the adapter from the model's type: a transformers ``PreTrainedModel`` ->
    ``routereplay.adapters.hf`` (imported only then).

    Args:
        model: the model instance (hooks go on its module instances only).
        **kwargs: passed to the adapter's ``attach``.

    Returns:
        A :class:`RouterHandle`.

    Raises:
        UnsupportedModelError: no adapter fits the model, or it has no replayable router.
    """
    cls = type(model)
    module = cls.__module__ or ""
    tf = sys.modules.get("transformers")
    is_hf = module.startswith("transformers.")
    if not is_hf and tf is not None:
        pretrained = getattr(tf, "PreTrainedModel", None)
        is_hf = pretrained is not None and isinstance(model, pretrained)
    if is_hf:
        from routereplay.adapters import hf

        return hf.attach(model, **kwargs)
    if module.startswith("megatron.") and importlib.util.find_spec("routereplay.adapters.megatron") is not None:
        adapter = importlib.import_module("routereplay.adapters.megatron")
        return adapter.attach(model, **kwargs)
    raise UnsupportedModelError(
        f"no routereplay adapter for {cls.__module__}.{cls.__qualname__}: looked for a transformers "
        "PreTrainedModel (routereplay.adapters.hf, pip install 'routereplay[hf]') and a megatron-core model"
    )
