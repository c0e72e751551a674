"""Which modules of a model are 2:4 targets, and how their weights are laid out.

One matching function serves the whole library (mask learning, baselines, export, kernels):

* ``"all-linear"`` — every ``nn.Linear`` and transformers ``Conv1D`` inside the decoder blocks; never the input embedding or the
  output layer (``lm_head``), whether tied or not.
* a list of names — a module matches when its qualified name equals an entry or ends with ``"." + entry``.
* a string other than ``"all-linear"`` — a regular expression that must match the whole qualified name.

``exclude_modules`` follows the same rules. A 2:4 group is four consecutive weights along the *input* dimension: dim 1 of an
``nn.Linear`` weight ``[out, in]``, dim 0 of a ``Conv1D`` weight ``[in, out]``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .constants import OUTPUT_LAYER_NAMES, SUPPORTED_M
from .layout import input_last

__all__ = [
    "freeze_non_targets",
    "Target",
    "decoder_block_prefixes",
    "find_targets",
    "is_target_type",
    "match_module_name",
    "module_input_dim",
]


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    return Conv1D


def is_target_type(module: nn.Module) -> bool:
    """True for the layer types that can carry a 2:4 weight (``nn.Linear`` and transformers ``Conv1D``)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def module_input_dim(module: nn.Module) -> int:
    """The weight dimension that holds the input features (1 for ``nn.Linear``, 0 for ``Conv1D``)."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return 0
    return 1


@dataclass(frozen=True)
class Target:
    """A module whose weight gets a 2:4 mask.

    Attributes:
        name: qualified module name, e.g. ``"model.layers.0.self_attn.q_proj"``.
        module: the module itself.
        transposed: True when the weight is stored ``[in, out]`` (transformers ``Conv1D``).
    """

    name: str
    module: nn.Module
    transposed: bool

    @property
    def param_name(self) -> str:
        """Name of the weight in ``model.state_dict()``."""
        return f"{self.name}.weight"

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        """View of ``tensor`` (shaped like this target's weight) with the input dimension last, so groups of 4 are
        consecutive along the last dimension. A view: writing into it writes into ``tensor``."""
        return input_last(tensor, self.transposed)


def match_module_name(name: str, patterns: str | Sequence[str] | None) -> bool:
    """PEFT-style name matching: a list matches exactly or by ``.suffix``; a string is a full-match regex."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def decoder_block_prefixes(model: nn.Module) -> list[str]:
    """Qualified names of the decoder-block containers (the largest ``nn.ModuleList`` of the model)."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if best is None or len(module) > best[0]:
                best = (len(module), name)
    return [] if best is None else [best[1]]


def _output_layer_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
        if name.split(".")[-1] in OUTPUT_LAYER_NAMES:
            names.add(name)
    return names


def find_targets(
    model: nn.Module,
    config=None,
    *,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    check_shapes: bool = True,
) -> dict[str, Target]:
    """Resolve the target modules of ``model`` in module order.

    Args:
        model: any ``torch.nn.Module`` (usually a ``PreTrainedModel``; a PEFT wrapper is fine).
        config: a ``ProxSparseConfig`` whose ``target_modules`` / ``exclude_modules`` are used when the keyword arguments
            are not given.
        target_modules: ``"all-linear"``, a list of name suffixes, or a full-match regex.
        exclude_modules: same rules; matching modules are skipped.
        check_shapes: raise when a target's input dimension is not divisible by 4.

    Returns:
        ``{module_name: Target}`` in ``named_modules()`` order.

    Raises:
        ValueError: nothing matches, or a target's input dimension is not divisible by 4 (names module and shape).
    """
    if target_modules is None:
        target_modules = getattr(config, "target_modules", "all-linear") if config is not None else "all-linear"
    if exclude_modules is None and config is not None:
        exclude_modules = getattr(config, "exclude_modules", None)

    output_names = _output_layer_names(model)
    blocks = decoder_block_prefixes(model) if target_modules == "all-linear" else []
    targets: dict[str, Target] = {}
    for name, module in model.named_modules():
        if not name or not is_target_type(module) or name in output_names:
            continue
        if target_modules == "all-linear":
            if blocks and not any(name.startswith(prefix + ".") for prefix in blocks):
                continue
        elif not match_module_name(name, target_modules):
            continue
        if match_module_name(name, exclude_modules):
            continue
        targets[name] = Target(name=name, module=module, transposed=module_input_dim(module) == 0)

    if not targets:
        raise ValueError(
            f"`target_modules`={target_modules!r} (exclude_modules={exclude_modules!r}) matched no nn.Linear/Conv1D module "
            f"of {type(model).__name__}. Use 'all-linear', a list of module-name suffixes such as "
            f"['q_proj', 'v_proj'], or a regex matching full module names."
        )
    if check_shapes:
        for target in targets.values():
            _check_shape(target)
    return targets


def freeze_non_targets(model: nn.Module, targets: Mapping[str, Target]) -> int:
    """Set ``requires_grad=False`` on every parameter of ``model`` that is not a target weight (so that it carries no
    gradient and no optimizer state); returns how many were frozen."""
    target_params = {id(t.weight) for t in targets.values()}
    count = 0
    for param in model.parameters():
        if id(param) not in target_params and param.requires_grad:
            param.requires_grad_(False)
            count += 1
    return count


def _check_shape(target: Target) -> None:
    shape = tuple(target.weight.shape)
    in_features = shape[0] if target.transposed else shape[-1]
    if len(shape) != 2 or in_features % SUPPORTED_M != 0:
        raise ValueError(
            f"Target `{target.name}` has weight shape {shape} whose input dimension ({in_features}) is not divisible by "
            f"{SUPPORTED_M}; 2:4 sparsity needs groups of {SUPPORTED_M} input features. Exclude it with `exclude_modules`."
        )
