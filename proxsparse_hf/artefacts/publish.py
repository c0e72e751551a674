"""What a published artefact may say about the machine it was made on: nothing.

:func:`publishable` turns a :class:`~proxsparse_hf.artefacts.base.PrunedModel` into the copy that export and push
write: the base model is recorded as its Hub id (+ revision) when known, else as the base name of the local file or
folder plus its SHA-256; every other local path in the recipe, ``run_info`` and ``eval_results`` (data files, output
folders, paths inside recorded command lines) is reduced to its base name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..utils import sha256_file
from .base import PrunedModel

__all__ = ["fingerprint_local_model", "is_hub_id", "is_local_path", "publishable", "scrub_paths"]

logger = logging.getLogger(__name__)

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_MODEL_FILES = ("config.json",)
_MODEL_KEYS = ("model", "base_model", "base_model_name_or_path")
_PATH_IN_TEXT = re.compile(r"(?<![\w.\-:/~])[~/][^\s'\"=,;:()\[\]{}]*")  # absolute or ~ paths inside a text


def is_hub_id(value: Any) -> bool:
    """Whether ``value`` is a Hub model id ``namespace/name`` (and not an existing local path)."""
    if not isinstance(value, str) or not _REPO_ID_RE.match(value) or os.path.exists(value):
        return False
    if value.endswith((".gguf", ".json", ".jsonl", ".txt")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def is_local_path(value: Any) -> bool:
    """Whether a string names a local file or folder: absolute, ``~``/``.``-relative, or existing here."""
    if not isinstance(value, str) or not value or "\n" in value:
        return False
    if os.path.isabs(value) or value.startswith(("~", "./", "../")) or value in (".", ".."):
        return True
    return (os.sep in value or value.endswith(_WEIGHT_SUFFIXES)) and os.path.exists(value)


def _basename(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.expanduser(path))) or "."


def _scrub_text(text: str) -> str:
    """A command line or message with every local path reduced to its base name."""
    try:
        tokens = shlex.split(text)
    except ValueError:  # unbalanced quotes: not a command line
        tokens = []
    scrubbed = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if is_local_path(token):
            token = _basename(token)
        elif sep and is_local_path(value):
            token = f"{key}={_basename(value)}"
        scrubbed.append(token)
    if scrubbed != tokens:
        text = shlex.join(scrubbed)
    return _PATH_IN_TEXT.sub(lambda match: _basename(match.group(0)), text)


def scrub_paths(data: Any) -> Any:
    """A copy of JSON-like ``data`` in which every local path (a value, or inside a text) is its base name."""
    if isinstance(data, Mapping):
        return {key: scrub_paths(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [scrub_paths(value) for value in data]
    if isinstance(data, str):
        return _basename(data) if is_local_path(data) else _scrub_text(data)
    return data


def _rename_model(data: Any, old: set[str], new: str) -> Any:
    """A copy of JSON-like ``data`` in which every model reference (a ``model`` / ``base_model`` /
    ``base_model_name_or_path`` entry) naming one of ``old`` names ``new``."""
    if isinstance(data, Mapping):
        return {
            key: new if key in _MODEL_KEYS and value in old else _rename_model(value, old, new)
            for key, value in data.items()
        }
    if isinstance(data, list):
        return [_rename_model(value, old, new) for value in data]
    return data


def fingerprint_local_model(path: str) -> str | None:
    """SHA-256 identifying a local model: of the file itself (``.gguf``), or for a folder, of the sorted
    ``name sha256`` lines of its ``config.json`` and weight files; None when the path does not exist."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return sha256_file(path)
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and (name in _MODEL_FILES or name.endswith(_WEIGHT_SUFFIXES)):
            digest.update(f"{name} {sha256_file(full)}\n".encode())
    return digest.hexdigest()


def publishable(
    source: PrunedModel, *, base_model: str | None = None, base_revision: str | None = None
) -> PrunedModel:
    """The copy of ``source`` that may be written into an artefact or uploaded: no local path anywhere.

    Args:
        source: the pruned model (its model and tokenizer are shared, not copied).
        base_model: the base model to record instead of the recorded one: a Hub id (``"org/name"``, recorded with
            ``base_revision``) or a local path (recorded as its base name + SHA-256).
        base_revision: revision of ``base_model``; default: the recorded revision when ``base_model`` is the recorded
            model, else none.

    Raises:
        ValueError: ``base_model`` is neither a Hub id nor an existing local path.
    """
    recorded = source.config.base_model_name_or_path or source.run_info.base_model
    revision = source.config.revision or source.run_info.revision
    sha256 = source.run_info.base_model_sha256
    renamed: set[str] = set()
    if base_model is not None:
        if not isinstance(base_model, str) or not (is_hub_id(base_model) or os.path.exists(base_model)):
            raise ValueError(
                f"`base_model`={base_model!r} is invalid; allowed: a Hub model id such as 'org/name' or an existing "
                "local path."
            )
        if base_model != recorded:
            if isinstance(recorded, str):
                renamed = {recorded, _basename(recorded)}
            revision, sha256 = base_revision, None
        elif base_revision is not None:
            revision = base_revision
        recorded = base_model
    elif base_revision is not None:
        revision = base_revision
    if is_local_path(recorded):
        sha256 = fingerprint_local_model(recorded) or sha256
        recorded, revision = _basename(recorded), None
        logger.info("The base model is a local path: recorded as %r (sha256 %s)", recorded, sha256)
    config = replace(source.config, base_model_name_or_path=recorded, revision=revision)
    info = source.run_info.to_dict()
    info.pop("base_model_sha256")
    info = _rename_model(scrub_paths(info), renamed, recorded)
    info.update(base_model=recorded, revision=revision, base_model_sha256=sha256)
    eval_results = None
    if source.eval_results is not None:
        eval_results = _rename_model(scrub_paths(source.eval_results), renamed, recorded)
    return replace(
        source,
        config=config,
        run_info=type(source.run_info).from_dict(info),
        eval_results=eval_results,
        path=None,
    )
