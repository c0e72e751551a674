"""Benchmark 2:4 sparse kernels against dense cuBLAS: GEMM level (Llama projection shapes) and model level (a 7B-shaped
Llama decoder with random weights, magnitude 2:4 masks).

Prints one JSON line per measurement and writes everything (with GPU name and versions) to ``--out``::

    python benchmarks/inference_2to4.py --out benchmarks/results/inference_2to4_h100.json
    python benchmarks/inference_2to4.py --part gemm --dtypes float16 --out /tmp/fp16.json

Timing: CUDA events, warm-up first, median of repeated runs. ``eager`` = back-to-back calls as a model would issue them
(host launch cost included); ``graph`` = CUDA-graph replays (no host cost).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxsparse_hf.inference import (  # noqa: E402
    SparseLinear2to4,
    _build_kernel,
    _DispatchCache,
    sparse_kernels_available,
    sparse_weight_memory,
    time_ms,
    to_dense_kernels,
    to_sparse_kernels,
)
from proxsparse_hf.masks import mask_2to4  # noqa: E402
from proxsparse_hf.outputs import describe_hardware, library_versions  # noqa: E402

SHAPES = {  # (out_features, in_features) of the distinct projections
    "llama2-7b": {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)},
    "llama3-8b": {"qo": (4096, 4096), "kv": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)},
    "llama2-13b": {"qkvo": (5120, 5120), "gate_up": (13824, 5120), "down": (5120, 13824)},
}
TOKENS = (1, 16, 128, 512, 2048, 8192)
RESULTS: list[dict] = []


def emit(record: dict) -> None:
    RESULTS.append(record)
    print(json.dumps(record), flush=True)


def masked(out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(out_features, in_features, device="cuda", dtype=dtype) * 0.02
    return w * mask_2to4(w)


def gemm_level(dtypes: list[torch.dtype], cache_dir: str, models: list[str]) -> None:
    backends = [b for b in ("cusparselt", "cutlass", "torchao") if sparse_kernels_available(b)[0]]
    for b in ("cutlass", "torchao"):
        if b not in backends:
            emit({"level": "gemm", "backend": b, "skipped": sparse_kernels_available(b)[1]})
    seen = set()
    for dtype in dtypes:
        for model_name in models:
            for proj, (n, k) in SHAPES[model_name].items():
                if (n, k, dtype) in seen:
                    continue
                seen.add((n, k, dtype))
                w = masked(n, k, dtype)
                linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
                with torch.no_grad():
                    linear.weight.copy_(w)
                disp = {}
                for tune_for in ("eager", "cuda_graph"):
                    disp[tune_for] = to_sparse_kernels(
                        torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Sequential(linear)])),
                        tune_for=tune_for,
                        cache_dir=cache_dir,
                    )[0][0][0]
                key = _DispatchCache.key("cusparselt", dtype, n, k, "cuda_graph")
                entry = _DispatchCache(cache_dir, w.device).get(key)
                kernels = {"cusparselt": _build_kernel("cusparselt", w, entry.algorithms())}
                kernels["cusparselt_alg0"] = _build_kernel("cusparselt", w, 0)
                for b in backends[1:]:
                    kernels[b] = _build_kernel(b, w)
                x_all = torch.randn(max(TOKENS), k, device="cuda", dtype=dtype)
                for m in TOKENS:
                    x = x_all[:m]
                    reps = 30 if m <= 512 else 8
                    base = {"level": "gemm", "model": model_name, "proj": proj, "N": n, "K": k, "M": m}
                    base["dtype"] = str(dtype).replace("torch.", "")
                    for timing, tune_for in (("eager", "eager"), ("graph", "cuda_graph")):
                        dense = time_ms(lambda: F.linear(x, w), tune_for, reps)
                        emit({**base, "impl": "dense", "timing": timing, "ms": round(dense, 5), "speedup": 1.0})
                        impls = dict(kernels)
                        if timing == "graph":
                            impls.pop("torchao", None)  # torch's subclass path is the same cuSPARSELt call, eager only
                        else:
                            impls.pop("cusparselt_alg0", None)  # the default algorithm: graph timing shows it
                        for name, kern in impls.items():
                            try:
                                ms = time_ms(lambda: kern.mm(x, None), tune_for, reps)
                            except RuntimeError as exc:
                                emit({**base, "impl": name, "timing": timing, "error": str(exc)[:200]})
                                continue
                            emit(
                                {
                                    **base,
                                    "impl": name,
                                    "timing": timing,
                                    "ms": round(ms, 5),
                                    "speedup": round(dense / ms, 3),
                                }
                            )
                        layer = disp[tune_for]  # nn.Linear itself where sparse never won for this shape
                        with torch.no_grad():
                            ms = time_ms(lambda: layer(x), tune_for, reps)
                        emit(
                            {
                                **base,
                                "impl": "dispatch",
                                "timing": timing,
                                "ms": round(ms, 5),
                                "speedup": round(dense / ms, 3),
                                "min_tokens": layer.min_tokens if isinstance(layer, SparseLinear2to4) else None,
                                "alg_id": kernels["cusparselt"].alg_for(m),
                            }
                        )
                del kernels, x_all, disp


def build_7b(dtype: torch.dtype, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=8192,
    )
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
                if p.dim() == 2 and ".layers." in name:
                    p.mul_(mask_2to4(p))
        with torch.device("cuda"):  # non-persistent buffers (inv_freq) are not materialised by to_empty
            model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


def _median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def prefill_call(model, length: int, mark_step: bool = False):
    """One prefill of ``length`` random tokens, as a callable; ``mark_step``: tell Inductor's CUDA-graph trees that
    each call is a new step (needed when the compiled regions are the decoder layers, not the whole model)."""
    ids = torch.randint(0, 32000, (1, length), device="cuda")

    def run():
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        return model(input_ids=ids, use_cache=False, logits_to_keep=1)

    return run


def parse_gpu_samples(text: str) -> dict:
    """Medians of ``nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits`` lines (unreadable
    lines skipped): ``{"sm_clock_mhz", "power_w", "samples"}``, or ``{}`` without a readable line."""
    clocks, power = [], []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        try:
            clock, watts = float(fields[0]), float(fields[1])
        except (ValueError, IndexError):
            continue
        clocks.append(clock)
        power.append(watts)
    if not clocks:
        return {}
    return {"sm_clock_mhz": statistics.median(clocks), "power_w": statistics.median(power), "samples": len(clocks)}


@contextlib.contextmanager
def gpu_clocks(interval_ms: int = 20):
    """SM clock and board power sampled by ``nvidia-smi`` while the block runs (the H200 here runs at its 700 W cap
    during a prefill and lowers its clock, more for 2:4 GEMMs than for dense ones); fills the yielded dict with
    :func:`parse_gpu_samples` on exit, leaves it empty without ``nvidia-smi``."""
    result: dict = {}
    exe = shutil.which("nvidia-smi")
    if exe is None:
        yield result
        return
    index = torch.cuda.current_device()
    query = [exe, f"--id={index}", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"]
    proc = subprocess.Popen(
        [*query, f"-lms={interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    proc.stdout.readline()  # sampling has started (this sample predates the block)
    try:
        yield result
    finally:
        proc.terminate()
        result.update(parse_gpu_samples(proc.communicate()[0]))


def prefill(model, length: int, label: str, graphs: bool, warmup: int = 2, mark_step: bool = False) -> dict:
    """Prefill latency of :func:`prefill_call`, eager and (``graphs``) as a CUDA-graph replay; with the median SM
    clock and power during the eager timing (:func:`gpu_clocks`)."""
    run = prefill_call(model, length, mark_step)
    out = {"level": "model", "what": "prefill", "tokens": length, "model": label}
    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):  # warm-up (and compilation) outside the clock sampling
            run()
        with gpu_clocks() as clocks:
            out["eager_ms"] = round(_median_ms(run, 0, 10), 3)
        if clocks:
            out["gpu_during_eager"] = clocks
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if graphs:
            try:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    run()
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                out["graph_ms"] = round(_median_ms(graph.replay, 2, 5), 3)
                del graph
            except Exception as exc:  # noqa: BLE001 - report why graphs did not work
                out["graph_error"] = str(exc)[:300]
    torch.cuda.empty_cache()
    return out


def add_speedups(row: dict, ref: dict) -> None:
    """``eager_speedup`` / ``graph_speedup`` of a prefill row over the dense row ``ref`` timed the same way."""
    for key in ("eager_ms", "graph_ms"):
        if key in row and key in ref:
            row[key.replace("_ms", "_speedup")] = round(ref[key] / row[key], 3)


def _generate_seconds(model, ids: torch.Tensor, new_tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_ab(model, batches: list[int], new_tokens: int, cache_dir: str, rounds: int = 3) -> list[dict]:
    """Decode tokens/s of the dense model and of its eager-tuned conversion, interleaved round by round (A, B, A, B...)
    so that drift of the host or the GPU hits both alike. ``model`` is dense on entry and on exit."""
    rows = []
    for batch in batches:
        ids = torch.randint(1, 32000, (batch, 64), device="cuda")
        dense_s, sparse_s = [], []
        with torch.no_grad():
            for round_ in range(rounds + 1):  # round 0 warms both up
                dense = _generate_seconds(model, ids, new_tokens)
                to_sparse_kernels(model, tune_for="eager", cache_dir=cache_dir)
                sparse = _generate_seconds(model, ids, new_tokens)
                to_dense_kernels(model)
                if round_:
                    dense_s.append(dense)
                    sparse_s.append(sparse)
        for label, samples in (("dense", dense_s), ("2:4 dispatch (tuned eager)", sparse_s)):
            row = {"level": "model", "what": "decode", "batch": batch, "new_tokens": new_tokens, "model": label}
            row["tokens_per_s"] = round(batch * new_tokens / statistics.median(samples), 2)
            row["seconds"] = [round(x, 4) for x in samples]
            rows.append(row)
        rows[-1]["speedup"] = round(statistics.median(dense_s) / statistics.median(sparse_s), 3)
        rows[-1]["speedup_per_round"] = [round(d / c, 3) for d, c in zip(dense_s, sparse_s)]
    return rows


def model_level(layers: int, lengths: list[int], batches: list[int], new_tokens: int, cache_dir: str) -> None:
    model = build_7b(torch.bfloat16, layers)
    dense_mem = torch.cuda.memory_allocated()
    rows = {}
    for length in lengths:
        rows[("prefill", length, "dense")] = prefill(model, length, "dense", graphs=True)
    for tune_for in ("eager", "cuda_graph"):
        start = time.perf_counter()
        to_sparse_kernels(model, tune_for=tune_for, cache_dir=cache_dir)
        convert_s = time.perf_counter() - start
        label = f"2:4 dispatch (tuned {tune_for})"
        mem = sparse_weight_memory(model).to_dict()
        thresholds = sorted(
            {
                f"{m.out_features}x{m.in_features}": m.min_tokens if isinstance(m, SparseLinear2to4) else None
                for name, m in model.named_modules()
                if ".layers." in name and isinstance(m, (SparseLinear2to4, torch.nn.Linear))
            }.items()
        )
        emit(
            {
                "level": "model",
                "what": "conversion",
                "model": label,
                "seconds": round(convert_s, 2),
                "weights": mem,
                "allocated_gib_dense": round(dense_mem / 2**30, 2),
                "allocated_gib_converted": round(torch.cuda.memory_allocated() / 2**30, 2),
                "min_tokens": dict(thresholds),
            }
        )
        for length in lengths:
            rows[("prefill", length, label)] = prefill(model, length, label, graphs=True)
        to_dense_kernels(model)
    for (_, size, label), row in rows.items():
        if label != "dense":
            add_speedups(row, rows[("prefill", size, "dense")])
        emit(row)
    for row in decode_ab(model, batches, new_tokens, cache_dir):
        emit(row)


def _sdpa_context(backend: str):
    """The SDPA backend for both models (``"default"``: torch's own choice)."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend])


# kernel-name patterns of a profiled prefill, first match wins (lower-case names). Inductor's generated kernels come
# first: their names list the ops they fused (a norm fused after a sparse matmul is named "..._cslt_sparse_mm_...")
KERNEL_CLASSES = (
    ("fused_elementwise", ("triton",)),
    ("sparse_gemm", ("sparse", "cusparselt", "sp_gemm")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("dense_gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
    ("copy", ("copy", "clone", "cat")),
)


def kernel_class(name: str) -> str:
    """The :data:`KERNEL_CLASSES` class of a CUDA kernel name (``"other"`` when no pattern matches)."""
    name = name.lower()
    return next((kind for kind, patterns in KERNEL_CLASSES if any(p in name for p in patterns)), "other")


def kernel_breakdown(run, calls: int = 3) -> dict:
    """GPU time of ``calls`` runs of ``run`` per kernel class (``KERNEL_CLASSES``), per call, from ``torch.profiler``;
    plus the ten kernels taking the most time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    per_class: dict[str, float] = {}
    per_kernel: dict[str, list] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us()
        kind = kernel_class(event.name)
        per_class[kind] = per_class.get(kind, 0.0) + us
        entry = per_kernel.setdefault(event.name[:90], [kind, 0.0, 0])
        entry[1] += us
        entry[2] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:10]
    return {
        "gpu_ms_per_call": round(sum(per_class.values()) / calls / 1e3, 3),
        "ms_per_call_by_class": {k: round(v / calls / 1e3, 3) for k, v in sorted(per_class.items())},
        "top_kernels": [
            {"name": name, "class": kind, "ms_per_call": round(us / calls / 1e3, 3), "launches_per_call": n // calls}
            for name, (kind, us, n) in top
        ],
    }


def compiled_prefill(
    layers: int, lengths: list[int], cache_dir: str, sdpa: list[str], mode: str, profile: bool = False
) -> None:
    """Prefill of the dense and the converted (graph-tuned) model with every decoder layer compiled by
    ``torch.compile`` (regional compilation: one compiled block reused by all layers; Inductor fuses the norms, rotary
    embedding and SiLU-gating that eager mode runs as separate kernels), under each SDPA backend in ``sdpa``; timed
    eagerly and, unless ``mode`` already runs CUDA graphs (``"reduce-overhead"``: Inductor's CUDA-graph trees), as a
    manual CUDA-graph replay of the compiled model. ``profile``: add each configuration's GPU time per kernel class
    (:func:`kernel_breakdown`)."""
    rows = {}
    for label in ("dense", "2:4 dispatch (tuned cuda_graph)"):
        model = build_7b(torch.bfloat16, layers)
        if label != "dense":
            to_sparse_kernels(model, tune_for="cuda_graph", cache_dir=cache_dir)
        for layer in model.model.layers:
            layer.compile(mode=mode)
        for backend in sdpa:
            for length in lengths:
                start = time.perf_counter()
                with _sdpa_context(backend):
                    try:
                        row = prefill(
                            model,
                            length,
                            f"{label}, compiled",
                            graphs=mode != "reduce-overhead",
                            warmup=4,
                            mark_step=mode == "reduce-overhead",
                        )
                        if profile:
                            with torch.no_grad():
                                call = prefill_call(model, length, mark_step=mode == "reduce-overhead")
                                row["kernels"] = kernel_breakdown(call)
                    except Exception as exc:  # noqa: BLE001 - report why this configuration did not run
                        row = {"level": "model", "what": "prefill", "tokens": length, "error": str(exc)[:300]}
                row.update(
                    model=f"{label}, compiled", sdpa=backend, seconds_incl_compile=round(time.perf_counter() - start)
                )
                rows[(label, backend, length)] = row
        del model
        torch.cuda.empty_cache()
    for (label, backend, length), row in rows.items():
        ref = rows.get(("dense", backend, length), {})
        if label != "dense":
            add_speedups(row, ref)
            best_dense = min(ref.get(k, math.inf) for k in ("eager_ms", "graph_ms"))
            best_sparse = min(row.get(k, math.inf) for k in ("eager_ms", "graph_ms"))
            if math.isfinite(best_dense) and math.isfinite(best_sparse):
                row["best_vs_best_dense_speedup"] = round(best_dense / best_sparse, 3)
        emit(row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "gemm", "model", "decode", "compiled"), default="all")
    parser.add_argument(
        "--sdpa",
        nargs="+",
        default=["default"],
        choices=("default", "flash", "cudnn"),
        help="SDPA backends (compiled part)",
    )
    parser.add_argument(
        "--compile-mode",
        default="reduce-overhead",
        choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
    )
    parser.add_argument(
        "--profile", action="store_true", help="compiled part: GPU time per kernel class (torch.profiler)"
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=("bfloat16", "float16"))
    parser.add_argument("--gemm-models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the 7B-shaped model")
    parser.add_argument("--prefill", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache-dir", default="/tmp/proxsparse_dispatch")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not sparse_kernels_available("cusparselt")[0]:
        print(json.dumps({"skipped": sparse_kernels_available("cusparselt")[1]}))
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still writes what was measured
    torch.manual_seed(0)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    info = {
        "gpu": torch.cuda.get_device_name(0),
        "hardware": describe_hardware(),
        "versions": {**library_versions(), "cusparselt": torch.backends.cusparselt.version()},
        "args": vars(args),
    }
    print(json.dumps(info), flush=True)
    try:
        if args.part in ("all", "gemm"):
            gemm_level(dtypes, args.cache_dir, args.gemm_models)
        if args.part in ("all", "model"):
            model_level(args.layers, args.prefill, args.batches, args.new_tokens, args.cache_dir)
        if args.part == "compiled":
            compiled_prefill(args.layers, args.prefill, args.cache_dir, args.sdpa, args.compile_mode, args.profile)
        if args.part == "decode":
            for row in decode_ab(build_7b(torch.bfloat16, args.layers), args.batches, args.new_tokens, args.cache_dir):
                emit(row)
    finally:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**info, "results": RESULTS}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
