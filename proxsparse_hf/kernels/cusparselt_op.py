"""The cuSPARSELt 2:4 matmul as one registered operator, ``torch.ops.proxsparse_hf.cslt_linear``.

Eager calls go straight to :func:`cslt_linear`. Under ``torch.compile`` :class:`~proxsparse_hf.inference.layer.SparseLinear2to4`
calls the operator instead of ``torch._cslt_sparse_mm`` for one reason: Inductor lowers ``_cslt_sparse_mm`` as a
fallback whose input must have the exact strides it had when traced (a transposed view), and an input that is still
an unfused element-wise result (an RMSNorm's output, say) is then written out once per consumer. The q, k and v
projections of a decoder layer each got their own copy of the normed hidden states, gate and up two (measured on an
H200: the two norm kernels of a 7B layer at 8k tokens 0.13 ms instead of the dense model's 0.09 ms). This operator
is tagged ``flexible_layout`` and takes the row-major input, so Inductor realises the norm's output once and hands every
projection a view of it; the operator makes the input contiguous itself if it ever gets another layout.

Importing this module registers the operator (CUDA implementation and a shape-only fake for tracing); it needs no
GPU to import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["OP_NAME", "PAD_ROWS", "cslt_linear"]

OP_NAME = "proxsparse_hf::cslt_linear"
PAD_ROWS = 8  # the dense operand's rows must be a multiple of 8 for 16-bit types


def cslt_linear(
    x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, alg_id: int
) -> torch.Tensor:
    """``x2d @ W.T (+ bias)`` for a ``torch._cslt_compress``-ed 2:4 weight ``W`` of ``out_features`` rows.

    Computed as ``(W @ x2d.T).T`` with the transpose fused into the kernel's output (``x2d.T`` is a column-major view
    of the row-major input, no copy); rows are padded to a multiple of :data:`PAD_ROWS` when needed."""
    x2d = x2d.contiguous()
    rows = x2d.shape[0]
    pad = (-rows) % PAD_ROWS
    if pad:
        x2d = F.pad(x2d, (0, 0, 0, pad))
    out = torch._cslt_sparse_mm(packed, x2d.t(), bias, transpose_result=True, alg_id=alg_id)
    return out[:rows] if pad else out


def _fake(
    x2d: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int, alg_id: int
) -> torch.Tensor:
    return x2d.new_empty((x2d.shape[0], out_features))


if not hasattr(torch.ops.proxsparse_hf, "cslt_linear"):  # once per process, also if this module is reloaded
    torch.library.define(
        OP_NAME,
        "(Tensor x2d, Tensor packed, Tensor? bias, SymInt out_features, int alg_id) -> Tensor",
        tags=(torch.Tag.flexible_layout,),
    )
    torch.library.impl(OP_NAME, "CUDA")(cslt_linear)
    torch.library.register_fake(OP_NAME)(_fake)
