"""Values and gradients of the ProxSparse regularisers (for logging and for the lambda2 gradient)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["frozen_weight_grad", "frozen_weight_regularizer", "regularizer_2to4"]

_CHUNK_ELEMENTS = 1 << 20


def _rows(t: Tensor) -> Tensor:
    """A 2-D view (or, for non-viewable layouts, a reshaped copy) with the last dimension kept."""
    if t.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension, got a scalar.")
    return t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t


def regularizer_2to4(weight: Tensor) -> Tensor:
    """2:4 regulariser ``sum over groups of sum_{i<j<k} |w_i w_j w_k|`` (groups of 4 along the last dimension).

    Computed in float32, chunk by chunk; returns a float32 scalar on ``weight``'s device. Zero exactly when every
    group has at most 2 non-zeros.
    """
    if weight.dim() == 0 or weight.shape[-1] % 4 != 0:
        raise ValueError(
            f"`weight` of shape {tuple(weight.shape)} cannot be split into groups of 4 along its last dimension "
            "(the last dimension must be divisible by 4)."
        )
    w2d = _rows(weight.detach())
    rows, cols = w2d.shape
    total = torch.zeros((), dtype=torch.float32, device=weight.device)
    if w2d.numel() == 0:
        return total
    step = max(1, _CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        g = w2d[r0 : r0 + step].to(torch.float32).abs().reshape(-1, 4)
        w0, w1, w2, w3 = g.unbind(1)
        total += (w0 * w1 * (w2 + w3) + w2 * w3 * (w0 + w1)).sum()
    return total


def _check_pair(weight: Tensor, original: Tensor, epsilon: float) -> None:
    if weight.shape != original.shape:
        raise ValueError(
            f"`original` must have the shape of `weight`: got {tuple(original.shape)} and {tuple(weight.shape)}."
        )
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"`epsilon` must be a number > 0, got {epsilon!r}.")


def _inv_scale(original: Tensor, epsilon: float) -> Tensor:
    """``a = 1 / (W0 + eps * sign(W0))`` with ``sign(0) := +1`` (float32)."""
    w0 = original.to(torch.float32)
    sign = torch.where(w0 < 0, -1.0, 1.0)
    return 1.0 / (w0 + epsilon * sign)


def frozen_weight_grad(weight: Tensor, original: Tensor, epsilon: float) -> Tensor:
    """Gradient of ``sum((W * (W - W0) / (W0 + eps * sign(W0)))**2)`` with respect to ``W`` (without lambda2).

    Equals ``2 a^2 W (W - W0) (2W - W0)`` with ``a = 1 / (W0 + eps * sign(W0))`` and ``sign(0) := +1``; computed in
    float32 and returned in ``weight.dtype`` on ``weight``'s device (``original`` may live elsewhere, e.g. on CPU).
    """
    _check_pair(weight, original, epsilon)
    w = weight.detach().to(torch.float32)
    w0 = original.detach().to(device=weight.device, dtype=torch.float32)
    a = _inv_scale(w0, epsilon)
    grad = 2.0 * a.square() * w * (w - w0) * (2.0 * w - w0)
    return grad.to(weight.dtype)


def frozen_weight_regularizer(weight: Tensor, original: Tensor, epsilon: float) -> Tensor:
    """Value ``sum((W * (W - W0) / (W0 + eps * sign(W0)))**2)`` as a float32 scalar on ``weight``'s device."""
    _check_pair(weight, original, epsilon)
    w = weight.detach().to(torch.float32)
    w0 = original.detach().to(device=weight.device, dtype=torch.float32)
    return (w * (w - w0) * _inv_scale(w0, epsilon)).square().sum()
