"""``proxsparse prune MODEL --method {magnitude,wanda,sparsegpt}``: one-shot 2:4 baseline → standard output folder.

Also holds the argument groups and helpers shared by ``eval`` and ``compare`` (model loading, calibration data).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "c4"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--gguf-file``, ``--revision``, ``--dtype``, ``--device``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--gguf-file", default=None, help="GGUF file name inside MODEL (a path to a .gguf works as MODEL)."
    )
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    group.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="Weights dtype to load."
    )
    group.add_argument("--device", default=None, help="Device to run on, e.g. cuda or cpu (default: where it loads).")


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """``--target-modules``, ``--exclude-modules``."""
    group = parser.add_argument_group("targets")
    group.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        help="'all-linear' (default), module-name suffixes (e.g. q_proj v_proj), or one full-match regex.",
    )
    group.add_argument("--exclude-modules", nargs="+", default=None, help="Modules to leave dense (same rules).")


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    """Calibration data options (used by wanda / sparsegpt)."""
    group = parser.add_argument_group("calibration data (wanda, sparsegpt)")
    group.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        help="'c4' (the local C4 sample in ../shared/assets, documents [0, 1000), else allenai/c4 from the Hub), a local "
        ".txt/.jsonl file or folder, or a Hub dataset id.",
    )
    group.add_argument("--calibration-split", default="train", help="Split of a Hub calibration dataset.")
    group.add_argument("--calibration-start", type=int, default=0, help="First calibration document.")
    group.add_argument(
        "--calibration-stop", type=int, default=None, help="One past the last document (default 1000 for 'c4')."
    )
    group.add_argument("--text-field", default="text", help="Text field of JSON records.")
    group.add_argument("--n-samples", type=int, default=128, help="Calibration windows (default 128).")
    group.add_argument("--seq-len", type=int, default=2048, help="Tokens per calibration window (default 2048).")
    group.add_argument("--seed", type=int, default=0, help="Seed for shuffling the calibration documents.")
    group.add_argument("--batch-size", type=int, default=1, help="Calibration windows per forward pass.")
    group.add_argument("--damp-percent", type=float, default=0.01, help="SparseGPT damping (fraction of mean diag).")
    group.add_argument("--block-size", type=int, default=128, help="SparseGPT lazy-update block size.")


def parse_target_modules(values: list[str] | None) -> str | list[str] | None:
    """argparse list → what ``ProxSparseConfig`` takes (a single value is a keyword/regex string)."""
    if values is None:
        return None
    return (
        values[0] if len(values) == 1 and (values[0] == "all-linear" or not values[0].isidentifier()) else list(values)
    )


def load_model(args: argparse.Namespace, name_or_path: str) -> tuple[Any, Any]:
    from ..loading import load_model_and_tokenizer

    return load_model_and_tokenizer(
        name_or_path, gguf_file=args.gguf_file, revision=args.revision, dtype=args.dtype, device=args.device
    )


def calibration_spec(args: argparse.Namespace) -> dict[str, Any]:
    """Where the calibration windows come from, as recorded in ``run_info.json``."""
    from ..evaluation.perplexity import CALIBRATION_DOCS, find_assets_dir

    source, split, stop = args.calibration, args.calibration_split, args.calibration_stop
    name = None
    if source == DEFAULT_CALIBRATION:
        assets = find_assets_dir()
        local = os.path.join(assets, "c4-validation-2k", "c4_validation_2k.jsonl") if assets else None
        if local and os.path.isfile(local):
            source, stop = local, CALIBRATION_DOCS[1] if stop is None else stop
        else:
            source, name = "allenai/c4", "en"
    return {
        "source": source,
        "name": name,
        "split": split,
        "documents": [args.calibration_start, stop],
        "text_field": args.text_field,
        "n_samples": args.n_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
    }


def load_calibration(args: argparse.Namespace, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """Calibration windows and their description."""
    from ..data import load_calibration_data

    spec = calibration_spec(args)
    data = load_calibration_data(
        spec["source"],
        tokenizer,
        seq_len=spec["seq_len"],
        n_samples=spec["n_samples"],
        seed=spec["seed"],
        split=spec["split"],
        text_field=spec["text_field"],
        name=spec["name"],
        start=spec["documents"][0],
        stop=spec["documents"][1],
    )
    return data, spec


def method_options(method: str, args: argparse.Namespace, update_weights: bool = True) -> dict[str, Any]:
    """Options for :func:`proxsparse_hf.pruners.prune` from the command line."""
    opts: dict[str, Any] = {"batch_size": args.batch_size, "show_progress": not getattr(args, "no_progress", False)}
    if method == "sparsegpt":
        opts.update(update_weights=update_weights, damp_percent=args.damp_percent, block_size=args.block_size)
    return opts


def command_line() -> str:
    return shlex.join(["proxsparse", *sys.argv[1:]])


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prune",
        help="Prune a model to 2:4 with a one-shot baseline (magnitude, Wanda, SparseGPT).",
        description="Prune MODEL to 2:4 with a one-shot baseline and write the standard output folder (pruned model, "
        "tokenizer, proxsparse_config.json, masks, sparsity_report.json, run_info.json).",
    )
    parser.add_argument("model", help="Hub id, local folder, or path to a .gguf file.")
    parser.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"], help="Baseline.")
    parser.add_argument(
        "--no-update-weights",
        action="store_true",
        help="SparseGPT only: keep the original weights under the SparseGPT mask (no OBS weight update).",
    )
    parser.add_argument("--output-dir", "-o", required=True, help="Output folder.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty output folder.")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    add_model_args(parser)
    add_target_args(parser)
    add_calibration_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..artefacts.output_dir import save_pruned_output
    from ..config import ProxSparseConfig
    from ..loading import model_revision
    from ..pruners import prune

    if args.no_update_weights and args.method != "sparsegpt":
        raise ValueError(f"--no-update-weights only applies to --method sparsegpt, not {args.method!r}.")
    start = time.perf_counter()
    model, tokenizer = load_model(args, args.model)
    config = ProxSparseConfig(
        target_modules=parse_target_modules(args.target_modules),
        exclude_modules=parse_target_modules(args.exclude_modules),
        base_model_name_or_path=args.model,
        revision=args.revision or model_revision(model),
    )
    calibration, spec = (None, None)
    if args.method != "magnitude":
        calibration, spec = load_calibration(args, tokenizer)
    options = method_options(args.method, args, update_weights=not args.no_update_weights)
    prune_start = time.perf_counter()
    masks = prune(model, args.method, calibration, config, **options)
    prune_time = time.perf_counter() - prune_start
    run_info = {
        "calibration": spec,
        "method_config": {k: v for k, v in options.items() if k != "show_progress"},
        "prune_time_s": prune_time,
        "wall_time_s": time.perf_counter() - start,
        "command": command_line(),
    }
    output = save_pruned_output(
        args.output_dir,
        model,
        tokenizer,
        config=config,
        masks=masks,
        method=args.method,
        run_info=run_info,
        overwrite=args.overwrite,
    )
    report = output.report
    logger.info(
        "%s: %d/%d target layers valid 2:4, target sparsity %.2f%%, pruning took %.1fs; saved to %s",
        args.method,
        report.num_2to4_layers,
        len(report.layers),
        100 * report.target_sparsity,
        prune_time,
        output.path,
    )
    return 0
