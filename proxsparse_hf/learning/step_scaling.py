"""Scale-free optimizer steps (``ProxSparseConfig.step_scaling="weight_rms"``).

Adam's step is absolute: a learning rate of 3e-3 moves every weight by about 3e-3, which is a 1.6 % step on a layer whose
weights have RMS 0.19 and a 19 % step on one with RMS 0.016. With ``"weight_rms"`` the optimizer works, for every target,
on the weight in units of its layer's scale, ``w = W / r`` with ``r = RMS(W0)`` (the RMS of the *original* full weight,
all-reduced over ranks when the weight is sharded, so it is the same on every rank and after a resume): right before
``optimizer.step()`` the weight is divided by ``r`` and its gradient multiplied by ``r`` (``∂L/∂w = r · ∂L/∂W``), right
after it the weight is multiplied by ``r`` again.

Any optimizer then takes the step it would take on a model whose layers all have RMS 1: for Adam/AdamW this is exactly
one parameter group per layer with learning rate ``lr · r`` (the learning rate becomes a relative step: 0.01 = about 1 %
of the layer's RMS per unit Adam step), Adam's ``eps``, decoupled weight decay and plain SGD become scale-free as well,
and nothing about the optimizer or its parameter groups changes: it works with any ``optim=``, resume, DDP, FSDP2 and
FSDP1, and costs no memory. (``benchmarks/step_scaling.py`` compares it with rescaling the step through a copy of the
weights, which needs that copy and scales weight decay by ``r``: same masks and losses in float32.)

It costs three passes over the target weights and gradients per step (3.6 % of a 7B step on an H200). For Adam and AdamW
the same step needs no pass at all: one parameter group per target with ``lr · r``, ``eps / r`` and
``weight_decay / r`` is *exactly* the Adam step on ``W / r`` (Adam's moments of ``r · g`` are ``r`` and ``r²`` times
those of ``g``, so ``r · lr · m / (r·√v + eps) = lr · m / (√v + eps / r)`` in units of ``W / r``; decoupled decay
``lr · wd · w`` scales the same way). :func:`relative_adam` builds that optimizer from ``TrainingArguments``
(``optim="adamw_torch"`` / ``"adamw_torch_fused"``, the Trainer's defaults); a ``Trainer`` given it through
``optimizers=(optimizer, None)`` keeps building the schedule, and :class:`ProxSparseCallback` sees the groups (each
records its ``r`` under :data:`RMS_KEY`) and skips the passes for those targets. ``learn_mask`` and ``proxsparse learn``
use it whenever the model is not sharded; resume restores the groups with the optimizer's state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..targets import find_targets, freeze_non_targets
from .distributed import TargetShard, is_dtensor

__all__ = ["RMS_KEY", "RelativeStep", "relative_adam", "relative_optimizer", "relative_param_groups", "step_unit"]

# the parameter-group key under which relative_param_groups records a target's RMS(W0)
RMS_KEY = "proxsparse_weight_rms"
# optimizers whose step relative_param_groups makes exactly relative (Adam's update is invariant to the gradient's scale)
ADAM_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def step_unit(rms: float) -> float:
    """The unit of a target's relative steps: its RMS(W0), or 1 where that is 0 or not finite (an all-zero weight keeps
    absolute steps)."""
    return rms if rms > 0 and math.isfinite(rms) else 1.0


class RelativeStep:
    """Makes the optimizer's step on every target relative to its layer's scale (see the module docstring).

    Call :meth:`before_step` after the gradients are final (after clipping) and right before ``optimizer.step()``, and
    :meth:`after_step` right after it (before the prox); in between, the targets hold ``W / r``.

    Args:
        shards: what this rank holds of every target.
        scales: ``{shard.name: r}``; a layer with ``r == 0`` (an all-zero weight) keeps absolute steps.
    """

    def __init__(self, shards: Mapping[str, TargetShard], scales: Mapping[str, float]) -> None:
        self.shards = shards
        self.scales = {name: step_unit(r) for name, r in scales.items()}
        self._in_layer_units = False

    def _locals(self, with_grads: bool = False):
        weights, grads, weight_scales, grad_scales = [], [], [], []
        for s in self.shards.values():
            weight = s.target.weight
            local = s.local(weight.data)
            if local.numel() == 0:
                continue
            weights.append(local)
            weight_scales.append(self.scales[s.name])
            if with_grads and weight.grad is not None:
                grads.append(s.local(weight.grad))
                grad_scales.append(self.scales[s.name])
        return weights, weight_scales, grads, grad_scales

    @torch.no_grad()
    def before_step(self) -> None:
        """``W ← W / r`` and ``∂L/∂W ← r · ∂L/∂W`` on every target."""
        if self._in_layer_units:
            raise RuntimeError("RelativeStep.before_step() called twice without after_step() in between.")
        weights, weight_scales, grads, grad_scales = self._locals(with_grads=True)
        if weights:
            torch._foreach_div_(weights, weight_scales)
        if grads:
            torch._foreach_mul_(grads, grad_scales)
        self._in_layer_units = True

    @torch.no_grad()
    def after_step(self) -> None:
        """``W ← r · W`` on every target: the optimizer's step, taken on ``W / r``, is now ``r`` times as large in ``W``."""
        if not self._in_layer_units:
            raise RuntimeError(
                "RelativeStep.after_step() without before_step(): with step_scaling='weight_rms' call "
                "MaskLearner.before_optimizer_step() before optimizer.step() and after_optimizer_step() after it."
            )
        weights, weight_scales, _, _ = self._locals()
        if weights:
            torch._foreach_mul_(weights, weight_scales)
        self._in_layer_units = False


def _decay_parameter_names(model: nn.Module) -> set[str]:
    """The names the ``Trainer`` applies weight decay to (its own rule: no biases, no normalisation weights)."""
    from transformers import Trainer

    # the method reads only ``model``; calling it unbound keeps one rule, the Trainer's, for both kinds of groups
    return set(Trainer.get_decay_parameter_names(None, model))


@torch.no_grad()
def relative_param_groups(
    model: nn.Module, config: Any, *, learning_rate: float, weight_decay: float = 0.0, eps: float = 1e-8
) -> list[dict[str, Any]]:
    """Adam / AdamW parameter groups whose step on every target is relative to its layer's RMS(W0) (see the module
    docstring): one group per target weight with ``lr = learning_rate · r``, ``eps = eps / r``, ``weight_decay =
    weight_decay / r`` and ``r`` under :data:`RMS_KEY`; the other trainable parameters keep absolute steps in two groups
    (with and without weight decay, as the Trainer does). Call it before training: ``r`` is measured on the weights
    the model holds now, which must be the original ones.

    Raises:
        ValueError: sharded (``DTensor``) targets — there the callback's generic rescaling applies — or a target
            weight that does not require gradients.
    """
    targets = find_targets(model, config)
    by_param = {id(t.weight): t for t in targets.values()}
    groups: list[dict[str, Any]] = []
    decayed: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    decay_names = _decay_parameter_names(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        target = by_param.get(id(param))
        if target is None:
            (decayed if name in decay_names else plain).append(param)
            continue
        if is_dtensor(param):
            raise ValueError(
                f"relative_param_groups: target `{target.name}` is sharded (DTensor); leave the optimizer to the "
                f"Trainer, ProxSparseCallback makes its steps relative itself."
            )
        r = step_unit(math.sqrt(float(param.detach().float().pow(2).mean())) if param.numel() else 0.0)
        groups.append(
            {"params": [param], "lr": learning_rate * r, "eps": eps / r, "weight_decay": weight_decay / r, RMS_KEY: r}
        )
    missing = [t.name for t in targets.values() if not t.weight.requires_grad]
    if missing:
        raise ValueError(
            f"relative_param_groups: target `{missing[0]}` has requires_grad=False; ProxSparse trains it."
        )
    if decayed:
        groups.append({"params": decayed, "lr": learning_rate, "eps": eps, "weight_decay": weight_decay})
    if plain:
        groups.append({"params": plain, "lr": learning_rate, "eps": eps, "weight_decay": 0.0})
    return groups


def trainer_optimizer(args: Any, model: nn.Module) -> tuple[Any, dict[str, Any]]:
    """The optimizer class (or factory) and keyword arguments the ``Trainer`` builds from ``args``."""
    from transformers import Trainer

    return Trainer.get_optimizer_cls_and_kwargs(args, model)


def is_adam(optimizer_cls: Any) -> bool:
    """True for torch's Adam / AdamW (and subclasses): the optimizers :func:`relative_param_groups` is exact for."""
    return isinstance(optimizer_cls, type) and issubclass(optimizer_cls, ADAM_OPTIMIZERS)


def _optim_name(args: Any) -> Any:
    optim = getattr(args, "optim", None)
    return getattr(optim, "value", optim)  # TrainingArguments holds an OptimizerNames enum


def _shards_weights(args: Any) -> bool:
    """Whether the Trainer will shard the weights (FSDP / DeepSpeed, from ``args`` or an ``accelerate launch``)."""
    if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
        return True
    return any(
        os.environ.get(variable, "false").lower() in ("1", "true")
        for variable in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def relative_optimizer(model: nn.Module, config: Any, args: Any) -> torch.optim.Optimizer | None:
    """:func:`relative_adam` where it applies (``step_scaling="weight_rms"``, an Adam/AdamW ``args.optim``, weights
    the Trainer does not shard), else None: the Trainer then builds its own optimizer and :class:`ProxSparseCallback`
    rescales the steps. What ``learn_mask`` passes as ``Trainer(optimizers=(relative_optimizer(...), None))``."""
    if config.step_scaling != "weight_rms" or _shards_weights(args):
        return None
    optimizer_cls, kwargs = trainer_optimizer(args, model)
    if not is_adam(optimizer_cls):
        return None
    return _build_relative_adam(model, config, args, optimizer_cls, kwargs)


def relative_adam(model: nn.Module, config: Any, args: Any) -> torch.optim.Optimizer:
    """The optimizer the ``Trainer`` would build from ``args`` (``TrainingArguments``), with
    :func:`relative_param_groups`: pass it as ``Trainer(..., optimizers=(relative_adam(model, config, args), None))``
    beside a :class:`~proxsparse_hf.ProxSparseCallback` with ``step_scaling="weight_rms"``; ``args.learning_rate`` is
    then the relative step. Build it after the model is on its device and its non-targets are frozen as training will
    have them (the callback freezes them when ``config.train_non_target_params`` is False).

    Raises:
        ValueError: ``args.optim`` is not an Adam/AdamW of torch (name, value and the allowed ones), or the model is
            sharded.
    """
    optimizer_cls, kwargs = trainer_optimizer(args, model)
    if not is_adam(optimizer_cls):
        raise ValueError(
            f"`optim`={_optim_name(args)!r} builds {getattr(optimizer_cls, '__name__', optimizer_cls)}; "
            f"relative_adam needs torch's Adam/AdamW (allowed: 'adamw_torch', 'adamw_torch_fused'). With other "
            f"optimizers leave `optimizers` unset: ProxSparseCallback makes their steps relative itself."
        )
    return _build_relative_adam(model, config, args, optimizer_cls, kwargs)


def _build_relative_adam(
    model: nn.Module, config: Any, args: Any, optimizer_cls: Any, kwargs: dict[str, Any]
) -> torch.optim.Optimizer:
    """``optimizer_cls`` (an Adam/AdamW, with the Trainer's ``kwargs`` for ``args``) over relative parameter groups."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("lr", "eps", "weight_decay")}
    if not config.train_non_target_params:
        freeze_non_targets(model, find_targets(model, config))
    groups = relative_param_groups(
        model,
        config,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        eps=getattr(args, "adam_epsilon", 1e-8),
    )
    return optimizer_cls(groups, lr=args.learning_rate, eps=getattr(args, "adam_epsilon", 1e-8), **kwargs)
