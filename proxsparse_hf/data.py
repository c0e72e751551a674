"""Text sources → fixed-length token windows, for calibration (mask learning, Wanda, SparseGPT) and evaluation.

A source is a local file (``.txt``/``.raw``: one document per blank-line-separated block is *not* assumed — the whole file is
one text; ``.jsonl``/``.json``: one record per line with a text field), a local directory of such files, or a Hub dataset id
loaded with ``datasets.load_dataset``. Documents are joined with ``"\\n\\n"``, tokenized once and cut into non-overlapping
windows; the remainder is dropped.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

__all__ = ["TokenWindows", "load_calibration_data", "load_texts", "tokenize_windows"]

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
_JSON_SUFFIXES = (".jsonl", ".json")


def _read_file(path: str, text_field: str) -> list[str]:
    if path.endswith(_TEXT_SUFFIXES):
        with open(path, encoding="utf-8") as fh:
            return [fh.read()]
    if path.endswith(_JSON_SUFFIXES):
        texts: list[str] = []
        with open(path, encoding="utf-8") as fh:
            first = fh.read(1)
            fh.seek(0)
            records = json.load(fh) if first == "[" else (json.loads(line) for line in fh if line.strip())
            for i, record in enumerate(records):
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"{path}: record {i} has no `text_field`={text_field!r} (keys: {list(record)}).")
                texts.append(str(record[text_field]))
        return texts
    raise ValueError(
        f"Unsupported file {path!r}: expected one of {_TEXT_SUFFIXES + _JSON_SUFFIXES} or a Hub dataset id."
    )


def load_texts(
    source: str | os.PathLike,
    *,
    split: str = "train",
    text_field: str = "text",
    name: str | None = None,
    start: int = 0,
    stop: int | None = None,
) -> list[str]:
    """Documents ``[start, stop)`` of a local file/directory or a Hub dataset (``datasets.load_dataset(source, name)[split]``).

    Raises:
        ValueError: bad range, unsupported file type, missing text field, or no documents.
    """
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"Document range [`start`={start}, `stop`={stop}) is empty or negative.")
    source = os.fspath(source)
    if os.path.isdir(source):
        files = sorted(
            os.path.join(source, f) for f in os.listdir(source) if f.endswith(_TEXT_SUFFIXES + _JSON_SUFFIXES)
        )
        if not files:
            raise ValueError(f"Directory {source!r} holds no {_TEXT_SUFFIXES + _JSON_SUFFIXES} files.")
        texts = [t for f in files for t in _read_file(f, text_field)]
    elif os.path.isfile(source):
        texts = _read_file(source, text_field)
    else:
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - datasets is a dependency
            raise RuntimeError("Loading a Hub dataset needs `pip install datasets`.") from exc
        try:
            ds = datasets.load_dataset(source, name, split=split)
        except Exception as exc:
            raise ValueError(
                f"{source!r} is not a local file/directory and `datasets.load_dataset` failed: {exc}"
            ) from exc
        if text_field not in ds.column_names:
            raise ValueError(f"Dataset {source!r} has no `text_field`={text_field!r}; columns: {ds.column_names}.")
        end = len(ds) if stop is None else min(stop, len(ds))
        texts = [str(t) for t in ds.select(range(min(start, end), end))[text_field]]
        start, stop = 0, None
    texts = texts[start:stop]
    if not texts or not any(t.strip() for t in texts):
        raise ValueError(f"No text found in {source!r} (documents [{start}, {stop})).")
    return texts


def tokenize_windows(
    texts: Sequence[str],
    tokenizer,
    seq_len: int,
    n_samples: int | None = None,
    *,
    separator: str = "\n\n",
) -> torch.Tensor:
    """Join ``texts`` with ``separator``, tokenize once and cut into non-overlapping ``[N, seq_len]`` windows.

    Raises:
        ValueError: ``seq_len`` < 2, or fewer tokens than one window (or than ``n_samples`` windows).
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len`={seq_len!r} must be an integer >= 2.")
    if n_samples is not None and (not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"`n_samples`={n_samples!r} must be None or an integer >= 1.")
    ids = tokenizer(separator.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // seq_len
    if available == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one window of `seq_len`={seq_len}.")
    if n_samples is not None and n_samples > available:
        raise ValueError(
            f"`n_samples`={n_samples} windows of {seq_len} tokens requested but the text yields only {available}; "
            f"lower n_samples/seq_len or add documents."
        )
    count = available if n_samples is None else n_samples
    return ids[: count * seq_len].reshape(count, seq_len).clone()


@dataclass
class TokenWindows(Dataset):
    """A ``torch`` dataset of fixed-length token windows: items are ``{"input_ids", "attention_mask", "labels"}``."""

    input_ids: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] == 0:
            raise ValueError(
                f"`input_ids` must be a non-empty [N, seq_len] tensor, got {tuple(self.input_ids.shape)}."
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def load_calibration_data(
    source: str | os.PathLike,
    tokenizer,
    *,
    seq_len: int,
    n_samples: int,
    seed: int = 0,
    split: str = "train",
    text_field: str = "text",
    name: str | None = None,
    start: int = 0,
    stop: int | None = None,
) -> TokenWindows:
    """Calibration windows: documents ``[start, stop)`` shuffled with ``seed``, joined, tokenized, first ``n_samples``
    windows of ``seq_len`` tokens. The same arguments always give the same windows."""
    texts = load_texts(source, split=split, text_field=text_field, name=name, start=start, stop=stop)
    random.Random(seed).shuffle(texts)
    windows = tokenize_windows(texts, tokenizer, seq_len, n_samples)
    logger.info("Calibration data: %d windows x %d tokens from %s", windows.shape[0], seq_len, os.fspath(source))
    return TokenWindows(windows)
