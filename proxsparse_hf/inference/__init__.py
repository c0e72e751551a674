"""Run 2:4-pruned models on sparse tensor cores, with a per-shape dispatch that falls back to dense where sparse loses.

A pruned model is a dense model full of zeros until its linears are swapped for :class:`SparseLinear2to4`, whose matmul
runs the compressed 2:4 weight on the sparse tensor cores of Ampere and newer GPUs::

    model = to_sparse_kernels(model)          # every exactly-2:4 target linear; dispatch measured once per shape
    model.generate(...)                       # prefill (many tokens) -> sparse kernels, decode (few tokens) -> dense
    model = to_dense_kernels(model)           # back to plain nn.Linear, bit for bit

One module per job:

* :mod:`.backends` — the backend registry (``register_backend``: name -> kernel builder + availability check), the
  built-in ``"cusparselt"``, ``"cutlass"`` and ``"torchao"`` kernels, and ``resolve_backend`` (``"auto"`` picks
  cuSPARSELt, then CUTLASS; ``"dense"`` runs no sparse kernel, what ``"auto"`` resolves to on CPU or pre-Ampere GPUs,
  with a logged warning).
* :mod:`.layer` — :class:`SparseLinear2to4`.
* :mod:`.tuning` — timing, the measured break-even token count per (backend, dtype, shape), the JSON dispatch cache.
  ``min_tokens="auto"`` keeps the sparse kernel only from the smallest token count at and above which it wins
  everywhere; layers whose kernel never wins stay ``nn.Linear``. ``tune_for="cuda_graph"`` times graph replays, for
  models run under CUDA graphs (``torch.compile(mode="reduce-overhead")`` or a manual capture); such a layer also gets
  the eager threshold, which it applies to calls that run eagerly (transformers' static-cache ``generate`` compiles
  only the decoding steps, not the prefill). Compile a graph-tuned model with ``mode="reduce-overhead"``.
* :mod:`.convert` — :func:`to_sparse_kernels`, :func:`to_dense_kernels`, :func:`sparse_weight_memory`.

Memory: ``mode="speed"`` keeps the dense weight for the fallback next to the compressed one (1.56x the dense weight
bytes for 16-bit weights); ``mode="memory"`` keeps only the compressed weight (0.56x) and always runs the sparse
kernel. :func:`sparse_weight_memory` reports both numbers.
"""

from __future__ import annotations

from typing import Any

from .backends import (
    BackendSpec,
    SparseKernel,
    backend_choices,
    backend_names,
    build_kernel,
    fp16_cusparselt_blocked,
    get_backend,
    register_backend,
    resolve_backend,
    sparse_kernels_available,
)
from .convert import SparseWeightMemory, sparse_weight_memory, to_dense_kernels, to_sparse_kernels
from .layer import MODES, SparseLinear2to4
from .tuning import NEVER, TUNE_BUCKETS, TUNE_MODES, DispatchEntry, default_cache_dir, time_ms

__all__ = [
    "BACKENDS",
    "MODES",
    "NEVER",
    "TUNE_BUCKETS",
    "TUNE_MODES",
    "BackendSpec",
    "DispatchEntry",
    "SparseKernel",
    "SparseLinear2to4",
    "SparseWeightMemory",
    "backend_choices",
    "backend_names",
    "build_kernel",
    "default_cache_dir",
    "fp16_cusparselt_blocked",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "sparse_kernels_available",
    "sparse_weight_memory",
    "time_ms",
    "to_dense_kernels",
    "to_sparse_kernels",
]


def __getattr__(name: str) -> Any:
    if name == "BACKENDS":  # computed, so a backend registered later is listed too
        return backend_choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
