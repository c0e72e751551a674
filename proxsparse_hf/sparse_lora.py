"""Fine-tune a 2:4-pruned model with LoRA without losing the 2:4 pattern.

A plain LoRA adapter adds a dense ``ΔW = B·A`` to every target, so ``merge_and_unload()`` silently turns a 2:4 model back into
a dense one. Here every pruned target's adapter delta is masked with that target's 2:4 mask ``M`` in the forward pass, so the
effective weight the model is trained with is ``(W0 + ΔW) ⊙ M`` (``W0`` is already ``W0 ⊙ M``) — what is trained is what is
deployed — and :func:`merge_sparse` returns a plain ``transformers`` model whose targets are exactly that, verified 2:4.

How it plugs into PEFT (no PEFT internals are patched):

* the LoRA layer of a pruned ``nn.Linear`` / ``Conv1D`` is :class:`SparseLoraLinear`, a subclass of PEFT's ``lora.Linear``
  registered through ``LoraConfig._register_custom_module`` (PEFT's documented hook for custom LoRA layers). It holds the mask
  as a non-persistent buffer, masks the delta in ``forward`` and in ``get_delta_weight`` — so PEFT's own ``merge``,
  ``merge_and_unload``, ``unmerge`` and ``safe_merge`` are masked too;
* the adapter config is a :class:`SparseLoraConfig`, a ``LoraConfig`` with the same fields (``adapter_config.json`` stays a
  plain LoRA config) whose ``save_pretrained`` also writes ``proxsparse_config.json`` beside it — so ``peft_model.save_pretrained``
  and ``Trainer`` checkpoints record how the mask was made.

Masks are keyed by weight name in the *base* model (``"model.layers.0.self_attn.q_proj.weight"``), in storage layout
(``[in, out]`` for ``Conv1D``), exactly as :func:`proxsparse_hf.extract_2to4_masks` returns them. Without explicit masks they are
inferred from the pruned weights: every ``nn.Linear`` / ``Conv1D`` whose weight is 2:4 along its input dimension is a pruned
target and its mask is the top-2 ``|W|`` of each group (which keeps every non-zero; a group with fewer than two non-zeros is
completed with its lowest-index zero positions, so each group has exactly two trainable positions).

LoRA targets whose weight is not 2:4 (e.g. ``lm_head`` or a layer left dense): ``on_dense_target="error"`` (default) refuses
them; ``on_dense_target="warn"`` keeps them as ordinary dense LoRA (their merged weights change densely, which is fine for
modules that were never sparse) and warns once with their names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import ProxSparseConfig
from .constants import CONFIG_NAME, MASKS_NAME, SUPPORTED_M, SUPPORTED_N
from .layout import input_last
from .masks import is_2to4, load_masks, mask_2to4
from .targets import is_target_type, module_input_dim

__all__ = [
    "SparseLoraConfig",
    "SparseLoraLinear",
    "get_sparse_peft_model",
    "load_sparse_peft_model",
    "merge_sparse",
    "sparse_lora_masks",
]

logger = logging.getLogger(__name__)

ON_DENSE_TARGET = ("error", "warn")
# init_lora_weights values that leave the base weights untouched (PiSSA, OLoRA, CorDA, LoftQ, ... rewrite W0 densely).
_SAFE_INITS = (True, False, "gaussian")
# LoraConfig options that turn a layer into a LoRA *variant* whose merge is not W0 + B·A.
_VARIANT_OPTIONS = (
    "use_dora",
    "use_bdlora",
    "arrow_config",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "mica",
    "kasa_config",
)
# name of the buffer that carries a mask from the base layer into its LoRA layer while PEFT injects adapters
_PENDING = "_proxsparse_pending_mask"
_PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass
class SparseLoraConfig(LoraConfig):
    """A ``peft.LoraConfig`` for 2:4-masked LoRA; build it with :meth:`from_lora_config`.

    It has exactly the fields of ``LoraConfig`` (its ``adapter_config.json`` is a plain LoRA config that any PEFT can read);
    it registers :class:`SparseLoraLinear` for ``nn.Linear`` and ``Conv1D`` targets through PEFT's custom-module hook.

    Attributes:
        proxsparse_config: The ``ProxSparseConfig`` of the mask (or None); not a dataclass field. ``save_pretrained`` writes
            it as ``proxsparse_config.json`` next to ``adapter_config.json``, so every adapter folder and ``Trainer``
            checkpoint records both steps.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.proxsparse_config: ProxSparseConfig | None = None
        self._register_custom_module(_custom_module_mapping())

    @classmethod
    def from_lora_config(
        cls, lora_config: LoraConfig, proxsparse_config: ProxSparseConfig | None = None
    ) -> SparseLoraConfig:
        """Copy of ``lora_config`` (same field values) whose pruned targets get :class:`SparseLoraLinear` layers."""
        values = {f.name: getattr(lora_config, f.name) for f in dataclasses.fields(lora_config) if f.init}
        config = cls(**values)
        config.proxsparse_config = proxsparse_config
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """``LoraConfig.save_pretrained`` plus ``proxsparse_config.json`` when :attr:`proxsparse_config` is set."""
        super().save_pretrained(save_directory, **kwargs)
        if self.proxsparse_config is not None:
            self.proxsparse_config.save_pretrained(save_directory)


def _custom_module_mapping() -> dict[type[nn.Module], type[nn.Module]]:
    from transformers.pytorch_utils import Conv1D

    return {nn.Linear: SparseLoraLinear, Conv1D: SparseLoraLinear}


# ---------------------------------------------------------------------------------------------------------------- layer
class SparseLoraLinear(LoraLinear):
    """PEFT ``lora.Linear`` whose adapter delta is masked with the base layer's 2:4 mask.

    ``forward`` computes ``base(x) + x·((B·A·scaling) ⊙ M)ᵀ`` — the layer behaves exactly like a linear layer with weight
    ``(W0 + ΔW) ⊙ M`` — and ``get_delta_weight`` returns ``ΔW ⊙ M``, so PEFT's merge paths write a 2:4 weight. Works for
    ``nn.Linear`` and transformers ``Conv1D`` (``fan_in_fan_out`` is set from the base layer's type). A layer built without a
    mask (a dense target, see ``on_dense_target``) is an ordinary LoRA layer.

    Attributes:
        proxsparse_mask: bool tensor shaped like the base weight (storage layout), ``True`` = kept; or None.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        base = self.get_base_layer()
        # PEFT only corrects `fan_in_fan_out` in its default dispatcher; a custom layer decides it from the layer type.
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.is_target_conv_1d_layer = isinstance(base, Conv1D)
        mask = getattr(base, _PENDING, None)
        if mask is not None:
            delattr(base, _PENDING)
        self.register_buffer("proxsparse_mask", mask, persistent=False)
        if mask is not None and adapter_name in self.lora_variant:
            raise ValueError(f"LoRA variants are not supported on 2:4-masked layers (adapter `{adapter_name}`).")

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().update_layer(adapter_name, *args, **kwargs)
        if getattr(self, "proxsparse_mask", None) is not None and adapter_name in self.lora_variant:
            raise ValueError(f"LoRA variants are not supported on 2:4-masked layers (adapter `{adapter_name}`).")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``ΔW ⊙ M`` in the base weight's storage layout (masked positions are exactly ``+0``)."""
        delta = super().get_delta_weight(adapter)
        if self.proxsparse_mask is None:
            return delta
        return delta.masked_fill(~self.proxsparse_mask.to(delta.device), 0)

    # Fuse base weight and masked delta into one matmul when nothing needs the base layer's own forward (see `_can_fuse`).
    fuse_forward: bool = True

    def _masked_delta(self, adapter: str) -> torch.Tensor:
        """``(B·A·scaling) ⊙ M`` in ``nn.Linear`` layout ``[out, in]``, differentiable w.r.t. ``A`` and ``B``."""
        mask = input_last(self.proxsparse_mask, self.fan_in_fan_out)
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * mask * self.scaling[adapter]

    def _can_fuse(self, adapters: list[str], args: tuple, kwargs: dict) -> bool:
        from transformers.pytorch_utils import Conv1D

        base = self.get_base_layer()
        if not self.fuse_forward or args or kwargs or type(base) not in (nn.Linear, Conv1D):
            return False
        if base._forward_hooks or base._forward_pre_hooks:  # e.g. accelerate offloading
            return False
        for adapter in adapters:
            dropout = self.lora_dropout[adapter]
            if self.lora_bias[adapter] or (dropout.training and getattr(dropout, "p", 0.0) > 0):
                return False
        return True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.proxsparse_mask is None:
            return super().forward(x, *args, **kwargs)
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("Mixed-adapter batches (`adapter_names=`) are not supported on 2:4-masked LoRA layers.")
        kwargs.pop("alora_offsets", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._can_fuse(adapters, args, kwargs):
            # One dense matmul with the effective weight W0 + Σ ΔW ⊙ M (instead of the base matmul plus a dense delta
            # matmul), in the base weight's dtype: the forward sees exactly the weights merge_sparse will write.
            base = self.get_base_layer()
            weight = input_last(base.weight, self.fan_in_fan_out)
            effective = weight + sum(self._masked_delta(a).to(weight.dtype) for a in adapters)
            return F.linear(x.to(weight.dtype), effective, base.bias)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for adapter in adapters:
            lora_b = self.lora_B[adapter]
            x_in = self._cast_input_dtype(x, self.lora_A[adapter].weight.dtype)
            bias = lora_b.bias * self.scaling[adapter] if self.lora_bias[adapter] else None
            result = result + F.linear(self.lora_dropout[adapter](x_in), self._masked_delta(adapter), bias)
        return result.to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------- masks
def _module_name(weight_name: str) -> str:
    """Base-model module name of a mask key; PEFT prefixes and ``.base_layer`` segments are stripped."""
    name = weight_name[len(_PEFT_PREFIX) :] if weight_name.startswith(_PEFT_PREFIX) else weight_name
    name = name.replace(".base_layer.", ".")
    if not name.endswith(".weight"):
        raise KeyError(f"Mask key `{weight_name}` is not a weight name (expected '<module>.weight').")
    return name[: -len(".weight")]


def _grouped(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped like ``module.weight``) with the input dimension last."""
    return input_last(tensor, module_input_dim(module) == 0)


def _infer_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not name or not is_target_type(module) or module.weight.dim() != 2:
            continue
        if not is_2to4(_grouped(module, module.weight.detach())):
            continue
        masks[name] = mask_2to4(module.weight.detach(), transposed=module_input_dim(module) == 0)
    return masks


def _check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate user masks against ``model``; returns ``{module_name: bool mask}``."""
    modules = dict(model.named_modules())
    checked: dict[str, torch.Tensor] = {}
    for key, mask in masks.items():
        name = _module_name(key)
        module = modules.get(name)
        if module is None:
            raise KeyError(f"Mask `{key}` names no module of {type(model).__name__} (looked for `{name}`).")
        if not is_target_type(module):
            raise ValueError(
                f"Mask `{key}` belongs to a {type(module).__name__}; only nn.Linear and Conv1D are supported."
            )
        weight = module.weight.detach()
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"Mask `{key}` has shape {tuple(mask.shape)} but the weight is {tuple(weight.shape)}.")
        mask = (mask != 0).to(weight.device)
        kept = _grouped(module, mask)
        if kept.shape[-1] % SUPPORTED_M != 0 or not is_2to4(kept):
            raise ValueError(
                f"Mask `{key}` is not a {SUPPORTED_N}:{SUPPORTED_M} mask along the input dimension (some group of "
                f"{SUPPORTED_M} keeps more than {SUPPORTED_N})."
            )
        outside = int(((weight != 0) & ~mask).sum())
        if outside:
            raise ValueError(
                f"`{name}.weight` has {outside} non-zero weight(s) outside its mask: the model is not pruned with these "
                f"masks. Apply them first: proxsparse_hf.apply_2to4_masks(model, masks)."
            )
        checked[name] = mask.contiguous()
    return checked


def _resolve_masks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | str | os.PathLike | None,
    proxsparse_config: ProxSparseConfig | None,
) -> tuple[dict[str, torch.Tensor], ProxSparseConfig | None]:
    if masks is None:
        resolved = _infer_masks(model)
        if not resolved:
            raise ValueError(
                f"No nn.Linear/Conv1D weight of {type(model).__name__} is {SUPPORTED_N}:{SUPPORTED_M} sparse along its "
                f"input dimension: the model is not 2:4-pruned. Prune it first (proxsparse_hf.extract_2to4_masks + "
                f"apply_2to4_masks, `proxsparse learn` or `proxsparse prune`) or pass `masks`."
            )
        return resolved, proxsparse_config
    if isinstance(masks, (str, os.PathLike)):
        path = os.fspath(masks)
        if os.path.isdir(path):
            if proxsparse_config is None and os.path.isfile(os.path.join(path, CONFIG_NAME)):
                proxsparse_config = ProxSparseConfig.from_pretrained(path)
            path = os.path.join(path, MASKS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`masks`={os.fspath(masks)!r}: no masks file at {path!r}.")
        masks = load_masks(path)
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("`masks` must be None, a non-empty {weight_name: bool tensor} mapping, or a path.")
    return _check_masks(model, masks), proxsparse_config


# ---------------------------------------------------------------------------------------------------------------- build
def _check_lora_config(lora_config: Any, on_dense_target: str) -> None:
    if on_dense_target not in ON_DENSE_TARGET:
        raise ValueError(f"`on_dense_target`={on_dense_target!r} is invalid; allowed: {ON_DENSE_TARGET}.")
    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"`lora_config` must be a peft.LoraConfig, got {type(lora_config).__name__}.")
    for option in _VARIANT_OPTIONS:
        if getattr(lora_config, option, None):
            raise ValueError(
                f"`{option}`={getattr(lora_config, option)!r} is not supported with 2:4-masked LoRA: only plain LoRA "
                f"(W0 + B·A) is masked. Unset it."
            )
    if lora_config.init_lora_weights not in _SAFE_INITS:
        raise ValueError(
            f"`init_lora_weights`={lora_config.init_lora_weights!r} is not supported with 2:4-masked LoRA (it rewrites "
            f"the base weights densely); allowed: {_SAFE_INITS}."
        )
    if getattr(lora_config, "target_parameters", None):
        raise ValueError("`target_parameters` (LoRA on raw nn.Parameters) is not supported with 2:4-masked LoRA.")


def _check_modules_to_save(lora_config: LoraConfig, masks: Mapping[str, torch.Tensor]) -> None:
    keep = lora_config.modules_to_save or []
    clash = sorted(n for n in masks if any(n == k or n.endswith("." + k) for k in keep))
    if clash:
        raise ValueError(
            f"`modules_to_save`={list(keep)} would train the 2:4-pruned module(s) {clash} densely and lose their "
            f"sparsity; remove them from modules_to_save (LoRA-target them instead)."
        )


def _check_plain_model(model: nn.Module) -> None:
    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already holds PEFT adapter layers; pass the pruned base model (before get_peft_model)."
        )


class _PendingMasks:
    """Parks the masks on their base layers as non-persistent buffers while PEFT injects adapters; each
    :class:`SparseLoraLinear` takes its layer's mask, the rest are removed on exit."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.modules = [(model.get_submodule(name), mask) for name, mask in masks.items()]

    def __enter__(self) -> _PendingMasks:
        for module, mask in self.modules:
            module.register_buffer(_PENDING, mask.to(module.weight.device), persistent=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module, _ in self.modules:
            if hasattr(module, _PENDING):
                delattr(module, _PENDING)


def _lora_layers(peft_model: PeftModel) -> tuple[list[str], list[str]]:
    """Names (base-model module names) of the masked LoRA layers and of the other (dense) adapter layers."""
    masked, dense = [], []
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, SparseLoraLinear) and module.proxsparse_mask is not None:
            masked.append(name)
        elif isinstance(module, BaseTunerLayer):
            dense.append(name)
    return masked, dense


def _finish(peft_model: PeftModel, on_dense_target: str) -> PeftModel:
    masked, dense = _lora_layers(peft_model)
    if not masked:
        peft_model.unload()
        raise ValueError(
            "The LoRA config targets none of the 2:4-pruned modules; nothing would be masked. Check `target_modules`."
        )
    if dense and on_dense_target == "error":
        peft_model.unload()
        raise ValueError(
            f"The LoRA config targets {len(dense)} module(s) whose weights are not 2:4 (not pruned): {dense[:8]}"
            f"{' ...' if len(dense) > 8 else ''}. Exclude them (LoraConfig `exclude_modules`/`target_modules`), or pass "
            f"on_dense_target='warn' to train them as ordinary dense LoRA."
        )
    if dense:
        warnings.warn(
            f"LoRA on {len(dense)} module(s) that are not 2:4 (they stay ordinary dense LoRA): {dense[:8]}"
            f"{' ...' if len(dense) > 8 else ''}.",
            stacklevel=3,
        )
    logger.info("2:4-masked LoRA on %d module(s); %d dense LoRA module(s)", len(masked), len(dense))
    return peft_model


def get_sparse_peft_model(
    model: nn.Module,
    lora_config: LoraConfig,
    masks: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    *,
    proxsparse_config: ProxSparseConfig | None = None,
    on_dense_target: str = "error",
    adapter_name: str = "default",
    **peft_kwargs: Any,
) -> PeftModel:
    """``peft.get_peft_model`` for a 2:4-pruned model: every pruned LoRA target trains ``(W0 + B·A) ⊙ M``.

    Args:
        model: the pruned base model (original weights ⊙ mask), not yet wrapped by PEFT.
        lora_config: a plain ``peft.LoraConfig`` (no DoRA/other variants; ``init_lora_weights`` True, False or
            ``"gaussian"``; ``modules_to_save`` must not contain pruned modules).
        masks: ``{weight_name: bool mask}`` (keys as in ``model.state_dict()``, storage layout), a masks
            ``.safetensors`` file, or a proxsparse output folder (its ``proxsparse_config.json`` is picked up too). None:
            inferred from the weights (every Linear/Conv1D whose weight is 2:4 along the input dimension).
        proxsparse_config: the mask's ``ProxSparseConfig``, recorded in every saved adapter folder.
        on_dense_target: what to do with LoRA targets that are not 2:4: ``"error"`` (default) or ``"warn"`` (they stay
            ordinary dense LoRA).
        adapter_name: PEFT adapter name.
        **peft_kwargs: passed to ``peft.get_peft_model``.

    Returns:
        a ``PeftModel`` whose ``peft_config[adapter_name]`` is a :class:`SparseLoraConfig`.

    Raises:
        ValueError: the model is not 2:4 / not pruned with ``masks``, the LoRA config is unsupported, or it targets dense
            modules while ``on_dense_target="error"``.
        KeyError: a mask names a module the model does not have.
    """
    _check_lora_config(lora_config, on_dense_target)
    _check_plain_model(model)
    resolved, proxsparse_config = _resolve_masks(model, masks, proxsparse_config)
    _check_modules_to_save(lora_config, resolved)
    config = SparseLoraConfig.from_lora_config(lora_config, proxsparse_config)
    with _PendingMasks(model, resolved):
        peft_model = get_peft_model(model, config, adapter_name=adapter_name, **peft_kwargs)
    return _finish(peft_model, on_dense_target)


def _adapter_proxsparse_config(adapter: str, **hub_kwargs: Any) -> ProxSparseConfig | None:
    subfolder = hub_kwargs.get("subfolder")
    local = os.path.join(adapter, subfolder) if subfolder else adapter
    if os.path.isdir(local):
        return ProxSparseConfig.from_pretrained(local) if os.path.isfile(os.path.join(local, CONFIG_NAME)) else None
    try:
        return ProxSparseConfig.from_pretrained(
            adapter, subfolder=subfolder, revision=hub_kwargs.get("revision"), token=hub_kwargs.get("token")
        )
    except ValueError as exc:
        logger.info("No %s for adapter %s (%s)", CONFIG_NAME, adapter, exc)
        return None


def load_sparse_peft_model(
    model: nn.Module,
    adapter: str | os.PathLike,
    masks: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    *,
    proxsparse_config: ProxSparseConfig | None = None,
    on_dense_target: str = "error",
    adapter_name: str = "default",
    is_trainable: bool = False,
    **peft_kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained`` with the 2:4 masking re-applied (plain PEFT loading would give unmasked LoRA layers).

    Args:
        model: the pruned base model the adapter was trained on.
        adapter: adapter folder or Hub repo id (as for ``PeftModel.from_pretrained``).
        masks: as in :func:`get_sparse_peft_model` (None: inferred from the pruned weights).
        proxsparse_config: overrides the ``proxsparse_config.json`` found in the adapter folder.
        on_dense_target: as in :func:`get_sparse_peft_model`.
        adapter_name: PEFT adapter name.
        is_trainable: load for further training.
        **peft_kwargs: passed to ``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained`` (``subfolder``,
            ``revision``, ``token``, ...).
    """
    adapter = os.fspath(adapter)
    hub_kwargs = {k: peft_kwargs[k] for k in ("subfolder", "revision", "token") if k in peft_kwargs}
    lora_config = PeftConfig.from_pretrained(adapter, **hub_kwargs)
    _check_lora_config(lora_config, on_dense_target)
    _check_plain_model(model)
    resolved, proxsparse_config = _resolve_masks(model, masks, proxsparse_config)
    if proxsparse_config is None:
        proxsparse_config = _adapter_proxsparse_config(adapter, **hub_kwargs)
    _check_modules_to_save(lora_config, resolved)
    config = SparseLoraConfig.from_lora_config(lora_config, proxsparse_config)
    with _PendingMasks(model, resolved):
        peft_model = PeftModel.from_pretrained(
            model, adapter, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **peft_kwargs
        )
    return _finish(peft_model, on_dense_target)


# ---------------------------------------------------------------------------------------------------------------- merge
def sparse_lora_masks(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The 2:4 masks of a model built by :func:`get_sparse_peft_model`, keyed by the base model's weight names."""
    return {
        f"{name}.weight": module.proxsparse_mask
        for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, SparseLoraLinear) and module.proxsparse_mask is not None
    }


def _off_mask_nonzeros(weight: torch.Tensor, mask: torch.Tensor) -> int:
    return int(((weight.detach() != 0) & ~mask.to(weight.device)).sum())


def merge_sparse(
    peft_model: PeftModel, *, safe_merge: bool = False, adapter_names: list[str] | None = None
) -> nn.Module:
    """Merge a 2:4-masked LoRA model into a plain ``transformers`` model with targets ``(W0 + ΔW) ⊙ M``, verified 2:4.

    Consumes ``peft_model`` (``merge_and_unload``). Dense LoRA targets (``on_dense_target="warn"``) are merged densely.

    Args:
        peft_model: a model from :func:`get_sparse_peft_model` / :func:`load_sparse_peft_model`.
        safe_merge: check the merged weights for NaN/inf (PEFT's ``safe_merge``).
        adapter_names: adapters to merge (default: the active ones).

    Returns:
        the merged base model; every masked target has no non-zero outside its mask.

    Raises:
        ValueError: ``peft_model`` has no 2:4-masked LoRA layer, or a base weight was changed outside its mask.
        RuntimeError: a merged weight is not 2:4 with its mask.
    """
    if not isinstance(peft_model, PeftModel):
        raise ValueError(f"merge_sparse expects a peft.PeftModel, got {type(peft_model).__name__}.")
    base = peft_model.get_base_model()
    layers = {
        name: module
        for name, module in base.named_modules()
        if isinstance(module, SparseLoraLinear) and module.proxsparse_mask is not None
    }
    if not layers:
        raise ValueError(
            "The model has no 2:4-masked LoRA layer (was it built with get_peft_model instead of get_sparse_peft_model, "
            "or loaded with PeftModel.from_pretrained instead of load_sparse_peft_model?)."
        )
    for name, layer in layers.items():
        outside = _off_mask_nonzeros(layer.get_base_layer().weight, layer.proxsparse_mask)
        if outside:
            raise ValueError(
                f"The base weight of `{name}` has {outside} non-zero(s) outside its 2:4 mask (it was modified after the "
                f"adapter was built); the merge would not be 2:4."
            )
    masks = {name: layer.proxsparse_mask for name, layer in layers.items()}
    merged = peft_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)
    for name, mask in masks.items():
        module = merged.get_submodule(name)
        outside = _off_mask_nonzeros(module.weight, mask)
        if outside or not is_2to4(_grouped(module, module.weight)):
            raise RuntimeError(
                f"Merged weight `{name}.weight` is not 2:4 with its mask ({outside} non-zero(s) outside)."
            )
    logger.info("Merged 2:4-masked LoRA into %d target(s)", len(masks))
    return merged
