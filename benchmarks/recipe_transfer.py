"""Does the default recipe transfer to models it was never tuned on? Two benchmarks and their charts.

``invariance`` — function-preserving rescalings of one model stand in for unseen models. Each variant multiplies every
decoder projection by a factor and compensates in the RMSNorm weights and the following projection
(:func:`proxsparse_hf.learning.rescale.rescale_function_preserving`), so the dense logits are unchanged while the
weights live at another scale: ``x0.2``, ``x1``, ``x5`` and ``mix`` (every q/k/v/gate/up projection its own factor,
log-uniform in [0.2, 5], fixed seed). For every variant: dense, the one-shot baselines and the default recipe, each
evaluated on WikiText-2 and C4 (all windows); optional runs check the default learning rate (x0.5, x2). Written: the
comparison file (one row per ``<variant>/<run>``, with the logits check of each variant), the invariance table
(``.md``) with its checks (dense identical, default recipe within 5 % across variants, better than SparseGPT on every
variant, no worse than the reference) and, with matplotlib, a bar chart. ``merge`` combines the files of processes
that ran variants in parallel (one GPU is far from busy with a 135 M model).

``budget`` — the default recipe on more calibration tokens: the streamed Wikipedia sample (19.1 M SmolLM2 tokens), at
budgets such as 0.4 M / 4 M / 19 M tokens (each a fresh run from the dense weights with its own warm-up and linear
decay; the windows of a smaller budget are a prefix of a larger one's), with the learning flags the experiment adds
(bf16, a larger batch). Records perplexity, training time and tokens/s per budget.

``plot`` — on CPU afterwards: perplexity against tokens (log x, with dense, 2x dense, SparseGPT and the C4-calibrated
default as references), the budget telemetry, and both markdown tables, from the result files. The tokens chart is
drawn here: ``proxsparse_hf.evaluation.plot`` has no perplexity-vs-tokens chart.

The learned runs are ``proxsparse learn`` without tuning flags: the ``ProxSparseConfig``, the ``learn_mask`` arguments
and the calibration windows come from the CLI's own parser (:func:`learn_invocation`), so a changed CLI default changes
this benchmark too. The one-shot baselines calibrate on the same windows. Runs go through the library's comparison
runner (:func:`proxsparse_hf.evaluation.compare.run_comparison`); results are saved after every run, ``--skip-done``
resumes, ``--deadline-s`` starts no run whose estimated end (measured durations) is past the deadline, ``--runs`` /
``--variants`` / ``--budgets`` select. ``--tiny`` swaps the model for a tiny random Llama with a byte tokenizer and
shrinks everything (CPU smoke test)::

    python benchmarks/recipe_transfer.py invariance benchmarks/configs/recipe_transfer_smollm2.json \\
        --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --variants x5 --output parts/x5.json
    python benchmarks/recipe_transfer.py merge parts/x1.json parts/x0.2.json parts/x5.json parts/mix.json \\
        --output benchmarks/results/quality_transfer_smollm2_h200.json
    python benchmarks/recipe_transfer.py budget benchmarks/configs/quality_budget_smollm2.json \\
        --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --output benchmarks/results/quality_budget_smollm2_h200.json
    python benchmarks/recipe_transfer.py plot --budget benchmarks/results/quality_budget_smollm2_h200.json \\
        --transfer benchmarks/results/quality_transfer_smollm2_h200.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._shared import recorded_command, resolve_source  # noqa: E402
from proxsparse_hf.evaluation import EvalResults, load_comparison, save_comparison  # noqa: E402
from proxsparse_hf.evaluation.compare import MethodRun, run_comparison  # noqa: E402
from proxsparse_hf.pruners import get_pruner  # noqa: E402
from proxsparse_hf.utils import atomic_write_text, describe_hardware, library_versions  # noqa: E402

logger = logging.getLogger("recipe_transfer")

TINY = {"seq_len": 64, "n_samples": 8, "max_steps": 2, "max_windows": 2}  # --tiny defaults
PROBE_TOKENS = 256  # tokens per window of the logits check of a rescaled variant
DATASET_TITLES = {"wikitext2": "WikiText-2", "c4": "C4"}


# ------------------------------------------------------------------------------- the CLI's recipe, as data
@dataclass
class LearnInvocation:
    """What ``proxsparse learn MODEL FLAGS --output-dir ...`` does, without running it.

    Args:
        flags: the flags given (beyond MODEL and ``--output-dir``).
        args: the parsed namespace (every other flag at its CLI default).
        config: the ``ProxSparseConfig`` the CLI builds.
        learn_kwargs: the keyword arguments the CLI passes to ``learn_mask``.
        permute: the importance the CLI's channel permutation maximises before learning (``--permute``), or None.
    """

    flags: list[str]
    args: argparse.Namespace
    config: Any
    learn_kwargs: dict[str, Any]
    permute: str | None = None

    def resolve_permutation(self, model: Any) -> None:
        """Decide ``--permute auto`` from the loaded model as the CLI does (its config, then its targets)."""
        from proxsparse_hf.commands.common import permutes_loaded_model, resolve_permutation

        importance = resolve_permutation(self.args, self.permute, model.config)
        self.permute = permutes_loaded_model(self.args, model, self.config, importance)

    @property
    def permute_options(self) -> dict[str, Any] | None:
        """The ``permute_channels`` arguments the CLI uses (``MethodRun.permute``), or None without a permutation."""
        if self.permute is None:
            return None
        return {"importance": self.permute, "batch_size": int(self.args.batch_size)}

    @property
    def learning_rate(self) -> float:
        """The learning rate the run uses (``--lr``, else the recipe's)."""
        from proxsparse_hf.config import recipe_learning_rate

        lr = self.learn_kwargs.get("learning_rate")
        return float(lr) if lr is not None else float(recipe_learning_rate(self.config))

    @property
    def windows_per_step(self) -> int:
        return int(self.args.batch_size) * int(self.args.grad_accum)

    def steps(self, n_windows: int) -> int:
        """Optimizer steps the Trainer takes on ``n_windows`` windows (``--max-steps`` wins over ``--epochs``)."""
        if self.args.max_steps > 0:
            return int(self.args.max_steps)
        return math.ceil(math.ceil(n_windows / self.windows_per_step) * self.args.epochs)

    def data_spec(self, n_samples: int | None = None) -> dict[str, Any]:
        """The calibration data as recorded with every run that uses it."""
        a = self.args
        n = n_samples or a.n_samples
        return {
            "dataset": a.dataset,
            "documents": [a.doc_start, a.doc_stop],
            "split": a.split,
            "seq_len": a.seq_len,
            "n_samples": n,
            "tokens": n * a.seq_len,
            "seed": a.seed,
            "bos": False if a.no_bos else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "proxsparse learn MODEL " + " ".join(shlex.quote(f) for f in self.flags) + " --output-dir OUT",
            "config": self.config.to_dict(),
            "learn_kwargs": dict(self.learn_kwargs),
            "learning_rate": self.learning_rate,
            "permute": self.permute,
            "calibration": self.data_spec(),
            "dtype": self.args.dtype,
        }


def learn_invocation(model: str, flags: Sequence[str]) -> LearnInvocation:
    """Parse ``proxsparse learn MODEL *flags`` with the CLI's parser and derive what its ``run`` would build.

    Mirrors :func:`proxsparse_hf.commands.learn.run` (``tests/test_transfer_script.py`` checks it against the CLI's
    actual ``learn_mask`` call). Single-process only: ``--fsdp`` and ``--device-map`` are refused.
    """
    from proxsparse_hf.cli import build_parser
    from proxsparse_hf.commands import learn as learn_command
    from proxsparse_hf.commands.common import permutation_importance

    flags = [str(f) for f in flags]
    args = build_parser().parse_args(["learn", model, *flags, "--output-dir", "unused"])
    if args.fsdp or args.device_map is not None:
        raise ValueError(
            f"`learn_flags`={flags!r} is invalid; allowed: single-process flags (no --fsdp/--device-map)."
        )
    report_to = [] if args.report_to in ("none", "") else [r.strip() for r in args.report_to.split(",")]
    kwargs = {
        "learning_rate": args.lr,
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "warmup_ratio": args.warmup_ratio,
        "seed": args.seed,
        "logging_steps": args.logging_steps,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "report_to": report_to,
        "distill_alpha": args.distill_alpha,
        "distill_temperature": args.distill_temperature,
        "use_cpu": args.device == "cpu",
        "fsdp": False,
        "fsdp_config": None,
    }
    config = learn_command.build_config(args)
    return LearnInvocation(flags, args, config, kwargs, permutation_importance(args, "proxsparse", config))


def load_invocation_data(inv: LearnInvocation, tokenizer: Any, n_samples: int | None = None):
    """The calibration windows of ``inv`` exactly as the CLI loads them (``n_samples`` overrides the count; the
    windows of a smaller count are a prefix of a larger one's)."""
    from proxsparse_hf.data import load_calibration_data, resolve_document_range

    a = inv.args
    documents = resolve_document_range(
        a.dataset, a.doc_start, a.doc_stop, purpose="calibration", split=a.split, name=a.dataset_config
    )
    return load_calibration_data(
        documents,
        tokenizer,
        seq_len=a.seq_len,
        n_samples=n_samples or a.n_samples,
        seed=a.seed,
        text_field=a.text_field,
        bos=False if a.no_bos else None,
    )


def experiment_flags(exp: Mapping[str, Any], args: argparse.Namespace) -> list[str]:
    """The experiment's ``learn_flags``, then ``--learn-flags`` (a shell-quoted string; a flag given twice, the later
    wins, as on the CLI): one experiment file serves a recipe check such as ``--learn-flags "--lambda2 1e-3"``."""
    return [*exp.get("learn_flags", []), *shlex.split(args.learn_flags or "")]


def smoke_flags(args: argparse.Namespace, *, with_samples: bool = True) -> list[str]:
    """CLI flags that shrink the learned runs for a smoke test (``--seq-len``, ``--n-samples``, ``--max-steps``
    with ``--logging-steps 1``), and ``--device cpu`` on a CPU run."""
    flags: list[str] = []
    if args.seq_len is not None:
        flags += ["--seq-len", str(args.seq_len)]
    if with_samples and args.n_samples is not None:
        flags += ["--n-samples", str(args.n_samples)]
    if args.max_steps is not None:  # a few steps: log every one, so the telemetry has points
        flags += ["--max-steps", str(args.max_steps), "--logging-steps", "1"]
    if args.device == "cpu":  # placement, as `proxsparse learn --device cpu` (the Trainer then trains bf16 on CPU)
        flags += ["--device", "cpu"]
    return flags


# ------------------------------------------------------------------------------------------ models and data
def byte_tokenizer():
    """A byte-level fast tokenizer (ids 0..255, ``<eos>`` = 256), built offline, for ``--tiny``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(seed: int = 0):
    """A tiny random Llama (2 layers, hidden 64) over the byte tokenizer's 257 ids, float32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def load_model(exp: Mapping[str, Any], args: argparse.Namespace, dtype: str) -> tuple[Any, Any, str]:
    """``(model on args.device, tokenizer, model name)``: the experiment's model, ``--model``, or ``--tiny``."""
    if args.tiny:
        return tiny_llama(exp.get("seed", 0)).to(args.device), byte_tokenizer(), "tiny-llama"
    from proxsparse_hf.loading import load_model_and_tokenizer

    path = resolve_source(args.model or exp["model"])
    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=args.device)
    return model, tokenizer, path


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def restore(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    model.load_state_dict(state)


def eval_options(exp: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``evaluate_model`` options of the experiment's ``evaluation`` block (``--seq-len`` / ``--max-windows`` shrink)."""
    spec = exp["evaluation"]
    return {
        "datasets": list(spec["datasets"]),
        "seq_len": args.seq_len or spec["seq_len"],
        "batch_size": spec.get("batch_size", 1),
        "max_windows": args.max_windows if args.max_windows is not None else spec.get("max_windows"),
        "show_progress": False,
    }


def read_previous(path: str) -> tuple[list[EvalResults], dict[str, Any]]:
    """Rows and top-level fields of an existing result file (nothing when it does not exist)."""
    if not os.path.isfile(path):
        return [], {}
    with open(path, encoding="utf-8") as fh:
        meta = json.load(fh)
    return load_comparison(meta), {k: v for k, v in meta.items() if k != "results"}


def windows_note(result: EvalResults) -> str:
    """``Perplexity: windows of 1024 tokens: wikitext2 297, c4 455 (all).``"""
    entries = result.perplexity
    seq_len = next(iter(entries.values()))["seq_len"]
    counts = ", ".join(f"{d} {e['num_windows']}" for d, e in entries.items())
    capped = result.settings.get("max_windows")
    return f"Perplexity: windows of {seq_len} tokens: {counts} ({f'at most {capped}' if capped else 'all'})."


def with_command(meta: Mapping[str, Any], command: str) -> list[str]:
    """The commands recorded in an earlier result file, then this one's (each once)."""
    return list(dict.fromkeys([*meta.get("commands", []), command]))


def _check_deadline(deadline: float | None, started: float, estimate: float | None, label: str) -> bool:
    """Whether a run estimated to take ``estimate`` seconds still fits before ``deadline`` (seconds since start)."""
    if deadline is None or estimate is None:
        return True
    elapsed = time.perf_counter() - started
    if elapsed + estimate <= deadline:
        return True
    logger.warning("Skipping %s: %.0f s elapsed + ~%.0f s > --deadline-s %.0f", label, elapsed, estimate, deadline)
    return False


# ------------------------------------------------------------------------------------------------ invariance
def input_side_modules(model: torch.nn.Module) -> list[str]:
    """Names of the q/k/v/gate/up projections, in model order (the modules a ``mix`` variant draws factors for)."""
    from proxsparse_hf.learning.rescale import INPUT_SIDE_PROJECTIONS

    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] in INPUT_SIDE_PROJECTIONS and parts[-2] in ("self_attn", "mlp"):
            names.append(name)
    return names


def check_variants(variants: Any) -> list[dict[str, Any]]:
    """Validate the experiment's ``variants``: ``{"name", "factor"}`` or ``{"name", "log_uniform": [lo, hi], "seed"}``."""
    if not isinstance(variants, list) or not variants:
        raise ValueError(f"`variants`={variants!r} is invalid; allowed: a non-empty list.")
    seen = set()
    for v in variants:
        name = v.get("name") if isinstance(v, dict) else None
        if not isinstance(name, str) or not name or "/" in name or name in seen:
            raise ValueError(f"variant {v!r} is invalid; allowed: a unique `name` without '/'.")
        seen.add(name)
        if ("factor" in v) == ("log_uniform" in v):
            raise ValueError(f"variant {name!r} is invalid; allowed: exactly one of `factor` and `log_uniform`.")
        if "factor" in v and not (isinstance(v["factor"], (int, float)) and v["factor"] > 0):
            raise ValueError(f"variant {name!r} `factor`={v['factor']!r} is invalid; allowed: a number > 0.")
        if "log_uniform" in v:
            bounds = v["log_uniform"]
            if not (isinstance(bounds, list) and len(bounds) == 2 and 0 < bounds[0] <= bounds[1]):
                raise ValueError(
                    f"variant {name!r} `log_uniform`={bounds!r} is invalid; allowed: [lo, hi], 0 < lo <= hi."
                )
    return variants


def variant_factors(model: torch.nn.Module, variant: Mapping[str, Any]) -> float | dict[str, float]:
    """The ``factors`` argument of ``rescale_function_preserving`` for ``variant``: one factor, or one per input-side
    projection drawn log-uniformly with the variant's seed (the same model always gets the same factors)."""
    if "factor" in variant:
        return float(variant["factor"])
    lo, hi = (math.log(b) for b in variant["log_uniform"])
    rng = random.Random(variant.get("seed", 0))
    return {name: math.exp(rng.uniform(lo, hi)) for name in input_side_modules(model)}


def apply_variant(model: torch.nn.Module, variant: Mapping[str, Any]) -> dict[str, Any]:
    """Rescale ``model`` in place (a factor of 1 leaves it untouched); returns what was done, for the results."""
    from proxsparse_hf.learning.rescale import rescale_function_preserving

    factors = variant_factors(model, variant)
    info: dict[str, Any] = {"variant": variant["name"]}
    if isinstance(factors, float):
        info["factor"] = factors
        if factors == 1.0:
            return info
    else:
        info.update(log_uniform=list(variant["log_uniform"]), seed=variant.get("seed", 0))
    applied = rescale_function_preserving(model, factors)
    values = list(applied.values())
    info.update(
        weights_rescaled=sum(v != 1.0 for v in values),
        factor_min=min(values),
        factor_max=max(values),
        factor_geomean=math.exp(sum(math.log(v) for v in values) / len(values)),
    )
    return info


@torch.no_grad()
def probe_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device)).logits.float().cpu()


def run_invariance(args: argparse.Namespace) -> int:
    with open(args.experiment, encoding="utf-8") as fh:
        exp = json.load(fh)
    variants = check_variants(exp["variants"])
    if args.variants:
        names = [v["name"] for v in variants]
        unknown = sorted(set(args.variants.split(",")) - set(names))
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; the experiment has {names}")
        variants = [v for v in variants if v["name"] in args.variants.split(",")]
    runs = select_runs(exp["runs"], args.runs, args.with_optional)
    started = time.perf_counter()
    smoke = bool(args.tiny or args.max_steps or args.max_windows or args.n_samples or args.seq_len)
    inv = learn_invocation(args.model or exp["model"], [*experiment_flags(exp, args), *smoke_flags(args)])
    model, tokenizer, model_name = load_model(exp, args, inv.args.dtype)
    inv.resolve_permutation(model)
    calib = load_invocation_data(inv, tokenizer)
    calib_spec = inv.data_spec()
    options = eval_options(exp, args)
    rows, meta = read_previous(args.output)
    commands = with_command(meta, args.command_line)
    by_label = {r.label: r for r in rows}
    variant_info: dict[str, Any] = dict(meta.get("variants", {}))
    original = snapshot(model)
    probe = calib.input_ids[:2, : min(PROBE_TOKENS, calib.seq_len)]
    reference = probe_logits(model, probe)
    order = [
        (run, variant)
        for run in runs
        for variant in variants
        if variant["name"] in run.get("variants", [variant["name"]])
    ]
    durations: dict[str, float] = {}
    skipped: list[str] = []

    def save() -> None:
        write_invariance(
            args.output,
            list(by_label.values()),
            exp,
            model_name,
            commands=commands,
            learn_invocation=inv.to_dict(),
            variants=variant_info,
            skipped=skipped,
            hardware=describe_hardware(),
            versions=library_versions(),
            smoke_test=smoke or bool(meta.get("smoke_test")),
        )

    for run, variant in order:
        label = f"{variant['name']}/{run['name']}"
        if args.skip_done and label in by_label:
            continue
        # a run's own measured duration, else the longest one measured so far (the first run always starts)
        estimate = durations.get(run["name"], max(durations.values(), default=None))
        if not _check_deadline(args.deadline_s, started, estimate, label):
            skipped.append(label)
            continue
        start = time.perf_counter()
        restore(model, original)
        info = apply_variant(model, variant)
        diff = (probe_logits(model, probe) - reference).abs().max().item()
        info.update(
            probe_logits_max_abs_diff=diff,
            probe_logits_max_rel_diff=diff / max(reference.abs().max().item(), 1e-30),
            probe_windows=list(probe.shape),
        )
        variant_info[variant["name"]] = info
        method_run = make_method_run(run, label, inv)
        spec = get_pruner(method_run.method)
        needs = spec.needs_calibration
        (result,) = run_comparison(
            model,
            tokenizer,
            [method_run],
            model_name=model_name,
            config=inv.config,
            calibration=calib if needs else None,
            calibration_spec=calib_spec if needs else None,
            eval_options=options,
        )
        result.method_config["rescale"] = info
        if spec.learned:  # the learning rate actually used (the recipe's when the CLI's --lr is unset)
            result.method_config["learning_rate"] = method_run.options["learning_rate"] or inv.learning_rate
        by_label[label] = result
        durations[run["name"]] = max(durations.get(run["name"], 0.0), time.perf_counter() - start)
        line = {"run": label, "perplexity": {d: round(result.ppl(d), 3) for d in result.perplexity}}
        print(json.dumps({**line, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        save()
    restore(model, original)
    save()
    _try_chart(lambda: plot_invariance(load_comparison(args.output), os.path.splitext(args.output)[0] + ".png"))
    return 0


def write_invariance(
    path: str,
    rows: Sequence[EvalResults],
    exp: Mapping[str, Any],
    model_name: str,
    *,
    commands: list[str],
    **meta: Any,
) -> None:
    """Save the rows (in experiment order) with the invariance summary as a comparison file, and its markdown table."""
    labels = [f"{v['name']}/{r['name']}" for v in check_variants(exp["variants"]) for r in exp["runs"]]
    ordered = sorted(rows, key=lambda r: labels.index(r.label) if r.label in labels else len(labels))
    summary = invariance_summary(ordered, exp)
    save_comparison(path, ordered, model=model_name, experiment=exp, commands=commands, invariance=summary, **meta)
    text = invariance_markdown(ordered, exp, summary, model_name, commands)
    atomic_write_text(os.path.splitext(path)[0] + ".md", text)


def run_merge(args: argparse.Namespace) -> int:
    """Combine the result files of ``invariance`` runs done in parallel (e.g. one process per variant) into one; a
    later file's row replaces an earlier one's with the same label."""
    by_label: dict[str, EvalResults] = {}
    metas = []
    for part in args.parts:
        rows, meta = read_previous(part)
        if not meta:
            raise SystemExit(f"{part} does not exist")
        metas.append(meta)
        by_label.update((r.label, r) for r in rows)
    first = metas[0]
    variants: dict[str, Any] = {}
    for meta in metas:
        variants.update(meta.get("variants", {}))
    skipped = sorted({label for meta in metas for label in meta.get("skipped", [])} - set(by_label))
    commands = [c for meta in metas for c in meta.get("commands", [])] + [args.command_line]
    write_invariance(
        args.output,
        list(by_label.values()),
        first["experiment"],
        first.get("model") or next(iter(by_label.values())).model,
        commands=commands,
        learn_invocation=first.get("learn_invocation"),
        variants=variants,
        skipped=skipped,
        hardware=first.get("hardware"),
        versions=first.get("versions"),
        smoke_test=any(meta.get("smoke_test") for meta in metas),
    )
    print(os.path.splitext(args.output)[0] + ".md")
    _try_chart(lambda: plot_invariance(load_comparison(args.output), os.path.splitext(args.output)[0] + ".png"))
    return 0


# config fields that say where a run came from, not how it learned
_PROVENANCE_KEYS = ("base_model_name_or_path", "revision", "proxsparse_version")


def sweep_rows(paths: Sequence[str]) -> list[dict[str, Any]]:
    """One row per learned run of the given ``invariance`` / ``budget`` result files: the file, the run, the learning
    flags beyond the experiment's (``--learn-flags``), the channel permutation before learning (its importance, or
    None), the learning rate, batch, steps, tokens and perplexities."""
    rows = []
    for path in paths:
        results, meta = read_previous(path)
        if not meta:
            raise SystemExit(f"{path} does not exist")
        base = [str(f) for f in meta.get("experiment", {}).get("learn_flags", [])]
        inv = meta.get("learn_invocation") or {}
        words = shlex.split(inv.get("command", ""))[3:-2]  # after `proxsparse learn MODEL`, before `--output-dir OUT`
        extra = words[len(base) :] if words[: len(base)] == base else words
        for r in results:
            mc = r.method_config
            if "proxsparse_config" not in mc and "training" not in mc:
                continue  # dense and one-shot rows
            training = mc.get("training", {})
            budget = mc.get("budget", {})
            # everything that defines the run but its seed: rows equal here differ only by the seed
            same = {k: v for k, v in training.items() if k not in ("seed", "learning_rate", "logging_steps")}
            config = {k: v for k, v in mc.get("proxsparse_config", {}).items() if k not in _PROVENANCE_KEYS}
            permutation = (mc.get("permutation") or {}).get("importance")  # the channel permutation before learning
            rows.append(
                {
                    "file": os.path.splitext(os.path.basename(path))[0],
                    "run": r.label,
                    "flags": " ".join(extra),
                    "learning_rate": mc.get("learning_rate") or budget.get("learning_rate"),
                    # windows per optimizer step of one process: the micro-batch times the accumulated micro-batches
                    "batch": (training.get("per_device_train_batch_size") or 0)
                    * (training.get("gradient_accumulation_steps") or 1)
                    or None,
                    "steps": budget.get("steps"),
                    "tokens": budget.get("tokens") or (mc.get("calibration") or {}).get("tokens"),
                    "ppl": {d: r.ppl(d) for d in r.perplexity},
                    "seed": training.get("seed"),
                    "permutation": permutation,
                    "settings": json.dumps(
                        [r.label, mc.get("learning_rate") or budget.get("learning_rate"), same, config, permutation],
                        sort_keys=True,
                    ),
                }
            )
    return rows


def seed_means(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows of :func:`sweep_rows` that differ only by their seed, averaged: one entry per group of two or more seeds
    (the files, the seeds and the mean perplexity per dataset), in the order of the groups' first rows."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["settings"], []).append(row)
    means = []
    for members in groups.values():
        if len({m["seed"] for m in members}) < 2:
            continue
        datasets = [d for d in members[0]["ppl"] if all(d in m["ppl"] for m in members)]
        means.append(
            {
                "files": [m["file"] for m in members],
                "seeds": [m["seed"] for m in members],
                "learning_rate": members[0]["learning_rate"],
                "batch": members[0]["batch"],
                "permutation": members[0].get("permutation"),
                "ppl": {d: statistics.fmean(m["ppl"][d] for m in members) for d in datasets},
            }
        )
    return means


def sweep_markdown(rows: Sequence[Mapping[str, Any]], title: str, note: str = "") -> str:
    """The rows of :func:`sweep_rows` as one markdown table."""
    datasets = list(dict.fromkeys(d for row in rows for d in row["ppl"]))
    head = [
        "file",
        "run",
        "extra learn flags",
        "permutation",
        "lr",
        "batch",
        "steps",
        "tokens",
        *(DATASET_TITLES.get(d, d) for d in datasets),
    ]
    lines = [f"# {title}", "", *([note, ""] if note else []), "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * 4 + "---:|" * (len(head) - 4))
    for row in rows:
        cells = [
            row["file"],
            row["run"],
            f"`{row['flags']}`" if row["flags"] else "–",
            row.get("permutation") or "–",
            f"{row['learning_rate']:g}" if row["learning_rate"] else "–",
            str(row["batch"] or "–"),
            str(row["steps"] or "–"),
            f"{row['tokens']:,}" if row["tokens"] else "–",
            *(f"{row['ppl'][d]:.2f}" if d in row["ppl"] else "–" for d in datasets),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    means = seed_means(rows)
    if means:
        lines += ["", "Means over seeds (rows whose settings differ only by the seed):", ""]
        titles = " | ".join(DATASET_TITLES.get(d, d) for d in datasets)
        lines.append(f"| files | seeds | permutation | lr | batch | {titles} |")
        lines.append("|---|---|---|" + "---:|" * (2 + len(datasets)))
        for m in means:
            cells = [
                ", ".join(m["files"]),
                ", ".join(str(seed) for seed in m["seeds"]),
                m.get("permutation") or "–",
                f"{m['learning_rate']:g}" if m["learning_rate"] else "–",
                str(m["batch"] or "–"),
                *(f"{m['ppl'][d]:.2f}" if d in m["ppl"] else "–" for d in datasets),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(args: argparse.Namespace) -> int:
    rows = sweep_rows(args.parts)
    text = sweep_markdown(rows, args.title, args.note) + f"\nCommand:\n\n    {args.command_line}\n"
    atomic_write_text(args.output, text)
    print(text)
    return 0


def select_runs(runs: list[dict[str, Any]], names: str | None, with_optional: bool) -> list[dict[str, Any]]:
    """The runs to do: ``names`` (comma-separated) when given, else every run not marked ``optional`` (all with
    ``with_optional``)."""
    all_names = [r["name"] for r in runs]
    if len(set(all_names)) != len(all_names) or any("/" in n for n in all_names):
        raise ValueError(f"run names {all_names} must be unique and contain no '/'.")
    if names:
        wanted = names.split(",")
        unknown = [n for n in wanted if n not in all_names]
        if unknown:
            raise SystemExit(f"unknown run(s) {unknown}; the experiment has {all_names}")
        return [r for r in runs if r["name"] in wanted]
    return [r for r in runs if with_optional or not r.get("optional", False)]


def make_method_run(run: Mapping[str, Any], label: str, inv: LearnInvocation) -> MethodRun:
    """A run of the experiment as a :class:`MethodRun`: a learned method is the CLI's ``learn_mask`` call (its
    learning rate times ``lr_factor``); a one-shot method gets its ``options``."""
    spec = get_pruner(run["method"])
    if spec.learned:
        options = dict(inv.learn_kwargs)
        if "lr_factor" in run:
            options["learning_rate"] = inv.learning_rate * float(run["lr_factor"])
        return MethodRun(
            run["method"],
            label=label,
            options=options,
            config=inv.config,
            description=run.get("description", ""),
            permute=inv.permute_options,
        )
    return MethodRun(
        run["method"],
        label=label,
        options=dict(run.get("options", {})),
        config=inv.config,
        description=run.get("description", ""),
        permute=run.get("permute"),
    )


def _split_label(label: str) -> tuple[str, str]:
    variant, _, run = label.partition("/")
    return variant, run


def invariance_summary(rows: Sequence[EvalResults], exp: Mapping[str, Any]) -> dict[str, Any]:
    """Perplexity per run, dataset and variant, its spread across variants (max / min - 1), and the experiment's
    ``checks``: dense identical across variants, the default recipe within ``tolerance`` across variants, better than
    the baseline on every variant and dataset, and the reference variant no worse than ``reference_ppl``."""
    checks = exp.get("checks", {})
    datasets = list(exp["evaluation"]["datasets"])
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        variant, run = _split_label(r.label)
        for d in datasets:
            if r.ppl(d) is not None:
                table.setdefault(run, {}).setdefault(d, {})[variant] = r.ppl(d)
    spread = {
        run: {d: max(v.values()) / min(v.values()) - 1.0 for d, v in per.items() if len(v) > 1}
        for run, per in table.items()
    }
    out: dict[str, Any] = {"perplexity": table, "spread": spread}
    dense, default, baseline = checks.get("dense_run"), checks.get("default_run"), checks.get("baseline_run")
    ref_variant = checks.get("reference_variant")
    if dense in table:
        diffs = [
            abs(p - per[ref_variant]) / per[ref_variant]
            for per in table[dense].values()
            if ref_variant in per
            for p in per.values()
        ]
        if diffs:
            out["dense_max_rel_diff"] = max(diffs)
    if default in spread and spread[default]:
        tol = checks.get("tolerance", 0.05)
        out["default_max_spread"] = max(spread[default].values())
        out["default_within_tolerance"] = out["default_max_spread"] <= tol
    if default in table and baseline in table:
        beats = {
            v: {
                d: table[default][d][v] < table[baseline][d][v]
                for d in datasets
                if v in table[default].get(d, {}) and v in table[baseline].get(d, {})
            }
            for v in [v["name"] for v in exp["variants"]]
        }
        beats = {v: b for v, b in beats.items() if b}
        out["default_beats_baseline"] = beats
        out["default_beats_baseline_everywhere"] = bool(beats) and all(all(b.values()) for b in beats.values())
    reference = checks.get("reference_ppl")
    if reference and default in table:
        got = {d: table[default].get(d, {}).get(ref_variant) for d in reference}
        if all(v is not None for v in got.values()):
            out["reference_variant_no_worse"] = all(got[d] <= reference[d] for d in reference)
    return out


def invariance_markdown(
    rows: Sequence[EvalResults],
    exp: Mapping[str, Any],
    summary: Mapping[str, Any],
    model_name: str,
    commands: Sequence[str] = (),
) -> str:
    """The invariance table: one table per dataset (runs x variants, spread), then the checks and the command."""
    from proxsparse_hf.evaluation import portable_name

    variants = [v["name"] for v in exp["variants"]]
    checks = exp.get("checks", {})
    lines = [f"# Recipe transfer: function-preserving rescalings of `{portable_name(model_name)}`", ""]
    first = next((r for r in rows if r.perplexity), None)
    for d in exp["evaluation"]["datasets"]:
        lines += [f"## {DATASET_TITLES.get(d, d)} perplexity", ""]
        lines += ["| run | " + " | ".join(variants) + " | spread |", "|---|" + "---:|" * (len(variants) + 1)]
        for run in [r["name"] for r in exp["runs"]]:
            per = summary["perplexity"].get(run, {}).get(d)
            if not per:
                continue
            cells = [f"{per[v]:.2f}" if v in per else "–" for v in variants]
            sp = summary["spread"].get(run, {}).get(d)
            lines.append(f"| {run} | " + " | ".join(cells) + f" | {'–' if sp is None else f'{sp:.2%}'} |")
        lines.append("")
    if first is not None:
        lines += [windows_note(first), ""]
    lines += ["## Checks", ""]
    if "dense_max_rel_diff" in summary:
        lines.append(
            f"* dense perplexity across variants: max relative difference {summary['dense_max_rel_diff']:.2e}"
        )
    if "default_max_spread" in summary:
        ok = "yes" if summary["default_within_tolerance"] else "NO"
        lines.append(
            f"* `{checks.get('default_run')}` (default recipe) spread across variants: {summary['default_max_spread']:.2%} "
            f"(within {checks.get('tolerance', 0.05):.0%}: {ok})"
        )
    if "default_beats_baseline" in summary:
        for v, per in summary["default_beats_baseline"].items():
            verdict = ", ".join(f"{d}: {'yes' if b else 'NO'}" for d, b in per.items())
            lines.append(
                f"* `{checks.get('default_run')}` better than `{checks.get('baseline_run')}` on {v}: {verdict}"
            )
    if "reference_variant_no_worse" in summary:
        ref = ", ".join(f"{d} {p}" for d, p in checks["reference_ppl"].items())
        ok = "yes" if summary["reference_variant_no_worse"] else "NO"
        lines.append(f"* `{checks.get('default_run')}` on {checks.get('reference_variant')} no worse than {ref}: {ok}")
    lines += ["", "Commands:", "", *(f"    {c}" for c in commands), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- budget
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_budget(value: str | int | float) -> int:
    """``"0.4M"``, ``"20M"``, ``"2k"``, ``400000`` → tokens."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        tokens = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgG]?)\s*", str(value))
        if match is None:
            raise ValueError(f"budget {value!r} is invalid; allowed: a token count such as 400000, 0.4M, 20M or 2k.")
        tokens = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if tokens < 1:
        raise ValueError(f"budget {value!r} is invalid; allowed: at least 1 token.")
    return int(round(tokens))


def budget_label(tokens: int) -> str:
    """``400000`` → ``"0.4M"``, ``2048`` → ``"2.05k"``."""
    if tokens >= 100_000:
        return f"{tokens / 1e6:.3g}M"
    return f"{tokens / 1e3:.3g}k" if tokens >= 1000 else str(tokens)


def budget_plan(budgets: Sequence[int], seq_len: int, windows_per_step: int) -> list[tuple[str, int, int]]:
    """``(label, budget, windows)`` per budget, ascending: the window count rounded to whole optimizer steps (>= 1)."""
    plan = []
    for budget in sorted(set(budgets)):
        steps = max(1, round(budget / (seq_len * windows_per_step)))
        plan.append((budget_label(budget), budget, steps * windows_per_step))
    return plan


def run_budget(args: argparse.Namespace) -> int:
    from proxsparse_hf.data import TokenWindows

    with open(args.experiment, encoding="utf-8") as fh:
        exp = json.load(fh)
    budgets = [parse_budget(b) for b in (args.budgets.split(",") if args.budgets else exp["budgets"])]
    started = time.perf_counter()
    smoke = bool(args.tiny or args.max_steps or args.max_windows or args.seq_len)
    inv = learn_invocation(
        args.model or exp["model"], [*experiment_flags(exp, args), *smoke_flags(args, with_samples=False)]
    )
    plan = budget_plan(budgets, inv.args.seq_len, inv.windows_per_step)
    model, tokenizer, model_name = load_model(exp, args, inv.args.dtype)
    inv.resolve_permutation(model)
    rows, meta = read_previous(args.output)
    commands = with_command(meta, args.command_line)
    by_label = {r.label: r for r in rows}
    options = eval_options(exp, args)
    todo = [p for p in plan if not (args.skip_done and p[0] in by_label)]
    data: dict[str, Any] = dict(meta.get("data", {}))
    windows = None
    if todo:
        t0 = time.perf_counter()
        windows = load_invocation_data(inv, tokenizer, n_samples=max(n for _, _, n in todo))
        data = {
            "source": windows.documents.to_dict() if windows.documents is not None else None,
            "windows": len(windows),
            "tokens": windows.num_tokens,
            "seq_len": windows.seq_len,
            "bos": windows.bos,
            "streaming": windows.streaming,
            "load_s": time.perf_counter() - t0,
        }
        print(json.dumps({"data": data}, default=str), flush=True)
    skipped: list[dict[str, Any]] = []

    def save() -> None:
        order = ["dense", *(label for label, _, _ in plan)]
        ordered = sorted(by_label.values(), key=lambda r: order.index(r.label) if r.label in order else len(order))
        save_comparison(
            args.output,
            ordered,
            model=model_name,
            experiment=exp,
            commands=commands,
            learn_invocation=inv.to_dict(),
            budgets=budgets,
            data=data,
            skipped=skipped,
            hardware=describe_hardware(),
            versions=library_versions(),
            wall_time_s=time.perf_counter() - started,
            smoke_test=smoke or bool(meta.get("smoke_test")),
        )
        atomic_write_text(os.path.splitext(args.output)[0] + ".md", budget_markdown(ordered, model_name, commands))

    if exp.get("dense", True) and not (args.skip_done and "dense" in by_label):
        (result,) = run_comparison(
            model, tokenizer, [MethodRun("dense", config=inv.config)], model_name=model_name, eval_options=options
        )
        by_label["dense"] = result
        print(
            json.dumps({"run": "dense", "perplexity": {d: round(result.ppl(d), 3) for d in result.perplexity}}),
            flush=True,
        )
        save()
    tokens_per_s = eval_s = None
    for label, budget, n in todo:
        tokens = n * inv.args.seq_len
        estimate = tokens / tokens_per_s + (eval_s or 0.0) if tokens_per_s else None
        if not _check_deadline(args.deadline_s, started, estimate, label):
            skipped.append({"budget": label, "tokens": tokens, "estimated_s": estimate})
            continue
        calib = TokenWindows(
            windows.input_ids[:n], bos=windows.bos, documents=windows.documents, streaming=windows.streaming
        )
        spec = inv.data_spec(n)
        method_run = MethodRun(
            "proxsparse",
            label=label,
            options=dict(inv.learn_kwargs),
            config=inv.config,
            description=f"{budget_label(budget)}-token budget",
            permute=inv.permute_options,
        )
        (result,) = run_comparison(
            model,
            tokenizer,
            [method_run],
            model_name=model_name,
            config=inv.config,
            calibration=calib,
            calibration_spec=spec,
            eval_options=options,
        )
        train_s = result.method_config["prune_time_s"]
        steps = inv.steps(n)
        trained = steps * inv.windows_per_step * inv.args.seq_len  # n is a whole number of steps' windows
        tokens_per_s, eval_s = trained / train_s, result.wall_time_s
        result.method_config["budget"] = {
            "budget_tokens": budget,
            "windows": n,
            "tokens": trained,
            "steps": steps,
            "train_s": train_s,
            "tokens_per_s": tokens_per_s,
            "learning_rate": inv.learning_rate,
        }
        by_label[label] = result
        line = {"run": label, "tokens": trained, "train_s": round(train_s, 1), "tokens_per_s": round(tokens_per_s)}
        print(json.dumps({**line, "perplexity": {d: round(result.ppl(d), 3) for d in result.perplexity}}), flush=True)
        save()
    save()
    _try_chart(lambda: plot_budget(load_comparison(args.output), os.path.splitext(args.output)[0] + ".png"))
    return 0


def budget_markdown(rows: Sequence[EvalResults], model_name: str, commands: Sequence[str] = ()) -> str:
    """Perplexity, steps, wall time and tokens/s per budget, with the ratio to dense."""
    from proxsparse_hf.evaluation import portable_name

    datasets = list(dict.fromkeys(d for r in rows for d in r.perplexity))
    dense = next((r for r in rows if r.method == "dense"), None)
    head = ["run", "tokens", "steps", "train (s)", "tokens/s", *[f"{DATASET_TITLES.get(d, d)} ppl" for d in datasets]]
    if dense is not None:
        head += [f"{DATASET_TITLES.get(d, d)} / dense" for d in datasets]
    lines = [f"# Default recipe against calibration tokens: `{portable_name(model_name)}`", ""]
    lines += ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        b = r.method_config.get("budget", {})
        cells = [
            r.label,
            f"{b['tokens']:,}" if b else "–",
            str(b.get("steps", "–")),
            f"{b['train_s']:.1f}" if b else "–",
        ]
        cells.append(f"{b['tokens_per_s']:,.0f}" if b else "–")
        cells += [f"{r.ppl(d):.2f}" if r.ppl(d) is not None else "–" for d in datasets]
        if dense is not None:
            cells += [f"{r.ppl(d) / dense.ppl(d):.2f}x" if r.ppl(d) and dense.ppl(d) else "–" for d in datasets]
        lines.append("| " + " | ".join(cells) + " |")
    first = next((r for r in rows if r.perplexity), None)
    if first is not None:
        lines += ["", windows_note(first)]
    lines += [
        "",
        "Anchor: MaskLLM reaches 12.8 against dense 11.7 (1.09x) on Gemma-3-1B with ~1e9 tokens and ~1,000 GPU-hours.",
    ]
    lines += ["", "Commands:", "", *(f"    {c}" for c in commands), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ charts
def _try_chart(draw) -> None:
    try:
        logger.info("Chart: %s", draw())
    except (RuntimeError, ValueError) as exc:  # matplotlib missing (e.g. on the GPU machine), or nothing to draw
        logger.warning("No chart: %s (run `recipe_transfer.py plot` where matplotlib is installed)", exc)


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError('charts need matplotlib: pip install "proxsparse-hf[plots]"') from exc
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_invariance(rows: Sequence[EvalResults], path: str) -> str:
    """Grouped bars of every ``<variant>/<run>`` row (the library's perplexity chart)."""
    from proxsparse_hf.evaluation.plot import plot_perplexity

    return plot_perplexity(rows, path, title="Function-preserving rescalings: perplexity per variant and method")


def plot_budget(
    rows: Sequence[EvalResults], path: str, transfer: Sequence[EvalResults] = (), reference_variant: str = "x1"
) -> str:
    """Perplexity against calibration tokens (log x), one panel per dataset, with dense, 2x dense and — from a
    transfer result file — SparseGPT and the C4-calibrated default recipe as references."""
    points = [r for r in rows if r.method_config.get("budget")]
    if not points:
        raise ValueError("no budget run to plot")
    dense = next((r for r in rows if r.method == "dense"), None)
    refs = {_split_label(r.label)[1]: r for r in transfer if _split_label(r.label)[0] == reference_variant}
    datasets = list(dict.fromkeys(d for r in points for d in r.perplexity))
    fig = _figure(5.2 * len(datasets), 4.0)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    points = sorted(points, key=lambda r: r.method_config["budget"]["tokens"])
    for ax, d in zip(axes, datasets):
        xs = [r.method_config["budget"]["tokens"] for r in points]
        ys = [r.ppl(d) for r in points]
        ax.plot(xs, ys, marker="o", color="C0", label="default recipe, Wikipedia (bf16)")
        for x, y, r in zip(xs, ys, points):
            ax.annotate(
                f"{y:.1f}\n{r.method_config['budget']['train_s']:.0f} s",
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        if dense is not None and dense.ppl(d):
            ax.axhline(dense.ppl(d), color="black", linestyle="--", linewidth=1, label=f"dense {dense.ppl(d):.1f}")
            ax.axhline(
                2 * dense.ppl(d), color="grey", linestyle=":", linewidth=1, label=f"2x dense {2 * dense.ppl(d):.1f}"
            )
        if "sparsegpt" in refs and refs["sparsegpt"].ppl(d):
            ax.axhline(
                refs["sparsegpt"].ppl(d),
                color="C3",
                linestyle="-.",
                linewidth=1,
                label=f"SparseGPT {refs['sparsegpt'].ppl(d):.1f}",
            )
        default = refs.get("proxsparse")  # the default recipe on the C4 sample, fp32 (the invariance run)
        if default is not None and default.ppl(d):
            r = default
            tokens = r.method_config.get("calibration", {}).get("tokens")
            if tokens:
                ax.plot(
                    [tokens],
                    [r.ppl(d)],
                    marker="s",
                    color="C2",
                    linestyle="none",
                    label=f"default recipe, C4 (fp32) {r.ppl(d):.1f}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("calibration tokens")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{DATASET_TITLES.get(d, d)}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    gpu = points[0].hardware.get("gpu") or "CPU"
    fig.suptitle(f"2:4 mask quality against tokens: {points[0].model} on {gpu}", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def run_plot(args: argparse.Namespace) -> int:
    transfer: list[EvalResults] = []
    if args.transfer:
        transfer, meta = read_previous(args.transfer)
        exp = meta["experiment"]
        summary = invariance_summary(transfer, exp)
        base = os.path.splitext(args.transfer)[0]
        atomic_write_text(
            base + ".md",
            invariance_markdown(
                transfer, exp, summary, meta.get("model") or transfer[0].model, meta.get("commands", [])
            ),
        )
        print(base + ".md")
        _try_chart(lambda: plot_invariance(transfer, base + ".png"))
    if args.budget:
        rows, meta = read_previous(args.budget)
        base = os.path.splitext(args.budget)[0]
        atomic_write_text(
            base + ".md", budget_markdown(rows, meta.get("model") or rows[0].model, meta.get("commands", []))
        )
        print(base + ".md")
        _try_chart(lambda: plot_budget(rows, base + ".png", transfer, args.reference_variant))
        from proxsparse_hf.evaluation.plot import plot_telemetry

        _try_chart(
            lambda: plot_telemetry(
                [r for r in rows if r.telemetry], base + "_telemetry.png", title="Telemetry per budget"
            )
        )
    return 0


# -------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("invariance", "rescaled variants x methods"), ("budget", "default recipe against tokens")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("experiment", help="experiment JSON (benchmarks/configs/...)")
        p.add_argument(
            "--output", required=True, help="result JSON (a .md table and, with matplotlib, a .png beside it)"
        )
        p.add_argument("--model", default=None, help="model path / Hub id / .gguf file (default: the experiment's)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--skip-done", action="store_true", help="keep the rows already in --output, run the others")
        p.add_argument(
            "--deadline-s", type=float, default=None, help="start no run that would end after this many seconds"
        )
        p.add_argument(
            "--tiny", action="store_true", help="tiny random Llama + byte tokenizer, shrunk runs (smoke test)"
        )
        p.add_argument(
            "--learn-flags",
            default=None,
            help='extra `proxsparse learn` flags after the experiment\'s, e.g. "--lambda2 1e-3 --lr 0.02" (recorded)',
        )
        p.add_argument("--seq-len", type=int, default=None, help="calibration and evaluation window (smoke tests)")
        p.add_argument("--max-steps", type=int, default=None, help="cap learned runs' steps (smoke tests)")
        p.add_argument("--max-windows", type=int, default=None, help="cap evaluation windows (smoke tests)")
        if name == "invariance":
            p.add_argument("--n-samples", type=int, default=None, help="calibration windows (smoke tests)")
            p.add_argument("--runs", default=None, help="comma-separated run names (default: the non-optional runs)")
            p.add_argument("--with-optional", action="store_true", help="also the runs marked optional (lr check)")
            p.add_argument("--variants", default=None, help="comma-separated variant names (default: all)")
        else:
            p.add_argument("--budgets", default=None, help="comma-separated token budgets, e.g. 0.4M,4M,20M")
    p = sub.add_parser("merge", help="combine invariance result files (e.g. one process per variant)")
    p.add_argument("parts", nargs="+", help="result JSONs of `invariance`")
    p.add_argument("--output", required=True, help="merged result JSON (+ .md, and .png with matplotlib)")
    p = sub.add_parser("sweep", help="one markdown table of the learned runs of several result files (CPU)")
    p.add_argument("parts", nargs="+", help="result JSONs of `invariance` / `budget` (e.g. one per --learn-flags)")
    p.add_argument("--output", required=True, help="markdown file")
    p.add_argument("--title", default="Recipe sweep", help="the table's heading")
    p.add_argument("--note", default="", help="a paragraph under the heading (conditions, caveats)")
    p = sub.add_parser("plot", help="charts and tables from result files (CPU)")
    p.add_argument("--budget", default=None, help="result JSON of `budget`")
    p.add_argument("--transfer", default=None, help="result JSON of `invariance`")
    p.add_argument("--reference-variant", default="x1", help="transfer variant whose rows are references in the chart")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = recorded_command(__file__, argv)  # what every file and table this run writes records
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "merge":
        return run_merge(args)
    if args.command == "sweep":
        return run_sweep(args)
    if args.command == "plot":
        if not (args.budget or args.transfer):
            raise SystemExit("plot needs --budget and/or --transfer")
        return run_plot(args)
    if args.tiny:
        for key, value in TINY.items():
            if getattr(args, key, None) is None and hasattr(args, key):
                setattr(args, key, value)
    return run_invariance(args) if args.command == "invariance" else run_budget(args)


if __name__ == "__main__":
    sys.exit(main())
