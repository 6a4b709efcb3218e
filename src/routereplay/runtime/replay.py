"""The replay mode: forced routing for the forwards run inside ``with handle.replay(...) as rep:``.

Every trace is first *prepared* (:func:`prepare`, ``handle.prepare``; ``handle.replay`` does it
for plain traces): checked against the model (layers, top-k, expert count, missing rows), laid out
in the rows the routers will see (a gather for padded batches, ``layout.router_row_sources``) and
put on the model's device in its compact dtype. Checks run where the trace lives:

* a host trace is checked on the host, in its own rows (errors at once), then laid out and
  copied from pinned memory on the handle's side stream; the compute stream waits for that copy
  (an event) just before the first MoE layer of its forward, and widens the ids to int64 there;
* a trace on the accelerator is checked by device-side reductions whose flags are read once, at
  the block's exit: ids out of range, a repeated expert, a group limit, rows without a route.
  Out-of-range ids are clamped meanwhile, so that no kernel indexes outside the logits; the
  forwards of such a block are discarded by the error at exit. What only the accelerator knows
  is read there too: a batch mask on the accelerator that does not fit the trace's sequences,
  a forward whose mask, packing or sequence lengths differ from the trace's.

The exit reads all flags at once, the host thread sleeping on an event (no spin); a prepared
trace's own flags are read by the first block that replays it only.

A :class:`PreparedTrace` can be replayed any number of times: R2's epochs and R3's passes over one
micro-batch do this work once.

Legend: N rows a router sees in one forward (B * S, padding included), T tokens of the trace,
L MoE layers (``handle.layers`` order), K top-k, B sequences (batch rows), S padded length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from routereplay.core import layout
from routereplay.core.errors import (
    AttentionMaskMismatchError,
    BatchShapeMismatchError,
    LayerMismatchError,
    LayoutError,
    MissingRoutesError,
    ReplayError,
    ReplayVerificationError,
    TokenCountMismatchError,
    TraceExhaustedError,
    UnconsumedTraceError,
)
from routereplay.core.index import sequence_of
from routereplay.core.routing import forced_violations, groups_spanned, validate_forced
from routereplay.core.trace import RoutingTrace, first_duplicate_row
from routereplay.runtime.modes import UNSEEN_HINT, ModeHost
from routereplay.runtime.recompute import Binding

__all__ = ["LayerStats", "PreparedTrace", "Replay", "prepare"]


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


_Check = tuple[torch.Tensor, Callable[[], Exception]]  # a device bool flag, the error it means


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class PreparedTrace:
    """A trace checked against one handle's model and laid out in its routers' rows, on the model's
    device: ``handle.prepare(trace, attention_mask=...)``.

    Replay it any number of times (``handle.replay(prepared)``): R2's epochs and R3's passes over
    one micro-batch then check, lay out and copy the trace once. It holds the ``[L, N, K]`` ids in
    their compact dtype (uint8 up to 256 experts) on the device while it lives.
    """

    handle: ModeHost
    missing: str
    rows: int  # N the routers must see
    forced_LNK: torch.Tensor  # compact dtype, on the model's device (clamped into range there)
    mask_N: torch.Tensor | None  # rows that use the trace (None: every row)
    trace_tokens: int
    num_seqs: int
    shape: tuple[int, int] | None  # (B, S) the forward's batch must have, when known on the host
    mask_BS: torch.Tensor | None  # the attention mask it was laid out with (bool, its own copy)
    lens_B: torch.Tensor | None  # a device trace without a mask: sequence lengths, checked in the forward
    padded: bool
    cu_B1: torch.Tensor  # the trace's sequence boundaries (packed batches are checked against them)
    checks: list[_Check]  # device-side checks, read at the exit of the first block that replays it
    ready: Any  # the CUDA event after the side-stream copy of a host trace, or None


def prepare(
    handle: ModeHost, trace: RoutingTrace, *, attention_mask=None, missing: str = "error", where: str = ""
) -> PreparedTrace:
    """Check ``trace`` against the model and lay it out in router rows on the model's device.

    Checks run where the trace lives: a host trace is checked on the host (errors now), then
    copied from pinned memory on a side stream; a trace already on the accelerator is checked by
    device-side reductions read at the exit of the first replay block (no host sync before it),
    as is a host trace's fit to a batch mask that lives on the accelerator.
    """
    if missing not in ("error", "live"):
        raise ReplayError(f'missing must be "error" or "live", found {missing!r}')
    if not isinstance(trace, RoutingTrace):
        raise ReplayError(f"{where}replay needs a RoutingTrace, found {type(trace).__name__}")
    _check_model(handle, trace, where)
    device = _model_device(handle.model)
    checks: list[_Check] = []
    host_checked = trace.device.type == "cpu"
    if host_checked:
        # A host trace is checked on the host, in its own rows, before any layout or copy: errors
        # now, and no device flag for the block's exit to read (no host sync there).
        # (a trace whose rows passed the repeat check, see RoutingTrace.rows_checked, is checked
        # for range and group limits only)
        _check_ids(handle, where, trace.experts.permute(1, 0, 2), trace.valid, checks, distinct=trace.rows_checked())
        if trace.valid is not None and missing == "error":
            valid_T, cu_B1 = trace.valid, trace.cu_seqlens
            _check(~valid_T.all(), lambda: _holes_error(where, valid_T, cu_B1), checks)
    if trace.device.type != "cpu" and trace.device != device:
        trace = trace.to(device, non_blocking=True)
    elif (
        trace.device.type == "cpu" and isinstance(attention_mask, torch.Tensor) and attention_mask.device.type != "cpu"
    ):
        # The batch's mask lives on the accelerator: lay the trace out there (an asynchronous copy
        # from pinned memory) rather than read the mask back to the host (a sync).
        trace = trace.replace(check=False, gates=None).pin_memory().to(attention_mask.device, non_blocking=True)
    # The prepared trace owns what it keeps (ids, valid rows, boundaries): an edit of the caller's
    # tensors after prepare, or a route buffer reused for the next batch, must not reach a replay
    # the checks below have passed.
    valid_T = None if trace.valid is None else trace.valid.clone()
    cu_B1 = trace.cu_seqlens.clone()
    if valid_T is not None and missing == "error" and not host_checked:
        # the error keeps what it names, not the whole trace
        _check(~valid_T.all(), lambda: _holes_error(where, valid_T, cu_B1), checks)
    mask_BS = None
    if attention_mask is None:
        experts_NLK, mask_N, shape, lens_B = trace.experts, valid_T, None, None
        if trace.device.type == "cpu":
            shape = _uniform_shape(trace)
        else:
            lens_B = trace.seq_lens
    else:
        experts_NLK, mask_N, mask_BS = _padded_rows(trace, attention_mask, valid_T, cu_B1, where, checks)
        shape, lens_B = tuple(mask_BS.shape), None
    if mask_N is not None and mask_N.device.type == "cpu" and bool(mask_N.all()):
        mask_N = None  # every row forced: route() skips the live selection
    forced_LNK, ready = experts_NLK.permute(1, 0, 2), None
    if forced_LNK.device != device:
        forced_LNK, mask_N, ready = _copy_to(handle, device, forced_LNK, mask_N)
    else:
        if experts_NLK is trace.experts:  # the prepared trace's own copy (an accelerator clamps it in place),
            # in the trace's [N, L, K] layout, which the host checks read in place
            forced_LNK = experts_NLK.clone(memory_format=torch.contiguous_format).permute(1, 0, 2)
        if not host_checked:  # a trace whose rows passed the repeat check: range and group limits only
            _check_ids(handle, where, forced_LNK, mask_N, checks, distinct=trace.rows_checked())
    return PreparedTrace(
        handle=handle,
        missing=missing,
        rows=experts_NLK.shape[0],
        forced_LNK=forced_LNK,
        mask_N=mask_N,
        trace_tokens=trace.num_tokens,
        num_seqs=trace.num_seqs,
        shape=shape,
        mask_BS=mask_BS,
        lens_B=lens_B,
        padded=attention_mask is not None,
        cu_B1=cu_B1,
        checks=checks,
        ready=ready,
    )


def _padded_rows(trace: RoutingTrace, attention_mask, valid_T, cu_B1, where: str, checks: list[_Check]):
    """The trace's rows placed at the True positions of the batch's ``[B, S]`` attention mask:
    ``(experts_NLK, mask_N, mask_BS)``, ``mask_N`` the router rows that replay (real tokens with a
    route), ``mask_BS`` the prepared trace's own copy of the mask, on the trace's device."""
    mask_BS = torch.as_tensor(attention_mask).to(trace.device, torch.bool, non_blocking=True)
    if mask_BS is attention_mask:
        mask_BS = mask_BS.clone()  # its own copy: compared with each forward's mask
    if mask_BS.ndim != 2:
        raise LayoutError(f"{where}attention_mask must be [B, S], found shape {tuple(mask_BS.shape)}")
    if mask_BS.shape[0] != trace.num_seqs:
        raise _mask_error(where, mask_BS, trace.cu_seqlens)
    src_N, mask_N, counts_differ = layout.router_row_sources(cu_B1, mask_BS, trace.num_tokens)
    _check(counts_differ, lambda: _mask_error(where, mask_BS, cu_B1), checks)
    experts_NLK = trace.experts.index_select(0, src_N)
    if valid_T is not None:
        mask_N = mask_N & valid_T.index_select(0, src_N)
    return experts_NLK, mask_N, mask_BS


def _copy_to(handle: ModeHost, device: torch.device, forced_LNK: torch.Tensor, mask_N: torch.Tensor | None):
    """Host -> accelerator: pinned staging, then an asynchronous copy on the handle's side stream,
    so that neither waits for the work queued on the compute stream; the forward waits for it (the
    returned event) just before its first MoE layer. Returns ``(forced_LNK, mask_N, event)``."""
    stream = handle.side_stream(device)
    with torch.cuda.stream(stream):
        forced_LNK = _pinned(forced_LNK).to(device, non_blocking=True)
        mask_N = None if mask_N is None else _pinned(mask_N).to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(stream)
    return forced_LNK, mask_N, ready


def _check_model(handle: ModeHost, trace: RoutingTrace, where: str) -> None:
    if trace.layer_ids != handle.layer_ids:
        raise LayerMismatchError(
            f"{where}trace has layers {list(trace.layer_ids)} but the model's MoE layers are "
            f"{list(handle.layer_ids)}; if the trace covers more layers use trace.select_layers(handle.layer_ids)"
        )
    for i, m in enumerate(handle.layers):
        if trace.top_k != m.top_k:
            raise LayerMismatchError(
                f"{where}{handle.where(i)}: trace has top_k={trace.top_k}, router has top_k={m.top_k}"
            )
        if trace.num_experts != m.num_experts:
            raise LayerMismatchError(
                f"{where}{handle.where(i)}: trace has num_experts={trace.num_experts}, "
                f"router has num_experts={m.num_experts}"
            )


def _check_ids(
    handle: ModeHost, where: str, forced_LNK: torch.Tensor, mask_N, checks: list[_Check], *, distinct: bool = False
) -> None:
    """Range, repeats and group limit of the forced ids, where they live: on the CPU a
    RouterSpecError now; on an accelerator a device flag read at exit, the ids clamped into range
    meanwhile (in place: ``forced_LNK`` is the prepared trace's own copy) so that no kernel reads
    outside the logits. ``distinct``: the rows are known to repeat no expert (both checks skip it)."""
    if forced_LNK.device.type == "cpu" and _host_ids_ok(forced_LNK, mask_N, handle.layers, distinct=distinct):
        return
    bad_LN = _violations(forced_LNK, handle.layers, distinct=distinct)
    if mask_N is not None:
        bad_LN &= mask_N
    if forced_LNK.device.type == "cpu":
        if bool(bad_LN.any()):
            i = int(bad_LN.any(1).nonzero()[0, 0])
            validate_forced(forced_LNK[i].long(), mask_N, handle.layers[i].spec, f"{where}{handle.where(i)}: ")
        return
    forced_LNK.clamp_(0, handle.num_experts - 1)
    bad_L = bad_LN.any(1)

    def error() -> Exception:
        i = int(bad_L.nonzero()[0, 0])
        return ReplayError(
            f"{where}{handle.where(i)}: the trace has ids this router cannot pick (out of range, repeated "
            "in a row, or over its group limit); the forwards of this block used clamped ids: discard "
            "their results and validate the trace (RoutingTrace(...) or routereplay.load(validate=True))"
        )

    checks.append((bad_L.any(), error))


def _check(flag: torch.Tensor, error: Callable[[], Exception], checks: list[_Check]) -> None:
    """Raise now where the flag lives on the host; keep an accelerator's for the block's exit."""
    if flag.device.type == "cpu":
        if bool(flag):
            raise error()
    else:
        checks.append((flag, error))


def _holes_error(where: str, valid_T: torch.Tensor, cu_B1: torch.Tensor) -> MissingRoutesError:
    holes_T = ~valid_T
    last_T = torch.zeros_like(holes_T)
    lens_B = cu_B1.diff()
    last_T[cu_B1[1:][lens_B > 0] - 1] = True
    inner_T = holes_T & ~last_T
    if not bool(inner_T.any()):
        # Exactly the engine convention: each sample's last token was never forwarded.
        t = int(holes_T.nonzero()[0, 0])
        b = sequence_of(cu_B1, t)
        return MissingRoutesError(
            f"{where}{int(holes_T.sum())} sequence(s) have no route for their last token, the first at row {t} "
            f"(sequence {b}): an inference engine never forwards a sample's last token, and "
            "routereplay.core.layout.engine_to_training leaves its row invalid; replay it with "
            "routereplay.rl.RouteStore(handle, trace).replay(sample_ids, attention_mask=...), which routes only "
            "those last tokens live and raises on any other gap"
        )
    t = int(inner_T.nonzero()[0, 0])
    b = sequence_of(cu_B1, t)
    return MissingRoutesError(
        f"{where}{int(inner_T.sum())} row(s) inside their sequence have no recorded route, the first at row {t} "
        f"(sequence {b}, position {t - int(cu_B1[b])} of {int(lens_B[b])}); capture the routes of every forward "
        "of the sequence (a conversation's turns or a resumed generation's attempts: "
        'routereplay.formats.RouteAccumulator joins them), or replay with missing="live" to route every row '
        "without a route live"
    )


def _mask_error(where: str, mask_BS: torch.Tensor, cu_B1: torch.Tensor) -> TokenCountMismatchError:
    real_B, lens_B = mask_BS.sum(1), cu_B1.diff()
    tokens, seqs = int(cu_B1[-1]), cu_B1.numel() - 1
    return TokenCountMismatchError(
        f"{where}attention_mask has {mask_BS.shape[0]} rows with {real_B.tolist()} real tokens but the "
        f"trace has {seqs} sequences of {lens_B.tolist()} tokens" + _engine_hint(int(real_B.sum()), tokens, seqs)
    )


class Replay:
    """Forced routing for the forwards run inside the block; built by ``handle.replay(...)``."""

    def __init__(self, handle: ModeHost, traces, *, attention_mask, missing, verify) -> None:
        self._handle = handle
        self._verify = verify
        if verify:
            lacking = [handle.where(i) for i, has in enumerate(handle.verifiable) if not has]
            if lacking:
                raise ReplayError(
                    f"verify=True needs the experts module of every MoE layer, the adapter found none for "
                    f"{', '.join(lacking)}; replay without verify"
                )
        single = isinstance(traces, (RoutingTrace, PreparedTrace))
        trace_list = [traces] if single else list(traces)
        if not trace_list or not all(isinstance(t, (RoutingTrace, PreparedTrace)) for t in trace_list):
            raise ReplayError(
                "replay needs a RoutingTrace, a PreparedTrace or a non-empty list of them, found "
                f"{type(traces).__name__}"
            )
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
        total = len(trace_list)
        self._mbs: list[PreparedTrace] = []
        for n, (t, m) in enumerate(zip(trace_list, masks)):
            where = f"trace {n}: " if total > 1 else ""
            if isinstance(t, RoutingTrace):
                self._mbs.append(prepare(handle, t, attention_mask=m, missing=missing or "error", where=where))
                continue
            if t.handle is not handle:
                raise ReplayError(f"{where}this PreparedTrace was prepared by another handle; prepare it with this one")
            if m is not None:
                raise LayoutError(
                    f"{where}a PreparedTrace carries its attention mask; pass attention_mask to prepare()"
                )
            if missing is not None and missing != t.missing:
                raise ReplayError(f'{where}the trace was prepared with missing="{t.missing}", replay asks "{missing}"')
            self._mbs.append(t)
        L = len(handle.layers)
        self._forced: list[torch.Tensor | None] = [None] * total  # per trace: int64 [L, N, K], widened on first use
        self._count = [0] * L
        self._rows = [0] * L
        # Per layer, (live ids, forced ids, forced mask) of each forward: disagreement is computed
        # only when `stats` is read, keeping its kernels off the forward's hot path.
        self._compared: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = [[] for _ in range(L)]
        self._issued: list[torch.Tensor | None] = [None] * L
        self._deferred: list[_Check] = []  # device-side checks of the forwards, read at exit
        self._shape_checked = -1  # the last forward whose batch shape was checked
        self._entered = False
        self._block = 0

    def __enter__(self) -> Replay:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if self._entered:
            raise ReplayError("a Replay can be entered once; call handle.replay(...) again")
        self._block = self._handle.enter_block(self)
        self._entered = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        h = self._handle
        h.exit_block(self)
        if exc_type is not None:
            return
        self._raise_deferred()
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
                + (UNSEEN_HINT if used == 0 and (max(self._count) > 0 or self._shape_checked >= 0) else "")
            )

    def _raise_deferred(self) -> None:
        """The device-side checks (the traces' at preparation, the forwards' packed boundaries and
        batch shapes), read once: one host sync, at exit."""
        checks = list(self._deferred)
        for mb in self._mbs:
            if mb.ready is not None:
                torch.cuda.current_stream(mb.forced_LNK.device).wait_event(mb.ready)
            checks.extend(mb.checks)
        if not checks:
            return
        if _read_flag(torch.stack([flag.to(checks[0][0].device) for flag, _ in checks]).any()):
            for flag, error in checks:
                if bool(flag):
                    raise error()
        for mb in self._mbs:
            mb.checks.clear()  # a prepared trace's own checks passed: later blocks need not read them

    # --- forwards ------------------------------------------------------------------------------
    def note_batch(self, index: int, shape: tuple[int, ...], packed=None, forward_mask_BS=None) -> None:
        """The first MoE block's input ``[B, S]`` of a forward (with the forward's own attention
        mask when the adapter sees it): it must be the batch the trace was laid out for."""
        n = self._count[index]
        if n >= len(self._mbs) or len(shape) != 2 or n == self._shape_checked:
            return
        self._shape_checked = n  # one check per forward, at its first MoE block
        mb = self._mbs[n]
        B, S = shape
        if packed is not None and not mb.padded and S == mb.rows:
            self._check_packing(index, n, mb, packed)
        if B * S != mb.rows:
            return  # a row count off says more in _route
        if mb.padded:
            if (B, S) != mb.shape:
                raise self._shape_error(index, n, (B, S))
            if forward_mask_BS is not None:
                self._check_mask(index, n, mb, forward_mask_BS)
            return
        if B == 1 and forward_mask_BS is None:
            return  # a packed [1, T] batch holds any number of sequences (boundaries checked above)
        # B rows of S tokens, one sequence each (a [1, T] forward with its own mask is one sequence)
        if B != mb.num_seqs:
            raise self._shape_error(index, n, (B, S))
        if mb.lens_B is not None:  # a device trace: its sequence lengths are not on the host
            differs = (mb.lens_B != S).any()
            self._deferred.append((differs, lambda: self._shape_error(index, n, (B, S))))
        elif mb.shape != (B, S):
            raise self._shape_error(index, n, (B, S))

    def _shape_error(self, index: int, n: int, found: tuple[int, int]) -> BatchShapeMismatchError:
        mb = self._mbs[n]
        mb_txt = f"trace {n} of {len(self._mbs)}" if len(self._mbs) > 1 else "the trace"
        one = " (one sequence, by its attention mask)" if found[0] == 1 else ""
        if mb.padded:
            what = f"its attention mask is {list(mb.shape)}"
        else:
            lens = mb.cu_B1.diff().tolist()
            if len(set(lens)) == 1:
                what = (
                    f"{mb_txt} holds {mb.num_seqs} sequences of {lens[0]} tokens, a batch of {[mb.num_seqs, lens[0]]}"
                )
            else:
                what = f"{mb_txt} holds {mb.num_seqs} sequences of {lens} tokens, which no batch without padding holds"
        return BatchShapeMismatchError(
            f"{self._handle.where(index)}: the forward's batch is {list(found)}{one} but {what}; "
            "replay each trace on the batch it was recorded on (or pass its attention_mask)"
        )

    def _check_mask(self, index: int, n: int, mb: PreparedTrace, forward_mask_BS: torch.Tensor) -> None:
        """A padded trace's mask must be the forward's own: padding on the other side (left vs
        right) has the same shape and puts every route on another token."""
        fwd_BS = forward_mask_BS.to(torch.bool)
        want_BS = mb.mask_BS.to(fwd_BS.device, non_blocking=True)
        differs_BS = fwd_BS != want_BS
        where = self._handle.where(index)
        mb_txt = f"trace {n} of {len(self._mbs)}" if len(self._mbs) > 1 else "the trace"

        def error() -> AttentionMaskMismatchError:
            b, s = (int(i) for i in differs_BS.nonzero()[0])
            return AttentionMaskMismatchError(
                f"{where}: the attention_mask forward {n + 1} runs with differs from the one {mb_txt} was laid out "
                f"with, first at [{b}, {s}] (forward: {int(fwd_BS[b, s])}, replay: {int(want_BS[b, s])}); pass "
                "replay/prepare the attention_mask of the batch this forward runs on"
            )

        _check(differs_BS.any(), error, self._deferred)

    def _check_packing(self, index: int, n: int, mb: PreparedTrace, packed: tuple[str, torch.Tensor]) -> None:
        """A packed ``[1, T]`` forward must hold the trace's sequences: same boundaries."""
        kind, value = packed
        where = f"{self._handle.where(index)}: the packed batch of forward {n + 1}"
        fix = "pack the samples in the trace's sequence order (or replay a trace of this packing)"
        cu_B1 = mb.cu_B1.to(value.device, non_blocking=True)
        if kind == "cu":
            if value.numel() != cu_B1.numel():
                raise BatchShapeMismatchError(
                    f"{where} holds {value.numel() - 1} sequences (cu_seq_lens_q) but the trace has "
                    f"{cu_B1.numel() - 1}; {fix}"
                )
            differs = (value.to(torch.int64) != cu_B1).any()
        else:
            lens_B = cu_B1.diff()
            starts_N = torch.repeat_interleave(cu_B1[:-1], lens_B, output_size=mb.rows)
            want_N = torch.arange(mb.rows, device=value.device) - starts_N
            # positions not starting at 0 are a slice of a longer packed row (sequence parallel):
            # its sequences are the layout's business (routereplay.core.layout.split_sp), not checked here
            differs = (value[0] == 0) & (value.to(torch.int64) != want_N).any()
        source = "cu_seq_lens_q" if kind == "cu" else "position_ids"
        message = f"{where} has sequence boundaries (from its {source}) other than the trace's; {fix}"
        _check(differs, lambda: BatchShapeMismatchError(message), self._deferred)

    def _forced_LNK(self, n: int) -> torch.Tensor:
        """int64 ``[L, N, K]`` ids of trace ``n``, widened at its first MoE layer (after the side-stream
        copy of a host trace, which the compute stream waits for here: no host sync)."""
        forced_LNK = self._forced[n]
        if forced_LNK is None:
            mb = self._mbs[n]
            if mb.ready is not None:
                stream = torch.cuda.current_stream(mb.forced_LNK.device)
                stream.wait_event(mb.ready)
                for t in (mb.forced_LNK, mb.mask_N):  # allocated on the side stream, used on this one
                    if t is not None:
                        t.record_stream(stream)
            forced_LNK = self._forced[n] = mb.forced_LNK.to(torch.int64, memory_format=torch.contiguous_format)
        return forced_LNK

    def answer(self, index, logits_NE, weights_NK, ids_NK, route_kw, *, scoped: bool):
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
        forced_NK = self._forced_LNK(n)[index]
        mask_N = mb.mask_N
        if forced_NK.device != logits_NE.device:
            forced_NK = forced_NK.to(logits_NE.device, non_blocking=True)
            mask_N = None if mask_N is None else mask_N.to(logits_NE.device, non_blocking=True)
        weights, ids = h.forced_weights[index](logits_NE, forced_NK, mask_N, route_kw)
        self._compared[index].append((ids_NK.detach(), forced_NK, mask_N))
        self._rows[index] += N
        self._count[index] = n + 1
        if self._verify:
            self._issued[index] = ids
        if not scoped and not torch.is_grad_enabled():
            return weights, ids, None  # nothing can recompute this call
        return weights, ids, Binding(forced_NK, mask_N, f"replay block {self._block}, forward {n + 1}")

    @property
    def reads_experts(self) -> bool:
        """What the experts receive is checked (``verify=True``): the handle intercepts them meanwhile."""
        return self._verify

    def check_dispatch(self, index: int, received_NK: torch.Tensor) -> None:
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

    # --- results -------------------------------------------------------------------------------
    @property
    def forwards(self) -> int:
        """Forwards replayed so far (micro-batch traces consumed)."""
        return min(self._count)

    @property
    def stats(self) -> dict[int, LayerStats]:
        """Per layer id: rows, replayed rows, live rows and live-vs-forced disagreement (computed and
        synced here, not during the forwards)."""
        self._raise_deferred()
        h = self._handle
        out = {}
        for i, m in enumerate(h.layers):
            d = sum(int(_set_differs(*c).sum()) for c in self._compared[i])
            replayed = sum(len(live) if mask is None else int(mask.sum()) for live, _, mask in self._compared[i])
            out[m.layer_id] = LayerStats(
                layer_id=m.layer_id,
                rows=self._rows[i],
                replayed=replayed,
                live=self._rows[i] - replayed,
                disagreement=d,
            )
        return out


def _host_ids_ok(forced_LNK: torch.Tensor, mask_N, layers, *, distinct: bool = False) -> bool:
    """Host fast path of :func:`_check_ids`: True when every forced row is in range and names K
    distinct experts (known, with ``distinct``), checked in the ids' own dtype over cache-sized
    blocks (no int64 copy, no ``[L, N, K, K]`` pair tensor). False (then the full check finds and
    reports the row) when a check fails, or when a layer's router enforces a group limit, which
    only the full check reads."""
    if any(groups_spanned(forced_LNK[:0, :0], m.spec) is not None for m in layers):
        return False
    experts_NLK = forced_LNK.permute(1, 0, 2)
    if not experts_NLK.is_contiguous() or not experts_NLK.numel():
        return False
    K = experts_NLK.shape[2]
    num_logits = min(m.spec.num_logits for m in layers)
    if not (experts_NLK.dtype == torch.uint8 and num_logits >= 256):
        ids = experts_NLK.numpy()  # numpy: one thread (see _pinned); rows without a route hold zeros, in range
        if int(ids.min()) < 0 or int(ids.max()) >= num_logits:
            return False
    if K == 1 or distinct:
        return True
    return first_duplicate_row(experts_NLK, mask_N) < 0


def _violations(forced_LNK: torch.Tensor, layers, *, distinct: bool = False) -> torch.Tensor:
    """bool ``[L, N]``: ``routing.forced_violations`` of every layer; one call over all layers
    when they share a spec (the usual case), else one per layer."""
    spec = layers[0].spec
    if all(m.spec == spec for m in layers):
        return forced_violations(forced_LNK, spec, distinct=distinct)
    return torch.stack([forced_violations(forced_LNK[i], m.spec, distinct=distinct) for i, m in enumerate(layers)])


def _uniform_shape(trace: RoutingTrace) -> tuple[int, int] | None:
    """``(B, S)`` when every sequence of the trace has the same length (a batch without padding)."""
    lens_B = trace.seq_lens
    if lens_B.numel() == 0 or not bool((lens_B == lens_B[0]).all()):
        return None
    return trace.num_seqs, int(lens_B[0])


def _set_differs(live_NK: torch.Tensor, forced_NK: torch.Tensor, mask_N: torch.Tensor | None) -> torch.Tensor:
    """bool ``[N]``: forced rows whose live top-k set differs from the forced set."""
    with torch.no_grad():
        differ_N = (live_NK.sort(-1).values != forced_NK.sort(-1).values).any(-1)
        return differ_N if mask_N is None else differ_N & mask_N


def _engine_hint(rows: int, tokens: int, seqs: int) -> str:
    if rows - tokens == seqs:
        return (
            f"; the trace has exactly one row fewer per sequence ({seqs} sequences): it looks like an engine "
            "capture (no route for the last token), convert it with routereplay.core.layout (engine -> training)"
        )
    if tokens - rows == seqs:
        return (f"; the trace has one row more per sequence ({seqs} sequences) than the batch: were the last tokens "
            "dropped?")
    return ""


def _rows_message(where: str, n: int, num_mbs: int, N: int, mb: PreparedTrace) -> str:
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


def _read_flag(flag: torch.Tensor) -> bool:
    """The value of a bool scalar. On an accelerator the host thread sleeps until it is computed
    (a blocking event), rather than spinning in a synchronizing read as ``bool(flag)`` would."""
    if not flag.is_cuda:
        return bool(flag)
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    done = torch.cuda.Event(blocking=True)
    done.record()
    done.synchronize()
    return bool(host)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of host tensor ``t`` in pinned memory: an accelerator copies it asynchronously.

    The copy runs through numpy, on this thread: torch's would wake its whole OpenMP team for a
    sub-millisecond job, whose threads then spin idle for milliseconds each (measured on a 16-core
    H100 host: a host trace replayed every step cost 3x the host CPU of a plain step)."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    np.copyto(out.numpy(), t.numpy())
    return out


def _model_device(model: Any) -> torch.device:
    for m in model if isinstance(model, (list, tuple)) else [model]:
        params = getattr(m, "parameters", None)
        if params is not None:
            for p in params():
                return p.device
    return torch.device("cpu")
