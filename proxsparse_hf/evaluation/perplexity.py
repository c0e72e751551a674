"""Perplexity with the protocol of the ProxSparse / SparseGPT / Wanda papers.

WikiText-2 (raw) test split and C4 validation: join the documents with ``"\\n\\n"``, tokenize once, cut into
non-overlapping windows of ``seq_len`` tokens, drop the remainder; every window is scored independently (next-token
prediction over its ``seq_len - 1`` targets) and perplexity = ``exp(mean NLL over all scored tokens)``.

BOS: when the tokenizer adds a BOS token (Llama, Mistral, Gemma, ...; see :func:`proxsparse_hf.data.wants_bos`), each
window is ``[BOS]`` + the next ``seq_len - 1`` tokens of the text, and all ``seq_len - 1`` text tokens are scored (the
first one predicted from BOS alone). Without BOS (e.g. SmolLM2, GPT-2) a window is the next ``seq_len`` tokens and its
first token is context only — the windows of earlier versions. ``bos=False`` / ``True`` overrides the tokenizer; the
choice is returned as ``"bos"``.

Known dataset names resolve through :func:`proxsparse_hf.data.resolve_document_range` to the local copies in the shared
data folder (:func:`proxsparse_hf.data.find_assets_dir`) when present, else to the Hub through ``datasets``. C4 uses
documents ``[1000, 2000)`` of the local 2,000-document validation sample (also when given as a path to it);
calibration uses ``[0, 1000)``, so the two never overlap. Any other string is a local file/directory or Hub dataset id
read with :func:`proxsparse_hf.data.load_texts`.
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

from ..data import (
    C4_EVAL_DOCS,
    CALIBRATION_DOCS,
    CORPORA,
    bos_token_id,
    find_assets_dir,
    load_texts,
    resolve_document_range,
    tokenize_windows,
)
from ..loading import input_device, resolve_dtype

__all__ = [
    "C4_EVAL_DOCS",  # re-exported from proxsparse_hf.data, which owns corpora and document ranges
    "CALIBRATION_DOCS",  # idem
    "DEFAULT_MAX_SEQ_LEN",
    "PERPLEXITY_DATASETS",
    "PerplexityDataset",
    "evaluate_perplexity",
    "find_assets_dir",  # idem
    "model_max_length",
    "perplexity",
    "resolve_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LEN = 2048
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


def _hub_dataset(name: str) -> PerplexityDataset:
    corpus = CORPORA[name]
    start, stop = corpus.evaluation_docs
    return PerplexityDataset(
        name, corpus.hub_ids[0], split=corpus.hub_split, subset=corpus.hub_config, start=start, stop=stop
    )


# short name -> (local path under the data dir, Hub fallback); the corpora themselves live in proxsparse_hf.data
PERPLEXITY_DATASETS: dict[str, tuple[str, PerplexityDataset]] = {
    name: (CORPORA[name].path, _hub_dataset(name)) for name in ("wikitext2", "c4")
}


def resolve_dataset(dataset: str | PerplexityDataset) -> PerplexityDataset:
    """Map ``"wikitext2"`` / ``"c4"`` to the local copy (when present) or the Hub; other strings are used as sources
    (a path to a known corpus gets its evaluation documents, e.g. C4 ``[1000, 2000)``)."""
    if isinstance(dataset, PerplexityDataset):
        return dataset
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(
            f"`dataset`={dataset!r} is invalid; allowed: {sorted(PERPLEXITY_DATASETS)}, a path or a Hub id."
        )
    key = dataset.lower().replace("-", "").replace("_", "")
    name = key if key in PERPLEXITY_DATASETS else dataset
    docs = resolve_document_range(name, purpose="evaluation", split="test")
    split = docs.split
    if split is None:  # local: the split the file was drawn from (recorded in results)
        split = CORPORA[docs.corpus].hub_split if docs.corpus in PERPLEXITY_DATASETS else "test"
    return PerplexityDataset(name, docs.source, split=split, subset=docs.name, start=docs.start, stop=docs.stop)


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
    bos: bool | None = None,
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
        bos: start every window with the BOS token; None (default) when the tokenizer adds one (see the module
            docstring), False never, True always.

    Returns:
        ``{"ppl", "nll", "num_tokens", "num_windows", "seq_len", "source", "split", "documents", "bos"}`` where ``nll``
        is the mean NLL per scored token (nats), ``num_tokens`` the number of scored tokens
        (``num_windows · (seq_len − 1)``) and ``bos`` whether the windows started with BOS.

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
    bos_id = bos_token_id(tokenizer, bos)
    if dtype is not None:
        resolved = resolve_dtype(dtype)
        if isinstance(resolved, torch.dtype):
            model.to(resolved)
    spec = resolve_dataset(dataset)
    texts = load_texts(
        spec.source, split=spec.split, text_field=text_field, name=spec.subset, start=spec.start, stop=spec.stop
    )
    windows = tokenize_windows(texts, tokenizer, seq_len, bos=bos_id is not None)
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
        "bos": bos_id is not None,
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
