"""Magnitude 2:4 pruning: keep the two largest ``|W|`` of every group of four input weights (no calibration data)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..masks import apply_2to4_masks, extract_2to4_masks
from ..targets import Target
from .registry import register_pruner

__all__ = ["magnitude_prune"]


@register_pruner(
    "magnitude",
    label="Magnitude",
    description="One-shot magnitude pruning: the two largest |w| of every group of four consecutive input weights "
    "are kept.",
    needs_calibration=False,
)
@torch.no_grad()
def magnitude_prune(
    model: torch.nn.Module, targets: Mapping[str, Target], calibration: object = None, *, show_progress: bool = False
) -> dict[str, torch.Tensor]:
    """Prune every target of ``model`` in place to its top-2 magnitudes per group; returns ``{weight_name: bool mask}``
    (on the CPU). ``calibration`` and ``show_progress`` are not used."""
    masks = extract_2to4_masks(model, targets=targets)
    apply_2to4_masks(model, masks)
    return {name: mask.cpu() for name, mask in masks.items()}
