"""Pack 2:4 masks and 2:4 weights into compact form.

A 2:4 group (four consecutive weights along the input dimension) keeps exactly two positions, so it has one of six
patterns::

    code:      0       1       2       3       4       5
    kept:    (0,1)   (0,2)   (0,3)   (1,2)   (1,3)   (2,3)

Codes are packed in base 6, three groups per byte (``c0 + 6·c1 + 36·c2`` ≤ 215): 8 bits per 12 weights, i.e. 0.67 bit
per weight. A mask of ``G`` groups packs into ``ceil(G / 3)`` ``uint8`` values (the last byte is padded with code 0).

Groups are enumerated in the *grouped* layout (input dimension last, row-major): the weight itself for ``nn.Linear``
(``[out, in]``), its transpose for a transformers ``Conv1D`` (stored ``[in, out]``).

A 2:4 weight is stored as its kept values ``[rows, in / 2]`` (same dtype, grouped layout, the two kept values of each
group in increasing position order) plus the packed codes; :func:`decompress_2to4` rebuilds the dense weight bit for
bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._version import __version__
from ..constants import SUPPORTED_M, SUPPORTED_N
from ..layout import input_last, weight_groups

__all__ = [
    "FORMAT_VERSION",
    "GROUPS_PER_BYTE",
    "PATTERNS",
    "POSITION_ENCODING",
    "check_format_header",
    "codes_to_mask",
    "compress_2to4",
    "decompress_2to4",
    "format_header",
    "kept_mask_from_weight",
    "mask_to_codes",
    "pack_codes",
    "pack_mask",
    "packed_size",
    "unpack_codes",
    "unpack_mask",
]

PATTERNS: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
"""Kept positions of each 2:4 pattern code."""

GROUPS_PER_BYTE = 3
_BASE = len(PATTERNS)
_INVALID = 255

FORMAT_VERSION = 1
"""Version of the packed formats' JSON headers (compact index, mask manifest)."""
POSITION_ENCODING = f"base6-{GROUPS_PER_BYTE}-groups-per-byte"


def format_header(fmt: str) -> dict[str, Any]:
    """The fields every packed-format JSON header starts with."""
    return {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "pattern": f"{SUPPORTED_N}:{SUPPORTED_M}",
        "position_encoding": POSITION_ENCODING,
    }


def check_format_header(data: Mapping[str, Any], expected: str, path: str) -> None:
    """Refuse a header of another format, version or position encoding.

    Raises:
        ValueError: names the file, what it holds and what this version reads.
    """
    if data.get("format") != expected:
        raise ValueError(f"{path!r} has format {data.get('format')!r}; expected {expected!r}.")
    if data.get("format_version") != FORMAT_VERSION or data.get("position_encoding") != POSITION_ENCODING:
        raise ValueError(
            f"{path!r} uses format version {data.get('format_version')!r} / position encoding "
            f"{data.get('position_encoding')!r}; proxsparse-hf {__version__} reads version {FORMAT_VERSION} / "
            f"{POSITION_ENCODING!r}. Upgrade proxsparse-hf."
        )


def _pattern_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bits_to_code = torch.full((1 << SUPPORTED_M,), _INVALID, dtype=torch.uint8)
    code_to_mask = torch.zeros(_BASE, SUPPORTED_M, dtype=torch.bool)
    code_to_pos = torch.tensor(PATTERNS, dtype=torch.int64)
    for code, (i, j) in enumerate(PATTERNS):
        bits_to_code[(1 << i) | (1 << j)] = code
        code_to_mask[code, i] = code_to_mask[code, j] = True
    return bits_to_code, code_to_mask, code_to_pos


_BITS_TO_CODE, _CODE_TO_MASK, _CODE_TO_POS = _pattern_tables()
_BIT_WEIGHTS = torch.tensor([1 << i for i in range(SUPPORTED_M)], dtype=torch.uint8)


def _grouped(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    if tensor.dim() != 2:
        raise ValueError(f"Expected a 2-D weight or mask, got shape {tuple(tensor.shape)}.")
    return weight_groups(tensor, transposed)


def _grouped_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"Expected a 2-D shape, got {tuple(shape)}.")
    rows, cols = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    if cols % SUPPORTED_M != 0:
        raise ValueError(
            f"Shape {tuple(shape)} (transposed={transposed}) has an input dimension of {cols}, which is not divisible "
            f"by {SUPPORTED_M}."
        )
    return rows, cols


def packed_size(num_groups: int) -> int:
    """Number of bytes holding ``num_groups`` pattern codes."""
    return -(-num_groups // GROUPS_PER_BYTE)


def mask_to_codes(mask: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Pattern code (0..5) of every group of a boolean 2:4 mask, as ``uint8`` of length ``numel / 4``.

    Raises:
        ValueError: some group does not keep exactly two positions (reports how many groups and the first one).
    """
    groups = _grouped(mask.to(torch.bool), transposed).cpu()
    bits = (groups.to(torch.uint8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.int64)
    codes = _BITS_TO_CODE[bits]
    bad = codes == _INVALID
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"Mask of shape {tuple(mask.shape)} is not an exact 2:4 mask: {int(bad.sum())} group(s) do not "
            "keep exactly "
            f"{SUPPORTED_N} of {SUPPORTED_M} positions (first: group {first} keeps {groups[first].tolist()})."
        )
    return codes


def codes_to_mask(codes: torch.Tensor, shape: tuple[int, ...], transposed: bool = False) -> torch.Tensor:
    """Boolean mask of ``shape`` (storage layout) from per-group pattern codes."""
    rows, cols = _grouped_shape(tuple(shape), transposed)
    num_groups = rows * cols // SUPPORTED_M
    if codes.numel() != num_groups:
        raise ValueError(f"Expected {num_groups} codes for shape {tuple(shape)}, got {codes.numel()}.")
    if bool((codes.to(torch.int64) >= _BASE).any()):
        raise ValueError(f"Pattern codes must be in [0, {_BASE - 1}].")
    mask = _CODE_TO_MASK[codes.to(torch.int64).cpu()].reshape(rows, cols)
    return input_last(mask, transposed).contiguous()


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack pattern codes three per byte (base 6); returns ``uint8`` of length ``ceil(len / 3)``."""
    codes = codes.reshape(-1).to(torch.int64).cpu()
    if bool(((codes < 0) | (codes >= _BASE)).any()):
        raise ValueError(f"Pattern codes must be in [0, {_BASE - 1}].")
    pad = (-codes.numel()) % GROUPS_PER_BYTE
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    triples = codes.reshape(-1, GROUPS_PER_BYTE)
    return (triples[:, 0] + _BASE * triples[:, 1] + _BASE * _BASE * triples[:, 2]).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``num_groups`` codes as ``uint8``.

    Raises:
        ValueError: the packed length does not fit ``num_groups`` or a byte is out of range (corrupt data).
    """
    packed = packed.reshape(-1).cpu()
    if packed.dtype != torch.uint8:
        raise ValueError(f"Packed codes must be uint8, got {packed.dtype}.")
    if packed.numel() != packed_size(num_groups):
        raise ValueError(
            f"Packed codes hold {packed.numel()} bytes but {num_groups} groups need {packed_size(num_groups)}."
        )
    values = packed.to(torch.int64)
    if bool((values >= _BASE**GROUPS_PER_BYTE).any()):
        raise ValueError(f"Packed codes contain bytes >= {_BASE**GROUPS_PER_BYTE}: the data is corrupt.")
    codes = torch.stack([values % _BASE, (values // _BASE) % _BASE, values // (_BASE * _BASE)], dim=1).reshape(-1)
    return codes[:num_groups].to(torch.uint8)


def pack_mask(mask: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """Pack an exact 2:4 boolean mask (storage layout) into ``uint8`` (0.67 bit per weight)."""
    return pack_codes(mask_to_codes(mask, transposed))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...], transposed: bool = False) -> torch.Tensor:
    """Boolean mask of ``shape`` from :func:`pack_mask` output."""
    rows, cols = _grouped_shape(tuple(shape), transposed)
    return codes_to_mask(unpack_codes(packed, rows * cols // SUPPORTED_M), shape, transposed)


def _nonzero_bits(groups: torch.Tensor) -> torch.Tensor:
    """Entries whose bit pattern is not all zeros (``-0.0`` counts as non-zero: it must survive a round trip)."""
    if groups.is_floating_point():
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[groups.element_size()]
        return groups.view(int_dtype) != 0
    return groups != 0


def kept_mask_from_weight(weight: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """The 2:4 mask (storage layout) whose kept positions hold every non-zero of ``weight``.

    Groups with fewer than two non-zeros keep their lowest-index zero positions, so every group keeps exactly two.

    Raises:
        ValueError: some group has more than two entries that are not ``+0.0`` (the weight is not 2:4 bit for bit).
    """
    groups = _grouped(weight.detach(), transposed).cpu()
    nonzero = _nonzero_bits(groups)
    count = nonzero.sum(dim=1)
    if bool((count > SUPPORTED_N).any()):
        bad = int((count > SUPPORTED_N).sum())
        raise ValueError(
            f"Weight of shape {tuple(weight.shape)} is not 2:4: {bad} of {groups.shape[0]} groups have more than "
            f"{SUPPORTED_N} entries that are not +0.0."
        )
    # rank positions: non-zeros first, then lower index; keep the first two
    score = nonzero.to(torch.int64) * SUPPORTED_M + (SUPPORTED_M - 1 - torch.arange(SUPPORTED_M))
    keep = torch.zeros_like(nonzero)
    keep.scatter_(1, score.topk(SUPPORTED_N, dim=1).indices, True)
    rows, cols = _grouped_shape(tuple(weight.shape), transposed)
    keep = keep.reshape(rows, cols)
    return input_last(keep, transposed).contiguous()


def compress_2to4(weight: torch.Tensor, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 2:4 weight into kept values and packed positions.

    Args:
        weight: 2-D weight in storage layout (``[out, in]``; ``[in, out]`` with ``transposed=True`` for ``Conv1D``).
        transposed: the input dimension is dim 0.

    Returns:
        ``(values, packed)``: ``values`` of shape ``[rows, in / 2]`` in the grouped layout and ``weight``'s dtype;
        ``packed`` the ``uint8`` pattern codes (see the module docstring).

    Raises:
        ValueError: the weight is not 2:4 bit for bit (see :func:`kept_mask_from_weight`).
    """
    keep = kept_mask_from_weight(weight, transposed)
    codes = mask_to_codes(keep, transposed)
    groups = _grouped(weight.detach(), transposed).cpu()
    values = groups.gather(1, _CODE_TO_POS[codes.to(torch.int64)])
    rows, cols = _grouped_shape(tuple(weight.shape), transposed)
    return values.reshape(rows, cols // 2).contiguous(), pack_codes(codes)


def decompress_2to4(
    values: torch.Tensor, packed: torch.Tensor, shape: tuple[int, ...], transposed: bool = False
) -> torch.Tensor:
    """Rebuild the dense weight (storage layout, ``values``' dtype) from :func:`compress_2to4` output, bit for bit."""
    rows, cols = _grouped_shape(tuple(shape), transposed)
    if tuple(values.shape) != (rows, cols // 2):
        raise ValueError(
            f"Kept values have shape {tuple(values.shape)}; shape {tuple(shape)} needs {(rows, cols // 2)}."
        )
    codes = unpack_codes(packed, rows * cols // SUPPORTED_M)
    dense = torch.zeros(rows * cols // SUPPORTED_M, SUPPORTED_M, dtype=values.dtype, device=values.device)
    positions = _CODE_TO_POS.to(values.device)[codes.to(device=values.device, dtype=torch.int64)]
    dense.scatter_(1, positions, values.reshape(-1, SUPPORTED_N))
    dense = dense.reshape(rows, cols)
    return input_last(dense, transposed).contiguous()
