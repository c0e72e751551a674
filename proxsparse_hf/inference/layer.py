"""The 2:4 linear layer: a dense-weight module that runs its matmul on a sparse kernel from a token-count threshold on.

Dispatch: calls with at least ``min_tokens`` rows go to the sparse kernel, smaller ones (decode) to ``F.linear`` on the
dense weight, as cheap as ``nn.Linear``'s own forward. A layer tuned for CUDA graphs can carry a second threshold for
calls that run eagerly. ``mode="speed"`` keeps the dense weight next to the compressed one (1.56x the dense weight bytes
for 16-bit weights); ``mode="memory"`` keeps only the compressed weight (0.56x) and always runs the sparse kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layout import input_last
from ..masks import fraction_2to4_groups, is_2to4
from .backends import AlgId, SparseKernel, build_kernel
from .tuning import NEVER

__all__ = ["MODES", "SparseLinear2to4", "check_2to4"]

MODES = ("speed", "memory")


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
        backend: the registered backend of its kernel (``"cusparselt"``, ``"cutlass"``, ``"torchao"``, ...) or
            ``"dense"`` (no kernel).
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
        kernel: SparseKernel | None,
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
        alg_id: AlgId = 0,
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
        grouped = input_last(weight.detach(), transposed)
        check_2to4(grouped, name or type(module).__name__)
        out_features, in_features = grouped.shape
        kernel = None if backend == "dense" else build_kernel(backend, grouped, alg_id)
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
            weight = nn.Parameter(input_last(dense, self.transposed).contiguous(), requires_grad=False)
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
            kernel_dtype = self._kernel.dtype
            if dtype != kernel_dtype:
                x2d = x2d.to(kernel_dtype)
            if bias is not None and bias.dtype != kernel_dtype:
                bias = bias.to(kernel_dtype)
        out = self._kernel.mm(x2d, bias)
        return out.to(dtype).view(*x.shape[:-1], self.out_features)

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
            x.device.type != self._kernel.device_type
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
        dtype = self.weight.dtype if self.weight is not None else self._kernel.dtype
        return self.in_features * self.out_features * torch.empty((), dtype=dtype).element_size()


def check_2to4(grouped: torch.Tensor, name: str) -> None:
    """``ValueError`` naming layer ``name`` unless ``grouped`` (``[out, in]``) is exactly 2:4 along its input dim."""
    if grouped.dim() != 2 or grouped.shape[-1] % 4 != 0 or not is_2to4(grouped):
        frac = fraction_2to4_groups(grouped) if grouped.dim() == 2 and grouped.shape[-1] % 4 == 0 else 0.0
        raise ValueError(
            f"Layer `{name}` (weight {tuple(grouped.shape)} as [out, in]) is not 2:4 sparse along its input "
            f"dimension: "
            f"{frac:.2%} of its groups of 4 have at most 2 non-zeros. Apply a 2:4 mask first "
            f"(proxsparse_hf.apply_2to4_masks) or leave the layer out with `filter_fn`."
        )
