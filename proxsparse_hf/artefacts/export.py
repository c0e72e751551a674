"""Three ways to share a pruned model, and one loader.

* **dense** — :func:`save_dense`: ``save_pretrained`` output of the pruned model (zeros in place) + tokenizer; loads
  in plain ``transformers``.
* **compact** — :func:`save_compact`: every 2:4 target weight as its kept values (half the elements) plus packed
  pattern codes (0.67 bit per weight, see :mod:`proxsparse_hf.artefacts.packing`), everything else as usual, in
  ``model_2to4.safetensors`` with the index ``proxsparse_compact.json``; :func:`load_pruned` rebuilds the dense
  weights bit for bit.
* **mask** — :func:`save_mask_adapter`: a PEFT-style adapter holding only the packed masks, ``proxsparse_config.json``
  (with the base model id and revision) and a manifest of weight names and shapes; :func:`apply_proxsparse` applies it
  to the base model's original weights.

Every artefact also carries ``proxsparse_config.json``, ``sparsity_report.json`` and, when present, ``run_info.json``
and ``eval_results.json``. The source is the standard output folder (:func:`proxsparse_hf.artefacts.output_dir.load_output_dir`) or
an in-memory model; export never needs to know how the mask was found.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._version import __version__
from ..config import ProxSparseConfig
from ..constants import (
    COMPACT_INDEX_NAME,
    COMPACT_WEIGHTS_NAME,
    EVAL_RESULTS_NAME,
    PACKED_MASKS_NAME,
    REPORT_NAME,
    RUN_INFO_NAME,
    SUPPORTED_M,
    SUPPORTED_N,
)
from ..loading import model_revision, resolve_dtype
from ..masks import apply_2to4_masks, extract_2to4_masks, is_2to4
from ..report import SparsityReport, sparsity_report
from ..targets import Target, find_targets
from .output_dir import load_output_dir, save_pretrained_model
from .packing import GROUPS_PER_BYTE, compress_2to4, decompress_2to4, pack_mask, unpack_mask

__all__ = [
    "ARTEFACTS",
    "MASK_MANIFEST_NAME",
    "PrunedSource",
    "apply_proxsparse",
    "check_2to4",
    "detect_artefact",
    "load_pruned",
    "resolve_source",
    "save_artefact",
    "save_compact",
    "save_dense",
    "save_mask_adapter",
]

logger = logging.getLogger(__name__)

ARTEFACTS = ("dense", "compact", "mask")
MASK_MANIFEST_NAME = "proxsparse_mask_manifest.json"
COMPACT_FORMAT = "proxsparse-2:4-compact"
MASK_FORMAT = "proxsparse-2:4-mask"
FORMAT_VERSION = 1
POSITION_ENCODING = f"base6-{GROUPS_PER_BYTE}-groups-per-byte"
_VALUES_SUFFIX = ".values"
_POSITIONS_SUFFIX = ".positions"
_FINGERPRINT_RTOL = 1e-3
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------------- the source
@dataclass
class PrunedSource:
    """A pruned model ready to export: the model, its tokenizer and the metadata of its output folder.

    Args:
        model: the pruned model (dense weights with zeros).
        config: the recipe (targets, λ, base model id and revision).
        report: sparsity report of ``model``.
        tokenizer: saved with the dense and compact artefacts when given.
        run_info: facts for the card (method, calibration, training arguments, hardware, wall time, command).
        eval_results: contents of ``eval_results.json`` when the model was evaluated.
        masks: boolean masks keyed by weight name (from the output folder); derived from the weights when None.
        path: the output folder it came from, if any.
    """

    model: nn.Module
    config: ProxSparseConfig
    report: SparsityReport
    tokenizer: Any = None
    run_info: dict[str, Any] = field(default_factory=dict)
    eval_results: dict[str, Any] | None = None
    masks: dict[str, torch.Tensor] | None = None
    path: str | None = None

    @property
    def method(self) -> str:
        return str(self.run_info.get("method", "proxsparse"))

    def targets(self) -> dict[str, Target]:
        """Target modules keyed by weight (``state_dict``) name."""
        return {t.param_name: t for t in find_targets(self.model, self.config).values()}


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES)


def resolve_source(
    source: str | os.PathLike | nn.Module | PrunedSource,
    *,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    run_info: Mapping[str, Any] | None = None,
    eval_results: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> PrunedSource:
    """Turn an output folder or an in-memory pruned model into a :class:`PrunedSource`.

    Args:
        source: an output folder written by :func:`proxsparse_hf.artefacts.output_dir.save_pruned_output`, a pruned model, or an
            existing :class:`PrunedSource` (returned as is, cast to ``dtype`` when given).
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
        TypeError: ``source`` has an unsupported type.
    """
    torch_dtype = None if dtype is None else resolve_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = None
    if isinstance(source, PrunedSource):
        if torch_dtype is not None and _model_dtype(source.model) != torch_dtype:
            return replace(source, model=copy.deepcopy(source.model).to(torch_dtype))
        return source
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = os.path.abspath(os.fspath(source))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{os.fspath(source)!r} is not a directory (expected a proxsparse output folder).")
        meta = load_output_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype or "auto").eval()
        if tokenizer is None and _has_tokenizer(path):
            tokenizer = AutoTokenizer.from_pretrained(path)
        return PrunedSource(
            model=model,
            config=config or meta.config,
            report=meta.report,
            tokenizer=tokenizer,
            run_info=dict(run_info if run_info is not None else meta.run_info),
            eval_results=dict(eval_results) if eval_results is not None else meta.eval_results,
            masks=dict(masks) if masks is not None else (meta.load_masks() if meta.masks_file else None),
            path=path,
        )
    if isinstance(source, nn.Module):
        model = source
        if torch_dtype is not None and _model_dtype(model) != torch_dtype:
            model = copy.deepcopy(model).to(torch_dtype)
        if config is None:
            name = getattr(model, "name_or_path", None) or getattr(
                getattr(model, "config", None), "_name_or_path", None
            )
            config = ProxSparseConfig(base_model_name_or_path=name or None, revision=model_revision(model))
        info = dict(run_info or {})
        if config.base_model_name_or_path and "base_model" not in info:
            info["base_model"] = config.base_model_name_or_path
        return PrunedSource(
            model=model,
            config=config,
            report=sparsity_report(model, config),
            tokenizer=tokenizer,
            run_info=info,
            eval_results=dict(eval_results) if eval_results is not None else None,
            masks=dict(masks) if masks is not None else None,
        )
    raise TypeError(
        f"`source` must be an output folder path, a torch.nn.Module or a PrunedSource, got {type(source).__name__}."
    )


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def check_2to4(source: PrunedSource) -> None:
    """Verify that every target weight of the model really is 2:4 (what the artefacts and the card claim).

    Raises:
        ValueError: names the target weights that are not 2:4.
    """
    bad = [name for name, t in source.targets().items() if not is_2to4(t.grouped(t.weight.detach()))]
    if bad:
        shown = ", ".join(f"`{n}`" for n in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"The model claims {SUPPORTED_N}:{SUPPORTED_M} sparsity but {len(bad)} target weight(s) are not "
            f"{SUPPORTED_N}:{SUPPORTED_M}: {shown}. Re-apply the masks (apply_2to4_masks) before exporting."
        )


# ------------------------------------------------------------------------------------------------------------- saving
def _prepare_dir(save_directory: str | os.PathLike, overwrite: bool) -> str:
    path = os.path.abspath(os.fspath(save_directory))
    if os.path.isfile(path):
        raise ValueError(f"`save_directory`={path!r} is a file; a directory is expected.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(
            f"`save_directory`={path!r} exists and is not empty; pass overwrite=True to write into it."
        )
    os.makedirs(path, exist_ok=True)
    return path


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
        fh.write("\n")


def _write_metadata(source: PrunedSource, directory: str, config: ProxSparseConfig | None = None) -> None:
    (config or source.config).save_pretrained(directory)
    source.report.save(os.path.join(directory, REPORT_NAME))
    if source.run_info:
        _write_json(os.path.join(directory, RUN_INFO_NAME), source.run_info)
    if source.eval_results is not None:
        _write_json(os.path.join(directory, EVAL_RESULTS_NAME), source.eval_results)


def _export_config(model: nn.Module):
    """A copy of the model's transformers config that describes a plain checkpoint (no GGUF / quantisation)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    for attr in ("gguf_file", "quantization_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.architectures = [type(model).__name__]
    dtype = _model_dtype(model)
    if dtype is not None:
        config.dtype = dtype
    return config


def save_dense(
    source: str | os.PathLike | nn.Module | PrunedSource,
    save_directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    overwrite: bool = False,
) -> str:
    """Write the dense pruned checkpoint (``save_pretrained`` output, zeros in place) + tokenizer + metadata.

    Loads with ``AutoModelForCausalLM.from_pretrained(save_directory)``; no dependency on proxsparse-hf.

    Args:
        source: output folder, pruned model or :class:`PrunedSource`.
        save_directory: destination (must be empty unless ``overwrite``).
        dtype: cast floating-point weights (e.g. ``"bfloat16"``); None keeps them.
        tokenizer: tokenizer of an in-memory model.
        config: recipe of an in-memory model.
        overwrite: allow a non-empty destination.

    Returns:
        The destination path.

    Raises:
        ValueError: a target weight is not 2:4.
    """
    src = resolve_source(source, tokenizer=tokenizer, config=config, dtype=dtype)
    check_2to4(src)
    path = _prepare_dir(save_directory, overwrite)
    save_pretrained_model(src.model, path)
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(path)
    _write_metadata(src, path)
    logger.info("Saved dense pruned checkpoint to %s", path)
    return path


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def save_compact(
    source: str | os.PathLike | nn.Module | PrunedSource,
    save_directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    overwrite: bool = False,
) -> str:
    """Write the compact 2:4 checkpoint: kept values + packed positions for every 2:4 target, the rest as usual.

    Files: ``config.json`` (+ ``generation_config.json``), tokenizer, ``model_2to4.safetensors``,
    ``proxsparse_compact.json`` and the metadata files. See the README section "Sharing pruned models" for the format.
    :func:`load_pruned` rebuilds the exact dense weights.

    Args: as :func:`save_dense`.

    Returns:
        The destination path.

    Raises:
        ValueError: a target weight is not 2:4, or a tensor name collides with a compact entry name.
    """
    src = resolve_source(source, tokenizer=tokenizer, config=config, dtype=dtype)
    check_2to4(src)
    targets = src.targets()
    path = _prepare_dir(save_directory, overwrite)
    tensors: dict[str, torch.Tensor] = {}
    compressed: dict[str, dict[str, Any]] = {}
    stored_dense: list[str] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    state = src.model.state_dict()
    for name, tensor in state.items():
        key = _storage_key(tensor)
        if key in seen:  # tied weights are stored once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensor = tensor.detach().to("cpu")
        target = targets.get(name)
        if target is not None:
            try:
                values, positions = compress_2to4(tensor, target.transposed)
            except ValueError as exc:  # numerically 2:4 but with -0.0 outside the kept pair: keep it exact
                warnings.warn(f"`{name}` is stored dense in the compact checkpoint: {exc}", stacklevel=2)
                stored_dense.append(name)
            else:
                tensors[name + _VALUES_SUFFIX] = values
                tensors[name + _POSITIONS_SUFFIX] = positions
                compressed[name] = {"shape": list(tensor.shape), "transposed": target.transposed}
                continue
        tensors[name] = tensor.contiguous()
    clashes = sorted(n for n in compressed if (n + _VALUES_SUFFIX) in state or (n + _POSITIONS_SUFFIX) in state)
    if clashes:
        raise ValueError(f"Compact entry names collide with existing tensors for {clashes}.")
    save_file(
        tensors, os.path.join(path, COMPACT_WEIGHTS_NAME), metadata={"format": "pt", "proxsparse": COMPACT_FORMAT}
    )
    index = {
        "format": COMPACT_FORMAT,
        "format_version": FORMAT_VERSION,
        "pattern": f"{SUPPORTED_N}:{SUPPORTED_M}",
        "position_encoding": POSITION_ENCODING,
        "weights_file": COMPACT_WEIGHTS_NAME,
        "dtype": str(_model_dtype(src.model)).replace("torch.", ""),
        "architecture": type(src.model).__name__,
        "compressed": compressed,
        "stored_dense_targets": stored_dense,
        "aliases": aliases,
        "proxsparse_version": __version__,
    }
    _write_json(os.path.join(path, COMPACT_INDEX_NAME), index)
    _export_config(src.model).save_pretrained(path)
    generation_config = getattr(src.model, "generation_config", None)
    if generation_config is not None:
        try:
            generation_config.save_pretrained(path)
        except (ValueError, TypeError) as exc:  # an invalid generation config must not block the export
            logger.warning("generation_config not saved: %s", exc)
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(path)
    _write_metadata(src, path)
    logger.info("Saved compact 2:4 checkpoint (%d compressed weights) to %s", len(compressed), path)
    return path


def _weights_updated(run_info: Mapping[str, Any]) -> bool:
    """Whether run_info says the kept weights were changed (e.g. SparseGPT with weight updates)."""
    if run_info.get("update_weights") is True:
        return True
    return any(isinstance(v, Mapping) and v.get("update_weights") is True for v in run_info.values())


def save_mask_adapter(
    source: str | os.PathLike | nn.Module | PrunedSource,
    save_directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    revision: str | None = None,
    config: ProxSparseConfig | None = None,
    overwrite: bool = False,
) -> str:
    """Write the mask-only adapter: ``proxsparse_config.json`` + packed masks + manifest + metadata.

    The manifest records each weight's name, shape, layout and a fingerprint of the kept original values (sum of
    their magnitudes) so :func:`apply_proxsparse` can refuse a different base model.

    Args:
        source: output folder, pruned model or :class:`PrunedSource`.
        save_directory: destination (must be empty unless ``overwrite``).
        base_model_name_or_path: base model id recorded in the adapter (default: the config's).
        revision: base model revision / commit hash (default: the config's).
        config: recipe of an in-memory model.
        overwrite: allow a non-empty destination.

    Raises:
        ValueError: no base model is known, the weights were updated (not a pure mask), a mask is not exact 2:4, or
            the masks disagree with the pruned weights.
    """
    src = resolve_source(source, config=config)
    check_2to4(src)
    if _weights_updated(src.run_info):
        raise ValueError(
            "The kept weights of this model were updated (run_info says update_weights=True), so a mask "
            "applied to the "
            "base model would not reproduce it; share the dense or compact artefact instead."
        )
    adapter_config = replace(
        src.config,
        base_model_name_or_path=base_model_name_or_path or src.config.base_model_name_or_path,
        revision=revision if revision is not None else src.config.revision,
    )
    if not adapter_config.base_model_name_or_path:
        raise ValueError(
            "`base_model_name_or_path` is unknown: a mask adapter must name the model it applies to. Pass "
            "base_model_name_or_path='org/model' (and revision=...)."
        )
    targets = src.targets()
    masks = src.masks if src.masks is not None else extract_2to4_masks(src.model, src.config)
    if set(masks) != set(targets):
        missing, extra = sorted(set(targets) - set(masks)), sorted(set(masks) - set(targets))
        raise ValueError(f"Masks do not match the targets: missing {missing[:5]}, unexpected {extra[:5]}.")
    path = _prepare_dir(save_directory, overwrite)
    packed: dict[str, torch.Tensor] = {}
    weights: dict[str, dict[str, Any]] = {}
    for name, target in targets.items():
        weight = target.weight.detach().to("cpu")
        mask = masks[name].to("cpu", torch.bool)
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"Mask for `{name}` has shape {tuple(mask.shape)} but the weight is {tuple(weight.shape)}."
            )
        if bool(((weight != 0) & ~mask).any()):
            raise ValueError(f"The mask of `{name}` disagrees with the pruned weights (non-zeros outside the mask).")
        packed[name] = pack_mask(mask, target.transposed)
        weights[name] = {
            "shape": list(weight.shape),
            "transposed": target.transposed,
            "kept_abs_sum": float(weight.double().abs().sum()),
        }
    save_file(packed, os.path.join(path, PACKED_MASKS_NAME), metadata={"format": MASK_FORMAT})
    model_config = getattr(src.model, "config", None)
    manifest = {
        "format": MASK_FORMAT,
        "format_version": FORMAT_VERSION,
        "pattern": f"{SUPPORTED_N}:{SUPPORTED_M}",
        "position_encoding": POSITION_ENCODING,
        "masks_file": PACKED_MASKS_NAME,
        "base_model_name_or_path": adapter_config.base_model_name_or_path,
        "revision": adapter_config.revision,
        "model_type": getattr(model_config, "model_type", None),
        "architecture": type(src.model).__name__,
        "weights": weights,
        "proxsparse_version": __version__,
    }
    _write_json(os.path.join(path, MASK_MANIFEST_NAME), manifest)
    _write_metadata(src, path, config=adapter_config)
    logger.info("Saved mask-only adapter (%d masks) to %s", len(packed), path)
    return path


def save_artefact(
    artefact: str,
    source: str | os.PathLike | nn.Module | PrunedSource,
    save_directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> str:
    """Dispatch to :func:`save_dense`, :func:`save_compact` or :func:`save_mask_adapter` by name."""
    if artefact not in ARTEFACTS:
        raise ValueError(f"`artefact`={artefact!r} is invalid; allowed: {ARTEFACTS}.")
    if artefact == "mask":
        return save_mask_adapter(source, save_directory, overwrite=overwrite, **kwargs)
    writer = save_dense if artefact == "dense" else save_compact
    return writer(source, save_directory, dtype=dtype, overwrite=overwrite, **kwargs)


# ------------------------------------------------------------------------------------------------------------ loading
def _resolve_dir(
    repo_or_dir: str | os.PathLike, *, revision: str | None, token: str | bool | None, cache_dir: str | None
) -> str:
    path = os.fspath(repo_or_dir)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; expected a directory or a Hub repo id.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError as exc:
        raise ValueError(f"{path!r} is neither an existing directory nor a valid Hub repo id: {exc}") from exc
    try:
        return snapshot_download(repo_id=path, revision=revision, token=token, cache_dir=cache_dir)
    except Exception as exc:
        raise ValueError(
            f"{path!r} is not a local directory and downloading it from the Hub (revision={revision!r}) failed: {exc}"
        ) from exc


def detect_artefact(path: str | os.PathLike) -> str:
    """``"compact"``, ``"mask"`` or ``"dense"`` for a local artefact folder.

    Raises:
        ValueError: the folder holds none of the three.
    """
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, COMPACT_INDEX_NAME)):
        return "compact"
    if os.path.isfile(os.path.join(path, MASK_MANIFEST_NAME)):
        return "mask"
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    weights = (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    )
    if has_config and any(os.path.isfile(os.path.join(path, w)) for w in weights):
        return "dense"
    raise ValueError(
        f"{path!r} holds no pruned-model artefact: expected {COMPACT_INDEX_NAME} (compact), "
        f"{MASK_MANIFEST_NAME} (mask "
        f"adapter) or config.json + model weights (dense)."
    )


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"Cannot read the {what} {path!r}: {exc}") from exc


def _check_format(data: Mapping[str, Any], expected: str, path: str) -> None:
    if data.get("format") != expected:
        raise ValueError(f"{path!r} has format {data.get('format')!r}; expected {expected!r}.")
    if data.get("format_version") != FORMAT_VERSION or data.get("position_encoding") != POSITION_ENCODING:
        raise ValueError(
            f"{path!r} uses format version {data.get('format_version')!r} / position encoding "
            f"{data.get('position_encoding')!r}; proxsparse-hf {__version__} reads version {FORMAT_VERSION} / "
            f"{POSITION_ENCODING!r}. Upgrade proxsparse-hf."
        )


def _causal_lm_class(config):
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError as exc:
        raise ValueError(f"No causal-LM class is known for model_type {config.model_type!r}.") from exc


def _load_compact(path: str, dtype: str | torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig

    index_path = os.path.join(path, COMPACT_INDEX_NAME)
    index = _read_json(index_path, "compact index")
    _check_format(index, COMPACT_FORMAT, index_path)
    tensors = load_file(os.path.join(path, index.get("weights_file", COMPACT_WEIGHTS_NAME)))
    state: dict[str, torch.Tensor] = {}
    for name, info in index["compressed"].items():
        try:
            values, positions = tensors.pop(name + _VALUES_SUFFIX), tensors.pop(name + _POSITIONS_SUFFIX)
        except KeyError as exc:
            raise ValueError(f"{path!r}: the compact weights file lacks the entries of `{name}`.") from exc
        state[name] = decompress_2to4(values, positions, tuple(info["shape"]), bool(info["transposed"]))
    state.update(tensors)
    for alias, origin in index.get("aliases", {}).items():
        state[alias] = state[origin]
    config = AutoConfig.from_pretrained(path)
    torch_dtype = resolve_dtype(dtype) if dtype is not None else getattr(torch, index.get("dtype") or "float32")
    if torch_dtype == "auto":
        torch_dtype = getattr(torch, index.get("dtype") or "float32")
    cls = _causal_lm_class(config)
    model, info = cls.from_pretrained(
        None, config=config, state_dict=state, dtype=torch_dtype, output_loading_info=True
    )
    missing = [k for k in info.get("missing_keys", []) if k not in index.get("aliases", {})]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise ValueError(
            f"The compact checkpoint {path!r} does not fit {cls.__name__}: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(info.get('unexpected_keys', []))[:5]}, mismatched {list(info.get('mismatched_keys', []))[:5]}."
        )
    return model.eval()


def load_pruned(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    base_model: str | nn.Module | None = None,
) -> nn.Module:
    """Load any of the three artefacts as a ready-to-use pruned ``transformers`` model.

    Args:
        repo_or_dir: a local artefact folder (tried first) or a Hub repo id.
        revision: Hub branch, tag or commit of the artefact repo.
        token: Hub token.
        cache_dir: Hub cache directory.
        dtype: weights dtype; default: as stored (compact/dense) or ``"auto"`` (base model of a mask adapter).
        device: move the model there.
        base_model: for a mask adapter, the base model (id, path or model) instead of the one the adapter names.

    Returns:
        The pruned ``PreTrainedModel`` in eval mode; dense/compact weights are exactly the ones that were saved.
    """
    path = _resolve_dir(repo_or_dir, revision=revision, token=token, cache_dir=cache_dir)
    kind = detect_artefact(path)
    if kind == "mask":
        model = apply_proxsparse(base_model, path, token=token, dtype=dtype)
    elif kind == "compact":
        model = _load_compact(path, dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)).eval()
    if device is not None:
        model.to(device)
    return model


def _load_base(name_or_path: str, revision: str | None, token: str | bool | None, dtype) -> nn.Module:
    """The base model only (no tokenizer): a ``.gguf`` file, a local folder or a Hub id at the recorded revision."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        folder, kwargs["gguf_file"] = os.path.split(os.path.abspath(name_or_path))
    elif os.path.isdir(name_or_path):
        folder = name_or_path
    else:
        folder = name_or_path
        kwargs.update(revision=revision, token=token)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as exc:
        raise ValueError(f"Cannot load the base model {name_or_path!r} (revision={revision!r}): {exc}") from exc


def apply_proxsparse(
    base_model: str | nn.Module | None,
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    dtype: str | torch.dtype | None = None,
    check_revision: bool = True,
    verify_weights: bool = True,
) -> nn.Module:
    """Apply a mask-only adapter to the base model's original weights (in place for a model) and return the model.

    Args:
        base_model: the base model, its id / path, or None to load the one recorded in the adapter (at the recorded
            revision).
        repo_or_dir: the adapter folder or Hub repo id.
        revision: Hub revision of the adapter repo.
        token: Hub token (adapter and base model).
        cache_dir: Hub cache directory.
        dtype: dtype for loading the base model by id.
        check_revision: refuse a base model whose commit hash differs from the recorded one.
        verify_weights: refuse a base model whose kept weights differ from the ones the mask was learned on (sum of
            kept magnitudes per weight, relative tolerance 1e-3, so a bf16 copy of an fp32 base is accepted).

    Raises:
        ValueError: a weight is missing or has another shape, the revision differs, or the weights differ.
    """
    path = _resolve_dir(repo_or_dir, revision=revision, token=token, cache_dir=cache_dir)
    manifest_path = os.path.join(path, MASK_MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{os.fspath(repo_or_dir)!r} is not a mask adapter: {MASK_MANIFEST_NAME} is missing.")
    manifest = _read_json(manifest_path, "mask manifest")
    _check_format(manifest, MASK_FORMAT, manifest_path)
    recorded_revision = manifest.get("revision")
    if base_model is None:
        base_model = manifest.get("base_model_name_or_path")
        if not base_model:
            raise ValueError(f"The adapter {path!r} names no base model; pass `base_model`.")
    if isinstance(base_model, (str, os.PathLike)):
        model = _load_base(os.fspath(base_model), recorded_revision, token, dtype)
    elif isinstance(base_model, nn.Module):
        model = base_model
    else:
        raise TypeError(f"`base_model` must be a model, a model id or a path, got {type(base_model).__name__}.")

    actual_revision = model_revision(model)
    if recorded_revision and actual_revision and recorded_revision != actual_revision:
        message = (
            f"Revision mismatch: the mask was learned on {manifest.get('base_model_name_or_path')!r} at revision "
            f"{recorded_revision!r}, but the base model is at {actual_revision!r}."
        )
        if check_revision:
            raise ValueError(message + " Load the base model at the recorded revision (or pass check_revision=False).")
        warnings.warn(message, stacklevel=2)
    elif recorded_revision and not actual_revision:
        logger.info("The base model has no commit hash; revision %s cannot be verified", recorded_revision)

    params = dict(model.named_parameters())
    weights: dict[str, dict[str, Any]] = manifest["weights"]
    missing = sorted(n for n in weights if n not in params)
    if missing:
        raise ValueError(
            f"The base model {type(model).__name__} lacks {len(missing)} weight(s) the mask was learned on, e.g. "
            f"`{missing[0]}`: it is not the model named in the adapter ({manifest.get('base_model_name_or_path')!r})."
        )
    for name, info in weights.items():
        if list(params[name].shape) != list(info["shape"]):
            raise ValueError(
                f"Shape mismatch for `{name}`: the mask was learned on shape {tuple(info['shape'])}, the base "
                "model has "
                f"{tuple(params[name].shape)}."
            )
    packed = load_file(os.path.join(path, manifest.get("masks_file", PACKED_MASKS_NAME)))
    masks = {
        name: unpack_mask(packed[name], tuple(info["shape"]), bool(info["transposed"]))
        for name, info in weights.items()
    }
    if verify_weights:
        for name, info in weights.items():
            expected = info.get("kept_abs_sum")
            if expected is None:
                continue
            with torch.no_grad():
                weight = params[name].detach()
                actual = float(torch.where(masks[name].to(weight.device), weight, 0).double().abs().sum())
            if not math.isclose(actual, expected, rel_tol=_FINGERPRINT_RTOL, abs_tol=1e-12):
                raise ValueError(
                    f"The base model's weights differ from the ones the mask was learned on: at `{name}` the kept "
                    f"weights sum to {actual:.6g} in magnitude, the adapter recorded {expected:.6g}. Use the "
                    "base model "
                    f"{manifest.get('base_model_name_or_path')!r} (or pass verify_weights=False)."
                )
    apply_2to4_masks(model, masks)
    logger.info("Applied %d 2:4 masks from %s", len(masks), path)
    return model.eval()
