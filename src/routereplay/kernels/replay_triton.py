"""Fused forced-id replay in Triton, the host side: checks, allocation, launch and autograd.

Importing this module imports triton (``pip install 'routereplay[triton]'``); use it through
:mod:`routereplay.kernels`, which says which specs it covers. The kernels are in
:mod:`routereplay.kernels.device` (what they compute, and why it is bit for bit ``route()``'s), their
constants in :mod:`routereplay.kernels.plan`, the launch through a kept launcher in
:mod:`routereplay.kernels.launch`.

The host side: :class:`PreparedReplay` (``kernels.prepare_fused``) plans once per (spec, dtypes,
device) and keeps, per kernel variant, the compiled kernel's launcher, so a call costs checks, two
allocations, autograd's apply and one direct launcher call instead of Triton's binder, cache lookup
and launch-metadata work.

Legend: T tokens, E logits per token (``spec.num_logits``), K top-k slots, KP K padded to a power
of two, EW lanes of the E-softmax (``min(next_pow2(E), 32)``), EI columns per lane.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from routereplay.core import routing
from routereplay.core.errors import RouterSpecError
from routereplay.core.routing import RouterSpec, check_route_args
from routereplay.kernels.coverage import unsupported_reason
from routereplay.kernels.device import _replay_bwd, _replay_fwd
from routereplay.kernels.launch import KeptLaunchers, direct_launch_ok, hooked, on_device
from routereplay.kernels.plan import CODE, SOFTMAX_E, ReplayPlan, block_rows, compile_options, plan_for

__all__ = ["PreparedReplay", "ReplayPlan", "plan_for", "route_forced_fused"]

_INT_DTYPES = frozenset(
    (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64)
)
_I32_MAX = 2**31 - 1


class PreparedReplay:
    """Fused forced-id replay for one (spec, dtypes, device): all spec and dtype work done once.

    Build it with :func:`routereplay.kernels.prepare_fused`; call it once per layer per forward::

        weights_TK, ids_TK = fused(logits_TE, forced_TK, forced_mask_T=None, bias_E=None, expert_scale_E=None)

    Same semantics as ``route_forced_fused(..., validate=False)``. A call checks only what keeps the
    launch memory-safe (dtypes, shapes, device), makes the logits and ids contiguous, allocates the
    outputs and launches. On CUDA the first launch of each kernel variant goes through Triton's
    JIT (compiling it if needed); later ones call the compiled kernel's launcher directly with the
    runtime arguments, keyed on what Triton specialises the kernels on (the ids' dtype, live rows or
    not, the block, the alignment of the logits / ids / incoming gradient). Under Triton's
    interpreter every launch goes through the JIT. A profiler hook registered with Triton
    (``knobs.runtime.launch_enter_hook``) sends launches through the JIT too, so it sees them.
    """

    def __init__(
        self,
        spec: RouterSpec,
        *,
        logits_dtype: torch.dtype,
        device: torch.device | str,
        scale_dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
        block_rows: int | None = None,
        fp_fusion: bool = False,
        sum_halves: bool | None = None,
        where: str = "",
    ):
        """See :func:`routereplay.kernels.prepare_fused`. For benchmarks and tests: ``block_rows``
        fixes the forward's rows per program, ``fp_fusion=True`` lets the compiler contract
        multiply-adds in the forward, ``sum_halves`` overrides the order of the top-k sum."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        reason = unsupported_reason(spec, logits_dtype=logits_dtype, device=device)
        if reason is not None:
            raise RouterSpecError(
                f"{where}the fused replay kernel does not cover this {spec.family or 'router'} spec: {reason}; "
                "check routereplay.kernels.supports(spec, ...) first and call routing.route for such specs"
            )
        if spec.uses_expert_scale and scale_dtype not in CODE:
            raise RouterSpecError(
                f"{where}the {spec.family or 'router'} spec scales weights per expert: pass "
                f"scale_dtype=expert_scale.dtype (float32, bfloat16 or float16), found {scale_dtype}"
            )
        if spec.weights_dtype == "input" and out_dtype not in CODE:
            raise RouterSpecError(
                f"{where}the {spec.family or 'router'} spec casts weights to the router input's dtype: pass "
                f"out_dtype=hidden_states.dtype (float32, bfloat16 or float16), found {out_dtype}"
            )
        self.spec = spec
        self.device = device
        self.logits_dtype = logits_dtype
        self.scale_dtype = scale_dtype if spec.uses_expert_scale else None
        self.out_dtype = out_dtype
        self.where = where
        on_cuda = device.type == "cuda"
        self.plan = plan_for(spec, logits_dtype, self.scale_dtype, out_dtype if spec.weights_dtype == "input" else None,
                             on_cuda)  # fmt: skip
        if sum_halves is not None:
            self.plan = dataclasses.replace(self.plan, HALVES=sum_halves)
        self.block_rows = block_rows
        # the direct launch calls Triton's compiled-kernel launcher (routereplay.kernels.launch)
        self._fast = direct_launch_ok(device)
        self._index = device.index if on_cuda else -1
        self._num_sms = torch.cuda.get_device_properties(device).multi_processor_count if self._fast else 0
        constexprs = self.plan.constexprs()
        self._fwd_const = {**constexprs, "PRECISE": self.plan.PRECISE, "HALVES": self.plan.HALVES}
        self._fwd_options = compile_options(self.plan, fp_fusion)
        self._bwd_options = compile_options(self.plan, True)
        # kept per specialisation key (ids dtype, flags, block, alignment), each with its constexpr tail
        self._fwd_kept = KeptLaunchers(_replay_fwd)
        self._bwd_kept = KeptLaunchers(_replay_bwd)
        self._dummy = torch.empty(1, dtype=torch.float32, device=device)  # for pointers a variant never reads
        self._dummy_ptr = self._dummy.data_ptr()
        self._uses_bias = spec.uses_bias
        self._uses_scale = spec.uses_expert_scale

    def __repr__(self) -> str:
        return (
            f"PreparedReplay({self.spec.family or 'router'}, E={self.plan.E}, K={self.plan.K}, "
            f"logits {self.logits_dtype}, weights {self.plan.weights_dtype}, {self.device})"
        )

    # --- the call -----------------------------------------------------------------------------
    def __call__(
        self,
        logits_TE: torch.Tensor,
        forced_TK: torch.Tensor,
        forced_mask_T: torch.Tensor | None = None,
        bias_E: torch.Tensor | None = None,
        expert_scale_E: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay ``forced_TK`` (ids already validated): ``(weights_TK, int64 ids_TK)``.

        Args:
            logits_TE: ``[T, E]`` in the prepared dtype, on the prepared device.
            forced_TK: integer ``[T, K]`` ids (uint8 / int16 / int32 / int64 read as they are), on
                the device or in (pinned) host memory.
            forced_mask_T: bool ``[T]``; rows marked False route live.
            bias_E: the selection bias, required iff ``spec.uses_bias`` (read only for live rows).
            expert_scale_E: ``[E]`` per-expert scale in the prepared ``scale_dtype``, required iff
                ``spec.uses_expert_scale``.

        Returns:
            ``(weights_TK, ids_TK)``: weights differentiable w.r.t. the logits (and the expert
            scale); an id outside ``[0, E)`` gives NaN weights in its row.

        Raises:
            RouterSpecError: an input that does not fit the prepared spec, dtypes or device.
        """
        plan = self.plan
        num_tokens = logits_TE.shape[0]
        if (
            logits_TE.dtype != self.logits_dtype
            or logits_TE.dim() != 2
            or logits_TE.shape[1] != plan.E
            or logits_TE.get_device() != self._index
            or forced_TK.dtype not in _INT_DTYPES
            or forced_TK.shape != (num_tokens, plan.K)
            or (bias_E is not None) != self._uses_bias
            or (expert_scale_E is not None) != self._uses_scale
        ):
            self._refuse(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
        if not logits_TE.is_contiguous():
            logits_TE = logits_TE.contiguous()
        if forced_TK.get_device() != self._index:
            forced_TK = forced_TK.to(self.device, non_blocking=True)
        if not forced_TK.is_contiguous():
            forced_TK = forced_TK.contiguous()
        scale_E = None
        if expert_scale_E is not None:
            if (
                expert_scale_E.dtype != self.scale_dtype
                or expert_scale_E.shape != (plan.E,)
                or expert_scale_E.get_device() != self._index
            ):
                self._refuse(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
            scale_E = expert_scale_E if expert_scale_E.is_contiguous() else expert_scale_E.contiguous()
        live_TK = keep_T = None
        if forced_mask_T is not None:
            if forced_mask_T.dtype != torch.bool or forced_mask_T.shape != (num_tokens,):
                self._refuse(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
            if bias_E is not None and bias_E.shape != (plan.E,):
                self._refuse(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
            live_TK = self._live_ids(logits_TE, bias_E)
            keep_T = forced_mask_T.to(self.device, non_blocking=True).contiguous().view(torch.uint8)
        needs_grad = torch.is_grad_enabled() and (
            logits_TE.requires_grad or (scale_E is not None and scale_E.requires_grad)
        )
        if needs_grad:
            if torch._C._are_functorch_transforms_active():
                return _FusedReplay.apply(logits_TE, scale_E, (forced_TK, live_TK, keep_T), self)
            # Function.apply minus its Python preamble (binding defaults for setup_context, which
            # this Function has none of, and unwrapping tensors leaked from dead torch.func levels)
            return _apply_fused(logits_TE, scale_E, (forced_TK, live_TK, keep_T), self)
        weights_TK, ids_TK, _ = self._forward(logits_TE, scale_E, forced_TK, live_TK, keep_T, False)
        return weights_TK, ids_TK

    def _refuse(self, logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E):
        """Raise for an input the fast checks rejected: route()'s message where route() rejects it."""
        where = self.where
        check_route_args(
            logits_TE,
            self.spec,
            forced_TK=forced_TK,
            forced_mask_T=forced_mask_T,
            bias_E=bias_E,
            expert_scale_E=expert_scale_E,
            out_dtype=self.out_dtype if self.spec.weights_dtype == "input" else None,
            where=where,
        )
        if logits_TE.dtype != self.logits_dtype:
            raise RouterSpecError(
                f"{where}logits are {logits_TE.dtype}, the fused replay was prepared for {self.logits_dtype}: "
                "prepare one per logits dtype"
            )
        if logits_TE.get_device() != self._index:
            raise RouterSpecError(
                f"{where}logits are on {logits_TE.device}, the fused replay was prepared for {self.device}: "
                "prepare one per device"
            )
        if expert_scale_E is not None:
            if expert_scale_E.dtype != self.scale_dtype:
                raise RouterSpecError(
                    f"{where}expert_scale_E is {expert_scale_E.dtype}, the fused replay was prepared with "
                    f"scale_dtype={self.scale_dtype}"
                )
            raise RouterSpecError(
                f"{where}expert_scale_E is on {expert_scale_E.device}, the logits on {logits_TE.device}: "
                "move it to the logits' device"
            )
        raise AssertionError("the fast checks rejected inputs that route() accepts")  # pragma: no cover

    def _live_ids(self, logits_TE: torch.Tensor, bias_E: torch.Tensor | None) -> torch.Tensor:
        """Live ids for every row (no data-dependent shapes), as route() does; the kernel selects."""
        with torch.no_grad():
            return routing.select_live(logits_TE, self.spec, bias_E).contiguous()

    # --- the launches -------------------------------------------------------------------------
    def _forward(self, logits_TE, scale_E, forced_TK, live_TK, keep_T, save_stats):
        plan = self.plan
        num_tokens = logits_TE.shape[0]
        device = self.device
        # sizes as separate ints: torch parses them faster than a tuple (~0.5 µs an allocation on the host)
        weights_TK = torch.empty(num_tokens, plan.K, dtype=plan.weights_dtype, device=device)
        ids_TK = torch.empty(num_tokens, plan.K, dtype=torch.int64, device=device)
        stats = save_stats and plan.SCORE == SOFTMAX_E
        stats_2T = torch.empty(2, num_tokens, dtype=torch.float32, device=device) if stats else self._dummy
        if num_tokens == 0:
            return weights_TK, ids_TK, stats_2T
        has_mask = keep_T is not None
        block = self.block_rows or block_rows(plan, False, num_tokens, self._num_sms)
        grid = -(-num_tokens // block)
        dummy = self._dummy
        if self._direct(num_tokens):
            logits_ptr, forced_ptr = logits_TE.data_ptr(), forced_TK.data_ptr()
            key = (forced_TK.dtype, has_mask, stats, block, (logits_ptr | forced_ptr) & 15 == 0)
            kernel = self._fwd_kept.get(key)
            if kernel is not None:  # the JIT launch's arguments below, as pointers
                no_ptr, stats_ptr = self._dummy_ptr, stats_2T.data_ptr()
                self._fwd_kept.launch(
                    kernel, grid, self._index,
                    logits_ptr, forced_ptr,
                    live_TK.data_ptr() if has_mask else no_ptr,
                    keep_T.data_ptr() if has_mask else no_ptr,
                    scale_E.data_ptr() if scale_E is not None else no_ptr,
                    weights_TK.data_ptr(), ids_TK.data_ptr(),
                    stats_ptr, stats_ptr + 4 * num_tokens if stats else no_ptr,
                    num_tokens, plan.factor, plan.eps,
                )  # fmt: skip
                return weights_TK, ids_TK, stats_2T
        else:
            key = None
        with on_device(device):
            compiled = _replay_fwd[(grid,)](
                logits_TE, forced_TK,
                live_TK if has_mask else dummy,
                keep_T if has_mask else dummy,
                scale_E if scale_E is not None else dummy,
                weights_TK, ids_TK,
                stats_2T[0] if stats else dummy, stats_2T[1] if stats else dummy,
                num_tokens, plan.factor, plan.eps,
                **self._fwd_const, HAS_MASK=has_mask, SAVE_STATS=stats, BLOCK_T=block, **self._fwd_options,
            )  # fmt: skip
        if key is not None:
            const = {**self._fwd_const, "HAS_MASK": has_mask, "SAVE_STATS": stats, "BLOCK_T": block}
            self._fwd_kept.remember(key, compiled, const)
        return weights_TK, ids_TK, stats_2T

    def _backward(self, logits_TE, ids_TK, scale_E, stats_2T, grad_weights_TK, need_gc):
        plan = self.plan
        num_tokens = logits_TE.shape[0]
        device = self.device
        grad_TE = torch.empty(num_tokens, plan.E, dtype=logits_TE.dtype, device=device)
        gc_TK = torch.empty(num_tokens, plan.K, dtype=torch.float32, device=device) if need_gc else self._dummy
        if num_tokens == 0:
            return grad_TE, gc_TK
        if not grad_weights_TK.is_contiguous():
            grad_weights_TK = grad_weights_TK.contiguous()
        block = block_rows(plan, True)
        grid = -(-num_tokens // block)
        stats = plan.SCORE == SOFTMAX_E
        dummy = self._dummy
        if self._direct(num_tokens):
            logits_ptr, gw_ptr = logits_TE.data_ptr(), grad_weights_TK.data_ptr()
            key = (need_gc, grad_weights_TK.dtype, block, (logits_ptr | gw_ptr) & 15 == 0)
            kernel = self._bwd_kept.get(key)
            if kernel is not None:  # the JIT launch's arguments below, as pointers
                no_ptr, stats_ptr = self._dummy_ptr, stats_2T.data_ptr()
                self._bwd_kept.launch(
                    kernel, grid, self._index,
                    logits_ptr, ids_TK.data_ptr(), gw_ptr,
                    scale_E.data_ptr() if scale_E is not None else no_ptr,
                    stats_ptr, stats_ptr + 4 * num_tokens if stats else no_ptr,
                    grad_TE.data_ptr(), gc_TK.data_ptr(),
                    num_tokens, plan.factor, plan.eps,
                )  # fmt: skip
                return grad_TE, gc_TK
        else:
            key = None
        const = {**self._fwd_const, "NEED_GC": need_gc, "BLOCK_T": block}
        with on_device(device):
            compiled = _replay_bwd[(grid,)](
                logits_TE, ids_TK, grad_weights_TK,
                scale_E if scale_E is not None else dummy,
                stats_2T[0] if stats else dummy, stats_2T[1] if stats else dummy,
                grad_TE, gc_TK,
                num_tokens, plan.factor, plan.eps,
                **const, **self._bwd_options,
            )  # fmt: skip
        if key is not None:
            self._bwd_kept.remember(key, compiled, const)
        return grad_TE, gc_TK

    def _direct(self, num_tokens: int) -> bool:
        """Launch through a kept launcher: on CUDA, outside the interpreter, with the prepared device
        current (the kept function handle belongs to its context) and no profiler hook."""
        return self._fast and num_tokens <= _I32_MAX and torch.cuda.current_device() == self._index and not hooked()


class _FusedReplay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, scale_E, ids, prepared: PreparedReplay):
        forced_TK, live_TK, keep_T = ids
        weights_TK, ids_TK, stats_2T = prepared._forward(logits_TE, scale_E, forced_TK, live_TK, keep_T, True)
        ctx.prepared = prepared
        ctx.save_for_backward(logits_TE, ids_TK, scale_E, stats_2T)
        ctx.mark_non_differentiable(ids_TK)
        ctx.set_materialize_grads(False)  # no zeros [T, K] for the ids' gradient: a fill kernel per backward
        return weights_TK, ids_TK

    @staticmethod
    def backward(ctx, grad_weights_TK, grad_ids_TK):
        # Autograd runs a backward with grad off unless create_graph=True, and only then is
        # once_differentiable's wrapper needed (the kernel's gradient is not differentiable: the
        # wrapper makes a later differentiation of it raise); its no_grad block costs host time.
        if torch.is_grad_enabled():
            return _fused_backward_once(ctx, grad_weights_TK)
        return _fused_backward(ctx, grad_weights_TK)


def _fused_backward(ctx, grad_weights_TK):
    if grad_weights_TK is None:  # nothing reached the weights (grads are not materialised)
        return None, None, None, None
    prepared: PreparedReplay = ctx.prepared
    logits_TE, ids_TK, scale_E, stats_2T = ctx.saved_tensors
    need_gc = scale_E is not None and ctx.needs_input_grad[1]
    grad_TE, gc_TK = prepared._backward(logits_TE, ids_TK, scale_E, stats_2T, grad_weights_TK, need_gc)
    grad_scale_E = None
    if need_gc:
        # index_put_ with accumulate follows torch's deterministic-algorithms setting
        grad_scale_E = torch.zeros(scale_E.shape, dtype=torch.float32, device=scale_E.device)
        grad_scale_E.index_put_((ids_TK.reshape(-1),), gc_TK.reshape(-1), accumulate=True)
        grad_scale_E = grad_scale_E.to(scale_E.dtype)
    return grad_TE, grad_scale_E, None, None


_fused_backward_once = torch.autograd.function.once_differentiable(_fused_backward)
_apply_fused = super(torch.autograd.Function, _FusedReplay).apply  # the C++ apply


def _check_inputs(logits_TE, spec, forced_TK, forced_mask_T, bias_E, expert_scale_E, out_dtype, where) -> None:
    """``routing.route``'s argument checks (with its messages), then what the kernel itself needs."""
    if forced_TK is None:
        raise RouterSpecError(f"{where}forced_TK must be an integer tensor, found NoneType")
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
    reason = unsupported_reason(spec, logits_dtype=logits_TE.dtype, device=logits_TE.device)
    if reason is not None:
        raise RouterSpecError(
            f"{where}the fused replay kernel does not cover this {spec.family or 'router'} spec: {reason}; "
            "check routereplay.kernels.supports(spec, ...) first and call routing.route for such specs"
        )
    if expert_scale_E is not None and expert_scale_E.dtype not in CODE:
        raise RouterSpecError(
            f"{where}expert_scale_E must be float32/bfloat16/float16 [{spec.num_logits}], "
            f"found {tuple(expert_scale_E.shape)} {expert_scale_E.dtype}"
        )
    if spec.weights_dtype == "input" and out_dtype not in CODE:
        raise RouterSpecError(f"{where}out_dtype must be float32, bfloat16 or float16, found {out_dtype}")


@functools.lru_cache(maxsize=64)
def _prepared(spec, logits_dtype, device, scale_dtype, out_dtype, block_rows, fp_fusion) -> PreparedReplay:
    return PreparedReplay(
        spec,
        logits_dtype=logits_dtype,
        device=device,
        scale_dtype=scale_dtype,
        out_dtype=out_dtype,
        block_rows=block_rows,
        fp_fusion=fp_fusion,
    )


def route_forced_fused(
    logits_TE: torch.Tensor,
    spec: RouterSpec,
    *,
    forced_TK: torch.Tensor,
    forced_mask_T: torch.Tensor | None = None,
    bias_E: torch.Tensor | None = None,
    expert_scale_E: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    validate: bool = True,
    where: str = "",
    block_rows: int | None = None,
    fp_fusion: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See :func:`routereplay.kernels.route_forced_fused`. For benchmarks and the GPU tests:
    ``block_rows`` overrides the forward's rows per program; ``fp_fusion=True`` lets the compiler
    contract multiply-adds in the forward (off by default: each reference op rounds once)."""
    _check_inputs(logits_TE, spec, forced_TK, forced_mask_T, bias_E, expert_scale_E, out_dtype, where)
    device = logits_TE.device
    if validate:
        mask_T = None if forced_mask_T is None else forced_mask_T.to(device=device, non_blocking=True)
        routing.validate_forced(forced_TK.to(device=device, dtype=torch.int64, non_blocking=True), mask_T, spec, where)
    prepared = _prepared(
        spec,
        logits_TE.dtype,
        device,
        None if expert_scale_E is None else expert_scale_E.dtype,
        out_dtype if spec.weights_dtype == "input" else None,
        block_rows,
        fp_fusion,
    )
    return prepared(logits_TE, forced_TK, forced_mask_T, bias_E, expert_scale_E)
