"""``learn_mask``: the whole mask-learning job (a ``Trainer`` with :class:`ProxSparseCallback`) as one function."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ProxSparseConfig, recipe_learning_rate
from ..report import SparsityReport

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
        tokens: training tokens seen (all processes together).
        pruned_model: with sharded training (FSDP), a plain (unsharded) copy of the pruned model on the main process
            (None on the other ranks); None when the model was not sharded — then ``model`` itself is the pruned model.
        peak_gpu_memory_gib: peak allocated GPU memory during training, ``{"rank<r>/cuda:<d>": GiB}`` for every
            process and GPU it used (empty without CUDA).
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
    pruned_model: nn.Module | None = None
    peak_gpu_memory_gib: dict[str, float] = field(default_factory=dict)


def learn_mask(
    model: nn.Module,
    train_dataset,
    config: ProxSparseConfig,
    *,
    learning_rate: float | None = None,
    num_train_epochs: float = 1.0,
    max_steps: int = -1,
    per_device_train_batch_size: int = 2,
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
    fsdp: bool | str | None = None,
    fsdp_config: dict[str, Any] | str | None = None,
    **training_kwargs: Any,
) -> LearnResult:
    """Learn a 2:4 mask for ``model`` on ``train_dataset`` (items with ``input_ids``/``labels``) with ProxSparse.

    Builds a standard ``transformers.Trainer`` (AdamW, linear schedule with warm-up) with a
    :class:`~proxsparse_hf.learning.callback.ProxSparseCallback`; at the end ``model`` holds ``original ⊙ mask``.
    With ``distill_alpha > 0`` the loss is ``alpha · KD + (1 − alpha) · LM`` against a frozen copy of the dense model
    (:class:`~proxsparse_hf.learning.distill.DistillationTrainer`; costs one more model in memory and one more forward per step).

    ``learning_rate`` defaults to the recipe's for the config's ``step_scaling`` (:func:`recipe_learning_rate`). With
    ``step_scaling="weight_rms"`` (the recommended recipe) it is *relative*: a step of about ``learning_rate`` times
    each layer's RMS(W0) per unit Adam step (default 0.016, i.e. 1.6 %), and gradient clipping by the global norm is
    off unless ``max_grad_norm`` is given (a global norm mixes layers of different scales). With
    ``step_scaling="none"`` it is the absolute AdamW learning rate (the paper's 1e-4) and the Trainer's default
    clipping applies. Extra keyword arguments go to ``TrainingArguments``.

    Multi-GPU: launch the calling script with ``accelerate launch`` (DDP, or FSDP from the accelerate config, e.g.
    ``examples/accelerate_fsdp2.yaml``) or ``torchrun``; ``fsdp`` / ``fsdp_config`` are passed to ``TrainingArguments``
    (e.g. ``fsdp=True, fsdp_config={"version": 2}``). With sharded weights the pruned model is gathered into
    ``LearnResult.pruned_model`` on the main process.
    """
    from transformers import Trainer, TrainingArguments, default_data_collator

    from .callback import ProxSparseCallback
    from .step_scaling import relative_optimizer

    if learning_rate is None:
        learning_rate = recipe_learning_rate(config)
    if config.step_scaling == "weight_rms":
        training_kwargs.setdefault("max_grad_norm", 0.0)
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
            **({"fsdp": fsdp, "fsdp_config": fsdp_config} if fsdp else {}),
            **training_kwargs,
        )
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=train_dataset,
            data_collator=default_data_collator,
            callbacks=[callback, *(callbacks or [])],
            optimizers=(relative_optimizer(model, config, args), None),
            **extra,
        )
        _reset_peak_gpu_memory()
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        peak_memory = peak_gpu_memory_gib()
        if fsdp and not getattr(trainer, "is_fsdp_enabled", False):
            logger.warning(
                "`fsdp` was requested but accelerate did not enable FSDP (it needs GPUs and a multi-process "
                "launch); the model was trained unsharded."
            )
        sharded = callback.learner is not None and callback.learner.sharded
        pruned_model = _gather_pruned_model(trainer, model) if sharded else None
    seq_len = int(train_dataset[0]["input_ids"].numel())
    steps = trainer.state.global_step
    tokens = steps * per_device_train_batch_size * gradient_accumulation_steps * seq_len * args.world_size
    return LearnResult(
        masks=callback.masks,
        report=callback.report,
        config=callback.config,
        log_history=list(trainer.state.log_history),
        training_args={
            "learning_rate": learning_rate,
            "learning_rate_is_relative": config.step_scaling == "weight_rms",
            "max_grad_norm": args.max_grad_norm,
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
            "world_size": args.world_size,
            **({"fsdp": fsdp, "fsdp_config": fsdp_config} if fsdp else {}),
        },
        wall_time_s=wall,
        prox_seconds=callback.prox_seconds,
        steps=steps,
        tokens=tokens,
        pruned_model=pruned_model,
        peak_gpu_memory_gib=peak_memory,
    )


def _reset_peak_gpu_memory() -> None:
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(index)


def peak_gpu_memory_gib() -> dict[str, float]:
    """Peak allocated memory of every GPU of every process since the last reset, ``{"rank<r>/cuda:<d>": GiB}``
    (GPUs a process never allocated on are left out; empty without CUDA). A collective under ``torch.distributed``."""
    from .distributed import all_reduce_tensors, rank, world_size

    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    table = torch.zeros(world_size(), max(devices, 1), dtype=torch.float64)
    for index in range(devices):
        table[rank(), index] = torch.cuda.max_memory_allocated(index) / 2**30
    (table,) = all_reduce_tensors([table])
    return {
        f"rank{r}/cuda:{d}": round(float(table[r, d]), 3)
        for r in range(table.shape[0])
        for d in range(devices)
        if table[r, d] > 0
    }


def _gather_pruned_model(trainer, model: nn.Module) -> nn.Module | None:
    """A plain copy of a sharded (FSDP) pruned model, built on the main process from the gathered full state dict
    (a collective: every rank calls it; the other ranks get None)."""
    from transformers import AutoModelForCausalLM

    from .distributed import clean_name

    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    config = model.config.__class__.from_dict(model.config.to_dict())
    for attr in ("gguf_file", "quantization_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(iter(state_dict.values())).dtype)
    _, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
    fresh.tie_weights()
    # buffers outside the state dict (e.g. rotary inv_freq) are not sharded by FSDP: copy them from the trained model
    buffers = {clean_name(name): buf for name, buf in trainer.model.named_buffers()}
    for name, buf in list(fresh.named_buffers()):
        if buf.device.type == "meta" and name in buffers:
            module_name, _, leaf = name.rpartition(".")
            fresh.get_submodule(module_name)._buffers[leaf] = buffers[name].detach().to("cpu", copy=True)
    still_meta = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.device.type == "meta"]
    if still_meta or unexpected:
        raise RuntimeError(
            f"Gathering the sharded pruned model failed: {len(still_meta)} parameters missing (e.g. {still_meta[:2]}), "
            f"unexpected keys {unexpected[:2]}."
        )
    return fresh.eval()
