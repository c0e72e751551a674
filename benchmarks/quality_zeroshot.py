"""Zero-shot accuracy of the masks from ``benchmarks/quality.py`` (lm-eval on the local task files).

The GPU machine has no lm-eval, so ``quality.py --save-masks DIR`` brings each run's mask adapter back and this script
applies it to the original weights and scores it (CPU is fine for the 135M model). Runs without a saved mask are pruned
here with the experiment's own settings (``magnitude``, ``wanda``, ``sparsegpt`` mask-only); ``dense`` needs nothing.
Prints one JSON line per run and writes a JSON + markdown table::

    python benchmarks/quality_zeroshot.py benchmarks/configs/quality_smollm2.json --masks masks/ \\
        --runs dense,magnitude,wanda,sparsegpt-mask,ps-act-0.03-lr3e-3 --limit 500 \\
        --output benchmarks/results/quality_smollm2_zeroshot.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from quality import _resolve, experiment_calibration  # the same model / data as the perplexity benchmark

from proxsparse_hf import ProxSparseConfig
from proxsparse_hf.artefacts.export import apply_proxsparse
from proxsparse_hf.artefacts.output_dir import describe_hardware, library_versions
from proxsparse_hf.evaluation.zeroshot import zeroshot_eval
from proxsparse_hf.loading import load_model_and_tokenizer
from proxsparse_hf.pruners import prune

TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--runs", required=True, help="comma-separated run names of the experiment")
    parser.add_argument(
        "--masks", default=None, help="folder of <run>/ mask adapters written by quality.py --save-masks"
    )
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--n-samples",
        type=int,
        default=None,
        help="calibration windows for baselines pruned here (default: experiment's)",
    )
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with open(args.experiment, encoding="utf-8") as fh:
        exp = json.load(fh)
    runs = {r["name"]: r for r in exp["runs"]}
    wanted = args.runs.split(",")
    unknown = [name for name in wanted if name not in runs]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}; the experiment has {sorted(runs)}")
    model, tokenizer = load_model_and_tokenizer(_resolve(exp["model"]), dtype="float32", device="cpu")
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = None
    results = []
    if os.path.isfile(args.output):
        with open(args.output, encoding="utf-8") as fh:
            results = [r for r in json.load(fh).get("runs", []) if r["name"] not in wanted]
    for name in wanted:
        run = runs[name]
        model.load_state_dict(dense_state)
        config = ProxSparseConfig(**run.get("config", {}))
        adapter = os.path.join(args.masks, name) if args.masks else None
        start = time.perf_counter()
        if run["method"] == "dense":
            source = "dense"
        elif adapter and os.path.isdir(adapter):
            apply_proxsparse(model, adapter)  # the mask on the original weights (checks shapes and fingerprints)
            source = os.path.basename(adapter)
        elif run["method"] in ("magnitude", "wanda", "sparsegpt"):
            if run["method"] != "magnitude" and calib is None:
                calib = experiment_calibration(exp, tokenizer, args.n_samples)
            prune(model, run["method"], calib, config, **run.get("options", {}))
            source = "pruned here" + (f" ({len(calib)} calibration windows)" if calib is not None else "")
        else:
            raise SystemExit(f"run {name!r}: no mask adapter at {adapter!r}")
        model.eval()
        scores = zeroshot_eval(model, tokenizer, args.tasks.split(","), limit=args.limit, batch_size=args.batch_size)
        record = {
            "name": name,
            "method": run["method"],
            "mask_source": source,
            "zeroshot": scores,
            "mean_acc": sum(s["acc"] for s in scores.values()) / len(scores),
            "wall_time_s": time.perf_counter() - start,
        }
        print(json.dumps({k: record[k] for k in ("name", "mean_acc", "wall_time_s")}), flush=True)
        results = [r for r in results if r["name"] != name] + [record]
        payload = {
            "experiment": args.experiment,
            "model": exp["model"],
            "tasks": args.tasks.split(","),
            "limit": args.limit,
            "hardware": describe_hardware(),
            "versions": library_versions(),
            "runs": results,
        }
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1)
        tasks = args.tasks.split(",")
        lines = ["| run | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
        for r in results:
            accs = [f"{100 * r['zeroshot'][t]['acc']:.1f}" if t in r["zeroshot"] else "-" for t in tasks]
            lines.append(f"| {r['name']} | " + " | ".join(accs) + f" | {100 * r['mean_acc']:.1f} |")
        with open(os.path.splitext(args.output)[0] + ".md", "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
