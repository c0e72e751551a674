"""Input-feature statistics of a layer over calibration tokens: ``Σ_t x_tj²`` per input feature ``j``, hence ``‖X_j‖₂``.

One neutral home for what several methods read from activations: the Wanda and RIA pruners
(:mod:`proxsparse_hf.pruners`) and ``importance="activation"`` of mask learning (:mod:`proxsparse_hf.learning`).
"""

from __future__ import annotations

import torch

from .targets import Target

__all__ = ["InputNormStats", "make_input_norm_stats"]


class InputNormStats:
    """Running sum of squares of every input feature of one layer (``‖X_j‖₂²`` over all tokens seen).

    Args:
        in_features: number of input features of the layer.
        device: where the running sums live (the layer's device).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a layer input ``[..., in_features]``; every leading position counts as one token."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_sq += (x * x).sum(dim=0).to(self.sum_sq.dtype)
        self.num_tokens += x.shape[0]

    @property
    def input_norms(self) -> torch.Tensor:
        """``‖X_j‖₂`` per input feature (float32)."""
        return self.sum_sq.sqrt().float()


def make_input_norm_stats(target: Target) -> InputNormStats:
    """Empty :class:`InputNormStats` sized to ``target``'s input dimension (dim 0 of a ``Conv1D`` weight), on its device."""
    weight = target.weight
    in_features = weight.shape[0] if target.transposed else weight.shape[1]
    return InputNormStats(in_features, device=weight.device)
