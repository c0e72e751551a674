"""Evaluation of dense and pruned models: perplexity (WikiText-2, C4), zero-shot accuracy (lm-evaluation-harness),
the :class:`EvalResults` schema, the task registry, the comparison runner and the charts.

* :func:`evaluate_model` evaluates one in-memory model on registered (or ad-hoc) tasks and returns an
  :class:`EvalResults` (``results.py``, saved as ``eval_results.json``); :func:`evaluate_pretrained` loads any model
  (Hub id, local folder, ``.gguf`` file, proxsparse output folder) and evaluates it.
* ``tasks.py``: :func:`register_eval_task` adds a perplexity dataset or zero-shot task by name.
* ``compare.py``: :func:`run_comparison` prunes one model with several methods and evaluates each the same way (used by
  ``proxsparse compare`` and ``benchmarks/quality.py``); :func:`load_comparison` reads any comparison file.
* ``plot.py``: the perplexity bar chart and the training-telemetry figure.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..data import find_assets_dir
from .perplexity import (
    PERPLEXITY_DATASETS,
    PerplexityDataset,
    evaluate_perplexity,
    model_max_length,
    perplexity,
    resolve_dataset,
)
from .results import EvalResults, load_comparison, portable_name, save_comparison, sparsity_totals
from .tasks import EvalTask, eval_task_names, get_eval_task, register_eval_task, resolve_eval_task
from .zeroshot import DEFAULT_TASKS, LOCAL_TASK_FILES, zeroshot_eval

__all__ = [
    "DEFAULT_TASKS",
    "LOCAL_TASK_FILES",
    "PERPLEXITY_DATASETS",
    "EvalResults",
    "EvalTask",
    "PerplexityDataset",
    "check_model_path",
    "eval_task_names",
    "evaluate_model",
    "evaluate_perplexity",
    "evaluate_pretrained",
    "find_assets_dir",
    "get_eval_task",
    "is_output_dir",
    "load_comparison",
    "model_load_error",
    "model_max_length",
    "perplexity",
    "portable_name",
    "register_eval_task",
    "resolve_dataset",
    "resolve_eval_task",
    "save_comparison",
    "sparsity_totals",
    "zeroshot_eval",
]


def run_tasks(
    model: Any, tokenizer: Any, names: Sequence[str], kind: str, options: Mapping[str, Any]
) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """Evaluate ``names`` as ``kind`` tasks; tasks sharing a function run in one call. Returns ``({name: entry},
    packages to record)``."""
    groups: dict[int, tuple[EvalTask, list[str]]] = {}
    for name in dict.fromkeys(names):
        task = resolve_eval_task(name, kind)
        groups.setdefault(id(task.fn), (task, []))[1].append(name)
    entries: dict[str, dict[str, Any]] = {}
    packages: set[str] = set()
    for task, group in groups.values():
        out = task.fn(model, tokenizer, group, **options)
        if not isinstance(out, Mapping):
            raise ValueError(f"Task {task.name!r} returned {type(out).__name__}; allowed: a dict {{name: entry}}.")
        entries.update(out)
        packages.update(task.packages)
    return entries, packages


def _package_versions(packages: set[str]) -> dict[str, str]:
    versions = {}
    for package in sorted(packages):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def evaluate_model(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    method: str = "dense",
    label: str | None = None,
    method_config: dict[str, Any] | None = None,
    revision: str | None = None,
    config: Any = None,
    datasets: Sequence[str] = ("wikitext2", "c4"),
    seq_len: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    bos: bool | None = None,
    tasks: Sequence[str] | None = None,
    zeroshot_limit: int | None = None,
    zeroshot_batch_size: int = 1,
    zeroshot_data_dir: str | None = None,
    skip_unavailable: bool = False,
    show_progress: bool = True,
) -> EvalResults:
    """Perplexity on ``datasets`` and (when ``tasks`` is given) zero-shot accuracy of an in-memory model.

    Args:
        model, tokenizer: the model (on its evaluation device) and tokenizer.
        model_name: Hub id or local path of the model; a local path is recorded by its base name.
        method: registered pruner name (``proxsparse_hf.pruners.pruner_names()``; ``dense`` = not pruned).
        label: row name (default: see :class:`EvalResults`).
        method_config: the method's settings, recorded as is.
        revision: model revision, when known.
        config: ``ProxSparseConfig`` whose targets define the sparsity totals (default ``"all-linear"``).
        datasets: perplexity tasks: registered names (``eval_task_names("perplexity")``), local files or Hub dataset
            ids (empty: none).
        seq_len, batch_size, max_windows, bos: perplexity options (see :func:`perplexity`; ``bos=None`` follows the
            tokenizer).
        tasks: zero-shot tasks: registered names or lm-eval task names (None or empty: no zero-shot evaluation).
        zeroshot_limit, zeroshot_batch_size, zeroshot_data_dir, skip_unavailable: see :func:`zeroshot_eval`.
        show_progress: progress bars.

    Raises:
        ValueError: a perplexity name is a registered zero-shot task or the other way round, or bad options.
    """
    from ..utils import describe_hardware, library_versions

    if isinstance(datasets, str):
        datasets = [datasets]
    if isinstance(tasks, str):
        tasks = [tasks]
    start = time.perf_counter()
    ppl_options = {
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_windows": max_windows,
        "bos": bos,
        "show_progress": show_progress,
    }
    ppl, packages = run_tasks(model, tokenizer, list(datasets or []), "perplexity", ppl_options)
    zeroshot: dict[str, dict[str, Any]] = {}
    if tasks:
        zs_options = {
            "limit": zeroshot_limit,
            "batch_size": zeroshot_batch_size,
            "data_dir": zeroshot_data_dir,
            "skip_unavailable": skip_unavailable,
        }
        zeroshot, zs_packages = run_tasks(model, tokenizer, list(tasks), "zeroshot", zs_options)
        packages |= zs_packages
    settings: dict[str, Any] = {
        "datasets": list(datasets or []),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_windows": max_windows,
    }
    used = {entry["bos"] for entry in ppl.values() if "bos" in entry}
    settings["bos"] = used.pop() if len(used) == 1 else bos
    if tasks:
        settings.update(tasks=list(tasks), zeroshot_limit=zeroshot_limit, num_fewshot=0)
    return EvalResults(
        model=portable_name(model_name),
        method=method,
        label=label,
        revision=revision,
        method_config=dict(method_config or {}),
        settings=settings,
        perplexity=ppl,
        zeroshot=zeroshot,
        sparsity=sparsity_totals(model, config),
        hardware=describe_hardware(),
        versions={**library_versions(), **_package_versions(packages)},
        wall_time_s=time.perf_counter() - start,
    )


def _looks_local(name_or_path: str) -> bool:
    """A string that can only be a local path (a Hub id is ``name`` or ``org/name``)."""
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.endswith(".gguf")
        or name_or_path.count("/") > 1
        or os.sep != "/"
        and os.sep in name_or_path
    )


def check_model_path(name_or_path: str) -> None:
    """Refuse a model argument that can only be a local path and does not exist.

    Raises:
        ValueError: not a non-empty string.
        FileNotFoundError: an absolute / relative / ``.gguf`` path that does not exist (a Hub id is ``name`` or
            ``org/name``).
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"`name_or_path`={name_or_path!r} is invalid; allowed: a Hub id, local folder or .gguf file.")
    if not os.path.exists(name_or_path) and _looks_local(name_or_path):
        raise FileNotFoundError(
            f"Model {name_or_path!r} does not exist; allowed: a local model folder, a .gguf file or a Hub id."
        )


def model_load_error(name_or_path: str, exc: OSError) -> FileNotFoundError:
    """A loading failure (``from_pretrained``'s multi-line ``OSError``) as one line naming the model."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FileNotFoundError(f"Cannot load model {name_or_path!r}: {first}")


def is_output_dir(path: str) -> bool:
    """Whether ``path`` is a proxsparse output folder (written by ``learn`` / ``prune``)."""
    from ..constants import CONFIG_NAME

    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def evaluate_pretrained(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str | None = "auto",
    device: str | None = None,
    label: str | None = None,
    **eval_options: Any,
) -> EvalResults:
    """Load a model and evaluate it with :func:`evaluate_model`.

    ``name_or_path`` is a Hub id, a local model folder, a ``.gguf`` file (or a folder / Hub id with ``gguf_file``), or a
    proxsparse output folder, whose method, recipe and calibration data are recorded with the results (the base model
    in ``method_config["base_model"]``). A local model is recorded by its base name.

    Args:
        name_or_path: the model.
        gguf_file, revision, dtype, device: how to load it (see :func:`proxsparse_hf.loading.load_model_and_tokenizer`).
        label: row name (default: see :class:`EvalResults`).
        eval_options: keyword arguments of :func:`evaluate_model` (``datasets``, ``seq_len``, ``tasks``, ...).

    Raises:
        FileNotFoundError: a local path that does not exist, or a model that cannot be loaded (one line, naming it).
    """
    from ..loading import load_model_and_tokenizer, model_revision

    check_model_path(name_or_path)
    config = None
    method, method_config = "dense", {}
    if is_output_dir(name_or_path):
        from ..artefacts import load_output_dir

        output = load_output_dir(name_or_path)
        config = output.config
        method = output.method
        method_config = dict(output.run_info.get("method_config") or {})
        if output.run_info.get("calibration"):
            method_config.setdefault("calibration", output.run_info["calibration"])
        if output.run_info.get("training"):
            method_config.setdefault("training", output.run_info["training"])
        if method == "proxsparse":
            method_config.setdefault("proxsparse_config", config.to_dict())
        if config.base_model_name_or_path:
            method_config.setdefault("base_model", config.base_model_name_or_path)
        revision = revision or config.revision
    try:
        model, tokenizer = load_model_and_tokenizer(
            name_or_path, gguf_file=gguf_file, revision=revision, dtype=dtype, device=device
        )
    except OSError as exc:
        raise model_load_error(name_or_path, exc) from exc
    results = evaluate_model(
        model,
        tokenizer,
        model_name=name_or_path,
        method=method,
        label=label,
        method_config=method_config,
        revision=revision or model_revision(model),
        config=config,
        **eval_options,
    )
    if gguf_file is not None:
        results.settings["gguf_file"] = gguf_file
    return results
