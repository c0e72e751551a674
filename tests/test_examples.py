"""The runnable examples fail on bad input with one line and exit code 2, before any model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], data_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROXSPARSE_DATA_DIR": data_dir, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "learn_mask.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_learn_mask_refuses_calibration_documents_reserved_for_evaluation(tmp_path):
    (tmp_path / "c4-validation-2k").mkdir()
    (tmp_path / "c4-validation-2k" / "c4_validation_2k.jsonl").write_text('{"text": "a"}\n', encoding="utf-8")
    missing_model = str(tmp_path / "no-model")  # loading it would fail differently: the error must come first
    result = _run(["--model", missing_model, "--doc-stop", "1500"], str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --dataset: Calibration")
    assert "reserved for c4 evaluation" in result.stderr and "Traceback" not in result.stderr
    assert missing_model not in result.stderr


def test_learn_mask_refuses_a_model_it_cannot_read_before_loading_weights(tmp_path):
    (tmp_path / "model").mkdir()  # no config.json
    result = _run(["--model", str(tmp_path / "model")], str(tmp_path / "data"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --model: Cannot load model")


def test_learn_mask_example_permutes_like_the_cli_unless_told_not_to(tmp_path):
    """End to end on a tiny Llama: the example permutes the channels first (as ``proxsparse learn`` does by default),
    records it in run_info.json and writes a 2:4 model that loads; ``--no-permute`` keeps the checkpoint's order."""
    import json

    from tiny_data import write_jsonl
    from tiny_models import tiny_corpus, tiny_model, tiny_tokenizer

    model_dir = tmp_path / "model"
    tiny_model("llama", vocab=128, hidden=64).save_pretrained(model_dir)
    tiny_tokenizer(128).save_pretrained(model_dir)
    (tmp_path / "data" / "c4-validation-2k").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "c4-validation-2k" / "c4_validation_2k.jsonl", tiny_corpus(2000, 40))
    for extra, permuted in (([], True), (["--no-permute"], False)):
        out = tmp_path / f"out-{permuted}"
        args = ["--model", str(model_dir), "--n-samples", "4", "--seq-len", "16", "--output-dir", str(out), *extra]
        result = _run(args, str(tmp_path / "data"))
        assert result.returncode == 0, result.stderr[-3000:]
        info = json.loads((out / "run_info.json").read_text())
        if permuted:
            assert info["permutation"]["importance"] == "activation"
            assert set(info["permutation"]["layers"]) == {
                f"model.layers.{i}.{name}" for i in range(2) for name in ("self_attn.o_proj", "mlp.down_proj")
            }
        else:
            assert info.get("permutation") is None
        from proxsparse_hf import load_pruned
        from proxsparse_hf.masks import is_2to4

        model = load_pruned(str(out))
        assert is_2to4(model.model.layers[0].mlp.down_proj.weight)
