"""The dense artefact: ``save_pretrained`` output of the pruned model (zeros in place) + tokenizer.

Loads in plain ``transformers`` (``AutoModelForCausalLM.from_pretrained``), with no dependency on proxsparse-hf.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..config import ProxSparseConfig
from ..loading import resolve_dtype
from .base import TOKENIZER_FILES, PrunedModel, save_pretrained_model
from .export import save_artefact
from .registry import ArtefactFormat, register_artefact

__all__ = ["DenseFormat", "save_dense"]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


@register_artefact
class DenseFormat(ArtefactFormat):
    """A standard ``transformers`` checkpoint whose pruned weights are stored as zeros."""

    name = "dense"
    label = "dense pruned checkpoint"
    files = (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-*-of-*.safetensors",
        *TOKENIZER_FILES,
    )
    library_name = "transformers"
    base_model_relation = "quantized"
    card_tag = "dense"

    def detect(self, path: str) -> bool:
        has_config = os.path.isfile(os.path.join(path, "config.json"))
        return has_config and any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES)

    def save(self, source: PrunedModel, directory: str) -> None:
        save_pretrained_model(source.model, directory)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(directory)

    def load(self, path, *, dtype=None, base_model=None, token=None) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)).eval()

    def card_description(self, revision: str | None) -> str:
        return (
            "This repository holds the **dense pruned checkpoint**: a standard `transformers` checkpoint whose pruned "
            "weights are stored as zeros (same size as the dense model)."
        )

    def how_to_load(self, repo: str, base_model: str | None, revision: str | None) -> str:
        return (
            "A standard `transformers` checkpoint (pruned weights stored as zeros):\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n```'
        )


def save_dense(
    source: str | os.PathLike | nn.Module | PrunedModel,
    save_directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    overwrite: bool = False,
) -> str:
    """Write the dense pruned checkpoint (zeros in place) + tokenizer + metadata; returns the destination.

    Args:
        source: output folder, pruned model or :class:`~proxsparse_hf.artefacts.base.PrunedModel`.
        save_directory: destination (must be empty unless ``overwrite``, which replaces it atomically).
        dtype: cast floating-point weights (e.g. ``"bfloat16"``); None keeps them.
        tokenizer: tokenizer of an in-memory model.
        config: recipe of an in-memory model.
        overwrite: replace a non-empty destination.

    Raises:
        ValueError: a target weight is not 2:4.
    """
    return save_artefact(
        "dense", source, save_directory, dtype=dtype, tokenizer=tokenizer, config=config, overwrite=overwrite
    )
