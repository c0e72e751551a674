"""``proxsparse prune MODEL --method NAME``: any registered one-shot 2:4 method → standard output folder.

The method names, their descriptions and their options come from the pruner registry
(:mod:`proxsparse_hf.pruners.registry`): a method's options become flags (``damp_percent`` → ``--damp-percent``, a
boolean option that defaults to True → ``--no-<name>``). Also holds the calibration and method-option arguments shared
with ``compare``; the other shared arguments and the checks run before a model is loaded are in :mod:`.common`.
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
import time
from typing import Any

from .common import (
    add_bos_args,
    add_model_args,
    add_output_args,
    add_permutation_args,
    add_target_args,
    command_line,
    parse_target_modules,
)
from .common import add_calibration_args as _add_calibration_group

logger = logging.getLogger(__name__)

__all__ = [
    "add_calibration_args",
    "add_method_option_args",
    "add_model_args",
    "add_target_args",
    "check_method_flags",
    "method_option_flags",
    "method_options",
    "parse_target_modules",
]


def add_calibration_args(parser: argparse.ArgumentParser, *, windows: str = "calibration") -> None:
    """Calibration data options (used by the methods that need calibration), ``--bos``, and the value options of every
    registered method (``--damp-percent``, ``--block-size``, ...; see :func:`add_method_option_args`)."""
    from ..pruners import get_pruner, pruner_names

    users = [n for n in pruner_names() if get_pruner(n).needs_calibration and not get_pruner(n).learned]
    group = _add_calibration_group(
        parser, required=False, n_samples=128, seq_len=2048, title=f"calibration data ({', '.join(users)})"
    )
    group.add_argument("--seed", type=int, default=0, help="Seed for shuffling the calibration documents (default 0).")
    group.add_argument("--batch-size", type=int, default=1, help="Calibration windows per forward pass (default 1).")
    add_bos_args(group, windows=windows, eval_alias=windows != "calibration")
    add_method_option_args(parser, switches=False)


def _option_flag(name: str, default: Any) -> str:
    dashed = name.replace("_", "-")
    return f"--no-{dashed}" if default is True else f"--{dashed}"


def method_option_flags() -> dict[str, tuple[str, list[str]]]:
    """``{option: (flag, [methods declaring it])}`` over every registered method, in registration order."""
    from ..pruners import get_pruner, pruner_names

    flags: dict[str, tuple[str, list[str]]] = {}
    for method in pruner_names():
        for name, option in get_pruner(method).options.items():
            flag = flags.setdefault(name, (_option_flag(name, option.default), []))
            flag[1].append(method)
    return flags


def add_method_option_args(parser: argparse.ArgumentParser, *, switches: bool) -> None:
    """One flag per option declared in the pruner registry (``dest`` = the option name, default None = the method's
    default): value options (``--damp-percent 0.02``) when ``switches`` is False, boolean switches
    (``--no-update-weights``) when True."""
    from ..pruners import get_pruner

    group = None
    for name, (flag, methods) in method_option_flags().items():
        option = get_pruner(methods[0]).options[name]
        if isinstance(option.default, bool) != switches:
            continue
        if group is None:
            group = parser.add_argument_group("method switches" if switches else "method options")
        where = "; ".join(f"{m}: default {get_pruner(m).options[name].default!r}" for m in methods)
        text = f"{option.help} ({where})" if option.help else f"({where})"
        if switches:
            text = f"Sets {name}={not option.default!r}. {text}"
            group.add_argument(
                flag, dest=name, action="store_const", const=not option.default, default=None, help=text
            )
        else:
            default = option.default
            kind = float if isinstance(default, float) else int if isinstance(default, int) else str
            group.add_argument(flag, dest=name, type=kind, default=None, help=text)


def method_options(method: str, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """Options for :func:`proxsparse_hf.pruners.prune` from the command line: ``batch_size`` and ``show_progress``, plus
    every option ``method`` declares — from ``overrides`` (ignored where ``method`` does not declare them), else from
    its flag, else its registered default."""
    from ..pruners import get_pruner

    opts: dict[str, Any] = {"batch_size": args.batch_size, "show_progress": not getattr(args, "no_progress", False)}
    for name, option in get_pruner(method).options.items():
        value = overrides[name] if name in overrides else getattr(args, name, None)
        opts[name] = option.default if value is None else value
    return opts


def check_method_flags(method: str, args: argparse.Namespace) -> None:
    """Refuse a method option flag given for a method that does not declare it.

    Raises:
        ValueError: e.g. ``--no-update-weights`` with ``--method wanda``.
    """
    for name, (flag, methods) in method_option_flags().items():
        if method not in methods and getattr(args, name, None) is not None:
            raise ValueError(f"{flag} only applies to --method {' / '.join(methods)}, not {method!r}.")


def _methods_epilog(names: list[str]) -> str:
    from ..pruners import get_pruner

    lines = ["methods:"]
    for name in names:
        spec = get_pruner(name)
        text = f"{name:<12} {spec.label}: {spec.description}"
        lines += textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent=" " * 15)
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..pruners import get_pruner, pruner_names

    names = [n for n in pruner_names() if not get_pruner(n).learned]
    learned = [n for n in pruner_names() if get_pruner(n).learned]
    parser = subparsers.add_parser(
        "prune",
        help=f"Prune a model to 2:4 with a one-shot method ({', '.join(get_pruner(n).label for n in names)}).",
        description="Prune MODEL to 2:4 with a one-shot method and write the standard output folder (pruned model, "
        "tokenizer, proxsparse_config.json, masks, sparsity_report.json, run_info.json); prints a JSON summary line. "
        "Everything that needs no weights (paths, output folder, calibration data and its token count, target match, "
        "method options) is checked before the model is loaded."
        + (f" Learned methods ({', '.join(learned)}): use `proxsparse learn`." if learned else ""),
        epilog=_methods_epilog(names),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="Hub id, local folder, or path to a .gguf file.")
    parser.add_argument("--method", required=True, choices=names, help="Pruning method (listed below).")
    add_output_args(parser, required=True, help="Output folder (must be empty unless --overwrite).")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    add_model_args(parser)
    add_target_args(parser, default_help="Default all-linear.")
    add_calibration_args(parser)
    add_method_option_args(parser, switches=True)
    add_permutation_args(parser)
    return parser


def prune_config(args: argparse.Namespace) -> Any:
    """The ``ProxSparseConfig`` recording the target selection of ``prune`` / ``compare``."""
    from ..config import ProxSparseConfig

    targets = {
        "target_modules": parse_target_modules(args.target_modules),
        "exclude_modules": parse_target_modules(args.exclude_modules, "--exclude-modules"),
    }
    return ProxSparseConfig(
        **{k: v for k, v in targets.items() if v is not None},
        base_model_name_or_path=args.model,
        revision=args.revision,
    )


def run(args: argparse.Namespace) -> int:
    from .. import loading
    from ..artefacts import save_pruned_output
    from ..pruners import get_pruner, prune
    from .common import (
        check_numbers,
        check_output_dir,
        check_seq_len,
        inspect_model,
        load_calibration,
        permutation_importance,
        permute_loaded_model,
        resolve_calibration,
        resolve_permutation,
    )

    # every check that needs no weights, before anything is loaded or written
    start = time.perf_counter()
    spec = get_pruner(args.method)
    check_method_flags(args.method, args)
    options = method_options(args.method, args)
    spec.resolve_options({k: v for k, v in options.items() if k in spec.options})
    check_numbers(args, {"n_samples": ">=1", "seq_len": ">=1", "batch_size": ">=1"})
    out = check_output_dir(args.output_dir, overwrite=args.overwrite)
    config = prune_config(args)
    permute = permutation_importance(args, args.method, config)
    needs_calibration = spec.needs_calibration or permute not in (None, "magnitude")
    documents = resolve_calibration(args) if needs_calibration else None
    model_config = inspect_model(args, config)
    permute = resolve_permutation(args, permute, model_config)
    needs_calibration = spec.needs_calibration or permute not in (None, "magnitude")
    source = {"gguf_file": args.gguf_file, "revision": args.revision}
    tokenizer = loading.load_tokenizer(args.model, **source)
    calibration, calibration_info = None, None
    if needs_calibration:
        check_seq_len(model_config, args.seq_len)
        calibration, calibration_info = load_calibration(args, documents, tokenizer)

    model = loading.load_model(args.model, config=model_config, dtype=args.dtype, device=args.device, **source)
    config.revision = args.revision or loading.model_revision(model)
    prune_start = time.perf_counter()
    permutation = permute_loaded_model(args, model, config, permute, calibration, show_progress=not args.no_progress)
    masks = prune(model, args.method, calibration, config, **options)
    prune_time = time.perf_counter() - prune_start
    run_info = {
        "calibration": calibration_info,
        "method_config": {k: v for k, v in options.items() if k != "show_progress"},
        "permutation": None if permutation is None else permutation.summary(),
        "prune_time_s": prune_time,
        "wall_time_s": time.perf_counter() - start,
        "command": command_line(args),
    }
    output = save_pruned_output(
        out,
        model,
        tokenizer,
        config=config,
        masks=masks,
        method=args.method,
        run_info=run_info,
        overwrite=args.overwrite,
        permutation=None if permutation is None else permutation.index_maps,
    )
    report = output.report
    summary = {
        "output_dir": out,
        "method": args.method,
        "target_layers": len(report.layers),
        "layers_2to4": report.num_2to4_layers,
        "target_sparsity": round(report.target_sparsity, 4),
        "overall_sparsity": round(report.overall_sparsity, 4),
        "permuted_layers": len(permutation.layers) if permutation else 0,
        "prune_time_s": round(prune_time, 1),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0
