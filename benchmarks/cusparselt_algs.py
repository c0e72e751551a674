"""Every cuSPARSELt algorithm on the Llama-2-7B projection shapes under sustained load, against dense cuBLAS.

``to_sparse_kernels`` picks one algorithm per shape and token count from short bursts of graph replays
(``tune_shape``); this script checks that choice where a model spends its prefill: each timing is a CUDA graph of 40
back-to-back matmuls replayed 3 times (median per matmul), long enough for the GPU to reach the clock its power cap
allows. ``--copies N`` cycles the 40 matmuls through N different weights and inputs: with N = 1 a 2:4 weight (25 MB for
11008 x 4096) stays in the 50 MB L2 between calls, which no layer of a model enjoys (every layer has its own weights);
N = 8 streams them from HBM as a model does. ``--shapes`` adds the fused siblings (``qkv_fused`` 12288 x 4096,
``gate_up_fused`` 22016 x 4096): at 2k tokens gate/up alone is 5.2 waves of 128 x 256 tiles on an H200's 132 SMs,
fused 10.4. One JSON line per (copies, shape, tokens), everything written to ``--out``::

    python benchmarks/cusparselt_algs.py --copies 8 1 --out benchmarks/results/cusparselt_algs_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxsparse_hf.inference.backends import cusparselt_alg_count, sparse_kernels_available  # noqa: E402
from proxsparse_hf.inference.tuning import time_ms  # noqa: E402
from proxsparse_hf.masks import mask_2to4  # noqa: E402
from proxsparse_hf.utils import describe_hardware, library_versions  # noqa: E402

# Llama-2-7B (out, in); the fused siblings (q/k/v, gate/up as one weight) to compare per FLOP with three / two calls
SHAPES = {
    "qkvo": (4096, 4096),
    "gate_up": (11008, 4096),
    "down": (4096, 11008),
    "qkv_fused": (12288, 4096),
    "gate_up_fused": (22016, 4096),
}
DEFAULT_SHAPES = ("qkvo", "gate_up", "down")
CALLS = 40


def sustained_ms(fn) -> float:
    """Ms per call of ``fn`` in a CUDA graph of ``CALLS`` back-to-back calls (median of 3 replays)."""
    return time_ms(fn, "cuda_graph", reps=CALLS)


def _cycled(items: list):
    """A function returning ``items`` in turn (each captured call of a graph gets the next one)."""
    counter = itertools.count()
    return lambda: items[next(counter) % len(items)]


def sweep(out_features: int, in_features: int, tokens: int, copies: int) -> dict:
    """Dense ms and the speedup of every algorithm that plans for this shape (failing ids are skipped)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights, packs, inputs = [], [], []
    for _ in range(copies):
        weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        weights.append(weight * mask_2to4(weight))
        packs.append(torch._cslt_compress(weights[-1]))
        inputs.append(torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16, generator=gen))
    pairs = list(zip(weights, inputs))
    dense_next, sparse_next = _cycled(pairs), _cycled(list(zip(packs, inputs)))

    def dense_call():
        weight, x = dense_next()
        return F.linear(x, weight)

    def sparse_ms(alg: int) -> float:
        def call():
            packed, x = sparse_next()
            return torch._cslt_sparse_mm(packed, x.t(), None, transpose_result=True, alg_id=alg)

        return sustained_ms(call)

    dense = sustained_ms(dense_call)
    speedups = {}
    for alg in range(cusparselt_alg_count()):
        try:
            speedups[alg] = round(dense / sparse_ms(alg), 3)
        except RuntimeError:
            continue
    best = max(speedups, key=speedups.get)
    return {"dense_ms": round(dense, 4), "best_alg": best, "best_speedup": speedups[best], "speedup_by_alg": speedups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--copies", type=int, nargs="+", default=[1], help="weights/inputs the matmuls cycle through")
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for flag, values in (("--copies", args.copies), ("--tokens", args.tokens)):
        if min(values) < 1:
            parser.error(f"{flag} must be >= 1, got {min(values)}")
    available, reason = sparse_kernels_available("cusparselt")
    if not available:
        print(json.dumps({"skipped": reason}))
        return 1
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "hardware": describe_hardware(),
        "versions": {**library_versions(), "cusparselt": torch.backends.cusparselt.version()},
        "args": vars(args),
    }
    results = []
    for copies, name, tokens in itertools.product(args.copies, args.shapes, args.tokens):
        out_features, in_features = SHAPES[name]
        row = {"copies": copies, "shape": f"{name} {out_features}x{in_features}", "tokens": tokens}
        row.update(sweep(out_features, in_features, tokens, copies))
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("speedup_by")}), flush=True)
        results.append(row)
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
