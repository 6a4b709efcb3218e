"""What lets the Megatron-Core GPU tier run N ranks on one GPU over gloo (issue 19), test harness only.

Three pieces, none of them touches ``routereplay`` or Megatron's files; each is applied inside the
harness process and undone on exit:

``transport``           ``RR_TRANSPORT``: ``nccl`` (default, one GPU per rank) or ``gloo1gpu``
                        (every rank on ``cuda:LOCAL_RANK % device_count``, one gloo group). NCCL
                        refuses two ranks on one device ("Duplicate GPU detected"); gloo moves CUDA
                        tensors in its collectives (``all_reduce``, ``all_to_all_single``,
                        ``all_gather_into_tensor``, ``reduce_scatter_tensor``) but its point-to-point
                        fails on them ("writev ... Bad address").
``host_staged_p2p``     replaces Megatron's two pipeline point-to-point helpers
                        (``p2p_communication._batched_p2p_ops`` and ``_p2p_ops``, same signature in
                        megatron-core 0.16.1 and 0.19) with one that stages every tensor through host
                        memory: the send is a synchronous copy to the CPU then ``isend``; the receive
                        ``irecv``s into a host buffer and its request's ``wait()`` copies it into
                        Megatron's device buffer. Messages are tagged by the direction they travel
                        (next-ward, prev-ward), so with two stages (where prev == next) an activation
                        can never land in a gradient buffer whatever order the ops are posted in.
                        Not staged: the shape exchange of ``variable_seq_lengths`` / a standalone
                        MTP stage (``_communicate_shapes``); no configuration here uses either.
``SequenceParallelNorm`` a torch ``LayerNorm``/``RMSNorm`` whose parameters carry
                        ``sequence_parallel`` the way Megatron's ``FusedLayerNorm`` and the Transformer
                        Engine norms mark them (``finalize_model_grads`` all-reduces such grads over
                        TP). Megatron's local spec builds ``WrappedTorchNorm``, which asserts SP off;
                        :func:`with_sequence_parallel_norm` swaps it in a copy of a spec.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

TRANSPORTS = ("nccl", "gloo1gpu")
# Tags by direction of travel: send_next pairs with the next rank's recv_prev, send_prev with the
# previous rank's recv_next.
TAG_NEXTWARD, TAG_PREVWARD = 1901, 1902


def transport(env: dict | None = None) -> str:
    """The harness transport from ``RR_TRANSPORT`` (default ``nccl``).

    Raises:
        ValueError: an unknown value, naming the accepted ones.
    """
    value = (os.environ if env is None else env).get("RR_TRANSPORT", "nccl")
    if value not in TRANSPORTS:
        raise ValueError(f"RR_TRANSPORT={value!r}: expected one of {TRANSPORTS} (gloo1gpu: every rank on one GPU)")
    return value


def device_for_rank(local_rank: int, num_devices: int, world: int, mode: str) -> int:
    """The CUDA device of a local rank. ``nccl`` needs one device per rank; ``gloo1gpu`` wraps.

    Raises:
        RuntimeError: ``nccl`` with fewer devices than ranks, naming the mode that fits.
    """
    if num_devices < 1:
        raise RuntimeError(f"rank {local_rank}: no CUDA device visible; the Megatron GPU tier needs at least one")
    if mode == "nccl":
        if num_devices < world:
            raise RuntimeError(
                f"RR_TRANSPORT=nccl: {world} ranks need {world} GPUs, found {num_devices} (NCCL refuses two ranks "
                "on one GPU); run with RR_TRANSPORT=gloo1gpu to put every rank on one GPU over gloo"
            )
        return local_rank
    return local_rank % num_devices


class _StagedSend:
    """A send's request: keeps the host copy alive until the send completes."""

    def __init__(self, work, host: torch.Tensor):
        self._work, self._host = work, host

    def wait(self, timeout=None) -> bool:
        self._work.wait()
        return True

    def is_completed(self) -> bool:
        return self._work.is_completed()


class _StagedRecv:
    """A receive's request: on ``wait()`` the host buffer is copied into Megatron's buffer."""

    def __init__(self, work, host: torch.Tensor, dst: torch.Tensor):
        self._work, self._host, self._dst = work, host, dst
        self._done = False

    def wait(self, timeout=None) -> bool:
        if not self._done:
            self._work.wait()
            with torch.no_grad():  # Megatron's receive buffers are leaves that require grad
                self._dst.copy_(self._host)
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done


def _isend(tensor: torch.Tensor, peer: int, group, tag: int) -> _StagedSend:
    # synchronous: Megatron may free the device buffer next; gloo sends contiguous tensors only
    host = tensor.detach().to("cpu", copy=True).contiguous()
    return _StagedSend(dist.isend(host, dst=peer, group=group, tag=tag), host)


def _irecv(tensor: torch.Tensor, peer: int, group, tag: int) -> _StagedRecv:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    return _StagedRecv(dist.irecv(host, src=peer, group=group, tag=tag), host, tensor)


def staged_p2p_ops(
    *,
    tensor_send_prev: torch.Tensor | None,
    tensor_recv_prev: torch.Tensor | None,
    tensor_send_next: torch.Tensor | None,
    tensor_recv_next: torch.Tensor | None,
    group,
    prev_pipeline_rank: int,
    next_pipeline_rank: int,
) -> dict:
    """Megatron's ``_p2p_ops`` / ``_batched_p2p_ops`` contract, through host memory.

    Ranks are global (as Megatron passes them). Returns a dict of requests keyed as ``_p2p_ops``
    keys them; Megatron's ``_communicate`` accepts a dict from either helper (``reqs.update``) and
    waits on its values. Every send is posted before any receive, so no posting order deadlocks.
    """
    reqs: dict = {}
    if tensor_send_next is not None:
        reqs["send_next"] = _isend(tensor_send_next, next_pipeline_rank, group, TAG_NEXTWARD)
    if tensor_send_prev is not None:
        reqs["send_prev"] = _isend(tensor_send_prev, prev_pipeline_rank, group, TAG_PREVWARD)
    if tensor_recv_prev is not None:
        reqs["recv_prev"] = _irecv(tensor_recv_prev, prev_pipeline_rank, group, TAG_NEXTWARD)
    if tensor_recv_next is not None:
        reqs["recv_next"] = _irecv(tensor_recv_next, next_pipeline_rank, group, TAG_PREVWARD)
    return reqs


def _batched(**kwargs) -> list:
    """``_batched_p2p_ops`` returns a list of requests; Megatron waits on each."""
    return list(staged_p2p_ops(**kwargs).values())


@contextlib.contextmanager
def host_staged_p2p() -> Iterator[None]:
    """Megatron's pipeline point-to-point through host memory while the block runs; restored on exit.

    Raises:
        RuntimeError: the installed megatron-core lacks either helper (its p2p module changed shape;
            read ``pipeline_parallel/p2p_communication.py`` and adapt :func:`staged_p2p_ops`).
    """
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    missing = [n for n in ("_batched_p2p_ops", "_p2p_ops") if not callable(getattr(p2p, n, None))]
    if missing:
        raise RuntimeError(
            f"megatron.core.pipeline_parallel.p2p_communication has no {missing}: host staging cannot replace "
            "the pipeline send/recv of this megatron-core; adapt tests/megatron_gpu/gloo1gpu.py"
        )
    saved = p2p._batched_p2p_ops, p2p._p2p_ops
    p2p._batched_p2p_ops, p2p._p2p_ops = _batched, staged_p2p_ops
    try:
        yield
    finally:
        p2p._batched_p2p_ops, p2p._p2p_ops = saved


class SequenceParallelNorm:
    """Megatron's norm builder signature, returning a torch ``LayerNorm`` / ``RMSNorm`` whose
    parameters carry ``sequence_parallel = config.sequence_parallel`` (as ``FusedLayerNorm`` sets
    them). The module is the plain torch norm, so state-dict keys equal ``WrappedTorchNorm``'s.

    Raises:
        ValueError: a normalization or option the torch norms do not implement.
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        for opt in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, opt, False):
                raise ValueError(f"SequenceParallelNorm: config.{opt}=True is not implemented by the torch norms")
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(
                f"SequenceParallelNorm: config.normalization={config.normalization!r}, expected one of {sorted(kinds)}"
            )
        norm = kinds[config.normalization](hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def with_sequence_parallel_norm(spec):
    """A deep copy of a Megatron layer/block spec with every ``WrappedTorchNorm`` replaced by
    :class:`SequenceParallelNorm`.

    Raises:
        ValueError: the spec holds no ``WrappedTorchNorm`` (a Transformer Engine or apex spec
            already supports SP: use it as it is).
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    out = copy.deepcopy(spec)
    found = 0

    def swap(value):
        nonlocal found
        if value is WrappedTorchNorm:
            found += 1
            return SequenceParallelNorm
        if isinstance(value, list):
            value[:] = [swap(v) for v in value]
        elif isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(swap(v) for v in value)
        elif isinstance(value, dict):
            for k in list(value):
                value[k] = swap(value[k])
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                object.__setattr__(value, f.name, swap(getattr(value, f.name)))
        return value

    out = swap(out)
    if not found:
        raise ValueError(
            "with_sequence_parallel_norm: the spec has no WrappedTorchNorm (Megatron's local-spec torch norm) "
            "to replace; a Transformer Engine or apex spec supports sequence parallelism as it is"
        )
    return out
