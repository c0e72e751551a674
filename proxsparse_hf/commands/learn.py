"""``proxsparse learn``: learn a 2:4 mask with ProxSparse and write the standard output folder."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

logger = logging.getLogger(__name__)


def _str_list(value: str) -> str | list[str]:
    """``"all-linear"`` or a regex stays a string; ``"a,b,c"`` becomes a list of suffixes."""
    return [v.strip() for v in value.split(",") if v.strip()] if "," in value else value


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "learn",
        help="learn a 2:4 mask with ProxSparse",
        description="Learn a 2:4 semi-structured mask with ProxSparse (proximal gradient through a transformers Trainer), "
        "apply it to the original weights, and write the output folder. Multi-GPU: run it under `accelerate launch "
        "[--config_file examples/accelerate_fsdp2.yaml] -m proxsparse_hf.cli learn ...` (DDP, or FSDP from the accelerate "
        "config) or `torchrun --nproc_per_node N -m proxsparse_hf.cli learn ... --fsdp`; leave --device unset there.",
    )
    p.add_argument("model", help="local folder, Hub id, or path to a .gguf file")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside the model folder / repo")
    p.add_argument("--revision", default=None)
    p.add_argument(
        "--dataset", required=True, help="calibration text: local .txt/.jsonl file or folder, or a Hub dataset id"
    )
    p.add_argument("--dataset-config", default=None, help="Hub dataset configuration name")
    p.add_argument("--split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--doc-start", type=int, default=0, help="first document used (default 0)")
    p.add_argument("--doc-stop", type=int, default=None, help="end of the document range (exclusive)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--n-samples", type=int, default=400, help="calibration windows (one pass = one epoch)")
    p.add_argument(
        "--config", default=None, help="start from a saved ProxSparseConfig (folder or Hub id); flags override"
    )
    p.add_argument(
        "--recipe",
        default="recommended",
        choices=["recommended", "published"],
        help="starting point of the config and learning rate (ignored for fields --config sets): 'recommended' "
        "(activation importance, per-layer lambda, lambda1 0.03, lr 3e-3) or 'published' (the paper's setting)",
    )
    p.add_argument("--lambda1", type=float, default=None)
    p.add_argument("--lambda2", type=float, default=None)
    p.add_argument("--epsilon", type=float, default=None)
    p.add_argument("--lambda-schedule", default=None, choices=["constant", "lr_scaled", "ramp"])
    p.add_argument("--lambda-scaling", default=None, choices=["none", "weight_scale"])
    p.add_argument("--importance", default=None, choices=["magnitude", "activation"])
    p.add_argument("--target-modules", type=_str_list, default=None, help="'all-linear', 'q_proj,v_proj', or a regex")
    p.add_argument("--exclude-modules", type=_str_list, default=None)
    p.add_argument("--solver-backend", default=None, choices=["auto", "torch", "triton"])
    p.add_argument(
        "--distill-alpha", type=float, default=0.0, help="weight of distillation from the dense model (0-1)"
    )
    p.add_argument("--distill-temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's, 3e-3 or 1e-4)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments.bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: what the Trainer picks)")
    p.add_argument(
        "--device-map",
        default=None,
        help="split the model across the GPUs of one process (model parallel): auto, balanced, balanced_low_0, "
        "sequential, or a JSON {module: device} object; not with --device, --fsdp or a multi-process launch",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the model with FSDP (TrainingArguments.fsdp; needs a multi-GPU launch: torchrun / accelerate launch)",
    )
    p.add_argument(
        "--fsdp-config",
        default=None,
        help='FSDP settings for --fsdp: a JSON file or inline JSON (default {"version": 2}, i.e. FSDP2)',
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-to", default="none", help="comma-separated Trainer integrations, e.g. tensorboard")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return p


def build_config(args: argparse.Namespace):
    """The ProxSparseConfig of a ``learn`` invocation (``--config`` first, flags override)."""
    from proxsparse_hf.config import ProxSparseConfig

    overrides = {
        "lambda1": args.lambda1,
        "lambda2": args.lambda2,
        "epsilon": args.epsilon,
        "lambda_schedule": args.lambda_schedule,
        "lambda_scaling": args.lambda_scaling,
        "importance": args.importance,
        "target_modules": args.target_modules,
        "exclude_modules": args.exclude_modules,
        "solver_backend": args.solver_backend,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.config:
        return ProxSparseConfig.from_pretrained(args.config, **overrides)
    return ProxSparseConfig.from_recipe(args.recipe, **overrides)


def run(args: argparse.Namespace) -> int:
    # validate everything cheap before loading anything
    config = build_config(args)
    out = os.path.abspath(args.output_dir)
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise FileExistsError(f"`--output-dir` {out!r} exists and is not empty; pass --overwrite to replace it.")
    for name in ("seq_len", "n_samples", "batch_size", "grad_accum", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}`={getattr(args, name)} must be >= 1.")
    if args.lr is not None and args.lr <= 0:
        raise ValueError(f"`--lr`={args.lr} must be > 0.")
    fsdp_config = _fsdp_config(args)
    device_map = _device_map(args)

    from proxsparse_hf.artefacts.output_dir import save_pruned_output
    from proxsparse_hf.data import load_calibration_data
    from proxsparse_hf.learning.trainer import learn_mask
    from proxsparse_hf.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        args.model,
        gguf_file=args.gguf_file,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        device_map=device_map,
    )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise ValueError(f"`--seq-len`={args.seq_len} exceeds the model's max_position_embeddings={max_pos}.")
    data = load_calibration_data(
        args.dataset,
        tokenizer,
        seq_len=args.seq_len,
        n_samples=args.n_samples,
        seed=args.seed,
        split=args.split,
        text_field=args.text_field,
        name=args.dataset_config,
        start=args.doc_start,
        stop=args.doc_stop,
    )
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = args.model if args.gguf_file is None else f"{args.model}/{args.gguf_file}"
    report_to = [] if args.report_to in ("none", "") else [r.strip() for r in args.report_to.split(",")]
    result = learn_mask(
        model,
        data,
        config,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        logging_steps=args.logging_steps,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        report_to=report_to,
        distill_alpha=args.distill_alpha,
        distill_temperature=args.distill_temperature,
        use_cpu=args.device == "cpu",
        fsdp=bool(args.fsdp),
        fsdp_config=fsdp_config,
    )
    from proxsparse_hf.learning.distributed import rank

    if rank() != 0:  # multi-process launch: the main process writes the output folder
        return 0
    run_info = {
        "calibration": {
            "dataset": os.fspath(args.dataset),
            "split": args.split,
            "documents": [args.doc_start, args.doc_stop],
            "seq_len": args.seq_len,
            "n_samples": args.n_samples,
            "tokens": data.num_tokens,
        },
        "training": {**result.training_args, "steps": result.steps, "tokens": result.tokens},
        "wall_time_s": result.wall_time_s,
        "prox_seconds": result.prox_seconds,
        "peak_gpu_memory_gib": result.peak_gpu_memory_gib,
        **({"device_map": _placement(model)} if device_map is not None else {}),
        "command": "proxsparse " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    save_pruned_output(
        out,
        model if result.pruned_model is None else result.pruned_model,
        tokenizer,
        config=result.config,
        masks=result.masks,
        method="proxsparse",
        run_info=run_info,
        training_log=result.log_history,
        overwrite=args.overwrite,
    )
    try:
        from proxsparse_hf.evaluation.telemetry import plot_telemetry

        plot_telemetry(result.log_history, os.path.join(out, "training_telemetry.png"), title="ProxSparse telemetry")
    except (RuntimeError, ValueError) as exc:  # matplotlib missing, or too few steps to log
        logger.warning("No telemetry plot: %s", exc)
    summary = {
        "output_dir": out,
        "steps": result.steps,
        "tokens": result.tokens,
        "wall_time_s": round(result.wall_time_s, 1),
        "prox_seconds": round(result.prox_seconds, 1),
        "target_layers": len(result.report.layers),
        "layers_2to4": result.report.num_2to4_layers,
        "target_sparsity": round(result.report.target_sparsity, 4),
        "overall_sparsity": round(result.report.overall_sparsity, 4),
        "peak_gpu_memory_gib": result.peak_gpu_memory_gib,
        "final_loss": next((h["loss"] for h in reversed(result.log_history) if "loss" in h), None),
    }
    print(json.dumps(summary))
    return 0


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(args: argparse.Namespace) -> str | dict | None:
    """``--device-map`` as ``from_pretrained`` takes it, checked against the other placement flags."""
    value = args.device_map
    if value is None:
        return None
    for flag, given in (("--device", args.device), ("--fsdp", args.fsdp)):
        if given:
            raise ValueError(
                f"`--device-map`={value!r} cannot be combined with `{flag}`; use one way to place the model."
            )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            f"`--device-map`={value!r} splits the model inside one process; it cannot run under a multi-process "
            f"launch (WORLD_SIZE={os.environ['WORLD_SIZE']}). Use --fsdp there, or launch one process."
        )
    if value.lstrip().startswith("{"):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"`--device-map`={value!r} is not valid JSON: {exc}") from None
        if not isinstance(mapping, dict) or not mapping:
            raise ValueError(f"`--device-map`={value!r} must be a non-empty JSON object {{module: device}}.")
        return mapping
    if value in DEVICE_MAP_STRATEGIES:
        return value
    import torch

    try:
        torch_device = torch.device(value)
    except RuntimeError:
        raise ValueError(
            f"`--device-map`={value!r} is invalid; allowed: {', '.join(DEVICE_MAP_STRATEGIES)}, a device such as "
            "'cuda:0', or a JSON {module: device} object."
        ) from None
    return str(torch_device)


def _placement(model) -> dict[str, list[str]]:
    """The devices a ``device_map`` put the model on: ``{device: [top-level module names]}``."""
    placement: dict[str, list[str]] = {}
    for module, device in (getattr(model, "hf_device_map", None) or {}).items():
        name = f"cuda:{device}" if isinstance(device, int) else str(device)
        placement.setdefault(name, []).append(module)
    if not placement:  # everything landed on one device (transformers then sets no hf_device_map)
        placement = {str(device): [""] for device in {p.device for p in model.parameters()}}
    return placement


def _fsdp_config(args: argparse.Namespace) -> dict | None:
    """``--fsdp-config`` (a JSON file or inline JSON) as a dict; ``{"version": 2}`` for a bare ``--fsdp``."""
    if args.fsdp_config is None:
        return {"version": 2} if args.fsdp else None
    if not args.fsdp:
        raise ValueError("`--fsdp-config` needs `--fsdp`.")
    text = args.fsdp_config
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as fh:
            text = fh.read()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"`--fsdp-config`={args.fsdp_config!r} is neither a JSON file nor inline JSON: {exc}"
        ) from exc
    if not isinstance(value, dict):
        raise ValueError(f"`--fsdp-config`={args.fsdp_config!r} must be a JSON object, got {type(value).__name__}.")
    return value
