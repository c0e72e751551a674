"""The comparison runner: one model, several pruning methods, one evaluation protocol.

:func:`run_comparison` keeps a copy of the model's weights, and for every :class:`MethodRun` restores them, prunes (a
one-shot pruner through :func:`proxsparse_hf.pruners.prune`, a learned method such as ProxSparse through
:func:`proxsparse_hf.learn_mask`) and evaluates with :func:`~proxsparse_hf.evaluation.evaluate_model`, so every row
starts from the same dense weights and sees the same calibration and evaluation data. ``proxsparse compare`` and
``benchmarks/quality.py`` both run it; :func:`save_comparison_report` writes ``comparison.json`` (read back by
:func:`~proxsparse_hf.evaluation.results.load_comparison`), ``comparison.md`` and ``comparison.png``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .results import COMPARISON_NAME, EvalResults, load_comparison, save_comparison

__all__ = [
    "COMPARISON_CHART",
    "COMPARISON_NAME",
    "COMPARISON_TABLE",
    "MASK_SUFFIX",
    "PERMUTE_SUFFIX",
    "MethodRun",
    "comparison_markdown",
    "compare_method_names",
    "load_comparison",
    "needs_calibration",
    "parse_methods",
    "run_comparison",
    "save_comparison_report",
]

logger = logging.getLogger(__name__)

COMPARISON_TABLE = "comparison.md"
COMPARISON_CHART = "comparison.png"
MASK_SUFFIX = "-mask"  # "<pruner>-mask": a weight-updating pruner's mask on the original weights
PERMUTE_SUFFIX = "+perm"  # "<name>+perm": the same run after a channel permutation (proxsparse_hf.permutation)


def _spec(method: str) -> Any:
    from ..pruners import get_pruner

    return get_pruner(method)


def _has_mask_variant(spec: Any) -> bool:
    return spec.updates_weights and "update_weights" in spec.options


@dataclass(frozen=True)
class MethodRun:
    """One row of a comparison.

    Args:
        method: registered pruner name (``proxsparse_hf.pruners.pruner_names()``).
        label: row name (default: the method, ``<method>-mask`` when ``options["update_weights"]`` is False).
        options: the pruner's options (``get_pruner(method).options``); for a learned method, keyword arguments of
            :func:`proxsparse_hf.learn_mask` (``learning_rate``, ``max_steps``, ``distill_alpha``, ...).
        config: ``ProxSparseConfig`` of this run (targets, and the hyper-parameters of a learned method); None: the
            comparison's.
        description: free text, recorded in ``method_config``.
        apply: ``apply(model)`` prunes the model in place instead of the method (e.g. applies masks saved by an
            earlier run); the row is still recorded under ``method``, with ``options`` as its ``method_config``.
        permute: None, or keyword arguments of :func:`proxsparse_hf.permutation.permute_channels` (``importance``:
            ``"auto"`` or absent = :func:`~proxsparse_hf.permutation.permutation_importance_for` the method,
            ``refine``, ``rounds``, ...): the channels are permuted before the method runs; recorded in
            ``method_config["permutation"]``.
    """

    method: str
    label: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    config: Any = None
    description: str = ""
    apply: Callable[[Any], Any] | None = None
    permute: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        _spec(self.method)  # ValueError listing the registered names
        if not isinstance(self.options, Mapping):
            raise ValueError(f"`options`={self.options!r} is invalid; allowed: a mapping of option names to values.")
        if self.label is not None and (not isinstance(self.label, str) or not self.label):
            raise ValueError(f"`label`={self.label!r} is invalid; allowed: None or a non-empty string.")
        if self.apply is not None and not callable(self.apply):
            raise ValueError(f"`apply`={self.apply!r} is invalid; allowed: None or a callable taking the model.")
        if self.permute is not None and not isinstance(self.permute, Mapping):
            raise ValueError(
                f"`permute`={self.permute!r} is invalid; allowed: None or a mapping of permute_channels arguments."
            )

    @property
    def name(self) -> str:
        """The row name (:attr:`label`, or the default one)."""
        if self.label is not None:
            return self.label
        masked = self.options.get("update_weights") is False
        name = f"{self.method}{MASK_SUFFIX}" if masked else self.method
        return f"{name}{PERMUTE_SUFFIX}" if self.permute is not None else name

    def permutation_importance(self, config: Any = None) -> str | None:
        """The importance the channel permutation of this run maximises (None without one)."""
        if self.permute is None:
            return None
        importance = self.permute.get("importance", "auto")
        if importance == "auto":
            from ..permutation import permutation_importance_for

            return permutation_importance_for(self.method, config if config is not None else self.config)
        return importance

    @classmethod
    def from_name(cls, name: str) -> MethodRun:
        """A registered pruner name, ``<pruner>-mask`` for a pruner that updates weights (its mask on the original
        weights, ``update_weights=False``), either followed by ``+perm`` (a channel permutation first)."""
        from ..pruners import pruner_names

        stem = name[: -len(PERMUTE_SUFFIX)] if name.endswith(PERMUTE_SUFFIX) else name
        permute = {} if stem != name else None
        if stem in pruner_names():
            return cls(stem, label=None if permute is None else name, permute=permute)
        base = stem[: -len(MASK_SUFFIX)] if stem.endswith(MASK_SUFFIX) else None
        if base in pruner_names() and _has_mask_variant(_spec(base)):
            return cls(base, label=name, options={"update_weights": False}, permute=permute)
        allowed = compare_method_names(learned=True)
        raise ValueError(
            f"`method`={name!r} is invalid; allowed: {allowed}, each optionally followed by {PERMUTE_SUFFIX!r}."
        )


def compare_method_names(*, learned: bool = False) -> tuple[str, ...]:
    """The names :meth:`MethodRun.from_name` accepts: registered pruners (learned ones only with ``learned``) and the
    ``-mask`` variants of weight-updating ones."""
    from ..pruners import pruner_names

    names: list[str] = []
    for name in pruner_names():
        spec = _spec(name)
        if spec.learned and not learned:
            continue
        names.append(name)
        if _has_mask_variant(spec):
            names.append(f"{name}{MASK_SUFFIX}")
    return tuple(names)


def parse_methods(value: str | Sequence[str], *, learned: bool = False) -> list[MethodRun]:
    """``"dense,wanda,sparsegpt-mask,wanda+perm"`` (or a list of names) → one :class:`MethodRun` each, duplicates
    dropped; a ``+perm`` suffix permutes the channels first.

    Raises:
        ValueError: empty, or a name that is not in :func:`compare_method_names` (the message lists them).
    """
    names = [m.strip() for m in value.split(",")] if isinstance(value, str) else [str(m).strip() for m in value]
    names = list(dict.fromkeys(m for m in names if m))
    allowed = compare_method_names(learned=learned)
    unknown = [m for m in names if m.removesuffix(PERMUTE_SUFFIX) not in allowed]
    if unknown or not names:
        shown = ",".join(value) if not isinstance(value, str) else value
        raise ValueError(
            f"`--methods`={shown!r} is invalid; allowed: a comma-separated subset of {allowed}, each optionally "
            f"followed by {PERMUTE_SUFFIX!r}."
        )
    return [MethodRun.from_name(m) for m in names]


def _uses_calibration(run: MethodRun, config: Any = None) -> bool:
    if run.apply is not None:
        return False
    return _spec(run.method).needs_calibration or run.permutation_importance(config) not in (None, "magnitude")


def needs_calibration(runs: Sequence[MethodRun]) -> bool:
    """Whether any run prunes with a method that reads calibration data."""
    return any(_uses_calibration(run) for run in runs)


def _apply_method(
    model: Any, run: MethodRun, calibration: Any, config: Any, show_progress: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Prune ``model`` in place with ``run``; returns (method_config, telemetry)."""
    from .telemetry import telemetry_entries

    spec = _spec(run.method)
    start = time.perf_counter()
    telemetry: list[dict[str, Any]] = []
    permutation = None
    if run.permute is not None and run.apply is None:
        from ..permutation import permute_channels

        options = {k: v for k, v in run.permute.items() if k != "importance"}
        importance = run.permutation_importance(config)
        report = permute_channels(model, config, importance, calibration, show_progress=show_progress, **options)
        permutation = report.summary()
    if run.apply is not None:
        run.apply(model)
        method_config: dict[str, Any] = dict(run.options)
    elif spec.learned:
        from ..learning.trainer import learn_mask

        options = {"report_to": [], **run.options}
        result = learn_mask(model, calibration, config, **options)
        telemetry = telemetry_entries(getattr(result, "log_history", None) or [])
        method_config = {
            "proxsparse_config": config.to_dict(),
            "training": {k: v for k, v in run.options.items() if k != "report_to"},
        }
    else:
        from ..pruners import prune

        options = {"show_progress": show_progress, **run.options}
        prune(model, run.method, calibration, config, **options)
        method_config = {**spec.defaults, **{k: v for k, v in options.items() if k != "show_progress"}}
    if permutation is not None:
        method_config["permutation"] = permutation
    method_config["prune_time_s"] = time.perf_counter() - start
    if run.description:
        method_config["description"] = run.description
    return method_config, telemetry


def run_comparison(
    model: Any,
    tokenizer: Any,
    runs: Sequence[MethodRun],
    *,
    model_name: str,
    config: Any = None,
    calibration: Any = None,
    calibration_spec: Mapping[str, Any] | None = None,
    revision: str | None = None,
    eval_options: Mapping[str, Any] | None = None,
    on_result: Callable[[EvalResults], None] | None = None,
) -> list[EvalResults]:
    """Prune ``model`` with every run, starting each from the same original weights, and evaluate each the same way.

    Args:
        model, tokenizer: the dense model (pruned in place; its original weights are restored before each run and
            after the last) and its tokenizer.
        runs: the rows, in order (see :func:`parse_methods`); labels must be unique.
        model_name: Hub id or local path of the model (a local path is recorded by its base name).
        config: ``ProxSparseConfig`` (targets) of the runs without their own; default ``"all-linear"``.
        calibration: calibration data (:func:`proxsparse_hf.load_calibration_data`) for the methods that need it.
        calibration_spec: where that data came from, recorded in each such run's ``method_config["calibration"]``.
        revision: the model's revision.
        eval_options: keyword arguments of :func:`~proxsparse_hf.evaluation.evaluate_model` (``datasets``,
            ``seq_len``, ``tasks``, ...).
        on_result: called with each row's results as soon as it is evaluated (e.g. to print or save progress).

    Returns:
        One :class:`EvalResults` per run, labelled with the run's name.

    Raises:
        ValueError: duplicate labels, or calibration data missing for a method that needs it.
    """
    import torch

    from ..config import ProxSparseConfig
    from . import evaluate_model

    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"`runs` has duplicate labels {duplicates}; give each run its own `label`.")
    config = config if config is not None else ProxSparseConfig()
    missing = [
        run.name
        for run in runs
        if _uses_calibration(run, run.config if run.config is not None else config) and calibration is None
    ]
    if missing:
        raise ValueError(f"Run(s) {missing} need calibration data; pass `calibration`.")
    options = dict(eval_options or {})
    show_progress = bool(options.get("show_progress", True))
    original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}

    def restore() -> None:
        with torch.no_grad():
            model.load_state_dict(original)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])

    results: list[EvalResults] = []
    try:
        for run in runs:
            restore()
            run_config = run.config if run.config is not None else config
            logger.info("Comparison: %s", run.name)
            method_config, telemetry = _apply_method(model, run, calibration, run_config, show_progress)
            if _uses_calibration(run, run_config) and calibration_spec is not None:
                method_config["calibration"] = dict(calibration_spec)
            model.eval()
            result = evaluate_model(
                model,
                tokenizer,
                model_name=model_name,
                method=run.method,
                label=run.name,
                method_config=method_config,
                revision=revision,
                config=run_config,
                **options,
            )
            result.telemetry = telemetry
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        restore()
    return results


# ------------------------------------------------------------------------------------------------------ reports
def _cell(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def comparison_markdown(results: Sequence[EvalResults]) -> str:
    """Markdown table: one row per result with its perplexities, zero-shot accuracies, sparsity and times."""
    datasets = list(dict.fromkeys(d for r in results for d in r.perplexity))
    tasks = list(dict.fromkeys(t for r in results for t in r.zeroshot))
    header = ["model", "method", *[f"{d} ppl" for d in datasets], *tasks]
    if tasks:
        header.append("zero-shot mean")
    header += ["target sparsity", "valid 2:4", "prune (s)", "eval (s)"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for r in results:
        cells = [r.label, r.method]
        cells += [_cell(r.ppl(d), ".2f") for d in datasets]
        cells += [_cell(r.zeroshot.get(t, {}).get("acc"), ".4f") for t in tasks]
        if tasks:
            cells.append(_cell(r.zeroshot_mean, ".4f"))
        cells.append(_cell(r.sparsity.get("target_sparsity"), ".2%"))
        cells.append("yes" if r.sparsity.get("all_2to4") else "no")
        cells += [_cell(r.method_config.get("prune_time_s"), ".1f"), _cell(r.wall_time_s, ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    first = next((r.perplexity[d] for r in results for d in datasets if d in r.perplexity), None)
    if first is not None:
        lines += ["", f"Perplexity: {first['num_windows']} windows × {first['seq_len']} tokens per dataset."]
    return "\n".join(lines) + "\n"


def save_comparison_report(
    output: str | os.PathLike,
    results: Sequence[EvalResults],
    *,
    model: str | None = None,
    chart: bool = True,
    title: str | None = None,
    **metadata: Any,
) -> list[str]:
    """Write ``comparison.json`` (:func:`save_comparison`), ``comparison.md`` and, when a perplexity was measured and
    ``chart``, ``comparison.png`` into the folder ``output``; returns the written paths.

    A missing matplotlib only skips the chart (with a warning).
    """
    from ..utils import atomic_write_text
    from .results import portable_name

    output = os.fspath(output)
    if os.path.isfile(output):
        raise ValueError(f"`output`={output!r} is a file; allowed: a folder.")
    os.makedirs(output, exist_ok=True)
    written = [save_comparison(os.path.join(output, COMPARISON_NAME), results, model=model, **metadata)]
    name = portable_name(model) if model else (results[0].model if results else "model")
    heading = title or f"2:4 comparison on `{name}`"
    table = comparison_markdown(results)
    command = metadata.get("command")
    text = f"# {heading}\n\n{table}" + (f"\nCommand: `{command}`\n" if command else "")
    written.append(atomic_write_text(os.path.join(output, COMPARISON_TABLE), text))
    if chart and any(r.perplexity for r in results):
        from .plot import plot_perplexity

        try:
            written.append(plot_perplexity(results, os.path.join(output, COMPARISON_CHART)))
        except RuntimeError as exc:
            logger.warning("No chart: %s", exc)
    return written
