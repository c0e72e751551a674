"""``EvalResults``: the one results schema for every evaluated model (dense, ProxSparse, baselines), saved as
``eval_results.json``. The model card and ``proxsparse compare`` read it."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from ..constants import METHODS

__all__ = ["PPL_KEYS", "SCHEMA_VERSION", "ZEROSHOT_KEYS", "EvalResults", "sparsity_totals"]

SCHEMA_VERSION = 1
# required keys of one perplexity entry, then the optional ones
PPL_KEYS = ("ppl", "nll", "num_tokens", "num_windows", "seq_len")
PPL_OPTIONAL_KEYS = ("source", "split", "documents")
# one zero-shot entry: the accuracy is required, the rest optional
ZEROSHOT_KEYS = ("acc",)
ZEROSHOT_OPTIONAL_KEYS = ("acc_norm", "acc_stderr", "acc_norm_stderr", "num_samples", "source", "lm_eval_task")


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


@dataclass
class EvalResults:
    """Evaluation results of one model.

    Args:
        model: model id or path that was evaluated (Hub id, local folder, ``.gguf`` file or output folder).
        method: how the model was pruned: one of ``proxsparse``, ``magnitude``, ``wanda``, ``sparsegpt``, ``dense``.
        revision: revision / commit hash of the model, when known.
        method_config: the method's settings (e.g. ``{"update_weights": False}`` for SparseGPT mask-only, the ProxSparse
            config, calibration data).
        perplexity: ``{dataset: {"ppl", "nll", "num_tokens", "num_windows", "seq_len"[, "source", "split",
            "documents"]}}``; ``nll`` is the mean NLL per scored token (nats).
        zeroshot: ``{task: {"acc"[, "acc_norm", "acc_stderr", "acc_norm_stderr", "num_samples", "source",
            "lm_eval_task"]}}`` (lm-evaluation-harness, zero-shot).
        zeroshot_mean: mean ``acc`` over the zero-shot tasks (computed when None and tasks are present).
        sparsity: sparsity totals of the target layers (``target_sparsity``, ``overall_sparsity``, ``all_2to4``, ...).
        hardware: hardware the evaluation ran on.
        versions: library versions.
        wall_time_s: wall time of the evaluation, seconds.
        created_at: ISO-8601 UTC timestamp.
        schema_version: version of this schema.
    """

    model: str
    method: str
    revision: str | None = None
    method_config: dict[str, Any] = field(default_factory=dict)
    perplexity: dict[str, dict[str, Any]] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, Any]] = field(default_factory=dict)
    zeroshot_mean: float | None = None
    sparsity: dict[str, Any] = field(default_factory=dict)
    hardware: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float | None = None
    created_at: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"`model`={self.model!r} is invalid; allowed: a non-empty model id or path.")
        if self.method not in METHODS:
            raise ValueError(f"`method`={self.method!r} is invalid; allowed: {METHODS}.")
        if self.revision is not None and not isinstance(self.revision, str):
            raise ValueError(f"`revision`={self.revision!r} is invalid; allowed: None or a string.")
        for name in ("method_config", "sparsity", "hardware", "versions"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"`{name}`={getattr(self, name)!r} is invalid; allowed: a dict.")
        _check_entries("perplexity", self.perplexity, PPL_KEYS, PPL_OPTIONAL_KEYS, PPL_KEYS)
        _check_entries(
            "zeroshot",
            self.zeroshot,
            ZEROSHOT_KEYS,
            ZEROSHOT_OPTIONAL_KEYS,
            ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "num_samples"),
        )
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
        if self.created_at is None:
            self.created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if not isinstance(self.schema_version, int) or isinstance(self.schema_version, bool):
            raise ValueError(f"`schema_version`={self.schema_version!r} is invalid; allowed: an integer.")
        if self.schema_version > SCHEMA_VERSION:
            raise ValueError(
                f"`schema_version`={self.schema_version} is newer than this proxsparse-hf understands ({SCHEMA_VERSION}); "
                f"upgrade proxsparse-hf."
            )

    @property
    def label(self) -> str:
        """Short display name: the method, ``sparsegpt-mask`` for SparseGPT without weight updates."""
        if self.method == "sparsegpt" and self.method_config.get("update_weights") is False:
            return "sparsegpt-mask"
        return self.method

    def ppl(self, dataset: str = "wikitext2") -> float | None:
        """Perplexity on ``dataset``, or None when it was not measured."""
        entry = self.perplexity.get(dataset)
        return None if entry is None else float(entry["ppl"])

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResults:
        """Build from :meth:`to_dict` output. Unknown keys raise ``ValueError`` naming them."""
        if not isinstance(data, dict):
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

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, EVAL_RESULTS_NAME)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EvalResults:
        """Read a file written by :meth:`save` (a directory means its ``eval_results.json``)."""
        from ..constants import EVAL_RESULTS_NAME

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, EVAL_RESULTS_NAME)
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path!r} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


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
