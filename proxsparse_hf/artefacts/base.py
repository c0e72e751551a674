"""``PrunedModel``: the one model of an output folder, shared by every way of producing a pruned model.

::

    out/
      config.json, model.safetensors, generation_config.json   pruned model (dense weights with zeros), plain transformers
      tokenizer files
      proxsparse_config.json         the recipe (targets, λ, solver, base model id/revision)
      proxsparse_masks.safetensors   boolean 2:4 masks keyed by weight name
      sparsity_report.json           per-layer sparsity + totals
      run_info.json                  method, calibration data, training arguments, hardware, versions, wall time, command
      training_log.json              (ProxSparse) the Trainer's log history
      eval_results.json              (after `proxsparse eval`)

Export, card and push read this folder and never need to know how the mask was found. :func:`save_pruned_output`
builds the folder in a temporary sibling and swaps it into place, so an interrupted save never leaves a half-written
output.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..config import ProxSparseConfig
from ..constants import (
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    MASKS_NAME,
    PERMUTATION_NAME,
    REPORT_NAME,
    RUN_INFO_NAME,
    SUPPORTED_M,
    SUPPORTED_N,
    TRAINING_LOG_NAME,
)
from ..loading import model_revision, resolve_dtype
from ..masks import extract_2to4_masks, is_2to4, load_masks, save_masks
from ..paths import fingerprint_local_model, is_local_path, local_name, scrub_local_paths
from ..report import SparsityReport, sparsity_report
from ..targets import Target, find_targets
from ..utils import atomic_write_json, describe_hardware, library_versions, read_json, regular_files, staging_dir
from .run_info import RunInfo

__all__ = [
    "METADATA_FILES",
    "TOKENIZER_FILES",
    "PrunedModel",
    "load_output_dir",
    "model_dtype",
    "resolve_source",
    "save_pretrained_model",
    "save_pruned_output",
]

logger = logging.getLogger(__name__)

METADATA_FILES = (CONFIG_NAME, REPORT_NAME, RUN_INFO_NAME, EVAL_RESULTS_NAME)
"""Files every artefact carries besides its own (``eval_results.json`` only when the model was evaluated)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
)
"""File name patterns a ``transformers`` tokenizer writes with ``save_pretrained``."""


def _method_names() -> tuple[str, ...]:
    from ..pruners import pruner_names

    return pruner_names()


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """dtype of the model's first floating-point parameter."""
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


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

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(plain_model_config(model), torch_dtype=model.dtype)
    fresh.load_state_dict(model.state_dict(), assign=True)
    fresh.save_pretrained(save_directory, safe_serialization=True, **kwargs)


def plain_model_config(model: nn.Module):
    """A copy of the model's ``transformers`` config describing a plain checkpoint (no GGUF / quantisation)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    for attr in ("gguf_file", "quantization_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = [type(model).__name__]
    dtype = model_dtype(model)
    if dtype is not None:
        config.dtype = dtype
    return config


@dataclass
class PrunedModel:
    """A pruned model and what its output folder records.

    Read from a folder (:func:`load_output_dir`: metadata only, the weights load on :meth:`with_model`) or wrapped
    around an in-memory model (:func:`resolve_source`). Export, card and push take one of these.

    Args:
        config: the recipe (targets, λ, base model id and revision).
        report: sparsity report of the pruned model.
        run_info: facts about the run (:class:`~proxsparse_hf.artefacts.run_info.RunInfo`).
        eval_results: contents of ``eval_results.json`` when the model was evaluated.
        path: the output folder it came from, if any.
        model: the pruned model (dense weights with zeros); None until loaded.
        tokenizer: saved with the artefacts that carry one, when given.
        masks: boolean masks keyed by weight name; None: read from the folder or derived from the weights.
        permutation: the channel permutation folded into the weights before the mask was found, as
            ``{parameter name: (dim, index)}`` (:mod:`proxsparse_hf.permutation.record`); None: read from the folder
            (:data:`~proxsparse_hf.constants.PERMUTATION_NAME`) when it has one.
    """

    config: ProxSparseConfig
    report: SparsityReport
    run_info: RunInfo = field(default_factory=RunInfo)
    eval_results: dict[str, Any] | None = None
    path: str | None = None
    model: nn.Module | None = None
    tokenizer: Any = None
    masks: dict[str, torch.Tensor] | None = None
    permutation: dict[str, tuple[int, torch.Tensor]] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.run_info, RunInfo):
            self.run_info = RunInfo.from_dict(self.run_info)

    @property
    def method(self) -> str:
        """Registered name of the pruner that found the mask."""
        return self.run_info.method

    @property
    def masks_file(self) -> str | None:
        """The folder's ``proxsparse_masks.safetensors``, if any."""
        if self.path is None:
            return None
        path = os.path.join(self.path, MASKS_NAME)
        return path if os.path.isfile(path) else None

    def load_permutation(self) -> dict[str, tuple[int, torch.Tensor]] | None:
        """The channel permutation folded into the weights (given, else the folder's file), or None without one."""
        if self.permutation is not None:
            return dict(self.permutation)
        path = None if self.path is None else os.path.join(self.path, PERMUTATION_NAME)
        if path is None or not os.path.isfile(path):
            return None
        from ..permutation.record import load_index_maps

        return load_index_maps(path)

    def load_masks(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The masks: given ones, else the folder's masks file.

        Raises:
            FileNotFoundError: neither exists.
        """
        if self.masks is not None:
            return {name: mask.to(device) for name, mask in self.masks.items()}
        if self.masks_file is None:
            raise FileNotFoundError(f"{self.path!r} has no {MASKS_NAME}.")
        return load_masks(self.masks_file, device=device)

    def get_masks(self) -> dict[str, torch.Tensor]:
        """The masks, derived from the weights' non-zeros when none were given or saved."""
        if self.masks is not None or self.masks_file is not None:
            return self.load_masks()
        return extract_2to4_masks(self._require_model(), self.config)

    def with_model(self, dtype: str | torch.dtype | None = None) -> PrunedModel:
        """This object with its model loaded (from ``path``) and cast to ``dtype``; an in-memory model is copied
        before casting, never modified."""
        torch_dtype = None if dtype is None else resolve_dtype(dtype)
        if torch_dtype == "auto":
            torch_dtype = None
        if self.model is None:
            if self.path is None:
                raise ValueError("This PrunedModel has neither a model nor a folder to load it from.")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch_dtype or "auto").eval()
            tokenizer = self.tokenizer
            if tokenizer is None and _has_tokenizer(self.path):
                tokenizer = AutoTokenizer.from_pretrained(self.path)
            return replace(self, model=model, tokenizer=tokenizer)
        if torch_dtype is not None and model_dtype(self.model) != torch_dtype:
            return replace(self, model=copy.deepcopy(self.model).to(torch_dtype))
        return self

    def targets(self) -> dict[str, Target]:
        """Target modules keyed by weight (``state_dict``) name."""
        return {t.param_name: t for t in find_targets(self._require_model(), self.config).values()}

    def check_2to4(self) -> None:
        """Verify that every target weight really is 2:4 (what the artefacts and the card claim).

        Raises:
            ValueError: names the target weights that are not 2:4.
        """
        bad = [name for name, t in self.targets().items() if not is_2to4(t.grouped(t.weight.detach()))]
        if bad:
            shown = ", ".join(f"`{n}`" for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            pattern = f"{SUPPORTED_N}:{SUPPORTED_M}"
            raise ValueError(
                f"The model claims {pattern} sparsity but {len(bad)} target weight(s) are not {pattern}: {shown}. "
                "Re-apply the masks (apply_2to4_masks) before exporting."
            )

    def save_metadata(self, directory: str) -> None:
        """Write ``proxsparse_config.json``, ``sparsity_report.json``, ``run_info.json`` and ``eval_results.json``."""
        self.config.save_pretrained(directory)
        self.report.save(os.path.join(directory, REPORT_NAME))
        atomic_write_json(os.path.join(directory, RUN_INFO_NAME), self.run_info.to_dict())
        if self.eval_results is not None:
            atomic_write_json(os.path.join(directory, EVAL_RESULTS_NAME), self.eval_results)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise ValueError("The model is not loaded; call `with_model()` first.")
        return self.model


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES[:4])


def load_output_dir(path: str | os.PathLike) -> PrunedModel:
    """Read an output folder written by :func:`save_pruned_output` (metadata only; see :meth:`PrunedModel.with_model`).

    Raises:
        FileNotFoundError: the folder or its ``proxsparse_config.json`` / ``sparsity_report.json`` is missing.
    """
    path = os.fspath(path)
    for name in (CONFIG_NAME, REPORT_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path!r} is not a proxsparse output folder: {name} is missing.")
    run_info_file = os.path.join(path, RUN_INFO_NAME)
    eval_file = os.path.join(path, EVAL_RESULTS_NAME)
    return PrunedModel(
        config=ProxSparseConfig.from_pretrained(path),
        report=SparsityReport.load(os.path.join(path, REPORT_NAME)),
        run_info=RunInfo.from_dict(read_json(run_info_file, "run info") if os.path.isfile(run_info_file) else None),
        eval_results=read_json(eval_file, "evaluation results") if os.path.isfile(eval_file) else None,
        path=path,
    )


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
    permutation: Mapping[str, tuple[int, torch.Tensor]] | None = None,
) -> PrunedModel:
    """Write the standard output folder for a pruned ``model``.

    Args:
        output_dir: destination; must not exist or be empty unless ``overwrite``.
        model: the pruned model (original weights ⊙ mask).
        tokenizer: saved beside the model when given.
        config: the recipe (for one-shot baselines: the target selection used).
        masks: the 2:4 masks (``{weight_name: bool tensor}``).
        method: a registered pruner name (``proxsparse``, ``magnitude``, ``wanda``, ``sparsegpt``, ...).
        run_info: extra facts for ``run_info.json`` (see :class:`~proxsparse_hf.artefacts.run_info.RunInfo`).
        training_log: the Trainer's ``log_history`` (written as ``training_log.json``).
        overwrite: replace an existing non-empty folder (the old one is removed only after the new one is complete).
        permutation: the channel permutation folded in before the mask was found
            (``PermutationReport.index_maps``), saved as :data:`~proxsparse_hf.constants.PERMUTATION_NAME` so a
            mask-only adapter can replay it on the base model.
    """
    methods = _method_names()
    if method not in methods:
        raise ValueError(f"`method`={method!r} is invalid; allowed: {methods}.")
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.isfile(output_dir):
        raise ValueError(f"`output_dir`={output_dir!r} is a file.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(
            f"`output_dir`={output_dir!r} exists and is not empty; pass overwrite=True to replace it."
        )
    base, sha256 = config.base_model_name_or_path, None
    if is_local_path(base):  # nothing written names a local path: the base name + SHA-256 identify a local base
        sha256 = fingerprint_local_model(base)
        config = replace(config, base_model_name_or_path=local_name(base), revision=None)
    facts = {
        "method": method,
        "base_model": config.base_model_name_or_path,
        "revision": config.revision,
        "versions": library_versions(),
        "hardware": describe_hardware(),
        **scrub_local_paths(dict(run_info or {})),
    }
    if sha256 is not None:
        facts.update(base_model=config.base_model_name_or_path, base_model_sha256=sha256)
    info = RunInfo.from_dict(facts)
    output = PrunedModel(
        config=config, report=sparsity_report(model, config), run_info=info, model=model, tokenizer=tokenizer
    )
    with staging_dir(output_dir, overwrite=overwrite) as staging:
        save_pretrained_model(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        save_masks(masks, os.path.join(staging, MASKS_NAME), metadata={"method": method})
        if permutation:
            from ..permutation.record import save_index_maps

            save_index_maps(permutation, os.path.join(staging, PERMUTATION_NAME))
        output.save_metadata(staging)
        if training_log is not None:
            atomic_write_json(os.path.join(staging, TRAINING_LOG_NAME), training_log)
    logger.info("Saved pruned model (%s) to %s", method, output_dir)
    return load_output_dir(output_dir)


def resolve_source(
    source: str | os.PathLike | nn.Module | PrunedModel,
    *,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    run_info: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> PrunedModel:
    """An output folder, an in-memory pruned model or a :class:`PrunedModel` as a :class:`PrunedModel` with its model
    loaded — what export and push start from.

    A folder is read without following anything: a symbolic link (or special file) inside it is refused, so a link to
    a secret can never be read into an artefact.

    Args:
        source: an output folder, a pruned model, or a :class:`PrunedModel` (its model is loaded if needed).
        tokenizer: tokenizer of an in-memory model (a folder's own tokenizer is used otherwise).
        config: recipe of an in-memory model; default: ``ProxSparseConfig`` with ``target_modules="all-linear"`` and
            the model's ``name_or_path`` / commit hash as base model and revision.
        masks: masks of an in-memory model (derived from its non-zeros when omitted).
        run_info: facts about the run, for the card.
        eval_results: evaluation results, for the card.
        dtype: ``"bfloat16"``, ``"float16"``, ``"float32"``, a ``torch.dtype`` or None (keep). An in-memory model is
            copied before casting; it is never modified.

    Raises:
        FileNotFoundError: the folder is not an output folder.
        ValueError: the folder contains a symbolic link or a special file.
        TypeError: ``source`` has an unsupported type.
    """
    if isinstance(source, PrunedModel):
        if source.model is None and source.path is not None:
            regular_files(source.path)  # refuses links before anything is read
        return source.with_model(dtype)
    if isinstance(source, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(source))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{os.fspath(source)!r} is not a directory (expected a proxsparse output folder).")
        regular_files(path)  # refuses links before anything is read
        meta = load_output_dir(path)
        meta = replace(
            meta,
            config=config or meta.config,
            tokenizer=tokenizer,
            run_info=RunInfo.from_dict(run_info) if run_info is not None else meta.run_info,
            eval_results=dict(eval_results) if eval_results is not None else meta.eval_results,
            masks=dict(masks) if masks is not None else None,
        )
        return meta.with_model(dtype)
    if isinstance(source, nn.Module):
        if config is None:
            name = getattr(source, "name_or_path", None) or getattr(
                getattr(source, "config", None), "_name_or_path", None
            )
            config = ProxSparseConfig(base_model_name_or_path=name or None, revision=model_revision(source))
        info = dict(run_info or {})
        if config.base_model_name_or_path and "base_model" not in info:
            info["base_model"] = config.base_model_name_or_path
        pruned = PrunedModel(
            config=config,
            report=sparsity_report(source, config),
            run_info=RunInfo.from_dict(info),
            eval_results=dict(eval_results) if eval_results is not None else None,
            model=source,
            tokenizer=tokenizer,
            masks=dict(masks) if masks is not None else None,
        )
        return pruned.with_model(dtype)
    raise TypeError(
        f"`source` must be an output folder path, a torch.nn.Module or a PrunedModel, got {type(source).__name__}."
    )
