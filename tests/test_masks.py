import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from proxsparse_hf import apply_2to4_masks, extract_2to4_masks, is_2to4, load_masks, mask_2to4, save_masks
from proxsparse_hf.masks import count_mask_flips, fraction_2to4_groups


def test_mask_hand_examples_and_ties():
    x = torch.tensor([[0.1, -0.9, 0.5, 0.2], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.3, -0.3, 0.3, 0.1]])
    m = mask_2to4(x)
    assert m.tolist() == [
        [False, True, True, False],
        [True, True, False, False],  # ties: lower index wins
        [True, True, False, False],
        [True, True, False, False],
    ]
    assert mask_2to4(x.to(torch.bfloat16)).equal(m)


def test_mask_is_always_exactly_two_per_group():
    x = torch.randn(37, 64)
    x[::3, ::2] = 0.0
    m = mask_2to4(x)
    assert (m.reshape(-1, 4).sum(1) == 2).all()
    assert is_2to4(x * m)


def test_is_2to4_and_fraction():
    x = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert not is_2to4(x)
    assert fraction_2to4_groups(x) == 0.5
    assert is_2to4(x[:, :4])
    assert is_2to4(x.t(), dim=0) is False
    assert not is_2to4(torch.zeros(2, 6))  # not divisible: never 2:4
    with pytest.raises(ValueError, match=r"shape \(2, 6\) cannot be split into groups of 4"):
        mask_2to4(torch.zeros(2, 6))


def test_count_flips():
    a = mask_2to4(torch.tensor([[4.0, 3.0, 2.0, 1.0, 4.0, 3.0, 2.0, 1.0]]))
    b = mask_2to4(torch.tensor([[1.0, 3.0, 2.0, 4.0, 4.0, 3.0, 2.0, 1.0]]))
    assert count_mask_flips(a, b) == 1 and count_mask_flips(a, a) == 0
    with pytest.raises(ValueError, match="Mask shapes differ"):
        count_mask_flips(a, a[:, :4])


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_apply_original_bit_exact(family):
    model = tiny_model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    learned = {k: v + 0.01 * torch.randn_like(v) for k, v in original.items()}
    model.load_state_dict(learned)
    masks = extract_2to4_masks(model)
    apply_2to4_masks(model, masks, original)
    state = model.state_dict()
    for name, mask in masks.items():
        w = state[name]
        assert mask.shape == w.shape
        transposed = family == "gpt2"
        assert is_2to4(w, dim=0 if transposed else -1)
        assert torch.equal(w[mask], original[name][mask])  # kept = original, bit for bit
        assert (w[~mask] == 0).all()


def test_extract_from_state_dict_matches_model():
    model = tiny_model("llama")
    from_model = extract_2to4_masks(model)
    from_sd = extract_2to4_masks(model.state_dict())
    assert from_model.keys() == from_sd.keys()
    assert all(torch.equal(from_model[k], from_sd[k]) for k in from_model)


def test_apply_errors():
    model = tiny_model("llama")
    masks = extract_2to4_masks(model)
    with pytest.raises(KeyError, match="has no matching parameter"):
        apply_2to4_masks(model, {"nope.weight": torch.ones(4, 4, dtype=torch.bool)})
    name = next(iter(masks))
    with pytest.raises(ValueError, match=f"Mask for `{name}` has shape"):
        apply_2to4_masks(model, {name: masks[name][:, :4]})
    with pytest.raises(KeyError, match="`original` has no tensor"):
        apply_2to4_masks(model, masks, original={})


def test_save_load_round_trip(tmp_path):
    masks = extract_2to4_masks(tiny_model("gpt2"))
    save_masks(masks, tmp_path / "m.safetensors", metadata={"method": "magnitude"})
    loaded = load_masks(tmp_path / "m.safetensors")
    assert loaded.keys() == masks.keys()
    assert all(loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]) for k in masks)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_group_codes_tell_flips_apart_in_a_quarter_of_the_memory():
    from proxsparse_hf.masks import group_codes, mask_2to4

    torch.manual_seed(0)
    a = mask_2to4(torch.randn(8, 16))
    b = mask_2to4(torch.randn(8, 16))
    codes_a, codes_b = group_codes(a), group_codes(b)
    assert codes_a.dtype == torch.uint8 and codes_a.shape == (32,)  # one byte per group of 4 (bool: 4 bytes)
    assert set(codes_a.tolist()) <= {3, 5, 6, 9, 10, 12}  # exactly two of four bits
    assert int((codes_a != codes_b).sum()) == count_mask_flips(a, b) > 0
    assert int((codes_a != codes_a).sum()) == 0
