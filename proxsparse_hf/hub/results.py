"""The evaluation part of a model card, read from :class:`~proxsparse_hf.evaluation.results.EvalResults` (the one
results schema): the rows, the comparison table, the notes and the model-index entries.

This model's row is its ``eval_results.json``; the other rows come from
:func:`~proxsparse_hf.evaluation.results.load_comparison` (what ``proxsparse compare`` writes). Row names are
:attr:`EvalResults.display_label` (pruner registry), dataset and task names and their Hub datasets come from the
evaluation-task registry (:mod:`proxsparse_hf.evaluation.tasks`). The chart is
:func:`proxsparse_hf.evaluation.plot.plot_perplexity`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..evaluation.results import EvalResults, load_comparison

__all__ = [
    "CHART_NAME",
    "PIPELINE_TAG",
    "card_results",
    "eval_notes",
    "eval_table",
    "finite",
    "model_index",
]

CHART_NAME = "perplexity.png"
PIPELINE_TAG = "text-generation"


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _task(name: str, kind: str) -> Any:
    """The evaluation task of a perplexity dataset / zero-shot task (a generic one, labelled by its name, when it is
    not registered)."""
    from ..evaluation.tasks import resolve_eval_task

    return resolve_eval_task(name, kind)


def card_results(
    own: EvalResults | Mapping[str, Any] | None, comparison: str | os.PathLike | Sequence[Any] | None
) -> tuple[list[EvalResults], EvalResults | None]:
    """The rows of the evaluation table (comparison rows first, this model's last) and this model's results.

    Args:
        own: this model's results (an ``EvalResults`` or the content of its ``eval_results.json``), or None.
        comparison: what :func:`~proxsparse_hf.evaluation.results.load_comparison` reads.

    Raises:
        ValueError: a row is not valid ``EvalResults``, or holds no perplexity and no zero-shot accuracy.
    """
    rows = load_comparison(comparison)
    if own is not None and not isinstance(own, EvalResults):
        try:
            own = EvalResults.from_dict(own)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"This model's evaluation results are invalid: {exc}") from exc
    if own is not None:
        rows.append(own)
    for row in rows:
        if not row.perplexity and not row.zeroshot:
            raise ValueError(f"Evaluation results for {row.label!r} hold no perplexity or zero-shot number.")
    return rows, own


def eval_table(rows: Sequence[EvalResults], own: EvalResults | None) -> str:
    """Markdown table: one row per model, perplexities (↓) then zero-shot accuracies in %."""
    datasets = list(dict.fromkeys(d for row in rows for d in row.perplexity))
    tasks = list(dict.fromkeys(t for row in rows for t in row.zeroshot))
    header = ["model"] + [f"{_task(d, 'perplexity').label} ppl ↓" for d in datasets]
    header += [_task(t, "zeroshot").label for t in tasks]
    with_mean = len(tasks) > 1
    if with_mean:
        header.append("zero-shot mean")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [f"**this model ({row.display_label})**" if row is own else row.display_label]
        cells += [f"{row.ppl(d):.2f}" if d in row.perplexity else "–" for d in datasets]
        cells += [f"{100 * row.zeroshot[t]['acc']:.1f}" if t in row.zeroshot else "–" for t in tasks]
        if with_mean:
            complete = row.zeroshot_mean is not None and set(tasks) <= set(row.zeroshot)
            cells.append(f"{100 * row.zeroshot_mean:.1f}" if complete else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_notes(own: EvalResults | None, rows: Sequence[EvalResults]) -> str:
    """The protocol in words: windows and tokens per dataset, what the zero-shot numbers are."""
    notes = []
    for dataset, entry in (own.perplexity if own is not None else {}).items():
        parts = []
        if entry.get("seq_len"):
            parts.append(f"{entry['seq_len']}-token windows")
        if entry.get("num_tokens"):
            parts.append(f"{int(entry['num_tokens']):,} tokens")
        if entry.get("split"):
            parts.append(f"split `{entry['split']}`")
        if parts:
            notes.append(f"{_task(dataset, 'perplexity').label} perplexity: " + ", ".join(parts) + ".")
    if any(row.zeroshot for row in rows):
        notes.append("Zero-shot: accuracy in % (lm-evaluation-harness).")
    if len(rows) > 1:
        notes.append("All rows were measured with the same protocol; – = not measured.")
    return " ".join(notes)


def model_index(own: EvalResults) -> list:
    """``huggingface_hub.EvalResult`` entries (the card's model-index) of this model's finite results."""
    from huggingface_hub import EvalResult

    measured = [("perplexity", name, entry["ppl"], entry.get("split")) for name, entry in own.perplexity.items()]
    measured += [("zeroshot", name, entry["acc"], None) for name, entry in own.zeroshot.items()]
    results = []
    for kind, name, value, split in measured:
        if finite(value) is None:  # the Hub takes numbers only (a diverged perplexity stays in the table)
            continue
        task = _task(name, kind)
        ppl = kind == "perplexity"
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name="Text Generation" if ppl else "Zero-shot evaluation",
                dataset_type=task.hub_dataset or name,
                dataset_name=task.label,
                dataset_config=task.hub_config,
                dataset_split=split,
                metric_type="perplexity" if ppl else "accuracy",
                metric_name="Perplexity" if ppl else "Accuracy (zero-shot)",
                metric_value=round(float(value), 4),
            )
        )
    return results
