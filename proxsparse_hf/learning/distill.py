"""Knowledge distillation from the dense model during mask learning (an optional improvement over the LM loss).

The student is the model being sparsified; the teacher is a frozen copy of the same model taken *before* training, so the
mask is learned to preserve the dense model's full output distribution rather than only the next-token labels.
``DistillationTrainer`` overrides ``Trainer.compute_loss`` (the documented extension point); ``ProxSparseCallback`` works
with it unchanged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

__all__ = ["DistillationTrainer", "distillation_loss", "frozen_teacher"]


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy of ``model`` (same device and dtype)."""
    teacher = copy.deepcopy(model).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token-mean ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the positions of ``attention_mask``."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(dim=-1)
    if attention_mask is not None:
        mask = attention_mask.to(kl.dtype)
        return temperature**2 * (kl * mask).sum() / mask.sum().clamp_min(1)
    return temperature**2 * kl.mean()


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is ``alpha · KD + (1 − alpha) · LM loss`` against a frozen dense ``teacher``.

    Args:
        teacher: the dense model (see :func:`frozen_teacher`).
        alpha: weight of the distillation term in [0, 1].
        temperature: softmax temperature (> 0).
    """

    def __init__(self, *args, teacher: nn.Module, alpha: float = 1.0, temperature: float = 1.0, **kwargs) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha`={alpha!r} is invalid; allowed: a number in [0, 1].")
        if not temperature > 0:
            raise ValueError(f"`temperature`={temperature!r} is invalid; allowed: a number > 0.")
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.alpha = alpha
        self.temperature = temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs.loss
        if self.alpha > 0:
            with torch.no_grad():
                teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
                teacher_logits = self.teacher(**teacher_inputs).logits
            kd = distillation_loss(outputs.logits, teacher_logits, inputs.get("attention_mask"), self.temperature)
            loss = self.alpha * kd + (1.0 - self.alpha) * loss
        return (loss, outputs) if return_outputs else loss
