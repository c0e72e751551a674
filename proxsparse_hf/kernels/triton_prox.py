"""Fused Triton kernel for the exact 2:4 prox (same algorithm as the torch path in ``proxsparse_hf.learning.prox``).

Every group of 4 is read once into registers, solved in float32 and written back once, in place.

Two passes, compiled separately from one kernel, share one tile solver:

1. the *fast* pass (one program per tile) runs projected coordinate descent on the groups certified convex
   (``2 * lam * (sum|v| - min|v|) < 1``, every group at LLM weight scale) with a per-group stop once the
   a-posteriori bound on the distance to the minimiser is below ``tol * max|v|``. A tile whose groups all pass writes
   its result; a tile holding any group it cannot certify (non-convex, or not converged within ``max_iter``) writes
   nothing and raises a one-byte flag.
2. the *exact* pass: each program reads 16-1024 flags (by plan size) in one vector load and solves only the flagged
   tiles among them, so with no flag raised the pass is a few waves of tiny programs, not one program per tile (its
   register-heavy programs fit few per SM: one per tile cost a large share of the fast pass's time). It runs the same
   descent and solves the remaining groups exactly from the candidate supports of the sorted magnitudes: the two
   largest, the unique interior minimum on the three-largest face (bisection on a 1-D profile whose derivative is
   increasing on a bracket we locate), and the four-support face (coordinate descent from two starts, each
   Newton-polished, and pure Newton from the three-support point and from |v|/2 and |v|/4).

Many weights are solved by one launch per pass: :class:`TritonProxPlan` keeps a small table (pointer, shape, strides,
column scale, λ multiplier of every weight, and where its tiles start) on the GPU, plus the owning weight of every tile;
each program of the grid reads its weight's row, then its tile of ``BLOCK_ROWS x BLOCK_COLS`` groups (rows x groups
within a row, held as a groups x rows x 4 block, so that with the default launch each thread holds one group column
of every row of the tile and loads a column scale once) without any integer division per group. A training step therefore
costs two kernel launches whatever the number of target matrices, instead of two per matrix (whose host-side launch
cost exceeded the GPU work on 7B-sized layers).

Extra memory, allocated once per plan: one flag byte per tile (of ``BLOCK_ROWS * BLOCK_COLS`` groups), plus four
bytes per tile naming its weight when the plan has several, 80 bytes per weight, and 8 bytes per column of a weight
with a column scale (its copy of ``s`` and ``1 / s``). Triton is imported by this module
only; never at package import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..layout import as_2d, per_weight
from .magic import division_magic
from .triton_groups import split_groups_of_4

__all__ = ["TritonProxPlan", "prox_2to4_triton_"]

# launch configuration: the fastest of 21 tiles x warps x check intervals on an H200 (benchmarks/prox_kernel.py
# --sweep, benchmarks/results/prox_kernel_h200.json): a program is one warp solving BLOCK_ROWS rows x BLOCK_COLS groups
# (four groups per thread; one warp reduces without shared memory or barriers)
BLOCK_ROWS = 4
BLOCK_COLS = 32
NUM_WARPS = 1
CHECK_EVERY = 4
# int64 columns of the weight table: pointer, scale pointer, first tile, rows, groups per row, row stride, column
# stride, λ multiplier (float32 bits), and the multiplier and shift that divide a tile index by the column tiles
TABLE_COLUMNS: tl.constexpr = tl.constexpr(10)
# flags read at once by one program of the exact pass: enough programs to fill the GPU several times over when every
# tile is flagged, few enough that the pass is a handful of waves when none is
SCAN_MIN, SCAN_MAX, SCAN_PROGRAMS_PER_SM = 16, 1024, 8
BISECT_ITERS = 40
NEWTON_ITERS = 8


@triton.jit
def _e2(x, y, z):
    return x * (y + z) + y * z


@triton.jit
def _objective(w0, w1, w2, w3, a0, a1, a2, a3, lam):
    d0 = w0 - a0
    d1 = w1 - a1
    d2 = w2 - a2
    d3 = w3 - a3
    e3 = w0 * w1 * (w2 + w3) + w2 * w3 * (w0 + w1)
    return 0.5 * (d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3) + lam * e3


@triton.jit
def _sweep(w0, w1, w2, w3, a0, a1, a2, a3, lam):
    w0 = tl.maximum(a0 - lam * _e2(w1, w2, w3), 0.0)
    w1 = tl.maximum(a1 - lam * _e2(w0, w2, w3), 0.0)
    w2 = tl.maximum(a2 - lam * _e2(w0, w1, w3), 0.0)
    w3 = tl.maximum(a3 - lam * _e2(w0, w1, w2), 0.0)
    return w0, w1, w2, w3


@triton.jit
def _descent(
    w0, w1, w2, w3, a0, a1, a2, a3, lam, num, den, thresh, watch, extra, max_iter,
    CHECK: tl.constexpr, FREEZE: tl.constexpr,
):  # fmt: skip
    """Coordinate descent of the ``watch``-ed groups, CHECK sweeps between checks; a group passes at the first check
    where ``num * max|step| <= thresh * den`` (``num / den``: its contraction gain). ``FREEZE``: a group's result is
    the iterate of the check it passed (else the last iterate, which the contraction keeps at least as close to the
    minimiser; cheaper). Stops once every group has passed, once ``max_iter`` sweeps leave no room for another check,
    or at once when ``extra`` (an int32 per group, 0 or 2) is 2 anywhere. Returns the iterates, ``done`` per group and
    ``state``, the block's maximum of ``extra | (not done)`` at the last check (1 before the first)."""
    r0, r1, r2, r3 = w0, w1, w2, w3
    done = watch == 0
    state = 1
    sweep = 0
    going = CHECK <= max_iter
    while going:
        for _ in tl.static_range(CHECK - 1):
            w0, w1, w2, w3 = _sweep(w0, w1, w2, w3, a0, a1, a2, a3, lam)
        p0, p1, p2, p3 = w0, w1, w2, w3
        w0, w1, w2, w3 = _sweep(w0, w1, w2, w3, a0, a1, a2, a3, lam)
        sweep += CHECK
        step = tl.maximum(tl.maximum(tl.abs(w0 - p0), tl.abs(w1 - p1)), tl.maximum(tl.abs(w2 - p2), tl.abs(w3 - p3)))
        passed = step * num <= thresh * den
        if FREEZE:
            newly = passed & (done == 0)
            r0 = tl.where(newly, w0, r0)
            r1 = tl.where(newly, w1, r1)
            r2 = tl.where(newly, w2, r2)
            r3 = tl.where(newly, w3, r3)
        done = done | passed
        state = tl.max((done == 0).to(tl.int32) | extra, axis=None)
        going = (state == 1) & (sweep + CHECK <= max_iter)
    if FREEZE:
        w0 = tl.where(done, r0, w0)
        w1 = tl.where(done, r1, w1)
        w2 = tl.where(done, r2, w2)
        w3 = tl.where(done, r3, w3)
    return w0, w1, w2, w3, done, state


@triton.jit
def _cswap(x, ix, y, iy):
    """Order (x, ix) before (y, iy): larger value first, lower index first among equal values."""
    swap = (y > x) | ((y == x) & (iy < ix))
    return tl.where(swap, y, x), tl.where(swap, iy, ix), tl.where(swap, x, y), tl.where(swap, ix, iy)


@triton.jit
def _m(x, alpha, beta, distinct):
    left = tl.where(distinct, alpha / ((1.0 - x) * (1.0 - x) * (1.0 - x)), 0.0)
    return left + beta / ((1.0 + x) * (1.0 + x) * (1.0 + x))


@triton.jit
def _dpsi(x, alpha, beta, distinct, a3, lam):
    left = tl.where(distinct, alpha / ((1.0 - x) * (1.0 - x)), 0.0)
    return x / lam - a3 - (0.5 * lam) * (left - beta / ((1.0 + x) * (1.0 + x)))


@triton.jit
def _face3(s0, s1, s2, lam, BISECT: tl.constexpr):
    """Unique interior minimum on the face of the three largest magnitudes (see the torch path for the derivation)."""
    alpha = 0.5 * (s0 - s1) * (s0 - s1)
    beta = 0.5 * (s0 + s1) * (s0 + s1)
    inv = 1.0 / (lam * lam)
    distinct = alpha > 0
    xmax = tl.minimum(lam * s2, s1 / tl.maximum(s0, 1.1754943508222875e-38))
    r = tl.sqrt(tl.sqrt(beta / tl.maximum(alpha, 1.1754943508222875e-38)))
    xm = tl.where(distinct, (r - 1.0) / (r + 1.0), 1.0)
    left_hi = tl.minimum(xm, xmax)
    nonempty = _m(left_hi, alpha, beta, distinct) < inv
    need_left = _m(xm * 0.0, alpha, beta, distinct) >= inv
    lo = xm * 0.0
    hi = left_hi
    for _ in range(BISECT):
        mid = 0.5 * (lo + hi)
        above = _m(mid, alpha, beta, distinct) >= inv
        lo = tl.where(above, mid, lo)
        hi = tl.where(above, hi, mid)
    x_left = tl.where(need_left, hi, 0.0)
    need_right = (xmax > xm) & (_m(xmax, alpha, beta, distinct) >= inv)
    lo = left_hi
    hi = xmax
    for _ in range(BISECT):
        mid = 0.5 * (lo + hi)
        above = _m(mid, alpha, beta, distinct) >= inv
        lo = tl.where(above, lo, mid)
        hi = tl.where(above, mid, hi)
    x_right = tl.where(need_right, lo, xmax)
    valid = nonempty & (_dpsi(x_left, alpha, beta, distinct, s2, lam) < 0)
    valid = valid & (_dpsi(x_right, alpha, beta, distinct, s2, lam) > 0)
    lo = x_left
    hi = x_right
    for _ in range(BISECT):
        mid = 0.5 * (lo + hi)
        pos = _dpsi(mid, alpha, beta, distinct, s2, lam) > 0
        lo = tl.where(pos, lo, mid)
        hi = tl.where(pos, mid, hi)
    x = 0.5 * (lo + hi)
    half_sum = 0.5 * (s0 + s1) / (1.0 + x)
    half_diff = tl.where(distinct, 0.5 * (s0 - s1) / (1.0 - x), 0.0)
    w0 = half_sum + half_diff
    w1 = half_sum - half_diff
    w2 = x / lam
    valid = valid & (w1 > 0) & (w2 > 0)
    return w0, w1, w2, valid


@triton.jit
def _newton_polish(w0, w1, w2, w3, s0, s1, s2, s3, lam, NEWTON: tl.constexpr):
    """Newton steps on the four-support stationary system; keeps w unless the polished point is better and inside."""
    x0, x1, x2, x3 = w0, w1, w2, w3
    for _ in range(NEWTON):
        g0 = x0 - s0 + lam * _e2(x1, x2, x3)
        g1 = x1 - s1 + lam * _e2(x0, x2, x3)
        g2 = x2 - s2 + lam * _e2(x0, x1, x3)
        g3 = x3 - s3 + lam * _e2(x0, x1, x2)
        t = x0 + x1 + x2 + x3
        h01 = lam * (t - x0 - x1)
        h02 = lam * (t - x0 - x2)
        h03 = lam * (t - x0 - x3)
        h12 = lam * (t - x1 - x2)
        h13 = lam * (t - x1 - x3)
        h23 = lam * (t - x2 - x3)
        # unit-diagonal symmetric solve by LDL^T
        l10 = h01
        l20 = h02
        l30 = h03
        d1 = 1.0 - l10 * l10
        l21 = (h12 - l20 * l10) / d1
        l31 = (h13 - l30 * l10) / d1
        d2 = 1.0 - l20 * l20 - l21 * l21 * d1
        l32 = (h23 - l30 * l20 - l31 * l21 * d1) / d2
        d3 = 1.0 - l30 * l30 - l31 * l31 * d1 - l32 * l32 * d2
        y0 = g0
        y1 = g1 - l10 * y0
        y2 = g2 - l20 * y0 - l21 * y1
        y3 = g3 - l30 * y0 - l31 * y1 - l32 * y2
        z3 = y3 / d3
        z2 = y2 / d2 - l32 * z3
        z1 = y1 / d1 - l21 * z2 - l31 * z3
        z0 = y0 - l10 * z1 - l20 * z2 - l30 * z3
        x0 = x0 - z0
        x1 = x1 - z1
        x2 = x2 - z2
        x3 = x3 - z3
    inside = (x0 > 0) & (x1 > 0) & (x2 > 0) & (x3 > 0) & (x0 <= s0) & (x1 <= s1) & (x2 <= s2) & (x3 <= s3)
    inside = inside & (x0 == x0) & (x1 == x1) & (x2 == x2) & (x3 == x3)
    inside = inside & (tl.abs(x0) < float("inf")) & (tl.abs(x1) < float("inf"))
    inside = inside & (tl.abs(x2) < float("inf")) & (tl.abs(x3) < float("inf"))
    f_old = _objective(w0, w1, w2, w3, s0, s1, s2, s3, lam)
    f_new = _objective(x0, x1, x2, x3, s0, s1, s2, s3, lam)
    better = inside & (f_new < f_old)
    return tl.where(better, x0, w0), tl.where(better, x1, w1), tl.where(better, x2, w2), tl.where(better, x3, w3)


@triton.jit
def _pick(best, b0, b1, b2, b3, f, c0, c1, c2, c3):
    take = f < best
    return (
        tl.where(take, f, best),
        tl.where(take, c0, b0),
        tl.where(take, c1, b1),
        tl.where(take, c2, b2),
        tl.where(take, c3, b3),
    )


@triton.jit
def _exact(a0, a1, a2, a3, lam, tol, max_iter, CHECK: tl.constexpr, BISECT: tl.constexpr, NEWTON: tl.constexpr):
    """Exact prox of non-negative magnitudes by candidate supports; returns w in the original positions."""
    i0 = tl.zeros_like(a0.to(tl.int32))
    i1 = i0 + 1
    i2 = i0 + 2
    i3 = i0 + 3
    s0, j0, s1, j1 = _cswap(a0, i0, a1, i1)
    s2, j2, s3, j3 = _cswap(a2, i2, a3, i3)
    s0, j0, s2, j2 = _cswap(s0, j0, s2, j2)
    s1, j1, s3, j3 = _cswap(s1, j1, s3, j3)
    s1, j1, s2, j2 = _cswap(s1, j1, s2, j2)
    zero = s0 * 0.0
    # candidate: the two largest
    b0, b1, b2, b3 = s0, s1, zero, zero
    best = 0.5 * (s2 * s2 + s3 * s3)
    # candidate: the face of the three largest
    t0, t1, t2, ok3 = _face3(s0, s1, s2, lam, BISECT)
    f3 = tl.where(ok3, _objective(t0, t1, t2, zero, s0, s1, s2, s3, lam), float("inf"))
    best, b0, b1, b2, b3 = _pick(best, b0, b1, b2, b3, f3, t0, t1, t2, zero)
    # candidates on the four-support face: descent from s and from s scaled to the all-equal stationary point
    thresh = tol * s0
    one = zero + 1.0
    watch = s0 >= 0
    c0, c1, c2, c3, _d, _s = _descent(
        s0, s1, s2, s3, s0, s1, s2, s3, lam, one, one, thresh, watch, 0, max_iter, CHECK, True
    )
    c0, c1, c2, c3 = _newton_polish(c0, c1, c2, c3, s0, s1, s2, s3, lam, NEWTON)
    fc = _objective(c0, c1, c2, c3, s0, s1, s2, s3, lam)
    best, b0, b1, b2, b3 = _pick(best, b0, b1, b2, b3, fc, c0, c1, c2, c3)
    mean = 0.25 * (s0 + s1 + s2 + s3)
    gamma = 2.0 / (1.0 + tl.sqrt(1.0 + (12.0 * lam) * mean))
    c0, c1, c2, c3, _d, _s = _descent(
        s0 * gamma, s1 * gamma, s2 * gamma, s3 * gamma, s0, s1, s2, s3, lam, one, one, thresh, watch, 0, max_iter,
        CHECK, True,
    )  # fmt: skip
    c0, c1, c2, c3 = _newton_polish(c0, c1, c2, c3, s0, s1, s2, s3, lam, NEWTON)
    fc = _objective(c0, c1, c2, c3, s0, s1, s2, s3, lam)
    best, b0, b1, b2, b3 = _pick(best, b0, b1, b2, b3, fc, c0, c1, c2, c3)
    # Newton from the three-support point and from scaled starts (shallow interior minima the descent misses)
    c0, c1, c2, c3 = _newton_polish(t0, t1, t2, zero, s0, s1, s2, s3, lam, NEWTON)
    fc = _objective(c0, c1, c2, c3, s0, s1, s2, s3, lam)
    best, b0, b1, b2, b3 = _pick(best, b0, b1, b2, b3, fc, c0, c1, c2, c3)
    c0, c1, c2, c3 = _newton_polish(0.5 * s0, 0.5 * s1, 0.5 * s2, 0.5 * s3, s0, s1, s2, s3, lam, NEWTON)
    fc = _objective(c0, c1, c2, c3, s0, s1, s2, s3, lam)
    best, b0, b1, b2, b3 = _pick(best, b0, b1, b2, b3, fc, c0, c1, c2, c3)
    c0, c1, c2, c3 = _newton_polish(0.25 * s0, 0.25 * s1, 0.25 * s2, 0.25 * s3, s0, s1, s2, s3, lam, NEWTON)
    fc = _objective(c0, c1, c2, c3, s0, s1, s2, s3, lam)
    best, b0, b1, b2, b3 = _pick(best, b0, b1, b2, b3, fc, c0, c1, c2, c3)
    # back to the original positions
    o0 = tl.where(j0 == 0, b0, tl.where(j1 == 0, b1, tl.where(j2 == 0, b2, b3)))
    o1 = tl.where(j0 == 1, b0, tl.where(j1 == 1, b1, tl.where(j2 == 1, b2, b3)))
    o2 = tl.where(j0 == 2, b0, tl.where(j1 == 2, b1, tl.where(j2 == 2, b2, b3)))
    o3 = tl.where(j0 == 3, b0, tl.where(j1 == 3, b1, tl.where(j2 == 3, b2, b3)))
    return o0, o1, o2, o3


@triton.jit
def _solve_tile(
    tile,
    table,
    owners,
    flags,
    lam,
    tol,
    max_iter,
    DTYPE: tl.constexpr,
    EXACT: tl.constexpr,
    SCALED: tl.constexpr,
    UNIT_COL: tl.constexpr,
    WIDE: tl.constexpr,
    ONE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHECK: tl.constexpr,
    BISECT: tl.constexpr,
    NEWTON: tl.constexpr,
):
    """Solve tile ``tile`` of the plan in place. Fast (``EXACT`` false): writes its result when every group is
    certified, else writes nothing and raises the tile's flag. Exact: solves every group and writes."""
    if ONE:  # a one-weight plan has no owner list
        entry = table
    else:
        entry = table + tl.load(owners + tile) * TABLE_COLUMNS  # the table row of this tile's weight
    if UNIT_COL:  # the plan puts only weights whose groups start at 4-element-aligned addresses here
        ptr = tl.multiple_of(tl.load(entry).to(tl.pointer_type(DTYPE)), 16)
    else:
        ptr = tl.load(entry).to(tl.pointer_type(DTYPE))
    local = tile - tl.load(entry + 2).to(tl.int32)
    t_lam = lam * tl.load(entry + 7).to(tl.int32).to(tl.float32, bitcast=True)  # lam x the weight's multiplier
    if WIDE:
        rows = tl.load(entry + 3)
        gpr = tl.load(entry + 4)
        stride_row = tl.load(entry + 5)
        stride_col = tl.load(entry + 6)
    else:
        rows = tl.load(entry + 3).to(tl.int32)
        gpr = tl.load(entry + 4).to(tl.int32)
        stride_row = tl.load(entry + 5).to(tl.int32)
        stride_col = tl.load(entry + 6).to(tl.int32)
    # tile_row = local // column tiles, as a multiply-shift by the plan's magic number (exact for local < 2**31)
    tile_row = ((local.to(tl.int64) * tl.load(entry + 8)) >> tl.load(entry + 9)).to(tl.int32)
    tile_col = local - tile_row * ((gpr + BLOCK_C - 1) // BLOCK_C).to(tl.int32)
    row = tile_row * BLOCK_R + tl.arange(0, BLOCK_R)
    grp = tile_col * BLOCK_C + tl.arange(0, BLOCK_C)
    in_range = (grp[:, None] < gpr) & (row[None, :] < rows)  # [groups, rows] of the tile
    j = tl.arange(0, 4)[None, None, :]
    col = (grp * 4)[:, None, None] + j  # the tile's columns, [groups, 1, 4]
    if UNIT_COL:  # contiguous groups: one vector load per group (row strides are multiples of 4, see the plan)
        offs = tl.multiple_of(row * stride_row, 4)[None, :, None] + col
    else:
        offs = row[None, :, None] * stride_row + col * stride_col
    mask = tl.broadcast_to(in_range[:, :, None], (BLOCK_C, BLOCK_R, 4))
    raw = tl.load(ptr + offs, mask=mask, other=0.0)
    v = raw.to(tl.float32)
    if SCALED:  # prox in the coordinates W * s (s per column), result times 1 / s on the way out
        # the plan stores s then 1 / s; loaded once per group column and broadcast over the tile's rows
        scale_ptr = tl.multiple_of(tl.load(entry + 1).to(tl.pointer_type(tl.float32)), 16)  # the plan's own copy
        scale_ptr = scale_ptr + col
        cmask = (grp < gpr)[:, None, None]
        s = tl.broadcast_to(tl.load(scale_ptr, mask=cmask, other=1.0), (BLOCK_C, BLOCK_R, 4))
        inv_s = tl.broadcast_to(tl.load(scale_ptr + 4 * gpr, mask=cmask, other=1.0), (BLOCK_C, BLOCK_R, 4))
        v = v * s
    v0, v1, v2, v3 = split_groups_of_4(v, BLOCK_C, BLOCK_R)
    a0 = tl.abs(v0)
    a1 = tl.abs(v1)
    a2 = tl.abs(v2)
    a3 = tl.abs(v3)
    lo01 = tl.minimum(a0, a1)
    hi01 = tl.maximum(a0, a1)
    lo23 = tl.minimum(a2, a3)
    hi23 = tl.maximum(a2, a3)
    amin = tl.minimum(lo01, lo23)
    amax = tl.maximum(hi01, hi23)
    # more than two non-zeros <=> the second smallest magnitude is non-zero
    active = (tl.minimum(tl.maximum(lo01, lo23), tl.minimum(hi01, hi23)) > 0) & in_range
    rho = (2.0 * t_lam) * (a0 + a1 + a2 + a3 - amin)
    convex = rho < 1.0
    thresh = tol * amax
    watch = active & convex
    if EXACT:  # descend the convex groups to the end, then solve the others from their candidate supports
        extra = tl.zeros_like(in_range.to(tl.int32))
    else:  # an active group not certified convex sends the tile to the exact pass: the descent stops at its first
        # check (whose block-wide reduction sees it) and the tile is flagged
        extra = (active & (convex == 0)).to(tl.int32) * 2
    # stop test rho / (1 - rho) * max|step| <= thresh, without the division. Groups that are not watched keep their
    # values through the sweeps (at most two non-zeros: a fixed point of the sweep), so the fast pass, which writes
    # nothing unless every group passed, can take the last iterate (FREEZE false)
    w0, w1, w2, w3, done, state = _descent(
        a0, a1, a2, a3, a0, a1, a2, a3, t_lam, rho, 1.0 - rho, thresh, watch, extra, max_iter, CHECK, EXACT
    )
    write = True
    if EXACT:
        pending = active & ((convex & done) == 0)
        e0, e1, e2, e3 = _exact(a0, a1, a2, a3, t_lam, tol, max_iter, CHECK, BISECT, NEWTON)
        w0 = tl.where(pending, e0, w0)
        w1 = tl.where(pending, e1, w1)
        w2 = tl.where(pending, e2, w2)
        w3 = tl.where(pending, e3, w3)
    else:
        if state != 0:  # a group not certified convex, or not converged within max_iter
            tl.store(flags + tile, 1)
            write = False
    if write:
        out = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_C, BLOCK_R, 4))
        if SCALED:
            out = out * inv_s
        # restore signs by copying the sign bit of what was read, in the weight's own format (w >= 0, never -0.0):
        # zeros are written back as read, -0.0 included
        if DTYPE.primitive_bitwidth == 16:
            bits = out.to(DTYPE).to(tl.uint16, bitcast=True) | (raw.to(tl.uint16, bitcast=True) & 0x8000)
        else:
            bits = out.to(DTYPE).to(tl.uint32, bitcast=True) | (raw.to(tl.uint32, bitcast=True) & 0x80000000)
        tl.store(ptr + offs, bits.to(DTYPE, bitcast=True), mask=mask)


@triton.jit
def _prox_kernel(
    table,
    owners,
    flags,
    n_tiles,
    lam,
    tol,
    max_iter,
    DTYPE: tl.constexpr,
    EXACT: tl.constexpr,
    SCALED: tl.constexpr,
    UNIT_COL: tl.constexpr,
    WIDE: tl.constexpr,
    ONE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHECK: tl.constexpr,
    BISECT: tl.constexpr,
    NEWTON: tl.constexpr,
    SCAN: tl.constexpr,
):
    """Pass 1 (``EXACT`` false): one program per tile. Pass 2: each program reads SCAN flags at once and solves the
    flagged tiles among them exactly, one after the other, then clears their flags (left zeroed for the plan's next
    run); with no flag raised a program is one vector load and a sum. The two passes compile separately (``EXACT`` is a
    constant), so the fast pass keeps its small register count."""
    if EXACT:
        idx = tl.program_id(0) * SCAN + tl.arange(0, SCAN)
        flagged = tl.load(flags + idx, mask=idx < n_tiles, other=0).to(tl.int32)
        count = tl.sum(flagged, axis=0)
        if count > 0:
            rank = tl.cumsum(flagged, axis=0)
            k = count * 0
            while k < count:
                k += 1
                tile = tl.sum(tl.where((flagged > 0) & (rank == k), idx, 0), axis=0)
                _solve_tile(
                    tile, table, owners, flags, lam, tol, max_iter,
                    DTYPE, True, SCALED, UNIT_COL, WIDE, ONE, BLOCK_R, BLOCK_C, CHECK, BISECT, NEWTON,
                )  # fmt: skip
            tl.store(flags + idx, tl.zeros_like(flagged).to(tl.uint8), mask=flagged > 0)
    else:
        _solve_tile(
            tl.program_id(0), table, owners, flags, lam, tol, max_iter,
            DTYPE, False, SCALED, UNIT_COL, WIDE, ONE, BLOCK_R, BLOCK_C, CHECK, BISECT, NEWTON,
        )  # fmt: skip


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class _Launch:
    """One launch's data: the weight table (``TABLE_COLUMNS`` int64 per weight: pointer, scale pointer, first tile,
    rows, groups per row, row stride, column stride, λ multiplier's float32 bits, :func:`division_magic` of the
    weight's column tiles) and, for several weights, the owning
    weight of every tile (int32), copied to the GPU in one transfer; one flag byte per tile, zeroed on the GPU."""

    def __init__(self, entries, multipliers, device, block_r, block_c):
        # a column scale is stored with its inverse, [s, 1 / s], in one 16-byte-aligned float32 buffer of the plan
        pairs = [None if scale is None else torch.cat([scale, scale.reciprocal()]) for _, scale in entries]
        # the table holds raw addresses: keep the weights and scale pairs it points to alive as long as the launch
        self.tensors = ([weight for weight, _ in entries], pairs)
        rows, tiles = [], []
        first_tile = 0
        mult_bits = torch.tensor(multipliers, dtype=torch.float32).view(torch.int32).tolist()
        for (weight, _), pair, bits in zip(entries, pairs, mult_bits):
            n_rows, cols = weight.shape
            gpr = cols // 4
            count = triton.cdiv(n_rows, block_r) * triton.cdiv(gpr, block_c)
            sptr = pair.data_ptr() if pair is not None else 0
            magic, shift = division_magic(triton.cdiv(gpr, block_c))
            rows.append([weight.data_ptr(), sptr, first_tile, n_rows, gpr, *weight.stride(), bits, magic, shift])
            tiles.append(count)
            first_tile += count
        self.n_tiles = first_tile
        self.one = len(rows) == 1
        host = torch.tensor(rows, dtype=torch.int64).view(torch.uint8).reshape(-1)
        table_bytes = host.numel()
        if not self.one:
            owners = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(tiles))
            host = torch.cat([host, owners.view(torch.uint8)])
        buffer = host.pin_memory().to(device, non_blocking=True)
        self.table = buffer[:table_bytes].view(torch.int64)
        # a one-weight plan passes the table as the (never read) owner list
        self.owners = buffer[table_bytes:].view(torch.int32) if not self.one else self.table.view(torch.int32)
        self.flags = torch.zeros(self.n_tiles, dtype=torch.uint8, device=device)
        per_program = self.n_tiles // (
            SCAN_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
        )
        self.scan = min(SCAN_MAX, max(SCAN_MIN, 1 << max(per_program, 1).bit_length() - 1))


class TritonProxPlan:
    """The exact 2:4 prox of many CUDA weights by two kernel launches (per dtype / layout class) per run.

    Args:
        weights: 2-D CUDA float32/bfloat16/float16 tensors (views allowed; groups of 4 along the last dimension) on one
            device. They are updated in place by :meth:`run`; the plan stores their addresses, so rebuild it when a
            weight is reallocated.
        column_scales: per weight, ``None`` or a contiguous float32 vector with one entry per column (> 0): that weight's
            prox runs in the coordinates ``W * s`` and is written back divided by ``s`` (as a product with ``1 / s``,
            computed once when the plan is built: within a float32 ulp of a true division, before the rounding to the
            weight's dtype). The plan keeps its own copy of ``s`` and ``1 / s`` (8 bytes per column), taken here.
        multipliers: per weight, the factor applied to ``lam`` (per-layer λ); default 1.
        launch: overrides of the launch configuration (``block_rows``, ``block_cols``, ``num_warps``, ``check``).
    """

    def __init__(
        self,
        weights: Sequence[Tensor],
        column_scales: Sequence[Tensor | None] | None = None,
        multipliers: Sequence[float] | None = None,
        *,
        launch: dict | None = None,
    ) -> None:
        launch = dict(launch or {})
        self.block_r = int(launch.pop("block_rows", BLOCK_ROWS))
        self.block_c = int(launch.pop("block_cols", BLOCK_COLS))
        self.num_warps = int(launch.pop("num_warps", NUM_WARPS))
        self.check = int(launch.pop("check", CHECK_EVERY))
        if launch:
            raise ValueError(
                f"unknown launch settings {sorted(launch)}; allowed: block_rows, block_cols, num_warps, check."
            )
        for name, value in (("block_rows", self.block_r), ("block_cols", self.block_c)):
            if value < 1 or value & (value - 1):
                raise ValueError(f"`{name}`={value} must be a power of two.")
        weights, mults, scales = per_weight(weights, multipliers, column_scales)
        devices = {w.device for w in weights}
        if len(devices) > 1:
            raise ValueError(f"all weights of one plan must be on one CUDA device, got {sorted(map(str, devices))}.")
        self.device = devices.pop() if devices else None
        classes: dict[tuple, tuple[list, list]] = {}
        for weight, scale, mult in zip(weights, scales, mults):
            if weight.device.type != "cuda":
                raise RuntimeError(f"the Triton prox kernel needs CUDA tensors, got one on {weight.device}.")
            if weight.dim() != 2:
                raise ValueError(f"plan weights must be 2-D, got shape {tuple(weight.shape)}.")
            if weight.numel() == 0:
                continue
            size = weight.element_size()
            unit_col = weight.stride(1) == 1 and weight.stride(0) % 4 == 0 and weight.data_ptr() % (4 * size) == 0
            span = (weight.shape[0] - 1) * abs(weight.stride(0)) + (weight.shape[1] - 1) * abs(weight.stride(1)) + 1
            wide = span >= 2**31 - 1
            entry = classes.setdefault((weight.dtype, scale is not None, unit_col, wide), ([], []))
            entry[0].append((weight, scale))
            entry[1].append(mult)
        self._launches: list[tuple[_Launch, dict]] = []  # each with its kernel constants, fixed for the plan
        if self.device is not None and classes:
            with torch.cuda.device(self.device):
                for (dtype, scaled, unit_col, wide), (entries, ms) in classes.items():
                    item = _Launch(entries, ms, self.device, self.block_r, self.block_c)
                    meta = dict(
                        DTYPE=_TL_DTYPES[dtype],
                        SCALED=scaled,
                        UNIT_COL=unit_col,
                        WIDE=wide,
                        ONE=item.one,
                        BLOCK_R=self.block_r,
                        BLOCK_C=self.block_c,
                        CHECK=self.check,
                        BISECT=BISECT_ITERS,
                        NEWTON=NEWTON_ITERS,
                        SCAN=item.scan,
                        num_warps=self.num_warps,
                    )
                    self._launches.append((item, meta))

    def run(self, lam: float, *, max_iter: int, tol: float) -> None:
        """Replace every weight of the plan by its prox with strength ``lam * multiplier`` (in place)."""
        if lam == 0 or not self._launches:
            return
        with torch.cuda.device(self.device):
            for item, meta in self._launches:
                args = (item.table, item.owners, item.flags, item.n_tiles, float(lam), float(tol), int(max_iter))
                _prox_kernel[(item.n_tiles,)](*args, EXACT=False, **meta)
                _prox_kernel[(triton.cdiv(item.n_tiles, item.scan),)](*args, EXACT=True, **meta)


def prox_2to4_triton_(
    weight: Tensor,
    lam: float,
    *,
    max_iter: int,
    tol: float,
    column_scale: Tensor | None = None,
    launch: dict | None = None,
) -> Tensor:
    """In-place exact 2:4 prox of a CUDA float32/bfloat16/float16 tensor (groups of 4 along the last dimension).

    ``column_scale`` (float32, one entry per column, > 0): prox of ``weight * s``, written back divided by ``s``.
    ``launch`` overrides the launch configuration (see :class:`TritonProxPlan`; for benchmarks)."""
    if weight.device.type != "cuda":
        raise RuntimeError(f"the Triton prox kernel needs a CUDA tensor, got one on {weight.device}.")
    if weight.numel() == 0 or lam == 0:
        return weight
    views = as_2d(weight)
    TritonProxPlan(views, [column_scale] * len(views), launch=launch).run(lam, max_iter=max_iter, tol=tol)
    return weight
