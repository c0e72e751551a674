"""``load_pruned``: the one loader of every registered artefact format, from a local folder or a Hub repo."""

from __future__ import annotations

import os

import torch
from torch import nn

from .registry import detect_artefact, get_artefact

__all__ = ["load_pruned", "resolve_artefact_dir"]


def resolve_artefact_dir(
    repo_or_dir: str | os.PathLike, *, revision: str | None, token: str | bool | None, cache_dir: str | None
) -> str:
    """A local folder as is, else a snapshot of the Hub repo ``repo_or_dir``.

    Raises:
        ValueError: a file, an invalid repo id, or a failed download.
    """
    path = os.fspath(repo_or_dir)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; expected a directory or a Hub repo id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError as exc:
        raise ValueError(f"{path!r} is neither an existing directory nor a valid Hub repo id: {exc}") from exc
    try:
        return snapshot_download(repo_id=path, revision=revision, token=token, cache_dir=cache_dir)
    except Exception as exc:
        raise ValueError(
            f"{path!r} is not a local directory and downloading it from the Hub (revision={revision!r}) failed: {exc}"
        ) from exc


def load_pruned(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    base_model: str | nn.Module | None = None,
) -> nn.Module:
    """Load any registered artefact (dense, compact, mask adapter, ...) as a ready-to-use pruned model.

    Args:
        repo_or_dir: a local artefact folder (tried first) or a Hub repo id.
        revision: Hub branch, tag or commit of the artefact repo.
        token: Hub token.
        cache_dir: Hub cache directory.
        dtype: weights dtype; default: as stored (compact/dense) or ``"auto"`` (base model of a mask adapter).
        device: move the model there.
        base_model: for a mask adapter, the base model (id, path or model) instead of the one the adapter names.

    Returns:
        The pruned ``PreTrainedModel`` in eval mode; dense/compact weights are exactly the ones that were saved.
    """
    path = resolve_artefact_dir(repo_or_dir, revision=revision, token=token, cache_dir=cache_dir)
    model = get_artefact(detect_artefact(path)).load(path, dtype=dtype, base_model=base_model, token=token)
    if device is not None:
        model.to(device)
    return model
