"""The exact solver of the 4-variable 2:4 prox, vectorised over groups of sorted magnitudes (see
:mod:`proxsparse_hf.learning.prox` for the regimes and the candidate supports)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEFAULT_MAX_ITER", "DEFAULT_TOL", "solve_groups"]

DEFAULT_MAX_ITER = 100
DEFAULT_TOL = 1e-6
# Sweeps between two convergence checks of the coordinate descent.
_CHECK_EVERY = 2
# Bisection steps of the exact three-support solver (the bracket is at most [0, 1]: 2**-40 is below float32 spacing).
_BISECT_ITERS = 40
# Newton steps polishing the four-support stationary point.
_NEWTON_ITERS = 8


def solve_groups(v: Tensor, lam: float, *, max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL) -> Tensor:
    """Solve the prox for a float32 ``[G, 4]`` tensor of groups and return a new ``[G, 4]`` float32 tensor."""
    a = v.abs().t().contiguous()  # [4, G]: one contiguous row per position in the group
    w, pending = _convex_descent(a, lam, max_iter, tol)
    idx = pending.nonzero().squeeze(1)
    if idx.numel():
        w[:, idx] = _exact_sorted(a[:, idx], lam, max_iter, tol)
    out = torch.empty_like(v)
    out.copy_(w.t())
    return out.copysign_(v)


def _e2_except(w: Tensor, i: int) -> Tensor:
    j, k, m = (q for q in range(4) if q != i)
    return w[j] * (w[k] + w[m]) + w[k] * w[m]


def _convex_descent(a: Tensor, lam: float, max_iter: int, tol: float) -> tuple[Tensor, Tensor]:
    """Projected coordinate descent from ``a`` for the groups certified convex; returns (w, mask of other groups)."""
    total = a.sum(0)
    amin = a.amin(0)
    amax = a.amax(0)
    rho = (2.0 * lam) * (total - amin)
    nnz = (a > 0).sum(0)
    active = nnz > 2  # groups with <= 2 non-zeros are fixed points (the descent leaves them unchanged exactly)
    convex = rho < 1.0
    # convergence test per group: rho / (1 - rho) * max|step| <= tol * max(a)
    gain = torch.where(convex, rho / (1.0 - rho).clamp_min(1e-30), torch.zeros_like(rho))
    thresh = tol * amax
    w = a.clone()
    watch = active & convex
    if not bool(watch.any()):
        return w, active & ~convex
    tmp = torch.empty_like(a[0])
    prev = torch.empty_like(a)
    result = a.clone()
    done = ~watch  # a group's result is frozen at the first check it passes, so chunking never changes it
    for sweep in range(1, max_iter + 1):
        check = sweep % _CHECK_EVERY == 0 or sweep == max_iter
        if check:
            prev.copy_(w)
        for i in range(4):
            j, k, m = (q for q in range(4) if q != i)
            torch.add(w[k], w[m], out=tmp)
            tmp.mul_(w[j]).addcmul_(w[k], w[m])
            torch.sub(a[i], tmp, alpha=lam, out=w[i])
            w[i].clamp_min_(0.0)
        if check:
            step = (w - prev).abs_().amax(0)
            newly = (step.mul_(gain) <= thresh) & ~done
            torch.where(newly, w, result, out=result)
            done |= newly
            if bool(done.all()):
                break
    pending = active & ~(convex & done)
    return result, pending


def _objective(w: Tensor, a: Tensor, lam: float) -> Tensor:
    """0.5 * ||w - a||^2 + lam * e3(w) for [4, H] tensors (non-negative w)."""
    w0, w1, w2, w3 = w
    e3 = w0 * w1 * (w2 + w3) + w2 * w3 * (w0 + w1)
    return 0.5 * (w - a).square().sum(0) + lam * e3


def _face3(s: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Unique interior minimum on the support {1, 2, 3} of sorted magnitudes ``s`` ([4, H]); returns (w, valid)."""
    a1, a2, a3, _ = s
    alpha = 0.5 * (a1 - a2).square()
    beta = 0.5 * (a1 + a2).square()
    inv = 1.0 / (lam * lam)
    # x = lam * w3; the inner optimum has w2 = (a2 - x a1) / (1 - x^2) >= 0 only for x <= a2 / a1
    xmax = torch.minimum(lam * a3, a2 / a1.clamp_min(torch.finfo(torch.float32).tiny))
    # m(x) = alpha/(1-x)^3 + beta/(1+x)^3 is convex; psi''(x) > 0  <=>  m(x) < 1/lam^2
    r = torch.sqrt(torch.sqrt(beta / alpha.clamp_min(torch.finfo(torch.float32).tiny)))
    xm = torch.where(alpha > 0, (r - 1.0) / (r + 1.0), torch.ones_like(r))

    distinct = alpha > 0  # a1 == a2 drops the 1/(1-x) terms, which are then 0/0 at x = 1

    def m(x: Tensor) -> Tensor:
        return torch.where(distinct, alpha / (1.0 - x) ** 3, torch.zeros_like(x)) + beta / (1.0 + x) ** 3

    def dpsi(x: Tensor) -> Tensor:
        left = torch.where(distinct, alpha / (1.0 - x).square(), torch.zeros_like(x))
        return x / lam - a3 - (0.5 * lam) * (left - beta / (1.0 + x).square())

    left_hi = torch.minimum(xm, xmax)
    nonempty = m(left_hi) < inv
    # left end of {m < 1/lam^2}: m decreases on [0, xm]
    need_left = m(torch.zeros_like(a1)) >= inv
    lo, hi = torch.zeros_like(a1), left_hi.clone()
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        above = m(mid) >= inv
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    x_left = torch.where(need_left, hi, torch.zeros_like(a1))
    # right end: m increases on [xm, 1)
    need_right = (xmax > xm) & (m(xmax) >= inv)
    lo, hi = left_hi.clone(), xmax.clone()
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        above = m(mid) >= inv
        lo = torch.where(above, lo, mid)
        hi = torch.where(above, mid, hi)
    x_right = torch.where(need_right, lo, xmax)
    valid = nonempty & (dpsi(x_left) < 0) & (dpsi(x_right) > 0)
    # psi' is increasing on [x_left, x_right]: its root is the minimum
    lo, hi = x_left, x_right
    for _ in range(_BISECT_ITERS):
        mid = 0.5 * (lo + hi)
        pos = dpsi(mid) > 0
        lo = torch.where(pos, lo, mid)
        hi = torch.where(pos, mid, hi)
    x = 0.5 * (lo + hi)
    half_sum = 0.5 * (a1 + a2) / (1.0 + x)
    half_diff = torch.where(distinct, 0.5 * (a1 - a2) / (1.0 - x), torch.zeros_like(x))
    w1 = half_sum + half_diff
    w2 = half_sum - half_diff
    w3 = x / lam
    valid = valid & (w2 > 0) & (w3 > 0)
    return torch.stack([w1, w2, w3, torch.zeros_like(w3)]), valid


def _newton4(w: Tensor, s: Tensor, lam: float) -> Tensor:
    """Newton steps on the four-support stationary system (symmetric 4x4 solve by unrolled LDL^T)."""
    for _ in range(_NEWTON_ITERS):
        g = torch.stack([w[i] - s[i] + lam * _e2_except(w, i) for i in range(4)])
        total = w.sum(0)
        h = {(i, j): lam * (total - w[i] - w[j]) for i in range(4) for j in range(i + 1, 4)}
        step = _solve_sym4(h, g)
        w = w - step
    return w


def _solve_sym4(h: dict[tuple[int, int], Tensor], g: Tensor) -> Tensor:
    """Solve H x = g for unit-diagonal symmetric H given by its upper entries ``h[(i, j)]`` (LDL^T, no pivoting)."""
    # L (unit lower) and D
    d0 = torch.ones_like(g[0])
    l10 = h[(0, 1)] / d0
    l20 = h[(0, 2)] / d0
    l30 = h[(0, 3)] / d0
    d1 = 1.0 - l10 * l10 * d0
    l21 = (h[(1, 2)] - l20 * l10 * d0) / d1
    l31 = (h[(1, 3)] - l30 * l10 * d0) / d1
    d2 = 1.0 - l20 * l20 * d0 - l21 * l21 * d1
    l32 = (h[(2, 3)] - l30 * l20 * d0 - l31 * l21 * d1) / d2
    d3 = 1.0 - l30 * l30 * d0 - l31 * l31 * d1 - l32 * l32 * d2
    y0 = g[0]
    y1 = g[1] - l10 * y0
    y2 = g[2] - l20 * y0 - l21 * y1
    y3 = g[3] - l30 * y0 - l31 * y1 - l32 * y2
    x3 = y3 / d3
    x2 = y2 / d2 - l32 * x3
    x1 = y1 / d1 - l21 * x2 - l31 * x3
    x0 = y0 / d0 - l10 * x1 - l20 * x2 - l30 * x3
    return torch.stack([x0, x1, x2, x3])


def _descent_polish(s: Tensor, w: Tensor, lam: float, max_iter: int, tol: float) -> Tensor:
    """Coordinate descent from ``w`` (stays feasible), then Newton polish if it ends inside the four-support face."""
    thresh = tol * s[0]
    result = w.clone()
    done = torch.zeros_like(thresh, dtype=torch.bool)
    for sweep in range(1, max_iter + 1):
        check = sweep % _CHECK_EVERY == 0 or sweep == max_iter
        prev = w.clone() if check else None
        for i in range(4):
            w[i] = (s[i] - lam * _e2_except(w, i)).clamp_min(0.0)
        if check:
            newly = ((w - prev).abs().amax(0) <= thresh) & ~done
            result = torch.where(newly, w, result)
            done |= newly
            if bool(done.all()):
                break
    w = torch.where(done, result, w)
    return _polish(w, s, lam)


def _polish(w: Tensor, s: Tensor, lam: float) -> Tensor:
    """Newton steps on the four-support stationary system from ``w`` (which may lie on a face of lower support);
    keeps the result only when it lands inside the four-support face with a smaller objective."""
    polished = _newton4(w, s, lam)
    ok = (polished > 0).all(0) & (polished <= s).all(0) & torch.isfinite(polished).all(0)
    ok &= _objective(torch.where(ok, polished, w), s, lam) < _objective(w, s, lam)
    return torch.where(ok, polished, w)


def _exact_sorted(a: Tensor, lam: float, max_iter: int, tol: float) -> Tensor:
    """Exact prox for magnitudes ``a`` ([4, H]) by candidate supports; returns non-negative w in a's order."""
    s, perm = torch.sort(a, dim=0, descending=True, stable=True)
    zero = torch.zeros_like(s[0])
    cand_two = torch.stack([s[0], s[1], zero, zero])
    cand_three, ok3 = _face3(s, lam)
    cand_three = torch.where(ok3, cand_three, cand_two)
    # the four-support face: coordinate descent from two starts (s itself, and s scaled onto the stationary point of
    # the all-equal group with the same mean), each polished by Newton steps when it lands inside the face
    mean = s.mean(0)
    gamma = 2.0 / (1.0 + torch.sqrt(1.0 + (12.0 * lam) * mean))  # = (sqrt(1 + 12 lam m) - 1) / (6 lam m)
    cand_cd = _descent_polish(s, s.clone(), lam, max_iter, tol)
    cand_sym = _descent_polish(s, s * gamma, lam, max_iter, tol)
    # a boundary point of the three-support face can neighbour a better interior four-support minimum
    # and pure Newton from scaled starts, which reaches shallow interior minima that the descent misses
    cand_from_three = _polish(cand_three, s, lam)
    cand_half = _polish(0.5 * s, s, lam)
    cand_quarter = _polish(0.25 * s, s, lam)
    cands = torch.stack([cand_two, cand_three, cand_cd, cand_sym, cand_from_three, cand_half, cand_quarter])
    obj = _objective(cands.transpose(0, 1), s.unsqueeze(1), lam)  # [C, H]
    best = obj.argmin(0)
    w_sorted = cands.gather(0, best.view(1, 1, -1).expand(1, 4, -1)).squeeze(0)
    out = torch.empty_like(w_sorted)
    out.scatter_(0, perm, w_sorted)
    return out
