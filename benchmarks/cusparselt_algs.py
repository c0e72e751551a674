"""Every cuSPARSELt algorithm on the Llama-2-7B projection shapes under sustained load, against dense cuBLAS.

``to_sparse_kernels`` picks one algorithm per shape from short bursts of graph replays (``_tune_shape``); this script
checks that choice where a model spends its prefill: each timing is a CUDA graph of 40 back-to-back matmuls replayed
3 times (median per matmul), long enough for the GPU to reach the clock its power cap allows. One JSON line per
(shape, tokens), everything written to ``--out``::

    python benchmarks/cusparselt_algs.py --out benchmarks/results/cusparselt_algs_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxsparse_hf.inference import _max_alg_id, sparse_kernels_available, time_ms  # noqa: E402
from proxsparse_hf.masks import mask_2to4  # noqa: E402
from proxsparse_hf.outputs import describe_hardware, library_versions  # noqa: E402

SHAPES = {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)}  # Llama-2-7B (out, in)
CALLS = 40


def sustained_ms(fn) -> float:
    """Ms per call of ``fn`` in a CUDA graph of ``CALLS`` back-to-back calls (median of 3 replays)."""
    return time_ms(fn, "cuda_graph", reps=CALLS)


def sweep(out_features: int, in_features: int, tokens: int) -> dict:
    """Dense ms and the speedup of every algorithm that plans for this shape (failing ids are skipped)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    weight = weight * mask_2to4(weight)
    packed = torch._cslt_compress(weight)
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16, generator=gen)
    dense = sustained_ms(lambda: F.linear(x, weight))
    speedups = {}
    for alg in range(_max_alg_id()):
        try:
            ms = sustained_ms(lambda: torch._cslt_sparse_mm(packed, x.t(), None, transpose_result=True, alg_id=alg))
        except RuntimeError:
            continue
        speedups[alg] = round(dense / ms, 3)
    best = max(speedups, key=speedups.get)
    return {"dense_ms": round(dense, 4), "best_alg": best, "best_speedup": speedups[best], "speedup_by_alg": speedups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
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
    for name, (out_features, in_features) in SHAPES.items():
        for tokens in args.tokens:
            row = {"shape": f"{name} {out_features}x{in_features}", "tokens": tokens}
            row.update(sweep(out_features, in_features, tokens))
            print(json.dumps({k: v for k, v in row.items() if k != "speedup_by_alg"}), flush=True)
            results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
