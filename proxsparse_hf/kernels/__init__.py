"""Fused GPU kernels (optional dependency: Triton). Nothing here imports Triton until a kernel is called."""

from __future__ import annotations

from torch import Tensor

__all__ = ["prox_2to4_triton_"]


def prox_2to4_triton_(
    weight: Tensor, lam: float, *, max_iter: int, tol: float, column_scale: Tensor | None = None
) -> Tensor:
    """In-place exact 2:4 prox of a CUDA tensor with the fused Triton kernel (see ``triton_prox``); with
    ``column_scale`` the prox of ``weight * s`` divided by ``s``."""
    from .triton_prox import prox_2to4_triton_ as _impl

    return _impl(weight, lam, max_iter=max_iter, tol=tol, column_scale=column_scale)
