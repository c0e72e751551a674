"""Wanda 2:4 pruning (Sun et al., 2023): score ``|W_ij| · ‖X_j‖₂`` with ``X_j`` the j-th input feature over all
calibration tokens of the layer input, keep the two best scores of every group of four input weights.

Statistics are gathered block by block (see :mod:`proxsparse_hf.pruners.capture`): the inputs of block ``k`` come from the
already-pruned blocks ``< k``. Weights are not updated.
"""

from __future__ import annotations

import torch

from ..masks import mask_2to4
from ..targets import Target

__all__ = ["WandaStats", "wanda_mask", "wanda_scores"]


class WandaStats:
    """Running sum of squares of every input feature of one layer (``‖X_j‖₂²`` over all tokens seen)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_sq += (x * x).sum(dim=0).to(self.sum_sq.dtype)
        self.num_tokens += x.shape[0]

    @property
    def input_norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` per input feature (float32)."""
        return self.sum_sq.sqrt().float()


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
    if transposed:
        return mask_2to4(scores.t().contiguous()).t().contiguous()
    return mask_2to4(scores)


def make_wanda_stats(target: Target) -> WandaStats:
    weight = target.weight
    in_features = weight.shape[0] if target.transposed else weight.shape[1]
    return WandaStats(in_features, device=weight.device)


@torch.no_grad()
def wanda_prune_block(
    targets: dict[str, Target], stats: dict[str, WandaStats], masks: dict[str, torch.Tensor]
) -> None:
    """Prune one block's targets in place from their statistics; masks are added to ``masks`` (on the CPU)."""
    for name, target in targets.items():
        if stats[name].num_tokens == 0:
            raise RuntimeError(f"Target `{name}` saw no calibration tokens; was it called in the block's forward?")
        mask = wanda_mask(target.weight, stats[name].input_norms, transposed=target.transposed)
        target.weight.masked_fill_(~mask, 0)
        masks[target.param_name] = mask.cpu()
