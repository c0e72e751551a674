"""Views of a weight in its 2:4 group layout: the input dimension last (:func:`input_last`), groups of
:data:`~proxsparse_hf.constants.SUPPORTED_M` consecutive input weights (:func:`weight_groups`) and the 2-D views the
torch prox and the GPU kernels work on (:func:`as_2d`)."""

from __future__ import annotations

from torch import Tensor

from .constants import SUPPORTED_M

__all__ = ["as_2d", "input_last", "per_weight", "weight_groups"]


def input_last(tensor: Tensor, transposed: bool) -> Tensor:
    """``tensor`` (shaped like a weight) with its input dimension last: ``tensor.t()`` (a view) when the weight is
    stored ``[in, out]`` (``Conv1D``, ``transposed=True``), else ``tensor`` itself. Its own inverse: applied to a tensor
    in the input-last layout it gives the storage layout back."""
    return tensor.t() if transposed else tensor


def weight_groups(tensor: Tensor, transposed: bool = False) -> Tensor:
    """``tensor`` (shaped like a weight) as rows of ``SUPPORTED_M`` consecutive input weights: shape
    ``[numel / SUPPORTED_M, SUPPORTED_M]``, a view when the input-last layout is contiguous, else a copy.

    Raises:
        ValueError: the input dimension is not divisible by ``SUPPORTED_M``.
    """
    grouped = input_last(tensor, transposed)
    size = grouped.shape[-1] if grouped.dim() else 1
    if size % SUPPORTED_M != 0:
        raise ValueError(
            f"Tensor of shape {tuple(tensor.shape)}{' (transposed)' if transposed else ''} cannot be split into groups "
            f"of {SUPPORTED_M} along its input dimension ({size} is not divisible by {SUPPORTED_M})."
        )
    return grouped.reshape(-1, SUPPORTED_M)


def as_2d(weight: Tensor) -> list[Tensor]:
    """2-D views of ``weight`` with its last dimension kept (one view when it can be flattened, else one per slice)."""
    if weight.dim() == 1:
        return [weight.unsqueeze(0)]
    if weight.dim() == 2:
        return [weight]
    try:
        return [weight.view(-1, weight.shape[-1])]
    except RuntimeError:
        return [view for sub in weight.unbind(0) for view in as_2d(sub)]


def per_weight(weights, multipliers=None, column_scales=None) -> tuple[list, list[float], list]:
    """``(weights, multipliers, column_scales)`` as lists of one entry per weight (factor 1 and no scale by default)."""
    weights = list(weights)
    mults = [1.0] * len(weights) if multipliers is None else [float(m) for m in multipliers]
    scales = [None] * len(weights) if column_scales is None else list(column_scales)
    if not len(weights) == len(mults) == len(scales):
        raise ValueError(
            f"got {len(weights)} weights, {len(mults)} multipliers and {len(scales)} column scales; "
            "give one multiplier and one column scale (or None) per weight."
        )
    return weights, mults, scales
