"""``proxsparse eval MODEL``: perplexity (+ optional zero-shot accuracy) → ``eval_results.json``.

``MODEL`` is anything :func:`proxsparse_hf.evaluation.evaluate_pretrained` loads: a Hub id, a local model folder, a
``.gguf`` file or an output folder of ``learn`` / ``prune``. Without ``-o/--output`` the results go into the output
folder itself, and for any other model into a folder of their own beside it (``<name>-eval/``; in the working directory
for a Hub id). One summary line is printed on stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from .common import add_bos_args, add_model_args, add_output_args

logger = logging.getLogger(__name__)

EVAL_DIR_SUFFIX = "-eval"


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Perplexity and zero-shot options (shared with ``compare``)."""
    from ..evaluation.zeroshot import DEFAULT_TASKS

    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--datasets",
        nargs="*",
        default=["wikitext2", "c4"],
        help="Perplexity datasets: registered ones (wikitext2, c4: local copies in ../shared/assets when present, else "
        "the Hub), a local file or a Hub dataset id. Give none (--datasets) to skip perplexity.",
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
        help=f"Zero-shot tasks: registered ones, any lm-eval task name, or 'default' ({' '.join(DEFAULT_TASKS)}); "
        "lm-eval tasks need the eval extra. Omitted: no zero-shot evaluation.",
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
    """``--tasks`` → task list (``default`` expands to the default set; no value means the default set)."""
    if values is None:
        return None
    from ..evaluation.zeroshot import DEFAULT_TASKS

    tasks: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item == "default":
                tasks.extend(DEFAULT_TASKS)
            elif item:
                tasks.append(item)
    return list(dict.fromkeys(tasks)) or list(DEFAULT_TASKS)


def eval_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`proxsparse_hf.evaluation.evaluate_model` from the command line.

    Raises:
        ValueError: a count below 1, a registered task given as the wrong kind, or nothing to evaluate.
    """
    from ..evaluation import eval_task_names, resolve_eval_task
    from .common import check_numbers, check_text_source

    names = ("eval_seq_len", "eval_batch_size", "max_windows", "zeroshot_limit", "zeroshot_batch_size")
    check_numbers(args, dict.fromkeys(names, ">=1"))
    datasets = [d.strip() for value in args.datasets or [] for d in value.split(",") if d.strip()]
    tasks = resolve_tasks(args.tasks)
    for name in datasets:
        resolve_eval_task(name, "perplexity")
        if name not in eval_task_names("perplexity"):
            check_text_source(name, "--datasets")
    for name in tasks or []:
        resolve_eval_task(name, "zeroshot")
    if not datasets and not tasks:
        raise ValueError("Nothing to evaluate: `--datasets` is empty and no `--tasks` were given.")
    if args.zeroshot_data_dir is not None and not os.path.isdir(args.zeroshot_data_dir):
        raise ValueError(f"`--zeroshot-data-dir`={args.zeroshot_data_dir!r} is not a directory.")
    return {
        "datasets": datasets,
        "seq_len": args.eval_seq_len,
        "batch_size": args.eval_batch_size,
        "max_windows": args.max_windows,
        "bos": args.bos,
        "tasks": tasks,
        "zeroshot_limit": args.zeroshot_limit,
        "zeroshot_batch_size": args.zeroshot_batch_size,
        "zeroshot_data_dir": args.zeroshot_data_dir,
        "skip_unavailable": args.skip_unavailable,
        "show_progress": not args.no_progress,
    }


def default_output(model: str, gguf_file: str | None = None) -> str:
    """Where ``proxsparse eval`` writes without ``--output``: an output folder itself; else a ``<name>-eval`` folder
    beside the local model (beside the ``.gguf`` file), or in the working directory for a Hub id."""
    from ..evaluation import is_output_dir

    if is_output_dir(model):
        return model
    if os.path.exists(model):
        path = os.path.abspath(model).rstrip(os.sep)
        parent, name = os.path.split(path)
        if gguf_file is not None and os.path.isdir(path):
            parent, name = path, gguf_file
    else:
        parent, name = os.getcwd(), (gguf_file or model.rstrip("/").split("/")[-1])
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    return os.path.join(parent, f"{name}{EVAL_DIR_SUFFIX}")


def resolve_output(output: str) -> str:
    """``--output`` → the ``.json`` file to write (a folder gets ``eval_results.json``).

    Raises:
        ValueError: ``output`` is an existing file that is not ``.json``.
    """
    from ..constants import EVAL_RESULTS_NAME

    if output.endswith(".json") and not os.path.isdir(output):
        return output
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"`--output`={output!r} is an existing file; allowed: a .json file or a folder.")
    return os.path.join(output, EVAL_RESULTS_NAME)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate any model or pruned output folder (perplexity, zero-shot) into eval_results.json.",
        description="Measure WikiText-2 / C4 perplexity (and zero-shot accuracy with --tasks) of MODEL and write "
        "eval_results.json: into MODEL when it is a proxsparse output folder, else into a <name>-eval folder beside it "
        "(in the working directory for a Hub id), or to -o/--output. Prints one summary line. Paths, datasets and flags "
        "are checked before the model is loaded.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="Hub id, local model folder, .gguf file, or output folder of learn / prune."
    )
    add_output_args(
        parser,
        required=False,
        overwrite=False,
        help="Where to write: a .json file or a folder (gets eval_results.json). Default: see above.",
    )
    add_model_args(parser)
    add_eval_args(parser)
    add_bos_args(parser, windows="perplexity", eval_alias=True)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..evaluation import evaluate_pretrained
    from .common import check_seq_len, check_writable, inspect_model

    options = eval_kwargs(args)
    output = args.output_dir if args.output_dir is not None else default_output(args.model, args.gguf_file)
    target = resolve_output(output)
    check_writable(os.path.dirname(os.path.abspath(target)), "--output", target=output)
    # the model's config (GGUF metadata, config.json) before any weights: a missing or corrupt model is refused now
    check_seq_len(inspect_model(args), args.eval_seq_len, "--eval-seq-len")
    if args.bos:  # --bos yes needs a BOS token: ask the tokenizer (small) before the model is loaded
        from .. import loading
        from ..data import bos_token_id

        bos_token_id(loading.load_tokenizer(args.model, gguf_file=args.gguf_file, revision=args.revision), True)
    results = evaluate_pretrained(
        args.model, gguf_file=args.gguf_file, revision=args.revision, dtype=args.dtype, device=args.device, **options
    )
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    path = results.save(target)
    logger.info("Wrote %s", path)
    print(f"{results.summary()} -> {path}", flush=True)
    return 0
