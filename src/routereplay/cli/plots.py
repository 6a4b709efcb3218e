"""PNG plots for ``routereplay check``: per-layer routing disagreement and the log-prob delta histogram.

matplotlib (the ``plot`` extra) is imported inside the functions, on the Agg backend, so
``import routereplay`` never pulls it in.

Legend (shape suffixes used in this file):
    L  MoE layers;  N  tokens
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["plot_delta_histogram", "plot_per_layer_disagreement", "require_matplotlib"]

INSTALL_HINT = "pip install 'routereplay[plot]'"


def require_matplotlib() -> None:
    """Raise ImportError with the install command when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"routereplay plots need matplotlib: {INSTALL_HINT}")


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_per_layer_disagreement(
    path: str | os.PathLike[str],
    layer_ids: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    title: str = "Routing disagreement per MoE layer",
) -> None:
    """Grouped bars: for each layer, the fraction of tokens whose expert set differs.

    Args:
        path: PNG file to write.
        layer_ids: the L global layer ids (x axis).
        series: label -> L fractions in [0, 1] (e.g. "without replay", "with R3 replay").

    Raises:
        ImportError: matplotlib is not installed (message has the pip command).
        ValueError: a series does not have one value per layer.
    """
    plt = _pyplot()
    L = len(layer_ids)
    for label, values in series.items():
        if len(values) != L:
            raise ValueError(f"series {label!r} has {len(values)} values for {L} layers {list(layer_ids)}")
    x_L = np.arange(L)
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * L + 2), 3.5))
    for n, (label, values) in enumerate(series.items()):
        vals = np.asarray([np.nan if v is None else v for v in values], dtype=float)
        ax.bar(x_L + (n - (len(series) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x_L, [str(i) for i in layer_ids])
    ax.set_xlabel("MoE layer id")
    ax.set_ylabel("tokens with a different expert set")
    top = max((float(v) for values in series.values() for v in values if v is not None), default=0.0)
    ax.set_ylim(0, max(0.05, top * 1.15))
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_delta_histogram(
    path: str | os.PathLike[str],
    deltas: Mapping[str, np.ndarray | Sequence[float]],
    *,
    bins: int = 60,
    title: str = "delta = logp_train - logp_infer (response tokens)",
) -> None:
    """Overlaid histograms of the per-token log-prob delta (log-scaled counts).

    Args:
        path: PNG file to write.
        deltas: label -> the N per-token deltas ``logp_train - logp_infer``.
        bins: histogram bins, shared by every series.

    Raises:
        ImportError: matplotlib is not installed (message has the pip command).
    """
    plt = _pyplot()
    arrays = {k: np.asarray(v, dtype=float).reshape(-1) for k, v in deltas.items()}
    finite = [a[np.isfinite(a)] for a in arrays.values() if a.size]
    span = max([float(np.abs(a).max()) for a in finite if a.size] + [1e-6])
    edges = np.linspace(-span, span, bins + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, a in arrays.items():
        ax.hist(a, bins=edges, alpha=0.55, label=f"{label} (n={a.size})")
    ax.set_yscale("log")
    ax.set_xlabel("delta (nats)")
    ax.set_ylabel("tokens")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
