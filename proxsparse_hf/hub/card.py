"""Model cards for pruned models, rendered from measured data only.

:func:`build_model_card` fills the Jinja template ``model_cards/proxsparse_model_card.md`` through
``huggingface_hub.ModelCard.from_template`` with metadata (``ModelCardData`` + ``EvalResult`` model-index) and a body
made of what the output folder records: the recipe, the sparsity report, ``run_info.json`` and ``eval_results.json``
(plus optional comparison results). A section without data is left out; nothing is ever filled with a placeholder.

``base_model_relation``: the Hub accepts ``adapter``, ``merge``, ``quantized`` and ``finetune``. A pruned checkpoint
keeps the base model's values (a subset of them) without training them, i.e. it is a compressed copy of the base
model, which the Hub lists under "Quantizations"; ``finetune`` would be wrong (no weight is trained), so the dense and
compact artefacts declare ``quantized``. The mask-only artefact only works on top of the base model's weights:
``adapter``.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..artefacts.output_dir import PrunedOutput, load_output_dir
from ..config import ProxSparseConfig
from ..constants import CARD_NAME, EVAL_RESULTS_NAME, SUPPORTED_M, SUPPORTED_N
from ..report import SparsityReport

__all__ = [
    "BASE_MODEL_RELATIONS",
    "CARD_TEMPLATE",
    "CHART_NAME",
    "ResultRow",
    "build_model_card",
    "check_model_card",
    "default_template_path",
    "inherit_license",
    "load_comparison",
    "normalize_results",
    "render_perplexity_chart",
    "save_model_card",
]

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "proxsparse_model_card.md"
CHART_NAME = "perplexity.png"
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
LIBRARY_NAMES = {"dense": "transformers", "compact": "proxsparse-hf", "mask": "proxsparse-hf"}
BASE_TAGS = ("sparsity", "2:4", "semi-structured", "proxsparse")
PIPELINE_TAG = "text-generation"

CITATION = """@inproceedings{liu2025proxsparse,
  title     = {ProxSparse: Regularized Learning of Semi-Structured Sparsity Masks for Pretrained LLMs},
  author    = {Liu, Hongyi and Saha, Rajarshi and Jia, Zhen and Park, Youngsuk and Huang, Jiaji and Sabach, Shoham and
               Wang, Yu-Xiang and Karypis, George},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  series    = {Proceedings of Machine Learning Research},
  volume    = {267},
  pages     = {39405--39419},
  year      = {2025},
  eprint    = {2502.00258},
  archivePrefix = {arXiv}
}"""

METHOD_NAMES = {
    "proxsparse": "ProxSparse",
    "magnitude": "magnitude pruning",
    "wanda": "Wanda",
    "sparsegpt": "SparseGPT",
    "sparsegpt-mask": "SparseGPT (mask only)",
    "dense": "dense (not pruned)",
}
METHOD_DESCRIPTIONS = {
    "proxsparse": (
        "The 2:4 mask was **learned end to end** with ProxSparse (Liu et al., ICML 2025): the causal-LM loss on "
        "calibration text plus a 2:4 regulariser (applied through its exact proximal operator after every optimizer "
        "step) and, optionally, a frozen-weight regulariser. After training, the two largest |w| of every "
        "group of four "
        "define the mask, and the mask is applied to the **original** pretrained weights: no weight is updated."
    ),
    "magnitude": (
        "One-shot magnitude pruning: the two largest |w| of every group of four consecutive input weights are kept."
    ),
    "wanda": (
        "One-shot Wanda pruning: every weight is scored by |w|·‖x‖₂ of its input feature over the "
        "calibration data, and "
        "the two best of every group of four are kept, block by block."
    ),
    "sparsegpt": (
        "One-shot SparseGPT pruning: the 2:4 mask is chosen per block of columns from the inverse Hessian of "
        "the layer "
        "inputs, block by block."
    ),
}

# known evaluation datasets / tasks -> (Hub dataset id, display name, config)
KNOWN_DATASETS: dict[str, tuple[str, str, str | None]] = {
    "wikitext2": ("Salesforce/wikitext", "WikiText-2 (raw)", "wikitext-2-raw-v1"),
    "wikitext": ("Salesforce/wikitext", "WikiText-2 (raw)", "wikitext-2-raw-v1"),
    "c4": ("allenai/c4", "C4 (en)", "en"),
    "piqa": ("ybisk/piqa", "PIQA", None),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "ARC-Challenge"),
    "boolq": ("google/boolq", "BoolQ", None),
    "winogrande": ("allenai/winogrande", "WinoGrande", None),
    "openbookqa": ("allenai/openbookqa", "OpenBookQA", "main"),
    "hellaswag": ("Rowan/hellaswag", "HellaSwag", None),
    "rte": ("aps/super_glue", "RTE", "rte"),
    "copa": ("aps/super_glue", "COPA", "copa"),
    "lambada": ("EleutherAI/lambada_openai", "LAMBADA", None),
    "siqa": ("allenai/social_i_qa", "Social IQa", None),
}
# local calibration files -> the Hub dataset they were taken from (matched on the file or folder name)
_LOCAL_DATASET_HINTS = (("c4", "allenai/c4"), ("wikitext", "Salesforce/wikitext"))
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_PLACEHOLDERS = ("{{", "}}", "[More Information Needed]", "| nan", "| None |", "TODO")


# ------------------------------------------------------------------------------------------------------------ results
@dataclass
class ResultRow:
    """One model's measured results, as shown in the evaluation table.

    Args:
        label: method label (``dense``, ``magnitude``, ``wanda``, ``sparsegpt``, ``sparsegpt-mask``, ``proxsparse``).
        perplexity: ``{dataset: perplexity}``.
        zeroshot: ``{task: accuracy in [0, 1]}``.
        zeroshot_mean: mean zero-shot accuracy, when tasks were measured.
        details: ``{dataset: entry}`` of the perplexity protocol (``seq_len``, ``num_tokens``, ``source``, ``split``).
    """

    label: str
    perplexity: dict[str, float]
    zeroshot: dict[str, float]
    zeroshot_mean: float | None = None
    details: dict[str, dict[str, Any]] | None = None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def normalize_results(results: Any, label: str | None = None) -> ResultRow:
    """Turn ``EvalResults`` (object or its dict) or a plain ``{"perplexity": {ds: {"ppl": x} | x}, "zeroshot": {task:
    acc | {"acc": x}}, "method": ...}`` dict into a :class:`ResultRow`.

    Raises:
        ValueError: ``results`` is not a mapping / EvalResults, or holds no numeric result.
    """
    if hasattr(results, "to_dict") and not isinstance(results, Mapping):
        data = results.to_dict()
        label = label or getattr(results, "label", None)
    elif isinstance(results, Mapping):
        data = dict(results)
    else:
        raise ValueError(f"Evaluation results must be EvalResults or a dict, got {type(results).__name__}.")
    if label is None:
        method = str(data.get("method") or "proxsparse")
        config = data.get("method_config") or {}
        label = "sparsegpt-mask" if method == "sparsegpt" and config.get("update_weights") is False else method
    ppl: dict[str, float] = {}
    details: dict[str, dict[str, Any]] = {}
    for dataset, entry in (data.get("perplexity") or {}).items():
        value = _finite(entry.get("ppl") if isinstance(entry, Mapping) else entry)
        if value is not None:
            ppl[dataset] = value
            details[dataset] = dict(entry) if isinstance(entry, Mapping) else {}
    zeroshot: dict[str, float] = {}
    for task, entry in (data.get("zeroshot") or {}).items():
        value = _finite(entry.get("acc") if isinstance(entry, Mapping) else entry)
        if value is not None:
            zeroshot[task] = value
    if not ppl and not zeroshot:
        raise ValueError(f"Evaluation results for {label!r} hold no perplexity or zero-shot number.")
    mean = _finite(data.get("zeroshot_mean"))
    if mean is None and zeroshot:
        mean = sum(zeroshot.values()) / len(zeroshot)
    return ResultRow(label=label, perplexity=ppl, zeroshot=zeroshot, zeroshot_mean=mean, details=details)


def load_comparison(comparison: str | os.PathLike | Sequence[Any] | None) -> list[ResultRow]:
    """Rows of other models (dense, baselines) from a JSON file (a list, or ``{"results": [...]}``) or a sequence."""
    if comparison is None:
        return []
    if isinstance(comparison, (str, os.PathLike)):
        import json

        path = os.fspath(comparison)
        if os.path.isdir(path):
            path = os.path.join(path, EVAL_RESULTS_NAME)
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        items = data.get("results", data) if isinstance(data, Mapping) else data
        if isinstance(items, Mapping):
            items = [items]
    else:
        items = list(comparison)
    return [normalize_results(item) for item in items]


# ------------------------------------------------------------------------------------------------------------ helpers
def default_template_path() -> str:
    """Path of the packaged card template (``model_cards/proxsparse_model_card.md``)."""
    try:
        path = importlib.resources.files("model_cards") / CARD_TEMPLATE
        if path.is_file():
            return os.fspath(path)
    except ModuleNotFoundError:
        pass
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", CARD_TEMPLATE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The model card template {CARD_TEMPLATE} is not installed (looked in {path!r}).")
    return path


def _is_hub_id(value: Any) -> bool:
    if (
        not isinstance(value, str)
        or not value
        or os.path.exists(value)
        or value.endswith((".gguf", ".json", ".jsonl"))
    ):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return _REPO_ID_RE.match(value) is not None and "/" in value


def inherit_license(
    base_model: str | None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> str | None:
    """License of the base model: from its ``.gguf`` metadata, its local ``README.md`` or its Hub card; None "
    "if unknown."""
    if not base_model:
        return None
    try:
        if base_model.endswith(".gguf") and os.path.isfile(base_model):
            from gguf import GGUFReader

            field = GGUFReader(base_model).fields.get("general.license")
            if field is None:
                return None
            return bytes(field.parts[field.data[0]]).decode("utf-8").strip() or None
        from huggingface_hub import ModelCard

        if os.path.isdir(base_model):
            readme = os.path.join(base_model, CARD_NAME)
            return ModelCard.load(readme).data.license if os.path.isfile(readme) else None
        if _is_hub_id(base_model):  # one API call (no download retries): the Hub parses the card's YAML for us
            from huggingface_hub import HfApi

            card_data = HfApi(endpoint=endpoint, token=token).model_info(base_model, revision=revision).card_data
            license = getattr(card_data, "license", None) if card_data is not None else None
            return license if isinstance(license, str) and license else None
    except Exception as exc:  # the license is optional metadata: never fail the card on it
        logger.info("Could not read the license of %s: %s", base_model, exc)
    return None


def _calibration_datasets(run_info: Mapping[str, Any]) -> list[str]:
    calibration = run_info.get("calibration") or {}
    source = calibration.get("dataset") if isinstance(calibration, Mapping) else None
    if not isinstance(source, str) or not source:
        return []
    if _is_hub_id(source):
        return [source]
    name = os.path.basename(os.path.normpath(source)).lower() + " " + os.path.basename(os.path.dirname(source)).lower()
    return [hub_id for hint, hub_id in _LOCAL_DATASET_HINTS if hint in name][:1]


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _hardware(run_info: Mapping[str, Any]) -> str | None:
    hw = run_info.get("hardware")
    if not isinstance(hw, Mapping):
        return None
    if hw.get("gpu"):
        count = hw.get("gpu_count") or 1
        return f"{count}× {hw['gpu']}" + (f" (CUDA {hw['cuda']})" if hw.get("cuda") else "")
    if hw.get("cpu_count"):
        return f"CPU only ({hw['cpu_count']} cores, {hw.get('platform', 'unknown platform')})"
    return None


_TRAINING_KEYS = (
    ("steps", "optimizer steps"),
    ("tokens", "training tokens"),
    ("learning_rate", "learning rate"),
    ("per_device_train_batch_size", "batch size"),
    ("gradient_accumulation_steps", "gradient accumulation"),
    ("warmup_ratio", "warm-up ratio"),
    ("lr_scheduler_type", "lr schedule"),
    ("optim", "optimizer"),
    ("seed", "seed"),
)
_CALIBRATION_KEYS = (
    ("dataset", "calibration data"),
    ("split", "split"),
    ("documents", "documents"),
    ("n_samples", "calibration samples"),
    ("seq_len", "sequence length"),
    ("tokens", "calibration tokens"),
)


def _hyperparameters(method: str, config: ProxSparseConfig, run_info: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("method", METHOD_NAMES.get(method, method))]
    if method == "proxsparse":
        rows += [
            ("λ1 (2:4 regulariser)", _fmt(config.lambda1)),
            ("λ2 (frozen-weight regulariser)", _fmt(config.lambda2)),
            ("ε", _fmt(config.epsilon)),
            ("λ1 schedule / scaling", f"{config.lambda_schedule} / {config.lambda_scaling}"),
            ("importance", "\\|W\\|·‖X‖ (activation)" if config.importance == "activation" else "\\|W\\| (magnitude)"),
            ("prox every n steps", _fmt(config.prox_every_n_steps)),
        ]
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    rows.append(("target modules", f"`{targets}`"))
    if config.exclude_modules:
        exclude = (
            config.exclude_modules if isinstance(config.exclude_modules, str) else ", ".join(config.exclude_modules)
        )
        rows.append(("excluded modules", f"`{exclude}`"))
    for section, keys in (("calibration", _CALIBRATION_KEYS), ("training", _TRAINING_KEYS)):
        values = run_info.get(section)
        if isinstance(values, Mapping):
            rows += [(label, _fmt(values[key])) for key, label in keys if values.get(key) is not None]
    for key in ("update_weights", "options", "method_config"):
        value = run_info.get(key)
        if isinstance(value, bool):
            rows.append((key.replace("_", " "), _fmt(value)))
        elif isinstance(value, Mapping):
            rows += [
                (f"{k}".replace("_", " "), _fmt(v)) for k, v in value.items() if isinstance(v, (str, int, float, bool))
            ]
    hardware = _hardware(run_info)
    if hardware:
        rows.append(("hardware", hardware))
    wall = _finite(run_info.get("wall_time_s"))
    if wall is not None:
        rows.append(("wall time", _duration(wall)))
    return rows


def _dataset_meta(name: str) -> tuple[str, str, str | None]:
    return KNOWN_DATASETS.get(name.lower(), (name, name, None))


def _eval_table(rows: Sequence[ResultRow], own: ResultRow | None) -> str:
    datasets = list(dict.fromkeys(d for row in rows for d in row.perplexity))
    tasks = list(dict.fromkeys(t for row in rows for t in row.zeroshot))
    header = ["model"] + [f"{_dataset_meta(d)[1]} ppl ↓" for d in datasets] + [_dataset_meta(t)[1] for t in tasks]
    with_mean = len(tasks) > 1
    if with_mean:
        header.append("zero-shot mean")
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        name = METHOD_NAMES.get(row.label, row.label)
        if row is own:
            name = f"**this model ({name})**"
        cells = [name]
        cells += [f"{row.perplexity[d]:.2f}" if d in row.perplexity else "–" for d in datasets]
        cells += [f"{100 * row.zeroshot[t]:.1f}" if t in row.zeroshot else "–" for t in tasks]
        if with_mean:
            complete = row.zeroshot_mean is not None and set(tasks) <= set(row.zeroshot)
            cells.append(f"{100 * row.zeroshot_mean:.1f}" if complete else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _eval_notes(own: ResultRow | None, rows: Sequence[ResultRow]) -> str:
    notes = []
    if own is not None and own.details:
        for dataset, entry in own.details.items():
            parts = []
            if entry.get("seq_len"):
                parts.append(f"{entry['seq_len']}-token windows")
            if entry.get("num_tokens"):
                parts.append(f"{int(entry['num_tokens']):,} tokens")
            if entry.get("split"):
                parts.append(f"split `{entry['split']}`")
            if parts:
                notes.append(f"{_dataset_meta(dataset)[1]} perplexity: " + ", ".join(parts) + ".")
    if any(row.zeroshot for row in rows):
        notes.append("Zero-shot: accuracy in % (lm-evaluation-harness).")
    if len(rows) > 1:
        notes.append("All rows were measured with the same protocol; – = not measured.")
    return " ".join(notes)


def _eval_results(own: ResultRow) -> list:
    from huggingface_hub import EvalResult

    results = []
    for dataset, value in own.perplexity.items():
        hub_id, name, config = _dataset_meta(dataset)
        split = (own.details or {}).get(dataset, {}).get("split")
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name="Text Generation",
                dataset_type=hub_id,
                dataset_name=name,
                dataset_config=config,
                dataset_split=split,
                metric_type="perplexity",
                metric_name="Perplexity",
                metric_value=round(value, 4),
            )
        )
    for task, value in own.zeroshot.items():
        hub_id, name, config = _dataset_meta(task)
        results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                task_name="Zero-shot evaluation",
                dataset_type=hub_id,
                dataset_name=name,
                dataset_config=config,
                metric_type="accuracy",
                metric_name="Accuracy (zero-shot)",
                metric_value=round(value, 4),
            )
        )
    return results


def _how_to_load(artefact: str, repo: str, base_model: str | None, revision: str | None) -> str:
    if artefact == "dense":
        return (
            "A standard `transformers` checkpoint (pruned weights stored as zeros):\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n```'
        )
    if artefact == "compact":
        return (
            "The compact 2:4 format needs `proxsparse-hf` (`pip install proxsparse-hf`); it rebuilds the exact dense "
            "weights and returns a regular `transformers` model:\n\n```python\n"
            "from proxsparse_hf import load_pruned\nfrom transformers import AutoTokenizer\n\n"
            f'model = load_pruned("{repo}", dtype="auto")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n```'
        )
    rev = f" (revision `{revision}`)" if revision else ""
    base = base_model or "the base model"
    return (
        f"This adapter holds only the masks; it is applied to the original weights of `{base}`{rev}, which is "
        "downloaded, checked (shapes, revision, weights) and pruned in place:\n\n```python\n"
        "from proxsparse_hf import apply_proxsparse, load_pruned\n\n"
        f'model = load_pruned("{repo}")  # loads the recorded base model and applies the mask\n'
        f'# or, with a base model you already loaded:\n# model = apply_proxsparse(base_model, "{repo}")\n```'
    )


def _inputs(source: Any) -> tuple[ProxSparseConfig, SparsityReport, dict[str, Any], Any, str | None]:
    if isinstance(source, (str, os.PathLike)):
        source = load_output_dir(source)
    if isinstance(source, PrunedOutput):
        return source.config, source.report, dict(source.run_info), source.eval_results, source.path
    if all(hasattr(source, a) for a in ("config", "report", "run_info", "eval_results")):
        return source.config, source.report, dict(source.run_info), source.eval_results, getattr(source, "path", None)
    raise TypeError(
        f"`source` must be an output folder, a PrunedOutput or a PrunedSource, got {type(source).__name__}."
    )


# ------------------------------------------------------------------------------------------------------------ the card
def build_model_card(
    source: Any,
    *,
    artefact: str = "dense",
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    base_model_relation: str | None = "auto",
    comparison: str | os.PathLike | Sequence[Any] | None = None,
    chart_file: str | None = None,
    template_path: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
):
    """Render the model card of a pruned model.

    Args:
        source: an output folder, a ``PrunedOutput`` or a ``PrunedSource``.
        artefact: ``"dense"``, ``"compact"`` or ``"mask"`` (the "how to load" section and library name follow it).
        repo_id: the Hub repo the card is for (used in the title, load snippets and model-index).
        base_model: Hub id of the base model, when the recorded ``base_model_name_or_path`` is a local path.
        license: license id; default: inherited from the base model (GGUF metadata, local or Hub card), else omitted.
        base_model_relation: ``"auto"`` (``adapter`` for the mask, ``quantized`` otherwise; see the module docstring),
            one of ``adapter|merge|quantized|finetune``, or None to omit it.
        comparison: results of other models (dense, baselines) for the evaluation table.
        chart_file: file name of the perplexity chart to embed (written by :func:`render_perplexity_chart`).
        template_path: a custom Jinja template.
        token: Hub token for reading the base model's card.
        endpoint: Hub endpoint for reading the base model's card (default: ``HF_ENDPOINT``).

    Returns:
        A ``huggingface_hub.ModelCard`` that passes :func:`check_model_card`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from ..artefacts.export import ARTEFACTS

    if artefact not in ARTEFACTS:
        raise ValueError(f"`artefact`={artefact!r} is invalid; allowed: {ARTEFACTS}.")
    if base_model_relation not in (None, "auto", *BASE_MODEL_RELATIONS):
        raise ValueError(
            f"`base_model_relation`={base_model_relation!r} is invalid; allowed: None, 'auto', {BASE_MODEL_RELATIONS}."
        )
    if base_model is not None and not _is_hub_id(base_model):
        raise ValueError(f"`base_model`={base_model!r} is invalid; allowed: a Hub model id such as 'org/name'.")
    config, report, run_info, eval_results, path = _inputs(source)
    method = str(run_info.get("method", "proxsparse"))
    recorded_base = config.base_model_name_or_path or run_info.get("base_model")
    hub_base = base_model or (recorded_base if _is_hub_id(recorded_base) else None)
    revision = config.revision or run_info.get("revision")
    if license is None:
        license = inherit_license(recorded_base, revision=revision, token=token, endpoint=endpoint)
        if license is None and hub_base and hub_base != recorded_base:
            license = inherit_license(hub_base, token=token, endpoint=endpoint)
    relation = None
    if hub_base and base_model_relation is not None:
        relation = (
            ("adapter" if artefact == "mask" else "quantized")
            if base_model_relation == "auto"
            else base_model_relation
        )

    own = normalize_results(eval_results) if eval_results else None
    rows = [r for r in load_comparison(comparison)]
    if own is not None:
        rows.append(own)
    rows.sort(key=lambda r: (r is own, r.label != "dense"))

    base_name = (hub_base or recorded_base or "model").rstrip("/").split("/")[-1]
    model_name = repo_id.split("/")[-1] if repo_id else f"{base_name}-2of4-{method}"
    tags = list(dict.fromkeys([*BASE_TAGS, method, artefact if artefact != "mask" else "mask-adapter"]))
    card_data = ModelCardData(
        base_model=hub_base,
        library_name=LIBRARY_NAMES[artefact],
        pipeline_tag=PIPELINE_TAG,
        tags=tags,
        datasets=_calibration_datasets(run_info) or None,
        license=license,
        model_name=model_name if own is not None else None,
        eval_results=_eval_results(own) if own is not None else None,
    )
    if relation is not None:
        card_data.base_model_relation = relation

    base_link = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{recorded_base or 'unknown'}`"
    pattern = f"{SUPPORTED_N}:{SUPPORTED_M}"
    summary = (
        f"A {pattern} semi-structured sparse version of {base_link}, pruned with {METHOD_NAMES.get(method, method)}"
    )
    if report.layers:
        summary += (
            f": {report.target_sparsity:.2%} of the weights of its {len(report.layers)} target layers are "
            "zero, with at "
            f"most {SUPPORTED_N} non-zeros in every group of {SUPPORTED_M} consecutive input weights "
            f"({report.overall_sparsity:.2%} of all {report.total_params:,} parameters)."
        )
    else:
        summary += "."
    artefact_text = {
        "dense": "This repository holds the **dense pruned checkpoint**: a standard `transformers` checkpoint whose "
        "pruned weights are stored as zeros (same size as the dense model).",
        "compact": "This repository holds the **compact 2:4 checkpoint**: every 2:4 target weight is stored as its "
        "kept "
        "values (half the elements) plus packed positions (0.67 bit per weight); everything else is stored as usual. "
        "Loading rebuilds the exact dense weights.",
        "mask": "This repository holds a **mask-only adapter**: the 2:4 masks packed at 0.67 bit per weight, to be "
        "applied to the original weights of the base model" + (f" at revision `{revision}`." if revision else "."),
    }[artefact]
    versions = run_info.get("versions") if isinstance(run_info.get("versions"), Mapping) else {}
    environment = ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("proxsparse_hf", "torch", "transformers"))
    dense_modules = ", ".join(f"`{m}`" for m in report.dense_modules)
    sparsity_table = report.to_markdown()
    if report.dense_modules:  # listed separately below the table
        sparsity_table = sparsity_table.split("\n\nDense (not pruned):")[0]
    chart_ok = chart_file is not None and any(r.perplexity for r in rows)
    card = ModelCard.from_template(
        card_data,
        template_path=template_path or default_template_path(),
        title=f"{model_name}: {pattern} sparse {base_name} ({METHOD_NAMES.get(method, method)})",
        summary=summary,
        artefact_description=artefact_text,
        method_description=METHOD_DESCRIPTIONS.get(method, f"Pruned with {method}."),
        hyperparameters=_hyperparameters(method, config, run_info),
        sparsity_summary=(
            f"Target sparsity {report.target_sparsity:.2%} ({report.target_zeros:,} of "
            f"{report.target_params:,} weights); "
            f"overall sparsity {report.overall_sparsity:.2%} of {report.total_params:,} parameters; "
            f"{report.num_2to4_layers}/{len(report.layers)} target weights are valid {pattern}."
        )
        if report.layers
        else None,
        num_target_layers=len(report.layers),
        sparsity_table=sparsity_table,
        dense_modules=dense_modules,
        eval_table=_eval_table(rows, own) if rows else None,
        eval_notes=_eval_notes(own, rows),
        chart_file=chart_file if chart_ok else None,
        how_to_load=_how_to_load(artefact, repo_id or path or model_name, hub_base or recorded_base, revision),
        command=run_info.get("command") if isinstance(run_info.get("command"), str) else None,
        environment=environment,
        citation=CITATION,
    )
    return card


def check_model_card(card: Any) -> dict[str, Any]:
    """Local equivalent of the Hub's card validation; returns the parsed metadata.

    Checks: the YAML header parses into a mapping and back into ``ModelCardData`` (incl. the model-index);
    ``base_model`` is a Hub id (list); ``base_model_relation`` is one the Hub accepts and has a ``base_model``;
    ``library_name``/``pipeline_tag``/``license`` are strings; ``tags``/``datasets`` are lists of strings (so ``"2:4"``
    did not turn into the integer 124); every model-index metric is a finite number; no template placeholder is left.

    Raises:
        ValueError: describes the first problem found.
    """
    import yaml
    from huggingface_hub import ModelCardData

    text = str(card)
    match = re.match(r"^---\r?\n(.*?)\r?\n---\r?\n", text, re.S)
    if match is None:
        raise ValueError("The card has no YAML metadata header ('---' ... '---').")
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise ValueError(f"The card's YAML header does not parse: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"The card's YAML header must be a mapping, got {type(meta).__name__}.")
    try:
        ModelCardData(**meta)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"Invalid card metadata: {exc}") from exc
    for key in ("library_name", "pipeline_tag", "license", "base_model_relation"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"`{key}`={meta[key]!r} must be a string.")
    for key in ("tags", "datasets"):
        if key in meta and (not isinstance(meta[key], list) or not all(isinstance(v, str) and v for v in meta[key])):
            raise ValueError(f"`{key}`={meta[key]!r} must be a list of non-empty strings.")
    if "base_model" in meta:
        bases = meta["base_model"] if isinstance(meta["base_model"], list) else [meta["base_model"]]
        bad = [b for b in bases if not _is_hub_id(b)]
        if bad:
            raise ValueError(f"`base_model` must be Hub model ids; invalid: {bad}.")
    if "base_model_relation" in meta:
        if meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
            raise ValueError(
                f"`base_model_relation`={meta['base_model_relation']!r} is invalid; the Hub accepts "
                f"{BASE_MODEL_RELATIONS}."
            )
        if "base_model" not in meta:
            raise ValueError("`base_model_relation` is set but `base_model` is missing.")
    for entry in meta.get("model-index") or []:
        for result in entry.get("results", []):
            for metric in result.get("metrics", []):
                if _finite(metric.get("value")) is None:
                    raise ValueError(
                        f"model-index metric {metric.get('type')!r} has a non-numeric value {metric.get('value')!r}."
                    )
    body = text[match.end() :]
    for marker in _PLACEHOLDERS:
        if marker in body:
            raise ValueError(f"The card body contains the placeholder {marker!r}.")
    return meta


def render_perplexity_chart(rows: Iterable[ResultRow], path: str | os.PathLike) -> str | None:
    """Bar chart of perplexity per dataset and model (dense, baselines, this model); None when nothing to plot.

    Needs matplotlib (``pip install proxsparse-hf[plots]``).
    """
    rows = [r for r in rows if r.perplexity]
    if not rows:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise RuntimeError("The perplexity chart needs matplotlib: pip install 'proxsparse-hf[plots]'") from exc
    datasets = list(dict.fromkeys(d for r in rows for d in r.perplexity))
    fig = Figure(figsize=(max(4.0, 1.2 + 1.1 * len(rows) * len(datasets)), 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(rows)
    values = [v for r in rows for v in r.perplexity.values()]
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, d in enumerate(datasets) if d in row.perplexity]
        ys = [row.perplexity[d] for d in datasets if d in row.perplexity]
        bars = ax.bar(xs, ys, width=width * 0.95, label=METHOD_NAMES.get(row.label, row.label))
        ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=7)
    if max(values) / max(min(values), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(datasets)), [_dataset_meta(d)[1] for d in datasets])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("Perplexity: dense vs 2:4")
    ax.legend(fontsize=8)
    path = os.fspath(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def save_model_card(
    source: Any,
    directory: str | os.PathLike,
    *,
    artefact: str = "dense",
    chart: bool = True,
    **kwargs: Any,
) -> list[str]:
    """Write ``README.md`` (validated) and, when results exist and ``chart``, ``perplexity.png`` into ``directory``.

    Keyword arguments go to :func:`build_model_card`. Returns the written paths.
    """
    directory = os.fspath(directory)
    written: list[str] = []
    chart_file = None
    if chart:
        _, _, _, eval_results, _ = _inputs(source)
        rows = load_comparison(kwargs.get("comparison"))
        if eval_results:
            rows.append(normalize_results(eval_results))
        if any(r.perplexity for r in rows):
            try:
                written_chart = render_perplexity_chart(rows, os.path.join(directory, CHART_NAME))
            except RuntimeError as exc:
                logger.warning("No perplexity chart: %s", exc)
                written_chart = None
            if written_chart:
                written.append(written_chart)
                chart_file = CHART_NAME
    card = build_model_card(source, artefact=artefact, chart_file=chart_file, **kwargs)
    check_model_card(card)
    path = os.path.join(directory, CARD_NAME)
    card.save(path)
    written.insert(0, path)
    return written
