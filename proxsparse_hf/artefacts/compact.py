"""The compact 2:4 artefact: every 2:4 target weight as its kept values (half the elements) plus packed pattern codes
(0.67 bit per weight, see :mod:`proxsparse_hf.artefacts.packing`), everything else as usual, in
``model_2to4.safetensors`` with the index ``proxsparse_compact.json``. Loading rebuilds the dense weights bit for bit.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .._version import __version__
from ..config import ProxSparseConfig
from ..constants import COMPACT_INDEX_NAME, COMPACT_WEIGHTS_NAME
from ..loading import resolve_dtype
from ..utils import atomic_write_json, read_json, save_safetensors_atomic
from .base import TOKENIZER_FILES, PrunedModel, model_dtype, plain_model_config
from .export import save_artefact
from .packing import check_format_header, compress_2to4, decompress_2to4, format_header
from .registry import ArtefactFormat, register_artefact

__all__ = ["COMPACT_FORMAT", "CompactFormat", "save_compact"]

logger = logging.getLogger(__name__)

COMPACT_FORMAT = "proxsparse-2:4-compact"
_VALUES_SUFFIX = ".values"
_POSITIONS_SUFFIX = ".positions"


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


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


@register_artefact
class CompactFormat(ArtefactFormat):
    """Kept values + packed 2:4 positions for every 2:4 target weight; rebuilt bit for bit by ``load_pruned``."""

    name = "compact"
    label = "compact 2:4 checkpoint"
    files = (COMPACT_WEIGHTS_NAME, COMPACT_INDEX_NAME, "config.json", "generation_config.json", *TOKENIZER_FILES)
    base_model_relation = "quantized"
    card_tag = "compact"
    detect_priority = 10

    def detect(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, COMPACT_INDEX_NAME))

    def save(self, source: PrunedModel, directory: str) -> None:
        targets = source.targets()
        tensors: dict[str, torch.Tensor] = {}
        compressed: dict[str, dict[str, Any]] = {}
        stored_dense: list[str] = []
        aliases: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        state = source.model.state_dict()
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
        save_safetensors_atomic(
            tensors, os.path.join(directory, COMPACT_WEIGHTS_NAME), {"format": "pt", "proxsparse": COMPACT_FORMAT}
        )
        index = {
            **format_header(COMPACT_FORMAT),
            "weights_file": COMPACT_WEIGHTS_NAME,
            "dtype": str(model_dtype(source.model)).replace("torch.", ""),
            "architecture": type(source.model).__name__,
            "compressed": compressed,
            "stored_dense_targets": stored_dense,
            "aliases": aliases,
            "proxsparse_version": __version__,
        }
        atomic_write_json(os.path.join(directory, COMPACT_INDEX_NAME), index)
        plain_model_config(source.model).save_pretrained(directory)
        generation_config = getattr(source.model, "generation_config", None)
        if generation_config is not None:
            try:
                generation_config.save_pretrained(directory)
            except (ValueError, TypeError) as exc:  # an invalid generation config must not block the export
                logger.warning("generation_config not saved: %s", exc)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(directory)
        logger.info("Compact 2:4 checkpoint: %d compressed weights", len(compressed))

    def load(self, path, *, dtype=None, base_model=None, token=None) -> nn.Module:
        from transformers import AutoConfig

        index_path = os.path.join(path, COMPACT_INDEX_NAME)
        index = read_json(index_path, "compact index")
        check_format_header(index, COMPACT_FORMAT, index_path)
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
        stored = getattr(torch, index.get("dtype") or "float32")
        torch_dtype = resolve_dtype(dtype) if dtype is not None else stored
        if torch_dtype == "auto":
            torch_dtype = stored
        cls = _causal_lm_class(config)
        model, info = cls.from_pretrained(
            None, config=config, state_dict=state, dtype=torch_dtype, output_loading_info=True
        )
        missing = [k for k in info.get("missing_keys", []) if k not in index.get("aliases", {})]
        if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
            raise ValueError(
                f"The compact checkpoint {path!r} does not fit {cls.__name__}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(info.get('unexpected_keys', []))[:5]}, mismatched "
                f"{list(info.get('mismatched_keys', []))[:5]}."
            )
        return model.eval()

    def card_description(self, revision: str | None) -> str:
        return (
            "This repository holds the **compact 2:4 checkpoint**: every 2:4 target weight is stored as its kept "
            "values (half the elements) plus packed positions (0.67 bit per weight); everything else is stored as "
            "usual. Loading rebuilds the exact dense weights."
        )

    def how_to_load(self, repo: str, base_model: str | None, revision: str | None) -> str:
        return (
            "The compact 2:4 format needs `proxsparse-hf` (`pip install proxsparse-hf`); it rebuilds the exact dense "
            "weights and returns a regular `transformers` model:\n\n```python\n"
            "from proxsparse_hf import load_pruned\nfrom transformers import AutoTokenizer\n\n"
            f'model = load_pruned("{repo}", dtype="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n```'
        )


def save_compact(
    source: str | os.PathLike | nn.Module | PrunedModel,
    save_directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    overwrite: bool = False,
) -> str:
    """Write the compact 2:4 checkpoint: kept values + packed positions for every 2:4 target, the rest as usual.

    Files: ``config.json`` (+ ``generation_config.json``), tokenizer, ``model_2to4.safetensors``,
    ``proxsparse_compact.json`` and the metadata files. :func:`~proxsparse_hf.artefacts.loading.load_pruned` rebuilds
    the exact dense weights. Arguments as :func:`~proxsparse_hf.artefacts.dense.save_dense`.

    Raises:
        ValueError: a target weight is not 2:4, or a tensor name collides with a compact entry name.
    """
    return save_artefact(
        "compact", source, save_directory, dtype=dtype, tokenizer=tokenizer, config=config, overwrite=overwrite
    )
