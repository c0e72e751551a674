"""``proxsparse compare MODEL --methods dense,magnitude,wanda,sparsegpt[,sparsegpt-mask][,wanda+perm] [--learned DIR ...]
-o OUT``.

Loads MODEL once and runs :func:`proxsparse_hf.evaluation.compare.run_comparison`: every method starts from the original
weights and is evaluated with the same protocol; every ``--learned`` output folder is evaluated the same way. Writes
``comparison.json`` (one ``EvalResults`` per row; the model card reads it with ``--comparison``), ``comparison.md``
(the table, also printed) and ``comparison.png`` (perplexity chart; needs matplotlib).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

from .common import add_model_args, add_output_args, add_target_args
from .eval import add_eval_args, eval_kwargs
from .prune import add_calibration_args

logger = logging.getLogger(__name__)

DEFAULT_METHODS = "dense,magnitude,wanda,sparsegpt"


def parse_methods(value: str) -> list:
    """``--methods`` → :class:`~proxsparse_hf.evaluation.compare.MethodRun` list (one-shot pruners and their ``-mask``
    variants; ``ValueError`` listing them for an unknown name)."""
    from ..evaluation.compare import parse_methods as parse

    return parse(value)


def pruner_flags(args: argparse.Namespace, method: str) -> dict:
    """The options of ``method`` (its own and the runner's, e.g. ``batch_size``, ``damp_percent``) given by the flags of
    the same name; ``update_weights`` comes from the ``-mask`` variant, ``show_progress`` from ``--no-progress``."""
    from ..pruners import RUNNER_OPTIONS, get_pruner

    names = [*RUNNER_OPTIONS, *get_pruner(method).options]
    return {
        k: getattr(args, k)
        for k in names
        if k not in ("update_weights", "show_progress") and getattr(args, k, None) is not None
    }


def _command(args: argparse.Namespace) -> str:
    from ..evaluation.results import scrub_local_paths

    argv = getattr(args, "_argv", None)
    return shlex.join(scrub_local_paths(["proxsparse", *(sys.argv[1:] if argv is None else argv)]))


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="Compare dense, one-shot baselines and learned masks on one model (table + bar chart).",
        description="Evaluate MODEL dense and pruned with each of --methods (and each --learned output folder) with the "
        "same protocol; write comparison.json, comparison.md and comparison.png into -o/--output and print the table. "
        "Paths, data, targets and flags are checked before the model is loaded.",
    )
    parser.add_argument("model", help="Hub id, local folder, or path to a .gguf file.")
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="Comma-separated registered one-shot methods; '<method>-mask' runs a weight-updating method's mask on the "
        "original weights (e.g. sparsegpt-mask); a '+perm' suffix permutes the input channels of o_proj and down_proj "
        "first, maximising the method's own score (e.g. wanda+perm; Llama, Mistral, Qwen2). "
        f"Default: {DEFAULT_METHODS}.",
    )
    parser.add_argument("--learned", nargs="*", default=[], help="Output folder(s) of `proxsparse learn` to include.")
    add_output_args(
        parser,
        required=True,
        overwrite=False,
        help="Folder for comparison.json / .md / .png (files of those names in it are replaced).",
    )
    add_model_args(parser)
    add_target_args(parser, default_help="Default all-linear.")
    add_calibration_args(parser, windows="calibration and perplexity")
    add_eval_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from .. import loading
    from ..data import bos_token_id
    from ..evaluation import evaluate_pretrained, is_output_dir
    from ..evaluation.compare import (
        MethodRun,
        comparison_markdown,
        needs_calibration,
        run_comparison,
        save_comparison_report,
    )
    from .common import (
        check_numbers,
        check_seq_len,
        check_writable,
        inspect_model,
        load_calibration,
        resolve_calibration,
    )
    from .prune import prune_config

    # every check that needs no weights, before anything is loaded or written
    start = time.perf_counter()
    runs = parse_methods(args.methods)
    options = eval_kwargs(args)
    check_numbers(args, {"n_samples": ">=1", "seq_len": ">=1", "batch_size": ">=1"})
    for path in args.learned:
        if not is_output_dir(path):
            raise FileNotFoundError(
                f"`--learned` {path!r} is not a proxsparse output folder (no proxsparse_config.json)."
            )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"`--output`={args.output_dir!r} is a file; allowed: a folder.")
    check_writable(args.output_dir, "--output")
    runs = [
        MethodRun(
            run.method,
            label=run.name,
            options={**pruner_flags(args, run.method), **run.options},
            permute=run.permute,
        )
        for run in runs
    ]
    config = prune_config(args)
    documents = resolve_calibration(args) if needs_calibration(runs) else None
    model_config = inspect_model(args, config)
    if any(run.permute is not None for run in runs):
        from ..permutation import check_permutable

        check_permutable(model_config)
    source = {"gguf_file": args.gguf_file, "revision": args.revision}
    tokenizer = loading.load_tokenizer(args.model, **source)
    bos_token_id(tokenizer, args.bos)  # --bos yes needs a BOS token
    calibration, spec = None, None
    if documents is not None:
        check_seq_len(model_config, args.seq_len)
        calibration, spec = load_calibration(args, documents, tokenizer)

    model = loading.load_model(args.model, config=model_config, dtype=args.dtype, device=args.device, **source)
    revision = args.revision or loading.model_revision(model)
    config.revision = revision
    results = run_comparison(
        model,
        tokenizer,
        runs,
        model_name=args.model,
        config=config,
        calibration=calibration,
        calibration_spec=spec,
        revision=revision,
        eval_options=options,
    )
    del model
    for path in args.learned:
        label = os.path.basename(os.path.normpath(path))
        result = evaluate_pretrained(path, dtype=args.dtype, device=args.device, **options)
        result.label = f"{result.label} ({label})"
        results.append(result)
    written = save_comparison_report(
        args.output_dir, results, model=args.model, command=_command(args), wall_time_s=time.perf_counter() - start
    )
    print(comparison_markdown(results), end="", flush=True)
    print(f"-> {', '.join(written)}", flush=True)
    return 0
