"""``EvalResults``: the one results schema for every evaluated model (dense, ProxSparse, one-shot baselines).

One :class:`EvalResults` is saved as ``eval_results.json`` (beside a pruned model, or wherever ``proxsparse eval
--output`` says); a comparison (``proxsparse compare``, ``benchmarks/quality.py``) is a list of them saved as
``comparison.json`` by :func:`save_comparison` and read back by :func:`load_comparison`, which also reads the files of
earlier versions (``{"results": [{"label", "eval_results"}]}`` from ``proxsparse compare`` and ``{"runs": [...]}`` from
the quality benchmarks). The model card, the comparison table and the charts all read this schema.

Results never hold absolute local paths: a local model, dataset or folder is recorded by its base name (or its path
inside the shared data folder), so a results file can be published as is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from ..paths import portable_name, scrub_local_paths

__all__ = [
    "COMPARISON_NAME",
    "PPL_KEYS",
    "SCHEMA_VERSION",
    "ZEROSHOT_KEYS",
    "EvalResults",
    "load_comparison",
    "portable_name",
    "save_comparison",
    "scrub_local_paths",
    "sparsity_totals",
]

SCHEMA_VERSION = 2  # 2: `label`, `settings`, `telemetry`; local paths recorded by name
COMPARISON_NAME = "comparison.json"
COMPARISON_FORMAT = "proxsparse-comparison"
# required keys of one perplexity entry, then the optional ones
PPL_KEYS = ("ppl", "nll", "num_tokens", "num_windows", "seq_len")
PPL_OPTIONAL_KEYS = ("source", "split", "documents", "bos")
# one zero-shot entry: the accuracy is required, the rest optional
ZEROSHOT_KEYS = ("acc",)
ZEROSHOT_OPTIONAL_KEYS = ("acc_norm", "acc_stderr", "acc_norm_stderr", "num_samples", "source", "lm_eval_task")
_ZEROSHOT_NUMERIC = ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "num_samples")


def _scrub_keys(name: str, entries: Any) -> Any:
    if not isinstance(entries, Mapping):
        return entries
    out: dict[Any, Any] = {}
    for key, entry in entries.items():
        new = scrub_local_paths(key)
        if new in out:
            raise ValueError(f"`{name}` has two entries named {new!r} once local paths are reduced to names.")
        out[new] = scrub_local_paths(entry)
    return out


# ------------------------------------------------------------------------------------------------------ validation
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_entries(
    name: str, entries: Any, required: tuple[str, ...], optional: tuple[str, ...], numeric: tuple[str, ...]
) -> None:
    if not isinstance(entries, dict):
        raise ValueError(f"`{name}`={entries!r} is invalid; allowed: a dict {{dataset or task: {{...}}}}.")
    for key, entry in entries.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            raise ValueError(f"`{name}` entry {key!r} is invalid; allowed: a string key mapping to a dict.")
        missing = [k for k in required if k not in entry]
        unknown = sorted(set(entry) - set(required) - set(optional))
        if missing or unknown:
            raise ValueError(
                f"`{name}[{key!r}]` has missing keys {missing} / unknown keys {unknown}; required: {list(required)}, "
                f"optional: {list(optional)}."
            )
        for k in numeric:
            if k in entry and entry[k] is not None and (not _is_number(entry[k]) or entry[k] < 0):
                raise ValueError(f"`{name}[{key!r}][{k!r}]`={entry[k]!r} is invalid; allowed: a number >= 0.")


def _registered_methods() -> tuple[str, ...]:
    from ..pruners import pruner_names

    return pruner_names()


def _method_label(method: str) -> str:
    from ..pruners import get_pruner

    return get_pruner(method).label


@dataclass
class EvalResults:
    """Evaluation results of one model.

    Args:
        model: the evaluated model: a Hub id, or the base name of a local folder / ``.gguf`` file (never a local path).
        method: how the model was pruned: a registered pruner name (``proxsparse_hf.pruners.pruner_names()``, e.g.
            ``dense``, ``magnitude``, ``wanda``, ``sparsegpt``, ``proxsparse``).
        label: short row name in tables and charts; default the method, ``<method>-mask`` when
            ``method_config["update_weights"]`` is False (e.g. ``sparsegpt-mask``: the mask on the original weights).
        revision: revision / commit hash of the model, when known.
        method_config: the method's settings (pruner options, ProxSparse config, calibration data, ``prune_time_s``).
        settings: the evaluation settings (``datasets``, ``seq_len``, ``batch_size``, ``max_windows``, ``bos``,
            ``tasks``, ``zeroshot_limit``, ...).
        perplexity: ``{dataset: {"ppl", "nll", "num_tokens", "num_windows", "seq_len"[, "source", "split", "documents",
            "bos"]}}``; ``nll`` is the mean NLL per scored token (nats).
        zeroshot: ``{task: {"acc"[, "acc_norm", "acc_stderr", "acc_norm_stderr", "num_samples", "source",
            "lm_eval_task"]}}``, accuracies in [0, 1].
        zeroshot_mean: mean ``acc`` over the zero-shot tasks (computed when None and tasks are present).
        sparsity: sparsity totals of the target layers (``target_sparsity``, ``overall_sparsity``, ``all_2to4``, ...).
        telemetry: training telemetry of a mask learned in the same run (``log_history`` entries: ``step``, ``loss``,
            ``proxsparse/...``); empty otherwise.
        hardware: hardware the evaluation ran on.
        versions: library versions.
        wall_time_s: wall time of the evaluation, seconds (pruning time is ``method_config["prune_time_s"]``).
        created_at: ISO-8601 UTC timestamp.
        schema_version: version of this schema.
    """

    model: str
    method: str
    label: str | None = None
    revision: str | None = None
    method_config: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, Any]] = field(default_factory=dict)
    zeroshot_mean: float | None = None
    sparsity: dict[str, Any] = field(default_factory=dict)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    created_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"`model`={self.model!r} is invalid; allowed: a non-empty model id or name.")
        methods = _registered_methods()
        if self.method not in methods:
            raise ValueError(f"`method`={self.method!r} is invalid; allowed: {methods}.")
        if self.revision is not None and not isinstance(self.revision, str):
            raise ValueError(f"`revision`={self.revision!r} is invalid; allowed: None or a string.")
        for name in ("method_config", "settings", "sparsity", "hardware", "versions"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"`{name}`={getattr(self, name)!r} is invalid; allowed: a dict.")
        if not isinstance(self.telemetry, list) or not all(isinstance(e, dict) for e in self.telemetry):
            raise ValueError(f"`telemetry`={self.telemetry!r} is invalid; allowed: a list of dicts.")
        _check_entries("perplexity", self.perplexity, PPL_KEYS, PPL_OPTIONAL_KEYS, PPL_KEYS)
        _check_entries("zeroshot", self.zeroshot, ZEROSHOT_KEYS, ZEROSHOT_OPTIONAL_KEYS, _ZEROSHOT_NUMERIC)
        for task, entry in self.zeroshot.items():
            for key in ("acc", "acc_norm"):
                if entry.get(key) is not None and entry[key] > 1:
                    raise ValueError(
                        f"`zeroshot[{task!r}][{key!r}]`={entry[key]!r} is invalid; allowed: 0 <= acc <= 1."
                    )
        if self.zeroshot_mean is None and self.zeroshot:
            self.zeroshot_mean = sum(e["acc"] for e in self.zeroshot.values()) / len(self.zeroshot)
        if self.zeroshot_mean is not None and (not _is_number(self.zeroshot_mean) or not 0 <= self.zeroshot_mean <= 1):
            raise ValueError(
                f"`zeroshot_mean`={self.zeroshot_mean!r} is invalid; allowed: None or a number in [0, 1]."
            )
        if self.wall_time_s is not None and (not _is_number(self.wall_time_s) or self.wall_time_s < 0):
            raise ValueError(f"`wall_time_s`={self.wall_time_s!r} is invalid; allowed: None or a number >= 0.")
        if self.label is None:
            masked = self.method_config.get("update_weights") is False
            self.label = f"{self.method}-mask" if masked else self.method
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"`label`={self.label!r} is invalid; allowed: None or a non-empty string.")
        if self.created_at is None:
            self.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not isinstance(self.schema_version, int) or isinstance(self.schema_version, bool):
            raise ValueError(f"`schema_version`={self.schema_version!r} is invalid; allowed: an integer.")
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"`schema_version`={self.schema_version} is newer than this proxsparse-hf understands ({SCHEMA_VERSION}); "
                f"upgrade proxsparse-hf."
            )
        # no absolute local path is ever recorded (files of schema 1 had some)
        self.model = scrub_local_paths(self.model)
        self.method_config = scrub_local_paths(self.method_config)
        self.settings = scrub_local_paths(self.settings)
        self.perplexity = _scrub_keys("perplexity", self.perplexity)
        self.zeroshot = _scrub_keys("zeroshot", self.zeroshot)
        self.schema_version = SCHEMA_VERSION

    @property
    def display_label(self) -> str:
        """Human-readable row name: the pruner's registered label (``Wanda``, ``SparseGPT (mask only)``), or the
        custom :attr:`label`."""
        if self.label == self.method:
            return _method_label(self.method)
        if self.label == f"{self.method}-mask":
            return f"{_method_label(self.method)} (mask only)"
        return str(self.label)

    def ppl(self, dataset: str = "wikitext2") -> float | None:
        """Perplexity on ``dataset``, or None when it was not measured."""
        entry = self.perplexity.get(dataset)
        return None if entry is None else float(entry["ppl"])

    def summary(self) -> str:
        """One line: model, label, every perplexity and the zero-shot mean, e.g.
        ``SmolLM2-135M (wanda): wikitext2 ppl 207.71, c4 ppl 222.90, zero-shot mean acc 0.3520 (5 tasks)``."""
        parts = [f"{name} ppl {entry['ppl']:.2f}" for name, entry in self.perplexity.items()]
        if self.zeroshot_mean is not None:
            parts.append(f"zero-shot mean acc {self.zeroshot_mean:.4f} ({len(self.zeroshot)} tasks)")
        return f"{self.model} ({self.label}): " + (", ".join(parts) if parts else "no measurement")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResults:
        """Build from :meth:`to_dict` output (any schema version up to this one). Unknown keys raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"EvalResults.from_dict expects a dict, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown EvalResults key(s) {unknown}; known keys: {sorted(known)}.")
        missing = [k for k in ("model", "method") if k not in data]
        if missing:
            raise ValueError(f"EvalResults is missing the required key(s) {missing}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> str:
        """Write JSON to ``path`` (a file, or a directory that gets ``eval_results.json``) atomically; returns the path."""
        from ..constants import EVAL_RESULTS_NAME
        from ..utils import atomic_write_text

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, EVAL_RESULTS_NAME)
        return atomic_write_text(path, self.to_json_string())

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResults:
        """Read a file written by :meth:`save` (a directory means its ``eval_results.json``)."""
        from ..constants import EVAL_RESULTS_NAME

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, EVAL_RESULTS_NAME)
        return cls.from_dict(_read_json(path))


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path!r} is not valid JSON: {exc}") from exc


# ------------------------------------------------------------------------------------------------------ comparisons
def _from_quality_run(run: Mapping[str, Any], meta: Mapping[str, Any]) -> EvalResults:
    """A run of a ``benchmarks/quality*.py`` result file of the first version (``{"runs": [...]}``)."""
    method_config = {k: run[k] for k in ("description", "config", "training", "options", "mask_source") if run.get(k)}
    if isinstance(run.get("options"), Mapping) and "update_weights" in run["options"]:
        method_config["update_weights"] = run["options"]["update_weights"]
    perplexity = {}
    for name, entry in (run.get("perplexity") or {}).items():
        entry = dict(entry)
        entry.setdefault("num_tokens", entry["num_windows"] * (entry["seq_len"] - 1))
        perplexity[name] = entry
    sparsity = {k: run[k] for k in ("target_sparsity", "all_2to4") if k in run}
    wall = run.get("wall_time_s")
    if perplexity and wall is not None:  # the perplexity benchmark timed the pruning / learning only
        method_config["prune_time_s"], wall = wall, None
    return EvalResults(
        model=str(meta.get("model") or "unknown"),
        method=run["method"],
        label=run["name"],
        method_config=method_config,
        perplexity=perplexity,
        zeroshot=dict(run.get("zeroshot") or {}),
        zeroshot_mean=run.get("mean_acc"),
        sparsity=sparsity,
        telemetry=list(run.get("telemetry") or []),
        hardware=dict(meta.get("hardware") or {}),
        versions=dict(meta.get("versions") or {}),
        wall_time_s=wall,
    )


def _from_item(item: Any, meta: Mapping[str, Any]) -> EvalResults:
    if isinstance(item, EvalResults):
        return item
    if not isinstance(item, Mapping):
        raise ValueError(f"A comparison entry must be EvalResults or a dict, got {type(item).__name__}.")
    if "eval_results" in item:  # `proxsparse compare` before schema 2: {"label", "eval_results"}
        data = dict(item["eval_results"])
        if item.get("label"):
            data["label"] = item["label"]
        return EvalResults.from_dict(data)
    if "name" in item and "model" not in item:  # quality benchmark run
        return _from_quality_run(item, meta)
    return EvalResults.from_dict(item)


def load_comparison(source: str | os.PathLike | Sequence[Any] | Mapping[str, Any] | None) -> list[EvalResults]:
    """The results of a comparison, one :class:`EvalResults` per row.

    ``source`` is a file or folder (``comparison.json`` when present, else ``eval_results.json``), the parsed JSON of
    one, or a sequence of :class:`EvalResults` / their dicts; None gives ``[]``. Files of every version load: what
    :func:`save_comparison` writes, a list or ``{"results": [...]}`` of ``EvalResults`` dicts, ``{"results": [{"label",
    "eval_results"}]}`` (``proxsparse compare`` before schema 2), ``{"runs": [...]}`` (``benchmarks/quality.py`` and
    ``quality_zeroshot.py`` before schema 2) and a single ``eval_results.json``.

    Raises:
        FileNotFoundError: the file or folder does not exist.
        ValueError: the content is not one of these forms (the message names the entry).
    """
    if source is None:
        return []
    if isinstance(source, (str, os.PathLike)):
        from ..constants import EVAL_RESULTS_NAME

        path = os.fspath(source)
        if os.path.isdir(path):
            candidates = [os.path.join(path, n) for n in (COMPARISON_NAME, EVAL_RESULTS_NAME)]
            found = [p for p in candidates if os.path.isfile(p)]
            if not found:
                raise FileNotFoundError(f"{path!r} holds neither {COMPARISON_NAME} nor {EVAL_RESULTS_NAME}.")
            path = found[0]
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"Comparison file {path!r} does not exist.")
        source = _read_json(path)
    meta: Mapping[str, Any] = {}
    if isinstance(source, Mapping):
        meta = source
        if "results" in source:
            items = source["results"]
        elif "runs" in source:
            items = source["runs"]
        else:
            items = [source]
    else:
        items = source
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ValueError(f"A comparison must be a list of results, got {type(items).__name__}.")
    results = []
    for i, item in enumerate(items):
        try:
            results.append(_from_item(item, meta))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"Comparison entry {i}: {exc}") from exc
    return results


def save_comparison(
    path: str | os.PathLike, results: Sequence[EvalResults], *, model: str | None = None, **metadata: Any
) -> str:
    """Write ``results`` (one row each) as a comparison file readable by :func:`load_comparison`; returns the path.

    Args:
        path: a ``.json`` file, or a folder that gets ``comparison.json``.
        results: the rows, in order.
        model: the model compared (default the first row's).
        metadata: further JSON-serialisable top-level fields (``command``, ``experiment``, ``wall_time_s``, ...);
            local paths in them are reduced to names as in the results.
    """
    from ..utils import atomic_write_json

    results = [r if isinstance(r, EvalResults) else EvalResults.from_dict(r) for r in results]
    labels = [r.label for r in results]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"`results` has duplicate labels {duplicates}; every row needs its own label.")
    reserved = sorted(set(metadata) & {"format", "schema_version", "model", "results"})
    if reserved:
        raise ValueError(f"`metadata` keys {reserved} are reserved.")
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(".json"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, COMPARISON_NAME)
    payload = {
        "format": COMPARISON_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model": portable_name(model) if model else (results[0].model if results else None),
        **scrub_local_paths(metadata),
        "results": [r.to_dict() for r in results],
    }
    return atomic_write_json(path, payload)


def sparsity_totals(model: Any, config: Any = None) -> dict[str, Any]:
    """Sparsity totals of ``model``'s targets (from :func:`proxsparse_hf.report.sparsity_report`) for ``EvalResults``."""
    from ..report import sparsity_report

    report = sparsity_report(model, config)
    totals = report.to_dict()["totals"]
    totals.update(
        total_params=report.total_params,
        total_zeros=report.total_zeros,
        target_params=report.target_params,
        target_zeros=report.target_zeros,
        pattern=report.pattern,
    )
    return totals
