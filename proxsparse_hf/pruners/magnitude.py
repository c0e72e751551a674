"""Magnitude 2:4 pruning: keep the two largest ``|W|`` of every group of four input weights (no calibration data)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..masks import apply_2to4_masks, mask_2to4
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
    (on the CPU). ``calibration`` is not used; ``show_progress`` shows a bar over the target layers."""
    from tqdm.auto import tqdm

    masks: dict[str, torch.Tensor] = {}
    for target in tqdm(list(targets.values()), desc="magnitude", unit="layer", disable=not show_progress):
        mask = mask_2to4(target.weight.detach(), transposed=target.transposed)
        apply_2to4_masks(model, {target.param_name: mask})
        masks[target.param_name] = mask.cpu()
    return masks
