"""``MaskLearner``: the ProxSparse state and update rules, independent of any training loop.

A custom loop uses it directly::

    learner = MaskLearner(model, config)           # resolves targets, snapshots the original weights
    for step, batch in enumerate(loader, 1):
        loss = model(**batch).loss; loss.backward()
        learner.add_frozen_weight_grad()           # λ2 term (no-op when lambda2 == 0)
        optimizer.step(); optimizer.zero_grad()
        learner.prox_step(step, max_steps, lr=scheduler.get_last_lr()[0])
    masks = learner.finalize()                     # model now holds original ⊙ mask

``trainer_callbacks.ProxSparseCallback`` calls exactly these methods from the ``Trainer`` events.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ProxSparseConfig
from .masks import apply_2to4_masks, count_mask_flips, mask_2to4
from .prox import prox_2to4, prox_2to4_
from .regularizers import frozen_weight_grad, regularizer_2to4
from .targets import Target, find_targets

__all__ = ["SNAPSHOT_NAME", "MaskLearner"]

logger = logging.getLogger(__name__)

SNAPSHOT_NAME = "proxsparse_original_weights.safetensors"


class MaskLearner:
    """Learns a 2:4 mask for every target of ``model`` by proximal gradient (ProxSparse).

    Args:
        model: the model being trained (weights are updated in place by the caller's optimizer).
        config: the recipe.
        original: original target weights ``{weight_name: tensor}`` (e.g. restored from a checkpoint); snapshotted from the
            model when None.
    """

    def __init__(
        self, model: nn.Module, config: ProxSparseConfig, original: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.targets: dict[str, Target] = find_targets(model, config)
        frozen = [t.name for t in self.targets.values() if not t.weight.requires_grad]
        if frozen:
            raise ValueError(
                f"{len(frozen)} target module(s) have frozen weights (requires_grad=False), e.g. `{frozen[0]}`; ProxSparse "
                f"learns the mask through the targets' gradients. Unfreeze them or exclude them with `exclude_modules`."
            )
        device = None if config.snapshot_device == "same" else torch.device("cpu")
        if original is None:
            original = {t.param_name: t.weight.detach() for t in self.targets.values()}
        missing = [t.param_name for t in self.targets.values() if t.param_name not in original]
        if missing:
            raise KeyError(f"The original-weight snapshot has no tensor for {missing[:3]} ({len(missing)} missing).")
        self.original: dict[str, torch.Tensor] = {
            t.param_name: original[t.param_name].detach().to(device or t.weight.device, copy=True)
            for t in self.targets.values()
        }
        # Per-layer prox strength multiplier: 1/RMS(W0) for lambda_scaling="weight_scale" (see ProxSparseConfig).
        self.layer_scale: dict[str, float] = {}
        for t in self.targets.values():
            if config.lambda_scaling == "weight_scale":
                rms = float(self.original[t.param_name].float().pow(2).mean().sqrt())
                self.layer_scale[t.param_name] = 1.0 / rms if rms > 0 else 1.0
            else:
                self.layer_scale[t.param_name] = 1.0
        self._last_masks: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ parameters
    def freeze_non_targets(self) -> int:
        """Set ``requires_grad=False`` on every parameter that is not a target weight; returns how many were frozen."""
        target_params = {id(t.weight) for t in self.targets.values()}
        count = 0
        for param in self.model.parameters():
            if id(param) not in target_params and param.requires_grad:
                param.requires_grad_(False)
                count += 1
        return count

    def non_target_snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable non-target parameters (restored by :meth:`finalize`)."""
        target_names = {t.param_name for t in self.targets.values()}
        return {
            name: p.detach().to("cpu", copy=True)
            for name, p in self.model.named_parameters()
            if name not in target_names and p.requires_grad
        }

    # ------------------------------------------------------------------ update rules
    def lambda_at(self, step: int, max_steps: int, lr: float | None) -> float:
        """The global prox strength at optimizer step ``step`` (1-based) per ``config.lambda_schedule``."""
        lam = self.config.lambda1
        if self.config.lambda_schedule == "lr_scaled":
            if lr is None:
                raise ValueError("`lambda_schedule`='lr_scaled' needs the current learning rate.")
            return lam * lr
        if self.config.lambda_schedule == "ramp":
            return lam * min(1.0, step / max(1, max_steps))
        return lam

    @torch.no_grad()
    def add_frozen_weight_grad(self) -> None:
        """Add ``λ2 · ∂/∂W Σ(W ⊙ (W − W0)/(W0 + ε·sign W0))²`` to every target's gradient (no-op when ``lambda2 == 0``)."""
        if self.config.lambda2 == 0:
            return
        for t in self.targets.values():
            weight = t.weight
            if weight.grad is None:
                continue
            original = self.original[t.param_name].to(weight.device, non_blocking=True)
            grad = frozen_weight_grad(weight.detach(), original, self.config.epsilon)
            weight.grad.add_(grad.to(weight.grad.dtype), alpha=self.config.lambda2)

    @torch.no_grad()
    def prox_step(self, step: int, max_steps: int, lr: float | None = None) -> bool:
        """Apply the 2:4 prox operator to every target (in place) if ``step`` is a prox step; returns whether it ran."""
        if step % self.config.prox_every_n_steps != 0:
            return False
        lam = self.lambda_at(step, max_steps, lr)
        if lam <= 0:
            return False
        for t in self.targets.values():
            layer_lam = lam * self.layer_scale[t.param_name]
            view = t.grouped(t.weight.data)
            kwargs = dict(
                max_iter=self.config.solver_max_iter, tol=self.config.solver_tol, backend=self.config.solver_backend
            )
            if view.is_contiguous():
                prox_2to4_(view, layer_lam, **kwargs)
            else:
                view.copy_(prox_2to4(view.contiguous(), layer_lam, **kwargs))
        return True

    # ------------------------------------------------------------------ telemetry
    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Training telemetry over all targets.

        ``proxsparse/frac_2to4``: fraction of groups with ≤ 2 non-zeros; ``proxsparse/mask_flips``: groups whose top-2
        support changed since the previous call; ``proxsparse/regularizer``: Σ R(w_g); ``proxsparse/dist_to_original``:
        mean |W − W0|; ``proxsparse/lambda_scale_mean``: mean per-layer multiplier of λ1.
        """
        groups = ok = flips = 0
        reg = 0.0
        dist_sum = 0.0
        numel = 0
        masks: dict[str, torch.Tensor] = {}
        for t in self.targets.values():
            view = t.grouped(t.weight.detach())
            nonzero = (view.reshape(-1, 4) != 0).sum(dim=1)
            groups += nonzero.numel()
            ok += int((nonzero <= 2).sum())
            reg += float(regularizer_2to4(view.contiguous()))
            dist_sum += float(
                (t.weight.detach().float() - self.original[t.param_name].to(t.weight.device).float()).abs().sum()
            )
            numel += t.weight.numel()
            mask = mask_2to4(view.contiguous())
            if self._last_masks is not None:
                flips += count_mask_flips(self._last_masks[t.param_name], mask)
            masks[t.param_name] = mask
        first = self._last_masks is None
        self._last_masks = masks
        return {
            "proxsparse/frac_2to4": ok / groups if groups else 1.0,
            "proxsparse/mask_flips": float("nan") if first else float(flips),
            "proxsparse/regularizer": reg,
            "proxsparse/dist_to_original": dist_sum / numel if numel else 0.0,
            "proxsparse/lambda_scale_mean": sum(self.layer_scale.values()) / max(1, len(self.layer_scale)),
        }

    # ------------------------------------------------------------------ end of training
    @torch.no_grad()
    def finalize(self, non_target_original: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Extract the masks (top-2 |learned| per group), write ``original ⊙ mask`` into the model and restore the
        non-target parameters from ``non_target_original``. Returns the masks (storage layout, bool)."""
        masks: dict[str, torch.Tensor] = {}
        for t in self.targets.values():
            mask = mask_2to4(t.grouped(t.weight.detach()).contiguous())
            masks[t.param_name] = mask.t().contiguous() if t.transposed else mask
        apply_2to4_masks(self.model, masks, self.original)
        if non_target_original:
            params = dict(self.model.named_parameters())
            for name, value in non_target_original.items():
                params[name].data.copy_(value.to(params[name].device))
        return masks

    # ------------------------------------------------------------------ persistence (resume)
    def save_snapshot(self, directory: str | os.PathLike) -> str:
        """Write the original target weights into ``directory`` (used by checkpoints); returns the path."""
        path = os.path.join(os.fspath(directory), SNAPSHOT_NAME)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in self.original.items()}, tmp)
        os.replace(tmp, path)
        return path

    @staticmethod
    def load_snapshot(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
        """Read a snapshot written by :meth:`save_snapshot`."""
        path = os.path.join(os.fspath(directory), SNAPSHOT_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No ProxSparse original-weight snapshot ({SNAPSHOT_NAME}) in {os.fspath(directory)!r}; the checkpoint was "
                f"not written with ProxSparseCallback, so the original weights cannot be recovered."
            )
        return load_file(path)


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
