"""Host cost of the 2:4 dispatch on the decode path: a ``SparseLinear2to4`` call that falls back to dense against the
``nn.Linear`` call it replaces.

Eager decode is host-bound (one Python module call per linear per token), and two eager ``generate`` runs of the same
dense model differ by up to ±30 % from round to round on the machines measured, far more than the wrapper can add.
This script measures the wrapper itself: a small layer (GPU work of a few microseconds, so the host sets the pace),
``--calls`` calls per block, the two modules alternating block by block, median microseconds per call of each; one
JSON line, also written to ``--out``::

    python benchmarks/dispatch_overhead.py --out benchmarks/results/dispatch_overhead_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxsparse_hf.inference import NEVER, SparseLinear2to4, sparse_kernels_available  # noqa: E402
from proxsparse_hf.masks import mask_2to4  # noqa: E402
from proxsparse_hf.utils import describe_hardware, library_versions  # noqa: E402


def per_call_us(module: nn.Module, x: torch.Tensor, calls: int) -> float:
    """Microseconds per call of ``module(x)`` over ``calls`` back-to-back calls (synchronised at both ends)."""
    synchronize = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        module(x)
    synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def measure(features: int, calls: int, blocks: int, device: str) -> dict:
    """Median per-call microseconds of the dense ``nn.Linear`` and of its ``SparseLinear2to4`` on the fallback path,
    alternating block by block, and the wrapper's extra cost per call."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    linear = nn.Linear(features, features, bias=False, device=device, dtype=dtype).requires_grad_(False)
    linear.weight.mul_(mask_2to4(linear.weight))
    backend = "cusparselt" if device == "cuda" and sparse_kernels_available("cusparselt")[0] else "dense"
    wrapper = SparseLinear2to4.from_linear(linear, backend=backend, min_tokens=NEVER if backend == "dense" else 8192)
    x = torch.randn(1, 1, features, device=device, dtype=dtype)
    times: dict[str, list[float]] = {"nn.Linear": [], "SparseLinear2to4": []}
    with torch.no_grad():
        for module in (linear, wrapper):  # warm-up
            per_call_us(module, x, calls)
        for block in range(blocks):
            order = (("nn.Linear", linear), ("SparseLinear2to4", wrapper))
            for name, module in order if block % 2 == 0 else order[::-1]:
                times[name].append(per_call_us(module, x, calls))
    dense_us, wrapper_us = (statistics.median(v) for v in times.values())
    return {
        "device": device,
        "backend": backend,
        "layer": f"{features}x{features} {str(dtype).replace('torch.', '')}",
        "calls_per_block": calls,
        "blocks": blocks,
        "linear_us_per_call": round(dense_us, 3),
        "wrapper_us_per_call": round(wrapper_us, 3),
        "extra_us_per_call": round(wrapper_us - dense_us, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for flag, value in (("--features", args.features), ("--calls", args.calls), ("--blocks", args.blocks)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if args.features % 4:
        parser.error(f"--features must be a multiple of 4 (2:4 groups), got {args.features}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    row = measure(args.features, args.calls, args.blocks, args.device)
    print(json.dumps(row), flush=True)
    info = {"hardware": describe_hardware(), "versions": library_versions(), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**info, "results": [row]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
