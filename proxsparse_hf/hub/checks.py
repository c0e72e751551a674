"""Local validation of a model card: what the Hub would reject or render wrongly, checked before anything is uploaded."""

from __future__ import annotations

import re
from typing import Any

from ..artefacts.publish import is_hub_id
from ..artefacts.registry import BASE_MODEL_RELATIONS
from .results import finite

__all__ = ["check_model_card"]

_PLACEHOLDERS = ("{{", "}}", "[More Information Needed]", "| nan", "| None |", "TODO")


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
        bad = [b for b in bases if not is_hub_id(b)]
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
                if finite(metric.get("value")) is None:
                    raise ValueError(
                        f"model-index metric {metric.get('type')!r} has a non-numeric value {metric.get('value')!r}."
                    )
    body = text[match.end() :]
    for marker in _PLACEHOLDERS:
        if marker in body:
            raise ValueError(f"The card body contains the placeholder {marker!r}.")
    return meta
