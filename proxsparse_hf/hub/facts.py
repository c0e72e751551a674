"""The facts a model card states about how a model was made: the hyperparameter table (recipe + ``run_info.json``),
the hardware, the calibration datasets and the license inherited from the base model."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from ..artefacts.publish import is_hub_id
from ..artefacts.run_info import RunInfo
from ..config import ProxSparseConfig
from ..constants import CARD_NAME
from .results import finite

__all__ = [
    "CALIBRATION_LABELS",
    "TRAINING_LABELS",
    "calibration_datasets",
    "hardware_summary",
    "hyperparameters",
    "inherit_license",
    "method_description",
    "method_label",
    "permutation_summary",
]

logger = logging.getLogger(__name__)

CALIBRATION_LABELS = {  # one per RunInfo CALIBRATION_KEYS entry
    "dataset": "calibration data",
    "source": "calibration data",
    "name": "calibration config",
    "split": "split",
    "documents": "documents",
    "text_field": "text field",
    "n_samples": "calibration samples",
    "seq_len": "sequence length",
    "tokens": "calibration tokens",
    "seed": "calibration seed",
}
TRAINING_LABELS = {  # one per RunInfo TRAINING_KEYS entry
    "steps": "optimizer steps",
    "tokens": "training tokens",
    "learning_rate": "learning rate",
    "num_train_epochs": "epochs",
    "max_steps": "max steps",
    "per_device_train_batch_size": "batch size",
    "gradient_accumulation_steps": "gradient accumulation",
    "warmup_ratio": "warm-up ratio",
    "weight_decay": "weight decay",
    "seed": "seed",
    "bf16": "bf16",
    "gradient_checkpointing": "gradient checkpointing",
    "distill_alpha": "distillation α",
    "distill_temperature": "distillation temperature",
}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def hardware_summary(run_info: RunInfo) -> str | None:
    """``"2× NVIDIA H200 (CUDA 12.8)"`` or ``"CPU only (16 cores, Linux-...)"``; None when not recorded."""
    hw = run_info.hardware
    if not isinstance(hw, Mapping):
        return None
    if hw.get("gpu"):
        count = hw.get("gpu_count") or 1
        return f"{count}× {hw['gpu']}" + (f" (CUDA {hw['cuda']})" if hw.get("cuda") else "")
    if hw.get("cpu_count"):
        return f"CPU only ({hw['cpu_count']} cores, {hw.get('platform', 'unknown platform')})"
    return None


def _pruner(method: str) -> Any:
    """The registered :class:`~proxsparse_hf.pruners.PrunerSpec` of ``method``, or None when it is not registered."""
    from ..pruners import get_pruner

    try:
        return get_pruner(method)
    except ValueError:
        return None


def method_label(method: str) -> str:
    """The registered display label of a pruner, or the name itself for one that is not registered."""
    spec = _pruner(method)
    return method if spec is None else spec.label


def method_description(method: str) -> str:
    """The registered description of a pruner (a generic sentence for one that is not registered)."""
    spec = _pruner(method)
    return f"Pruned with {method}." if spec is None else spec.description


def _importance_label(name: str) -> str:
    """The registered label of an importance measure (the name itself for one that is not registered)."""
    from ..learning.importance import get_importance, importance_names

    return get_importance(name).label if name in importance_names() else name


def permutation_summary(run_info: RunInfo) -> str | None:
    """One phrase on the channel permutation folded into the weights before pruning, e.g. ``"input channels of 60
    layers (o_proj, down_proj) permuted and folded into their producers; importance activation, hungarian refinement,
    pruned importance -4.5%"``; None when there was none."""
    layers = run_info.permuted_layers
    if not layers:
        return None
    info = run_info.permutation or {}
    kinds = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in layers))
    text = f"input channels of {len(layers)} layers ({kinds}) permuted and folded into their producers"
    details = []
    if info.get("importance"):
        details.append(f"importance {info['importance']}")
    if info.get("refine"):
        details.append(f"{info['refine']} refinement")
    change = finite(info.get("pruned_importance_change"))
    if change is not None:
        details.append(f"pruned importance {change:+.1%}")
    return text + (f"; {', '.join(details)}" if details else "")


def hyperparameters(config: ProxSparseConfig, run_info: RunInfo) -> list[tuple[str, str]]:
    """``(setting, value)`` rows: the method, the learning recipe (learned masks), targets, calibration, training,
    the method's options, hardware and wall time — only what was recorded."""
    method = run_info.method
    rows: list[tuple[str, str]] = [("method", method_label(method))]
    spec = _pruner(method)
    if spec is not None and spec.learned:
        importance = _importance_label(config.importance).replace("|", "\\|")
        rows += [
            ("λ1 (2:4 regulariser)", _fmt(config.lambda1)),
            ("λ2 (frozen-weight regulariser)", _fmt(config.lambda2)),
            ("ε", _fmt(config.epsilon)),
            ("λ1 schedule / scaling", f"{config.lambda_schedule} / {config.lambda_scaling}"),
            ("importance", importance),
            ("step scaling", config.step_scaling),
            ("prox every n steps", _fmt(config.prox_every_n_steps)),
        ]
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    rows.append(("target modules", f"`{targets}`"))
    if config.exclude_modules:
        exclude = (
            config.exclude_modules if isinstance(config.exclude_modules, str) else ", ".join(config.exclude_modules)
        )
        rows.append(("excluded modules", f"`{exclude}`"))
    for values, labels in ((run_info.calibration, CALIBRATION_LABELS), (run_info.training, TRAINING_LABELS)):
        if values:
            rows += [(label, _fmt(values[key])) for key, label in labels.items() if values.get(key) is not None]
    if run_info.update_weights is not None:
        rows.append(("update weights", _fmt(run_info.update_weights)))
    for key, value in (run_info.method_config or {}).items():
        if isinstance(value, (str, int, float, bool)):
            rows.append((key.replace("_", " "), _fmt(value)))
    permutation = permutation_summary(run_info)
    if permutation:
        rows.append(("channel permutation", permutation))
    hardware = hardware_summary(run_info)
    if hardware:
        rows.append(("hardware", hardware))
    wall = finite(run_info.wall_time_s)
    if wall is not None:
        rows.append(("wall time", _duration(wall)))
    return rows


def calibration_datasets(run_info: RunInfo) -> list[str]:
    """The Hub dataset the calibration data came from: its id, or for a local file the Hub dataset of a registered
    perplexity dataset (:mod:`proxsparse_hf.evaluation.tasks`) whose name (``c4`` of ``allenai/c4``) is in the file or
    folder name."""
    from ..evaluation.tasks import eval_task_names, get_eval_task

    source = run_info.calibration_source
    if source is None:
        return []
    if is_hub_id(source):
        return [source]
    name = os.path.basename(os.path.normpath(source)).lower() + " " + os.path.basename(os.path.dirname(source)).lower()
    hub_ids = [get_eval_task(task).hub_dataset for task in eval_task_names("perplexity")]
    return [hub_id for hub_id in hub_ids if hub_id and hub_id.rsplit("/", 1)[-1].lower() in name][:1]


def inherit_license(
    base_model: str | None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> str | None:
    """License of the base model: from its ``.gguf`` metadata, its local ``README.md`` or its Hub card; None if
    unknown."""
    if not base_model:
        return None
    try:
        if base_model.endswith(".gguf") and os.path.isfile(base_model):
            from gguf import GGUFReader

            field = GGUFReader(base_model).fields.get("general.license")
            if field is None:
                return None
            return bytes(field.parts[field.data[0]]).decode("utf-8").strip() or None
        from huggingface_hub import ModelCard

        if os.path.isdir(base_model):
            readme = os.path.join(base_model, CARD_NAME)
            return ModelCard.load(readme).data.license if os.path.isfile(readme) else None
        if is_hub_id(base_model):  # one API call (no download retries): the Hub parses the card's YAML for us
            from huggingface_hub import HfApi

            card_data = HfApi(endpoint=endpoint, token=token).model_info(base_model, revision=revision).card_data
            license = getattr(card_data, "license", None) if card_data is not None else None
            return license if isinstance(license, str) and license else None
    except Exception as exc:  # the license is optional metadata: never fail the card on it
        logger.info("Could not read the license of %s: %s", base_model, exc)
    return None
