"""What mask learning adds to a training checkpoint, so ``resume_from_checkpoint`` continues the same run: the original
target weights (the mask is applied to them at the end) and, for importance measures with input statistics, the
input-feature norms (the prox scale must not change on resume). Everything else (per-layer λ and step scales) is derived
from these two on resume."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file

from ..utils import save_safetensors_atomic

__all__ = ["INPUT_NORMS_NAME", "SNAPSHOT_NAME", "load_input_norms", "load_snapshot", "save_learning_state"]

SNAPSHOT_NAME = "proxsparse_original_weights.safetensors"
INPUT_NORMS_NAME = "proxsparse_input_norms.safetensors"


def save_learning_state(
    directory: str | os.PathLike,
    original: Mapping[str, torch.Tensor],
    input_norms: Mapping[str, torch.Tensor] | None = None,
) -> str:
    """Write the original (full) target weights and, when given, the input norms into ``directory``, each file
    atomically; returns the snapshot's path."""
    directory = os.fspath(directory)
    if input_norms:
        norms = {k: v.detach().to("cpu").contiguous() for k, v in input_norms.items()}
        save_safetensors_atomic(norms, os.path.join(directory, INPUT_NORMS_NAME))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in original.items()}
    return save_safetensors_atomic(tensors, os.path.join(directory, SNAPSHOT_NAME))


def load_snapshot(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The original target weights saved by :func:`save_learning_state`.

    Raises:
        FileNotFoundError: the folder has no snapshot (the checkpoint was not written by ``ProxSparseCallback``).
    """
    path = os.path.join(os.fspath(directory), SNAPSHOT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No ProxSparse original-weight snapshot ({SNAPSHOT_NAME}) in {os.fspath(directory)!r}; the checkpoint was "
            f"not written with ProxSparseCallback, so the original weights cannot be recovered."
        )
    return load_file(path)


def load_input_norms(directory: str | os.PathLike) -> dict[str, torch.Tensor] | None:
    """The input-feature norms saved beside a snapshot, or None when there are none."""
    path = os.path.join(os.fspath(directory), INPUT_NORMS_NAME)
    return load_file(path) if os.path.isfile(path) else None
