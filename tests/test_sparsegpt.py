"""SparseGPT internals: the lazy-block Cholesky sweep against a slow float64 OBS written from the definition, the
Hessian statistics, damping, dead inputs, and sequential calibration (block k is calibrated on the pruned blocks < k)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_windows
from torch import nn

from proxsparse_hf.pruners import prune, sparsegpt_2to4
from proxsparse_hf.pruners.sparsegpt import HessianStats


def obs_reference(
    weight: torch.Tensor, hessian: torch.Tensor, damp_percent: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 SparseGPT by the definition, in float64, one column at a time, explicit inverses, no lazy blocks.

    Column ``i`` is removed from the problem after it is fixed; what is left is the least-squares problem over columns
    ``i:`` with Hessian ``H[i:, i:]``. At the first column of each group of four, the two columns ``j`` of the group with
    the smallest OBS saliency ``w_j² / [(H[j:, j:])⁻¹]₀₀`` (current weights) are pruned in every row. Fixing column ``i``
    to ``q`` moves the remaining weights by the OBS step ``−(w_i − q) · [(H[i:, i:])⁻¹]₀,: / [(H[i:, i:])⁻¹]₀₀``.
    """
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp_percent * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64)
    inv_tail = [torch.linalg.inv(H[j:, j:]) for j in range(cols)]
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        if i % 4 == 0:
            saliency = torch.stack([W[:, j] ** 2 / inv_tail[j][0, 0] for j in range(i, i + 4)], dim=1)
            for r in range(rows):
                order = sorted(range(4), key=lambda k: (float(saliency[r, k]), k))
                for k in order[:2]:
                    pruned[r, i + k] = True
        inv = inv_tail[i]
        q = torch.where(pruned[:, i], torch.zeros_like(W[:, i]), W[:, i])
        W[:, i:] -= ((W[:, i] - q) / inv[0, 0]).unsqueeze(1) * inv[0].unsqueeze(0)
        W[:, i] = q
    return W, ~pruned


def random_layer(seed: int, rows: int = 16, cols: int = 32, tokens: int = 256):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    # correlated inputs with uneven feature scales, like real activations
    x = torch.randn(tokens, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))
    x *= torch.rand(cols, generator=gen) * 3 + 0.2
    return weight, x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_size", [4, 12, 128])
def test_sweep_matches_float64_obs_reference(seed, block_size):
    weight, x = random_layer(seed)
    stats = HessianStats(x.shape[1])
    stats.add(x)
    updated, keep = sparsegpt_2to4(weight, stats.hessian, damp_percent=0.01, block_size=block_size)
    ref_weight, ref_keep = obs_reference(weight, 2 * x.double().t() @ x.double() / x.shape[0], 0.01)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(updated.double(), ref_weight, rtol=1e-4, atol=1e-4)
    # the update matters: the reference mask on the original weights is a different (worse) layer
    assert not torch.allclose(updated, weight * keep, atol=1e-3)


def test_sweep_matches_reference_with_dead_inputs_and_heavy_damping():
    weight, x = random_layer(3)
    x[:, [1, 6, 7]] = 0.0  # inputs that never fire: their weights are pruned/zeroed and do not break the inverse
    stats = HessianStats(x.shape[1])
    stats.add(x)
    updated, keep = sparsegpt_2to4(weight, stats.hessian, damp_percent=0.5, block_size=8)
    ref_weight, ref_keep = obs_reference(weight, 2 * x.double().t() @ x.double() / x.shape[0], 0.5)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(updated.double(), ref_weight, rtol=1e-4, atol=1e-4)
    assert not updated[:, [1, 6, 7]].any()


def test_transposed_weight_gives_the_transposed_result():
    weight, x = random_layer(4)
    stats = HessianStats(x.shape[1])
    stats.add(x)
    updated, keep = sparsegpt_2to4(weight, stats.hessian, block_size=8)
    updated_t, keep_t = sparsegpt_2to4(weight.t().contiguous(), stats.hessian, transposed=True, block_size=8)
    assert torch.equal(keep_t, keep.t())
    torch.testing.assert_close(updated_t, updated.t())


def test_hessian_stats_is_twice_the_mean_outer_product_over_tokens():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 5, 8, generator=gen), torch.randn(1, 7, 8, generator=gen)]
    stats = HessianStats(8)
    for chunk in chunks:
        stats.add(chunk)
    flat = torch.cat([c.reshape(-1, 8) for c in chunks]).double()
    assert stats.num_tokens == 17
    torch.testing.assert_close(stats.hessian.double(), 2 * flat.t() @ flat / 17, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- sequential calibration
class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.proj(hidden_states))


class TwoBlockLM(nn.Module):
    def __init__(self, vocab: int = 32, hidden: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([Block(hidden), Block(hidden)])

    def forward(self, input_ids: torch.Tensor, attention_mask=None, use_cache=None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def test_second_block_is_calibrated_on_the_first_blocks_pruned_output():
    model = TwoBlockLM(seed=1)
    ids = random_windows(4, 24, vocab=32, seed=3)
    with torch.no_grad():
        dense_in_1 = model.layers[0](model.embed(ids)).reshape(-1, 16)
    weight_1 = model.layers[1].proj.weight.detach().clone()
    prune(model, "sparsegpt", ids, block_size=8)
    with torch.no_grad():  # block 0 is pruned (and updated) now: block 1 must have been calibrated on this
        pruned_in_1 = model.layers[0](model.embed(ids)).reshape(-1, 16)
    assert not torch.allclose(pruned_in_1, dense_in_1, atol=1e-3)

    def hessian(x: torch.Tensor) -> torch.Tensor:
        stats = HessianStats(16)
        stats.add(x)
        return stats.hessian

    expected, expected_keep = sparsegpt_2to4(weight_1, hessian(pruned_in_1), block_size=8)
    from_dense, _ = sparsegpt_2to4(weight_1, hessian(dense_in_1), block_size=8)
    assert torch.equal(model.layers[1].proj.weight != 0, expected_keep & (expected != 0))
    torch.testing.assert_close(model.layers[1].proj.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, from_dense, atol=1e-4)
