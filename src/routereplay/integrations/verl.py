"""verl's FSDP engine with routing replay: R3 (the rollout's routes) and R2 (the old policy's).

verl >= 0.9 trains through *engines*: the FSDP actor is ``FSDPEngineWithLMHead``
(``verl/workers/engine/fsdp/transformer_impl.py``); the legacy ``DataParallelPPOActor`` is gone.
:class:`RouteReplayFSDPEngine` subclasses it and overrides only ``forward_step`` (one micro-batch
forward), ``initialize`` (attach after the FSDP wrap) and ``disable_adapter`` (to recognise the
reference pass). Importing this module registers it in verl's ``EngineRegistry`` for the
``language_model`` model type and the ``fsdp`` / ``fsdp2`` strategies wherever verl would build its
own FSDP engine: NVIDIA GPUs, the CPU (where verl registers no engine) and the device and vendor
of the importing process (AMD, other CUDA vendors, Ascend NPUs: untested there), under vendor keys,
so verl's own entry is left as it is. If verl would still build another class in that process (a
vendor's own engine for that exact key), the import raises ``IntegrationError`` instead of letting
``router_replay.mode`` be ignored. Enable it in a run:

    actor_rollout_ref.model.external_lib=routereplay.integrations.verl     # imported in every worker
    +actor_rollout_ref.actor.fsdp_config.router_replay.mode=R3            # or R2
    actor_rollout_ref.rollout.enable_rollout_routing_replay=True          # R3 only: engine returns routes
    actor_rollout_ref.actor.fsdp_config.strategy=fsdp2                    # tested; fsdp (FSDP1) untested

**R3**: every actor forward (``compute_log_prob`` and each micro-batch of ``update_actor``, every
PPO epoch and mini-batch) replays the ``routed_experts`` verl carries with each sample.
**R2**: ``compute_log_prob`` records the routes and returns them as the model output
``routed_experts`` (nested ``[B, j, L, K]`` int16, the key and form verl's Megatron engine uses
for R2, which verl's trainer carries into ``update_actor``); every update micro-batch replays
them. The **reference policy is never replayed**: a separate reference worker's engine has
``forward_only=True`` and refuses a replay mode; a reference pass inside the actor (LoRA,
``disable_adapter``) runs live.

Layouts handled per micro-batch, in verl's own order: dynamic batch sizes (the routes travel in
the micro-batch's TensorDict, so verl's reordering moves them with their samples), the
remove-padding path (packed ``[1, T]`` rows, plus verl's ``pad_to_length`` bucket padding), the
padded path (``[B, S]``, right padding), Ulysses sequence parallel (each rank replays
:func:`routereplay.core.layout.split_sp` of the packed trace: verl's ``ulysses_pad_and_slice_inputs``
pads the same way and gives rank ``r`` the same contiguous slice), gradient checkpointing (the
recompute in backward replays the ids its forward used).

Routes as verl carries them (``routes_to_trace``): one row per token, aligned with ``input_ids``;
the payload's layer axis holds every decoder layer (dense ones all zero) or the MoE layers only.
Rows the engine never captured are zero: the last token of each sample (never forwarded during
generation) and, in multi-turn loops, tokens after the last generation. Such rows route live only
where that cannot change the loss: at or after the sample's last loss token (its logits, and
everything after it, never enter the loss). A zero row earlier (truncated routes, verl #6027), a
payload row count that differs from the tokens, routes on a dense layer (dense-layer shift, verl
#5037) raise; nothing falls back to live routing silently.

**Logged per micro-batch** (verl's metrics dict; the trainer shows them as ``actor/router_replay/...``):

* ``router_replay/disagreement``: share of replayed (token, layer) routes whose experts, observed
  at the experts' input (``routereplay.rl.DispatchTap``), differ from the target. Must be 0: a
  micro-batch where it is not raises ``ReplayVerificationError``.
* ``router_replay/live_disagreement``: share of replayed routes that live routing would have
  chosen differently (what replay removes).
* ``router_replay/coverage``: replayed rows / real tokens (below 1 only by the rows above).
Under sequence parallel the counts are summed over the SP group first.

Legend (shape suffixes): B samples of a micro-batch; S padded length; T packed tokens;
N rows a router sees on this rank; Lp payload layers; L MoE layers; K top-k.
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("verl") is None:  # the opt-in import: say how to get verl
    raise ImportError(
        "routereplay.integrations.verl needs verl >= 0.9.1: pip install 'routereplay[verl]' (or pip install verl)"
    )

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from verl.utils import tensordict_utils as tu
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

import routereplay
from routereplay.core.errors import (
    EngineFormatError,
    IntegrationError,
    MissingRoutesError,
    ReplayVerificationError,
    TokenCountMismatchError,
)
from routereplay.core.layout import split_sp
from routereplay.core.trace import RoutingTrace
from routereplay.rl.store import DispatchTap

__all__ = ["ROUTES_KEY", "RouteReplayFSDPEngine", "routes_to_trace"]

ROUTES_KEY = "routed_experts"  # verl's key, in the batch and in the model output (R2)
_MODES = ("disabled", "R2", "R3")


# --- routes as verl carries them -> RoutingTrace ------------------------------------------------
def _per_sample(routed_experts: Any) -> list[torch.Tensor]:
    if isinstance(routed_experts, torch.Tensor) and routed_experts.is_nested:
        return list(routed_experts.unbind())
    if isinstance(routed_experts, torch.Tensor):
        raise EngineFormatError(
            f"verl micro-batch: routed_experts is a dense tensor {tuple(routed_experts.shape)}; the engine expects "
            "verl's nested per-sample form [B, j, layers, top_k] (verl's left_right_2_no_padding converts a padded "
            "batch; for a padded [bs, seq, layers, top_k] payload use routereplay.formats.verl.from_verl)"
        )
    return [torch.as_tensor(r) for r in routed_experts]


def routes_to_trace(
    routed_experts: Any,
    seq_lens: Sequence[int] | torch.Tensor,
    *,
    num_experts: int,
    moe_layer_ids: Sequence[int],
    last_loss_rows: Sequence[int] | torch.Tensor | None = None,
) -> RoutingTrace:
    """A training-row trace of one micro-batch from verl's ``routed_experts``.

    Args:
        routed_experts: nested ``[B, j, Lp, K]`` (verl's jagged tensor) or one ``[rows, Lp, K]``
            tensor per sample. Each sample has one row per token (vLLM's raw ``tokens - 1`` rows
            are accepted: the last token gets an empty row).
        seq_lens: tokens per sample, as in ``input_ids``.
        num_experts: routed experts per MoE layer.
        moe_layer_ids: global decoder-layer index of each MoE layer (``handle.layer_ids``).
        last_loss_rows: per sample, the position of its last loss token; rows from there on may
            lack a route. None: only each sample's last row may.

    Returns:
        RoutingTrace with one sequence per sample, ``valid`` False on rows without a route.

    Raises:
        TokenCountMismatchError: a sample's row count differs from its tokens.
        EngineFormatError: a layer axis that fits neither all decoder layers nor the MoE layers,
            or routes on a dense layer.
        MissingRoutesError: a row without a route before the sample's last loss token.
        TraceError subclasses: ids out of range or repeated on a routed row.
    """
    parts = _per_sample(routed_experts)
    lens = [int(n) for n in torch.as_tensor(seq_lens).tolist()]
    if len(parts) != len(lens):
        raise TokenCountMismatchError(
            f"verl micro-batch: routed_experts has {len(parts)} samples, input_ids {len(lens)}"
        )
    moe = list(moe_layer_ids)
    experts_NLpK = _one_row_per_token(parts, lens, len(moe))
    experts_NLK = _moe_layer_columns(experts_NLpK, moe)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(lens, dtype=torch.int64), 0, out=cu[1:])
    zero_N = _routeless_rows(experts_NLK, cu, lens, last_loss_rows)
    valid = None if not bool(zero_N.any()) else ~zero_N
    return RoutingTrace(
        experts=experts_NLK, cu_seqlens=cu, layer_ids=tuple(moe), num_experts=num_experts, valid=valid,
        meta={"source": "verl"},
    )


def _one_row_per_token(parts: list[torch.Tensor], lens: list[int], num_moe: int) -> torch.Tensor:
    """The samples' ``[rows, Lp, K]`` routes concatenated, one row per token: a sample of vLLM's raw
    ``tokens - 1`` rows gets an empty last row; any other row count is refused."""
    fixed = []
    for b, (r, n) in enumerate(zip(parts, lens)):
        if r.ndim != 3:
            raise EngineFormatError(f"sample {b}: routed_experts must be [rows, layers, top_k], found {tuple(r.shape)}")
        if r.shape[0] == n - 1:  # vLLM's raw capture: the last token was never forwarded
            r = torch.cat([r, r.new_zeros(1, *r.shape[1:])])
        if r.shape[0] != n:
            raise TokenCountMismatchError(
                f"sample {b}: routed_experts has {r.shape[0]} rows but input_ids has {n} tokens; the routes do not "
                "belong to these tokens (a truncated response whose routes were not cut with it, verl #6027?)"
            )
        fixed.append(r)
    return torch.cat(fixed) if fixed else torch.zeros(0, num_moe, 1, dtype=torch.int16)


def _moe_layer_columns(experts_NLpK: torch.Tensor, moe: list[int]) -> torch.Tensor:
    """The MoE layers' columns of a payload whose layer axis holds either the MoE layers or every
    decoder layer (then the dense layers' columns must be empty)."""
    Lp = experts_NLpK.shape[1]
    if Lp == len(moe):
        return experts_NLpK
    if Lp > max(moe):
        dense = [i for i in range(Lp) if i not in set(moe)]
        busy = (experts_NLpK[:, dense] != 0).flatten(2).any(-1).any(0)
        if bool(busy.any()):
            raise EngineFormatError(
                f"routed_experts holds routes on decoder layer {dense[int(busy.nonzero()[0, 0])]}, "
                f"which is not an MoE layer of this model (MoE layers {moe}); "
                "the layer axis is shifted (dense layers counted wrongly, verl #5037)"
            )
        return experts_NLpK[:, moe]
    raise EngineFormatError(
        f"routed_experts has {Lp} layers; expected every decoder layer (> {max(moe)}) or the {len(moe)} MoE "
        f"layers {moe}"
    )


def _routeless_rows(
    experts_NLK: torch.Tensor, cu: torch.Tensor, lens: list[int], last_loss_rows: Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    """Bool ``[N]``: the rows without a route (all ids 0; with top-1, only a sample's empty last row).

    Only a sample's trailing rows may lack a route, and none before its last loss token
    (``last_loss_rows``; default: its last token).
    """
    zero_N = (experts_NLK == 0).flatten(1).all(-1)
    if experts_NLK.shape[2] == 1:  # expert 0 is a valid top-1 route: only the engine's empty last row is "missing"
        last = torch.zeros_like(zero_N)
        last[cu[1:][cu.diff() > 0] - 1] = True
        zero_N &= last
    bounds = torch.tensor(lens) - 1 if last_loss_rows is None else torch.as_tensor(last_loss_rows).to(torch.int64)
    for b in range(len(lens)):
        z = zero_N[cu[b] : cu[b + 1]]
        if not bool(z.any()):
            continue
        first = int(z.nonzero()[0, 0])
        if not bool(z[first:].all()):
            hole = first + int((~z[first:]).nonzero()[0, 0])
            raise MissingRoutesError(
                f"sample {b}: position {first} has no route but position {hole} after it has one; only a sample's "
                "trailing tokens may lack routes (the routes are misaligned with the tokens)"
            )
        if first < int(bounds[b]):
            raise MissingRoutesError(
                f"sample {b}: routes stop at position {first} of {lens[b]} tokens, but its last loss token is at "
                f"position {int(bounds[b])}; the routes are shorter than the trained tokens (truncation, verl #6027), "
                "and routing the rest live would change the loss"
            )
    return zero_N


def _last_loss_rows(micro_batch: Any, seq_lens_B: torch.Tensor) -> torch.Tensor | None:
    """Per sample, the position (in its tokens) of its last loss token; None if it cannot be told."""
    mask = micro_batch.get("loss_mask", None)
    if mask is None:
        mask = micro_batch.get("response_mask", None)
    if mask is None:
        return None
    B = seq_lens_B.numel()
    if mask.is_nested:
        parts = [m.reshape(-1) for m in mask.unbind()]
        resp_B = torch.tensor([p.numel() for p in parts])
        last_B = torch.tensor([int(p.nonzero()[-1, 0]) if bool(p.any()) else -1 for p in parts])
        start_B = torch.zeros(B, dtype=torch.int64) if torch.equal(resp_B, seq_lens_B) else seq_lens_B - resp_B
    else:
        prompts = micro_batch.get("prompts", None)
        if prompts is None or mask.ndim != 2:
            return None
        if prompts.is_nested:
            start_B = prompts.offsets().diff().cpu()
        elif "attention_mask" in micro_batch:
            start_B = micro_batch["attention_mask"][:, : prompts.shape[1]].sum(1).cpu()
        else:
            return None
        m = mask.cpu() != 0
        cols = torch.arange(m.shape[1])
        last_B = torch.where(m.any(1), (m * cols).argmax(1), torch.full((B,), -1))
    pos_B = start_B.to(torch.int64) + last_B
    return torch.where(last_B >= 0, pos_B, torch.zeros_like(pos_B))  # no loss token: nothing constrains


# --- the engine ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True, slots=True)
class _Layout:
    """How one micro-batch reaches the routers on this rank."""

    seq_lens_B: torch.Tensor  # tokens per sample
    packed: bool  # remove-padding path: [1, T (+pad)] rows
    static_pad: int  # verl's pad_to_length rows after the T real rows
    sp: int  # Ulysses size (1: none)
    sp_rank: int
    sp_group: Any
    mask_BS: torch.Tensor | None  # padded path: right-padded mask

    @property
    def num_tokens(self) -> int:
        return int(self.seq_lens_B.sum())


def _replay_counts(
    dispatched_NLK: torch.Tensor,
    target: RoutingTrace,
    stats: Any,
    real_N: torch.Tensor | None,
    layout: _Layout,
    num_layers: int,
) -> torch.Tensor:
    """This rank's float64 counts of a replayed forward: replayed routes that did not reach the experts
    (``dispatched_NLK``), replayed routes, routes live routing would have changed, rows replayed, and
    real (token, layer) routes (``real_N``: this rank's real rows when packed, else every token)."""
    forced_NLK = target.experts
    valid_N = target.valid_mask
    differ = (dispatched_NLK.sort(-1).values.to(torch.int64) != forced_NLK.sort(-1).values.to(torch.int64)).any(-1)
    return torch.tensor(
        [
            float((differ & valid_N[:, None]).sum()),  # replayed routes that did not reach the experts
            float(valid_N.sum()) * num_layers,  # replayed routes
            float(sum(s.disagreement for s in stats)),  # live would differ
            float(sum(s.replayed for s in stats)),
            float((real_N.sum() if real_N is not None else layout.seq_lens_B.sum()) * num_layers),
        ],
        dtype=torch.float64,
    )


class RouteReplayFSDPEngine(FSDPEngineWithLMHead):
    """verl's FSDP language-model engine with R2 / R3 routing replay (see the module docstring).

    The mode comes from ``engine_config.router_replay.mode`` (``disabled`` | ``R2`` | ``R3``);
    with ``disabled`` the engine is verl's, nothing is attached.

    Raises:
        IntegrationError: a replay mode on a forward-only (reference) engine, or with a
            vision-language model under sequence parallel.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        rr = getattr(self.engine_config, "router_replay", None)
        self.router_replay_mode = "disabled" if rr is None else rr.mode
        if self.router_replay_mode not in _MODES:
            raise IntegrationError(f"router_replay.mode must be one of {_MODES}, found {self.router_replay_mode!r}")
        if self.router_replay_mode != "disabled" and self.engine_config.forward_only:
            raise IntegrationError(
                f"router_replay.mode={self.router_replay_mode} on a forward-only engine (the reference policy); "
                "the reference is never replayed: set the mode on actor_rollout_ref.actor.fsdp_config only"
            )
        self.router_handle: Any = None
        self._reference_depth = 0

    # --- lifecycle ---------------------------------------------------------------------------
    def initialize(self) -> None:
        super().initialize()
        if self.router_replay_mode != "disabled":
            self.router_handle = routereplay.attach(self.module)

    @contextmanager
    def disable_adapter(self):
        """verl's reference pass inside the actor (LoRA): it runs live, never replayed or recorded."""
        with super().disable_adapter():
            self._reference_depth += 1
            try:
                yield
            finally:
                self._reference_depth -= 1

    # --- one micro-batch ---------------------------------------------------------------------
    def forward_step(self, micro_batch: Any, loss_function: Any, forward_only: bool):
        mode = self.router_replay_mode
        if mode == "disabled" or self._reference_depth:
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        layout = self._layout(micro_batch)
        if mode == "R2" and forward_only:
            return self._record_step(micro_batch, loss_function, layout)
        return self._replay_step(micro_batch, loss_function, forward_only, layout)

    def _layout(self, micro_batch: Any) -> _Layout:
        input_ids = micro_batch["input_ids"]
        if not input_ids.is_nested:
            raise IntegrationError(
                "routing replay needs verl's no-padding batches (nested input_ids, pad_mode no_padding)"
            )
        seq_lens_B = input_ids.offsets().diff().cpu().to(torch.int64)
        packed = bool(tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True))
        sp = int(self.ulysses_sequence_parallel_size) if packed else 1
        if sp > 1:
            from verl.utils.ulysses import get_ulysses_sequence_parallel_group, get_ulysses_sequence_parallel_rank

            core = getattr(self.module, "module", self.module)
            if hasattr(getattr(core, "config", None), "vision_config"):
                raise IntegrationError(
                    "routing replay under Ulysses sequence parallel is not supported for vision-language models "
                    "(verl slices their inputs after the embedding)"
                )
            group = get_ulysses_sequence_parallel_group()
            rank = get_ulysses_sequence_parallel_rank(group)
        else:
            group, rank = None, 0
        static = int(self._get_packed_pad_size(int(seq_lens_B.sum()))) if packed else 0
        mask_BS = None
        if not packed:
            cols = torch.arange(int(seq_lens_B.max()) if seq_lens_B.numel() else 0)
            mask_BS = cols[None, :] < seq_lens_B[:, None]  # verl's build_attention_mask_from_nested
        return _Layout(
            seq_lens_B=seq_lens_B, packed=packed, static_pad=static, sp=sp, sp_rank=rank, sp_group=group,
            mask_BS=mask_BS,
        )

    def _rank_trace(self, trace: RoutingTrace, layout: _Layout) -> RoutingTrace:
        """The packed trace as this rank's routers see it: bucket padding, then its SP slice."""
        if layout.static_pad:
            # verl's pad_packed_inputs restarts the pad's position_ids at 0: the pad rows are a
            # sequence of their own (no route: they route live), as the routers' batch says
            L, K = trace.num_layers, trace.top_k
            pad = RoutingTrace(
                experts=torch.zeros(layout.static_pad, L, K, dtype=trace.experts.dtype),
                cu_seqlens=torch.tensor([0, layout.static_pad]),
                layer_ids=trace.layer_ids,
                num_experts=trace.num_experts,
                valid=torch.zeros(layout.static_pad, dtype=torch.bool),
            )
            trace = RoutingTrace.concat([trace, pad])
        return split_sp(trace, layout.sp, rank=layout.sp_rank) if layout.sp > 1 else trace

    def _replay_step(self, micro_batch, loss_function, forward_only, layout: _Layout):
        h = self.router_handle
        trace = self._carried_trace(micro_batch, layout)
        if layout.packed:
            target = self._rank_trace(trace, layout)
            real_N = torch.arange(target.num_tokens) + layout.sp_rank * target.num_tokens < trace.num_tokens
            mask = None
        else:
            target, mask = trace, layout.mask_BS
            real_N = None
        # Rows without a route were checked by routes_to_trace: they cannot reach the loss.
        with h.replay(target, attention_mask=mask, missing="live") as rep, DispatchTap(h) as tap:
            loss, output = super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        dispatched_NLK = tap.trace(attention_mask=mask).experts
        counts = _replay_counts(dispatched_NLK, target, rep.stats.values(), real_N, layout, len(h.layer_ids))
        if layout.sp > 1:
            dev = "cpu" if dist.get_backend(layout.sp_group) == "gloo" else loss.device
            counts_dev = counts.to(dev)
            dist.all_reduce(counts_dev, group=layout.sp_group)
            counts = counts_dev.cpu()
        bad, replayed, live, replayed_s, real = counts.tolist()
        metrics = {
            "router_replay/disagreement": bad / max(replayed, 1.0),
            "router_replay/live_disagreement": live / max(replayed_s, 1.0),
            "router_replay/coverage": replayed_s / max(real, 1.0),
        }
        output.setdefault("metrics", {}).update(metrics)
        if bad:
            raise ReplayVerificationError(
                f"{int(bad)} of {int(replayed)} replayed (token, layer) routes reached the experts with other ids "
                "than the trace's; the model does not route through the seam routereplay intercepts"
            )
        return loss, output

    def _carried_trace(self, micro_batch, layout: _Layout) -> RoutingTrace:
        """The training-row trace of the routes the micro-batch carries (refused when it carries none)."""
        h = self.router_handle
        routes = micro_batch.get(ROUTES_KEY, None)
        if routes is None:
            hint = (
                "set actor_rollout_ref.rollout.enable_rollout_routing_replay=True so the rollout returns routes"
                if self.router_replay_mode == "R3"
                else "R2 replays the routes compute_log_prob recorded; the trainer did not carry them into "
                "update_actor (rollout_correction bypass_mode skips compute_log_prob)"
            )
            raise MissingRoutesError(
                f"router_replay.mode={self.router_replay_mode}: this micro-batch carries no '{ROUTES_KEY}'; {hint}"
            )
        return routes_to_trace(
            routes,
            layout.seq_lens_B,
            num_experts=h.num_experts,
            moe_layer_ids=h.layer_ids,
            last_loss_rows=_last_loss_rows(micro_batch, layout.seq_lens_B),
        )

    def _record_step(self, micro_batch, loss_function, layout: _Layout):
        h = self.router_handle
        if micro_batch.get(ROUTES_KEY, None) is not None:
            raise IntegrationError(
                f"router_replay.mode=R2 records the old policy's routes, but the batch already carries '{ROUTES_KEY}' "
                "from the rollout; use mode R3 for rollout routes or set rollout.enable_rollout_routing_replay=False"
            )
        with h.record() as rec:
            loss, output = super().forward_step(micro_batch, loss_function=loss_function, forward_only=True)
        if layout.packed:
            rows_NLK = rec.trace().experts
            if layout.sp > 1:
                rows_NLK = _all_gather_rows(rows_NLK, layout)
            rows_TLK = rows_NLK[: layout.num_tokens]
        else:
            rows_TLK = rec.trace(attention_mask=layout.mask_BS).experts
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), layout.seq_lens_B.cumsum(0)])
        routes = torch.nested.nested_tensor_from_jagged(rows_TLK.to(torch.int16), offsets=offsets)
        output.setdefault("model_output", {})[ROUTES_KEY] = routes
        return loss, output


def _all_gather_rows(rows_NLK: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """Every SP rank's recorded rows, in rank order (the inverse of the contiguous Ulysses slice)."""
    from verl.utils.device import get_device_id, get_device_name

    backend = dist.get_backend(layout.sp_group)
    dev = torch.device("cpu") if backend == "gloo" else torch.device(get_device_name(), get_device_id())
    local = rows_NLK.to(dev, torch.int32).contiguous()
    parts = [torch.empty_like(local) for _ in range(layout.sp)]
    dist.all_gather(parts, local, group=layout.sp_group)
    return torch.cat(parts).cpu()


# --- registration: importing this module is the opt-in --------------------------------------------
_BACKENDS = ("fsdp", "fsdp2")


def _engine_key() -> tuple[str, str]:
    """The ``(device, vendor)`` verl's ``EngineRegistry.get_engine_cls`` looks up in this process
    (its platform, or the ``VERL_ENGINE_DEVICE`` / ``VERL_ENGINE_VENDOR`` overrides it honours)."""
    from verl.utils.device import get_device_name, get_vendor

    return os.getenv("VERL_ENGINE_DEVICE") or get_device_name(), os.getenv("VERL_ENGINE_VENDOR") or get_vendor()


def _chosen(backend: str) -> type | None:
    try:
        return EngineRegistry.get_engine_cls("language_model", backend)
    except (AssertionError, ValueError):  # verl has no engine for this device: it refuses the run itself
        return None


def _register() -> None:
    """Make verl build RouteReplayFSDPEngine wherever it would build its own FSDP language-model engine.

    verl looks up ``(device, vendor)``, then ``device``, then (for other CUDA vendors)
    ``("cuda", "nvidia")``; its own engine is registered per device (``cuda``, ``npu``). So a vendor
    key wins without touching verl's entry: this registers ``("cuda", "nvidia")``, the CPU (where
    verl has no engine) and, for this process's own ``(device, vendor)`` (AMD, MetaX, Ascend, any
    platform plugin, or the ``VERL_ENGINE_*`` overrides), that key, whenever verl's lookup there
    gives its ``FSDPEngineWithLMHead``, which this engine subclasses. verl imports the
    ``external_lib`` in each worker before it builds the engine, so each worker registers its own
    key. Only ``router_replay.mode`` reads differently from verl's engine: with ``disabled`` the
    two are the same.

    Raises:
        IntegrationError: verl would still build another engine class in this process (one registered
            for this exact device and vendor), which would ignore ``router_replay.mode`` and train live.
    """
    device, vendor = _engine_key()
    keys = [("cuda", "nvidia"), ("cpu", None)]
    if all(_chosen(b) in (FSDPEngineWithLMHead, RouteReplayFSDPEngine) for b in _BACKENDS):
        keys.append((device, vendor))
    for dev, ven in dict.fromkeys(keys):
        for backend in _BACKENDS:
            table = EngineRegistry._engines.get("language_model", {}).get(backend, {})
            if table.get((dev, ven) if ven else dev) is RouteReplayFSDPEngine:
                continue  # this module imported twice (under two names)
            try:
                EngineRegistry.register(model_type="language_model", backend=backend, device=dev, vendor=ven)(
                    RouteReplayFSDPEngine
                )
            except AssertionError:  # the key holds another class: checked below where it matters
                pass
    for backend in _BACKENDS:
        cls = _chosen(backend)
        if cls is not None and cls is not RouteReplayFSDPEngine:
            raise IntegrationError(
                f"routereplay.integrations.verl: on device={device!r}, vendor={vendor!r} verl builds "
                f"{cls.__module__}.{cls.__qualname__} for strategy {backend!r}, "
                "not RouteReplayFSDPEngine (a subclass of verl's FSDPEngineWithLMHead), "
                "so router_replay.mode would be ignored and the actor would route live. "
                "Routing replay runs where verl builds its own FSDP engine: run without this vendor's engine (set "
                "VERL_ENGINE_VENDOR to a vendor whose lookup gives FSDPEngineWithLMHead), or drop "
                "actor_rollout_ref.model.external_lib=routereplay.integrations.verl and the router_replay mode"
            )


_register()
