"""``dense``: the unpruned reference, registered so that tables, charts and cards read its name and label from the
registry like any other method. Pruning with it changes nothing and returns no masks."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..targets import Target
from .registry import register_pruner

__all__ = ["keep_dense"]


@register_pruner(
    "dense",
    label="dense",
    description="The original model, not pruned (the reference every 2:4 method is compared with).",
    needs_calibration=False,
)
def keep_dense(
    model: torch.nn.Module, targets: Mapping[str, Target], calibration: object = None, *, show_progress: bool = False
) -> dict[str, torch.Tensor]:
    """Leave ``model`` unchanged; returns ``{}`` (no target is pruned)."""
    return {}
