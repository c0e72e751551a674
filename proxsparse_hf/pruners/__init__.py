"""One-shot 2:4 baselines behind one entry point: magnitude, Wanda and SparseGPT.

They use the same target selection (:func:`proxsparse_hf.targets.find_targets`), the same 2:4 layout (groups of four along
the input dimension, ``Conv1D`` transposed) and the same calibration data (:func:`proxsparse_hf.data.load_calibration_data`)
as ProxSparse, so their masks are directly comparable::

    from proxsparse_hf.pruners import prune
    calib = load_calibration_data("../shared/assets/data/c4-validation-2k/c4_validation_2k.jsonl", tokenizer,
                                  seq_len=512, n_samples=128, stop=1000)
    masks = prune(model, "wanda", calib)              # the model is pruned in place
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ..targets import find_targets
from .capture import CalibrationBatches, find_decoder_blocks, run_sequential
from .magnitude import magnitude_prune
from .sparsegpt import HessianStats, make_hessian_stats, sparsegpt_2to4, sparsegpt_prune_block
from .wanda import WandaStats, make_wanda_stats, wanda_mask, wanda_prune_block, wanda_scores

__all__ = [
    "BASELINE_METHODS",
    "HessianStats",
    "WandaStats",
    "find_decoder_blocks",
    "prune",
    "sparsegpt_2to4",
    "wanda_mask",
    "wanda_scores",
]

logger = logging.getLogger(__name__)

BASELINE_METHODS = ("magnitude", "wanda", "sparsegpt")

# options each method accepts, with defaults (magnitude accepts and ignores the calibration options)
_COMMON = {"batch_size": 1, "show_progress": False}
_OPTIONS: dict[str, dict[str, Any]] = {
    "magnitude": dict(_COMMON),
    "wanda": dict(_COMMON),
    "sparsegpt": {
        **_COMMON,
        "update_weights": True,
        "damp_percent": 0.01,
        "block_size": 128,
    },
}


def _resolve_options(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    allowed = _OPTIONS[method]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for method {method!r}; allowed: {sorted(allowed)}.")
    resolved = {**allowed, **opts}
    if "update_weights" in resolved and not isinstance(resolved["update_weights"], bool):
        raise ValueError(f"`update_weights`={resolved['update_weights']!r} is invalid; allowed: True or False.")
    if "damp_percent" in resolved:
        damp = resolved["damp_percent"]
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise ValueError(f"`damp_percent`={damp!r} is invalid; allowed: a number in (0, 1).")
    if "block_size" in resolved:
        size = resolved["block_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 4 or size % 4:
            raise ValueError(f"`block_size`={size!r} is invalid; allowed: an integer >= 4 and divisible by 4.")
    return resolved


def prune(
    model: nn.Module,
    method: str,
    calibration_data: Any = None,
    config: Any = None,
    **opts: Any,
) -> dict[str, torch.Tensor]:
    """Prune the target weights of ``model`` to 2:4 in place with a one-shot baseline.

    Args:
        model: a causal LM (any module whose decoder blocks form its largest ``nn.ModuleList``).
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        calibration_data: for ``wanda`` / ``sparsegpt``: a :class:`~proxsparse_hf.data.TokenWindows`, an ``[N, L]`` token
            tensor, or an iterable of dicts with ``input_ids`` (and optionally ``attention_mask``). Ignored by magnitude.
        config: a ``ProxSparseConfig`` (its ``target_modules`` / ``exclude_modules``), default ``"all-linear"``.
        **opts: ``batch_size`` (windows per forward, default 1) and ``show_progress`` (tqdm over blocks), used by wanda and
            sparsegpt; for sparsegpt also ``update_weights`` (default True; False keeps the original weights under the
            SparseGPT mask), ``damp_percent`` (0.01) and ``block_size`` (128).

    Returns:
        ``{weight_name: bool mask}`` (storage layout, on the CPU, ``True`` = kept), exactly two kept per group of four.

    Raises:
        ValueError: unknown method or option, missing/empty calibration data, a target whose input dimension is not
            divisible by 4, or targets outside the decoder blocks (wanda / sparsegpt).
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"`method`={method!r} is invalid; allowed: {BASELINE_METHODS}.")
    options = _resolve_options(method, opts)
    targets = find_targets(model, config)
    start = time.perf_counter()
    if method == "magnitude":
        masks = {name: mask.cpu() for name, mask in magnitude_prune(model, targets).items()}
        logger.info("magnitude: pruned %d layers in %.1fs", len(masks), time.perf_counter() - start)
        return masks

    data = CalibrationBatches.from_any(calibration_data, batch_size=options["batch_size"])
    masks: dict[str, torch.Tensor] = {}
    if method == "wanda":
        make_stats = make_wanda_stats

        def prune_block(block_targets, stats):
            wanda_prune_block(block_targets, stats, masks)

    else:
        make_stats = make_hessian_stats

        def prune_block(block_targets, stats):
            sparsegpt_prune_block(
                block_targets,
                stats,
                masks,
                update_weights=options["update_weights"],
                damp_percent=options["damp_percent"],
                block_size=options["block_size"],
            )

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_sequential(
                model,
                targets,
                data,
                make_stats=make_stats,
                prune_block=prune_block,
                progress=options["show_progress"],
                desc=method,
            )
    finally:
        model.train(was_training)
    ordered = {t.param_name: masks[t.param_name] for t in targets.values()}
    logger.info(
        "%s: pruned %d layers with %d calibration windows in %.1fs",
        method,
        len(ordered),
        data.num_samples,
        time.perf_counter() - start,
    )
    return ordered
