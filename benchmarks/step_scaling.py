"""Scale-free optimizer steps for mask learning: which way of making the step relative to each layer's scale learns the
same mask on a model and on a function-preserving rescaled copy of it, and at what loss.

Variants (all with the recommended λ settings: ``lambda1=0.03``, ``lambda_scaling="weight_scale"``,
``importance="activation"``; a plain ``transformers.Trainer`` with ``ProxSparseCallback``, linear schedule, 10 % warm-up):

* ``adamw_absolute``: today's behaviour, AdamW with an absolute learning rate (``step_scaling="none"``), the Trainer's
  default gradient clipping (``max_grad_norm=1``).
* ``adamw_relative``: ``step_scaling="weight_rms"`` (the optimizer steps ``W / RMS(W0)`` with gradient
  ``RMS(W0) · ∂L/∂W``: the weights are divided before ``optimizer.step()`` and multiplied back after it), no clipping;
  ``adamw_relative_clip1`` the same with ``max_grad_norm=1``.
* ``adafactor_scaled``: transformers' ``Adafactor(scale_parameter=True, relative_step=False, warmup_init=False)``,
  which scales its step by the RMS of the *current* parameter, ``step_scaling="none"``, no clipping.
* ``adamw_relative_copy``: the alternative implementation of the same relative step through a copy of the target
  weights (gradient × RMS(W0) before the step, ``W ← W_before + RMS(W0) · (W − W_before)`` after it), written here.
  Also run with bfloat16 weights, as ``adamw_relative``, to see the rounding of the divide/multiply round trip.

Two models, both Llama-shaped (hidden 128, 2 layers, ``initializer_range=0.2``):

* ``random_init``: the unit test's setting (``tests/test_invariance.py``): random init, random tokens, 40 steps of 4
  windows of 32 tokens, each variant at its recipe learning rate; the model and its copy with q/k/v/gate/up × 0.1 and the
  norms × 10 (identical logits).
* ``pretrained``: the same shape with a byte vocabulary, pretrained on WikiText-2 text (the first 70 % of
  ``wiki.test.raw``), masks learned on the next 15 %, pruned models evaluated on the last 15 % (cross-entropy per byte);
  each variant over a small learning-rate grid, on the model and on copies rescaled by 0.2, by 5 and by a random factor
  in [0.2, 5] per projection and layer (:func:`proxsparse_hf.learning.rescale.rescale_function_preserving`; o_proj and
  down_proj get the compensating factors).

Reported per run: train loss (last 10 logged steps), eval loss of the pruned model, the fraction of 2:4 groups identical
to the unscaled model's mask (q/k/v/gate/up, and all targets), wall seconds. Dense, magnitude and Wanda eval losses are
the references.

    python benchmarks/step_scaling.py --workers 4 --threads 4           # writes benchmarks/results/step_scaling_cpu.json
    python benchmarks/step_scaling.py --quick --output /tmp/s.json       # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_TEXT = os.path.join(os.path.dirname(REPO), "shared", "assets", "data", "wikitext-2-raw-v1", "wiki.test.raw")
INPUT_SIDE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
RECIPE = {"lambda1": 0.03, "lambda_scaling": "weight_scale", "importance": "activation"}

# name -> (step_scaling, optimizer, max_grad_norm, learning-rate grid of the pretrained model, recipe learning rate)
VARIANTS = {
    "adamw_absolute": ("none", "adamw", 1.0, (1e-3, 3e-3, 1e-2), 3e-3),
    "adamw_relative": ("weight_rms", "adamw", 0.0, (0.003, 0.01, 0.03), 0.01),
    "adamw_relative_clip1": ("weight_rms", "adamw", 1.0, (0.003, 0.01, 0.03), 0.01),
    "adafactor_scaled": ("none", "adafactor", 0.0, (0.003, 0.01, 0.03), 0.01),
    "adamw_relative_copy": ("copy", "adamw", 0.0, (0.01,), 0.01),
}


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return AutoModelForCausalLM.from_config(config)


def random_tokens(n: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def byte_windows(text: str, seq_len: int) -> torch.Tensor:
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = data.numel() // seq_len
    return data[: n * seq_len].view(n, seq_len)


def pretrain(model, windows: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * (1 - s / steps))
    losses = []
    model.train()
    for _ in range(steps):
        ids = windows[torch.randint(0, windows.shape[0], (batch,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


@torch.no_grad()
def eval_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        total += float(model(input_ids=ids, labels=ids).loss.float()) * ids.shape[0]
        count += ids.shape[0]
    return total / count


def agreement(a: dict, b: dict, parts: tuple[str, ...] | None = None) -> float:
    same = total = 0
    for name, mask in a.items():
        if parts is not None and not any(f".{p}." in name for p in parts):
            continue
        x, y = mask.reshape(-1, 4), b[name].reshape(-1, 4)
        same += int((x == y).all(dim=1).sum())
        total += x.shape[0]
    return same / total


def scale_factors(model, kind: str, seed: int):
    """``None`` (no rescaling), a number, or per-projection factors in [0.2, 5] drawn log-uniformly."""
    if kind == "1":
        return None
    if kind != "mix":
        return float(kind)
    rng = random.Random(seed)
    return {
        f"model.layers.{i}.{'self_attn' if p in ('q_proj', 'k_proj', 'v_proj') else 'mlp'}.{p}": math.exp(
            rng.uniform(math.log(0.2), math.log(5.0))
        )
        for i in range(len(model.model.layers))
        for p in INPUT_SIDE
    }


def _copy_callback(config):
    """``ProxSparseCallback`` with the relative step done through a copy of the weights: gradient × RMS(W0) before the
    step, then ``W ← W_before + RMS(W0) · (W − W_before)`` after it (the alternative to the library's divide/multiply)."""
    from proxsparse_hf.learning.callback import ProxSparseCallback
    from proxsparse_hf.learning.distributed import global_rms

    class CopyStep(ProxSparseCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            super().on_train_begin(args, state, control, model=model, **kwargs)
            self.rms = global_rms(self.learner.shards, self.learner.original, False)
            self.before = {}

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            super().on_pre_optimizer_step(args, state, control, **kwargs)
            with torch.no_grad():
                for s in self.learner.shards.values():
                    s.target.weight.grad.mul_(self.rms[s.name])
                    self.before[s.name] = s.target.weight.detach().clone()

        def on_optimizer_step(self, args, state, control, **kwargs):
            with torch.no_grad():
                for s in self.learner.shards.values():
                    s.target.weight.data.lerp_(self.before[s.name], 1.0 - self.rms[s.name])
            super().on_optimizer_step(args, state, control, **kwargs)

    return CopyStep(config)


def learn(job: dict) -> dict:
    """One mask-learning run (a worker process): returns masks, losses and the pruned model's eval loss."""
    from transformers import Trainer, TrainingArguments, default_data_collator, get_linear_schedule_with_warmup
    from transformers.optimization import Adafactor
    from transformers.trainer_callback import PrinterCallback

    from proxsparse_hf import ProxSparseConfig
    from proxsparse_hf.data import TokenWindows
    from proxsparse_hf.learning.callback import ProxSparseCallback
    from proxsparse_hf.learning.rescale import rescale_function_preserving
    from proxsparse_hf.learning.trainer import warmup_arguments

    torch.set_num_threads(job["threads"])
    os.environ["TQDM_DISABLE"] = "1"
    logging.disable(logging.WARNING)
    shared = torch.load(job["shared"], weights_only=False)
    setup = shared[job["setup"]]
    model = tiny_llama(setup["vocab"])
    model.load_state_dict(setup["state_dict"])
    factors = scale_factors(model, job["scale"], seed=1)
    if factors is not None:
        rescale_function_preserving(model, factors)
    if job["dtype"] == "bfloat16":
        model = model.to(torch.bfloat16)
    step_scaling, optimizer_name, max_grad_norm, _, _ = VARIANTS[job["variant"]]
    config = ProxSparseConfig(**RECIPE, step_scaling="none" if step_scaling == "copy" else step_scaling)
    callback = _copy_callback(config) if step_scaling == "copy" else ProxSparseCallback(config)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            learning_rate=job["lr"],
            max_steps=job["steps"],
            per_device_train_batch_size=job["batch"],
            **warmup_arguments(0.1),
            weight_decay=0.0,
            max_grad_norm=max_grad_norm,
            lr_scheduler_type="linear",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            data_seed=0,
            use_cpu=True,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        optimizers = (None, None)
        if optimizer_name == "adafactor":
            callback._prepare_model(model)  # freeze non-targets before the optimizer is built (as on_init_end does)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = Adafactor(params, lr=job["lr"], scale_parameter=True, relative_step=False, warmup_init=False)
            optimizers = (opt, get_linear_schedule_with_warmup(opt, math.ceil(0.1 * job["steps"]), job["steps"]))
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=TokenWindows(setup["calibration"]),
            data_collator=default_data_collator,
            callbacks=[callback],
            optimizers=optimizers,
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        **{k: job[k] for k in ("setup", "variant", "lr", "scale", "dtype")},
        "train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "eval_loss": eval_loss(model.float(), setup["eval"]) if setup["eval"] is not None else None,
        "all_2to4": callback.report.all_2to4,
        "seconds": round(seconds, 2),
        "masks": callback.masks,
    }


def reference_losses(setup: dict) -> dict:
    from proxsparse_hf.pruners import prune

    out = {}
    for method in ("dense", "magnitude", "wanda"):
        model = tiny_llama(setup["vocab"])
        model.load_state_dict(setup["state_dict"])
        if method != "dense":
            prune(model, method, setup["calibration"][:16], batch_size=4)
        out[method] = eval_loss(model, setup["eval"])
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per setup, variant, learning rate and dtype: eval loss of the unscaled model, the worst eval loss over the
    rescaled copies, and the lowest mask agreement with the unscaled model over the copies."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["setup"], row["variant"], row["lr"], row["dtype"]), []).append(row)
    out = []
    for (setup, variant, lr, dtype), members in groups.items():
        copies = [m for m in members if m["scale"] != "1"]
        base = next(m for m in members if m["scale"] == "1")
        evals = [m["eval_loss"] for m in members if m["eval_loss"] is not None]
        out.append(
            {
                "setup": setup,
                "variant": variant,
                "lr": lr,
                "dtype": dtype,
                "eval_loss_unscaled": base["eval_loss"],
                "eval_loss_worst": max(evals) if evals else None,
                "min_agreement_input_side": min(m["agreement_input_side"] for m in copies),
                "min_agreement_all": min(m["agreement_all"] for m in copies),
            }
        )
        print(json.dumps({"summary": out[-1]}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default=DEFAULT_TEXT, help="raw text for the pretrained model (WikiText-2 test)")
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "step_scaling_cpu.json"))
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200, help="mask-learning steps on the pretrained model")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.workers * args.threads))
    logging.disable(logging.WARNING)
    from proxsparse_hf.utils import atomic_write_json, describe_hardware, library_versions

    started = time.time()
    with open(args.text, encoding="utf-8") as fh:
        text = fh.read()
    cut1, cut2 = int(0.7 * len(text)), int(0.85 * len(text))
    seq = 128
    pretrain_steps = 20 if args.quick else args.pretrain_steps
    steps = 2 if args.quick else args.steps
    model = tiny_llama(256)
    pretrain_windows = byte_windows(text[:cut1], seq)
    pretrain_losses = pretrain(model, pretrain_windows, pretrain_steps, batch=32, lr=2e-3, seed=0)
    calibration = byte_windows(text[cut1:cut2], seq)[: steps * 4]
    evaluation = byte_windows(text[cut2:], seq)[: 16 if args.quick else 256]
    shared = {
        "random_init": {
            "vocab": 128,
            "state_dict": tiny_llama(128).state_dict(),
            "calibration": random_tokens(160, 32, 128),
            "eval": None,
        },
        "pretrained": {
            "vocab": 256,
            "state_dict": model.state_dict(),
            "calibration": calibration,
            "eval": evaluation,
        },
    }
    rms = {
        name: round(float(p.detach().pow(2).mean().sqrt()), 4)
        for name, p in model.named_parameters()
        if name.endswith("proj.weight") and ".layers.0." in name
    }
    references = reference_losses(shared["pretrained"])
    scales = ("1", "0.2") if args.quick else ("1", "0.2", "5", "mix")
    jobs = []
    for variant, (_, _, _, grid, recipe_lr) in VARIANTS.items():
        for scale in ("1", "0.1"):
            jobs.append(dict(setup="random_init", variant=variant, lr=recipe_lr, scale=scale, dtype="float32"))
            jobs[-1].update(steps=2 if args.quick else 40, batch=4)
        for lr in (recipe_lr,) if args.quick else grid:
            for scale in scales:
                jobs.append(dict(setup="pretrained", variant=variant, lr=lr, scale=scale, dtype="float32"))
                if variant in ("adamw_relative", "adamw_relative_copy") and lr == recipe_lr:
                    jobs.append(dict(setup="pretrained", variant=variant, lr=lr, scale=scale, dtype="bfloat16"))
    for job in jobs:
        job.setdefault("steps", steps)
        job.setdefault("batch", 4)
    with tempfile.TemporaryDirectory() as tmp:
        shared_path = os.path.join(tmp, "shared.pt")
        torch.save(shared, shared_path)
        for job in jobs:
            job.update(shared=shared_path, threads=args.threads)
        if args.workers > 1:
            import multiprocessing

            with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(learn, jobs))
        else:
            results = [learn(job) for job in jobs]
    unscaled = {(r["setup"], r["variant"], r["lr"], r["dtype"]): r["masks"] for r in results if r["scale"] == "1"}
    rows = []
    for r in results:
        base = unscaled[(r["setup"], r["variant"], r["lr"], r["dtype"])]
        row = {k: v for k, v in r.items() if k != "masks"}
        row["agreement_input_side"] = round(agreement(base, r["masks"], INPUT_SIDE), 4)
        row["agreement_all"] = round(agreement(base, r["masks"]), 4)
        row["train_loss"] = round(row["train_loss"], 4)
        if row["eval_loss"] is not None:
            row["eval_loss"] = round(row["eval_loss"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "step_scaling",
        "hardware": describe_hardware(),
        "versions": library_versions(),
        "arguments": vars(args),
        "recipe": RECIPE,
        "variants": {
            k: dict(zip(("step_scaling", "optimizer", "max_grad_norm", "lr_grid", "recipe_lr"), v))
            for k, v in VARIANTS.items()
        },
        "pretrained_model": {
            "pretrain_steps": pretrain_steps,
            "pretrain_loss_last": round(sum(pretrain_losses[-20:]) / len(pretrain_losses[-20:]), 4),
            "layer0_weight_rms": rms,
            "reference_eval_loss": {k: round(v, 4) for k, v in references.items()},
        },
        "summary": summarize(rows),
        "rows": rows,
        "wall_s": round(time.time() - started, 1),
    }
    atomic_write_json(args.output, result, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
