"""Tests of the 2:4 regulariser value and of the frozen-weight regulariser and its analytic gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

import proxsparse_hf.learning.regularizers as reg_mod
from proxsparse_hf.learning.regularizers import frozen_weight_grad, frozen_weight_regularizer, regularizer_2to4


def _reference_2to4(w: torch.Tensor) -> float:
    g = w.double().reshape(-1, 4)
    return float(sum((g[:, i] * g[:, j] * g[:, k]).abs().sum() for i, j, k in itertools.combinations(range(4), 3)))


def test_regularizer_matches_triple_products():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.0, 1.0, 0.0, -4.0]])
    # group 1: |1*-2*3| + |1*-2*0.5| + |1*3*0.5| + |-2*3*0.5| = 6 + 1 + 1.5 + 3 = 11.5; group 2 is 2:4 -> 0
    assert regularizer_2to4(w).item() == pytest.approx(11.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 64, generator=gen)
    out = regularizer_2to4(x)
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(_reference_2to4(x), rel=1e-5)


def test_regularizer_zero_exactly_on_2to4_and_chunked(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=gen)
    keep = x.abs().view(-1, 4).topk(2, dim=1).indices
    pruned = torch.zeros_like(x.view(-1, 4)).scatter_(1, keep, x.view(-1, 4).gather(1, keep)).view_as(x)
    assert regularizer_2to4(pruned).item() == 0.0
    full = regularizer_2to4(x)
    monkeypatch.setattr(reg_mod, "_CHUNK_ELEMENTS", 32)
    assert regularizer_2to4(x).item() == pytest.approx(full.item(), rel=1e-6)
    assert regularizer_2to4(x.t().contiguous().t()).item() == pytest.approx(full.item(), rel=1e-6)
    assert regularizer_2to4(x.view(2, 20, 16).bfloat16()).item() == pytest.approx(
        _reference_2to4(x.bfloat16()), rel=1e-5
    )
    assert regularizer_2to4(torch.empty(0, 8)).item() == 0.0


def test_regularizer_shape_error():
    with pytest.raises(ValueError, match=r"shape \(3, 6\).*divisible by 4"):
        regularizer_2to4(torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"shape \(\)"):
        regularizer_2to4(torch.tensor(1.0))


def test_frozen_weight_grad_matches_autograd_and_formula():
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    w0[0, :3] = 0.0  # sign(0) := +1
    w = (w0 + 0.1 * torch.randn(16, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    eps = 0.1
    sign = torch.where(w0 < 0, -1.0, 1.0).double()
    value = ((w * (w - w0) / (w0 + eps * sign)) ** 2).sum()
    (expected,) = torch.autograd.grad(value, w)
    got = frozen_weight_grad(w.detach().float(), w0.float(), eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    a = 1.0 / (w0 + eps * sign)
    torch.testing.assert_close(
        got.double(), 2 * a**2 * w.detach() * (w.detach() - w0) * (2 * w.detach() - w0), rtol=1e-4, atol=1e-6
    )
    assert frozen_weight_regularizer(w.detach().float(), w0.float(), eps).item() == pytest.approx(
        value.item(), rel=1e-5
    )


def test_frozen_weight_regularizer_zero_at_original_and_at_zero_and_dtypes():
    w0 = torch.randn(4, 8).bfloat16()
    assert frozen_weight_regularizer(w0, w0, 0.1).item() == 0.0
    assert frozen_weight_regularizer(torch.zeros_like(w0), w0, 0.1).item() == 0.0
    grad = frozen_weight_grad(w0.clone(), w0.float(), 0.1)
    assert grad.dtype == torch.bfloat16 and torch.count_nonzero(grad) == 0
    assert torch.count_nonzero(frozen_weight_grad(torch.zeros_like(w0), w0, 0.1)) == 0


@pytest.mark.parametrize(
    ("original", "eps", "match"),
    [
        (torch.randn(4, 4), 0.1, r"`original` must have the shape of `weight`: got \(4, 4\) and \(4, 8\)"),
        (torch.randn(4, 8), 0.0, "`epsilon` must be a number > 0, got 0.0"),
        (torch.randn(4, 8), -1, "`epsilon` must be a number > 0, got -1"),
    ],
)
def test_frozen_weight_errors(original, eps, match):
    with pytest.raises(ValueError, match=match):
        frozen_weight_grad(torch.randn(4, 8), original, eps)
    with pytest.raises(ValueError, match=match):
        frozen_weight_regularizer(torch.randn(4, 8), original, eps)
