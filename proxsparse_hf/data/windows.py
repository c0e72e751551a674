"""Token windows: BOS handling, tokenizing and packing text into fixed-length windows, and the calibration data
set (see :mod:`proxsparse_hf.data`)."""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from .corpora import DocumentRange, resolve_document_range
from .reading import _buffered_shuffle, _is_compressed, _local_files, iter_texts, load_texts

logger = logging.getLogger(__name__)

DEFAULT_SEPARATOR = "\n\n"
DEFAULT_SHUFFLE_BUFFER = 1000  # documents held by the streaming shuffle
DEFAULT_CHUNK_CHARS = 1 << 18  # characters per chunk when streaming
_CHUNKS_PER_CALL = 16  # chunks tokenized together (a fast tokenizer spreads a batch over the CPU cores)


def wants_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` starts its encodings with its BOS token (``add_bos_token``, a template post-processor,
    or GGUF ``tokenizer.ggml.add_bos_token``): ``tokenizer("a")["input_ids"]`` begins with ``bos_token_id``."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    if len(ids) and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return len(ids) > 0 and int(ids[0]) == int(bos_id)


def bos_token_id(tokenizer: Any, bos: bool | None = None) -> int | None:
    """The token id every window starts with, or None: ``bos=None`` follows :func:`wants_bos`, ``True`` forces the
    tokenizer's BOS, ``False`` disables it.

    Raises:
        ValueError: ``bos`` is not a bool or None, or ``bos=True`` for a tokenizer without a BOS token.
    """
    if bos is not None and not isinstance(bos, bool):
        raise ValueError(f"`bos`={bos!r} is invalid; allowed: None (follow the tokenizer), True or False.")
    if bos is None:
        bos = wants_bos(tokenizer)
    if not bos:
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        raise ValueError("`bos`=True but the tokenizer has no `bos_token_id`; pass bos=None or bos=False.")
    return int(bos_id)


def _check_window_args(seq_len: Any, n_samples: Any) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"`seq_len`={seq_len!r} must be an integer >= 2.")
    if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ValueError(f"`n_samples`={n_samples!r} must be None or an integer >= 1.")


def _too_few(n_samples: int, seq_len: int, available: int) -> ValueError:
    return ValueError(
        f"`n_samples`={n_samples} windows of {seq_len} tokens requested but the text yields only {available}; "
        f"lower n_samples/seq_len or add documents."
    )


def _with_bos(body: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return body
    return torch.cat([torch.full((body.shape[0], 1), bos_id, dtype=body.dtype), body], dim=1)


def tokenize_windows(
    texts: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    n_samples: int | None = None,
    *,
    separator: str = DEFAULT_SEPARATOR,
    bos: bool | None = None,
) -> torch.Tensor:
    """Join ``texts`` with ``separator``, tokenize once (no special tokens) and cut into non-overlapping
    ``[N, seq_len]`` windows, the first ``n_samples`` of them (all when None).

    With a BOS token (``bos``: see :func:`bos_token_id`), each window is ``[BOS]`` + the next ``seq_len - 1`` tokens;
    without, the next ``seq_len`` tokens. The remainder is dropped.

    Raises:
        ValueError: ``seq_len`` < 2, bad ``bos``, or fewer tokens than one window (or than ``n_samples`` windows).
    """
    _check_window_args(seq_len, n_samples)
    bos_id = bos_token_id(tokenizer, bos)
    body = seq_len - (bos_id is not None)
    ids = tokenizer(separator.join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // body
    if available == 0:
        extra = " after BOS" if bos_id is not None else ""
        raise ValueError(
            f"The text has {ids.numel()} tokens, fewer than one window of `seq_len`={seq_len} ({body} text tokens"
            f"{extra})."
        )
    if n_samples is not None and n_samples > available:
        raise _too_few(n_samples, seq_len, available)
    count = available if n_samples is None else n_samples
    return _with_bos(ids[: count * body].reshape(count, body).clone(), bos_id)


def _pieces(texts: Iterable[str], separator: str, chunk_chars: int) -> Iterator[str]:
    """Consecutive runs of ``texts`` joined with ``separator``, each of about ``chunk_chars`` characters; every piece
    after the first starts with ``separator``, so the pieces concatenate to ``separator.join(texts)``."""
    parts: list[str] = []
    size = 0
    lead = ""
    for text in texts:
        parts.append(text)
        size += len(text) + len(separator)
        if size >= chunk_chars:
            yield lead + separator.join(parts)
            parts, size, lead = [], 0, separator
    if parts:
        yield lead + separator.join(parts)


def iter_token_windows(
    texts: Iterable[str],
    tokenizer: Any,
    seq_len: int,
    *,
    separator: str = DEFAULT_SEPARATOR,
    bos: bool | None = None,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> Iterator[torch.Tensor]:
    """Windows ``[seq_len]`` (int64) packed lazily from a stream of documents, with the convention of
    :func:`tokenize_windows`.

    The documents are joined into chunks of about ``chunk_chars`` characters (a chunk after the first starts with
    ``separator``), tokenized 16 chunks per call, so only those chunks of text and their tokens are held at once. When
    every document fits in one chunk, the windows equal :func:`tokenize_windows` on the same documents; otherwise they
    can differ only where a token would have spanned a chunk boundary.

    Raises:
        ValueError: ``seq_len`` < 2, bad ``bos`` or ``chunk_chars``.
    """
    _check_window_args(seq_len, None)
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1:
        raise ValueError(f"`chunk_chars`={chunk_chars!r} must be an integer >= 1.")
    bos_id = bos_token_id(tokenizer, bos)
    body = seq_len - (bos_id is not None)
    prefix = torch.full((1,), bos_id, dtype=torch.long) if bos_id is not None else torch.empty(0, dtype=torch.long)
    leftover = torch.empty(0, dtype=torch.long)
    pieces = _pieces(texts, separator, chunk_chars)
    while batch := list(itertools.islice(pieces, _CHUNKS_PER_CALL)):
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        stream = torch.cat([leftover, *(torch.tensor(ids, dtype=torch.long) for ids in encoded)])
        del batch, encoded
        full = stream.numel() // body
        for w in range(full):
            yield torch.cat([prefix, stream[w * body : (w + 1) * body]])
        leftover = stream[full * body :].clone()


# --------------------------------------------------------------------------------------------------- the dataset
@dataclass
class TokenWindows(Dataset):
    """A ``torch`` dataset of fixed-length token windows: items are ``{"input_ids", "attention_mask", "labels"}``.

    Args:
        input_ids: ``[N, seq_len]`` token ids.
        bos: whether every window starts with the BOS token (None: not known, e.g. windows built elsewhere).
        documents: the documents the windows were cut from, when known.
        streaming: whether the documents were streamed (buffered shuffle, chunked tokenization) rather than read whole.
    """

    input_ids: torch.Tensor
    bos: bool | None = None
    documents: DocumentRange | None = None
    streaming: bool = False

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] == 0:
            raise ValueError(
                f"`input_ids` must be a non-empty [N, seq_len] tensor, got {tuple(self.input_ids.shape)}."
            )
        if self.bos is not None and not isinstance(self.bos, bool):
            raise ValueError(f"`bos`={self.bos!r} is invalid; allowed: None, True or False.")

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
    source: str | os.PathLike | DocumentRange,
    tokenizer: Any,
    *,
    seq_len: int,
    n_samples: int,
    seed: int = 0,
    split: str = "train",
    text_field: str = "text",
    name: str | None = None,
    start: int = 0,
    stop: int | None = None,
    bos: bool | None = None,
    streaming: bool | None = None,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> TokenWindows:
    """``n_samples`` calibration windows of ``seq_len`` tokens; the same arguments always give the same windows.

    The documents are resolved with :func:`resolve_document_range` (``purpose="calibration"``: short corpus names, the
    C4 sample's default [0, 1000), and an error for documents reserved for evaluation), unless ``source`` already is a
    :class:`DocumentRange` (then ``split``/``name``/``start``/``stop`` are not used).

    In memory (the default for uncompressed local files): all documents are read, shuffled with ``seed``, joined and
    tokenized at once (:func:`tokenize_windows`). Streaming (the default for compressed files and Hub datasets): the
    documents are read lazily, shuffled with ``seed`` through a buffer of ``shuffle_buffer`` documents, and packed by
    :func:`iter_token_windows` until ``n_samples`` windows exist — the rest of the source is never read.

    Args:
        source: a short corpus name, local file/folder, Hub dataset id, or a resolved :class:`DocumentRange`.
        tokenizer: the model's tokenizer.
        seq_len: tokens per window (BOS included).
        n_samples: number of windows.
        seed: shuffling seed.
        split, name: Hub split and configuration.
        text_field: record field holding the text.
        start, stop: document range (see :func:`resolve_document_range`).
        bos: start every window with BOS (None: when the tokenizer adds one; see :func:`bos_token_id`).
        streaming: force the streaming (True) or in-memory (False) path; None picks by source.
        shuffle_buffer: documents held by the streaming shuffle.
        chunk_chars: characters per tokenizer chunk when streaming (see :func:`iter_token_windows`).

    Raises:
        ValueError: bad options, documents reserved for evaluation, or too little text for ``n_samples`` windows.
    """
    _check_window_args(seq_len, n_samples)
    if n_samples is None:
        raise ValueError("`n_samples`=None is invalid; allowed: an integer >= 1.")
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
        raise ValueError(f"`shuffle_buffer`={shuffle_buffer!r} is invalid; allowed: an integer >= 1.")
    if streaming is not None and not isinstance(streaming, bool):
        raise ValueError(f"`streaming`={streaming!r} is invalid; allowed: None, True or False.")
    if isinstance(source, DocumentRange):
        documents = source
    else:
        documents = resolve_document_range(source, start, stop, purpose="calibration", split=split, name=name)
    bos_id = bos_token_id(tokenizer, bos)
    use_bos = bos_id is not None
    if streaming is None:
        local = documents.is_local
        streaming = not local or any(_is_compressed(f) for f in _local_files(documents.source))
    read = dict(split=documents.split or split, text_field=text_field, name=documents.name)
    if streaming:
        texts = iter_texts(documents.source, start=documents.start, stop=documents.stop, **read)
        shuffled = _buffered_shuffle(texts, shuffle_buffer, seed)
        packed = iter_token_windows(shuffled, tokenizer, seq_len, bos=use_bos, chunk_chars=chunk_chars)
        windows = list(itertools.islice(packed, n_samples))
        if len(windows) < n_samples:
            raise _too_few(n_samples, seq_len, len(windows))
        ids = torch.stack(windows)
    else:
        texts = load_texts(documents.source, start=documents.start, stop=documents.stop, **read)
        random.Random(seed).shuffle(texts)
        ids = tokenize_windows(texts, tokenizer, seq_len, n_samples, bos=use_bos)
    logger.info(
        "Calibration data: %d windows x %d tokens from %s%s%s",
        ids.shape[0],
        seq_len,
        documents.describe(),
        " (BOS first)" if use_bos else "",
        " (streamed)" if streaming else "",
    )
    return TokenWindows(ids, bos=use_bos, documents=documents, streaming=streaming)
