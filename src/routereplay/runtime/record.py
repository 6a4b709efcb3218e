"""The record mode: the live routes of every forward run inside ``with handle.record() as rec:``.

Recomputes of activation checkpointing are not recorded again (the handle answers them from the
forward's binding): each layer records once per forward.

Legend: N rows a router sees in one forward (B * S, padding included), T tokens of the trace,
L MoE layers (``handle.layers`` order), K top-k, B sequences (batch rows), S padded length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from routereplay.core.errors import AttentionMaskMismatchError, LayoutError, ReplayError
from routereplay.core.trace import RoutingTrace, expert_dtype
from routereplay.runtime.modes import UNSEEN_HINT, ModeHost
from routereplay.runtime.recompute import Binding

__all__ = ["Recording"]

# A recording keeps each layer's ids as the routers made them (int64 on most models) until this
# many forwards, or this many bytes, are pending, then narrows them into one compact block: one op
# per layer per 64 decode steps, and at most about a MiB of a layer's int64 ids held (a long
# generation's, or an R2 pass's large micro-batches', stay compact; a forward of over a MiB of ids
# per layer is narrowed at once).
_NARROW_EVERY = 64
_NARROW_BYTES = 1 << 20


class Recording:
    """Live routes of the forwards run inside the block; built by ``handle.record()``."""

    reads_experts = False  # what the router returns is what it records

    def __init__(self, handle: ModeHost, *, offload: bool, generation: bool = False) -> None:
        self._handle = handle
        self._offload = offload
        # Inside generate() (no_grad, never checkpointed) no forward can be recomputed: the handle
        # skips the checkpoint scopes of its calls (a walk of the Python stack on every router call).
        self.generation = generation
        L = len(handle.layers)
        # Per layer: the ids of the forwards since its last narrowing, as the router made them
        # ([N, K] each), and the narrowed blocks before them ([sum N, K] compact, with each
        # forward's N): see answer().
        self._ids: list[list[torch.Tensor]] = [[] for _ in range(L)]
        self._narrowed: list[list[tuple[torch.Tensor, list[int]]]] = [[] for _ in range(L)]
        self._narrowed_forwards = [0] * L
        self._pending_bytes = [0] * L
        self._shapes: list[tuple[int, ...]] = []  # per forward, from the first MoE block's input
        self._packed: list[tuple[str, torch.Tensor] | None] = []  # per forward: a packed batch's sequences
        self._masks: list[torch.Tensor | None] = []  # per forward: its own [B, S] attention mask, when seen
        self._dtype = expert_dtype(handle.num_experts)
        self._entered = False
        self._block = 0
        self._pending_copy = False

    def __enter__(self) -> Recording:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if self._entered:
            raise ReplayError("a Recording can be entered once; call handle.record() again")
        self._block = self._handle.enter_block(self)
        self._entered = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.exit_block(self)

    def note_batch(self, index: int, shape: tuple[int, ...], packed=None, forward_mask_BS=None) -> None:
        self._shapes.append(shape)
        self._packed.append(packed)
        # the forward's own tensor, not a copy: no op on the recording's hot path
        self._masks.append(forward_mask_BS)

    def answer(self, index, logits_NE, weights_NK, ids_NK, route_kw, *, scoped: bool):
        # Integer ids carry no autograd history: kept as the router made them, no op per call (no
        # detach, no copy: a kernel launch per layer per decode step is what capture would cost).
        # Ids from a torch.compile'd region are copied, compact: under CUDA graphs (generate's
        # static cache) they live in the graph's memory pool, which the next step overwrites.
        # Every _NARROW_EVERY forwards (or _NARROW_BYTES) a layer's kept ids are narrowed into one block.
        kept = ids_NK
        if self._offload and ids_NK.is_cuda:
            kept = torch.empty(ids_NK.shape, dtype=self._dtype, pin_memory=True)
            kept.copy_(ids_NK.to(self._dtype), non_blocking=True)
            self._pending_copy = True
        elif self._handle.compiled_call:
            kept = ids_NK.to(self._dtype, copy=True)
        pending = self._ids[index]
        pending.append(kept)
        if not self._offload:
            self._pending_bytes[index] += kept.numel() * kept.element_size()
            if len(pending) >= _NARROW_EVERY or self._pending_bytes[index] >= _NARROW_BYTES:
                self._narrow(index)
        if not scoped and not torch.is_grad_enabled():
            return weights_NK, ids_NK, None  # nothing can recompute this call (generate's decode steps)
        forward = self._narrowed_forwards[index] + len(pending)
        binding = Binding(ids_NK, None, f"record block {self._block}, forward {forward}")
        if not scoped:
            return weights_NK, ids_NK, binding
        # A checkpointed region's recompute will be forced to these ids, and non-reentrant
        # checkpointing requires it to run the same ops as the forward: the forward routes through
        # the same forced computation (the spec's weight math reproduces the router's weights bit
        # for bit).
        weights, ids = self._handle.forced_weights[index](logits_NE, ids_NK, None, route_kw)
        return weights, ids, binding

    def _narrow(self, index: int) -> None:
        """Join layer ``index``'s kept ids into one compact block (one op), freeing the router's tensors."""
        pending = self._ids[index]
        lens = [t.shape[0] for t in pending]
        block = torch.empty((sum(lens), pending[0].shape[1]), dtype=self._dtype, device=pending[0].device)
        torch.cat(pending, out=block)
        self._narrowed[index].append((block, lens))
        self._narrowed_forwards[index] += len(pending)
        self._pending_bytes[index] = 0
        pending.clear()

    def _forwards(self, index: int) -> list[torch.Tensor]:
        """Layer ``index``'s ids, one ``[N, K]`` tensor per forward (views of the narrowed blocks first)."""
        out: list[torch.Tensor] = []
        for block, lens in self._narrowed[index]:
            out.extend(block.split(lens))
        return out + self._ids[index]

    # --- results -------------------------------------------------------------------------
    def _sync(self) -> None:
        if self._pending_copy:
            torch.cuda.synchronize()
            self._pending_copy = False

    @property
    def num_forwards(self) -> int:
        """Forwards recorded (each layer must have seen the same number)."""
        counts = [n + len(x) for n, x in zip(self._narrowed_forwards, self._ids)]
        if len(set(counts)) > 1:
            h = self._handle
            desc = ", ".join(f"{h.where(i)}: {c}" for i, c in enumerate(counts))
            raise ReplayError(
                f"MoE layers saw different numbers of forwards ({desc}); every forward must run "
                "every MoE layer for a trace to be built" + (UNSEEN_HINT if min(counts) == 0 else "")
            )
        return counts[0]

    @property
    def calls(self) -> list[torch.Tensor]:
        """Per forward, in call order: ``[N, L, K]`` ids (compact dtype) of the rows the routers saw."""
        n = self.num_forwards
        self._sync()
        layers = [self._forwards(index) for index in range(len(self._ids))]
        return [torch.stack([layer[i] for layer in layers], dim=1).to(self._dtype) for i in range(n)]

    @property
    def batch_shapes(self) -> list[tuple[int, int]]:
        """Per forward, ``(B, S)`` of the MoE block input (``(1, N)`` for 2-D block inputs)."""
        n = self.num_forwards
        shapes = self._shapes
        if len(shapes) != n:
            raise ReplayError(
                f"{self._handle.where(0)}: the adapter saw {len(shapes)} block inputs for {n} forwards; "
                "batch shapes are unknown for this model, pass attention_mask to trace()"
                + (UNSEEN_HINT if n == 0 else "")
            )
        return [(s[0], s[1]) if len(s) == 2 else (1, s[0]) if len(s) == 1 else (s[0], s[-1]) for s in shapes]

    def sequence_boundaries(self, forward: int = -1) -> torch.Tensor | None:
        """The sequence boundaries a packed ``[1, T]`` forward named in its inputs, or None.

        A padding-free packed batch names its sequences through ``position_ids`` restarting at 0
        or flash-attention's ``cu_seq_lens_q`` (as :meth:`trace` reads them). Returns int64
        ``[B+1]`` from 0 to the forward's rows, or None when the forward named none (no such
        input, a padded batch, or positions of a sequence-parallel slice, not starting at 0).

        Raises:
            LayoutError: the named boundaries do not fit the forward's rows (as :meth:`trace`).
        """
        n = range(self.num_forwards)[forward]
        packed = self._packed[n] if n < len(self._packed) else None
        if packed is None:
            return None
        N = self._forwards(0)[n].shape[0] if self._ids else 0
        kind, value = packed
        if kind == "pos" and (N == 0 or int(value.reshape(-1)[0]) != 0):
            return None
        lens_B = _packed_lens(n, packed, N)
        cu = torch.zeros(lens_B.numel() + 1, dtype=torch.int64)
        torch.cumsum(lens_B, 0, out=cu[1:])
        return cu

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
                packed = self._packed[n] if B == 1 and n < len(self._packed) else None
                lens_B = torch.full((B,), S, dtype=torch.int64) if packed is None else _packed_lens(n, packed, N)
                lens.append(lens_B)
                continue
            mask_BS = mask.to("cpu", torch.bool)
            if mask_BS.ndim != 2 or mask_BS.numel() != N:
                raise LayoutError(
                    f"forward {n}: attention_mask has shape {tuple(mask_BS.shape)} ({mask_BS.numel()} positions) "
                    f"but the routers saw {N} rows; pass the [B, S] mask of that forward's input_ids"
                )
            _check_forward_mask(n, mask_BS, self._masks[n] if n < len(self._masks) else None)
            keep_N = mask_BS.reshape(-1).to(ids_NLK.device)
            parts_NLK.append(ids_NLK[keep_N])
            lens.append(mask_BS.sum(1))
        experts_TLK = torch.cat(parts_NLK) if parts_NLK else torch.zeros(0, len(h.layers), h.top_k, dtype=self._dtype)
        lens_B = torch.cat(lens) if lens else torch.zeros(0, dtype=torch.int64)
        cu = torch.zeros(lens_B.numel() + 1, dtype=torch.int64)
        torch.cumsum(lens_B, 0, out=cu[1:])
        # Ids come straight from the routers' top-k (in range, distinct): no O(T) validation, and
        # the trace says its rows are distinct (rows_checked: prepare and load need not search them).
        return RoutingTrace.unchecked(
            experts=experts_TLK,
            cu_seqlens=cu.to(experts_TLK.device),
            layer_ids=h.layer_ids,
            num_experts=h.num_experts,
            meta={"source": "routereplay.runtime.record", "model": _model_name(h.model)},
            rows_checked=True,
        )


def _check_forward_mask(n: int, mask_BS: torch.Tensor, forward_BS: torch.Tensor | None) -> None:
    """The mask given to ``trace()`` must be the one forward ``n`` ran with, when the adapter saw it.

    Raises:
        AttentionMaskMismatchError: another shape, or other positions (left vs right padding).
    """
    if forward_BS is None:
        return
    forward_BS = forward_BS.to("cpu", torch.bool)
    fix = "pass the attention_mask of that forward's batch"
    if forward_BS.shape != mask_BS.shape:
        raise AttentionMaskMismatchError(
            f"forward {n}: attention_mask has shape {tuple(mask_BS.shape)} but the forward ran with one of shape "
            f"{tuple(forward_BS.shape)}; {fix}"
        )
    differs_BS = forward_BS != mask_BS
    if bool(differs_BS.any()):
        b, s = (int(i) for i in differs_BS.nonzero()[0])
        raise AttentionMaskMismatchError(
            f"forward {n}: attention_mask differs from the one the forward ran with, first at [{b}, {s}] "
            f"(given: {int(mask_BS[b, s])}, forward: {int(forward_BS[b, s])}); {fix}"
        )


def _packed_lens(n: int, packed: tuple[str, torch.Tensor], N: int) -> torch.Tensor:
    """Sequence lengths of a padding-free packed forward, from its varlen boundaries or from its
    position ids (each sequence restarts at 0 and counts up by one).

    Raises:
        LayoutError: boundaries that do not cover the ``N`` rows, or positions that do not count up
            by one within each sequence. Positions that do not start at 0 (a sequence-parallel slice)
            give one sequence of ``N`` rows.
    """
    kind, value = packed
    value = value.to("cpu", torch.int64)
    if kind == "cu":
        if value.numel() < 2 or int(value[0]) != 0 or int(value[-1]) != N or bool((value.diff() < 0).any()):
            raise LayoutError(
                f"forward {n}: cu_seq_lens_q {value.tolist()} does not run from 0 to the {N} packed rows the "
                "routers saw; pass the boundaries of this forward's packed batch"
            )
        return value.diff()
    if N == 0 or int(value[0]) != 0:
        # a slice of a longer packed row (sequence parallel): one sequence of N rows, as without
        # positions; routereplay.core.layout.split_sp / gather_sp map it to the global layout
        return torch.tensor([N])
    starts_B = (value == 0).nonzero().reshape(-1)
    lens_B = torch.diff(starts_B, append=torch.tensor([N]))
    want_N = torch.arange(N) - torch.repeat_interleave(starts_B, lens_B)
    if not torch.equal(value, want_N):
        t = int((value != want_N).nonzero()[0, 0])
        raise LayoutError(
            f"forward {n}: position_ids[{t}] is {int(value[t])}, expected {int(want_N[t])}: the positions of a "
            "packed sequence must count up from 0 by one"
        )
    return lens_B


def _model_name(model) -> str:
    """The model's class name, through wrappers that subclass it (FSDP2's ``FSDP<Model>``)."""
    model = model[0] if isinstance(model, (list, tuple)) and model else model
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch.distributed") and not cls.__name__.startswith("FSDP"):
            return cls.__name__
    return type(model).__name__
