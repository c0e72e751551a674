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
    "Prox2to4Batch": "learning.prox",
    "prox_2to4": "learning.prox",
    "prox_2to4_": "learning.prox",
    "regularizer_2to4": "learning.regularizers",
    "frozen_weight_grad": "learning.regularizers",
    "frozen_weight_regularizer": "learning.regularizers",
    "relative_adam": "learning.step_scaling",
    "mask_2to4": "masks",
    "is_2to4": "masks",
    "extract_2to4_masks": "masks",
    "apply_2to4_masks": "masks",
    "save_masks": "masks",
    "load_masks": "masks",
    "sparsity_report": "report",
    "SparsityReport": "report",
    "MaskLearner": "learning.learner",
    "ImportanceMeasure": "learning.importance",
    "register_importance": "learning.importance",
    "get_importance": "learning.importance",
    "importance_names": "learning.importance",
    "rescale_function_preserving": "learning.rescale",
    "get_sparse_peft_model": "sparse_lora",
    "load_sparse_peft_model": "sparse_lora",
    "merge_sparse": "sparse_lora",
    "sparse_lora_masks": "sparse_lora",
    "SparseLoraConfig": "sparse_lora",
    "SparseLoraLinear": "sparse_lora",
    "prune": "pruners",
    "permute_channels": "permutation",
    "EvalResults": "evaluation",
    "evaluate_model": "evaluation",
    "perplexity": "evaluation",
    "zeroshot_eval": "evaluation",
    "learn_mask": "learning.trainer",
    "load_calibration_data": "data",
    "save_pruned_output": "artefacts",
    "load_output_dir": "artefacts",
    "save_dense": "artefacts",
    "save_compact": "artefacts",
    "save_mask_adapter": "artefacts",
    "load_pruned": "artefacts",
    "apply_proxsparse": "artefacts",
    "push_pruned_to_hub": "hub.push",
    "build_model_card": "hub.card",
    "to_sparse_kernels": "inference",
    "to_dense_kernels": "inference",
    "SparseLinear2to4": "inference",
    "sparse_weight_memory": "inference",
    "SparseWeightMemory": "inference",
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
    from .artefacts import (  # noqa: F401
        apply_proxsparse,
        load_output_dir,
        load_pruned,
        save_compact,
        save_dense,
        save_mask_adapter,
        save_pruned_output,
    )
    from .config import ProxSparseConfig  # noqa: F401
    from .data import load_calibration_data  # noqa: F401
    from .evaluation import EvalResults, evaluate_model, perplexity, zeroshot_eval  # noqa: F401
    from .hub.card import build_model_card  # noqa: F401
    from .hub.push import push_pruned_to_hub  # noqa: F401
    from .inference import (  # noqa: F401
        SparseLinear2to4,
        SparseWeightMemory,
        sparse_weight_memory,
        to_dense_kernels,
        to_sparse_kernels,
    )
    from .learning.importance import (  # noqa: F401
        ImportanceMeasure,
        get_importance,
        importance_names,
        register_importance,
    )
    from .learning.learner import MaskLearner  # noqa: F401
    from .learning.prox import Prox2to4Batch, prox_2to4, prox_2to4_  # noqa: F401
    from .learning.regularizers import frozen_weight_grad, frozen_weight_regularizer, regularizer_2to4  # noqa: F401
    from .learning.rescale import rescale_function_preserving  # noqa: F401
    from .learning.step_scaling import relative_adam  # noqa: F401
    from .learning.trainer import learn_mask  # noqa: F401
    from .masks import apply_2to4_masks, extract_2to4_masks, is_2to4, load_masks, mask_2to4, save_masks  # noqa: F401
    from .permutation import permute_channels  # noqa: F401
    from .pruners import prune  # noqa: F401
    from .report import SparsityReport, sparsity_report  # noqa: F401
    from .sparse_lora import (  # noqa: F401
        SparseLoraConfig,
        SparseLoraLinear,
        get_sparse_peft_model,
        load_sparse_peft_model,
        merge_sparse,
        sparse_lora_masks,
    )
    from .targets import Target, find_targets  # noqa: F401
