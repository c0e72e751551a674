"""2:4 masks: extract (top-2 magnitude per group), check, apply to the original weights, save and load.

Masks are boolean tensors shaped like the weight they belong to (storage layout, so a ``Conv1D`` mask is ``[in, out]``) and
are keyed by the weight's ``state_dict`` name, e.g. ``"model.layers.0.self_attn.q_proj.weight"``. ``True`` = kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from .constants import OUTPUT_LAYER_NAMES, SUPPORTED_M, SUPPORTED_N
from .layout import input_last, weight_groups
from .targets import Target, find_targets, match_module_name
from .utils import save_safetensors_atomic

__all__ = [
    "apply_2to4_masks",
    "count_mask_flips",
    "group_codes",
    "extract_2to4_masks",
    "fraction_2to4_groups",
    "is_2to4",
    "load_masks",
    "mask_2to4",
    "save_masks",
]

_CHUNK_GROUPS = 1 << 20


def mask_2to4(tensor: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """Boolean mask keeping the 2 largest ``|x|`` of every group of 4 along the last dimension (along dim 0 of a 2-D
    tensor stored ``[in, out]`` when ``transposed``, as a ``Conv1D`` weight); shaped and laid out like ``tensor``.

    Ties are broken deterministically: at equal magnitude the lower index wins. NaNs count as the largest values.
    Ties are common in quantised checkpoints (e.g. 15% of SmolLM2-135M-Instruct's Q4_1 groups have equal 2nd and 3rd
    magnitudes), so magnitude pruning of such models depends on this rule.
    """
    groups = weight_groups(tensor.detach(), transposed)
    out = torch.empty(groups.shape, dtype=torch.bool, device=groups.device)
    # rank_i = #{j : |x_j| > |x_i|  or (|x_j| == |x_i| and j < i)}; keep rank < 2
    lower = torch.tril(torch.ones(SUPPORTED_M, SUPPORTED_M, dtype=torch.bool, device=groups.device), diagonal=-1)
    for start in range(0, groups.shape[0], _CHUNK_GROUPS):
        mag = groups[start : start + _CHUNK_GROUPS].abs().float().nan_to_num(nan=float("inf"))
        a_i = mag.unsqueeze(2)  # [G, i, 1]
        a_j = mag.unsqueeze(1)  # [G, 1, j]
        beats = (a_j > a_i) | ((a_j == a_i) & lower)  # lower[i, j] = j < i
        out[start : start + _CHUNK_GROUPS] = beats.sum(dim=2) < SUPPORTED_N
    return input_last(out.reshape(input_last(tensor, transposed).shape), transposed).contiguous()


def is_2to4(tensor: torch.Tensor, dim: int = -1) -> bool:
    """True when every group of 4 consecutive entries along ``dim`` has at most 2 non-zeros."""
    moved = tensor.detach().movedim(dim, -1)
    if moved.shape[-1] % SUPPORTED_M != 0:
        return False
    return bool(((weight_groups(moved) != 0).sum(dim=1) <= SUPPORTED_N).all())


def fraction_2to4_groups(tensor: torch.Tensor) -> float:
    """Fraction of groups (along the last dimension) that already have at most 2 non-zeros."""
    groups = weight_groups(tensor.detach())
    if groups.shape[0] == 0:
        return 1.0
    return float(((groups != 0).sum(dim=1) <= SUPPORTED_N).float().mean())


def count_mask_flips(previous: torch.Tensor, current: torch.Tensor) -> int:
    """Number of groups whose kept positions differ between two masks of the same shape."""
    if previous.shape != current.shape:
        raise ValueError(f"Mask shapes differ: {tuple(previous.shape)} vs {tuple(current.shape)}.")
    return int((group_codes(previous) != group_codes(current)).sum())


def group_codes(mask: torch.Tensor) -> torch.Tensor:
    """One byte per group of 4 (bit ``i`` set when position ``i`` is kept): a quarter of a boolean mask's memory, and two
    masks keep the same positions in a group exactly when their codes are equal. Shape ``[numel / 4]``."""
    groups = weight_groups(mask.detach())
    bits = torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=groups.device)
    return (groups.to(torch.uint8) * bits).sum(dim=1, dtype=torch.uint8)


def _state_dict_targets(state_dict: Mapping[str, torch.Tensor], config) -> dict[str, bool]:
    """Target weight names of a bare state dict -> whether stored transposed (only Conv1D-style models, see below)."""
    target_modules = getattr(config, "target_modules", "all-linear") if config is not None else "all-linear"
    exclude = getattr(config, "exclude_modules", None) if config is not None else None
    transposed = bool(getattr(config, "transposed_weights", False)) if config is not None else False
    names: dict[str, bool] = {}
    for key, value in state_dict.items():
        if not key.endswith(".weight") or value.dim() != 2:
            continue
        module_name = key[: -len(".weight")]
        leaf = module_name.split(".")[-1]
        if leaf in OUTPUT_LAYER_NAMES or "embed" in leaf or leaf in ("wte", "wpe"):
            continue
        if target_modules == "all-linear":
            if not re.search(r"\.\d+\.", module_name) or "norm" in leaf or leaf.startswith("ln"):
                continue
        elif not match_module_name(module_name, target_modules):
            continue
        if match_module_name(module_name, exclude):
            continue
        names[key] = transposed
    if not names:
        raise ValueError(f"`target_modules`={target_modules!r} matched no 2-D weight in the state dict.")
    return names


def extract_2to4_masks(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    config=None,
    *,
    targets: Mapping[str, Target] | None = None,
) -> dict[str, torch.Tensor]:
    """Top-2-magnitude 2:4 masks of every target weight.

    Args:
        model_or_state_dict: a model (targets resolved with :func:`find_targets`) or a ``state_dict``. For a state dict the
            targets are matched by name (``"all-linear"`` = 2-D weights inside numbered blocks, minus embeddings, norms and
            output layers); Conv1D-style transposed storage cannot be detected from names, so set
            ``config.transposed_weights``-style knowledge by passing the model instead when in doubt.
        config: a ``ProxSparseConfig`` (its ``target_modules`` / ``exclude_modules``).
        targets: already resolved targets (skips resolution).

    Returns:
        ``{weight_name: bool mask}`` on the weights' devices, shaped like the weights.
    """
    masks: dict[str, torch.Tensor] = {}
    if isinstance(model_or_state_dict, nn.Module):
        if targets is None:
            targets = find_targets(model_or_state_dict, config)
        for target in targets.values():
            masks[target.param_name] = mask_2to4(target.weight.detach(), transposed=target.transposed)
        return masks
    for key, transposed in _state_dict_targets(model_or_state_dict, config).items():
        weight = model_or_state_dict[key]
        masks[key] = mask_2to4(weight, transposed=transposed)
    return masks


def apply_2to4_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    original: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Write ``original ⊙ mask`` into the model's weights in place (the current weights when ``original`` is None).

    Kept weights are copied bit for bit; pruned ones become exactly ``+0``. Returns the model.

    Raises:
        KeyError: a mask names a weight the model does not have, or ``original`` lacks one.
        ValueError: a mask's shape differs from its weight's.
    """
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise KeyError(f"Mask for `{name}` has no matching parameter in {type(model).__name__}.")
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"Mask for `{name}` has shape {tuple(mask.shape)} but the weight is {tuple(param.shape)}."
            )
        if original is not None and name not in original:
            raise KeyError(f"`original` has no tensor for `{name}`.")
        source = param.detach() if original is None else original[name]
        with torch.no_grad():
            kept = source.to(device=param.device, dtype=param.dtype)
            param.copy_(
                torch.where(mask.to(param.device), kept, torch.zeros((), dtype=param.dtype, device=param.device))
            )
    return model


def save_masks(
    masks: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save masks as a safetensors file of ``bool`` tensors (written atomically)."""
    tensors = {name: mask.detach().to("cpu", torch.bool).contiguous() for name, mask in masks.items()}
    save_safetensors_atomic(tensors, path, metadata={"format": "proxsparse-2:4-masks", **(metadata or {})})


def load_masks(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load masks written by :func:`save_masks`."""
    return {name: mask.to(device=device, dtype=torch.bool) for name, mask in load_file(os.fspath(path)).items()}
