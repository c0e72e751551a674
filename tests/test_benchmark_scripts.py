"""The pure helpers of the benchmark scripts (the scripts themselves need a GPU and run on the device machine)."""

from __future__ import annotations

import importlib.util
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
