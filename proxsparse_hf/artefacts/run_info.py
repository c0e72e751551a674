"""``RunInfo``: the schema of ``run_info.json``, the facts an output folder records about the run that produced it.

Known keys are typed fields; anything else a caller records (e.g. ``device_map``, ``recovery``) is kept in ``extra``
and written back unchanged, so files written by earlier versions load as they are. ``RunInfo`` is a read-only mapping
over :meth:`RunInfo.to_dict`, so ``run_info["calibration"]`` and ``run_info.get("method_config")`` keep working.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["CALIBRATION_KEYS", "TRAINING_KEYS", "RunInfo"]

CALIBRATION_KEYS = (
    "dataset",
    "source",
    "name",
    "split",
    "documents",
    "text_field",
    "n_samples",
    "seq_len",
    "tokens",
    "seed",
)
"""Keys of ``calibration`` that the card shows (``dataset`` is written by ``learn``, ``source`` by ``prune``)."""

TRAINING_KEYS = (
    "steps",
    "tokens",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "weight_decay",
    "seed",
    "bf16",
    "gradient_checkpointing",
    "distill_alpha",
    "distill_temperature",
)
"""Keys of ``training`` that ``learn`` writes (``TrainingArguments`` fields + steps and tokens actually done)."""

_STRINGS = ("method", "base_model", "revision", "base_model_sha256", "command")
_MAPPINGS = ("calibration", "training", "method_config", "permutation", "peak_gpu_memory_gib", "versions", "hardware")
_SECONDS = ("wall_time_s", "prune_time_s", "prox_seconds")


@dataclass
class RunInfo(Mapping):
    """Facts about the run that produced an output folder (``run_info.json``).

    Args:
        method: registered pruner name that found the mask (``proxsparse``, ``magnitude``, ``wanda``, ...).
        base_model: Hub id or path of the base model.
        revision: commit hash of the base model, when loaded from the Hub.
        base_model_sha256: SHA-256 of a local base model (recorded instead of its path in published artefacts).
        calibration: calibration data: ``dataset`` or ``source``, ``name``, ``split``, ``documents``, ``text_field``,
            ``n_samples``, ``seq_len``, ``tokens``, ``seed`` (see :data:`CALIBRATION_KEYS`).
        training: training arguments and totals (see :data:`TRAINING_KEYS`); None for one-shot methods.
        method_config: the pruner's options (e.g. ``{"update_weights": False}``).
        permutation: the channel permutation folded into the weights before the mask was found
            (:meth:`proxsparse_hf.permutation.PermutationReport.summary`: importance, refinement, ``layers`` = permuted
            consumer → producers, importance change); None when there was none.
        update_weights: whether the kept weights were changed (older files record it here, newer in
            ``method_config``).
        wall_time_s: wall time of the whole run, seconds.
        prune_time_s: time spent pruning (one-shot methods), seconds.
        prox_seconds: time spent in prox steps (ProxSparse), seconds.
        peak_gpu_memory_gib: ``{"rank<r>/cuda:<d>": GiB}``.
        command: the command line that produced the folder.
        versions: library versions (:func:`proxsparse_hf.utils.library_versions`).
        hardware: hardware description (:func:`proxsparse_hf.utils.describe_hardware`).
        extra: any other recorded key, kept as is.
    """

    method: str = "proxsparse"
    base_model: str | None = None
    revision: str | None = None
    base_model_sha256: str | None = None
    calibration: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    method_config: dict[str, Any] | None = None
    permutation: dict[str, Any] | None = None
    update_weights: bool | None = None
    wall_time_s: float | None = None
    prune_time_s: float | None = None
    prox_seconds: float | None = None
    peak_gpu_memory_gib: dict[str, Any] | None = None
    command: str | None = None
    versions: dict[str, Any] | None = None
    hardware: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"`method`={self.method!r} is invalid; allowed: a non-empty pruner name.")
        for name in _STRINGS[1:]:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"`{name}`={value!r} is invalid; allowed: None or a string.")
        for name in _MAPPINGS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"`{name}`={value!r} is invalid; allowed: None or a dict.")
            if value is not None:
                setattr(self, name, dict(value))
        for name in _SECONDS:
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
            ):
                raise ValueError(f"`{name}`={value!r} is invalid; allowed: None or a number of seconds >= 0.")
        if self.update_weights is not None and not isinstance(self.update_weights, bool):
            raise ValueError(f"`update_weights`={self.update_weights!r} is invalid; allowed: None, True or False.")
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"`extra`={self.extra!r} is invalid; allowed: a dict.")
        clashes = sorted(set(self.extra) & _FIELD_NAMES)
        if clashes:
            raise ValueError(f"`extra` repeats the field(s) {clashes}; set them as fields.")
        self.extra = dict(self.extra)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunInfo:
        """Known keys become fields, the rest goes to ``extra``."""
        if data is None:
            return cls()
        if isinstance(data, RunInfo):
            return cls.from_dict(data.to_dict())
        if not isinstance(data, Mapping):
            raise ValueError(f"run_info must be a dict, got {type(data).__name__}.")
        known = {k: v for k, v in data.items() if k in _FIELD_NAMES}
        if known.get("method") is None:
            known.pop("method", None)
        return cls(**known, extra={k: v for k, v in data.items() if k not in _FIELD_NAMES})

    def to_dict(self) -> dict[str, Any]:
        """Every field (None when not recorded) followed by the extra keys: the content of ``run_info.json``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    def replace(self, **changes: Any) -> RunInfo:
        """A copy with some keys changed (fields or extra keys)."""
        data = self.to_dict()
        data.update(changes)
        return RunInfo.from_dict(data)

    # read-only mapping over to_dict()
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    @property
    def weights_updated(self) -> bool:
        """Whether the kept weights were changed (then a mask alone does not reproduce the model)."""
        if self.update_weights is True:
            return True
        return any(isinstance(v, Mapping) and v.get("update_weights") is True for v in self.to_dict().values())

    @property
    def permuted_layers(self) -> list[str]:
        """The layers whose input channels were permuted (and their producers' rows): then the weights are no longer
        the base model's, and a mask alone does not reproduce the model."""
        layers = (self.permutation or {}).get("layers") or {}
        return list(layers)

    @property
    def calibration_source(self) -> str | None:
        """Hub id or path of the calibration data (``dataset`` or ``source``), when recorded."""
        calibration = self.calibration or {}
        value = calibration.get("dataset") or calibration.get("source")
        return value if isinstance(value, str) and value else None


_FIELD_NAMES = frozenset(f.name for f in fields(RunInfo)) - {"extra"}
