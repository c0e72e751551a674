"""Fused Triton kernel for the exact 2:4 prox (same algorithm as the torch path in ``proxsparse_hf.prox``).

Every group of 4 is read once into registers, solved in float32 and written back once, in place.

Two launches share one kernel body:

1. the *fast* pass runs projected coordinate descent on the groups certified convex
   (``2 * lam * (sum|v| - min|v|) < 1``, every group at LLM weight scale) with a per-group stop once the
   a-posteriori bound on the distance to the minimiser is below ``tol * max|v|``. A block whose groups all pass writes
   its result; a block holding any group it cannot certify (non-convex, or not converged within ``max_iter``) writes
   nothing and raises a one-byte flag.
2. the *exact* pass revisits the flagged blocks only (every other program returns at once), runs the same descent and
   solves the remaining groups exactly from the candidate supports of the sorted magnitudes: the two largest, the
   unique interior minimum on the three-largest face (bisection on a 1-D profile whose derivative is increasing on a
   bracket we locate), and the four-support face (coordinate descent from two starts, each Newton-polished, and pure
   Newton from the three-support point and from |v|/2 and |v|/4).

Extra memory: one byte per block of groups. Triton is imported by this module only; never at package import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["prox_2to4_triton_"]

# launch configuration: the fastest of 16 (block x warps x check interval) on an H200 (benchmarks/prox_kernel.py --sweep)
BLOCK_GROUPS = 1024
NUM_WARPS = 8
CHECK_EVERY = 4
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
def _descent(w0, w1, w2, w3, a0, a1, a2, a3, lam, gain, thresh, watch, max_iter, CHECK: tl.constexpr):
    """Coordinate descent; a group's result is frozen at the first check where gain * max|step| <= thresh."""
    r0, r1, r2, r3 = w0, w1, w2, w3
    done = watch == 0
    sweep = 0
    going = tl.max((done == 0).to(tl.int32), axis=0) > 0
    while going:
        sweep += 1
        p0, p1, p2, p3 = w0, w1, w2, w3
        w0, w1, w2, w3 = _sweep(w0, w1, w2, w3, a0, a1, a2, a3, lam)
        if (sweep % CHECK == 0) | (sweep >= max_iter):
            step = tl.maximum(
                tl.maximum(tl.abs(w0 - p0), tl.abs(w1 - p1)), tl.maximum(tl.abs(w2 - p2), tl.abs(w3 - p3))
            )
            newly = (step * gain <= thresh) & (done == 0)
            r0 = tl.where(newly, w0, r0)
            r1 = tl.where(newly, w1, r1)
            r2 = tl.where(newly, w2, r2)
            r3 = tl.where(newly, w3, r3)
            done = done | newly
            going = (tl.max((done == 0).to(tl.int32), axis=0) > 0) & (sweep < max_iter)
    r0 = tl.where(done, r0, w0)
    r1 = tl.where(done, r1, w1)
    r2 = tl.where(done, r2, w2)
    r3 = tl.where(done, r3, w3)
    return r0, r1, r2, r3, done


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
    c0, c1, c2, c3, _d = _descent(s0, s1, s2, s3, s0, s1, s2, s3, lam, one, thresh, watch, max_iter, CHECK)
    c0, c1, c2, c3 = _newton_polish(c0, c1, c2, c3, s0, s1, s2, s3, lam, NEWTON)
    fc = _objective(c0, c1, c2, c3, s0, s1, s2, s3, lam)
    best, b0, b1, b2, b3 = _pick(best, b0, b1, b2, b3, fc, c0, c1, c2, c3)
    mean = 0.25 * (s0 + s1 + s2 + s3)
    gamma = 2.0 / (1.0 + tl.sqrt(1.0 + (12.0 * lam) * mean))
    c0, c1, c2, c3, _d = _descent(
        s0 * gamma, s1 * gamma, s2 * gamma, s3 * gamma, s0, s1, s2, s3, lam, one, thresh, watch, max_iter, CHECK
    )
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
def _prox_kernel(
    ptr,
    scale_ptr,
    flags,
    n_groups,
    groups_per_row,
    stride_row,
    stride_col,
    lam,
    tol,
    max_iter,
    EXACT: tl.constexpr,
    SCALED: tl.constexpr,
    FLAT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHECK: tl.constexpr,
    BISECT: tl.constexpr,
    NEWTON: tl.constexpr,
):
    pid = tl.program_id(0)
    if EXACT:
        if tl.load(flags + pid) == 0:
            return
    if WIDE:
        g = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        g = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = g < n_groups
    j = tl.arange(0, 4)
    if FLAT:
        offs = g[:, None] * 4 + j[None, :]
    else:
        row = g // groups_per_row
        col = (g - row * groups_per_row) * 4
        offs = row[:, None] * stride_row + (col[:, None] + j[None, :]) * stride_col
    mask = tl.broadcast_to(in_range[:, None], (BLOCK, 4))
    raw = tl.load(ptr + offs, mask=mask, other=0.0)
    v = raw.to(tl.float32)
    if SCALED:  # prox in the coordinates W * s (s per column), result divided by s on the way out
        scol = (g % groups_per_row) * 4
        s = tl.load(scale_ptr + scol[:, None] + j[None, :], mask=mask, other=1.0)
        v = v * s
    evens, odds = tl.split(tl.reshape(v, (BLOCK, 2, 2)))
    v0, v2 = tl.split(evens)
    v1, v3 = tl.split(odds)
    a0 = tl.abs(v0)
    a1 = tl.abs(v1)
    a2 = tl.abs(v2)
    a3 = tl.abs(v3)
    total = a0 + a1 + a2 + a3
    amin = tl.minimum(tl.minimum(a0, a1), tl.minimum(a2, a3))
    amax = tl.maximum(tl.maximum(a0, a1), tl.maximum(a2, a3))
    nnz = (a0 > 0).to(tl.int32) + (a1 > 0).to(tl.int32) + (a2 > 0).to(tl.int32) + (a3 > 0).to(tl.int32)
    active = (nnz > 2) & in_range
    rho = (2.0 * lam) * (total - amin)
    convex = rho < 1.0
    gain = tl.where(convex, rho / tl.maximum(1.0 - rho, 1e-30), 0.0)
    thresh = tol * amax
    watch = active & convex
    w0, w1, w2, w3, done = _descent(a0, a1, a2, a3, a0, a1, a2, a3, lam, gain, thresh, watch, max_iter, CHECK)
    pending = active & ((convex & done) == 0)
    any_pending = tl.max(pending.to(tl.int32), axis=0) > 0
    if EXACT:
        e0, e1, e2, e3 = _exact(a0, a1, a2, a3, lam, tol, max_iter, CHECK, BISECT, NEWTON)
        w0 = tl.where(pending, e0, w0)
        w1 = tl.where(pending, e1, w1)
        w2 = tl.where(pending, e2, w2)
        w3 = tl.where(pending, e3, w3)
    else:
        if any_pending:
            tl.store(flags + pid, 1)
            return
    # restore signs; zeros are written back as read (keeps -0.0 like torch.copysign)
    w0 = tl.where(v0 < 0, -w0, w0)
    w1 = tl.where(v1 < 0, -w1, w1)
    w2 = tl.where(v2 < 0, -w2, w2)
    w3 = tl.where(v3 < 0, -w3, w3)
    out = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK, 4))
    out = tl.where(v == 0, v, out)
    if SCALED:
        out = out / s
    tl.store(ptr + offs, out.to(raw.dtype), mask=mask)


def _launch_2d(
    weight: Tensor,
    lam: float,
    max_iter: int,
    tol: float,
    scale: Tensor | None = None,
    *,
    block: int = BLOCK_GROUPS,
    num_warps: int = NUM_WARPS,
    check: int = CHECK_EVERY,
) -> None:
    rows, cols = weight.shape
    n_groups = rows * (cols // 4)
    if n_groups == 0:
        return
    flat = weight.is_contiguous()
    # int64 offsets only where int32 could overflow
    span = (rows - 1) * abs(weight.stride(0)) + (cols - 1) * abs(weight.stride(1)) + 1
    wide = max(span, n_groups * 4) >= 2**31 - 1
    n_blocks = triton.cdiv(n_groups, block)
    flags = torch.zeros(n_blocks, dtype=torch.uint8, device=weight.device)
    scaled = scale is not None
    args = (weight, scale if scaled else weight, flags, n_groups, cols // 4, weight.stride(0), weight.stride(1))
    args += (lam, tol, max_iter)
    meta = dict(
        SCALED=scaled, FLAT=flat, WIDE=wide, BLOCK=block, CHECK=check, BISECT=BISECT_ITERS, NEWTON=NEWTON_ITERS
    )
    _prox_kernel[(n_blocks,)](*args, EXACT=False, num_warps=num_warps, **meta)
    _prox_kernel[(n_blocks,)](*args, EXACT=True, num_warps=num_warps, **meta)


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
    ``launch`` overrides the launch configuration (``block``, ``num_warps``, ``check``; for benchmarks)."""
    if weight.device.type != "cuda":
        raise RuntimeError(f"the Triton prox kernel needs a CUDA tensor, got one on {weight.device}.")
    if weight.numel() == 0 or lam == 0:
        return weight
    target = weight
    if target.dim() == 1:
        target = target.unsqueeze(0)
    if target.dim() > 2:
        try:
            target = target.view(-1, target.shape[-1])
        except RuntimeError:
            for sub in weight.unbind(0):
                prox_2to4_triton_(sub, lam, max_iter=max_iter, tol=tol, column_scale=column_scale, launch=launch)
            return weight
    with torch.cuda.device(weight.device):
        _launch_2d(target, float(lam), int(max_iter), float(tol), column_scale, **(launch or {}))
    return weight
