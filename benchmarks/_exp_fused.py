"""Experiment (not committed): 7B compiled prefill, dense vs 2:4 vs 2:4 with gate/up fused vs also q/k/v fused.

All models resident, interleaved rounds."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference_2to4 import build_7b, gpu_clocks, kernel_breakdown, prefill_call  # noqa: E402

from proxsparse_hf.inference import _CusparseltKernel, to_sparse_kernels  # noqa: E402

ALG = {0: 17}


class FusedMLP(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        w = torch.cat([mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()])
        self.inter = mlp.gate_proj.weight.shape[0]
        self.kernel = _CusparseltKernel(w, ALG)
        self.act_fn = mlp.act_fn
        self.down_proj = mlp.down_proj

    def forward(self, x):
        gu = self.kernel.mm(x.reshape(-1, x.shape[-1]), None)
        gate, up = gu.split(self.inter, dim=-1)
        h = (self.act_fn(gate) * up).view(*x.shape[:-1], self.inter)
        return self.down_proj(h)


class Holder(nn.Module):
    pass


class QProj(nn.Module):
    def __init__(self, attn, holder):
        super().__init__()
        w = torch.cat([attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach()])
        self.sizes = [attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0], attn.v_proj.weight.shape[0]]
        self.kernel = _CusparseltKernel(w, ALG)
        self.holder = holder

    def forward(self, x):
        out = self.kernel.mm(x.reshape(-1, x.shape[-1]), None).view(*x.shape[:-1], -1)
        q, k, v = out.split(self.sizes, dim=-1)
        self.holder.k = k
        self.holder.v = v
        return q


class Take(nn.Module):
    def __init__(self, holder, attr):
        super().__init__()
        self.holder = holder
        self.attr = attr

    def forward(self, x):
        return getattr(self.holder, self.attr)


def build(kind: str):
    model = build_7b(torch.bfloat16, 32)
    if kind != "dense":
        to_sparse_kernels(model, tune_for="cuda_graph", cache_dir="/tmp/cache")
    if kind in ("gu", "gu_qkv"):
        for layer in model.model.layers:
            layer.mlp = FusedMLP(layer.mlp)
    if kind == "gu_qkv":
        for layer in model.model.layers:
            attn = layer.self_attn
            holder = Holder()
            q = QProj(attn, holder)
            attn.q_proj, attn.k_proj, attn.v_proj = q, Take(holder, "k"), Take(holder, "v")
    for layer in model.model.layers:
        layer.compile(mode="reduce-overhead")
    torch.cuda.empty_cache()
    return model


def timed(run, reps=10):
    samples = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        samples.append(s.elapsed_time(e))
    return statistics.median(samples)


def main():
    kinds = sys.argv[1].split(",")
    lengths = [int(x) for x in sys.argv[2].split(",")]
    rounds = int(sys.argv[3])
    out = sys.argv[4]
    models = {k: build(k) for k in kinds}
    results = {}
    with torch.no_grad():
        ref = None
        for length in lengths:
            runs = {k: prefill_call(m, length, mark_step=True) for k, m in models.items()}
            outs = {}
            for k, run in runs.items():
                for _ in range(4):
                    o = run()
                outs[k] = o.logits.float().clone()
            ref = outs[kinds[0]]
            for k in kinds:
                d = (outs[k] - ref).abs().max().item()
                print(json.dumps({"check": k, "tokens": length, "max_abs_logit_diff_vs_first": d}), flush=True)
            samples = {k: [] for k in kinds}
            for r in range(rounds):
                order = kinds if r % 2 == 0 else kinds[::-1]
                for k in order:
                    with gpu_clocks() as clk:
                        ms = timed(runs[k])
                    samples[k].append((ms, clk.get("sm_clock_mhz"), clk.get("power_w")))
            for k in kinds:
                prof = kernel_breakdown(runs[k])
                med = statistics.median(s[0] for s in samples[k])
                row = {
                    "kind": k,
                    "tokens": length,
                    "median_of_round_medians_ms": round(med, 3),
                    "rounds": [[round(a, 3), b, c] for a, b, c in samples[k]],
                    "gpu_ms": prof["gpu_ms_per_call"],
                    "by_class": prof["ms_per_call_by_class"],
                }
                results[(k, length)] = row
                print(json.dumps(row), flush=True)
            base = results[(kinds[0], length)]["median_of_round_medians_ms"]
            for k in kinds:
                r = results[(k, length)]
                print(
                    json.dumps(
                        {
                            "tokens": length,
                            "kind": k,
                            "speedup": round(base / r["median_of_round_medians_ms"], 3),
                            "per_round": [
                                round(a[0] / b[0], 3)
                                for a, b in zip(results[(kinds[0], length)]["rounds"], r["rounds"])
                            ],
                        }
                    ),
                    flush=True,
                )
    print(
        json.dumps(
            {"dynamo": {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats", "recompiles")}}
        )
    )
    Path(out).write_text(json.dumps([v for v in results.values()], indent=1))


if __name__ == "__main__":
    main()
