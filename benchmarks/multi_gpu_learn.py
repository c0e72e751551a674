"""`proxsparse learn` on one GPU vs two (torchrun FSDP2, accelerate DDP, accelerate FSDP2 + bf16, device_map split).

Every run is the unchanged CLI under its launcher, with the same global batch and data order, so a multi-GPU run should
learn the mask of its single-GPU reference. For each run this records the launch command, wall time, tokens/s, peak
memory per GPU (``run_info.json``), the fraction of 2:4 groups whose mask equals the reference's, and WikiText-2 / C4
perplexity of the written output folder (``proxsparse eval``). Runs can be spread over several invocations; results
are merged into ``--out``::

    python benchmarks/multi_gpu_learn.py --model SmolLM2.gguf --dataset c4.jsonl --work /tmp/mg --out res.json \\
        --runs 1gpu fsdp2-torchrun ddp-accelerate
    python benchmarks/multi_gpu_learn.py ... --runs 1gpu-bf16 fsdp2-accelerate-bf16 device-map

Needs 2 CUDA GPUs (``1gpu`` / ``1gpu-bf16`` use the first one only, ``1gpu-repeat`` the second: run it next to
``1gpu`` — two invocations with separate ``--out`` files — then ``--runs 1gpu-repeat --compare-only`` to measure the
run-to-run difference of the reference itself). Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CLI = ["-m", "proxsparse_hf.cli", "learn"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# name -> (launcher prefix, extra CLI flags, processes, visible GPUs, reference run)
RUNS: dict[str, tuple[list[str], list[str], int, str, str | None]] = {
    "1gpu": ([sys.executable], [], 1, "0", None),
    "1gpu-repeat": ([sys.executable], [], 1, "1", "1gpu"),  # run-to-run noise of the reference itself
    "fsdp2-torchrun": ([*TORCHRUN, "--nproc_per_node", "2"], ["--fsdp"], 2, "0,1", "1gpu"),
    "ddp-accelerate": ([*ACCELERATE, "--multi_gpu", "--num_processes", "2"], [], 2, "0,1", "1gpu"),
    "device-map": ([sys.executable], ["--device-map", "balanced"], 1, "0,1", "1gpu"),
    "1gpu-bf16": ([sys.executable], ["--bf16"], 1, "0", None),
    "fsdp2-accelerate-bf16": (
        [*ACCELERATE, "--config_file", os.path.join(REPO, "examples", "accelerate_fsdp2.yaml")],
        [],
        2,
        "0,1",
        "1gpu-bf16",
    ),
}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def _subprocess_env(gpus: str) -> dict[str, str]:
    """This environment, with only ``gpus`` visible and the repository importable."""
    return {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": gpus,
        "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    }


def learn(name: str, args) -> dict:
    launcher, flags, processes, gpus, _ref = RUNS[name]
    out = os.path.join(args.work, name)
    per_process = args.global_batch // processes
    command = [
        *launcher,
        *CLI,
        args.model,
        "--dataset",
        args.dataset,
        "--doc-stop",
        str(args.doc_stop),
        "--seq-len",
        str(args.seq_len),
        "--n-samples",
        str(args.n_samples),
        "--batch-size",
        str(per_process),
        "--logging-steps",
        "25",
        "--seed",
        "0",
        "--output-dir",
        out,
        "--overwrite",
        *flags,
    ]
    env = _subprocess_env(gpus)
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    record = {
        "run": name,
        "command": " ".join(["python" if c == sys.executable else c for c in command]).replace(REPO + "/", ""),
        "processes": processes,
        "visible_gpus": gpus,
        "rc": proc.returncode,
        "launch_wall_s": round(time.perf_counter() - start, 1),
    }
    if proc.returncode != 0:
        record["stderr_tail"] = proc.stderr[-3000:]
        return record
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    with open(os.path.join(out, "run_info.json")) as fh:
        run_info = json.load(fh)
    record.update(
        steps=summary["steps"],
        tokens=summary["tokens"],
        train_wall_s=round(summary["wall_time_s"], 2),
        tokens_per_s=round(summary["tokens"] / summary["wall_time_s"], 1),
        prox_seconds=summary["prox_seconds"],
        layers_2to4=f"{summary['layers_2to4']}/{summary['target_layers']}",
        final_loss=summary["final_loss"],
        peak_gpu_memory_gib=run_info.get("peak_gpu_memory_gib"),
        device_map=run_info.get("device_map"),
        world_size=run_info["training"].get("world_size"),
    )
    return record


def evaluate(name: str, args) -> dict:
    out = os.path.join(args.work, name)
    command = [
        sys.executable,
        "-m",
        "proxsparse_hf.cli",
        "eval",
        out,
        "--device",
        args.eval_device,
        "--dtype",
        "float32",
    ]
    command += ["--datasets", "wikitext2", "c4", "--eval-seq-len", str(args.eval_seq_len), "--no-progress"]
    proc = subprocess.run(command, env=_subprocess_env("0"), capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"eval_rc": proc.returncode, "eval_stderr_tail": proc.stderr[-2000:]}
    with open(os.path.join(out, "eval_results.json")) as fh:
        results = json.load(fh)
    return {"perplexity": {k: round(v["ppl"], 3) for k, v in results.get("perplexity", {}).items()}}


def compare_masks(name: str, reference: str, work: str) -> dict:
    import torch

    from proxsparse_hf import load_masks
    from proxsparse_hf.constants import MASKS_NAME

    mine = load_masks(os.path.join(work, name, MASKS_NAME))
    ref = load_masks(os.path.join(work, reference, MASKS_NAME))
    if set(mine) != set(ref):
        return {"reference": reference, "error": "different target sets"}
    groups = same = 0
    for key, mask in mine.items():
        equal = torch.eq(mask, ref[key]).reshape(-1, 4).all(dim=1)
        groups += equal.numel()
        same += int(equal.sum())
    return {"reference": reference, "groups": groups, "identical_groups": same, "identical_fraction": same / groups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True, help="calibration .jsonl (C4 validation)")
    parser.add_argument("--doc-stop", type=int, default=1000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--n-samples", type=int, default=400)
    parser.add_argument("--global-batch", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--work", required=True, help="where output folders go (kept between invocations)")
    parser.add_argument("--out", required=True, help="results JSON (merged with what is already there)")
    parser.add_argument("--timeout", type=int, default=420)
    parser.add_argument("--eval-device", default="cuda")
    parser.add_argument(
        "--compare-only", action="store_true", help="only (re)compare the masks of --runs with their references"
    )
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    args = parser.parse_args(argv)

    import torch

    results = {"benchmark": "benchmarks/multi_gpu_learn.py", "runs": {}}
    if os.path.exists(args.out):
        with open(args.out) as fh:
            results = json.load(fh)
    gpus = torch.cuda.device_count()
    results["hardware"] = f"{gpus}x {torch.cuda.get_device_name(0) if gpus else 'CPU'}, torch {torch.__version__}"
    results["settings"] = {
        "model": os.path.basename(args.model),
        "calibration": f"{args.n_samples} x {args.seq_len} tokens of {os.path.basename(args.dataset)} (docs < {args.doc_stop})",
        "global_batch": args.global_batch,
        "recipe": "recommended (defaults of proxsparse learn)",
    }
    for name in args.runs:
        if args.compare_only:
            record = results["runs"].get(name, {"run": name})
            reference = RUNS[name][4]
            if reference is not None:
                record["masks_vs_reference"] = compare_masks(name, reference, args.work)
            results["runs"][name] = record
            emit(record)
            with open(args.out, "w") as fh:
                json.dump(results, fh, indent=1)
            continue
        record = learn(name, args)
        if record["rc"] == 0:
            record.update(evaluate(name, args))
            reference = RUNS[name][4]
            if reference is not None and os.path.isdir(os.path.join(args.work, reference)):
                record["masks_vs_reference"] = compare_masks(name, reference, args.work)
        results["runs"][name] = record
        emit(record)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
