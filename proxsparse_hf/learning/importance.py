"""Importance measures: the per-weight score the 2:4 prox and the final top-2 rule of mask learning act on.

The score of weight ``W_ij`` (output ``i``, input feature ``j``) is ``|W_ij| · s_j``: a per-input-column scale ``s`` that
a measure derives from statistics of the layer's inputs, or no scale at all (``|W|``). The prox then runs in the scaled
coordinates ``W · diag(s)`` and the mask keeps the two best scores of every group of four.

A measure is a class registered under a name, the value of ``ProxSparseConfig.importance``::

    @register_importance("my-score", label="|W|·f(‖X‖)", description="...", needs_input_norms=True)
    class MyScore(ImportanceMeasure):
        def column_scale(self, input_norms):
            return input_norms.sqrt() / input_norms.sqrt().pow(2).mean().sqrt()

Nothing else in the code base names a measure: the config, the learner, the callback, the CLI and the model card read
names, labels and needs from :func:`get_importance` / :func:`importance_names`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .distributed import TargetShard

__all__ = [
    "ActivationImportance",
    "ImportanceMeasure",
    "MagnitudeImportance",
    "get_importance",
    "importance_names",
    "measure_input_norms",
    "register_importance",
    "unregister_importance",
]

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_BUILTIN = ("magnitude", "activation")
# lower bound of a normalised input-feature scale (importance="activation"): dead features get a tiny, non-zero scale.
# Relative (the norms are divided by their RMS first), so it means the same on any model.
MIN_COLUMN_SCALE = 1e-3

M = TypeVar("M", bound="type[ImportanceMeasure]")


class ImportanceMeasure:
    """Base class of importance measures; :func:`register_importance` fills in the class attributes.

    Attributes:
        name: registry key (``ProxSparseConfig.importance``).
        label: display label (model cards, tables), e.g. ``"|W| (magnitude)"``.
        description: one or two sentences.
        needs_input_norms: the measure reads ``‖X_j‖₂`` of every input feature, measured on the first
            ``ProxSparseConfig.importance_batches`` training batches (saved with checkpoints, restored on resume).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_input_norms: ClassVar[bool] = False

    def column_scale(self, input_norms: torch.Tensor) -> torch.Tensor:
        """The per-input-column scale ``s`` from ``‖X_j‖₂`` (1-D float32, finite, ``>= 0``). Must return a 1-D tensor of
        the same size, finite and ``> 0``. Only called when :attr:`needs_input_norms` is true."""
        raise NotImplementedError(f"importance {self.name!r} declares needs_input_norms but has no column_scale().")

    def check_sharding(self, shards: Mapping[str, TargetShard]) -> None:
        """Raise ``ValueError`` when this measure cannot run on how the targets are sharded. A column scale multiplies
        whole input columns, so a measure with input statistics needs every input feature of a row on one rank."""
        if not self.needs_input_norms:
            return
        for s in shards.values():
            if s.kind == "fsdp1":
                raise ValueError(
                    f"`importance`={self.name!r} cannot run on FSDP1 flat shards (target `{s.name}`); use FSDP2 (sharded "
                    f"along the output dimension), DDP or device_map, or importance='magnitude'."
                )
            in_features = s.global_shape[0] if s.target.transposed else s.global_shape[-1]
            local_in = s.grouped(s.local(s.target.weight.detach())).shape[-1]
            if local_in != in_features:
                raise ValueError(
                    f"`importance`={self.name!r} needs every input feature of a row on one rank, but target `{s.name}` "
                    f"(weight shape {s.global_shape}) is sharded along its input dimension ({local_in} of {in_features} "
                    f"features here); shard the output dimension, or use importance='magnitude'."
                )


_REGISTRY: dict[str, type[ImportanceMeasure]] = {}


def register_importance(
    name: str, *, label: str, description: str, needs_input_norms: bool = False
) -> Callable[[M], M]:
    """Class decorator registering an :class:`ImportanceMeasure` subclass under ``name`` (returned unchanged).

    Raises:
        ValueError: an invalid or already registered name, or an empty label.
        TypeError: the decorated object is not an :class:`ImportanceMeasure` subclass.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"`name`={name!r} is invalid; allowed: lower-case letters, digits, '-' and '_', starting with a letter or "
            f"digit."
        )
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"`label`={label!r} is invalid; allowed: a non-empty string.")

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, ImportanceMeasure)):
            raise TypeError(f"register_importance({name!r}) decorates a subclass of ImportanceMeasure, got {cls!r}.")
        if name in _REGISTRY:
            raise ValueError(
                f"An importance measure named {name!r} is already registered; unregister_importance({name!r}) first."
            )
        cls.name, cls.label, cls.description = name, label, description
        cls.needs_input_norms = bool(needs_input_norms)
        _REGISTRY[name] = cls
        return cls

    return decorator


def unregister_importance(name: str) -> None:
    """Remove a registered measure (built-in ones cannot be removed).

    Raises:
        ValueError: ``name`` is built in or not registered.
    """
    if name in _BUILTIN:
        raise ValueError(f"`name`={name!r} is a built-in importance measure and cannot be unregistered.")
    if name not in _REGISTRY:
        raise ValueError(f"`name`={name!r} is not a registered importance measure; registered: {importance_names()}.")
    del _REGISTRY[name]


def importance_names() -> tuple[str, ...]:
    """Names of the registered importance measures, in registration order."""
    return tuple(_REGISTRY)


def get_importance(name: str) -> ImportanceMeasure:
    """An instance of the measure registered under ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"`importance`={name!r} is invalid; allowed: one of {importance_names()}.")
    return cls()


@register_importance(
    "magnitude",
    label="|W| (magnitude)",
    description="The paper's score: the weight magnitude |W|; the prox and the top-2 rule act on the weights themselves.",
)
class MagnitudeImportance(ImportanceMeasure):
    """``|W|``: no input statistics, no column scale."""


@register_importance(
    "activation",
    label="|W|·‖X‖ (activation)",
    description="Wanda's score |W_ij|·s_j, s_j the norm of input feature j over the first training batches divided by "
    "the RMS of those norms: the prox runs in the scaled coordinates W·s, so a mask that freezes early freezes at "
    "Wanda's choice instead of magnitude's.",
    needs_input_norms=True,
)
class ActivationImportance(ImportanceMeasure):
    """``s = ‖X‖₂ / RMS(‖X‖₂)``, floored at :data:`MIN_COLUMN_SCALE` (all ones when every feature is dead)."""

    def column_scale(self, input_norms: torch.Tensor) -> torch.Tensor:
        rms = float(input_norms.pow(2).mean().sqrt())
        scale = input_norms / rms if rms > 0 else torch.ones_like(input_norms)
        return scale.clamp_min(MIN_COLUMN_SCALE)


@torch.no_grad()
def measure_input_norms(
    model: torch.nn.Module,
    shards: Mapping[str, TargetShard],
    batches: Iterable[Mapping[str, torch.Tensor]],
    num_batches: int,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """``‖X_j‖₂`` of every input feature of every target over the first ``num_batches`` of ``batches`` (dicts of model
    inputs; ``labels`` are dropped), run in eval mode without gradients; ``{shard.name: float32 CPU tensor}``.

    Under ``torch.distributed`` this is a collective: the squared sums are added over ranks, so each rank passes its own
    share of the data.

    Raises:
        RuntimeError: a target saw no input (on any rank).
    """
    from ..activations import make_input_norm_stats
    from .distributed import all_reduce_tensors

    stats = {s.name: make_input_norm_stats(s.target) for s in shards.values()}  # Σ x_j² per input feature
    handles = [
        s.target.module.register_forward_pre_hook(lambda module, args, st=stats[s.name]: st.add(args[0].detach()))
        for s in shards.values()
    ]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in tqdm(batches, total=num_batches, desc="ProxSparse input norms", leave=False):
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
            model(**inputs)
            seen += 1
            if seen >= num_batches:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    # DDP: each rank measured its own part of the data; the sums over ranks are the norms of all of it (a rank that
    # saw no data still takes part, with zeros)
    names = list(stats)
    totals = all_reduce_tensors([stats[name].sum_sq for name in names])
    seen_by = all_reduce_tensors([torch.tensor([float(stats[name].num_tokens) for name in names])])[0]
    missing = [name for name, count in zip(names, seen_by.tolist()) if count == 0]
    if missing:
        raise RuntimeError(
            f"Measuring input norms: {len(missing)} target(s) (e.g. `{missing[0]}`) saw no input in {seen} batch(es); "
            f"give at least one batch that runs the whole model."
        )
    logger.info("ProxSparse: input-feature norms measured on %d batch(es)", seen)
    return {name: total.sqrt().float() for name, total in zip(names, totals)}
