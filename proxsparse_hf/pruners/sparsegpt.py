"""SparseGPT 2:4 pruning (Frantar & Alistarh, 2023): OBS-style pruning column by column with the inverse Hessian of the
layer-wise reconstruction error ``‖WX − ŴX‖²``.

For each layer, ``H = 2/n · Σ XᵀX`` over the calibration tokens of its input, damped by ``damp_percent`` of its mean
diagonal. Columns are swept in blocks of ``block_size``; at every fourth column the two weights of each row's group of four
with the smallest saliency ``w² / [H⁻¹]²_jj`` are pruned, and each column's pruning error is propagated to the columns not yet
visited through the upper Cholesky factor of ``H⁻¹``. With ``update_weights=False`` only the mask is kept: the original
weights are multiplied by it (the like-for-like comparison with ProxSparse, which never updates weights).
"""

from __future__ import annotations

import logging

import torch

from ..constants import SUPPORTED_M, SUPPORTED_N
from ..layout import input_last
from ..targets import Target
from .capture import SequentialPruner
from .registry import PrunerOption, register_pruner

__all__ = ["HessianStats", "SparseGPT", "sparsegpt_2to4"]

logger = logging.getLogger(__name__)


class HessianStats:
    """Running ``XᵀX`` (float32) of one layer's inputs and the number of tokens seen."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.t(), x)
        self.num_tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n · XᵀX``."""
        return self.xtx * (2.0 / max(self.num_tokens, 1))


def _inverse_cholesky(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + δI)⁻¹``; δ grows tenfold (up to 4 times) while ``H + δI`` is not positive definite."""
    diag_mean = float(torch.diag(hessian).mean())
    damp = damp_percent * (diag_mean if diag_mean > 0 else 1.0)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(5):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        logger.warning("Damped Hessian not positive definite (damping %.3g); increasing damping tenfold", damp)
        damp *= 10.0
    raise RuntimeError(f"SparseGPT: the damped Hessian is not positive definite even with damping {damp / 10:.3g}.")


@torch.no_grad()
def sparsegpt_2to4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    transposed: bool = False,
    damp_percent: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one weight matrix to 2:4 with SparseGPT.

    Args:
        weight: ``[out, in]`` (``[in, out]`` when ``transposed``, as transformers ``Conv1D`` stores it).
        hessian: ``[in, in]`` layer Hessian ``2/n · XᵀX`` of the layer input.
        transposed: weight stored with the input dimension first.
        damp_percent: damping added to the diagonal, as a fraction of its mean (> 0).
        block_size: columns per lazy-update block (>= 4, multiple of 4).

    Returns:
        ``(updated_weight, mask)`` in the weight's storage layout and dtype; ``mask`` is bool, ``True`` = kept, exactly two
        kept per group of four input weights. ``updated_weight`` is zero wherever ``mask`` is False.

    Raises:
        ValueError: bad shapes or options.
    """
    if not damp_percent > 0:
        raise ValueError(f"`damp_percent`={damp_percent!r} is invalid; allowed: a number > 0.")
    if not isinstance(block_size, int) or block_size < SUPPORTED_M or block_size % SUPPORTED_M:
        raise ValueError(f"`block_size`={block_size!r} is invalid; allowed: an integer >= 4 and divisible by 4.")
    w = input_last(weight.detach(), transposed)
    rows, cols = w.shape
    if cols % SUPPORTED_M:
        raise ValueError(
            f"Weight of shape {tuple(weight.shape)} has {cols} input features, not divisible by {SUPPORTED_M}."
        )
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"`hessian` of shape {tuple(hessian.shape)} does not match {cols} input features.")
    W = w.to(torch.float32).clone()
    H = hessian.to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky(H, damp_percent)

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag1 = torch.diag(Hinv1)
        pruned1 = pruned[:, i1:i2]
        for i in range(i2 - i1):
            if i % SUPPORTED_M == 0:
                saliency = W1[:, i : i + SUPPORTED_M] ** 2 / diag1[i : i + SUPPORTED_M].unsqueeze(0) ** 2
                drop = torch.topk(saliency, SUPPORTED_M - SUPPORTED_N, dim=1, largest=False).indices
                pruned1.scatter_(1, drop + i, True)
            col = W1[:, i]
            q = col.masked_fill(pruned1[:, i], 0.0)
            Q1[:, i] = q
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    keep = ~pruned
    W.masked_fill_(pruned, 0.0)
    updated = W.to(weight.dtype)
    return input_last(updated, transposed).contiguous(), input_last(keep, transposed).contiguous()


def _valid_block_size(size: int) -> bool:
    return size >= SUPPORTED_M and size % SUPPORTED_M == 0


@register_pruner(
    "sparsegpt",
    label="SparseGPT",
    description="One-shot SparseGPT pruning (Frantar & Alistarh, 2023): the 2:4 mask is chosen column by column from "
    "the inverse Hessian of the layer inputs, block by block, and the surviving weights are updated to compensate "
    "(update_weights=False keeps the original weights under the SparseGPT mask).",
    needs_calibration=True,
    updates_weights=True,
    options={
        "update_weights": PrunerOption(
            True, help="Apply the OBS weight update; False keeps the original weights under the SparseGPT mask."
        ),
        "damp_percent": PrunerOption(
            0.01,
            help="Damping added to the Hessian diagonal, as a fraction of its mean.",
            check=lambda v: 0 < v < 1,
            allowed="a number in (0, 1)",
        ),
        "block_size": PrunerOption(
            128,
            help="Columns per lazy-update block.",
            check=_valid_block_size,
            allowed="an integer >= 4 and divisible by 4",
        ),
    },
)
class SparseGPT(SequentialPruner):
    """SparseGPT as a sequential pruner: ``XᵀX`` per target, then :func:`sparsegpt_2to4` with the method's options."""

    def make_stats(self, target: Target) -> HessianStats:
        weight = target.weight
        in_features = weight.shape[0] if target.transposed else weight.shape[1]
        return HessianStats(in_features, device=weight.device)

    def prune_target(self, target: Target, stats: HessianStats) -> torch.Tensor:
        updated, keep = sparsegpt_2to4(
            target.weight,
            stats.hessian,
            transposed=target.transposed,
            damp_percent=self.options["damp_percent"],
            block_size=self.options["block_size"],
        )
        stats.xtx = torch.empty(0)
        if self.options["update_weights"]:
            target.weight.copy_(updated)
        else:
            target.weight.masked_fill_(~keep, 0)
        return keep
