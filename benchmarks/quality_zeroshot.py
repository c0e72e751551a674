"""Zero-shot accuracy of the masks from ``benchmarks/quality.py`` (lm-eval on the local task files).

The GPU machine has no lm-eval, so ``quality.py --save-masks DIR`` brings each run's mask adapter back and this script
applies it to the original weights and scores it (CPU is fine for the 135M model). Runs without a saved mask are pruned
here with the experiment's own settings (one-shot methods; ``dense`` needs nothing). Everything goes through the
library's comparison runner (:func:`proxsparse_hf.evaluation.compare.run_comparison`), so the output is the same
comparison file as ``quality.py`` / ``proxsparse compare`` writes. Prints one JSON line per run and writes a JSON +
markdown table::

    python benchmarks/quality_zeroshot.py benchmarks/configs/quality_smollm2.json --masks masks/ \\
        --runs dense,magnitude,wanda,sparsegpt-mask,ps-act-0.03-lr3e-3 --limit 500 \\
        --output benchmarks/results/quality_smollm2_zeroshot.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality import REPO, _resolve, calibration_spec, experiment_calibration, method_run  # noqa: E402

sys.path.insert(0, REPO)

from proxsparse_hf.evaluation import load_comparison, save_comparison  # noqa: E402
from proxsparse_hf.evaluation.compare import comparison_markdown, needs_calibration, run_comparison  # noqa: E402
from proxsparse_hf.loading import load_model_and_tokenizer  # noqa: E402
from proxsparse_hf.pruners import get_pruner  # noqa: E402
from proxsparse_hf.utils import atomic_write_text  # noqa: E402

TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa")


def plan_runs(exp: dict, wanted: list[str], masks: str | None) -> list:
    """The runs to score: a saved mask adapter under ``masks/<run>/`` when there is one, else the experiment's own
    pruning (one-shot methods only: a learned mask must come from ``quality.py --save-masks``)."""
    from proxsparse_hf.artefacts import apply_proxsparse

    by_name = {r["name"]: r for r in exp["runs"]}
    runs = []
    for name in wanted:
        run = method_run(exp, by_name[name])
        adapter = os.path.join(masks, name) if masks else None
        if adapter and os.path.isdir(adapter):
            run = replace(
                run,
                apply=lambda model, adapter=adapter: apply_proxsparse(model, adapter),
                options={"mask_source": os.path.basename(adapter)},
            )
        elif get_pruner(run.method).learned:
            raise SystemExit(f"run {name!r}: no mask adapter at {adapter!r} (quality.py --save-masks writes it)")
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--runs", required=True, help="comma-separated run names of the experiment")
    parser.add_argument(
        "--masks", default=None, help="folder of <run>/ mask adapters written by quality.py --save-masks"
    )
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-dir", default=None, help="folder of local task files (default: the shared data)")
    parser.add_argument("--model", default=None, help="override the experiment's model (path or Hub id)")
    parser.add_argument(
        "--n-samples",
        type=int,
        default=None,
        help="calibration windows for baselines pruned here (default: experiment's)",
    )
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with open(args.experiment, encoding="utf-8") as fh:
        exp = json.load(fh)
    names = [r["name"] for r in exp["runs"]]
    wanted = args.runs.split(",")
    unknown = [name for name in wanted if name not in names]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; the experiment has {sorted(names)}")
    runs = plan_runs(exp, wanted, args.masks)
    model_path = _resolve(args.model or exp["model"])
    model, tokenizer = load_model_and_tokenizer(model_path, dtype="float32", device="cpu")
    calib = experiment_calibration(exp, tokenizer, args.n_samples) if needs_calibration(runs) else None
    kept = [r for r in load_comparison(args.output) if r.label not in wanted] if os.path.isfile(args.output) else []
    tasks = args.tasks.split(",")
    done = []

    def on_result(result) -> None:
        done.append(result)
        print(json.dumps({"name": result.label, "mean_acc": result.zeroshot_mean}), flush=True)
        rows = [*kept, *done]
        save_comparison(args.output, rows, model=model_path, experiment=args.experiment, tasks=tasks, limit=args.limit)
        atomic_write_text(os.path.splitext(args.output)[0] + ".md", comparison_markdown(rows))

    run_comparison(
        model,
        tokenizer,
        runs,
        model_name=model_path,
        calibration=calib,
        calibration_spec=calibration_spec(exp, args.n_samples),
        eval_options={
            "datasets": [],
            "tasks": tasks,
            "zeroshot_limit": args.limit,
            "zeroshot_batch_size": args.batch_size,
            "zeroshot_data_dir": args.data_dir,
            "show_progress": False,
        },
        on_result=on_result,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
