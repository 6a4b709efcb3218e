"""Infer the RouterSpec of a router class no table names, by probing the router itself.

A transformers MoE router returns ``(router_logits_NE, weights_NK, ids_NK)``. When its class has
no hand-written entry in :mod:`routereplay.adapters.hf_specs`, :func:`infer` searches the
:class:`~routereplay.core.routing.RouterSpec` space for a spec whose :func:`~routereplay.core.routing.route`
gives the router's own ids and weights **bit for bit**, and accepts it only then:

1. **Probes.** The router's own ``forward`` runs on a battery of inputs, each in every dtype
   setting a model may run it in: the module as it is (its own weights); and a copy with seeded
   random parameters in fp32, in bf16, and with fp32 parameters fed bf16 inputs (the
   keep-in-fp32 case). Inputs: random hidden states; the same times 100 (saturated scores, ties
   at 1.0); times 1e-3; all zeros (every logit tied); repeated rows. Randomising the copy's
   parameters makes the battery discriminate even when the model's own router weights are
   zero-initialised.
2. **Candidates**, read from the module, never guessed from its name: the selection bias is any
   1-D float parameter or buffer as wide as the logits (or a forward argument named ``*bias*``);
   the scaling factor is any float attribute of the router or its config whose name mentions
   ``scal``, or top-k; renormalisation epsilons are 0, 1e-20, 1e-6 and any ``*eps*`` /
   ``norm_min`` attribute; groups are the router's or config's ``n_group`` / ``num_group`` /
   ``num_expert_group`` and ``topk_group``; routed experts are ``num_experts``-like attributes
   narrower than the logits (zero-computation experts beyond them).
3. **Search** in two stages: the selection fields (score function, before / after the top-k,
   bias and where it is added, groups with their score and fill, sorted top-k, compute dtype)
   must reproduce the ids; for each survivor, the weight fields (renormalisation, scaling,
   score cast, output dtype, per-expert scale) must reproduce the weights. Every candidate runs
   on the first probe first, so most die after one ``route`` call.
4. **Verdict.** Survivors of every probe are bit-identical to the router on the whole battery;
   the one with the fewest non-default fields is kept. None: :class:`UnsupportedRouterError`
   naming the closest candidate and the first probe and row where it differs. Approximate
   matches are never accepted.

Results are cached per router class, its scalar attributes and parameter shapes (the things
the math can depend on), so a model with 60 layers of one router class probes once.

This module imports neither transformers nor model code.

Legend: N probe rows, H hidden size, E logits width, K top-k.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from routereplay.core.errors import RouterSpecError, UnsupportedRouterError
from routereplay.core.routing import RouterSpec, route

__all__ = [
    "MISSING",
    "InferredRouter",
    "cache_clear",
    "forward_argument",
    "infer",
    "non_default_fields",
    "tensor_at",
    "verify",
]

_F32, _BF16 = torch.float32, torch.bfloat16
_NUM_EXPERT_NAMES = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
_GROUP_NAMES = ("n_group", "num_group", "num_expert_group")
_CACHE_SIZE = 256


@dataclass(frozen=True, kw_only=True, slots=True)
class InferredRouter:
    """A RouterSpec proven on the battery, and where the router keeps its per-call inputs.

    Attributes:
        spec: the spec whose ``route`` equals the router bit for bit on every probe.
        bias_attr: name of the router's parameter or buffer holding the selection bias.
        bias_arg: ``(position, name)`` of the forward argument carrying the selection bias
            (position among the forward's parameters, the hidden states being 0).
        scale_attr: name of the router's per-expert weight scale.
        upcast_weights: the router returns the weights in a wider dtype than ``route`` computes
            them in (e.g. rounded to bf16, then returned as fp32): the adapter upcasts, exactly.
        probes: probes the spec was checked on.
        seconds: wall time of the probing and search that found it (a cache hit returns the same
            record, so this is the cost paid once per class and config).
    """

    spec: RouterSpec
    bias_attr: str | None = None
    bias_arg: tuple[int, str] | None = None
    scale_attr: str | None = None
    upcast_weights: bool = False
    probes: int = 0
    seconds: float = 0.0

    def bias(self, router: nn.Module, args: Any = None, kwargs: Any = None) -> torch.Tensor | None:
        """The selection bias of one router call (``[E]``), or None when the spec has none."""
        if self.bias_attr is not None:
            return tensor_at(router, self.bias_attr)
        if self.bias_arg is not None:
            position, name = self.bias_arg
            value = forward_argument(args, kwargs, position, name)
            if value is not MISSING:
                return value
            raise RouterSpecError(
                f"{type(router).__name__}: the selection bias is the forward argument {name!r} "
                f"(position {position}); pass the call's args/kwargs"
            )
        return None

    def expert_scale(self, router: nn.Module) -> torch.Tensor | None:
        return tensor_at(router, self.scale_attr) if self.scale_attr is not None else None


MISSING = object()  # forward_argument: the call did not pass the argument


def forward_argument(args: Any, kwargs: Any, position: int, name: str) -> Any:
    """A router call's argument, by keyword ``name`` or at ``position`` (counting the hidden states
    as 0), or :data:`MISSING`."""
    if kwargs and name in kwargs:
        return kwargs[name]
    if args is not None and len(args) > position:
        return args[position]
    return MISSING


_cache: OrderedDict[tuple, InferredRouter | UnsupportedRouterError] = OrderedDict()


def cache_clear() -> None:
    """Forget every inferred spec (tests, or after editing a router class in place)."""
    _cache.clear()


def non_default_fields(spec: RouterSpec) -> tuple[str, ...]:
    """Fields of ``spec`` that differ from RouterSpec's defaults (sizes and family excluded)."""
    skip = {"num_experts", "top_k", "num_logits", "family"}
    base = RouterSpec(num_experts=spec.num_experts, top_k=spec.top_k, num_logits=spec.num_logits)
    out = []
    for f in fields(RouterSpec):
        if f.name in skip:
            continue
        a, b = getattr(spec, f.name), getattr(base, f.name)
        if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            out.append(f.name)
    return tuple(out)


# --- reading the module ---------------------------------------------------------------------
def _scalars(obj: Any) -> dict[str, Any]:
    out = {}
    for name, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if name.startswith("_") or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
    return out


def _vectors(router: nn.Module, width: int) -> list[str]:
    """Dotted names of the router's float tensors that are one value per logit (``[E]``, or
    ``[1, E]`` as ERNIE's ``moe_statics`` keeps it): the candidates for a bias or a scale."""
    named = [*router.named_parameters(), *router.named_buffers()]
    return [n for n, t in named if t.is_floating_point() and t.numel() == width and t.shape[-1] == width]


def tensor_at(router: nn.Module, name: str) -> torch.Tensor:
    """The router's tensor at a dotted ``name`` (read on every call: the module may have moved),
    as a 1-D ``[E]`` tensor (ERNIE keeps its bias as ``[1, E]``)."""
    t = router
    for part in name.split("."):
        t = getattr(t, part)
    return t if t.ndim == 1 else t.reshape(-1)


def _cache_key(router: nn.Module, config: Any) -> tuple:
    shapes = tuple(sorted((n, tuple(t.shape)) for n, t in router.state_dict().items()))
    scalars = tuple(sorted((k, repr(v)) for k, v in _scalars(router).items()))
    wanted = (*_NUM_EXPERT_NAMES, *_GROUP_NAMES, "topk_group", "scoring_func", "hidden_size")
    from_config = tuple(
        (n, repr(getattr(config, n, None))) for n in wanted + tuple(k for k in _scalars(config) if "scal" in k)
    )
    return (type(router), shapes, scalars, from_config)


def _hidden_size(router: nn.Module, config: Any) -> int:
    h = getattr(router, "hidden_dim", None) or getattr(router, "hidden_size", None)
    if isinstance(h, int):
        return h
    h = getattr(config, "hidden_size", None)
    if isinstance(h, int):
        return h
    for p in router.parameters():
        if p.ndim == 2:
            return int(p.shape[1])
    raise UnsupportedRouterError(
        f"{_where(router)}: cannot tell its input width (no hidden_dim attribute, no config.hidden_size, "
        "no 2-D weight); a RouterSpec cannot be inferred, add an override in routereplay.adapters.hf_specs"
    )


def _bias_argument(router: nn.Module) -> tuple[int, str] | None:
    """A forward parameter after the hidden states whose name says it is a bias."""
    params = list(inspect.signature(router.forward).parameters.values())
    for i, p in enumerate(params[1:], start=1):
        if "bias" in p.name:
            return i, p.name
    return None


def _required_extra_args(router: nn.Module) -> list[str]:
    params = list(inspect.signature(router.forward).parameters.values())
    return [
        p.name
        for p in params[1:]
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and "bias" not in p.name
    ]


# --- probes ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Probe:
    name: str
    logits_NE: torch.Tensor
    weights_NK: torch.Tensor
    ids_NK: torch.Tensor
    input_dtype: torch.dtype
    bias_E: torch.Tensor | None  # the forward-argument bias given, if any
    module: nn.Module  # the module the probe ran on (its bias / scale tensors)


def _inputs(num_rows: int, hidden: int, gen: torch.Generator) -> Iterator[tuple[str, torch.Tensor]]:
    x = torch.randn(num_rows, hidden, generator=gen)
    yield "random", x
    yield "random x100", x * 100
    yield "random x1e-3", x * 1e-3
    yield "zeros", torch.zeros(4, hidden)
    yield "repeated rows", x[:4].repeat(3, 1)
    scale_N1 = torch.logspace(-2, 3, num_rows).unsqueeze(1)
    yield "negative ramp", -x.abs() * scale_N1 / math.sqrt(hidden)


def _randomised(router: nn.Module, dtype: torch.dtype, seed: int, *, positive: bool = False) -> nn.Module:
    twin = copy.deepcopy(router).to("cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*twin.parameters(), *twin.buffers()]:
            if t.is_floating_point():
                fan_in = t.shape[-1] if t.ndim >= 2 else 1
                values = torch.randn(t.shape, generator=gen) / math.sqrt(fan_in)
                t.copy_(values.abs() if positive and t.ndim >= 2 else values)
    return twin.to(dtype)


def _settings(router: nn.Module) -> Iterator[tuple[str, nn.Module, torch.dtype]]:
    """(name, module, input dtype) of every dtype setting the battery runs in."""
    own = next((p.dtype for p in router.parameters() if p.is_floating_point()), _F32)
    yield f"the router's own weights ({own})", router, own
    yield "random fp32 weights, fp32 input", _randomised(router, _F32, 1), _F32
    yield "random bf16 weights, bf16 input", _randomised(router, _BF16, 2), _BF16
    yield "random fp32 weights, bf16 input", _randomised(router, _F32, 3), _BF16
    # positive weights, so that the "negative ramp" input gives every logit of a row one sign and
    # magnitudes from 1e-2 to 1e3: sigmoid scores down to 1e-40, where a renormalisation epsilon
    # (1e-20) shows
    yield "random positive fp32 weights, fp32 input", _randomised(router, _F32, 4, positive=True), _F32


def _call(module: nn.Module, x: torch.Tensor, bias_arg: tuple[int, str] | None, bias_E: torch.Tensor | None):
    if bias_arg is None:
        return module(x)
    return module(x, **{bias_arg[1]: bias_E})


def _call_flat(module: nn.Module, x_NH: torch.Tensor, bias_arg, bias_E) -> Any:
    """The router's output for ``[N, H]`` rows, with any ``[1, N, ...]`` outputs flattened to
    ``[N, ...]``: a router that wants ``[B, S, H]`` (as its MoE block passes it) gets ``[1, N, H]``."""
    try:
        out = _call(module, x_NH, bias_arg, bias_E)
    except (RuntimeError, ValueError, TypeError, IndexError):  # e.g. `_, _, hidden = x.shape`
        out = _call(module, x_NH.unsqueeze(0), bias_arg, bias_E)
    if isinstance(out, tuple):
        out = tuple(
            t.flatten(0, 1) if isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[0] == 1 else t for t in out
        )
    return out


def _standard(out: Any) -> bool:
    """``(logits [N, E] float, weights [N, K] float, ids [N, K] int, ...)``."""
    if not (isinstance(out, tuple) and len(out) >= 3 and all(isinstance(t, torch.Tensor) for t in out[:3])):
        return False
    logits, weights, ids = out[:3]
    return (
        logits.ndim == weights.ndim == ids.ndim == 2
        and weights.shape == ids.shape
        and logits.shape[0] == ids.shape[0]
        and logits.is_floating_point()
        and weights.is_floating_point()
        and not ids.is_floating_point()
    )


def _probes(router: nn.Module, config: Any, bias_arg: tuple[int, str] | None) -> list[_Probe]:
    where = _where(router)
    hidden = _hidden_size(router, config)
    probes: list[_Probe] = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for setting, module, dtype in _settings(router):
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            for name, x in _inputs(32, hidden, gen):
                x = x.to(device=device, dtype=dtype)
                bias_E = None
                try:
                    if bias_arg is not None:
                        width = _output_width(module, x, bias_arg)
                        bias_E = (0.05 * torch.randn(width, generator=gen)).to(device)
                    out = _call_flat(module, x, bias_arg, bias_E)
                except Exception as e:  # a dtype setting the router's own code rejects is not one it runs in
                    if setting.startswith("the router's own"):
                        raise UnsupportedRouterError(
                            f"{where}: its forward failed on a probe ({name}, {dtype}): {type(e).__name__}: {e}"
                        ) from e
                    break
                if not _standard(out):
                    raise UnsupportedRouterError(
                        f"{where}: returned {_describe(out)}; inference needs (router_logits [N, E], "
                        "weights [N, K], ids [N, K]); add an override in routereplay.adapters.hf_specs"
                    )
                probes.append(
                    _Probe(f"{name}, {setting}", out[0], out[1], out[2].long(), dtype, bias_E, module)
                )
    return probes


def _output_width(module: nn.Module, x: torch.Tensor, bias_arg: tuple[int, str]) -> int:
    for p in module.parameters():
        if p.ndim == 2 and p.shape[1] == x.shape[-1]:
            return int(p.shape[0])
    raise UnsupportedRouterError(
        f"{_where(module)}: its forward takes a bias argument ({bias_arg[1]!r}) but its logits width cannot "
        "be read from a 2-D weight; add an override in routereplay.adapters.hf_specs"
    )


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor {tuple(out.shape)} {out.dtype}"
    if isinstance(out, tuple):
        return "(" + ", ".join(_describe(o) for o in out) + ")"
    return type(out).__name__


# --- candidates ------------------------------------------------------------------------------
def _attr_or_config(router: nn.Module, config: Any, names: tuple[str, ...]) -> Any:
    for obj in (router, config):
        for n in names:
            v = getattr(obj, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _float_attrs(router: nn.Module, config: Any, test: Callable[[str], bool]) -> list[float]:
    values = []
    for obj in (router, config):
        for k, v in _scalars(obj).items() if obj is not None else ():
            if test(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v:
                values.append(float(v))
    return list(dict.fromkeys(values))


@dataclass(frozen=True, slots=True)
class _Selection:
    spec: RouterSpec
    bias_attr: str | None
    bias_arg: tuple[int, str] | None


def _selections(router, config, probe: _Probe, bias_arg, low: bool) -> Iterator[_Selection]:
    E, K = probe.logits_NE.shape[1], probe.ids_NK.shape[1]
    experts = [E] + [
        n
        for n in dict.fromkeys(
            v for v in (_attr_or_config(router, config, (name,)) for name in _NUM_EXPERT_NAMES) if v is not None
        )
        if K <= n < E
    ]
    biases: list[tuple[str | None, tuple | None, str]] = [(None, None, "scores")]
    for name in _vectors(router, E):
        biases += [(name, None, "scores"), (name, None, "logits")]
    if bias_arg is not None:
        biases += [(None, bias_arg, "scores"), (None, bias_arg, "logits")]
    groups: list[tuple[int | None, int | None, int, float]] = [(None, None, 2, float("-inf"))]
    n_group = _attr_or_config(router, config, _GROUP_NAMES)
    topk_group = _attr_or_config(router, config, ("topk_group",))
    if n_group and topk_group and n_group > 1:
        groups += [(n_group, topk_group, n, fill) for n in (2, 1) for fill in (float("-inf"), 0.0)]
    compute = [None, _F32] if low else [None]
    for num_experts, sf, before, (b_attr, b_arg, b_on), (ng, tg, topn, fill), srt, cd in itertools.product(
        experts, ("softmax", "sigmoid", "sqrtsoftplus", "none"), (True, False), biases, groups, (True, False), compute
    ):
        uses_bias = b_attr is not None or b_arg is not None
        if not uses_bias and b_on == "logits":
            continue
        try:
            spec = RouterSpec(
                family=_family(router),
                num_experts=num_experts,
                num_logits=E,
                top_k=K,
                score_function=sf,
                score_before_topk=before,
                uses_bias=uses_bias,
                bias_on=b_on,
                n_group=ng,
                topk_group=tg,
                group_score_topn=topn,
                group_mask_value=fill,
                topk_sorted=srt,
                compute_dtype=cd,
            )
        except RouterSpecError:
            continue
        yield _Selection(spec, b_attr, b_arg)


def _weight_variants(router, config, sel: _Selection, low: bool) -> Iterator[tuple[RouterSpec, str | None]]:
    spec = sel.spec
    K = spec.top_k
    eps_attrs = _float_attrs(router, config, lambda k: "eps" in k or k == "norm_min")
    norms = [(False, "sum", 0.0)] + [(True, "sum", e) for e in dict.fromkeys([0.0, 1e-20, 1e-6, *eps_attrs])]
    norms += [(True, "clamp", e) for e in eps_attrs]
    scale_values = dict.fromkeys([*_float_attrs(router, config, lambda k: "scal" in k), float(K)])
    scales = [(1.0, "mul")] + [(s, op) for s in scale_values for op in ("mul", "div") if s != 1.0]
    scale_attrs: list[str | None] = [None] + [n for n in _vectors(router, spec.num_logits) if n != sel.bias_attr]
    casts = (False, True) if low else (False,)
    wdtypes = ("keep", "logits", "input") if low else ("keep",)
    candidates = itertools.product(norms, scales, casts, wdtypes, scale_attrs)
    for (norm, kind, eps), (s, op), cast, wd, scale_attr in candidates:
        try:
            yield (
                replace(
                    spec,
                    norm_topk_prob=norm,
                    norm_kind=kind,
                    norm_eps=eps,
                    scaling_factor=s,
                    scaling_op=op,
                    cast_scores=cast,
                    weights_dtype=wd,
                    uses_expert_scale=scale_attr is not None,
                ),
                scale_attr,
            )
        except RouterSpecError:
            continue


def _where(router: nn.Module) -> str:
    return f"{type(router).__name__} ({_family(router)})"


def _family(router: nn.Module) -> str:
    parts = type(router).__module__.split(".")
    return parts[parts.index("models") + 1] if "models" in parts else type(router).__name__


# --- checking ----------------------------------------------------------------------------------
def _bias_of(probe: _Probe, bias_attr: str | None, bias_arg) -> torch.Tensor | None:
    if bias_attr is not None:
        return tensor_at(probe.module, bias_attr)
    if bias_arg is not None:
        return probe.bias_E
    return None


def _run(probe: _Probe, spec: RouterSpec, bias_attr, bias_arg, scale_attr, forced: bool):
    kw: dict[str, Any] = {"validate": False}
    if spec.uses_bias:
        kw["bias_E"] = _bias_of(probe, bias_attr, bias_arg)
    if spec.uses_expert_scale:
        kw["expert_scale_E"] = tensor_at(probe.module, scale_attr)
    if spec.weights_dtype == "input":
        kw["out_dtype"] = probe.input_dtype
    if forced:
        kw["forced_TK"] = probe.ids_NK
    with torch.no_grad():
        return route(probe.logits_NE, spec, **kw)


def _ids_match(probe: _Probe, sel: _Selection) -> str | None:
    """None when the selection reproduces the router's ids on ``probe``, else where it differs."""
    try:
        _w, ids = _run(probe, sel.spec, sel.bias_attr, sel.bias_arg, None, forced=False)
    except (RouterSpecError, RuntimeError) as e:
        return f"route raised {type(e).__name__}: {e}"
    return _ids_differ(ids, probe.ids_NK)


def _ids_differ(ids_NK: torch.Tensor, live_NK: torch.Tensor) -> str | None:
    """None when the ids are the router's, else the first row where they differ."""
    if torch.equal(ids_NK, live_NK):
        return None
    row = int((ids_NK != live_NK).any(dim=1).nonzero()[0, 0])
    return f"row {row}: router ids {live_NK[row].tolist()}, spec ids {ids_NK[row].tolist()}"


def _weights_match(probe: _Probe, spec, sel: _Selection, scale_attr) -> tuple[str | None, bool]:
    """(None or where it differs, whether an exact upcast was needed)."""
    try:
        w, _ids = _run(probe, spec, sel.bias_attr, sel.bias_arg, scale_attr, forced=True)
    except (RouterSpecError, RuntimeError) as e:
        return f"route raised {type(e).__name__}: {e}", False
    return _weights_differ(w, probe.weights_NK)


def _weights_differ(w: torch.Tensor, live: torch.Tensor) -> tuple[str | None, bool]:
    """(None when ``w`` is the router's ``live`` weights bit for bit, an exact upcast allowed, else the
    first difference; whether the upcast was needed)."""
    upcast = w.dtype != live.dtype
    if upcast:
        if not (w.is_floating_point() and torch.finfo(w.dtype).bits < torch.finfo(live.dtype).bits):
            return f"dtype: router weights {live.dtype}, spec weights {w.dtype}", False
        w = w.to(live.dtype)
    if torch.equal(w.view(_int_of(w)), live.view(_int_of(live))):  # bit for bit (-0.0, NaN payloads)
        return None, upcast
    differ_NK = w.view(_int_of(w)) != live.view(_int_of(live))
    row = int(differ_NK.any(dim=1).nonzero()[0, 0])
    return f"row {row}: router weights {live[row].tolist()}, spec weights {w[row].tolist()}", upcast


def _int_of(t: torch.Tensor) -> torch.dtype:
    return {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]


# --- the search --------------------------------------------------------------------------------
def infer(router: nn.Module, config: Any) -> InferredRouter:
    """The RouterSpec that reproduces ``router`` bit for bit on the probe battery.

    Args:
        router: a router module whose forward returns ``(router_logits, weights, ids)``.
        config: the model's (text) config, read for group sizes and scaling factors the router
            does not hold itself.

    Returns:
        The proven spec, where the bias and per-expert scale live, and what the probe cost.

    Raises:
        UnsupportedRouterError: the forward needs arguments the probe cannot give, returns
            something else, or no spec in the space reproduces it; the message names the
            closest spec and the first probe and row where it differs.
    """
    key = _cache_key(router, config)
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        if isinstance(hit, UnsupportedRouterError):
            raise UnsupportedRouterError(str(hit))
        return hit
    try:
        result: InferredRouter | UnsupportedRouterError = _infer(router, config)
    except UnsupportedRouterError as e:
        result = e
    _cache[key] = result
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    if isinstance(result, UnsupportedRouterError):
        raise result
    return result


def _infer(router: nn.Module, config: Any) -> InferredRouter:
    start = time.perf_counter()
    where = _where(router)
    extra = _required_extra_args(router)
    if extra:
        raise UnsupportedRouterError(
            f"{where}: its forward needs {extra} besides the hidden states, which a probe cannot supply; "
            "add an override in routereplay.adapters.hf_specs"
        )
    bias_arg = _bias_argument(router)
    probes = _probes(router, config, bias_arg)

    closest: tuple[int, str, str] = (-1, "", "")  # (probes passed, spec text, first difference)

    def note(passed: int, spec: RouterSpec, probe: _Probe, diff: str) -> None:
        nonlocal closest
        if passed > closest[0]:
            closest = (passed, _spec_text(spec), f"probe '{probe.name}', {diff}")

    low = any(p.logits_NE.dtype != _F32 or p.input_dtype != _F32 for p in probes)
    selections = []
    for sel in _selections(router, config, probes[0], bias_arg, low):
        for passed, probe in enumerate(probes):
            diff = _ids_match(probe, sel)
            if diff is not None:
                note(passed, sel.spec, probe, "ids differ at " + diff)
                break
        else:
            selections.append(sel)

    found: list[tuple[tuple, InferredRouter]] = []
    for sel in selections:
        for spec, scale_attr in _weight_variants(router, config, sel, low):
            passed, upcast = len(probes), False
            for i, probe in enumerate(probes):
                diff, up = _weights_match(probe, spec, sel, scale_attr)
                if diff is not None:
                    passed = len(probes) + i
                    note(passed, spec, probe, "weights differ at " + diff)
                    break
                upcast |= up
            else:
                inferred = InferredRouter(
                    spec=spec,
                    bias_attr=sel.bias_attr,
                    bias_arg=sel.bias_arg,
                    scale_attr=scale_attr,
                    upcast_weights=upcast,
                    probes=len(probes),
                )
                found.append(((_cost(spec), _WDTYPE_RANK[spec.weights_dtype], _spec_text(spec)), inferred))
    if not found:
        _passed, spec_text, diff = closest
        raise UnsupportedRouterError(
            f"{where}: no RouterSpec reproduces this router bit for bit on the probe battery "
            f"({len(probes)} probes); closest: {spec_text or 'none'}, first difference: {diff or 'n/a'}. "
            "Add an override in routereplay.adapters.hf_specs if its math is expressible, or report the router"
        )
    best = min(found, key=lambda f: f[0])[1]
    return replace(best, seconds=time.perf_counter() - start)


_WDTYPE_RANK = {"keep": 0, "logits": 1, "input": 2}


def _cost(spec: RouterSpec) -> int:
    """Preference among specs the battery cannot tell apart: fewest non-default fields; a score
    cast (Megatron's habit, rare in HuggingFace routers) counts double."""
    extra = non_default_fields(spec)
    return len(extra) + ("cast_scores" in extra)


def _spec_text(spec: RouterSpec) -> str:
    parts = [f"{n}={getattr(spec, n)!r}" for n in ("num_experts", "top_k", *non_default_fields(spec))]
    return "RouterSpec(" + ", ".join(parts) + ")"


def verify(
    router: nn.Module,
    config: Any,
    spec: RouterSpec,
    *,
    bias: Callable[[nn.Module, tuple, dict], torch.Tensor | None] | None = None,
    expert_scale: Callable[[nn.Module], torch.Tensor | None] | None = None,
) -> str | None:
    """Check a given spec (a hand-written override) on the battery :func:`infer` uses.

    Args:
        router, config: as for :func:`infer`.
        spec: the spec to check.
        bias: ``bias(module, args, kwargs)`` -> the selection bias of a call (the module is the
            probed router or its randomised copy; a forward-argument bias is in ``kwargs``).
        expert_scale: ``expert_scale(module)`` -> the per-expert scale.

    Returns:
        None when ``route`` with ``spec`` equals the router bit for bit (ids live, weights at the
        router's ids, exact upcast allowed) on every probe; else the first difference.
    """
    bias_arg = _bias_argument(router)
    for probe in _probes(router, config, bias_arg):
        kwargs = {bias_arg[1]: probe.bias_E} if bias_arg is not None else {}
        kw: dict[str, Any] = {"validate": False}
        if spec.uses_bias:
            kw["bias_E"] = bias(probe.module, (), kwargs) if bias is not None else None
        if spec.uses_expert_scale:
            kw["expert_scale_E"] = expert_scale(probe.module) if expert_scale is not None else None
        if spec.weights_dtype == "input":
            kw["out_dtype"] = probe.input_dtype
        with torch.no_grad():
            _w, ids = route(probe.logits_NE, spec, **kw)
            w, _ids = route(probe.logits_NE, spec, forced_TK=probe.ids_NK, **kw)
        diff = _ids_differ(ids, probe.ids_NK)
        if diff is not None:
            return f"probe '{probe.name}', ids differ at {diff}"
        diff, _upcast = _weights_differ(w, probe.weights_NK)
        if diff is not None:
            return f"probe '{probe.name}', weights differ at {diff}"
    return None
