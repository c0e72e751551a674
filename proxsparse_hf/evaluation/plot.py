"""Bar chart of perplexity per method (matplotlib, optional extra ``plots``; imported lazily)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .results import EvalResults

__all__ = ["plot_perplexity"]


def plot_perplexity(
    results: Sequence[EvalResults],
    path: str | os.PathLike,
    *,
    dataset: str = "wikitext2",
    labels: Sequence[str] | None = None,
    log_scale: bool = True,
) -> str:
    """Save a bar chart of ``dataset`` perplexity for each result; returns the path.

    Args:
        results: one :class:`EvalResults` per bar.
        path: PNG path.
        dataset: which perplexity to plot.
        labels: bar labels (default :attr:`EvalResults.label`).
        log_scale: logarithmic y axis (2:4 baselines can be orders of magnitude apart).

    Raises:
        RuntimeError: matplotlib is not installed.
        ValueError: no result has a perplexity on ``dataset``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError('The comparison chart needs matplotlib: pip install "proxsparse-hf[plots]"') from exc
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(results)} results.")
    names = list(labels) if labels is not None else [r.label for r in results]
    rows = [(name, r.ppl(dataset)) for name, r in zip(names, results) if r.ppl(dataset) is not None]
    if not rows:
        raise ValueError(f"No result has a perplexity on `dataset`={dataset!r}.")
    names, values = zip(*rows)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1.5), 3.6))
    bars = ax.bar(range(len(rows)), values, color=["#555555" if name == "dense" else "#1f77b4" for name in names])
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylabel(f"{dataset} perplexity" + (" (log scale)" if log_scale else ""))
    if log_scale:
        ax.set_yscale("log")
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    model = results[0].model
    ax.set_title(f"2:4 sparsity — {os.path.basename(model.rstrip('/')) or model}", fontsize=10)
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
