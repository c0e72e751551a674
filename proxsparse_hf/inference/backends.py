"""The 2:4 kernel backends: a registry of name -> kernel builder + availability check, and the three built in.

A backend turns a dense, exactly-2:4 weight ``[out, in]`` into a :class:`SparseKernel`: an object holding the
compressed weight and its matmul ``x2d [M, in] -> [M, out]``. Adding one is one builder and one registration::

    @register_backend("mykernel", description="...", check=lambda major, minor: "" if major >= 9 else "needs sm90")
    def _build_mykernel(weight: torch.Tensor, alg_id: int | Mapping[int, int]) -> SparseKernel:
        return MyKernel(weight)

Built in, in the order ``"auto"`` tries them:

* ``"cusparselt"`` — ``torch._cslt_sparse_mm`` on a ``torch._cslt_compress``-ed weight, computing ``(W @ X^T)^T`` with
  the transpose fused into the kernel's output layout and a cuSPARSELt algorithm chosen per token count. Under
  ``torch.compile`` the matmul is the registered operator ``torch.ops.proxsparse_hf.cslt_linear``
  (:mod:`proxsparse_hf.kernels.cusparselt_op`).
* ``"cutlass"`` — torch's CUTLASS semi-structured kernels (``SparseSemiStructuredTensor._FORCE_CUTLASS``), compute
  capability 8.x only.
* ``"torchao"`` — torchao's ``SemiSparseWeightConfig`` (optional extra ``proxsparse-hf[torchao]``); never picked by
  ``"auto"``.

``"auto"`` and ``"dense"`` (no sparse kernel) are names every backend argument takes besides the registered ones.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cusparselt_op import cslt_linear

logger = logging.getLogger(__name__)

__all__ = [
    "BackendSpec",
    "CusparseltKernel",
    "KernelBuilder",
    "SparseKernel",
    "SubclassKernel",
    "backend_choices",
    "backend_names",
    "build_kernel",
    "cusparselt_alg_count",
    "fp16_cusparselt_blocked",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "sparse_kernels_available",
]

AlgId = int | Mapping[int, int]  # one algorithm, or {tokens: algorithm}
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------------------------------
# the kernel interface
# --------------------------------------------------------------------------------------------------------------------
class SparseKernel:
    """Compressed 2:4 weight ``[out, in]`` plus its matmul ``x2d [M, in] -> [M, out]``.

    Attributes:
        name: the backend's name (what ``SparseLinear2to4.backend`` shows).
        dtype: the dtype of the compressed weight (inputs of another dtype are cast to it in memory mode).
        device_type: the device type inputs must be on for :meth:`mm` (a layer sends others to its dense weight).
    """

    name: str = "base"
    dtype: torch.dtype
    device_type: str = "cuda"

    def mm(self, x2d: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def decompress(self) -> torch.Tensor:
        """The dense weight ``[out, in]``, exactly."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed weight (kept values + metadata)."""
        raise NotImplementedError


KernelBuilder = Callable[[torch.Tensor, AlgId], SparseKernel]


def _runs_on_every_sparse_gpu(major: int, minor: int) -> str:
    return ""


# --------------------------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackendSpec:
    """One registered 2:4 kernel backend.

    Args:
        name: the name ``to_sparse_kernels(backend=...)`` takes.
        build: ``build(weight [out, in], alg_id) -> SparseKernel`` for an exactly-2:4 weight on its GPU.
        description: one line for listings.
        check: ``check(major, minor) -> reason`` on a CUDA device of that compute capability (>= 8.0 already
            checked): ``""`` when the backend runs there, else why not.
        requires: ``{python module: install hint}`` of optional packages the builder imports.
        shape_multiple: ``(rows, cols)`` that ``out_features`` / ``in_features`` must be multiples of.
        dtypes: weight dtypes the kernels take.
        auto: whether ``backend="auto"`` tries it (in registration order).
        uses_cusparselt: runs on cuSPARSELt, so float16 layers stay dense on cuSPARSELt versions whose fp16 kernels
            are known to fail (:func:`fp16_cusparselt_blocked`).
        alg_candidates: ``alg_candidates(dtype) -> ids`` of the kernel algorithms to time per token count (the
            kernel then has ``set_alg``); ``None`` when the backend has no algorithm choice.
    """

    name: str
    build: KernelBuilder
    description: str = ""
    check: Callable[[int, int], str] = _runs_on_every_sparse_gpu
    requires: Mapping[str, str] = field(default_factory=dict)
    shape_multiple: tuple[int, int] = (16, 16)
    dtypes: tuple[torch.dtype, ...] = _SUPPORTED_DTYPES
    auto: bool = False
    uses_cusparselt: bool = False
    alg_candidates: Callable[[torch.dtype], Sequence[int]] | None = None

    def unsupported_reason(self, weight: torch.Tensor) -> str:
        """Why a weight ``[out, in]`` cannot use this backend (dtype, known-broken fp16, shape); ``""`` if it can."""
        out_features, in_features = weight.shape
        if weight.dtype not in self.dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {weight.dtype} (2:4 kernels here take {names})"
        if weight.dtype == torch.float16 and self.uses_cusparselt and fp16_cusparselt_blocked():
            return (
                f"float16 kernels of cuSPARSELt {torch.backends.cusparselt.version()} failed or hung in our tests "
                f"(set PROXSPARSE_ALLOW_FP16_CUSPARSELT=1 to use them anyway; bfloat16 works)"
            )
        rows, cols = self.shape_multiple
        if out_features % rows or in_features % cols:
            return f"shape {out_features}x{in_features} is not a multiple of {rows}x{cols} as {self.name} needs"
        return ""


_REGISTRY: dict[str, BackendSpec] = {}
_RESERVED = ("auto", "dense")


def register_backend(
    name: str,
    *,
    description: str = "",
    check: Callable[[int, int], str] | None = None,
    requires: Mapping[str, str] | None = None,
    shape_multiple: tuple[int, int] = (16, 16),
    dtypes: tuple[torch.dtype, ...] = _SUPPORTED_DTYPES,
    auto: bool = False,
    uses_cusparselt: bool = False,
    alg_candidates: Callable[[torch.dtype], Sequence[int]] | None = None,
) -> Callable[[KernelBuilder], KernelBuilder]:
    """Decorator registering a kernel builder under ``name`` (the fields are those of :class:`BackendSpec`)."""

    def decorator(build: KernelBuilder) -> KernelBuilder:
        if name in _RESERVED or name in _REGISTRY:
            raise ValueError(f"`name`={name!r} is already taken; registered backends: {backend_names()}.")
        _REGISTRY[name] = BackendSpec(
            name=name,
            build=build,
            description=description,
            check=check if check is not None else _runs_on_every_sparse_gpu,
            requires=dict(requires or {}),
            shape_multiple=tuple(shape_multiple),
            dtypes=tuple(dtypes),
            auto=auto,
            uses_cusparselt=uses_cusparselt,
            alg_candidates=alg_candidates,
        )
        return build

    return decorator


def backend_names() -> tuple[str, ...]:
    """The registered kernel backends, in registration order (the order ``"auto"`` tries those marked ``auto``)."""
    return tuple(_REGISTRY)


def backend_choices() -> tuple[str, ...]:
    """Every value a ``backend`` argument takes: ``"auto"``, the registered backends, ``"dense"``."""
    return ("auto", *_REGISTRY, "dense")


def get_backend(name: str) -> BackendSpec:
    """The registered backend ``name`` (``ValueError`` listing the registered ones otherwise)."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"`backend`={name!r} is not one of the registered 2:4 kernel backends {backend_names()}.")
    return spec


def build_kernel(backend: str, weight: torch.Tensor, alg_id: AlgId = 0) -> SparseKernel:
    """The kernel of registered ``backend`` for an exactly-2:4 weight ``[out, in]`` (on its GPU)."""
    return get_backend(backend).build(weight, alg_id)


# --------------------------------------------------------------------------------------------------------------------
# availability and resolution
# --------------------------------------------------------------------------------------------------------------------
def sparse_kernels_available(
    backend: str = "cusparselt", device: torch.device | str | int | None = None
) -> tuple[bool, str]:
    """Whether ``backend`` can run 2:4 kernels on ``device`` (default: the current CUDA device), and why not."""
    choices = (*_REGISTRY, "dense")
    if backend not in choices:
        raise ValueError(f"`backend`={backend!r} is not one of {choices}.")
    if backend == "dense":
        return False, "the dense backend runs no sparse kernel"
    spec = _REGISTRY[backend]
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 has no sparse tensor cores"
    missing = _missing_requirement(spec)
    if missing:
        return False, f"{missing} is not installed ({spec.requires[missing]})"
    reason = spec.check(major, minor)
    return (not reason), reason


def _missing_requirement(spec: BackendSpec) -> str | None:
    """The first optional package of ``spec`` that does not import, if any."""
    for module in spec.requires:
        try:
            importlib.import_module(module)
        except ImportError:
            return module
    return None


def resolve_backend(backend: str = "auto", device: torch.device | str | int | None = None) -> str:
    """The backend ``to_sparse_kernels`` will use: ``"auto"`` tries the ``auto`` backends in order (cuSPARSELt, then
    CUTLASS), else ``"dense"``.

    An unavailable backend resolves to ``"dense"`` with a logged warning (never an exception), except a backend asked
    for by name whose optional package is missing, which raises ``ImportError`` with the install command.
    """
    choices = backend_choices()
    if backend not in choices:
        raise ValueError(f"`backend`={backend!r} is not one of {choices}.")
    if backend == "dense":
        return "dense"
    if backend == "auto":
        reasons = []
        for candidate in (spec.name for spec in _REGISTRY.values() if spec.auto):
            ok, why = sparse_kernels_available(candidate, device)
            if ok:
                return candidate
            reasons.append(f"{candidate}: {why}")
        logger.warning("2:4 sparse kernels are unavailable (%s); layers keep dense matmuls.", "; ".join(reasons))
        return "dense"
    ok, why = sparse_kernels_available(backend, device)
    if not ok:
        missing = _missing_requirement(_REGISTRY[backend])
        if missing:
            raise ImportError(f"backend={backend!r} needs {missing}: {why}")
        logger.warning("2:4 backend %r is unavailable (%s); layers keep dense matmuls.", backend, why)
        return "dense"
    return backend


# --------------------------------------------------------------------------------------------------------------------
# cuSPARSELt
# --------------------------------------------------------------------------------------------------------------------
# cuSPARSELt versions whose float16 kernels failed ("internal error" in the algorithm search, then a poisoned CUDA
# context) or hung on an H100 with torch 2.11; float16 layers stay dense there unless
# PROXSPARSE_ALLOW_FP16_CUSPARSELT=1.
_FP16_BROKEN_CUSPARSELT = (800,)
# float16 algorithms that ran correctly there (256x256 and 4096x4096 probes); the full sweep is left to bfloat16
_FP16_SAFE_ALGS = (0, 1, 4, 7, 17, 20)
# torch does not know the algorithm count of cuSPARSELt >= 0.7 (get_max_alg_id() is None there); 21 is what cuSPARSELt
# 0.8 reports for 16-bit inputs on Hopper. Ids a build does not have fail at plan time and are skipped.
_FALLBACK_ALG_COUNT = 21


def fp16_cusparselt_blocked() -> bool:
    """True when float16 layers are kept dense because this cuSPARSELt version's fp16 kernels are known to fail."""
    if os.environ.get("PROXSPARSE_ALLOW_FP16_CUSPARSELT") == "1" or not torch.backends.cusparselt.is_available():
        return False
    return torch.backends.cusparselt.version() in _FP16_BROKEN_CUSPARSELT


def cusparselt_alg_count() -> int:
    """How many cuSPARSELt algorithm ids to try (torch's count where it knows one, else :data:`_FALLBACK_ALG_COUNT`)."""
    getter = getattr(torch.backends.cusparselt, "get_max_alg_id", None)
    count = getter() if callable(getter) else None
    return int(count) if isinstance(count, int) and count > 0 else _FALLBACK_ALG_COUNT


def _cusparselt_alg_candidates(dtype: torch.dtype) -> Sequence[int]:
    return _FP16_SAFE_ALGS if dtype == torch.float16 else range(cusparselt_alg_count())


def _cusparselt_check(major: int, minor: int) -> str:
    return "" if torch.backends.cusparselt.is_available() else "this torch build has no cuSPARSELt"


class CusparseltKernel(SparseKernel):
    """A ``torch._cslt_compress``-ed weight run by ``torch._cslt_sparse_mm`` with a per-token-count algorithm."""

    name = "cusparselt"

    def __init__(self, weight: torch.Tensor, alg_id: AlgId = 0):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.packed = torch._cslt_compress(weight.contiguous())
        self.set_alg(alg_id)

    def set_alg(self, alg_id: AlgId) -> None:
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


@register_backend(
    "cusparselt",
    description="torch._cslt_sparse_mm (cuSPARSELt), algorithm chosen per token count",
    check=_cusparselt_check,
    auto=True,
    uses_cusparselt=True,
    alg_candidates=_cusparselt_alg_candidates,
)
def _build_cusparselt(weight: torch.Tensor, alg_id: AlgId = 0) -> SparseKernel:
    return CusparseltKernel(weight, alg_id)


# --------------------------------------------------------------------------------------------------------------------
# torch's semi-structured tensor subclass: CUTLASS, and cuSPARSELt through torchao
# --------------------------------------------------------------------------------------------------------------------
class SubclassKernel(SparseKernel):
    """torch ``SparseSemiStructuredTensor`` weights (CUTLASS, or cuSPARSELt through torchao) used via ``F.linear``."""

    def __init__(self, sparse_weight: torch.Tensor, name: str):
        self.weight = sparse_weight
        self.name = name
        self.dtype = sparse_weight.dtype

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


def _cutlass_check(major: int, minor: int) -> str:
    if major != 8:
        return f"torch's CUTLASS 2:4 kernels run on compute capability 8.x only (found {major}.{minor})"
    return ""


@register_backend(
    "cutlass",
    description="torch's CUTLASS semi-structured kernels (compute capability 8.x)",
    check=_cutlass_check,
    shape_multiple=(32, 64),
    auto=True,
)
def _build_cutlass(weight: torch.Tensor, alg_id: AlgId = 0) -> SparseKernel:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = True
    try:
        sparse = to_sparse_semi_structured(weight.contiguous())
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    return SubclassKernel(sparse, "cutlass")


def _torchao_sparsify() -> tuple[Callable[..., Any], Callable[[], Any]]:
    """torchao's ``sparsify_`` and its 2:4 weight config (``SemiSparseWeightConfig``; ``semi_sparse_weight`` before)."""
    try:
        from torchao.sparsity.sparse_api import SemiSparseWeightConfig, sparsify_
    except ImportError:  # older torchao
        from torchao.sparsity import semi_sparse_weight as SemiSparseWeightConfig  # noqa: N812
        from torchao.sparsity import sparsify_
    return sparsify_, SemiSparseWeightConfig


@register_backend(
    "torchao",
    description="torchao's SemiSparseWeightConfig (cuSPARSELt through torch's semi-structured subclass)",
    check=_cusparselt_check,
    requires={"torchao": "pip install 'proxsparse-hf[torchao]'"},
    uses_cusparselt=True,
)
def _build_torchao(weight: torch.Tensor, alg_id: AlgId = 0) -> SparseKernel:
    sparsify_, config = _torchao_sparsify()
    holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta"))
    holder[0].weight = nn.Parameter(weight.detach().contiguous().clone(), requires_grad=False)
    sparsify_(holder, config())
    return SubclassKernel(holder[0].weight.data, "torchao")
