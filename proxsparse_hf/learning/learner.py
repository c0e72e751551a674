"""``MaskLearner``: the ProxSparse state and update rules, independent of any training loop.

A custom loop uses it directly::

    learner = MaskLearner(model, config)           # resolves targets, snapshots the original weights
    if learner.needs_input_norms:                  # an importance measure with input statistics ("activation")
        learner.measure_input_norms(batches)
    for step, batch in enumerate(loader, 1):
        loss = model(**batch).loss; loss.backward()
        learner.before_optimizer_step()            # λ2 gradient; step_scaling="weight_rms": gradients in layer units
        optimizer.step(); optimizer.zero_grad()
        learner.after_optimizer_step(step, max_steps, lr=scheduler.get_last_lr()[0])  # relative step, then the prox
    masks = learner.finalize()                     # model now holds original ⊙ mask

:class:`~proxsparse_hf.learning.callback.ProxSparseCallback` calls exactly these methods from the ``Trainer`` events.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..config import ProxSparseConfig
from ..loading import input_device
from ..masks import apply_2to4_masks, extract_2to4_masks, mask_2to4
from ..targets import Target, freeze_non_targets
from . import checkpoint, telemetry
from .checkpoint import INPUT_NORMS_NAME, SNAPSHOT_NAME
from .distributed import (
    TargetShard,
    all_reduce_sums,
    find_distributed_targets,
    global_rms,
    is_sharded,
    local_tensor,
    shard_targets,
)
from .importance import get_importance, measure_input_norms
from .prox import Prox2to4Batch, prox_2to4
from .regularizers import frozen_weight_grad
from .step_scaling import RMS_KEY, RelativeStep, step_unit

__all__ = ["INPUT_NORMS_NAME", "SNAPSHOT_NAME", "MaskLearner"]

logger = logging.getLogger(__name__)


class MaskLearner:
    """Learns a 2:4 mask for every target of ``model`` by proximal gradient (ProxSparse).

    Args:
        model: the model being trained (weights are updated in place by the caller's optimizer).
        config: the recipe.
        original: original target weights ``{weight_name: tensor}`` (e.g. restored from a checkpoint); snapshotted from the
            model when None.
        input_norms: for an importance measure with input statistics (``"activation"``), ``‖X_j‖₂`` per input feature
            of every target (``{weight_name: 1-D tensor}``, e.g. restored from a checkpoint); otherwise measure them with
            :meth:`measure_input_norms` before the first prox step.

    Distributed training (DDP, FSDP2 ``DTensor``, FSDP1 ``use_orig_params=True``, ``device_map``): ``self.shards``
    describes what this rank holds of each target (see :mod:`proxsparse_hf.learning.distributed`); the snapshot, the prox and
    the final mask application work on the local shards only, and per-layer scales come from the full weights. With
    sharded weights, :meth:`statistics`, :meth:`finalize`, :meth:`save_snapshot`, :meth:`measure_input_norms`,
    :meth:`set_input_norms` and the constructor are collectives (every rank calls them).
    """

    def __init__(
        self,
        model: nn.Module,
        config: ProxSparseConfig,
        original: Mapping[str, torch.Tensor] | None = None,
        input_norms: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.importance = get_importance(config.importance)
        self.targets: dict[str, Target] = find_distributed_targets(model, config)
        frozen = [t.name for t in self.targets.values() if not t.weight.requires_grad]
        if frozen:
            raise ValueError(
                f"{len(frozen)} target module(s) have frozen weights (requires_grad=False), e.g. `{frozen[0]}`; ProxSparse "
                f"learns the mask through the targets' gradients. Unfreeze them or exclude them with `exclude_modules`."
            )
        # What this rank holds of each target; snapshots, masks and layer_scale are keyed by `shard.name` (the
        # state_dict name; equal to `Target.param_name` unless an FSDP1 wrapper inserted name parts).
        self.shards: dict[str, TargetShard] = shard_targets(self.targets, model)
        self.sharded = is_sharded(self.shards)
        self.importance.check_sharding(self.shards)
        device = None if config.snapshot_device == "same" else torch.device("cpu")
        if original is None:
            original = {s.name: s.local(s.target.weight.detach()) for s in self.shards.values()}
        else:  # full tensors (e.g. from a checkpoint): keep this rank's part only
            missing = [s.name for s in self.shards.values() if s.name not in original]
            if missing:
                raise KeyError(
                    f"The original-weight snapshot has no tensor for {missing[:3]} ({len(missing)} missing)."
                )
            original = {s.name: s.shard(original[s.name]) for s in self.shards.values()}
        self.original: dict[str, torch.Tensor] = {
            s.name: _snapshot_copy(original[s.name].detach(), device or s.local(s.target.weight).device)
            for s in self.shards.values()
        }
        # Per-input-feature scale s of the importance measure, shaped to broadcast over `shard.grouped(...)`.
        self.column_scale: dict[str, torch.Tensor] = {}
        self.input_norms: dict[str, torch.Tensor] = {}
        # Per-layer prox strength multiplier: 1/RMS(W0·s) for lambda_scaling="weight_scale" (see ProxSparseConfig).
        self.layer_scale: dict[str, float] = {}
        self._set_layer_scale()
        # RMS(W0) of every full target weight: the unit of the step and of the λ2 term with step_scaling="weight_rms"
        self.weight_rms: dict[str, float] = {}
        self._relative_step: RelativeStep | None = None
        if config.step_scaling == "weight_rms":
            self.weight_rms = {
                n: step_unit(r) for n, r in global_rms(self.shards, self.original, self.sharded).items()
            }
            self._relative_step = RelativeStep(self.shards, self.weight_rms)
        self._last_masks: dict[str, torch.Tensor] | None = None  # group_codes() of the previous statistics' masks
        self._prox_batch: Prox2to4Batch | None = None  # built at the first prox step, rebuilt if weights move
        if input_norms is not None:
            self.set_input_norms(input_norms)

    # ------------------------------------------------------------------ importance statistics
    @property
    def needs_input_norms(self) -> bool:
        """True while the importance measure needs input-feature norms and has none yet."""
        return self.importance.needs_input_norms and not self.column_scale

    def measure_input_norms(self, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Run the model (eval mode, no grad) on the first ``config.importance_batches`` of ``batches`` (dicts of model
        inputs; ``labels`` are dropped), record ``‖X_j‖₂`` of every target's input features and install them with
        :meth:`set_input_norms`. Returns the norms (CPU, float32).

        Under ``torch.distributed`` this is a collective: the squared sums are added over ranks, so each rank passes
        its own share of the data (the callback gives rank ``r`` its slice of every global batch)."""
        norms = measure_input_norms(
            self.model, self.shards, batches, self.config.importance_batches, device=input_device(self.model)
        )
        self.set_input_norms(norms)
        return norms

    @torch.no_grad()
    def set_input_norms(self, input_norms: Mapping[str, torch.Tensor]) -> None:
        """Install ``‖X_j‖₂`` per input feature of every target: the prox and the top-2 rule then act on ``|W|·s`` with
        ``s`` the importance measure's column scale (``"activation"``: ``norms / RMS(norms)``, floored at 1e-3), and
        ``lambda_scaling="weight_scale"`` uses RMS(W0·s)."""
        if not self.importance.needs_input_norms:
            raise ValueError(
                f"Input norms are not used by `importance`={self.config.importance!r} (it needs no input statistics)."
            )
        for s in self.shards.values():
            if s.name not in input_norms:
                raise KeyError(f"The input norms have no entry for target `{s.name}`.")
            in_features = s.grouped(self.original[s.name]).shape[-1]
            norms = torch.as_tensor(input_norms[s.name]).detach().float().reshape(-1)
            if norms.numel() != in_features or not bool(torch.isfinite(norms).all()) or bool((norms < 0).any()):
                raise ValueError(
                    f"Input norms of `{s.name}`: expected {in_features} finite values >= 0, got shape "
                    f"{tuple(input_norms[s.name].shape)}."
                )
            scale = self.importance.column_scale(norms)
            if (
                not isinstance(scale, torch.Tensor)
                or scale.shape != norms.shape
                or not bool((torch.isfinite(scale) & (scale > 0)).all())
            ):
                raise ValueError(
                    f"`importance`={self.config.importance!r}: column_scale() of `{s.name}` must return {in_features} "
                    f"finite values > 0 (one per input feature)."
                )
            self.input_norms[s.name] = norms.cpu()
            self.column_scale[s.name] = scale.float().to(s.local(s.target.weight).device)
        self._set_layer_scale()

    def _set_layer_scale(self) -> None:
        """λ1 multiplier of every target: 1 (``lambda_scaling="none"``) or 1/RMS of the full original weight in the
        coordinates the prox works in (``W0``, or ``W0·s`` with a column scale). A collective when sharded."""
        if self.config.lambda_scaling != "weight_scale":
            self.layer_scale = {s.name: 1.0 for s in self.shards.values()}
            return
        scores = {s.name: self._scores(s, s.grouped(self.original[s.name])) for s in self.shards.values()}
        rms = global_rms(self.shards, scores, self.sharded)
        self.layer_scale = {name: 1.0 / step_unit(value) for name, value in rms.items()}

    def _scores(self, s: TargetShard, view: torch.Tensor) -> torch.Tensor:
        """The values the regulariser and the top-2 rule act on: the grouped weights, times the column scale if any."""
        return telemetry.scores(view, self.column_scale.get(s.name))

    # ------------------------------------------------------------------ parameters
    def freeze_non_targets(self) -> int:
        """Set ``requires_grad=False`` on every parameter that is not a target weight; returns how many were frozen."""
        return freeze_non_targets(self.model, self.targets)

    def non_target_snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable non-target parameters (restored by :meth:`finalize`)."""
        target_names = {t.param_name for t in self.targets.values()}
        return {
            name: local_tensor(p).detach().to("cpu", copy=True)
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

    def attach_optimizer(self, optimizer: torch.optim.Optimizer | None) -> int:
        """Take note of an optimizer built by :func:`~proxsparse_hf.learning.step_scaling.relative_adam` (or with
        :func:`~proxsparse_hf.learning.step_scaling.relative_param_groups`): the targets in its relative groups already
        get relative steps, so :meth:`before_optimizer_step` / :meth:`after_optimizer_step` skip their rescaling passes.
        Returns how many targets it covers (0 for any other optimizer, which then gets the generic rescaling).

        Raises:
            ValueError: relative groups with ``step_scaling="none"``, or a group whose recorded RMS differs from the
                snapshot's (the optimizer was built on weights that are not the original ones).
        """
        recorded = {}
        for group in getattr(optimizer, "param_groups", []):
            if RMS_KEY in group:
                recorded.update({id(p): group[RMS_KEY] for p in group["params"]})
        if not recorded:
            return 0
        if self._relative_step is None:
            raise ValueError(
                f"The optimizer has relative parameter groups ({RMS_KEY}) but `step_scaling`="
                f"{self.config.step_scaling!r}; use step_scaling='weight_rms' or an optimizer without them."
            )
        covered = {}
        for s in self.shards.values():
            r = recorded.get(id(s.target.weight))
            if r is None:
                continue
            expected = self.weight_rms[s.name]
            if not math.isclose(r, expected, rel_tol=1e-3):
                raise ValueError(
                    f"The optimizer's group for `{s.name}` records RMS {r:.6g}, the original weights have {expected:.6g}: "
                    f"build the optimizer before training, on the original weights."
                )
            covered[s.name] = s
        rest = {key: s for key, s in self.shards.items() if s.name not in covered}
        self._relative_step = RelativeStep(rest, self.weight_rms) if rest else None
        logger.info(
            "ProxSparse: relative steps of %d target(s) taken by the optimizer's parameter groups", len(covered)
        )
        return len(covered)

    def before_optimizer_step(self) -> None:
        """Everything between the final gradients (after clipping) and ``optimizer.step()``: the λ2 gradient, then, with
        ``step_scaling="weight_rms"``, the gradients in layer units and a copy of the weights before the step."""
        self.add_frozen_weight_grad()
        if self._relative_step is not None:
            self._relative_step.before_step()

    def after_optimizer_step(self, step: int, max_steps: int, lr: float | None = None) -> bool:
        """Everything right after ``optimizer.step()``: with ``step_scaling="weight_rms"`` the step becomes relative to
        each layer's RMS(W0), then the prox (see :meth:`prox_step`, whose result is returned)."""
        if self._relative_step is not None:
            self._relative_step.after_step()
        return self.prox_step(step, max_steps, lr=lr)

    @torch.no_grad()
    def add_frozen_weight_grad(self) -> None:
        """Add ``λ2 · ∂/∂W Σ(W ⊙ (W − W0)/(W0 + ε·sign W0))²`` to every target's gradient (no-op when ``lambda2 == 0``).
        With ``step_scaling="weight_rms"`` the term is taken on ``W / RMS(W0)`` (``ε`` relative to the layer scale)."""
        if self.config.lambda2 == 0:
            return
        for s in self.shards.values():
            weight = s.target.weight
            if weight.grad is None:
                continue
            local, local_grad = s.local(weight.detach()), s.local(weight.grad)
            original = self.original[s.name].to(local.device, non_blocking=True)
            r = self.weight_rms.get(s.name, 1.0)  # the term on W/r: ∂/∂W = grad(W, W0, ε·r) / r²
            grad = frozen_weight_grad(local, original, self.config.epsilon * r)
            local_grad.add_(grad.to(local_grad.dtype), alpha=self.config.lambda2 / (r * r))

    @torch.no_grad()
    def prox_step(self, step: int, max_steps: int, lr: float | None = None) -> bool:
        """Apply the 2:4 prox operator to every target (in place) if ``step`` is a prox step; returns whether it ran."""
        if step % self.config.prox_every_n_steps != 0:
            return False
        lam = self.lambda_at(step, max_steps, lr)
        if lam <= 0:
            return False
        if self.needs_input_norms:
            raise RuntimeError(
                f"`importance`={self.config.importance!r}: measure the input norms (MaskLearner.measure_input_norms) "
                f"before the first prox step."
            )
        solver = dict(
            max_iter=self.config.solver_max_iter, tol=self.config.solver_tol, backend=self.config.solver_backend
        )
        views, factors, scales = [], [], []
        for s in self.shards.values():
            view = s.grouped(s.local(s.target.weight.data))  # this rank's shard only
            if view.numel() == 0:
                continue
            # with a column scale the prox runs in the scaled coordinates W·s, fused into the same pass
            scale = self.column_scale.get(s.name)
            if view.is_contiguous():
                views.append(view)
                factors.append(self.layer_scale[s.name])
                scales.append(scale)
            else:  # a Conv1D's grouped view is transposed: one coalesced copy beats strided groups
                view.copy_(prox_2to4(view.contiguous(), lam * self.layer_scale[s.name], column_scale=scale, **solver))
        # all contiguous targets at once: on CUDA two kernel launches per step, whatever the number of targets
        if self._prox_batch is None or not self._prox_batch.matches(views, factors, scales):
            self._prox_batch = Prox2to4Batch(views, multipliers=factors, column_scales=scales, **solver)
        self._prox_batch(lam)
        return True

    # ------------------------------------------------------------------ telemetry
    # rows of each snapshot held on another device than its weight, cached there by statistics():
    # {name: (snapshot, stride, rows)}
    _snapshot_rows: dict[str, tuple[torch.Tensor, int, torch.Tensor]] | None = None

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Training telemetry over all targets.

        ``proxsparse/frac_2to4``: fraction of groups with ≤ 2 non-zeros; ``proxsparse/mask_flips``: groups whose top-2
        support changed since the previous call; ``proxsparse/regularizer``: Σ R(w_g); ``proxsparse/dist_to_original``:
        mean |W − W0| (exact when the snapshot lives on the weights' device; estimated on every 64th row when the
        snapshot is on another device, e.g. ``snapshot_device="cpu"`` with GPU weights: those rows of the weight's
        grouped 2-D view, its storage layout for ``nn.Linear``, are cached on the weight's device at the first call, so
        no call copies the whole snapshot); ``proxsparse/lambda_scale_mean``: mean per-layer multiplier of λ1.

        Per target one pass of :func:`~proxsparse_hf.learning.telemetry.group_statistics` (a fused kernel on CUDA); the
        sums accumulate per device and are read with one sync each.
        """
        # sizes are known here; [ok, flips, regulariser, Σ|W − W0|] accumulate per device, read with one sync each
        groups = numel = 0.0
        sums: dict[torch.device, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        for s in self.shards.values():
            weight = s.local(s.target.weight.detach())
            view = s.grouped(weight)
            snapshot = self.original[s.name]
            stride = telemetry.distance_row_stride(snapshot, weight)
            original = s.grouped(snapshot) if stride == 1 else self._sampled_snapshot(s, view, stride)
            codes, row = telemetry.group_statistics(
                view,
                self.column_scale.get(s.name),
                None if self._last_masks is None else self._last_masks[s.name],
                original=original,
                original_row_stride=stride,
            )
            if original.numel() not in (0, view.numel()):  # a row sample: scaled up to the whole weight
                row[3] *= view.numel() / original.numel()
            # a sharded weight's counts are summed over ranks below; replicated copies count once in total
            scale = 1.0 / s.replication if self.sharded else 1.0
            groups += scale * codes.numel()
            numel += scale * weight.numel()
            sums[weight.device] = sums.get(weight.device, 0.0) + scale * row
            masks[s.name] = codes
        per_device = [row.tolist() for row in sums.values()]
        ok, flips, reg, dist_sum = (sum(column) for column in zip(*per_device, [0.0] * 4))
        if self.sharded:
            groups, ok, flips, reg, dist_sum, numel = all_reduce_sums([groups, ok, flips, reg, dist_sum, numel])
        groups, ok, flips = round(groups), round(ok), round(flips)
        first = self._last_masks is None
        self._last_masks = masks
        return {
            "proxsparse/frac_2to4": ok / groups if groups else 1.0,
            "proxsparse/mask_flips": float("nan") if first else float(flips),
            "proxsparse/regularizer": reg,
            "proxsparse/dist_to_original": dist_sum / numel if numel else 0.0,
            "proxsparse/lambda_scale_mean": sum(self.layer_scale.values()) / max(1, len(self.layer_scale)),
        }

    def _sampled_snapshot(self, s: TargetShard, view: torch.Tensor, stride: int) -> torch.Tensor:
        """Rows ``0, stride, 2·stride, …`` of the grouped snapshot of ``s``, copied to ``view``'s device at the first
        call and cached (1/stride of the snapshot in memory there)."""
        if self._snapshot_rows is None:
            self._snapshot_rows = {}
        snapshot = self.original[s.name]
        cached = self._snapshot_rows.get(s.name)
        if cached is None or cached[0] is not snapshot or cached[1] != stride or cached[2].device != view.device:
            rows = telemetry.sample_rows(s.grouped(snapshot), stride).to(view.device)
            cached = self._snapshot_rows[s.name] = (snapshot, stride, rows)
        return cached[2]

    # ------------------------------------------------------------------ end of training
    @torch.no_grad()
    def finalize(self, non_target_original: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Extract the masks (top-2 scores per group), write ``original ⊙ mask`` into the model and restore the
        non-target parameters from ``non_target_original``. Returns the masks (storage layout, bool).

        With sharded weights every rank masks its own shard and the returned masks are the full masks, gathered on CPU
        (a collective)."""
        masks: dict[str, torch.Tensor] = {}
        if self.needs_input_norms:
            raise RuntimeError(
                f"`importance`={self.config.importance!r}: the input norms were never measured; no mask can be chosen."
            )
        if not self.sharded and not self.column_scale:
            masks = extract_2to4_masks(self.model, targets=self.targets)
            apply_2to4_masks(self.model, masks, self.original)
        else:
            for s in self.shards.values():
                local = s.local(s.target.weight.data)
                view = s.grouped(local)
                local_mask = torch.zeros(local.shape, dtype=torch.bool, device=local.device)
                s.grouped(local_mask).copy_(mask_2to4(self._scores(s, view)))  # storage layout of the local shard
                kept = self.original[s.name].to(device=local.device, dtype=local.dtype)
                local.copy_(torch.where(local_mask, kept, torch.zeros((), dtype=local.dtype, device=local.device)))
                masks[s.name] = s.gather(local_mask)
        if non_target_original:
            params = dict(self.model.named_parameters())
            for name, value in non_target_original.items():
                local_tensor(params[name]).copy_(value.to(local_tensor(params[name]).device))
        return masks

    # ------------------------------------------------------------------ persistence (resume)
    def save_snapshot(self, directory: str | os.PathLike, write: bool = True) -> str:
        """Write the original target weights (and the input norms, if any) into ``directory`` (used by checkpoints);
        returns the snapshot's path. Per-layer scales are derived from these on resume, so they need no file.

        With sharded weights the full tensors are gathered one target at a time (a collective: every rank calls it) and
        only ranks with ``write=True`` (the main process) write the files."""
        path = os.path.join(os.fspath(directory), SNAPSHOT_NAME)
        if self.sharded:
            tensors = {}
            for s in self.shards.values():
                full = s.gather(self.original[s.name])
                if write:
                    tensors[s.name] = full
        else:
            tensors = self.original
        if write:
            checkpoint.save_learning_state(directory, tensors, self.input_norms)
        return path

    @staticmethod
    def load_input_norms(directory: str | os.PathLike) -> dict[str, torch.Tensor] | None:
        """The input-feature norms saved beside a snapshot, or None when there are none."""
        return checkpoint.load_input_norms(directory)

    @staticmethod
    def load_snapshot(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
        """Read a snapshot written by :meth:`save_snapshot`."""
        return checkpoint.load_snapshot(directory)


def _snapshot_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``tensor`` on ``device``; a CPU copy of a CUDA tensor goes to pinned memory where the platform allows
    it, so that the per-step and telemetry reads of the snapshot are fast asynchronous transfers."""
    device = torch.device(device)
    if device.type != "cpu" or tensor.device.type != "cuda":
        return tensor.to(device, copy=True)
    try:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    except RuntimeError:  # no pinnable memory (e.g. a locked-down container): a pageable copy works too
        return tensor.to(device, copy=True)
    return out.copy_(tensor)
