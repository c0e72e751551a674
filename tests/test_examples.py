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
