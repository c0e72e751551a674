"""Zero-shot accuracy through lm-evaluation-harness (optional extra ``eval``: ``pip install "proxsparse-hf[eval]"``).

The in-memory model is wrapped with ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=...)`` and evaluated
with ``lm_eval.simple_evaluate``. Tasks whose data is available locally (PIQA, ARC-Easy, ARC-Challenge, BoolQ, WinoGrande,
OpenBookQA, in the MosaicML ``query``/``choices``/``gold`` format of ``../shared/assets/data/zeroshot/llm-foundry``) are
registered as custom lm-eval tasks: a YAML per task in a temporary folder loads the local ``.jsonl`` through
``dataset_path: json`` and is found through ``TaskManager(include_path=...)``. The prompts follow lm-eval's own task
definitions (``"Question: ...\\nAnswer:"`` for PIQA/ARC, ``"...\\nAnswer:"`` for BoolQ, partial scoring for WinoGrande).
Other tasks (HellaSwag, RTE, ...) use lm-eval's built-in definitions, which download their data from the Hub.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from ..data import find_assets_dir

__all__ = ["DEFAULT_TASKS", "LOCAL_TASK_FILES", "local_task_configs", "zeroshot_eval"]

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "rte", "openbookqa")
LOCAL_TASK_FILES = {
    "piqa": "piqa.jsonl",
    "arc_easy": "arc_easy.jsonl",
    "arc_challenge": "arc_challenge.jsonl",
    "boolq": "boolq.jsonl",
    "winogrande": "winogrande.jsonl",
    "openbookqa": "openbook_qa.jsonl",
}
LOCAL_TASK_PREFIX = "proxsparse_local_"
_INSTALL = 'pip install "proxsparse-hf[eval]"  (or: pip install "lm-eval>=0.4.5,<0.5")'

_QA = {"doc_to_text": "{{query.strip()}}\nAnswer:", "doc_to_choice": "choices", "doc_to_target": "gold"}
_PROMPTS: dict[str, dict[str, str]] = {
    "piqa": _QA,
    "arc_easy": _QA,
    "arc_challenge": _QA,
    "boolq": _QA,
    "openbookqa": {"doc_to_text": "{{query.strip()}}", "doc_to_choice": "choices", "doc_to_target": "gold"},
    # lm-eval's WinoGrande: an int doc_to_text selects the correct context; the continuation is scored after each context
    "winogrande": {"doc_to_text": "gold", "doc_to_choice": "context_options", "doc_to_target": "continuation"},
}
_HAS_ACC_NORM = {"piqa", "arc_easy", "arc_challenge", "openbookqa", "hellaswag"}


def _default_data_dir() -> str | None:
    assets = find_assets_dir()
    path = os.path.join(assets, "zeroshot", "llm-foundry") if assets else None
    return path if path and os.path.isdir(path) else None


def local_task_configs(tasks: Sequence[str], data_dir: str) -> dict[str, dict[str, Any]]:
    """lm-eval task configs (as dicts) for the ``tasks`` that have a local file in ``data_dir``: ``{task: config}``."""
    configs: dict[str, dict[str, Any]] = {}
    for task in tasks:
        filename = LOCAL_TASK_FILES.get(task)
        path = os.path.join(data_dir, filename) if filename else None
        if path is None or not os.path.isfile(path):
            continue
        metrics = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
        if task in _HAS_ACC_NORM:
            metrics.append({"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True})
        configs[task] = {
            "task": LOCAL_TASK_PREFIX + task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": os.path.abspath(path)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            **_PROMPTS[task],
            "metric_list": metrics,
            "metadata": {"version": 1.0, "source": os.path.abspath(path)},
        }
    return configs


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _import_lm_eval() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"Zero-shot evaluation needs lm-evaluation-harness: {_INSTALL}") from exc
    return lm_eval


def _task_metrics(task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for key in ("acc", "acc_norm"):
        for name in (f"{key},none", key):
            if isinstance(metrics.get(name), (int, float)):
                entry[key] = float(metrics[name])
                break
        for name in (f"{key}_stderr,none", f"{key}_stderr"):
            if isinstance(metrics.get(name), (int, float)):
                entry[f"{key}_stderr"] = float(metrics[name])
                break
    if "acc" not in entry:
        raise RuntimeError(f"lm-eval returned no accuracy for task {task!r}: {sorted(metrics)}")
    return entry


def zeroshot_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int = 0,
    data_dir: str | None = None,
    use_local: bool = True,
    skip_unavailable: bool = False,
    max_length: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of an in-memory model with lm-evaluation-harness.

    Args:
        model: a ``transformers`` causal LM (evaluated on its current device).
        tokenizer: its tokenizer.
        tasks: lm-eval task names; default PIQA, ARC-e, ARC-c, HellaSwag, WinoGrande, BoolQ, RTE, OpenBookQA.
        limit: evaluate only the first ``limit`` examples of each task (quick runs).
        batch_size: lm-eval batch size.
        num_fewshot: few-shot examples (0 = zero-shot).
        data_dir: folder with local task files (MosaicML format, see :data:`LOCAL_TASK_FILES`); default
            ``../shared/assets/data/zeroshot/llm-foundry`` when present.
        use_local: use local files for the tasks that have one (False: always lm-eval's Hub-backed tasks).
        skip_unavailable: skip (with a warning) tasks whose data cannot be loaded instead of raising. Offline
            (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``), tasks without local data count as unavailable.
        max_length: context length for lm-eval (default: the model's).

    Returns:
        ``{task: {"acc", ["acc_norm", "acc_stderr", "acc_norm_stderr"], "num_samples", "source", "lm_eval_task"}}``.

    Raises:
        RuntimeError: lm-eval is not installed, or a task's data cannot be loaded (without ``skip_unavailable``).
        ValueError: no tasks, or bad options.
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError("`tasks` is empty; give at least one lm-eval task name.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit`={limit!r} is invalid; allowed: None or an integer >= 1.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size`={batch_size!r} is invalid; allowed: an integer >= 1.")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ValueError(f"`data_dir`={data_dir!r} is not a directory.")
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data_dir = data_dir or (_default_data_dir() if use_local else None)
    local = local_task_configs(tasks, data_dir) if (use_local and data_dir) else {}
    hub_tasks = [t for t in tasks if t not in local]
    if hub_tasks and _hub_offline():
        message = (
            f"Zero-shot task(s) {hub_tasks} have no local data and the Hub is offline (HF_DATASETS_OFFLINE / "
            f"HF_HUB_OFFLINE is set)"
        )
        if not skip_unavailable:
            raise RuntimeError(f"{message}; pass skip_unavailable=True (CLI: --skip-unavailable) to skip them.")
        logger.warning("%s; skipped.", message)
        tasks = [t for t in tasks if t in local]
        hub_tasks = []
    if not tasks:
        raise RuntimeError("None of the requested zero-shot tasks can be evaluated here.")
    if hub_tasks:
        logger.info("Zero-shot tasks without local data (lm-eval loads them from the Hub): %s", hub_tasks)

    import yaml

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="proxsparse-lm-eval-") as tmp:
        for task, config in local.items():
            with open(os.path.join(tmp, f"{config['task']}.yaml"), "w", encoding="utf-8") as fh:
                yaml.safe_dump(config, fh, sort_keys=False)
        manager = TaskManager(include_path=tmp if local else None, include_defaults=bool(hub_tasks))
        names = {task: local[task]["task"] if task in local else task for task in tasks}
        runnable = []
        for task, name in names.items():
            if task not in local and name not in manager.all_tasks:
                message = f"lm-eval knows no task {name!r} and there is no local data for it."
                if not skip_unavailable:
                    raise ValueError(message)
                logger.warning("%s Skipped.", message)
                continue
            runnable.append(task)
        # local tasks run together; Hub-backed ones one by one when they may be skipped, so one unreachable dataset
        # only costs that task
        local_runnable = [t for t in runnable if t in local]
        hub_runnable = [t for t in runnable if t not in local]
        groups = [local_runnable] if local_runnable else []
        groups += [[t] for t in hub_runnable] if skip_unavailable else ([hub_runnable] if hub_runnable else [])
        for group in groups:
            try:
                out = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[names[t] for t in group],
                    num_fewshot=num_fewshot,
                    limit=limit,
                    task_manager=manager,
                    log_samples=False,
                    bootstrap_iters=0,
                )
            except Exception as exc:
                if skip_unavailable and all(t not in local for t in group):
                    logger.warning("Zero-shot task(s) %s could not be evaluated (%s); skipped.", group, exc)
                    continue
                raise RuntimeError(
                    f"lm-eval failed on tasks {[names[t] for t in group]}: {exc}. Tasks without local data need the "
                    f"Hub; pass skip_unavailable=True (CLI: --skip-unavailable) to skip them."
                ) from exc
            samples = out.get("n-samples", {})
            for task in group:
                name = names[task]
                entry = _task_metrics(task, out["results"].get(name, {}))
                count = samples.get(name, {})
                entry["num_samples"] = (
                    int(count.get("effective", count.get("original", 0))) if isinstance(count, dict) else 0
                )
                entry["source"] = local[task]["metadata"]["source"] if task in local else "lm-eval (Hub)"
                entry["lm_eval_task"] = name
                results[task] = entry
                logger.info("zero-shot %s: acc %.4f (%d examples)", task, entry["acc"], entry["num_samples"])
    if not results:
        raise RuntimeError(f"None of the zero-shot tasks {tasks} could be evaluated.")
    return {task: results[task] for task in tasks if task in results}
