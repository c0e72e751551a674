"""Pruned models and the ways to share them.

* :class:`PrunedModel` — the one model of an output folder (``learn`` / ``prune`` write it, export/card/push read it).
* The artefact registry (:mod:`.registry`): ``dense``, ``compact`` and ``mask`` are :class:`ArtefactFormat` subclasses
  registered by name; :func:`save_artefact` writes any of them, :func:`load_pruned` loads any of them.

A new format is one module with a ``@register_artefact`` class, imported below.
"""

from __future__ import annotations

from .base import PrunedModel, load_output_dir, resolve_source, save_pretrained_model, save_pruned_output
from .export import prepare_artefact, save_artefact, write_artefact
from .registry import (
    ArtefactFormat,
    artefact_names,
    detect_artefact,
    get_artefact,
    register_artefact,
    unregister_artefact,
)
from .run_info import RunInfo

# isort: off
# the built-in formats, each registered on import (in this order: dense, compact, mask)
from .dense import DenseFormat, save_dense
from .compact import CompactFormat, save_compact
from .mask_adapter import MASK_MANIFEST_NAME, MaskAdapterFormat, apply_proxsparse, save_mask_adapter
from .loading import load_pruned

# isort: on

__all__ = [
    "MASK_MANIFEST_NAME",
    "ArtefactFormat",
    "CompactFormat",
    "DenseFormat",
    "MaskAdapterFormat",
    "PrunedModel",
    "RunInfo",
    "apply_proxsparse",
    "artefact_names",
    "detect_artefact",
    "get_artefact",
    "load_output_dir",
    "load_pruned",
    "prepare_artefact",
    "register_artefact",
    "resolve_source",
    "save_artefact",
    "save_compact",
    "save_dense",
    "save_mask_adapter",
    "save_pretrained_model",
    "save_pruned_output",
    "unregister_artefact",
    "write_artefact",
]
