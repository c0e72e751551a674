"""Wanda 2:4 pruning (Sun et al., 2023): score ``|W_ij| · ‖X_j‖₂`` with ``X_j`` the j-th input feature over all
calibration tokens of the layer input, keep the two best scores of every group of four input weights.

Statistics are gathered block by block (see :mod:`proxsparse_hf.pruners.capture`): the inputs of block ``k`` come from the
already-pruned blocks ``< k``. Weights are not updated.
"""

from __future__ import annotations

import torch

from ..activations import InputNormStats, make_input_norm_stats
from ..masks import mask_2to4
from ..targets import Target
from .capture import SequentialPruner
from .registry import register_pruner

__all__ = ["Wanda", "wanda_mask", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """``|W| · ‖X_j‖₂`` broadcast along the input dimension (dim 1 of an ``nn.Linear`` weight, dim 0 when ``transposed``).

    Raises:
        ValueError: ``input_norms`` does not match the weight's input dimension.
    """
    in_dim = 0 if transposed else 1
    if weight.dim() != 2 or input_norms.dim() != 1 or input_norms.shape[0] != weight.shape[in_dim]:
        raise ValueError(
            f"`input_norms` of shape {tuple(input_norms.shape)} does not match the input dimension of a weight of shape "
            f"{tuple(weight.shape)} (transposed={transposed})."
        )
    norms = input_norms.to(device=weight.device, dtype=torch.float32)
    scale = norms.unsqueeze(1) if transposed else norms.unsqueeze(0)
    return weight.detach().abs().float() * scale


def wanda_mask(weight: torch.Tensor, input_norms: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """2:4 mask (storage layout, ``True`` = kept) of the top-2 Wanda scores per group of four input weights."""
    scores = wanda_scores(weight, input_norms, transposed=transposed)
    return mask_2to4(scores, transposed=transposed)


@register_pruner(
    "wanda",
    label="Wanda",
    description="One-shot Wanda pruning (Sun et al., 2023): every weight is scored by |w|·‖x‖₂ of its input feature "
    "over the calibration data, and the two best of every group of four are kept, block by block.",
    needs_calibration=True,
)
class Wanda(SequentialPruner):
    """Wanda as a sequential pruner: input-feature norms per target, mask of the top-2 scores, no weight update."""

    def make_stats(self, target: Target) -> InputNormStats:
        return make_input_norm_stats(target)

    def prune_target(self, target: Target, stats: InputNormStats) -> torch.Tensor:
        mask = wanda_mask(target.weight, stats.input_norms, transposed=target.transposed)
        target.weight.masked_fill_(~mask, 0)
        return mask
