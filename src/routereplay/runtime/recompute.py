"""Recompute identity: an activation-checkpoint recompute replays the ids of its own forward.

Activation checkpointing runs a region's forward twice: once in the forward pass (its activations
dropped), once more inside backward to rebuild them. A replayed router must pick the same experts
both times, whatever else ran in between: other micro-batches, live reference passes, other
replay blocks over the same batch with other traces, another model. A value (a checksum of the
logits) cannot tell two such forwards apart; the *region object* the checkpoint implementation
keeps between the two runs can. Every checkpoint implementation has one:

========================================  ===========================  ===========================
implementation                            forward: region seen as      recompute: region seen as
========================================  ===========================  ===========================
autograd-Function checkpoints (torch      the ``ctx`` of the           the same ``ctx`` in the
``use_reentrant=True``, Megatron's        Function's ``forward``       Function's ``backward``
``tensor_parallel.checkpoint``, ...)      on the Python stack          on the Python stack
torch non-reentrant (``use_reentrant=     the ``_CheckpointFrame``     the ``_CheckpointFrame`` whose
False``, selective checkpointing,         of the innermost saved-      ``unpack_hook`` is on the
``checkpoint_wrapper``, composable        tensor hooks, and of each    Python stack
``checkpoint``)                           ``checkpoint()`` call
========================================  ===========================  ===========================

(The frame of "each ``checkpoint()`` call" is the one driving the checkpoint's generator: ``checkpoint``
up to torch 2.13, ``_checkpoint_impl`` since 2.14, where ``checkpoint`` also makes decorators.)

So a router call reads its **scopes** off the stack (innermost first): each scope is a region and
whether the call runs in that region's forward or in its recompute. A call in forward binds what
it routed (ids, or "live") to every enclosing region under its layer, in call order. A call in a
recompute takes the ``n``-th binding of its layer from the innermost region being recomputed,
``n`` counting that layer's calls within this recompute run (one run per region and backward
pass, so ``retain_graph`` backwards each start at 0), and binds it to the regions the recompute
itself opens (nested checkpoints). Bindings live exactly as long as their region object, that is
as long as the autograd graph that can recompute it (weak keys).

A backward owed past ``handle.detach()`` (a helper that attaches, replays and returns the loss)
still recomputes with the ids of its forward: detach removes every interception from the model,
and each region bound so far *holds* the handle (:func:`hold`): it re-installs the interception
for the length of its own recompute, by wrapping the recompute entry the region keeps
(``_CheckpointFrame.recompute_fn``; the Function ctx's ``run_function`` of torch, Megatron and
DeepSpeed checkpoints) or, for another Function, by the backward node's pre- and post-hooks. The
hold lives on the region, so it ends with the autograd graph; the model itself stays as before
attach.

A recompute whose region has no binding for the call (its forward ran before ``attach``, or ran
the layer fewer times) raises :class:`~routereplay.core.errors.RecomputeMismatchError`: never live
routing by guess. A router call in backward that sits in no recognised recompute is either a
forward run from a backward hook (routed as any forward) or an unrecognised checkpoint
implementation: the session refuses it while any forward it replayed or recorded outside a
recognised region may still be recomputed.
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint as _ckpt

from routereplay.core.errors import RecomputeMismatchError

__all__ = ["Binding", "Bindings", "Held", "Scope", "held_elsewhere", "hold", "in_backward", "scopes"]

_FunctionCtx = torch.autograd.function.BackwardCFunction
_CheckpointFrame = getattr(_ckpt, "_CheckpointFrame", None)

# What a frame's code object is, decided once per code object.
_PLAIN, _FN_FORWARD, _FN_BACKWARD, _CKPT_CALL, _CKPT_UNPACK = range(5)
_kind_of_code: dict[types.CodeType, int] = {}
# The frame that drives a non-reentrant checkpoint's generator (local ``gen``): ``checkpoint`` itself
# up to torch 2.13, ``_checkpoint_impl`` since 2.14 (``checkpoint`` became a front that also makes
# decorators). Told by its module's file and that local, so a further move inside the module is found.
_CHECKPOINT_FILE = _ckpt.__file__


def in_backward() -> bool:
    """True while autograd executes a backward pass on this thread."""
    return torch._C._current_graph_task_id() != -1


@dataclass(frozen=True, slots=True)
class Scope:
    """One checkpointed region enclosing a router call: ``run`` is None in the region's forward,
    and names the recompute run (backward pass) while it is recomputed."""

    region: object
    run: object | None

    @property
    def recompute(self) -> bool:
        return self.run is not None


def _code_kind(code: types.CodeType) -> int:
    kind = _kind_of_code.get(code)
    if kind is None:
        kind = _PLAIN
        if code.co_argcount >= 1 and code.co_varnames[0] == "ctx" and code.co_name in ("forward", "backward"):
            kind = _FN_FORWARD if code.co_name == "forward" else _FN_BACKWARD
        elif code.co_filename == _CHECKPOINT_FILE and "gen" in code.co_varnames:
            kind = _CKPT_CALL
        elif code.co_name == "unpack_hook" and "frame" in code.co_freevars:
            kind = _CKPT_UNPACK
        _kind_of_code[code] = kind
    return kind


def _hooks_frame(top) -> object | None:
    """The ``_CheckpointFrame`` of the innermost non-reentrant checkpoint forward, if its
    saved-tensor hooks are ``top``, the innermost ones."""
    if top is None or _CheckpointFrame is None:
        return None
    pack = top[0]
    code = getattr(pack, "__code__", None)
    if code is None or "frame" not in code.co_freevars:
        return None
    region = pack.__closure__[code.co_freevars.index("frame")].cell_contents
    return region if isinstance(region, _CheckpointFrame) else None


def scopes() -> list[Scope]:
    """The checkpointed regions around the caller, innermost first (see the module docstring)."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None and torch.is_grad_enabled() and not in_backward():
        # No region can enclose a forward call here, so the stack is not walked: a non-reentrant
        # checkpoint's forward keeps its saved-tensor hooks pushed while it runs (any hooks at all
        # pushed: the walk runs), and an autograd Function's forward (reentrant checkpoints:
        # torch's, Megatron's, DeepSpeed's) runs with grad disabled. A Function that re-enables
        # grad inside its forward goes unseen, and its recompute then raises
        # RecomputeMismatchError (no binding), never routes by guess.
        return []
    top = _hooks_frame(hooks)
    out: list[Scope] = []
    seen: set[int] = set()

    def add(region: object, run: object | None) -> None:
        if id(region) not in seen:
            seen.add(id(region))
            out.append(Scope(region, run))

    if top is not None:
        add(top, None)
    kinds = _kind_of_code
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        kind = kinds.get(code)  # inlined: this loop runs over every frame of every router call
        if kind is None:
            kind = _code_kind(code)
        if kind != _PLAIN:
            local = frame.f_locals
            if kind == _FN_FORWARD or kind == _FN_BACKWARD:
                ctx = local.get("ctx")
                if isinstance(ctx, _FunctionCtx):
                    add(ctx, torch._C._current_graph_task_id() if kind == _FN_BACKWARD else None)
            elif kind == _CKPT_CALL:
                gen = local.get("gen")
                region = getattr(getattr(gen, "gi_frame", None), "f_locals", {}).get("new_frame")
                if _CheckpointFrame is not None and isinstance(region, _CheckpointFrame):
                    add(region, None)
            else:  # _CKPT_UNPACK
                region = local.get("frame")
                if _CheckpointFrame is not None and isinstance(region, _CheckpointFrame):
                    add(region, ("unpack", local.get("gid")))
        frame = frame.f_back
    return out


@dataclass(frozen=True, slots=True)
class Binding:
    """What one router call of a region's forward used: ``ids_NK`` None means it routed live."""

    ids_NK: torch.Tensor | None
    mask_N: torch.Tensor | None
    forward: str  # how errors name the forward: "replay block 2, forward 1", "live forward"


class Bindings:
    """Per handle: region -> per layer, the bindings of that region's forward in call order."""

    def __init__(self, num_layers: int) -> None:
        self._num_layers = num_layers
        self._calls: weakref.WeakKeyDictionary[object, list[list[Binding]]] = weakref.WeakKeyDictionary()
        self._runs: weakref.WeakKeyDictionary[object, dict[object, list[int]]] = weakref.WeakKeyDictionary()

    def bind(self, regions: list[Scope], index: int, binding: Binding) -> None:
        """Bind a forward call of layer ``index`` to each forward region in ``regions``."""
        for scope in regions:
            per_layer = self._calls.get(scope.region)
            if per_layer is None:
                per_layer = self._calls[scope.region] = [[] for _ in range(self._num_layers)]
            per_layer[index].append(binding)

    def lookup(self, scope: Scope, index: int, where: str) -> Binding:
        """The binding a recompute call of layer ``index`` in ``scope`` (a recompute) must use.

        Raises:
            RecomputeMismatchError: the region's forward made no such call under this handle.
        """
        per_layer = self._calls.get(scope.region)
        runs = self._runs.get(scope.region)
        if runs is None:
            runs = self._runs[scope.region] = {}
        counts = runs.setdefault(scope.run, [0] * self._num_layers)
        n = counts[index]
        counts[index] = n + 1
        region = type(scope.region).__name__
        if per_layer is None:
            raise RecomputeMismatchError(
                f"{where}: activation recompute of a checkpointed region ({region}) whose forward this handle never "
                "saw (it ran before routereplay.attach, or in another process); run the forward and its backward "
                "with the model attached"
            )
        calls = per_layer[index]
        if n >= len(calls):
            forward = next((c.forward for layer in per_layer for c in layer), "?")
            raise RecomputeMismatchError(
                f"{where}: activation recompute of a checkpointed region ({region}) calls this router "
                f"{n + 1} time(s), but the region's forward ({forward}) called it {len(calls)} time(s); the "
                "recompute does not re-run the forward it belongs to"
            )
        return calls[n]

    def knows(self, region: object) -> bool:
        """Whether a forward of ``region`` made router calls under this handle."""
        return region in self._calls

    def regions(self) -> list[object]:
        """The regions bound so far whose autograd graph is still alive."""
        return list(self._calls.keys())

    def __len__(self) -> int:
        return len(self._calls)


# Set on a region held by a detached handle: another handle's interception, seeing that region's
# recompute, leaves the call to the holder (whose interception the recompute re-installed).
_HELD = "_routereplay_held"


class Held:
    """Per handle, after detach: the regions that hold it, and the interception re-installed for
    the recomputes running now (nested recomputes share one installation)."""

    def __init__(self) -> None:
        self.regions: weakref.WeakSet[object] = weakref.WeakSet()
        self.depth = 0
        self.removers: list[Callable[[], None]] = []

    def enter(self, reinstall: Callable[[], list[Callable[[], None]]]) -> None:
        if self.depth == 0:
            self.removers = reinstall()
        self.depth += 1

    def leave(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            removers, self.removers = self.removers, []
            for remove in reversed(removers):
                remove()


def hold(region: object, reinstall: Callable[[], list[Callable[[], None]]], held: Held) -> None:
    """Make ``region``'s recompute run under the interception ``reinstall`` installs (and whose
    removers it returns), removed again when the recompute ends. Idempotent per ``held``.

    A wrapped recompute entry removes it in a ``finally``; the backward-node hooks of another
    Function cannot see an exception raised inside its backward, after which the interception of
    the detached handle stays installed (answering live outside recomputes) until a later
    recompute of such a region completes.
    """
    if region in held.regions:
        return
    held.regions.add(region)
    if _CheckpointFrame is not None and isinstance(region, _CheckpointFrame):
        entry = "recompute_fn"
    elif callable(getattr(region, "run_function", None)):
        entry = "run_function"
    else:
        entry = None
    if entry is not None:
        original = getattr(region, entry)

        def run(*args, **kwargs):
            held.enter(reinstall)
            try:
                return original(*args, **kwargs)
            finally:
                held.leave()

        setattr(region, entry, run)
    elif isinstance(region, _FunctionCtx):
        region.register_prehook(lambda grad_outputs: held.enter(reinstall))
        region.register_hook(lambda grad_inputs, grad_outputs: held.leave())
    setattr(region, _HELD, True)


def held_elsewhere(region: object) -> bool:
    """Whether a detached handle holds ``region`` (its own interception answers the recompute)."""
    return getattr(region, _HELD, False)
