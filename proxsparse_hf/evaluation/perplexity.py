"""Perplexity with the protocol of the ProxSparse / SparseGPT / Wanda papers.

WikiText-2 (raw) test split and C4 validation: join the documents with ``"\\n\\n"``, tokenize once, cut into
non-overlapping windows of ``seq_len`` tokens, drop the remainder; every window is scored independently (next-token
prediction over its ``seq_len - 1`` targets) and perplexity = ``exp(mean NLL over all scored tokens)``.

Known dataset names resolve to the local copies in ``../shared/assets/data`` (relative to the working directory or to the
repository, or under ``$PROXSPARSE_DATA_DIR``) when present, else to the Hub through ``datasets``. C4 uses documents
``[1000, 2000)`` of the local 2,000-document validation sample; calibration uses ``[0, 1000)``, so the two never overlap.
Any other string is a local file/directory or Hub dataset id read with :func:`proxsparse_hf.data.load_texts`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import load_texts, tokenize_windows
from ..loading import input_device, resolve_dtype

__all__ = [
    "C4_EVAL_DOCS",
    "CALIBRATION_DOCS",
    "DEFAULT_MAX_SEQ_LEN",
    "PERPLEXITY_DATASETS",
    "PerplexityDataset",
    "evaluate_perplexity",
    "find_assets_dir",
    "model_max_length",
    "perplexity",
    "resolve_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048
CALIBRATION_DOCS = (0, 1000)  # documents of the local C4 sample used for calibration
C4_EVAL_DOCS = (1000, 2000)  # documents of the local C4 sample used for C4 perplexity
_LENGTH_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class PerplexityDataset:
    """Where the text of a perplexity dataset comes from.

    Attributes:
        name: short name used in results (``"wikitext2"``, ``"c4"``, or the source string).
        source: local file/directory or Hub dataset id.
        split: split of a Hub dataset.
        subset: Hub dataset configuration name.
        start: first document.
        stop: one past the last document (None = all).
    """

    name: str
    source: str
    split: str = "test"
    subset: str | None = None
    start: int = 0
    stop: int | None = None


# short name -> (local path under the data dir, Hub fallback)
PERPLEXITY_DATASETS: dict[str, tuple[str, PerplexityDataset]] = {
    "wikitext2": (
        os.path.join("wikitext-2-raw-v1", "test.jsonl"),
        PerplexityDataset("wikitext2", "wikitext", split="test", subset="wikitext-2-raw-v1"),
    ),
    "c4": (
        os.path.join("c4-validation-2k", "c4_validation_2k.jsonl"),
        PerplexityDataset(
            "c4", "allenai/c4", split="validation", subset="en", start=C4_EVAL_DOCS[0], stop=C4_EVAL_DOCS[1]
        ),
    ),
}


def find_assets_dir() -> str | None:
    """The shared data folder: ``$PROXSPARSE_DATA_DIR``, else ``../shared/assets/data`` relative to the working directory
    or to the repository this package lives in; None when none exists."""
    candidates = []
    if os.environ.get("PROXSPARSE_DATA_DIR"):
        candidates.append(os.environ["PROXSPARSE_DATA_DIR"])
    candidates.append(os.path.join(os.getcwd(), "..", "shared", "assets", "data"))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    candidates.append(os.path.join(repo, "..", "shared", "assets", "data"))
    for path in candidates:
        if os.path.isdir(path):
            return os.path.abspath(path)
    return None


def resolve_dataset(dataset: str | PerplexityDataset) -> PerplexityDataset:
    """Map ``"wikitext2"`` / ``"c4"`` to the local copy (when present) or the Hub; other strings are used as sources."""
    if isinstance(dataset, PerplexityDataset):
        return dataset
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(
            f"`dataset`={dataset!r} is invalid; allowed: {sorted(PERPLEXITY_DATASETS)}, a path or a Hub id."
        )
    key = dataset.lower().replace("-", "").replace("_", "")
    if key in PERPLEXITY_DATASETS:
        local, hub = PERPLEXITY_DATASETS[key]
        assets = find_assets_dir()
        if assets is not None and os.path.isfile(os.path.join(assets, local)):
            return PerplexityDataset(
                hub.name, os.path.join(assets, local), split=hub.split, start=hub.start, stop=hub.stop
            )
        return hub
    return PerplexityDataset(dataset, dataset)


def model_max_length(model: nn.Module) -> int | None:
    """The model's context length from its config (``max_position_embeddings``, ``n_positions``, ...), or None."""
    config = getattr(model, "config", None)
    for attr in _LENGTH_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _resolve_seq_len(model: nn.Module, seq_len: int | None) -> int:
    limit = model_max_length(model)
    if seq_len is None:
        return min(limit, DEFAULT_MAX_SEQ_LEN) if limit else DEFAULT_MAX_SEQ_LEN
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len`={seq_len!r} is invalid; allowed: an integer >= 2.")
    if limit is not None and seq_len > limit:
        raise ValueError(f"`seq_len`={seq_len} exceeds the model's maximum sequence length ({limit}).")
    return seq_len


@torch.no_grad()
def window_nll(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = False
) -> torch.Tensor:
    """Summed next-token NLL (float64) of every window ``[N, L]`` scored independently; returns ``[N]``."""
    from tqdm.auto import tqdm

    device = input_device(model)
    totals = torch.zeros(windows.shape[0], dtype=torch.float64)
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        targets = ids[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
        )
        totals[start : start + ids.shape[0]] = nll.view(ids.shape[0], -1).double().sum(dim=1).cpu()
    return totals


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    dataset: str | PerplexityDataset = "wikitext2",
    *,
    seq_len: int | None = None,
    batch_size: int = 1,
    dtype: str | torch.dtype | None = None,
    max_windows: int | None = None,
    text_field: str = "text",
    show_progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on one dataset.

    Args:
        model: a causal LM (evaluated on its current device).
        tokenizer: its tokenizer.
        dataset: ``"wikitext2"``, ``"c4"``, a :class:`PerplexityDataset`, a local file/directory or a Hub dataset id.
        seq_len: window length; default the model's context length capped at 2048.
        batch_size: windows per forward pass.
        dtype: cast the model to this dtype (in place) before evaluating; None keeps it.
        max_windows: score only the first this many windows (quick runs).
        text_field: record field holding the text.
        show_progress: tqdm progress bar.

    Returns:
        ``{"ppl", "nll", "num_tokens", "num_windows", "seq_len", "source", "split", "documents"}`` where ``nll`` is the mean
        NLL per scored token (nats) and ``num_tokens`` the number of scored tokens (``num_windows · (seq_len − 1)``).

    Raises:
        ValueError: ``seq_len`` above the model's limit, bad options, or a dataset with fewer tokens than one window.
    """
    seq_len = _resolve_seq_len(model, seq_len)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size`={batch_size!r} is invalid; allowed: an integer >= 1.")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise ValueError(f"`max_windows`={max_windows!r} is invalid; allowed: None or an integer >= 1.")
    if dtype is not None:
        resolved = resolve_dtype(dtype)
        if isinstance(resolved, torch.dtype):
            model.to(resolved)
    spec = resolve_dataset(dataset)
    texts = load_texts(
        spec.source, split=spec.split, text_field=text_field, name=spec.subset, start=spec.start, stop=spec.stop
    )
    windows = tokenize_windows(texts, tokenizer, seq_len)
    if max_windows is not None:
        windows = windows[:max_windows]
    was_training = model.training
    model.eval()
    try:
        totals = window_nll(model, windows, batch_size=batch_size, progress=show_progress)
    finally:
        model.train(was_training)
    num_tokens = windows.shape[0] * (seq_len - 1)
    nll = float(totals.sum()) / num_tokens
    result = {
        "ppl": math.exp(nll),
        "nll": nll,
        "num_tokens": num_tokens,
        "num_windows": int(windows.shape[0]),
        "seq_len": seq_len,
        "source": os.path.abspath(spec.source) if os.path.exists(spec.source) else spec.source,
        "split": spec.split,
        "documents": [spec.start, spec.stop],
    }
    logger.info("%s perplexity %.3f (%d windows x %d tokens)", spec.name, result["ppl"], windows.shape[0], seq_len)
    return result


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    datasets: Sequence[str | PerplexityDataset] = ("wikitext2", "c4"),
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """:func:`perplexity` on several datasets; returns ``{dataset_name: result}`` (options as for :func:`perplexity`)."""
    if isinstance(datasets, str):
        datasets = [datasets]
    if not datasets:
        raise ValueError("`datasets` is empty; give at least one dataset, e.g. ['wikitext2'].")
    results: dict[str, dict[str, Any]] = {}
    for dataset in datasets:
        spec = resolve_dataset(dataset)
        results[spec.name] = perplexity(model, tokenizer, spec, **kwargs)
    return results
