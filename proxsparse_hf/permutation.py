"""Channel permutation for 2:4: reorder the input channels of a layer so that more importance survives the top-2-of-4
rule, and fold the reordering into the weights so that the model computes exactly the same function.

A 2:4 group is four *consecutive* input channels; which channels share a group is an accident of the checkpoint. If the
input channels of a layer are permuted and the layer that produces them permutes its output rows the same way, the
model is unchanged (up to float rounding) and a mask method run afterwards sees better groups. Run it before any mask
method (magnitude, Wanda, RIA, SparseGPT, ProxSparse)::

    report = permute_channels(model, config, importance="activation", calibration=windows)
    prune(model, "wanda", windows, config)            # the result is still a plain checkpoint, exactly 2:4

Which layers, and why it is exact (Llama, Mistral, Qwen2 decoder blocks):

* ``mlp.down_proj``: its input is ``act(gate_proj(x)) * up_proj(x)``, element by element, so permuting the rows (and
  biases) of ``gate_proj`` and ``up_proj`` with the same permutation permutes ``down_proj``'s input.
* ``self_attn.o_proj``: its input is the concatenation of the heads' outputs ``softmax(q_h k_gᵀ) v_g``; head ``h`` reads
  key/value head ``g = h // n_rep`` (grouped-query attention). A permutation of the ``head_dim`` channels of value head
  ``g`` (rows of ``v_proj``) permutes the output channels of every query head that reads it the same way, so ``o_proj``
  gets one within-head permutation per key/value head, shared by its ``n_rep`` query heads. Moving whole heads would
  not change any group (``head_dim`` is a multiple of 4), so this is all the freedom there is.
* The residual-stream inputs (``q/k/v_proj``, ``gate/up_proj``) are left alone: only one permutation of the whole
  stream (embeddings, every norm, every ``o_proj``/``down_proj`` output, ``lm_head``) is exact there, and measured on
  SmolLM2-135M it removes 1.5 % of the pruned importance of those layers, against 5–7 % for a ``down_proj`` with its own
  permutation (docs/quality.md).

The search, per layer (per key/value head for ``o_proj``, whose query heads' columns are stacked): the importance
matrix ``S`` (``|W|``, ``|W|·‖X_j‖`` or the RIA score) decides the objective ``Σ_rows Σ_groups top-2``. RIA's
heuristic allocation (channels sorted by total importance, dealt to the groups in a snake order) gives the start, then
each of the four positions of a group is re-assigned in turn, keeping the other three fixed: an assignment problem,
solved exactly with ``scipy.optimize.linear_sum_assignment`` (``refine="hungarian"``) or by pairwise swaps in pure torch
(``refine="swap"``); ``"auto"`` uses scipy when it is installed. The result is never worse than the identity.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .constants import SUPPORTED_M, SUPPORTED_N

__all__ = [
    "PERMUTATION_IMPORTANCES",
    "PERMUTATION_REFINEMENTS",
    "SUPPORTED_ARCHITECTURES",
    "PermutationReport",
    "PermutedLayer",
    "check_permutable",
    "find_permutation",
    "kept_importance",
    "permutation_importance_for",
    "permute_channels",
]

logger = logging.getLogger(__name__)

PERMUTATION_IMPORTANCES: Mapping[str, str] = {
    "magnitude": "|W|",
    "activation": "|W|·‖X_j‖ (Wanda)",
    "ria": "RIA score (|W| relative to its row and column, times ‖X_j‖^alpha)",
}
"""Importance measures the permutation can maximise (name → label); all but ``magnitude`` read calibration data."""

PERMUTATION_REFINEMENTS = ("auto", "hungarian", "swap", "none")
"""``hungarian``: exact re-assignment per position (needs scipy); ``swap``: pairwise swaps (pure torch); ``auto``:
hungarian when scipy is installed, else swap; ``none``: the heuristic allocation only."""


@dataclass(frozen=True)
class _BlockNames:
    """Module names inside one decoder block (dotted, relative to the block)."""

    value: str = "self_attn.v_proj"
    attn_out: str = "self_attn.o_proj"
    attention: str = "self_attn"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"


SUPPORTED_ARCHITECTURES: Mapping[str, _BlockNames] = {
    "llama": _BlockNames(),
    "mistral": _BlockNames(),
    "qwen2": _BlockNames(),
}
"""``config.model_type`` → where the producer / consumer pairs sit in its decoder blocks."""

_PROBE_TOKENS = 16
_VERIFY_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative L2 error of the logits; 16-bit dtypes: 5e-2


# ------------------------------------------------------------------------------------------------------- search
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


# ------------------------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class PermutedLayer:
    """One consumer layer whose input channels were permuted.

    Args:
        name: the consumer module (``...o_proj`` / ``...down_proj``).
        producers: the modules whose output rows were permuted with it.
        blocks: independent permutations (the key/value heads for ``o_proj``, 1 for ``down_proj``).
        kept_before: importance a top-2-of-4 mask keeps before (:func:`kept_importance` of the whole layer).
        kept_after: the same after the permutation.
        total: the layer's total importance.
    """

    name: str
    producers: tuple[str, ...]
    blocks: int
    kept_before: float
    kept_after: float
    total: float

    @property
    def pruned_change(self) -> float:
        """Relative change of the importance a top-2-of-4 mask removes (negative = less lost)."""
        lost = self.total - self.kept_before
        return (self.total - self.kept_after) / lost - 1.0 if lost > 0 else 0.0


@dataclass
class PermutationReport:
    """What :func:`permute_channels` did.

    Args:
        importance: the importance measure maximised.
        refine: the refinement used (``hungarian``, ``swap`` or ``none``).
        rounds: passes of the refinement.
        layers: the permuted layers.
        skipped: ``{module: reason}`` for targets that could not be permuted.
        seconds: wall time (input norms, search and folding).
        permutations: ``{consumer: LongTensor}`` (new input channel ``k`` = old channel ``perm[k]``); not serialised.
    """

    importance: str
    refine: str
    rounds: int
    layers: list[PermutedLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    permutations: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def kept_change(self) -> float:
        """Relative change of the total kept importance over all permuted layers."""
        before = sum(layer.kept_before for layer in self.layers)
        return sum(layer.kept_after for layer in self.layers) / before - 1.0 if before > 0 else 0.0

    @property
    def pruned_change(self) -> float:
        """Relative change of the total pruned importance over all permuted layers (negative = less lost)."""
        lost = sum(layer.total - layer.kept_before for layer in self.layers)
        after = sum(layer.total - layer.kept_after for layer in self.layers)
        return after / lost - 1.0 if lost > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """The facts ``run_info.json`` and comparison rows record: measure, refinement, the permuted layers (consumer
        → producers), the importance change and the time."""
        return {
            "importance": self.importance,
            "refine": self.refine,
            "rounds": self.rounds,
            "layers": {layer.name: list(layer.producers) for layer in self.layers},
            "kept_importance_change": round(self.kept_change, 6),
            "pruned_importance_change": round(self.pruned_change, 6),
            "skipped": dict(self.skipped),
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        """:meth:`summary` plus the per-layer numbers."""
        return {**self.summary(), "per_layer": [asdict(layer) for layer in self.layers]}


@dataclass
class _Plan:
    """One consumer and its producers; ``columns[c]`` are the consumer input channels of copy ``c`` of the block
    problem ``b`` and ``rows`` the producer rows moving with them."""

    name: str
    consumer: nn.Linear
    producers: dict[str, nn.Linear]
    blocks: list[tuple[torch.Tensor, torch.Tensor]]  # (columns [copies, width], producer rows [width])


def check_permutable(model_config: Any) -> None:
    """Refuse a model whose architecture :func:`permute_channels` does not support (before loading any weight).

    Raises:
        ValueError: names ``model_type`` and the supported ones.
    """
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"`model_type`={model_type!r} is not supported by the channel permutation; allowed: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )


def _check_importance(importance: Any) -> str:
    if importance not in PERMUTATION_IMPORTANCES:
        raise ValueError(f"`importance`={importance!r} is invalid; allowed: one of {tuple(PERMUTATION_IMPORTANCES)}.")
    return importance


def permutation_importance_for(method: str, config: Any = None) -> str:
    """The importance the permutation should maximise before pruning with ``method``: the pruner's declared
    ``permutation_importance`` (RIA: ``ria``), for a learned method its config's importance (``activation`` when the
    measure reads input norms, else ``magnitude``), else ``activation`` for a method with calibration data and
    ``magnitude`` without.

    Raises:
        ValueError: ``method`` is not a registered pruner.
    """
    from .pruners import get_pruner

    spec = get_pruner(method)
    if spec.permutation_importance is not None:
        return spec.permutation_importance
    if spec.learned:
        from .learning.importance import get_importance

        name = getattr(config, "importance", "magnitude") if config is not None else "magnitude"
        return "activation" if get_importance(name).needs_input_norms else "magnitude"
    return "activation" if spec.needs_calibration else "magnitude"


def _linear(block: nn.Module, path: str) -> nn.Linear | None:
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def _attention_shape(block: nn.Module, names: _BlockNames, o_proj: nn.Linear, v_proj: nn.Linear, config: Any):
    attention = block.get_submodule(names.attention)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = config.hidden_size // heads
    if not head_dim or o_proj.in_features % head_dim or v_proj.out_features % head_dim:
        return None
    heads, kv_heads = o_proj.in_features // head_dim, v_proj.out_features // head_dim
    return (head_dim, heads, kv_heads) if kv_heads and heads % kv_heads == 0 else None


def _plans(model: nn.Module, names: set[str], skipped: dict[str, str]) -> list[_Plan]:
    from .targets import decoder_block_prefixes

    config = getattr(model, "config", None)
    check_permutable(config)
    layout = SUPPORTED_ARCHITECTURES[config.model_type]
    plans: list[_Plan] = []
    for prefix in decoder_block_prefixes(model):
        for index, block in enumerate(model.get_submodule(prefix)):
            base = f"{prefix}.{index}"
            down, gate, up = (_linear(block, p) for p in (layout.down, layout.gate, layout.up))
            name = f"{base}.{layout.down}"
            if name in names:
                if down is None or gate is None or up is None:
                    skipped[name] = "no gate/up projection found"
                elif not gate.out_features == up.out_features == down.in_features:
                    skipped[name] = "gate/up outputs do not match the down_proj input"
                else:
                    channels = torch.arange(down.in_features)
                    producers = {f"{base}.{layout.gate}": gate, f"{base}.{layout.up}": up}
                    plans.append(_Plan(name, down, producers, [(channels.unsqueeze(0), channels)]))
            o_proj, v_proj = _linear(block, layout.attn_out), _linear(block, layout.value)
            name = f"{base}.{layout.attn_out}"
            if name not in names:
                continue
            shape = (
                None if o_proj is None or v_proj is None else _attention_shape(block, layout, o_proj, v_proj, config)
            )
            if shape is None:
                skipped[name] = "no value projection or head layout found"
                continue
            head_dim, heads, kv_heads = shape
            if head_dim % SUPPORTED_M:
                skipped[name] = f"head_dim={head_dim} is not a multiple of {SUPPORTED_M}"
                continue
            rep = heads // kv_heads
            dims = torch.arange(head_dim)
            blocks = [
                (torch.stack([(g * rep + r) * head_dim + dims for r in range(rep)]), g * head_dim + dims)
                for g in range(kv_heads)
            ]
            plans.append(_Plan(name, o_proj, {f"{base}.{layout.value}": v_proj}, blocks))
    return plans


def _input_norms(
    model: nn.Module, modules: Mapping[str, nn.Module], calibration: Any, batch_size: int, show_progress: bool
) -> dict[str, torch.Tensor]:
    """``‖X_j‖₂`` of every input channel of ``modules`` over the calibration windows (one full forward each)."""
    from tqdm.auto import tqdm

    from .activations import InputNormStats
    from .loading import input_device
    from .pruners.capture import CalibrationBatches

    batches = CalibrationBatches.from_any(calibration, batch_size=batch_size)
    stats = {name: InputNormStats(m.in_features, device=m.weight.device) for name, m in modules.items()}
    handles = [
        m.register_forward_pre_hook(lambda module, args, st=stats[name]: st.add(args[0].detach()))
        for name, m in modules.items()
    ]
    device = input_device(model)
    try:
        for batch in tqdm(batches.batches, desc="permutation: input norms", disable=not show_progress):
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, st in stats.items() if st.num_tokens == 0]
    if missing:
        raise RuntimeError(f"`{missing[0]}` saw no calibration tokens; it is not called in the model's forward.")
    return {name: st.input_norms for name, st in stats.items()}


def _scores(weight: torch.Tensor, importance: str, norms: torch.Tensor | None, alpha: float) -> torch.Tensor:
    if importance == "magnitude":
        return weight.detach().abs().float()
    if importance == "activation":
        from .pruners.wanda import wanda_scores

        return wanda_scores(weight, norms)
    from .pruners.ria import ria_scores

    return ria_scores(weight, norms, alpha=alpha)


def _fold(plan: _Plan, consumer_perm: torch.Tensor, producer_perm: torch.Tensor) -> None:
    weight = plan.consumer.weight
    weight.copy_(weight.index_select(1, consumer_perm.to(weight.device)))
    for producer in plan.producers.values():
        rows = producer_perm.to(producer.weight.device)
        producer.weight.copy_(producer.weight.index_select(0, rows))
        if producer.bias is not None:
            producer.bias.copy_(producer.bias.index_select(0, rows))


def _probe_logits(model: nn.Module) -> torch.Tensor:
    from .loading import input_device

    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    probe = (torch.arange(_PROBE_TOKENS) * 7919 % vocab).unsqueeze(0).to(input_device(model))
    return model(input_ids=probe, use_cache=False).logits.detach().float()


@torch.no_grad()
def permute_channels(
    model: nn.Module,
    targets: Any = None,
    importance: str = "magnitude",
    calibration: Any = None,
    *,
    refine: str = "auto",
    rounds: int = 3,
    alpha: float = 0.5,
    batch_size: int = 1,
    verify: bool = True,
    show_progress: bool = False,
) -> PermutationReport:
    """Permute the input channels of every ``o_proj`` / ``down_proj`` target to keep more importance inside the 2:4
    groups, and fold the permutation into ``v_proj`` / ``gate_proj`` + ``up_proj`` (in place; the model's outputs do
    not change). Run it on the dense model, before any mask method.

    Args:
        model: a Llama, Mistral or Qwen2 causal LM (:data:`SUPPORTED_ARCHITECTURES`).
        targets: a ``ProxSparseConfig`` (its ``target_modules`` / ``exclude_modules``), a ``find_targets`` mapping,
            ``target_modules`` names or regex (e.g. ``["down_proj"]``), or None (``all-linear``); only the
            ``o_proj`` / ``down_proj`` targets are permuted.
        importance: ``"magnitude"``, ``"activation"`` or ``"ria"`` (:data:`PERMUTATION_IMPORTANCES`);
            :func:`permutation_importance_for` gives the one matching a mask method.
        calibration: calibration windows (``TokenWindows``, an ``[N, L]`` token tensor or dicts with ``input_ids``);
            needed by every importance but ``magnitude``.
        refine: ``"auto"``, ``"hungarian"`` (scipy), ``"swap"`` (pure torch) or ``"none"``.
        rounds: passes of the refinement over the four positions of a group.
        alpha: exponent of ``‖X_j‖`` in the RIA score.
        batch_size: calibration windows per forward pass.
        verify: compare the logits of a short probe before and after, and undo the permutation (``RuntimeError``)
            if they differ by more than rounding.
        show_progress: progress bars.

    Returns:
        A :class:`PermutationReport` (``summary()`` is what ``run_info.json`` records).

    Raises:
        ValueError: an unsupported architecture, a bad option value, missing calibration data, or a layer that is
            already 2:4 sparse.
        RuntimeError: the probe's logits changed (the permutation is undone first).
    """
    from .masks import is_2to4
    from .targets import find_targets

    start = time.perf_counter()
    importance = _check_importance(importance)
    method = _resolve_refine(refine)
    rounds = _check_rounds(rounds)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"`alpha`={alpha!r} is invalid; allowed: a number >= 0.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size`={batch_size!r} is invalid; allowed: an integer >= 1.")
    if importance != "magnitude" and calibration is None:
        raise ValueError(f"`importance`={importance!r} reads activations; pass `calibration` windows.")
    check_permutable(getattr(model, "config", None))
    if isinstance(targets, Mapping):
        names = set(targets)
    elif isinstance(targets, (str, list, tuple)):
        names = set(find_targets(model, target_modules=targets if isinstance(targets, str) else list(targets)))
    else:
        names = set(find_targets(model, targets))
    report = PermutationReport(importance=importance, refine=method, rounds=rounds)
    plans = _plans(model, names, report.skipped)
    if not plans:
        warnings.warn(
            "permute_channels: no o_proj / down_proj target to permute (check `targets`); the model is unchanged.",
            stacklevel=2,
        )
    for plan in plans:
        if is_2to4(plan.consumer.weight):
            raise ValueError(
                f"`{plan.name}` is already 2:4 sparse; permute the channels of the dense model, before any mask method."
            )
    was_training = model.training
    model.eval()
    try:
        norms = {}
        if importance != "magnitude" and plans:
            norms = _input_norms(model, {p.name: p.consumer for p in plans}, calibration, batch_size, show_progress)
        reference = _probe_logits(model) if verify and plans else None
        from tqdm.auto import tqdm

        folded: list[tuple[_Plan, torch.Tensor, torch.Tensor]] = []
        for plan in tqdm(plans, desc="permutation: search", disable=not show_progress):
            scores = _scores(plan.consumer.weight, importance, norms.get(plan.name), alpha)
            consumer_perm = torch.arange(scores.shape[1], device=scores.device)
            producer_rows = next(iter(plan.producers.values())).out_features
            producer_perm = torch.arange(producer_rows, device=scores.device)
            for columns, rows in plan.blocks:
                columns, rows = columns.to(scores.device), rows.to(scores.device)
                stacked = scores[:, columns].permute(1, 0, 2).reshape(-1, columns.shape[1])  # [copies * out, width]
                sigma = find_permutation(stacked, refine=method, rounds=rounds)
                consumer_perm[columns] = columns[:, sigma]
                producer_perm[rows] = rows[sigma]
            before, after = kept_importance(scores), kept_importance(scores[:, consumer_perm])
            layer = PermutedLayer(
                plan.name, tuple(plan.producers), len(plan.blocks), before, after, float(scores.sum())
            )
            _fold(plan, consumer_perm, producer_perm)
            folded.append((plan, consumer_perm, producer_perm))
            report.layers.append(layer)
            report.permutations[plan.name] = consumer_perm.cpu()
        if reference is not None:
            _verify(model, reference, folded)
    finally:
        model.train(was_training)
    for name, reason in report.skipped.items():
        logger.info("permutation: skipped %s (%s)", name, reason)
    report.seconds = time.perf_counter() - start
    logger.info(
        "permutation (%s, %s): %d layers, kept importance %+.2f%%, pruned importance %+.2f%% in %.1fs",
        importance,
        method,
        len(report.layers),
        100 * report.kept_change,
        100 * report.pruned_change,
        report.seconds,
    )
    return report


def _verify(model: nn.Module, reference: torch.Tensor, folded: list[tuple[_Plan, torch.Tensor, torch.Tensor]]) -> None:
    logits = _probe_logits(model)
    error = float((logits - reference).norm() / reference.norm().clamp_min(1e-30))
    dtype = next(model.parameters()).dtype
    tolerance = _VERIFY_RTOL.get(dtype, 5e-2)
    if error <= tolerance:
        return
    for plan, consumer_perm, producer_perm in reversed(folded):
        _fold(plan, consumer_perm.argsort(), producer_perm.argsort())
    raise RuntimeError(
        f"The channel permutation changed the model's logits (relative error {error:.2e} > {tolerance:.0e}); it was "
        f"undone. The architecture {type(model).__name__} does not compute what the permutation assumes."
    )
