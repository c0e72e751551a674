"""proxsparse-hf: learned 2:4 semi-structured sparsity masks (ProxSparse) for Hugging Face causal LMs.

Importing this package needs only torch, transformers, huggingface_hub and safetensors; optional extras (triton, lm-eval,
torchao, gguf, matplotlib) are imported lazily by the functions that use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "ProxSparseConfig": "config",
    "Target": "targets",
    "find_targets": "targets",
    "prox_2to4": "prox",
    "prox_2to4_": "prox",
    "regularizer_2to4": "regularizers",
    "frozen_weight_grad": "regularizers",
    "mask_2to4": "masks",
    "is_2to4": "masks",
    "extract_2to4_masks": "masks",
    "apply_2to4_masks": "masks",
    "save_masks": "masks",
    "load_masks": "masks",
    "sparsity_report": "report",
    "SparsityReport": "report",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'proxsparse_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover
    from .config import ProxSparseConfig  # noqa: F401
    from .masks import apply_2to4_masks, extract_2to4_masks, is_2to4, load_masks, mask_2to4, save_masks  # noqa: F401
    from .prox import prox_2to4, prox_2to4_  # noqa: F401
    from .regularizers import frozen_weight_grad, regularizer_2to4  # noqa: F401
    from .report import SparsityReport, sparsity_report  # noqa: F401
    from .targets import Target, find_targets  # noqa: F401
