"""Division by a number known only at run time, as one multiply and one shift: the host side of the prox kernel's
tile indexing (plain Python, so that it is tested without Triton)."""

from __future__ import annotations

__all__ = ["division_magic"]


def division_magic(divisor: int) -> tuple[int, int]:
    """``(m, k)`` with ``n // divisor == (n * m) >> k`` for every ``0 <= n < 2**31`` (and ``m <= 2**32``).

    With ``l = ceil(log2(divisor))``, ``k = 31 + l`` and ``m = ceil(2**k / divisor)``: the error ``e = m * divisor -
    2**k`` is below ``divisor <= 2**l``, so ``n * e < 2**k`` and ``n * m / 2**k`` stays below the next multiple."""
    if divisor < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}.")
    shift = 31 + (divisor - 1).bit_length()
    return -(-(1 << shift) // divisor), shift
