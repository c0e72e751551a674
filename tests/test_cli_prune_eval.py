"""CLI: `proxsparse prune`, `proxsparse eval`, `proxsparse compare` on a tiny saved model."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from test_evaluation import CORPUS, byte_model, byte_tokenizer, write_jsonl

from proxsparse_hf.artefacts.output_dir import load_output_dir
from proxsparse_hf.commands import compare as compare_cmd
from proxsparse_hf.commands import eval as eval_cmd
from proxsparse_hf.commands import prune as prune_cmd
from proxsparse_hf.constants import EVAL_RESULTS_NAME
from proxsparse_hf.evaluation import EvalResults
from proxsparse_hf.masks import load_masks


def run_cli(argv: list[str]) -> int:
    """Parse and run one of this module's commands the way `proxsparse_hf.cli.main` does."""
    parser = argparse.ArgumentParser(prog="proxsparse")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (prune_cmd, eval_cmd, compare_cmd):
        module.register(subparsers).set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return args._run(args)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny saved llama (byte tokenizer) and a small calibration / evaluation corpus."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = str(root / "tiny-llama")
    byte_model().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    corpus = write_jsonl(root / "corpus.jsonl", CORPUS * 6)
    return {"root": root, "model": model_dir, "corpus": corpus}


CALIB = ["--n-samples", "4", "--seq-len", "32", "--no-progress"]


def calib_args(ws) -> list[str]:
    return ["--calibration", ws["corpus"], *CALIB]


def test_prune_magnitude_writes_standard_output(workspace):
    out = str(workspace["root"] / "magnitude")
    assert run_cli(["prune", workspace["model"], "--method", "magnitude", "-o", out, "--no-progress"]) == 0
    output = load_output_dir(out)
    assert output.method == "magnitude" and output.report.all_2to4
    assert output.run_info["calibration"] is None and output.run_info["command"].startswith("proxsparse")
    assert output.run_info["wall_time_s"] > 0 and output.config.base_model_name_or_path == workspace["model"]
    assert len(output.load_masks()) == 14


def test_prune_sparsegpt_mask_only_keeps_original_weights(workspace):
    from safetensors.torch import load_file

    out = str(workspace["root"] / "sparsegpt-mask")
    argv = [
        "prune",
        workspace["model"],
        "--method",
        "sparsegpt",
        "--no-update-weights",
        "-o",
        out,
        *calib_args(workspace),
    ]
    assert run_cli(argv) == 0
    output = load_output_dir(out)
    assert output.method == "sparsegpt" and output.report.all_2to4
    assert output.run_info["method_config"]["update_weights"] is False
    calibration = output.run_info["calibration"]
    assert (calibration["n_samples"], calibration["seq_len"], calibration["source"]) == (4, 32, workspace["corpus"])
    original = load_file(os.path.join(workspace["model"], "model.safetensors"))
    pruned = load_file(os.path.join(out, "model.safetensors"))
    masks = load_masks(os.path.join(out, "proxsparse_masks.safetensors"))
    for name, mask in masks.items():
        torch.testing.assert_close(pruned[name], original[name] * mask, rtol=0, atol=0)


def test_prune_wanda_then_eval_output_folder(workspace):
    out = str(workspace["root"] / "wanda")
    assert run_cli(["prune", workspace["model"], "--method", "wanda", "-o", out, *calib_args(workspace)]) == 0
    argv = ["eval", out, "--datasets", workspace["corpus"], "--eval-seq-len", "16", "--no-progress"]
    assert run_cli(argv) == 0
    results = EvalResults.load(os.path.join(out, EVAL_RESULTS_NAME))
    assert results.method == "wanda" and results.model == out
    assert results.method_config["calibration"]["n_samples"] == 4
    assert results.sparsity["all_2to4"] is True
    entry = results.perplexity[workspace["corpus"]]
    assert entry["seq_len"] == 16 and entry["ppl"] > 1
    assert load_output_dir(out).eval_results["method"] == "wanda"


def test_eval_dense_model_needs_output(workspace, tmp_path):
    with pytest.raises(ValueError, match=r"is not a proxsparse output folder; pass --output"):
        run_cli(["eval", workspace["model"], "--datasets", workspace["corpus"]])
    target = str(tmp_path / "dense.json")
    argv = ["eval", workspace["model"], "--datasets", workspace["corpus"], "--eval-seq-len", "16", "--output", target]
    assert run_cli([*argv, "--no-progress"]) == 0
    results = EvalResults.load(target)
    assert results.method == "dense" and results.sparsity["all_2to4"] is False
    argv[-1] = str(tmp_path / "folder")
    assert run_cli([*argv, "--no-progress"]) == 0
    assert EvalResults.load(str(tmp_path / "folder")).ppl(workspace["corpus"]) == pytest.approx(
        results.ppl(workspace["corpus"])
    )


def test_compare_writes_table_json_and_chart(workspace, tmp_path, capsys):
    learned = str(workspace["root"] / "learned-like")
    run_cli(["prune", workspace["model"], "--method", "magnitude", "-o", learned, "--no-progress"])
    out = str(tmp_path / "cmp")
    argv = [
        "compare",
        workspace["model"],
        "--methods",
        "magnitude,dense,wanda,sparsegpt,sparsegpt-mask",
        "--learned",
        learned,
        "--output",
        out,
        "--datasets",
        workspace["corpus"],
        "--eval-seq-len",
        "16",
        *calib_args(workspace),
    ]
    assert run_cli(argv) == 0
    with open(os.path.join(out, "comparison.json"), encoding="utf-8") as fh:
        payload = json.load(fh)
    labels = [row["label"] for row in payload["results"]]
    assert labels == ["magnitude", "dense", "wanda", "sparsegpt", "sparsegpt-mask", "magnitude (learned-like)"]
    results = [EvalResults.from_dict(row["eval_results"]) for row in payload["results"]]
    ppl = {label: r.ppl(workspace["corpus"]) for label, r in zip(labels, results)}
    # dense is evaluated after magnitude: the original weights were restored in between
    dense = EvalResults.load(_dense_reference(workspace))
    assert ppl["dense"] == pytest.approx(dense.ppl(workspace["corpus"]), rel=1e-6)
    assert ppl["magnitude"] == pytest.approx(ppl["magnitude (learned-like)"], rel=1e-6)
    assert results[1].sparsity["all_2to4"] is False and all(r.sparsity["all_2to4"] for r in results[2:])
    assert results[4].label == "sparsegpt-mask" and results[4].method_config["update_weights"] is False
    table = open(os.path.join(out, "comparison.md"), encoding="utf-8").read()
    assert "| sparsegpt-mask |" in table and "| magnitude (learned-like) |" in table
    assert "sparsegpt-mask" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    with open(os.path.join(out, "comparison.png"), "rb") as fh:
        assert fh.read(4) == b"\x89PNG"


def _dense_reference(workspace) -> str:
    target = os.path.join(workspace["root"], "dense-ref.json")
    argv = ["eval", workspace["model"], "--datasets", workspace["corpus"], "--eval-seq-len", "16", "--output", target]
    run_cli([*argv, "--no-progress"])
    return target


@pytest.mark.parametrize(
    ("argv", "error", "match"),
    [
        (["compare", "M", "--methods", "dense,obs", "-o", "x"], ValueError, r"`--methods`='dense,obs' is invalid"),
        (
            ["prune", "M", "--method", "wanda", "--no-update-weights", "-o", "x"],
            ValueError,
            r"only applies to --method",
        ),
    ],
)
def test_cli_errors(argv, error, match, workspace, tmp_path):
    argv = [workspace["model"] if a == "M" else str(tmp_path / a) if a == "x" else a for a in argv]
    with pytest.raises(error, match=match):
        run_cli(argv)


def test_cli_unknown_method_is_rejected_by_argparse(workspace, capsys):
    with pytest.raises(SystemExit):
        run_cli(["prune", workspace["model"], "--method", "obs", "-o", "x"])
    assert "invalid choice: 'obs'" in capsys.readouterr().err


def test_prune_refuses_non_empty_output(workspace):
    out = workspace["root"] / "taken"
    out.mkdir()
    (out / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"exists and is not empty"):
        run_cli(["prune", workspace["model"], "--method", "magnitude", "-o", str(out)])


def test_prune_calibration_too_small(workspace):
    argv = ["prune", workspace["model"], "--method", "wanda", "-o", str(workspace["root"] / "never")]
    with pytest.raises(ValueError, match=r"`n_samples`=999 windows of 32 tokens requested"):
        run_cli([*argv, "--calibration", workspace["corpus"], "--n-samples", "999", "--seq-len", "32"])
