"""One-shot 2:4 pruners: magnitude, Wanda, SparseGPT (incl. mask-only), RIA, sequential activation capture, errors.

The registry itself (registration, options, a toy pruner, the CLI's method list) is tested in test_pruner_registry.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import C4_VALIDATION
from tiny_models import FAMILIES, random_windows, tiny_model
from torch import nn

from proxsparse_hf.config import ProxSparseConfig
from proxsparse_hf.data import TokenWindows
from proxsparse_hf.masks import extract_2to4_masks, is_2to4, mask_2to4
from proxsparse_hf.pruners import (
    get_pruner,
    prune,
    pruner_names,
    ria_mask,
    ria_scores,
    sparsegpt_2to4,
    wanda_mask,
    wanda_scores,
)
from proxsparse_hf.pruners.capture import CalibrationBatches, _call_block, capture_block_inputs, find_decoder_blocks
from proxsparse_hf.targets import find_targets

# every registered method that prunes through prune() (dense prunes nothing, learned methods train)
ONE_SHOT = tuple(n for n in pruner_names() if n != "dense" and not get_pruner(n).learned)


class ToyBlock(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + torch.tanh(self.proj(hidden_states))


class ToyLM(nn.Module):
    """Embedding + a list of one-Linear blocks: the smallest model the sequential baselines accept."""

    def __init__(self, vocab: int = 16, hidden: int = 8, blocks: int = 1, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([ToyBlock(hidden) for _ in range(blocks)])

    def forward(self, input_ids: torch.Tensor, attention_mask=None, use_cache=None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def hand_wanda_mask(weight: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Wanda by the definition, with explicit loops: score |W_ij|·sqrt(Σ_t x_tj²), keep the 2 best of each group of 4."""
    rows, cols = weight.shape
    norms = [float(sum(float(x) ** 2 for x in inputs[:, j]) ** 0.5) for j in range(cols)]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g in range(0, cols, 4):
            scores = [(abs(float(weight[i, j])) * norms[j], j) for j in range(g, g + 4)]
            best = sorted(scores, key=lambda s: (-s[0], s[1]))[:2]
            for _, j in best:
                mask[i, j] = True
    return mask


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ weight.t() - x @ pruned.t()))


# ----------------------------------------------------------------------------------------------------------- Wanda
def test_wanda_scores_equal_hand_computation_on_single_linear():
    torch.manual_seed(0)
    weight = torch.randn(3, 8)
    x = torch.randn(20, 8) * torch.linspace(0.1, 3.0, 8)
    norms = x.pow(2).sum(0).sqrt()
    expected = torch.tensor([[abs(float(weight[i, j])) * float(norms[j]) for j in range(8)] for i in range(3)])
    torch.testing.assert_close(wanda_scores(weight, norms), expected)
    assert torch.equal(wanda_mask(weight, norms), hand_wanda_mask(weight, x))
    # Conv1D layout ([in, out]): same scores, transposed
    torch.testing.assert_close(wanda_scores(weight.t(), norms, transposed=True), expected.t())
    assert torch.equal(wanda_mask(weight.t().contiguous(), norms, transposed=True), hand_wanda_mask(weight, x).t())


def test_wanda_prune_on_single_linear_layer_matches_hand_computation():
    model = ToyLM(hidden=8, blocks=1)
    ids = random_windows(3, 5, vocab=16, seed=1)
    weight = model.layers[0].proj.weight.detach().clone()
    inputs = model.embed(ids).detach().reshape(-1, 8)
    expected = hand_wanda_mask(weight, inputs)
    masks = prune(model, "wanda", ids, batch_size=2)
    assert list(masks) == ["layers.0.proj.weight"]
    assert torch.equal(masks["layers.0.proj.weight"], expected)
    torch.testing.assert_close(model.layers[0].proj.weight.detach(), weight * expected, rtol=0, atol=0)
    # Wanda differs from magnitude here (activation scale matters), otherwise the test would not test anything
    assert not torch.equal(expected, mask_2to4(weight))


def test_wanda_is_sequential_inputs_come_from_pruned_blocks():
    model = ToyLM(hidden=8, blocks=2, seed=3)
    ids = random_windows(4, 6, vocab=16, seed=2)
    with torch.no_grad():
        dense_in_1 = model.layers[0](model.embed(ids)).reshape(-1, 8)
    weight_1 = model.layers[1].proj.weight.detach().clone()
    masks = prune(model, "wanda", ids)
    with torch.no_grad():  # block 0 is pruned now: these are the inputs Wanda must have used for block 1
        pruned_in_1 = model.layers[0](model.embed(ids)).reshape(-1, 8)
    assert torch.equal(masks["layers.1.proj.weight"], hand_wanda_mask(weight_1, pruned_in_1))
    assert not torch.equal(hand_wanda_mask(weight_1, dense_in_1), hand_wanda_mask(weight_1, pruned_in_1))


# ------------------------------------------------------------------------------------------------------- SparseGPT
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_reconstruction_error_below_magnitude_and_wanda(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, cols, tokens = 48, 64, 512
    weight = torch.randn(rows, cols, generator=gen)
    mixing = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = (torch.randn(tokens, cols, generator=gen) @ mixing) * (0.2 + 2 * torch.rand(cols, generator=gen))
    hessian = 2 * x.t() @ x / tokens
    errors = {
        "magnitude": reconstruction_error(weight, weight * mask_2to4(weight), x),
        "wanda": reconstruction_error(weight, weight * wanda_mask(weight, x.pow(2).sum(0).sqrt()), x),
    }
    updated, keep = sparsegpt_2to4(weight, hessian, block_size=16)
    errors["sparsegpt"] = reconstruction_error(weight, updated, x)
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    assert is_2to4(updated) and is_2to4(keep.float())
    assert bool((keep.reshape(-1, 4).sum(1) == 2).all())
    assert bool((updated[~keep] == 0).all())
    # Conv1D layout gives the same result, transposed
    updated_t, keep_t = sparsegpt_2to4(weight.t().contiguous(), hessian, transposed=True, block_size=16)
    torch.testing.assert_close(updated_t, updated.t())
    assert torch.equal(keep_t, keep.t())


def test_sparsegpt_block_size_only_changes_rounding():
    gen = torch.Generator().manual_seed(5)
    weight, x = torch.randn(8, 32, generator=gen), torch.randn(100, 32, generator=gen)
    hessian = 2 * x.t() @ x / 100
    a, mask_a = sparsegpt_2to4(weight, hessian, block_size=4)
    b, mask_b = sparsegpt_2to4(weight, hessian, block_size=128)
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sparsegpt_without_weight_update_keeps_original_weights_under_its_mask():
    ids = random_windows(4, 8, vocab=16, seed=4)
    updated_model, mask_model = ToyLM(hidden=16, seed=7), ToyLM(hidden=16, seed=7)
    original = mask_model.layers[0].proj.weight.detach().clone()
    masks_update = prune(updated_model, "sparsegpt", ids, block_size=8)
    masks_only = prune(mask_model, "sparsegpt", ids, block_size=8, update_weights=False)
    name = "layers.0.proj.weight"
    assert torch.equal(masks_update[name], masks_only[name])
    torch.testing.assert_close(mask_model.layers[0].proj.weight.detach(), original * masks_only[name], rtol=0, atol=0)
    kept = masks_update[name]
    assert not torch.allclose(updated_model.layers[0].proj.weight.detach()[kept], original[kept])


# ------------------------------------------------------------------------------------------------------------- RIA
def hand_ria_mask(weight: torch.Tensor, inputs: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA by the definition, with explicit loops over W [out, in]: (|W_ij|/Σ_k|W_kj| + |W_ij|/Σ_k|W_ik|)·‖X_j‖₂^alpha,
    keep the 2 best of each group of 4 (lower index first on ties)."""
    rows, cols = weight.shape
    w = [[abs(float(weight[i, j])) for j in range(cols)] for i in range(rows)]
    norms = [float(sum(float(x) ** 2 for x in inputs[:, j]) ** 0.5) for j in range(cols)]
    column_sums = [sum(w[k][j] for k in range(rows)) for j in range(cols)]
    row_sums = [sum(w[i][k] for k in range(cols)) for i in range(rows)]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g in range(0, cols, 4):
            scores = [
                ((w[i][j] / column_sums[j] + w[i][j] / row_sums[i]) * norms[j] ** alpha, j) for j in range(g, g + 4)
            ]
            for _, j in sorted(scores, key=lambda s: (-s[0], s[1]))[:2]:
                mask[i, j] = True
    return mask


def test_ria_scores_by_hand_differ_from_wanda():
    # column sums 16, 4, 4, 2; row sums 10, 16; ‖X_j‖₂^0.5 = 1, 1, 2, 1
    weight = torch.tensor([[4.0, -3.0, 2.0, 1.0], [-12.0, 1.0, 2.0, -1.0]])
    norms = torch.tensor([1.0, 1.0, 4.0, 1.0])
    expected_scores = torch.tensor(
        [
            [4 / 16 + 4 / 10, 3 / 4 + 3 / 10, (2 / 4 + 2 / 10) * 2, 1 / 2 + 1 / 10],
            [12 / 16 + 12 / 16, 1 / 4 + 1 / 16, (2 / 4 + 2 / 16) * 2, 1 / 2 + 1 / 16],
        ]
    )
    torch.testing.assert_close(ria_scores(weight, norms), expected_scores)
    ria = torch.tensor([[False, True, True, False], [True, False, True, False]])
    wanda = torch.tensor([[True, False, True, False], [True, False, True, False]])
    assert torch.equal(ria_mask(weight, norms), ria)
    assert torch.equal(wanda_mask(weight, norms), wanda)  # |w|·‖x‖: 4, 3, 8, 1 keeps columns 0 and 2 in row 0
    # alpha = 0: relative importance only; alpha = 1: full norm
    torch.testing.assert_close(ria_scores(weight, norms, alpha=0.0)[0, 2], torch.tensor(2 / 4 + 2 / 10))
    torch.testing.assert_close(ria_scores(weight, norms, alpha=1.0)[0, 2], torch.tensor((2 / 4 + 2 / 10) * 4))
    # Conv1D layout ([in, out]): same scores and mask, transposed
    torch.testing.assert_close(ria_scores(weight.t(), norms, transposed=True), expected_scores.t())
    assert torch.equal(ria_mask(weight.t().contiguous(), norms, transposed=True), ria.t())


def test_ria_all_zero_rows_and_columns_give_zero_scores():
    weight = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 2.0, 3.0]])
    scores = ria_scores(weight, torch.ones(4))
    assert bool(torch.isfinite(scores).all()) and bool((scores[0] == 0).all()) and float(scores[1, 1]) == 0.0


def test_ria_prune_on_single_linear_layer_matches_hand_computation():
    model = ToyLM(hidden=8, blocks=1, seed=1)
    ids = random_windows(3, 5, vocab=16, seed=1)
    weight = model.layers[0].proj.weight.detach().clone()
    inputs = model.embed(ids).detach().reshape(-1, 8)
    expected = hand_ria_mask(weight, inputs)
    masks = prune(model, "ria", ids, batch_size=2)
    assert torch.equal(masks["layers.0.proj.weight"], expected)
    # mask only: surviving weights keep their values
    torch.testing.assert_close(model.layers[0].proj.weight.detach(), weight * expected, rtol=0, atol=0)
    assert not torch.equal(expected, hand_wanda_mask(weight, inputs))  # the test tells RIA from Wanda
    alpha_one = ToyLM(hidden=8, blocks=1, seed=1)
    masks = prune(alpha_one, "ria", ids, alpha=1.0)
    assert torch.equal(masks["layers.0.proj.weight"], hand_ria_mask(weight, inputs, alpha=1.0))
    assert not torch.equal(masks["layers.0.proj.weight"], expected)  # alpha reaches the scores


def test_ria_on_gpt2_conv1d_uses_the_input_dimension():
    model = tiny_model("gpt2", layers=1, hidden=32)
    ids = random_windows(3, 8, vocab=128, seed=6)
    targets = find_targets(model)
    original = {t.param_name: t.weight.detach().clone() for t in targets.values()}
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in targets}
    handles = [
        t.module.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0].detach()))
        for name, t in targets.items()
    ]
    with torch.no_grad():  # one block: Wanda/RIA statistics come from the dense forward of block 0
        model(ids)
    for handle in handles:
        handle.remove()
    masks = prune(model, "ria", ids)
    for name, target in targets.items():
        assert target.transposed
        x = torch.cat(inputs[name]).reshape(-1, original[target.param_name].shape[0])
        expected = hand_ria_mask(original[target.param_name].t(), x).t()
        assert torch.equal(masks[target.param_name], expected), name


# ------------------------------------------------------------------------------------------------ every family, 2:4
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ONE_SHOT)
def test_every_family_and_method_gives_exact_2to4(family, method):
    model = tiny_model(family, layers=2, hidden=32)
    ids = random_windows(4, 16, vocab=128, seed=0)
    targets = find_targets(model)
    masks = prune(model, method, TokenWindows(ids), batch_size=2)
    assert list(masks) == [t.param_name for t in targets.values()]
    for target in targets.values():
        mask = masks[target.param_name]
        weight = target.weight.detach()
        assert mask.dtype == torch.bool and mask.shape == weight.shape and mask.device.type == "cpu"
        grouped = target.grouped(mask)
        assert bool((grouped.reshape(-1, 4).sum(1) == 2).all()), target.name
        assert is_2to4(target.grouped(weight)), target.name
        assert bool((weight[~mask] == 0).all()), target.name
        if target.transposed:  # Conv1D: groups along dim 0
            assert is_2to4(weight, dim=0)
    assert not model.training
    with torch.no_grad():
        assert bool(torch.isfinite(model(ids).logits).all())


def test_magnitude_equals_top2_magnitude_masks():
    model = tiny_model("llama", hidden=32)
    expected = extract_2to4_masks(model)
    masks = prune(model, "magnitude")
    assert masks.keys() == expected.keys()
    assert all(torch.equal(masks[k], expected[k]) for k in masks)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_show_progress_draws_a_bar_only_when_asked(method, capsys):
    calibration = None if method == "magnitude" else random_windows(2, 16, vocab=128, seed=0)
    for show in (False, True):
        prune(tiny_model("llama", hidden=32), method, calibration, show_progress=show)
        err = capsys.readouterr().err
        assert ("100%" in err) is show, err


def test_calibration_data_forms_are_equivalent():
    ids = random_windows(4, 16, vocab=128, seed=3)
    results = []
    for data in (
        ids,
        TokenWindows(ids),
        [{"input_ids": row} for row in ids],
        [{"input_ids": ids, "attention_mask": None}],
    ):
        model = tiny_model("qwen2", hidden=32)
        results.append(prune(model, "wanda", data))
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def test_config_target_selection_is_respected():
    model = tiny_model("llama", hidden=32)
    config = ProxSparseConfig(target_modules=["q_proj", "down_proj"])
    masks = prune(model, "sparsegpt", random_windows(2, 16), config)
    assert sorted({k.split(".")[-2] for k in masks}) == ["down_proj", "q_proj"]
    assert (
        model.model.layers[0].self_attn.k_proj.weight.count_nonzero()
        == model.model.layers[0].self_attn.k_proj.weight.numel()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_block_capture_reproduces_hidden_states(family):
    model = tiny_model(family, layers=3, hidden=32)
    ids = random_windows(4, 12, vocab=128, seed=5)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
        _, blocks = find_decoder_blocks(model)
        inputs = capture_block_inputs(model, blocks, CalibrationBatches.from_any(ids, batch_size=3))
        hidden = inputs.hidden
        for k in range(len(blocks)):
            torch.testing.assert_close(torch.cat(hidden), reference[k])
            hidden = [_call_block(blocks[k], inputs, i, h) for i, h in enumerate(hidden)]


@pytest.mark.slow
def test_real_model_wanda_two_blocks(real_model_and_tokenizer):
    from proxsparse_hf.data import load_calibration_data

    model, tokenizer = real_model_and_tokenizer
    config = ProxSparseConfig(target_modules=r"model\.layers\.[01]\..*_proj")
    calib = load_calibration_data(C4_VALIDATION, tokenizer, seq_len=64, n_samples=4, stop=1000)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        masks = prune(model, "wanda", calib, config)
        assert len(masks) == 14
        assert all(bool((m.reshape(-1, 4).sum(1) == 2).all()) for m in masks.values())
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(original[name])


# ---------------------------------------------------------------------------------------------------------- errors
def test_unknown_method():
    assert {"magnitude", "wanda", "sparsegpt", "ria"} <= set(ONE_SHOT)
    with pytest.raises(ValueError, match=rf"`method`='obs' is invalid; allowed: {re.escape(str(pruner_names()))}"):
        prune(tiny_model("llama", hidden=32), "obs", random_windows(2, 8))


def test_unknown_option():
    with pytest.raises(
        ValueError,
        match=r"Unknown option\(s\) \['update_weights'\] for method 'wanda'; allowed: \['batch_size', 'show_progress'\]",
    ):
        prune(tiny_model("llama", hidden=32), "wanda", random_windows(2, 8), update_weights=False)
    with pytest.raises(
        ValueError,
        match=r"Unknown option\(s\) \['beta'\] for method 'ria'; allowed: \['alpha', 'batch_size', 'show_progress'\]",
    ):
        prune(tiny_model("llama", hidden=32), "ria", random_windows(2, 8), beta=1.0)


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"damp_percent": 0}, r"`damp_percent`=0 is invalid"),
        ({"block_size": 6}, r"`block_size`=6 is invalid"),
        ({"update_weights": "no"}, r"`update_weights`='no' is invalid"),
        ({"batch_size": 0}, r"`batch_size`=0 is invalid; allowed: an integer >= 1"),
        ({"block_size": 8.0}, r"`block_size`=8.0 is invalid; allowed: an integer >= 4 and divisible by 4"),
    ],
)
def test_bad_sparsegpt_options(opts, match):
    with pytest.raises(ValueError, match=match):
        prune(tiny_model("llama", hidden=32), "sparsegpt", random_windows(2, 8), **opts)


@pytest.mark.parametrize("alpha", [-0.5, float("nan"), "0.5", True])
def test_bad_ria_alpha(alpha):
    with pytest.raises(ValueError, match=r"`alpha`=.* is invalid; allowed: a number >= 0"):
        prune(tiny_model("llama", hidden=32), "ria", random_windows(2, 8), alpha=alpha)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, r"`calibration_data` is None"),
        ([], r"`calibration_data` is empty"),
        (torch.zeros(0, 8, dtype=torch.long), r"non-empty \[N, seq_len\]"),
        (torch.zeros(2, 8), r"integer token ids"),
        ([{"text": "hi"}], r"item 0 is not a dict with 'input_ids'"),
        ("some text", r"not supported"),
    ],
)
def test_bad_calibration_data(data, match):
    with pytest.raises(ValueError, match=match):
        prune(tiny_model("llama", hidden=32), "wanda", data)


def test_non_divisible_shapes():
    with pytest.raises(ValueError, match=r"input dimension \(6\) is not divisible by 4"):
        prune(ToyLM(hidden=6), "wanda", random_windows(2, 4, vocab=16))
    with pytest.raises(ValueError, match=r"6 input features, not divisible by 4"):
        sparsegpt_2to4(torch.randn(4, 6), torch.eye(6))
    with pytest.raises(ValueError, match=r"`hessian` of shape \(4, 4\) does not match 8 input features"):
        sparsegpt_2to4(torch.randn(4, 8), torch.eye(4))
    with pytest.raises(ValueError, match=r"does not match the input dimension"):
        wanda_scores(torch.randn(4, 8), torch.ones(4))


def test_targets_outside_blocks_are_refused():
    model = ToyLM(hidden=8)
    model.head_proj = nn.Linear(8, 8)
    config = ProxSparseConfig(target_modules=["proj", "head_proj"])
    with pytest.raises(ValueError, match=r"lie outside the decoder blocks `layers`"):
        prune(model, "sparsegpt", random_windows(2, 4, vocab=16), config)


def test_model_without_blocks_is_refused():
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"has no nn.ModuleList of decoder blocks"):
        prune(model, "wanda", random_windows(2, 4, vocab=16))
