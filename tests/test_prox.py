"""Tests of the exact 2:4 proximal operator (torch path) against an independent float64 brute-force solver."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import proxsparse_hf.learning.prox as prox_mod
from proxsparse_hf.learning.prox import Prox2to4Batch, prox_2to4, prox_2to4_, resolve_backend, solve_groups

# ----------------------------------------------------------------------------------------------------------------------
# Independent float64 reference: enumerate every support, start from a grid of points on it plus the corner points,
# refine each start with damped Newton steps (no coordinate descent, no sorting, no candidate theory) and keep the best.
# ----------------------------------------------------------------------------------------------------------------------
TRIPLES = list(itertools.combinations(range(4), 3))


def objective64(w: np.ndarray, v: np.ndarray, lam: float) -> np.ndarray:
    w = np.asarray(w, np.float64)
    v = np.asarray(v, np.float64)
    reg = sum(np.abs(w[..., i] * w[..., j] * w[..., k]) for i, j, k in TRIPLES)
    return 0.5 * ((w - v) ** 2).sum(-1) + lam * reg


def _smooth_on_support(x: np.ndarray, b: np.ndarray, lam: float):
    """Value, gradient and Hessian of 0.5|x-b|^2 + lam * e3(x) for x > 0 of any size n <= 4."""
    n = x.shape[-1]
    f = 0.5 * ((x - b) ** 2).sum(-1)
    g = x - b
    h = np.broadcast_to(np.eye(n), x.shape + (n,)).copy()
    for c in itertools.combinations(range(n), 3):
        f = f + lam * x[..., c[0]] * x[..., c[1]] * x[..., c[2]]
        for i in c:
            j, k = (q for q in c if q != i)
            g[..., i] += lam * x[..., j] * x[..., k]
            h[..., j, k] += lam * x[..., i]
    return f, g, h


def brute_force(v: np.ndarray, lam: float, grid: int = 7, top: int = 4, iters: int = 30) -> np.ndarray:
    """Best objective found for every row of ``v`` ([N, 4], float64)."""
    v = np.asarray(v, np.float64)
    a = np.abs(v)
    best = objective64(np.zeros_like(a), a, lam)
    fractions = np.linspace(0.0, 1.0, grid)
    for size in (1, 2, 3, 4):
        for support in itertools.combinations(range(4), size):
            cols = list(support)
            b = a[:, cols][:, None, :]
            pts = np.array(list(itertools.product(fractions, repeat=size)))[None] * b  # N x P x size
            full = np.zeros(pts.shape[:2] + (4,))
            full[..., cols] = pts
            vals = objective64(full, a[:, None, :], lam)
            best = np.minimum(best, vals.min(1))
            order = np.argsort(vals, axis=1)[:, :top]
            x = np.take_along_axis(pts, order[..., None], 1)
            x = np.concatenate([np.maximum(x, 1e-3 * b), b, 0.5 * b], 1)
            for _ in range(iters):
                f, g, h = _smooth_on_support(x, b, lam)
                pd = np.linalg.eigvalsh(h).min(-1) > 1e-12
                safe_h = np.where(pd[..., None, None], h, np.eye(size))
                step = np.linalg.solve(safe_h, g[..., None])[..., 0]
                t = np.ones(x.shape[:-1])
                for _ in range(30):
                    xn = np.clip(x - t[..., None] * step, 0.0, b)
                    fn = _smooth_on_support(xn, b, lam)[0]
                    worse = fn > f
                    if not worse.any():
                        break
                    t = np.where(worse, 0.5 * t, t)
                x = np.where((fn <= f)[..., None], xn, x)
            full = np.zeros(x.shape[:2] + (4,))
            full[..., cols] = x
            best = np.minimum(best, objective64(full, a[:, None, :], lam).min(1))
    return best


def assert_exact(v: torch.Tensor, w: torch.Tensor, lam: float, rtol: float = 1e-6, atol: float = 1e-12) -> None:
    v64 = v.double().numpy().reshape(-1, 4)
    ref = brute_force(v64, lam)
    got = objective64(w.double().numpy().reshape(-1, 4), v64, lam)
    gap = got - ref
    bad = gap > rtol * np.abs(ref) + atol
    assert not bad.any(), f"{bad.sum()} groups off, e.g. v={v64[bad][:3]} gap={gap[bad][:3]} ref={ref[bad][:3]}"


# ----------------------------------------------------------------------------------------------------------------------
# exactness
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.01, 0.05, 0.5, 2.0])
def test_llm_scale_matches_brute_force(lam):
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(120, 4, generator=gen) * 0.02
    v[::10] *= 8.0  # a few outliers, as real weights have
    assert_exact(v, prox_2to4(v, lam), lam)


@pytest.mark.parametrize("lam", [0.1, 0.3, 1.0, 2.0, 5.0])
def test_unit_scale_matches_brute_force(lam):
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(120, 4, generator=gen)
    assert_exact(v, prox_2to4(v, lam), lam)


@pytest.mark.parametrize("lam", [0.25, 1.0, 5.0])
def test_critical_scale_and_near_ties_match_brute_force(lam):
    """Groups with lam * |v| ~ 1 (where several local minima compete) and exact / near ties."""
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(100, 4, generator=gen)
    v = v / v.abs().sum(1, keepdim=True) / lam * (0.3 + 2.7 * torch.rand(100, 1, generator=gen))
    ties = 1.0 + 0.02 * torch.randn(60, 4, generator=gen) * (torch.rand(60, 4, generator=gen) < 0.5)
    ties = ties * (0.2 + 1.3 * torch.rand(60, 1, generator=gen)) * torch.sign(torch.randn(60, 4, generator=gen))
    exact_ties = torch.linspace(0.1, 2.0, 40).unsqueeze(1).repeat(1, 4) / lam**0.5
    v = torch.cat([v, ties, exact_ties])
    assert_exact(v, prox_2to4(v, lam), lam)


def test_counter_example_of_zero_start_descent():
    v = torch.tensor([[1.156, -0.332, 1.168, -1.160]])
    w = prox_2to4(v, 1.0)
    obj = objective64(w.double().numpy(), v.double().numpy(), 1.0)[0]
    assert obj < 0.7226 - 5e-3  # the two-sparse point the zero-start descent stalls at
    assert w[0, 1] == 0 and (w[0, [0, 2, 3]] != 0).all()
    np.testing.assert_allclose(w[0].numpy(), [0.6708, 0.0, 0.7088, -0.6845], atol=2e-4)
    assert_exact(v, w, 1.0)


def test_fast_path_and_exact_path_agree_on_convex_groups():
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(2000, 4, generator=gen) * 0.05
    fast = solve_groups(v, 0.7)
    exact = prox_mod._exact_sorted(v.abs().t().contiguous(), 0.7, 100, 1e-6).t()
    f_fast = objective64(fast.double().numpy(), v.double().numpy(), 0.7)
    f_exact = objective64(torch.copysign(exact, v).double().numpy(), v.double().numpy(), 0.7)
    np.testing.assert_allclose(f_fast, f_exact, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------------
# structural properties
# ----------------------------------------------------------------------------------------------------------------------
def test_groups_with_at_most_two_nonzeros_are_fixed_points():
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(500, 4, generator=gen) * torch.tensor([1.0, 0.02, 50.0, 1e-3])
    keep = torch.rand(500, 4, generator=gen).argsort(1)[:, :2]
    mask = torch.zeros(500, 4, dtype=torch.bool).scatter_(1, keep, True)
    v = v * mask
    v[:5] = 0.0
    v[5:10, 1:] = 0.0
    for lam in (0.05, 1.0, 100.0):
        assert torch.equal(prox_2to4(v, lam), v)


def test_signs_kept_magnitudes_shrink_and_order_preserved():
    gen = torch.Generator().manual_seed(6)
    v = torch.randn(5000, 4, generator=gen) * torch.rand(5000, 1, generator=gen) * 3
    for lam in (0.05, 0.7, 3.0):
        w = prox_2to4(v, lam)
        assert ((w * v) >= 0).all()
        assert (w.abs() <= v.abs()).all()
        assert ((w == 0) | (torch.sign(w) == torch.sign(v))).all()
        av, aw = v.abs(), w.abs()
        larger = av.unsqueeze(2) > av.unsqueeze(1)
        assert not (larger & (aw.unsqueeze(2) < aw.unsqueeze(1) - 1e-6 * av.amax())).any()
        obj_w = objective64(w.double().numpy(), v.double().numpy(), lam)
        obj_v = objective64(v.double().numpy(), v.double().numpy(), lam)
        assert (obj_w <= obj_v + 1e-9).all()


def test_zeros_ties_denormals_and_determinism():
    tiny = torch.finfo(torch.float32).tiny
    v = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [-0.0, 0.0, -0.0, 0.0],
            [0.5, 0.5, 0.5, 0.5],
            [-0.5, 0.5, -0.5, 0.5],
            [1e-40, -3e-41, 2e-40, 1e-39],  # denormals
            [tiny, tiny, tiny, tiny],
            [1e-40, 0.02, -0.03, 0.01],
            [3.0, 3.0, 0.0, 3.0],
        ]
    )
    for lam in (0.5, 2.0, 1e6):
        w = prox_2to4(v, lam)
        assert torch.isfinite(w).all()
        assert torch.equal(w[:2], v[:2])
        assert torch.equal(w, prox_2to4(v.clone(), lam))
        assert_exact(v, w, lam)
    # with all-equal magnitudes the result is permutation-consistent: equal magnitudes within the kept support
    w = prox_2to4(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), 0.5)[0]
    nz = w[w != 0]
    assert torch.allclose(nz, nz[0].expand_as(nz), rtol=1e-5)


def test_lam_zero_is_identity_and_returns_new_tensor():
    v = torch.randn(8, 16)
    out = prox_2to4(v, 0.0)
    assert torch.equal(out, v) and out.data_ptr() != v.data_ptr()
    assert prox_2to4_(v, 0) is v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_round_trip(dtype):
    gen = torch.Generator().manual_seed(7)
    v = (torch.randn(64, 128, generator=gen) * 0.02).to(dtype)
    w = prox_2to4(v, 0.8)
    assert w.dtype == dtype and w.shape == v.shape
    assert torch.equal(w, prox_2to4(v.float(), 0.8).to(dtype))
    inplace = v.clone()
    assert prox_2to4_(inplace, 0.8) is inplace
    assert torch.equal(inplace, w)


def test_chunking_gives_identical_results():
    gen = torch.Generator().manual_seed(8)
    v = (
        torch.randn(37, 64, generator=gen)
        * torch.tensor([0.02, 1.0]).repeat_interleave(torch.tensor([30, 7]))[:, None]
    )
    ref = prox_2to4(v, 0.6)
    for chunk in (3, 16, 17, 1000, 1 << 20):
        assert torch.equal(prox_2to4(v, 0.6, chunk_groups=chunk), ref)


def test_in_place_on_views_of_any_layout():
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(48, 32, generator=gen) * 0.05
    ref = prox_2to4(base.t().contiguous(), 0.9)
    conv1d_like = base.clone()
    view = conv1d_like.t()  # transformers Conv1D: groups run along dim 0 of the stored weight
    assert prox_2to4_(view, 0.9, chunk_groups=5) is view
    assert torch.equal(conv1d_like.t(), ref)
    # 3-D contiguous and 3-D non-viewable layouts
    cube = torch.randn(3, 5, 8, generator=gen) * 0.1
    ref3 = prox_2to4(cube.reshape(-1, 8), 1.3).reshape(3, 5, 8)
    c1 = cube.clone()
    prox_2to4_(c1, 1.3)
    assert torch.equal(c1, ref3)
    c2 = cube.permute(1, 0, 2).contiguous()
    view2 = c2.permute(1, 0, 2)
    prox_2to4_(view2, 1.3, chunk_groups=2)
    assert torch.equal(view2, ref3)
    # a 1-D tensor and an empty one
    vec = cube[0, 0].clone()
    assert torch.equal(prox_2to4(vec, 1.3), ref3[0, 0])
    assert prox_2to4(torch.empty(0, 8), 1.0).shape == (0, 8)


def test_max_iter_and_tol_are_honoured():
    gen = torch.Generator().manual_seed(10)
    v = torch.randn(300, 4, generator=gen)
    exact = prox_2to4(v, 0.4, max_iter=150, tol=1e-7)
    assert_exact(v, exact, 0.4)
    coarse = prox_2to4(v, 0.4, max_iter=1, tol=0.5)
    assert torch.isfinite(coarse).all() and (coarse.abs() <= v.abs()).all()
    # a loose tolerance certifies groups early: farther from the minimiser, never a better objective
    loose = prox_2to4(v, 0.4, max_iter=150, tol=0.5)
    assert float((loose - exact).abs().max()) > 1e-4
    gap = objective64(loose.abs().double().numpy(), v.abs().double().numpy(), 0.4) - objective64(
        exact.abs().double().numpy(), v.abs().double().numpy(), 0.4
    )
    assert gap.min() > -1e-6 and gap.max() > 1e-8
    # the certificate is checked at the last allowed sweep: one sweep and three sweeps stop at different points
    assert float((coarse - prox_2to4(v, 0.4, max_iter=3, tol=0.5)).abs().max()) > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# backend dispatch and errors
# ----------------------------------------------------------------------------------------------------------------------
def test_backend_resolution(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    monkeypatch.setattr(prox_mod, "_triton_available", lambda: False)
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(RuntimeError, match=r'pip install "proxsparse-hf\[triton\]"'):
        resolve_backend("triton", "cuda")
    monkeypatch.setattr(prox_mod, "_triton_available", lambda: True)
    assert resolve_backend("auto", "cuda") == "triton"
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="`backend` must be one of"):
        resolve_backend("cuda", "cpu")


def test_triton_backend_on_cpu_raises():
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        prox_2to4(torch.randn(4, 8), 0.5, backend="triton")


def test_package_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, proxsparse_hf.learning.prox, proxsparse_hf.kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_division_magic_divides_every_tile_index():
    """The kernel finds a tile's row as ``(local * m) >> k``: exact for every index below 2**31 and every divisor."""
    from proxsparse_hf.kernels.magic import division_magic

    rng = np.random.default_rng(0)
    divisors = [*range(1, 4097), *(2**p + o for p in range(12, 31) for o in (-1, 0, 1)), 2**31 - 1, 2**31]
    for d in divisors:
        m, k = division_magic(d)
        assert 0 < m <= 2**32 and (2**31 - 1) * m < 2**63  # one int64 product in the kernel
        n = np.concatenate([[0, 1, d - 1, d, d + 1, 2 * d - 1, 2**31 - 1], rng.integers(0, 2**31, 64)])
        n = [int(x) for x in n if 0 <= x < 2**31]
        assert [(x * m) >> k for x in n] == [x // d for x in n], d
    # every index for a few divisors of real layers' column tiles (4096 and 11008 columns, 32 groups per tile)
    for d in (32, 86, 3, 7):
        m, k = division_magic(d)
        n = np.arange(0, 1 << 20, dtype=np.int64)
        assert np.array_equal((n * m) >> k, n // d)
    with pytest.raises(ValueError, match="divisor must be >= 1, got 0"):
        division_magic(0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"weight": torch.randn(3, 6)}, ValueError, r"shape \(3, 6\).*divisible by 4"),
        ({"weight": torch.tensor(1.0)}, ValueError, r"shape \(\)"),
        ({"weight": torch.randn(2, 4).double()}, ValueError, "float32, bfloat16 or float16"),
        ({"weight": torch.ones(2, 4, dtype=torch.int64)}, ValueError, "float32, bfloat16 or float16"),
        ({"weight": [1.0, 2.0, 3.0, 4.0]}, TypeError, "must be a torch.Tensor"),
        ({"lam": -0.1}, ValueError, "`lam` must be a finite number >= 0, got -0.1"),
        ({"lam": float("nan")}, ValueError, "`lam` must be a finite number"),
        ({"lam": True}, ValueError, "`lam` must be a finite number"),
        ({"max_iter": 0}, ValueError, "`max_iter` must be an integer >= 1, got 0"),
        ({"max_iter": 2.5}, ValueError, "`max_iter`"),
        ({"tol": 0.0}, ValueError, r"`tol` must be a number in \(0, 1\), got 0.0"),
        ({"tol": 1.5}, ValueError, "`tol`"),
        ({"backend": "cuda"}, ValueError, "`backend` must be one of"),
        ({"chunk_groups": 0}, ValueError, "`chunk_groups` must be an integer >= 1, got 0"),
        ({"column_scale": torch.ones(4)}, ValueError, r"one entry per column \(8\), got \(4,\)"),
        ({"column_scale": torch.ones(2, 8)}, ValueError, r"1-D tensor .* got \(2, 8\)"),
        ({"column_scale": [1.0] * 8}, ValueError, "got list"),
        ({"column_scale": torch.tensor([1.0] * 7 + [0.0])}, ValueError, "finite and > 0"),
        ({"column_scale": torch.tensor([1.0] * 7 + [float("inf")])}, ValueError, "finite and > 0"),
    ],
)
def test_errors(kwargs, exc, match):
    args = {"weight": torch.randn(2, 8), "lam": 0.5}
    args.update(kwargs)
    weight, lam = args.pop("weight"), args.pop("lam")
    with pytest.raises(exc, match=match):
        prox_2to4(weight, lam, **args)
    with pytest.raises(exc, match=match):
        prox_2to4_(weight, lam, **args)


def _scaled_reference(w: torch.Tensor, lam: float, scale: torch.Tensor) -> torch.Tensor:
    """The prox in the coordinates W·s by hand: a float32 scaled copy, prox, divide, cast."""
    return prox_2to4(w.float() * scale, lam, backend="torch").div_(scale).to(w.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sigma", "lam"), [(0.02, 0.5), (1.0, 1.0), (1.0, 5.0)])
def test_column_scale_is_the_prox_in_scaled_coordinates(dtype, sigma, lam):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(48, 64, generator=gen) * sigma).to(dtype)
    w[0, :4] = 0  # a zero group, and groups that are already 2:4
    w[1, 4:6] = 0
    scale = torch.rand(64, generator=gen) * 3 + 1e-3
    expected = _scaled_reference(w, lam, scale)
    assert torch.equal(prox_2to4(w, lam, column_scale=scale), expected)
    # chunking along rows and inside very wide rows, non-contiguous views, in place
    assert torch.equal(prox_2to4(w, lam, column_scale=scale, chunk_groups=8), expected)
    assert torch.equal(prox_2to4(w, lam, column_scale=scale, chunk_groups=5), expected)
    storage = w.t().contiguous()
    assert prox_2to4_(storage.t(), lam, column_scale=scale) is not None
    assert torch.equal(storage.t(), expected)
    # the scale changes the answer (it is not ignored) and scale 1 is the plain prox
    assert not torch.equal(expected, prox_2to4(w, lam))
    assert torch.equal(prox_2to4(w, lam, column_scale=torch.ones(64)), prox_2to4(w, lam))


def test_column_scale_on_another_device_is_refused():
    meta_scale = torch.ones(8, device="meta")
    with pytest.raises(ValueError, match="`column_scale` is on meta, `weight` on cpu"):
        prox_2to4(torch.randn(2, 8), 0.5, column_scale=meta_scale)


# ----------------------------------------------------------------------------------------------------------------------
# Prox2to4Batch: many weights, one call
# ----------------------------------------------------------------------------------------------------------------------
def _batch_weights(gen: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randn(6, 16, generator=gen) * 0.02,
        (torch.randn(5, 8, generator=gen)).to(torch.bfloat16),
        torch.randn(3, 4, 12, generator=gen),
        torch.randn(16, 8, generator=gen).t(),  # a transposed view (Conv1D-like storage)
        torch.randn(0, 8, generator=gen),
        torch.randn(4, 8, generator=gen),
    ]


def test_batch_equals_one_call_per_weight():
    gen = torch.Generator().manual_seed(5)
    weights = _batch_weights(gen)
    mults = [1.0, 2.0, 0.5, 1.5, 1.0, 0.0]
    scales = [None, torch.rand(8, generator=gen) + 0.5, None, None, None, None]
    lam = 0.75
    expected = [prox_2to4(w, lam * m, column_scale=s) if m else w.clone() for w, m, s in zip(weights, mults, scales)]
    batch = Prox2to4Batch(weights, multipliers=mults, column_scales=scales)
    batch(lam)
    for got, want in zip(weights, expected):
        assert torch.equal(got, want)
    assert batch.matches(weights, mults, scales)
    batch(0.0)  # lam 0: identity
    for got, want in zip(weights, expected):
        assert torch.equal(got, want)


def test_batch_matches_only_the_same_weights_factors_and_scales():
    gen = torch.Generator().manual_seed(6)
    weights = [torch.randn(4, 8, generator=gen), torch.randn(2, 4, generator=gen)]
    scale = torch.rand(8, generator=gen) + 0.5
    batch = Prox2to4Batch(weights, multipliers=[1.0, 2.0], column_scales=[scale, None])
    assert batch.matches(weights, [1.0, 2.0], [scale, None])
    assert not batch.matches(weights, [1.0, 3.0], [scale, None])  # another factor
    assert not batch.matches(weights, [1.0, 2.0], [scale.clone(), None])  # another scale tensor
    assert not batch.matches([weights[0].clone(), weights[1]], [1.0, 2.0], [scale, None])  # reallocated
    assert not batch.matches(weights[:1], [1.0], [scale])  # fewer weights
    assert not batch.matches(weights)  # default factors 1 and no scales


def test_batch_uses_the_scales_as_they_were_when_built():
    """The batch keeps a copy of each column scale (the Triton plan stores s and 1/s): changing the caller's tensor in
    place afterwards changes nothing, on every backend."""
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 16, generator=gen)
    scale = torch.rand(16, generator=gen) + 0.5
    expected = prox_2to4(weight, 0.75, column_scale=scale)
    batch = Prox2to4Batch([weight], column_scales=[scale])
    scale.mul_(3.0)
    batch(0.75)
    assert torch.equal(weight, expected)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"multipliers": [1.0]}, ValueError, "got 2 weights, 1 multipliers and 2 column scales"),
        ({"column_scales": [None]}, ValueError, "got 2 weights, 2 multipliers and 1 column scales"),
        ({"multipliers": [1.0, -1.0]}, ValueError, r"weight 1: its multiplier must be a finite number >= 0, got -1.0"),
        ({"column_scales": [None, torch.ones(3)]}, ValueError, r"weight 1: `column_scale` .* \(8\), got \(3,\)"),
        ({"tol": 2.0}, ValueError, "weight 0: `tol` must be a number in"),
        ({"backend": "cuda"}, ValueError, "weight 0: `backend` must be one of"),
    ],
)
def test_batch_errors(kwargs, exc, match):
    weights = [torch.randn(2, 8), torch.randn(3, 8)]
    with pytest.raises(exc, match=match):
        Prox2to4Batch(weights, **kwargs)


def test_batch_errors_on_bad_weights_and_lam():
    with pytest.raises(ValueError, match=r"weight 1: `weight` of shape \(2, 6\)"):
        Prox2to4Batch([torch.randn(2, 8), torch.randn(2, 6)])
    with pytest.raises(TypeError, match="weight 0: `weight` must be a torch.Tensor"):
        Prox2to4Batch([[1.0, 2.0, 3.0, 4.0]])
    batch = Prox2to4Batch([torch.randn(2, 8)])
    for bad in (-1.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="`lam` must be a finite number >= 0"):
            batch(bad)
