"""Sparsity report of a model: one row per target weight plus totals, as a dict, JSON file or markdown table."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .constants import SUPPORTED_M, SUPPORTED_N
from .layout import weight_groups
from .targets import Target, find_targets, is_target_type
from .utils import atomic_write_json

__all__ = ["LayerSparsity", "SparsityReport", "sparsity_report"]


@dataclass
class LayerSparsity:
    """Sparsity of one target weight.

    Args:
        name: ``state_dict`` name of the weight.
        shape: weight shape (storage layout).
        numel: number of elements.
        zeros: number of exact zeros.
        zero_fraction: ``zeros / numel``.
        fraction_2to4_groups: fraction of groups of 4 (input dimension) with at most 2 non-zeros.
        is_2to4: every group has at most 2 non-zeros.
    """

    name: str
    shape: list[int]
    numel: int
    zeros: int
    zero_fraction: float
    fraction_2to4_groups: float
    is_2to4: bool


@dataclass
class SparsityReport:
    """Per-layer rows for the targets, totals, and the linear modules that stayed dense.

    Args:
        layers: one :class:`LayerSparsity` per target weight, in module order.
        dense_modules: linear-type modules (incl. ``lm_head``) that are not targets and stay dense.
        total_params: all parameters of the model (tied weights counted once).
        total_zeros: exact zeros among all parameters.
        target_params: elements of the target weights.
        target_zeros: exact zeros among the target weights.
        pattern: the sparsity pattern, ``"2:4"``.
    """

    layers: list[LayerSparsity] = field(default_factory=list)
    dense_modules: list[str] = field(default_factory=list)
    total_params: int = 0
    total_zeros: int = 0
    target_params: int = 0
    target_zeros: int = 0
    pattern: str = f"{SUPPORTED_N}:{SUPPORTED_M}"

    @property
    def overall_sparsity(self) -> float:
        """Zero fraction over all parameters."""
        return self.total_zeros / self.total_params if self.total_params else 0.0

    @property
    def target_sparsity(self) -> float:
        """Zero fraction over the target weights."""
        return self.target_zeros / self.target_params if self.target_params else 0.0

    @property
    def all_2to4(self) -> bool:
        """Every target weight is valid 2:4."""
        return bool(self.layers) and all(layer.is_2to4 for layer in self.layers)

    @property
    def num_2to4_layers(self) -> int:
        return sum(layer.is_2to4 for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["totals"] = {
            "overall_sparsity": self.overall_sparsity,
            "target_sparsity": self.target_sparsity,
            "num_target_layers": len(self.layers),
            "num_2to4_layers": self.num_2to4_layers,
            "all_2to4": self.all_2to4,
        }
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityReport:
        data = {k: v for k, v in data.items() if k != "totals"}
        data["layers"] = [LayerSparsity(**row) for row in data.get("layers", [])]
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the report as JSON (atomically)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparsityReport:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def to_markdown(self, max_rows: int | None = None) -> str:
        """Markdown: a totals line then a per-layer table (``max_rows`` limits the table, noting what was left out)."""
        lines = [
            f"Overall sparsity: {self.overall_sparsity:.2%} of {self.total_params:,} parameters; "
            f"target sparsity: {self.target_sparsity:.2%} of {self.target_params:,} weights; "
            f"{self.num_2to4_layers}/{len(self.layers)} target layers are valid {self.pattern}.",
            "",
            "| layer | shape | sparsity | 2:4 groups | valid 2:4 |",
            "|---|---|---:|---:|:---:|",
        ]
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        for layer in rows:
            shape = "×".join(str(d) for d in layer.shape)
            lines.append(
                f"| `{layer.name}` | {shape} | {layer.zero_fraction:.2%} | {layer.fraction_2to4_groups:.2%} | "
                f"{'yes' if layer.is_2to4 else 'no'} |"
            )
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"| … {len(self.layers) - max_rows} more layers | | | | |")
        if self.dense_modules:
            lines += ["", "Dense (not pruned): " + ", ".join(f"`{n}`" for n in self.dense_modules)]
        return "\n".join(lines)


def _layer_row(target: Target) -> LayerSparsity:
    nonzero_per_group = (weight_groups(target.weight.detach(), target.transposed) != 0).sum(dim=1)
    numel = target.weight.numel()
    zeros = int(numel - int(nonzero_per_group.sum()))
    frac = float((nonzero_per_group <= SUPPORTED_N).float().mean()) if nonzero_per_group.numel() else 1.0
    return LayerSparsity(
        name=target.param_name,
        shape=list(target.weight.shape),
        numel=numel,
        zeros=zeros,
        zero_fraction=zeros / numel if numel else 0.0,
        fraction_2to4_groups=frac,
        is_2to4=frac == 1.0,
    )


def sparsity_report(model: nn.Module, config=None, *, targets: dict[str, Target] | None = None) -> SparsityReport:
    """Measure the sparsity of ``model``'s target weights (targets from ``config``, default ``"all-linear"``)."""
    if targets is None:
        targets = find_targets(model, config)
    layers = [_layer_row(t) for t in targets.values()]
    seen: set[int] = set()
    total = zeros = 0
    with torch.no_grad():
        for param in model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            zeros += int((param == 0).sum())
    dense = [name for name, module in model.named_modules() if name and is_target_type(module) and name not in targets]
    return SparsityReport(
        layers=layers,
        dense_modules=dense,
        total_params=total,
        total_zeros=zeros,
        target_params=sum(row.numel for row in layers),
        target_zeros=sum(row.zeros for row in layers),
    )
