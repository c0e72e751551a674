"""Plots of the ProxSparse training telemetry found in a Trainer ``log_history`` (matplotlib, optional ``plots`` extra).

Read them to tune λ1: groups never reaching 2:4 before the end (``frac_2to4`` well below 1) means λ1 is too weak and the
final projection does all the pruning; ``mask_flips`` dropping to zero within the first steps means λ1 is so strong that the
mask froze at magnitude pruning before the loss could shape it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TELEMETRY_KEYS", "plot_telemetry", "telemetry_series"]

TELEMETRY_KEYS = (
    ("loss", "training loss"),
    ("proxsparse/frac_2to4", "fraction of groups already 2:4"),
    ("proxsparse/mask_flips", "mask flips since last log"),
    ("proxsparse/regularizer", "2:4 regulariser Σ R(w)"),
)


def telemetry_series(log_history: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for every telemetry key present in ``log_history`` (NaNs skipped)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for key, _ in TELEMETRY_KEYS:
        steps, values = [], []
        for entry in log_history:
            value = entry.get(key)
            if isinstance(value, (int, float)) and value == value and "step" in entry:
                steps.append(int(entry["step"]))
                values.append(float(value))
        if steps:
            series[key] = (steps, values)
    return series


def plot_telemetry(
    runs: Mapping[str, Sequence[Mapping[str, Any]]] | Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
) -> str:
    """Plot loss, fraction of 2:4 groups, mask flips and regulariser against the step into a PNG; returns the path.

    Args:
        runs: one ``log_history`` or ``{run_name: log_history}`` (one line per run in every panel).
        path: output PNG.
        title: figure title.

    Raises:
        ValueError: no telemetry in any run.
        RuntimeError: matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError('Plotting needs matplotlib: pip install "proxsparse-hf[plots]"') from exc
    if not isinstance(runs, Mapping):
        runs = {"run": runs}
    all_series = {name: telemetry_series(history) for name, history in runs.items()}
    if not any(all_series.values()):
        raise ValueError("No ProxSparse telemetry (e.g. 'proxsparse/frac_2to4') in the given log history.")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
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
    if len(runs) > 1 and handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if len(runs) > 1 else 0, 1, 1))
    path = os.fspath(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
