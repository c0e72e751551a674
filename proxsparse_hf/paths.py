"""How local paths are recorded in anything the library writes: never as they are.

Output folders, artefacts, results files and cards name a local file or folder by its *portable name*: its path inside
the shared data folder (``c4-validation-2k/c4_validation_2k.jsonl``) when it lives there, else its base name. A Hub id
stays as it is. A local base model is identified by its SHA-256 (:func:`fingerprint_local_model`), so a mask learned on
it can be checked on another machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Mapping
from typing import Any

from .utils import sha256_file

__all__ = [
    "fingerprint_local_model",
    "is_hub_id",
    "is_local_path",
    "local_name",
    "portable_name",
    "scrub_local_paths",
]

_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_MODEL_FILES = ("config.json",)
_SHARED_DATA_MARKER = "/shared/assets/data/"
# absolute or ~ paths inside a text: at its start or after a space, quote, `=` or opening bracket / separator (a `/`
# inside a word, "a/b" or "m_seed*/m_abs*", and the `//` of a URL are not paths)
_PATH_IN_TEXT = re.compile(r"(?<![^\s'\"=(\[{,;])[~/][^\s'\"=,;:()\[\]{}]*")


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
    if os.path.isabs(value) or value.startswith(("~", "./", "../", "\\\\")) or value in (".", ".."):
        return True
    if _WINDOWS_ABS.match(value):
        return True
    return (os.sep in value or value.endswith(_WEIGHT_SUFFIXES)) and os.path.exists(value)


def local_name(path: str) -> str:
    """The portable name of a local path: its path inside the shared data folder, else its base name."""
    from .data.corpora import find_assets_dir

    full = os.path.normpath(os.path.abspath(os.path.expanduser(path)))
    assets = find_assets_dir()
    if assets is not None:
        inside = os.path.relpath(full, assets)
        if inside == os.curdir:  # the data folder itself: its own name, not "."
            return os.path.basename(os.path.normpath(assets))
        if not inside.startswith(os.pardir):
            return inside.replace(os.sep, "/")
    # A path recorded on another machine inside its shared data folder keeps the same name here.
    marker = full.replace(os.sep, "/").rpartition(_SHARED_DATA_MARKER)
    if marker[1] and marker[2]:
        return marker[2]
    return os.path.basename(full.rstrip("/\\")) or path


def portable_name(name_or_path: str) -> str:
    """How a model or dataset is recorded: a Hub id as is; a local file or folder (absolute, or relative and existing)
    by :func:`local_name`."""
    if not isinstance(name_or_path, str) or not name_or_path:
        return name_or_path
    if is_local_path(name_or_path) or os.path.exists(name_or_path):
        return local_name(name_or_path)
    return name_or_path


def _scrub_text(text: str) -> str:
    """A command line or message with every local path reduced to its portable name."""
    try:
        tokens = shlex.split(text)
    except ValueError:  # unbalanced quotes: not a command line
        tokens = []
    scrubbed = []
    for token in tokens:
        key, sep, value = token.partition("=")
        if is_local_path(token):
            token = local_name(token)
        elif sep and is_local_path(value):
            token = f"{key}={local_name(value)}"
        scrubbed.append(token)
    if scrubbed != tokens:
        text = shlex.join(scrubbed)
    return _PATH_IN_TEXT.sub(lambda match: local_name(match.group(0)), text)


def scrub_local_paths(value: Any) -> Any:
    """A copy of JSON-like ``value`` in which every local path — a string, a dict key, or inside a text such as a
    recorded command line — is its portable name."""
    if isinstance(value, str):
        return local_name(value) if is_local_path(value) else _scrub_text(value)
    if isinstance(value, Mapping):
        return {scrub_local_paths(k): scrub_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_local_paths(v) for v in value]
    return value


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
