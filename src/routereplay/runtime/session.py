"""The handle over one attached model: scoped record / replay modes and router-call dispatch.

    handle = routereplay.attach(model)
    with handle.record() as rec:          # live routing, ids kept on device
        model(**batch)
    trace = rec.trace(attention_mask=batch["attention_mask"])
    with handle.replay(trace, attention_mask=batch["attention_mask"]) as rep:
        loss = model(**batch).loss        # the routers use the recorded experts,
        loss.backward()                   # gate weights recomputed from live logits
    handle.detach()                       # the model is exactly as before

All state lives on the handle (no globals, no registries): two models attached in one process
never see each other's routes. The adapter's interception calls the handle's :class:`RouterCalls`
(``routereplay.runtime.seam``) on every router call; this module decides what the experts get:

1. a call during backward inside a recognised checkpoint recompute uses what its own forward
   used (``routereplay.runtime.recompute``), live or forced, or raises RecomputeMismatchError;
2. otherwise the active mode (``Recording``, ``Replay``) answers, or the router's own output
   stands when no mode is active;
3. a forward inside checkpointed regions binds its answer to them, for their recompute.

Threads: a record/replay block belongs to the thread that entered it, and is refused across
threads. While it is active, a forward of the model on another thread raises ReplayError at its
first router (it would otherwise take the block's routes, or silently not); so does entering a
second block from another thread. Recomputes are the exception: autograd may run a backward on
its own device threads, and a recompute replays the routes of its own forward (rule 1), whichever
thread runs it. Two threads that must record or replay at once need two models, each attached.

Activation checkpointing therefore needs no user action, and ``backward()`` may run after the
block, after several blocks, after live passes in between, in any micro-batch order, and after
``detach()`` (the owed recomputes re-install the interception for their own length only,
``recompute.hold``).

Legend: N rows a router sees in one call, E experts (logits width), K top-k, L MoE layers.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from routereplay.core.errors import CudaGraphError, RecomputeMismatchError, ReplayError, UnsupportedModelError
from routereplay.core.trace import RoutingTrace
from routereplay.kernels.coverage import INSTALL_HINT
from routereplay.runtime import recompute, rollout
from routereplay.runtime.modes import ForcedWeights, Mode
from routereplay.runtime.record import Recording
from routereplay.runtime.replay import LayerStats, PreparedTrace, Replay, prepare
from routereplay.runtime.seam import Discovery, MoELayer

__all__ = ["LayerStats", "MoELayer", "PreparedTrace", "Recording", "Replay", "RouterHandle"]


class _GraphToken:
    """Lives in the autograd graph of a forward (``grad_fn.metadata``): dies with the graph."""

    __slots__ = ("__weakref__",)


class RouterHandle:
    """Record / replay control over the MoE routers of one attached model.

    Built by ``routereplay.runtime.attach``; not constructed by users. Use it as a context manager to
    detach on exit: ``with routereplay.attach(model) as handle: ...``.

    Attributes:
        model: the attached model.
        layers: one :class:`MoELayer` per replayable router, in forward order.
        layer_ids: ``tuple(layer.layer_id for layer in layers)``: the layer ids a trace needs.
        skipped: ``(path, reason)`` for routers found but deliberately left out of traces.
        verifiable: per layer, whether ``replay(verify=True)`` can check what its experts receive.
        adapter: the adapter's name (``"hf"``, ``"megatron"``).
    """

    def __init__(self, model: Any, discovery: Discovery, *, adapter: str, replay_kernel: str = "torch") -> None:
        if replay_kernel not in ("torch", "triton"):
            raise ReplayError(f'replay_kernel must be "torch" or "triton", found {replay_kernel!r}')
        if replay_kernel == "triton" and importlib.util.find_spec("triton") is None:
            raise ReplayError(
                f'replay_kernel="triton" needs triton, which is not installed: {INSTALL_HINT} (or '
                'replay_kernel="torch")'
            )
        layers = discovery.layers
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
        self.skipped: tuple[tuple[str, str], ...] = tuple(discovery.skipped)
        self.verifiable: tuple[bool, ...] = tuple(discovery.verifiable) or (False,) * len(layers)
        self.adapter = adapter
        self.replay_kernel = replay_kernel
        # per layer: the forced-weights callable (routing.route, or the fused kernel where it covers)
        self.forced_weights: tuple[ForcedWeights, ...] = tuple(ForcedWeights(m.spec, replay_kernel) for m in layers)
        self.top_k = layers[0].top_k
        self.num_experts = layers[0].num_experts
        # True while the seam call being answered comes from a torch.compile'd region (through its
        # graph break): tensors it hands over may live in a CUDA graph's memory pool (_graph_break).
        self.compiled_call = False
        self.calls = _Calls(self)
        self._removers: list[Callable[[], None]] = []
        self._mode: Recording | Replay | None = None
        self._owner: threading.Thread | None = None  # the thread that entered the active block
        self._owner_ident: int | None = None  # its threading.get_ident() (a C call; current_thread() is Python)
        self._bindings = recompute.Bindings(len(layers))
        # Tokens of forwards routed under a mode outside any recognised checkpoint region, alive
        # while their graph is: a recompute nobody recognises must not guess while one lives.
        self._unscoped: weakref.WeakSet[_GraphToken] = weakref.WeakSet()
        self._blocks = 0
        self._detached = False
        self._streams: dict[torch.device, Any] = {}  # per device: the side stream host traces are copied on
        # observers of what each layer's experts receive (observe_dispatch), in registration order
        self._observers: list[Callable[[int, torch.Tensor], None]] = []
        # What the adapter offered to intercept each layer's experts (RouterCalls.watch_experts), and
        # the undo of each while installed: only while something reads their ids (_watch_experts).
        self._experts_watch: dict[int, Callable[[], Callable[[], None]]] = {}
        self._experts_unwatch: list[Callable[[], None]] = []
        # After detach: what installs the interception again for a recompute owed by a forward
        # made while attached, and the regions already holding it (``recompute.hold``).
        self._reinstall: Callable[[], list[Callable[[], None]]] | None = None
        self._held: recompute.Held = recompute.Held()
        self._routers: tuple[Any, ...] = ()  # the router modules ``attach`` marked as hooked by this handle

    # --- public API ----------------------------------------------------------------------
    def record(self, *, offload: bool = False, generation: bool = False) -> Recording:
        """A context manager that records the live routes of every forward inside it.

        Args:
            offload: copy each layer's ids to pinned CPU memory asynchronously (CUDA only;
                on the CPU the ids already live on the host). Without it the ids stay where the
                routers made them, kept as they are (no op per router call) and narrowed to the
                trace's compact dtype per layer every 64 forwards or past 1 MiB of pending ids.
            generation: the block holds ``generate()`` calls only (as ``capture_generation``'s
                does): forwards run without grad are taken as never checkpointed, and their
                router calls skip the search for checkpointed regions.

        Returns:
            The :class:`Recording`; use it as ``with handle.record() as rec:``.
        """
        self._check_attached()
        return Recording(self, offload=offload, generation=generation)

    def prepare(
        self, trace: RoutingTrace, *, attention_mask: torch.Tensor | None = None, missing: str = "error"
    ) -> PreparedTrace:
        """Check ``trace`` against the model and lay it out for its routers, once, for many replays.

        ``handle.replay(trace, ...)`` does this at every entry; a :class:`PreparedTrace` does it
        once for R2's epochs and R3's passes over the same micro-batch. A host trace is copied to
        the model's device asynchronously on a side stream (the first forward waits for it on the
        device, not the host), after its checks on the host; a device trace is checked by
        device-side reductions read at the exit of the first replay block (no host sync before).
        Arguments as for :meth:`replay`.
        """
        self._check_attached()
        return prepare(self, trace, attention_mask=attention_mask, missing=missing)

    def replay(
        self,
        traces: RoutingTrace | PreparedTrace | Sequence[RoutingTrace | PreparedTrace],
        *,
        attention_mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
        missing: str | None = None,
        verify: bool = False,
    ) -> Replay:
        """A context manager that forces the routers to the experts of ``traces``.

        Args:
            traces: one trace, or one per forward (micro-batches, consumed in order); a
                :class:`PreparedTrace` (:meth:`prepare`) skips the checks and the copy.
            attention_mask: ``[B, S]`` (one per trace for a list) when the batch is padded:
                the trace's real tokens are scattered to the mask's True positions, padding rows
                route live. Without it the routers must see exactly ``trace.num_tokens`` rows,
                and a forward whose batch is ``[B, S]`` with ``B > 1`` must match the trace's
                ``B`` sequences of ``S`` tokens. A prepared trace carries its mask.
            missing: ``"error"`` (the default: rows with ``trace.valid`` False raise
                MissingRoutesError) or ``"live"`` (such rows route live); a prepared trace keeps
                the one it was prepared with.
            verify: also check that each experts module received the forced ids.

        Returns:
            The :class:`Replay`; ``rep.stats`` after the block.

        Raises:
            LayerMismatchError, LayoutError, MissingRoutesError, RouterSpecError: at entry (for a
                trace on an accelerator, the data checks at the block's exit).
            TokenCountMismatchError, BatchShapeMismatchError, TraceExhaustedError: in a forward.
            UnconsumedTraceError: at exit.
        """
        self._check_attached()
        return Replay(self, traces, attention_mask=attention_mask, missing=missing, verify=verify)

    def capture_generation(self, **kwargs: Any) -> Any:
        """Generate and record routes in one go: ``routereplay.runtime.rollout.capture_generation(self, **kwargs)``."""
        return rollout.capture_generation(self, **kwargs)

    def observe_dispatch(self, observer: Callable[[int, torch.Tensor], None]) -> Callable[[], None]:
        """Call ``observer(index, ids_NK)`` with the expert ids each MoE layer dispatches.

        The one witness of what ran, whatever the engine: the adapter reports the ids the experts
        module received where it can see them (``handle.verifiable[index]``: "experts input"), and
        the core reports the ids the router call returned to the experts elsewhere ("router
        output"; Megatron's routers). Forwards recomputed during a backward are not reported.
        While an observer is registered every forward goes through the seam, live ones too.

        Args:
            observer: called once per MoE layer per forward with the layer's position in
                ``handle.layers`` and its ``[N, K]`` ids (as the experts see them; do not modify).

        Returns:
            A function that unregisters the observer.
        """
        self._check_attached()
        self._observers.append(observer)
        self._watch_experts()

        def remove() -> None:
            if observer in self._observers:
                self._observers.remove(observer)
                self._watch_experts()

        return remove

    def observed_at(self, index: int) -> str:
        """Where :meth:`observe_dispatch` sees layer ``index``: ``"experts input"`` or ``"router output"``."""
        return "experts input" if self.verifiable[index] else "router output"

    def _witness(self, index: int, ids_NK: torch.Tensor) -> None:
        for observer in tuple(self._observers):
            observer(index, ids_NK)

    @property
    def active(self) -> Recording | Replay | None:
        """The record or replay block active now, or None."""
        return self._mode

    @property
    def attached(self) -> bool:
        return not self._detached

    def detach(self) -> None:
        """Remove every interception; the model is exactly as if never attached. Idempotent.

        A backward still owed by a forward made while attached (``loss`` kept past the ``with
        attach(...)`` block) still recomputes its checkpointed regions with the routes of that
        forward: each such region re-installs the interception for the length of its own
        recompute only (``recompute.hold``), and drops it when its autograd graph dies. (A
        checkpoint implementation routereplay does not recognise, refused while attached, cannot
        be seen once detached: run its backward before detach.)
        """
        if self._mode is not None:
            raise ReplayError("detach() inside a record/replay block; leave the block first")
        self._observers.clear()
        self._watch_experts()
        for remove in reversed(self._removers):
            remove()
        self._removers.clear()
        self._detached = True
        for region in self._bindings.regions():
            self._hold(region)

    def where(self, index: int) -> str:
        """How errors name the ``index``-th MoE layer: ``layer 7 (model.layers.7.mlp.gate)``."""
        m = self.layers[index]
        return f"layer {m.layer_id} ({m.path})"

    def __enter__(self) -> RouterHandle:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mode is None:
            self.detach()

    def __repr__(self) -> str:
        return (
            f"RouterHandle({type(self.model).__name__}, adapter={self.adapter}, layers={list(self.layer_ids)}, "
            f"top_k={self.top_k}, num_experts={self.num_experts}"
            + (f", skipped={len(self.skipped)}" if self.skipped else "")
            + (", detached" if self._detached else "")
            + ")"
        )

    # --- used by attach and by the modes ---------------------------------------------------
    def _installed(
        self, removers: list[Callable[[], None]], reinstall: Callable[[], list[Callable[[], None]]] | None = None
    ) -> None:
        self._removers.extend(removers)
        self._reinstall = reinstall

    def _hold(self, region: object) -> None:
        """After detach: make ``region``'s recompute run under this handle's interception again."""
        if self._reinstall is None:
            return
        recompute.hold(region, self._reinstall, self._held)

    def _check_attached(self) -> None:
        if self._detached:
            raise ReplayError("this handle was detached; call routereplay.attach(model) again")

    # --- the host of the active block (runtime.modes.ModeHost) ----------------------------
    def enter_block(self, mode: Mode) -> int:
        """Make ``mode`` the active block (see ``runtime.modes.ModeHost``); for record / replay blocks."""
        self._check_attached()
        if self._mode is not None:
            if self._owner is not threading.current_thread():
                raise ReplayError(
                    f"a {type(self._mode).__name__.lower()} block of this handle is active on thread "
                    f"{self._owner.name!r}; a block on thread {threading.current_thread().name!r} would share its "
                    "routes: wait for that block to end, or attach a separate copy of the model for this thread"
                )
            raise ReplayError(
                f"a {type(self._mode).__name__.lower()} block of this handle is already active; "
                "record/replay blocks of one model cannot be nested"
            )
        # before the mode: a reader that sees the mode sees its owner
        self._owner, self._owner_ident = threading.current_thread(), threading.get_ident()
        self._mode = mode
        self._blocks += 1
        self._watch_experts()
        return self._blocks

    def exit_block(self, mode: Mode) -> None:
        """End ``mode``, the active block (see ``runtime.modes.ModeHost``)."""
        assert self._mode is mode
        self._mode = None
        self._owner = self._owner_ident = None
        self._watch_experts()

    def _watch_experts(self) -> None:
        """Intercept the experts while something reads what they receive (a verifying replay, a
        dispatch observer), and only then: each interception is a module hook on the hot path."""
        wanted = bool(self._observers) or (self._mode is not None and self._mode.reads_experts)
        if wanted and not self._experts_unwatch:
            self._experts_unwatch = [start() for start in self._experts_watch.values()]
        elif not wanted:
            while self._experts_unwatch:
                self._experts_unwatch.pop()()

    def _mode_here(self, index: int) -> Recording | Replay | None:
        """The active block, when this thread entered it.

        Raises:
            ReplayError: a block entered on another thread is active.
        """
        mode, owner = self._mode, self._owner
        if mode is None or self._owner_ident == threading.get_ident():
            return mode
        if owner is None:
            return None  # the block ended in between (``exit_block`` clears the mode, then the owner)
        raise ReplayError(
            f"{self.where(index)}: a forward on thread {threading.current_thread().name!r} while a "
            f"{type(mode).__name__.lower()} block of this handle is active on thread {owner.name!r}; "
            "a block's routes belong to the thread that entered it: run this forward after the block, or "
            "on that thread, or attach a separate copy of the model for this thread"
        )

    def side_stream(self, device: torch.device) -> Any:
        """The handle's CUDA side stream on ``device``: host traces are copied on it."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def _training(self) -> bool:
        training = getattr(self.model, "training", None)
        if training is None and isinstance(self.model, (list, tuple)):  # model chunks (pipeline stages)
            training = any(getattr(m, "training", False) for m in self.model)
        return bool(training)

    # --- the router seam -------------------------------------------------------------------
    def _on_router(self, index, logits_NE, weights_NK, ids_NK, route_kw):
        if _graph_task_id() != -1:  # in a backward (recompute.in_backward, inlined: a frame a call)
            chain = recompute.scopes()
            redo = next((s for s in chain if s.recompute), None)
            if redo is not None:
                if not self._bindings.knows(redo.region) and recompute.held_elsewhere(redo.region):
                    return weights_NK, ids_NK  # owed by a detached handle, whose interception answers
                binding = self._bindings.lookup(redo, index, self.where(index))
                opened = chain[: chain.index(redo)]  # nested checkpoints the recompute itself opens
                if opened:
                    self._bindings.bind(opened, index, binding)
                    if self._detached:  # a recompute owed past detach: its nested regions' too
                        for scope in opened:
                            self._hold(scope.region)
                if binding.ids_NK is None:
                    return weights_NK, ids_NK
                return self.forced_weights[index](logits_NE, binding.ids_NK, binding.mask_N, route_kw)
            if len(self._unscoped):
                raise RecomputeMismatchError(
                    f"{self.where(index)}: a router call during backward outside any checkpoint recompute "
                    "routereplay recognises (torch.utils.checkpoint, autograd-Function checkpoints such as "
                    "Megatron's), while a forward this handle replayed or recorded outside such a region may "
                    "still be recomputed; use torch.utils.checkpoint or a Function-based checkpoint"
                )
            chain = []  # a forward run from a backward hook: routed like any forward
        elif torch.is_grad_enabled():
            chain = recompute.scopes()
        elif self._mode is None and not self._training():
            return weights_NK, ids_NK  # nothing can recompute this forward
        elif getattr(self._mode, "generation", False):
            chain = []  # generate() runs without grad and is never checkpointed
        else:
            chain = recompute.scopes()
        # _mode_here's common case (this thread owns the block) inlined: a frame less per router call
        mode = self._mode if self._owner_ident == threading.get_ident() else self._mode_here(index)
        if mode is not None and logits_NE.is_cuda and torch.cuda.is_current_stream_capturing():
            raise CudaGraphError(
                f"{self.where(index)}: a router call of a {type(mode).__name__.lower()} block inside a CUDA graph "
                "capture; the hooks run once while the graph is captured and never when it replays, so later "
                "replays would be neither recorded nor forced. Run record/replay/capture outside CUDA graph "
                "capture (eager, or torch.compile without mode='reduce-overhead'); routereplay's own CUDA graph "
                "support is torch.compile's (generate's static cache compiled with CUDA graphs captures correctly)"
            )
        if mode is None:
            if chain:
                self._bindings.bind(chain, index, recompute.Binding(None, None, "live forward"))
            return weights_NK, ids_NK
        weights, ids, binding = mode.answer(index, logits_NE, weights_NK, ids_NK, route_kw, scoped=bool(chain))
        if chain:
            self._bindings.bind(chain, index, binding)
        elif binding is not None and binding.ids_NK is not None and torch.is_grad_enabled():
            grad_fn = logits_NE.grad_fn if logits_NE.grad_fn is not None else weights.grad_fn
            if grad_fn is not None:
                token = _GraphToken()
                grad_fn.metadata.setdefault("routereplay", []).append(token)
                self._unscoped.add(token)
        return weights, ids


_graph_task_id = torch._C._current_graph_task_id  # -1 outside a backward


class _Calls:
    """The handle's side of the seam (``routereplay.runtime.seam.RouterCalls``), handed to the adapter.

    Under ``torch.compile`` each call is a graph break (``torch.compiler.disable``): the dispatch
    reads Python state (the active mode, the checkpoint scopes on the stack) that a graph cannot
    capture, and must run for every forward, not once at trace time. The wrapping happens per
    handle, at attach: ``torch.compiler.disable`` imports Dynamo (and Triton), which
    ``import routereplay`` must not.
    """

    def __init__(self, handle: RouterHandle) -> None:
        self._handle = handle
        for name in ("on_router", "routes_live", "on_block_input", "on_experts"):
            setattr(self, name, _graph_break(getattr(self, name), handle))

    def on_router(self, index, logits_NE, weights_NK, ids_NK, **route_kw):
        h = self._handle
        weights, ids = h._on_router(index, logits_NE, weights_NK, ids_NK, route_kw)
        if h._observers and not h.verifiable[index] and not recompute.in_backward():
            h._witness(index, ids)  # what this router hands its experts: the witness where they are unseen
        return weights, ids

    def routes_live(self, index: int) -> bool:
        h = self._handle  # a block on another thread is not live either: on_router refuses the call
        return (
            h._mode is None
            and not h._observers
            and not torch.is_grad_enabled()
            and not h._training()
            and not recompute.in_backward()
        )

    def on_block_input(
        self, index: int, shape: Sequence[int], *, position_ids=None, cu_seqlens=None, attention_mask=None
    ) -> None:
        if self._handle._mode is None or recompute.in_backward():
            return
        mode = self._handle._mode_here(index)
        if mode is not None:
            shape = tuple(shape)
            packed = _packed_sequences(shape, position_ids, cu_seqlens)
            mask_BS = attention_mask if _is_mask_of(attention_mask, shape) else None
            mode.note_batch(index, shape, packed, mask_BS)

    def watch_experts(self, index: int, start: Callable[[], Callable[[], None]]) -> None:
        self._handle._experts_watch[index] = start

    def on_experts(self, index: int, ids_NK: torch.Tensor) -> None:
        h = self._handle
        if not h._observers and not isinstance(h._mode, Replay):
            return  # idle, recording or capturing: nothing reads what the experts receive
        if recompute.in_backward():
            return
        if h._observers:
            h._witness(index, ids_NK)
        if h._mode is None:
            return
        mode = h._mode_here(index)
        if isinstance(mode, Replay):
            mode.check_dispatch(index, ids_NK)


def _graph_break(fn: Callable, handle: RouterHandle) -> Callable:
    """``fn``, run eagerly under ``torch.compile`` (a graph break).

    Dynamo's disabled wrapper costs a few microseconds per call even when nothing is compiled, and
    the seam's calls run once per MoE layer per decode step: eager callers call ``fn`` itself,
    and only a frame Dynamo traces (where ``is_compiling()`` is True) goes through the wrapper.
    A call through the wrapper runs with ``handle.compiled_call`` set: the tensors it hands over
    are outputs of a compiled graph, which under CUDA graphs live in a pool the next replay
    overwrites (a recording copies them; eager ids it keeps as they are)."""

    @functools.wraps(fn)  # Dynamo's graph-break reasons name the seam call
    def compiled(*args, **kwargs):
        handle.compiled_call = True
        try:
            return fn(*args, **kwargs)
        finally:
            handle.compiled_call = False

    disabled = torch.compiler.disable(compiled)
    is_compiling = torch.compiler.is_compiling

    def call(*args, **kwargs):
        if is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


def _is_mask_of(mask: Any, shape: tuple[int, ...]) -> bool:
    """A ``[B, S]`` attention mask of this block input (a decode step's mask also covers the cache)."""
    return isinstance(mask, torch.Tensor) and mask.ndim == 2 and tuple(mask.shape) == shape


def _packed_sequences(shape, position_ids, cu_seqlens) -> tuple[str, torch.Tensor] | None:
    """What names the sequences of a packed ``[1, T]`` batch: ``("cu", [B+1])`` or ``("pos", [T])``."""
    if len(shape) != 2 or shape[0] != 1:
        return None
    if isinstance(cu_seqlens, torch.Tensor):
        return "cu", cu_seqlens.reshape(-1)
    if isinstance(position_ids, torch.Tensor) and position_ids.numel() == shape[1]:
        return "pos", position_ids.reshape(-1)
    return None
