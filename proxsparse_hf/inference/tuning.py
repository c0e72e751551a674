"""Per-shape dispatch: time dense vs sparse once per (backend, dtype, shape), keep the break-even token count, cache it.

Sparse kernels only pay off for many tokens; torch also re-plans cuSPARSELt on every call (~0.5 ms of host time on the
machines measured), which small matmuls cannot hide. :func:`tune_shape` times dense vs sparse over a ladder of token
counts (:data:`TUNE_BUCKETS`) and keeps the sparse kernel only from the smallest count at and above which it wins
everywhere (by 3% under CUDA graphs, 10% in eager mode); for a backend with an algorithm choice it first picks the
fastest algorithm at each count. Results are cached as JSON under ``cache_dir`` (:class:`DispatchCache`).
``tune_for="cuda_graph"`` times graph replays instead of back-to-back eager calls, for models run under CUDA graphs,
where the per-call host cost disappears.
"""

from __future__ import annotations

import json
import logging
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..utils import atomic_write_text
from .backends import build_kernel, get_backend

logger = logging.getLogger(__name__)

__all__ = [
    "NEVER",
    "TUNE_BUCKETS",
    "TUNE_MARGIN",
    "TUNE_MODES",
    "DispatchCache",
    "DispatchEntry",
    "break_even_tokens",
    "default_cache_dir",
    "dispatch_entry",
    "time_ms",
    "tune_shape",
]

TUNE_MODES = ("eager", "cuda_graph")
# token counts (rows of the flattened input) at which dense and sparse are timed; multiples of 16 for the kernels
TUNE_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# a sparse kernel must beat dense by this fraction at a bucket to be chosen there: a noise guard, wider for eager
# timing, whose back-to-back host-bound loops varied by up to ~10% between runs on the machine measured
TUNE_MARGIN = {"eager": 0.10, "cuda_graph": 0.03}
NEVER = 1 << 62  # min_tokens meaning "always dense"
_CACHE_VERSION = 2  # 2: a cuSPARSELt algorithm per bucket


# --------------------------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------------------------
def _median_ms(run: Callable[[], Any], calls: int) -> float:
    """Median over three timed ``run()`` of the milliseconds per call, ``run`` making ``calls`` calls."""
    samples = []
    for _ in range(3):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def _repeat(fn: Callable[[], Any], reps: int) -> None:
    for _ in range(reps):
        fn()


def _time_eager(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds per call of ``reps`` back-to-back calls (host launch cost included, as in a real forward)."""
    _repeat(fn, 2)
    torch.cuda.synchronize()
    return _median_ms(lambda: _repeat(fn, reps), reps)


def _time_graph(fn: Callable[[], Any], reps: int) -> float:
    """Milliseconds per call replaying a CUDA graph of ``reps`` calls (no host cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _repeat(fn, 2)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _repeat(fn, reps)
    graph.replay()
    torch.cuda.synchronize()
    ms = _median_ms(graph.replay, reps)
    del graph
    return ms


def time_ms(fn: Callable[[], Any], tune_for: str = "eager", reps: int = 10) -> float:
    """Median milliseconds per call of ``fn`` on the current CUDA device (``tune_for`` in ``TUNE_MODES``)."""
    if tune_for not in TUNE_MODES:
        raise ValueError(f"`tune_for`={tune_for!r} is not one of {TUNE_MODES}.")
    return _time_graph(fn, reps) if tune_for == "cuda_graph" else _time_eager(fn, reps)


# --------------------------------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class DispatchEntry:
    """Measured dispatch for one (backend, dtype, shape): thresholds, chosen cuSPARSELt algorithm and the timings."""

    min_tokens: int
    alg_id: int = 0
    buckets: list[int] = field(default_factory=list)
    dense_ms: list[float] = field(default_factory=list)
    sparse_ms: list[float] = field(default_factory=list)
    bucket_algs: list[int] = field(default_factory=list)  # the fastest cuSPARSELt algorithm at each bucket

    def algorithms(self) -> int | dict[int, int]:
        """What :meth:`SparseLinear2to4.from_linear` takes as ``alg_id``: per bucket when measured so."""
        return dict(zip(self.buckets, self.bucket_algs)) if self.bucket_algs else self.alg_id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def break_even_tokens(buckets: list[int], dense_ms: list[float], sparse_ms: list[float], margin: float) -> int:
    """Smallest bucket from which sparse beats dense by ``margin`` at every larger bucket too (``NEVER`` if none)."""
    threshold = NEVER
    for bucket, dense, sparse in reversed(list(zip(buckets, dense_ms, sparse_ms))):
        if sparse <= dense * (1.0 - margin):
            threshold = bucket
        else:
            break
    return threshold


def tune_shape(
    backend: str, weight: torch.Tensor, tune_for: str, buckets: tuple[int, ...], select_alg: bool
) -> DispatchEntry:
    """Time dense vs sparse for one weight ``[out, in]`` on its device at every bucket; for a backend with an
    algorithm choice (``select_alg``, cuSPARSELt) first pick the fastest algorithm at each bucket (CUDA-graph timing:
    the algorithm that wins at 2k tokens need not win at 8k)."""
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x_all = torch.randn(max(buckets), weight.shape[1], device=weight.device, dtype=weight.dtype, generator=generator)
    dense_w = weight.detach().contiguous()
    kernel = build_kernel(backend, dense_w, 0)
    alg_candidates = get_backend(backend).alg_candidates
    search = alg_candidates is not None and select_alg
    candidates = alg_candidates(weight.dtype) if search else ()
    dense_ms, sparse_ms, bucket_algs = [], [], []
    for bucket in buckets:
        x = x_all[:bucket]
        best = None
        for candidate in candidates:
            try:
                kernel.set_alg(candidate)
                kernel.mm(x, None)
                torch.cuda.synchronize()
                ms = time_ms(lambda: kernel.mm(x, None), "cuda_graph", reps=3)
            except RuntimeError:  # an id this build or shape does not have
                continue
            if best is None or ms < best[0]:
                best = (ms, candidate)
        if search:
            bucket_algs.append(0 if best is None else best[1])
            kernel.set_alg(bucket_algs[-1])
        reps = 20 if bucket <= 1024 else 6
        dense_ms.append(round(time_ms(lambda: F.linear(x, dense_w), tune_for, reps), 5))
        sparse_ms.append(round(time_ms(lambda: kernel.mm(x, None), tune_for, reps), 5))

    return DispatchEntry(
        min_tokens=break_even_tokens(list(buckets), dense_ms, sparse_ms, TUNE_MARGIN[tune_for]),
        alg_id=bucket_algs[-1] if bucket_algs else 0,
        buckets=list(buckets),
        dense_ms=dense_ms,
        sparse_ms=sparse_ms,
        bucket_algs=bucket_algs,
    )


# --------------------------------------------------------------------------------------------------------------------
# the disk cache
# --------------------------------------------------------------------------------------------------------------------
def _gpu_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def default_cache_dir() -> Path:
    """``$PROXSPARSE_CACHE_DIR``, else ``$XDG_CACHE_HOME/proxsparse_hf``, else ``~/.cache/proxsparse_hf``."""
    env = os.environ.get("PROXSPARSE_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "proxsparse_hf"


class DispatchCache:
    """JSON file ``sparse_dispatch_<gpu>.json`` under ``cache_dir``: ``{key: DispatchEntry}`` with the torch and
    cuSPARSELt versions in each key, so a new torch re-measures."""

    def __init__(self, cache_dir: str | os.PathLike | None, device: torch.device):
        self.path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.file = self.path / f"sparse_dispatch_{_gpu_slug(device)}.json"
        self.entries: dict[str, dict[str, Any]] = {}
        if self.file.is_file():
            try:
                data = json.loads(self.file.read_text())
                if data.get("version") == _CACHE_VERSION:
                    self.entries = dict(data.get("entries", {}))
            except (OSError, ValueError) as exc:
                logger.warning("Ignoring unreadable dispatch cache %s (%s).", self.file, exc)

    @staticmethod
    def key(backend: str, dtype: torch.dtype, out_features: int, in_features: int, tune_for: str) -> str:
        cslt = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
        dtype_name = str(dtype).replace("torch.", "")
        return f"{backend}|{dtype_name}|{out_features}x{in_features}|{tune_for}|torch{torch.__version__}|cslt{cslt}"

    def get(self, key: str) -> DispatchEntry | None:
        raw = self.entries.get(key)
        return None if raw is None else DispatchEntry(**raw)

    def put(self, key: str, entry: DispatchEntry) -> None:
        self.entries[key] = entry.to_dict()

    def save(self) -> None:
        payload = {"version": _CACHE_VERSION, "entries": self.entries}
        atomic_write_text(self.file, json.dumps(payload, indent=1, sort_keys=True))


def dispatch_entry(cache: DispatchCache, backend: str, grouped: torch.Tensor, tune_for: str) -> DispatchEntry:
    """The cached dispatch of ``grouped``'s (backend, dtype, shape) for ``tune_for``, measured and cached if absent."""
    out_features, in_features = grouped.shape
    key = cache.key(backend, grouped.dtype, out_features, in_features, tune_for)
    entry = cache.get(key)
    if entry is None:
        with torch.no_grad():
            entry = tune_shape(backend, grouped, tune_for, TUNE_BUCKETS, select_alg=True)
        cache.put(key, entry)
        logger.info(
            "2:4 dispatch for %s %s %dx%d (%s): alg %s, sparse from %s tokens (dense ms %s, sparse ms %s)",
            backend,
            grouped.dtype,
            out_features,
            in_features,
            tune_for,
            entry.algorithms(),
            "never" if entry.min_tokens >= NEVER else entry.min_tokens,
            entry.dense_ms,
            entry.sparse_ms,
        )
    return entry
