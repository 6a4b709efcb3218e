"""Index arithmetic over sequences of rows, shared by the trace, its layouts and every converter.

A batch of ``B`` sequences of lengths ``lens_B`` occupies rows ``cu_seqlens[b] .. cu_seqlens[b + 1]``
of a packed ``[T, ...]`` tensor. These helpers build those boundaries and the row indices of runs
of rows, vectorised (no Python loop over sequences), on the tensors' own device.

Legend: B sequences, G runs (segments), N output rows.
"""

from __future__ import annotations

import torch

__all__ = ["cu_seqlens_of", "ranges", "sequence_of"]


def cu_seqlens_of(lens_B: torch.Tensor) -> torch.Tensor:
    """int64 ``[B + 1]`` boundaries ``[0, l0, l0 + l1, ...]`` of sequences of lengths ``lens_B``."""
    cu_B1 = torch.zeros(lens_B.numel() + 1, dtype=torch.int64, device=lens_B.device)
    torch.cumsum(lens_B, 0, out=cu_B1[1:])
    return cu_B1


def sequence_of(cu_seqlens_B1: torch.Tensor, t: int) -> int:
    """The sequence holding row ``t`` (for an error message: one host read)."""
    t_ = torch.tensor(t, device=cu_seqlens_B1.device)
    return int(torch.searchsorted(cu_seqlens_B1, t_, right=True)) - 1


def ranges(starts_G: torch.Tensor, lens_G: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]``: the concatenation of ``arange(s, s + n)`` for each run ``(s, n)``, ``N = sum(n)``.

    Built as the running sum of steps (1 inside a run, a jump at each run's first row): one
    ``cumsum``, several times cheaper on the CPU than ``repeat_interleave`` plus ``arange``.
    Runs of length 0 contribute nothing.
    """
    keep_G = lens_G > 0
    starts_G, lens_G = starts_G[keep_G], lens_G[keep_G]
    total = int(lens_G.sum()) if lens_G.numel() else 0
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=starts_G.device)
    step_N = torch.ones(total, dtype=torch.int64, device=starts_G.device)
    first_G = lens_G.cumsum(0) - lens_G  # output row where each run starts
    step_N[:1] = starts_G[:1]
    step_N[first_G[1:]] = starts_G[1:] - (starts_G[:-1] + lens_G[:-1] - 1)
    return step_N.cumsum(0)
