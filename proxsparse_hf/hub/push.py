"""Push a pruned model to the Hugging Face Hub as one atomic commit, with a generated model card.

``push_pruned_to_hub`` checks its arguments and the token, then builds the artefact + ``README.md`` (+ perplexity
chart) in a temporary folder (:func:`build_repo_folder`: no link is followed, no local path is written, only the files
the artefact format defines) — all before the repo is created or changed. Then it creates the repo
(``exist_ok=True``), gives it the requested visibility, and uploads the folder with a single ``upload_folder`` call: the
Hub either gets the whole commit or nothing. Transient failures (connection errors, timeouts, HTTP 429/5xx) are retried
with exponential backoff.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ..artefacts.base import PrunedModel, resolve_source
from ..artefacts.export import check_artefact_folder, prepare_artefact, write_artefact
from ..artefacts.registry import get_artefact
from ..artefacts.run_info import RunInfo
from ..config import ProxSparseConfig
from ..constants import CARD_NAME, RUN_INFO_NAME
from ..utils import read_json
from .results import CHART_NAME

__all__ = ["PushError", "build_repo_folder", "is_transient_error", "push_pruned_to_hub"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_STATUS = (429, 500, 502, 503, 504)
# exception class names (anywhere in the MRO) of network failures in httpx / httpx2 / requests / urllib3
_TRANSIENT_NAMES = {
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "WriteTimeout",
    "PoolTimeout",
    "TimeoutException",
    "NetworkError",
    "ReadError",
    "WriteError",
    "RemoteProtocolError",
    "ProtocolError",
    "ConnectionError",
    "ChunkedEncodingError",
    "TimeoutError",
}


class PushError(RuntimeError):
    """The upload failed; since it is a single commit, the repo was left as it was."""


def is_transient_error(exc: BaseException) -> bool:
    """True for failures worth retrying: network errors, timeouts, HTTP 429 and 5xx (anywhere in the cause chain)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names = {cls.__name__ for cls in type(current).__mro__}
        if "OfflineModeIsEnabled" in names:
            return False
        response = getattr(current, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status in _TRANSIENT_STATUS
        if names & _TRANSIENT_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


def _with_retries(fn: Callable[[], T], what: str, max_retries: int, backoff: float) -> T:
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= max_retries or not is_transient_error(exc):
                raise
            delay = backoff * (2**attempt)
            attempt += 1
            logger.warning(
                "%s failed (%s: %s); retry %d/%d in %.1f s", what, type(exc).__name__, exc, attempt, max_retries, delay
            )
            time.sleep(delay)


def _validate_repo_id(repo_id: Any) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"`repo_id`={repo_id!r} is invalid; allowed: 'name' or 'namespace/name'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"`repo_id`={repo_id!r} is invalid: {exc}") from exc
    if repo_id.count("/") > 1:
        raise ValueError(f"`repo_id`={repo_id!r} is invalid; allowed: 'name' or 'namespace/name'.")
    return repo_id


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(
            "`token` is invalid; allowed: a non-empty Hub access token string or None (use the saved one)."
        )
    token = token or get_token()
    if not token:
        raise ValueError(
            "Pushing to the Hub needs a write token: pass `token=...`, set HF_TOKEN, or run `hf auth login`."
        )
    return token


def build_repo_folder(
    source: str | os.PathLike | nn.Module | PrunedModel,
    folder: str | os.PathLike,
    *,
    artefact: str = "dense",
    dtype: str | torch.dtype | None = None,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    base_model: str | None = None,
    base_revision: str | None = None,
    card: bool = True,
    repo_id: str | None = None,
    license: str | None = None,
    comparison: str | os.PathLike | Sequence[Any] | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> list[str]:
    """Write what a push uploads into the empty ``folder``: the artefact, its metadata and the card; returns the files.

    The comparison is read first; then the source is loaded (refusing links inside an output folder), stripped of
    local paths and validated by the artefact format; then everything is written and the folder is checked to hold
    only regular files the format defines (plus ``README.md`` / ``perplexity.png``).

    Args:
        source: output folder, pruned model or :class:`~proxsparse_hf.artefacts.base.PrunedModel`.
        folder: an existing empty folder.
        artefact: a registered artefact format.
        dtype, tokenizer, config: see :func:`~proxsparse_hf.artefacts.export.prepare_artefact`.
        base_model: the base model to record everywhere (Hub id ``org/name``, or a local path recorded as its base
            name + SHA-256); default: the recorded one.
        base_revision: revision of ``base_model``.
        card: write the model card (and the chart when there are perplexities).
        repo_id, license, comparison, token, endpoint: see :func:`~proxsparse_hf.hub.card.build_model_card`.

    Raises:
        ValueError: a bad argument, a link in the output folder, an unreadable comparison, a card that does not
            validate, or what the artefact format refuses.
    """
    from .card import save_model_card
    from .facts import inherit_license
    from .results import card_results

    fmt = get_artefact(artefact)
    if card:
        card_results(None, comparison)  # a bad comparison fails before any model is loaded
    src = resolve_source(source, tokenizer=tokenizer, config=config, dtype=dtype if fmt.casts_dtype else None)
    if card and license is None:  # read from the local base model before its path is dropped
        recorded = src.config.base_model_name_or_path or src.run_info.base_model
        license = inherit_license(recorded, revision=src.config.revision, token=token, endpoint=endpoint)
    fmt, prepared = prepare_artefact(artefact, src, base_model=base_model, base_revision=base_revision)
    folder = os.fspath(folder)
    write_artefact(fmt, prepared, folder)
    if card:
        save_model_card(
            prepared,
            folder,
            artefact=artefact,
            repo_id=repo_id,
            license=license,
            comparison=comparison,
            token=token,
            endpoint=endpoint,
        )
    return check_artefact_folder(fmt, folder, extra_files=(CARD_NAME, CHART_NAME))


def _set_visibility(api, repo_id: str, private: bool, max_retries: int, backoff: float) -> None:
    """Give an existing repo the requested visibility, or raise before anything is uploaded."""
    info = _with_retries(lambda: api.model_info(repo_id), "model_info", max_retries, backoff)
    if bool(info.private) == private:
        return
    word = "private" if private else "public"
    logger.info("Making %s %s", repo_id, word)
    try:
        if hasattr(api, "update_repo_settings"):
            _with_retries(
                lambda: api.update_repo_settings(repo_id, private=private),
                "update_repo_settings",
                max_retries,
                backoff,
            )
        else:  # huggingface_hub < 0.25
            _with_retries(
                lambda: api.update_repo_visibility(repo_id, private=private),
                "update_repo_visibility",
                max_retries,
                backoff,
            )
        changed = bool(_with_retries(lambda: api.model_info(repo_id), "model_info", max_retries, backoff).private)
    except Exception as exc:
        raise ValueError(f"Cannot make {repo_id!r} {word} ({exc}); nothing was uploaded.") from exc
    if changed != private:
        raise ValueError(f"{repo_id!r} is still not {word} after changing its settings; nothing was uploaded.")


def push_pruned_to_hub(
    output_dir_or_model: str | os.PathLike | nn.Module | PrunedModel,
    repo_id: str,
    *,
    artefact: str = "dense",
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    tokenizer: Any = None,
    config: ProxSparseConfig | None = None,
    dtype: str | torch.dtype | None = None,
    card: bool = True,
    base_model: str | None = None,
    base_revision: str | None = None,
    license: str | None = None,
    comparison: str | os.PathLike | Sequence[Any] | None = None,
    endpoint: str | None = None,
    max_retries: int = 3,
    retry_backoff: float = 1.0,
) -> str:
    """Upload a pruned model (one artefact + model card) to the Hub in a single commit; returns the commit URL.

    Args:
        output_dir_or_model: an output folder, a pruned model (with ``tokenizer`` / ``config``) or a
            :class:`~proxsparse_hf.artefacts.base.PrunedModel`.
        repo_id: ``"namespace/name"`` (or ``"name"`` for the token's user).
        artefact: a registered artefact format: ``"dense"`` (plain transformers checkpoint), ``"compact"`` (kept
            values + packed positions), ``"mask"`` (mask-only adapter), ...
        private: True / False: the repo's visibility, applied to an existing repo too (before the upload); None: a
            new repo is public, an existing one keeps its visibility.
        revision: branch to commit to (created from the default branch when missing).
        token: Hub token; default: the saved one / ``HF_TOKEN``.
        commit_message: default ``"Upload 2:4 pruned model (<artefact>, <method>)"``.
        create_pr: open a pull request instead of committing to the branch.
        tokenizer: tokenizer of an in-memory model.
        config: recipe of an in-memory model.
        dtype: cast weights for the formats that store them (e.g. ``"bfloat16"``).
        card: write ``README.md`` (and ``perplexity.png`` when results exist).
        base_model: the base model's Hub id (``org/name``) to record in every file and the card instead of the
            recorded one (e.g. a local path, which is otherwise recorded as its base name + SHA-256).
        base_revision: revision of ``base_model``.
        license: card license (default: inherited from the base model).
        comparison: results of dense / baseline models for the card (``comparison.json`` of ``proxsparse compare``).
        endpoint: Hub endpoint (default: ``HF_ENDPOINT`` / huggingface.co).
        max_retries: retries of each network step on transient errors.
        retry_backoff: first retry delay in seconds (doubles each retry).

    Returns:
        The URL of the commit (of the pull request's commit with ``create_pr=True``).

    Raises:
        ValueError: bad arguments, no / rejected token, a link in the output folder, a target weight that is not 2:4,
            a card that does not validate — all before the repo is created or changed — or a visibility that cannot
            be applied (before the upload).
        PushError: the upload failed (after retries); the repo is unchanged and no local file was modified.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    fmt = get_artefact(artefact)
    repo_id = _validate_repo_id(repo_id)
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise ValueError(f"`max_retries`={max_retries!r} is invalid; allowed: an integer >= 0.")
    if not isinstance(retry_backoff, (int, float)) or retry_backoff < 0:
        raise ValueError(f"`retry_backoff`={retry_backoff!r} is invalid; allowed: a number >= 0.")
    if revision is not None and (not isinstance(revision, str) or not revision):
        raise ValueError(f"`revision`={revision!r} is invalid; allowed: None or a branch name.")
    if private is not None and not isinstance(private, bool):
        raise ValueError(f"`private`={private!r} is invalid; allowed: None, True or False.")
    token = _resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        user = _with_retries(lambda: api.whoami(), "whoami", max_retries, retry_backoff)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise ValueError(f"The Hub at {api.endpoint} rejected the token (HTTP {status}): {exc}") from exc
        raise PushError(f"Cannot reach the Hub at {api.endpoint} to check the token: {exc}") from exc
    except Exception as exc:
        raise PushError(f"Cannot reach the Hub at {api.endpoint} to check the token: {exc}") from exc
    if "/" not in repo_id:
        repo_id = f"{user['name']}/{repo_id}"

    with tempfile.TemporaryDirectory(prefix="proxsparse-push-") as tmp:
        folder = os.path.join(tmp, "repo")
        os.mkdir(folder)
        files = build_repo_folder(  # everything is built and validated before the repo is touched
            output_dir_or_model,
            folder,
            artefact=fmt.name,
            dtype=dtype,
            tokenizer=tokenizer,
            config=config,
            base_model=base_model,
            base_revision=base_revision,
            card=card,
            repo_id=repo_id,
            license=license,
            comparison=comparison,
            token=token,
            endpoint=api.endpoint,
        )
        method = RunInfo.from_dict(read_json(os.path.join(folder, RUN_INFO_NAME), "run info")).method
        try:
            repo_url = _with_retries(
                lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                "create_repo",
                max_retries,
                retry_backoff,
            )
            if revision is not None and not create_pr:
                _with_retries(
                    lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
                    "create_branch",
                    max_retries,
                    retry_backoff,
                )
        except HfHubHTTPError as exc:
            if not is_transient_error(exc):
                raise ValueError(f"Cannot create or access {repo_id!r} at {api.endpoint}: {exc}") from exc
            raise PushError(f"Cannot create or access {repo_id!r} at {api.endpoint}: {exc}") from exc
        except Exception as exc:
            raise PushError(f"Cannot create or access {repo_id!r} at {api.endpoint}: {exc}") from exc
        if private is not None:
            _set_visibility(api, repo_id, private, max_retries, retry_backoff)

        message = commit_message or f"Upload 2:4 pruned model ({fmt.name}, {method})"
        try:
            info = _with_retries(
                lambda: api.upload_folder(
                    repo_id=repo_id,
                    folder_path=folder,
                    allow_patterns=files,
                    commit_message=message,
                    revision=revision,
                    create_pr=create_pr,
                    repo_type="model",
                ),
                "upload_folder",
                max_retries,
                retry_backoff,
            )
        except Exception as exc:
            raise PushError(
                f"Uploading {len(files)} files to {repo_id!r}"
                + (f" (revision {revision!r})" if revision else "")
                + f" failed after {max_retries + 1 if is_transient_error(exc) else 1} attempt(s): "
                f"{type(exc).__name__}: {exc}. The upload is a single commit, so the repo was left unchanged; no "
                f"local file was modified."
            ) from exc
    url = str(getattr(info, "commit_url", None) or info)
    pr_url = getattr(info, "pr_url", None)
    logger.info(
        "Pushed %s artefact to %s: %s%s",
        fmt.name,
        getattr(repo_url, "url", repo_id),
        url,
        f" (PR {pr_url})" if pr_url else "",
    )
    return url
