"""Sequential, block-by-block activation capture shared by the calibration-based pruners (Wanda, SparseGPT, RIA, ...).

The decoder blocks are found generically (the largest ``nn.ModuleList`` of the model, the same rule
:func:`proxsparse_hf.targets.find_targets` uses). The inputs of block 0 are captured by hooking its forward with a "stop"
exception, so nothing after the embeddings runs; the extra arguments the model passes to its blocks (attention mask,
position ids, rotary position embeddings, ...) are kept per batch and passed through unchanged. Then every block is run in
turn: statistics of its target layers are collected from its inputs, the caller prunes the block, and the *pruned* block's
outputs become the inputs of the next block. At most one block's activations for all samples live on the model's device;
the next block's inputs are gathered on the CPU and moved over once the current ones are released.

A calibration-based pruner is a :class:`SequentialPruner` subclass: it says which statistics to collect for a target
(``make_stats``) and how to prune one target from them (``prune_target``); :meth:`SequentialPruner.run` drives it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import TokenWindows
from ..loading import input_device
from ..targets import Target, decoder_block_prefixes

__all__ = [
    "BlockInputs",
    "CalibrationBatches",
    "SequentialPruner",
    "capture_block_inputs",
    "find_decoder_blocks",
    "run_sequential",
]

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the hook on block 0 once its inputs are recorded."""


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Qualified name and module of the decoder-block list (the model's largest ``nn.ModuleList``).

    Raises:
        ValueError: the model has no non-empty ``nn.ModuleList``.
    """
    prefixes = decoder_block_prefixes(model)
    if not prefixes:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of decoder blocks; sequential calibration needs one. Use a "
            f"method without calibration data (e.g. method='magnitude') for this model."
        )
    return prefixes[0], model.get_submodule(prefixes[0])


@dataclass
class CalibrationBatches:
    """Calibration data normalised to a list of model-input batches (``{"input_ids": [b, L], ...}``)."""

    batches: list[dict[str, torch.Tensor]]

    @property
    def num_samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def seq_len(self) -> int:
        return int(self.batches[0]["input_ids"].shape[-1])

    def first(self, n: int) -> CalibrationBatches:
        """The first ``n`` windows (all of them when there are fewer), in the same batches (the last one cut)."""
        kept: list[dict[str, torch.Tensor]] = []
        left = n
        for batch in self.batches:
            if left <= 0:
                break
            size = int(batch["input_ids"].shape[0])
            kept.append(batch if size <= left else {k: v[:left] for k, v in batch.items()})
            left -= size
        return CalibrationBatches(kept)

    @classmethod
    def from_any(cls, data: Any, batch_size: int = 1) -> CalibrationBatches:
        """Accept a :class:`~proxsparse_hf.data.TokenWindows`, an ``[N, L]`` integer tensor, or an iterable of dicts with
        ``input_ids`` (``[L]`` or ``[b, L]``, optionally ``attention_mask``). Tensors are split into batches of
        ``batch_size`` windows; each dict is one batch.

        Raises:
            ValueError: no samples, wrong shapes/dtypes, or a dict without ``input_ids``.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size`={batch_size!r} is invalid; allowed: an integer >= 1.")
        if data is None:
            raise ValueError("`calibration_data` is None; this method needs calibration samples.")
        if isinstance(data, TokenWindows):
            data = data.input_ids
        batches: list[dict[str, torch.Tensor]] = []
        if isinstance(data, torch.Tensor):
            if data.dim() != 2 or data.shape[0] == 0 or data.shape[1] == 0:
                raise ValueError(
                    f"`calibration_data` tensor must be a non-empty [N, seq_len] tensor of token ids, got shape "
                    f"{tuple(data.shape)}."
                )
            if data.is_floating_point() or data.dtype == torch.bool:
                raise ValueError(f"`calibration_data` must hold integer token ids, got dtype {data.dtype}.")
            batches = [{"input_ids": chunk} for chunk in data.split(batch_size)]
        elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise ValueError(
                f"`calibration_data` of type {type(data).__name__} is not supported; pass TokenWindows, an [N, L] "
                f"LongTensor or an iterable of dicts with 'input_ids'."
            )
        else:
            for i, item in enumerate(data):
                if not isinstance(item, Mapping) or "input_ids" not in item:
                    raise ValueError(f"`calibration_data` item {i} is not a dict with 'input_ids'.")
                batch = {}
                for key in ("input_ids", "attention_mask"):
                    if item.get(key) is None:
                        continue
                    value = torch.as_tensor(item[key])
                    if value.dim() == 1:
                        value = value.unsqueeze(0)
                    if value.dim() != 2 or value.numel() == 0:
                        raise ValueError(
                            f"`calibration_data` item {i}: `{key}` must be [L] or [b, L], got {tuple(value.shape)}."
                        )
                    batch[key] = value
                batches.append(batch)
        if not batches:
            raise ValueError("`calibration_data` is empty: at least one calibration sample is needed.")
        return cls(batches)


@dataclass
class BlockInputs:
    """Inputs of one decoder block for every calibration batch: hidden states plus the pass-through arguments."""

    hidden: list[torch.Tensor]
    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]
    by_keyword: bool = False  # the model passes the hidden states as ``hidden_states=...``


def _block_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    hidden = getattr(out, "hidden_states", None) or getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise ValueError(f"Unsupported decoder block output of type {type(out).__name__}.")


def _call_block(block: nn.Module, inputs: BlockInputs, index: int, hidden: torch.Tensor) -> torch.Tensor:
    if inputs.by_keyword:
        return _block_output(block(hidden_states=hidden, **inputs.kwargs[index]))
    return _block_output(block(hidden, *inputs.args[index], **inputs.kwargs[index]))


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, data: CalibrationBatches) -> BlockInputs:
    """Run the model up to block 0 for every batch and record block 0's inputs (hidden states on the model's device)."""
    device = input_device(model)
    captured = BlockInputs(hidden=[], args=[], kwargs=[])

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rest = dict(kwargs)
        if args:
            hidden, rest_args = args[0], tuple(args[1:])
        elif "hidden_states" in rest:
            hidden, rest_args = rest.pop("hidden_states"), ()
            captured.by_keyword = True
        else:
            raise ValueError("Could not find the hidden states among the first decoder block's inputs.")
        captured.hidden.append(hidden.detach())
        captured.args.append(rest_args)
        captured.kwargs.append(rest)
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in data.batches:
            inputs = {k: v.to(device) for k, v in batch.items()}
            try:
                model(**inputs, use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError("The model finished its forward pass without calling its first decoder block.")
    finally:
        handle.remove()
    return captured


def _targets_by_block(targets: Mapping[str, Target], prefix: str, num_blocks: int) -> list[dict[str, Target]]:
    per_block: list[dict[str, Target]] = [{} for _ in range(num_blocks)]
    outside = []
    for name, target in targets.items():
        rest = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else None
        index = rest.split(".", 1)[0] if rest else None
        if index is None or not index.isdigit() or int(index) >= num_blocks:
            outside.append(name)
            continue
        per_block[int(index)][name] = target
    if outside:
        raise ValueError(
            f"Target(s) {outside[:3]}{'...' if len(outside) > 3 else ''} lie outside the decoder blocks `{prefix}`; "
            f"sequential calibration only prunes layers inside the blocks. Exclude them with `exclude_modules`."
        )
    return per_block


def run_sequential(
    model: nn.Module,
    targets: Mapping[str, Target],
    data: CalibrationBatches,
    *,
    make_stats: Callable[[Target], Any],
    prune_block: Callable[[dict[str, Target], dict[str, Any]], None],
    progress: bool = False,
    desc: str = "blocks",
) -> None:
    """Drive a calibration-based pruner through the decoder blocks in order.

    For block ``k``: a forward hook on each of its targets feeds the layer input to ``stats.add(x)`` (``stats`` made by
    ``make_stats(target)``) while the block runs on its inputs (outputs of the already-pruned blocks ``< k``); then
    ``prune_block(block_targets, stats_by_name)`` prunes the block in place; then the pruned block is run again and its
    outputs become the next block's inputs.
    """
    prefix, blocks = find_decoder_blocks(model)
    per_block = _targets_by_block(targets, prefix, len(blocks))
    device = input_device(model)
    inputs = capture_block_inputs(model, blocks, data)
    last = max((k for k, t in enumerate(per_block) if t), default=-1)

    from tqdm.auto import tqdm

    for k in tqdm(range(last + 1), desc=desc, disable=not progress):
        block = blocks[k]
        block_targets = per_block[k]
        if block_targets:
            stats = {name: make_stats(target) for name, target in block_targets.items()}
            handles = [
                target.module.register_forward_hook(_stats_hook(stats[name])) for name, target in block_targets.items()
            ]
            try:
                for i, hidden in enumerate(inputs.hidden):
                    _call_block(block, inputs, i, hidden)
            finally:
                for handle in handles:
                    handle.remove()
            prune_block(block_targets, stats)
            del stats
        if k < last:  # the next block's inputs (none needed after the last block with targets)
            outputs = [
                _call_block(block, inputs, i, hidden).detach().to("cpu") for i, hidden in enumerate(inputs.hidden)
            ]
            inputs.hidden.clear()
            inputs.hidden.extend(out.to(device) for out in outputs)
            del outputs
        logger.debug("Block %d done", k)


def _stats_hook(stats: Any) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        stats.add(args[0].detach())

    return hook


class SequentialPruner:
    """Base of the calibration-based pruners that :func:`run_sequential` drives block by block.

    A subclass defines two methods and is registered with
    :func:`~proxsparse_hf.pruners.registry.register_pruner` (which calls :meth:`run`):

    * ``make_stats(target)``: an empty statistics object for one target, with ``add(x)`` (fed every layer input
      ``[..., in_features]``) and ``num_tokens``;
    * ``prune_target(target, stats)``: prune ``target.weight`` in place from its statistics and return its bool mask
      (storage layout, ``True`` = kept).

    The method's options (defaults filled in by the registry) are in ``self.options``.
    """

    def __init__(self, **options: Any) -> None:
        self.options = options

    def make_stats(self, target: Target) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define make_stats(target).")

    def prune_target(self, target: Target, stats: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define prune_target(target, stats).")

    @classmethod
    def run(
        cls,
        model: nn.Module,
        targets: Mapping[str, Target],
        calibration: CalibrationBatches,
        *,
        show_progress: bool = False,
        **options: Any,
    ) -> dict[str, torch.Tensor]:
        """Prune ``targets`` block by block on ``calibration``; returns ``{weight_name: bool mask}`` (on the CPU)."""
        pruner = cls(**options)
        masks: dict[str, torch.Tensor] = {}

        def prune_block(block_targets: dict[str, Target], stats: dict[str, Any]) -> None:
            for name, target in block_targets.items():
                if stats[name].num_tokens == 0:
                    raise RuntimeError(
                        f"Target `{name}` saw no calibration tokens; was it called in the block's forward?"
                    )
                masks[target.param_name] = pruner.prune_target(target, stats[name]).cpu()
                stats[name] = None  # free large statistics (e.g. a Hessian) as soon as the target is done

        with torch.no_grad():
            run_sequential(
                model,
                targets,
                calibration,
                make_stats=pruner.make_stats,
                prune_block=prune_block,
                progress=show_progress,
                desc=cls.__name__,
            )
        return masks
