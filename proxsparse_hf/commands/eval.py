"""``proxsparse eval MODEL_OR_DIR``: perplexity (+ optional zero-shot accuracy) → ``eval_results.json``.

``MODEL_OR_DIR`` is a dense model (Hub id, local folder, ``.gguf`` file) or an output folder written by ``learn`` /
``prune``; for an output folder the results go into it (``eval_results.json``) unless ``--output`` says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from .prune import add_model_args

logger = logging.getLogger(__name__)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Perplexity and zero-shot options (shared with ``compare``)."""
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--datasets",
        nargs="*",
        default=["wikitext2", "c4"],
        help="Perplexity datasets: wikitext2, c4 (local copies in ../shared/assets when present, else the Hub), a local "
        "file or a Hub id. Give none (--datasets) to skip perplexity.",
    )
    group.add_argument(
        "--eval-seq-len", type=int, default=None, help="Perplexity window length (default: model's, capped at 2048)."
    )
    group.add_argument("--eval-batch-size", type=int, default=1, help="Windows per forward pass.")
    group.add_argument("--max-windows", type=int, default=None, help="Score only the first N windows (quick runs).")
    group.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        help="Zero-shot lm-eval tasks ('default' = piqa arc_easy arc_challenge hellaswag winogrande boolq rte "
        "openbookqa); needs the eval extra. Omitted: no zero-shot evaluation.",
    )
    group.add_argument("--zeroshot-limit", type=int, default=None, help="First N examples per task (quick runs).")
    group.add_argument("--zeroshot-batch-size", type=int, default=1, help="lm-eval batch size.")
    group.add_argument(
        "--zeroshot-data-dir",
        default=None,
        help="Folder of local task files (MosaicML format); default ../shared/assets/data/zeroshot/llm-foundry.",
    )
    group.add_argument(
        "--skip-unavailable", action="store_true", help="Skip zero-shot tasks whose data cannot be loaded (offline)."
    )
    group.add_argument("--no-progress", action="store_true", help="Hide progress bars.")


def resolve_tasks(values: list[str] | None) -> list[str] | None:
    """``--tasks`` → task list (``default`` expands to the default set)."""
    if values is None:
        return None
    from ..evaluation.zeroshot import DEFAULT_TASKS

    tasks: list[str] = []
    for value in values:
        for item in value.split(","):
            if item == "default":
                tasks.extend(DEFAULT_TASKS)
            elif item:
                tasks.append(item)
    return list(dict.fromkeys(tasks)) or list(DEFAULT_TASKS)


def eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`proxsparse_hf.evaluation.evaluate_model` from the command line."""
    return {
        "datasets": list(args.datasets or []),
        "seq_len": args.eval_seq_len,
        "batch_size": args.eval_batch_size,
        "max_windows": args.max_windows,
        "tasks": resolve_tasks(args.tasks),
        "zeroshot_limit": args.zeroshot_limit,
        "zeroshot_batch_size": args.zeroshot_batch_size,
        "zeroshot_data_dir": args.zeroshot_data_dir,
        "skip_unavailable": args.skip_unavailable,
        "show_progress": not args.no_progress,
    }


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a dense model or a pruned output folder (perplexity, zero-shot) into eval_results.json.",
        description="Measure WikiText-2 / C4 perplexity (and zero-shot accuracy with --tasks) of MODEL_OR_DIR and write "
        "eval_results.json: into the output folder when MODEL_OR_DIR is one, else to --output.",
    )
    parser.add_argument(
        "model", metavar="MODEL_OR_DIR", help="Output folder, Hub id, local model folder or .gguf file."
    )
    parser.add_argument(
        "--output", default=None, help="Where to write: a .json file or a folder (gets eval_results.json)."
    )
    add_model_args(parser)
    add_eval_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..artefacts.output_dir import load_output_dir
    from ..constants import CONFIG_NAME, EVAL_RESULTS_NAME
    from ..evaluation import evaluate_model
    from ..loading import load_model_and_tokenizer, model_revision

    is_output_dir = os.path.isdir(args.model) and os.path.isfile(os.path.join(args.model, CONFIG_NAME))
    if args.output is None and not is_output_dir:
        raise ValueError(
            f"{args.model!r} is not a proxsparse output folder; pass --output FILE_OR_DIR for its {EVAL_RESULTS_NAME}."
        )
    config = None
    method, method_config, model_name, revision = "dense", {}, args.model, args.revision
    if is_output_dir:
        output = load_output_dir(args.model)
        config = output.config
        method = output.method
        method_config = dict(output.run_info.get("method_config") or {})
        if output.run_info.get("calibration"):
            method_config.setdefault("calibration", output.run_info["calibration"])
        if method == "proxsparse":
            method_config.setdefault("proxsparse_config", config.to_dict())
        method_config.setdefault("base_model", config.base_model_name_or_path)
        revision = revision or config.revision
    model, tokenizer = load_model_and_tokenizer(
        args.model, gguf_file=args.gguf_file, revision=args.revision, dtype=args.dtype, device=args.device
    )
    results = evaluate_model(
        model,
        tokenizer,
        model_name=model_name,
        method=method,
        method_config=method_config,
        revision=revision or model_revision(model),
        config=config,
        **eval_kwargs(args),
    )
    target = args.model if args.output is None else args.output
    if not target.endswith(".json"):
        os.makedirs(target, exist_ok=True)
    path = results.save(target)
    for name, entry in results.perplexity.items():
        logger.info(
            "%s perplexity: %.3f (%d windows x %d)", name, entry["ppl"], entry["num_windows"], entry["seq_len"]
        )
    if results.zeroshot_mean is not None:
        logger.info("zero-shot mean acc: %.4f over %d tasks", results.zeroshot_mean, len(results.zeroshot))
    logger.info("Wrote %s", path)
    return 0
