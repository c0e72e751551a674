"""Magnitude 2:4 pruning: keep the two largest ``|W|`` of every group of four input weights (no calibration data)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..masks import apply_2to4_masks, extract_2to4_masks
from ..targets import Target

__all__ = ["magnitude_prune"]


@torch.no_grad()
def magnitude_prune(model: torch.nn.Module, targets: Mapping[str, Target]) -> dict[str, torch.Tensor]:
    """Prune every target of ``model`` in place to its top-2 magnitudes per group; returns ``{weight_name: bool mask}``."""
    masks = extract_2to4_masks(model, targets=targets)
    apply_2to4_masks(model, masks)
    return masks
