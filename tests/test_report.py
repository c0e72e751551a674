import json

import torch
from tiny_models import tiny_model

from proxsparse_hf import apply_2to4_masks, extract_2to4_masks, sparsity_report
from proxsparse_hf.report import SparsityReport


def test_report_dense_then_pruned(tmp_path):
    model = tiny_model("llama")
    dense = sparsity_report(model)
    assert not dense.all_2to4 and dense.target_sparsity == 0.0 and dense.num_2to4_layers == 0
    assert dense.dense_modules == ["lm_head"]
    apply_2to4_masks(model, extract_2to4_masks(model))
    report = sparsity_report(model)
    assert report.all_2to4 and report.num_2to4_layers == 14
    assert report.target_sparsity == 0.5
    n_params = sum(p.numel() for p in model.parameters())
    assert report.total_params == n_params
    assert report.target_zeros == report.target_params // 2
    assert abs(report.overall_sparsity - report.total_zeros / n_params) < 1e-12
    row = report.layers[0]
    assert row.name == "model.layers.0.self_attn.q_proj.weight" and row.shape == [64, 64] and row.zeros == 2048
    report.save(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["totals"]["all_2to4"] is True and data["totals"]["num_target_layers"] == 14
    assert SparsityReport.load(tmp_path / "r.json") == report


def test_markdown_and_partial_layer():
    model = tiny_model("gpt2")
    apply_2to4_masks(model, extract_2to4_masks(model))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.fill_(1.0)
    report = sparsity_report(model)
    md = report.to_markdown(max_rows=2)
    assert "| layer | shape | sparsity | 2:4 groups | valid 2:4 |" in md
    assert "`transformer.h.0.attn.c_attn.weight` | 64×192 | 50.00% | 100.00% | yes |" in md
    assert "… 6 more layers" in md
    assert "7/8 target layers are valid 2:4" in md
    bad = [r for r in report.layers if not r.is_2to4]
    assert [r.name for r in bad] == ["transformer.h.1.mlp.c_fc.weight"] and bad[0].fraction_2to4_groups == 0.0
