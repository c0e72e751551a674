"""The pure helpers of the benchmark scripts (the scripts themselves need a GPU and run on the device machine)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "expected"),
    [  # names seen in an H200 profile of the compiled 7B-shaped prefill (benchmarks/results/*_profile_h200.json)
        ("sm90_xmma_sparse_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cgasize2x1x1_warpgroups", "sparse_gemm"),
        ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "dense_gemm"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1", "attention"),
        # Inductor kernels carry the names of the ops they fused: still element-wise work, not a matmul / attention
        ("triton_poi_fused__cslt_sparse_mm_mul_silu_t_view_3", "fused_elementwise"),
        ("triton_red_fused__cslt_sparse_mm__to_copy_add_mean_mul_pow_rsqrt_t_view_2", "fused_elementwise"),
        ("triton_poi_fused__scaled_dot_product_cudnn_attention_add_cat_mul_neg_slice_transpose", "fused_elementwise"),
        ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda", "copy"),
        ("Memset (Unknown)", "other"),
    ],
)
def test_profiled_kernels_are_classified_by_the_work_they_do(name, expected):
    assert _load("inference_2to4").kernel_class(name) == expected


def test_parse_gpu_samples_takes_medians_and_skips_unreadable_lines():
    parse = _load("inference_2to4").parse_gpu_samples
    text = "1980, 450.1\n1500, 699.0\n[N/A], 12\n1605, 690.5\n\n"
    assert parse(text) == {"sm_clock_mhz": 1605.0, "power_w": 690.5, "samples": 3}
    assert parse("") == {} and parse("[N/A], [N/A]") == {}


def test_cusparselt_algs_refuses_cleanly_without_sparse_kernels(tmp_path, capsys):
    import torch

    module = _load("cusparselt_algs")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the sweep itself")
    out = tmp_path / "algs.json"
    assert module.main(["--out", str(out), "--shapes", "gate_up", "gate_up_fused", "--copies", "8"]) == 1
    assert "skipped" in capsys.readouterr().out and not out.exists()
    with pytest.raises(SystemExit):  # argparse names the allowed shapes
        module.main(["--out", str(out), "--shapes", "lm_head"])
    assert "invalid choice: 'lm_head'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        module.main(["--out", str(out), "--copies", "0"])
    assert "--copies must be >= 1, got 0" in capsys.readouterr().err


def test_interleaved_rounds_alternate_the_order_every_round():
    module = _load("inference_2to4")
    calls = []

    def measure(key):
        def run():
            calls.append(key)
            return len(calls)

        return run

    results = module.interleaved_rounds({"dense": measure("dense"), "sparse": measure("sparse")}, rounds=3)
    assert calls == ["dense", "sparse", "sparse", "dense", "dense", "sparse"]
    assert results == {"dense": [1, 4, 5], "sparse": [2, 3, 6]}


def test_warm_then_interleave_runs_the_warm_ups_first_and_drops_them():
    calls = []

    def measure(key):
        return lambda: calls.append(key) or len(calls)

    module = _load("inference_2to4")
    results = module._warm_then_interleave({"a": measure("a"), "b": measure("b")}, rounds=2, warmups=2)
    assert calls == ["a", "a", "b", "b", "a", "b", "b", "a"]
    assert results == {"a": [5, 8], "b": [6, 7]}


def test_paired_speedup_is_the_ratio_of_median_round_times_with_every_round_ratio():
    paired = _load("inference_2to4").paired_speedup
    result = paired([10.0, 12.0, 11.0], [8.0, 8.0, 10.0])
    assert result == {"speedup": 1.375, "speedup_per_round": [1.25, 1.5, 1.1], "speedup_min_max": [1.1, 1.5]}
    with pytest.raises(ValueError, match="same non-zero number of rounds, got 2 and 1"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="got 0 and 0"):
        paired([], [])


def test_relative_error_is_scale_free():
    import torch

    rel = _load("inference_2to4").relative_error
    reference = torch.tensor([3.0, 4.0], dtype=torch.bfloat16)
    assert rel(reference, reference) == 0.0
    assert rel(torch.tensor([3.0, 4.5]), reference) == pytest.approx(0.1)
    assert rel(torch.tensor([300.0, 450.0]), reference * 100) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--prefill", "2048", "0"], "--prefill must be >= 1, got 0"),
        (["--new-tokens", "1"], "--new-tokens must be >= 2, got 1"),
        (["--batches", "-3"], "--batches must be >= 1, got -3"),
    ],
)
def test_inference_benchmark_refuses_bad_counts_before_any_work(tmp_path, capsys, args, message):
    module = _load("inference_2to4")
    out = tmp_path / "inference.json"
    with pytest.raises(SystemExit):
        module.main(["--part", "compiled", "--out", str(out), *args])
    assert message in capsys.readouterr().err and not out.exists()


def test_decode_rows_give_whole_generate_and_decode_only_speedups():
    rows = _load("inference_2to4")._decode_rows(
        4,
        11,
        {
            "dense": [{"total": 2.0, "decode": 1.0}, {"total": 3.0, "decode": 2.0}],
            "2:4": [{"total": 2.0, "decode": 1.0}, {"total": 2.0, "decode": 1.0}],
        },
        "eager",
    )
    dense, converted = rows
    assert dense["tokens_per_s"] == round(4 * 11 / 2.5, 2) and dense["decode_tokens_per_s"] == round(4 * 10 / 1.5, 2)
    assert "speedup" not in dense and converted["how"] == "eager" and converted["model"] == "2:4"
    assert converted["speedup"] == 1.25 and converted["speedup_per_round"] == [1.0, 1.5]
    assert converted["decode_speedup"] == 1.5 and converted["decode_speedup_min_max"] == [1.0, 2.0]


def test_dispatch_overhead_measures_both_modules_on_cpu(tmp_path, capsys):
    module = _load("dispatch_overhead")
    out = tmp_path / "overhead.json"
    assert (
        module.main(["--device", "cpu", "--features", "16", "--calls", "20", "--blocks", "2", "--out", str(out)]) == 0
    )
    (row,) = json.loads(out.read_text())["results"]
    assert row["backend"] == "dense" and row["layer"] == "16x16 float32" and row["blocks"] == 2
    assert row["linear_us_per_call"] > 0 and row["wrapper_us_per_call"] > 0
    difference = row["wrapper_us_per_call"] - row["linear_us_per_call"]  # of the unrounded medians, then rounded
    assert row["extra_us_per_call"] == pytest.approx(difference, abs=1.5e-3)
    assert json.loads(capsys.readouterr().out) == row
    for args, message in ((["--features", "6"], "multiple of 4"), (["--calls", "0"], "--calls must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            module.main(["--device", "cpu", "--out", str(tmp_path / "bad.json"), *args])
        assert message in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


# ------------------------------------------------------------------------------------------------ quality benchmarks
def _quality_experiment(tmp_path, corpus: str, model_dir: str) -> Path:
    experiment = {
        "model": model_dir,
        "seed": 0,
        "calibration": {"dataset": corpus, "start": 0, "stop": None, "seq_len": 32, "n_samples": 4},
        "evaluation": {"datasets": [corpus], "seq_len": 16, "batch_size": 2, "max_windows": 4},
        "runs": [
            {"name": "dense", "method": "dense"},
            {"name": "magnitude", "method": "magnitude"},
            {"name": "sparsegpt-mask", "method": "sparsegpt", "options": {"update_weights": False}},
            {"name": "sparsegpt", "method": "sparsegpt"},
            {
                "name": "ps",
                "method": "proxsparse",
                "config": {"lambda1": 0.1},
                "training": {"learning_rate": 1e-3, "warmup_ratio": 0.0, "unknown_key": 1},
                "logging_steps": 1,
            },
        ],
    }
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(experiment))
    return path


def test_quality_run_options_come_from_the_experiment_and_the_registry():
    quality = _load("quality")
    exp = {"seed": 3, "runs": []}
    learned = quality.method_run(
        exp,
        {"name": "ps", "method": "proxsparse", "training": {"learning_rate": 1e-3, "other": 1}, "config": {}},
        max_steps=5,
        solver_backend="torch",
    )
    assert learned.name == "ps" and learned.config.solver_backend == "torch"
    assert dict(learned.options) == {"learning_rate": 1e-3, "max_steps": 5, "logging_steps": 10, "seed": 3}
    mask = quality.method_run(exp, {"name": "m", "method": "sparsegpt", "options": {"update_weights": False}})
    full = quality.method_run(exp, {"name": "s", "method": "sparsegpt"})
    wanda = quality.method_run(exp, {"name": "w", "method": "wanda", "description": "d"})
    assert [quality.mask_only(r) for r in (mask, full, wanda)] == [True, False, True]
    permuted = quality.method_run(exp, {"name": "w+p", "method": "wanda", "permute": {"importance": "ria"}})
    assert permuted.permute == {"importance": "ria"} and wanda.permute is None and not quality.mask_only(permuted)
    assert wanda.description == "d" and dict(full.options) == {}
    with pytest.raises(ValueError, match=r"`method`='obs' is invalid"):
        quality.method_run(exp, {"name": "o", "method": "obs"})


def test_quality_scripts_run_through_the_comparison_runner(tmp_path, capsys):
    """quality.py → comparison file + table + mask adapters; plot_quality.py → figures; quality_zeroshot.py → the
    saved masks scored zero-shot. A tiny model on the CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_evaluation import CORPUS, ZEROSHOT_DIR, byte_model, byte_tokenizer, write_jsonl

    from proxsparse_hf.evaluation import load_comparison

    model_dir = str(tmp_path / "tiny")
    byte_model().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", CORPUS * 6)
    experiment = _quality_experiment(tmp_path, corpus, model_dir)
    out, masks = tmp_path / "quality.json", tmp_path / "masks"
    argv = [str(experiment), "--output", str(out), "--save-masks", str(masks), "--max-steps", "2", "--device", "cpu"]
    assert _load("quality").main(argv) == 0
    # (the Trainer prints its own log dicts to stdout too, as Python reprs)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"')]
    assert [line["name"] for line in lines] == ["dense", "magnitude", "sparsegpt-mask", "sparsegpt", "ps"]
    results = load_comparison(out)
    by_label = {r.label: r for r in results}
    assert list(by_label) == [line["name"] for line in lines]
    assert all(r.perplexity["corpus.jsonl"]["num_windows"] == 4 for r in results)
    assert by_label["ps"].telemetry and by_label["ps"].method_config["training"]["max_steps"] == 2
    assert by_label["sparsegpt-mask"].method_config["calibration"]["n_samples"] == 4
    assert [r.sparsity["all_2to4"] for r in results] == [False, True, True, True, True]
    assert "| ps | proxsparse |" in (tmp_path / "quality.md").read_text()
    assert sorted(os.listdir(masks)) == ["magnitude", "ps", "sparsegpt-mask"]  # mask-only runs
    assert str(tmp_path) not in out.read_text()
    meta = json.loads(out.read_text())
    # the command, with local paths reduced to names like everything else in the file
    assert meta["command"] == "python quality.py experiment.json --output quality.json --save-masks masks " + (
        "--max-steps 2 --device cpu"
    )
    assert meta["hardware"]["cpu_count"] >= 1 and meta["versions"]["torch"] == torch.__version__
    table = (tmp_path / "quality.md").read_text()
    assert f"Command: `{meta['command']}`" in table and str(tmp_path) not in table
    (tmp_path / "quality.md").unlink()  # --table-only rebuilds it from the results file alone
    assert _load("quality").main([str(experiment), "--output", str(out), "--table-only"]) == 0
    assert (tmp_path / "quality.md").read_text() == table
    with pytest.raises(SystemExit):
        _load("quality").main([str(experiment), "--output", str(tmp_path / "none.json"), "--table-only"])

    # re-running one run keeps the others
    assert _load("quality").main([*argv[:3], "--runs", "dense", "--device", "cpu"]) == 0
    assert [r.label for r in load_comparison(out)] == ["magnitude", "sparsegpt-mask", "sparsegpt", "ps", "dense"]
    with pytest.raises(SystemExit):
        _load("quality").main([*argv[:3], "--runs", "nope"])
    assert "unknown run(s) ['nope']" in capsys.readouterr().err

    pytest.importorskip("matplotlib")
    assert _load("plot_quality").main([str(out), "--runs", "dense,ps,magnitude"]) == 0
    for suffix in ("_ppl.png", "_telemetry.png"):
        assert (tmp_path / f"quality{suffix}").read_bytes()[:4] == b"\x89PNG"

    pytest.importorskip("lm_eval")
    data_dir = tmp_path / "zeroshot"
    data_dir.mkdir()
    with open(os.path.join(ZEROSHOT_DIR, "piqa.jsonl"), encoding="utf-8") as src:
        (data_dir / "piqa.jsonl").write_text("".join(next(src) for _ in range(4)), encoding="utf-8")
    zs_out = tmp_path / "zeroshot.json"
    zs_argv = [str(experiment), "--runs", "dense,ps,wanda-like", "--masks", str(masks), "--tasks", "piqa"]
    with pytest.raises(SystemExit):
        _load("quality_zeroshot").main([*zs_argv, "--output", str(zs_out)])
    assert "unknown run(s) ['wanda-like']" in capsys.readouterr().err
    zs_argv = [str(experiment), "--runs", "dense,ps,sparsegpt", "--masks", str(masks), "--tasks", "piqa"]
    zs_argv += ["--limit", "2", "--batch-size", "2", "--data-dir", str(data_dir), "--output", str(zs_out)]
    assert _load("quality_zeroshot").main(zs_argv) == 0
    scored = {r.label: r for r in load_comparison(zs_out)}
    assert list(scored) == ["dense", "ps", "sparsegpt"]
    assert all(r.zeroshot["piqa"]["num_samples"] == 2 and r.perplexity == {} for r in scored.values())
    assert scored["ps"].method_config["mask_source"] == "ps" and scored["ps"].sparsity["all_2to4"] is True
    assert scored["sparsegpt"].method_config["calibration"]["n_samples"] == 4  # pruned here
