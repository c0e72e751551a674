"""A folded channel permutation as data: which parameters were re-indexed, along which dimension, in which order.

:func:`~proxsparse_hf.permutation.permute_channels` records its work in ``PermutationReport.index_maps``:
``{parameter name: (dim, index)}`` with ``new = old.index_select(dim, index)`` — dim 1 of every permuted
``o_proj`` / ``down_proj`` weight, dim 0 of the ``v_proj`` / ``gate_proj`` / ``up_proj`` weights (and biases) that
produce their inputs. That is all a base model needs to become the permuted model the mask was found on, so an output
folder keeps it (:data:`~proxsparse_hf.constants.PERMUTATION_NAME`) and a mask-only adapter carries it:
:func:`apply_index_maps` re-indexes the base model before the masks are applied. The file holds one int64 index per
parameter and its dimension in the metadata; it names no architecture, so it reads the same for any model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..utils import save_safetensors_atomic

__all__ = ["IndexMaps", "apply_index_maps", "check_index_maps", "load_index_maps", "save_index_maps"]

# {parameter name: (dim, index)}: the parameter's new value is old.index_select(dim, index)
IndexMaps = Mapping[str, tuple[int, torch.Tensor]]
_FORMAT = "proxsparse-permutation"
_DIMS_KEY = "dims"


def save_index_maps(maps: IndexMaps, path: str | os.PathLike) -> str:
    """Write ``maps`` as safetensors (one int64 index per parameter; the dims in the metadata); returns the path."""
    # one copy per parameter: the producers of a consumer share one index, safetensors stores no shared memory
    tensors = {name: torch.as_tensor(index).to("cpu", torch.int64).clone() for name, (_, index) in maps.items()}
    dims = {name: int(dim) for name, (dim, _) in maps.items()}
    return save_safetensors_atomic(tensors, path, {"format": _FORMAT, _DIMS_KEY: json.dumps(dims, sort_keys=True)})


def load_index_maps(path: str | os.PathLike) -> dict[str, tuple[int, torch.Tensor]]:
    """Read a file written by :func:`save_index_maps`.

    Raises:
        ValueError: not such a file (format, or an index without its dimension).
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        if metadata.get("format") != _FORMAT or _DIMS_KEY not in metadata:
            raise ValueError(f"{os.fspath(path)!r} is not a channel-permutation file (format {_FORMAT!r}).")
        dims = json.loads(metadata[_DIMS_KEY])
        names = list(fh.keys())
        if sorted(names) != sorted(dims):
            raise ValueError(f"{os.fspath(path)!r}: the indices and their dimensions name different parameters.")
        return {name: (int(dims[name]), fh.get_tensor(name)) for name in names}


def check_index_maps(model: nn.Module, maps: IndexMaps) -> None:
    """Refuse maps that do not fit ``model``: a parameter it lacks, a dimension it has not, or an index that is not a
    permutation of that dimension (checked before anything changes).

    Raises:
        ValueError: names the parameter and what is wrong.
    """
    params = dict(model.named_parameters())
    for name, (dim, index) in maps.items():
        if name not in params:
            raise ValueError(f"The channel permutation re-indexes `{name}`, which the model does not have.")
        shape = tuple(params[name].shape)
        if not 0 <= dim < len(shape):
            raise ValueError(f"The channel permutation re-indexes `{name}` along dim {dim}; it has shape {shape}.")
        index = torch.as_tensor(index)
        size = shape[dim]
        if index.dim() != 1 or index.numel() != size or index.is_floating_point():
            raise ValueError(
                f"The channel permutation of `{name}` has {tuple(index.shape)} entries; dim {dim} has {size}."
            )
        if not torch.equal(torch.sort(index.to(torch.int64)).values, torch.arange(size)):
            raise ValueError(f"The channel permutation of `{name}` is not a permutation of 0..{size - 1}.")


@torch.no_grad()
def apply_index_maps(model: nn.Module, maps: IndexMaps) -> nn.Module:
    """Re-index the parameters of ``model`` in place (``new = old.index_select(dim, index)``) after checking every
    map (:func:`check_index_maps`); returns the model. The function the model computes is unchanged when the maps come
    from :func:`~proxsparse_hf.permutation.permute_channels` on the same architecture."""
    check_index_maps(model, maps)
    params = dict(model.named_parameters())
    for name, (dim, index) in maps.items():
        param = params[name]
        param.copy_(param.index_select(dim, torch.as_tensor(index, dtype=torch.int64, device=param.device)))
    return model
