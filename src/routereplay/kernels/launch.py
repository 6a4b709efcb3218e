"""Launching a compiled replay kernel without Triton's JIT front door (CUDA, Triton 3.6 only).

The first launch of each kernel variant goes through Triton's JIT (``kernel[grid](...)``), which
binds the arguments, looks the variant up in its cache (compiling it if needed) and launches.
:class:`KeptLaunchers` keeps what that launch compiled (its launcher, function handle and packed
metadata, and the constexpr arguments the launcher takes after the runtime ones), so a later launch
of the same variant is one call of the launcher: the host cost of a replay call at 16k tokens is
most of its cost. The launcher is an internal interface of Triton: :func:`direct_launch_ok` allows
it only on the Triton minor version it was written and tested against; elsewhere, under the
interpreter, or with a profiler hook registered, every launch goes through the JIT.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import triton

from routereplay.kernels.coverage import interpreting

__all__ = ["TESTED_TRITON", "KeptLaunchers", "direct_launch_ok", "hooked", "on_device", "raw_stream"]

TESTED_TRITON = "3.6."


def direct_launch_ok(device: torch.device) -> bool:
    """Whether kept launchers may be used on ``device`` at all (CUDA, compiled, tested Triton)."""
    return device.type == "cuda" and not interpreting() and triton.__version__.startswith(TESTED_TRITON)


def hooked() -> bool:
    """A launch hook is registered with Triton (a profiler): launch through the JIT so it sees it."""
    runtime = triton.knobs.runtime
    return bool(runtime.launch_enter_hook.calls or runtime.launch_exit_hook.calls)


def raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def on_device(device: torch.device):
    """The device guard for a launch through Triton's JIT, which compiles for and launches on the
    current device (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class KeptLaunchers:
    """The compiled variants of one JIT kernel, kept for direct launches.

    ``key`` is what Triton specialises the variant on (dtypes, flags, block, alignment); each kept
    variant holds its launcher, function handle, packed metadata and the constexpr arguments that
    follow the runtime ones in the launcher's parameter list.
    """

    def __init__(self, jit_fn: Any) -> None:
        self.jit_fn = jit_fn
        self._kernels: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        """Variants kept (0 until a direct launch has been prepared by a first JIT launch)."""
        return len(self._kernels)

    def get(self, key: tuple) -> tuple | None:
        return self._kernels.get(key)

    def remember(self, key: tuple, compiled: Any, const: dict) -> None:
        """Keep what a direct launch of ``compiled`` needs (nothing if Triton gave no such handle)."""
        if compiled is None or not hasattr(compiled, "packed_metadata"):
            return
        names = self.jit_fn.arg_names
        first = names.index("E")  # the runtime parameters come first, the constexprs after them
        if any(name not in const for name in names[first:]):
            return
        tail = tuple(const[name] for name in names[first:])
        self._kernels[key] = (compiled.run, compiled.function, compiled.packed_metadata, tail)

    @staticmethod
    def launch(kernel: tuple, grid: int, device_index: int, *runtime_args: Any) -> None:
        """One launch of a kept ``kernel`` (from :meth:`get`) on the current stream."""
        run, function, metadata, tail = kernel
        run(grid, 1, 1, raw_stream(device_index), function, metadata, None, None, None, *runtime_args, *tail)
