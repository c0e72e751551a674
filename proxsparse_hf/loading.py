"""Loading a causal LM and its tokenizer the way every CLI command does (local path, Hub id, or GGUF file)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

__all__ = ["DTYPES", "input_device", "load_model_and_tokenizer", "model_revision", "resolve_dtype"]

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
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None and device_map is not None:
        raise ValueError(
            f"`device`={device!r} and `device_map`={device_map!r} are exclusive; give one (device_map splits the "
            "model across devices, device moves all of it to one)."
        )

    if gguf_file is None and str(name_or_path).endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file {name_or_path!r} does not exist.")
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    kwargs: dict[str, Any] = {"revision": revision, "token": token, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    torch_dtype = resolve_dtype(dtype)
    logger.info("Loading %s%s", name_or_path, f" ({gguf_file})" if gguf_file else "")
    load_kwargs = {"device_map": device_map} if device_map is not None else {}
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype, **kwargs, **load_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if gguf_file is not None:
        _drop_gguf_quantizer(model)
    if device is not None:
        model.to(device)
    return model, tokenizer


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
