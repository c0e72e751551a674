"""Figures for a ``benchmarks/quality.py`` result (or any comparison file): perplexity per run and the training telemetry.

    python benchmarks/plot_quality.py benchmarks/results/quality_smollm2_h200.json

writes ``<result>_ppl.png`` and ``<result>_telemetry.png`` beside the JSON with the library's charts
(:mod:`proxsparse_hf.evaluation.plot`). ``--runs a,b`` keeps (and orders) a subset of the runs; ``--telemetry-runs``
does the same for the telemetry figure (default: the runs among ``--runs`` that have telemetry).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxsparse_hf.evaluation import load_comparison  # noqa: E402
from proxsparse_hf.evaluation.plot import plot_perplexity, plot_telemetry  # noqa: E402


def select(results: list, names: str | None) -> list:
    """The results named in ``names`` (comma-separated labels), in that order; all of them for None."""
    if names is None:
        return list(results)
    by_label = {r.label: r for r in results}
    missing = [n for n in names.split(",") if n not in by_label]
    if missing:
        raise SystemExit(f"unknown run(s) {missing}; the result has {sorted(by_label)}")
    return [by_label[n] for n in names.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result")
    parser.add_argument("--runs", default=None, help="comma-separated run names to plot, in order (default: all)")
    parser.add_argument("--telemetry-runs", default=None, help="comma-separated runs for the telemetry figure")
    args = parser.parse_args(argv)
    results = load_comparison(args.result)
    stem = os.path.splitext(args.result)[0]
    chosen = select(results, args.runs)
    gpu = next((r.hardware.get("gpu") for r in chosen if r.hardware), None) or "CPU"
    title = f"{chosen[0].model} — 2:4 masks ({gpu})" if chosen else None
    labels = [r.label for r in chosen]
    print(plot_perplexity(chosen, stem + "_ppl.png", labels=labels, log_scale=True, title=title))
    with_telemetry = [r for r in select(results, args.telemetry_runs or args.runs) if r.telemetry]
    if with_telemetry:
        print(plot_telemetry(with_telemetry, stem + "_telemetry.png", title="ProxSparse telemetry per run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
