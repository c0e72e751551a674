"""The export pipeline shared by every artefact format: resolve → make publishable → validate → write atomically.

1. :func:`prepare_artefact` loads the source (an output folder is read without following any link), removes every
   local path (:func:`~proxsparse_hf.artefacts.publish.publishable`) and lets the format refuse what it cannot
   represent — all before anything is written.
2. :func:`write_artefact` writes the format's files plus the shared metadata into a folder and checks that the folder
   holds only regular files the format defines.
3. :func:`save_artefact` does both into a temporary sibling of the destination and swaps it into place: an existing
   destination is replaced as a whole (``overwrite=True``), and a failure leaves it as it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import ProxSparseConfig
from ..utils import regular_files, staging_dir
from .base import METADATA_FILES, PrunedModel, resolve_source
from .publish import publishable
from .registry import ArtefactFormat, get_artefact

__all__ = ["check_artefact_folder", "prepare_artefact", "save_artefact", "write_artefact"]

logger = logging.getLogger(__name__)


def prepare_artefact(
    artefact: str,
    source: str | os.PathLike | nn.Module | PrunedModel,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
) -> tuple[ArtefactFormat, PrunedModel]:
    """The format and the validated, path-free source it will be written from.

    Args:
        artefact: a registered format name (``dense``, ``compact``, ``mask``, ...).
        source: output folder, pruned model or :class:`PrunedModel`.
        dtype: cast the weights (formats that store weights); None keeps them.
        tokenizer: tokenizer of an in-memory model.
        config: recipe of an in-memory model.
        base_model: base model to record (Hub id, or a local path recorded as base name + SHA-256); default: the
            recorded one.
        base_revision: revision of ``base_model``.

    Raises:
        ValueError: unknown format, a link inside the output folder, a bad ``base_model``, or what the format refuses
            (e.g. a target weight that is not 2:4).
    """
    fmt = get_artefact(artefact)
    src = resolve_source(source, tokenizer=tokenizer, config=config, dtype=dtype if fmt.casts_dtype else None)
    prepared = publishable(src, base_model=base_model, base_revision=base_revision)
    fmt.validate(prepared)
    return fmt, prepared


def check_artefact_folder(fmt: ArtefactFormat, directory: str, extra_files: Iterable[str] = ()) -> list[str]:
    """The files of an artefact folder, after checking that each is a regular file (no link) that ``fmt`` defines,
    a shared metadata file, or one of ``extra_files``.

    Raises:
        ValueError: names a link, a special file or a file the format does not define.
    """
    allowed = set(METADATA_FILES) | set(extra_files)
    files = regular_files(directory)
    unexpected = [name for name in files if name not in allowed and not fmt.owns(name)]
    if unexpected:
        raise ValueError(
            f"The {fmt.name} artefact in {directory!r} holds file(s) its format does not define: {unexpected}; "
            f"allowed: {sorted(allowed)} and {list(fmt.files)}."
        )
    return files


def write_artefact(fmt: ArtefactFormat, source: PrunedModel, directory: str) -> list[str]:
    """Write ``fmt``'s files and the metadata of a prepared ``source`` into the empty folder ``directory``; returns
    the files written (checked by :func:`check_artefact_folder`)."""
    fmt.save(source, directory)
    source.save_metadata(directory)
    return check_artefact_folder(fmt, directory)


def save_artefact(
    artefact: str,
    source: str | os.PathLike | nn.Module | PrunedModel,
    save_directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
) -> str:
    """Write the artefact ``artefact`` of a pruned model into ``save_directory``; returns its absolute path.

    Args:
        artefact: a registered format name (``dense``, ``compact``, ``mask``, ...).
        source: output folder, pruned model or :class:`PrunedModel`.
        save_directory: destination; must be empty or missing unless ``overwrite``, which replaces it as a whole.
        dtype, tokenizer, config, base_model, base_revision: as :func:`prepare_artefact`.
        overwrite: replace a non-empty destination (atomically: the old folder goes only once the new one is done).

    Raises:
        ValueError: see :func:`prepare_artefact`; ``save_directory`` is a file.
        FileExistsError: ``save_directory`` is not empty and ``overwrite`` is False.
    """
    path = os.path.abspath(os.fspath(save_directory))
    if os.path.isfile(path):
        raise ValueError(f"`save_directory`={path!r} is a file; a directory is expected.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"`save_directory`={path!r} exists and is not empty; pass overwrite=True to replace it.")
    fmt, prepared = prepare_artefact(
        artefact,
        source,
        dtype=dtype,
        tokenizer=tokenizer,
        config=config,
        base_model=base_model,
        base_revision=base_revision,
    )
    with staging_dir(path, overwrite=overwrite) as staging:
        write_artefact(fmt, prepared, staging)
    logger.info("Saved the %s to %s", fmt.label, path)
    return path
