"""verl ``routed_experts`` (DataProto) <-> RoutingTrace.

verl conventions (R3 mode, read from verl's ``experimental/agent_loop/agent_loop.py`` and
``utils/megatron/router_replay_utils.py``):

* Key ``routed_experts`` in ``DataProto.batch``: padded ``[bs, seq, Lp, K]``, aligned to
  ``input_ids`` / ``attention_mask`` ``[bs, seq]`` where ``seq = prompt_length + response_length``:
  the prompt is left-padded to ``prompt_length``, the response right-padded to ``response_length``.
  Row ``s`` of sample ``i`` is the route of token ``input_ids[i, s]``; padding rows are 0.
* The agent loop copies the engine's rows (one per forwarded token, so ``tokens - 1`` of them) into
  a zero tensor starting at the first prompt token: the last real token's row stays 0 (no route).
  Routes recorded by the trainer itself (R2) cover every token, the last one included
  (``last_token_routed=True``).
* Dtype: whatever the engine gave (int16 in verl's own path; int32 from SGLang; uint8 for vLLM's slot
  manager). Layer axis: the engine's (every decoder layer, or MoE layers only); R2 records MoE
  routers only. ``moe_layer_ids=`` handles both.
* Per-sample unpadded form (padding removed like ``input_ids``): ``[tokens, Lp, K]`` per sample.

Checks that catch verl's known misalignments: routes on padding positions (a truncated response left
routes longer than the tokens) and a route on the last token of an engine capture (routes shifted by one).

from_verl returns training rows by default (one per token, the last one invalid for engine captures).

Legend: B samples, S padded sequence length, Lp payload layers, L MoE layers, K top-k, T trace rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from routereplay.core.errors import EngineFormatError
from routereplay.core.index import sequence_of
from routereplay.core.trace import RoutingTrace, expert_dtype
from routereplay.formats.common import (
    Rows,
    _as_tensor,
    _assemble,
    _check_lengths,
    _expand_layers,
    _finish,
    _first_nonzero_row,
    _gather_rows,
    _int_array,
    _is_count,
    _seq_ids,
    _to_rows,
)

__all__ = ["from_verl", "from_verl_unpadded", "to_verl", "to_verl_unpadded"]


def _last_rows(cu_seqlens_B1: torch.Tensor) -> torch.Tensor:
    """int64 indices of the last row of every non-empty sequence."""
    lens = cu_seqlens_B1.diff()
    return cu_seqlens_B1[1:][lens > 0] - 1


def _engine_last_rows(
    experts_NLpK: torch.Tensor, cu_seqlens_B1: torch.Tensor, labels: Sequence[str], last_token_routed: bool
) -> torch.Tensor | None:
    """``valid [N]`` with each sample's last row invalid; checks that those rows are empty."""
    if last_token_routed:
        return None
    last = _last_rows(cu_seqlens_B1)
    busy = (experts_NLpK[last] != 0).flatten(1).any(-1)
    if bool(busy.any()):
        j = int(busy.nonzero()[0, 0])
        n = int(last[j])
        b = sequence_of(cu_seqlens_B1, n)
        raise EngineFormatError(
            f"{labels[b]}: the last token (row {n - int(cu_seqlens_B1[b])}) has a route, but an engine capture "
            "stops one token short; the routes are shifted against the tokens. If the trainer recorded them "
            "(R2), pass last_token_routed=True"
        )
    valid = torch.ones(experts_NLpK.shape[0], dtype=torch.bool)
    valid[last] = False
    return valid


def from_verl(
    routed_experts: Any,
    attention_mask: Any,
    *,
    num_experts: int,
    moe_layer_ids: Sequence[int] | None = None,
    last_token_routed: bool = False,
    rows: Rows = "training",
    allow_zero_routes: bool = False,
    missing: str = "error",
    meta: Mapping[str, str] | None = None,
) -> RoutingTrace:
    """A trace from verl's padded ``routed_experts`` and its attention mask, one sequence per sample.

    Args:
        routed_experts: ``[bs, seq, Lp, K]`` integer tensor / array, aligned to ``attention_mask``.
        attention_mask: ``[bs, seq]``, 1 (True) on real tokens. Their rows are taken in order, so
            left, right and verl's left-prompt / right-response padding all work.
        num_experts: routed experts per MoE layer.
        moe_layer_ids: global ids of the MoE layers; dense layers in the payload are dropped.
        last_token_routed: False for routes from an inference engine (the last token's row is
            empty and becomes an invalid row); True for routes the trainer recorded (R2).
        rows: ``"training"`` (one row per token) or ``"engine"`` (each sample's last row dropped).
        allow_zero_routes, missing: see :mod:`routereplay.formats`.
        meta: extra trace meta; ``meta["source"]`` is ``"verl"``.

    Returns:
        RoutingTrace with B = bs.

    Raises:
        EngineFormatError: shapes that disagree, a route on a padding position, or on the last token
            while ``last_token_routed=False``; ZeroRoutesError; RoutingTrace validation errors.
    """
    re_BSLK = _as_tensor(_int_array(routed_experts, "verl batch"), "verl batch")
    if re_BSLK.ndim != 4:
        raise EngineFormatError(
            f"verl batch: routed_experts must be [bs, seq, layers, top_k], found shape {tuple(re_BSLK.shape)}"
        )
    mask = _verl_mask(attention_mask, re_BSLK.shape)
    B, S, Lp, K = re_BSLK.shape
    labels = [f"sample {i}" for i in range(B)]
    flat_NLK = re_BSLK.reshape(B * S, Lp, K)
    mask_N = mask.reshape(-1)
    n = _first_nonzero_row(flat_NLK, ~mask_N)
    if n >= 0:
        raise EngineFormatError(
            f"{labels[n // S]}: routed_experts holds a route at position {n % S}, where attention_mask is 0 "
            "(padding); the routes are longer than the tokens (a truncated response?) or not aligned with the mask"
        )
    experts_NLK = _gather_rows(flat_NLK, mask_N, _packed_dtype(flat_NLK, num_experts))
    cu = torch.zeros(B + 1, dtype=torch.int64)
    torch.cumsum(mask.sum(1).to(torch.int64), 0, out=cu[1:])
    valid = _engine_last_rows(experts_NLK, cu, labels, last_token_routed)
    return _finish(
        experts_NLK,
        cu,
        labels,
        num_experts=num_experts,
        moe_layer_ids=moe_layer_ids,
        rows=rows,
        allow_zero_routes=allow_zero_routes,
        missing=missing,
        source="verl",
        meta=meta,
        valid_N=valid,
        have="training",
    )


def _verl_mask(attention_mask: Any, routes_shape: torch.Size) -> torch.Tensor:
    """verl's ``[bs, seq]`` attention mask as a bool CPU tensor, checked to be 0/1 and shaped like the
    first two dimensions of the routes (``routes_shape``)."""
    mask = (
        attention_mask.detach().cpu()
        if isinstance(attention_mask, torch.Tensor)
        else _as_tensor(np.asarray(attention_mask), "verl batch", "attention_mask")
    )
    if mask.ndim != 2 or tuple(mask.shape) != tuple(routes_shape[:2]):
        raise EngineFormatError(
            f"verl batch: routed_experts is {list(routes_shape)} but attention_mask is {list(mask.shape)}; "
            "the first two dimensions ([bs, seq]) must agree (routes padded like input_ids)"
        )
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise EngineFormatError("verl batch: attention_mask must hold only 0 and 1")
        mask = mask != 0
    return mask


def _packed_dtype(flat_NLK: torch.Tensor, num_experts: Any) -> torch.dtype:
    """The dtype to pack the padded rows into, in one pass: the trace's when every id is in range
    (padding holds zeros); else the payload's, for the checks to report the row holding a
    missing-route marker or a corrupt id."""
    dtype = flat_NLK.dtype
    if flat_NLK.numel() and _is_count(num_experts):
        lo, hi = torch.aminmax(flat_NLK)
        if int(lo) >= 0 and int(hi) < num_experts:
            dtype = expert_dtype(num_experts)
    return dtype


def from_verl_unpadded(
    samples: Sequence[Any],
    *,
    num_experts: int,
    num_tokens: Sequence[int] | None = None,
    moe_layer_ids: Sequence[int] | None = None,
    last_token_routed: bool = False,
    rows: Rows = "training",
    allow_zero_routes: bool = False,
    missing: str = "error",
    meta: Mapping[str, str] | None = None,
) -> RoutingTrace:
    """A trace from verl's per-sample unpadded ``routed_experts`` ``[tokens, Lp, K]``.

    Args:
        samples: one token-aligned array / tensor per sample (e.g. ``non_tensor_batch["routed_experts"]``).
        num_tokens: per sample token count; when given each sample must have exactly that many rows.
        num_experts, moe_layer_ids, last_token_routed, rows, allow_zero_routes, missing, meta:
            as in :func:`from_verl`.

    Returns:
        RoutingTrace with one sequence per sample.

    Raises:
        EngineFormatError: row counts that differ from ``num_tokens``, a route on the last token while
            ``last_token_routed=False``, and the errors of :func:`from_verl`.
    """
    samples = list(samples)
    labels = [f"sample {i}" for i in range(len(samples))]
    parts = [_int_array(s, label) for s, label in zip(samples, labels)]
    counts = _check_lengths(num_tokens, len(parts), "num_tokens")
    if counts is not None:
        for a, n, label in zip(parts, counts, labels):
            if a.shape[0] != n:
                raise EngineFormatError(f"{label}: routed_experts has {a.shape[0]} rows, expected one per token = {n}")
    experts_NLK, cu = _assemble(parts, labels)
    valid = _engine_last_rows(experts_NLK, cu, labels, last_token_routed)
    return _finish(
        experts_NLK,
        cu,
        labels,
        num_experts=num_experts,
        moe_layer_ids=moe_layer_ids,
        rows=rows,
        allow_zero_routes=allow_zero_routes,
        missing=missing,
        source="verl",
        meta=meta,
        valid_N=valid,
        have="training",
    )


def _training_experts(
    trace: RoutingTrace, rows: Rows, num_hidden_layers: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, RoutingTrace]:
    """``[T, Lp, K]`` ids in training rows; rows without a route are 0, only allowed as a sequence's last row."""
    trace = _to_rows(trace, "training", rows)
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise EngineFormatError(f"dtype must be an integer torch dtype, found {dtype}")
    if trace.num_experts - 1 > torch.iinfo(dtype).max:
        raise EngineFormatError(
            f"dtype {dtype} cannot hold expert ids up to {trace.num_experts - 1}; use a wider dtype"
        )
    if trace.valid is not None:
        inner = ~trace.valid.clone()
        inner[_last_rows(trace.cu_seqlens)] = False
        if bool(inner.any()):
            t = int(inner.nonzero()[0, 0])
            b = int(_seq_ids(trace.cu_seqlens)[t])
            raise EngineFormatError(
                f"sequence {b}, position {t - int(trace.cu_seqlens[b])} has no route; verl's routed_experts can leave "
                "only a sequence's last token without one (as 0). Fill or drop that sequence first"
            )
    experts_TLK = trace.experts if trace.valid is None else trace.experts.masked_fill(~trace.valid[:, None, None], 0)
    experts_TLK = _expand_layers(experts_TLK.to(dtype), trace.layer_ids, num_hidden_layers)
    return experts_TLK, trace


def to_verl(
    trace: RoutingTrace,
    *,
    prompt_lens: Sequence[int],
    rows: Rows = "training",
    prompt_length: int | None = None,
    response_length: int | None = None,
    num_hidden_layers: int | None = None,
    dtype: torch.dtype = torch.int16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's padded ``routed_experts`` and ``attention_mask`` (the inverse of :func:`from_verl`).

    Args:
        trace: the routes; ``rows`` says whether it holds training rows (one per token) or engine
            rows (then each sequence gets an empty row for its last token).
        prompt_lens: per sequence, how many of its tokens are prompt (left-padded to ``prompt_length``);
            the rest is the response (right-padded to ``response_length``).
        prompt_length, response_length: padded widths (default: the longest prompt / response).
        num_hidden_layers: write every decoder layer (dense layers 0); default: MoE layers only.
        dtype: integer dtype of the payload (verl uses int16).

    Returns:
        ``(routed_experts [B, prompt_length + response_length, Lp, K], attention_mask [B, same] int64)``;
        rows without a route (padding, engine captures' last token) are 0.

    Raises:
        EngineFormatError: a prompt longer than its sequence or a width too small, a row without a route
            that is not its sequence's last, a dtype too narrow.
    """
    experts_TLK, trace = _training_experts(trace, rows, num_hidden_layers, dtype)
    B = trace.num_seqs
    P = torch.tensor(_check_lengths(prompt_lens, B, "prompt_lens"), dtype=torch.int64).reshape(B)
    lens = trace.seq_lens.cpu()
    if bool((P > lens).any()):
        b = int((P > lens).nonzero()[0, 0])
        raise EngineFormatError(f"sequence {b}: prompt_lens[{b}]={int(P[b])} is longer than its {int(lens[b])} tokens")
    R = lens - P
    P_max = int(P.max()) if B else 0
    R_max = int(R.max()) if B else 0
    prompt_length = P_max if prompt_length is None else prompt_length
    response_length = R_max if response_length is None else response_length
    if prompt_length < P_max or response_length < R_max:
        raise EngineFormatError(
            f"prompt_length={prompt_length} / response_length={response_length} cannot hold the longest "
            f"prompt ({P_max}) / response ({R_max})"
        )
    S = prompt_length + response_length
    seq_T = _seq_ids(trace.cu_seqlens.cpu())
    pos_T = torch.arange(trace.num_tokens) - trace.cu_seqlens.cpu()[seq_T]
    dest_T = seq_T * S + pos_T + (prompt_length - P)[seq_T]  # token j sits after the prompt's left padding
    out = torch.zeros((B * S, *experts_TLK.shape[1:]), dtype=dtype)
    out[dest_T] = experts_TLK.cpu()
    mask = torch.zeros(B * S, dtype=torch.int64)
    mask[dest_T] = 1
    return out.reshape(B, S, *experts_TLK.shape[1:]), mask.reshape(B, S)


def to_verl_unpadded(
    trace: RoutingTrace,
    *,
    rows: Rows = "training",
    num_hidden_layers: int | None = None,
    dtype: torch.dtype = torch.int16,
) -> list[torch.Tensor]:
    """Per-sequence token-aligned ``[tokens, Lp, K]`` tensors (the inverse of :func:`from_verl_unpadded`).

    Args and errors as in :func:`to_verl`; rows without a route (only a sequence's last) are 0.
    """
    experts_TLK, trace = _training_experts(trace, rows, num_hidden_layers, dtype)
    return list(torch.split(experts_TLK.cpu(), trace.seq_lens.tolist()))
