"""Figures for a ``benchmarks/quality.py`` result: perplexity per method (bars, log scale) and the ProxSparse telemetry.

    python benchmarks/plot_quality.py benchmarks/results/quality_smollm2_h200.json

writes ``<result>_ppl.png`` and ``<result>_telemetry.png`` beside the JSON. ``--runs a,b`` keeps (and orders) a subset of
the runs; ``--telemetry-runs`` does the same for the telemetry figure (default: the ProxSparse runs among ``--runs``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxsparse_hf.evaluation.telemetry import plot_telemetry  # noqa: E402


def plot_perplexity(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    datasets = result["experiment"]["evaluation"]["datasets"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(runs)), 4))
    width = 0.8 / len(datasets)
    for i, name in enumerate(datasets):
        xs = [j + i * width for j in range(len(runs))]
        ax.bar(xs, [r["perplexity"][name]["ppl"] for r in runs], width=width, label=name)
    ax.set_xticks([j + width * (len(datasets) - 1) / 2 for j in range(len(runs))])
    ax.set_xticklabels([r["name"] for r in runs], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    gpu = result.get("hardware", {}).get("gpu") or "CPU"
    ax.set_title(f"{os.path.basename(str(result['model']))} — 2:4 masks ({gpu})", fontsize=9)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result")
    parser.add_argument("--runs", default=None, help="comma-separated run names to plot, in order (default: all)")
    parser.add_argument("--telemetry-runs", default=None, help="comma-separated runs for the telemetry figure")
    args = parser.parse_args()
    with open(args.result, encoding="utf-8") as fh:
        result = json.load(fh)
    by_name = {r["name"]: r for r in result["runs"]}

    def select(names: str | None) -> list[dict]:
        if names is None:
            return result["runs"]
        missing = [n for n in names.split(",") if n not in by_name]
        if missing:
            raise SystemExit(f"unknown run(s) {missing}; the result has {sorted(by_name)}")
        return [by_name[n] for n in names.split(",")]

    stem = os.path.splitext(args.result)[0]
    print(plot_perplexity({**result, "runs": select(args.runs)}, stem + "_ppl.png"))
    chosen = select(args.telemetry_runs or args.runs)
    runs = {r["name"]: r["telemetry"] for r in chosen if r.get("telemetry")}
    if runs:
        print(plot_telemetry(runs, stem + "_telemetry.png", title="ProxSparse telemetry per run"))


if __name__ == "__main__":
    main()
