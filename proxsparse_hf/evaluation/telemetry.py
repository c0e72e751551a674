"""The ProxSparse training telemetry in a Trainer ``log_history``, as series (data only; the figure is
:func:`proxsparse_hf.evaluation.plot.plot_telemetry`).

Read them to tune λ1: groups never reaching 2:4 before the end (``frac_2to4`` well below 1) means λ1 is too weak and the
final projection does all the pruning; ``mask_flips`` dropping to zero within the first steps means λ1 is so strong that the
mask froze at magnitude pruning before the loss could shape it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TELEMETRY_KEYS", "telemetry_entries", "telemetry_series"]

# (log key, panel title)
TELEMETRY_KEYS = (
    ("loss", "training loss"),
    ("proxsparse/frac_2to4", "fraction of groups already 2:4"),
    ("proxsparse/mask_flips", "mask flips since last log"),
    ("proxsparse/regularizer", "2:4 regulariser Σ R(w)"),
)
_KEPT = ("step", "loss", "learning_rate")


def telemetry_entries(log_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The entries of ``log_history`` that carry telemetry, reduced to ``step``, ``loss``, ``learning_rate`` and the
    ``proxsparse/*`` keys (what ``EvalResults.telemetry`` keeps)."""
    kept = []
    for entry in log_history:
        reduced = {k: v for k, v in entry.items() if k in _KEPT or k.startswith("proxsparse/")}
        if set(reduced) - {"step"}:
            kept.append(reduced)
    return kept


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
