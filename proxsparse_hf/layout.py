"""Views of a weight in its 2:4 group layout, shared by the torch prox and the GPU kernels."""

from __future__ import annotations

from torch import Tensor

__all__ = ["as_2d", "per_weight"]


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
