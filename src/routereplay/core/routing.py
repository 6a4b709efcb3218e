"""Routing math: live top-k routing and replay of forced expert ids, bit for bit per family.

A :class:`RouterSpec` describes, field by field, how one router family turns its logits into
``(weights_TK, experts_TK)``: the score function, whether it runs before or after the top-k,
renormalisation, group-limited selection, scaling, and every dtype cast in between. :func:`route`
runs that math live, or with ``forced_TK`` replaces the selection and recomputes the gate weights
from the live logits at the forced ids (a gather, so gradients reach the logits and the router).

The pipeline, in the order :func:`route` applies it (each step only where the spec asks for it)::

    x_TE       = logits_TE cast to compute_dtype
    scores_TE  = score_function(x_TE)                          (score_before_topk)
    choice_TE  = scores_TE (or logits_TE) + bias_E              (selection only)
    choice_TE  = choice_TE masked outside the topk_group best groups
    experts_TK = topk(choice_TE, top_k, sorted=topk_sorted)    (or forced_TK)
    weights_TK = scores_TE.gather(experts_TK)                   (score_before_topk)
               | score_function(x_TE.gather(experts_TK))        (score after the top-k)
    weights_TK = weights_TK / sum(weights_TK) (+eps | clamp | p-norm)
    weights_TK = weights_TK * expert_scale_E[experts_TK] * scaling_factor
    weights_TK = weights_TK cast to the logits' or the router input's dtype

Because the forced path shares every step after the selection with the live path, forcing the
ids that live routing would pick returns the live weights bit for bit.

Legend (shape suffixes used in this file):
    T  tokens (rows of the router input, flattened over batch and sequence)
    E  router logits per token (``spec.num_logits``: routed experts plus zero-computation ones)
    K  top-k slots, in the order the router ranked them (or the trace recorded them)
    G  expert groups (``spec.n_group``)

Where the semantics deliberately differ from Megatron-Core 0.16
(``moe_utils.topk_routing_with_score_function`` with ``RouterReplay``):

* Forced ids are validated (shape ``[T, K]`` with ``K == top_k``, range, no repeated expert in a
  row, at most ``topk_group`` groups per row) unless ``validate=False``; Megatron's
  ``REPLAY_FORWARD`` gathers whatever it is given.
* The group limit is checked on forced ids as a count of distinct groups (when dropped groups are
  filled with ``-inf``, i.e. the limit is strict, as in Megatron); whether those groups
  are the ones live scores would pick is not checked (the ids come from another engine, whose
  live scores differ; forcing them is the point of replay). Megatron ignores groups on replay.
* ``forced_mask_T`` lets rows without a recorded route (an engine capture has none for each
  sequence's last token) route live in the same call; Megatron has no per-row fallback.
* Weights come back as ``[T, K]`` in the order of the forced ids; Megatron returns dense
  ``[T, E]`` probs and a boolean map, which lose the order within the top-k.
* Renormalisation is a spec field for every score function (``norm_topk_prob``); Megatron always
  renormalises sigmoid scores when ``topk > 1`` (eps 1e-20) and never renormalises softmax.
* The group score sums the top ``group_score_topn`` choice values of each group; Megatron uses
  ``topk // group_topk``, HuggingFace DeepSeek-V3-style routers use 2, DeepSeek-V2 uses the max
  (``group_score_topn=1``).
* Megatron casts scores back to the logits dtype right after the score function
  (``cast_scores=True`` here); most HuggingFace families cast only the final weights
  (``weights_dtype``). Both are expressible, so both are reproduced bit for bit.
* No state: no process-global list of routers, no FIFO for activation recompute. The same call
  with the same forced ids gives the same result during recompute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from routereplay.core.errors import RouterSpecError

__all__ = ["RouterSpec", "mask_zero_experts", "route"]

ScoreFunction = Literal["softmax", "sigmoid", "sqrtsoftplus", "none"]
_SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus", "none")
_NORM_KINDS = ("sum", "clamp", "p_norm")
_WEIGHTS_DTYPES = ("keep", "logits", "input")


@dataclass(frozen=True, kw_only=True, slots=True)
class RouterSpec:
    """How one router family computes ``(weights_TK, experts_TK)`` from its logits.

    Args:
        num_experts: routed experts with weights (ids ``[0, num_experts)``).
        top_k: experts per token.
        score_function: ``"softmax"``, ``"sigmoid"``, ``"sqrtsoftplus"`` (DeepSeek-V4), or
            ``"none"`` when the router's first output already holds the scores (Gemma 4 returns
            softmax probabilities).
        score_before_topk: True: the score function runs over all E logits and the top-k picks
            among scores (softmax first). False: the top-k picks among logits and the score
            function runs over the K picked logits (softmax after the top-k).
        norm_topk_prob: renormalise the K weights of a row to sum to one.
        norm_kind: ``"sum"``: ``w / (sum(w) + norm_eps)``; ``"clamp"``:
            ``w / clamp(sum(w), min=norm_eps)`` (ERNIE); ``"p_norm"``: ``w / ||w||_p`` (DBRX).
        norm_eps: see ``norm_kind`` (0.0 divides by the plain sum).
        norm_p: the ``p`` of ``"p_norm"``.
        scaling_factor: multiplies the weights after renormalisation (``routed_scaling_factor``).
        scaling_op: ``"mul"``, or ``"div"`` for routers that divide by the factor (bit-exactness
            differs from multiplying by its inverse).
        n_group, topk_group: group-limited top-k (DeepSeek-V3 style): the E experts form
            ``n_group`` equal groups, only experts of the ``topk_group`` best groups can be picked.
            Both None for plain top-k.
        group_score_topn: a group's score is the sum of its ``group_score_topn`` largest choice
            values (2: DeepSeek-V3; 1: the max, DeepSeek-V2; ``top_k // topk_group``: Megatron).
        group_mask_value: the choice value given to experts of groups not kept (``-inf``, or 0.0
            in the families that fill with zero). Only with ``-inf`` is the group limit strict,
            and only then does ``route(validate=True)`` enforce it on forced ids.
        uses_bias: the router adds a per-expert bias to the selection (``e_score_correction_bias``);
            :func:`route` then requires ``bias_E``.
        bias_on: ``"scores"`` (bias added to the scores) or ``"logits"`` (added to the logits).
        uses_expert_scale: weights are multiplied by a learned per-expert scale at the picked
            ids (Gemma 4 ``per_expert_scale``); :func:`route` then requires ``expert_scale_E``.
        compute_dtype: dtype the score function runs in (None: the logits dtype).
        cast_scores: cast the scores back to the logits dtype right after the score function
            (Megatron); the renormalisation and scaling then run in the logits dtype.
        weights_dtype: ``"keep"`` (whatever the pipeline produced), ``"logits"`` (cast to the
            logits dtype at the end), or ``"input"`` (cast to the router input's dtype, which
            :func:`route` takes as ``out_dtype``).
        topk_sorted: the ``sorted`` flag of the router's ``torch.topk`` call; it decides the
            order of ids within K.
        num_logits: logits per token when wider than ``num_experts``: the extra ids are
            zero-computation experts (LongCat-Flash) or a skip class (ZAYA). None: ``num_experts``.
        zero_expert_mode: ``"keep"``: ids ``>= num_experts`` are returned with their weight
            (LongCat-Flash); ``"mask"``: the router turns them into id 0 with weight 0 before the
            experts run (ZAYA), see :func:`mask_zero_experts`.
        family: model family name, used in messages only.

    Raises:
        RouterSpecError: inconsistent fields; the message names the field and the value.
    """

    num_experts: int
    top_k: int
    score_function: ScoreFunction = "softmax"
    score_before_topk: bool = True
    norm_topk_prob: bool = False
    norm_kind: Literal["sum", "clamp", "p_norm"] = "sum"
    norm_eps: float = 0.0
    norm_p: float = 1.0
    scaling_factor: float = 1.0
    scaling_op: Literal["mul", "div"] = "mul"
    n_group: int | None = None
    topk_group: int | None = None
    group_score_topn: int = 2
    group_mask_value: float = float("-inf")
    uses_bias: bool = False
    bias_on: Literal["scores", "logits"] = "scores"
    uses_expert_scale: bool = False
    compute_dtype: torch.dtype | None = None
    cast_scores: bool = False
    weights_dtype: Literal["keep", "logits", "input"] = "keep"
    topk_sorted: bool = True
    num_logits: int | None = None
    zero_expert_mode: Literal["keep", "mask"] = "keep"
    family: str = ""

    def __post_init__(self) -> None:
        where = f"RouterSpec({self.family})" if self.family else "RouterSpec"

        def bad(field: str, expected: str) -> RouterSpecError:
            return RouterSpecError(f"{where}: {field} must be {expected}, found {getattr(self, field)!r}")

        for name in ("num_experts", "top_k", "group_score_topn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "a positive int")
        if self.num_logits is None:
            object.__setattr__(self, "num_logits", self.num_experts)
        elif (
            isinstance(self.num_logits, bool)
            or not isinstance(self.num_logits, int)
            or self.num_logits < self.num_experts
        ):
            raise bad("num_logits", f"an int >= num_experts ({self.num_experts}) or None")
        if self.top_k > self.num_logits:
            raise bad("top_k", f"at most num_logits ({self.num_logits})")
        if self.score_function not in _SCORE_FUNCTIONS:
            raise bad("score_function", f"one of {_SCORE_FUNCTIONS}")
        if self.norm_kind not in _NORM_KINDS:
            raise bad("norm_kind", f"one of {_NORM_KINDS}")
        if self.weights_dtype not in _WEIGHTS_DTYPES:
            raise bad("weights_dtype", f"one of {_WEIGHTS_DTYPES}")
        if self.scaling_op not in ("mul", "div"):
            raise bad("scaling_op", "'mul' or 'div'")
        if self.bias_on not in ("scores", "logits"):
            raise bad("bias_on", "'scores' or 'logits'")
        if self.zero_expert_mode not in ("keep", "mask"):
            raise bad("zero_expert_mode", "'keep' or 'mask'")
        self._check_floats(bad)
        if self.compute_dtype is not None and not (
            isinstance(self.compute_dtype, torch.dtype) and self.compute_dtype.is_floating_point
        ):
            raise bad("compute_dtype", "a floating torch.dtype or None")
        if self.uses_bias and not self.score_before_topk and self.bias_on == "scores":
            raise RouterSpecError(
                f"{where}: a selection bias on the scores needs score_before_topk=True; "
                "with the score function after the top-k set bias_on='logits'"
            )
        if self.zero_expert_mode == "mask" and self.num_logits == self.num_experts:
            raise RouterSpecError(
                f"{where}: zero_expert_mode='mask' needs num_logits > num_experts "
                f"(found num_logits={self.num_logits}, num_experts={self.num_experts})"
            )
        if (self.n_group is None) != (self.topk_group is None):
            raise RouterSpecError(
                f"{where}: n_group and topk_group go together, found n_group={self.n_group!r}, "
                f"topk_group={self.topk_group!r}; pass both (group-limited top-k) or neither"
            )
        if self.n_group is not None:
            self._check_groups(bad, where)

    def _check_floats(self, bad) -> None:
        """The norm's epsilon and p, and the weights' scaling factor: finite, in range."""
        for name in ("norm_eps", "norm_p", "scaling_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "a finite float")
        if self.norm_eps < 0:
            raise bad("norm_eps", "a float >= 0")
        if self.norm_p <= 0:
            raise bad("norm_p", "a float > 0")
        if self.scaling_factor == 0:
            raise bad("scaling_factor", "nonzero")

    def _check_groups(self, bad, where: str) -> None:
        """Group-limited top-k: the group counts divide the experts and fit top_k."""
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "a positive int")
        if self.num_logits != self.num_experts:
            raise RouterSpecError(
                f"{where}: group-limited top-k with zero-computation experts "
                f"(num_logits={self.num_logits} > num_experts={self.num_experts}) is not supported"
            )
        if self.num_experts % self.n_group:
            raise bad("n_group", f"a divisor of num_experts ({self.num_experts})")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"at most n_group ({self.n_group})")
        group_size = self.num_experts // self.n_group
        if self.group_score_topn > group_size:
            raise bad("group_score_topn", f"at most the group size ({group_size})")
        if self.top_k > self.topk_group * group_size:
            raise bad("top_k", f"at most topk_group * group size ({self.topk_group * group_size})")

    @property
    def group_size(self) -> int | None:
        """Experts per group, or None without group-limited top-k."""
        return None if self.n_group is None else self.num_experts // self.n_group


def _score(x: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The spec's score function over the last dim of ``x`` (already in the compute dtype)."""
    if spec.score_function == "softmax":
        return torch.softmax(x, dim=-1)
    if spec.score_function == "sigmoid":
        return torch.sigmoid(x)
    if spec.score_function == "sqrtsoftplus":
        return torch.nn.functional.softplus(x).sqrt()
    return x


def _to_compute(x: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    return x if spec.compute_dtype is None else x.to(spec.compute_dtype)


def _selection_scores(logits_TE: torch.Tensor, spec: RouterSpec) -> torch.Tensor | None:
    """The scores the family selects on, where it scores before its top-k (else None)."""
    if not spec.score_before_topk:
        return None
    scores_TE = _score(_to_compute(logits_TE, spec), spec)
    return scores_TE.to(logits_TE.dtype) if spec.cast_scores else scores_TE


def select_live(logits_TE: torch.Tensor, spec: RouterSpec, bias_E: torch.Tensor | None = None) -> torch.Tensor:
    """Live top-k ids ``[T, K]`` int64 of ``logits_TE``, selected exactly as :func:`route` does
    (no weights; for a kernel that computes them itself)."""
    return _select_live(logits_TE, _selection_scores(logits_TE, spec), spec, bias_E)


def _select_live(
    logits_TE: torch.Tensor, scores_TE: torch.Tensor | None, spec: RouterSpec, bias_E: torch.Tensor | None
) -> torch.Tensor:
    """Live top-k ids ``[T, K]`` int64, selection exactly as the family's router does it."""
    if scores_TE is not None and not (bias_E is not None and spec.bias_on == "logits"):
        choice_TE = scores_TE
    else:
        choice_TE = logits_TE
    if bias_E is not None:
        # the bias shifts the selection only; promotion (e.g. bf16 scores + fp32 bias) is exact
        choice_TE = choice_TE + bias_E
    if spec.n_group is not None:
        num_tokens = choice_TE.shape[0]
        choice_TGS = choice_TE.view(num_tokens, spec.n_group, spec.group_size)
        group_score_TG = choice_TGS.topk(spec.group_score_topn, dim=-1)[0].sum(dim=-1)
        group_idx_TG = torch.topk(group_score_TG, k=spec.topk_group, dim=-1, sorted=False)[1]
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, group_idx_TG, True)
        keep_TE = keep_TG.unsqueeze(-1).expand(-1, -1, spec.group_size).reshape(num_tokens, -1)
        choice_TE = choice_TE.masked_fill(~keep_TE, spec.group_mask_value)
    return torch.topk(choice_TE, k=spec.top_k, dim=-1, sorted=spec.topk_sorted)[1]


def _weights_at(
    logits_TE: torch.Tensor,
    scores_TE: torch.Tensor | None,
    experts_TK: torch.Tensor,
    spec: RouterSpec,
    expert_scale_E: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Gate weights ``[T, K]`` at ``experts_TK``: the spec's math after the selection."""
    if scores_TE is not None:
        weights_TK = scores_TE.gather(1, experts_TK)
    else:
        weights_TK = _score(_to_compute(logits_TE.gather(1, experts_TK), spec), spec)
        if spec.cast_scores:
            weights_TK = weights_TK.to(logits_TE.dtype)
    if spec.norm_topk_prob:
        if spec.norm_kind == "p_norm":
            weights_TK = weights_TK / torch.norm(weights_TK, p=spec.norm_p, dim=-1, keepdim=True)
        else:
            sum_T1 = weights_TK.sum(dim=-1, keepdim=True)
            if spec.norm_kind == "clamp":
                sum_T1 = torch.clamp(sum_T1, min=spec.norm_eps)
            elif spec.norm_eps:
                sum_T1 = sum_T1 + spec.norm_eps
            weights_TK = weights_TK / sum_T1
    if expert_scale_E is not None:
        weights_TK = weights_TK * expert_scale_E[experts_TK]
    if spec.scaling_factor != 1.0:
        if spec.scaling_op == "mul":
            weights_TK = weights_TK * spec.scaling_factor
        else:
            weights_TK = weights_TK / spec.scaling_factor
    if spec.weights_dtype == "logits":
        weights_TK = weights_TK.to(logits_TE.dtype)
    elif spec.weights_dtype == "input":
        weights_TK = weights_TK.to(out_dtype)
    return weights_TK


def _fail_row(where: str, row: int, ids: list[int], problem: str, fix: str) -> RouterSpecError:
    return RouterSpecError(f"{where}forced_TK row {row} holds expert ids {ids}: {problem}; {fix}")


# Integer dtypes whose compares every device runs (torch's uint16/32/64 have few kernels off the CPU).
_COMPARABLE_INTS = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))


def groups_spanned(experts_TK: torch.Tensor, spec: RouterSpec) -> torch.Tensor | None:
    """int ``[T]``: expert groups each row's ids span, where ``spec`` enforces a strict group limit.

    None when it does not: no groups, ``topk_group >= n_group``, or a finite fill for dropped
    groups (0.0 in some families), with which the router itself can pick an expert of a dropped
    group when the kept choices score below the fill.
    """
    if spec.n_group is None or spec.topk_group >= spec.n_group or spec.group_mask_value != float("-inf"):
        return None
    groups_TK = (experts_TK // spec.group_size).sort(dim=-1).values
    return (groups_TK[..., 1:] != groups_TK[..., :-1]).sum(dim=-1) + 1


def forced_violations(forced_TK: torch.Tensor, spec: RouterSpec, *, distinct: bool = False) -> torch.Tensor:
    """bool ``[T]`` (or ``[..., T]`` for ``[..., T, K]`` ids): rows whose forced ids the router could
    not have picked (an id outside ``[0, num_logits)``, an id twice, more groups than
    ``topk_group``). Elementwise kernels, no sort, no host sync: the ids are read in their own dtype
    (no int64 copy; a bound the dtype cannot exceed is not compared), and the slot pairs compared
    slot by slot (temporaries of at most ``[..., T, K]`` bools, not ``[..., T, K, K]``).
    ``distinct``: the rows are known to name K different ids (``RoutingTrace.rows_checked``); the
    pair compares are skipped."""
    ids_TK = forced_TK if forced_TK.dtype in _COMPARABLE_INTS else forced_TK.long()
    info = torch.iinfo(ids_TK.dtype)
    out_TK = (ids_TK < 0) if info.min < 0 else None
    if spec.num_logits <= info.max:
        high_TK = ids_TK >= spec.num_logits
        out_TK = high_TK if out_TK is None else out_TK | high_TK
    if out_TK is None:
        bad_T = torch.zeros(ids_TK.shape[:-1], dtype=torch.bool, device=ids_TK.device)
    else:
        bad_T = out_TK.any(dim=-1)
    K = ids_TK.shape[-1]
    if not distinct:
        for i in range(K - 1):  # slot i against every later slot
            bad_T |= (ids_TK[..., i : i + 1] == ids_TK[..., i + 1 :]).any(dim=-1)
    num_groups_T = groups_spanned(ids_TK, spec)
    if num_groups_T is not None:
        bad_T |= num_groups_T > spec.topk_group
    return bad_T


def validate_forced(forced_TK: torch.Tensor, forced_mask_T: torch.Tensor | None, spec: RouterSpec, where: str) -> None:
    """Range, duplicates and group limit of the forced rows (host sync: only with validate=True)."""
    rows_T = (
        forced_mask_T
        if forced_mask_T is not None
        else torch.ones(forced_TK.shape[0], dtype=torch.bool, device=forced_TK.device)
    )
    out_TK = (forced_TK < 0) | (forced_TK >= spec.num_logits)
    bad_T = out_TK.any(dim=1) & rows_T
    if bool(bad_T.any()):
        row = int(bad_T.nonzero()[0, 0])
        raise _fail_row(
            where,
            row,
            forced_TK[row].tolist(),
            f"expected ids in [0, {spec.num_logits})",
            "the trace was recorded for a router with more experts, or its layers are mapped to the wrong routers",
        )
    sorted_TK = forced_TK.sort(dim=1).values
    dup_T = (sorted_TK[:, 1:] == sorted_TK[:, :-1]).any(dim=1) & rows_T
    if bool(dup_T.any()):
        row = int(dup_T.nonzero()[0, 0])
        raise _fail_row(
            where,
            row,
            forced_TK[row].tolist(),
            f"an expert repeats; each row needs top_k={spec.top_k} distinct experts",
            "check the trace (RoutingTrace validation rejects such rows)",
        )
    num_groups_T = groups_spanned(forced_TK, spec)
    if num_groups_T is not None:
        over_T = (num_groups_T > spec.topk_group) & rows_T
        if bool(over_T.any()):
            row = int(over_T.nonzero()[0, 0])
            raise _fail_row(
                where,
                row,
                forced_TK[row].tolist(),
                f"they span {int(num_groups_T[row])} expert groups, the router allows topk_group="
                f"{spec.topk_group} of n_group={spec.n_group} (groups of {spec.group_size})",
                "the trace comes from a router with another group limit",
            )


def check_route_args(
    logits_TE: torch.Tensor,
    spec: RouterSpec,
    *,
    forced_TK: torch.Tensor | None,
    forced_mask_T: torch.Tensor | None,
    bias_E: torch.Tensor | None,
    expert_scale_E: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    where: str = "",
) -> None:
    """The argument checks of :func:`route` (shapes, dtypes, the spec's bias / scale / out_dtype
    needs); shared by every implementation of its contract (``routereplay.kernels``).

    Raises:
        RouterSpecError: the first argument that does not fit, with where / expected / found.
    """
    if not isinstance(spec, RouterSpec):
        raise RouterSpecError(f"{where}spec must be a RouterSpec, found {type(spec).__name__}")
    if not isinstance(logits_TE, torch.Tensor) or logits_TE.ndim != 2 or not logits_TE.is_floating_point():
        found = (
            f"{tuple(logits_TE.shape)} {logits_TE.dtype}"
            if isinstance(logits_TE, torch.Tensor)
            else type(logits_TE).__name__
        )
        raise RouterSpecError(f"{where}logits must be a float [T, {spec.num_logits}] tensor, found {found}")
    num_tokens, width = logits_TE.shape
    if width != spec.num_logits:
        raise RouterSpecError(
            f"{where}logits have {width} columns, the spec expects num_logits={spec.num_logits} "
            f"({spec.num_experts} routed experts); the spec was built for another router"
        )
    if spec.uses_bias != (bias_E is not None):
        need = "needs bias_E (its e_score_correction_bias)" if spec.uses_bias else "has no selection bias"
        raise RouterSpecError(
            f"{where}the {spec.family or 'router'} spec {need}, found bias_E="
            f"{'None' if bias_E is None else tuple(bias_E.shape)}; pass selection_bias(router)"
        )
    if bias_E is not None and tuple(bias_E.shape) != (spec.num_logits,):
        raise RouterSpecError(f"{where}bias_E must be [{spec.num_logits}], found {tuple(bias_E.shape)}")
    if spec.uses_expert_scale != (expert_scale_E is not None):
        need = "needs expert_scale_E" if spec.uses_expert_scale else "has no per-expert scale"
        raise RouterSpecError(
            f"{where}the {spec.family or 'router'} spec {need}, found expert_scale_E="
            f"{'None' if expert_scale_E is None else tuple(expert_scale_E.shape)}"
        )
    if expert_scale_E is not None and tuple(expert_scale_E.shape) != (spec.num_logits,):
        raise RouterSpecError(f"{where}expert_scale_E must be [{spec.num_logits}], found {tuple(expert_scale_E.shape)}")
    if spec.weights_dtype == "input" and out_dtype is None:
        raise RouterSpecError(
            f"{where}the {spec.family or 'router'} spec casts weights to the router input's dtype: "
            "pass out_dtype=hidden_states.dtype"
        )
    _check_forced_args(forced_TK, forced_mask_T, num_tokens, spec.top_k, where)


def _check_forced_args(forced_TK, forced_mask_T, num_tokens: int, top_k: int, where: str) -> None:
    """``forced_TK`` an integer ``[T, K]`` tensor and ``forced_mask_T`` a bool ``[T]`` one (with it)."""
    if forced_TK is None:
        if forced_mask_T is not None:
            raise RouterSpecError(f"{where}forced_mask_T was given without forced_TK")
        return
    if (
        not isinstance(forced_TK, torch.Tensor)
        or forced_TK.dtype == torch.bool
        or forced_TK.is_floating_point()
        or forced_TK.is_complex()
    ):
        found = f"{forced_TK.dtype}" if isinstance(forced_TK, torch.Tensor) else type(forced_TK).__name__
        raise RouterSpecError(f"{where}forced_TK must be an integer tensor, found {found}")
    if tuple(forced_TK.shape) != (num_tokens, top_k):
        raise RouterSpecError(
            f"{where}forced_TK must be [{num_tokens}, {top_k}] (rows of the router input, "
            f"top_k={top_k}), found {tuple(forced_TK.shape)}"
        )
    if forced_mask_T is not None and (
        not isinstance(forced_mask_T, torch.Tensor)
        or forced_mask_T.dtype != torch.bool
        or tuple(forced_mask_T.shape) != (num_tokens,)
    ):
        found = (
            f"{tuple(forced_mask_T.shape)} {forced_mask_T.dtype}"
            if isinstance(forced_mask_T, torch.Tensor)
            else type(forced_mask_T).__name__
        )
        raise RouterSpecError(f"{where}forced_mask_T must be bool [{num_tokens}], found {found}")


def route(
    logits_TE: torch.Tensor,
    spec: RouterSpec,
    *,
    forced_TK: torch.Tensor | None = None,
    forced_mask_T: torch.Tensor | None = None,
    bias_E: torch.Tensor | None = None,
    expert_scale_E: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    validate: bool = True,
    where: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens live, or replay forced expert ids with weights from the live logits.

    Args:
        logits_TE: router output ``[T, num_logits]`` (the probabilities for
            ``score_function="none"``), any float dtype, any device.
        spec: the router family's math.
        forced_TK: integer ``[T, top_k]`` expert ids to use instead of the live selection, in
            recorded order (any integer dtype, any device; moved to the logits' device).
        forced_mask_T: bool ``[T]``; rows marked False route live. Needs ``forced_TK``.
        bias_E: ``[num_logits]`` selection bias; required iff ``spec.uses_bias``. It changes
            which experts are picked, never the weights.
        expert_scale_E: ``[num_experts]`` per-expert weight scale; required iff
            ``spec.uses_expert_scale``.
        out_dtype: the router input's dtype; required iff ``spec.weights_dtype == "input"``.
        validate: check ``forced_TK`` (shape, range, duplicates, group limit). This reads the
            ids on the host; pass False when the trace was validated up front.
        where: prefix for error messages (e.g. ``"layer 7 (model.layers.7.mlp.gate): "``).

    Returns:
        ``(weights_TK, experts_TK)``: float weights ``[T, top_k]`` in the spec's output dtype
        (differentiable w.r.t. ``logits_TE``), int64 ids ``[T, top_k]`` on the logits' device.

    Raises:
        RouterSpecError: inputs that do not fit the spec (shape, missing bias / scale /
            out_dtype), or, with ``validate=True``, forced ids out of range, repeated in a row, over
            the group limit, or of the wrong shape; the message names the row and its ids.
    """
    check_route_args(
        logits_TE,
        spec,
        forced_TK=forced_TK,
        forced_mask_T=forced_mask_T,
        bias_E=bias_E,
        expert_scale_E=expert_scale_E,
        out_dtype=out_dtype,
        where=where,
    )

    scores_TE = _selection_scores(logits_TE, spec)
    if forced_TK is None:
        experts_TK = _select_live(logits_TE, scores_TE, spec, bias_E)
    else:
        forced_TK = forced_TK.to(device=logits_TE.device, dtype=torch.int64, non_blocking=True)
        if forced_mask_T is not None:
            forced_mask_T = forced_mask_T.to(device=logits_TE.device, non_blocking=True)
        if validate:
            validate_forced(forced_TK, forced_mask_T, spec, where)
        if forced_mask_T is None:
            experts_TK = forced_TK
        else:
            # live ids for every row, then a select: no data-dependent shapes, no host sync
            live_TK = _select_live(logits_TE, scores_TE, spec, bias_E)
            experts_TK = torch.where(forced_mask_T.unsqueeze(1), forced_TK, live_TK)
    weights_TK = _weights_at(logits_TE, scores_TE, experts_TK, spec, expert_scale_E, out_dtype)
    return weights_TK, experts_TK


def mask_zero_experts(
    weights_TK: torch.Tensor, experts_TK: torch.Tensor, spec: RouterSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the router's own treatment of ids ``>= num_experts`` before the experts run.

    For ``zero_expert_mode="mask"`` (ZAYA's skip class) such slots get id 0 and weight 0, as the
    router returns them; for ``"keep"`` the inputs come back unchanged. Record the ids that
    :func:`route` returns (before this call): after it, a skip and a real expert 0 look alike.

    Args:
        weights_TK: float ``[T, K]`` from :func:`route`.
        experts_TK: int64 ``[T, K]`` from :func:`route`.
        spec: the router's spec.

    Returns:
        ``(weights_TK, experts_TK)`` as the family's experts expect them.
    """
    if spec.zero_expert_mode == "keep":
        return weights_TK, experts_TK
    skip_TK = experts_TK >= spec.num_experts
    return weights_TK.masked_fill(skip_TK, 0), experts_TK.masked_fill(skip_TK, 0)
