"""Corpora and document ranges: where the shared corpora live, which documents calibration reads by default,
which are reserved for evaluation, and the overlap rule between the two (see :mod:`proxsparse_hf.data`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger(__name__)

CALIBRATION_DOCS = (0, 1000)  # documents of the local C4 sample used for calibration
C4_EVAL_DOCS = (1000, 2000)  # documents of the local C4 sample used for C4 perplexity

Purpose = Literal["calibration", "evaluation"]
_PURPOSES = ("calibration", "evaluation")


# ------------------------------------------------------------------------------------------------ corpora and ranges
@dataclass(frozen=True)
class Corpus:
    """A corpus of the shared data folder and the documents each use may read.

    Args:
        name: short name (``"c4"``).
        path: the file, relative to the data folder.
        calibration_docs: documents calibration reads when no range is given (None: all of them).
        evaluation_docs: documents reserved for evaluation, never read for calibration (None: none reserved).
        hub_ids: Hub dataset ids of the same corpus; the first is used when the local file is missing.
        hub_config: configuration name on the Hub.
        hub_split: the Hub split the local file and ``evaluation_docs`` come from.
        hub_calibration_split: Hub split used for calibration when the local file is missing (None: no Hub fallback).
    """

    name: str
    path: str
    calibration_docs: tuple[int, int | None] | None = None
    evaluation_docs: tuple[int, int | None] | None = None
    hub_ids: tuple[str, ...] = ()
    hub_config: str | None = None
    hub_split: str | None = None
    hub_calibration_split: str | None = None


CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus(
        "wikitext2",
        os.path.join("wikitext-2-raw-v1", "test.jsonl"),
        evaluation_docs=(0, None),
        hub_ids=("wikitext", "Salesforce/wikitext"),
        hub_config="wikitext-2-raw-v1",
        hub_split="test",
    ),
    "c4": Corpus(
        "c4",
        os.path.join("c4-validation-2k", "c4_validation_2k.jsonl"),
        calibration_docs=CALIBRATION_DOCS,
        evaluation_docs=C4_EVAL_DOCS,
        hub_ids=("allenai/c4", "c4"),
        hub_config="en",
        hub_split="validation",
        hub_calibration_split="train",
    ),
    "enwiki": Corpus("enwiki", os.path.join("enwiki-2015-sample", "enwiki_sample.jsonl.xz")),
}


def find_assets_dir() -> str | None:
    """The shared data folder: ``$PROXSPARSE_DATA_DIR``, else ``../shared/assets/data`` relative to the working directory
    or to the repository this package lives in; None when none exists."""
    candidates = []
    if os.environ.get("PROXSPARSE_DATA_DIR"):
        candidates.append(os.environ["PROXSPARSE_DATA_DIR"])
    candidates.append(os.path.join(os.getcwd(), "..", "shared", "assets", "data"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates.append(os.path.join(repo, "..", "shared", "assets", "data"))
    for path in candidates:
        if os.path.isdir(path):
            return os.path.abspath(path)
    return None


def _corpus_key(source: str) -> str | None:
    key = source.lower().replace("-", "").replace("_", "")
    return key if key in CORPORA else None


def corpus_path(name: str) -> str | None:
    """Absolute path of the local copy of corpus ``name`` (a key of :data:`CORPORA`), or None when it is missing."""
    key = _corpus_key(name)
    if key is None:
        raise ValueError(f"`name`={name!r} is not a known corpus; allowed: {sorted(CORPORA)}.")
    assets = find_assets_dir()
    path = os.path.join(assets, CORPORA[key].path) if assets else None
    return path if path and os.path.isfile(path) else None


def identify_corpus(source: str | os.PathLike, split: str | None = None, name: str | None = None) -> Corpus | None:
    """The known corpus ``source`` is: a short name, a local copy (matched by file name, so copies elsewhere count), a
    folder holding one, or one of its Hub ids (``name`` and ``split`` must then match the local sample's);
    None otherwise."""
    source = os.fspath(source)
    key = _corpus_key(source)
    if key is not None:
        return CORPORA[key]
    for corpus in CORPORA.values():
        file_name = os.path.basename(corpus.path)
        if os.path.isfile(source) and os.path.basename(source) == file_name:
            return corpus
        if os.path.isdir(source) and os.path.isfile(os.path.join(source, file_name)):
            return corpus
        if (
            not os.path.exists(source)
            and source in corpus.hub_ids
            and name in (None, corpus.hub_config)
            and split == corpus.hub_split
        ):
            return corpus
    return None


def _fmt_range(start: int, stop: int | None) -> str:
    return f"[{start}, {'end' if stop is None else stop})"


def _intersect(a: tuple[int, int | None], b: tuple[int, int | None]) -> bool:
    hi = min((s for s in (a[1], b[1]) if s is not None), default=None)
    return hi is None or max(a[0], b[0]) < hi


@dataclass(frozen=True)
class DocumentRange:
    """Documents ``[start, stop)`` of one text source.

    Args:
        source: a local file or folder (absolute path), or a Hub dataset id.
        start: first document.
        stop: one past the last document (None: to the end).
        split: Hub split (None for local sources).
        name: Hub configuration name.
        corpus: the known corpus the source is (a key of :data:`CORPORA`), if any.
    """

    source: str
    start: int = 0
    stop: int | None = None
    split: str | None = None
    name: str | None = None
    corpus: str | None = None

    def __post_init__(self) -> None:
        _check_range(self.start, self.stop)

    @property
    def is_local(self) -> bool:
        return os.path.exists(self.source)

    def same_source(self, other: DocumentRange) -> bool:
        """Whether both ranges index the same documents (same corpus, same local file, or same Hub split)."""
        if (
            self.corpus is not None
            and self.corpus == other.corpus
            and all(r.is_local or r.split == CORPORA[r.corpus].hub_split for r in (self, other))
        ):
            return True  # a known corpus: every local copy is the same text as the Hub split it was drawn from
        if self.is_local and other.is_local:
            return os.path.realpath(self.source) == os.path.realpath(other.source)
        return (self.source, self.name, self.split) == (other.source, other.name, other.split)

    def overlaps(self, other: DocumentRange) -> bool:
        """Whether the two ranges share at least one document."""
        return self.same_source(other) and _intersect((self.start, self.stop), (other.start, other.stop))

    def describe(self) -> str:
        where = self.source if self.is_local else f"{self.source} ({self.name or 'default'}, split {self.split})"
        return f"documents {_fmt_range(self.start, self.stop)} of {where}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "split": self.split,
            "name": self.name,
            "documents": [self.start, self.stop],
            "corpus": self.corpus,
        }


def _check_range(start: Any, stop: Any) -> None:
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"`start`={start!r} is invalid; allowed: an integer >= 0.")
    if stop is not None and (isinstance(stop, bool) or not isinstance(stop, int) or stop <= start):
        raise ValueError(f"Document range [`start`={start}, `stop`={stop}) is empty or negative.")


def check_no_overlap(calibration: DocumentRange, evaluation: DocumentRange) -> None:
    """Raise a ``ValueError`` when calibration and evaluation read a common document.

    Raises:
        ValueError: the two ranges share documents of the same source.
    """
    if calibration.overlaps(evaluation):
        raise ValueError(
            f"Calibration {calibration.describe()} overlap the evaluation {evaluation.describe()}; "
            f"calibrate and evaluate on disjoint documents."
        )


def _reserved_for_evaluation(documents: DocumentRange) -> DocumentRange | None:
    corpus = CORPORA.get(documents.corpus) if documents.corpus else None
    if corpus is None or corpus.evaluation_docs is None:
        return None
    start, stop = corpus.evaluation_docs
    if not corpus.hub_ids:
        return DocumentRange(documents.source, start, stop, corpus=corpus.name)
    return DocumentRange(corpus.hub_ids[0], start, stop, corpus.hub_split, corpus.hub_config, corpus.name)


def resolve_document_range(
    source: str | os.PathLike,
    start: int = 0,
    stop: int | None = None,
    *,
    purpose: Purpose,
    split: str | None = "train",
    name: str | None = None,
) -> DocumentRange:
    """Where the documents of a calibration or evaluation run come from, with the defaults of known corpora applied.

    A short name (``"c4"``, ``"wikitext2"``, ``"enwiki"``) resolves to the local copy in the data folder, else to its
    Hub copy. For a known corpus without an explicit range, the purpose's default documents are used (C4 sample:
    [0, 1000) for calibration, [1000, 2000) for evaluation); with ``stop`` unset, calibration stops where its default
    range ends. A calibration range that touches documents reserved for evaluation is refused.

    Args:
        source: a short corpus name, a local file or folder, or a Hub dataset id.
        start: first document.
        stop: one past the last document (None: the corpus default, else to the end).
        purpose: ``"calibration"`` or ``"evaluation"``.
        split: split of a Hub dataset (ignored for local sources).
        name: configuration of a Hub dataset.

    Raises:
        ValueError: bad range or purpose, a short name with neither a local nor a Hub copy, or calibration documents
            that overlap the corpus's evaluation documents.
    """
    if purpose not in _PURPOSES:
        raise ValueError(f"`purpose`={purpose!r} is invalid; allowed: {list(_PURPOSES)}.")
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source):
        raise ValueError(f"`source`={source!r} is invalid; allowed: {sorted(CORPORA)}, a local path or a Hub id.")
    _check_range(start, stop)
    source = os.fspath(source)
    key = _corpus_key(source)
    if key is not None:
        corpus = CORPORA[key]
        local = corpus_path(key)
        hub_split = corpus.hub_split if purpose == "evaluation" else corpus.hub_calibration_split
        if local is not None:
            source, split, name = local, None, None
        elif corpus.hub_ids and hub_split is not None:
            source, split, name = corpus.hub_ids[0], hub_split, corpus.hub_config
            logger.info("No local copy of %r; using the Hub dataset %s (%s, split %s).", key, source, name, split)
        else:
            raise ValueError(
                f"Corpus {key!r} has no local copy (looked for {corpus.path!r} under the data folder "
                f"{find_assets_dir()!r}; set $PROXSPARSE_DATA_DIR) and no Hub copy for {purpose}."
            )
    else:
        corpus = identify_corpus(source, split, name)
    if os.path.exists(source):
        source, split, name = os.path.abspath(source), None, None
    is_sample = corpus is not None and (split is None or split == corpus.hub_split)
    if is_sample:
        defaults = corpus.calibration_docs if purpose == "calibration" else corpus.evaluation_docs
        if defaults is not None:
            if start == 0 and stop is None:
                start, stop = defaults
            elif stop is None and defaults[1] is not None and start < defaults[1]:
                stop = defaults[1]
    documents = DocumentRange(source, start, stop, split, name, corpus.name if corpus is not None else None)
    if purpose == "calibration":
        reserved = _reserved_for_evaluation(documents)
        if reserved is not None and documents.overlaps(reserved):
            allowed = corpus.calibration_docs
            hint = (
                f"calibrate on documents within {_fmt_range(*allowed)}"
                if allowed is not None
                else f"{corpus.name} is an evaluation set; calibrate on other text (e.g. 'c4' or 'enwiki')"
            )
            raise ValueError(
                f"Calibration {documents.describe()} overlap documents {_fmt_range(*corpus.evaluation_docs)} "
                f"reserved for {corpus.name} evaluation; {hint}."
            )
    return documents


# ------------------------------------------------------------------------------------------------------- reading
