"""Per-weight telemetry of mask learning (what :meth:`MaskLearner.statistics` reports), with one implementation of each
rule.

:func:`group_statistics` returns, for one weight view with groups of 4 along its last dimension, the top-2 code of
every group and the sums the learner accumulates: groups with at most two non-zeros, codes that changed since the
previous call, the 2:4 regulariser and the distance to the original weights. On CUDA (contiguous view, Triton
installed) it is one fused kernel launch (:mod:`proxsparse_hf.kernels.triton_telemetry`); elsewhere the torch path
below, built from :func:`~proxsparse_hf.masks.mask_2to4`, :func:`~proxsparse_hf.masks.group_codes` and
:func:`~proxsparse_hf.learning.regularizers.regularizer_2to4`, gives the same numbers.

The distance can be estimated on a row sample: when the original-weight snapshot lives on another device than the
weights (the default ``snapshot_device="cpu"`` with weights on a GPU), reading it every call would copy the whole
snapshot to the device, so the learner caches rows ``0, k, 2k, ...`` (``k = DISTANCE_ROW_STRIDE``) of it on the
weights' device once (:func:`sample_rows`) and sums ``|W - W0|`` over those rows of the current weights.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..constants import SUPPORTED_M
from ..masks import group_codes, mask_2to4
from .regularizers import regularizer_2to4

__all__ = [
    "DISTANCE_ROW_STRIDE",
    "distance_row_stride",
    "group_statistics",
    "sample_rows",
    "scores",
    "uses_triton",
]

# the row sample of a snapshot held on another device: one row in 64 (1/64 of the snapshot cached on the weights'
# device, and of the distance's reads)
DISTANCE_ROW_STRIDE = 64

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def distance_row_stride(snapshot: Tensor, weight: Tensor) -> int:
    """Row stride of the distance to the original: 1 (exact, every row) when ``snapshot`` lives on ``weight``'s
    device, else :data:`DISTANCE_ROW_STRIDE` (an estimate on a row sample cached on ``weight``'s device)."""
    return 1 if snapshot.device == weight.device else DISTANCE_ROW_STRIDE


def sample_rows(tensor: Tensor, stride: int = DISTANCE_ROW_STRIDE) -> Tensor:
    """Rows ``0, stride, 2 * stride, ...`` of a 2-D ``tensor`` (row 0 at least, when it has a row), as a contiguous
    tensor on ``tensor``'s device: the original that :func:`group_statistics` takes with ``original_row_stride``."""
    if tensor.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(tensor.shape)}.")
    if stride < 1:
        raise ValueError(f"`stride`={stride} must be >= 1.")
    return tensor[::stride].contiguous()


def scores(view: Tensor, column_scale: Tensor | None = None) -> Tensor:
    """The values the top-2 rule and the regulariser act on: ``view`` (contiguous), or ``view.float() * column_scale``
    (the scale broadcast over the last dimension)."""
    return view.contiguous() if column_scale is None else view.float() * column_scale.to(view.device)


def uses_triton(
    view: Tensor,
    column_scale: Tensor | None = None,
    previous_codes: Tensor | None = None,
    original: Tensor | None = None,
) -> bool:
    """Whether :func:`group_statistics` runs the fused Triton kernel for these arguments: a contiguous 2-D CUDA view of
    float32/bfloat16/float16 with a whole number of groups, its companions contiguous on the same device, and Triton
    installed."""
    if view.device.type != "cuda" or view.dim() != 2 or view.numel() == 0 or not view.is_contiguous():
        return False
    if view.dtype not in _TRITON_DTYPES or view.shape[1] % SUPPORTED_M != 0:
        return False
    for extra in (column_scale, previous_codes, original):
        if extra is not None and (extra.device != view.device or not extra.is_contiguous()):
            return False
    if column_scale is not None and column_scale.numel() != view.shape[1]:
        return False  # the torch path broadcasts (or raises) as it always did
    if original is not None and original.dtype not in _TRITON_DTYPES:
        return False
    return _triton_available()


@torch.no_grad()
def group_statistics(
    view: Tensor,
    column_scale: Tensor | None = None,
    previous_codes: Tensor | None = None,
    *,
    original: Tensor | None = None,
    original_row_stride: int = 1,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Top-2 codes and telemetry sums of one weight view (groups of 4 along its last dimension).

    Args:
        view: the weights with the input dimension last (e.g. ``TargetShard.grouped(weight)``).
        column_scale: the importance measure's per-column scale ``s`` (float32, one per column), or None: the top-2
            rule and the regulariser then act on ``view.float() * s`` instead of ``view``.
        previous_codes: the codes this function returned for the same view at the previous call, or None.
        original: rows ``0, k, 2k, ...`` of the view's original weights (``k = original_row_stride``; ``k = 1``: the
            whole original, shaped like ``view``), on ``view``'s device, e.g. from :func:`sample_rows`; or None.
        original_row_stride: ``k`` above, a power of two (``view`` must be 2-D when ``k > 1``).
        backend: ``"auto"`` (the Triton kernel where :func:`uses_triton` allows it, else torch), ``"torch"`` or
            ``"triton"`` (raises ``RuntimeError`` where the kernel cannot run).

    Returns:
        ``(codes, sums)``: ``codes`` = ``group_codes(mask_2to4(scores))`` (uint8, one per group, in row-major group
        order); ``sums`` = float64 ``[groups of view with <= 2 non-zeros, codes different from previous_codes (0 when
        None), regularizer_2to4(scores), sum of |view[::k] - original|]`` (the distance in float32 per element; 0
        without ``original``), on ``view``'s device. Nothing is read back to the host.

    On CUDA (contiguous 2-D view, contiguous companions, Triton installed) one fused kernel pass computes everything;
    otherwise (CPU, non-contiguous views such as a ``Conv1D``'s transposed one) the torch path does, with the same
    rules: ties keep the lower index, NaN counts as the largest magnitude. The kernel's regulariser and distance are
    float32 sums per tile of groups added in float64, so they differ from the torch path's in rounding only.
    """
    stride = int(original_row_stride)
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"`original_row_stride`={original_row_stride} must be a power of two.")
    if stride > 1 and view.dim() != 2:
        raise ValueError(f"a row-sampled original needs a 2-D view, got shape {tuple(view.shape)}.")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"`backend` must be 'auto', 'torch' or 'triton', got {backend!r}.")
    kernel = backend != "torch" and uses_triton(view, column_scale, previous_codes, original)
    if backend == "triton" and not kernel:
        raise RuntimeError(
            "backend='triton' needs Triton and a contiguous 2-D CUDA view (float32/bfloat16/float16) with its column "
            "scale, previous codes and original contiguous on the same device."
        )
    if kernel:
        from ..kernels.triton_telemetry import group_statistics_triton

        scale = None if column_scale is None else column_scale.float()
        return group_statistics_triton(view, scale, previous_codes, original, stride)
    nonzero = (view.reshape(-1, SUPPORTED_M) != 0).sum(dim=1)
    values = scores(view, column_scale)
    codes = group_codes(mask_2to4(values))  # the kept positions of every group, a byte each
    flips = (previous_codes != codes).sum() if previous_codes is not None else nonzero.new_zeros(())
    if original is None:
        dist = torch.zeros((), dtype=torch.float32, device=view.device)
    else:
        kept = view if stride == 1 else view[::stride]
        dist = (kept.float() - original.to(view.device).float()).abs().sum()
    sums = torch.stack(
        [(nonzero <= 2).sum().double(), flips.double(), regularizer_2to4(values).double(), dist.double()]
    )
    return codes, sums
