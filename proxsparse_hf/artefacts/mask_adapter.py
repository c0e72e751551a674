"""The mask-only adapter: the packed 2:4 masks (0.67 bit per weight), ``proxsparse_config.json`` (with the base model
id and revision) and a manifest of weight names, shapes and fingerprints; :func:`apply_proxsparse` applies it to the
base model's original weights. A mask found after a channel permutation (``proxsparse learn``'s default) carries that
permutation (:data:`~proxsparse_hf.constants.PERMUTATION_NAME`, a few KB of indices): the base model is re-indexed
the same way first, which leaves its function unchanged, and the masks then apply to its weights.

A mask learned on a local base model records the base name and SHA-256 of that model instead of its path; applying
it then needs the base model passed explicitly (``apply_proxsparse(base_model, adapter)``).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .._version import __version__
from ..config import ProxSparseConfig
from ..constants import PACKED_MASKS_NAME, PERMUTATION_NAME
from ..loading import model_revision, resolve_dtype
from ..masks import apply_2to4_masks
from ..permutation.record import apply_index_maps, check_index_maps, load_index_maps, save_index_maps
from ..utils import atomic_write_json, read_json, save_safetensors_atomic
from .base import PrunedModel
from .export import save_artefact
from .loading import resolve_artefact_dir
from .packing import check_format_header, format_header, pack_mask, unpack_mask
from .publish import is_hub_id
from .registry import ArtefactFormat, register_artefact

__all__ = ["MASK_FORMAT", "MASK_MANIFEST_NAME", "MaskAdapterFormat", "apply_proxsparse", "save_mask_adapter"]

logger = logging.getLogger(__name__)

MASK_MANIFEST_NAME = "proxsparse_mask_manifest.json"
MASK_FORMAT = "proxsparse-2:4-mask"
_FINGERPRINT_RTOL = 1e-3


@register_artefact
class MaskAdapterFormat(ArtefactFormat):
    """Only the packed masks, applied to the base model's original weights by :func:`apply_proxsparse`."""

    name = "mask"
    label = "mask-only adapter"
    files = (PACKED_MASKS_NAME, MASK_MANIFEST_NAME, PERMUTATION_NAME)
    base_model_relation = "adapter"
    card_tag = "mask-adapter"
    casts_dtype = False
    detect_priority = 10

    def detect(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, MASK_MANIFEST_NAME))

    def validate(self, source: PrunedModel) -> None:
        source.check_2to4()
        if source.run_info.weights_updated:
            raise ValueError(
                "The kept weights of this model were updated (run_info says update_weights=True), so a mask applied "
                "to the base model would not reproduce it; share the dense or compact artefact instead."
            )
        permuted = source.run_info.permuted_layers
        if permuted:
            maps = source.load_permutation() or {}
            missing = [name for name in permuted if f"{name}.weight" not in maps]
            if missing:
                raise ValueError(
                    f"The input channels of {len(permuted)} layers were permuted before pruning (run_info says "
                    f"`permutation`) but the permutation of `{missing[0]}` was not saved with the model, so a mask "
                    "applied to the base model would not reproduce it; share the dense or compact artefact, or learn "
                    "again with --no-permute."
                )
        if not source.config.base_model_name_or_path:
            raise ValueError(
                "`base_model_name_or_path` is unknown: a mask adapter must name the model it applies to. Pass "
                "base_model_name_or_path='org/model' (and revision=...)."
            )

    def save(self, source: PrunedModel, directory: str) -> None:
        targets = source.targets()
        masks = source.get_masks()
        if set(masks) != set(targets):
            missing, extra = sorted(set(targets) - set(masks)), sorted(set(masks) - set(targets))
            raise ValueError(f"Masks do not match the targets: missing {missing[:5]}, unexpected {extra[:5]}.")
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
                raise ValueError(
                    f"The mask of `{name}` disagrees with the pruned weights (non-zeros outside the mask)."
                )
            packed[name] = pack_mask(mask, target.transposed)
            weights[name] = {
                "shape": list(weight.shape),
                "transposed": target.transposed,
                "kept_abs_sum": float(weight.double().abs().sum()),
            }
        save_safetensors_atomic(packed, os.path.join(directory, PACKED_MASKS_NAME), {"format": MASK_FORMAT})
        permutation = source.load_permutation() if source.run_info.permuted_layers else None
        if permutation:
            save_index_maps(permutation, os.path.join(directory, PERMUTATION_NAME))
        model_config = getattr(source.model, "config", None)
        manifest = {
            **format_header(MASK_FORMAT),
            "masks_file": PACKED_MASKS_NAME,
            "base_model_name_or_path": source.config.base_model_name_or_path,
            "revision": source.config.revision,
            **({"base_model_sha256": source.run_info.base_model_sha256} if source.run_info.base_model_sha256 else {}),
            "model_type": getattr(model_config, "model_type", None),
            "architecture": type(source.model).__name__,
            "weights": weights,
            # re-indexed before the masks apply (the channel permutation the mask was found after)
            **({"permutation_file": PERMUTATION_NAME} if permutation else {}),
            "proxsparse_version": __version__,
        }
        atomic_write_json(os.path.join(directory, MASK_MANIFEST_NAME), manifest)
        logger.info("Mask-only adapter: %d packed masks", len(packed))

    def load(self, path, *, dtype=None, base_model=None, token=None) -> nn.Module:
        return apply_proxsparse(base_model, path, token=token, dtype=dtype)

    def card_description(self, revision: str | None) -> str:
        return (
            "This repository holds a **mask-only adapter**: the 2:4 masks packed at 0.67 bit per weight, to be "
            "applied to the original weights of the base model" + (f" at revision `{revision}`." if revision else ".")
        )

    def how_to_load(self, repo: str, base_model: str | None, revision: str | None) -> str:
        rev = f" (revision `{revision}`)" if revision else ""
        if base_model and is_hub_id(base_model):
            return (
                f"This adapter holds only the masks; it is applied to the original weights of `{base_model}`{rev}, "
                "which is downloaded, checked (shapes, revision, weights) and pruned in place:\n\n```python\n"
                "from proxsparse_hf import apply_proxsparse, load_pruned\n\n"
                f'model = load_pruned("{repo}")  # loads the recorded base model and applies the mask\n'
                f'# or, with a base model you already loaded:\n# model = apply_proxsparse(base_model, "{repo}")\n```'
            )
        base = f"`{base_model}`" if base_model else "the base model"
        return (
            f"This adapter holds only the masks; it is applied to the original weights of {base}, a model that is not "
            "on the Hub: pass it (a loaded model or its folder); its shapes and weights are checked before it is "
            "pruned in place:\n\n```python\nfrom proxsparse_hf import load_pruned\n\n"
            f'model = load_pruned("{repo}", base_model="path/to/{base_model or "base-model"}")\n```'
        )


def save_mask_adapter(
    source: str | os.PathLike | nn.Module | PrunedModel,
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
        source: output folder, pruned model or :class:`~proxsparse_hf.artefacts.base.PrunedModel`.
        save_directory: destination (must be empty unless ``overwrite``, which replaces it atomically).
        base_model_name_or_path: base model to record (default: the config's): a Hub id, or a local path recorded
            as its base name + SHA-256.
        revision: base model revision / commit hash (default: the config's, when the base model is the recorded one).
        config: recipe of an in-memory model.
        overwrite: replace a non-empty destination.

    Raises:
        ValueError: no base model is known, the weights were updated (not a pure mask), a mask is not exact 2:4, or
            the masks disagree with the pruned weights.
    """
    return save_artefact(
        "mask",
        source,
        save_directory,
        config=config,
        overwrite=overwrite,
        base_model=base_model_name_or_path,
        base_revision=revision,
    )


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


def _check_revision(model: nn.Module, manifest: dict[str, Any], check_revision: bool) -> None:
    recorded = manifest.get("revision")
    actual = model_revision(model)
    if recorded and actual and recorded != actual:
        message = (
            f"Revision mismatch: the mask was learned on {manifest.get('base_model_name_or_path')!r} at revision "
            f"{recorded!r}, but the base model is at {actual!r}."
        )
        if check_revision:
            raise ValueError(message + " Load the base model at the recorded revision (or pass check_revision=False).")
        warnings.warn(message, stacklevel=3)
    elif recorded and not actual:
        logger.info("The base model has no commit hash; revision %s cannot be verified", recorded)


def _check_weights(model: nn.Module, manifest: dict[str, Any]) -> dict[str, nn.Parameter]:
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
                f"Shape mismatch for `{name}`: the mask was learned on shape {tuple(info['shape'])}, the base model "
                f"has {tuple(params[name].shape)}."
            )
    return params


def _load_permutation(path: str, manifest: dict[str, Any]) -> dict[str, tuple[int, torch.Tensor]]:
    """The adapter's channel permutation (``{}`` without one)."""
    name = manifest.get("permutation_file")
    if not name:
        return {}
    file = os.path.join(path, os.path.basename(name))
    if not os.path.isfile(file):
        raise ValueError(f"The adapter {path!r} names a channel permutation ({name}) but does not hold it.")
    return load_index_maps(file)


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
            revision; an adapter made from a local base model needs it passed here).
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
    path = resolve_artefact_dir(repo_or_dir, revision=revision, token=token, cache_dir=cache_dir)
    manifest_path = os.path.join(path, MASK_MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{os.fspath(repo_or_dir)!r} is not a mask adapter: {MASK_MANIFEST_NAME} is missing.")
    manifest = read_json(manifest_path, "mask manifest")
    check_format_header(manifest, MASK_FORMAT, manifest_path)
    if base_model is None:
        base_model = manifest.get("base_model_name_or_path")
        if not base_model:
            raise ValueError(f"The adapter {path!r} names no base model; pass `base_model`.")
        if manifest.get("base_model_sha256"):
            raise ValueError(
                f"The adapter was made from a local base model {base_model!r} (sha256 "
                f"{manifest['base_model_sha256']}); pass `base_model` (that model, a path to it or its Hub id)."
            )
    if isinstance(base_model, (str, os.PathLike)):
        model = _load_base(os.fspath(base_model), manifest.get("revision"), token, dtype)
    elif isinstance(base_model, nn.Module):
        model = base_model
    else:
        raise TypeError(f"`base_model` must be a model, a model id or a path, got {type(base_model).__name__}.")
    _check_revision(model, manifest, check_revision)
    params = _check_weights(model, manifest)
    permutation = _load_permutation(path, manifest)
    if permutation:
        check_index_maps(model, permutation)  # before anything changes
    weights: dict[str, dict[str, Any]] = manifest["weights"]
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
                if name in permutation:  # the weights the mask was found on: the base model's, permuted
                    dim, index = permutation[name]
                    weight = weight.index_select(dim, index.to(weight.device))
                actual = float(torch.where(masks[name].to(weight.device), weight, 0).double().abs().sum())
            if not math.isclose(actual, expected, rel_tol=_FINGERPRINT_RTOL, abs_tol=1e-12):
                raise ValueError(
                    f"The base model's weights differ from the ones the mask was learned on: at `{name}` the kept "
                    f"weights sum to {actual:.6g} in magnitude, the adapter recorded {expected:.6g}. Use the base "
                    f"model {manifest.get('base_model_name_or_path')!r} (or pass verify_weights=False)."
                )
    if permutation:
        apply_index_maps(model, permutation)
        logger.info("Applied the channel permutation of %d parameters from %s", len(permutation), path)
    apply_2to4_masks(model, masks)
    logger.info("Applied %d 2:4 masks from %s", len(masks), path)
    return model.eval()
