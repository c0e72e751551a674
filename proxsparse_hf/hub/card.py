"""Model cards for pruned models, rendered from measured data only.

:func:`build_model_card` fills the Jinja template ``model_cards/proxsparse_model_card.md`` through
``huggingface_hub.ModelCard.from_template`` with metadata (``ModelCardData`` + ``EvalResult`` model-index) and a body
made of what the output folder records: the recipe, the sparsity report, ``run_info.json`` and ``eval_results.json``
(plus optional comparison results). A section without data is left out; nothing is ever filled with a placeholder.
What the card says about the artefact (library, ``base_model_relation``, how to load it) comes from the artefact
registry, method names and descriptions from the pruner registry.

``base_model_relation``: the Hub accepts ``adapter``, ``merge``, ``quantized`` and ``finetune``. A pruned checkpoint
keeps the base model's values (a subset of them) without training them, i.e. it is a compressed copy of the base
model, which the Hub lists under "Quantizations"; ``finetune`` would be wrong (no weight is trained), so the dense and
compact artefacts declare ``quantized``. The mask-only artefact only works on top of the base model's weights:
``adapter``.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Sequence
from typing import Any

from ..artefacts.base import PrunedModel, load_output_dir
from ..artefacts.publish import is_hub_id, publishable
from ..artefacts.registry import BASE_MODEL_RELATIONS, get_artefact
from ..constants import CARD_NAME, SUPPORTED_M, SUPPORTED_N
from ..evaluation.results import EvalResults
from .checks import check_model_card
from .facts import (
    calibration_datasets,
    hyperparameters,
    inherit_license,
    method_description,
    method_label,
    permutation_summary,
)
from .results import CHART_NAME, PIPELINE_TAG, card_results, eval_notes, eval_table, model_index

__all__ = [
    "BASE_TAGS",
    "CARD_TEMPLATE",
    "CHART_NAME",
    "CITATION",
    "build_model_card",
    "card_rows",
    "default_template_path",
    "save_model_card",
]

logger = logging.getLogger(__name__)

CARD_TEMPLATE = "proxsparse_model_card.md"
BASE_TAGS = ("sparsity", "2:4", "semi-structured", "proxsparse")

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


def _as_pruned_model(source: Any) -> PrunedModel:
    if isinstance(source, (str, os.PathLike)):
        return load_output_dir(source)
    if isinstance(source, PrunedModel):
        return source
    raise TypeError(f"`source` must be an output folder or a PrunedModel, got {type(source).__name__}.")


def card_rows(
    source: PrunedModel, comparison: str | os.PathLike | Sequence[Any] | None
) -> tuple[list[EvalResults], EvalResults | None]:
    """The evaluation table's rows (comparison rows first, this model's last) and this model's results (its
    ``eval_results.json``), all :class:`~proxsparse_hf.evaluation.results.EvalResults`; see
    :func:`~proxsparse_hf.hub.results.card_results`."""
    return card_results(source.eval_results or None, comparison)


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
        source: an output folder or a :class:`~proxsparse_hf.artefacts.base.PrunedModel`.
        artefact: a registered artefact format (``dense``, ``compact``, ``mask``, ...): the "how to load" section,
            library name, tag and ``base_model_relation`` follow it.
        repo_id: the Hub repo the card is for (used in the title, load snippets and model-index).
        base_model: Hub id of the base model, when the recorded ``base_model_name_or_path`` is a local path.
        license: license id; default: inherited from the base model (GGUF metadata, local or Hub card), else omitted.
        base_model_relation: ``"auto"`` (the artefact format's), one of ``adapter|merge|quantized|finetune``, or None
            to omit it.
        comparison: results of other models (dense, baselines): a ``comparison.json`` written by ``proxsparse
            compare``, an ``eval_results.json``, their folder, or a list of ``EvalResults``.
        chart_file: file name of the perplexity chart to embed (written by
            :func:`~proxsparse_hf.evaluation.plot.plot_perplexity`, as :func:`save_model_card` does).
        template_path: a custom Jinja template.
        token: Hub token for reading the base model's card.
        endpoint: Hub endpoint for reading the base model's card (default: ``HF_ENDPOINT``).

    Returns:
        A ``huggingface_hub.ModelCard`` that passes :func:`~proxsparse_hf.hub.checks.check_model_card`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    fmt = get_artefact(artefact)
    if base_model_relation not in (None, "auto", *BASE_MODEL_RELATIONS):
        raise ValueError(
            f"`base_model_relation`={base_model_relation!r} is invalid; allowed: None, 'auto', {BASE_MODEL_RELATIONS}."
        )
    if base_model is not None and not is_hub_id(base_model):
        raise ValueError(f"`base_model`={base_model!r} is invalid; allowed: a Hub model id such as 'org/name'.")
    source = _as_pruned_model(source)
    config, report, run_info = source.config, source.report, source.run_info
    method = run_info.method
    recorded_base = config.base_model_name_or_path or run_info.base_model
    hub_base = base_model or (recorded_base if is_hub_id(recorded_base) else None)
    revision = config.revision or run_info.revision
    if license is None:
        license = inherit_license(recorded_base, revision=revision, token=token, endpoint=endpoint)
        if license is None and hub_base and hub_base != recorded_base:
            license = inherit_license(hub_base, token=token, endpoint=endpoint)
    relation = None
    if hub_base and base_model_relation is not None:
        relation = fmt.base_model_relation if base_model_relation == "auto" else base_model_relation

    rows, own = card_rows(source, comparison)
    index = model_index(own) if own is not None else []
    label = method_label(method)
    base_name = (hub_base or recorded_base or "model").rstrip("/").split("/")[-1]
    model_name = repo_id.split("/")[-1] if repo_id else f"{base_name}-2of4-{method}"
    card_data = ModelCardData(
        base_model=hub_base,
        library_name=fmt.library_name,
        pipeline_tag=PIPELINE_TAG,
        tags=list(dict.fromkeys([*BASE_TAGS, method, fmt.card_tag])),
        datasets=calibration_datasets(run_info) or None,
        license=license,
        model_name=model_name if index else None,
        eval_results=index or None,
    )
    if relation is not None:
        card_data.base_model_relation = relation

    if hub_base:
        base_link = f"[{hub_base}](https://huggingface.co/{hub_base})"
    else:
        base_link = f"`{recorded_base or 'unknown'}`"
        if run_info.base_model_sha256:
            base_link += f" (a local model, SHA-256 `{run_info.base_model_sha256[:16]}…`)"
    pattern = f"{SUPPORTED_N}:{SUPPORTED_M}"
    summary = f"A {pattern} semi-structured sparse version of {base_link}, pruned with {label}"
    if permutation_summary(run_info):
        summary += (
            f" after a channel permutation of {len(run_info.permuted_layers)} layers (folded into the weights, so the "
            "dense model's outputs were unchanged)"
        )
    if report.layers:
        summary += (
            f": {report.target_sparsity:.2%} of the weights of its {len(report.layers)} target layers are zero, with "
            f"at most {SUPPORTED_N} non-zeros in every group of {SUPPORTED_M} consecutive input weights "
            f"({report.overall_sparsity:.2%} of all {report.total_params:,} parameters)."
        )
    else:
        summary += "."
    versions = run_info.versions or {}
    environment = ", ".join(f"{k} {v}" for k, v in versions.items() if k in ("proxsparse_hf", "torch", "transformers"))
    sparsity_table = report.to_markdown()
    if report.dense_modules:  # listed separately below the table
        sparsity_table = sparsity_table.split("\n\nDense (not pruned):")[0]
    sparsity_summary = None
    if report.layers:
        sparsity_summary = (
            f"Target sparsity {report.target_sparsity:.2%} ({report.target_zeros:,} of {report.target_params:,} "
            f"weights); overall sparsity {report.overall_sparsity:.2%} of {report.total_params:,} parameters; "
            f"{report.num_2to4_layers}/{len(report.layers)} target weights are valid {pattern}."
        )
    artefact_description = fmt.card_description(revision)
    if fmt.base_model_relation == "adapter" and run_info.permuted_layers:
        artefact_description += (
            f" It also carries the channel permutation of {len(run_info.permuted_layers)} layers the mask was found "
            "after; `apply_proxsparse` folds it into the base model first, which leaves the model's outputs unchanged."
        )
    return ModelCard.from_template(
        card_data,
        template_path=template_path or default_template_path(),
        title=f"{model_name}: {pattern} sparse {base_name} ({label})",
        summary=summary,
        artefact_description=artefact_description,
        method_description=method_description(method),
        hyperparameters=hyperparameters(config, run_info),
        sparsity_summary=sparsity_summary,
        num_target_layers=len(report.layers),
        sparsity_table=sparsity_table,
        dense_modules=", ".join(f"`{m}`" for m in report.dense_modules),
        eval_table=eval_table(rows, own) if rows else None,
        eval_notes=eval_notes(own, rows),
        chart_file=chart_file if chart_file is not None and any(r.perplexity for r in rows) else None,
        how_to_load=fmt.how_to_load(repo_id or model_name, hub_base or recorded_base, revision),
        command=run_info.command,
        environment=environment,
        citation=CITATION,
    )


def save_model_card(
    source: Any,
    directory: str | os.PathLike,
    *,
    artefact: str = "dense",
    chart: bool = True,
    **kwargs: Any,
) -> list[str]:
    """Write ``README.md`` (validated) and, when results exist and ``chart``, ``perplexity.png`` into ``directory``.

    The card is built from the publishable copy of ``source`` (no local path; see
    :func:`~proxsparse_hf.artefacts.publish.publishable`) and validated before anything is written. Keyword arguments
    go to :func:`build_model_card`. Returns the written paths.
    """
    from ..evaluation.plot import plot_perplexity

    directory = os.fspath(directory)
    raw = _as_pruned_model(source)
    if kwargs.get("license") is None:  # read from the local base model before its path is dropped
        recorded = raw.config.base_model_name_or_path or raw.run_info.base_model
        kwargs["license"] = inherit_license(
            recorded, revision=raw.config.revision, token=kwargs.get("token"), endpoint=kwargs.get("endpoint")
        )
    clean = publishable(raw, base_model=kwargs.get("base_model"))
    rows, _ = card_rows(clean, kwargs.get("comparison"))
    measured = [r for r in rows if r.perplexity]
    chart_file = CHART_NAME if chart and measured else None
    card = build_model_card(clean, artefact=artefact, chart_file=chart_file, **kwargs)
    check_model_card(card)
    written: list[str] = []
    if chart_file is not None:
        try:
            written.append(plot_perplexity(measured, os.path.join(directory, CHART_NAME)))
        except RuntimeError as exc:  # matplotlib missing: the card without its chart
            logger.warning("No perplexity chart: %s", exc)
            card = build_model_card(clean, artefact=artefact, chart_file=None, **kwargs)
    path = os.path.join(directory, CARD_NAME)
    card.save(path)
    return [path, *written]
