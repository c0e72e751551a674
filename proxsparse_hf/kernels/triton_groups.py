"""Triton helpers shared by the 2:4 kernels (prox, telemetry). Triton is imported by this module only; never at
package import."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["split_groups_of_4"]


@triton.jit
def split_groups_of_4(v, D0: tl.constexpr, D1: tl.constexpr):
    """The four members ``x0, x1, x2, x3`` of every group of 4 along the last axis of a ``(D0, D1, 4)`` tile, each a
    ``(D0, D1)`` tile (``tl.split`` halves the last axis: evens / odds, then each pair)."""
    evens, odds = tl.split(tl.reshape(v, (D0, D1, 2, 2)))
    x0, x2 = tl.split(evens)
    x1, x3 = tl.split(odds)
    return x0, x1, x2, x3
