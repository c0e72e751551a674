"""Fused Triton kernel for the per-weight training telemetry (same numbers as the torch path in
``proxsparse_hf.learning.telemetry``).

One pass over a contiguous 2-D weight view ``[rows, cols]`` (groups of 4 along the last dimension) reads every group
once and, in registers:

* counts the group's non-zeros (for the fraction of groups already 2:4);
* scores it (``|W|``, or ``|W * s|`` with a float32 column scale ``s``), finds its top-2 positions by the same rule as
  :func:`proxsparse_hf.masks.mask_2to4` (``rank_i = #{j : |x_j| > |x_i| or (|x_j| == |x_i| and j < i)}``, NaN counted
  as +inf, keep ``rank < 2``), writes the one-byte code of :func:`proxsparse_hf.masks.group_codes` (bit ``i`` set when
  position ``i`` is kept) and compares it with the previous call's code (mask flips);
* adds the 2:4 regulariser ``a0 a1 (a2 + a3) + a2 a3 (a0 + a1)`` of the scores (float32, as
  :func:`proxsparse_hf.learning.regularizers.regularizer_2to4`);
* optionally adds ``|W - W0|`` against an original whose rows are rows ``0, k, 2k, ...`` of the view (``k = 1``: the
  whole original, an exact distance; ``k > 1``: a cached row sample of a snapshot kept on another device).

Each program handles a tile of ``BLOCK_R`` rows x ``BLOCK_C`` groups (a 2-D grid, so no integer division per group;
the column scale is loaded once per tile and broadcast over its rows) and writes four float32 partial sums (ok count,
flips, regulariser, distance). Counts are exact in float32 within a program (at most ``TILE_GROUPS`` per tile); the
host adds the partials in float64. One launch per weight; the extra memory is one code byte per group (the result)
and 16 bytes per program. Triton is imported by this module only; never at package import.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_groups import split_groups_of_4

__all__ = ["MAX_BLOCK_COLS", "NUM_WARPS", "TILE_GROUPS", "group_statistics_triton"]

# groups per program: 2048 groups are 16 KiB of bf16 weights, enough bytes in flight per program for a memory-bound
# pass while the partial sums stay few (16 bytes per 2048 groups) and every count stays exact in float32
TILE_GROUPS = 2048
# groups of one row per tile at most (a row segment of 512 columns: 1 KiB of bf16, coalesced); narrower views get a
# tile as wide as their rows (a [N, 4] view: one group per row, TILE_GROUPS rows per tile)
MAX_BLOCK_COLS = 128
# a memory-bound pass: 4 warps keep 16 groups (64 values) per thread
NUM_WARPS = 4
# partial sums per program: ok count, flips, regulariser, distance
PARTIALS = 4

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _telemetry_kernel(
    x_ptr,
    scale_ptr,
    prev_ptr,
    orig_ptr,
    codes_ptr,
    partial_ptr,
    rows,
    cols,
    gpr,
    HAS_SCALE: tl.constexpr,
    HAS_PREV: tl.constexpr,
    HAS_ORIG: tl.constexpr,
    ORIG_STRIDE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    grp = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row = pid_r * BLOCK_R + r
    in_range = (row[:, None] < rows) & (grp[None, :] < gpr)  # [rows, groups] of the tile
    j = tl.arange(0, 4)
    first_row = pid_r.to(tl.int64) * BLOCK_R  # 64-bit tile bases; offsets inside a tile fit in 32 bits
    offs = (r * cols)[:, None, None] + (grp * 4)[None, :, None] + j[None, None, :]  # [rows, groups, 4]
    mask = tl.broadcast_to(in_range[:, :, None], (BLOCK_R, BLOCK_C, 4))
    w = tl.load(x_ptr + first_row * cols + offs, mask=mask, other=0.0).to(tl.float32)
    dist = tl.zeros((BLOCK_R, BLOCK_C, 4), dtype=tl.float32)
    if HAS_ORIG:  # rows 0, ORIG_STRIDE, 2 * ORIG_STRIDE, ... of the view, stored one after the other
        if ORIG_STRIDE == 1:
            o = tl.load(orig_ptr + first_row * cols + offs, mask=mask, other=0.0).to(tl.float32)
            dist = tl.abs(w - o)
        else:
            sampled = mask & ((row % ORIG_STRIDE) == 0)[:, None, None]
            orig_offs = ((row // ORIG_STRIDE).to(tl.int64) * cols)[:, None, None] + ((grp * 4)[None, :, None] + j)
            o = tl.load(orig_ptr + orig_offs, mask=sampled, other=0.0).to(tl.float32)
            dist = tl.where(sampled, tl.abs(w - o), 0.0)
    # non-zeros of the weights themselves (NaN counts as a non-zero, -0.0 as a zero)
    nonzero = tl.sum((w != 0.0).to(tl.int32), axis=2)
    scores = w
    if HAS_SCALE:  # one float32 scale per column, loaded once per tile and broadcast over its rows
        s = tl.load(scale_ptr + (grp * 4)[:, None] + j[None, :], mask=(grp < gpr)[:, None], other=1.0)
        scores = w * s[None, :, :]
    x0, x1, x2, x3 = split_groups_of_4(scores, BLOCK_R, BLOCK_C)
    m0 = tl.abs(x0)
    m1 = tl.abs(x1)
    m2 = tl.abs(x2)
    m3 = tl.abs(x3)
    reg = m0 * m1 * (m2 + m3) + m2 * m3 * (m0 + m1)  # NaN stays NaN, as in the torch regulariser
    # top-2 rule: NaN counts as +inf; j beats i when |x_j| > |x_i|, or when equal and j < i
    a0 = tl.where(m0 != m0, float("inf"), m0)
    a1 = tl.where(m1 != m1, float("inf"), m1)
    a2 = tl.where(m2 != m2, float("inf"), m2)
    a3 = tl.where(m3 != m3, float("inf"), m3)
    rank0 = (a1 > a0).to(tl.int32) + (a2 > a0).to(tl.int32) + (a3 > a0).to(tl.int32)
    rank1 = (a0 >= a1).to(tl.int32) + (a2 > a1).to(tl.int32) + (a3 > a1).to(tl.int32)
    rank2 = (a0 >= a2).to(tl.int32) + (a1 >= a2).to(tl.int32) + (a3 > a2).to(tl.int32)
    rank3 = (a0 >= a3).to(tl.int32) + (a1 >= a3).to(tl.int32) + (a2 >= a3).to(tl.int32)
    code = (rank0 < 2).to(tl.int32) + 2 * (rank1 < 2).to(tl.int32)
    code += 4 * (rank2 < 2).to(tl.int32) + 8 * (rank3 < 2).to(tl.int32)
    code = code.to(tl.uint8)
    code_offs = (r * gpr)[:, None] + grp[None, :]
    code_base = first_row * gpr
    tl.store(codes_ptr + code_base + code_offs, code, mask=in_range)
    ok = tl.sum(tl.sum((in_range & (nonzero <= 2)).to(tl.int32), axis=1), axis=0)
    if HAS_PREV:
        prev = tl.load(prev_ptr + code_base + code_offs, mask=in_range, other=0)
        flips = tl.sum(tl.sum((in_range & (prev != code)).to(tl.int32), axis=1), axis=0)
    else:
        flips = ok * 0
    reg_sum = tl.sum(tl.sum(tl.where(in_range, reg, 0.0), axis=1), axis=0)
    dist_sum = tl.sum(tl.sum(tl.sum(dist, axis=2), axis=1), axis=0)
    out = partial_ptr + (pid_r * tl.num_programs(1) + pid_c).to(tl.int64) * 4
    tl.store(out, ok.to(tl.float32))
    tl.store(out + 1, flips.to(tl.float32))
    tl.store(out + 2, reg_sum)
    tl.store(out + 3, dist_sum)


def group_statistics_triton(
    view: Tensor,
    column_scale: Tensor | None = None,
    previous_codes: Tensor | None = None,
    original: Tensor | None = None,
    original_row_stride: int = 1,
    *,
    tile_groups: int = TILE_GROUPS,
    num_warps: int = NUM_WARPS,
) -> tuple[Tensor, Tensor]:
    """The telemetry of one weight view in one kernel launch: ``(codes, sums)`` as
    :func:`proxsparse_hf.learning.telemetry.group_statistics` (see there), for a contiguous 2-D float32 / bfloat16 /
    float16 ``view`` whose last dimension is a multiple of 4.

    ``column_scale``: float32, one entry per column (contiguous). ``previous_codes``: uint8, one per group
    (contiguous). ``original``: contiguous, the rows ``0, k, 2k, ...`` of the view's original (``k =
    original_row_stride``, a power of two). All on ``view``'s device. Runs under ``TRITON_INTERPRET=1`` with CPU
    tensors too."""
    if view.dim() != 2 or not view.is_contiguous() or view.shape[1] % 4 != 0 or view.dtype not in _DTYPES:
        raise ValueError(
            f"expected a contiguous 2-D float32/bfloat16/float16 view with a multiple of 4 columns, got shape "
            f"{tuple(view.shape)}, dtype {view.dtype}."
        )
    stride = int(original_row_stride)
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"`original_row_stride`={original_row_stride} must be a power of two.")
    rows, cols = view.shape
    gpr = cols // 4
    if tile_groups < 1 or tile_groups & (tile_groups - 1):
        raise ValueError(f"`tile_groups`={tile_groups} must be a power of two.")
    block_c = min(MAX_BLOCK_COLS, tile_groups, triton.next_power_of_2(max(gpr, 1)))
    block_r = max(1, tile_groups // block_c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(gpr, block_c))
    codes = torch.empty(rows * gpr, dtype=torch.uint8, device=view.device)
    partials = torch.empty((grid[0] * grid[1], PARTIALS), dtype=torch.float32, device=view.device)
    if view.numel() == 0:
        return codes, torch.zeros(PARTIALS, dtype=torch.float64, device=view.device)
    if column_scale is not None and (column_scale.numel() != cols or not column_scale.is_contiguous()):
        raise ValueError(f"`column_scale` must be a contiguous vector of {cols} values.")
    if previous_codes is not None and (previous_codes.numel() != rows * gpr or not previous_codes.is_contiguous()):
        raise ValueError(f"`previous_codes` must be {rows * gpr} contiguous codes.")
    sampled = (rows + stride - 1) // stride
    if original is not None and (tuple(original.shape) != (sampled, cols) or not original.is_contiguous()):
        raise ValueError(f"`original` must be contiguous and shaped {(sampled, cols)}, got {tuple(original.shape)}.")
    # unused pointers get a placeholder tensor (their loads are compiled out)
    context = torch.cuda.device(view.device) if view.device.type == "cuda" else contextlib.nullcontext()
    with context:
        _telemetry_kernel[grid](
            view,
            codes if column_scale is None else column_scale,
            codes if previous_codes is None else previous_codes,
            view if original is None else original,
            codes,
            partials,
            rows,
            cols,
            gpr,
            HAS_SCALE=column_scale is not None,
            HAS_PREV=previous_codes is not None,
            HAS_ORIG=original is not None,
            ORIG_STRIDE=stride,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=num_warps,
        )
    return codes, partials.sum(dim=0, dtype=torch.float64)
