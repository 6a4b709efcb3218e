"""What a record / replay block and its handle ask of each other: the two protocols, and the
per-layer forced-weights callable the handle builds at attach.

The handle (:class:`~routereplay.runtime.session.RouterHandle`) calls *down* into the active block
through :class:`Mode` (:meth:`Mode.answer` for each router call, :meth:`Mode.note_batch` for each
forward's batch shape, :meth:`Mode.check_dispatch` for what the experts received). A block asks its
host only what :class:`ModeHost` names: its layers, the block bookkeeping, a side stream, and the
:class:`ForcedWeights` of each layer, which holds the choice between ``routing.route`` and the
fused kernel (and the kernel's preparation cache) so that no block knows about kernels.

Legend: N rows a router sees in one call, E experts (logits width), K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from routereplay import kernels
from routereplay.core.routing import RouterSpec, route

__all__ = ["UNSEEN_HINT", "ForcedWeights", "Mode", "ModeHost"]

# What a block's error adds when MoE layers saw no forward while others did (or while the model ran:
# its first MoE block reported its input): a router's calls stopped reaching the handle.
UNSEEN_HINT = (
    "; MoE layers that saw no forward while the model ran were not reached through routereplay's "
    "interception: was their router's forward replaced after attach (a monkeypatch, a kernel library)? "
    "Patch the model first, then attach"
)


class ForcedWeights:
    """The gate weights of one layer's router at forced ids, with live rows where ``mask_N`` is False.

    ``routing.route`` computes them, or, with ``kernel="triton"`` on CUDA for the specs the kernel
    covers, the fused Triton kernel, prepared once per (logits dtype, device, scale dtype, output
    dtype) and kept here. Built by the handle at attach, one per layer; a forward and its recompute
    therefore always take the same path.
    """

    __slots__ = ("kernel", "prepared", "spec")

    def __init__(self, spec: RouterSpec, kernel: str) -> None:
        self.spec = spec
        self.kernel = kernel
        # (logits dtype, device, scale dtype, out dtype) -> the prepared kernel, or None where it
        # does not cover them (routing.route then)
        self.prepared: dict[tuple, Any] = {}

    def __call__(
        self, logits_NE: torch.Tensor, forced_NK: torch.Tensor, mask_N: torch.Tensor | None, route_kw: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights_NK, ids_NK)`` at ``forced_NK`` (ids validated by the caller)."""
        if self.kernel == "triton" and logits_NE.is_cuda:
            scale_E = route_kw.get("expert_scale_E")
            scale_dtype = None if scale_E is None else scale_E.dtype
            key = (logits_NE.dtype, logits_NE.device, scale_dtype, route_kw.get("out_dtype"))
            fused = self.prepared.get(key, False)
            if fused is False:
                fused = self.prepared[key] = _prepare_fused(self.spec, *key)
            if fused is not None:
                return fused(logits_NE, forced_NK, mask_N, route_kw.get("bias_E"), scale_E)
        return route(logits_NE, self.spec, forced_TK=forced_NK, forced_mask_T=mask_N, validate=False, **route_kw)


def _prepare_fused(spec, logits_dtype, device, scale_dtype, out_dtype) -> Any:
    if not kernels.supports(spec, logits_dtype=logits_dtype, device=device):
        return None
    return kernels.prepare_fused(
        spec, logits_dtype=logits_dtype, device=device, scale_dtype=scale_dtype, out_dtype=out_dtype
    )


class Mode(Protocol):
    """An active record or replay block, as its handle calls it."""

    reads_experts: bool  # check_dispatch wants what the experts receive: the handle intercepts them meanwhile

    def answer(
        self, index: int, logits_NE: torch.Tensor, weights_NK: torch.Tensor, ids_NK: torch.Tensor, route_kw: dict,
        *, scoped: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The ``(weights_NK, ids_NK)`` the experts of layer ``index`` get for this router call, and
        the ``recompute.Binding`` a checkpoint recompute of this forward must reuse (None when the
        call is outside every checkpoint, ``scoped=False``, and without grad: nothing recomputes it)."""
        ...

    def note_batch(self, index: int, shape: tuple[int, ...], packed: Any = None, forward_mask_BS: Any = None) -> None:
        """A forward's batch shape ``[B, S]`` (and its packing and attention mask), before its routers run."""
        ...

    def check_dispatch(self, index: int, ids_NK: torch.Tensor) -> None:
        """What the experts of layer ``index`` received (``replay(verify=True)``)."""
        ...


class ModeHost(Protocol):
    """What a block may ask of the handle it runs on."""

    model: Any
    layers: Sequence[Any]  # seam.MoELayer, in forward order
    layer_ids: tuple[int, ...]
    top_k: int
    num_experts: int
    verifiable: tuple[bool, ...]
    forced_weights: tuple[ForcedWeights, ...]
    compiled_call: bool  # the router call being answered comes from a torch.compile'd region

    def where(self, index: int) -> str:
        """How errors name the ``index``-th MoE layer."""
        ...

    def enter_block(self, mode: Mode) -> int:
        """Make ``mode`` the active block (refusing a second one); returns its sequence number."""
        ...

    def exit_block(self, mode: Mode) -> None:
        """End ``mode``, the active block."""
        ...

    def side_stream(self, device: torch.device) -> Any:
        """The handle's CUDA side stream on ``device`` (host traces are copied on it)."""
        ...
