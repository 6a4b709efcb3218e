"""RoutingTrace: the experts chosen for every token in every MoE layer.

Legend (shape suffixes used in this file):
    T  tokens, all sequences packed back to back in training order
    L  MoE layers (dense layers are not part of a trace)
    K  top-k slots, in the order the router ranked them
    B  sequences
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from routereplay.core.errors import (
    DuplicateExpertError,
    ExpertIdError,
    GatesError,
    LayerIdsError,
    NumExpertsError,
    SeqlensError,
    TraceMismatchError,
    TraceShapeError,
)
from routereplay.core.index import ranges, sequence_of

__all__ = ["MAX_NUM_EXPERTS", "RoutingTrace", "expert_dtype"]

# The widest dtype a trace stores ids in is int32 (the .rrt format's I32), so the largest id,
# num_experts - 1, must be at most 2**31 - 1: above this bound an id would wrap on storage.
# Routers in use have at most a few thousand experts; the bound only refuses corrupt or
# mistyped counts, and it makes every num_experts-sized count fit a signed 32-bit index.
MAX_NUM_EXPERTS = 2**31

# Unsigned dtypes torch stores but cannot compare or reduce (no aminmax, <, nonzero on CPU in
# torch 2.x): the ids are widened to the signed dtype that holds all their values before the
# checks. uint64 ids of 2**63 and above become negative there, and are reported as unsigned.
_WIDE_UNSIGNED = {torch.uint16: torch.int32, torch.uint32: torch.int64, torch.uint64: torch.int64}
# Validation walks the ids in blocks of about this many elements (a few MB: cache-sized temporaries).
_BLOCK_ELEMENTS = 1 << 22
# The host duplicate check compares rows in chunks whose K(K-1)/2 pair masks (or K slot planes, if
# larger) take about this many bytes: ~75k rows at K=8. Measured on a 2-core Zen 4 VM (1 MB L2),
# 1 and 2 threads: smaller chunks pay more numpy calls (each holds the GIL a moment, which the
# threads share), larger ones spill the masks from cache (two threads then share DRAM bandwidth).
_DUP_CHUNK_BYTES = 2 << 20
# ... and shares the chunks among threads from this many rows on (~8 MB of uint8 ids at K=8, a few
# ms of work: a thread's start-up, ~0.1 ms, is then noise), with at most this many threads.
_DUP_PARALLEL_ROWS = 1 << 20
_DUP_MAX_WORKERS = 8
# cu_seqlens of at most this many entries (on the CPU) are checked as Python ints, not tensor ops.
_SMALL_SEQLENS = 64


def expert_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype that holds every id in ``[0, num_experts)``.

    uint8 up to 256 experts, int16 up to 2**15, int32 up to :data:`MAX_NUM_EXPERTS` (2**31).
    Signed 16/32-bit rather than unsigned because torch cannot compare or reduce uint16/uint32
    tensors, and the ``.rrt`` format stores exactly these three (U8, I16, I32).

    Raises:
        NumExpertsError: ``num_experts`` is not an int in ``[1, MAX_NUM_EXPERTS]``.
    """
    _check_num_experts(num_experts)
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


def _check_num_experts(num_experts: object) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise NumExpertsError(f"num_experts must be a positive int, found {num_experts!r}")
    if num_experts > MAX_NUM_EXPERTS:
        raise NumExpertsError(
            f"num_experts={num_experts} is above the largest count a trace can store, "
            f"MAX_NUM_EXPERTS=2**31 (ids are stored as int32 at most); pass the router's real expert count"
        )


def _checked_layer_ids(layer_ids, L: int) -> tuple[int, ...]:
    """``layer_ids`` as a tuple of L distinct non-negative ints."""
    if isinstance(layer_ids, torch.Tensor):
        layer_ids = layer_ids.tolist()
    layer_ids = tuple(layer_ids)
    plain = set(map(type, layer_ids)) <= {int}  # ints, not bools or numpy ints
    if plain and len(layer_ids) == L == len(set(layer_ids)) and min(layer_ids, default=0) >= 0:
        return layer_ids  # distinct non-negative ints: the common case, in a few set operations
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layer_ids):
        raise LayerIdsError(f"layer_ids must be non-negative ints, found {layer_ids}")
    if len(layer_ids) != L:
        raise LayerIdsError(f"experts has L={L} layers but layer_ids has {len(layer_ids)}: {layer_ids}")
    if len(set(layer_ids)) != L:
        dup = sorted({i for i in layer_ids if layer_ids.count(i) > 1})
        raise LayerIdsError(f"layer_ids must be unique, layer(s) {dup} appear more than once in {layer_ids}")
    return layer_ids


def _checked_seqlens(cu_seqlens_B1, T: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` as int64 ``[B+1]`` on ``device``, from 0 to T, non-decreasing."""
    if not isinstance(cu_seqlens_B1, torch.Tensor):
        cu_seqlens_B1 = torch.as_tensor(cu_seqlens_B1)
    if cu_seqlens_B1.ndim != 1 or cu_seqlens_B1.numel() < 1 or cu_seqlens_B1.dtype.is_floating_point:
        raise SeqlensError(
            f"cu_seqlens must be a 1-D int tensor [B+1], found {tuple(cu_seqlens_B1.shape)} {cu_seqlens_B1.dtype}"
        )
    cu_seqlens_B1 = cu_seqlens_B1.to(device=device, dtype=torch.int64)
    if cu_seqlens_B1.numel() <= _SMALL_SEQLENS and device.type == "cpu":
        cu = cu_seqlens_B1.tolist()  # a few sequences (one engine request): Python ints beat four tensor ops
        if cu[0] == 0 and cu[-1] == T and all(a <= b for a, b in itertools.pairwise(cu)):
            return cu_seqlens_B1
    if int(cu_seqlens_B1[0]) != 0:
        raise SeqlensError(f"cu_seqlens must start at 0, found {int(cu_seqlens_B1[0])}")
    if int(cu_seqlens_B1[-1]) != T:
        raise SeqlensError(f"cu_seqlens must end at the number of tokens T={T}, found {int(cu_seqlens_B1[-1])}")
    seq_lens_B = cu_seqlens_B1.diff()
    if bool((seq_lens_B < 0).any()):
        b = _first_true(seq_lens_B < 0)
        raise SeqlensError(
            f"cu_seqlens must be non-decreasing: sequence {b} has length {int(seq_lens_B[b])} "
            f"(cu_seqlens[{b}]={int(cu_seqlens_B1[b])}, cu_seqlens[{b + 1}]={int(cu_seqlens_B1[b + 1])})"
        )
    return cu_seqlens_B1


def _first_true(mask: torch.Tensor) -> int:
    return int(mask.reshape(-1).nonzero()[0, 0])


@dataclass(frozen=True, kw_only=True, slots=True, eq=False)
class RoutingTrace:
    """Routes of a batch of sequences through the MoE layers of one model.

    Args:
        experts: integer ``[T, L, K]`` expert ids. Stored in the smallest dtype that holds
            ``num_experts`` (uint8 up to 256 experts, then int16, then int32); wider integer
            input is converted down. The order within K is kept as recorded.
        cu_seqlens: int ``[B+1]`` sequence boundaries in packed token order, from 0 to T.
        layer_ids: global decoder-layer index of each of the L MoE layers.
        num_experts: routed experts per layer; every id on a valid row is below it.
        valid: optional bool ``[T]``: rows whose route is known. Rows marked invalid are
            stored as zeros (an engine capture has no route for each sequence's last token).
        gates: optional float ``[T, L, K]`` gate weights as recorded.
        meta: small ``str -> str`` mapping (source, model fingerprint, ...).

    Validation is O(T*L*K), over cache-sized blocks; its costliest part, the check that no row
    names an expert twice, runs on ``torch.get_num_threads()`` threads (at most 8) from a million
    rows of ``T * L`` on. A trace remembers that it passed that check (see :meth:`rows_checked`):
    replay preparation and ``save`` then skip it, and so do the traces derived from it (selected
    sequences or layers, ``concat``, a device move). Treat a trace's tensors as read-only: an
    in-place torch write into ``experts`` or ``valid`` is noticed (their version counters move) and
    drops the mark; writes that bypass this tensor's counter (through ``.numpy()`` or ``.data``, or
    by another process into shared memory after a pickle) are not.

    Raises:
        TraceShapeError, SeqlensError, ExpertIdError, DuplicateExpertError, LayerIdsError,
        GatesError: the message names the sequence / layer / row and the values involved.
    """

    experts: torch.Tensor
    cu_seqlens: torch.Tensor
    layer_ids: tuple[int, ...]
    num_experts: int
    valid: torch.Tensor | None = None
    gates: torch.Tensor | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    # The version counters of (experts, valid) when the rows were last known to pass the repeat
    # check, or None: see rows_checked.
    _checked_at: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._validate(check_repeats=True)
        self._mark_checked()

    @classmethod
    def _with_distinct_rows(cls, **parts: Any) -> RoutingTrace:
        """The constructor, less the repeat check, for ids whose valid rows the caller has just
        checked for an expert named twice (``io.load``: beside the read, or by the file's writer)."""
        self = cls.unchecked(**parts)
        self._validate(check_repeats=False)
        self._mark_checked()
        return self

    def rows_checked(self) -> bool:
        """True when every valid row is known to name ``top_k`` distinct experts, and ``experts``
        and ``valid`` have not been written in place since: the trace was built by the validating
        constructor (or ``replace(check=True)``, a validated ``load``, an engine converter), or
        recorded (``Recording.trace``, ``capture_generation``: the routers' own top-k ids), or
        derived from such traces by routereplay (this class's methods, ``core.layout``, rank
        slices, gathers, stores). Replay preparation and :func:`routereplay.save` (which marks the
        file so that ``load`` can skip the check too) rely on it; a trace built with
        :meth:`unchecked` or ``replace(check=False, experts=...)`` is checked again where it is used.
        """
        return self._checked_at is not None and self._checked_at == _versions(self)

    def _mark_checked(self, known: bool = True) -> RoutingTrace:
        object.__setattr__(self, "_checked_at", _versions(self) if known else None)
        return self

    def _validate(self, *, check_repeats: bool) -> None:
        experts_TLK, cu_seqlens_B1, valid_T = self.experts, self.cu_seqlens, self.valid
        num_experts = self.num_experts
        _check_num_experts(num_experts)
        if not isinstance(experts_TLK, torch.Tensor) or experts_TLK.ndim != 3:
            if isinstance(experts_TLK, torch.Tensor):
                found = tuple(experts_TLK.shape)
            else:
                found = type(experts_TLK).__name__
            raise TraceShapeError(f"experts must be a [T, L, K] tensor, found {found}")
        dtype = experts_TLK.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TraceShapeError(f"experts must be an integer tensor, found dtype {dtype}")
        T, L, K = experts_TLK.shape
        if K < 1:
            raise TraceShapeError(f"experts has top_k={K}; a route needs at least one expert")

        layer_ids = _checked_layer_ids(self.layer_ids, L)
        cu_seqlens_B1 = _checked_seqlens(cu_seqlens_B1, T, experts_TLK.device)
        if valid_T is not None:
            if not isinstance(valid_T, torch.Tensor) or valid_T.shape != (T,):
                found = tuple(valid_T.shape) if isinstance(valid_T, torch.Tensor) else type(valid_T).__name__
                raise TraceShapeError(f"valid must be a bool tensor of shape ({T},), found {found}")
            valid_T = valid_T.to(device=experts_TLK.device, dtype=torch.bool)
        if self.gates is not None:
            self._check_gates(self.gates, experts_TLK.shape, valid_T, cu_seqlens_B1)

        experts_TLK = self._checked_ids(
            experts_TLK, valid_T, cu_seqlens_B1, layer_ids, num_experts, check_repeats=check_repeats
        )

        meta = dict(self.meta or {})
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TraceShapeError(f"meta must map str to str, found {k!r}: {v!r}")

        object.__setattr__(self, "experts", experts_TLK)
        object.__setattr__(self, "cu_seqlens", cu_seqlens_B1)
        object.__setattr__(self, "layer_ids", layer_ids)
        object.__setattr__(self, "valid", valid_T)
        object.__setattr__(self, "meta", MappingProxyType(meta))

    @classmethod
    def _check_gates(cls, gates_TLK, shape: torch.Size, valid_T, cu_seqlens_B1: torch.Tensor) -> None:
        """Gates: a float tensor shaped like the experts, finite on valid rows."""
        if not isinstance(gates_TLK, torch.Tensor) or not gates_TLK.dtype.is_floating_point:
            found = getattr(gates_TLK, "dtype", type(gates_TLK).__name__)
            raise GatesError(f"gates must be a float tensor, found {found}")
        if gates_TLK.shape != shape:
            raise GatesError(f"gates must be shaped like experts {tuple(shape)}, found {tuple(gates_TLK.shape)}")
        t = _first_nonfinite_row(gates_TLK, valid_T)
        if t >= 0:
            raise GatesError(
                f"gates must be finite: row {t} ({cls._where(cu_seqlens_B1, t)}) has {gates_TLK[t].tolist()}"
            )

    @staticmethod
    def _where(cu_seqlens_B1: torch.Tensor, t: int) -> str:
        b = sequence_of(cu_seqlens_B1, t)
        return f"sequence {b}, position {t - int(cu_seqlens_B1[b])}"

    @classmethod
    def _checked_ids(
        cls, experts_TLK, valid_T, cu_seqlens_B1, layer_ids, num_experts, *, check_repeats: bool = True
    ) -> torch.Tensor:
        """Range- and duplicate-check the ids on valid rows; return them in the compact dtype.

        Runs over cache-sized blocks of rows, so its temporaries stay a few MB whatever T is
        (no mask-gathered copy of the ids). Wide unsigned ids (uint16/uint32/uint64, as vLLM
        returns above 256 experts) are widened block by block to a signed dtype for the checks.
        The ids are returned as given when they are in the compact dtype and every invalid row
        is already zero (a loaded file, an engine's capture); otherwise one new tensor is built.
        """
        T, L, K = experts_TLK.shape
        unsigned64 = experts_TLK.dtype == torch.uint64
        dtype = expert_dtype(num_experts)
        all_valid = valid_T is None or bool(valid_T.all())
        # uint8 ids can only leave [0, num_experts) when there are fewer than 256 experts.
        check_range = not (experts_TLK.dtype == torch.uint8 and num_experts >= 256)
        needs_zeroing = False
        rows = max(1, _BLOCK_ELEMENTS // max(L * K, 1))
        # The range check and the invalid-row scan run block by block; the duplicate check runs
        # once over every row (threads share it, see first_duplicate_row), up to the first block
        # with an id out of range: as if each block were checked for range, then repeats, in turn.
        range_error, checked_to = None, T
        for start in range(0, T, rows):
            ids_NLK = experts_TLK[start : start + rows]
            if ids_NLK.dtype in _WIDE_UNSIGNED:
                # uint64 is reinterpreted, not converted: ids >= 2**63 turn negative and fail the range check.
                wide = _WIDE_UNSIGNED[ids_NLK.dtype]
                ids_NLK = ids_NLK.view(wide) if unsigned64 else ids_NLK.to(wide)
            valid_N = None if all_valid else valid_T[start : start + rows]
            gathered = False
            if valid_N is not None and bool(ids_NLK[~valid_N].any()):
                # Invalid rows holding ids (not zeros): check the valid rows alone, then re-zero.
                needs_zeroing = gathered = True
            if not check_range:
                continue
            # Zeroed invalid rows pass the range check (0 is always an id), so the block is checked
            # in place; only the duplicate check must skip them (their slots repeat 0).
            ids = ids_NLK[valid_N] if gathered else ids_NLK
            if not ids.numel():
                continue
            lo, hi = torch.aminmax(ids)
            if int(lo) < 0 or int(hi) >= num_experts:
                bad_NLK = (ids < 0) | (ids >= num_experts)
                n, l, k = (int(i) for i in bad_NLK.nonzero()[0])
                t = start + (int(valid_N.nonzero()[n, 0]) if gathered else n)
                found = int(ids[n, l, k])
                if unsigned64 and found < 0:
                    found += 2**64
                range_error = ExpertIdError(
                    f"expert id {found} at row {t} ({cls._where(cu_seqlens_B1, t)}), "
                    f"layer {layer_ids[l]}, slot {k} is outside [0, {num_experts})"
                )
                checked_to = start
                break
        if K > 1 and checked_to and check_repeats:
            keep_T = None if all_valid else valid_T[:checked_to]
            dup_row = first_duplicate_row(experts_TLK[:checked_to], keep_T)
            if dup_row >= 0:
                t, l = divmod(dup_row, L)
                ids_K = experts_TLK[t, l]
                if ids_K.dtype in _WIDE_UNSIGNED:
                    ids_K = ids_K.view(torch.int64) if unsigned64 else ids_K.to(_WIDE_UNSIGNED[ids_K.dtype])
                raise DuplicateExpertError(
                    f"row {t} ({cls._where(cu_seqlens_B1, t)}), layer {layer_ids[l]} selects an expert "
                    f"twice: {ids_K.tolist()}; each of the top-{K} slots must name a different expert"
                )
        if range_error is not None:
            raise range_error
        if needs_zeroing:
            out = torch.zeros(experts_TLK.shape, dtype=dtype, device=experts_TLK.device)
            source = experts_TLK
            if source.dtype in _WIDE_UNSIGNED:
                source = source.view(torch.int64) if unsigned64 else source.to(_WIDE_UNSIGNED[source.dtype])
            out[valid_T] = source[valid_T].to(dtype)
            return out
        if experts_TLK.dtype == dtype:
            return experts_TLK
        if unsigned64:
            return experts_TLK.view(torch.int64).to(dtype)
        return experts_TLK.to(dtype)

    @classmethod
    def unchecked(
        cls, *, experts, cu_seqlens, layer_ids, num_experts, valid=None, gates=None, meta=None, rows_checked=False
    ) -> RoutingTrace:
        """Build a trace without the constructor's O(T) checks.

        For parts derived from validated traces (layouts, slicing, converters that check what they
        convert): large conversions then run at memory bandwidth. The caller vouches for every
        invariant the constructor checks (shapes, dtypes, the id range and distinct ids per row,
        boundaries, the valid mask); a trace that breaks one replays wrong routes or fails later
        with raw errors. When in doubt, use ``RoutingTrace(...)``, or ``replace(check=True)``.

        Args:
            As the constructor's; ``meta`` may be any mapping (it is copied).
            rows_checked: the caller also knows that every valid row names distinct experts (rows
                of checked traces, a router's own top-k): :meth:`rows_checked` is then True, and
                replay preparation and ``save``/``load`` skip the repeat check.

        Returns:
            The trace, sharing the given tensors.
        """
        self = object.__new__(cls)
        for name, value in (
            ("experts", experts),
            ("cu_seqlens", cu_seqlens),
            ("layer_ids", tuple(layer_ids)),
            ("num_experts", num_experts),
            ("valid", valid),
            ("gates", gates),
            ("meta", MappingProxyType(dict(meta or {}))),
            ("_checked_at", None),
        ):
            object.__setattr__(self, name, value)
        return self._mark_checked(bool(rows_checked))

    def __reduce__(self):
        """Pickle as the tensors plus the small fields; unpickling skips the O(T) checks.

        ``meta`` travels as a plain dict (a mappingproxy cannot be pickled). A tensor that views
        a larger storage (a slice of a bigger batch) is compacted first, so the pickle carries
        the trace's own bytes, not its parent's. Under ``torch.multiprocessing`` the tensors go
        through torch's shared-memory reductions like any other tensor.
        """
        parts = {name: getattr(self, name) for name in _FIELDS}
        for name in ("experts", "cu_seqlens", "valid", "gates"):
            parts[name] = _own_bytes(parts[name])
        parts["meta"] = dict(self.meta)
        return _unpickle, (parts, self.rows_checked())

    def replace(self, *, check: bool = True, rows_checked: bool | None = None, **changes: Any) -> RoutingTrace:
        """A trace with some fields changed; the others are shared, not copied.

        Args:
            check: validate the result as the constructor does. ``check=False`` builds it with
                :meth:`unchecked`, for changes known to keep every invariant (a subset of rows of
                a validated trace, new metadata, a device move).
            rows_checked: with ``check=False``, whether the result's rows are known to name distinct
                experts (:meth:`rows_checked`; the caller vouches, as for :meth:`unchecked`). Default:
                kept from this trace when neither ``experts`` nor ``valid`` is among the changes.
            **changes: fields by name (``experts``, ``cu_seqlens``, ``layer_ids``, ``num_experts``,
                ``valid``, ``gates``, ``meta``).

        Raises:
            TraceShapeError, ExpertIdError, ...: with ``check=True``, what the constructor raises.
        """
        parts = {name: getattr(self, name) for name in _FIELDS}
        parts.update(changes)
        if check:
            return RoutingTrace(**parts)
        if rows_checked is None:
            rows_checked = "experts" not in changes and "valid" not in changes and self.rows_checked()
        return RoutingTrace.unchecked(**parts, rows_checked=rows_checked)

    def _derived(self, sources: Sequence[RoutingTrace], **changes: Any) -> RoutingTrace:
        """``replace(check=False, **changes)`` for rows taken from ``sources`` (row subsets, layer
        subsets, joins, copies): checked when every source is."""
        return self.replace(check=False, rows_checked=all(t.rows_checked() for t in sources), **changes)

    # --- sizes ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def seq_lens(self) -> torch.Tensor:
        """int64 ``[B]`` tokens per sequence."""
        return self.cu_seqlens.diff()

    @property
    def valid_mask(self) -> torch.Tensor:
        """bool ``[T]``: ``valid``, or all True when the trace has no mask."""
        if self.valid is None:
            return torch.ones(self.num_tokens, dtype=torch.bool, device=self.experts.device)
        return self.valid

    @property
    def device(self) -> torch.device:
        return self.experts.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the trace's tensors."""
        tensors = (self.experts, self.cu_seqlens, self.valid, self.gates)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # --- selection -----------------------------------------------------------------------
    def sequence(self, i: int) -> RoutingTrace:
        """The trace of sequence ``i`` alone (negative indices count from the end)."""
        B = self.num_seqs
        if not -B <= i < B:
            raise IndexError(f"sequence {i} out of range for a trace of {B} sequences")
        return self.select_sequences([i % B])

    def select_sequences(self, idx: Sequence[int] | torch.Tensor) -> RoutingTrace:
        """The trace of the sequences ``idx``, in that order (repeats allowed)."""
        idx_N = torch.as_tensor(idx, dtype=torch.int64, device=self.device).reshape(-1)
        B = self.num_seqs
        if idx_N.numel() and (int(idx_N.min()) < -B or int(idx_N.max()) >= B):
            raise IndexError(f"sequence indices {idx_N.tolist()} out of range for a trace of {B} sequences")
        idx_N = idx_N % max(B, 1)
        starts_N, lens_N = self.cu_seqlens[idx_N], self.seq_lens[idx_N]
        cu = torch.zeros(idx_N.numel() + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(lens_N, 0, out=cu[1:])
        total = int(cu[-1])
        if self.device.type == "cpu" and idx_N.numel() * _MIN_RUN_ROWS <= total:
            # Long sequences on the host: one slice copy per sequence into the output, no row
            # index at all (an int64 index per row costs more than the ids of a short row).
            spans = list(zip(starts_N.tolist(), lens_N.tolist()))
            take = lambda x: None if x is None else _copy_spans(x, spans, total)
        else:
            rows = ranges(starts_N, lens_N)
            take = lambda x: None if x is None else _take(x, rows)
        return self._derived(
            (self,), experts=take(self.experts), cu_seqlens=cu, valid=take(self.valid), gates=take(self.gates)
        )

    def select_layers(self, layer_ids: Iterable[int]) -> RoutingTrace:
        """The trace restricted to (and reordered as) the given global layer ids; the trace itself
        when they are its layers in its order."""
        layer_ids = tuple(int(i) for i in layer_ids)
        missing = [i for i in layer_ids if i not in self.layer_ids]
        if missing:
            raise TraceMismatchError(f"layer(s) {missing} are not in this trace, which has layers {self.layer_ids}")
        if len(set(layer_ids)) != len(layer_ids):
            raise LayerIdsError(f"layer_ids must be unique, found {layer_ids}")
        if layer_ids == self.layer_ids:
            return self  # every layer in its order: nothing to copy (a trace is read-only)
        pos = torch.tensor([self.layer_ids.index(i) for i in layer_ids], dtype=torch.int64, device=self.device)
        return self._derived(
            (self,),
            experts=self.experts.index_select(1, pos),
            layer_ids=layer_ids,
            gates=None if self.gates is None else self.gates.index_select(1, pos),
        )

    # --- combining -----------------------------------------------------------------------
    @staticmethod
    def concat(traces: Sequence[RoutingTrace]) -> RoutingTrace:
        """Sequences of several traces one after another. Layers, top-k and num_experts must agree.

        ``valid`` is kept if any trace has it; ``gates`` must be on all traces or none. ``meta``
        keeps the entries on which every trace agrees.
        """
        traces = list(traces)
        if not traces:
            raise TraceMismatchError("concat needs at least one trace")
        first = traces[0]
        for n, t in enumerate(traces[1:], 1):
            for what in ("layer_ids", "top_k", "num_experts"):
                if getattr(t, what) != getattr(first, what):
                    raise TraceMismatchError(
                        f"trace {n} has {what}={getattr(t, what)} but trace 0 has {what}={getattr(first, what)}; "
                        "only traces of the same model layers can be concatenated"
                    )
            if (t.gates is None) != (first.gates is None):
                has = "has" if t.gates is not None else "lacks"
                raise TraceMismatchError(
                    f"trace {n} {has} gates but trace 0 does not match; drop gates from all or none"
                )
        offsets = torch.tensor([0] + [t.num_tokens for t in traces], dtype=torch.int64).cumsum(0).tolist()
        cu = torch.cat([first.cu_seqlens[:1]] + [t.cu_seqlens[1:] + off for t, off in zip(traces, offsets)])
        any_valid = any(t.valid is not None for t in traces)
        meta = {k: v for k, v in first.meta.items() if all(t.meta.get(k) == v for t in traces)}
        return first._derived(
            traces,
            experts=torch.cat([t.experts for t in traces]),
            cu_seqlens=cu,
            valid=torch.cat([t.valid_mask for t in traces]) if any_valid else None,
            gates=None if first.gates is None else torch.cat([t.gates for t in traces]),
            meta=meta,
        )

    def extend_sequence(
        self,
        i: int,
        experts: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        gates: torch.Tensor | None = None,
    ) -> RoutingTrace:
        """Append rows ``experts [N, L, K]`` to the end of sequence ``i`` (multi-turn growth)."""
        B = self.num_seqs
        if not -B <= i < B:
            raise IndexError(f"sequence {i} out of range for a trace of {B} sequences")
        i %= B
        if (gates is None) != (self.gates is None):
            raise TraceMismatchError("the new rows must carry gates exactly when the trace does")
        new = RoutingTrace(
            experts=experts.to(self.device),
            cu_seqlens=torch.tensor([0, experts.shape[0]]) if experts.ndim == 3 else torch.tensor([0]),
            layer_ids=self.layer_ids,
            num_experts=self.num_experts,
            valid=None if valid is None else valid.to(self.device),
            gates=None if gates is None else gates.to(self.device),
        )
        if new.top_k != self.top_k:
            raise TraceMismatchError(f"new rows have top_k={new.top_k}, trace has top_k={self.top_k}")
        end = int(self.cu_seqlens[i + 1])
        n = new.num_tokens
        cat = lambda a, b: torch.cat([a[:end], b, a[end:]])
        cu = self.cu_seqlens.clone()
        cu[i + 1 :] += n
        has_valid = self.valid is not None or new.valid is not None
        return self._derived(
            (self, new),
            experts=cat(self.experts, new.experts),
            cu_seqlens=cu,
            valid=cat(self.valid_mask, new.valid_mask) if has_valid else None,
            gates=None if self.gates is None else cat(self.gates, new.gates),
        )

    # --- placement -----------------------------------------------------------------------
    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> RoutingTrace:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)
        return self._derived(
            (self,),
            experts=move(self.experts), cu_seqlens=move(self.cu_seqlens), valid=move(self.valid), gates=move(self.gates)
        )

    def pin_memory(self) -> RoutingTrace:
        pin = lambda t: None if t is None else t.pin_memory()
        return self._derived(
            (self,),
            experts=pin(self.experts), cu_seqlens=pin(self.cu_seqlens), valid=pin(self.valid), gates=pin(self.gates)
        )

    # --- comparison ----------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        fields = lambda t: (t.layer_ids, t.num_experts, dict(t.meta))
        if fields(self) != fields(other):
            return False
        if self.experts.shape != other.experts.shape or (self.gates is None) != (other.gates is None):
            return False
        same = lambda a, b: a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        return (
            same(self.experts, other.experts)
            and same(self.cu_seqlens, other.cu_seqlens)
            and same(self.valid_mask, other.valid_mask)
            and (self.gates is None or same(self.gates, other.gates))
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        extras = "".join(
            f", {name}" for name, t in (("valid", self.valid), ("gates", self.gates)) if t is not None
        )
        return (
            f"RoutingTrace(seqs={self.num_seqs}, tokens={self.num_tokens}, layers={list(self.layer_ids)}, "
            f"top_k={self.top_k}, num_experts={self.num_experts}, dtype={self.experts.dtype}, "
            f"device={self.device}{extras})"
        )


# The constructor's fields (the class's slots also hold _checked_at).
_FIELDS = ("experts", "cu_seqlens", "layer_ids", "num_experts", "valid", "gates", "meta")


def _versions(trace: RoutingTrace) -> tuple[int, int]:
    """The version counters of ``experts`` and ``valid`` (torch bumps them on every in-place write);
    -1 for a tensor without one (made under inference mode, which cannot be written outside it)."""

    def version(t: torch.Tensor | None) -> int:
        if t is None or t.is_inference():
            return -1
        return t._version

    return version(trace.experts), version(trace.valid)


def _unpickle(parts: dict, checked: bool = False) -> RoutingTrace:
    # Pickled traces were validated when built; like a pickled tensor, the bytes are trusted, and
    # so is the sender's knowledge that the rows passed the repeat check.
    return RoutingTrace.unchecked(**parts, rows_checked=checked)


def owns_storage(t: torch.Tensor) -> bool:
    """Whether ``t`` spans all of its storage (keeping it alive keeps nothing else alive)."""
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def _own_bytes(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a compact copy of it when it views only part of its storage."""
    if t is None:
        return None
    if t.is_contiguous() and owns_storage(t):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def first_duplicate_row(
    ids_NK: torch.Tensor, keep_N: torch.Tensor | None = None, chunk: int | None = None, workers: int | None = None
) -> int:
    """Index of the first row of ``ids_NK`` naming an expert twice, or -1; rows where ``keep_N``
    is False are skipped.

    ``ids`` may be ``[N, K]``, or ``[N, L, K]``: N groups of L rows (a trace's tokens and layers),
    read without a copy of the whole, with ``keep_N`` per group; row ``n * L + l`` is reported.

    On the CPU, chunks of rows are transposed into K slot planes and the K(K-1)/2 slot pairs
    compared plane against plane through numpy (whose narrow-int compares are ~10x faster than
    torch's here, and over 10x faster than sorting each row). numpy releases the GIL inside each
    compare, so from :data:`_DUP_PARALLEL_ROWS` rows on the chunks are shared among threads (see
    :func:`_duplicate_workers`); the answer is the same lowest row whatever the thread count.

    Args:
        ids_NK: integer ids ``[N, K]`` or ``[N, L, K]``.
        keep_N: optional bool ``[N]``: rows (groups) to check; the others are skipped.
        chunk: rows per chunk (default: :data:`_DUP_CHUNK_BYTES` of pair masks or slot planes); host only.
        workers: threads sharing the chunks (default: :func:`_duplicate_workers`); host only.
    """
    ids_NLK = ids_NK if ids_NK.ndim == 3 else ids_NK[:, None]
    N, L, K = ids_NLK.shape
    if ids_NLK.device.type != "cpu":
        rows_NK = ids_NLK.reshape(N * L, K)
        bad_N = torch.zeros(N * L, dtype=torch.bool, device=rows_NK.device)
        for i in range(K - 1):
            bad_N |= (rows_NK[:, i : i + 1] == rows_NK[:, i + 1 :]).any(-1)
        if keep_N is not None:
            bad_N &= keep_N.repeat_interleave(L)
        return int(bad_N.nonzero()[0, 0]) if bool(bad_N.any()) else -1
    if K < 2 or not N * L:
        return -1
    if chunk is None:
        chunk = max(1, _DUP_CHUNK_BYTES // max(K * (K - 1) // 2, K * ids_NLK.element_size()))
    chunk_N = max(1, chunk // L)  # whole groups per chunk
    if workers is None:
        workers = _duplicate_workers(N * L)
    workers = max(1, min(workers, -(-N // chunk_N)))
    ids = ids_NLK.numpy()
    keep = None if keep_N is None else keep_N.numpy()
    # found[0]: the lowest bad group any thread has reported (N: none yet), as (group, row) in
    # found[1]. A thread stops at its first bad row, or at a chunk starting above found[0]: every
    # chunk below the answer is checked, so the answer is the lowest bad row.
    found, lock = [N, -1], threading.Lock()
    scan = partial(_scan_duplicates, ids, keep, step=workers, chunk=chunk_N, found=found, lock=lock)
    if workers == 1:
        scan(0)
    else:
        with ThreadPoolExecutor(workers - 1, thread_name_prefix="routereplay-dup") as pool:
            others = [pool.submit(scan, w) for w in range(1, workers)]
            scan(0)
            for f in others:
                f.result()
    return found[1]


def _duplicate_workers(N: int) -> int:
    """Threads for the host duplicate check of N rows: 1 below :data:`_DUP_PARALLEL_ROWS` (a few ms
    of work, where starting threads would show), else torch's intra-op thread count, at most
    :data:`_DUP_MAX_WORKERS`. Following ``torch.get_num_threads()`` keeps the check inside the CPU
    budget the process already gave torch: ``torch.set_num_threads(1)`` (or ``OMP_NUM_THREADS=1``,
    as torchrun sets per rank) makes it single-threaded."""
    if N < _DUP_PARALLEL_ROWS:
        return 1
    return max(1, min(torch.get_num_threads(), _DUP_MAX_WORKERS))


def _scan_duplicates(ids_NLK: np.ndarray, keep_N, first: int, *, step: int, chunk: int, found: list[int], lock) -> None:
    """Chunks ``first, first + step, ...`` (of ``chunk`` groups) of :func:`first_duplicate_row`;
    lowers ``found`` to the first bad row met. Slot pairs are compared as K-plane blocks, slot i
    against slot i + s (mod K) for s = 1 .. K // 2: K(K-1)/2 plane compares in about K numpy calls."""
    N, L, K = ids_NLK.shape
    rows = min(chunk, N) * L
    cols_KR = np.empty((K, rows), dtype=ids_NLK.dtype)
    eq_PR = np.empty((K * (K - 1) // 2, rows), dtype=bool)
    for start in range(first * chunk, N, step * chunk):
        if start > found[0]:
            return
        n = min(chunk, N - start)
        cols, eq = cols_KR[:, : n * L], eq_PR[:, : n * L]
        np.copyto(cols, ids_NLK[start : start + n].reshape(n * L, K).T)
        p = 0
        for s in range(1, K // 2 + 1):
            np.equal(cols[: K - s], cols[s:], out=eq[p : p + K - s])  # slot i vs i + s
            p += K - s
            if 2 * s < K:  # slot i vs i + K - s; at s = K/2 the line above already paired them
                np.equal(cols[K - s :], cols[:s], out=eq[p : p + s])
                p += s
        bad_R = np.logical_or.reduce(eq, axis=0)
        if keep_N is not None:
            bad_R.reshape(n, L)[...] &= keep_N[start : start + n, None]
        if bad_R.any():
            row = start * L + int(bad_R.argmax())
            with lock:
                if found[1] < 0 or row < found[1]:
                    found[0], found[1] = row // L, row
            return


def _first_nonfinite_row(gates_TLK: torch.Tensor, valid_T: torch.Tensor | None) -> int:
    """First row (valid, when ``valid_T`` is given) holding a non-finite gate, or -1; by blocks."""
    T = gates_TLK.shape[0]
    rows = max(1, _BLOCK_ELEMENTS // max(gates_TLK[:1].numel(), 1))
    for start in range(0, T, rows):
        bad_N = ~torch.isfinite(gates_TLK[start : start + rows]).flatten(1).all(-1)
        if valid_T is not None:
            bad_N &= valid_T[start : start + rows]
        if bool(bad_N.any()):
            return start + int(bad_N.nonzero()[0, 0])
    return -1


# select_sequences copies slices (a Python loop over sequences) when sequences average at least
# this many rows; shorter ones go through one index_select.
_MIN_RUN_ROWS = 16


def host_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory numpy allocates.

    numpy advises transparent huge pages for large arrays (``madvise(MADV_HUGEPAGE)``) and torch's
    CPU allocator does not (unless ``THP_MEM_ALLOC_ENABLE=1``): filling a fresh 1 GB buffer then
    takes ~2.5x fewer page faults' time on Linux. The tensor keeps the array alive.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if not nbytes:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(tuple(shape))


def _copy_spans(x: torch.Tensor, spans: list[tuple[int, int]], total: int) -> torch.Tensor:
    """Rows ``x[s : s + n]`` for each (s, n) of ``spans``, one after another, in a new tensor."""
    out = host_empty((total, *x.shape[1:]), x.dtype)
    row = 0
    for start, n in spans:
        if n:
            out[row : row + n] = x[start : start + n]
            row += n
    return out


def _take(x: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    """``x[rows_N]`` along dim 0, moving each row as one block (``index_select`` on ``[T, rest]``)."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:])) if x.ndim > 1 else x
    return flat.index_select(0, rows_N).view(rows_N.numel(), *x.shape[1:])
