"""Corpora and token windows: where text comes from, which documents each use may read, and how text becomes
fixed-length token windows for calibration (mask learning, Wanda, SparseGPT) and evaluation (perplexity).

**Sources.** A local file — ``.jsonl``/``.json`` (one record per line, or a JSON array, with a text field) or
``.txt``/``.raw``/``.tokens`` (the whole file is one document), each optionally compressed (``.xz``, ``.gz``, ``.bz2``,
``.zst``) — a local directory of such files (read in name order), or a Hub dataset id. Everything is read through
``datasets`` in streaming mode: a compressed corpus is decompressed while it is read, never held whole in memory.

**Corpora and document ranges.** The shared data folder (:func:`find_assets_dir`) holds the corpora of :data:`CORPORA`
(short names ``"c4"``, ``"wikitext2"``, ``"enwiki"``). Each says which documents calibration reads by default and which
are reserved for evaluation: the C4 sample calibrates on documents [0, 1000) and is evaluated on [1000, 2000); WikiText-2
test is evaluation only; the enwiki sample is calibration text only. :func:`resolve_document_range` applies those
defaults and refuses a calibration range that touches evaluation documents; :func:`check_no_overlap` compares any two
ranges.

**Windows.** Documents are joined with ``"\\n\\n"``, tokenized without special tokens, and the token stream is cut into
non-overlapping windows; the remainder is dropped. When the tokenizer adds a BOS token (:func:`wants_bos`; Llama,
Mistral, Gemma, ...), every window is ``[BOS]`` followed by the next ``seq_len - 1`` tokens of the stream — the way
those models saw text in pre-training; otherwise a window is the next ``seq_len`` tokens of the stream (the windows of
earlier versions, unchanged). ``bos=False`` turns BOS off, ``bos=True`` forces it.

Small sources are read whole, shuffled and tokenized at once (:func:`tokenize_windows`). Large or compressed sources
are streamed (:func:`iter_token_windows`): documents are read lazily, shuffled through a bounded buffer, tokenized a
chunk at a time and packed into windows until the requested number is reached, so a 20 M-token budget never sits in
memory as text.
"""

from __future__ import annotations

from .corpora import (
    C4_EVAL_DOCS,
    CALIBRATION_DOCS,
    CORPORA,
    Corpus,
    DocumentRange,
    check_no_overlap,
    corpus_path,
    find_assets_dir,
    identify_corpus,
    resolve_document_range,
)
from .reading import _buffered_shuffle, _file_kind, iter_texts, load_texts  # noqa: F401 (private names kept for callers)
from .windows import (
    DEFAULT_CHUNK_CHARS,
    DEFAULT_SEPARATOR,
    DEFAULT_SHUFFLE_BUFFER,
    TokenWindows,
    bos_token_id,
    iter_token_windows,
    load_calibration_data,
    tokenize_windows,
    wants_bos,
)

__all__ = [
    "DEFAULT_CHUNK_CHARS",
    "DEFAULT_SEPARATOR",
    "DEFAULT_SHUFFLE_BUFFER",
    "C4_EVAL_DOCS",
    "CALIBRATION_DOCS",
    "CORPORA",
    "Corpus",
    "DocumentRange",
    "TokenWindows",
    "bos_token_id",
    "check_no_overlap",
    "corpus_path",
    "find_assets_dir",
    "identify_corpus",
    "iter_texts",
    "iter_token_windows",
    "load_calibration_data",
    "load_texts",
    "resolve_document_range",
    "tokenize_windows",
    "wants_bos",
]
