"""2:4 pruning methods behind one entry point and one registry.

Every method is one module with one :func:`register_pruner` registration (``dense``, ``magnitude``, ``wanda``,
``sparsegpt``, ``ria``, and the learned ``proxsparse``); :func:`prune` runs any registered one-shot method by name. They use
the same target selection (:func:`proxsparse_hf.targets.find_targets`), the same 2:4 layout (groups of four along the input
dimension, ``Conv1D`` transposed) and the same calibration data (:func:`proxsparse_hf.data.load_calibration_data`) as
ProxSparse, so their masks are directly comparable::

    from proxsparse_hf.pruners import get_pruner, prune, pruner_names
    calib = load_calibration_data("../shared/assets/data/c4-validation-2k/c4_validation_2k.jsonl", tokenizer,
                                  seq_len=512, n_samples=128, stop=1000)
    masks = prune(model, "wanda", calib)              # the model is pruned in place
    get_pruner("wanda").label                         # "Wanda"
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..activations import InputNormStats
from ..targets import find_targets

# importing a method's module registers it (one registration per module)
from . import dense, magnitude, proxsparse, ria, sparsegpt, wanda  # noqa: F401
from .capture import CalibrationBatches, SequentialPruner, find_decoder_blocks
from .registry import PrunerOption, PrunerSpec, get_pruner, pruner_names, register_pruner, unregister_pruner
from .ria import ria_mask, ria_scores
from .sparsegpt import HessianStats, sparsegpt_2to4
from .wanda import wanda_mask, wanda_scores

__all__ = [
    "RUNNER_OPTIONS",
    "HessianStats",
    "InputNormStats",
    "PrunerOption",
    "PrunerSpec",
    "SequentialPruner",
    "WandaStats",
    "find_decoder_blocks",
    "get_pruner",
    "prune",
    "pruner_names",
    "register_pruner",
    "ria_mask",
    "ria_scores",
    "sparsegpt_2to4",
    "unregister_pruner",
    "wanda_mask",
    "wanda_scores",
]

logger = logging.getLogger(__name__)

WandaStats = InputNormStats  # former name, kept for existing imports

# options of prune() itself, accepted for every method (used by the methods that read calibration data)
RUNNER_OPTIONS: Mapping[str, PrunerOption] = MappingProxyType(
    {
        "batch_size": PrunerOption(
            1, help="Calibration windows per forward pass.", check=lambda v: v >= 1, allowed="an integer >= 1"
        ),
        "show_progress": PrunerOption(False, help="Show a progress bar over the decoder blocks."),
    }
)


def prune(
    model: nn.Module,
    method: str,
    calibration_data: Any = None,
    config: Any = None,
    **opts: Any,
) -> dict[str, torch.Tensor]:
    """Prune the target weights of ``model`` to 2:4 in place with a registered one-shot method.

    Args:
        model: a causal LM (any module whose decoder blocks form its largest ``nn.ModuleList``).
        method: a name from :func:`pruner_names` (e.g. ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``, ``"ria"``).
        calibration_data: for methods with ``needs_calibration``: a :class:`~proxsparse_hf.data.TokenWindows`, an
            ``[N, L]`` token tensor, or an iterable of dicts with ``input_ids`` (and optionally ``attention_mask``).
            Ignored by the others.
        config: a ``ProxSparseConfig`` (its ``target_modules`` / ``exclude_modules``), default ``"all-linear"``.
        **opts: ``batch_size`` (windows per forward, default 1) and ``show_progress`` (progress bar over blocks) for
            every method, plus the method's own options (``get_pruner(method).options``), e.g. for sparsegpt
            ``update_weights`` (default True; False keeps the original weights under the SparseGPT mask),
            ``damp_percent`` (0.01) and ``block_size`` (128); for ria ``alpha`` (0.5).

    Returns:
        ``{weight_name: bool mask}`` in target order (storage layout, on the CPU, ``True`` = kept), exactly two kept per
        group of four; empty for ``dense``.

    Raises:
        ValueError: unknown method (listing the registered ones) or option (listing the allowed ones), an invalid option
            value, a learned method (use ``learn_mask``), missing/empty calibration data, a target whose input dimension
            is not divisible by 4, or targets outside the decoder blocks (calibration-based methods).
    """
    spec = get_pruner(method)
    if spec.learned:
        raise ValueError(
            f"`method`={method!r} ({spec.label}) learns its mask by training: use proxsparse_hf.learn_mask(model, "
            f"dataset, config) or `proxsparse learn`, not prune()."
        )
    unknown = sorted(set(opts) - set(spec.options) - set(RUNNER_OPTIONS))
    if unknown:
        allowed = sorted({*spec.options, *RUNNER_OPTIONS})
        raise ValueError(f"Unknown option(s) {unknown} for method {method!r}; allowed: {allowed}.")
    runner = {name: option.validate(name, opts.pop(name, option.default)) for name, option in RUNNER_OPTIONS.items()}
    options = spec.resolve_options(opts)
    targets = find_targets(model, config)
    calibration = None
    if spec.needs_calibration:
        calibration = CalibrationBatches.from_any(calibration_data, batch_size=runner["batch_size"])
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            masks = spec.fn(
                model,
                targets,
                calibration,
                show_progress=runner["show_progress"],
                **options,
            )
    finally:
        model.train(was_training)
    names = [t.param_name for t in targets.values()]
    extra = sorted(set(masks) - set(names))
    if extra:
        raise RuntimeError(f"Pruner {method!r} returned masks for non-target weights {extra[:3]}.")
    ordered = {name: masks[name] for name in names if name in masks}
    logger.info(
        "%s: pruned %d layers%s in %.1fs",
        method,
        len(ordered),
        f" with {calibration.num_samples} calibration windows" if calibration is not None else "",
        time.perf_counter() - start,
    )
    return ordered
