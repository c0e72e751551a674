"""Loading a causal LM and its tokenizer the way every CLI command does (local path, Hub id, or GGUF file).

The pieces load separately, so a command can check everything that is cheap first: :func:`load_config` (``config.json``
or the GGUF metadata), :func:`empty_model` (the architecture on the meta device, for target matching),
:func:`load_tokenizer` (for counting calibration tokens), and only then :func:`load_model` (the weights).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "empty_model",
    "input_device",
    "load_config",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_revision",
    "resolve_dtype",
    "split_model_source",
]

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"float32"|"bfloat16"|"float16"|"auto"|None`` or a ``torch.dtype`` → what ``from_pretrained`` accepts."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"`dtype`={dtype!r} is invalid; allowed: 'auto', {', '.join(repr(d) for d in DTYPES)}.")
    return DTYPES[dtype]


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs go: the device of its first parameter (the embeddings, also under ``device_map``)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def model_revision(model) -> str | None:
    """Commit hash the model was loaded from (Hub models), else None."""
    return getattr(getattr(model, "config", None), "_commit_hash", None)


def split_model_source(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or Hub id, GGUF file name or None)``: a path to a ``.gguf`` file is split into its folder and name.

    Raises:
        FileNotFoundError: a ``.gguf`` path that does not exist.
    """
    name_or_path = os.fspath(name_or_path)
    if gguf_file is None and name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist.")
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    return name_or_path, gguf_file


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def _reading(name_or_path: str, gguf_file: str | None) -> Iterator[None]:
    """Turn what transformers raises for an unreadable GGUF file (``cannot reshape array ...``, ``struct.error``) into
    one ``ValueError`` line naming the file."""
    if gguf_file is None:
        yield
        return
    path = os.path.join(name_or_path, gguf_file) if os.path.isdir(name_or_path) else f"{name_or_path}/{gguf_file}"
    try:
        yield
    except (ValueError, IndexError, struct.error, EOFError) as exc:
        first = _first_line(exc)
        truncated = not isinstance(exc, ValueError) or "reshape" in first
        hint = " (the file is truncated or corrupt)" if truncated else ""
        raise ValueError(f"Cannot read GGUF file {path!r}{hint}: {first}") from exc


def _hub_kwargs(revision: str | None, token: str | None, trust_remote_code: bool, gguf_file: str | None) -> dict:
    kwargs: dict[str, Any] = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    return kwargs


def load_config(
    name_or_path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The model's ``AutoConfig`` (small: ``config.json``, or the metadata of a GGUF file) without its weights.

    Raises:
        FileNotFoundError: the model does not exist or has no config (one line naming it).
        ValueError: a config transformers cannot use, or an unreadable GGUF file (one line naming it).
    """
    from transformers import AutoConfig

    name_or_path, gguf_file = split_model_source(name_or_path, gguf_file)
    try:
        with _reading(name_or_path, gguf_file):
            return AutoConfig.from_pretrained(
                name_or_path, **_hub_kwargs(revision, token, trust_remote_code, gguf_file)
            )
    except OSError as exc:
        raise FileNotFoundError(f"Cannot load model {name_or_path!r}: {_first_line(exc)}") from exc
    except ValueError as exc:  # e.g. a config.json without model_type, or an architecture transformers does not know
        if gguf_file is not None:
            raise
        raise ValueError(f"Cannot load model {name_or_path!r}: {_first_line(exc)}") from exc


def empty_model(config: Any) -> torch.nn.Module:
    """An ``AutoModelForCausalLM`` of ``config`` on the meta device: its module names and weight shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(
    name_or_path: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The model's ``AutoTokenizer`` (pad token = EOS when it has none)."""
    from transformers import AutoTokenizer

    name_or_path, gguf_file = split_model_source(name_or_path, gguf_file)
    with _reading(name_or_path, gguf_file):
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, **_hub_kwargs(revision, token, trust_remote_code, gguf_file)
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike,
    *,
    config: Any = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """``AutoModelForCausalLM`` from a local folder, Hub id or GGUF file (see :func:`load_model_and_tokenizer`).

    ``config`` (from :func:`load_config`) spares reading the config a second time (for a GGUF file: parsing it).
    """
    from transformers import AutoModelForCausalLM

    if device is not None and device_map is not None:
        raise ValueError(
            f"`device`={device!r} and `device_map`={device_map!r} are exclusive; give one (device_map splits the "
            "model across devices, device moves all of it to one)."
        )
    name_or_path, gguf_file = split_model_source(name_or_path, gguf_file)
    torch_dtype = resolve_dtype(dtype)
    logger.info("Loading %s%s", name_or_path, f" ({gguf_file})" if gguf_file else "")
    kwargs = _hub_kwargs(revision, token, trust_remote_code, gguf_file)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if config is not None:
        kwargs["config"] = config
    with _reading(name_or_path, gguf_file):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs)
    if gguf_file is not None:
        _drop_gguf_quantizer(model)
    if device is not None:
        model.to(device)
    return model


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local folder or Hub id.

    A path to a ``.gguf`` file is accepted as ``name_or_path`` (its folder and file name are split); GGUF weights are
    de-quantised by transformers (needs ``pip install gguf``). ``device`` moves the whole model to one device;
    ``device_map`` (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, a device, or a
    ``{module: device}`` dict) splits it across devices through accelerate, as in ``from_pretrained``.

    Raises:
        ValueError: ``device`` and ``device_map`` both given, or an unreadable GGUF file (one line naming it).
    """
    name_or_path, gguf_file = split_model_source(name_or_path, gguf_file)
    options = {"gguf_file": gguf_file, "revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    model = load_model(name_or_path, dtype=dtype, device=device, device_map=device_map, **options)
    return model, load_tokenizer(name_or_path, **options)


def _drop_gguf_quantizer(model) -> None:
    """transformers de-quantises GGUF weights to ordinary float tensors but keeps a GGUF "quantizer" on the model, which
    makes ``Trainer`` refuse to train it and ``save_pretrained`` refuse to save it. The weights are plain tensors, so the
    marker is removed; the model then trains and saves like any float model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and type(quantizer).__name__ == "GgufHfQuantizer":
        quantizer.remove_quantization_config(model)
        for module in model.modules():
            if getattr(getattr(module, "config", None), "_is_quantized", False):
                module.config._is_quantized = False
