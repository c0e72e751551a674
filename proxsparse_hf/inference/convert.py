"""Run 2:4-pruned models on sparse tensor cores, with a per-shape dispatch that falls back to dense where sparse loses.

A pruned model is a dense model full of zeros until its linears are swapped for :class:`SparseLinear2to4`, whose matmul
runs the compressed 2:4 weight on the sparse tensor cores of Ampere and newer GPUs::

    model = to_sparse_kernels(model)          # every exactly-2:4 target linear; dispatch measured once per shape
    model.generate(...)                       # prefill (many tokens) -> sparse kernels, decode (few tokens) -> dense
    model = to_dense_kernels(model)           # back to plain nn.Linear, bit for bit

Backends:

* ``"cusparselt"`` — ``torch._cslt_sparse_mm`` on a ``torch._cslt_compress``-ed weight, computing ``(W @ X^T)^T`` with
  the transpose fused into the kernel's output layout and a cuSPARSELt algorithm chosen per shape and token count by
  timing (the default algorithm is slower than dense cuBLAS on Hopper; the best one is 1.3-1.66x faster at 2k-8k tokens
  under CUDA graphs). Under ``torch.compile`` the matmul is the registered operator
  ``torch.ops.proxsparse_hf.cslt_linear`` (:mod:`proxsparse_hf.kernels.cusparselt_op`).
* ``"cutlass"`` — torch's CUTLASS semi-structured kernels (``SparseSemiStructuredTensor._FORCE_CUTLASS``), compute
  capability 8.x only.
* ``"torchao"`` — torchao's ``SemiSparseWeightConfig`` (optional extra ``proxsparse-hf[torchao]``).
* ``"dense"`` — no sparse kernel (what ``"auto"`` resolves to on CPU or pre-Ampere GPUs, with a logged warning).

Dispatch: sparse kernels only pay off for many tokens; torch also re-plans cuSPARSELt on every call (~0.5 ms of host
time on the machines measured), which small matmuls cannot hide. ``min_tokens="auto"`` times dense vs sparse once per
(backend, dtype, shape) over a ladder of token counts and keeps the sparse kernel only from the smallest count at and
above which it wins everywhere (by 3% under CUDA graphs, 10% in eager mode); layers whose kernel never wins stay
``nn.Linear``. Results are cached as JSON under ``cache_dir``. ``tune_for="cuda_graph"`` times graph replays instead of
back-to-back eager calls, for models run under CUDA graphs (``torch.compile(mode="reduce-overhead")`` or a manual
capture), where the per-call host cost disappears; such a layer also gets the eager threshold, which it applies to
calls that run eagerly (transformers' static-cache ``generate`` compiles only the decoding steps, not the prefill).
Under ``torch.compile`` the graph threshold applies: compile a graph-tuned model with ``mode="reduce-overhead"``.

Memory: ``mode="speed"`` keeps the dense weight for the fallback next to the compressed one (1.56x the dense weight
bytes for 16-bit weights); ``mode="memory"`` keeps only the compressed weight (0.56x) and always runs the sparse
kernel. :func:`sparse_weight_memory` reports both numbers."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cusparselt_op import cslt_linear
from ..masks import fraction_2to4_groups, is_2to4
from ..targets import find_targets

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "MODES",
    "SparseLinear2to4",
    "SparseWeightMemory",
    "TUNE_BUCKETS",
    "resolve_backend",
    "sparse_kernels_available",
    "sparse_weight_memory",
    "to_dense_kernels",
    "to_sparse_kernels",
]

BACKENDS = ("auto", "cusparselt", "cutlass", "torchao", "dense")
MODES = ("speed", "memory")
TUNE_MODES = ("eager", "cuda_graph")
# token counts (rows of the flattened input) at which dense and sparse are timed; multiples of 16 for the kernels
TUNE_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# a sparse kernel must beat dense by this fraction at a bucket to be chosen there: a noise guard, wider for eager
# timing, whose back-to-back host-bound loops varied by up to ~10% between runs on the machine measured
TUNE_MARGIN = {"eager": 0.10, "cuda_graph": 0.03}
NEVER = 1 << 62  # min_tokens meaning "always dense"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# minimum divisibility of (out_features, in_features) per backend (torch's semi-structured constraints, 16-bit types)
_SHAPE_MULTIPLE = {"cusparselt": (16, 16), "torchao": (16, 16), "cutlass": (32, 64)}
_CACHE_VERSION = 2  # 2: a cuSPARSELt algorithm per bucket


# --------------------------------------------------------------------------------------------------------------------
# availability
# --------------------------------------------------------------------------------------------------------------------
def sparse_kernels_available(
    backend: str = "cusparselt", device: torch.device | str | int | None = None
) -> tuple[bool, str]:
    """Whether ``backend`` can run 2:4 kernels on ``device`` (default: the current CUDA device), and why not."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"`backend`={backend!r} is not one of {BACKENDS[1:]}.")
    if backend == "dense":
        return False, "the dense backend runs no sparse kernel"
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 has no sparse tensor cores"
    if backend == "cusparselt":
        if not torch.backends.cusparselt.is_available():
            return False, "this torch build has no cuSPARSELt"
        return True, ""
    if backend == "cutlass":
        if major != 8:
            return False, f"torch's CUTLASS 2:4 kernels run on compute capability 8.x only (found {major}.{minor})"
        return True, ""
    if backend == "torchao":
        try:
            import torchao  # noqa: F401
        except ImportError:
            return False, "torchao is not installed (pip install 'proxsparse-hf[torchao]')"
        if not torch.backends.cusparselt.is_available():
            return False, "this torch build has no cuSPARSELt"
    return True, ""


def resolve_backend(backend: str = "auto", device: torch.device | str | int | None = None) -> str:
    """The backend ``to_sparse_kernels`` will use: ``"auto"`` picks cuSPARSELt, then CUTLASS, else ``"dense"``.

    An unavailable backend resolves to ``"dense"`` with a logged warning (never an exception), except a missing torchao
    when ``"torchao"`` was asked for explicitly, which raises ``ImportError`` with the install command.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend`={backend!r} is not one of {BACKENDS}.")
    if backend == "dense":
        return "dense"
    if backend == "auto":
        reasons = []
        for candidate in ("cusparselt", "cutlass"):
            ok, why = sparse_kernels_available(candidate, device)
            if ok:
                return candidate
            reasons.append(f"{candidate}: {why}")
        logger.warning("2:4 sparse kernels are unavailable (%s); layers keep dense matmuls.", "; ".join(reasons))
        return "dense"
    ok, why = sparse_kernels_available(backend, device)
    if not ok:
        if backend == "torchao" and "not installed" in why:
            raise ImportError(f"backend='torchao' needs torchao: {why}")
        logger.warning("2:4 backend %r is unavailable (%s); layers keep dense matmuls.", backend, why)
        return "dense"
    return backend


# --------------------------------------------------------------------------------------------------------------------
# kernels: one small object per layer holding the compressed weight
# --------------------------------------------------------------------------------------------------------------------
class _Kernel:
    """Compressed 2:4 weight ``[out, in]`` plus its matmul ``x2d [M, in] -> [M, out]``."""

    name = "base"

    def mm(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def decompress(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class _CusparseltKernel(_Kernel):
    name = "cusparselt"

    def __init__(self, weight: torch.Tensor, alg_id: int | Mapping[int, int] = 0):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch._cslt_compress(weight.contiguous())
        self.set_alg(alg_id)

    def set_alg(self, alg_id: int | Mapping[int, int]) -> None:
        """One cuSPARSELt algorithm, or ``{tokens: algorithm}``: the algorithm of the largest key <= the call's rows
        (the smallest key's below all keys)."""
        table = {0: alg_id} if isinstance(alg_id, int) else dict(alg_id)
        if not table:
            raise ValueError("`alg_id` must be an int or a non-empty {tokens: algorithm} mapping.")
        pairs = sorted((int(tokens), int(alg)) for tokens, alg in table.items())
        self._alg_bounds = [tokens for tokens, _ in pairs]
        self._algs = [alg for _, alg in pairs]
        self.alg_id = self._algs[-1]

    def alg_for(self, rows: int) -> int:
        alg = self._algs[0]
        for bound, candidate in zip(self._alg_bounds, self._algs):
            if rows >= bound:
                alg = candidate
        return alg

    def mm(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        alg = self.alg_for(x2d.shape[0])
        if torch.compiler.is_compiling():  # one opaque operator, so Inductor shares the input between projections
            return torch.ops.proxsparse_hf.cslt_linear(x2d, self.packed, bias, self.out_features, alg)
        return cslt_linear(x2d, self.packed, bias, self.out_features, alg)

    def decompress(self) -> torch.Tensor:
        # W @ I is exact: each output sums one kept weight times 1.0 and zeros, in fp32, then rounds to the same value
        chunk = 2048
        cols = []
        for start in range(0, self.in_features, chunk):
            width = min(chunk, self.in_features - start)
            eye = torch.zeros(self.in_features, width, dtype=self.dtype, device=self.packed.device)
            eye[start : start + width].fill_diagonal_(1)
            cols.append(torch._cslt_sparse_mm(self.packed, eye, alg_id=0))
        return torch.cat(cols, dim=1)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()


class _SubclassKernel(_Kernel):
    """torch ``SparseSemiStructuredTensor`` weights (CUTLASS, or cuSPARSELt through torchao) used via ``F.linear``."""

    def __init__(self, sparse_weight: torch.Tensor, name: str):
        self.weight = sparse_weight
        self.name = name

    def mm(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x2d, self.weight, bias)

    def decompress(self) -> torch.Tensor:
        return self.weight.to_dense()

    @property
    def nbytes(self) -> int:
        total = 0
        for attr in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask"):
            tensor = getattr(self.weight, attr, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
        return total


def _build_kernel(backend: str, weight: torch.Tensor, alg_id: int | Mapping[int, int] = 0) -> _Kernel:
    if backend == "cusparselt":
        return _CusparseltKernel(weight, alg_id)
    if backend == "cutlass":
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

        previous = SparseSemiStructuredTensor._FORCE_CUTLASS
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
        try:
            sparse = to_sparse_semi_structured(weight.contiguous())
        finally:
            SparseSemiStructuredTensor._FORCE_CUTLASS = previous
        return _SubclassKernel(sparse, "cutlass")
    if backend == "torchao":
        try:
            from torchao.sparsity.sparse_api import SemiSparseWeightConfig, sparsify_
        except ImportError:  # older torchao
            from torchao.sparsity import semi_sparse_weight as SemiSparseWeightConfig  # noqa: N812
            from torchao.sparsity import sparsify_

        holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta"))
        holder[0].weight = nn.Parameter(weight.detach().contiguous().clone(), requires_grad=False)
        sparsify_(holder, SemiSparseWeightConfig())
        return _SubclassKernel(holder[0].weight.data, "torchao")
    raise ValueError(f"`backend`={backend!r} has no kernel; use one of {BACKENDS[1:4]}.")


# --------------------------------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------------------------------
class SparseLinear2to4(nn.Module):
    """A linear layer whose weight is exactly 2:4 along the input dimension, run on sparse tensor cores.

    Calls with at least ``min_tokens`` rows (tokens) go to the sparse kernel; smaller ones, autograd-tracked inputs and
    inputs of another dtype or device go to ``F.linear`` on the dense weight (``mode="speed"``). A layer tuned for CUDA
    graphs can carry a second threshold, ``eager_min_tokens``, for calls that run eagerly (neither traced by
    ``torch.compile`` nor captured in a CUDA graph), where torch's per-call cuSPARSELt planning moves the break-even
    point up: transformers' static-cache ``generate`` compiles only the decoding steps and runs the prefill eagerly.
    With ``mode="memory"`` only the compressed weight is kept and every call runs the sparse kernel.

    Build it with :meth:`from_linear` (or :func:`to_sparse_kernels` for a whole model).

    Attributes:
        in_features / out_features: as in ``nn.Linear``.
        backend: ``"cusparselt"``, ``"cutlass"``, ``"torchao"`` or ``"dense"`` (no kernel).
        mode: ``"speed"`` or ``"memory"``.
        min_tokens: rows from which the sparse kernel runs (``NEVER`` = always dense, 0 = always sparse).
        eager_min_tokens: the same for eager calls (equal to ``min_tokens`` unless set apart).
        transposed: True when the layer was a transformers ``Conv1D`` (weight stored ``[in, out]``).
    """

    def __init__(
        self,
        weight: nn.Parameter | None,
        bias: nn.Parameter | None,
        *,
        in_features: int,
        out_features: int,
        kernel: _Kernel | None,
        min_tokens: int,
        mode: str = "speed",
        transposed: bool = False,
        eager_min_tokens: int | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"`mode`={mode!r} is not one of {MODES}.")
        if mode == "memory" and kernel is None:
            raise ValueError("`mode`='memory' needs a sparse kernel (got backend 'dense').")
        if weight is None and mode == "speed":
            raise ValueError("`mode`='speed' needs the dense weight.")
        self.in_features = in_features
        self.out_features = out_features
        self.mode = mode
        self.transposed = transposed
        self._kernel = kernel
        self.backend = kernel.name if kernel is not None else "dense"
        self.weight = weight if mode == "speed" else None
        self.bias = bias
        self.set_min_tokens(min_tokens, eager_min_tokens)

    # -- construction / conversion ----------------------------------------------------------------------------------
    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        *,
        backend: str,
        min_tokens: int = 0,
        mode: str = "speed",
        alg_id: int | Mapping[int, int] = 0,
        name: str = "",
        eager_min_tokens: int | None = None,
    ) -> SparseLinear2to4:
        """Wrap an ``nn.Linear`` / ``Conv1D`` whose weight is exactly 2:4 (else ``ValueError`` naming ``name``).

        ``alg_id``: the cuSPARSELt algorithm, or ``{tokens: algorithm}`` (the largest key <= a call's rows picks).
        ``eager_min_tokens``: the threshold of eager calls when it differs from ``min_tokens`` (see the class).

        The dense ``weight`` / ``bias`` Parameters are shared, not copied, so :meth:`to_dense_module` is bit-exact.
        """
        transposed = not isinstance(module, nn.Linear)
        weight = module.weight
        grouped = weight.detach().t() if transposed else weight.detach()
        _check_2to4(grouped, name or type(module).__name__)
        out_features, in_features = grouped.shape
        kernel = None if backend == "dense" else _build_kernel(backend, grouped, alg_id)
        return cls(
            weight,
            module.bias,
            in_features=in_features,
            out_features=out_features,
            kernel=kernel,
            min_tokens=min_tokens,
            mode=mode,
            transposed=transposed,
            eager_min_tokens=eager_min_tokens,
        )

    def to_dense_module(self) -> nn.Module:
        """An ``nn.Linear`` (or ``Conv1D``) holding this layer's weight: the same Parameter in speed mode (bit-exact),
        the exactly decompressed weight in memory mode."""
        weight = self.weight
        if weight is None:
            dense = self._kernel.decompress()
            weight = nn.Parameter(dense.t().contiguous() if self.transposed else dense, requires_grad=False)
        has_bias = self.bias is not None
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            with torch.device("meta"):
                module = Conv1D(self.out_features, self.in_features)
            if not has_bias:
                module.bias = None
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=has_bias, device="meta")
        module.weight = weight
        if has_bias:
            module.bias = self.bias
        return module

    def set_min_tokens(self, min_tokens: int, eager_min_tokens: int | None = None) -> None:
        """Change the dispatch threshold (rows of the flattened input from which the sparse kernel runs) and, when it
        differs, the threshold of eager calls (``None``: the same as ``min_tokens``)."""
        if eager_min_tokens is None:
            eager_min_tokens = min_tokens
        for field_name, value in (("min_tokens", min_tokens), ("eager_min_tokens", eager_min_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{field_name}`={value!r} must be an int >= 0.")
        if self._kernel is None:
            min_tokens = eager_min_tokens = NEVER
        elif self.mode == "memory":
            min_tokens = eager_min_tokens = 0
        self.min_tokens = min(min_tokens, NEVER)
        self.eager_min_tokens = min(eager_min_tokens, NEVER)
        # one integer comparison on the decode path: numel < (smaller threshold) * in_features -> dense
        self._min_numel = min(self.min_tokens, self.eager_min_tokens) * self.in_features
        self._graph_numel = self.min_tokens * self.in_features
        self._eager_numel = self.eager_min_tokens * self.in_features

    def wants_sparse(self, tokens: int, in_graph: bool) -> bool:
        """Whether a call with ``tokens`` rows runs the sparse kernel (before the input's device / dtype / autograd
        checks): ``in_graph`` for calls traced by ``torch.compile`` or captured in a CUDA graph."""
        return tokens * self.in_features >= (self._graph_numel if in_graph else self._eager_numel)

    @staticmethod
    def in_graph() -> bool:
        """True while ``torch.compile`` traces the call or a CUDA graph captures it (no per-call host cost later)."""
        return torch.compiler.is_compiling() or (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        )

    # -- forward ----------------------------------------------------------------------------------------------------
    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        shape = x.shape[:-1] + (self.out_features,)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else flat @ self.weight
        return out.view(shape)

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x2d = x.reshape(-1, self.in_features)
        bias = self.bias
        if self.mode == "memory":
            kernel_dtype = self._kernel_dtype()
            if dtype != kernel_dtype:
                x2d = x2d.to(kernel_dtype)
            if bias is not None and bias.dtype != kernel_dtype:
                bias = bias.to(kernel_dtype)
        out = self._kernel.mm(x2d, bias)
        return out.to(dtype).view(*x.shape[:-1], self.out_features)

    def _kernel_dtype(self) -> torch.dtype:
        if isinstance(self._kernel, _CusparseltKernel):
            return self._kernel.dtype
        return self._kernel.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the decode path: below both thresholds, as cheap as nn.Linear's own forward
        if x.numel() < self._min_numel or (
            self._graph_numel != self._eager_numel
            and not self.wants_sparse(x.numel() // self.in_features, self.in_graph())
        ):
            if self.transposed:
                return self._dense(x)
            return F.linear(x, self.weight, self.bias)
        if self.mode == "memory":
            if torch.is_grad_enabled() and x.requires_grad:
                raise RuntimeError("SparseLinear2to4 in memory mode has no backward; run under torch.no_grad().")
            return self._sparse(x)
        if (
            not x.is_cuda
            or x.dtype != self.weight.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return self._dense(x)
        return self._sparse(x)

    def extra_repr(self) -> str:
        def shown(tokens: int) -> str:
            return "never" if tokens >= NEVER else str(tokens)

        eager = (
            f", eager_min_tokens={shown(self.eager_min_tokens)}" if self.eager_min_tokens != self.min_tokens else ""
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"backend={self.backend}, mode={self.mode}, min_tokens={shown(self.min_tokens)}{eager}"
        )

    @property
    def compressed_nbytes(self) -> int:
        """Bytes of the compressed weight (values + metadata); 0 without a kernel."""
        return self._kernel.nbytes if self._kernel is not None else 0

    @property
    def dense_nbytes(self) -> int:
        """Bytes the dense weight takes (whether or not it is kept)."""
        dtype = self.weight.dtype if self.weight is not None else self._kernel_dtype()
        return self.in_features * self.out_features * torch.empty((), dtype=dtype).element_size()


def _check_2to4(grouped: torch.Tensor, name: str) -> None:
    if grouped.dim() != 2 or grouped.shape[-1] % 4 != 0 or not is_2to4(grouped):
        frac = fraction_2to4_groups(grouped) if grouped.dim() == 2 and grouped.shape[-1] % 4 == 0 else 0.0
        raise ValueError(
            f"Layer `{name}` (weight {tuple(grouped.shape)} as [out, in]) is not 2:4 sparse along its input "
            f"dimension: "
            f"{frac:.2%} of its groups of 4 have at most 2 non-zeros. Apply a 2:4 mask first "
            f"(proxsparse_hf.apply_2to4_masks) or leave the layer out with `filter_fn`."
        )


# --------------------------------------------------------------------------------------------------------------------
# timing and the dispatch cache
# --------------------------------------------------------------------------------------------------------------------
def _time_eager(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds per call of ``reps`` back-to-back calls (host launch cost included, as in a real forward)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(3):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / reps)
    return statistics.median(samples)


def _time_graph(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds per call replaying a CUDA graph of ``reps`` calls (no host cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(3):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / reps)
    del graph
    return statistics.median(samples)


def time_ms(fn: Callable[[], Any], tune_for: str = "eager", reps: int = 10) -> float:
    """Median milliseconds per call of ``fn`` on the current CUDA device (``tune_for`` in ``TUNE_MODES``)."""
    if tune_for not in TUNE_MODES:
        raise ValueError(f"`tune_for`={tune_for!r} is not one of {TUNE_MODES}.")
    return _time_graph(fn, reps) if tune_for == "cuda_graph" else _time_eager(fn, reps)


def _gpu_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def default_cache_dir() -> Path:
    """``$PROXSPARSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/proxsparse_hf``, else ``~/.cache/proxsparse_hf``."""
    env = os.environ.get("PROXSPARSE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proxsparse_hf"


@dataclass
class DispatchEntry:
    """Measured dispatch for one (backend, dtype, shape): thresholds, chosen cuSPARSELt algorithm and the timings."""

    min_tokens: int
    alg_id: int = 0
    buckets: list[int] = field(default_factory=list)
    dense_ms: list[float] = field(default_factory=list)
    sparse_ms: list[float] = field(default_factory=list)
    bucket_algs: list[int] = field(default_factory=list)  # the fastest cuSPARSELt algorithm at each bucket

    def algorithms(self) -> int | dict[int, int]:
        """What :meth:`SparseLinear2to4.from_linear` takes as ``alg_id``: per bucket when measured so."""
        return dict(zip(self.buckets, self.bucket_algs)) if self.bucket_algs else self.alg_id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _threshold(buckets: list[int], dense_ms: list[float], sparse_ms: list[float], margin: float) -> int:
    """Smallest bucket from which sparse beats dense by ``margin`` at every larger bucket too (``NEVER`` if none)."""
    threshold = NEVER
    for bucket, dense, sparse in reversed(list(zip(buckets, dense_ms, sparse_ms))):
        if sparse <= dense * (1.0 - margin):
            threshold = bucket
        else:
            break
    return threshold


# cuSPARSELt versions whose float16 kernels failed ("internal error" in the algorithm search, then a poisoned CUDA
# context) or hung on an H100 with torch 2.11; float16 layers stay dense there unless
# PROXSPARSE_ALLOW_FP16_CUSPARSELT=1.
_FP16_BROKEN_CUSPARSELT = (800,)
# float16 algorithms that ran correctly there (256x256 and 4096x4096 probes); the full sweep is left to bfloat16
_FP16_SAFE_ALGS = (0, 1, 4, 7, 17, 20)


def fp16_cusparselt_blocked() -> bool:
    """True when float16 layers are kept dense because this cuSPARSELt version's fp16 kernels are known to fail."""
    if os.environ.get("PROXSPARSE_ALLOW_FP16_CUSPARSELT") == "1" or not torch.backends.cusparselt.is_available():
        return False
    return torch.backends.cusparselt.version() in _FP16_BROKEN_CUSPARSELT


def _tune_shape(
    backend: str, weight: torch.Tensor, tune_for: str, buckets: tuple[int, ...], select_alg: bool
) -> DispatchEntry:
    """Time dense vs sparse for one weight ``[out, in]`` on its device at every bucket; for cuSPARSELt
    (``select_alg``) first pick the fastest algorithm at each bucket (CUDA-graph timing: the algorithm that wins at
    2k tokens need not win at 8k)."""
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x_all = torch.randn(max(buckets), weight.shape[1], device=weight.device, dtype=weight.dtype, generator=generator)
    dense_w = weight.detach().contiguous()
    kernel = _build_kernel(backend, dense_w, 0)
    search = backend == "cusparselt" and select_alg
    candidates = (_FP16_SAFE_ALGS if weight.dtype == torch.float16 else range(_max_alg_id())) if search else ()
    dense_ms, sparse_ms, bucket_algs = [], [], []
    for bucket in buckets:
        x = x_all[:bucket]
        best = None
        for candidate in candidates:
            try:
                kernel.set_alg(candidate)
                kernel.mm(x, None)
                torch.cuda.synchronize()
                ms = time_ms(lambda: kernel.mm(x, None), "cuda_graph", reps=3)
            except RuntimeError:  # an id this build or shape does not have
                continue
            if best is None or ms < best[0]:
                best = (ms, candidate)
        if search:
            bucket_algs.append(0 if best is None else best[1])
            kernel.set_alg(bucket_algs[-1])
        reps = 20 if bucket <= 1024 else 6
        dense_ms.append(round(time_ms(lambda: F.linear(x, dense_w), tune_for, reps), 5))
        sparse_ms.append(round(time_ms(lambda: kernel.mm(x, None), tune_for, reps), 5))

    return DispatchEntry(
        min_tokens=_threshold(list(buckets), dense_ms, sparse_ms, TUNE_MARGIN[tune_for]),
        alg_id=bucket_algs[-1] if bucket_algs else 0,
        buckets=list(buckets),
        dense_ms=dense_ms,
        sparse_ms=sparse_ms,
        bucket_algs=bucket_algs,
    )


# torch does not know the algorithm count of cuSPARSELt >= 0.7 (get_max_alg_id() is None there); 21 is what cuSPARSELt
# 0.8 reports for 16-bit inputs on Hopper. Ids a build does not have fail at plan time and are skipped.
_FALLBACK_ALG_COUNT = 21


def _max_alg_id() -> int:
    getter = getattr(torch.backends.cusparselt, "get_max_alg_id", None)
    count = getter() if callable(getter) else None
    return int(count) if isinstance(count, int) and count > 0 else _FALLBACK_ALG_COUNT


class _DispatchCache:
    """JSON file ``sparse_dispatch_<gpu>.json`` under ``cache_dir``: ``{key: DispatchEntry}`` with the torch and
    cuSPARSELt versions in each key, so a new torch re-measures."""

    def __init__(self, cache_dir: str | os.PathLike | None, device: torch.device):
        self.path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.file = self.path / f"sparse_dispatch_{_gpu_slug(device)}.json"
        self.entries: dict[str, dict[str, Any]] = {}
        if self.file.is_file():
            try:
                data = json.loads(self.file.read_text())
                if data.get("version") == _CACHE_VERSION:
                    self.entries = dict(data.get("entries", {}))
            except (OSError, ValueError) as exc:
                logger.warning("Ignoring unreadable dispatch cache %s (%s).", self.file, exc)

    @staticmethod
    def key(backend: str, dtype: torch.dtype, out_features: int, in_features: int, tune_for: str) -> str:
        cslt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
        dtype_name = str(dtype).replace("torch.", "")
        return f"{backend}|{dtype_name}|{out_features}x{in_features}|{tune_for}|torch{torch.__version__}|cslt{cslt}"

    def get(self, key: str) -> DispatchEntry | None:
        raw = self.entries.get(key)
        return None if raw is None else DispatchEntry(**raw)

    def put(self, key: str, entry: DispatchEntry) -> None:
        self.entries[key] = entry.to_dict()

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": self.entries}, indent=1, sort_keys=True))
        os.replace(tmp, self.file)


# --------------------------------------------------------------------------------------------------------------------
# model-level API
# --------------------------------------------------------------------------------------------------------------------
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _validate_min_tokens(min_tokens: int | str | None, mode: str) -> None:
    if min_tokens is None or min_tokens == "auto":
        return
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"`min_tokens`={min_tokens!r} must be 'auto', None or an int >= 0.")
    if mode == "memory":
        raise ValueError(
            f"`min_tokens`={min_tokens!r} needs the dense weight to fall back to; `mode`='memory' keeps only the "
            f"compressed weight and always runs the sparse kernel (pass min_tokens='auto' or None)."
        )


def to_sparse_kernels(
    model: nn.Module,
    *,
    backend: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    min_tokens: int | str | None = "auto",
    mode: str = "speed",
    tune_for: str = "eager",
    cache_dir: str | os.PathLike | None = None,
    config=None,
) -> nn.Module:
    """Swap every exactly-2:4 target linear of ``model`` (in place) for a :class:`SparseLinear2to4`.

    Put the model on its GPU and in its inference dtype (bf16/fp16) first: compressed weights are device-specific.

    Args:
        model: a (pruned) model; targets are resolved with :func:`proxsparse_hf.find_targets` (``config`` as there).
        backend: one of ``BACKENDS``. ``"auto"`` = cuSPARSELt, else CUTLASS; on CPU or pre-Ampere GPUs the layers are
            still swapped but run dense (logged warning).
        filter_fn: ``filter_fn(module, name) -> bool``; only targets for which it returns True are converted.
        min_tokens: ``"auto"`` (measure once per shape, cached), an int (sparse from this many tokens on) or None
            (always sparse). Speed mode only; memory mode always runs sparse.
        mode: ``"speed"`` (keep the dense weight for the small-M fallback) or ``"memory"`` (compressed weight only).
        tune_for: ``"eager"`` (time back-to-back calls, host launch cost included) or ``"cuda_graph"`` (time graph
            replays; use when the model runs under CUDA graphs). With ``"cuda_graph"`` and ``min_tokens="auto"`` the
            eager thresholds are measured too and used for calls that run eagerly (``eager_min_tokens``).
        cache_dir: where the measured dispatch is cached (default :func:`default_cache_dir`).
        config: optional ``ProxSparseConfig`` giving ``target_modules`` / ``exclude_modules``.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: a bad argument, or a selected layer whose weight is not exactly 2:4 along its input dimension (the
            message names the layer).
    """
    if mode not in MODES:
        raise ValueError(f"`mode`={mode!r} is not one of {MODES}.")
    if tune_for not in TUNE_MODES:
        raise ValueError(f"`tune_for`={tune_for!r} is not one of {TUNE_MODES}.")
    _validate_min_tokens(min_tokens, mode)
    targets = [
        t
        for t in find_targets(model, config).values()
        if not isinstance(t.module, SparseLinear2to4) and (filter_fn is None or filter_fn(t.module, t.name))
    ]
    if not targets:
        raise ValueError("No layer left to convert: `filter_fn` rejected every target (or all are already converted).")
    # validate every selected layer before touching the model
    for target in targets:
        _check_2to4(target.grouped(target.weight.detach()), target.name)

    device = targets[0].weight.device
    resolved = resolve_backend(backend, device if device.type == "cuda" else None)
    if resolved != "dense" and device.type != "cuda":
        logger.warning("The model is on %s, not CUDA; 2:4 layers keep dense matmuls.", device)
        resolved = "dense"
    if resolved == "dense" and mode == "memory":
        logger.warning("`mode`='memory' needs sparse kernels; keeping the dense weights (speed mode).")
        mode = "speed"
    cache = _DispatchCache(cache_dir, device) if resolved != "dense" else None
    converted = skipped = kept_dense = 0
    for target in targets:
        module = target.module
        layer_backend = resolved
        grouped = target.grouped(module.weight.detach())
        if layer_backend != "dense":
            reason = _unsupported_reason(layer_backend, grouped, device)
            if reason:
                logger.warning("Layer `%s` keeps a dense matmul: %s.", target.name, reason)
                skipped += 1
                continue
        alg_id, threshold, eager_threshold = 0, NEVER, None
        if layer_backend != "dense":
            entry = _dispatch_entry(cache, layer_backend, grouped, tune_for)
            alg_id = entry.algorithms()
            if min_tokens == "auto":
                threshold = entry.min_tokens
                if tune_for == "cuda_graph" and mode == "speed" and threshold < NEVER:
                    # eager calls of a graph-tuned model (an eager prefill) keep the eager break-even point
                    eager_threshold = _dispatch_entry(cache, layer_backend, grouped, "eager").min_tokens
            elif min_tokens is None:
                threshold = 0
            else:
                threshold = int(min_tokens)
            if mode == "speed" and threshold >= NEVER:
                # leave the nn.Linear as it is: not even the wrapper's call overhead on the decode path
                logger.info(
                    "Layer `%s` stays nn.Linear: the sparse kernel never beat dense for its shape.", target.name
                )
                kept_dense += 1
                continue
        with torch.no_grad():
            new = SparseLinear2to4.from_linear(
                module,
                backend=layer_backend,
                min_tokens=threshold if layer_backend != "dense" else 0,
                mode=mode if layer_backend != "dense" else "speed",
                alg_id=alg_id,
                name=target.name,
                eager_min_tokens=eager_threshold,
            )
        _set_submodule(model, target.name, new)
        converted += 1
    if cache is not None:
        try:
            cache.save()
        except OSError as exc:
            logger.warning("Could not write the dispatch cache %s (%s).", cache.file, exc)
    logger.info(
        "Converted %d layer(s) to SparseLinear2to4 (backend %s, mode %s); %d unsupported and %d slower-than-dense "
        "layer(s) left as they were.",
        converted,
        resolved,
        mode,
        skipped,
        kept_dense,
    )

    return model


def _dispatch_entry(cache: _DispatchCache, backend: str, grouped: torch.Tensor, tune_for: str) -> DispatchEntry:
    """The cached dispatch of ``grouped``'s (backend, dtype, shape) for ``tune_for``, measured and cached if absent."""
    out_features, in_features = grouped.shape
    key = cache.key(backend, grouped.dtype, out_features, in_features, tune_for)
    entry = cache.get(key)
    if entry is None:
        with torch.no_grad():
            entry = _tune_shape(backend, grouped, tune_for, TUNE_BUCKETS, select_alg=True)
        cache.put(key, entry)
        logger.info(
            "2:4 dispatch for %s %s %dx%d (%s): alg %s, sparse from %s tokens (dense ms %s, sparse ms %s)",
            backend,
            grouped.dtype,
            out_features,
            in_features,
            tune_for,
            entry.algorithms(),
            "never" if entry.min_tokens >= NEVER else entry.min_tokens,
            entry.dense_ms,
            entry.sparse_ms,
        )
    return entry


def _unsupported_reason(backend: str, grouped: torch.Tensor, device: torch.device) -> str:
    out_features, in_features = grouped.shape
    if grouped.device != device:
        return f"its weight is on {grouped.device}, not {device}"
    if grouped.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {grouped.dtype} (2:4 kernels here take float16/bfloat16)"
    if grouped.dtype == torch.float16 and backend in ("cusparselt", "torchao") and fp16_cusparselt_blocked():
        return (
            f"float16 kernels of cuSPARSELt {torch.backends.cusparselt.version()} failed or hung in our tests "
            f"(set PROXSPARSE_ALLOW_FP16_CUSPARSELT=1 to use them anyway; bfloat16 works)"
        )
    rows, cols = _SHAPE_MULTIPLE[backend]
    if out_features % rows or in_features % cols:
        return f"shape {out_features}x{in_features} is not a multiple of {rows}x{cols} as {backend} needs"
    return ""


def to_dense_kernels(model: nn.Module) -> nn.Module:
    """Replace every :class:`SparseLinear2to4` of ``model`` (in place) by an ``nn.Linear`` / ``Conv1D`` holding its
    weight.

    Speed mode hands back the very same weight Parameters (bit-exact); memory mode decompresses exactly.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, SparseLinear2to4)]
    for name in names:
        module = model.get_submodule(name)
        with torch.no_grad():
            _set_submodule(model, name, module.to_dense_module())
    return model


@dataclass
class SparseWeightMemory:
    """Weight bytes of the converted layers.

    Attributes:
        layers: number of :class:`SparseLinear2to4` modules.
        sparse_layers: how many of them hold a compressed weight.
        dense_bytes: bytes their weights take dense.
        compressed_bytes: bytes of the compressed weights (kept values + metadata).
        resident_bytes: bytes actually held (compressed + dense weights kept for the fallback).
    """

    layers: int
    sparse_layers: int
    dense_bytes: int
    compressed_bytes: int
    resident_bytes: int

    @property
    def compressed_ratio(self) -> float:
        """compressed / dense bytes (0.5625 for 16-bit 2:4 with cuSPARSELt metadata)."""
        return self.compressed_bytes / self.dense_bytes if self.dense_bytes else math.nan

    @property
    def resident_ratio(self) -> float:
        return self.resident_bytes / self.dense_bytes if self.dense_bytes else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compressed_ratio": self.compressed_ratio, "resident_ratio": self.resident_ratio}


def sparse_weight_memory(model: nn.Module) -> SparseWeightMemory:
    """Bytes of the compressed 2:4 representation vs dense, over the :class:`SparseLinear2to4` layers of ``model``."""
    layers = sparse = dense = compressed = resident = 0
    for module in model.modules():
        if not isinstance(module, SparseLinear2to4):
            continue
        layers += 1
        dense += module.dense_nbytes
        compressed += module.compressed_nbytes
        resident += module.compressed_nbytes + (module.dense_nbytes if module.weight is not None else 0)
        sparse += int(module.compressed_nbytes > 0)
    return SparseWeightMemory(layers, sparse, dense, compressed, resident)
