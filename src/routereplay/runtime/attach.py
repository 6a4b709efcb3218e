"""``routereplay.runtime.attach``: the composition root that picks an adapter and builds the handle.

Adapters are found through the ``routereplay.adapters`` entry-point group (``pyproject.toml``):
each entry names a module implementing ``routereplay.runtime.seam.Adapter``. The first adapter whose
``claims(model)`` is true discovers the MoE layers and installs its interception; a new engine is
a new leaf module plus one entry point, and nothing in the core changes.
"""

from __future__ import annotations

import importlib
import weakref
from importlib.metadata import entry_points
from typing import Any

from routereplay.core.errors import AlreadyAttachedError, UnsupportedModelError
from routereplay.runtime.seam import Adapter
from routereplay.runtime.session import RouterHandle

__all__ = ["adapters", "attach"]

_GROUP = "routereplay.adapters"
# The marker an attached model and each of its hooked routers carry in their instance
# ``__dict__`` (no nn.Module registration, not in ``state_dict``); removed by ``detach``. The
# routers' marks find a handle attached through a submodule or a parent of the model.
_MARK = "_routereplay_handle"


# Used only when routereplay runs from a source tree that was never installed (no entry points
# registered at all, e.g. ``PYTHONPATH=src`` on a GPU machine): the adapters this package ships.
_SOURCE_TREE = (("hf", "routereplay.adapters.hf"), ("megatron", "routereplay.adapters.megatron"))


def adapters() -> list[tuple[str, str]]:
    """``(name, module)`` of the registered adapters, in registration order."""
    found = [(ep.name, ep.value) for ep in entry_points(group=_GROUP)]
    return found or list(_SOURCE_TREE)


def _chunks(model: Any) -> list[Any]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def attach(
    model: Any, *, adapter: Adapter | str | None = None, replay_kernel: str = "torch", **options: Any
) -> RouterHandle:
    """Attach routereplay to an MoE model: find its routers and intercept them.

    Args:
        model: the model instance (or a list of model chunks, e.g. pipeline stages), intercepted
            on its module instances only.
        adapter: an adapter module / object, or the name of a registered one; default: the first
            registered adapter that claims the model.
        replay_kernel: how forced ids become gate weights: ``"torch"`` (``routing.route``, PyTorch
            ops, every spec) or ``"triton"`` (the fused kernel of ``routereplay.kernels`` on CUDA
            for the specs it covers, bit for bit equal to ``"torch"`` there (``kernels.ulp_bound``);
            ``routing.route`` for the other specs and devices). Needs triton for ``"triton"``.
        **options: passed to the adapter's ``discover``.

    Returns:
        A :class:`~routereplay.runtime.session.RouterHandle`; ``handle.detach()`` (or leaving
        ``with attach(model) as handle:``) restores the model exactly.

    Raises:
        AlreadyAttachedError: the model is attached already (detach that handle first).
        UnsupportedModelError: no adapter claims the model, or it has no replayable router.
    """
    for chunk in _chunks(model):
        existing = _handle_of(chunk)
        if existing is not None and any(c is chunk for c in _chunks(existing.model)):
            raise AlreadyAttachedError(
                f"{type(chunk).__name__} is already attached to {existing!r}; call detach() on that handle "
                "first, or keep using it (two handles on one model would both intercept its routers)"
            )
        _refuse_nested(chunk)
    ad = _resolve(model, adapter)
    discovery = ad.discover(model, **options)
    handle = RouterHandle(model, discovery, adapter=ad.NAME, replay_kernel=replay_kernel)
    removers = ad.install(model, discovery, handle.calls)
    routers = [_module_at(model, layer.path) for layer in discovery.layers]
    handle._routers = tuple(r for r in routers if r is not None)
    for marked in [*_chunks(model), *handle._routers]:
        if hasattr(marked, "__dict__"):
            marked.__dict__[_MARK] = weakref.ref(handle)
            removers.append(lambda marked=marked: marked.__dict__.pop(_MARK, None))
    # after detach, a backward owed by a forward made while attached re-installs the interception
    # for its recomputes (session.RouterHandle.detach)
    handle._installed(removers, reinstall=lambda: ad.install(model, discovery, handle.calls))
    return handle


def _handle_of(module: Any) -> RouterHandle | None:
    """The attached handle whose mark ``module`` carries and that hooks ``module`` itself
    (identity, not the mark alone: a deepcopy of an attached model copies the marks, not the hooks)."""
    mark = getattr(module, "__dict__", {}).get(_MARK)
    existing = mark() if mark is not None else None
    if existing is None or not existing.attached:
        return None
    if any(module is c for c in _chunks(existing.model)) or any(module is r for r in existing._routers):
        return existing
    return None


def _refuse_nested(chunk: Any) -> None:
    """Refuse ``chunk`` when a router inside it is hooked by an attached handle: attached through a
    submodule of ``chunk`` (``attach(model.model)`` first), or through a parent (``attach(model)``
    first, now ``attach(model.model)``). Two handles would both intercept those routers.

    Raises:
        AlreadyAttachedError: naming the attached module's path and the handle.
    """
    named = getattr(chunk, "named_modules", None)
    if named is None:
        return
    modules = list(named())
    path_of = {id(m): p for p, m in modules}
    for _path, module in modules:
        existing = _handle_of(module)
        if existing is None:
            continue
        fix = "call detach() on that handle first, or keep using it (two handles would both intercept its routers)"
        inside = [(path_of[id(c)], c) for c in _chunks(existing.model) if id(c) in path_of]
        if inside:
            p, c = inside[0]
            raise AlreadyAttachedError(
                f"{type(chunk).__name__}: its submodule {p!r} ({type(c).__name__}) is already attached to "
                f"{existing!r}; {fix}"
            )
        outer = [c for c in _chunks(existing.model) if hasattr(c, "named_modules")]
        found = next(((p, c) for c in outer for p, m in c.named_modules() if m is chunk), None)
        part = f"the submodule {found[0]!r} of {type(found[1]).__name__}" if found else "part of a model"
        raise AlreadyAttachedError(
            f"{type(chunk).__name__} is {part}, which is already attached to {existing!r}; {fix}"
        )


def _module_at(model: Any, path: str) -> Any:
    """The module at ``path`` (a chunk list's paths start with the chunk index), or None."""
    try:
        if isinstance(model, (list, tuple)):
            first, _, rest = path.partition(".")
            chunk = model[int(first)]
            return chunk.get_submodule(rest) if rest else chunk
        return model.get_submodule(path)
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def _resolve(model: Any, adapter: Adapter | str | None) -> Adapter:
    if adapter is not None and not isinstance(adapter, str):
        return adapter
    registered = adapters()
    if isinstance(adapter, str):
        for name, module in registered:
            if name == adapter:
                return importlib.import_module(module)
        raise UnsupportedModelError(
            f"no routereplay adapter named {adapter!r}; registered: {[n for n, _ in registered]}"
        )
    for _name, module in registered:
        candidate = importlib.import_module(module)
        if candidate.claims(model):
            return candidate
    cls = type(model)
    raise UnsupportedModelError(
        f"no routereplay adapter claims {cls.__module__}.{cls.__qualname__}; registered adapters: "
        f"{[n for n, _ in registered] or 'none (is routereplay installed? pip install -e .)'} "
        "(transformers models: pip install 'routereplay[hf]'; megatron-core GPTModel: 'routereplay[megatron]')"
    )
