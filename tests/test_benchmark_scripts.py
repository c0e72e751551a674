"""The pure helpers of the benchmark scripts (the scripts themselves need a GPU and run on the device machine)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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
