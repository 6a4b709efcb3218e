"""Routing agreement and train–inference log-prob mismatch, exactly as the literature defines them.

Two families of numbers tell whether an RL run on an MoE model is training on the policy that
generated its data:

* **routing agreement** between two routings of the same tokens (rollout vs trainer, old vs new
  policy): per (token, layer) exact-set match, overlap@k, Jaccard, top-1 and ordered match, plus
  the aggregates the R3 paper reports (router-level disagreement, any-layer token disagreement,
  mean disagreeing layers per token) and a per-layer curve;
* **log-prob mismatch** on the sampled tokens: ``delta = logp_train - logp_infer`` (training
  side minus inference side, the sign every estimator below assumes), k1 / k2 / k3, mean and max
  ``|delta|``, mean probability difference, Pearson correlation of the probabilities, and the
  fraction of extreme tokens ``F(tau) = mean 1[|delta| > ln tau]``.

Both are Monte-Carlo estimates over the tokens selected by a mask (normally the response tokens);
k1 and k3 on sampled tokens are not full-vocabulary KL divergences.

**Masks: one convention for both functions.** ``mask`` selects the tokens counted (normally the
response tokens) in one of two layouts:

* **packed** ``[T]``: one entry per token of the packed data (a RoutingTrace's rows, a
  ``Rollout``'s ``input_ids``, log-probs ``[T]``);
* **padded** ``[B, S]`` together with that batch's ``attention_mask`` ``[B, S]`` (e.g. both from
  ``Rollout.padded``): the mask is read at the attention mask's real positions, row by row, which
  is the packed order of traces and rollouts. Padded log-probs ``[B, S]`` need no
  ``attention_mask``: their mask has their shape.

Legend (shape suffixes used in this file):
    T  tokens (rows of a trace, or any flattened token axis)
    L  MoE layers
    K  top-k slots, in router rank order
    N  tokens selected by the mask
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from routereplay.core.errors import MetricInputError, TraceMismatchError
from routereplay.core.trace import RoutingTrace

__all__ = ["DEFAULT_TAUS", "LogprobMismatch", "RoutingAgreement", "logprob_mismatch", "routing_agreement"]

DEFAULT_TAUS: tuple[float, ...] = (1.5, 2.0, 5.0)

# Rows compared per step: bounds the [rows, L, K, K] comparison tensor to a few tens of MB.
_CHUNK_ROWS = 8192


def _json_float(x: float) -> float | None:
    """NaN (an undefined statistic, e.g. a correlation of constants) becomes JSON ``null``."""
    return None if isinstance(x, float) and math.isnan(x) else x


@dataclass(frozen=True, kw_only=True, slots=True)
class RoutingAgreement:
    """How closely routing B reproduces routing A on the selected tokens.

    Per (token t, layer l), with ``A``, ``B`` the two expert sets of size k:
    ``m = 1[A == B]`` (order-insensitive), overlap ``|A∩B|/k``, Jaccard ``|A∩B|/|A∪B|``,
    top-1 match (first-ranked experts equal) and ordered match (identical ranked lists).

    Attributes:
        num_tokens: tokens compared (mask and both traces' ``valid`` rows).
        layer_ids: global layer ids of the L layers compared.
        top_k: k.
        disagreement: router-level ``mean_{t,l} (1 - m)`` (R3's ~10% on Qwen3-30B-A3B).
        exact_match: ``mean_{t,l} m`` = 1 - disagreement.
        overlap: ``mean_{t,l} |A∩B|/k``; ``1 - overlap`` is the share of activated experts that
            differ (GSPO's "~10% after one step").
        jaccard: ``mean_{t,l} |A∩B|/|A∪B|``.
        top1_agreement: ``mean_{t,l} 1[A_0 == B_0]``.
        ordered_match: ``mean_{t,l} 1[A == B as ranked lists]``.
        token_disagreement: ``mean_t 1[exists l: m = 0]`` (R3: 94%).
        mean_disagreeing_layers: ``mean_t sum_l (1 - m)`` (R3: ~6 of 48).
        per_layer_disagreement, per_layer_overlap: ``mean_t`` of ``1 - m`` and of the overlap,
            one value per layer in ``layer_ids`` order.

    Values are NaN when ``num_tokens == 0`` (``to_dict`` writes them as ``None``).
    """

    num_tokens: int
    layer_ids: tuple[int, ...]
    top_k: int
    disagreement: float
    exact_match: float
    overlap: float
    jaccard: float
    top1_agreement: float
    ordered_match: float
    token_disagreement: float
    mean_disagreeing_layers: float
    per_layer_disagreement: tuple[float, ...]
    per_layer_overlap: tuple[float, ...]

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples become lists, NaN becomes None)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [_json_float(v) for v in value]
            else:
                out[key] = _json_float(value)
        return out


@dataclass(frozen=True, kw_only=True, slots=True)
class LogprobMismatch:
    """Sampled-token train–inference mismatch, ``delta = logp_train - logp_infer``.

    Attributes:
        num_tokens: tokens selected by the mask.
        k1: ``mean(-delta)``, estimates KL(infer || train); can be negative.
        k2: ``mean(delta**2 / 2)``.
        k3: ``mean(exp(delta) - 1 - delta)``, >= 0 (R3: 1.5e-3 MoE, 7.5e-4 MoE + R3).
        mean_abs_delta, max_abs_delta: ``mean |delta|``, ``max |delta|``.
        prob_diff: ``mean |p_train - p_infer|`` (verl: < 0.005 normal, > 0.01 suspicious).
        pearson: Pearson correlation of ``p_train`` and ``p_infer`` (NaN when either is constant).
        extreme: ``{"F(tau)": mean 1[|delta| > ln tau]}`` for each tau (> 0.1 precedes collapse).

    Values are NaN when ``num_tokens == 0`` (``to_dict`` writes them as ``None``).
    """

    num_tokens: int
    k1: float
    k2: float
    k3: float
    mean_abs_delta: float
    max_abs_delta: float
    prob_diff: float
    pearson: float
    extreme: dict[str, float]

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (NaN becomes None); ``extreme`` stays a ``{"F(tau)": value}`` dict."""
        out = {k: _json_float(v) for k, v in asdict(self).items() if k != "extreme"}
        out["extreme"] = {k: _json_float(v) for k, v in self.extreme.items()}
        out["delta"] = "logp_train - logp_infer"
        return out


def _experts_and_valid(x: RoutingTrace | torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(x, RoutingTrace):
        return x.experts, x.valid
    if isinstance(x, torch.Tensor) and x.ndim == 3 and not x.dtype.is_floating_point:
        return x, None
    found = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
    raise MetricInputError(
        f"routing_agreement: {name} must be a RoutingTrace or an integer [T, L, K] tensor, found {found}"
    )


def _bool_mask(
    mask: torch.Tensor | Sequence[bool], device: torch.device, what: str, name: str = "mask"
) -> torch.Tensor:
    mask_X = torch.as_tensor(mask, device=device)
    if mask_X.dtype != torch.bool:
        if mask_X.dtype.is_floating_point or not bool(((mask_X == 0) | (mask_X == 1)).all()):
            raise MetricInputError(f"{what}: {name} must be bool (or 0/1 integers), found dtype {mask_X.dtype}")
        mask_X = mask_X.bool()
    return mask_X


def _packed_mask(
    mask: torch.Tensor | Sequence[bool] | None,
    attention_mask: torch.Tensor | None,
    T: int,
    device: torch.device,
    what: str,
) -> torch.Tensor:
    """bool ``[T]`` from a packed ``[T]`` mask, or a padded ``[B, S]`` mask read at ``attention_mask``'s real
    positions."""
    if mask is None:
        if attention_mask is not None:
            raise MetricInputError(f"{what}: attention_mask is given without a mask; pass the [B, S] mask it goes with")
        return torch.ones(T, dtype=torch.bool, device=device)
    mask_X = _bool_mask(mask, device, what)
    if attention_mask is not None:
        attn_BS = _bool_mask(attention_mask, device, what, "attention_mask")
        if attn_BS.ndim != 2 or mask_X.shape != attn_BS.shape:
            raise MetricInputError(
                f"{what}: a padded mask and its attention_mask must both be [B, S], found {tuple(mask_X.shape)} and "
                f"{tuple(attn_BS.shape)}"
            )
        if int(attn_BS.sum()) != T:
            raise MetricInputError(
                f"{what}: attention_mask has {int(attn_BS.sum())} real tokens but the data has {T}; pass the "
                "attention mask of the batch these tokens were packed from"
            )
        return mask_X[attn_BS]
    if mask_X.shape != (T,):
        hint = "; for a padded [B, S] mask pass attention_mask=[B, S] as well" if mask_X.ndim == 2 else ""
        raise MetricInputError(
            f"{what}: mask must have shape ({T},), one entry per token, found {tuple(mask_X.shape)}{hint}"
        )
    return mask_X


def routing_agreement(
    a: RoutingTrace | torch.Tensor,
    b: RoutingTrace | torch.Tensor,
    mask: torch.Tensor | Sequence[bool] | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
) -> RoutingAgreement:
    """Routing agreement of ``b`` against ``a`` over the same tokens.

    The metrics are symmetric; by convention ``a`` is the reference (rollout / old policy) and
    ``b`` the side under test (trainer / new policy).

    Args:
        a, b: RoutingTraces of the same tokens (same ``cu_seqlens``, ``layer_ids``, ``top_k``),
            or integer ``[T, L, K]`` tensors. Rows where either trace has ``valid`` False are
            left out (an engine capture has no route for each sequence's last token).
        mask: optional tokens to compare (e.g. response tokens only): bool ``[T]``, or a
            padded ``[B, S]`` mask with ``attention_mask`` (see the module docstring).
        attention_mask: ``[B, S]`` of the padded batch ``mask`` belongs to; its real
            positions, row by row, are the traces' ``T`` rows.

    Returns:
        RoutingAgreement over the selected tokens.

    Raises:
        MetricInputError: an input is not a trace / integer [T, L, K] tensor, or a bad mask.
        TraceMismatchError: the two routings are not of the same tokens and layers (shapes,
            ``cu_seqlens``, ``layer_ids`` or ``num_experts`` differ).
    """
    experts_a_TLK, valid_a_T = _experts_and_valid(a, "a")
    experts_b_TLK, valid_b_T = _experts_and_valid(b, "b")
    _check_same_routing_rows(a, b, experts_a_TLK, experts_b_TLK)
    T, L, K = experts_a_TLK.shape
    layer_ids = tuple(range(L))
    for x in (a, b):
        if isinstance(x, RoutingTrace):
            layer_ids = x.layer_ids
    device = experts_a_TLK.device
    experts_b_TLK = experts_b_TLK.to(device)
    keep_T = _packed_mask(mask, attention_mask, T, device, "routing_agreement")
    for valid_T in (valid_a_T, valid_b_T):
        if valid_T is not None:
            keep_T = keep_T & valid_T.to(device)
    sums, any_disagree, N = _agreement_sums(experts_a_TLK, experts_b_TLK, keep_T)

    n = float(N) if N else float("nan")
    per_layer = {name: (s / n) for name, s in sums.items()}
    mean = {name: float(v.mean()) if L else float("nan") for name, v in per_layer.items()}
    return RoutingAgreement(
        num_tokens=N,
        layer_ids=tuple(layer_ids),
        top_k=K,
        disagreement=1.0 - mean["exact"],
        exact_match=mean["exact"],
        overlap=mean["overlap"],
        jaccard=mean["jaccard"],
        top1_agreement=mean["top1"],
        ordered_match=mean["ordered"],
        token_disagreement=float(any_disagree) / n,
        mean_disagreeing_layers=float((1.0 - per_layer["exact"]).sum()),
        per_layer_disagreement=tuple((1.0 - per_layer["exact"]).tolist()),
        per_layer_overlap=tuple(per_layer["overlap"].tolist()),
    )


def _check_same_routing_rows(
    a: RoutingTrace | torch.Tensor,
    b: RoutingTrace | torch.Tensor,
    experts_a_TLK: torch.Tensor,
    experts_b_TLK: torch.Tensor,
) -> None:
    """``a`` and ``b`` route the same tokens and layers: the same ``[T, L, K]``, and for two traces the
    same ``layer_ids``, ``num_experts`` and ``cu_seqlens``."""
    if experts_a_TLK.shape != experts_b_TLK.shape:
        raise TraceMismatchError(
            f"routing_agreement: a has [T, L, K] = {list(experts_a_TLK.shape)} "
            f"but b has {list(experts_b_TLK.shape)}; "
            "compare routings of the same tokens and layers (convert engine rows to training rows with "
            "routereplay.core.layout, select common layers with trace.select_layers)"
        )
    if isinstance(a, RoutingTrace) and isinstance(b, RoutingTrace):
        for what in ("layer_ids", "num_experts"):
            if getattr(a, what) != getattr(b, what):
                raise TraceMismatchError(
                    f"routing_agreement: a has {what}={getattr(a, what)} but b has {what}={getattr(b, what)}; "
                    "both traces must come from the same model layers"
                )
        if not torch.equal(a.cu_seqlens.cpu(), b.cu_seqlens.cpu()):
            raise TraceMismatchError(
                f"routing_agreement: the traces split their {experts_a_TLK.shape[0]} tokens differently: "
                f"a has sequence lengths {a.seq_lens.tolist()}, b has {b.seq_lens.tolist()}; "
                "the rows would be compared on the wrong tokens"
            )


def _agreement_sums(
    experts_a_TLK: torch.Tensor, experts_b_TLK: torch.Tensor, keep_T: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Per-layer sums over the kept tokens (float64: exact for counts < 2**53) of exact match, overlap,
    Jaccard, top-1 and ordered match; the count of tokens that disagree on any layer; the kept tokens'
    count. Computed ``_CHUNK_ROWS`` tokens at a time."""
    _, L, K = experts_a_TLK.shape
    device = experts_a_TLK.device
    names = ("exact", "overlap", "jaccard", "top1", "ordered")
    sums = {name: torch.zeros(L, dtype=torch.float64, device=device) for name in names}
    any_disagree = torch.zeros((), dtype=torch.float64, device=device)
    rows_N = keep_T.nonzero().squeeze(1)
    N = rows_N.numel()
    for start in range(0, N, _CHUNK_ROWS):
        idx = rows_N[start : start + _CHUNK_ROWS]
        a_NLK = experts_a_TLK.index_select(0, idx).to(torch.int32)
        b_NLK = experts_b_TLK.index_select(0, idx).to(torch.int32)
        # Ids within one route are distinct, so |A∩B| = number of a-slots found anywhere in b.
        inter_NL = (a_NLK.unsqueeze(-1) == b_NLK.unsqueeze(-2)).any(-1).sum(-1).to(torch.float64)
        exact_NL = inter_NL == K
        sums["exact"] += exact_NL.sum(0, dtype=torch.float64)
        sums["overlap"] += inter_NL.sum(0) / K
        sums["jaccard"] += (inter_NL / (2 * K - inter_NL)).sum(0)
        sums["top1"] += (a_NLK[..., 0] == b_NLK[..., 0]).sum(0, dtype=torch.float64)
        sums["ordered"] += (a_NLK == b_NLK).all(-1).sum(0, dtype=torch.float64)
        any_disagree += (~exact_NL).any(-1).sum(dtype=torch.float64)
    return sums, any_disagree, N


def logprob_mismatch(
    logp_train: torch.Tensor,
    logp_infer: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    taus: Sequence[float] = DEFAULT_TAUS,
) -> LogprobMismatch:
    """Mismatch between the trainer's and the inference engine's log-probs of the sampled tokens.

    ``delta = logp_train - logp_infer`` per token (training side minus inference side);
    ``r = exp(delta)`` is the importance ratio pi_train / pi_infer.

    Args:
        logp_train: float log-probabilities of the sampled tokens under the trainer, any shape.
        logp_infer: the same tokens' log-probabilities under the inference engine, same shape.
        mask: optional bool tensor selecting the tokens to count (normally the response tokens;
            prompt and padding masked out): the log-probs' shape (packed ``[T]`` or padded
            ``[B, S]``), or a padded ``[B, S]`` mask with ``attention_mask`` for packed ``[T]``
            log-probs (see the module docstring). None counts every entry.
        attention_mask: ``[B, S]`` of the padded batch ``mask`` belongs to, when the log-probs
            are packed ``[T]``.
        taus: thresholds for ``F(tau) = mean 1[|delta| > ln tau]``; each must be > 1.

    Returns:
        LogprobMismatch (computed in float64 on detached copies: inputs that require grad are fine).

    Raises:
        MetricInputError: shapes differ, the mask is not boolean / of the same shape, a tau is
            not > 1, or a selected log-prob is not finite (names the first such position).
    """
    what = "logprob_mismatch"
    for name, x in (("logp_train", logp_train), ("logp_infer", logp_infer)):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            found = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise MetricInputError(f"{what}: {name} must be a float tensor of log-probabilities, found {found}")
    if logp_train.shape != logp_infer.shape:
        raise MetricInputError(
            f"{what}: logp_train has shape {tuple(logp_train.shape)} but logp_infer has {tuple(logp_infer.shape)}; "
            "both must hold one log-prob per sampled token in the same layout"
        )
    taus = tuple(float(t) for t in taus)
    if any(not t > 1.0 for t in taus):
        raise MetricInputError(f"{what}: every tau must be > 1 (F(tau) counts |delta| > ln tau), found {taus}")
    lt_N, li_N = _selected_logprobs(logp_train, logp_infer, mask, attention_mask)
    return _mismatch(lt_N, li_N, taus)


def _selected_logprobs(
    logp_train: torch.Tensor, logp_infer: torch.Tensor, mask: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two sides' log-probs of the tokens ``mask`` selects (see :func:`logprob_mismatch`), as
    float64 ``[N]`` detached copies, each checked finite."""
    what = "logprob_mismatch"
    shape = tuple(logp_train.shape)
    # A measurement, not a loss term: the trainer's log-probs usually require grad, and reading
    # them into Python floats must neither warn nor keep the graph alive.
    flat_train = logp_train.detach().reshape(-1)
    flat_infer = logp_infer.detach().reshape(-1).to(logp_train.device)
    if attention_mask is not None and len(shape) != 1:
        raise MetricInputError(
            f"{what}: attention_mask goes with packed [T] log-probs, found log-probs of shape {shape}; padded "
            "[B, S] log-probs take a [B, S] mask alone"
        )
    if mask is not None and attention_mask is None:
        mask = _bool_mask(mask, flat_train.device, what)
        if tuple(mask.shape) != shape:
            hint = (
                "; for packed log-probs and a padded [B, S] mask pass attention_mask as well" if mask.ndim == 2 else ""
            )
            raise MetricInputError(
                f"{what}: mask has shape {tuple(mask.shape)}, expected the log-probs' shape {shape}{hint}"
            )
        mask = mask.reshape(-1)
    keep = _packed_mask(mask, attention_mask, flat_train.numel(), flat_train.device, what)
    lt_N = flat_train[keep].to(torch.float64)
    li_N = flat_infer[keep].to(torch.float64)
    for name, v_N in (("logp_train", lt_N), ("logp_infer", li_N)):
        bad_N = ~torch.isfinite(v_N)
        if bool(bad_N.any()):
            flat_pos = int(keep.nonzero()[int(bad_N.nonzero()[0, 0]), 0])
            pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_pos), shape)) if shape else ()
            raise MetricInputError(
                f"{what}: {name} at position {pos} is {float(v_N[bad_N][0])}; every selected log-prob must be finite "
                "(mask out tokens whose probability underflowed, or compute log-probs in float32)"
            )
    return lt_N, li_N


def _mismatch(lt_N: torch.Tensor, li_N: torch.Tensor, taus: tuple[float, ...]) -> LogprobMismatch:
    """The mismatch statistics of the selected float64 log-probs (all NaN when none is selected)."""
    N = lt_N.numel()
    if N == 0:
        nan = float("nan")
        return LogprobMismatch(
            num_tokens=0, k1=nan, k2=nan, k3=nan, mean_abs_delta=nan, max_abs_delta=nan, prob_diff=nan,
            pearson=nan, extreme={f"F({t:g})": nan for t in taus},
        )
    delta_N = lt_N - li_N
    abs_N = delta_N.abs()
    pt_N, pi_N = lt_N.exp(), li_N.exp()
    # expm1 keeps k3 accurate when delta is tiny (exp(delta) - 1 would cancel).
    k3 = float((torch.expm1(delta_N) - delta_N).mean())
    return LogprobMismatch(
        num_tokens=N,
        k1=float((-delta_N).mean()),
        k2=float((delta_N.square() / 2).mean()),
        k3=k3,
        mean_abs_delta=float(abs_N.mean()),
        max_abs_delta=float(abs_N.max()),
        prob_diff=float((pt_N - pi_N).abs().mean()),
        pearson=_pearson(pt_N, pi_N),
        extreme={f"F({t:g})": float((abs_N > math.log(t)).to(torch.float64).mean()) for t in taus},
    )


def _pearson(x_N: torch.Tensor, y_N: torch.Tensor) -> float:
    """Pearson correlation in float64; NaN when either side has zero variance (undefined)."""
    xc, yc = x_N - x_N.mean(), y_N - y_N.mean()
    denom = float(xc.square().sum().sqrt() * yc.square().sum().sqrt())
    if denom == 0.0:
        return float("nan")
    return float((xc * yc).sum()) / denom
