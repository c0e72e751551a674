"""``proxsparse compare MODEL --methods dense,magnitude,wanda,sparsegpt[,sparsegpt-mask] [--learned DIR ...]``.

Loads MODEL once, restores its original target weights before each baseline, evaluates every method (and every learned
output folder) with the same protocol, and writes ``comparison.json`` (one ``EvalResults`` per method), ``comparison.md``
(table, also printed) and ``comparison.png`` (perplexity bar chart; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

from .eval import add_eval_args, eval_kwargs
from .prune import (
    add_calibration_args,
    add_model_args,
    add_target_args,
    command_line,
    load_calibration,
    load_model,
    method_options,
    parse_target_modules,
)

logger = logging.getLogger(__name__)

COMPARE_METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "sparsegpt-mask")
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
COMPARISON_PNG = "comparison.png"


def parse_methods(value: str) -> list[str]:
    """``"dense,wanda"`` → ``["dense", "wanda"]``; unknown names raise ``ValueError``."""
    methods = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown or not methods:
        raise ValueError(f"`--methods`={value!r} is invalid; allowed: a comma-separated subset of {COMPARE_METHODS}.")
    return list(dict.fromkeys(methods))


def comparison_markdown(labels: list[str], results: list[Any]) -> str:
    """Markdown table: one row per method with perplexities, zero-shot accuracies, sparsity and time."""
    datasets = list(dict.fromkeys(d for r in results for d in r.perplexity))
    tasks = list(dict.fromkeys(t for r in results for t in r.zeroshot))
    header = ["method", *[f"{d} ppl" for d in datasets], *tasks]
    if tasks:
        header.append("zero-shot mean")
    header += ["target sparsity", "valid 2:4", "time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|"]
    for label, r in zip(labels, results):
        cells = [label]
        cells += [f"{r.perplexity[d]['ppl']:.2f}" if d in r.perplexity else "–" for d in datasets]
        cells += [f"{r.zeroshot[t]['acc']:.4f}" if t in r.zeroshot else "–" for t in tasks]
        if tasks:
            cells.append(f"{r.zeroshot_mean:.4f}" if r.zeroshot_mean is not None else "–")
        sparsity = r.sparsity.get("target_sparsity")
        cells.append(f"{sparsity:.2%}" if isinstance(sparsity, (int, float)) else "–")
        cells.append("yes" if r.sparsity.get("all_2to4") else "no")
        total = (r.wall_time_s or 0.0) + float(r.method_config.get("prune_time_s", 0.0))
        cells.append(f"{total:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    first = next((r.perplexity[d] for r in results for d in datasets if d in r.perplexity), None)
    if first is not None:
        lines += [
            "",
            f"Perplexity: {first['num_windows']} windows x {first['seq_len']} tokens per dataset; "
            f"time = pruning + evaluation.",
        ]
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="Compare dense, one-shot baselines and learned masks on one model (table + bar chart).",
        description="Evaluate MODEL dense and pruned with each of --methods (and each --learned output folder) with the "
        "same protocol; write comparison.json, comparison.md and comparison.png into --output.",
    )
    parser.add_argument("model", help="Hub id, local folder, or path to a .gguf file.")
    parser.add_argument(
        "--methods",
        default="dense,magnitude,wanda,sparsegpt",
        help=f"Comma-separated subset of {', '.join(COMPARE_METHODS)} (sparsegpt-mask = SparseGPT mask on the original "
        f"weights). Default: dense,magnitude,wanda,sparsegpt.",
    )
    parser.add_argument("--learned", nargs="*", default=[], help="Output folder(s) of `proxsparse learn` to include.")
    parser.add_argument("--output", "-o", required=True, help="Folder for comparison.json / .md / .png.")
    add_model_args(parser)
    add_target_args(parser)
    add_calibration_args(parser)
    add_eval_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    import torch

    from ..artefacts.output_dir import load_output_dir
    from ..config import ProxSparseConfig
    from ..evaluation import EvalResults, evaluate_model
    from ..loading import load_model_and_tokenizer, model_revision
    from ..pruners import prune
    from ..targets import find_targets

    methods = parse_methods(args.methods)
    for path in args.learned:
        load_output_dir(path)  # fail early on a wrong folder
    os.makedirs(args.output, exist_ok=True)
    options = eval_kwargs(args)
    start = time.perf_counter()
    model, tokenizer = load_model(args, args.model)
    revision = args.revision or model_revision(model)
    config = ProxSparseConfig(
        target_modules=parse_target_modules(args.target_modules),
        exclude_modules=parse_target_modules(args.exclude_modules),
        base_model_name_or_path=args.model,
        revision=revision,
    )
    targets = find_targets(model, config)
    original = {t.param_name: t.weight.detach().to("cpu", copy=True) for t in targets.values()}
    calibration, spec = (None, None)
    if any(m in ("wanda", "sparsegpt", "sparsegpt-mask") for m in methods):
        calibration, spec = load_calibration(args, tokenizer)

    labels: list[str] = []
    results: list[EvalResults] = []
    for label in methods:
        with torch.no_grad():
            for target in targets.values():
                target.weight.copy_(original[target.param_name])
        method = "sparsegpt" if label == "sparsegpt-mask" else label
        method_config: dict[str, Any] = {}
        if method != "dense":
            opts = method_options(method, args, update_weights=label != "sparsegpt-mask")
            tick = time.perf_counter()
            prune(model, method, calibration, config, **opts)
            method_config = {k: v for k, v in opts.items() if k != "show_progress"}
            method_config["prune_time_s"] = time.perf_counter() - tick
            if method != "magnitude":
                method_config["calibration"] = spec
        logger.info("Evaluating %s", label)
        results.append(
            evaluate_model(
                model,
                tokenizer,
                model_name=args.model,
                method=method,
                method_config=method_config,
                revision=revision,
                config=config,
                **options,
            )
        )
        labels.append(label)
    del model
    for path in args.learned:
        output = load_output_dir(path)
        learned, learned_tokenizer = load_model_and_tokenizer(path, dtype=args.dtype, device=args.device)
        method_config = {"output_dir": os.path.abspath(path), **(output.run_info.get("method_config") or {})}
        if output.method == "proxsparse":
            method_config["proxsparse_config"] = output.config.to_dict()
        logger.info("Evaluating %s", path)
        results.append(
            evaluate_model(
                learned,
                learned_tokenizer,
                model_name=path,
                method=output.method,
                method_config=method_config,
                revision=output.config.revision,
                config=output.config,
                **options,
            )
        )
        labels.append(f"{output.method} ({os.path.basename(os.path.normpath(path))})")
        del learned

    payload = {
        "model": args.model,
        "command": command_line(),
        "wall_time_s": time.perf_counter() - start,
        "results": [{"label": label, "eval_results": r.to_dict()} for label, r in zip(labels, results)],
    }
    with open(os.path.join(args.output, COMPARISON_JSON), "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    table = comparison_markdown(labels, results)
    with open(os.path.join(args.output, COMPARISON_MD), "w", encoding="utf-8") as fh:
        fh.write(f"# 2:4 comparison on `{args.model}`\n\n{table}\nCommand: `{payload['command']}`\n")
    print(table)
    datasets = [d for d in options["datasets"] if any(r.ppl(d) is not None for r in results)]
    plot_dataset = next((name for r in results for name in r.perplexity), None) if datasets else None
    if plot_dataset is not None:
        from ..evaluation.plot import plot_perplexity

        try:
            plot_perplexity(results, os.path.join(args.output, COMPARISON_PNG), dataset=plot_dataset, labels=labels)
        except RuntimeError as exc:
            logger.warning("No chart: %s", exc)
    logger.info("Wrote %s", args.output)
    return 0
