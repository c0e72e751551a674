"""``learn_mask``: the whole mask-learning job (a ``Trainer`` with :class:`ProxSparseCallback`) as one function."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import ProxSparseConfig
from .report import SparsityReport

__all__ = ["LearnResult", "learn_mask", "warmup_arguments"]

logger = logging.getLogger(__name__)


def warmup_arguments(ratio: float) -> dict[str, float]:
    """``TrainingArguments`` keyword for a warm-up *ratio*: ``warmup_ratio`` where it exists (transformers 4.x), else a
    fractional ``warmup_steps`` (transformers 5 reads a value in [0, 1) as a ratio)."""
    from dataclasses import fields as dataclass_fields

    from transformers import TrainingArguments

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"`warmup_ratio`={ratio!r} is invalid; allowed: a number in [0, 1).")
    names = {f.name for f in dataclass_fields(TrainingArguments)}
    return {"warmup_ratio": ratio} if "warmup_ratio" in names else {"warmup_steps": ratio}


@dataclass
class LearnResult:
    """What :func:`learn_mask` returns.

    Args:
        masks: ``{weight_name: bool mask}``.
        report: sparsity report of the pruned model.
        config: the config, with ``base_model_name_or_path`` / ``revision`` filled in.
        log_history: the Trainer's ``state.log_history`` (incl. ProxSparse telemetry).
        training_args: the ``TrainingArguments`` that were used, as a dict of the relevant fields.
        wall_time_s: seconds spent in ``trainer.train()``.
        prox_seconds: seconds spent in prox steps.
        steps: optimizer steps taken.
        tokens: training tokens seen.
    """

    masks: dict[str, torch.Tensor]
    report: SparsityReport
    config: ProxSparseConfig
    log_history: list[dict[str, Any]] = field(default_factory=list)
    training_args: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    prox_seconds: float = 0.0
    steps: int = 0
    tokens: int = 0


def learn_mask(
    model: nn.Module,
    train_dataset,
    config: ProxSparseConfig,
    *,
    learning_rate: float = 1e-4,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    per_device_train_batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    logging_steps: int = 10,
    output_dir: str | None = None,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    report_to: list[str] | None = None,
    callbacks: list | None = None,
    distill_alpha: float = 0.0,
    distill_temperature: float = 1.0,
    **training_kwargs: Any,
) -> LearnResult:
    """Learn a 2:4 mask for ``model`` on ``train_dataset`` (items with ``input_ids``/``labels``) with ProxSparse.

    Builds a standard ``transformers.Trainer`` (AdamW, linear schedule with warm-up) with a
    :class:`trainer_callbacks.ProxSparseCallback`; at the end ``model`` holds ``original ⊙ mask``.
    With ``distill_alpha > 0`` the loss is ``alpha · KD + (1 − alpha) · LM`` against a frozen copy of the dense model
    (:class:`~proxsparse_hf.distill.DistillationTrainer`; costs one more model in memory and one more forward per step).
    Extra keyword arguments go to ``TrainingArguments``.
    """
    from transformers import Trainer, TrainingArguments, default_data_collator

    from trainer_callbacks import ProxSparseCallback

    if learning_rate <= 0:
        raise ValueError(f"`learning_rate`={learning_rate!r} must be > 0.")
    if len(train_dataset) == 0:
        raise ValueError("`train_dataset` is empty.")
    if not 0.0 <= distill_alpha <= 1.0:
        raise ValueError(f"`distill_alpha`={distill_alpha!r} is invalid; allowed: a number in [0, 1].")
    trainer_cls, extra = Trainer, {}
    if distill_alpha > 0:
        from .distill import DistillationTrainer, frozen_teacher

        trainer_cls = DistillationTrainer
        extra = {"teacher": frozen_teacher(model), "alpha": distill_alpha, "temperature": distill_temperature}
    callback = ProxSparseCallback(config)
    with tempfile.TemporaryDirectory(prefix="proxsparse-trainer-") as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp,
            learning_rate=learning_rate,
            num_train_epochs=num_train_epochs,
            max_steps=max_steps,
            per_device_train_batch_size=per_device_train_batch_size,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **warmup_arguments(warmup_ratio),
            weight_decay=weight_decay,
            lr_scheduler_type="linear",
            seed=seed,
            data_seed=seed,
            logging_steps=logging_steps,
            save_strategy="no" if output_dir is None else training_kwargs.pop("save_strategy", "no"),
            bf16=bf16,
            gradient_checkpointing=gradient_checkpointing,
            report_to=report_to or [],
            remove_unused_columns=False,
            **training_kwargs,
        )
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=default_data_collator,
            callbacks=[callback, *(callbacks or [])],
            **extra,
        )
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    seq_len = int(train_dataset[0]["input_ids"].numel())
    steps = trainer.state.global_step
    tokens = steps * per_device_train_batch_size * gradient_accumulation_steps * seq_len
    return LearnResult(
        masks=callback.masks,
        report=callback.report,
        config=callback.config,
        log_history=list(trainer.state.log_history),
        training_args={
            "learning_rate": learning_rate,
            "num_train_epochs": num_train_epochs,
            "max_steps": max_steps,
            "per_device_train_batch_size": per_device_train_batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "warmup_ratio": warmup_ratio,
            "weight_decay": weight_decay,
            "seed": seed,
            "bf16": bf16,
            "gradient_checkpointing": gradient_checkpointing,
            "distill_alpha": distill_alpha,
            "distill_temperature": distill_temperature,
        },
        wall_time_s=wall,
        prox_seconds=callback.prox_seconds,
        steps=steps,
        tokens=tokens,
    )
