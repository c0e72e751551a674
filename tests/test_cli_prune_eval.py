"""CLI: `proxsparse prune`, `proxsparse eval`, `proxsparse compare` on a tiny saved model."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from test_evaluation import CORPUS, byte_model, byte_tokenizer, write_jsonl

from proxsparse_hf.artefacts import load_output_dir
from proxsparse_hf.cli import main as cli_main
from proxsparse_hf.commands import compare as compare_cmd
from proxsparse_hf.commands import eval as eval_cmd
from proxsparse_hf.commands import prune as prune_cmd
from proxsparse_hf.constants import EVAL_RESULTS_NAME
from proxsparse_hf.evaluation import EvalResults, load_comparison
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


def test_prune_magnitude_writes_standard_output(workspace, capsys):
    out = str(workspace["root"] / "magnitude")
    assert run_cli(["prune", workspace["model"], "--method", "magnitude", "-o", out, "--no-progress"]) == 0
    (line,) = capsys.readouterr().out.splitlines()  # one JSON result line on stdout
    summary = json.loads(line)
    assert summary["output_dir"] == out and summary["method"] == "magnitude"
    assert summary["layers_2to4"] == summary["target_layers"] == 14 and summary["target_sparsity"] == 0.5
    output = load_output_dir(out)
    assert output.method == "magnitude" and output.report.all_2to4
    assert output.run_info["calibration"] is None and output.run_info["command"].startswith("proxsparse")
    assert output.run_info["wall_time_s"] > 0 and output.config.base_model_name_or_path == "tiny-llama"
    for path in Path(out).rglob("*"):  # no local path in anything written
        assert str(workspace["root"]) not in path.read_bytes().decode("latin-1"), path.name
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
    assert (calibration["n_samples"], calibration["seq_len"], calibration["source"]) == (4, 32, "corpus.jsonl")
    original = load_file(os.path.join(workspace["model"], "model.safetensors"))
    pruned = load_file(os.path.join(out, "model.safetensors"))
    masks = load_masks(os.path.join(out, "proxsparse_masks.safetensors"))
    for name, mask in masks.items():
        torch.testing.assert_close(pruned[name], original[name] * mask, rtol=0, atol=0)


def test_prune_wanda_then_eval_output_folder(workspace, capsys):
    out = str(workspace["root"] / "wanda")
    assert run_cli(["prune", workspace["model"], "--method", "wanda", "-o", out, *calib_args(workspace)]) == 0
    capsys.readouterr()
    argv = ["eval", out, "--datasets", workspace["corpus"], "--eval-seq-len", "16", "--no-progress"]
    assert run_cli(argv) == 0
    path = os.path.join(out, EVAL_RESULTS_NAME)
    results = EvalResults.load(path)
    # local paths are recorded by name: the output folder, its base model, the dataset and the calibration file
    assert results.method == "wanda" and results.model == "wanda" and results.label == "wanda"
    assert results.method_config["base_model"] == "tiny-llama"
    assert results.method_config["calibration"]["n_samples"] == 4
    assert results.method_config["calibration"]["source"] == "corpus.jsonl"
    assert str(workspace["root"]) not in open(path, encoding="utf-8").read()
    assert results.sparsity["all_2to4"] is True
    entry = results.perplexity["corpus.jsonl"]
    assert entry["seq_len"] == 16 and entry["ppl"] > 1
    assert load_output_dir(out).eval_results["method"] == "wanda"
    (line,) = capsys.readouterr().out.splitlines()  # one summary line on stdout
    assert line == f"wanda (wanda): corpus.jsonl ppl {entry['ppl']:.2f} -> {path}"


def test_eval_any_model_writes_beside_it_or_to_output(workspace, tmp_path, capsys):
    base = ["--datasets", workspace["corpus"], "--eval-seq-len", "16", "--no-progress"]
    # a plain model folder: results in a folder of their own beside it; the model folder is left untouched
    before = sorted(os.listdir(workspace["model"]))
    assert run_cli(["eval", workspace["model"], *base]) == 0
    assert sorted(os.listdir(workspace["model"])) == before
    beside = os.path.join(workspace["root"], "tiny-llama-eval", EVAL_RESULTS_NAME)
    results = EvalResults.load(beside)
    assert results.method == "dense" and results.model == "tiny-llama" and results.sparsity["all_2to4"] is False
    assert capsys.readouterr().out.strip().endswith(f"-> {beside}")
    # --output: a .json file, or a folder that gets eval_results.json
    target = str(tmp_path / "dense.json")
    assert run_cli(["eval", workspace["model"], *base, "--output", target]) == 0
    assert EvalResults.load(target).ppl("corpus.jsonl") == pytest.approx(results.ppl("corpus.jsonl"), rel=1e-9)
    assert run_cli(["eval", workspace["model"], *base, "-o", str(tmp_path / "folder")]) == 0
    assert EvalResults.load(str(tmp_path / "folder")).ppl("corpus.jsonl") == pytest.approx(results.ppl("corpus.jsonl"))


def test_default_output_of_eval(workspace, tmp_path, monkeypatch):
    default_output = eval_cmd.default_output
    monkeypatch.chdir(tmp_path)
    out = str(workspace["root"] / "wanda-out")
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "proxsparse_config.json"), "w").close()
    assert default_output(out) == out  # an output folder owns its eval_results.json
    assert default_output(workspace["model"]) == os.path.join(workspace["root"], "tiny-llama-eval")
    gguf = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    assert default_output(str(gguf)) == str(tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1-eval")
    assert default_output(str(gguf.parent), "SmolLM2-135M-Instruct.Q4_1.gguf") == str(
        tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1-eval"
    )
    assert default_output("HuggingFaceTB/SmolLM2-135M") == str(tmp_path / "SmolLM2-135M-eval")


def test_eval_a_hub_model_by_id(workspace, hub_url, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    repo = "alice/tiny-llama-eval-test"
    HfApi().create_repo(repo, exist_ok=True)
    HfApi().upload_folder(repo_id=repo, folder_path=workspace["model"])
    monkeypatch.chdir(tmp_path)
    argv = ["eval", repo, "--datasets", workspace["corpus"], "--eval-seq-len", "16", "--no-progress"]
    assert run_cli(argv) == 0
    results = EvalResults.load(tmp_path / "tiny-llama-eval-test-eval" / EVAL_RESULTS_NAME)
    assert results.model == repo  # a Hub id is recorded as is
    assert capsys.readouterr().out.startswith(f"{repo} (dense): corpus.jsonl ppl ")


def test_compare_writes_table_json_and_chart(workspace, tmp_path, capsys, monkeypatch):
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
    monkeypatch.setattr(sys, "argv", ["proxsparse", *argv])  # recorded as the command, with local paths as names
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    results = load_comparison(out)  # what the model card reads with --comparison
    labels = [r.label for r in results]
    assert labels == ["magnitude", "dense", "wanda", "sparsegpt", "sparsegpt-mask", "magnitude (learned-like)"]
    with open(os.path.join(out, "comparison.json"), encoding="utf-8") as fh:
        text = fh.read()
    assert [row["label"] for row in json.loads(text)["results"]] == labels
    assert str(workspace["root"]) not in text and str(tmp_path) not in text  # no local path in the file
    assert json.loads(text)["command"].startswith("proxsparse compare tiny-llama --methods")
    ppl = {r.label: r.ppl("corpus.jsonl") for r in results}
    # dense is evaluated after magnitude: the original weights were restored in between
    dense = EvalResults.load(_dense_reference(workspace))
    assert ppl["dense"] == pytest.approx(dense.ppl("corpus.jsonl"), rel=1e-6)
    assert ppl["magnitude"] == pytest.approx(ppl["magnitude (learned-like)"], rel=1e-6)
    assert results[1].sparsity["all_2to4"] is False and all(r.sparsity["all_2to4"] for r in results[2:])
    assert results[4].label == "sparsegpt-mask" and results[4].method_config["update_weights"] is False
    assert results[2].method_config["calibration"]["n_samples"] == 4 and "calibration" not in results[0].method_config
    table = open(os.path.join(out, "comparison.md"), encoding="utf-8").read()
    assert "| sparsegpt-mask | sparsegpt |" in table and "| magnitude (learned-like) | magnitude |" in table
    assert "sparsegpt-mask" in printed  # the table, then the files written
    written = [os.path.join(out, name) for name in ("comparison.json", "comparison.md", "comparison.png")]
    assert printed.splitlines()[-1] == "-> " + ", ".join(w for w in written if os.path.exists(w))
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


def test_prune_refuses_non_empty_output(workspace, capsys):
    out = workspace["root"] / "taken"
    out.mkdir()
    (out / "file.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"exists and is not empty; pass --overwrite to replace it"):
        run_cli(["prune", workspace["model"], "--method", "magnitude", "-o", str(out)])
    with pytest.raises(SystemExit) as exc:
        cli_main(["prune", workspace["model"], "--method", "magnitude", "-o", str(out)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        f"proxsparse prune: error: `--output-dir`={str(out)!r} exists and is not empty; pass --overwrite to replace it.\n"
    )
    assert os.listdir(out) == ["file.txt"]
    assert run_cli(["prune", workspace["model"], "--method", "magnitude", "-o", str(out), "--overwrite"]) == 0
    assert "file.txt" not in os.listdir(out) and load_output_dir(out).method == "magnitude"


def test_prune_calibration_too_small(workspace):
    argv = ["prune", workspace["model"], "--method", "wanda", "-o", str(workspace["root"] / "never")]
    with pytest.raises(ValueError, match=r"`n_samples`=999 windows of 32 tokens requested"):
        run_cli([*argv, "--calibration", workspace["corpus"], "--n-samples", "999", "--seq-len", "32"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "/no/such/model"], r"Model '/no/such/model' does not exist; allowed: a local model folder"),
        (["eval", "missing.gguf"], r"Model 'missing.gguf' does not exist"),
        (["eval", "M", "--datasets", "piqa"], r"'piqa' is a zeroshot task, not a perplexity one; pass it in --tasks"),
        (["eval", "M", "--tasks", "wikitext2"], r"'wikitext2' is a perplexity task, not a zeroshot one"),
        (["eval", "M", "--datasets"], r"Nothing to evaluate: `--datasets` is empty and no `--tasks` were given"),
        (["eval", "M", "--eval-batch-size", "0"], r"`--eval-batch-size`=0 is invalid; allowed: an integer >= 1"),
        (["eval", "M", "--output", "FILE"], r"`--output`='.*file.txt' is an existing file; allowed: a .json file"),
        (["eval", "M", "--zeroshot-data-dir", "/nope", "--tasks", "piqa"], r"`--zeroshot-data-dir`='/nope' is not"),
        (["compare", "M", "--methods", "dense,obs", "-o", "OUT"], r"`--methods`='dense,obs' is invalid; allowed"),
        (["compare", "M", "--methods", "proxsparse", "-o", "OUT"], r"`--methods`='proxsparse' is invalid"),
        (["compare", "M", "--learned", "M", "-o", "OUT"], r"`--learned` '.*tiny-llama' is not a proxsparse output"),
        (["compare", "M", "-o", "FILE"], r"`--output`='.*file.txt' is a file; allowed: a folder"),
        (["compare", "/no/such/model", "-o", "OUT"], r"Model '/no/such/model' does not exist"),
    ],
)
def test_eval_and_compare_refuse_bad_input_with_one_line_and_exit_2(argv, message, workspace, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    subs = {"M": workspace["model"], "FILE": str(tmp_path / "file.txt"), "OUT": str(tmp_path / "out")}
    with pytest.raises(SystemExit) as exc:
        cli_main([subs.get(a, a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"proxsparse {argv[0]}: error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()  # refused before any work


# ------------------------------------------------------------------------------------------ BOS, one switch everywhere
@pytest.fixture(scope="module")
def bos_workspace(tmp_path_factory):
    """A tiny llama whose tokenizer prepends BOS (as Llama's does) and a word corpus."""
    from tiny_data import word_tokenizer
    from tiny_models import tiny_corpus, tiny_model

    root = tmp_path_factory.mktemp("cli-bos")
    tiny_model("llama").save_pretrained(root / "model")
    word_tokenizer(add_bos=True).save_pretrained(root / "model")
    corpus = write_jsonl(root / "words.jsonl", tiny_corpus(30))
    return {"root": root, "model": str(root / "model"), "corpus": corpus}


@pytest.mark.parametrize(("flags", "bos"), [([], True), (["--no-bos"], False), (["--bos", "no"], False)])
def test_prune_records_bos_and_streaming(bos_workspace, flags, bos):
    out = str(bos_workspace["root"] / f"wanda-{bos}-{len(flags)}")
    argv = ["prune", bos_workspace["model"], "--method", "wanda", "-o", out, "--dataset", bos_workspace["corpus"]]
    assert run_cli([*argv, "--n-samples", "2", "--seq-len", "16", "--no-progress", *flags]) == 0
    calibration = load_output_dir(out).run_info["calibration"]
    assert calibration["bos"] is bos and calibration["streaming"] is False and calibration["tokens"] == 2 * 16
    assert calibration["dataset"] == "words.jsonl" and calibration["documents"] == [0, None]


@pytest.mark.parametrize("flag", ["--no-bos", "--eval-bos=no", "--bos=no"])
def test_eval_bos_switch_reaches_the_perplexity_windows(bos_workspace, tmp_path, flag):
    argv = ["eval", bos_workspace["model"], "--datasets", bos_workspace["corpus"], "--eval-seq-len", "16"]
    argv += ["--max-windows", "2", "--no-progress"]
    assert run_cli([*argv, "-o", str(tmp_path / "auto.json")]) == 0
    assert run_cli([*argv, "-o", str(tmp_path / "off.json"), flag]) == 0
    auto, off = (EvalResults.load(tmp_path / name) for name in ("auto.json", "off.json"))
    assert auto.settings["bos"] is True and auto.perplexity["words.jsonl"]["bos"] is True
    assert off.settings["bos"] is False and off.perplexity["words.jsonl"]["bos"] is False
    assert off.ppl("words.jsonl") != auto.ppl("words.jsonl")


def test_compare_bos_switch_covers_calibration_and_evaluation(bos_workspace, tmp_path):
    argv = ["compare", bos_workspace["model"], "--methods", "wanda", "-o", str(tmp_path / "cmp"), "--no-progress"]
    argv += ["--calibration", bos_workspace["corpus"], "--n-samples", "2", "--seq-len", "16"]
    argv += ["--datasets", bos_workspace["corpus"], "--eval-seq-len", "16", "--max-windows", "2", "--bos", "no"]
    assert run_cli(argv) == 0
    (row,) = load_comparison(str(tmp_path / "cmp"))
    assert row.method_config["calibration"]["bos"] is False and row.settings["bos"] is False
