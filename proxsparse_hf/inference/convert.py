"""Whole-model conversion: swap exactly-2:4 target linears for :class:`SparseLinear2to4` and back, and count bytes.

::

    model = to_sparse_kernels(model)          # every exactly-2:4 target linear; dispatch measured once per shape
    model.generate(...)                       # prefill (many tokens) -> sparse kernels, decode (few tokens) -> dense
    model = to_dense_kernels(model)           # back to plain nn.Linear, bit for bit
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..targets import find_targets
from .backends import get_backend, resolve_backend
from .layer import MODES, SparseLinear2to4, check_2to4
from .tuning import NEVER, TUNE_MODES, DispatchCache, dispatch_entry

logger = logging.getLogger(__name__)

__all__ = ["SparseWeightMemory", "sparse_weight_memory", "to_dense_kernels", "to_sparse_kernels"]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _validate_min_tokens(min_tokens: int | str | None, mode: str) -> None:
    if min_tokens is None or min_tokens == "auto":
        return
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 0:
        raise ValueError(f"`min_tokens`={min_tokens!r} must be 'auto', None or an int >= 0.")
    if mode == "memory":
        raise ValueError(
            f"`min_tokens`={min_tokens!r} needs the dense weight to fall back to; `mode`='memory' keeps only the "
            f"compressed weight and always runs the sparse kernel (pass min_tokens='auto' or None)."
        )


def to_sparse_kernels(
    model: nn.Module,
    *,
    backend: str = "auto",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    min_tokens: int | str | None = "auto",
    mode: str = "speed",
    tune_for: str = "eager",
    cache_dir: str | os.PathLike | None = None,
    config=None,
) -> nn.Module:
    """Swap every exactly-2:4 target linear of ``model`` (in place) for a :class:`SparseLinear2to4`.

    Put the model on its GPU and in its inference dtype (bf16/fp16) first: compressed weights are device-specific.

    Args:
        model: a (pruned) model; targets are resolved with :func:`proxsparse_hf.find_targets` (``config`` as there).
        backend: ``"auto"``, a registered backend (:func:`backend_names`) or ``"dense"``. ``"auto"`` = the first
            available of cuSPARSELt, CUTLASS; on CPU or pre-Ampere GPUs the layers are still swapped but run dense
            (logged warning).
        filter_fn: ``filter_fn(module, name) -> bool``; only targets for which it returns True are converted.
        min_tokens: ``"auto"`` (measure once per shape, cached), an int (sparse from this many tokens on) or None
            (always sparse). Speed mode only; memory mode always runs sparse.
        mode: ``"speed"`` (keep the dense weight for the small-M fallback) or ``"memory"`` (compressed weight only).
        tune_for: ``"eager"`` (time back-to-back calls, host launch cost included) or ``"cuda_graph"`` (time graph
            replays; use when the model runs under CUDA graphs). With ``"cuda_graph"`` and ``min_tokens="auto"`` the
            eager thresholds are measured too and used for calls that run eagerly (``eager_min_tokens``).
        cache_dir: where the measured dispatch is cached (default :func:`default_cache_dir`).
        config: optional ``ProxSparseConfig`` giving ``target_modules`` / ``exclude_modules``.

    Returns:
        ``model``, modified in place.

    Raises:
        ValueError: a bad argument, or a selected layer whose weight is not exactly 2:4 along its input dimension (the
            message names the layer).
    """
    if mode not in MODES:
        raise ValueError(f"`mode`={mode!r} is not one of {MODES}.")
    if tune_for not in TUNE_MODES:
        raise ValueError(f"`tune_for`={tune_for!r} is not one of {TUNE_MODES}.")
    _validate_min_tokens(min_tokens, mode)
    targets = [
        t
        for t in find_targets(model, config).values()
        if not isinstance(t.module, SparseLinear2to4) and (filter_fn is None or filter_fn(t.module, t.name))
    ]
    if not targets:
        raise ValueError("No layer left to convert: `filter_fn` rejected every target (or all are already converted).")
    # validate every selected layer before touching the model
    for target in targets:
        check_2to4(target.grouped(target.weight.detach()), target.name)

    device = targets[0].weight.device
    resolved = resolve_backend(backend, device if device.type == "cuda" else None)
    if resolved != "dense" and device.type != "cuda":
        logger.warning("The model is on %s, not CUDA; 2:4 layers keep dense matmuls.", device)
        resolved = "dense"
    if resolved == "dense" and mode == "memory":
        logger.warning("`mode`='memory' needs sparse kernels; keeping the dense weights (speed mode).")
        mode = "speed"
    cache = DispatchCache(cache_dir, device) if resolved != "dense" else None
    converted = skipped = kept_dense = 0
    for target in targets:
        module = target.module
        layer_backend = resolved
        grouped = target.grouped(module.weight.detach())
        if layer_backend != "dense":
            reason = (
                f"its weight is on {grouped.device}, not {device}"
                if grouped.device != device
                else get_backend(layer_backend).unsupported_reason(grouped)
            )
            if reason:
                logger.warning("Layer `%s` keeps a dense matmul: %s.", target.name, reason)
                skipped += 1
                continue
        alg_id, threshold, eager_threshold = 0, NEVER, None
        if layer_backend != "dense":
            entry = dispatch_entry(cache, layer_backend, grouped, tune_for)
            alg_id = entry.algorithms()
            if min_tokens == "auto":
                threshold = entry.min_tokens
                if tune_for == "cuda_graph" and mode == "speed" and threshold < NEVER:
                    # eager calls of a graph-tuned model (an eager prefill) keep the eager break-even point
                    eager_threshold = dispatch_entry(cache, layer_backend, grouped, "eager").min_tokens
            elif min_tokens is None:
                threshold = 0
            else:
                threshold = int(min_tokens)
            if mode == "speed" and threshold >= NEVER:
                # leave the nn.Linear as it is: not even the wrapper's call overhead on the decode path
                logger.info(
                    "Layer `%s` stays nn.Linear: the sparse kernel never beat dense for its shape.", target.name
                )
                kept_dense += 1
                continue
        with torch.no_grad():
            new = SparseLinear2to4.from_linear(
                module,
                backend=layer_backend,
                min_tokens=threshold if layer_backend != "dense" else 0,
                mode=mode if layer_backend != "dense" else "speed",
                alg_id=alg_id,
                name=target.name,
                eager_min_tokens=eager_threshold,
            )
        _set_submodule(model, target.name, new)
        converted += 1
    if cache is not None:
        try:
            cache.save()
        except OSError as exc:
            logger.warning("Could not write the dispatch cache %s (%s).", cache.file, exc)
    logger.info(
        "Converted %d layer(s) to SparseLinear2to4 (backend %s, mode %s); %d unsupported and %d slower-than-dense "
        "layer(s) left as they were.",
        converted,
        resolved,
        mode,
        skipped,
        kept_dense,
    )

    return model


def to_dense_kernels(model: nn.Module) -> nn.Module:
    """Replace every :class:`SparseLinear2to4` of ``model`` (in place) by an ``nn.Linear`` / ``Conv1D`` holding its
    weight.

    Speed mode hands back the very same weight Parameters (bit-exact); memory mode decompresses exactly.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, SparseLinear2to4)]
    for name in names:
        module = model.get_submodule(name)
        with torch.no_grad():
            _set_submodule(model, name, module.to_dense_module())
    return model


@dataclass
class SparseWeightMemory:
    """Weight bytes of the converted layers.

    Attributes:
        layers: number of :class:`SparseLinear2to4` modules.
        sparse_layers: how many of them hold a compressed weight.
        dense_bytes: bytes their weights take dense.
        compressed_bytes: bytes of the compressed weights (kept values + metadata).
        resident_bytes: bytes actually held (compressed + dense weights kept for the fallback).
    """

    layers: int
    sparse_layers: int
    dense_bytes: int
    compressed_bytes: int
    resident_bytes: int

    @property
    def compressed_ratio(self) -> float:
        """compressed / dense bytes (0.5625 for 16-bit 2:4 with cuSPARSELt metadata)."""
        return self.compressed_bytes / self.dense_bytes if self.dense_bytes else math.nan

    @property
    def resident_ratio(self) -> float:
        return self.resident_bytes / self.dense_bytes if self.dense_bytes else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compressed_ratio": self.compressed_ratio, "resident_ratio": self.resident_ratio}


def sparse_weight_memory(model: nn.Module) -> SparseWeightMemory:
    """Bytes of the compressed 2:4 representation vs dense, over the :class:`SparseLinear2to4` layers of ``model``."""
    layers = sparse = dense = compressed = resident = 0
    for module in model.modules():
        if not isinstance(module, SparseLinear2to4):
            continue
        layers += 1
        dense += module.dense_nbytes
        compressed += module.compressed_nbytes
        resident += module.compressed_nbytes + (module.dense_nbytes if module.weight is not None else 0)
        sparse += int(module.compressed_nbytes > 0)
    return SparseWeightMemory(layers, sparse, dense, compressed, resident)
