"""GPU tests of the fused Triton prox kernel against an independent float64 brute-force reference (run on CUDA only)."""

from __future__ import annotations

import itertools

import pytest
import torch

from proxsparse_hf.learning.prox import Prox2to4Batch, prox_2to4, prox_2to4_

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N_GROUPS = 1_000_000
RTOL, ATOL = 1e-6, 1e-12


def objective64(w: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    w = w.double()
    v = v.double()
    reg = sum((w[..., i] * w[..., j] * w[..., k]).abs() for i, j, k in itertools.combinations(range(4), 3))
    return 0.5 * (w - v).square().sum(-1) + lam * reg


def _value(x: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """0.5|x-b|^2 + lam*e3(x) on a support of size n (x >= 0)."""
    f = 0.5 * (x - b).square().sum(-1)
    for c in itertools.combinations(range(x.shape[-1]), 3):
        f = f + lam * x[..., c[0]] * x[..., c[1]] * x[..., c[2]]
    return f


def _smooth(x: torch.Tensor, b: torch.Tensor, lam: float):
    """Value, gradient, Hessian of 0.5|x-b|^2 + lam*e3(x) on a support of size n (x > 0)."""
    n = x.shape[-1]
    f = 0.5 * (x - b).square().sum(-1)
    g = x - b
    h = torch.eye(n, dtype=x.dtype, device=x.device).expand(x.shape + (n,)).clone()
    for c in itertools.combinations(range(n), 3):
        f = f + lam * x[..., c[0]] * x[..., c[1]] * x[..., c[2]]
        for i in c:
            j, k = (q for q in c if q != i)
            g[..., i] += lam * x[..., j] * x[..., k]
            h[..., j, k] += lam * x[..., i]
    return f, g, h


def _newton_direction(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Solve h d = g by Gaussian elimination (n <= 4, batched); gradient direction where h is not positive definite."""
    n = g.shape[-1]
    m = torch.cat([h, g.unsqueeze(-1)], -1).clone()
    pd = torch.ones(g.shape[:-1], dtype=torch.bool, device=g.device)
    for k in range(n):
        piv = m[..., k, k]
        pd &= piv > 1e-12
        piv = torch.where(piv.abs() > 1e-300, piv, torch.ones_like(piv))
        m[..., k, :] = m[..., k, :] / piv.unsqueeze(-1)
        for r in range(n):
            if r != k:
                m[..., r, :] = m[..., r, :] - m[..., r, k : k + 1] * m[..., k, :]
    return torch.where(pd.unsqueeze(-1), m[..., :, n], g)


def brute_force64(v: torch.Tensor, lam: float, grid: int = 7, top: int = 4, iters: int = 30, chunk: int = 1 << 16):
    """Best objective over every support: closed form on supports of size <= 2 (there R = 0); grid search, then
    projected Newton with a batched step-halving line search from the best grid points, |v| and |v|/2 on supports
    of size 3 and 4. Float64, on v's device."""
    out = []
    halvings = 0.5 ** torch.arange(12, dtype=torch.float64, device=v.device)
    for c0 in range(0, v.shape[0], chunk):
        a = v[c0 : c0 + chunk].double().abs()
        best = 0.5 * a.square().sum(-1)
        for size in (1, 2):
            for support in itertools.combinations(range(4), size):
                w = torch.zeros_like(a)
                w[:, list(support)] = a[:, list(support)]
                best = torch.minimum(best, objective64(w, a, lam))
        frac = torch.linspace(0, 1, grid, dtype=torch.float64, device=a.device)
        for size in (3, 4):
            pts = torch.cartesian_prod(*([frac] * size))
            for support in itertools.combinations(range(4), size):
                cols = list(support)
                b = a[:, cols].unsqueeze(1)
                x = pts.unsqueeze(0) * b
                vals = _value(x, b, lam)
                rest = 0.5 * a.square().sum(-1) - 0.5 * b.squeeze(1).square().sum(-1)
                best = torch.minimum(best, vals.amin(1) + rest)
                order = vals.argsort(1)[:, :top]
                x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, size))
                x = torch.cat([torch.maximum(x, 1e-3 * b), b, 0.5 * b], 1)
                bb = b.unsqueeze(2)
                for _ in range(iters):
                    f, g, h = _smooth(x, b, lam)
                    step = _newton_direction(h, g)
                    trial = torch.minimum(
                        (x.unsqueeze(2) - halvings.view(1, 1, -1, 1) * step.unsqueeze(2)).clamp_min(0), bb
                    )
                    ft = _value(trial, bb, lam)
                    pick = ft.argmin(2)
                    fn = ft.gather(2, pick.unsqueeze(-1)).squeeze(-1)
                    xn = trial.gather(2, pick.view(*pick.shape, 1, 1).expand(-1, -1, 1, size)).squeeze(2)
                    x = torch.where((fn <= f).unsqueeze(-1), xn, x)
                best = torch.minimum(best, _value(x, b, lam).amin(1) + rest)
        out.append(best)
    return torch.cat(out)


def _groups(kind: str, sigma: float, gen: torch.Generator) -> torch.Tensor:
    dev = "cuda"
    if kind == "random":
        return torch.randn(N_GROUPS, 4, generator=gen, device=dev) * sigma
    # special rows: zeros, exact ties, near ties, already-2:4 groups, denormals, mixed scales
    n = N_GROUPS // 6
    rnd = torch.randn(N_GROUPS, 4, generator=gen, device=dev) * sigma
    parts = [rnd[:n] * (torch.rand(n, 4, generator=gen, device=dev) < 0.5)]  # zeros
    tie = sigma * torch.rand(n, 1, generator=gen, device=dev) * 3
    sign = torch.sign(torch.randn(n, 4, generator=gen, device=dev))
    parts.append(tie.expand(n, 4) * sign)  # exact ties
    parts.append((tie * (1 + 1e-3 * torch.randn(n, 4, generator=gen, device=dev))) * sign)  # near ties
    keep = torch.rand(n, 4, generator=gen, device=dev).argsort(1)[:, :2]
    parts.append(rnd[n : 2 * n] * torch.zeros(n, 4, device=dev, dtype=torch.bool).scatter_(1, keep, True))  # 2:4
    parts.append(torch.randn(n, 4, generator=gen, device=dev) * 1e-39)  # denormals
    rest = N_GROUPS - 5 * n
    parts.append(rnd[-rest:] * torch.rand(rest, 1, generator=gen, device=dev) * 4)
    return torch.cat(parts)


SETTINGS = [
    ("random", 0.02, 0.05),
    ("random", 0.02, 0.5),
    ("random", 0.02, 2.0),
    ("random", 1.0, 0.1),
    ("random", 1.0, 1.0),
    ("random", 1.0, 5.0),
    ("special", 0.02, 0.5),
    ("special", 1.0, 1.0),
]


@pytest.mark.parametrize(("kind", "sigma", "lam"), SETTINGS)
def test_kernel_matches_float64_reference(kind, sigma, lam):
    gen = torch.Generator(device="cuda").manual_seed(SETTINGS.index((kind, sigma, lam)))
    v = _groups(kind, sigma, gen)
    w_kernel = prox_2to4(v, lam, backend="triton")
    w_torch = prox_2to4(v, lam, backend="torch")
    ref = brute_force64(v, lam)
    f_kernel = objective64(w_kernel, v, lam)
    f_torch = objective64(w_torch, v, lam)
    slack = RTOL * ref.abs() + ATOL
    gap = f_kernel - ref
    bad = gap > slack
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {v.shape[0]} groups off the reference: v={v[bad][:3].tolist()} "
        f"gap={gap[bad][:3].tolist()} ref={ref[bad][:3].tolist()}"
    )
    assert not bool((f_kernel > f_torch + slack).any()), "kernel worse than the torch path"
    assert torch.isfinite(w_kernel).all()
    assert ((w_kernel * v) >= 0).all() and (w_kernel.abs() <= v.abs()).all()
    two_four = (v != 0).sum(1) <= 2
    assert torch.equal(w_kernel[two_four], v[two_four])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_in_place_dtypes_layouts_and_determinism(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = (torch.randn(512, 1024, generator=gen, device="cuda") * 0.02).to(dtype)
    expected = prox_2to4(base.float(), 0.7, backend="triton").to(dtype)
    # in place, contiguous
    w = base.clone()
    assert prox_2to4_(w, 0.7, backend="triton") is w
    assert torch.equal(w, expected)
    # deterministic
    w2 = base.clone()
    prox_2to4_(w2, 0.7, backend="triton")
    assert torch.equal(w, w2)
    # transposed storage (transformers Conv1D) and 3-D
    t = base.t().contiguous()
    prox_2to4_(t.t(), 0.7, backend="triton")
    assert torch.equal(t.t(), expected)
    cube = base.view(4, 128, 1024).clone()
    prox_2to4_(cube, 0.7, backend="triton")
    assert torch.equal(cube.view(512, 1024), expected)
    # close to the torch path (rounding of the last float32 bit may differ before the cast)
    torch_path = prox_2to4(base, 0.7, backend="torch")
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(w.float(), torch_path.float(), rtol=tol, atol=1e-6)
    # auto picks the kernel on CUDA
    w3 = base.clone()
    prox_2to4_(w3, 0.7)
    assert torch.equal(w3, expected)


def test_kernel_peak_extra_memory_is_tiny():
    w = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) * 0.02
    prox_2to4_(w, 0.5, backend="triton")  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    prox_2to4_(w, 0.5, backend="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 0.01 * w.numel() * w.element_size()


@pytest.mark.parametrize(("sigma", "lam"), [(0.02, 0.5), (1.0, 1.0), (1.0, 5.0)])
def test_kernel_with_column_scale_matches_float64_reference(sigma, lam):
    """The fused ``column_scale`` path solves the prox of W·s exactly (objective in the scaled coordinates)."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    cols = 1000  # N_GROUPS * 4 / 1000 rows
    v = _groups("random", sigma, gen).reshape(-1, cols)
    scale = torch.rand(cols, generator=gen, device="cuda") * 3 + 1e-3
    w_kernel = prox_2to4(v, lam, backend="triton", column_scale=scale)
    w_torch = prox_2to4(v, lam, backend="torch", column_scale=scale)
    scaled = (v * scale).reshape(-1, 4)  # the float32 product the solvers see
    ref = brute_force64(scaled, lam)
    f_kernel = objective64((w_kernel * scale).reshape(-1, 4), scaled, lam)
    f_torch = objective64((w_torch * scale).reshape(-1, 4), scaled, lam)
    slack = 1e-5 * ref.abs() + ATOL  # plus the float32 rounding of (w / s) * s
    assert not bool((f_kernel - ref > slack).any())
    assert not bool((f_kernel > f_torch + slack).any())
    # in place on bf16: the same float32 math as on the float32 copy of the bf16 values, then one rounding
    w16 = v[:512].to(torch.bfloat16)
    expected = prox_2to4(w16.float(), lam, backend="triton", column_scale=scale).to(torch.bfloat16)
    assert prox_2to4_(w16, lam, backend="triton", column_scale=scale) is w16
    assert torch.equal(w16, expected)


def test_kernel_with_column_scale_peak_extra_memory_is_tiny():
    w = torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) * 0.02
    scale = torch.rand(11008, device="cuda") + 0.5
    prox_2to4_(w, 0.5, backend="triton", column_scale=scale)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    prox_2to4_(w, 0.5, backend="triton", column_scale=scale)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 0.01 * w.numel() * w.element_size()


def _mixed_weights(gen: torch.Generator, count: int) -> tuple[list, list, list]:
    """Weights of every dtype, odd shapes, a transposed view, 3-D and empty tensors, some with column scales."""
    weights, scales, mults = [], [], []
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for i in range(count):
        rows = int(torch.randint(1, 200, (1,), generator=gen, device="cuda"))
        cols = 4 * int(torch.randint(1, 90, (1,), generator=gen, device="cuda"))
        sigma = (0.02, 1.0)[i % 2]
        w = (torch.randn(rows, cols, generator=gen, device="cuda") * sigma).to(dtypes[i % 3])
        if i % 7 == 3:
            w = w.t().contiguous().t()  # transposed storage
        if i % 11 == 5:
            w = w.reshape(1, rows, cols)
        weights.append(w)
        scales.append(torch.rand(cols, generator=gen, device="cuda") + 0.25 if i % 4 == 1 else None)
        mults.append((1.0, 2.0, 0.5, 0.25)[i % 4])
    weights.append(torch.zeros(0, 8, device="cuda"))
    scales.append(None)
    mults.append(1.0)
    return weights, scales, mults


def test_batch_keeps_the_scales_it_converted():
    """Scales that are not contiguous float32 are converted when the batch is built; the plan's table points at the
    converted copies, so the batch must keep them alive: freeing them and reusing their memory changes nothing."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    weights = [torch.randn(64, 256, device="cuda", generator=gen) * 0.02 for _ in range(3)]
    scales = [torch.rand(256, device="cuda", generator=gen, dtype=torch.float64) + 0.5 for _ in weights]
    expected = []
    for w, s in zip(weights, scales):
        e = w.clone()
        prox_2to4_(e, 0.5, backend="triton", column_scale=s.float())
        expected.append(e)
    work = [w.clone() for w in weights]
    batch = Prox2to4Batch(work, column_scales=[s.clone() for s in scales], backend="triton")
    churn = [torch.full((256,), 1e6, device="cuda") for _ in range(64)]  # takes any float32 block freed above
    batch(0.5)
    for got, want in zip(work, expected):
        assert torch.equal(got, want)
    del churn


@pytest.mark.parametrize("count", [1, 2, 37])
def test_batch_equals_one_kernel_call_per_weight(count):
    """One plan for many weights (a table of the weights on the GPU) gives the single-weight results bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(count)
    weights, scales, mults = _mixed_weights(gen, count)
    lam = 0.75  # lam * multiplier is exact in float32 and float64 alike
    expected = []
    for w, s, m in zip(weights, scales, mults):
        e = w.clone()
        prox_2to4_(e, lam * m, backend="triton", column_scale=s)
        expected.append(e)
    work = [w.clone() for w in weights]
    batch = Prox2to4Batch(work, multipliers=mults, column_scales=scales, backend="triton")
    batch(lam)
    for got, want in zip(work, expected):
        assert torch.equal(got, want)
    # the flags of the exact pass are left zeroed: a second run from the same start gives the same answer
    for w, original in zip(work, weights):
        w.copy_(original)
    batch(lam)
    for got, want in zip(work, expected):
        assert torch.equal(got, want)
    # and never worse than the torch path (objective in float64, in the scaled coordinates where there is a scale)
    for w, s, m, got in zip(weights, scales, mults, work):
        if w.numel() == 0:
            continue
        ref = prox_2to4(w, lam * m, backend="torch", column_scale=s)
        one = torch.ones(w.shape[-1], device="cuda") if s is None else s
        v = (w.float() * one).reshape(-1, 4)
        f_batch = objective64((got.float() * one).reshape(-1, 4), v, lam * m)
        f_torch = objective64((ref.float() * one).reshape(-1, 4), v, lam * m)
        # 16-bit weights: both results are rounded to the weight's dtype, which moves the objective by ~1 ulp
        slack = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[w.dtype] * f_torch.abs() + 1e-9
        assert not bool((f_batch > f_torch + slack).any()), (w.dtype, tuple(w.shape), float((f_batch - f_torch).max()))


def test_batch_peak_extra_memory_is_tiny():
    weights = [torch.randn(4096, 11008, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2)]
    batch = Prox2to4Batch(weights)
    batch(0.5)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    batch(0.5)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 0.001 * sum(w.numel() * w.element_size() for w in weights)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mask_learner_prox_step_on_cuda_matches_the_cpu_path(family):
    """MaskLearner's prox step (one Triton batch for all contiguous targets; GPT-2's transposed Conv1D views go one
    by one) gives the CPU torch path's weights to solver precision, and reuses its batch across steps."""
    from tiny_models import tiny_model

    from proxsparse_hf import ProxSparseConfig
    from proxsparse_hf.learning.learner import MaskLearner

    config = ProxSparseConfig(lambda1=2.0)
    cpu_model = tiny_model(family)
    gpu_model = tiny_model(family).cuda()
    learners = [MaskLearner(m, config) for m in (cpu_model, gpu_model)]
    for learner in learners:
        assert learner.prox_step(1, 10) is True
    batch = learners[1]._prox_batch
    assert learners[1].prox_step(2, 10) is True and learners[1]._prox_batch is batch
    assert learners[0].prox_step(2, 10) is True
    cpu_params, gpu_params = dict(cpu_model.named_parameters()), dict(gpu_model.named_parameters())
    for target in learners[0].targets.values():
        name = target.param_name
        torch.testing.assert_close(gpu_params[name].detach().cpu(), cpu_params[name].detach(), rtol=1e-5, atol=1e-6)
