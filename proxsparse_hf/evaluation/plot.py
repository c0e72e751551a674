"""The charts of the library (matplotlib, optional extra ``plots``; imported only when a chart is drawn).

* :func:`plot_perplexity`: perplexity per model and dataset as grouped bars, from :class:`EvalResults` (the model card,
  ``proxsparse compare`` and ``benchmarks/plot_quality.py`` draw it).
* :func:`plot_telemetry`: the ProxSparse training telemetry against the step (``proxsparse learn``, the benchmarks).

Both draw on a ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot state, no global backend switch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .results import EvalResults
from .telemetry import TELEMETRY_KEYS, telemetry_series

__all__ = ["plot_perplexity", "plot_telemetry"]

_INSTALL = 'pip install "proxsparse-hf[plots]"'
_AUTO_LOG_RATIO = 20.0  # log scale when the largest perplexity is this many times the smallest
_MAX_ANNOTATED_BARS = 24


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError(f"Charts need matplotlib: {_INSTALL}") from exc
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _dataset_label(name: str) -> str:
    from .tasks import eval_task_names, get_eval_task

    return get_eval_task(name).label if name in eval_task_names() else name


def plot_perplexity(
    results: Sequence[EvalResults],
    path: str | os.PathLike,
    *,
    datasets: str | Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    log_scale: bool | None = None,
    title: str | None = None,
) -> str:
    """Save a bar chart of perplexity: one group of bars per result, one bar per dataset; returns the path.

    Args:
        results: the rows (dense, baselines, learned masks), in order.
        path: PNG path.
        datasets: which perplexities (default every dataset any result has, in order of appearance).
        labels: one x label per result (default :attr:`EvalResults.display_label`).
        log_scale: logarithmic y axis; None chooses it when the values span more than a factor of 20 (2:4 baselines
            can be orders of magnitude apart).
        title: figure title (default names the model).

    Raises:
        RuntimeError: matplotlib is not installed.
        ValueError: ``labels`` does not match ``results``, or no result has a perplexity on ``datasets``.
    """
    if labels is not None and len(labels) != len(results):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(results)} results.")
    names = list(labels) if labels is not None else [r.display_label for r in results]
    if isinstance(datasets, str):
        datasets = [datasets]
    wanted = list(datasets) if datasets is not None else list(dict.fromkeys(d for r in results for d in r.perplexity))
    rows = [(name, r) for name, r in zip(names, results) if any(r.ppl(d) is not None for d in wanted)]
    if not rows:
        raise ValueError(f"No result has a perplexity on `datasets`={wanted!r}.")
    shown = [d for d in wanted if any(r.ppl(d) is not None for _, r in rows)]
    values = [r.ppl(d) for _, r in rows for d in shown if r.ppl(d) is not None]
    if log_scale is None:
        log_scale = max(values) / max(min(values), 1e-12) > _AUTO_LOG_RATIO
    fig = _figure(max(4.5, 0.9 * len(rows) * max(1, len(shown)) ** 0.5 + 2.0), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(shown)
    annotate = len(values) <= _MAX_ANNOTATED_BARS
    for i, dataset in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * width for j, (_, r) in enumerate(rows) if r.ppl(dataset) is not None]
        ys = [r.ppl(dataset) for _, r in rows if r.ppl(dataset) is not None]
        bars = ax.bar(xs, ys, width=width * 0.95, label=_dataset_label(dataset))
        if annotate:
            ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=7)
    ax.set_xticks(range(len(rows)), [name for name, _ in rows], rotation=25 if len(rows) > 3 else 0, ha="right")
    if log_scale:
        ax.set_yscale("log")
    ax.set_ylabel("perplexity" + (" (log scale)" if log_scale else "") + ", lower is better")
    if len(shown) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if title is None:
        models = list(dict.fromkeys(r.model for _, r in rows))
        title = "Perplexity: dense vs 2:4" + (f" — {models[0]}" if len(models) == 1 else "")
    ax.set_title(title, fontsize=10)
    path = os.fspath(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_telemetry(
    runs: Sequence[EvalResults] | Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
) -> str:
    """Plot loss, fraction of 2:4 groups, mask flips and regulariser against the step into a PNG; returns the path.

    Args:
        runs: one ``log_history``, ``{run_name: log_history}`` or a sequence of :class:`EvalResults` (their
            ``telemetry``, named by label); one line per run in every panel.
        path: output PNG.
        title: figure title.

    Raises:
        ValueError: no telemetry in any run.
        RuntimeError: matplotlib is missing.
    """
    if isinstance(runs, Mapping):
        histories = dict(runs)
    elif runs and all(isinstance(r, EvalResults) for r in runs):
        histories = {r.label: r.telemetry for r in runs if r.telemetry}
    else:
        histories = {"run": runs}
    all_series = {name: telemetry_series(history) for name, history in histories.items()}
    if not any(all_series.values()):
        raise ValueError("No ProxSparse telemetry (e.g. 'proxsparse/frac_2to4') in the given log history.")
    fig = _figure(11, 7)
    axes = fig.subplots(2, 2)
    for ax, (key, label) in zip(axes.flat, TELEMETRY_KEYS):
        for name, series in all_series.items():
            if key in series:
                ax.plot(*series[key], marker=".", label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        if key in ("proxsparse/regularizer", "proxsparse/mask_flips"):
            ax.set_yscale("symlog")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[1].get_legend_handles_labels()
    several = len(histories) > 1
    if several and handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if several else 0, 1, 1))
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    return path
