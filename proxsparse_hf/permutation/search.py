"""The permutation search for one importance matrix: which input channels share each 2:4 group (the method is
described in :mod:`proxsparse_hf.permutation`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..constants import SUPPORTED_M, SUPPORTED_N

__all__ = ["PERMUTATION_IMPORTANCES", "PERMUTATION_REFINEMENTS", "find_permutation", "kept_importance"]

PERMUTATION_IMPORTANCES: Mapping[str, str] = {
    "magnitude": "|W|",
    "activation": "|W|·‖X_j‖ (Wanda)",
    "ria": "RIA score (|W| relative to its row and column, times ‖X_j‖^alpha)",
}
"""Importance measures the permutation can maximise (name → label); all but ``magnitude`` read calibration data."""

PERMUTATION_REFINEMENTS = ("auto", "hungarian", "swap", "none")
"""``hungarian``: exact re-assignment per position (needs scipy); ``swap``: pairwise swaps (pure torch); ``auto``:
hungarian when scipy is installed, else swap; ``none``: the heuristic allocation only."""


def kept_importance(scores: torch.Tensor) -> float:
    """``Σ`` over rows and groups of four consecutive columns of the two largest entries: the importance a top-2-of-4
    mask keeps (``scores`` is ``[rows, n]``, ``n`` divisible by 4)."""
    rows, n = scores.shape
    grouped = scores.reshape(rows, n // SUPPORTED_M, SUPPORTED_M)
    return float(grouped.topk(SUPPORTED_N, dim=-1).values.sum(dtype=torch.float64))


def _heuristic_allocation(scores: torch.Tensor) -> torch.Tensor:
    """RIA's channel allocation: channels sorted by total importance, quarter ``p`` of the order fills position ``p``
    of the groups, every other quarter reversed (a snake), so every group gets a mix of strong and weak channels."""
    n = scores.shape[1]
    groups = n // SUPPORTED_M
    order = scores.sum(dim=0).argsort(stable=True)
    perm = torch.empty(n, dtype=torch.long, device=scores.device)
    for p in range(SUPPORTED_M):
        quarter = order[p * groups : (p + 1) * groups]
        perm[p::SUPPORTED_M] = quarter.flip(0) if p % 2 else quarter
    return perm


def _position_values(scores: torch.Tensor, groups: torch.Tensor, p: int) -> torch.Tensor:
    """``V[g, c]``: kept importance of group ``g`` when its channel at position ``p`` is replaced by the channel at
    position ``p`` of group ``c`` (the other three fixed). With ``t1 >= t2`` the two largest of the fixed three per row,
    the top-2 of four is ``t1 + max(t2, s)``, and ``Σ max(t2, s) = (Σ t2 + Σ s + ‖t2 − s‖₁) / 2`` — one ``cdist``."""
    rows = scores.shape[0]
    count = groups.shape[0]
    grouped = scores[:, groups.reshape(-1)].view(rows, count, SUPPORTED_M)
    fixed = [q for q in range(SUPPORTED_M) if q != p]
    top = grouped[:, :, fixed].topk(SUPPORTED_N, dim=-1).values
    t1, t2 = top[..., 0].t().contiguous(), top[..., 1].t().contiguous()  # [groups, rows]
    free = grouped[:, :, p].t().contiguous()
    distance = torch.cdist(t2.unsqueeze(0), free.unsqueeze(0), p=1).squeeze(0)
    return t1.sum(1, keepdim=True) + (t2.sum(1, keepdim=True) + free.sum(1).unsqueeze(0) + distance) / 2


def _assign_hungarian(values: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment

    _, columns = linear_sum_assignment(values.double().cpu().numpy(), maximize=True)
    return torch.as_tensor(columns, dtype=torch.long, device=values.device)


def _assign_swaps(values: torch.Tensor, max_iterations: int = 10_000) -> torch.Tensor:
    """Local search for the assignment: swap the candidates of two groups while that gains; every iteration applies
    all mutually-best pairs at once (they are disjoint)."""
    count = values.shape[0]
    columns = torch.arange(count, device=values.device)
    index = torch.arange(count, device=values.device)
    tolerance = 1e-7 * float(values.diagonal().abs().sum())
    for _ in range(max_iterations):
        taken = values[:, columns]  # taken[g, h]: group g with group h's current candidate
        current = taken.diagonal()
        gain = taken + taken.t() - current.unsqueeze(1) - current.unsqueeze(0)
        gain.fill_diagonal_(float("-inf"))
        best_gain, partner = gain.max(dim=1)
        chosen = (partner[partner] == index) & (best_gain > tolerance) & (index < partner)
        if not bool(chosen.any()):
            break
        a, b = index[chosen], partner[chosen]
        columns[a], columns[b] = columns[b].clone(), columns[a].clone()
    return columns


def _resolve_refine(refine: str) -> str:
    if refine not in PERMUTATION_REFINEMENTS:
        raise ValueError(f"`refine`={refine!r} is invalid; allowed: one of {PERMUTATION_REFINEMENTS}.")
    if refine in ("auto", "hungarian"):
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:
            if refine == "hungarian":
                raise ValueError(
                    "`refine`='hungarian' needs scipy (pip install scipy); use refine='swap' (pure torch) instead."
                ) from None
            return "swap"
        return "hungarian"
    return refine


def _check_rounds(rounds: Any) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"`rounds`={rounds!r} is invalid; allowed: an integer >= 0.")
    return rounds


@torch.no_grad()
def find_permutation(scores: torch.Tensor, *, refine: str = "auto", rounds: int = 3) -> torch.Tensor:
    """A permutation of the columns of ``scores`` (``[rows, n]``, importance >= 0) that raises
    :func:`kept_importance`; never lower than the identity's.

    Args:
        scores: importance of every weight, input channels along the last dimension (``n`` divisible by 4).
        refine: ``"auto"``, ``"hungarian"``, ``"swap"`` or ``"none"`` (see :data:`PERMUTATION_REFINEMENTS`).
        rounds: passes over the four positions of the refinement (it stops early when a pass gains nothing).

    Returns:
        ``perm`` (``LongTensor [n]``): column ``k`` of the permuted matrix is column ``perm[k]`` of ``scores``.

    Raises:
        ValueError: ``scores`` not 2-D, ``n`` not divisible by 4, negative or non-finite entries, or a bad option.
    """
    method = _resolve_refine(refine)
    rounds = _check_rounds(rounds)
    if scores.dim() != 2 or scores.shape[1] % SUPPORTED_M or scores.shape[1] == 0:
        raise ValueError(
            f"`scores` of shape {tuple(scores.shape)} is invalid; allowed: [rows, n] with n a positive multiple of "
            f"{SUPPORTED_M}."
        )
    s = scores.detach().float()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("`scores` must be finite and >= 0 (importance of every weight).")
    n = s.shape[1]
    identity = torch.arange(n, device=s.device)
    baseline = kept_importance(s)
    perm = _heuristic_allocation(s)
    if kept_importance(s[:, perm]) <= baseline:
        perm = identity
    count = n // SUPPORTED_M
    if method != "none" and count > 1:
        assign = _assign_hungarian if method == "hungarian" else _assign_swaps
        groups = perm.view(count, SUPPORTED_M).clone()
        index = torch.arange(count, device=s.device)
        for _ in range(rounds):
            improved = False
            for p in range(SUPPORTED_M):
                values = _position_values(s, groups, p)
                columns = assign(values)
                gain = float(values[index, columns].double().sum() - values.diagonal().double().sum())
                if gain > 1e-9 * abs(float(values.diagonal().double().sum())):
                    groups[:, p] = groups[columns, p]
                    improved = True
            if not improved:
                break
        perm = groups.reshape(-1)
    return perm if kept_importance(s[:, perm]) > baseline else identity
