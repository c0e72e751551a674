"""``benchmarks/learn_scale.py`` on the CPU: the 7B path with a tiny Llama, the plan selection, the SmolLM2 path with a
tiny model and corpus, and the argument checks (the real runs need a GPU and run on the device machine)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tiny_data import write_jsonl
from tiny_models import tiny_corpus, tiny_model, tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "learn_scale.py"


def _load():
    spec = importlib.util.spec_from_file_location("learn_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["learn_scale"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_7b_path_on_a_tiny_llama_writes_every_headline_field(tmp_path, capsys):
    module = _load()
    out = tmp_path / "scale.json"
    argv = ["--part", "7b", "--tiny", "--device", "cpu", "--steps", "3", "--seq-len", "32", "--logging-steps", "1"]
    argv += ["--candidates", "1/on", "--output", str(out)]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "learn_scale: 7B tokens/s" in printed and str(out) in printed
    data = json.loads(out.read_text())
    for key in ("mfu", "budget_minutes", "callback_overhead_fraction", "tokens_per_s", "prox_fraction_of_step"):
        assert _finite(data[key]), key
    assert data["peak_gpu_memory_gib"] is None  # no GPU here
    assert data["budget_tokens"] == 400 * 32 and data["peak_flops"] == 989e12
    assert data["commands"]["7b"].startswith("python learn_scale.py --part 7b --tiny")  # paths by portable names
    assert str(tmp_path) not in data["commands"]["7b"] and "--output scale.json" in data["commands"]["7b"]
    assert data["hardware"]["gpu"] is None and "torch" in data["versions"]
    part = data["llama2_7b_shaped"]
    main, base = part["with_callback"], part["without_callback"]
    assert part["chosen_plan"] == "1/on/adamw_torch_fused" and part["probes"] == []
    assert main["status"] == base["status"] == "ok"
    assert main["steps"] == base["steps"] == 3 and main["measured_steps"] == 1  # warm-up steps left out
    # the same parameters train with and without the callback: the targets only, with bf16 optimizer state
    assert main["trainable_params"] == base["trainable_params"] < main["n_params"]
    assert main["optimizer_state_dtypes"] == ["bfloat16"] and main["weight_dtype"] == "bfloat16"
    assert main["snapshot"]["device"] == "cpu" and main["snapshot"]["dtype"] == "bfloat16"
    assert abs(main["layer_weight_rms"] - 0.02) < 0.002
    # telemetry keeps working: logged every step, ProxSparse metrics present
    assert main["telemetry_logged_steps"] == [1, 2, 3] and "proxsparse/frac_2to4" in main["telemetry_last"]
    assert main["target_layers_2to4"] == main["target_layers"] == 14
    assert main["phases_gpu_ms"]["prox"]["mean_ms"] > 0 and main["phases_gpu_ms"]["telemetry"]["steps"] == 1
    assert data["mfu"] == pytest.approx(6 * main["n_params"] * main["tokens_per_s"] / 989e12)
    assert data["callback_overhead_fraction"] == pytest.approx(main["step_s_mean"] / base["step_s_mean"] - 1)


def test_gradient_accumulation_counts_every_micro_batch_of_an_optimizer_step(tmp_path):
    module = _load()
    out = tmp_path / "scale.json"
    argv = ["--part", "7b", "--tiny", "--device", "cpu", "--steps", "3", "--warmup-steps", "1", "--seq-len", "32"]
    argv += ["--candidates", "1/off", "--grad-accum", "2", "--output", str(out)]
    assert module.main(argv) == 0
    data = json.loads(out.read_text())
    main, base = data["llama2_7b_shaped"]["with_callback"], data["llama2_7b_shaped"]["without_callback"]
    assert main["gradient_accumulation_steps"] == base["gradient_accumulation_steps"] == 2
    assert main["steps"] == base["steps"] == 3 and len(main["step_seconds"]) == 3  # optimizer steps, not micro-batches
    assert main["tokens_per_step"] == 2 * 32
    assert main["tokens_per_s"] == pytest.approx(64 * 2 / sum(main["step_seconds"][1:]), rel=1e-3)  # 5-digit rounding
    assert "--grad-accum 2" in data["commands"]["7b"]


def _fake_run(statuses: dict[str, str], calls: list):
    def run(plan, args, *, with_callback, steps, warmup, deadline):
        calls.append((plan.name, with_callback, steps))
        if statuses[plan.name] == "out_of_memory":
            return {"plan": plan.name, "status": "out_of_memory", "error": "CUDA out of memory", "wall_s": 1.0}
        speed = {"1/off/adamw_torch_fused": 300.0, "1/on/adamw_torch_fused": 200.0, "2/on/adamw_torch_fused": 250.0}
        tps = speed[plan.name] * (1.0 if with_callback else 1.02)
        return {
            "plan": plan.name,
            "status": "ok",
            "steps": steps,
            "tokens_per_s": tps,
            "step_s_mean": 100.0 / tps,
            "step_s_mean_non_logging": 90.0 / tps,
            "n_params": 1000,
            "wall_s": 1.0,
            "setup_s": 0.5,
            "end_s": 0.5,
            "peak_gpu_memory_gib": 10.0,
            "prox_fraction_of_step": 0.01,
        }

    return run


def test_probes_skip_plans_that_run_out_of_memory_and_measure_the_fastest(monkeypatch, capsys):
    module = _load()
    calls: list = []
    statuses = {
        "1/off/adamw_torch_fused": "out_of_memory",
        "1/on/adamw_torch_fused": "ok",
        "2/on/adamw_torch_fused": "ok",
    }
    monkeypatch.setattr(module, "run_7b_plan", _fake_run(statuses, calls))
    args = module.build_parser().parse_args(["--steps", "20", "--probe-steps", "5", "--seq-len", "4096"])
    args.device = "cpu"
    part = module.part_7b(args)
    assert [c[0] for c in calls[:3]] == ["1/off/adamw_torch_fused", "1/on/adamw_torch_fused", "2/on/adamw_torch_fused"]
    assert all(c[1] and c[2] == 5 for c in calls[:3])  # probes: with the callback, --probe-steps steps
    # the fastest plan that fitted is measured with and then without the callback
    assert calls[3:] == [("2/on/adamw_torch_fused", True, 20), ("2/on/adamw_torch_fused", False, 20)]
    assert part["chosen_plan"] == "2/on/adamw_torch_fused"
    assert [p["status"] for p in part["probes"]] == ["out_of_memory", "ok", "ok"]
    head = part["headline"]
    assert head["tokens_per_s"] == 250.0 and head["mfu"] == pytest.approx(6 * 1000 * 250.0 / 989e12)
    assert head["budget_minutes"] == pytest.approx(400 * 4096 / 250.0 / 60)
    assert head["callback_overhead_fraction"] == pytest.approx(0.02)
    assert '"status": "out_of_memory"' in capsys.readouterr().out


def test_a_plan_is_not_probed_when_the_main_runs_would_miss_the_time_limit(monkeypatch):
    module = _load()
    calls: list = []
    statuses = dict.fromkeys(("1/off/adamw_torch_fused", "1/on/adamw_torch_fused", "2/on/adamw_torch_fused"), "ok")
    run = _fake_run(statuses, calls)

    def slow(plan, args, **kwargs):
        record = run(plan, args, **kwargs)
        record["wall_s"] = 100.0  # a probe of 100 s leaves no room for two more runs in 150 s
        return record

    monkeypatch.setattr(module, "run_7b_plan", slow)
    args = module.build_parser().parse_args(["--steps", "20", "--probe-steps", "5", "--time-limit-s", "150"])
    args.device, args.seq_len = "cpu", 4096
    part = module.part_7b(args)
    assert [p["status"] for p in part["probes"]] == ["ok", "skipped_for_time", "skipped_for_time"]
    assert part["chosen_plan"] == "1/off/adamw_torch_fused"


def _tiny_assets(tmp_path: Path) -> tuple[Path, Path]:
    model_dir = tmp_path / "model"
    tiny_model("llama", hidden=64, vocab=128).save_pretrained(model_dir)
    tiny_tokenizer(128).save_pretrained(model_dir)
    data = tmp_path / "data"
    (data / "c4-validation-2k").mkdir(parents=True)
    (data / "wikitext-2-raw-v1").mkdir(parents=True)
    write_jsonl(data / "c4-validation-2k" / "c4_validation_2k.jsonl", tiny_corpus(n_docs=30, seed=1))
    write_jsonl(data / "wikitext-2-raw-v1" / "test.jsonl", tiny_corpus(n_docs=10, seed=2))
    return model_dir, data


def test_smollm2_path_learns_each_setting_and_scores_every_mask(tmp_path, monkeypatch):
    module = _load()
    model_dir, data = _tiny_assets(tmp_path)
    # main() points $PROXSPARSE_DATA_DIR at --data-dir; setting it here first makes monkeypatch restore it afterwards
    monkeypatch.setenv("PROXSPARSE_DATA_DIR", str(data))
    out = tmp_path / "scale.json"
    out.write_text(json.dumps({"mfu": 0.4, "commands": {"7b": "earlier 7b command"}}))  # a 7b part already there
    argv = ["--part", "smollm2", "--device", "cpu", "--smollm2-model", str(model_dir), "--data-dir", str(data)]
    argv += ["--smollm2-runs", "fp32_b2,fp32_b4,amp_b4,bf16w_b4_adamw_torch", "--smollm2-fast", "amp_b4"]
    argv += ["--smollm2-samples", "8", "--smollm2-seq-len", "32", "--smollm2-eval-windows", "2"]
    argv += ["--logging-steps", "1", "--output", str(out)]
    assert module.main(argv) == 0
    data_out = json.loads(out.read_text())
    assert data_out["mfu"] == 0.4 and data_out["commands"]["7b"] == "earlier 7b command"  # merged, not replaced
    part = data_out["smollm2"]
    runs = {r["name"]: r for r in part["runs"]}
    assert list(runs) == ["fp32_b2", "fp32_b4", "amp_b4", "bf16w_b4_adamw_torch"] and part["reference"] == "fp32_b2"
    assert runs["fp32_b2"]["steps"] == 4 and runs["amp_b4"]["steps"] == 2  # one epoch of the same 8 windows
    assert runs["amp_b4"]["bf16_autocast"] and runs["amp_b4"]["weight_dtype"] == "float32"
    assert runs["bf16w_b4_adamw_torch"]["weight_dtype"] == "bfloat16"
    assert runs["bf16w_b4_adamw_torch"]["optim"] == "adamw_torch"
    assert runs["bf16w_b4_adamw_torch"]["optimizer_state_dtypes"] == ["bfloat16"]
    assert runs["fp32_b2"]["optimizer_state_dtypes"] == ["float32"]
    for run in runs.values():
        assert (
            _finite(run["tokens_per_s"]) and _finite(run["wikitext2"]["ppl"]) and run["wikitext2"]["num_windows"] == 2
        )
        assert 0.0 <= run["mask_agreement_with_reference"] <= 1.0 and run["telemetry_logged_steps"]
    assert runs["fp32_b2"]["ppl_ratio_to_reference"] == 1.0 and runs["fp32_b2"]["mask_agreement_with_reference"] == 1.0
    assert data_out["smollm2_tokens_per_s"] == runs["amp_b4"]["tokens_per_s"]
    assert data_out["smollm2_ppl_ratio"] == pytest.approx(
        runs["amp_b4"]["wikitext2"]["ppl"] / runs["fp32_b2"]["wikitext2"]["ppl"]
    )
    # the 2 % target compares a precision with fp32 at the same micro-batch and optimizer (the same recipe)
    assert runs["amp_b4"]["fp32_same_recipe"] == "fp32_b4" and runs["fp32_b4"]["fp32_same_recipe"] == "fp32_b4"
    assert runs["amp_b4"]["ppl_ratio_to_fp32_same_recipe"] == pytest.approx(
        runs["amp_b4"]["wikitext2"]["ppl"] / runs["fp32_b4"]["wikitext2"]["ppl"]
    )
    assert "fp32_same_recipe" not in runs["bf16w_b4_adamw_torch"]  # no fp32 run with adamw_torch at batch 4
    assert 0.0 <= runs["amp_b4"]["mask_agreement_with_fp32_same_recipe"] <= 1.0
    assert data_out["smollm2_ppl_ratio_same_recipe"] == runs["amp_b4"]["ppl_ratio_to_fp32_same_recipe"]
    ratio = data_out["smollm2_ppl_ratio_same_recipe"]
    assert data_out["targets_met"]["smollm2_ppl_within_2pct"] is (ratio <= 1.02)
    # the fast setting again without the callback: the callback's cost per step
    assert part["without_callback"]["status"] == "ok" and part["without_callback"]["with_callback"] is False
    assert part["without_callback"]["batch_size"] == 4 and part["without_callback"]["steps"] == 2
    assert data_out["smollm2_callback_overhead_fraction"] == pytest.approx(
        runs["amp_b4"]["step_s_mean"] / part["without_callback"]["step_s_mean"] - 1.0
    )
    assert _finite(part["dense"]["ppl"]) and part["calibration"]["n_samples"] == 8
    assert data_out["targets_met"]["smollm2_ppl_within_2pct"] in (True, False)
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--candidates", "1/maybe"], "BATCH/on|off"),
        (["--candidates", "1/on/adamw_nonsense"], "`optim`='adamw_nonsense' is invalid"),
        (["--smollm2-runs", "fp64_b2"], "PRECISION_bBATCH"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
        (["--gradient-checkpointing", "on"], "--gradient-checkpointing needs --batch-size"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(argv, message, capsys):
    with pytest.raises(SystemExit):
        _load().main(argv)
    assert message in capsys.readouterr().err


def test_plans_and_runs_parse(monkeypatch):
    module = _load()
    assert module.parse_plan("2/on", "adafactor") == module.Plan(2, True, "adafactor")
    assert module.parse_plan("1/off/adamw_torch", "adafactor").optim == "adamw_torch"
    run = module.parse_smol_run("bf16w_b16")
    assert (run.weight_dtype, run.amp, run.batch_size, run.optim) == (torch.bfloat16, False, 16, None)
    monkeypatch.setattr(module, "_installed", lambda package: package != "bitsandbytes")
    with pytest.raises(ValueError, match="needs the package 'bitsandbytes'"):
        module.check_optim("adamw_8bit")


def test_a_failing_run_is_recorded_and_the_exit_code_says_so(tmp_path, monkeypatch, capsys):
    module = _load()

    def planted(*args, **kwargs):
        raise ValueError("planted failure")

    monkeypatch.setattr(module, "train_once", planted)
    out = tmp_path / "scale.json"
    argv = ["--part", "7b", "--tiny", "--device", "cpu", "--candidates", "1/on", "--output", str(out)]
    assert module.main(argv) == 1
    assert "runs that failed with an error" in capsys.readouterr().out
    data = json.loads(out.read_text())  # written all the same
    main = data["llama2_7b_shaped"]["with_callback"]
    assert (
        main["status"] == "error" and main["error"] == "ValueError: planted failure" and "planted" in main["traceback"]
    )
    assert data["llama2_7b_shaped"]["without_callback"] is None and data["mfu"] is None
    assert data["targets_met"]["mfu>=0.35"] is None


def test_out_of_memory_is_told_apart_from_other_errors():
    module = _load()
    assert module.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert module.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not module.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not module.is_out_of_memory(ValueError("out of memory"))
