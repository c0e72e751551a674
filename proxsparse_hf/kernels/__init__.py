"""GPU kernels: the fused prox (optional dependency: Triton) and the cuSPARSELt operator used at inference
(:mod:`.cusparselt_op`, plain torch). Nothing here imports Triton until a kernel is used:
``from proxsparse_hf.kernels import TritonProxPlan`` imports :mod:`.triton_prox` on first access."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TritonProxPlan", "prox_2to4_triton_"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".triton_prox", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
