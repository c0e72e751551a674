"""Arguments and checks shared by the ``proxsparse`` sub-commands.

One convention on every command: ``-o/--output-dir`` (alias ``--output``) is what it writes; ``--dataset`` (alias
``--calibration``) with ``--doc-start``/``--doc-stop`` is the calibration text; ``--target-modules`` takes module names
separated by spaces or commas, or one regex; ``--bos auto|yes|no`` (aliases ``--no-bos``, ``--eval-bos``) decides the BOS
token of every window; ``--dtype`` defaults to float32.

Every check that needs no model weights runs before anything is loaded or written: the output folder
(:func:`check_output_dir`), data files (:func:`check_text_source`), the model's config and the target match on its
meta-device skeleton (:func:`inspect_model`), sequence lengths (:func:`check_seq_len`) and numeric flags
(:func:`check_numbers`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import sys
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_DTYPE = "float32"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_CALIBRATION = "c4"
BOS_CHOICES = {"auto": None, "yes": True, "no": False}
DEFAULT_ARTEFACT = "dense"  # export and push: a plain transformers checkpoint, loadable without proxsparse-hf

_NAME = re.compile(r"[\w.\-]+")  # a module name or dotted suffix (anything else is read as a regex)


# ------------------------------------------------------------------------------------------------------- arguments
def add_output_args(parser: argparse.ArgumentParser, *, required: bool, help: str, overwrite: bool = True) -> None:
    """``-o/--output-dir/--output`` (dest ``output_dir``) and, when ``overwrite``, ``--overwrite``."""
    parser.add_argument(
        "-o", "--output-dir", "--output", dest="output_dir", metavar="PATH", required=required, help=help
    )
    if overwrite:
        parser.add_argument(
            "--overwrite",
            action="store_true",
            help="Replace a non-empty output folder (the old one is removed only once the new one is complete).",
        )


def add_artefact_arg(parser: argparse.ArgumentParser) -> None:
    """``--artefact`` of ``export`` and ``push`` (the same default on both)."""
    from ..artefacts import artefact_names

    parser.add_argument(
        "--artefact",
        default=DEFAULT_ARTEFACT,
        choices=artefact_names(),
        help=f"What to write (default {DEFAULT_ARTEFACT}, the same on export and push): 'dense' (plain transformers "
        "checkpoint with zeros, loads anywhere), 'compact' (kept values + packed 2:4 positions, smaller; "
        "loaded by proxsparse_hf.load_pruned) or 'mask' (mask-only adapter applied to the base model).",
    )


def add_model_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--gguf-file``, ``--revision``, ``--dtype``, ``--device`` (returns the group)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--gguf-file", default=None, help="GGUF file name inside MODEL (a path to a .gguf file works as MODEL too)."
    )
    group.add_argument("--revision", default=None, help="Hub revision of MODEL (branch, tag or commit).")
    group.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=DTYPE_CHOICES,
        help=f"Dtype the weights are loaded in (default {DEFAULT_DTYPE}, the same on learn, prune, eval and compare: "
        "exact masks and perplexities; 'auto' keeps the checkpoint's dtype, bfloat16/float16 halve the memory).",
    )
    group.add_argument(
        "--device", default=None, help="Device to run on, e.g. cuda, cuda:1 or cpu (default: where the model loads)."
    )
    return group


def add_target_args(parser: argparse.ArgumentParser, *, default_help: str) -> None:
    """``--target-modules``, ``--exclude-modules`` (names separated by spaces or commas, or one regex)."""
    group = parser.add_argument_group("targets")
    group.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="Modules to make 2:4: 'all-linear' (every Linear/Conv1D of the decoder blocks), module-name suffixes "
        f"separated by spaces or commas ('q_proj v_proj' or 'q_proj,v_proj'), or one regex of full names. {default_help}",
    )
    group.add_argument(
        "--exclude-modules",
        nargs="+",
        default=None,
        metavar="MODULE",
        help="Modules to leave dense (same rules as --target-modules).",
    )


class _BosAction(argparse.Action):
    """``--bos auto|yes|no``, ``--no-bos`` (= ``--bos no``) and ``--eval-bos`` (= ``--bos``): all set ``bos`` to
    None / True / False; ``no_bos`` (True for ``no``) is kept for scripts that read it."""

    def __call__(self, parser, namespace, values, option_string=None):
        choice = "no" if option_string == "--no-bos" else values
        namespace.bos = BOS_CHOICES[choice]
        namespace.no_bos = namespace.bos is False


def add_bos_args(parser: argparse._ActionsContainer, *, windows: str, eval_alias: bool = False) -> None:
    """``--bos auto|yes|no`` with its aliases ``--no-bos`` and (``eval_alias``) ``--eval-bos`` (``parser``: a parser or
    an argument group)."""
    parser.add_argument(
        "--bos",
        choices=list(BOS_CHOICES),
        action=_BosAction,
        default=None,
        help=f"Start every {windows} window with the BOS token: auto (default) = when the tokenizer adds one "
        "(Llama, Mistral, Gemma, ...), yes, or no.",
    )
    parser.add_argument("--no-bos", nargs=0, action=_BosAction, default=None, help="Same as --bos no.")
    if eval_alias:
        parser.add_argument(
            "--eval-bos", choices=list(BOS_CHOICES), action=_BosAction, default=None, help="Same as --bos."
        )
    parser.set_defaults(no_bos=False)


def add_calibration_args(
    parser: argparse.ArgumentParser, *, required: bool, n_samples: int, seq_len: int, title: str
) -> argparse._ArgumentGroup:
    """Where the calibration windows come from and how many (returns the group, for command-specific additions)."""
    from ..data import C4_EVAL_DOCS, CALIBRATION_DOCS

    group = parser.add_argument_group(title)
    group.add_argument(
        "--dataset",
        "--calibration",
        dest="dataset",
        required=required,
        default=None if required else DEFAULT_CALIBRATION,
        metavar="DATASET",
        help="Calibration text: 'c4' (the local C4 sample, documents "
        f"[{CALIBRATION_DOCS[0]}, {CALIBRATION_DOCS[1]}); else allenai/c4 from the Hub), 'enwiki' (the local "
        "Wikipedia sample, streamed), a local .txt/.jsonl file or folder (optionally .xz/.gz/.bz2/.zst-compressed, "
        "then streamed), or a Hub dataset id (streamed)" + ("." if required else f". Default {DEFAULT_CALIBRATION}."),
    )
    group.add_argument(
        "--dataset-config",
        "--calibration-config",
        dest="dataset_config",
        default=None,
        help="Hub dataset configuration.",
    )
    group.add_argument(
        "--split", "--calibration-split", dest="split", default="train", help="Split of a Hub dataset (default train)."
    )
    group.add_argument(
        "--doc-start",
        "--calibration-start",
        dest="doc_start",
        type=int,
        default=0,
        help="First calibration document (default 0).",
    )
    group.add_argument(
        "--doc-stop",
        "--calibration-stop",
        dest="doc_stop",
        type=int,
        default=None,
        help=f"One past the last calibration document (default: {CALIBRATION_DOCS[1]} for the C4 sample, whose "
        f"documents [{C4_EVAL_DOCS[0]}, {C4_EVAL_DOCS[1]}) are reserved for evaluation; else all).",
    )
    group.add_argument("--text-field", default="text", help="Field of JSON records holding the text (default text).")
    group.add_argument("--n-samples", type=int, default=n_samples, help=f"Calibration windows (default {n_samples}).")
    group.add_argument(
        "--seq-len", type=int, default=seq_len, help=f"Tokens per calibration window (default {seq_len})."
    )
    return group


PERMUTE_CHOICES = ("auto", "yes", "no")


def add_permutation_args(parser: argparse.ArgumentParser, default: str = "no") -> None:
    """``--permute {auto,yes,no}`` / ``--no-permute`` and ``--permute-importance`` of ``prune`` and ``learn``
    (``default``: ``"auto"`` for ``learn``, ``"no"`` for ``prune``, whose baselines run as their authors do)."""
    from ..permutation.search import PERMUTATION_IMPORTANCES

    group = parser.add_argument_group("channel permutation")
    group.add_argument(
        "--permute",
        nargs="?",
        const="yes",
        default=default,
        choices=PERMUTE_CHOICES,
        help="Before the mask is found, permute the input channels of every o_proj and down_proj target so that more "
        "importance falls inside the 2:4 groups, folded into v_proj / gate_proj + up_proj: the dense model computes "
        "the same and the output is a plain checkpoint. yes (or --permute alone): Llama, Mistral, Qwen2, else an "
        "error; auto: wherever the architecture allows it in a single-process run; no: keep the checkpoint's order. "
        f"A mask-only adapter carries the permutation and replays it on the base model. Default: {default}.",
    )
    group.add_argument("--no-permute", dest="permute", action="store_const", const="no", help="Same as --permute no.")
    group.add_argument(
        "--permute-importance",
        default=None,
        choices=["auto", *PERMUTATION_IMPORTANCES],
        help="What the permutation maximises: auto (default) = the score the method itself uses (|W| without "
        "calibration data, |W|·‖X‖ with it, the RIA score for ria, the config's importance for learn), or one of "
        f"{', '.join(PERMUTATION_IMPORTANCES)}.",
    )


def permutation_importance(args: argparse.Namespace, method: str, config: Any) -> str | None:
    """The importance a permutation before ``method`` maximises (None with ``--permute no``); with ``--permute auto``
    :func:`resolve_permutation` still decides, from the model's config, whether it runs.

    Raises:
        ValueError: ``--permute-importance`` with ``--permute no``.
    """
    from ..permutation import permutation_importance_for

    choice = getattr(args, "permute_importance", None)
    if getattr(args, "permute", "no") == "no":
        if choice is not None:
            raise ValueError(f"`--permute-importance`={choice!r} needs `--permute` (yes or auto).")
        return None
    return permutation_importance_for(method, config) if choice in (None, "auto") else choice


def resolve_permutation(args: argparse.Namespace, importance: str | None, model_config: Any) -> str | None:
    """Whether the run permutes, from the model's config (before any weight is loaded): ``importance`` or None.
    ``--permute yes`` refuses an unsupported architecture; ``auto`` skips it (and multi-process or ``--fsdp`` runs,
    where every rank would search on its own), saying so at INFO level.

    Raises:
        ValueError: ``--permute yes`` and a model type the permutation does not support.
    """
    from ..permutation import SUPPORTED_ARCHITECTURES, check_permutable

    if importance is None:
        return None
    if getattr(args, "permute", "no") == "yes":
        check_permutable(model_config)
        return importance
    from ..learning.distributed import world_size

    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        logger.info(
            "--permute auto: no channel permutation for model_type=%r (supported: %s).",
            model_type,
            ", ".join(SUPPORTED_ARCHITECTURES),
        )
        return None
    if getattr(args, "fsdp", False) or world_size() > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logger.info("--permute auto: no channel permutation in a sharded or multi-process run.")
        return None
    return importance


def permutes_loaded_model(args: argparse.Namespace, model: Any, config: Any, importance: str | None) -> str | None:
    """``importance`` (from :func:`resolve_permutation`) after the one check that needs the loaded model: with
    ``--permute auto``, None when no target is an ``o_proj`` / ``down_proj``."""
    if importance is None or getattr(args, "permute", "no") != "auto":
        return importance
    from ..permutation import permutable_layers

    if not permutable_layers(model, config):
        logger.info("--permute auto: none of the targets is an o_proj / down_proj; no channel permutation.")
        return None
    return importance


def permute_loaded_model(
    args: argparse.Namespace,
    model: Any,
    config: Any,
    importance: str | None,
    calibration: Any,
    *,
    show_progress: bool = False,
) -> Any:
    """Permute the channels of the loaded dense ``model`` when :func:`resolve_permutation` and
    :func:`permutes_loaded_model` say so; returns the ``PermutationReport`` (None when nothing was permuted)."""
    importance = permutes_loaded_model(args, model, config, importance)
    if importance is None:
        return None
    from ..permutation import permute_channels

    return permute_channels(
        model,
        config,
        importance=importance,
        calibration=calibration,
        batch_size=args.batch_size,
        show_progress=show_progress,
    )


# ------------------------------------------------------------------------------------------------------- parsing
def parse_target_modules(values: str | list[str] | None, flag: str = "--target-modules") -> str | list[str] | None:
    """``--target-modules`` values → what ``ProxSparseConfig`` takes: ``"all-linear"``, a list of name suffixes (values
    split at spaces and commas), or one regex string.

    Raises:
        ValueError: a regex or ``all-linear`` given together with other values, or no name at all.
    """
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if len(values) == 1 and values[0].strip() == "all-linear":
        return "all-linear"
    names: list[str] = []
    for value in values:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if parts and all(_NAME.fullmatch(p) for p in parts) and "all-linear" not in parts:
            names.extend(parts)
        elif len(values) == 1 and value.strip():
            return value.strip()  # one regex (may contain commas, e.g. a {1,3} quantifier)
        else:
            raise ValueError(
                f"`{flag}`={' '.join(values)!r} is invalid; allowed: 'all-linear', module-name suffixes separated by "
                "spaces or commas, or one regex on its own."
            )
    return names


def bos_option(args: argparse.Namespace) -> bool | None:
    """The ``--bos`` choice: None (follow the tokenizer), True or False."""
    return getattr(args, "bos", None)


def command_line(args: argparse.Namespace) -> str:
    """The command line that ran (``main(argv)``'s ``argv`` when given, else ``sys.argv``)."""
    argv = getattr(args, "_argv", None)
    return shlex.join(["proxsparse", *(sys.argv[1:] if argv is None else argv)])


# -------------------------------------------------------------------------------------------------------- checks
def check_numbers(args: argparse.Namespace, rules: dict[str, str]) -> None:
    """Refuse a numeric flag outside its range: ``rules`` maps a dest to ``">=1"``, ``">=0"``, ``">0"``, ``"[0,1]"`` or
    ``"[0,1)"`` (every value must also be finite; None values are skipped).

    Raises:
        ValueError: names the flag, the value and what is allowed.
    """
    tests = {
        ">=1": (lambda v: v >= 1, "an integer >= 1"),
        ">=0": (lambda v: v >= 0, "a finite number >= 0"),
        ">0": (lambda v: v > 0, "a finite number > 0"),
        "[0,1]": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
        "[0,1)": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    }
    for dest, rule in rules.items():
        value = getattr(args, dest, None)
        test, allowed = tests[rule]
        if value is not None and not (math.isfinite(value) and test(value)):
            raise ValueError(f"`--{dest.replace('_', '-')}`={value} is invalid; allowed: {allowed}.")


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable(path: str, flag: str, *, target: str | None = None) -> None:
    """Refuse a folder ``path`` that cannot be created or written: its nearest existing folder must be writable
    (``target``: what the flag names, for the message; default ``path``).

    Raises:
        ValueError: a file stands where a folder is needed.
        PermissionError: no write permission.
    """
    target = path if target is None else target
    existing = _nearest_existing(os.path.abspath(path))
    if not os.path.isdir(existing):
        raise ValueError(f"`{flag}`={target!r} cannot be created: {existing!r} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"`{flag}`={target!r} cannot be written: no write permission in {existing!r}.")


def check_output_dir(path: str, *, overwrite: bool, flag: str = "--output-dir") -> str:
    """The absolute output folder, after checking it can be written as a whole (the folder is built beside it and
    swapped in, so its parent must be writable).

    Raises:
        ValueError: a file or a symbolic link.
        FileExistsError: a non-empty folder without ``--overwrite``.
        PermissionError: the folder cannot be written.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.islink(path):
        raise ValueError(f"`{flag}`={path!r} is a symbolic link; allowed: a folder path.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{flag}`={path!r} is a file; allowed: a folder.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"`{flag}`={path!r} exists and is not empty; pass --overwrite to replace it.")
    check_writable(os.path.dirname(path), flag, target=path)
    return path


def _looks_local(source: str) -> bool:
    """A string that can only be a local path: absolute, relative with ./ or ~, a data-file name, or more than one '/'
    (a Hub id is ``name`` or ``org/name``)."""
    from ..data import _file_kind

    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
        or _file_kind(source) is not None
    )


def check_text_source(source: str, flag: str) -> None:
    """Refuse a text source that cannot be read: a local-looking path that does not exist, an empty file, a folder
    without data files, an unsupported file type. Short corpus names and Hub ids pass.

    Raises:
        FileNotFoundError: a missing local path.
        ValueError: an empty file, or nothing the readers can read.
    """
    from ..data import CORPORA, iter_texts

    source = os.fspath(source)
    if os.path.exists(source):
        if os.path.isfile(source) and os.path.getsize(source) == 0:
            raise ValueError(f"`{flag}`={source!r} is an empty file.")
        try:
            iter_texts(source)  # checks the file type / the folder's files without reading them
        except ValueError as exc:
            raise ValueError(f"`{flag}`={source!r}: {exc}") from exc
    elif _looks_local(source):
        raise FileNotFoundError(
            f"`{flag}`={source!r} does not exist; allowed: {', '.join(sorted(CORPORA))}, a local .txt/.jsonl file or "
            "folder, or a Hub dataset id."
        )


def check_model_source(model: str, gguf_file: str | None = None) -> None:
    """Refuse a MODEL that can only be a local path and does not exist (and a ``--gguf-file`` missing from it).

    Raises:
        FileNotFoundError: one line naming the missing path.
    """
    from ..evaluation import check_model_path

    check_model_path(model)
    if gguf_file is not None and os.path.isdir(model) and not os.path.isfile(os.path.join(model, gguf_file)):
        raise FileNotFoundError(f"`--gguf-file`={gguf_file!r} does not exist in {model!r}.")


def inspect_model(args: argparse.Namespace, targets_config: Any = None) -> Any:
    """The model's config (``config.json`` or GGUF metadata; no weights), after checking that the targets of
    ``targets_config`` (a ``ProxSparseConfig``) match on the model's meta-device skeleton.

    Raises:
        FileNotFoundError: the model does not exist or cannot be read.
        ValueError: an unreadable GGUF file, no target matched, or a target whose input dimension is not divisible by 4.
    """
    from ..loading import empty_model, load_config
    from ..targets import find_targets

    check_model_source(args.model, args.gguf_file)
    config = load_config(args.model, gguf_file=args.gguf_file, revision=args.revision)
    if targets_config is not None:
        find_targets(empty_model(config), targets_config)
    return config


def check_seq_len(config: Any, seq_len: int | None, flag: str = "--seq-len") -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``).

    Raises:
        ValueError: names the flag, the value and the model's limit.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"`{flag}`={seq_len} exceeds the model's max_position_embeddings={limit}.")


def resolve_calibration(args: argparse.Namespace) -> Any:
    """The calibration :class:`~proxsparse_hf.data.DocumentRange` of ``--dataset`` / ``--doc-start`` / ``--doc-stop``.

    Raises:
        FileNotFoundError: a missing local file.
        ValueError: an unreadable source, a bad range, or documents reserved for evaluation.
    """
    from ..data import resolve_document_range

    check_text_source(args.dataset, "--dataset")
    return resolve_document_range(
        args.dataset, args.doc_start, args.doc_stop, purpose="calibration", split=args.split, name=args.dataset_config
    )


def load_calibration(args: argparse.Namespace, documents: Any, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """The calibration windows (tokenizer only: run before the model is loaded, so too little text fails early) and
    their description for ``run_info.json``.

    Raises:
        ValueError: too little text for ``--n-samples`` windows of ``--seq-len`` tokens, or a bad ``--bos``.
    """
    from ..data import load_calibration_data

    data = load_calibration_data(
        documents,
        tokenizer,
        seq_len=args.seq_len,
        n_samples=args.n_samples,
        seed=args.seed,
        text_field=args.text_field,
        bos=bos_option(args),
    )
    info = {
        "dataset": os.fspath(args.dataset),
        "source": documents.source,
        "name": documents.name,
        "split": documents.split or args.split,
        "documents": [documents.start, documents.stop],
        "text_field": args.text_field,
        "n_samples": args.n_samples,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "tokens": data.num_tokens,
        "bos": data.bos,
        "streaming": data.streaming,
    }
    return data, info
