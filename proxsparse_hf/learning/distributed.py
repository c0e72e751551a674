"""Mask learning on distributed parameters: DDP, FSDP2 (``fully_shard``, DTensor), FSDP1 (``use_orig_params=True``) and
``device_map`` splits.

The ProxSparse prox, the statistics and the final mask application are all *per group of 4 input features*, so every
rank can work on the part of a weight it holds, as long as no group straddles a shard boundary. :func:`shard_targets`
describes, for every target, what this rank holds (a :class:`TargetShard`) and refuses shardings that would split a group:

* plain tensors (single process, DDP, ``device_map``): the whole weight; with DDP every rank holds the same copy
  (replicated), so nothing is communicated — identical gradients + the same deterministic prox keep the copies identical.
* FSDP2 ``DTensor``: ``param.to_local()``. ``Shard(0)`` on an ``nn.Linear`` weight ``[out, in]`` splits rows (always
  safe); a ``Shard`` along the input dimension (``Shard(1)`` on ``nn.Linear``, ``Shard(0)`` on a ``Conv1D``) is accepted
  only when every piece holds a multiple of 4 input features.
* FSDP1 with ``use_orig_params=True``: each original parameter is a flat 1-D view of the rank's slice of the
  ``FlatParameter``; the slice must start and end on a group boundary (a multiple of 4 elements for ``nn.Linear``, of
  ``4 * out_features`` for a ``Conv1D``).

Statistics of sharded weights are summed over ranks (:func:`all_reduce_sums`), and the full masks / original weights are
gathered only when asked for (:meth:`TargetShard.gather`): masks at the end, the original-weight snapshot at checkpoints.
All functions that communicate are collectives: every rank must call them, in the same order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..constants import SUPPORTED_M, SUPPORTED_N
from ..targets import Target, find_targets, is_target_type

__all__ = [
    "TargetShard",
    "all_reduce_sums",
    "all_reduce_tensors",
    "clean_name",
    "find_distributed_targets",
    "global_rms",
    "is_dtensor",
    "is_sharded",
    "local_tensor",
    "rank",
    "shard_targets",
    "sharded_sparsity_report",
    "world_size",
]

logger = logging.getLogger(__name__)

# Module-name parts inserted by wrappers (FSDP1, activation checkpointing, torch.compile); not in state_dict names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """``name`` without the wrapper parts FSDP1 / checkpoint wrappers / ``torch.compile`` insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process' rank in the default group (0 without ``torch.distributed``)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_dtensor(tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameters and gradients)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores, as a plain tensor sharing its storage (writes go into the parameter)."""
    if is_dtensor(tensor):
        return tensor.to_local()
    return tensor.data if isinstance(tensor, nn.Parameter) else tensor


def _collective_device() -> torch.device:
    """Where ``all_reduce`` buffers must live for the default backend (CUDA for NCCL, CPU otherwise)."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_tensors(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sums of ``tensors`` over all ranks, as float64 CPU tensors, in one collective (a no-op copy without
    ``torch.distributed``). Every rank must pass tensors of the same shapes."""
    flat = [t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]
    if world_size() == 1 or not flat:
        return [f.reshape(t.shape) for f, t in zip(flat, tensors)]
    buffer = torch.cat(flat).to(_collective_device())
    torch.distributed.all_reduce(buffer)
    parts = buffer.cpu().split([f.numel() for f in flat])
    return [p.reshape(t.shape) for p, t in zip(parts, tensors)]


def all_reduce_sums(values: Sequence[float]) -> list[float]:
    """Sum ``values`` over all ranks (float64; a no-op without ``torch.distributed``). A collective."""
    if world_size() == 1:
        return [float(v) for v in values]
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(buffer)
    return buffer.cpu().tolist()


@dataclass
class TargetShard:
    """What this rank holds of one target weight.

    Attributes:
        target: the :class:`~proxsparse_hf.targets.Target` (its module may sit inside an FSDP1 wrapper).
        name: the weight's ``state_dict`` name without wrapper parts (the key of masks and snapshots).
        kind: ``"local"`` (plain tensor: single process, DDP, ``device_map``), ``"dtensor"`` (FSDP2) or ``"fsdp1"``.
        global_shape: the full weight shape (storage layout).
        replication: how many ranks hold each element (divides this rank's share of summed statistics).
        flat_range: for ``"fsdp1"``, the ``[start, stop)`` slice of the flattened weight this rank holds.
    """

    target: Target
    name: str
    kind: str
    global_shape: tuple[int, ...]
    replication: int = 1
    flat_range: tuple[int, int] = (0, 0)
    _group: object = field(default=None, repr=False)

    @property
    def sharded(self) -> bool:
        """True when the weight is split over ranks (statistics must be reduced, masks gathered)."""
        return self.kind != "local"

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``tensor`` (the weight, its gradient) in storage layout; a view sharing its storage."""
        if self.kind == "dtensor":
            return tensor.to_local()
        plain = tensor.data if isinstance(tensor, nn.Parameter) else tensor
        return plain.reshape(-1) if self.kind == "fsdp1" else plain

    def grouped(self, local: torch.Tensor) -> torch.Tensor:
        """View of a local part (from :meth:`local` or :meth:`shard`) with the input dimension last (groups of 4
        consecutive along the last dimension). Writing into it writes into ``local``."""
        if self.kind != "fsdp1":
            return self.target.grouped(local)
        if self.target.transposed:  # Conv1D [in, out]: whole rows of `out`, transposed to [out, rows]
            return local.view(-1, self.global_shape[1]).t()
        return local.view(-1, SUPPORTED_M)

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full-size tensor shaped like the weight (no communication)."""
        if tuple(full.shape) != self.global_shape:
            raise ValueError(
                f"Tensor for `{self.name}` has shape {tuple(full.shape)}, expected the full weight shape {self.global_shape}."
            )
        if self.kind == "dtensor":
            from torch.distributed.tensor import distribute_tensor

            param = self.target.weight
            local_device = param.to_local().device
            return distribute_tensor(
                full.to(local_device), param.device_mesh, param.placements, src_data_rank=None
            ).to_local()
        if self.kind == "fsdp1":
            start, stop = self.flat_range
            return full.reshape(-1)[start:stop]
        return full

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """The full tensor (storage layout, on CPU) from every rank's local part. A collective for sharded kinds."""
        if self.kind == "local":
            return local.detach().cpu()
        is_bool = local.dtype == torch.bool
        part = local.detach().to(torch.uint8) if is_bool else local.detach()  # gloo has no bool reductions/gathers
        if self.kind == "dtensor":
            from torch.distributed.tensor import DTensor

            param = self.target.weight
            full = DTensor.from_local(
                part.to(param.to_local().device).contiguous(),
                param.device_mesh,
                param.placements,
                run_check=False,
                shape=param.shape,
                stride=param.stride(),
            ).full_tensor()
        else:
            pieces: list = [None] * torch.distributed.get_world_size(self._group)
            torch.distributed.all_gather_object(pieces, (self.flat_range, part.cpu()), group=self._group)
            full = torch.zeros(math.prod(self.global_shape), dtype=part.dtype)
            for (start, stop), values in pieces:
                full[start:stop] = values
            full = full.view(self.global_shape)
        full = full.cpu()
        return full.bool() if is_bool else full


# ---------------------------------------------------------------------------------------------------------------------
# discovery


def _fsdp1_infos(model: nn.Module) -> dict[int, tuple[tuple[int, int], tuple[int, ...], object]]:
    """``id(original param) -> ((start, stop), full shape, process group)`` for FSDP1 params (``use_orig_params``)."""
    if not torch.distributed.is_available():
        return {}
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - every supported torch has it
        return {}
    infos: dict[int, tuple[tuple[int, int], tuple[int, ...], object]] = {}
    for module in model.modules():
        if not isinstance(module, FullyShardedDataParallel):
            continue
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        params = getattr(flat, "_params", None)
        if params is None:  # use_orig_params=False: refused by find_distributed_targets
            continue
        for param, shape, info in zip(params, flat._shapes, flat._shard_param_infos):
            if info.in_shard:
                span = (int(info.intra_param_start_idx), int(info.intra_param_end_idx) + 1)  # FSDP's end is inclusive
            else:
                span = (0, 0)
            infos[id(param)] = (span, tuple(shape), module.process_group)
    return infos


def _uses_fsdp1_without_orig_params(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(
        isinstance(m, FullyShardedDataParallel)
        and getattr(getattr(m, "_handle", None), "flat_param", None) is not None
        and getattr(m._handle.flat_param, "_params", None) is None
        for m in model.modules()
    )


def find_distributed_targets(model: nn.Module, config=None) -> dict[str, Target]:
    """:func:`~proxsparse_hf.targets.find_targets` that also works on an FSDP1-wrapped model (whose parameters are flat
    1-D shards; their shapes are checked on the full shape by :func:`shard_targets` instead)."""
    if _uses_fsdp1_without_orig_params(model):
        raise ValueError(
            "FSDP1 without `use_orig_params=True` hides the original weights inside flat parameters; ProxSparse needs "
            "them. Set `fsdp_config={'use_orig_params': True}` (the transformers default) or use FSDP2 (`version: 2`)."
        )
    return find_targets(model, config, check_shapes=not _fsdp1_infos(model))


def _input_dim(target: Target) -> int:
    return 0 if target.transposed else 1


def _dtensor_shard(target: Target, name: str) -> TargetShard:
    from torch.distributed.tensor import Replicate, Shard

    param = target.weight
    shape = tuple(param.shape)
    mesh = param.device_mesh
    shards = 1
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if not isinstance(placement, Shard):
            raise ValueError(
                f"Target `{name}` has placement {placement} on mesh dimension {mesh_dim}; ProxSparse supports DTensor "
                f"weights placed with Shard(...) or Replicate() only."
            )
        size = mesh.size(mesh_dim)
        shards *= size
        in_dim = _input_dim(target)
        if placement.dim == in_dim and size > 1:
            chunk = -(-shape[in_dim] // size)  # torch.chunk semantics: ceil(n / k) per rank
            if type(placement) is not Shard or chunk % SUPPORTED_M != 0:
                raise ValueError(
                    f"Target `{name}` (weight shape {shape}) is sharded along its input dimension (dim {in_dim}) over "
                    f"{size} ranks into pieces of {chunk} input features (local shard shape "
                    f"{tuple(param.to_local().shape)}); a 2:4 group of {SUPPORTED_M} input features would straddle a "
                    f"shard boundary. Shard the output dimension instead (FSDP2's default Shard(0) on nn.Linear), or "
                    f"use a number of ranks that divides {shape[in_dim]}//{SUPPORTED_M}."
                )
    replication = max(1, world_size() // shards)
    return TargetShard(target=target, name=name, kind="dtensor", global_shape=shape, replication=replication)


def _fsdp1_shard(target: Target, name: str, info) -> TargetShard:
    (start, stop), shape, group = info
    if len(shape) != 2 or shape[_input_dim(target)] % SUPPORTED_M != 0:
        raise ValueError(
            f"Target `{name}` has weight shape {shape} whose input dimension is not divisible by {SUPPORTED_M}; 2:4 "
            f"sparsity needs groups of {SUPPORTED_M} input features. Exclude it with `exclude_modules`."
        )
    unit = SUPPORTED_M * shape[1] if target.transposed else SUPPORTED_M
    if start % unit or stop % unit:
        raise ValueError(
            f"Target `{name}` (weight shape {shape}) is split by FSDP1 at flat elements [{start}, {stop}) on rank "
            f"{rank()} (local shard shape ({stop - start},)); 2:4 groups of {SUPPORTED_M} input features would straddle "
            f"the shard boundary (boundaries must be multiples of {unit}). Wrap this layer in its own FSDP unit with a "
            f"size divisible by {unit} x world size, or use FSDP2 (`fsdp_config={{'version': 2}}`), which shards rows."
        )
    group_size = torch.distributed.get_world_size(group)
    return TargetShard(
        target=target,
        name=name,
        kind="fsdp1",
        global_shape=tuple(shape),
        replication=max(1, world_size() // group_size),
        flat_range=(start, stop),
        _group=group,
    )


def shard_targets(targets: Mapping[str, Target], model: nn.Module | None = None) -> dict[str, TargetShard]:
    """Describe what this rank holds of every target, keyed like ``targets``.

    Args:
        targets: from :func:`find_distributed_targets`.
        model: the model (needed to read FSDP1's flat-parameter layout; None = no FSDP1).

    Raises:
        ValueError: a sharding splits a group of 4 input features (names the parameter and the shard shape), a
            target's weight is offloaded (``meta``), or an unsupported DTensor placement is used. With FSDP1 the check
            is a collective, so every rank raises.
    """
    fsdp1 = _fsdp1_infos(model) if model is not None else {}
    shards: dict[str, TargetShard] = {}
    errors: list[str] = []
    for key, target in targets.items():
        # sharded weights are keyed by their state_dict name (FSDP1 inserts wrapper parts into module names)
        name = clean_name(target.param_name)
        weight = target.weight
        if is_dtensor(weight):
            shards[key] = _dtensor_shard(target, name)
        elif id(weight) in fsdp1:
            try:
                shards[key] = _fsdp1_shard(target, name, fsdp1[id(weight)])
            except ValueError as exc:  # raised on every rank below, so no rank hangs in a later collective
                errors.append(str(exc))
        else:
            if weight.device.type == "meta":
                raise ValueError(
                    f"Target `{target.param_name}` is on the `meta` device (offloaded by `device_map` to CPU/disk through hooks); "
                    f"ProxSparse updates the weights in place and needs them resident. Use a `device_map` without "
                    f"offloading (`max_memory` large enough) or FSDP."
                )
            shards[key] = TargetShard(
                target=target,
                name=target.param_name,
                kind="local",
                global_shape=tuple(weight.shape),
                replication=world_size(),
            )
    if fsdp1:
        gathered: list = [None] * world_size()
        if world_size() > 1:
            torch.distributed.all_gather_object(gathered, errors)
        else:
            gathered = [errors]
        first = next((msgs[0] for msgs in gathered if msgs), None)
        if first is not None:
            raise ValueError(first)
    return shards


def is_sharded(shards: Mapping[str, TargetShard]) -> bool:
    """True when any target is split over ranks (statistics need a reduction, masks a gather)."""
    return any(s.sharded for s in shards.values())


@torch.no_grad()
def global_rms(
    shards: Mapping[str, TargetShard], tensors: Mapping[str, torch.Tensor], sharded: bool
) -> dict[str, float]:
    """RMS of every full tensor from its local parts ``tensors[shard.name]`` (sums over ranks when ``sharded``: a
    collective; replicated copies count once). Layers whose RMS is 0 get 0."""
    sums: list[float] = []
    for s in shards.values():
        values = tensors[s.name].float()
        share = s.replication if sharded else 1
        sums += [float(values.pow(2).sum()) / share, values.numel() / share]
    if sharded:
        sums = all_reduce_sums(sums)
    return {
        s.name: math.sqrt(sums[2 * i] / sums[2 * i + 1]) if sums[2 * i + 1] else 0.0
        for i, s in enumerate(shards.values())
    }


# ---------------------------------------------------------------------------------------------------------------------
# report


@torch.no_grad()
def sharded_sparsity_report(model: nn.Module, shards: Mapping[str, TargetShard]):
    """:func:`~proxsparse_hf.report.sparsity_report` for a model whose targets are sharded (FSDP1/FSDP2): counts are
    made on local shards and summed over ranks. A collective: every rank must call it; every rank gets the report."""
    from ..report import LayerSparsity, SparsityReport

    counts: list[float] = []
    for shard in shards.values():
        groups = shard.grouped(shard.local(shard.target.weight.detach()))
        nonzero = (groups.reshape(-1, SUPPORTED_M) != 0).sum(dim=1)
        scale = 1.0 / shard.replication
        counts += [scale * (groups.numel() - int(nonzero.sum())), scale * int((nonzero <= SUPPORTED_N).sum())]
    seen: set[int] = set()
    total = zeros = 0.0
    fsdp1 = _fsdp1_infos(model)
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        local = local_tensor(param)
        if is_dtensor(param):
            shards_of = math.prod(param.device_mesh.size(i) for i, p in enumerate(param.placements) if p.is_shard())
            scale = 1.0 / max(1, world_size() // shards_of)
        elif id(param) in fsdp1:
            scale = 1.0 / max(1, world_size() // torch.distributed.get_world_size(fsdp1[id(param)][2]))
        else:
            scale = 1.0 / world_size()
        total += scale * local.numel()
        zeros += scale * int((local == 0).sum())
    reduced = all_reduce_sums([*counts, total, zeros])
    layers = []
    for i, shard in enumerate(shards.values()):
        numel = math.prod(shard.global_shape)
        layer_zeros = round(reduced[2 * i])
        ok_groups = round(reduced[2 * i + 1])
        frac = ok_groups / (numel // SUPPORTED_M) if numel else 1.0
        layers.append(
            LayerSparsity(
                name=shard.name,
                shape=list(shard.global_shape),
                numel=numel,
                zeros=layer_zeros,
                zero_fraction=layer_zeros / numel if numel else 0.0,
                fraction_2to4_groups=frac,
                is_2to4=frac == 1.0,
            )
        )
    target_modules = {id(s.target.module) for s in shards.values()}
    dense = [
        clean_name(name)
        for name, module in model.named_modules()
        if name and is_target_type(module) and id(module) not in target_modules
    ]
    return SparsityReport(
        layers=layers,
        dense_modules=dense,
        total_params=round(reduced[-2]),
        total_zeros=round(reduced[-1]),
        target_params=sum(row.numel for row in layers),
        target_zeros=sum(row.zeros for row in layers),
    )
