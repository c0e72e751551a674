"""Tiny randomly initialised causal LMs of several families, built from configs (no download)."""

from __future__ import annotations

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gpt_neox", "opt", "gpt2", "phi")


def tiny_config(family: str, hidden: int = 64, layers: int = 2, vocab: int = 128):
    """A small config of ``family`` whose linear input dims are multiples of 4 (64 by default)."""
    import transformers as tf

    common = dict(vocab_size=vocab, num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(
            **common,
            intermediate_size=2 * hidden,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            **common, intermediate_size=2 * hidden, max_position_embeddings=256, bos_token_id=0, eos_token_id=0
        )
    if family == "opt":
        return tf.OPTConfig(
            vocab_size=vocab,
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=4,
            ffn_dim=2 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab, n_layer=layers, n_embd=hidden, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0
        )
    if family == "phi":
        return tf.PhiConfig(
            **common, intermediate_size=2 * hidden, max_position_embeddings=256, bos_token_id=0, eos_token_id=0
        )
    raise ValueError(f"unknown family {family!r}")


def tiny_model(family: str = "llama", seed: int = 0, **kwargs):
    """A tiny random ``AutoModelForCausalLM`` of ``family`` in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs))
    return model.eval()


def random_windows(n: int = 8, seq_len: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    """Random token windows ``[n, seq_len]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=gen)


def tiny_tokenizer(vocab: int = 128):
    """A word-level fast tokenizer (whitespace split, ``vocab`` entries incl. ``<unk>``/``<eos>``) built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(vocab - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_corpus(n_docs: int = 40, words_per_doc: int = 60, vocab: int = 128, seed: int = 0) -> list[str]:
    """Random documents over the words of :func:`tiny_tokenizer`."""
    import random

    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab - 2)}" for _ in range(words_per_doc)) for _ in range(n_docs)]
