"""GPU tests of the fused Triton telemetry kernel against the torch path of ``group_statistics`` (run on CUDA only)."""

from __future__ import annotations

import math

import pytest
import torch

from proxsparse_hf.learning.telemetry import group_statistics, sample_rows

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# one shape per tile configuration of the kernel (a group per row, narrow rows, a full row segment) and a 7B-sized one
SHAPES = [(1000, 4), (7, 36), (130, 520), (2048, 11008)]


def _tricky(rows: int, cols: int, dtype: torch.dtype, seed: int, nan: bool) -> torch.Tensor:
    """Random weights on CUDA with exact ties, zeros (+0 and -0), sign flips and (``nan``) a few NaNs."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, device="cuda")
    u = torch.rand(rows, cols, generator=g, device="cuda")
    x = torch.where(u < 0.15, 0.0, x)
    x = torch.where((u >= 0.15) & (u < 0.45), torch.round(x * 2) / 2, x)  # ties within groups
    x = torch.where((u >= 0.45) & (u < 0.5), -x, x)
    x = torch.where((u >= 0.52) & (u < 0.55), -torch.zeros((), device="cuda"), x)
    if nan:
        x = torch.where((u >= 0.5) & (u < 0.51), float("nan"), x)
    return x.to(dtype)


def _close(got: float, want: float, rel: float) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return abs(got - want) <= rel * abs(want) + 1e-30


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nan", [False, True])
def test_kernel_matches_the_torch_path(dtype, shape, nan):
    rows, cols = shape
    view = _tricky(rows, cols, dtype, seed=rows + cols, nan=nan)
    scale = torch.rand(cols, device="cuda") * 2 + 0.05
    scale[::5] = 1.0  # exact ties survive the scale there
    moved = (view.float() + 0.01 * torch.randn(rows, cols, device="cuda")).to(dtype)
    # the four (scale, previous codes, row-sampled original) combinations of a two-level orthogonal array: every pair
    # of options is met, with half the kernel variants of the full product to compile
    for use_scale, use_previous, stride in ((False, False, 1), (False, True, 64), (True, False, 64), (True, True, 1)):
        column_scale = scale if use_scale else None
        prev = None
        if use_previous:
            codes0, _ = group_statistics(view, column_scale, backend="torch")
            prev = torch.where(torch.rand(codes0.shape, device="cuda") < 0.7, codes0, (codes0 + 1) % 16)
        original = sample_rows(moved, stride)
        args = (view, column_scale, prev)
        kw = dict(original=original, original_row_stride=stride)
        want_codes, want = group_statistics(*args, **kw, backend="torch")
        got_codes, got = group_statistics(*args, **kw, backend="triton")
        assert got_codes.dtype == torch.uint8 and torch.equal(got_codes, want_codes)
        assert got.dtype == torch.float64 and got.device == view.device
        got, want = got.tolist(), want.tolist()
        assert got[:2] == want[:2]
        assert _close(got[2], want[2], 1e-5), (got, want)
        assert _close(got[3], want[3], 1e-5), (got, want)
        if not nan:
            assert want[2] > 0 and want[3] > 0


def test_kernel_without_original_and_dispatch():
    view = _tricky(64, 256, torch.bfloat16, seed=0, nan=False)
    codes, sums = group_statistics(view)  # auto: the kernel on a contiguous CUDA view
    want_codes, want = group_statistics(view, backend="torch")
    assert torch.equal(codes, want_codes) and sums[3] == 0 and sums[1] == 0
    assert sums[0] == want[0] and _close(float(sums[2]), float(want[2]), 1e-5)
    codes_t, sums_t = group_statistics(view.t().contiguous().t())  # non-contiguous: the torch path
    assert torch.equal(codes_t, want_codes) and torch.equal(sums_t, want)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        group_statistics(view.t().contiguous().t(), backend="triton")


@pytest.mark.parametrize("snapshot_device", ["same", "cpu"])
def test_learner_statistics_on_cuda_match_the_cpu_computation(snapshot_device):
    from tiny_models import tiny_model

    from proxsparse_hf import ProxSparseConfig
    from proxsparse_hf.learning.learner import MaskLearner

    torch.manual_seed(0)
    model = tiny_model("llama", hidden=256).cuda()
    learner = MaskLearner(model, ProxSparseConfig(lambda1=0.5, snapshot_device=snapshot_device))
    with torch.no_grad():
        for s in learner.shards.values():
            s.target.weight.add_(0.01 * torch.randn_like(s.target.weight))
    learner.prox_step(1, 10)
    got = learner.statistics()
    ok = groups = reg = dist = numel = 0.0
    for s in learner.shards.values():
        w = s.target.weight.detach().cpu()
        w0 = learner.original[s.name].cpu()
        _, sums = group_statistics(w, original=w0 if snapshot_device == "same" else sample_rows(w0, 64),
                                   original_row_stride=1 if snapshot_device == "same" else 64)  # fmt: skip
        ok, reg, groups, numel = ok + float(sums[0]), reg + float(sums[2]), groups + w.numel() / 4, numel + w.numel()
        dist += float(sums[3]) * w.numel() / (w0[:: 1 if snapshot_device == "same" else 64].numel())
    assert got["proxsparse/frac_2to4"] == ok / groups
    assert got["proxsparse/regularizer"] == pytest.approx(reg, rel=1e-5)
    assert got["proxsparse/dist_to_original"] == pytest.approx(dist / numel, rel=1e-5) and dist > 0
    assert learner.statistics()["proxsparse/mask_flips"] == 0.0
