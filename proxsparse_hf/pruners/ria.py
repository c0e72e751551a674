"""RIA 2:4 pruning (Relative Importance and Activations; Zhang et al., ICLR 2024): weights are scored by their importance
relative to both their input column and their output row, times a power of the input feature's norm::

    score_ij = ( |W_ij| / Σ_k |W_kj|  +  |W_ij| / Σ_k |W_ik| ) · ‖X_j‖₂^a        (W is [out, in]; default a = 0.5)

and the two best scores of every group of four input weights are kept. The input norms are gathered block by block like
Wanda's (see :mod:`proxsparse_hf.pruners.capture`). Only the mask is computed: surviving weights keep their values.
"""

from __future__ import annotations

import math

import torch

from ..activations import InputNormStats, make_input_norm_stats
from ..layout import input_last
from ..masks import mask_2to4
from ..targets import Target
from .capture import SequentialPruner
from .registry import PrunerOption, register_pruner

__all__ = ["RIA", "ria_mask", "ria_scores"]


def ria_scores(
    weight: torch.Tensor, input_norms: torch.Tensor, *, alpha: float = 0.5, transposed: bool = False
) -> torch.Tensor:
    """RIA scores in the weight's storage layout (``[out, in]``; ``[in, out]`` when ``transposed``, as ``Conv1D``).

    A column or row whose weights are all zero has all-zero scores (its sums are clamped away from zero).

    Raises:
        ValueError: ``input_norms`` does not match the weight's input dimension, or ``alpha`` is negative.
    """
    if not alpha >= 0:
        raise ValueError(f"`alpha`={alpha!r} is invalid; allowed: a number >= 0.")
    w = input_last(weight.detach(), transposed)
    if w.dim() != 2 or input_norms.dim() != 1 or input_norms.shape[0] != w.shape[1]:
        raise ValueError(
            f"`input_norms` of shape {tuple(input_norms.shape)} does not match the input dimension of a weight of shape "
            f"{tuple(weight.shape)} (transposed={transposed})."
        )
    magnitude = w.abs().float()
    tiny = torch.finfo(torch.float32).tiny
    column_sums = magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)  # Σ_k |W_kj|: over the output rows
    row_sums = magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)  # Σ_k |W_ik|: over the input columns
    relative = magnitude / column_sums + magnitude / row_sums
    scores = relative * input_norms.to(device=w.device, dtype=torch.float32).pow(alpha).unsqueeze(0)
    return input_last(scores, transposed)


def ria_mask(
    weight: torch.Tensor, input_norms: torch.Tensor, *, alpha: float = 0.5, transposed: bool = False
) -> torch.Tensor:
    """2:4 mask (storage layout, ``True`` = kept) of the top-2 RIA scores per group of four input weights."""
    scores = ria_scores(weight, input_norms, alpha=alpha, transposed=transposed)
    return mask_2to4(scores, transposed=transposed)


@register_pruner(
    "ria",
    label="RIA",
    description="One-shot RIA pruning (Zhang et al., 2024): every weight is scored by its magnitude relative to its "
    "input column plus relative to its output row, times ‖x‖₂^alpha of its input feature; the two best of every group "
    "of four are kept, block by block, without a weight update.",
    needs_calibration=True,
    permutation_importance="ria",
    options={
        "alpha": PrunerOption(
            0.5,
            help="Exponent a of the input-norm factor ‖X_j‖₂^a.",
            check=lambda v: v >= 0 and math.isfinite(v),
            allowed="a number >= 0",
        ),
    },
)
class RIA(SequentialPruner):
    """RIA as a sequential pruner: input-feature norms per target (as Wanda), mask of the top-2 RIA scores."""

    def make_stats(self, target: Target) -> InputNormStats:
        return make_input_norm_stats(target)

    def prune_target(self, target: Target, stats: InputNormStats) -> torch.Tensor:
        mask = ria_mask(target.weight, stats.input_norms, alpha=self.options["alpha"], transposed=target.transposed)
        target.weight.masked_fill_(~mask, 0)
        return mask
