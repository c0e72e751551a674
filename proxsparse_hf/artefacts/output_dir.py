"""The one output-folder layout shared by every way of producing a pruned model (``learn``, ``prune --method ...``).

::

    out/
      config.json, model.safetensors, generation_config.json   pruned model (dense weights with zeros), plain transformers
      tokenizer files
      proxsparse_config.json     the recipe (targets, λ, solver, base model id/revision)
      proxsparse_masks.safetensors   boolean 2:4 masks keyed by weight name
      sparsity_report.json       per-layer sparsity + totals
      run_info.json              method, calibration data, training arguments, hardware, versions, wall time, command
      eval_results.json          (after `proxsparse eval`)

Export, card and push read this folder and never need to know how the mask was found. The folder is written into a
temporary sibling and renamed into place, so an interrupted save never leaves a half-written output.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..config import ProxSparseConfig
from ..constants import (
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    MASKS_NAME,
    METHODS,
    REPORT_NAME,
    RUN_INFO_NAME,
    TRAINING_LOG_NAME,
)
from ..masks import load_masks, save_masks
from ..report import SparsityReport, sparsity_report

__all__ = [
    "PrunedOutput",
    "describe_hardware",
    "library_versions",
    "load_output_dir",
    "save_pretrained_model",
    "save_pruned_output",
]

logger = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that matter for reproducing a run."""
    versions = {"python": platform.python_version(), "proxsparse_hf": __version__, "torch": torch.__version__}
    for name in ("transformers", "huggingface_hub", "safetensors", "accelerate", "peft", "datasets"):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = __import__(name)
            except ImportError:
                continue
        versions[name] = getattr(module, "__version__", "unknown")
    return versions


def describe_hardware() -> dict[str, Any]:
    """CPU/GPU description for results files."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = None
    return info


def save_pretrained_model(model: nn.Module, save_directory: str, **kwargs: Any) -> None:
    """``model.save_pretrained`` as safetensors; models loaded from GGUF (which refuse it) are rebuilt from their config
    and saved through a fresh instance holding the same state dict."""
    try:
        model.save_pretrained(save_directory, safe_serialization=True, **kwargs)
        return
    except (ValueError, RuntimeError, NotImplementedError, TypeError) as exc:
        if not hasattr(model, "config"):
            raise
        logger.info("save_pretrained refused (%s); saving through a model rebuilt from its config", exc)
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    for attr in ("gguf_file", "quantization_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, torch_dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.save_pretrained(save_directory, safe_serialization=True, **kwargs)


@dataclass
class PrunedOutput:
    """What an output folder holds (model weights are loaded separately, see :func:`proxsparse_hf.load_pruned`)."""

    path: str
    config: ProxSparseConfig
    report: SparsityReport
    run_info: dict[str, Any] = field(default_factory=dict)
    eval_results: dict[str, Any] | None = None
    masks_file: str | None = None

    @property
    def method(self) -> str:
        return self.run_info.get("method", "proxsparse")

    def load_masks(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        if self.masks_file is None:
            raise FileNotFoundError(f"{self.path!r} has no {MASKS_NAME}.")
        return load_masks(self.masks_file, device=device)


def save_pruned_output(
    output_dir: str | os.PathLike,
    model: nn.Module,
    tokenizer=None,
    *,
    config: ProxSparseConfig,
    masks: Mapping[str, torch.Tensor],
    method: str,
    run_info: Mapping[str, Any] | None = None,
    training_log: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> PrunedOutput:
    """Write the standard output folder for a pruned ``model``.

    Args:
        output_dir: destination; must not exist or be empty unless ``overwrite``.
        model: the pruned model (original weights ⊙ mask).
        tokenizer: saved beside the model when given.
        config: the recipe (for one-shot baselines: the target selection used).
        masks: the 2:4 masks (``{weight_name: bool tensor}``).
        method: one of ``proxsparse``, ``magnitude``, ``wanda``, ``sparsegpt``.
        run_info: extra facts for ``run_info.json`` (calibration data, training arguments, wall time, command, ...).
        training_log: the Trainer's ``log_history`` (written as ``training_log.json``).
        overwrite: replace an existing non-empty folder (the old one is removed only after the new one is complete).
    """
    if method not in METHODS:
        raise ValueError(f"`method`={method!r} is invalid; allowed: {METHODS}.")
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.isfile(output_dir):
        raise ValueError(f"`output_dir`={output_dir!r} is a file.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(
            f"`output_dir`={output_dir!r} exists and is not empty; pass overwrite=True to replace it."
        )
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    report = sparsity_report(model, config)
    info = {
        "method": method,
        "base_model": config.base_model_name_or_path,
        "revision": config.revision,
        "versions": library_versions(),
        "hardware": describe_hardware(),
        **dict(run_info or {}),
    }
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.staging-", dir=parent)
    try:
        save_pretrained_model(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        config.save_pretrained(staging)
        save_masks(masks, os.path.join(staging, MASKS_NAME), metadata={"method": method})
        report.save(os.path.join(staging, REPORT_NAME))
        _write_json(os.path.join(staging, RUN_INFO_NAME), info)
        if training_log is not None:
            _write_json(os.path.join(staging, TRAINING_LOG_NAME), training_log)
        if os.path.isdir(output_dir):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.replace(output_dir, os.path.join(trash, "old"))
            os.replace(staging, output_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Saved pruned model (%s) to %s", method, output_dir)
    return load_output_dir(output_dir)


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")


def load_output_dir(path: str | os.PathLike) -> PrunedOutput:
    """Read the metadata of an output folder written by :func:`save_pruned_output`.

    Raises:
        FileNotFoundError: the folder or its ``proxsparse_config.json`` / ``sparsity_report.json`` is missing.
    """
    path = os.fspath(path)
    for name in (CONFIG_NAME, REPORT_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path!r} is not a proxsparse output folder: {name} is missing.")
    run_info: dict[str, Any] = {}
    if os.path.isfile(os.path.join(path, RUN_INFO_NAME)):
        with open(os.path.join(path, RUN_INFO_NAME), encoding="utf-8") as fh:
            run_info = json.load(fh)
    eval_results = None
    if os.path.isfile(os.path.join(path, EVAL_RESULTS_NAME)):
        with open(os.path.join(path, EVAL_RESULTS_NAME), encoding="utf-8") as fh:
            eval_results = json.load(fh)
    masks_file = os.path.join(path, MASKS_NAME)
    return PrunedOutput(
        path=path,
        config=ProxSparseConfig.from_pretrained(path),
        report=SparsityReport.load(os.path.join(path, REPORT_NAME)),
        run_info=run_info,
        eval_results=eval_results,
        masks_file=masks_file if os.path.isfile(masks_file) else None,
    )
