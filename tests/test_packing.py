"""2:4 pattern packing: codes, base-6 bytes, kept values + positions round trips."""

from __future__ import annotations

import itertools

import pytest
import torch

from proxsparse_hf.artefacts.packing import (
    PATTERNS,
    codes_to_mask,
    compress_2to4,
    decompress_2to4,
    kept_mask_from_weight,
    mask_to_codes,
    pack_codes,
    pack_mask,
    packed_size,
    unpack_codes,
    unpack_mask,
)
from proxsparse_hf.masks import mask_2to4


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _pruned(shape, transposed=False, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen).to(dtype)
    grouped = w.t() if transposed else w
    mask = mask_2to4(grouped.contiguous())
    mask = mask.t() if transposed else mask
    return torch.where(mask, w, torch.zeros((), dtype=dtype)), mask


def test_patterns_are_the_six_pairs():
    assert PATTERNS == tuple(itertools.combinations(range(4), 2))


def test_mask_to_codes_hand_computed():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1], [1, 0, 0, 1, 0, 1, 1, 0]], dtype=torch.bool)
    assert mask_to_codes(mask).tolist() == [0, 5, 2, 3]
    assert torch.equal(codes_to_mask(torch.tensor([0, 5, 2, 3], dtype=torch.uint8), (2, 8)), mask)


def test_pack_codes_base6_hand_computed():
    codes = torch.tensor([1, 2, 3, 5, 0], dtype=torch.uint8)
    packed = pack_codes(codes)
    # 1 + 6*2 + 36*3 = 121 ; 5 + 6*0 + 36*0 (padding) = 5
    assert packed.dtype == torch.uint8 and packed.tolist() == [121, 5]
    assert unpack_codes(packed, 5).tolist() == codes.tolist()
    assert packed_size(5) == 2 and packed_size(6) == 2 and packed_size(7) == 3


def test_all_codes_round_trip():
    codes = torch.tensor(list(itertools.product(range(6), repeat=3)), dtype=torch.uint8).reshape(-1)
    packed = pack_codes(codes)
    assert int(packed.max()) == 215
    assert torch.equal(unpack_codes(packed, codes.numel()), codes)


@pytest.mark.parametrize("transposed", [False, True])
def test_mask_round_trip_and_density(transposed):
    shape = (24, 32) if not transposed else (32, 24)
    _, mask = _pruned(shape, transposed)
    packed = pack_mask(mask, transposed)
    assert packed.numel() == packed_size(mask.numel() // 4)
    assert packed.numel() * 8 <= mask.numel()  # at most 1 bit per weight (0.67 in fact)
    assert torch.equal(unpack_mask(packed, shape, transposed), mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_compress_decompress_bit_exact(dtype, transposed):
    shape = (16, 40) if not transposed else (40, 16)
    weight, _ = _pruned(shape, transposed, dtype)
    grouped = weight.t() if transposed else weight
    grouped[0, 0:4] = torch.tensor([0.0, -0.0, 0.0, 0.0], dtype=dtype)  # fewer than 2 non-zeros, a kept -0.0
    grouped[1, 0:4] = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=dtype)
    values, packed = compress_2to4(weight, transposed)
    assert values.dtype == dtype and tuple(values.shape) == (grouped.shape[0], grouped.shape[1] // 2)
    rebuilt = decompress_2to4(values, packed, shape, transposed)
    assert rebuilt.dtype == dtype and torch.equal(_bits(rebuilt), _bits(weight))


def test_kept_mask_prefers_nonzeros_then_lower_index():
    w = torch.tensor([[0.0, 0.0, 3.0, 0.0, 1.0, 2.0, 0.0, 0.0]])
    assert kept_mask_from_weight(w).tolist() == [[True, False, True, False, True, True, False, False]]


def test_errors():
    with pytest.raises(ValueError, match="not an exact 2:4 mask: 1 group"):
        mask_to_codes(torch.tensor([[1, 1, 1, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="not divisible by 4"):
        pack_mask(torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        pack_mask(torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="not 2:4: 1 of 2 groups"):
        compress_2to4(torch.tensor([[1.0, 2.0, 3.0, 0.0, 1.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="not 2:4"):  # -0.0 must survive, so it counts as a value
        compress_2to4(torch.tensor([[1.0, 2.0, -0.0, 0.0]]))
    with pytest.raises(ValueError, match="hold 1 bytes but 4 groups need 2"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="corrupt"):
        unpack_codes(torch.tensor([216], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_codes(torch.zeros(1, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"Pattern codes must be in \[0, 5\]"):
        pack_codes(torch.tensor([6]))
    with pytest.raises(ValueError, match=r"Pattern codes must be in \[0, 5\]"):
        codes_to_mask(torch.tensor([7], dtype=torch.uint8), (1, 4))
    with pytest.raises(ValueError, match="Expected 2 codes"):
        codes_to_mask(torch.tensor([1], dtype=torch.uint8), (1, 8))
    with pytest.raises(ValueError, match="Kept values have shape"):
        decompress_2to4(torch.zeros(2, 2), pack_codes(torch.zeros(2, dtype=torch.uint8)), (1, 8))
