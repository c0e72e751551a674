"""What a published artefact may say about the machine it was made on: nothing.

:func:`publishable` turns a :class:`~proxsparse_hf.artefacts.base.PrunedModel` into the copy that export and push
write: the base model is recorded as its Hub id (+ revision) when known, else as the base name of the local file or
folder plus its SHA-256; every other local path in the recipe, ``run_info`` and ``eval_results`` (data files, output
folders, paths inside recorded command lines) is reduced to its base name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..paths import fingerprint_local_model, is_hub_id, is_local_path, local_name, scrub_local_paths
from .base import PrunedModel

__all__ = ["fingerprint_local_model", "is_hub_id", "is_local_path", "publishable", "scrub_paths"]

scrub_paths = scrub_local_paths  # the name this module has always exported

logger = logging.getLogger(__name__)

_MODEL_KEYS = ("model", "base_model", "base_model_name_or_path")


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
                renamed = {recorded, local_name(recorded)}
            revision, sha256 = base_revision, None
        elif base_revision is not None:
            revision = base_revision
        recorded = base_model
    elif base_revision is not None:
        revision = base_revision
    if is_local_path(recorded):
        sha256 = fingerprint_local_model(recorded) or sha256
        recorded, revision = local_name(recorded), None
        logger.info("The base model is a local path: recorded as %r (sha256 %s)", recorded, sha256)
    config = replace(source.config, base_model_name_or_path=recorded, revision=revision)
    info = source.run_info.to_dict()
    info.pop("base_model_sha256")
    info = _rename_model(scrub_local_paths(info), renamed, recorded)
    info.update(base_model=recorded, revision=revision, base_model_sha256=sha256)
    eval_results = None
    if source.eval_results is not None:
        eval_results = _rename_model(scrub_local_paths(source.eval_results), renamed, recorded)
    return replace(
        source,
        config=config,
        run_info=type(source.run_info).from_dict(info),
        eval_results=eval_results,
        path=None,
        permutation=source.load_permutation(),  # the folder's file, now held in memory
    )
