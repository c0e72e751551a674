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
import functools
import json
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
    backend_names,
    build_kernel,
    sparse_kernels_available,
    sparse_weight_memory,
    time_ms,
    to_dense_kernels,
    to_sparse_kernels,
)
from proxsparse_hf.inference.tuning import DispatchCache  # noqa: E402
from proxsparse_hf.masks import mask_2to4  # noqa: E402
from proxsparse_hf.utils import describe_hardware, library_versions  # noqa: E402

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
    others = []  # every registered backend besides cuSPARSELt (timed below with its tuned algorithms) that runs here
    for b in backend_names():
        available, why = sparse_kernels_available(b)
        if b != "cusparselt" and available:
            others.append(b)
        elif b != "cusparselt":
            emit({"level": "gemm", "backend": b, "skipped": why})
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
                key = DispatchCache.key("cusparselt", dtype, n, k, "cuda_graph")
                entry = DispatchCache(cache_dir, w.device).get(key)
                kernels = {"cusparselt": build_kernel("cusparselt", w, entry.algorithms())}
                kernels["cusparselt_alg0"] = build_kernel("cusparselt", w, 0)
                for b in others:
                    kernels[b] = build_kernel(b, w)
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


def prefill_call(model, length: int, mark_step: bool = False, ids: torch.Tensor | None = None):
    """One prefill of ``length`` random tokens (or of ``ids``), as a callable; ``mark_step``: tell Inductor's CUDA-graph
    trees that each call is a new step (needed when the compiled regions are the decoder layers, not the whole model)."""
    if ids is None:
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


def _manual_graph(run):
    """``run`` captured as one CUDA graph (after a warm-up on a side stream); returns the graph's ``replay``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


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
                replay = _manual_graph(run)
                out["graph_ms"] = round(_median_ms(replay, 2, 5), 3)
                del replay
            except Exception as exc:  # noqa: BLE001 - report why graphs did not work
                out["graph_error"] = str(exc)[:300]
    torch.cuda.empty_cache()
    return out


def add_speedups(row: dict, ref: dict) -> None:
    """``eager_speedup`` / ``graph_speedup`` of a prefill row over the dense row ``ref`` timed the same way."""
    for key in ("eager_ms", "graph_ms"):
        if key in row and key in ref:
            row[key.replace("_ms", "_speedup")] = round(ref[key] / row[key], 3)


def _generate_seconds(model, ids: torch.Tensor, new_tokens: int, cache_implementation: str | None = None) -> dict:
    """Wall seconds of one greedy ``generate`` of exactly ``new_tokens`` tokens: ``"total"``, and ``"decode"`` — the
    time after the prefill's logits are ready (the ``new_tokens - 1`` decoding steps). ``cache_implementation``:
    transformers' KV cache (``"static"``: ``generate`` compiles the decoding step, CUDA graphs included)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class PrefillDone(LogitsProcessor):
        start: float | None = None

        def __call__(self, input_ids, scores):
            if self.start is None:
                torch.cuda.synchronize()
                self.start = time.perf_counter()
            return scores

    clock = PrefillDone()
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([clock]),
        cache_implementation=cache_implementation,
    )
    torch.cuda.synchronize()
    end = time.perf_counter()
    return {"total": end - start, "decode": end - clock.start}


def _decode_rows(batch: int, new_tokens: int, samples: dict, how: str) -> list[dict]:
    """Rows of a decode comparison: ``samples`` maps the dense label, then the converted one, to per-round
    :func:`_generate_seconds` results. Speedups from decoding steps only (``decode_*``) and whole generate calls."""
    rows = []
    for label, runs in samples.items():
        row = {
            "level": "model",
            "what": "decode",
            "how": how,
            "batch": batch,
            "new_tokens": new_tokens,
            "model": label,
        }
        row["tokens_per_s"] = round(batch * new_tokens / statistics.median(r["total"] for r in runs), 2)
        row["decode_tokens_per_s"] = round(batch * (new_tokens - 1) / statistics.median(r["decode"] for r in runs), 2)
        row["seconds"] = [round(r["total"], 4) for r in runs]
        row["decode_seconds"] = [round(r["decode"], 4) for r in runs]
        rows.append(row)
    dense, converted = samples.values()
    for key, prefix in (("total", ""), ("decode", "decode_")):
        speedup = paired_speedup([r[key] for r in dense], [r[key] for r in converted])
        rows[-1].update({prefix + k: v for k, v in speedup.items()})
    return rows


def decode_ab(model, batches: list[int], new_tokens: int, cache_dir: str, rounds: int = 3) -> list[dict]:
    """Eager decode (HF ``generate``, dynamic KV cache) of the dense model and of its eager-tuned conversion,
    interleaved round by round (A, B, B, A, ...) so that drift of the host or the GPU hits both alike. ``model`` is
    dense on entry and on exit."""

    def converted(ids: torch.Tensor) -> dict:
        to_sparse_kernels(model, tune_for="eager", cache_dir=cache_dir)
        try:
            return _generate_seconds(model, ids, new_tokens)
        finally:
            to_dense_kernels(model)

    rows = []
    for batch in batches:
        ids = torch.randint(1, 32000, (batch, 64), device="cuda")
        measurements = {
            "dense": functools.partial(_generate_seconds, model, ids, new_tokens),
            "2:4 dispatch (tuned eager)": functools.partial(converted, ids),
        }
        with torch.no_grad():
            samples = _warm_then_interleave(measurements, rounds, warmups=1)
        rows.extend(_decode_rows(batch, new_tokens, samples, "eager, dynamic cache"))
    return rows


def decode_graphs(layers: int, batches: list[int], new_tokens: int, cache_dir: str, rounds: int) -> list[dict]:
    """Decode under CUDA graphs: ``generate`` with transformers' static KV cache compiles each decoding step
    (``torch.compile``, mode ``"reduce-overhead"``), the GPU-bound serving path without eager mode's host noise.
    The dense model and its graph-tuned conversion are both resident and timed in :func:`interleaved_rounds`."""
    models = {"dense": build_7b(torch.bfloat16, layers)}
    converted = build_7b(torch.bfloat16, layers)
    models["2:4 dispatch (tuned cuda_graph)"] = to_sparse_kernels(
        converted, tune_for="cuda_graph", cache_dir=cache_dir
    )
    rows = []
    for batch in batches:
        ids = torch.randint(1, 32000, (batch, 64), device="cuda")
        measurements = {
            label: functools.partial(_generate_seconds, model, ids, new_tokens, "static")
            for label, model in models.items()
        }
        with torch.no_grad():  # two warm-ups: compilation and CUDA-graph recording for this batch size
            samples = _warm_then_interleave(measurements, rounds, warmups=2)
        rows.extend(_decode_rows(batch, new_tokens, samples, "CUDA graphs, static cache"))
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


def interleaved_rounds(measurements: dict, rounds: int) -> dict:
    """Run every measurement of ``measurements`` (key -> callable returning one result) once per round, ``rounds``
    rounds, in the given order in even rounds and in reverse in odd ones: the GPU's clock follows its temperature and
    its 700 W power cap during a 7B prefill, and a configuration timed after another on a warmer GPU, or first on a
    cool one, would carry that drift into its speedup. Returns each key's per-round results."""
    keys = list(measurements)
    results: dict = {key: [] for key in keys}
    for round_ in range(rounds):
        for key in keys if round_ % 2 == 0 else keys[::-1]:
            results[key].append(measurements[key]())
    return results


def _warm_then_interleave(measurements: dict, rounds: int, warmups: int) -> dict:
    """Each measurement ``warmups`` times untimed, in order, then :func:`interleaved_rounds`."""
    for measure in measurements.values():
        for _ in range(warmups):
            measure()
    return interleaved_rounds(measurements, rounds)


def paired_speedup(reference_ms: list[float], candidate_ms: list[float]) -> dict:
    """Speedup of ``candidate`` over ``reference`` from their per-round times of :func:`interleaved_rounds`: the ratio
    of the medians, every round's own ratio and their range."""
    if not reference_ms or len(reference_ms) != len(candidate_ms):
        raise ValueError(f"need the same non-zero number of rounds, got {len(reference_ms)} and {len(candidate_ms)}")
    per_round = [ref / cand for ref, cand in zip(reference_ms, candidate_ms)]
    return {
        "speedup": round(statistics.median(reference_ms) / statistics.median(candidate_ms), 3),
        "speedup_per_round": [round(x, 3) for x in per_round],
        "speedup_min_max": [round(min(per_round), 3), round(max(per_round), 3)],
    }


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float32."""
    reference = reference.float()
    return (value.float() - reference).norm().item() / reference.norm().item()


def _timed_window(run, calls: int) -> dict:
    """Median ms of ``calls`` calls of ``run``, with the median SM clock and board power meanwhile."""
    with gpu_clocks() as clocks:
        ms = _median_ms(run, 0, calls)
    return {"ms": round(ms, 3), **{k: v for k, v in clocks.items() if k != "samples"}}


def compiled_prefill(
    layers: int,
    lengths: list[int],
    cache_dir: str,
    sdpa: list[str],
    mode: str,
    profile: bool = False,
    rounds: int = 6,
    calls: int = 10,
) -> None:
    """Prefill of the dense and the converted (graph-tuned) model with every decoder layer compiled by
    ``torch.compile`` (regional compilation: one compiled block reused by all layers; Inductor fuses the norms, rotary
    embedding and SiLU-gating that eager mode runs as separate kernels), under each SDPA backend in ``sdpa``.

    Both models are resident and timed in :func:`interleaved_rounds` (``rounds`` rounds, each the median of ``calls``
    calls): the speedup is the ratio of the median round times, with every round's own ratio. Timed as the model is
    called (``"eager"``) and, unless ``mode`` already runs CUDA graphs (``"reduce-overhead"``: Inductor's CUDA-graph
    trees), also as a manual CUDA-graph replay of the compiled model (``"graph"``). Each row also gives the relative
    error of the last-token logits against the dense model run uncompiled (the dense compiled model's own error is
    the noise floor). ``profile``: each model's GPU time per kernel class (:func:`kernel_breakdown`)."""
    labels = ("dense", "2:4 dispatch (tuned cuda_graph)")
    # one random prompt per length, for every model and for the uncompiled reference
    prompts = {
        length: torch.randint(
            0, 32000, (1, length), device="cuda", generator=torch.Generator("cuda").manual_seed(length)
        )
        for length in lengths
    }
    models, reference = {}, {}
    for label in labels:
        model = build_7b(torch.bfloat16, layers)
        if label == "dense":
            with torch.no_grad():
                for length, ids in prompts.items():
                    reference[length] = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits.float()
        else:
            to_sparse_kernels(model, tune_for="cuda_graph", cache_dir=cache_dir)
        for layer in model.model.layers:
            layer.compile(mode=mode)
        models[label] = model
    mark_step = mode == "reduce-overhead"
    for backend in sdpa:
        for length, ids in prompts.items():
            start = time.perf_counter()
            rows = {}
            try:
                with _sdpa_context(backend), torch.no_grad():
                    measurements = {}
                    for label, model in models.items():
                        run = prefill_call(model, length, mark_step, ids=ids)
                        for _ in range(4):  # compilation, graph recording and warm-up
                            logits = run().logits.float()
                        rows[label] = {
                            "level": "model",
                            "what": "prefill",
                            "tokens": length,
                            "model": f"{label}, compiled",
                            "sdpa": backend,
                            "logits_rel_err_vs_dense_uncompiled": round(relative_error(logits, reference[length]), 5),
                        }
                        measurements[(label, "eager")] = functools.partial(_timed_window, run, calls)
                        if not mark_step:
                            measurements[(label, "graph")] = functools.partial(
                                _timed_window, _manual_graph(run), calls
                            )
                    timed = interleaved_rounds(measurements, rounds)
                    for (label, timing), windows in timed.items():
                        row = rows[label]
                        row[f"{timing}_ms"] = round(statistics.median(w["ms"] for w in windows), 3)
                        row[f"{timing}_rounds"] = windows
                        if label != "dense":
                            speedup = paired_speedup(
                                [w["ms"] for w in timed[("dense", timing)]], [w["ms"] for w in windows]
                            )
                            row.update({f"{timing}_{k}": v for k, v in speedup.items()})
                    if profile:
                        for label, model in models.items():
                            rows[label]["kernels"] = kernel_breakdown(prefill_call(model, length, mark_step, ids=ids))
            except Exception as exc:  # noqa: BLE001 - report why this configuration did not run
                rows = {
                    "error": {
                        "level": "model",
                        "what": "prefill",
                        "tokens": length,
                        "sdpa": backend,
                        "error": str(exc)[:300],
                    }
                }
            for row in rows.values():
                row["seconds_incl_compile"] = round(time.perf_counter() - start)
                emit(row)
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=("all", "gemm", "model", "decode", "decode-graphs", "compiled"), default="all"
    )
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
    parser.add_argument(
        "--rounds", type=int, default=6, help="compiled and decode parts: interleaved rounds of dense and 2:4 timings"
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
    counts = {  # flag: (values, smallest allowed); decode timing needs at least one step after the prefill
        "--rounds": ([args.rounds], 1),
        "--layers": ([args.layers], 1),
        "--prefill": (args.prefill, 1),
        "--batches": (args.batches, 1),
        "--new-tokens": ([args.new_tokens], 2),
    }
    for flag, (values, smallest) in counts.items():
        if min(values) < smallest:
            parser.error(f"{flag} must be >= {smallest}, got {min(values)}")
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
            compiled_prefill(
                args.layers, args.prefill, args.cache_dir, args.sdpa, args.compile_mode, args.profile, args.rounds
            )
        if args.part == "decode":
            model = build_7b(torch.bfloat16, args.layers)
            for row in decode_ab(model, args.batches, args.new_tokens, args.cache_dir, args.rounds):
                emit(row)
        if args.part == "decode-graphs":
            for row in decode_graphs(args.layers, args.batches, args.new_tokens, args.cache_dir, args.rounds):
                emit(row)
    finally:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**info, "results": RESULTS}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
