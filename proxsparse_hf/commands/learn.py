"""``proxsparse learn``: learn a 2:4 mask with ProxSparse and write the standard output folder."""

from __future__ import annotations

import argparse
import json
import logging
import os

logger = logging.getLogger(__name__)


def _recipe_text(name: str) -> str:
    from proxsparse_hf.config import RECIPES

    recipe = RECIPES[name]
    fields = ", ".join(f"{k}={v}" for k, v in recipe["config"].items())
    unit = "relative" if recipe["config"].get("step_scaling") == "weight_rms" else "absolute"
    return f"'{name}' ({fields}; learning rate {recipe['learning_rate']:g}, {unit})"


def _default_lr_text() -> str:
    from proxsparse_hf.config import RECIPES

    by_scaling = {r["config"].get("step_scaling", "none"): r["learning_rate"] for r in RECIPES.values()}
    return ", ".join(f"{lr:g} with --step-scaling {scaling}" for scaling, lr in by_scaling.items())


def _config_help(name: str, extra: str = "") -> str:
    """The help of a ``ProxSparseConfig`` field (its ``metadata["help"]``), for the flag that overrides it."""
    from proxsparse_hf.config import ProxSparseConfig

    text = ProxSparseConfig.__dataclass_fields__[name].metadata.get("help", "")
    return f"{text} {extra}".strip() + " Default: the recipe's (or --config's)."


def register(subparsers) -> argparse.ArgumentParser:
    from proxsparse_hf.config import LAMBDA_SCALINGS, LAMBDA_SCHEDULES, RECIPES, SOLVER_BACKENDS, STEP_SCALINGS
    from proxsparse_hf.learning.importance import importance_names

    from .common import (
        add_bos_args,
        add_calibration_args,
        add_model_args,
        add_output_args,
        add_permutation_args,
        add_target_args,
    )

    p = subparsers.add_parser(
        "learn",
        help="Learn a 2:4 mask with ProxSparse",
        description="Learn a 2:4 semi-structured mask with ProxSparse (proximal gradient through a transformers Trainer), "
        "apply it to the original weights, and write the output folder; prints a JSON summary line. Everything that "
        "needs no weights (paths, output folder, data and its token count, target match, numeric flags) is checked "
        "before the model is loaded. Multi-GPU: run it under `accelerate launch "
        "[--config_file examples/accelerate_fsdp2.yaml] -m proxsparse_hf.cli learn ...` (DDP, or FSDP from the accelerate "
        "config) or `torchrun --nproc_per_node N -m proxsparse_hf.cli learn ... --fsdp`; leave --device unset there.",
    )
    p.add_argument("model", help="Local folder, Hub id, or path to a .gguf file")
    add_output_args(p, required=True, help="Output folder (pruned model, masks, config, report, run_info.json).")

    placement = add_model_args(p)
    placement.add_argument(
        "--device-map",
        default=None,
        help="Split the model across the GPUs of one process (model parallel): auto, balanced, balanced_low_0, "
        "sequential, or a JSON {module: device} object; not with --device, --fsdp or a multi-process launch",
    )
    placement.add_argument(
        "--fsdp",
        action="store_true",
        help="Shard the model with FSDP (TrainingArguments.fsdp; needs a multi-GPU launch: torchrun / accelerate launch)",
    )
    placement.add_argument(
        "--fsdp-config",
        default=None,
        help='FSDP settings for --fsdp: a JSON file or inline JSON (default {"version": 2}, i.e. FSDP2)',
    )

    calibration = add_calibration_args(
        p, required=True, n_samples=400, seq_len=1024, title="calibration data (one pass = one epoch)"
    )
    add_bos_args(calibration, windows="calibration")

    recipe = p.add_argument_group("ProxSparse config (flags override --config / --recipe)")
    recipe.add_argument(
        "--config", default=None, help="Start from a saved ProxSparseConfig (folder or Hub id) instead of a recipe"
    )
    recipe.add_argument(
        "--recipe",
        default="recommended",
        choices=list(RECIPES),
        help="Starting point of the config and the learning rate (not used with --config): "
        + "; ".join(_recipe_text(name) for name in RECIPES)
        + ". Default recommended; 'published' is the paper's setting.",
    )
    recipe.add_argument("--lambda1", type=float, default=None, help=_config_help("lambda1"))
    recipe.add_argument("--lambda2", type=float, default=None, help=_config_help("lambda2"))
    recipe.add_argument("--epsilon", type=float, default=None, help=_config_help("epsilon"))
    recipe.add_argument(
        "--lambda-schedule", default=None, choices=list(LAMBDA_SCHEDULES), help=_config_help("lambda_schedule")
    )
    recipe.add_argument(
        "--lambda-scaling", default=None, choices=list(LAMBDA_SCALINGS), help=_config_help("lambda_scaling")
    )
    recipe.add_argument(
        "--importance", default=None, choices=list(importance_names()), help=_config_help("importance")
    )
    recipe.add_argument(
        "--step-scaling",
        default=None,
        choices=list(STEP_SCALINGS),
        help="Per-layer scaling of the optimizer step: with weight_rms the learning rate (--lr) is relative to each "
        "layer's RMS(W0) (a step of about lr x RMS per unit Adam step, so one --lr means the same on any model); with "
        "none it is absolute (the paper's). Default: the recipe's (or --config's).",
    )
    recipe.add_argument(
        "--solver-backend", default=None, choices=list(SOLVER_BACKENDS), help=_config_help("solver_backend")
    )
    add_target_args(p, default_help="Default: the recipe's (or --config's), i.e. all-linear.")
    add_permutation_args(p, default="auto")

    train = p.add_argument_group("training")
    train.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"Learning rate; default: the recipe learning rate of the run's step scaling ({_default_lr_text()}). "
        "Relative to each layer's RMS(W0) with --step-scaling weight_rms, absolute with none.",
    )
    train.add_argument("--epochs", type=float, default=1.0, help="Passes over the calibration windows (default 1)")
    train.add_argument(
        "--max-steps", type=int, default=-1, help="Stop after this many optimizer steps (default -1: use --epochs)"
    )
    train.add_argument("--batch-size", type=int, default=2, help="Windows per device per step (default 2)")
    train.add_argument("--grad-accum", type=int, default=1, help="Gradient accumulation steps (default 1)")
    train.add_argument(
        "--warmup-ratio", type=float, default=0.1, help="Fraction of the steps spent warming up the lr (default 0.1)"
    )
    train.add_argument(
        "--logging-steps", type=int, default=10, help="Log loss and telemetry every N steps (default 10)"
    )
    train.add_argument(
        "--distill-alpha", type=float, default=0.0, help="Weight of distillation from the dense model (0-1, default 0)"
    )
    train.add_argument(
        "--distill-temperature", type=float, default=1.0, help="Softmax temperature of the distillation (default 1)"
    )
    train.add_argument("--bf16", action="store_true", help="Bf16 autocast (TrainingArguments.bf16)")
    train.add_argument(
        "--gradient-checkpointing", action="store_true", help="Recompute activations in the backward (less memory)"
    )
    train.add_argument("--seed", type=int, default=0, help="Seed of the data shuffle and the training (default 0)")
    train.add_argument(
        "--report-to", default="none", help="Comma-separated Trainer integrations, e.g. tensorboard (default none)"
    )
    return p


def build_config(args: argparse.Namespace):
    """The ProxSparseConfig of a ``learn`` invocation (``--config`` first, flags override)."""
    from proxsparse_hf.config import ProxSparseConfig

    from .common import parse_target_modules

    overrides = {
        "lambda1": args.lambda1,
        "lambda2": args.lambda2,
        "epsilon": args.epsilon,
        "lambda_schedule": args.lambda_schedule,
        "lambda_scaling": args.lambda_scaling,
        "importance": args.importance,
        "step_scaling": getattr(args, "step_scaling", None),
        "target_modules": parse_target_modules(args.target_modules),
        "exclude_modules": parse_target_modules(args.exclude_modules, "--exclude-modules"),
        "solver_backend": args.solver_backend,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.config:
        return ProxSparseConfig.from_pretrained(args.config, **overrides)
    return ProxSparseConfig.from_recipe(args.recipe, **overrides)


def _final_loss(log_history: list[dict]) -> float | None:
    """The last logged training loss; the run's mean training loss when no step was logged (fewer steps than
    ``--logging-steps``)."""
    for key in ("loss", "train_loss"):
        value = next((h[key] for h in reversed(log_history) if key in h), None)
        if value is not None:
            return value
    return None


def run(args: argparse.Namespace) -> int:
    from proxsparse_hf import loading

    from .common import (
        check_numbers,
        check_output_dir,
        check_seq_len,
        command_line,
        inspect_model,
        load_calibration,
        permutation_importance,
        permute_loaded_model,
        resolve_calibration,
        resolve_permutation,
    )

    # every check that needs no weights, before anything is loaded or written
    check_numbers(
        args,
        {
            "seq_len": ">=1",
            "n_samples": ">=1",
            "batch_size": ">=1",
            "grad_accum": ">=1",
            "logging_steps": ">=1",
            "lr": ">0",
            "epochs": ">0",
            "warmup_ratio": "[0,1)",
            "distill_alpha": "[0,1]",
            "distill_temperature": ">0",
        },
    )
    if args.max_steps == 0 or args.max_steps < -1:
        raise ValueError(f"`--max-steps`={args.max_steps} is invalid; allowed: -1 (use --epochs) or an integer >= 1.")
    config = build_config(args)
    permute = permutation_importance(args, "proxsparse", config)
    out = check_output_dir(args.output_dir, overwrite=args.overwrite)
    fsdp_config = _fsdp_config(args)
    device_map = _device_map(args)
    documents = resolve_calibration(args)
    model_config = inspect_model(args, config)
    permute = resolve_permutation(args, permute, model_config)
    check_seq_len(model_config, args.seq_len)
    source = {"gguf_file": args.gguf_file, "revision": args.revision}
    tokenizer = loading.load_tokenizer(args.model, **source)
    data, calibration = load_calibration(args, documents, tokenizer)

    from proxsparse_hf.artefacts import save_pruned_output
    from proxsparse_hf.learning.trainer import learn_mask

    model = loading.load_model(
        args.model, config=model_config, dtype=args.dtype, device=args.device, device_map=device_map, **source
    )
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = args.model if args.gguf_file is None else f"{args.model}/{args.gguf_file}"
    # before learning: the learner's snapshot W0 is the permuted dense model
    permutation = permute_loaded_model(args, model, config, permute, data)
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
        "calibration": calibration,
        "training": {**result.training_args, "steps": result.steps, "tokens": result.tokens},
        "wall_time_s": result.wall_time_s,
        "prox_seconds": result.prox_seconds,
        "permutation": None if permutation is None else permutation.summary(),
        "peak_gpu_memory_gib": result.peak_gpu_memory_gib,
        **({"device_map": _placement(model)} if device_map is not None else {}),
        "command": command_line(args),
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
        permutation=None if permutation is None else permutation.index_maps,
    )
    try:
        from proxsparse_hf.evaluation.plot import plot_telemetry

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
        "permuted_layers": len(permutation.layers) if permutation else 0,
        "peak_gpu_memory_gib": result.peak_gpu_memory_gib,
        "final_loss": _final_loss(result.log_history),
    }
    print(json.dumps(summary), flush=True)
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
