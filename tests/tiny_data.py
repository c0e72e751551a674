"""Small corpora and tokenizers with and without BOS for the data / perplexity-window tests (built offline)."""

from __future__ import annotations

import json
import lzma
import os

BOS_ID = 1


def word_tokenizer(add_bos: bool, vocab: int = 128):
    """A word-level fast tokenizer over ``<unk>``, ``<s>`` (BOS, id 1) and ``w0 .. w{vocab-3}``; it prepends ``<s>``
    to every encoding when ``add_bos`` (a template post-processor, as Llama/Mistral/Gemma tokenizers do) and only
    declares it otherwise (as GPT-2 / SmolLM2 do)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>"] + [f"w{i}" for i in range(vocab - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", pad_token="<unk>")


def write_jsonl(path: str | os.PathLike, texts: list[str], *, xz: bool = False, **extra) -> str:
    """``{"text": ..., **extra}`` lines, xz-compressed when ``xz``; returns the path."""
    lines = "".join(json.dumps({"text": t, **extra}) + "\n" for t in texts).encode("utf-8")
    if xz:
        with lzma.open(path, "wb") as fh:
            fh.write(lines)
    else:
        with open(path, "wb") as fh:
            fh.write(lines)
    return os.fspath(path)
