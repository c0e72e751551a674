"""``ProxSparseCallback``: learn a 2:4 mask with any ``transformers.Trainer``.

The callback only reacts to Trainer events; the method lives in :class:`proxsparse_hf.learning.learner.MaskLearner`.

* ``on_init_end`` / ``on_train_begin``: resolve targets, freeze non-target parameters (unless
  ``config.train_non_target_params``), snapshot the original target weights (or reload the snapshot when resuming),
  record the base model id / revision in the config.
* ``on_pre_optimizer_step`` (after gradient clipping): add the λ2 frozen-weight gradient; with
  ``step_scaling="weight_rms"`` also divide every target by its layer's RMS(W0) and multiply its gradient by it, so the
  optimizer steps the weights in units of the layer's scale — unless the Trainer's optimizer came from
  :func:`~proxsparse_hf.learning.step_scaling.relative_adam`, whose per-layer groups take the same step with no pass.
* ``on_optimizer_step`` (right after ``optimizer.step()``): with ``step_scaling="weight_rms"`` multiply the targets back
  (the ``learning_rate`` of ``TrainingArguments`` is then a step relative to each layer's RMS(W0); use
  ``max_grad_norm=0``), then the 2:4 prox operator on every target.
* ``on_step_end`` / ``on_log``: telemetry (fraction of 2:4 groups, mask flips, regulariser, distance to the original).
* ``on_save``: the original-weight snapshot (and the input norms of an importance measure that uses them) goes into the
  checkpoint folder, so ``resume_from_checkpoint`` works; per-layer scales are derived from it again on resume.
* ``on_train_end``: mask = top-2 |learned| per group, applied to the *original* weights in place; every other
  parameter is restored to its original value. ``trainer.model`` / ``trainer.save_model()`` give the pruned model.

Telemetry and the Trainer's reporting order: the Trainer runs user callbacks *after* the reporting integrations
(TensorBoard, W&B, ...) and appends ``logs`` to ``state.log_history`` before any ``on_log``, so keys a late callback adds
to ``logs`` reach neither. The callback therefore (1) moves itself, once, in ``on_init_end``, to right after the Trainer's
``DefaultFlowCallback`` in the callback list that holds it — so its ``on_log`` runs before every reporting integration and
the metrics it adds to ``logs`` reach all of them and the progress bar — and (2) merges the same metrics into the
``state.log_history`` entry of that step. The ProxSparse metrics are computed in ``on_step_end`` when the Trainer decided
to log, so they describe the step being logged.

Distributed training (``accelerate launch`` with DDP or FSDP2 / FSDP1 ``use_orig_params=True``, or a ``device_map``
split) needs no change: every rank runs the prox on the part of each target weight it holds, the statistics are summed
over ranks, the original-weight snapshot is sharded like the weights (gathered only to write a checkpoint), and the final
masks are applied shard by shard. See :mod:`proxsparse_hf.learning.distributed`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from ..config import ProxSparseConfig
from ..report import SparsityReport, sparsity_report
from ..targets import freeze_non_targets
from .distributed import find_distributed_targets, sharded_sparsity_report
from .importance import get_importance
from .learner import MaskLearner

__all__ = ["ProxSparseCallback"]

logger = logging.getLogger(__name__)

_CHECKPOINT_PREFIX = "checkpoint"


class ProxSparseCallback(TrainerCallback):
    """Learn a 2:4 semi-structured sparsity mask with ProxSparse during ``Trainer.train()``.

    Args:
        config: the :class:`~proxsparse_hf.ProxSparseConfig` (a dict is accepted too).
        log_statistics: add the ProxSparse telemetry to the Trainer logs at every logging step (costs one pass over the
            target weights per log).

    After training, ``callback.masks`` holds the masks, ``callback.report`` the sparsity report, ``callback.learner`` the
    :class:`~proxsparse_hf.learning.learner.MaskLearner`, and ``callback.prox_seconds`` the time spent in prox steps.
    """

    def __init__(self, config: ProxSparseConfig | dict[str, Any], log_statistics: bool = True) -> None:
        if isinstance(config, dict):
            config = ProxSparseConfig.from_dict(config)
        if not isinstance(config, ProxSparseConfig):
            raise TypeError(f"`config` must be a ProxSparseConfig or a dict, got {type(config).__name__}.")
        self.config = config
        self.log_statistics = log_statistics
        self.learner: MaskLearner | None = None
        self.masks: dict | None = None
        self.report: SparsityReport | None = None
        self.prox_seconds = 0.0
        self._non_target_original: dict = {}
        self._pending_logs: dict[str, float] | None = None

    # ------------------------------------------------------------------ setup
    def _prepare_model(self, model) -> None:
        if model is None:
            raise ValueError("ProxSparseCallback needs the Trainer's model.")
        # resolves targets and raises clearly when there are none (FSDP1-wrapped models included)
        targets = find_distributed_targets(model, self.config)
        if not self.config.train_non_target_params:
            freeze_non_targets(model, targets)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Freeze before the optimizer is created so the frozen parameters carry no optimizer state.
        self._prepare_model(model)
        self._run_before_reporting_callbacks()

    def _run_before_reporting_callbacks(self) -> None:
        """Move this callback to right after ``DefaultFlowCallback`` in the Trainer's callback list (see module doc)."""
        for holder in gc.get_referrers(self):
            if isinstance(holder, list) and any(isinstance(cb, DefaultFlowCallback) for cb in holder):
                holder.remove(self)
                last_flow = max(i for i, cb in enumerate(holder) if isinstance(cb, DefaultFlowCallback))
                holder.insert(last_flow + 1, self)
                return
        logger.warning(
            "ProxSparseCallback could not find the Trainer's callback list; its metrics reach state.log_history and "
            "callbacks added after it, but not reporting integrations that run before it."
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._prepare_model(model)
        original = norms = None
        if state.global_step > 0:
            checkpoint = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
            original = MaskLearner.load_snapshot(checkpoint)
            norms = (
                MaskLearner.load_input_norms(checkpoint)
                if get_importance(self.config.importance).needs_input_norms
                else None
            )
            logger.info("ProxSparse: resumed the original-weight snapshot from %s", checkpoint)
        self.learner = MaskLearner(model, self.config, original=original, input_norms=norms)
        self.learner.attach_optimizer(kwargs.get("optimizer"))
        if self.learner.needs_input_norms:
            batches = _calibration_batches(kwargs.get("train_dataloader"), args, self.config.importance_batches)
            self.learner.measure_input_norms(batches)
        self._non_target_original = self.learner.non_target_snapshot() if self.config.train_non_target_params else {}
        if not any(t.weight.requires_grad for t in self.learner.targets.values()):
            raise ValueError("ProxSparseCallback: no trainable target parameters.")
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:  # transformers < 5.x name
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if embeddings is not None and not embeddings.weight.requires_grad:
                model.enable_input_require_grads()
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        if self.config.base_model_name_or_path is None and name:
            self.config.base_model_name_or_path = str(name)
        revision = getattr(getattr(model, "config", None), "_commit_hash", None)
        if self.config.revision is None and revision:
            self.config.revision = str(revision)
        self.prox_seconds = 0.0
        if self.config.step_scaling == "weight_rms" and getattr(args, "max_grad_norm", 0) > 0:
            logger.warning(
                "ProxSparse: step_scaling='weight_rms' with max_grad_norm=%g: clipping by one global gradient norm mixes "
                "layers of different scales, so the steps are not scale-free while it clips; set max_grad_norm=0 (what "
                "learn_mask does for this recipe).",
                args.max_grad_norm,
            )
        logger.info(
            "ProxSparse: %d target modules, lambda1=%g (%s, scaling=%s), lambda2=%g, importance=%s, step_scaling=%s "
            "(learning_rate %g %s)",
            len(self.learner.targets),
            self.config.lambda1,
            self.config.lambda_schedule,
            self.config.lambda_scaling,
            self.config.lambda2,
            self.config.importance,
            self.config.step_scaling,
            getattr(args, "learning_rate", float("nan")),
            "relative to each layer's RMS(W0)" if self.config.step_scaling == "weight_rms" else "absolute",
        )
        if self.log_statistics:
            self.learner.statistics()  # reference masks for the first flip count

    # ------------------------------------------------------------------ optimisation
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.learner.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, lr_scheduler=None, **kwargs):
        lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
        start = time.perf_counter()
        # global_step is incremented after this event: the step that just ran is global_step + 1
        self.learner.after_optimizer_step(state.global_step + 1, state.max_steps, lr=lr)
        self.prox_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ telemetry
    def on_step_end(self, args, state, control, **kwargs):
        if self.log_statistics and control.should_log:
            self._pending_logs = self.learner.statistics()
            self._pending_logs["proxsparse/prox_seconds"] = self.prox_seconds

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_logs is None or logs is None or "loss" not in logs:
            return
        stats, self._pending_logs = self._pending_logs, None
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    # ------------------------------------------------------------------ checkpoints and the end
    def on_save(self, args, state, control, **kwargs):
        # with sharded weights gathering the snapshot is a collective: every rank takes part, the main process writes
        if self.learner is None or not (state.is_world_process_zero or self.learner.sharded):
            return
        checkpoint = os.path.join(args.output_dir, f"{_CHECKPOINT_PREFIX}-{state.global_step}")
        write = state.is_world_process_zero and os.path.isdir(checkpoint)
        if write or self.learner.sharded:
            self.learner.save_snapshot(checkpoint, write=write)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.learner is None:
            return
        self.masks = self.learner.finalize(self._non_target_original)
        if self.learner.sharded:  # counts made on each rank's shards, summed over ranks
            self.report = sharded_sparsity_report(model, self.learner.shards)
        else:
            self.report = sparsity_report(model, self.config, targets=self.learner.targets)
        logger.info(
            "ProxSparse: mask applied to the original weights; %d/%d target layers are 2:4 (target sparsity %.2f%%)",
            self.report.num_2to4_layers,
            len(self.report.layers),
            100 * self.report.target_sparsity,
        )


def _calibration_batches(train_dataloader: Any, args: Any, num_batches: int) -> Any:
    """The first ``num_batches`` global training batches in dataset order, this rank's share of each (rank ``r`` of
    ``W`` takes samples ``[b·G + r·B, b·G + (r+1)·B)`` of global batch ``b``, ``B`` per device, ``G = B·W``), built without
    touching the Trainer's own loader (its iteration state and random seed): the data an importance measure with input
    statistics (``"activation"``) measures input norms on. The norms summed over ranks are then the same for any
    number of processes."""
    if train_dataloader is None:
        raise ValueError(
            "The importance measure needs the training data to measure input norms, but the Trainer passed no "
            "train_dataloader to the callback."
        )
    from torch.utils.data import DataLoader, IterableDataset, Subset

    dataset = getattr(train_dataloader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset):
        return train_dataloader  # an iterable dataset cannot be re-read in order: take this rank's first batches
    per_device = args.per_device_train_batch_size
    world, rank = max(1, args.world_size), args.process_index
    global_batch = per_device * world
    # whole global batches only, so every rank runs the same number of forwards (FSDP's all-gathers need it)
    num_batches = max(1, min(num_batches, len(dataset) // global_batch))
    indices = [
        i
        for b in range(num_batches)
        for i in range(b * global_batch + rank * per_device, b * global_batch + (rank + 1) * per_device)
        if i < len(dataset)
    ]
    return DataLoader(
        Subset(dataset, indices), batch_size=per_device, shuffle=False, collate_fn=train_dataloader.collate_fn
    )
