"""The registry of evaluation tasks: perplexity datasets and zero-shot tasks, by name.

Adding a task is one file with a function and one registration line::

    from proxsparse_hf.evaluation.tasks import register_eval_task

    @register_eval_task("my_task", kind="zeroshot", label="My task", description="...")
    def my_task(model, tokenizer, names, **options):
        return {name: {"acc": ...} for name in names}

after which ``evaluate_model(..., tasks=["my_task"])`` and ``proxsparse eval --tasks my_task`` run it. The function
takes the model, its tokenizer, the requested names that share this function (tasks registered with the same function
run in one call, e.g. every lm-eval task in one lm-eval run) and the options of its kind (perplexity: ``seq_len``,
``batch_size``, ``max_windows``, ``bos``, ``show_progress``; zero-shot: ``limit``, ``batch_size``, ``data_dir``,
``skip_unavailable``), and returns ``{name: entry}`` in the :class:`~proxsparse_hf.evaluation.results.EvalResults` form
of its kind. A name that is not registered is still evaluated: as a local file / Hub dataset for perplexity, as an
lm-evaluation-harness task for zero-shot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .perplexity import evaluate_perplexity
from .zeroshot import zeroshot_eval

__all__ = [
    "TASK_KINDS",
    "EvalTask",
    "eval_task_names",
    "get_eval_task",
    "register_eval_task",
    "resolve_eval_task",
]

TASK_KINDS = ("perplexity", "zeroshot")
TaskFn = Callable[..., dict[str, dict[str, Any]]]


@dataclass(frozen=True)
class EvalTask:
    """One registered evaluation task.

    Args:
        name: the key of its results (``EvalResults.perplexity`` / ``.zeroshot``) and the name on the command line.
        kind: ``perplexity`` or ``zeroshot``.
        label: display name (``WikiText-2 (raw)``).
        description: one sentence on what is measured.
        fn: ``fn(model, tokenizer, names, **options) -> {name: entry}`` (see the module docstring).
        hub_dataset: the Hub dataset it comes from (for model-card metadata), when there is one.
        hub_config: that dataset's configuration name.
        packages: distributions whose versions are recorded with its results (e.g. ``("lm_eval",)``).
    """

    name: str
    kind: str
    label: str
    description: str
    fn: TaskFn
    hub_dataset: str | None = None
    hub_config: str | None = None
    packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or "," in self.name:
            raise ValueError(f"`name`={self.name!r} is invalid; allowed: a non-empty string without commas.")
        if self.kind not in TASK_KINDS:
            raise ValueError(f"`kind`={self.kind!r} is invalid; allowed: {TASK_KINDS}.")
        if not callable(self.fn):
            raise ValueError(f"`fn`={self.fn!r} is invalid; allowed: a callable.")


_REGISTRY: dict[str, EvalTask] = {}


def register_eval_task(
    name: str,
    *,
    kind: str,
    label: str,
    description: str,
    fn: TaskFn | None = None,
    hub_dataset: str | None = None,
    hub_config: str | None = None,
    packages: tuple[str, ...] = (),
) -> Any:
    """Register task ``name``; with ``fn`` it registers at once (returns the :class:`EvalTask`), without it returns a
    decorator for the function.

    Raises:
        ValueError: ``name`` is already registered, or a field is invalid.
    """

    def add(function: TaskFn) -> TaskFn:
        if name in _REGISTRY:
            raise ValueError(f"Evaluation task {name!r} is already registered ({_REGISTRY[name].description}).")
        _REGISTRY[name] = EvalTask(name, kind, label, description, function, hub_dataset, hub_config, tuple(packages))
        return function

    if fn is not None:
        add(fn)
        return _REGISTRY[name]
    return add


def get_eval_task(name: str) -> EvalTask:
    """The registered task ``name``; ``ValueError`` listing the registered names for an unknown one."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown evaluation task {name!r}; registered: {eval_task_names()}.") from None


def eval_task_names(kind: str | None = None) -> tuple[str, ...]:
    """Registered task names (of one ``kind`` when given), in registration order."""
    if kind is not None and kind not in TASK_KINDS:
        raise ValueError(f"`kind`={kind!r} is invalid; allowed: {TASK_KINDS}.")
    return tuple(name for name, task in _REGISTRY.items() if kind is None or task.kind == kind)


def resolve_eval_task(name: str, kind: str) -> EvalTask:
    """The task that evaluates ``name`` as a ``kind`` task: the registered one, else the generic one of the kind (a local
    file / Hub dataset for perplexity, an lm-eval task for zero-shot).

    Raises:
        ValueError: ``name`` is registered as a task of the other kind, or is not a non-empty string.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"`kind`={kind!r} is invalid; allowed: {TASK_KINDS}.")
    if not isinstance(name, str) or not name:
        raise ValueError(f"Evaluation task name {name!r} is invalid; allowed: a non-empty string.")
    task = _REGISTRY.get(name)
    if task is not None:
        if task.kind != kind:
            where = "--datasets / `datasets`" if task.kind == "perplexity" else "--tasks / `tasks`"
            raise ValueError(f"{name!r} is a {task.kind} task, not a {kind} one; pass it in {where}.")
        return task
    if kind == "perplexity":
        return EvalTask(name, kind, name, f"perplexity on {name}", evaluate_perplexity)
    return EvalTask(name, kind, name, f"lm-eval task {name}", zeroshot_eval, packages=("lm_eval",))


# ------------------------------------------------------------------------------------------------------ built-ins
register_eval_task(
    "wikitext2",
    kind="perplexity",
    label="WikiText-2 (raw)",
    description="Perplexity on the WikiText-2 raw test split.",
    fn=evaluate_perplexity,
    hub_dataset="Salesforce/wikitext",
    hub_config="wikitext-2-raw-v1",
)
register_eval_task(
    "c4",
    kind="perplexity",
    label="C4 (en)",
    description="Perplexity on C4-en validation documents [1000, 2000) (disjoint from the calibration documents).",
    fn=evaluate_perplexity,
    hub_dataset="allenai/c4",
    hub_config="en",
)
_LM_EVAL = {"kind": "zeroshot", "fn": zeroshot_eval, "packages": ("lm_eval",)}
register_eval_task("piqa", label="PIQA", description="Physical commonsense QA.", hub_dataset="ybisk/piqa", **_LM_EVAL)
register_eval_task(
    "arc_easy",
    label="ARC-Easy",
    description="AI2 Reasoning Challenge, easy set.",
    hub_dataset="allenai/ai2_arc",
    hub_config="ARC-Easy",
    **_LM_EVAL,
)
register_eval_task(
    "arc_challenge",
    label="ARC-Challenge",
    description="AI2 Reasoning Challenge, challenge set.",
    hub_dataset="allenai/ai2_arc",
    hub_config="ARC-Challenge",
    **_LM_EVAL,
)
register_eval_task(
    "hellaswag", label="HellaSwag", description="Sentence completion.", hub_dataset="Rowan/hellaswag", **_LM_EVAL
)
register_eval_task(
    "winogrande",
    label="WinoGrande",
    description="Pronoun resolution (partial scoring).",
    hub_dataset="allenai/winogrande",
    **_LM_EVAL,
)
register_eval_task("boolq", label="BoolQ", description="Yes/no questions.", hub_dataset="google/boolq", **_LM_EVAL)
register_eval_task(
    "rte",
    label="RTE",
    description="Recognising textual entailment.",
    hub_dataset="aps/super_glue",
    hub_config="rte",
    **_LM_EVAL,
)
register_eval_task(
    "openbookqa",
    label="OpenBookQA",
    description="Open-book science questions.",
    hub_dataset="allenai/openbookqa",
    hub_config="main",
    **_LM_EVAL,
)
