"""Reading text: local files (optionally compressed) and Hub datasets, all through ``datasets`` in streaming mode,
and a bounded-buffer shuffle (see :mod:`proxsparse_hf.data`)."""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .corpora import _check_range, _fmt_range

logger = logging.getLogger(__name__)

_TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
_JSON_SUFFIXES = (".jsonl", ".json")
_COMPRESSION_SUFFIXES = (".xz", ".gz", ".bz2", ".zst")
T = TypeVar("T")


def _file_kind(path: str) -> str | None:
    """``"json"``, ``"text"`` or None (unsupported) from the file name, looking through a compression suffix."""
    lower = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
            break
    if lower.endswith(_JSON_SUFFIXES):
        return "json"
    if lower.endswith(_TEXT_SUFFIXES):
        return "text"
    return None


def _is_compressed(path: str) -> bool:
    return path.lower().endswith(_COMPRESSION_SUFFIXES)


def _local_files(source: str) -> list[str]:
    if os.path.isdir(source):
        files = sorted(os.path.join(source, f) for f in os.listdir(source) if _file_kind(f) is not None)
        if not files:
            raise ValueError(
                f"Directory {source!r} holds no {_TEXT_SUFFIXES + _JSON_SUFFIXES} files (optionally "
                f"{'/'.join(_COMPRESSION_SUFFIXES)}-compressed)."
            )
        return files
    if _file_kind(source) is None:
        raise ValueError(
            f"Unsupported file {source!r}: expected one of {_TEXT_SUFFIXES + _JSON_SUFFIXES} (optionally "
            f"{'/'.join(_COMPRESSION_SUFFIXES)}-compressed) or a Hub dataset id."
        )
    return [source]


def _records(dataset: Iterable[dict], where: str, what: str) -> Iterator[dict]:
    """Iterate ``dataset``, turning a reader failure into one ``ValueError`` line naming ``where``."""
    iterator = iter(dataset)
    while True:
        try:
            record = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"{where}: cannot be read as {what}: {first_line}") from exc
        yield record


def _texts_of(records: Iterable[dict], field: str, where: str) -> Iterator[str]:
    for i, record in enumerate(records):
        value = record.get(field)
        if value is None:
            raise ValueError(f"{where}: record {i} has no `text_field`={field!r} (keys: {list(record)}).")
        yield str(value)


def _iter_file(path: str, text_field: str) -> Iterator[str]:
    import datasets

    if _file_kind(path) == "text":  # the whole file is one document
        builder, what, field, options = "text", "text", "text", {"sample_by": "document"}
    else:
        builder, what, field, options = "json", "JSON records", text_field, {}
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train", streaming=True, **options)
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read as {what}: {exc}") from exc
    yield from _texts_of(_records(ds, path, what), field, path)


def _iter_hub(source: str, split: str, text_field: str, name: str | None) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise RuntimeError("Loading a Hub dataset needs `pip install datasets`.") from exc
    try:
        ds = datasets.load_dataset(source, name, split=split, streaming=True)
    except Exception as exc:
        raise ValueError(
            f"{source!r} is not a local file/directory and `datasets.load_dataset` failed: {exc}"
        ) from exc
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"Dataset {source!r} has no `text_field`={text_field!r}; columns: {columns}.")
    yield from _texts_of(_records(ds, source, "a dataset"), text_field, source)


def iter_texts(
    source: str | os.PathLike,
    *,
    split: str = "train",
    text_field: str = "text",
    name: str | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[str]:
    """Documents ``[start, stop)`` of a local file/directory or a Hub dataset, read lazily (``datasets`` streaming).

    Raises:
        ValueError: bad range, unsupported file type, unreadable file, or a record without ``text_field``.
    """
    _check_range(start, stop)
    source = os.fspath(source)
    if os.path.exists(source):
        files = _local_files(source)  # fail on a bad source now, not at the first next()
        documents: Iterator[str] = itertools.chain.from_iterable(_iter_file(f, text_field) for f in files)
    else:
        documents = _iter_hub(source, split, text_field, name)
        next_doc = next(documents, None)  # make load_dataset run (and fail) here
        documents = itertools.chain([] if next_doc is None else [next_doc], documents)
    return itertools.islice(documents, start, stop)


def load_texts(
    source: str | os.PathLike,
    *,
    split: str = "train",
    text_field: str = "text",
    name: str | None = None,
    start: int = 0,
    stop: int | None = None,
) -> list[str]:
    """Documents ``[start, stop)`` of a local file/directory or a Hub dataset as a list (see :func:`iter_texts`).

    Raises:
        ValueError: bad range, unsupported file type, missing text field, or no documents.
    """
    texts = list(iter_texts(source, split=split, text_field=text_field, name=name, start=start, stop=stop))
    if not texts or not any(t.strip() for t in texts):
        raise ValueError(f"No text found in {os.fspath(source)!r} (documents {_fmt_range(start, stop)}).")
    return texts


def _buffered_shuffle(items: Iterable[T], buffer_size: int, seed: int) -> Iterator[T]:
    """``items`` in a random order drawn with ``seed`` through a buffer of ``buffer_size`` items (a full shuffle when
    the buffer holds them all)."""
    rng = random.Random(seed)
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


# ------------------------------------------------------------------------------------------------------- windows
