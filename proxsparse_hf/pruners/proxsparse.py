"""``proxsparse``: the learned method, registered for its name and label. Its mask is learned by training with the
model's own loss (:func:`proxsparse_hf.learn_mask`, ``proxsparse learn``), so it does not run through ``prune()``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..targets import Target
from .registry import register_pruner

__all__ = ["learned_elsewhere"]


@register_pruner(
    "proxsparse",
    label="ProxSparse",
    description="The 2:4 mask is learned end to end with ProxSparse (Liu et al., ICML 2025): the causal-LM loss plus a "
    "2:4 regulariser applied through its exact proximal operator; the mask then multiplies the original weights.",
    needs_calibration=True,
    learned=True,
)
def learned_elsewhere(
    model: torch.nn.Module, targets: Mapping[str, Target], calibration: object = None, *, show_progress: bool = False
) -> dict[str, torch.Tensor]:
    """Always raises: ProxSparse masks come from training, not from a one-shot pass.

    Raises:
        ValueError: pointing to :func:`proxsparse_hf.learn_mask` and ``proxsparse learn``.
    """
    raise ValueError(
        "`method`='proxsparse' learns its mask by training: use proxsparse_hf.learn_mask(model, dataset, config) or "
        "`proxsparse learn MODEL`, not prune()."
    )
