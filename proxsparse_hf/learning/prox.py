"""Exact proximal operator of the 2:4 regulariser (torch path) and backend dispatch.

For one group of four weights ``v`` the operator solves::

    prox_lam(v) = argmin_w  0.5 * ||w - v||^2 + lam * R(w),    R(w) = sum_{i<j<k} |w_i w_j w_k|

The minimiser keeps the signs of ``v`` and shrinks magnitudes, so we solve for ``w >= 0`` against ``a = |v|``.
Two regimes are told apart per group:

* **convex groups** (``2 * lam * (sum(a) - min(a)) < 1``, every group at LLM weight scale): on the box ``[0, a]``,
  which contains the minimiser, the Hessian is strictly diagonally dominant, so the objective is strictly convex and
  projected coordinate descent contracts in the max-norm with factor ``rho = 2 * lam * (sum(a) - min(a))``. We stop a
  group once the a-posteriori bound ``rho / (1 - rho) * max|step|`` is below ``tol * max(a)``, which bounds its
  distance to the unique minimiser. Groups that do not reach that bound within ``max_iter`` sweeps go to the exact
  solver below.
* **other groups** are solved exactly from the candidate supports of the sorted magnitudes ``a1 >= a2 >= a3 >= a4``:
  the two largest (closed form); the interior minimum on the face ``{1, 2, 3}``, which is unique when it exists
  (the 1-D profile in ``x = lam * w3`` has a second derivative that is concave, so its derivative is increasing on
  a single interval that we locate and search by bisection); and the four-support face, found by coordinate descent
  from two starts (``a`` and ``a`` scaled onto the all-equal stationary point) plus pure Newton steps on the
  stationary system from the three-support point, ``a/2`` and ``a/4``. The candidate with the smallest objective wins.

Everything is computed in float32, chunk by chunk, vectorised over groups (no Python loop over groups).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from ..layout import as_2d, per_weight
from .prox_solver import DEFAULT_MAX_ITER, DEFAULT_TOL, _convex_descent, _exact_sorted, solve_groups

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_GROUPS",
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "Prox2to4Batch",
    "prox_2to4",
    "prox_2to4_",
    "resolve_backend",
    "solve_groups",
]

BACKENDS = ("auto", "torch", "triton")
DEFAULT_CHUNK_GROUPS = 1 << 17
TRITON_INSTALL_HINT = 'pip install "proxsparse-hf[triton]"'

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate(
    weight: Tensor,
    lam: float,
    max_iter: int,
    tol: float,
    backend: str,
    chunk_groups: int,
    column_scale: Tensor | None = None,
) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"`weight` must be a torch.Tensor, got {type(weight).__name__}.")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"`weight` must be float32, bfloat16 or float16, got dtype {weight.dtype}.")
    if weight.dim() == 0 or weight.shape[-1] % 4 != 0:
        raise ValueError(
            f"`weight` of shape {tuple(weight.shape)} cannot be split into groups of 4 along its last dimension "
            "(the last dimension must be divisible by 4)."
        )
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"`lam` must be a finite number >= 0, got {lam!r}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"`max_iter` must be an integer >= 1, got {max_iter!r}.")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise ValueError(f"`tol` must be a number in (0, 1), got {tol!r}.")
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    if isinstance(chunk_groups, bool) or not isinstance(chunk_groups, int) or chunk_groups < 1:
        raise ValueError(f"`chunk_groups` must be an integer >= 1, got {chunk_groups!r}.")
    if column_scale is not None:
        if not isinstance(column_scale, Tensor) or column_scale.dim() != 1 or column_scale.numel() != weight.shape[-1]:
            shape = tuple(column_scale.shape) if isinstance(column_scale, Tensor) else type(column_scale).__name__
            raise ValueError(
                f"`column_scale` must be a 1-D tensor with one entry per column ({weight.shape[-1]}), got {shape}."
            )
        if column_scale.device != weight.device:
            raise ValueError(
                f"`column_scale` is on {column_scale.device}, `weight` on {weight.device}; use one device."
            )
        # values are checked on the CPU only: on a GPU the check would cost a device sync in every training step
        # (MaskLearner validates its scales once, when it builds them)
        if column_scale.device.type == "cpu" and not bool((torch.isfinite(column_scale) & (column_scale > 0)).all()):
            raise ValueError("`column_scale` must be finite and > 0 everywhere.")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Return the backend (``"torch"`` or ``"triton"``) that ``prox_2to4`` uses for a tensor on ``device``.

    ``"auto"`` picks the fused Triton kernel for CUDA tensors when Triton imports, the torch path otherwise.
    ``"triton"`` raises ``RuntimeError`` (with the install command) when CUDA or Triton is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}.")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if device.type != "cuda":
        raise RuntimeError(
            f"backend='triton' needs a CUDA tensor, got one on {device}. Use backend='torch' or 'auto' on this device."
        )
    if not _triton_available():
        raise RuntimeError(f"backend='triton' needs the `triton` package: {TRITON_INSTALL_HINT}")
    return "triton"


def prox_2to4(
    weight: Tensor,
    lam: float,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    backend: str = "auto",
    chunk_groups: int = DEFAULT_CHUNK_GROUPS,
    column_scale: Tensor | None = None,
) -> Tensor:
    """Exact proximal operator of ``lam * R`` on every group of 4 consecutive weights along the last dimension.

    Args:
        weight: float32/bfloat16/float16 tensor on any device; its last dimension must be divisible by 4
            (transpose a transformers ``Conv1D`` weight first: its input dimension is dim 0).
        lam: regularisation strength ``>= 0`` (``0`` returns an unchanged copy).
        max_iter: maximum coordinate-descent sweeps per group.
        tol: convergence tolerance, relative to the largest magnitude in the group, on the distance to the minimiser.
        backend: ``"auto"`` (Triton kernel on CUDA when available, torch otherwise), ``"torch"`` or ``"triton"``.
        chunk_groups: groups processed at once by the torch path (bounds its temporary memory).
        column_scale: optional positive float32 vector ``s`` with one entry per column (``weight.shape[-1]``): the prox
            then runs in the scaled coordinates, ``prox(W · diag(s)) / s`` (ProxSparse's ``importance="activation"``),
            fused into the same pass (no scaled copy of the weight is made).

    Returns:
        A new tensor with the same shape and dtype; the math is done in float32.
    """
    _validate(weight, lam, max_iter, tol, backend, chunk_groups, column_scale)
    out = weight.detach().clone()
    return prox_2to4_(
        out, lam, max_iter=max_iter, tol=tol, backend=backend, chunk_groups=chunk_groups, column_scale=column_scale
    )


def prox_2to4_(
    weight: Tensor,
    lam: float,
    *,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    backend: str = "auto",
    chunk_groups: int = DEFAULT_CHUNK_GROUPS,
    column_scale: Tensor | None = None,
) -> Tensor:
    """In-place version of :func:`prox_2to4`; works on views with any strides and returns ``weight``.

    The torch path allocates only a few temporaries of ``chunk_groups`` groups; the Triton kernel none.
    """
    _validate(weight, lam, max_iter, tol, backend, chunk_groups, column_scale)
    if lam == 0 or weight.numel() == 0:
        return weight
    resolved = resolve_backend(backend, weight.device)
    scale = None if column_scale is None else column_scale.detach().to(torch.float32).contiguous()
    with torch.no_grad():
        if resolved == "triton":
            from ..kernels import prox_2to4_triton_

            prox_2to4_triton_(weight, float(lam), max_iter=max_iter, tol=float(tol), column_scale=scale)
        else:
            _prox_torch_(weight, float(lam), max_iter, float(tol), chunk_groups, scale)
    return weight


class Prox2to4Batch:
    """The in-place 2:4 prox of many weights, each with its own λ multiplier and optional column scale.

    Same results as calling :func:`prox_2to4_` on each weight, but on CUDA the Triton backend solves all of them with
    two kernel launches per dtype (a table of the weights is built once, here), so a training step's prox costs the
    same host time for 7 target matrices as for 700. Build it once and call it every step; rebuild it when the
    weights are reallocated (:meth:`matches` tells)::

        batch = Prox2to4Batch([lin.weight for lin in targets], multipliers=per_layer_factor)
        batch(lam)  # after every optimizer step

    Args:
        weights: tensors as accepted by :func:`prox_2to4_` (groups of 4 along the last dimension), any devices.
        multipliers: per weight, the factor applied to ``lam`` (default 1); finite and ``>= 0``.
        column_scales: per weight, ``None`` or a positive float32 vector with one entry per column (see
            :func:`prox_2to4`). The batch keeps a copy taken here: a scale changed afterwards needs a new batch
            (:meth:`matches` compares tensors, not their values).
        max_iter, tol, backend, chunk_groups: as in :func:`prox_2to4`.
    """

    def __init__(
        self,
        weights: list[Tensor],
        *,
        multipliers: list[float] | None = None,
        column_scales: list[Tensor | None] | None = None,
        max_iter: int = DEFAULT_MAX_ITER,
        tol: float = DEFAULT_TOL,
        backend: str = "auto",
        chunk_groups: int = DEFAULT_CHUNK_GROUPS,
    ) -> None:
        weights, mults, scales = per_weight(weights, multipliers, column_scales)
        for i, (weight, mult, scale) in enumerate(zip(weights, mults, scales)):
            try:
                _validate(weight, mult, max_iter, tol, backend, chunk_groups, scale)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"weight {i}: {exc}".replace("`lam`", "its multiplier")) from None
        self.max_iter, self.tol, self.chunk_groups = max_iter, float(tol), chunk_groups
        self._key = self._signature(weights, mults, scales)
        self._triton_plans = []
        self._torch_items: list[tuple[Tensor, float, Tensor | None]] = []
        on_triton: dict[torch.device, tuple[list, list, list]] = {}
        for weight, mult, scale in zip(weights, mults, scales):
            if weight.numel() == 0 or mult == 0:
                continue
            scale = None if scale is None else scale.detach().to(torch.float32).contiguous()
            # both backends use the scale as it was when the batch was built: the Triton plan stores its own copy
            # (with the inverse), the torch path gets one here
            if resolve_backend(backend, weight.device) == "triton":
                views, view_mults, view_scales = on_triton.setdefault(weight.device, ([], [], []))
                for view in as_2d(weight.detach()):
                    views.append(view)
                    view_mults.append(mult)
                    view_scales.append(scale)
            else:
                self._torch_items.append((weight, mult, None if scale is None else scale.clone()))
        if on_triton:
            from ..kernels import TritonProxPlan

            for views, view_mults, view_scales in on_triton.values():
                self._triton_plans.append(TritonProxPlan(views, view_scales, view_mults))

    @staticmethod
    def _signature(weights, multipliers, scales) -> tuple:
        return tuple(
            (
                w.data_ptr(),
                tuple(w.shape),
                w.stride(),
                w.dtype,
                w.device,
                m,
                None if s is None else s.data_ptr(),
            )
            for w, m, s in zip(weights, multipliers, scales)
        )

    def matches(
        self,
        weights: list[Tensor],
        multipliers: list[float] | None = None,
        column_scales: list[Tensor | None] | None = None,
    ) -> bool:
        """Whether this batch was built for exactly these weights (same storage, shape, strides), factors and scales."""
        try:
            return self._signature(*per_weight(weights, multipliers, column_scales)) == self._key
        except ValueError:  # not one factor and one scale per weight: not what this batch was built for
            return False

    @torch.no_grad()
    def __call__(self, lam: float) -> None:
        """Replace every weight by its prox with strength ``lam * multiplier``, in place."""
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"`lam` must be a finite number >= 0, got {lam!r}.")
        if lam == 0:
            return
        for plan in self._triton_plans:
            plan.run(float(lam), max_iter=self.max_iter, tol=self.tol)
        for weight, mult, scale in self._torch_items:
            _prox_torch_(weight, float(lam) * mult, self.max_iter, self.tol, self.chunk_groups, scale)


def _prox_torch_(
    weight: Tensor, lam: float, max_iter: int, tol: float, chunk_groups: int, scale: Tensor | None = None
) -> None:
    for view in as_2d(weight):
        _Prox2D(view, lam, max_iter, tol, chunk_groups, scale).run()


class _Prox2D:
    """Chunked in-place prox of a 2-D tensor (any strides).

    Pass 1 runs the convex fast path chunk by chunk; the few groups it cannot certify are queued (index + value) and
    solved together by the exact solver whenever ``chunk_groups`` of them have accumulated, so that rare outlier groups
    do not cost one exact solve per chunk.
    """

    def __init__(
        self, weight: Tensor, lam: float, max_iter: int, tol: float, chunk_groups: int, scale: Tensor | None = None
    ) -> None:
        self.weight, self.lam, self.max_iter, self.tol, self.chunk = weight, lam, max_iter, tol, chunk_groups
        self.scale = scale  # per column; the prox runs on weight * scale and writes (result / scale)
        self.groups_per_row = weight.shape[1] // 4
        self.queue_idx: list[Tensor] = []
        self.queue_val: list[Tensor] = []
        self.queued = 0

    def run(self) -> None:
        rows, cols = self.weight.shape
        gpr = self.groups_per_row
        if gpr > self.chunk:  # very wide rows: chunk along the row as well
            span = self.chunk * 4
            for r in range(rows):
                for c0 in range(0, cols, span):
                    self._fast(self.weight[r, c0 : c0 + span], r * gpr + c0 // 4, slice(c0, c0 + span))
        else:
            step = max(1, self.chunk // gpr)
            for r0 in range(0, rows, step):
                self._fast(self.weight[r0 : r0 + step], r0 * gpr, slice(None))
        self._flush()

    def _fast(self, part: Tensor, first_group: int, columns: slice) -> None:
        scale = None if self.scale is None else self.scale[columns]
        v = part.to(torch.float32) if scale is None else part.to(torch.float32) * scale
        v = v.reshape(-1, 4)
        a = v.abs().t().contiguous()
        w, pending = _convex_descent(a, self.lam, self.max_iter, self.tol)
        idx = pending.nonzero().squeeze(1)
        if idx.numel():
            self.queue_idx.append(idx + first_group)
            self.queue_val.append(v[idx].clone())
            self.queued += idx.numel()
        out = torch.empty_like(v)
        out.copy_(w.t())
        out = out.copysign_(v).view(part.shape)
        part.copy_(out if scale is None else out.div_(scale))
        if self.queued >= self.chunk:
            self._flush()

    def _flush(self) -> None:
        if not self.queued:
            return
        idx = torch.cat(self.queue_idx)
        v = torch.cat(self.queue_val)
        self.queue_idx, self.queue_val, self.queued = [], [], 0
        for s0 in range(0, idx.numel(), self.chunk):
            vi = v[s0 : s0 + self.chunk]
            gi = idx[s0 : s0 + self.chunk]
            w = _exact_sorted(vi.abs().t().contiguous(), self.lam, self.max_iter, self.tol).t()
            rows = torch.div(gi, self.groups_per_row, rounding_mode="floor")
            cols = (gi - rows * self.groups_per_row).mul_(4).unsqueeze(1) + torch.arange(4, device=gi.device)
            out = torch.copysign(w, vi)
            if self.scale is not None:
                out = out.div_(self.scale[cols])
            self.weight[rows.unsqueeze(1), cols] = out.to(self.weight.dtype)
