"""Evaluation of dense and pruned models: perplexity (WikiText-2, C4), zero-shot accuracy (lm-evaluation-harness), and
the ``EvalResults`` schema written to ``eval_results.json``.

``evaluate_model`` runs everything for one in-memory model and returns an :class:`EvalResults`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .perplexity import (
    PERPLEXITY_DATASETS,
    PerplexityDataset,
    evaluate_perplexity,
    find_assets_dir,
    model_max_length,
    perplexity,
    resolve_dataset,
)
from .results import EvalResults, sparsity_totals
from .zeroshot import DEFAULT_TASKS, LOCAL_TASK_FILES, zeroshot_eval

__all__ = [
    "DEFAULT_TASKS",
    "LOCAL_TASK_FILES",
    "PERPLEXITY_DATASETS",
    "EvalResults",
    "PerplexityDataset",
    "evaluate_model",
    "evaluate_perplexity",
    "find_assets_dir",
    "model_max_length",
    "perplexity",
    "resolve_dataset",
    "sparsity_totals",
    "zeroshot_eval",
]


def evaluate_model(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    method: str = "dense",
    method_config: dict[str, Any] | None = None,
    revision: str | None = None,
    config: Any = None,
    datasets: Sequence[str] = ("wikitext2", "c4"),
    seq_len: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    tasks: Sequence[str] | None = None,
    zeroshot_limit: int | None = None,
    zeroshot_batch_size: int = 1,
    zeroshot_data_dir: str | None = None,
    skip_unavailable: bool = False,
    show_progress: bool = True,
) -> EvalResults:
    """Perplexity on ``datasets`` and (when ``tasks`` is given) zero-shot accuracy of an in-memory model.

    Args:
        model, tokenizer: the model (on its evaluation device) and tokenizer.
        model_name: id or path recorded in the results.
        method: ``dense`` / ``proxsparse`` / ``magnitude`` / ``wanda`` / ``sparsegpt``.
        method_config: the method's settings, recorded as is.
        revision: model revision, when known.
        config: ``ProxSparseConfig`` whose targets define the sparsity totals (default ``"all-linear"``).
        datasets: perplexity datasets (empty: none).
        seq_len, batch_size, max_windows: perplexity options (see :func:`perplexity`).
        tasks: zero-shot tasks (None: no zero-shot evaluation).
        zeroshot_limit, zeroshot_batch_size, zeroshot_data_dir, skip_unavailable: see :func:`zeroshot_eval`.
        show_progress: progress bars.
    """
    from ..artefacts.output_dir import describe_hardware, library_versions

    start = time.perf_counter()
    ppl = (
        evaluate_perplexity(
            model,
            tokenizer,
            list(datasets),
            seq_len=seq_len,
            batch_size=batch_size,
            max_windows=max_windows,
            show_progress=show_progress,
        )
        if datasets
        else {}
    )
    zeroshot: dict[str, dict[str, Any]] = {}
    if tasks:
        zeroshot = zeroshot_eval(
            model,
            tokenizer,
            tasks,
            limit=zeroshot_limit,
            batch_size=zeroshot_batch_size,
            data_dir=zeroshot_data_dir,
            skip_unavailable=skip_unavailable,
        )
    versions = library_versions()
    if tasks:
        import lm_eval

        versions["lm_eval"] = getattr(lm_eval, "__version__", "unknown")
    return EvalResults(
        model=model_name,
        method=method,
        revision=revision,
        method_config=dict(method_config or {}),
        perplexity=ppl,
        zeroshot=zeroshot,
        sparsity=sparsity_totals(model, config),
        hardware=describe_hardware(),
        versions=versions,
        wall_time_s=time.perf_counter() - start,
    )
