"""Folding channel permutations into a model: the layers that can absorb one, the search per layer and the check that
the model still computes the same function (the method is described in :mod:`proxsparse_hf.permutation`)."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..constants import SUPPORTED_M
from .search import PERMUTATION_IMPORTANCES, _check_rounds, _resolve_refine, find_permutation, kept_importance

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "PermutationReport",
    "PermutedLayer",
    "check_permutable",
    "permutable_layers",
    "permutation_importance_for",
    "permute_channels",
]

logger = logging.getLogger(__name__)


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
# calibration windows the input norms of an activation-aware permutation read by default: as many as the calibration
# sets of Wanda / SparseGPT and more, while a multi-million-token training set costs no extra pass over its data
DEFAULT_NORM_WINDOWS = 512
_VERIFY_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # relative L2 error of the logits; 16-bit dtypes: 5e-2


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
        index_maps: every re-indexed parameter as ``{name: (dim, index)}`` (consumers along dim 1, the producers'
            weights and biases along dim 0): what :func:`~proxsparse_hf.permutation.record.apply_index_maps` replays
            on a base model and an output folder saves.
    """

    importance: str
    refine: str
    rounds: int
    layers: list[PermutedLayer] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    index_maps: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def permutations(self) -> dict[str, torch.Tensor]:
        """``{consumer: LongTensor}`` (new input channel ``k`` = old channel ``perm[k]``): the dim-1 entries of
        :attr:`index_maps`, which only the consumers' weights have."""
        return {name.removesuffix(".weight"): index for name, (dim, index) in self.index_maps.items() if dim == 1}

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


def permutable_layers(model: nn.Module, targets: Any = None) -> list[str]:
    """The ``o_proj`` / ``down_proj`` targets :func:`permute_channels` would permute (``targets`` as there); empty for
    an unsupported architecture or a target selection without them."""
    from ..targets import find_targets

    if getattr(getattr(model, "config", None), "model_type", None) not in SUPPORTED_ARCHITECTURES:
        return []
    return [plan.name for plan in _plans(model, set(find_targets(model, targets)), {})]


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
    from ..pruners import get_pruner

    spec = get_pruner(method)
    if spec.permutation_importance is not None:
        return spec.permutation_importance
    if spec.learned:
        from ..learning.importance import get_importance

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
    from ..targets import decoder_block_prefixes

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
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    calibration: Any,
    batch_size: int,
    show_progress: bool,
    max_windows: int | None = None,
) -> dict[str, torch.Tensor]:
    """``‖X_j‖₂`` of every input channel of ``modules`` over the first ``max_windows`` calibration windows (all with
    None; one full forward each)."""
    from tqdm.auto import tqdm

    from ..activations import InputNormStats
    from ..loading import input_device
    from ..pruners.capture import CalibrationBatches

    batches = CalibrationBatches.from_any(calibration, batch_size=batch_size)
    if max_windows is not None:
        batches = batches.first(max_windows)
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
        from ..pruners.wanda import wanda_scores

        return wanda_scores(weight, norms)
    from ..pruners.ria import ria_scores

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
    from ..loading import input_device

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
    max_windows: int | None = DEFAULT_NORM_WINDOWS,
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
        max_windows: the input norms are measured on the first this many calibration windows (None: all of them); a
            large training budget then costs no extra pass over its data.
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
    from ..masks import is_2to4
    from ..targets import find_targets

    start = time.perf_counter()
    importance = _check_importance(importance)
    method = _resolve_refine(refine)
    rounds = _check_rounds(rounds)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"`alpha`={alpha!r} is invalid; allowed: a number >= 0.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size`={batch_size!r} is invalid; allowed: an integer >= 1.")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise ValueError(f"`max_windows`={max_windows!r} is invalid; allowed: None or an integer >= 1.")
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
            consumers = {p.name: p.consumer for p in plans}
            norms = _input_norms(model, consumers, calibration, batch_size, show_progress, max_windows)
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
            report.index_maps[f"{plan.name}.weight"] = (1, consumer_perm.cpu())
            for producer_name, producer in plan.producers.items():
                report.index_maps[f"{producer_name}.weight"] = (0, producer_perm.cpu())
                if producer.bias is not None:
                    report.index_maps[f"{producer_name}.bias"] = (0, producer_perm.cpu())
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
