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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .distributed import TargetShard

__all__ = ["RelativeStep"]


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
        self.scales = {name: (r if r > 0 else 1.0) for name, r in scales.items()}
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
